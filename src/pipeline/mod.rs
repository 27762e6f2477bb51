//! The request pipeline, one stage per module, in the order a request meets them:
//! edge (trace id, loop check) → route → auth → inputs → fanout (calls, each answer
//! projected) → assemble → respond → observe; `proxy` routes take proxy_route instead of
//! fanout and assemble. Auth follows routing because only matched routes need a token.

pub mod edge;
pub mod route;
pub mod auth;
pub mod inputs;
pub mod fanout;
pub mod assemble;
pub mod proxy_route;
pub mod respond;
pub mod observe;

pub use inputs::claim_value;

use http::HeaderValue;
use pingora::proxy::Session;

use crate::envelope::{Envelope, ErrorCode};
use crate::policy::{Action, Fetch, Route};
use crate::proxy::{RequestCtx, Shared};
use crate::upstream::{Caller, Failure};
use fanout::RouteFailure;
use inputs::Inputs;
use route::Lookup;

/// Runs the pipeline from routing on. `Ok(true)`: the response is written; `Ok(false)`: the
/// request falls through to the app, proxied by Pingora.
pub async fn handle(
    session: &mut Session,
    ctx: &mut RequestCtx,
    shared: &Shared,
) -> pingora::Result<bool> {
    let policy = ctx.policy.clone();
    let request = session.req_header();
    if edge::came_from_a_bff(&request.headers) {
        shared
            .metrics
            .loops_refused_total
            .with_label_values(&[policy.client.as_str()])
            .inc();
        respond::error(session, ctx, &ErrorCode::LoopDetected.into(), &[]).await?;
        return Ok(true);
    }
    match policy.table.lookup(&request.method, request.uri.path()) {
        Lookup::Found { route, params } => {
            let Some(route) = policy.route(route).cloned() else {
                respond::error(session, ctx, &ErrorCode::Internal.into(), &[]).await?;
                return Ok(true);
            };
            ctx.params = params;
            ctx.route = Some(route.clone());
            if let Some(verifier) = &policy.verifier {
                match verifier.verify(&session.req_header().headers).await {
                    Ok(claims) => ctx.claims = claims,
                    Err(failure) => {
                        unauthenticated(session, ctx, shared, failure.reason()).await?;
                        return Ok(true);
                    }
                }
            }
            match &route.action {
                Action::Proxy(target) => {
                    proxy_route::serve(session, ctx, shared, &route, target).await?
                }
                Action::Fetch(fetches) => {
                    serve_fetches(session, ctx, shared, &route, fetches).await?
                }
            }
            Ok(true)
        }
        Lookup::NotFound => match &policy.fallthrough {
            Some(app) => {
                ctx.fallthrough = Some(app.clone());
                Ok(false)
            }
            None => {
                respond::error(session, ctx, &ErrorCode::NotFound.into(), &[]).await?;
                Ok(true)
            }
        },
        Lookup::WrongMethod { allow } => {
            let allow = allow
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let allow = HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static(""));
            let headers = [(http::header::ALLOW, allow)];
            respond::error(session, ctx, &ErrorCode::MethodNotAllowed.into(), &headers).await?;
            Ok(true)
        }
        Lookup::BadPath => {
            respond::error(session, ctx, &ErrorCode::BadRequest.into(), &[]).await?;
            Ok(true)
        }
    }
}

/// A `fetch` route: inputs checked, fetches run, sections assembled and written.
async fn serve_fetches(
    session: &mut Session,
    ctx: &RequestCtx,
    shared: &Shared,
    route: &Route,
    fetches: &[Fetch],
) -> pingora::Result<()> {
    let request = session.req_header();
    let query = request.uri.query().unwrap_or("");
    let inputs = Inputs::of(ctx, query);
    match fetches
        .iter()
        .try_for_each(|f| inputs.check(&f.path, &f.upstream))
    {
        Ok(()) => {}
        Err(ErrorCode::Unauthenticated) => {
            return unauthenticated(session, ctx, shared, "missing").await
        }
        Err(code) => return respond::error(session, ctx, &code.into(), &[]).await,
    }
    let fanout = fanout::Request {
        route,
        inputs: &inputs,
        caller: Caller {
            route: &route.name,
            dependency: "",
            trace_id: &ctx.trace_id,
            traceparent: ctx.traceparent.as_ref(),
            claims: ctx.claims.as_ref(),
        },
        metrics: &shared.metrics,
        client: &ctx.policy.client,
    };
    let envelope = match fanout::run(fetches, &ctx.policy.upstreams, &fanout).await {
        Ok(sections) => {
            let sections = assemble::Sections::new(fetches, sections);
            for name in &sections.degraded {
                shared
                    .metrics
                    .degraded_responses_total
                    .with_label_values(&[ctx.policy.client.as_str(), &route.name, name])
                    .inc();
            }
            let body = assemble::body(&sections, &ctx.trace_id, ctx.started.elapsed(), "off");
            let headers = assemble::headers(route, &sections);
            return respond::json(session, ctx, 200, &headers, body).await;
        }
        // A missing resource is the client's answer, not an outage.
        Err(RouteFailure::Critical { error, .. })
            if matches!(error.failure, Failure::Status(404 | 410)) =>
        {
            Envelope::from(ErrorCode::NotFound)
        }
        Err(RouteFailure::Critical { .. }) => Envelope::from(&route.on_critical_failure),
        Err(RouteFailure::Deadline) => Envelope::from(ErrorCode::DeadlineExceeded),
    };
    respond::error(session, ctx, &envelope, &[]).await
}

/// 401 with the challenge RFC 6750 asks for; the reason goes to the metric, not the client.
pub(crate) async fn unauthenticated(
    session: &mut Session,
    ctx: &RequestCtx,
    shared: &Shared,
    reason: &str,
) -> pingora::Result<()> {
    shared
        .metrics
        .auth_failures_total
        .with_label_values(&[ctx.policy.client.as_str(), reason])
        .inc();
    let challenge = if reason == "missing" {
        "Bearer"
    } else {
        "Bearer error=\"invalid_token\""
    };
    let headers = [(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    )];
    respond::error(session, ctx, &ErrorCode::Unauthenticated.into(), &headers).await
}
