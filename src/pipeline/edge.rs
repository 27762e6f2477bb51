//! The edge of the pipeline: the trace id every response carries, taken from W3C `traceparent`
//! or `X-Trace-Id` when the client sent a well-formed one, generated otherwise.

use http::HeaderMap;
use rand::Rng;

pub const TRACE_HEADER: &str = "x-trace-id";

/// The request's trace id. A client-supplied value is only reused when it is short and plain,
/// since it is echoed into headers, logs and error bodies.
pub fn trace_id(headers: &HeaderMap) -> String {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(from_traceparent)
        .or_else(|| {
            headers
                .get(TRACE_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|v| is_plain_id(v))
                .map(str::to_string)
        })
        .unwrap_or_else(generate)
}

/// `version-traceid-parentid-flags`, e.g. `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
fn from_traceparent(value: &str) -> Option<String> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2);
    valid.then(|| trace.to_string())
}

fn is_plain_id(value: &str) -> bool {
    (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn generate() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn prefers_traceparent_then_header_then_generates() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id(&headers(&[("traceparent", tp), ("x-trace-id", "abc")])),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(trace_id(&headers(&[("x-trace-id", "req-42")])), "req-42");
        let generated = trace_id(&HeaderMap::new());
        assert_eq!(generated.len(), 32);
        assert_ne!(generated, trace_id(&HeaderMap::new()));
    }

    #[test]
    fn hostile_ids_are_replaced() {
        for bad in ["<script>", "a b", &"x".repeat(65)] {
            assert_ne!(trace_id(&headers(&[("x-trace-id", bad)])), bad);
        }
        let zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert_eq!(trace_id(&headers(&[("traceparent", zero)])).len(), 32);
        assert_ne!(
            trace_id(&headers(&[("traceparent", zero)])),
            "00000000000000000000000000000000"
        );
    }
}
