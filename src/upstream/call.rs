//! A call as the client stack sees it: what goes down each layer (`Outbound`), what comes back
//! (`Answer`, `CallError`, `Failure`), and what every client of an upstream shares: the bounds
//! on bodies and idle connections, and the count of failed file re-reads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use crate::caller::{Claims, Identity};
use crate::envelope::ErrorCode;
use crate::metrics::Outcome;

/// Largest (decompressed) body read from an upstream.
pub const MAX_BODY: usize = 4 << 20;
/// How long a pooled upstream connection may sit idle before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A call as it travels down the stack; cloned for each retry.
#[derive(Clone)]
pub struct Outbound {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trace_id: String,
    pub traceparent: Option<HeaderValue>,
    pub claims: Option<Arc<Claims>>,
    pub api_client: Option<Arc<str>>,
    pub identity: Identity,
    /// The machine credential's header (value marked sensitive).
    pub credential: Option<(HeaderName, HeaderValue)>,
    /// When the call's timeout ends (see `breaker`).
    pub deadline: Instant,
}

/// A 2xx answer, its body read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

/// A failed call, naming the upstream.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream `{upstream}`: {failure}")]
pub struct CallError {
    pub upstream: String,
    pub failure: Failure,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection failed: {0}")]
    Transport(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("answered {0}")]
    Status(u16),
    #[error("{0}")]
    BadBody(String),
    #[error("circuit open")]
    CircuitOpen,
    /// The request could not be built from this client request's inputs.
    #[error("{0}")]
    Request(String),
    /// No machine credential for the call (the OAuth2 token endpoint failed); the message
    /// holds no secret.
    #[error("machine credential: {0}")]
    Credential(String),
}

impl Failure {
    pub fn outcome(&self) -> Outcome {
        match self {
            Failure::Connect(_)
            | Failure::Transport(_)
            | Failure::Status(_)
            | Failure::Request(_)
            | Failure::Credential(_) => Outcome::Error,
            Failure::Timeout(_) => Outcome::Timeout,
            Failure::BadBody(_) => Outcome::BadBody,
            Failure::CircuitOpen => Outcome::CircuitOpen,
        }
    }

    /// The client-facing code when this failure decides a `proxy` route's answer.
    pub fn code(&self) -> ErrorCode {
        match self {
            Failure::Connect(_)
            | Failure::Transport(_)
            | Failure::CircuitOpen
            | Failure::Credential(_) => ErrorCode::DependencyUnavailable,
            Failure::Timeout(_) => ErrorCode::DeadlineExceeded,
            Failure::Status(status) => ErrorCode::for_upstream_status(*status),
            Failure::BadBody(_) => ErrorCode::BadUpstreamResponse,
            Failure::Request(_) => ErrorCode::BadRequest,
        }
    }
}

/// Counts one upstream's failed re-reads of its secret and TLS files
/// (`bff_secret_file_failures_total`), by policy key and reason.
#[derive(Clone)]
pub struct FileFailures {
    pub(super) counter: prometheus::IntCounterVec,
    pub(super) client: Arc<str>,
    pub(super) upstream: Arc<str>,
}

impl FileFailures {
    pub fn count(&self, key: &str, reason: &str) {
        self.counter
            .with_label_values(&[&*self.client, &*self.upstream, key, reason])
            .inc();
    }
}

/// An error and its causes, `a: b: c`: hyper puts the useful part ("connection refused") in
/// the causes.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
