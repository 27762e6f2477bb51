//! cache: the versioned cache of `fetch` routes' answers (their `sections`, and why a route has
//! none: `RouteFailure`). It knows nothing of requests or Pingora: the pipeline hands it keys
//! and computations. L1 in process (moka, bounded by bytes), L2 in Redis (`l2`), keys that
//! change with the policy's shape (`key`), entries that know
//! their own age and recompute cost (`entry`), and one recompute per key at a time in this
//! process (`Cache::flight`; across instances a Redis lock, see `pipeline::cache`). `target` is
//! the Redis `--redis` names; `nodes` walks each of its nodes directly (`SCAN`, batched
//! `UNLINK`), for L2's prefix invalidation and for `audit`, which is `bff cache audit`: it reads
//! the keys and entries L2 holds.

pub mod audit;
pub mod entry;
pub mod key;
pub mod l2;
pub mod nodes;
pub mod target;
mod sections;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use rand::Rng;

use crate::upstream::CallError;
pub use entry::{Entry, Freshness};
pub use l2::L2;
pub use sections::{Section, Sections};
pub use target::{BadRedisUrl, RedisTarget};

/// The default bound of L1.
pub const L1_BYTES: u64 = 64 << 20;

/// Why a route gets no answer.
#[derive(Debug, Clone)]
pub enum RouteFailure {
    /// A critical fetch failed.
    Critical { fetch: String, error: CallError },
    /// The route's deadline passed with a critical fetch unfinished.
    Deadline,
}

/// Why a shared recompute produced no entry.
#[derive(Debug, Clone)]
pub enum Failed {
    Route(RouteFailure),
    /// The recompute task panicked (the process lives on).
    Panicked,
    /// A background refresh found another instance at work on the key.
    Busy,
}

/// One recompute of one key, awaited by every request that wants it.
pub type Flight = Shared<BoxFuture<'static, Result<Arc<Entry>, Failed>>>;

/// Which layer answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    L1,
    L2,
}

impl Layer {
    pub fn label(self) -> &'static str {
        match self {
            Layer::L1 => "l1",
            Layer::L2 => "l2",
        }
    }
}

#[derive(Clone)]
struct Kept {
    entry: Arc<Entry>,
    /// How long L1 may keep it: never longer than L2 does.
    keep: Duration,
}

struct KeepFor;

impl moka::Expiry<String, Kept> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &String,
        kept: &Kept,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(kept.keep)
    }

    /// A refresh replaces an entry: it lives as long as the new one says (moka's default would
    /// keep the old entry's expiry, and a refreshed key would vanish when the old one expires).
    fn expire_after_update(
        &self,
        _key: &String,
        kept: &Kept,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(kept.keep)
    }
}

/// Both layers and the recomputes under way. One per process: it outlives policy reloads, whose
/// keys change by themselves when a route's shape or version does.
pub struct Cache {
    l1: moka::sync::Cache<String, Kept>,
    l2: ArcSwapOption<L2>,
    flights: Mutex<HashMap<String, Flight>>,
}

