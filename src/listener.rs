//! The client listener's defences, in front of Pingora's HTTP/1 server: a cap on live client
//! connections, and each request head read here first, bounded in bytes (431) and in time,
//! with an idle timeout between the requests of a kept-alive connection, then handed whole to
//! Pingora. Pingora bounds a head at a fixed 1 MiB and times each read, not the head, so a
//! client sending a byte a minute would hold a connection, and a megabyte, for ever.
//!
//! It replaces the `ServerApp` Pingora derives for an HTTP app (`apps/mod.rs`), for HTTP/1
//! over TCP only: bff's client listener has neither TLS nor h2c.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use crate::envelope::{Envelope, ErrorCode};
use crate::metrics::{Metrics, Refusal};
use crate::pipeline::edge;

/// What a client connection may cost: `bff run` flags, where the defaults are.
#[derive(Debug, Clone)]
pub struct ClientLimits {
    /// Largest request head (request line and headers); a larger one is answered 431.
    pub max_header_bytes: usize,
    /// Longest a request head may take to arrive, from the connection's accept (first
    /// request) or the head's first byte (later ones).
    pub header_timeout: Duration,
    /// Longest a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Most client connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
}

/// A head's first buffer: most heads fit, and it only grows (doubling) for the ones that do not.
const INITIAL_HEAD_BUFFER: usize = 4096;

/// After a 431, how long and how much of the rest of the client's head is read and dropped
/// before closing, so the close does not reset the connection before the client reads the 431.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// An HTTP app (Pingora's `HttpProxy`) behind the client limits.
pub struct GuardedListener<A> {
    app: Arc<A>,
    limits: ClientLimits,
    open: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl<A> GuardedListener<A> {
    pub fn new(app: A, limits: ClientLimits, metrics: Arc<Metrics>) -> Self {
        GuardedListener {
            app: Arc::new(app),
            limits,
            open: AtomicUsize::new(0),
            metrics,
        }
    }

    fn take_slot(&self) -> Option<Slot<'_, A>> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.metrics.client_connections_open.inc();
        Some(Slot(self))
    }
}

/// One open client connection, counted until dropped.
struct Slot<'a, A>(&'a GuardedListener<A>);

impl<A> Drop for Slot<'_, A> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.client_connections_open.dec();
    }
}

#[async_trait]
impl<A> ServerApp for GuardedListener<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(_slot) = self.take_slot() else {
            self.metrics.refused(Refusal::OverCap);
            debug!(
                max_connections = self.limits.max_connections,
                "client connection closed: too many open"
            );
            return None;
        };
        let mut kept_alive: Option<Option<HttpPersistentSettings>> = None;
        loop {
            let head =
                match read_head(&mut stream, &self.limits, kept_alive.is_some(), shutdown).await {
                    Ok(head) => head,
                    Err(HeadEnd::TooLarge(head)) => {
                        self.metrics.refused(Refusal::HeadTooLarge);
                        answer_too_large(stream, head).await;
                        return None;
                    }
                    Err(HeadEnd::Timeout) => {
                        self.metrics.refused(Refusal::HeadTimeout);
                        debug!("client connection closed: its request head took too long");
                        return None;
                    }
                    Err(end) => {
                        debug!(?end, "client connection closed before a request");
                        return None;
                    }
                };
            let mut session = ServerSession::new_http1(stream);
            match kept_alive.take().flatten() {
                Some(settings) => settings.apply_to_session(&mut session),
                None => session.set_keepalive_reuses_remaining(
                    self.app
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                ),
            }
            // Pingora only reads this as "reuse the connection" here: the head it parses is
            // already read, and the wait for the next one is `read_head`'s.
            let keepalive =
                (!*shutdown.borrow()).then_some(self.limits.idle_timeout.as_secs().max(1));
            session.set_keepalive(keepalive);
            // Pingora parses a complete head from this buffer without reading, and takes any
            // bytes after it as the start of the body. (Pingora's own pipelining, which would
            // hand over a prefix too, is off: a request sent early closes the connection.)
            session.set_pipelined_prefix(head);
            let reused = self.app.process_new_http(session, shutdown).await?;
            let (next, settings) = reused.consume();
            stream = next;
            kept_alive = Some(settings);
        }
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

/// Why no request head was read.
#[derive(Debug)]
enum HeadEnd {
    /// The client closed the connection or it failed.
    Closed,
    /// A kept-alive connection sent nothing within the idle timeout.
    Idle,
    /// The head did not arrive within the header timeout.
    Timeout,
    /// The head did not end within the bound; the bytes read so far.
    TooLarge(BytesMut),
    /// The server is shutting down and the connection was between requests.
    Shutdown,
}

