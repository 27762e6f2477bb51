//! Mock upstream: a real hyper HTTP/1.1 server that records every request and answers from a handler.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::oneshot,
    task::AbortHandle,
};

type Handler = dyn Fn(RecordedRequest) -> MockReply + Send + Sync;
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// One request as the upstream saw it (body fully read).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path plus query, e.g. `/a/b?x=1`.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RecordedRequest {
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    pub fn query(&self) -> Option<&str> {
        self.uri.split_once('?').map(|(_, q)| q)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "upstream request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

enum ReplyBody {
    Full(Bytes),
    Chunked(Vec<Bytes>, Duration),
    WebSocketEcho,
}

/// What the mock answers; built with the constructors below plus `.header()` / `.delay()`.
pub struct MockReply {
    status: StatusCode,
    headers: HeaderMap,
    body: ReplyBody,
    delay: Duration,
    hold_until: Option<usize>,
}

impl MockReply {
    fn new(status: u16, body: ReplyBody) -> Self {
        let status = StatusCode::from_u16(status).expect("valid status code");
        Self {
            status,
            headers: HeaderMap::new(),
            body,
            delay: Duration::ZERO,
            hold_until: None,
        }
    }

    pub fn empty(status: u16) -> Self {
        Self::new(status, ReplyBody::Full(Bytes::new()))
    }

    pub fn json(status: u16, value: serde_json::Value) -> Self {
        Self::bytes(
            status,
            "application/json",
            serde_json::to_vec(&value).unwrap(),
        )
    }

    pub fn text(status: u16, text: &str) -> Self {
        Self::bytes(status, "text/plain", text.to_owned())
    }

    pub fn bytes(status: u16, content_type: &str, body: impl Into<Bytes>) -> Self {
        Self::new(status, ReplyBody::Full(body.into())).header("content-type", content_type)
    }

    /// Streams `chunks` with `gap` between them (no Content-Length, so Transfer-Encoding: chunked).
    pub fn chunked<B: Into<Bytes>>(
        status: u16,
        content_type: &str,
        chunks: impl IntoIterator<Item = B>,
        gap: Duration,
    ) -> Self {
        let chunks = chunks.into_iter().map(Into::into).collect();
        Self::new(status, ReplyBody::Chunked(chunks, gap)).header("content-type", content_type)
    }

    /// Answers an `Upgrade: websocket` request with 101, then echoes raw bytes on the connection.
    pub fn websocket_echo() -> Self {
        Self::new(101, ReplyBody::WebSocketEcho)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "mock-accept")
    }

    /// Appends a header (repeatable, e.g. several `set-cookie`).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("valid header name");
        self.headers.append(
            name,
            HeaderValue::from_str(value).expect("valid header value"),
        );
        self
    }

    /// Sleeps this long before sending the response head.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Holds the response head until at least `n` requests are in flight on this mock at once
    /// (this one included), so a reply only comes when its caller made `n` calls concurrently.
    /// Waits for ever otherwise; the mock's Drop ends it.
    pub fn hold_until_in_flight(mut self, n: usize) -> Self {
        self.hold_until = Some(n);
        self
    }
}

struct State {
    handler: Box<Handler>,
    requests: Mutex<Vec<RecordedRequest>>,
    connections: AtomicUsize,
    tasks: Mutex<Vec<AbortHandle>>,
    flight: Mutex<Flight>,
}

/// Requests received whose response head is not sent yet, and the replies held until enough
/// of them are (`hold_until_in_flight`).
#[derive(Default)]
struct Flight {
    now: usize,
    max: usize,
    held: Vec<(usize, oneshot::Sender<()>)>,
}

impl Flight {
    /// Releases every held reply whose count is reached.
    fn release(&mut self) {
        let now = self.now;
        for (_, release) in self.held.extract_if(.., |(n, _)| *n <= now) {
            let _ = release.send(());
        }
    }
}

/// Counts one request in flight until dropped (also when its task is aborted).
struct InFlight(Arc<State>);

