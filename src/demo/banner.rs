//! demo::banner: what `bff demo` prints once the sidecar is ready: tokens, a curl command per
//! route, the walk-through that breaks a mock to show degradation, and the admin port.

use std::time::Duration;

use serde_json::Value;

use super::mocks::{Mock, CONTROL_PATH};
use super::tokens::{demo_secret, DemoAuth, DEMO_API_KEY, DEMO_SUB, TOKEN_TTL_SECS, WALK_SUB};

/// One policy route, as much of it as the banner needs.
pub(super) struct RouteInfo<'a> {
    name: &'a str,
    method: &'a str,
    path: &'a str,
    /// The upstream of a `proxy` route, or of the first fetch of an aggregated one.
    upstream: &'a str,
    proxy_path: Option<&'a str>,
    /// An aggregated route's fetches, in policy order.
    fetches: Vec<FetchInfo<'a>>,
    spec: &'a Value,
}

/// One fetch of an aggregated route.
pub(super) struct FetchInfo<'a> {
    /// The section name (`recommendations`).
    name: &'a str,
    upstream: &'a str,
    path: &'a str,
    critical: bool,
}

impl<'a> RouteInfo<'a> {
    fn new(spec: &'a Value) -> Self {
        let fetches: Vec<FetchInfo> = spec
            .get("fetch")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(name, f)| FetchInfo {
                name,
                upstream: str_at(f, "/upstream").unwrap_or(""),
                path: str_at(f, "/path").unwrap_or("/"),
                critical: f.get("critical").and_then(Value::as_bool) == Some(true),
            })
            .collect();
        RouteInfo {
            name: str_at(spec, "/name").unwrap_or("?"),
            method: str_at(spec, "/method").unwrap_or("GET"),
            path: str_at(spec, "/path").unwrap_or("/"),
            upstream: str_at(spec, "/proxy/upstream")
                .or_else(|| fetches.first().map(|f| f.upstream))
                .unwrap_or(""),
            proxy_path: str_at(spec, "/proxy/path"),
            fetches,
            spec,
        }
    }

    /// The route's path with a sample id the mocks know in every `{param}`.
    fn sample_path(&self) -> String {
        fill(self.path, sample_id(self.upstream))
    }
}

