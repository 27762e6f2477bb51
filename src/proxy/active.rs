//! A policy put to work: the compiled policy with what serves it, built once per (re)load and
//! swapped as one, so a request never sees a policy with another policy's clients.

use std::ops::Deref;
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::pipeline::auth::Verifier;
use crate::pipeline::rate_limit::RateLimits;
use crate::policy::Policy;
use crate::upstream::Upstreams;

pub struct Active {
    pub policy: Policy,
    /// One client stack per upstream, shared by every route.
    pub upstreams: Upstreams,
    /// Verifies client tokens when the policy has `auth`.
    pub verifier: Option<Arc<Verifier>>,
    /// The policy's and the routes' rate limits, with their buckets per client identity.
    pub rate_limits: RateLimits,
}

impl Active {
    /// `previous`: the policy in force, whose token verifier (and the keys it holds) is kept
    /// when the `auth` section did not change, and whose rate-limit buckets are kept for each
    /// limit that did not change.
    pub fn new(policy: Policy, metrics: &Arc<Metrics>, previous: Option<&Active>) -> Active {
        let upstreams = Upstreams::build(&policy, metrics);
        let verifier = policy.auth.as_ref().map(|auth| {
            previous
                .filter(|p| p.policy.auth.as_ref() == Some(auth))
                .and_then(|p| p.verifier.clone())
                .unwrap_or_else(|| Arc::new(Verifier::new(auth)))
        });
        let rate_limits = RateLimits::new(&policy, previous.map(|p| &p.rate_limits));
        Active {
            policy,
            upstreams,
            verifier,
            rate_limits,
        }
    }

    /// Ready to serve: the client tokens' keys are loaded (when there is `auth`).
    pub fn has_keys(&self) -> bool {
        self.verifier.as_ref().is_none_or(|v| v.has_keys())
    }

    /// Loads the token keys unless they are loaded already.
    pub async fn load_keys(&self) -> Result<(), crate::pipeline::auth::KeyLoadError> {
        match &self.verifier {
            Some(verifier) if !verifier.has_keys() => verifier.load_keys().await,
            _ => Ok(()),
        }
    }
}

impl Deref for Active {
    type Target = Policy;
    fn deref(&self) -> &Policy {
        &self.policy
    }
}