impl InFlight {
    /// Counts the request in, and with `hold: Some(n)` returns what releases it once `n`
    /// requests are in flight at once. Both under one lock: a request counted but not yet
    /// waiting could otherwise miss the moment the count was reached.
    fn enter(state: &Arc<State>, hold: Option<usize>) -> (Self, Option<oneshot::Receiver<()>>) {
        let mut flight = state.flight.lock().unwrap();
        flight.now += 1;
        flight.max = flight.max.max(flight.now);
        let released = hold.filter(|n| flight.now < *n).map(|n| {
            let (release, released) = oneshot::channel();
            flight.held.push((n, release));
            released
        });
        flight.release();
        (InFlight(state.clone()), released)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.flight.lock().unwrap().now -= 1;
    }
}

impl State {
    fn track(&self, task: AbortHandle) {
        let mut tasks = self.tasks.lock().unwrap();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

/// A recording HTTP/1.1 upstream on `127.0.0.1:0`; all its tasks are aborted on Drop.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<State>,
}

impl MockServer {
    /// Must be called inside a tokio runtime.
    pub fn start(handler: impl Fn(RecordedRequest) -> MockReply + Send + Sync + 'static) -> Self {
        Self::start_on(0, handler)
    }

    /// Like [`MockServer::start`], on `127.0.0.1:port` (e.g. one from [`MockServer::refused_port`],
    /// for a service that comes up after its clients).
    pub fn start_on(
        port: u16,
        handler: impl Fn(RecordedRequest) -> MockReply + Send + Sync + 'static,
    ) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("bind mock upstream on 127.0.0.1:{port}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener =
            TcpListener::from_std(listener).expect("MockServer::start needs a tokio runtime");
        let state = Arc::new(State {
            handler: Box::new(handler),
            requests: Mutex::default(),
            connections: AtomicUsize::new(0),
            tasks: Mutex::default(),
            flight: Mutex::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        state.track(accept.abort_handle());
        Self { addr, state }
    }

    /// A port on 127.0.0.1 with nothing listening (bound, then released).
    pub fn refused_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The most requests this mock had in flight (received, response head not yet sent) at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.flight.lock().unwrap().max
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        for task in self.state.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let st = state.clone();
        let conn = tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, st.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
        state.track(conn.abort_handle());
    }
}

async fn handle(
    mut req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Body>, Infallible> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(respond(
                400,
                HeaderMap::new(),
                full(format!("mock: reading body: {e}")),
            ))
        }
    };
    let wants_websocket = parts
        .headers
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let recorded = RecordedRequest {
        method: parts.method,
        uri: parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned(),
        headers: parts.headers,
        body,
    };
    state.requests.lock().unwrap().push(recorded.clone());
    let reply = (state.handler)(recorded);
    let (in_flight, held) = InFlight::enter(&state, reply.hold_until);
    if let Some(released) = held {
        let _ = released.await;
    }
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    drop(in_flight);
    let status = reply.status.as_u16();
    let body = match reply.body {
        ReplyBody::Full(bytes) => full(bytes),
        ReplyBody::Chunked(chunks, gap) => {
            let frames = futures::stream::iter(chunks.into_iter().enumerate()).then(
                move |(i, chunk)| async move {
                    if i > 0 {
                        tokio::time::sleep(gap).await;
                    }
                    Ok(Frame::data(chunk))
                },
            );
            StreamBody::new(frames).boxed_unsync()
        }
        ReplyBody::WebSocketEcho if !wants_websocket => {
            return Ok(respond(
                400,
                HeaderMap::new(),
                full("mock: expected Upgrade: websocket"),
            ));
        }
        ReplyBody::WebSocketEcho => {
            let echo = tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut io = TokioIo::new(upgraded);
                let mut buf = vec![0; 16 * 1024];
                while let Ok(n @ 1..) = io.read(&mut buf).await {
                    if io.write_all(&buf[..n]).await.is_err() || io.flush().await.is_err() {
                        break;
                    }
                }
            });
            state.track(echo.abort_handle());
            full(Bytes::new())
        }
    };
    Ok(respond(status, reply.headers, body))
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn respond(status: u16, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    *resp.headers_mut() = headers;
    resp
}
