//! cache (stage): a cached `fetch` route's answer from L1 or L2 while it is fresh enough, else
//! recomputed once for everyone who asks.
//!
//! A fresh entry is served (`hit`); one that XFetch draws as expiring early is served and
//! recomputed in the background (`early`); one past its expiry but inside
//! `stale_while_revalidate` likewise (`stale`); anything else is a `miss`, recomputed once per
//! key in this process (the other requests wait for it: single-flight) and, with Redis, once
//! per key across instances (a short lock; a waiter recomputes itself as soon as the lock is
//! released without an entry, or when its wait ends, never past its deadline). Only whole
//! answers are stored, and degraded ones only when the route sets `degraded_ttl` and the key
//! holds no complete entry: a degraded refresh never replaces a complete answer.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use http::HeaderValue;
use rand::Rng;

use super::active::Active;
use super::ctx::RequestCtx;
use super::fanout;
use super::inputs::Inputs;
use super::shared::Shared;
use crate::cache::entry::now_ms;
use crate::cache::{
    jittered, key, Cache, Entry, Failed, Freshness, Layer, RouteFailure, Sections, L2,
};
use crate::caller::Claims;
use crate::caller::Identity;
use crate::metrics::Metrics;
use crate::policy::{Action, CachePolicy, CacheScope, Route, Var};
use crate::upstream::Caller;

/// How long a recompute holds its key's lock when the route has no `deadline`.
const DEFAULT_LOCK: Duration = Duration::from_secs(3);
/// How often a request waiting for another instance's recompute looks for its result.
const LOCK_POLL: Duration = Duration::from_millis(20);

/// What computing a route's answer needs, owned, so a recompute can outlive the request that
/// started it.
pub struct Work {
    pub active: Arc<Active>,
    pub route: Arc<Route>,
    pub params: Vec<(String, String)>,
    pub query: String,
    pub claims: Option<Arc<Claims>>,
    pub api_client: Option<Arc<str>>,
    /// Who the request is, as its upstream calls' circuit breakers count it.
    pub identity: Identity,
    pub trace_id: String,
    pub traceparent: Option<HeaderValue>,
    /// When the request started: the route's `deadline` counts from here.
    pub started: Instant,
    pub metrics: Arc<Metrics>,
    /// For fetches with a `cache` of their own.
    pub cache: Arc<Cache>,
}

impl Work {
    pub fn of(ctx: &RequestCtx, route: &Arc<Route>, query: &str, shared: &Shared) -> Work {
        Work {
            active: ctx.policy.clone(),
            route: route.clone(),
            params: ctx.params.clone(),
            query: query.to_string(),
            claims: ctx.claims.clone(),
            api_client: ctx.api_client.clone(),
            identity: super::rate_limit::identity(ctx),
            trace_id: ctx.trace_id.clone(),
            traceparent: ctx.traceparent.clone(),
            started: ctx.started,
            metrics: shared.metrics.clone(),
            cache: shared.cache.clone(),
        }
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            params: &self.params,
            query: &self.query,
            claims: self.claims.as_deref(),
            api_client: self.api_client.as_deref(),
        }
    }

    /// When the route's `deadline` passes for this request.
    fn deadline(&self) -> Option<Instant> {
        self.route.deadline.map(|d| self.started + d)
    }

    /// Runs the route's fetches: the sections, and how long that took.
    pub async fn compute(&self) -> Result<(Sections, Duration), RouteFailure> {
        let Action::Fetch(fetches) = &self.route.action else {
            return Ok((Sections::new(&[], Vec::new()), Duration::ZERO));
        };
        let started = Instant::now();
        let inputs = self.inputs();
        let request = fanout::Request {
            route: &self.route,
            inputs: &inputs,
            caller: Caller {
                route: &self.route.name,
                dependency: "",
                trace_id: &self.trace_id,
                traceparent: self.traceparent.as_ref(),
                claims: self.claims.as_ref(),
                api_client: self.api_client.as_ref(),
                identity: &self.identity,
            },
            metrics: &self.metrics,
            client: &self.active.client,
            cache: Some(&self.cache),
            deadline: self.deadline(),
        };
        let sections = fanout::run(fetches, &self.active.upstreams, &request).await?;
        Ok((Sections::new(fetches, sections), started.elapsed()))
    }

    /// The request's cache key (see `cache::key`).
    pub fn key(&self, policy: &CachePolicy) -> String {
        let inputs = self.inputs();
        let identity = self
            .claims
            .as_deref()
            .and_then(|c| crate::caller::claim_value(c, "sub"))
            .or_else(|| self.api_client.as_deref().map(Cow::Borrowed));
        // In a per-user key the identity comes first; `{jwt.sub}` and `{auth.client}` are it.
        let is_identity = |v: &&Var| {
            policy.scope == CacheScope::User
                && match v {
                    Var::AuthClient => true,
                    Var::Jwt(claim) => claim == "sub",
                    _ => false,
                }
        };
        let vars = key::inputs_of(&self.route);
        key::key(
            &self.route.key_prefix(&self.active.client),
            policy.scope,
            identity.as_deref(),
            vars.iter()
                .filter(|v| !is_identity(v))
                .map(|v| inputs.value(v, |_| None)),
        )
    }

    fn labels(&self) -> [&str; 2] {
        [self.active.client.as_str(), self.route.name.as_str()]
    }
}

