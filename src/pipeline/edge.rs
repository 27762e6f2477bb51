//! The edge of the pipeline: the trace id every response carries, taken from W3C `traceparent`
//! or `X-Trace-Id` when the client sent a well-formed one, generated otherwise; and the refusal
//! of requests that already passed through a BFF.

use http::{HeaderMap, HeaderValue};
use rand::Rng;

use crate::upstream::BFF_CLIENT_HEADER;

pub const TRACE_HEADER: &str = "x-trace-id";

/// Every call to an upstream carries `X-BFF-Client`; a client request carrying it came from a
/// BFF, and one BFF must never become another's dependency by accident.
pub fn came_from_a_bff(headers: &HeaderMap) -> bool {
    headers.contains_key(BFF_CLIENT_HEADER)
}

/// The `traceparent` upstreams get: the client's own when it is well-formed, otherwise one
/// carrying our trace id (when that is a W3C trace id) under a new parent id.
pub fn traceparent(headers: &HeaderMap, trace_id: &str) -> Option<HeaderValue> {
    if let Some(value) = headers.get("traceparent") {
        if value.to_str().ok().and_then(from_traceparent).as_deref() == Some(trace_id) {
            return Some(value.clone());
        }
    }
    let w3c = trace_id.len() == 32
        && trace_id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let parent = rand::rng().random::<u64>().max(1);
    w3c.then(|| HeaderValue::from_str(&format!("00-{trace_id}-{parent:016x}-01")).ok())
        .flatten()
}

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
    w3c_trace_id(rand::rng().random::<u128>())
}

/// 32 lowercase hex digits, written into a buffer: `format!("{:032x}")`, or collecting chars
/// one by one, cost a fall-through request more than a header lookup.
fn w3c_trace_id(id: u128) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 32];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = DIGITS[(id >> (124 - 4 * i)) as usize & 0xf];
    }
    String::from_utf8_lossy(&hex).into_owned()
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
    fn traceparent_is_kept_or_made_from_the_trace_id() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let h = headers(&[("traceparent", tp)]);
        assert_eq!(traceparent(&h, &trace_id(&h)).unwrap(), tp);
        let made = traceparent(&HeaderMap::new(), "4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let made = made.to_str().unwrap();
        assert_eq!(
            from_traceparent(made).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(traceparent(&HeaderMap::new(), "req-42"), None);
    }

    #[test]
    fn generated_ids_are_32_lowercase_hex_digits() {
        for id in [
            0,
            1,
            0xf << 124,
            u128::MAX,
            0x4bf92f3577b34da6a3ce929d0e0e4736,
        ] {
            assert_eq!(w3c_trace_id(id), format!("{id:032x}"));
        }
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
