//! Assembly: a `fetch` route's sections under their names, after this response's `meta`, and
//! the headers that say whether the answer is whole.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue};
use serde::Serialize;

use crate::cache::Sections;
use crate::policy::Route;

/// `X-BFF-Degraded`: the sections served from their fallback.
pub const DEGRADED_HEADER: &str = "x-bff-degraded";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Meta<'a> {
    trace_id: &'a str,
    generated_at: String,
    latency_ms: u64,
    degraded: bool,
    degraded_sections: &'a [&'a str],
    cache: &'a str,
}

/// The whole body: `{"meta":{…},<sections>}`.
pub fn body(sections: &Sections, trace_id: &str, latency: Duration, cache: &str) -> Bytes {
    let names: Vec<&str> = sections.degraded.iter().map(String::as_str).collect();
    let meta = Meta {
        trace_id,
        generated_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
        degraded: sections.is_degraded(),
        degraded_sections: &names,
        cache,
    };
    let mut out = Vec::with_capacity(sections.json.len() + 200);
    out.extend_from_slice(b"{\"meta\":");
    // Serialising strings, numbers and bools into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &meta);
    if !sections.json.is_empty() {
        out.push(b',');
        out.extend_from_slice(&sections.json);
    }
    out.push(b'}');
    Bytes::from(out)
}

/// The route's headers; a degraded answer must not be kept by anyone, and names what is missing.
pub fn headers(route: &Route, sections: &Sections) -> Vec<(HeaderName, HeaderValue)> {
    if !sections.is_degraded() {
        return route.headers.clone();
    }
    let mut headers: Vec<_> = route
        .headers
        .iter()
        .filter(|(name, _)| name != header::CACHE_CONTROL)
        .cloned()
        .collect();
    headers.push((header::CACHE_CONTROL, HeaderValue::from_static("no-store")));
    // Names are `[A-Za-z0-9_]`: always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&sections.degraded.join(", ")) {
        headers.push((HeaderName::from_static(DEGRADED_HEADER), value));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Section;
    use crate::policy::{Fetch, Policy};
    use serde_json::{json, Value};

    fn route() -> Policy {
        Policy::from_yaml(
            r#"
client: web
upstreams: { a: { url: "http://127.0.0.1:1" } }
routes:
  - name: page
    method: GET
    path: /page
    headers: { Cache-Control: "private, max-age=30", X-Extra: "1" }
    fetch:
      user: { upstream: a, path: /u, critical: true, fields: [id] }
      tips: { upstream: a, path: /t, fields: [id], fallback: [] }
"#,
            std::path::Path::new("test.yaml"),
        )
        .unwrap()
    }

    fn fetches(policy: &Policy) -> &[Fetch] {
        match &policy.routes[0].action {
            crate::policy::Action::Fetch(f) => f,
            _ => unreachable!(),
        }
    }

    #[test]
    fn whole_answer_keeps_the_route_headers() {
        let policy = route();
        let sections = Sections::new(
            fetches(&policy),
            vec![
                Section::Ok(b"{\"id\":1}".to_vec()),
                Section::Ok(b"[]".to_vec()),
            ],
        );
        let body: Value =
            serde_json::from_slice(&body(&sections, "t1", Duration::from_millis(12), "off"))
                .unwrap();
        assert_eq!(body["user"], json!({"id": 1}));
        assert_eq!(body["tips"], json!([]));
        assert_eq!(body["meta"]["degraded"], json!(false));
        assert_eq!(body["meta"]["degradedSections"], json!([]));
        assert_eq!(body["meta"]["latencyMs"], json!(12));
        assert_eq!(body["meta"]["traceId"], json!("t1"));
        assert_eq!(
            headers(&policy.routes[0], &sections),
            policy.routes[0].headers
        );
    }

    #[test]
    fn degraded_answer_holds_the_fallback_and_is_not_stored() {
        let policy = route();
        let sections = Sections::new(
            fetches(&policy),
            vec![Section::Ok(b"{\"id\":1}".to_vec()), Section::Degraded],
        );
        let body: Value =
            serde_json::from_slice(&body(&sections, "t1", Duration::ZERO, "off")).unwrap();
        assert_eq!(body["tips"], json!([]));
        assert_eq!(body["meta"]["degraded"], json!(true));
        assert_eq!(body["meta"]["degradedSections"], json!(["tips"]));
        let headers = headers(&policy.routes[0], &sections);
        let get = |name: &str| {
            headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.to_str().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("cache-control"), ["no-store"]);
        assert_eq!(get("x-bff-degraded"), ["tips"]);
        assert_eq!(get("x-extra"), ["1"]);
    }
}
