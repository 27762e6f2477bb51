//! The Pingora adapter: the `ProxyHttp` implementation, in which each phase delegates to one
//! pipeline stage. It holds no state and no logic of its own; the request context is
//! `pipeline::RequestCtx`.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use tracing::error;

use crate::envelope::{Envelope, ErrorCode};
use crate::pipeline::{self, edge, observe, respond, RequestCtx, Shared};
use crate::upstream;

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
        request.insert_header(crate::caller::TRACE_HEADER, ctx.trace_id.as_str())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        response.insert_header(crate::caller::TRACE_HEADER, ctx.trace_id.as_str())
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