/// Why a recompute ran: the `trigger` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Miss,
    Early,
    Stale,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Miss => "miss",
            Trigger::Early => "early",
            Trigger::Stale => "stale",
        }
    }
}

/// The route's answer and the `meta.cache` word for it (`hit`, `early`, `stale`, `miss`).
pub async fn serve(
    cache: &Arc<Cache>,
    work: Work,
    policy: &CachePolicy,
) -> Result<(Arc<Entry>, &'static str), Failed> {
    let key = work.key(policy);
    let now = now_ms();
    let count = |layer: Layer, result: &str| {
        let [client, route] = work.labels();
        work.metrics
            .cache_lookups_total
            .with_label_values(&[client, route, layer.label(), result])
            .inc();
    };
    let mut found = cache.l1_get(&key).map(|e| (e, Layer::L1));
    if found.is_none() {
        count(Layer::L1, "miss");
        if cache.l2().is_some() {
            found = cache
                .l2_get(&key, |e| keep_from(e, now, policy))
                .await
                .map(|e| (e, Layer::L2));
            if found.is_none() {
                count(Layer::L2, "miss");
            }
        }
    }
    if let Some((entry, layer)) = found {
        // Defence in depth: the key holds version and shape, and so does the entry.
        let matches = entry.version == work.route.version && entry.shape == work.route.shape;
        let draw = rand::rng().random::<f64>();
        let freshness = if matches {
            entry.freshness(now, policy.beta, stale_window(&entry, policy), draw)
        } else {
            Freshness::Expired
        };
        let trigger = match freshness {
            Freshness::Fresh => {
                count(layer, "hit");
                return Ok((entry, "hit"));
            }
            Freshness::Early => Some((Trigger::Early, "early")),
            Freshness::Stale => Some((Trigger::Stale, "stale")),
            Freshness::Expired => None,
        };
        if let Some((trigger, word)) = trigger {
            count(layer, word);
            let policy = policy.clone();
            // Served now; the recompute runs on its own (and not at all if one is under way).
            let _ = cache.flight(&key, || {
                recompute(cache.clone(), work, key.clone(), policy, trigger).boxed()
            });
            return Ok((entry, word));
        }
        count(layer, "miss");
    }
    let labels = work.labels().map(str::to_string);
    let metrics = work.metrics.clone();
    let owned = policy.clone();
    let (flight, started) = cache.flight(&key, || {
        recompute(cache.clone(), work, key.clone(), owned, Trigger::Miss).boxed()
    });
    if !started {
        metrics
            .cache_coalesced_total
            .with_label_values(&[&labels[0], &labels[1]])
            .inc();
    }
    flight.await.map(|entry| (entry, "miss"))
}

/// How long the layers keep an entry found in L2: what is left of its life and stale window.
fn keep_from(entry: &Entry, now: u64, policy: &CachePolicy) -> Duration {
    let until = entry
        .expires_ms
        .saturating_add(stale_window(entry, policy).as_millis() as u64);
    Duration::from_millis(until.saturating_sub(now))
}

/// `stale_while_revalidate`, for whole entries: a degraded one (kept `degraded_ttl`) is never
/// served past its life.
fn stale_window(entry: &Entry, policy: &CachePolicy) -> Duration {
    if entry.sections.is_degraded() {
        Duration::ZERO
    } else {
        policy.stale_while_revalidate
    }
}