/// What the demo prints once the sidecar is ready: demo tokens, then curl commands for this
/// policy's routes, a walk-through of degradation and the admin port.
pub(super) fn banner(
    policy: &Value,
    file: &str,
    listen: &str,
    admin: &str,
    secrets: &[String],
    auth: &DemoAuth,
) -> String {
    let routes: Vec<RouteInfo> = policy
        .get("routes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(RouteInfo::new)
        .collect();
    let base = format!("http://{listen}");
    // The curl option that sends the client's credential, when the policy wants one.
    let credential = |token: &str| match auth {
        DemoAuth::Tokens { .. } => format!(" -H \"Authorization: Bearer {token}\""),
        DemoAuth::ApiKey { header } => format!(" -H \"{header}: {DEMO_API_KEY}\""),
        _ => String::new(),
    };
    // A curl to the sidecar, with the client's credential.
    let with_token = |method: &str, path: &str, token: &str| {
        let flag = if method == "GET" {
            String::new()
        } else {
            format!("-X {method} ")
        };
        format!("  curl -i {flag}{base}{path}{}\n", credential(token))
    };
    let curl = |method: &str, path: &str| with_token(method, path, "$TOKEN");

    let client = str_at(policy, "/client").unwrap_or("?");
    let mut out = format!(
        "\nbff demo: the `{client}` sidecar ({file}) is ready on {base}, admin on http://{admin}\n"
    );
    for name in secrets {
        out += &format!("  it was given {name}={}\n", demo_secret(name));
    }
    match auth {
        DemoAuth::Open => {}
        DemoAuth::Tokens { main, walk, signed } => {
            out += &format!(
                "\nDemo tokens ({signed}; valid {} min, restart the demo for fresh ones).\n\
                 Paste these two lines first: the curls below use them.\n",
                TOKEN_TTL_SECS / 60
            );
            out += &format!("  TOKEN={main}\n  TOKEN2={walk}\n");
            out += &format!(
                "  # TOKEN is user {DEMO_SUB}; TOKEN2 is user {WALK_SUB}, for the degradation walk-through\n"
            );
        }
        DemoAuth::ApiKey { header } => {
            out += &format!(
                "\nDemo partner key: {DEMO_API_KEY} (sent in {header}; the keys file holds only its SHA-256).\n"
            );
        }
        DemoAuth::Unavailable(why) => {
            out += &format!("\nNo demo token: {why}. Routes behind auth answer 401.\n");
        }
    }

    out += "\nTry:\n";
    let aggregated: Vec<&RouteInfo> = routes.iter().filter(|r| !r.fetches.is_empty()).collect();
    for (i, route) in aggregated.iter().enumerate() {
        let sections: Vec<String> = route
            .fetches
            .iter()
            .map(|f| {
                let kind = if f.critical { ", critical" } else { "" };
                format!("{} (`{}`{kind})", f.name, f.upstream)
            })
            .collect();
        let how = if sections.len() > 1 {
            "fetched concurrently, each projected to its whitelist"
        } else {
            "projected to its whitelist"
        };
        out += &format!("  # {}: {} {how}\n", route.name, sections.join(", "));
        if let Some(cache) = route.spec.get("cache") {
            let scope = str_at(cache, "/scope").unwrap_or("?");
            let ttl = str_at(cache, "/ttl").unwrap_or("?");
            let scope = if scope == "user" {
                "per user"
            } else {
                "for everyone"
            };
            out += &format!("  #   the policy caches it {scope} for {ttl}: see `meta.cache`\n");
        }
        // The first curl stands alone: the token itself, not the shell variable.
        out += &match (i, auth) {
            (0, DemoAuth::Tokens { main, .. }) => {
                with_token(route.method, &route.sample_path(), main)
            }
            _ => curl(route.method, &route.sample_path()),
        };
        if let Some((fetch, direct)) = route
            .fetches
            .iter()
            .find_map(|f| Some((f, direct_curl(policy, f.upstream, f.path)?)))
        {
            out += &format!(
                "  #   the raw `{}` answer behind `{}`, before projection:\n{direct}",
                fetch.upstream, fetch.name
            );
        }
    }

    let proxies = routes.iter().filter(|r| r.proxy_path.is_some());
    for (i, route) in proxies.enumerate() {
        let sample = sample_id(route.upstream);
        let path = fill(route.path, sample);
        out += &format!(
            "  # {}: proxied to `{}`, answer projected: fields outside the whitelist never leave\n",
            route.name, route.upstream
        );
        out += &curl(route.method, &path);
        if let Some(direct) = route
            .proxy_path
            .and_then(|p| direct_curl(policy, route.upstream, &fill_template(p, sample)))
        {
            out += &format!("  #   the same object straight from the mock, unprojected:\n{direct}");
        }
        if i > 0 || route.method != "GET" || !route.path.contains('{') {
            continue;
        }
        out += "  # the upstream answers 404 → the 404 envelope; torn JSON → the 502 envelope\n";
        out += &curl("GET", &fill(route.path, "missing"));
        out += &curl("GET", &fill(route.path, "broken"));
        if !routes
            .iter()
            .any(|r| r.path == route.path && r.method == "DELETE")
        {
            out += "  # a method the route does not serve → the 405 envelope\n";
            out += &curl("DELETE", &path);
        }
    }
    if let (DemoAuth::Tokens { .. } | DemoAuth::ApiKey { .. }, Some(route)) = (auth, routes.first())
    {
        out += "  # no credential → the 401 envelope\n";
        out += &format!("  curl -i {base}{}\n", route.sample_path());
    }
    match str_at(policy, "/fallthrough") {
        Some(app) => {
            out += &format!("  # anything else falls through to `{app}` unchanged, streams too\n");
            out += &curl("GET", "/");
            out += &format!("  curl -N {base}/events{}\n", credential("$TOKEN"));
        }
        None => {
            out += "  # no fallthrough: anything else is the 404 envelope\n";
            out += &curl("GET", "/no/such/page");
        }
    }

    let walk_note = match auth {
        DemoAuth::Tokens { .. } => {
            "These use TOKEN2: the policy caches a complete page per user, and a hit would hide the failure.\n"
        }
        _ => "",
    };
    out += &degrade_walk(policy, &aggregated, walk_note, |path| {
        with_token("GET", path, "$TOKEN2")
    });
    out += &format!(
        "\nThe admin port (bff_degraded_responses_total counts the degradations):\n  \
         curl -s http://{admin}/metrics | grep bff_\n  curl -s http://{admin}/policy\n"
    );
    out += "\nCtrl-C stops the demo.\n\n";
    out
}

/// "Watch it degrade": steps that break the mocks behind the first aggregated GET route with an
/// optional fetch, and the curl that shows what the client gets each time. Empty when no route
/// fits.
pub(super) fn degrade_walk(
    policy: &Value,
    aggregated: &[&RouteInfo],
    note: &str,
    curl: impl Fn(&str) -> String,
) -> String {
    let has_mock = |upstream: &str| Mock::for_upstream(upstream).is_some_and(|m| m.is_data());
    let timeout = |upstream: &str| {
        str_at(policy, &format!("/upstreams/{upstream}/timeout"))
            .and_then(|t| humantime::parse_duration(t).ok().map(|d| (t, d)))
    };
    let Some((route, optional)) = aggregated
        .iter()
        .filter(|r| r.method == "GET")
        .find_map(|r| {
            // The optional fetch likeliest to time out: the one with the shortest timeout.
            let optional = r
                .fetches
                .iter()
                .filter(|f| !f.critical && has_mock(f.upstream))
                .min_by_key(|f| timeout(f.upstream).map_or(Duration::MAX, |(_, d)| d))?;
            Some((r, optional))
        })
    else {
        return String::new();
    };
    let control = |upstream: &str, query: &str| {
        let origin = str_at(policy, &format!("/upstreams/{upstream}/url"))
            .and_then(origin)
            .unwrap_or_default();
        if query.is_empty() {
            format!("  curl -s -X POST {origin}{CONTROL_PATH}; echo\n")
        } else {
            format!("  curl -s -X POST '{origin}{CONTROL_PATH}?{query}'; echo\n")
        }
    };
    let page = curl(&route.sample_path());
    let (section, upstream) = (optional.name, optional.upstream);

    let mut out = format!(
        "\nWatch it degrade. Every data mock obeys control requests on its own port:\n\
         POST {CONTROL_PATH}?fail=1 (answer 503), ?delay_ms=N (answer N ms late), ?hang=1 (never \
         answer), combined as ?fail=1&delay_ms=300; POST {CONTROL_PATH} alone is back to normal.\n{note}"
    );
    out += &format!(
        "  # 1. `{upstream}` fails: still 200, with meta.degraded: true, X-BFF-Degraded: {section}, and {section} holds its fallback\n"
    );
    out += &control(upstream, "fail=1");
    out += &page;
    let delay = timeout(upstream).map_or(500, |(_, d)| {
        u64::try_from(d.as_millis())
            .unwrap_or(0)
            .saturating_add(300)
    });
    let (slower, after) = timeout(upstream).map_or_else(
        || {
            (
                "slower than its timeout".to_string(),
                "at the timeout".to_string(),
            )
        },
        |(t, _)| (format!("slower than its {t} timeout"), format!("after {t}")),
    );
    out += &format!(
        "  # 2. `{upstream}` {slower}: the same fallback, {after} rather than {delay}ms (meta.latencyMs); then reset it\n"
    );
    out += &control(upstream, &format!("delay_ms={delay}"));
    out += &page;
    out += &control(upstream, "");
    if let Some(critical) = route
        .fetches
        .iter()
        .find(|f| f.critical && has_mock(f.upstream))
    {
        let status = route
            .spec
            .pointer("/on_critical_failure/status")
            .and_then(Value::as_u64)
            .unwrap_or(503);
        let code =
            str_at(route.spec, "/on_critical_failure/code").unwrap_or("DEPENDENCY_UNAVAILABLE");
        out += &format!(
            "  # 3. `{}` is critical: when it fails the whole answer is the {status} {code} envelope\n",
            critical.upstream
        );
        out += &control(critical.upstream, "fail=1");
        out += &page;
        out += "  # 4. back to normal: a complete page again\n";
        out += &control(critical.upstream, "");
        out += &page;
    }
    out
}

/// A curl straight to an upstream's mock at `path` (a fetch or proxy path template), with the
/// sidecar's machine credential if the upstream needs one. None when the template has inputs the
/// demo cannot fill or the upstream has no data mock.
pub(super) fn direct_curl(policy: &Value, upstream: &str, template: &str) -> Option<String> {
    if !Mock::for_upstream(upstream)?.is_data() {
        return None;
    }
    let path = fill_template(
        &template.replace("{jwt.sub}", DEMO_SUB),
        sample_id(upstream),
    );
    if path.contains('{') {
        return None;
    }
    let url = str_at(policy, &format!("/upstreams/{upstream}/url"))?.trim_end_matches('/');
    let spec = policy.pointer(&format!("/upstreams/{upstream}/credential"));
    let credential = match spec.map(|c| (str_at(c, "/header"), str_at(c, "/value"))) {
        None => String::new(),
        Some((Some(header), Some(value))) => {
            let value = fill_env(value)?;
            format!(" -H '{header}: {value}'")
        }
        Some(_) => return None,
    };
    let quote = if path.contains(['?', '&']) { "'" } else { "" };
    Some(format!(
        "  curl -s{credential} {quote}{url}{path}{quote}; echo\n"
    ))
}

/// A policy value with every `${env:NAME}` set to the demo's secret; None if it reads a file.
pub(super) fn fill_env(value: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let (name, after) = rest[start..].strip_prefix("${env:")?.split_once('}')?;
        out += &demo_secret(name);
        rest = after;
    }
    Some(out + rest)
}

