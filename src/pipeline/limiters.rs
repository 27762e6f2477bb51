//! The rate limiters a policy puts to work, built once per policy, held by `Active` and asked
//! by the `rate_limit` stage: a GCRA bucket per identity for the policy's and each route's
//! `rate_limit` (governor), and the failed authentications per client address. Buckets of a
//! limit that did not change survive a reload.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::caller::Identity;
use crate::policy::{Policy, RateLimit};

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
    pub(super) failed_auths: Option<Arc<FailedAuths>>,
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
    pub(super) fn refused(&self, address: &Identity, now: Instant) -> Option<Duration> {
        let full_at = self.full_at.read().unwrap_or_else(PoisonError::into_inner);
        let until_full = full_at.get(address)?.checked_duration_since(now)?;
        // One more failure fits while the bucket is at most `burst - 1` intervals from full.
        let room = self.limit.interval() * (self.limit.burst.get() - 1);
        until_full.checked_sub(room).filter(|wait| !wait.is_zero())
    }

    /// Spends one failure of `address`'s budget (`refused` said it had one).
    pub(super) fn failed(&self, address: &Identity, now: Instant) {
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

    pub(super) fn limits(&self, route: &str) -> impl Iterator<Item = &Arc<Limiter>> {
        self.policy.iter().chain(self.routes.get(route))
    }

    /// Spends one request of `who`'s budget for `route`, or tells how long until the limit that
    /// refused it has one again. The policy's limit is asked first: a request it refuses leaves
    /// the route's bucket alone, and one the route's limit refuses has still spent from the
    /// policy's (governor cannot give a request back).
    pub(super) fn check(&self, route: &str, who: &Identity) -> Result<(), Duration> {
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

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use governor::clock::FakeRelativeClock;

    use super::*;
    // The waits as `Retry-After` states them.
    use crate::pipeline::rate_limit::retry_after_seconds;

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
