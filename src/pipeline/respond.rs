//! Writing the responses the sidecar produces itself: JSON bodies and error envelopes, always
//! with `X-Trace-Id`.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::auth::Refusal;
use super::ctx::RequestCtx;
use super::shared::Shared;
use crate::caller::TRACE_HEADER;
use crate::envelope::{Envelope, ErrorCode};

pub async fn json(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> pingora::Result<()> {
    let mut header = ResponseHeader::build(status, Some(headers.len() + 3))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(TRACE_HEADER, &ctx.trace_id)?;
    for (name, value) in headers {
        header.append_header(name.clone(), value.clone())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD || status == 204;
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// `304 Not Modified`: the headers of the answer the client holds, no body.
pub async fn not_modified(
    session: &mut Session,
    ctx: &RequestCtx,
    headers: &[(HeaderName, HeaderValue)],
) -> pingora::Result<()> {
    let mut header = ResponseHeader::build(304, Some(headers.len() + 1))?;
    header.insert_header(TRACE_HEADER, &ctx.trace_id)?;
    for (name, value) in headers {
        header.append_header(name.clone(), value.clone())?;
    }
    session.write_response_header(Box::new(header), true).await
}

pub async fn error(
    session: &mut Session,
    ctx: &RequestCtx,
    envelope: &Envelope,
    headers: &[(HeaderName, HeaderValue)],
) -> pingora::Result<()> {
    let mut all = headers.to_vec();
    all.push((
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    ));
    json(
        session,
        ctx,
        envelope.status,
        &all,
        envelope.body(&ctx.trace_id),
    )
    .await
}

/// 401 or 403 with the challenges RFC 6750 asks for; the reason goes to the metric, not to
/// the client, whose message tells no more than the status does.
pub async fn refusal(
    session: &mut Session,
    ctx: &RequestCtx,
    shared: &Shared,
    refusal: &Refusal,
) -> pingora::Result<()> {
    shared
        .metrics
        .auth_failures_total
        .with_label_values(&[ctx.policy.client.as_str(), refusal.reason()])
        .inc();
    let (code, challenges) = match refusal {
        Refusal::Unauthenticated { challenges, .. } => {
            (ErrorCode::Unauthenticated, challenges.clone())
        }
        Refusal::Forbidden { challenge } => (ErrorCode::Forbidden, vec![challenge.clone()]),
    };
    let headers: Vec<_> = challenges
        .into_iter()
        .map(|c| (http::header::WWW_AUTHENTICATE, c))
        .collect();
    error(session, ctx, &code.into(), &headers).await
}
