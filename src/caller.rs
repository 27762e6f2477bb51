//! Who a request is, as the layers below the pipeline see it: the verified token's claims,
//! the identity that rate limits and circuit breakers count it as, and the trace header its
//! upstream calls carry. The pipeline fills them in; `upstream` reads them.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use serde_json::Value;

/// The header that carries a request's trace id to the client, the app and every upstream.
pub const TRACE_HEADER: &str = "x-trace-id";

/// A verified token's payload.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// A claim as a template value: strings and numbers only, so no structure leaks into a URL.
pub fn claim_value<'a>(claims: &'a Claims, name: &str) -> Option<Cow<'a, str>> {
    claims.get(name).and_then(scalar)
}

/// A JSON value as a template value: strings and numbers only.
pub fn scalar(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s.as_str())),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        _ => None,
    }
}

/// Who a request counts against, at rate limits and circuit breakers. The variants keep a
/// `sub` that looks like an address apart from that address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The verified token's `sub` claim: a string, or a number as written.
    Subject(String),
    /// The name of the verified API key (`{auth.client}`).
    ApiClient(Arc<str>),
    /// Neither: the client's IP address (IPv6: its /64, see [`address_key`]).
    Address(IpAddr),
    /// Neither, and no IP address (not a TCP client): such clients share one budget.
    Unknown,
}

impl Identity {
    pub fn of_address(address: Option<IpAddr>) -> Identity {
        match address {
            Some(ip) => Identity::Address(address_key(ip)),
            None => Identity::Unknown,
        }
    }
}

/// IPv4 addresses (also when mapped into IPv6) count one by one; IPv6 addresses by their /64,
/// because one host usually holds a whole /64 and could otherwise take a fresh budget, and a
/// fresh bucket in memory, for every request.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let key = |text: &str| address_key(text.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2::"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
    }
}
