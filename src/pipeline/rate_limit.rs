//! Rate limits per client identity: the policy's `rate_limit`, one budget shared by every matched
//! route, and a route's own `rate_limit` on top of it. Each is a GCRA bucket per identity
//! (governor): the token's `sub`, the API key's name, or the client's address. A request over
//! either limit is answered `RATE_LIMITED` 429 with `Retry-After`. Also the limit on failed
//! authentications per client address (`auth.failure_limit`), which keeps credentials from
//! being guessed.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use http::HeaderValue;
use pingora::proxy::Session;

use super::auth::{AuthFailure, Refusal};
use super::respond;
use crate::caller::Identity;
use crate::envelope::ErrorCode;
use crate::pipeline::{RequestCtx, Shared};
use crate::policy::{Policy, RateLimit, RouteAuth};

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

/// One `rate_limit`: a bucket per identity.
pub struct Limiter<C: Clock = DefaultClock> {
    limit: RateLimit,
    buckets: RateLimiter<Identity, DashMapStateStore<Identity>, C, NoOpMiddleware<C::Instant>>,
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Self {
        Limiter::with_clock(limit, DefaultClock::default())
    }
}

impl<C: Clock> Limiter<C> {
    fn with_clock(limit: RateLimit, clock: C) -> Self {
        // The loader refuses a zero interval, so the fallback is never taken.
        let quota = Quota::with_period(limit.interval())
            .unwrap_or_else(|| Quota::per_second(limit.requests))
            .allow_burst(limit.burst);
        Limiter {
            limit,
            buckets: RateLimiter::dashmap_with_clock(quota, clock),
        }
    }

    /// Spends one request of `who`'s budget, or tells how long until one is back.
    fn check(&self, who: &Identity) -> Result<(), Duration> {
        self.buckets
            .check_key(who)
            .map_err(|not_until| not_until.wait_time_from(self.buckets.clock().now()))
    }

