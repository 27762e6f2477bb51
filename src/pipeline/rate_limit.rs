//! Rate limits per client identity: the policy's `rate_limit`, one budget shared by every matched
//! route, and a route's own `rate_limit` on top of it. Each is a GCRA bucket per identity
//! (governor): the token's `sub`, the API key's name, or the client's address. A request over
//! either limit is answered `RATE_LIMITED` 429 with `Retry-After`. Also the limit on failed
//! authentications per client address (`auth.failure_limit`), which keeps credentials from
//! being guessed.

use std::time::{Duration, Instant};

use http::HeaderValue;
use pingora::proxy::Session;

use super::auth::{AuthFailure, Refusal};
use super::ctx::RequestCtx;
use super::respond;
use super::shared::Shared;
use crate::caller::Identity;
use crate::envelope::ErrorCode;
use crate::policy::RouteAuth;

/// The identity a request is limited as: the verified token's `sub` (a string or a number, as
/// cache keys take it), else the API key's name, else the client's address.
pub fn identity(ctx: &RequestCtx) -> Identity {
    let subject = ctx
        .claims
        .as_deref()
        .and_then(|claims| crate::caller::claim_value(claims, "sub"))
        .filter(|sub| !sub.is_empty());
    if let Some(sub) = subject {
        return Identity::Subject(sub.into_owned());
    }
    if let Some(name) = &ctx.api_client {
        return Identity::ApiClient(name.clone());
    }
    Identity::of_address(ctx.client_address)
}

/// Answers 429 when the request's client address has had too many credentials refused and
/// the route would look at its credential. Runs before authentication; `Ok(true)`: the
/// response is written.
pub async fn too_many_failures(
    session: &mut Session,
    ctx: &RequestCtx,
    shared: &Shared,
) -> pingora::Result<bool> {
    let (Some(route), Some(failed_auths)) = (&ctx.route, &ctx.policy.rate_limits.failed_auths)
    else {
        return Ok(false);
    };
    if route.auth == RouteAuth::None {
        return Ok(false);
    }
    let address = Identity::of_address(ctx.client_address);
    let Some(wait) = failed_auths.refused(&address, Instant::now()) else {
        return Ok(false);
    };
    shared
        .metrics
        .auth_failures_total
        .with_label_values(&[ctx.policy.client.as_str(), "too_many_failures"])
        .inc();
    too_many(session, ctx, wait).await
}

/// Counts a refused credential against the client's address. A missing credential guesses
/// nothing, and a valid one without the route's scopes (403) guessed right: neither counts.
pub fn failed(ctx: &RequestCtx, refusal: &Refusal) {
    let Some(failed_auths) = &ctx.policy.rate_limits.failed_auths else {
        return;
    };
    if let Refusal::Unauthenticated { failure, .. } = refusal {
        if *failure != AuthFailure::Missing {
            let address = Identity::of_address(ctx.client_address);
            failed_auths.failed(&address, Instant::now());
        }
    }
}

/// Answers 429 when the request is over its identity's budget. Runs once the token is
/// verified, so the identity is known; `Ok(true)`: the response is written.
pub async fn refused(
    session: &mut Session,
    ctx: &RequestCtx,
    shared: &Shared,
) -> pingora::Result<bool> {
    let Some(route) = &ctx.route else {
        return Ok(false);
    };
    let limits = &ctx.policy.rate_limits;
    if limits.limits(&route.name).next().is_none() {
        return Ok(false);
    }
    let Err(wait) = limits.check(&route.name, &identity(ctx)) else {
        return Ok(false);
    };
    shared
        .metrics
        .rate_limited_total
        .with_label_values(&[ctx.policy.client.as_str(), &route.name])
        .inc();
    too_many(session, ctx, wait).await
}

/// The 429 envelope, with the wait until a request is admitted again; `Ok(true)`: written.
async fn too_many(
    session: &mut Session,
    ctx: &RequestCtx,
    wait: Duration,
) -> pingora::Result<bool> {
    let headers = [(
        http::header::RETRY_AFTER,
        HeaderValue::from(retry_after_seconds(wait)),
    )];
    respond::error(session, ctx, &ErrorCode::RateLimited.into(), &headers).await?;
    Ok(true)
}

/// `Retry-After` counts whole seconds: rounded up, so a client that waits as told finds a
/// request back, and at least 1, since 0 would invite an immediate retry.
pub(super) fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_never_zero() {
        let cases = [
            (Duration::ZERO, 1),
            (Duration::from_nanos(1), 1),
            (Duration::from_millis(999), 1),
            (Duration::from_secs(1), 1),
            (Duration::from_millis(1001), 2),
            (Duration::from_secs(3600), 3600),
        ];
        for (wait, seconds) in cases {
            assert_eq!(retry_after_seconds(wait), seconds, "{wait:?}");
        }
    }
}
