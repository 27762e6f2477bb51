//! HTTP/1.1 test client (hyper-util legacy client, no TLS): buffered, chunked-upload and streamed replies.

use std::{convert::Infallible, error::Error, time::Duration};

use ::http::{HeaderMap, Method, Request};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

/// Hard limit for one whole request/response exchange.
pub const TIMEOUT: Duration = Duration::from_secs(10);

type ReqBody = UnsyncBoxBody<Bytes, Infallible>;

/// A fully buffered response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; panics with the body text if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response ({}) is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn get(url: &str) -> Reply {
    send("GET", url, &[], Bytes::new()).await
}

/// Sends one request on a fresh connection; panics on transport error or after [`TIMEOUT`].
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    try_send(method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`send`], but returns transport errors and timeouts instead of panicking.
pub async fn try_send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    exchange(request(
        method,
        url,
        headers,
        Full::new(body.into()).boxed_unsync(),
    ))
    .await
}

/// Sends the body as separate chunks with `gap` between them (Transfer-Encoding: chunked).
pub async fn send_chunked<B: Into<Bytes>>(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    chunks: impl IntoIterator<Item = B>,
    gap: Duration,
) -> Reply {
    let chunks: Vec<Bytes> = chunks.into_iter().map(Into::into).collect();
    let frames =
        futures::stream::iter(chunks.into_iter().enumerate()).then(move |(i, chunk)| async move {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            Ok(Frame::data(chunk))
        });
    let req = request(method, url, headers, StreamBody::new(frames).boxed_unsync());
    exchange(req).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Sends a request and returns as soon as the response head arrives; read the body with
/// [`Streaming::next_chunk`] (e.g. to check that SSE events are not buffered).
pub async fn open(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Streaming {
    let what = format!("{method} {url}");
    let req = request(method, url, headers, Full::new(body.into()).boxed_unsync());
    let resp = tokio::time::timeout(TIMEOUT, client().request(req))
        .await
        .unwrap_or_else(|_| panic!("{what}: no response head within {TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{what}: {}", chain(&e)));
    let (parts, body) = resp.into_parts();
    Streaming {
        what,
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// A response whose body is read incrementally.
pub struct Streaming {
    what: String,
    pub status: u16,
    pub headers: HeaderMap,
    body: Incoming,
}

impl Streaming {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The next data frame, `None` at end of body; panics on error or after [`TIMEOUT`].
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            let frame = tokio::time::timeout(TIMEOUT, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("{}: no body data within {TIMEOUT:?}", self.what))?
                .unwrap_or_else(|e| panic!("{}: reading body: {}", self.what, chain(&e)));
            if let Ok(data) = frame.into_data() {
                return Some(data);
            }
        }
    }

    /// Everything left in the body.
    pub async fn rest(mut self) -> Bytes {
        let mut all = Vec::new();
        while let Some(chunk) = self.next_chunk().await {
            all.extend_from_slice(&chunk);
        }
        all.into()
    }
}

fn client() -> Client<HttpConnector, ReqBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn request(method: &str, url: &str, headers: &[(&str, &str)], body: ReqBody) -> Request<ReqBody> {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("valid method"))
        .uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(body)
        .unwrap_or_else(|e| panic!("building request {method} {url}: {e}"))
}

async fn exchange(req: Request<ReqBody>) -> Result<Reply, String> {
    let what = format!("{} {}", req.method(), req.uri());
    let work = async {
        let resp = client().request(req).await.map_err(|e| chain(&e))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading body: {}", chain(&e)))?;
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.to_bytes(),
        })
    };
    match tokio::time::timeout(TIMEOUT, work).await {
        Ok(result) => result.map_err(|e: String| format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out after {TIMEOUT:?}")),
    }
}

/// An error with all its sources, `outer: inner: root`.
fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}
