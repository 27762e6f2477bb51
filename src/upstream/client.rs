//! The bottom of an upstream's stack: the headers every internal call carries, and a pooled
//! keep-alive HTTP/1.1 client (over TLS for https:// upstreams, see `tls`) that reads a 2xx
//! JSON answer whole (decompressed, bounded).

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

use super::call::{error_chain, Answer, CallError, Failure, Outbound, IDLE_TIMEOUT, MAX_BODY};
use super::decode::BodyDecoder;
use super::tls::{self, UpstreamTls};
use crate::caller::TRACE_HEADER;
use crate::policy::{Upstream, Var};

/// The header that marks a request as coming from a BFF (see `pipeline::edge`).
pub const BFF_CLIENT_HEADER: &str = "x-bff-client";

/// Compressed bytes decoded in one step before the worker thread may serve another request.
/// The bound on decoded bytes already caps a body's whole work; this keeps one step short.
const DECODE_STEP: usize = 16 * 1024;

/// A request with every header decided, or why it could not be built.
pub type Prepared = Result<Request<Full<Bytes>>, CallError>;

/// Builds the request an upstream sees: the path under its base path, the client headers the
/// route forwards, the trace, `X-BFF-Client`, the upstream's own headers, its credential.
pub fn prepare(upstream: &Upstream, client: &str, outbound: Outbound) -> Prepared {
    let fail = |reason: String| CallError {
        upstream: upstream.name.clone(),
        failure: Failure::Request(reason),
    };
    let scheme = if upstream.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = format!(
        "{scheme}://{}{}{}",
        upstream.authority, upstream.base_path, outbound.path
    );
    let mut request = Request::builder()
        .method(outbound.method)
        .uri(uri)
        .body(Full::new(outbound.body))
        .map_err(|e| fail(format!("cannot build the request: {e}")))?;
    let headers = request.headers_mut();
    *headers = outbound.headers;
    let trace_id = HeaderValue::from_str(&outbound.trace_id)
        .map_err(|_| fail("trace id is not a header value".into()))?;
    headers.insert(TRACE_HEADER, trace_id);
    if let Some(traceparent) = outbound.traceparent {
        headers.insert("traceparent", traceparent);
    }
    headers.insert(
        BFF_CLIENT_HEADER,
        HeaderValue::from_str(client).map_err(|_| fail("client name".into()))?,
    );
    for (name, template) in &upstream.headers {
        let value = template
            .render(|var| match var {
                Var::Jwt(claim) => outbound
                    .claims
                    .as_deref()
                    .and_then(|claims| crate::caller::claim_value(claims, claim)),
                Var::AuthClient => outbound.api_client.as_deref().map(Cow::Borrowed),
                _ => None,
            })
            .map_err(|e| fail(format!("header `{name}`: {e}")))?;
        let value = HeaderValue::from_str(&value).map_err(|_| {
            fail(format!(
                "header `{name}`: the value is not a valid header value"
            ))
        })?;
        headers.insert(name.clone(), value);
    }
    if let Some((name, value)) = outbound.credential {
        headers.insert(name, value);
    }
    Ok(request)
}

type Pooled = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The pooled HTTP/1.1 client of one upstream.
#[derive(Clone)]
pub struct HttpClient {
    pool: Arc<Pool>,
    upstream: Arc<str>,
}

/// An upstream's connection pool, replaceable: `retire` puts a new, empty pool in its place.
/// The old one is dropped with the last call that still uses it, and its connections are then
/// closed: a call under way finishes on its connection, an idle connection closes at once.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    current: ArcSwap<Pooled>,
}

impl Pool {
    fn new(connector: HttpsConnector<HttpConnector>) -> Pool {
        Pool {
            current: ArcSwap::from_pointee(Pool::build(connector.clone())),
            connector,
        }
    }

    fn build(connector: HttpsConnector<HttpConnector>) -> Pooled {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector)
    }

    /// New calls go out on new connections from now on. For a rotated TLS identity or CA: a
    /// pooled connection keeps the handshake it was made with for as long as it lives.
    pub fn retire(&self) {
        self.current
            .store(Arc::new(Pool::build(self.connector.clone())));
    }
}

impl HttpClient {
    /// `tls`: the upstream's TLS when it is https://.
    pub fn new(upstream: &Upstream, tls: Option<&UpstreamTls>) -> HttpClient {
        let connector = tls::connector(tls, upstream.call_timeout());
        HttpClient {
            pool: Arc::new(Pool::new(connector)),
            upstream: Arc::from(upstream.name.as_str()),
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Service<Prepared> for HttpClient {
    type Response = Answer;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, CallError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, prepared: Prepared) -> Self::Future {
        let client = Pooled::clone(&self.pool.current.load());
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let fail = |failure| CallError {
                upstream: upstream.to_string(),
                failure,
            };
            let response = client.request(prepared?).await.map_err(|e| {
                fail(if e.is_connect() {
                    Failure::Connect(error_chain(&e))
                } else {
                    Failure::Transport(error_chain(&e))
                })
            })?;
            read_answer(response).await.map_err(fail)
        })
    }
}

async fn read_answer(response: Response<Incoming>) -> Result<Answer, Failure> {
    let status = response.status();
    if !status.is_success() {
        return Err(Failure::Status(status.as_u16()));
    }
    if status == StatusCode::NO_CONTENT {
        return Ok(Answer {
            status,
            body: Bytes::new(),
        });
    }
    let headers = response.headers();
    if !is_json(headers.get(CONTENT_TYPE)) {
        return Err(Failure::BadBody(
            "answered with a body that is not JSON".into(),
        ));
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|n| *n > MAX_BODY) {
        return Err(Failure::BadBody(format!(
            "body of {n} bytes is over the bound of {MAX_BODY}"
        )));
    }
    let mut decoder = BodyDecoder::new(headers.get(CONTENT_ENCODING), MAX_BODY)
        .map_err(|e| Failure::BadBody(e.to_string()))?;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::Transport(format!("reading the body: {e}")))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        for piece in chunk.chunks(DECODE_STEP) {
            decoder
                .push(piece)
                .map_err(|e| Failure::BadBody(e.to_string()))?;
            // Other requests on this worker thread get their turn between pieces.
            tokio::task::consume_budget().await;
        }
    }
    let body = decoder
        .finish()
        .map_err(|e| Failure::BadBody(e.to_string()))?;
    Ok(Answer { status, body })
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
    fn json_content_types() {
        let ct = |s: &'static str| Some(HeaderValue::from_static(s));
        assert!(is_json(ct("application/json; charset=utf-8").as_ref()));
        assert!(is_json(ct("application/problem+json").as_ref()));
        assert!(!is_json(ct("text/html").as_ref()));
        assert!(!is_json(None));
    }
}
