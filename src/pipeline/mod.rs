//! The request pipeline: the stages, and the request context they share. It owns `RequestCtx`
//! (`ctx`: what one request carries), `Shared` (`shared`: the state of every request, the admin
//! port and the background jobs) and `Active` (`active`: a policy put to work, with the
//! verifier, API keys, rate-limit buckets and upstream clients that serve it). Below it are
//! `cache`, `upstream` and `policy`; above it only `proxy`, which calls [`handle`].
//!
//! One stage per module, in the order a request meets them:
//! edge (trace id, loop check) → path (normalised, or refused) → route → auth (credential,
//! route's `auth` and `scopes`) → rate_limit → inputs → cache (cached routes) → fanout (calls,
//! each answer projected) → assemble → respond → observe;
//! `proxy` routes take proxy_route instead of fanout and assemble. Auth follows routing because
//! only matched routes need a token; rate limits follow auth because the verified credential
//! names the identity they count (the limit on failed authentications is asked just before
//! auth, by client address).

mod active;
mod ctx;
mod shared;

pub mod edge;
pub mod path;
pub mod auth;
pub mod rate_limit;
pub mod limiters;
pub mod inputs;
pub mod cache;
pub mod fanout;
pub mod assemble;
pub mod proxy_route;
pub mod respond;
pub mod observe;

pub use active::Active;
pub use ctx::RequestCtx;
pub use shared::Shared;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use pingora::proxy::Session;

use crate::cache::{Entry, Failed, RouteFailure};
use crate::envelope::{Envelope, ErrorCode};
use crate::policy::route_table::Lookup;
use crate::policy::{Action, Fetch, Route};
use crate::upstream::Failure;
use auth::{Principal, Refusal};
use inputs::Inputs;

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
    if !normalize_path(session) {
        respond::error(session, ctx, &ErrorCode::BadRequest.into(), &[]).await?;
        return Ok(true);
    }
    let request = session.req_header();
    match policy.table.lookup(&request.method, request.uri.path()) {
        Lookup::Found { route, params } => {
            let Some(route) = policy.route(route).cloned() else {
                respond::error(session, ctx, &ErrorCode::Internal.into(), &[]).await?;
                return Ok(true);
            };
            ctx.params = params;
            ctx.route = Some(route.clone());
            let peer = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            ctx.client_address =
                edge::client_address(peer, &session.req_header().headers, &policy.client_address);
            if rate_limit::too_many_failures(session, ctx, shared).await? {
                return Ok(true);
            }
            match auth::authenticate(policy.auth_methods(), &route, &session.req_header().headers)
                .await
            {
                Ok(Principal::Anonymous) => {}
                Ok(Principal::Token(claims)) => ctx.claims = Some(claims),
                Ok(Principal::ApiKey(name)) => ctx.api_client = Some(name),
                Err(refusal) => {
                    rate_limit::failed(ctx, &refusal);
                    respond::refusal(session, ctx, shared, &refusal).await?;
                    return Ok(true);
                }
            }
            if rate_limit::refused(session, ctx, shared).await? {
                return Ok(true);
            }
            // Only a route's own upstream calls carry it; the fall-through passes the client's.
            ctx.traceparent = edge::traceparent(&session.req_header().headers, &ctx.trace_id);
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

/// Puts the request's path in its normal form (`path::normalize`) in the request itself, so
/// routing, the logs and the fall-through to the app all see the same path; the query is left
/// as sent. False when the path is refused.
fn normalize_path(session: &mut Session) -> bool {
    let request = session.req_header();
    // A target that is not UTF-8 is forwarded as its raw bytes, not as what was routed on.
    if !request.raw_path_is_utf8() {
        return false;
    }
    let normal = match path::normalize(request.uri.path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return true,
        Ok(std::borrow::Cow::Owned(normal)) => normal,
        Err(_) => return false,
    };
    let target = match request.uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    match http::Uri::builder().path_and_query(target).build() {
        Ok(uri) => {
            session.req_header_mut().set_uri(uri);
            true
        }
        Err(_) => false,
    }
}

/// A `fetch` route: inputs checked, the answer taken from the cache or computed, written
/// (or `304` when the client holds it already).
const ZERO: Duration = Duration::ZERO;

async fn serve_fetches(
    session: &mut Session,
    ctx: &RequestCtx,
    shared: &Shared,
    route: &Arc<Route>,
    fetches: &[Fetch],
) -> pingora::Result<()> {
    let request = session.req_header();
    let query = request.uri.query().unwrap_or("").to_string();
    let inputs = Inputs::of(ctx, &query);
    match fetches
        .iter()
        .try_for_each(|f| inputs.check(&f.path, &f.upstream))
    {
        Ok(()) => {}
        Err(ErrorCode::Unauthenticated) => {
            return respond::refusal(
                session,
                ctx,
                shared,
                &Refusal::missing(ctx.policy.auth_methods()),
            )
            .await
        }
        Err(code) => return respond::error(session, ctx, &code.into(), &[]).await,
    }
    let work = cache::Work::of(ctx, route, &query, shared);
    let answer = match &route.cache {
        Some(policy) => cache::serve(&shared.cache, work, policy).await,
        None => work
            .compute()
            .await
            .map(|(sections, _)| {
                let entry = Entry::new(route.version, &route.shape, sections, 0, ZERO, ZERO);
                (Arc::new(entry), "off")
            })
            .map_err(Failed::Route),
    };
    let envelope = match answer {
        Ok((entry, word)) => return answer_with(session, ctx, shared, route, &entry, word).await,
        // A missing resource is the client's answer, not an outage.
        Err(Failed::Route(RouteFailure::Critical { error, .. }))
            if matches!(error.failure, Failure::Status(404 | 410)) =>
        {
            Envelope::from(ErrorCode::NotFound)
        }
        Err(Failed::Route(RouteFailure::Critical { .. })) => {
            Envelope::from(&route.on_critical_failure)
        }
        Err(Failed::Route(RouteFailure::Deadline)) => Envelope::from(ErrorCode::DeadlineExceeded),
        Err(Failed::Panicked | Failed::Busy) => Envelope::from(ErrorCode::Internal),
    };
    respond::error(session, ctx, &envelope, &[]).await
}

/// Writes a `fetch` route's answer with this request's `meta`, or `304` when `If-None-Match`
/// names its ETag.
async fn answer_with(
    session: &mut Session,
    ctx: &RequestCtx,
    shared: &Shared,
    route: &Route,
    entry: &Entry,
    cache_word: &str,
) -> pingora::Result<()> {
    let sections = &entry.sections;
    for name in &sections.degraded {
        shared
            .metrics
            .degraded_responses_total
            .with_label_values(&[ctx.policy.client.as_str(), &route.name, name])
            .inc();
    }
    let mut headers = assemble::headers(route, sections);
    if let Ok(etag) = HeaderValue::from_str(&entry.etag) {
        headers.push((http::header::ETAG, etag));
    }
    let held = session
        .req_header()
        .headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .any(|v| names_etag(v, &entry.etag));
    if held {
        return respond::not_modified(session, ctx, &headers).await;
    }
    let body = assemble::body(sections, &ctx.trace_id, ctx.started.elapsed(), cache_word);
    respond::json(session, ctx, 200, &headers, body).await
}

/// Whether an `If-None-Match` value names `etag` (weak comparison, RFC 9110 §13.1.2), or is `*`.
fn names_etag(value: &HeaderValue, etag: &str) -> bool {
    let Ok(text) = value.to_str() else {
        return false;
    };
    text.split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}
