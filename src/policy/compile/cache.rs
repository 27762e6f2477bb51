//! policy::compile::cache: a route's `cache`, refusing a shared cache of personal answers.

use std::time::Duration;

use serde_saphyr::Spanned;

use super::diagnostics::Diagnostics;
use crate::policy::raw;
use crate::policy::CachePolicy;

/// `personal`: the route's fetches whose answer depends on who asks, with the reason.
pub(super) fn compile_cache(
    spec: Spanned<raw::RawCache>,
    personal: &[(String, String)],
    diags: &mut Diagnostics,
) -> Option<CachePolicy> {
    let at = spec.referenced;
    let spec = spec.value;
    if spec.ttl.value.0.is_zero() {
        diags.at(&spec.ttl.referenced, "cache `ttl` must be longer than zero");
    }
    let beta = spec.beta.as_ref().map_or(1.0, |b| b.value);
    if let Some(b) = &spec.beta {
        if !(b.value.is_finite() && b.value > 0.0) {
            diags.at(
                &b.referenced,
                "cache `beta` must be a positive number (1.0 is the usual)",
            );
        }
    }
    if spec.scope == raw::CacheScope::Shared {
        for (fetch, reason) in personal {
            diags.at(
                &at,
                format!(
                    "`scope: shared` caches one answer for everyone, but fetch `{fetch}` {reason}: personalised data must use `scope: user`"
                ),
            );
        }
    }
    Some(CachePolicy {
        scope: spec.scope,
        ttl: spec.ttl.value.0,
        jitter: spec.jitter.map_or(Duration::ZERO, |d| d.0),
        beta,
        stale_while_revalidate: spec.stale_while_revalidate.map_or(Duration::ZERO, |d| d.0),
        degraded_ttl: spec.degraded_ttl.map(|d| d.0),
    })
}