impl Cache {
    pub fn new(l1_bytes: u64) -> Cache {
        Cache {
            l1: moka::sync::Cache::builder()
                .max_capacity(l1_bytes)
                .weigher(|key: &String, kept: &Kept| {
                    kept.entry
                        .weight()
                        .saturating_add(u32::try_from(key.len()).unwrap_or(u32::MAX))
                })
                .expire_after(KeepFor)
                .build(),
            l2: ArcSwapOption::empty(),
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// Puts L2 in use (from a task of the runtime its connection lives on).
    pub fn set_l2(&self, l2: L2) {
        self.l2.store(Some(Arc::new(l2)));
    }

    pub fn l2(&self) -> Option<Arc<L2>> {
        self.l2.load_full()
    }

    pub fn l1_get(&self, key: &str) -> Option<Arc<Entry>> {
        self.l1.get(key).map(|kept| kept.entry)
    }

    /// From L2 (`None` when absent, foreign, or Redis failed); a found entry is put in L1 for
    /// `keep`.
    pub async fn l2_get(&self, key: &str, keep: impl Fn(&Entry) -> Duration) -> Option<Arc<Entry>> {
        let l2 = self.l2()?;
        let bytes = l2.get(key).await?;
        let entry = Arc::new(Entry::decode(&bytes)?);
        let keep = keep(&entry);
        if !keep.is_zero() {
            self.l1.insert(
                key.to_string(),
                Kept {
                    entry: entry.clone(),
                    keep,
                },
            );
        }
        Some(entry)
    }

    /// Stores in both layers for `keep` (the entry's lifetime plus its stale window).
    pub async fn put(&self, key: &str, entry: Arc<Entry>, keep: Duration) {
        if keep.is_zero() {
            return;
        }
        if let Some(l2) = self.l2() {
            l2.set(key, &entry.encode(), keep).await;
        }
        self.l1.insert(key.to_string(), Kept { entry, keep });
    }

    /// The recompute of `key` under way, or a new one made by `start`; `true` when this call
    /// started it.
    pub fn flight(
        self: &Arc<Self>,
        key: &str,
        start: impl FnOnce() -> BoxFuture<'static, Result<Arc<Entry>, Failed>>,
    ) -> (Flight, bool) {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = flights.get(key) {
            return (flight.clone(), false);
        }
        let work = start();
        let cache = self.clone();
        let owned = key.to_string();
        // The work runs as its own task: a client that leaves does not cancel a recompute
        // others wait for, and its result still lands in the cache.
        let task = tokio::spawn(async move {
            let result = work.await;
            cache
                .flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&owned);
            result
        });
        let flight = async move { task.await.unwrap_or(Err(Failed::Panicked)) }
            .boxed()
            .shared();
        flights.insert(key.to_string(), flight.clone());
        (flight, true)
    }

    /// Forgets `key`, or with `prefix` every key starting with it: in L1 here, in L2 for every
    /// instance. Returns how many entries L1 dropped, and how many keys L2 removed (`None`: no
    /// L2, or it failed).
    pub async fn invalidate(&self, key: &str, prefix: bool) -> (usize, Option<i64>) {
        let doomed: Vec<String> = if prefix {
            self.l1
                .iter()
                .filter(|(k, _)| k.starts_with(key))
                .map(|(k, _)| (*k).clone())
                .collect()
        } else {
            self.l1
                .get(key)
                .map(|_| key.to_string())
                .into_iter()
                .collect()
        };
        for k in &doomed {
            self.l1.invalidate(k);
        }
        let Some(l2) = self.l2() else {
            return (doomed.len(), None);
        };
        let removed = if prefix {
            l2.unlink_prefix(key)
                .await
                .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
        } else {
            l2.unlink(key).await
        };
        (doomed.len(), removed)
    }
}

/// `ttl` moved by up to ±`jitter`, so keys written together do not expire together.
pub fn jittered(ttl: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return ttl;
    }
    let jitter = jitter.min(ttl / 2).as_millis() as i64;
    let shift = rand::rng().random_range(-jitter..=jitter);
    let ms = (ttl.as_millis() as i64).saturating_add(shift).max(1);
    Duration::from_millis(ms as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds_and_spreads() {
        let ttl = Duration::from_secs(60);
        let jitter = Duration::from_secs(15);
        let draws: Vec<Duration> = (0..500).map(|_| jittered(ttl, jitter)).collect();
        assert!(draws
            .iter()
            .all(|d| *d >= Duration::from_secs(45) && *d <= Duration::from_secs(75)));
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(distinct.len() > 100, "{}", distinct.len());
        assert_eq!(jittered(ttl, Duration::ZERO), ttl);
        // A jitter larger than the TTL never makes it zero or negative.
        assert!((0..100).all(
            |_| jittered(Duration::from_secs(2), Duration::from_secs(60)) >= Duration::from_secs(1)
        ));
    }
}