    /// Forgets the identities whose buckets are full again (a fresh bucket is the same), so
    /// memory follows the clients seen recently, not every client ever seen.
    fn sweep(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

/// The limiters of one policy: the policy's own and each route's, by route name, and the
/// failed authentications' when the policy has `auth`.
#[derive(Default)]
pub struct RateLimits {
    policy: Option<Arc<Limiter>>,
    routes: HashMap<String, Arc<Limiter>>,
    failed_auths: Option<Arc<FailedAuths>>,
}

/// Failed authentications per client address, a GCRA bucket each. Once an address has spent
/// its budget its credentials are not even checked, so a right guess cannot come through, until
/// one failure comes back; whatever it presents meanwhile is answered 429. (governor cannot
/// tell whether a bucket has room without spending it, hence the few lines of GCRA here.)
pub struct FailedAuths {
    limit: RateLimit,
    /// Each address's theoretical arrival time: when its bucket is full again.
    full_at: RwLock<HashMap<Identity, Instant>>,
}

impl FailedAuths {
    fn new(limit: RateLimit) -> Self {
        FailedAuths {
            limit,
            full_at: RwLock::new(HashMap::new()),
        }
    }

    /// How long `address` has to wait for its next failure, when it has none left.
    fn refused(&self, address: &Identity, now: Instant) -> Option<Duration> {
        let full_at = self.full_at.read().unwrap_or_else(PoisonError::into_inner);
        let until_full = full_at.get(address)?.checked_duration_since(now)?;
        // One more failure fits while the bucket is at most `burst - 1` intervals from full.
        let room = self.limit.interval() * (self.limit.burst.get() - 1);
        until_full.checked_sub(room).filter(|wait| !wait.is_zero())
    }

    /// Spends one failure of `address`'s budget (`refused` said it had one).
    fn failed(&self, address: &Identity, now: Instant) {
        let mut full_at = self.full_at.write().unwrap_or_else(PoisonError::into_inner);
        let at = full_at.entry(address.clone()).or_insert(now);
        *at = (*at).max(now) + self.limit.interval();
    }

    /// Forgets the addresses whose buckets are full again.
    fn sweep(&self, now: Instant) {
        let mut full_at = self.full_at.write().unwrap_or_else(PoisonError::into_inner);
        full_at.retain(|_, at| *at > now);
        full_at.shrink_to_fit();
    }
}

impl RateLimits {
    /// `previous`: the limiters in force; a limit that did not change keeps its buckets, so a
    /// reload does not hand every client a fresh budget.
    pub fn new(policy: &Policy, previous: Option<&RateLimits>) -> RateLimits {
        let build = |limit: RateLimit, old: Option<&Arc<Limiter>>| {
            old.filter(|old| old.limit == limit)
                .cloned()
                .unwrap_or_else(|| Arc::new(Limiter::new(limit)))
        };
        let routes = policy
            .routes
            .iter()
            .filter_map(|route| {
                let old = previous.and_then(|p| p.routes.get(&route.name));
                Some((route.name.clone(), build(route.rate_limit?, old)))
            })
            .collect();
        let failed_auths = policy.auth.as_ref().map(|auth| {
            previous
                .and_then(|p| p.failed_auths.as_ref())
                .filter(|old| old.limit == auth.failure_limit)
                .cloned()
                .unwrap_or_else(|| Arc::new(FailedAuths::new(auth.failure_limit)))
        });
        RateLimits {
            policy: policy
                .rate_limit
                .map(|limit| build(limit, previous.and_then(|p| p.policy.as_ref()))),
            routes,
            failed_auths,
        }
    }

    fn limits(&self, route: &str) -> impl Iterator<Item = &Arc<Limiter>> {
        self.policy.iter().chain(self.routes.get(route))
    }

    /// Spends one request of `who`'s budget for `route`, or tells how long until the limit that
    /// refused it has one again. The policy's limit is asked first: a request it refuses leaves
    /// the route's bucket alone, and one the route's limit refuses has still spent from the
    /// policy's (governor cannot give a request back).
    fn check(&self, route: &str, who: &Identity) -> Result<(), Duration> {
        self.limits(route)
            .try_for_each(|limiter| limiter.check(who))
    }

    /// Drops idle identities from every bucket map; called every second by the policy watch.
    pub fn sweep(&self) {
        for limiter in self.policy.iter().chain(self.routes.values()) {
            limiter.sweep();
        }
        if let Some(failed_auths) = &self.failed_auths {
            failed_auths.sweep(Instant::now());
        }
    }
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
    let headers = [(
        http::header::RETRY_AFTER,
        HeaderValue::from(retry_after_seconds(wait)),
    )];
    respond::error(session, ctx, &ErrorCode::RateLimited.into(), &headers).await?;
    Ok(true)
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
    let headers = [(
        http::header::RETRY_AFTER,
        HeaderValue::from(retry_after_seconds(wait)),
    )];
    respond::error(session, ctx, &ErrorCode::RateLimited.into(), &headers).await?;
    Ok(true)
}

/// `Retry-After` counts whole seconds: rounded up, so a client that waits as told finds a
/// request back, and at least 1, since 0 would invite an immediate retry.
fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limit(requests: u32, per: Duration, burst: u32) -> RateLimit {
        RateLimit {
            requests: NonZeroU32::new(requests).unwrap(),
            per,
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    fn subject(sub: &str) -> Identity {
        Identity::Subject(sub.to_string())
    }

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

    #[test]
    fn the_wait_is_until_the_next_request_comes_back() {
        // One request every 10 s, two at once.
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(limit(6, Duration::from_secs(60), 2), clock.clone());
        let ada = subject("ada");
        assert_eq!(limiter.check(&ada), Ok(()));
        assert_eq!(limiter.check(&ada), Ok(()));
        let wait = limiter.check(&ada).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
        assert_eq!(retry_after_seconds(wait), 10);

        clock.advance(Duration::from_millis(2500));
        let wait = limiter.check(&ada).unwrap_err();
        assert_eq!(wait, Duration::from_millis(7500));
        assert_eq!(retry_after_seconds(wait), 8);

        clock.advance(Duration::from_millis(7499));
        let wait = limiter.check(&ada).unwrap_err();
        assert_eq!(retry_after_seconds(wait), 1, "{wait:?}");

        clock.advance(Duration::from_millis(1));
        assert_eq!(limiter.check(&ada), Ok(()));
        assert!(limiter.check(&ada).is_err(), "only one came back");
    }

    #[test]
    fn identities_have_their_own_buckets_and_idle_ones_are_forgotten() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(limit(1, Duration::from_secs(60), 1), clock.clone());
        let address = Identity::Address("192.0.2.7".parse().unwrap());
        // A subject that spells an address or a key's name is neither.
        let who_all = [
            subject("ada"),
            subject("192.0.2.7"),
            address.clone(),
            Identity::ApiClient("ada".into()),
        ];
        for who in who_all {
            assert_eq!(limiter.check(&who), Ok(()), "{who:?}");
            assert!(limiter.check(&who).is_err(), "{who:?}");
        }
        assert_eq!(limiter.buckets.len(), 4);

        limiter.sweep();
        assert_eq!(limiter.buckets.len(), 4, "buckets still refilling are kept");
        clock.advance(Duration::from_secs(121));
        limiter.sweep();
        assert_eq!(limiter.buckets.len(), 0, "full buckets are forgotten");
        assert_eq!(limiter.check(&address), Ok(()));
    }

    #[test]
    fn failures_are_refused_beyond_the_burst_until_one_comes_back() {
        // One failure back every 10 s, three at once.
        let failed_auths = FailedAuths::new(limit(6, Duration::from_secs(60), 3));
        let (here, there) = (
            Identity::of_address("192.0.2.7".parse().ok()),
            Identity::Unknown,
        );
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(failed_auths.refused(&here, t0), None);
            failed_auths.failed(&here, t0);
        }
        assert_eq!(
            failed_auths.refused(&here, t0),
            Some(Duration::from_secs(10))
        );
        assert_eq!(failed_auths.refused(&there, t0), None);
        let t1 = t0 + Duration::from_secs(4);
        assert_eq!(
            failed_auths.refused(&here, t1),
            Some(Duration::from_secs(6))
        );
        let t2 = t0 + Duration::from_secs(10);
        assert_eq!(failed_auths.refused(&here, t2), None, "one came back");
        failed_auths.failed(&here, t2);
        assert_eq!(
            failed_auths.refused(&here, t2),
            Some(Duration::from_secs(10))
        );

        failed_auths.sweep(t2 + Duration::from_secs(29));
        assert_eq!(
            failed_auths.full_at.read().unwrap().len(),
            1,
            "still refilling"
        );
        failed_auths.sweep(t2 + Duration::from_secs(30));
        assert_eq!(
            failed_auths.full_at.read().unwrap().len(),
            0,
            "full again: forgotten"
        );
    }
}
