//! The request pipeline, one stage per module, in the order a request meets them:
//! edge (trace id) → route → proxy_route (one upstream, projected) → respond → observe.
//! Aggregated `fetch` routes join between route and respond.

pub mod edge;
pub mod observe;
pub mod proxy_route;
pub mod respond;
pub mod route;

use http::HeaderValue;
use pingora::proxy::Session;

use crate::envelope::ErrorCode;
use crate::policy::Action;
use crate::proxy::{RequestCtx, Shared};
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
    match policy.table.lookup(&request.method, request.uri.path()) {
        Lookup::Found { route, params } => {
            let Some(route) = policy.route(route).cloned() else {
                respond::error(session, ctx, &ErrorCode::Internal.into(), &[]).await?;
                return Ok(true);
            };
            ctx.params = params;
            ctx.route = Some(route.clone());
            match &route.action {
                Action::Proxy(target) => {
                    proxy_route::serve(session, ctx, &shared.connector, &route, target).await?
                }
                Action::Fetch(_) => {
                    respond::error(session, ctx, &ErrorCode::NotImplemented.into(), &[]).await?
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
