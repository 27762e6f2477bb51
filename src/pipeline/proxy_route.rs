//! `proxy` routes: one call through the upstream's client stack, the JSON answer projected
//! through the route's whitelist. Buffering the whole answer before replying is what lets a
//! malformed or oversized body still become a 502 envelope instead of a torn 200.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use pingora::proxy::Session;
use tracing::warn;

use super::auth::Refusal;
use super::ctx::RequestCtx;
use super::inputs::{self, Inputs};
use super::respond;
use super::shared::Shared;
use crate::envelope::{Envelope, ErrorCode};
use crate::policy::{ProxyTarget, Route};
use crate::upstream::{Call, CallError, Caller, Upstreams};

/// Largest request body a `proxy` route forwards.
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// Client headers an internal service may see. Everything else (cookies, `Authorization`,
/// identity headers a client could forge) stays at the sidecar.
const FORWARDED_HEADERS: [&str; 5] = [
    "accept",
    "accept-language",
    "content-type",
    "user-agent",
    "tracestate",
];

/// Serves a `proxy` route completely; the response (or its error envelope) is written.
pub async fn serve(
    session: &mut Session,
    ctx: &mut RequestCtx,
    shared: &Shared,
    route: &Route,
    target: &ProxyTarget,
) -> pingora::Result<()> {
    let policy = ctx.policy.clone();
    match call(session, ctx, &policy.upstreams, route, target).await {
        Ok((status, body)) => respond::json(session, ctx, status, &route.headers, body).await,
        Err(Failure::Client(ErrorCode::Unauthenticated)) => {
            respond::refusal(
                session,
                ctx,
                shared,
                &Refusal::missing(ctx.policy.auth_methods()),
            )
            .await
        }
        Err(Failure::Client(code)) => respond::error(session, ctx, &code.into(), &[]).await,
        Err(Failure::Upstream(e)) => {
            warn!(trace_id = %ctx.trace_id, route = %route.name, dependency = %e.upstream, error = %e, "proxy route failed");
            respond::error(session, ctx, &Envelope::from(e.failure.code()), &[]).await
        }
    }
}

enum Failure {
    /// The client's request cannot be served as sent.
    Client(ErrorCode),
    Upstream(CallError),
}

async fn call(
    session: &mut Session,
    ctx: &RequestCtx,
    upstreams: &Upstreams,
    route: &Route,
    target: &ProxyTarget,
) -> Result<(u16, Bytes), Failure> {
    let request = session.req_header();
    let query = request.uri.query().unwrap_or("");
    let inputs = Inputs::of(ctx, query);
    let path = inputs
        .render(&target.path, |_| None)
        .map_err(|e| Failure::Client(inputs::code_for(&e)))?;
    inputs
        .check_headers(&target.upstream)
        .map_err(Failure::Client)?;
    let mut headers = HeaderMap::new();
    for name in FORWARDED_HEADERS {
        if let Some(value) = request.headers.get(name) {
            headers.insert(name, value.clone());
        }
    }
    // The route's method: a `HEAD` served by a `GET` route calls the upstream with `GET`,
    // whose answer (projected) gives the headers; the client gets no body.
    let method = route.method.clone();
    let body = read_body(session).await?;
    let client = upstreams
        .client(&target.upstream)
        .map_err(Failure::Upstream)?;
    let identity = super::rate_limit::identity(ctx);
    let caller = Caller {
        route: &route.name,
        dependency: &target.upstream.name,
        trace_id: &ctx.trace_id,
        traceparent: ctx.traceparent.as_ref(),
        claims: ctx.claims.as_ref(),
        api_client: ctx.api_client.as_ref(),
        identity: &identity,
    };
    let call = Call {
        method,
        path,
        headers,
        body,
    };
    client
        .call(call, &caller, |answer| {
            if answer.status == StatusCode::NO_CONTENT {
                return Ok((204, Bytes::new()));
            }
            let projected = target
                .fields
                .project_bytes(&answer.body)
                .map_err(|e| e.to_string())?;
            Ok((answer.status.as_u16(), Bytes::from(projected)))
        })
        .await
        .map_err(Failure::Upstream)
}

async fn read_body(session: &mut Session) -> Result<Bytes, Failure> {
    let mut body = BytesMut::new();
    while let Some(chunk) = session
        .read_request_body()
        .await
        .map_err(|_| Failure::Client(ErrorCode::BadRequest))?
    {
        if body.len() + chunk.len() > MAX_REQUEST_BODY {
            return Err(Failure::Client(ErrorCode::PayloadTooLarge));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
