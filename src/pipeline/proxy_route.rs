//! `proxy` routes: one upstream call through Pingora's pooled connector, the JSON answer
//! projected through the route's whitelist. Buffering the whole answer before replying is
//! what lets a malformed or oversized body still become a 502 envelope instead of a torn 200.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::compression::ResponseCompressionCtx;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use tracing::warn;

use super::edge::TRACE_HEADER;
use super::respond;
use crate::envelope::{Envelope, ErrorCode};
use crate::policy::{ProxyTarget, RenderError, Route, Upstream, Var};
use crate::proxy::RequestCtx;
use crate::upstream::{self, UpstreamError};

/// Largest request body a `proxy` route forwards.
pub const MAX_REQUEST_BODY: usize = 1 << 20;
/// Largest (decompressed) upstream body a `proxy` route buffers for projection.
pub const MAX_UPSTREAM_BODY: usize = 4 << 20;
/// Bounds a `proxy` route's upstream exchange when the upstream has no `timeout`.
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Client headers an internal service may see. Everything else (cookies, `Authorization`,
/// identity headers a client could forge) stays at the sidecar.
const FORWARDED_HEADERS: [&str; 6] = [
    "accept",
    "accept-language",
    "content-type",
    "user-agent",
    "traceparent",
    "tracestate",
];

/// Serves a `proxy` route completely; the response (or its error envelope) is written.
pub async fn serve(
    session: &mut Session,
    ctx: &mut RequestCtx,
    connector: &Connector,
    route: &Route,
    target: &ProxyTarget,
) -> pingora::Result<()> {
    match call(session, ctx, connector, target).await {
        Ok(Reply::Body(status, body)) => {
            respond::json(session, ctx, status, &route.headers, body).await
        }
        Ok(Reply::NoContent) => {
            respond::json(session, ctx, 204, &route.headers, Bytes::new()).await
        }
        Err(Failure::Client(code)) => respond::error(session, ctx, &code.into(), &[]).await,
        Err(Failure::Upstream(e)) => {
            warn!(trace_id = %ctx.trace_id, route = %route.name, upstream = %e.upstream, reason = %e.reason, "proxy route failed");
            respond::error(session, ctx, &Envelope::from(e.code), &[]).await
        }
    }
}

enum Reply {
    Body(u16, Bytes),
    NoContent,
}

enum Failure {
    /// The client's request cannot be served as sent.
    Client(ErrorCode),
    Upstream(UpstreamError),
}

async fn call(
    session: &mut Session,
    ctx: &RequestCtx,
    connector: &Connector,
    target: &ProxyTarget,
) -> Result<Reply, Failure> {
    let up = &target.upstream;
    let path = render_path(session, ctx, target)?;
    let body = read_body(session).await?;
    let request = upstream_request(session, ctx, up, &path, body.len())?;
    let limit = up.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let peer = upstream::peer(up, Some(limit))
        .await
        .map_err(Failure::Upstream)?;
    // The upstream's `timeout` bounds the whole exchange, so a trickling body cannot hold the
    // client beyond it either.
    let exchanged =
        tokio::time::timeout(limit, exchange(connector, &peer, up, request, body)).await;
    let (status, raw) = match exchanged {
        Ok(Ok(Exchanged::Body(status, raw))) => (status, raw),
        Ok(Ok(Exchanged::NoContent)) => return Ok(Reply::NoContent),
        Ok(Err(failure)) => return Err(failure),
        Err(_) => {
            return Err(Failure::Upstream(UpstreamError::new(
                up,
                ErrorCode::DeadlineExceeded,
                format!("no complete answer within {limit:?}"),
            )))
        }
    };
    let projected = target.fields.project_bytes(&raw).map_err(|e| {
        Failure::Upstream(UpstreamError::new(
            up,
            ErrorCode::BadUpstreamResponse,
            e.to_string(),
        ))
    })?;
    Ok(Reply::Body(status, Bytes::from(projected)))
}

enum Exchanged {
    Body(u16, BytesMut),
    NoContent,
}

/// Sends the request and reads a 2xx JSON answer whole (decompressed, bounded).
async fn exchange(
    connector: &Connector,
    peer: &HttpPeer,
    up: &Upstream,
    request: RequestHeader,
    body: Bytes,
) -> Result<Exchanged, Failure> {
    // A pooled connection the upstream closed meanwhile fails on first use; Pingora's own proxy
    // retries such requests once on a fresh connection, and so do we.
    let fail = |e: Box<pingora::Error>| {
        Failure::Upstream(UpstreamError::new(
            up,
            upstream::code_for(&e),
            e.to_string(),
        ))
    };
    let mut attempt = 0;
    let mut http = loop {
        attempt += 1;
        let (mut http, reused) = connector.get_http_session(peer).await.map_err(fail)?;
        match send(&mut http, request.clone(), &body).await {
            Ok(()) => break http,
            Err(_) if reused && attempt == 1 => continue,
            Err(e) => return Err(fail(e)),
        }
    };

    let bad = |reason: String| {
        Failure::Upstream(UpstreamError::new(
            up,
            ErrorCode::BadUpstreamResponse,
            reason,
        ))
    };
    let Some(mut header) = http.response_header().cloned() else {
        return Err(bad("no response header".into()));
    };
    let status = header.status.as_u16();
    if !(200..300).contains(&status) {
        let code = ErrorCode::for_upstream_status(status);
        return Err(Failure::Upstream(UpstreamError::new(
            up,
            code,
            format!("answered {status}"),
        )));
    }
    if status == 204 {
        connector
            .release_http_session(http, peer, Some(upstream::IDLE_TIMEOUT))
            .await;
        return Ok(Exchanged::NoContent);
    }
    if !is_json(header.headers.get(http::header::CONTENT_TYPE)) {
        return Err(bad("answered with a body that is not JSON".into()));
    }
    let declared = header
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|n| *n > MAX_UPSTREAM_BODY) {
        return Err(bad(format!("body of {n} bytes is over the bound")));
    }

    // Pingora's codec handles every encoding its proxy does (gzip, deflate, br, zstd).
    let mut decompress = ResponseCompressionCtx::new(0, true, false);
    let decoding = decompress.will_decompress(&header);
    if decoding {
        decompress.response_header_filter(&mut header, false);
    }
    let mut raw = BytesMut::new();
    loop {
        let chunk = http.read_response_body().await.map_err(fail)?;
        let end = chunk.is_none() || http.response_done();
        if decoding {
            if let Some(data) = decompress.response_body_filter(chunk.as_ref(), end) {
                raw.extend_from_slice(&data);
            }
        } else if let Some(data) = &chunk {
            raw.extend_from_slice(data);
        }
        if raw.len() > MAX_UPSTREAM_BODY {
            return Err(bad(format!(
                "body is over the bound of {MAX_UPSTREAM_BODY} bytes"
            )));
        }
        if end {
            break;
        }
    }
    connector
        .release_http_session(http, peer, Some(upstream::IDLE_TIMEOUT))
        .await;
    Ok(Exchanged::Body(status, raw))
}

