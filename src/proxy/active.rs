//! A policy put to work: the compiled policy with what serves it, built once per (re)load and
//! swapped as one, so a request never sees a policy with another policy's clients.

use std::ops::Deref;
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::pipeline::auth::{ApiKeys, Verifier};
use crate::pipeline::rate_limit::RateLimits;
use crate::policy::{JwtAuth, Policy};
use crate::upstream::{AppPeer, Upstreams};

pub struct Active {
    pub policy: Policy,
    /// One client stack per upstream, shared by every route.
    pub upstreams: Upstreams,
    /// Where unmatched requests are proxied, when the policy has a `fallthrough`.
    pub app: Option<AppPeer>,
    /// Verifies client tokens when the policy has `auth.jwt`.
    pub verifier: Option<Arc<Verifier>>,
    /// Knows the partners' keys when the policy has `auth.api_key`.
    pub api_keys: Option<ApiKeys>,
    /// The policy's and the routes' rate limits, with their buckets per client identity.
    pub rate_limits: RateLimits,
}

impl Active {
    /// `previous`: the policy in force, whose token verifier (and the keys it holds) is kept
    /// when the `jwt` settings did not change, whose keys are kept when only the key source
    /// stayed the same, and whose rate-limit buckets are kept for each limit that did not
    /// change. Building has no effect on `previous`: a refused reload leaves it as it was.
    pub fn new(policy: Policy, metrics: &Arc<Metrics>, previous: Option<&Active>) -> Active {
        let upstreams = Upstreams::build(&policy, metrics);
        let app = policy.fallthrough.clone().map(AppPeer::new);
        let auth = policy.auth.as_ref();
        let verifier = auth.and_then(|a| a.jwt.as_ref()).map(|jwt| {
            match previous.and_then(|p| Some((p.jwt()?, p.verifier.as_ref()?))) {
                Some((old, verifier)) if old == jwt => verifier.clone(),
                Some((old, verifier)) if old.keys == jwt.keys => {
                    let fresh = Verifier::new(jwt);
                    fresh.take_keys_of(verifier);
                    Arc::new(fresh)
                }
                _ => Arc::new(Verifier::new(jwt)),
            }
        });
        let api_keys = auth.and_then(|a| a.api_key.as_ref()).map(ApiKeys::new);
        let rate_limits = RateLimits::new(&policy, previous.map(|p| &p.rate_limits));
        Active {
            policy,
            upstreams,
            app,
            verifier,
            api_keys,
            rate_limits,
        }
    }

    /// Ready to serve: the client tokens' keys are loaded (when there is `auth`).
    pub fn has_keys(&self) -> bool {
        self.verifier.as_ref().is_none_or(|v| v.has_keys())
    }

    /// Re-reads the files that Kubernetes rotates in place (API keys, upstream credentials),
    /// keeping the last good content when a new one is invalid.
    pub fn refresh_files(&self) {
        if let Some(keys) = &self.api_keys {
            keys.refresh();
        }
        self.upstreams.refresh_files();
    }

    /// Loads the token keys of a key source this policy brings and `previous` did not have: a
    /// reload whose new source cannot be loaded must be refused, or every token would fail.
    /// A source already in force keeps its keys, and its retries while it has none.
    pub async fn load_new_keys(
        &self,
        previous: &Active,
    ) -> Result<(), crate::pipeline::auth::KeyLoadError> {
        let (Some(jwt), Some(verifier)) = (self.jwt(), &self.verifier) else {
            return Ok(());
        };
        if previous.jwt().map(|old| &old.keys) == Some(&jwt.keys) {
            return Ok(());
        }
        verifier.load_keys().await
    }

    fn jwt(&self) -> Option<&JwtAuth> {
        self.policy.auth.as_ref()?.jwt.as_ref()
    }
}

impl Deref for Active {
    type Target = Policy;
    fn deref(&self) -> &Policy {
        &self.policy
    }
}