/// Reads one request head, and possibly the start of its body, within the limits.
async fn read_head(
    stream: &mut Stream,
    limits: &ClientLimits,
    kept_alive: bool,
    shutdown: &ShutdownWatch,
) -> Result<BytesMut, HeadEnd> {
    let max = limits.max_header_bytes;
    let mut head = BytesMut::with_capacity(INITIAL_HEAD_BUFFER.min(max));
    let mut scan = HeadScan::default();
    let mut deadline = Instant::now()
        + if kept_alive {
            limits.idle_timeout
        } else {
            limits.header_timeout
        };
    let mut shutdown = shutdown.clone();
    loop {
        if head.len() >= max {
            return Err(HeadEnd::TooLarge(head));
        }
        if head.len() == head.capacity() {
            head.reserve((head.len()).min(max - head.len()));
        }
        let waiting = head.is_empty();
        let before = head.len();
        let mut within_bound = AsyncReadExt::take(&mut *stream, (max - before) as u64);
        let read = tokio::select! {
            read = timeout_at(deadline, within_bound.read_buf(&mut head)) => read,
            // Between requests a connection is idle and can close at once; a disconnected
            // watch (never, while the server runs) leaves this branch off.
            Ok(()) = shutdown.changed(), if waiting && kept_alive => return Err(HeadEnd::Shutdown),
        };
        match read {
            Err(_) if waiting && kept_alive => return Err(HeadEnd::Idle),
            Err(_) => return Err(HeadEnd::Timeout),
            Ok(Ok(0) | Err(_)) => return Err(HeadEnd::Closed),
            Ok(Ok(_)) => {
                if waiting && kept_alive {
                    // The idle wait is over: the head itself now has the header timeout.
                    deadline = Instant::now() + limits.header_timeout;
                }
                if scan.feed(&head[before..]) {
                    return Ok(head);
                }
            }
        }
    }
}

/// Finds the end of a request head in the bytes as they arrive, where `httparse` (Pingora's
/// parser) finds it: after empty lines before the request line, the first empty line (`\n\n`
/// or `\n\r\n`).
#[derive(Default)]
struct HeadScan {
    state: ScanState,
}

#[derive(Default, Clone, Copy)]
enum ScanState {
    /// Before the request line; empty lines here are skipped.
    #[default]
    Leading,
    /// Inside a line.
    Line,
    /// Just after a line's `\n`.
    LineStart,
    /// After a line's `\n` and a `\r`.
    LineStartCr,
}

impl HeadScan {
    /// Whether the head ends within `bytes` (which follow every byte fed before).
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &byte in bytes {
            self.state = match (self.state, byte) {
                (ScanState::Leading, b'\r' | b'\n') => ScanState::Leading,
                (ScanState::LineStart, b'\n') | (ScanState::LineStartCr, b'\n') => return true,
                (ScanState::LineStart, b'\r') => ScanState::LineStartCr,
                (_, b'\n') => ScanState::LineStart,
                _ => ScanState::Line,
            };
        }
        false
    }
}

/// Answers 431 with the error envelope, then reads and drops what the client still sends for a
/// moment (within bounds), so closing with unread bytes does not reset the connection before
/// the client has read the answer.
async fn answer_too_large(mut stream: Stream, mut head: BytesMut) {
    let envelope = Envelope::from(ErrorCode::HeadersTooLarge);
    let trace_id = edge::trace_id(&http::HeaderMap::new());
    let body = envelope.body(&trace_id);
    let answer = format!(
        "HTTP/1.1 {} Request Header Fields Too Large\r\ncontent-type: application/json\r\n\
         cache-control: no-store\r\n{}: {trace_id}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        envelope.status,
        crate::caller::TRACE_HEADER,
        body.len()
    );
    debug!(%trace_id, "request head over its bound: 431");
    let deadline = Instant::now() + LINGER;
    let written = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    if !matches!(timeout_at(deadline, written).await, Ok(Ok(()))) {
        return;
    }
    let mut drained = 0;
    while drained < LINGER_BYTES {
        head.clear();
        match timeout_at(deadline, stream.read_buf(&mut head)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(chunks: &[&[u8]]) -> Option<usize> {
        let mut scan = HeadScan::default();
        chunks.iter().position(|chunk| scan.feed(chunk))
    }

    #[test]
    fn finds_the_end_of_a_head_across_reads() {
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]), Some(0));
        assert_eq!(
            ends(&[b"GET / HTTP/1.1\r\nHost: a\r", b"\n", b"\r", b"\nbody"]),
            Some(3)
        );
        assert_eq!(ends(&[b"GET / HTTP/1.1\nHost: a\n\n"]), Some(0));
        assert_eq!(ends(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), None);
        // Empty lines before the request line do not end the head (httparse skips them).
        assert_eq!(ends(&[b"\r\n\r\n\n", b"GET / HTTP/1.1\r\n"]), None);
        assert_eq!(ends(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]), Some(0));
    }
}
