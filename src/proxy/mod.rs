//! The Pingora `ProxyHttp` implementation: each phase delegates to one pipeline stage.

mod active;
mod ctx;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use futures::FutureExt;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use tracing::error;

pub use active::Active;
pub use ctx::{Claims, RequestCtx};

use crate::cache::Cache;
use crate::envelope::{Envelope, ErrorCode};
use crate::metrics::Metrics;
use crate::pipeline::auth::KeyLoadError;
use crate::pipeline::{self, edge, observe, respond};
use crate::policy::Policy;
use crate::upstream;

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

pub struct Bff {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl ProxyHttp for Bff {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.shared.policy.load_full(), &self.shared.in_flight)
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        ctx.trace_id = edge::trace_id(&session.req_header().headers);
        Ok(())
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        // A bug must cost one request, never the process or a stack trace in a response.
        let outcome = AssertUnwindSafe(pipeline::handle(session, ctx, &self.shared))
            .catch_unwind()
            .await;
        match outcome {
            Ok(result) => result,
            Err(_) => {
                error!(trace_id = %ctx.trace_id, "request handler panicked");
                if session.response_written().is_none() {
                    respond::error(session, ctx, &ErrorCode::Internal.into(), &[]).await?;
                }
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let Some(app) = ctx.fallthrough.as_ref().and(ctx.policy.app.as_ref()) else {
            return Err(pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "no upstream chosen for this request",
            ));
        };
        app.peer()
            .await
            .map(Box::new)
            .map_err(|e| pingora::Error::explain(pingora::ErrorType::ConnectError, e.to_string()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // The app receives the request unchanged but for `X-Trace-Id`: the trace id the request
        // is logged under, which replaces a client's malformed one.
        request.insert_header(edge::TRACE_HEADER, ctx.trace_id.as_str())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        response.insert_header(edge::TRACE_HEADER, ctx.trace_id.as_str())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = upstream::code_for(e);
        let client_gone = matches!(e.esource(), pingora::ErrorSource::Downstream);
        if !client_gone && session.response_written().is_none() {
            error!(trace_id = %ctx.trace_id, upstream = ctx.fallthrough.as_ref().map(|u| u.name.as_str()), error = %e, "fall-through failed");
            let _ = respond::error(session, ctx, &Envelope::from(code), &[]).await;
        }
        FailToProxy {
            error_code: session.response_written().map_or(0, |r| r.status.as_u16()),
            can_reuse_downstream: false,
        }
    }

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
    ) {
        observe::finish(session, ctx, &self.shared.metrics, e);
    }
}
