//! A policy put to work: the compiled policy with what serves it, built once per (re)load and
//! swapped as one, so a request never sees a policy with another policy's clients.

use std::ops::Deref;
use std::sync::Arc;

use super::auth::{ApiKeys, Methods, Verifier};
use super::limiters::RateLimits;
use crate::metrics::Metrics;
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
    /// The token verifier `policy` needs, given the policy in force (`previous`): its
    /// verifier (and the keys it holds) when the `jwt` settings did not change; a new one
    /// holding its keys when only the key source stayed the same; else a new one without keys,
    /// marked `true`: its key source is new, and must be loaded before the policy goes in.
    pub fn verifier_for(
        policy: &Policy,
        previous: Option<&Active>,
    ) -> Option<(Arc<Verifier>, bool)> {
        let jwt = policy.auth.as_ref()?.jwt.as_ref()?;
        Some(
            match previous.and_then(|p| Some((p.jwt()?, p.verifier.as_ref()?))) {
                Some((old, verifier)) if old == jwt => (verifier.clone(), false),
                Some((old, verifier)) if old.keys == jwt.keys => {
                    let fresh = Verifier::new(jwt);
                    fresh.take_keys_of(verifier);
                    (Arc::new(fresh), false)
                }
                _ => (Arc::new(Verifier::new(jwt)), true),
            },
        )
    }

    /// `verifier`: from [`Active::verifier_for`]. `previous`: the policy in force, whose
    /// rate-limit buckets are kept for each limit that did not change.
    pub fn new(
        policy: Policy,
        metrics: &Arc<Metrics>,
        previous: Option<&Active>,
        verifier: Option<Arc<Verifier>>,
    ) -> Active {
        let upstreams = Upstreams::build(&policy, metrics);
        let app = policy.fallthrough.clone().map(AppPeer::new);
        let auth = policy.auth.as_ref();
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

    /// The credentials this policy accepts, for `auth::authenticate`.
    pub fn auth_methods(&self) -> Methods<'_> {
        Methods {
            verifier: self.verifier.as_deref(),
            api_keys: self.api_keys.as_ref(),
            api_key_first: self.policy.auth.as_ref().is_some_and(|a| a.api_key_first),
        }
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