async fn send(http: &mut HttpSession, request: RequestHeader, body: &Bytes) -> pingora::Result<()> {
    http.write_request_header(Box::new(request)).await?;
    if !body.is_empty() {
        http.write_request_body(body.clone(), true).await?;
    }
    http.finish_request_body().await?;
    http.read_response_header().await
}

fn render_path(
    session: &Session,
    ctx: &RequestCtx,
    target: &ProxyTarget,
) -> Result<String, Failure> {
    let query = session.req_header().uri.query().unwrap_or("");
    let rendered = target.path.render(|var| match var {
        Var::Path(name) => ctx
            .params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| Cow::Borrowed(v.as_str())),
        Var::Query(name) => query_value(query, name),
        Var::Jwt(_) => None,
    });
    rendered.map_err(|e| match e {
        // No verified identity yet: the route cannot be personalised.
        RenderError::Missing(Var::Jwt(_)) => Failure::Client(ErrorCode::Unauthenticated),
        RenderError::Missing(_) | RenderError::NotASegment(_) => {
            Failure::Client(ErrorCode::BadRequest)
        }
    })
}

/// The first value of `name` in a query string, `+` and percent-escapes decoded.
fn query_value<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| -> Option<String> {
            let spaced = s.replace('+', " ");
            percent_encoding::percent_decode_str(&spaced)
                .decode_utf8()
                .ok()
                .map(|v| v.into_owned())
        };
        (decode(key)? == name)
            .then(|| decode(value).map(Cow::Owned))
            .flatten()
    })
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

fn upstream_request(
    session: &Session,
    ctx: &RequestCtx,
    up: &Upstream,
    path: &str,
    body_len: usize,
) -> Result<RequestHeader, Failure> {
    let client = session.req_header();
    let internal = |e: Box<pingora::Error>| {
        Failure::Upstream(UpstreamError::new(up, ErrorCode::Internal, e.to_string()))
    };
    let full_path = format!("{}{}", up.base_path, path);
    let mut request = RequestHeader::build(client.method.clone(), full_path.as_bytes(), None)
        .map_err(internal)?;
    for name in FORWARDED_HEADERS {
        if let Some(value) = client.headers.get(name) {
            request
                .insert_header(name, value.clone())
                .map_err(internal)?;
        }
    }
    request
        .insert_header(http::header::HOST, up.authority.as_str())
        .map_err(internal)?;
    request
        .insert_header(TRACE_HEADER, ctx.trace_id.as_str())
        .map_err(internal)?;
    request
        .insert_header("x-bff-client", ctx.policy.client.as_str())
        .map_err(internal)?;
    if body_len > 0 || matches!(client.method, Method::POST | Method::PUT | Method::PATCH) {
        request
            .insert_header(http::header::CONTENT_LENGTH, body_len.to_string())
            .map_err(internal)?;
    }
    if let Some(credential) = &up.credential {
        request
            .insert_header(credential.header.clone(), credential.value.clone())
            .map_err(internal)?;
    }
    Ok(request)
}

fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(query_value("a=1&q=x%2Fy+z", "q").as_deref(), Some("x/y z"));
        assert_eq!(query_value("a=1", "q"), None);
        assert_eq!(query_value("q", "q").as_deref(), Some(""));
    }

    #[test]
    fn json_content_types() {
        let ct = |s: &'static str| Some(HeaderValue::from_static(s));
        assert!(is_json(ct("application/json; charset=utf-8").as_ref()));
        assert!(is_json(ct("application/problem+json").as_ref()));
        assert!(!is_json(ct("text/html").as_ref()));
        assert!(!is_json(None));
    }
}
