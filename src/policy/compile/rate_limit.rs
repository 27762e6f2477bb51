//! policy::compile::rate_limit: the policy's, a route's and `auth.failure_limit` rate limits,
//! and the client address anonymous requests are counted by.

use std::num::NonZeroU32;
use std::time::Duration;

use http::HeaderName;
use serde_saphyr::Spanned;

use super::diagnostics::Diagnostics;
use crate::policy::raw;
use crate::policy::{ClientAddress, RateLimit};

/// `client_address`: each trusted proxy a CIDR (`10.0.0.0/8`) or one address.
pub(super) fn compile_client_address(
    spec: Spanned<raw::RawClientAddress>,
    diags: &mut Diagnostics,
) -> ClientAddress {
    let spec = spec.value;
    let trusted_proxies = spec
        .trusted_proxies
        .iter()
        .filter_map(|proxy| {
            let text = proxy.value.trim();
            let net = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    format!("`client_address.trusted_proxies`: `{text}` is not an address or CIDR (like 10.0.0.0/8)")
                });
            diags.check(&proxy.referenced, net)
        })
        .collect();
    let header = match spec.header {
        Some(header) => {
            let name = HeaderName::from_bytes(header.value.as_bytes()).map_err(|_| {
                format!(
                    "`client_address.header`: `{}` is not a header name",
                    header.value
                )
            });
            diags.check(&header.referenced, name)
        }
        None => None,
    };
    ClientAddress {
        trusted_proxies,
        header: header.unwrap_or_else(|| ClientAddress::default().header),
    }
}

/// `owner`: how messages start (`route `x`: `), empty for the policy's own limit; `key`: the
/// limit's key (`rate_limit`, `auth.failure_limit`).
pub(super) fn compile_rate_limit(
    spec: Spanned<raw::RawRateLimit>,
    owner: &str,
    key: &str,
    diags: &mut Diagnostics,
) -> Option<RateLimit> {
    let spec = spec.value;
    let requests = NonZeroU32::new(spec.requests.value);
    if requests.is_none() {
        diags.at(
            &spec.requests.referenced,
            format!("{owner}`{key}.requests` must be at least 1"),
        );
    }
    let per = spec.per.value.0;
    if per.is_zero() {
        diags.at(
            &spec.per.referenced,
            format!("{owner}`{key}.per` must be longer than zero"),
        );
    }
    let burst = match &spec.burst {
        Some(b) => {
            let burst = NonZeroU32::new(b.value);
            if burst.is_none() {
                diags.at(
                    &b.referenced,
                    format!("{owner}`{key}.burst` must be at least 1 (leave it out to allow `requests` at once)"),
                );
            }
            burst
        }
        None => requests,
    };
    let limit = RateLimit {
        requests: requests?,
        per,
        burst: burst?,
    };
    // The limiter spends one request every `per / requests`, counted in whole nanoseconds.
    if !per.is_zero() && limit.interval().is_zero() {
        diags.at(
            &spec.requests.referenced,
            format!(
                "{owner}`{key}` of {} requests per {} is more than one a nanosecond; use fewer `requests` or a longer `per`",
                limit.requests,
                humantime::format_duration(per)
            ),
        );
        return None;
    }
    // Buckets count time in u64 nanoseconds (about 584 years); a year is plenty for a budget.
    pub(super) const LONGEST_REFILL: Duration = Duration::from_secs(366 * 24 * 3600);
    let refill = limit.interval().checked_mul(limit.burst.get());
    if refill.is_none_or(|refill| refill > LONGEST_REFILL) {
        let at = spec
            .burst
            .as_ref()
            .map_or(spec.per.referenced, |b| b.referenced);
        diags.at(
            &at,
            format!(
                "{owner}`{key}` would take more than a year to refill a burst of {} at {} requests per {}; use a smaller `burst` or a shorter `per`",
                limit.burst,
                limit.requests,
                humantime::format_duration(per)
            ),
        );
        return None;
    }
    (!per.is_zero()).then_some(limit)
}