/// `scheme://host:port` of a URL: where a mock listens, whatever path the upstream URL has.
pub(super) fn origin(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

pub(super) fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// An id the mocks know for the route's upstream.
pub(super) fn sample_id(upstream: &str) -> &'static str {
    match upstream {
        "orders" => "o-1001",
        "catalog" | "reco" => "p-1",
        "user" => DEMO_SUB,
        _ => "1",
    }
}

/// The route path with every `{param}` segment set to `value`.
pub(super) fn fill(path: &str, value: &str) -> String {
    let segments: Vec<&str> = path
        .split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                value
            } else {
                s
            }
        })
        .collect();
    segments.join("/")
}

/// An upstream path template with every `{path.*}` variable set to `value`.
pub(super) fn fill_template(template: &str, value: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{path.") {
        out.push_str(&rest[..start]);
        match rest[start..].find('}') {
            Some(end) => {
                out.push_str(value);
                rest = &rest[start + end + 1..];
            }
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out + rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn mobile_policy() -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/mobile.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        serde_saphyr::from_str(&text).unwrap()
    }

    #[test]
    fn banner_prints_tokens_curls_and_the_degradation_walk() {
        let policy = mobile_policy();
        let auth = DemoAuth::for_policy(&policy, jsonwebtoken::get_current_timestamp());
        let DemoAuth::Tokens { main, .. } = &auth else {
            panic!("no demo token");
        };
        let secrets = vec!["USER_SVC_TOKEN".to_string()];
        let out = banner(
            &policy,
            "policies/mobile.yaml",
            "127.0.0.1:8080",
            "127.0.0.1:9901",
            &secrets,
            &auth,
        );
        let expect = [
            format!("TOKEN={main}\n"),
            format!(
                "curl -i http://127.0.0.1:8080/mobile/v1/home -H \"Authorization: Bearer {main}\"\n"
            ),
            "curl -s -H 'Authorization: Bearer demo-user-svc-token' http://127.0.0.1:9101/users/usr_9821".into(),
            "curl -i http://127.0.0.1:8080/mobile/v1/products/p-1 -H \"Authorization: Bearer $TOKEN\"\n".into(),
            "curl -i http://127.0.0.1:8080/mobile/v1/orders/o-1001 -H \"Authorization: Bearer $TOKEN\"\n".into(),
            "curl -s -X POST 'http://127.0.0.1:9103/_demo?fail=1'".into(),
            "curl -i http://127.0.0.1:8080/mobile/v1/home -H \"Authorization: Bearer $TOKEN2\"\n".into(),
            "X-BFF-Degraded: recommendations".into(),
            "curl -s -X POST 'http://127.0.0.1:9103/_demo?delay_ms=500'".into(),
            "slower than its 200ms timeout".into(),
            "curl -s -X POST http://127.0.0.1:9103/_demo;".into(),
            "curl -s -X POST 'http://127.0.0.1:9101/_demo?fail=1'".into(),
            "503 USER_PROFILE_UNAVAILABLE".into(),
            "curl -s -X POST http://127.0.0.1:9101/_demo;".into(),
            "curl -s http://127.0.0.1:9901/metrics | grep bff_".into(),
        ];
        for line in expect {
            assert!(out.contains(&line), "missing {line:?} in:\n{out}");
        }
        assert!(!out.contains("NOT_IMPLEMENTED"), "{out}");
    }

    #[test]
    fn fill_env_and_origin() {
        assert_eq!(
            fill_env("Bearer ${env:USER_SVC_TOKEN}").as_deref(),
            Some("Bearer demo-user-svc-token")
        );
        assert_eq!(fill_env("${file:/run/secret}"), None);
        assert_eq!(
            origin("http://127.0.0.1:9103/api/v2").as_deref(),
            Some("http://127.0.0.1:9103")
        );
    }
}
