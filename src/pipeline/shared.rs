//! State shared by every request, the admin port and the background jobs: the policy in force
//! (swapped whole on reload), the cache, the metrics and the count of requests in flight.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::active::Active;
use super::auth::KeyLoadError;
use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::policy::Policy;

/// State shared by every request, the admin port and the background jobs.
pub struct Shared {
    pub policy: ArcSwap<Active>,
    /// Cached answers of `fetch` routes; it outlives policy reloads (keys follow the shape).
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub in_flight: Arc<AtomicUsize>,
    /// False until the background jobs (signals, policy watch) run, and again while draining.
    pub ready: AtomicBool,
}

impl Shared {
    pub fn new(policy: Policy) -> Self {
        let metrics = Arc::new(Metrics::new());
        // Keys are loaded by the background job: the sidecar may start before its JWKS is up.
        let verifier = Active::verifier_for(&policy, None).map(|(verifier, _)| verifier);
        Shared {
            policy: ArcSwap::from_pointee(Active::new(policy, &metrics, None, verifier)),
            cache: Arc::new(Cache::new(crate::cache::L1_BYTES)),
            metrics,
            in_flight: Arc::new(AtomicUsize::new(0)),
            ready: AtomicBool::new(false),
        }
    }

    /// Puts a newly loaded policy in force; requests under way keep the one they started on.
    /// A key source the policy brings is loaded first; if it cannot be, the policy is refused
    /// and the one in force keeps serving (with the old keys, every token still verifies).
    pub async fn install(&self, policy: Policy) -> Result<(), KeyLoadError> {
        let previous = self.policy.load_full();
        let verifier = Active::verifier_for(&policy, Some(&previous));
        // Before anything else is built: a refused policy leaves no trace (not even a gauge).
        if let Some((verifier, true)) = &verifier {
            verifier.load_keys().await?;
        }
        let verifier = verifier.map(|(verifier, _)| verifier);
        let active = Active::new(policy, &self.metrics, Some(&previous), verifier);
        self.policy.store(Arc::new(active));
        Ok(())
    }

    /// Ready for traffic: started, not draining, token keys loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::SeqCst) && self.policy.load().has_keys()
    }
}