/// Computes `key` once, stores it when it may be stored, and releases the lock.
async fn recompute(
    cache: Arc<Cache>,
    work: Work,
    key: String,
    policy: CachePolicy,
    trigger: Trigger,
) -> Result<Arc<Entry>, Failed> {
    let l2 = cache.l2();
    let lock_for = work.route.deadline.unwrap_or(DEFAULT_LOCK);
    let token = format!("{:016x}", rand::rng().random::<u64>());
    let mut locked = false;
    if let Some(l2) = &l2 {
        // A miss waits for another instance's recompute no longer than a lock lives, and never
        // past its own deadline.
        let give_up = Instant::now() + lock_for;
        let give_up = work.deadline().map_or(give_up, |d| d.min(give_up));
        loop {
            match l2.lock(&key, &token, lock_for).await {
                Some(true) => {
                    locked = true;
                    break;
                }
                // Another instance is at it: a background refresh leaves it the work.
                Some(false) if trigger != Trigger::Miss => return Err(Failed::Busy),
                Some(false) => {
                    match wait_for_holder(&cache, l2, &work, &key, &policy, give_up).await {
                        Waited::Entry(entry) => {
                            let [client, route] = work.labels();
                            work.metrics
                                .cache_coalesced_total
                                .with_label_values(&[client, route])
                                .inc();
                            return Ok(entry);
                        }
                        // Released without an entry (the holder's answer was not stored): this
                        // one computes at once, under the lock if no other instance took it.
                        Waited::Released => continue,
                        Waited::GaveUp => {
                            tracing::debug!(%key, "the instance holding the recompute lock did not answer in time; recomputing");
                            break;
                        }
                    }
                }
                // Redis failed: recompute without the lock rather than not at all.
                None => break,
            }
        }
    }
    {
        let [client, route] = work.labels();
        work.metrics
            .cache_recomputes_total
            .with_label_values(&[client, route, trigger.label()])
            .inc();
    }
    let result = work.compute().await;
    let outcome = match result {
        Ok((sections, delta)) => {
            let degraded = sections.is_degraded();
            let (ttl, keep) = if degraded {
                match policy.degraded_ttl {
                    Some(ttl) => (ttl, ttl),
                    None => (Duration::ZERO, Duration::ZERO),
                }
            } else {
                let ttl = jittered(policy.ttl, policy.jitter);
                (ttl, ttl + policy.stale_while_revalidate)
            };
            let entry = Arc::new(Entry::new(
                work.route.version,
                &work.route.shape,
                sections,
                now_ms(),
                ttl,
                delta,
            ));
            // A degraded answer never replaces a complete entry: that one keeps being served
            // (stale at worst), and this refresh counts as failed.
            if degraded && !keep.is_zero() && holds_complete(&cache, &work, &key, &policy).await {
                let [client, route] = work.labels();
                work.metrics
                    .cache_degraded_discarded_total
                    .with_label_values(&[client, route])
                    .inc();
                tracing::debug!(%key, "degraded answer not stored: the key holds a complete entry");
            } else {
                cache.put(&key, entry.clone(), keep).await;
            }
            Ok(entry)
        }
        Err(failure) => Err(Failed::Route(failure)),
    };
    if let (true, Some(l2)) = (locked, &l2) {
        l2.unlock(&key, &token).await;
    }
    outcome
}

/// How waiting for another instance's recompute ended.
enum Waited {
    /// Its entry.
    Entry(Arc<Entry>),
    /// It released the lock without storing an entry.
    Released,
    /// `until` came, or Redis failed.
    GaveUp,
}

/// Polls for the entry of the instance holding `key`'s lock, and for the lock's release, until
/// `until`. The holder stores its entry before it releases the lock, so the lock is read first:
/// a lock seen released and no entry after it means there is none to wait for.
async fn wait_for_holder(
    cache: &Cache,
    l2: &L2,
    work: &Work,
    key: &str,
    policy: &CachePolicy,
    until: Instant,
) -> Waited {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Waited::GaveUp;
        }
        tokio::time::sleep(LOCK_POLL.min(left)).await;
        let held = l2.is_locked(key).await;
        let now = now_ms();
        let fresh = cache
            .l2_get(key, |e| keep_from(e, now, policy))
            .await
            .filter(|e| e.version == work.route.version && e.shape == work.route.shape)
            .filter(|e| now < e.expires_ms);
        match (fresh, held) {
            (Some(entry), _) => return Waited::Entry(entry),
            (None, Some(true)) => {}
            (None, Some(false)) => return Waited::Released,
            (None, None) => return Waited::GaveUp,
        }
    }
}

/// Whether either layer holds a complete (not degraded) entry of the live shape for `key`,
/// fresh or inside its stale window.
async fn holds_complete(cache: &Cache, work: &Work, key: &str, policy: &CachePolicy) -> bool {
    let complete = |e: &Entry| {
        !e.sections.is_degraded() && e.version == work.route.version && e.shape == work.route.shape
    };
    if cache.l1_get(key).is_some_and(|e| complete(&e)) {
        return true;
    }
    let now = now_ms();
    cache
        .l2_get(key, |e| keep_from(e, now, policy))
        .await
        .is_some_and(|e| complete(&e))
}
