//! The edge of the pipeline: the trace id every response carries, taken from W3C `traceparent`
//! or `X-Trace-Id` when the client sent a well-formed one, generated otherwise; and the refusal
//! of requests that already passed through a BFF; and the client's address, which behind a
//! trusted proxy is read from the proxy's header.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};
use rand::Rng;

use crate::caller::TRACE_HEADER;
use crate::policy::ClientAddress;
use crate::upstream::BFF_CLIENT_HEADER;

/// Every call to an upstream carries `X-BFF-Client`; a client request carrying it came from a
/// BFF, and one BFF must never become another's dependency by accident.
pub fn came_from_a_bff(headers: &HeaderMap) -> bool {
    headers.contains_key(BFF_CLIENT_HEADER)
}

/// The client's address: the TCP peer's, unless the peer is a trusted proxy. Then it is
/// nginx's `real_ip_recursive`: the `header` addresses (an `X-Forwarded-For` list, every
/// line of it, in order) are read from the right, each hop appended by a proxy, skipping the
/// trusted ones; the first untrusted one is the client. When every address is trusted, the
/// left-most is taken; an entry that is not an address stops the walk at the last one read,
/// since a trusted proxy never writes one and whatever lies to its left is the client's to forge.
pub fn client_address(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    policy: &ClientAddress,
) -> Option<IpAddr> {
    let peer = peer?.to_canonical();
    let trusted = |ip: &IpAddr| policy.trusted_proxies.iter().any(|net| net.contains(ip));
    if !trusted(&peer) {
        return Some(peer);
    }
    let mut found = peer;
    let mut hops: Vec<&str> = headers
        .get_all(&policy.header)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|hop| !hop.is_empty())
        .collect();
    while let Some(hop) = hops.pop() {
        let Some(ip) = hop_address(hop) else {
            break;
        };
        found = ip;
        if !trusted(&ip) {
            break;
        }
    }
    Some(found)
}

/// One hop of a forwarding header: an address, maybe with a port (`192.0.2.7:4711`,
/// `[2001:db8::1]:4711`), as some proxies write it.
fn hop_address(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()?;
    Some(ip.to_canonical())
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
    fn the_client_address_is_the_peer_unless_a_trusted_proxy_names_another() {
        let policy = ClientAddress {
            trusted_proxies: vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            ..ClientAddress::default()
        };
        let from = |peer: &str, lines: &[&str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append("x-forwarded-for", line.parse().unwrap());
            }
            client_address(Some(peer.parse().unwrap()), &h, &policy).map(|ip| ip.to_string())
        };
        let ip = |text: &str| Some(text.to_string());
        // An untrusted peer's header is never read.
        assert_eq!(from("192.0.2.1", &["198.51.100.9"]), ip("192.0.2.1"));
        // The right-most untrusted hop, whatever the client wrote to its left.
        assert_eq!(
            from("10.0.0.2", &["203.0.113.9, 198.51.100.9"]),
            ip("198.51.100.9")
        );
        assert_eq!(
            from("10.0.0.2", &["203.0.113.9", "198.51.100.9, 10.1.1.1"]),
            ip("198.51.100.9")
        );
        assert_eq!(from("10.0.0.2", &["198.51.100.9:4711"]), ip("198.51.100.9"));
        assert_eq!(
            from("::ffff:10.0.0.2", &["[2001:db9::1]:80"]),
            ip("2001:db9::1")
        );
        // Every hop trusted: the left-most; none, or not an address: the last trusted one read.
        assert_eq!(from("10.0.0.2", &["10.9.9.9, 10.1.1.1"]), ip("10.9.9.9"));
        assert_eq!(from("10.0.0.2", &[]), ip("10.0.0.2"));
        assert_eq!(
            from("10.0.0.2", &["198.51.100.9, bogus, 10.1.1.1"]),
            ip("10.1.1.1")
        );
        assert_eq!(client_address(None, &HeaderMap::new(), &policy), None);
        // No trusted proxies: the peer, always.
        let none = ClientAddress::default();
        let h = headers(&[("x-forwarded-for", "198.51.100.9")]);
        let peer = "10.0.0.2".parse().ok();
        assert_eq!(client_address(peer, &h, &none), peer);
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
