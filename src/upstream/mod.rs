//! Reaching internal services: the peer (address and timeouts) for an upstream, and how a
//! failure to reach one becomes an error code.

use std::net::SocketAddr;
use std::time::Duration;

use pingora::prelude::HttpPeer;
use pingora::{Error, ErrorType};

use crate::envelope::ErrorCode;
use crate::policy::Upstream;

/// Used when the policy gives an upstream no `timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a pooled upstream connection may sit idle before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an upstream could not be used, named for logs and metrics.
#[derive(Debug, thiserror::Error)]
#[error("upstream `{upstream}`: {reason}")]
pub struct UpstreamError {
    pub upstream: String,
    pub reason: String,
    pub code: ErrorCode,
}

impl UpstreamError {
    pub fn new(upstream: &Upstream, code: ErrorCode, reason: impl Into<String>) -> Self {
        UpstreamError {
            upstream: upstream.name.clone(),
            reason: reason.into(),
            code,
        }
    }
}

/// Resolves the upstream's address (without blocking a worker on DNS) and builds its peer.
/// `read_timeout` bounds each read; pass-through to the app sets none, so long-lived streams
/// (SSE, WebSocket) are not cut.
pub async fn peer(
    upstream: &Upstream,
    read_timeout: Option<Duration>,
) -> Result<HttpPeer, UpstreamError> {
    let address = resolve(upstream).await?;
    let mut peer = HttpPeer::new(address, false, String::new());
    peer.options.connection_timeout = Some(upstream.timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT));
    peer.options.read_timeout = read_timeout;
    peer.options.write_timeout = read_timeout;
    peer.options.idle_timeout = Some(IDLE_TIMEOUT);
    Ok(peer)
}

async fn resolve(upstream: &Upstream) -> Result<SocketAddr, UpstreamError> {
    if let Ok(ip) = upstream.host.parse() {
        return Ok(SocketAddr::new(ip, upstream.port));
    }
    let mut found = tokio::net::lookup_host((upstream.host.as_str(), upstream.port))
        .await
        .map_err(|e| {
            UpstreamError::new(
                upstream,
                ErrorCode::DependencyUnavailable,
                format!("DNS: {e}"),
            )
        })?;
    found.next().ok_or_else(|| {
        UpstreamError::new(
            upstream,
            ErrorCode::DependencyUnavailable,
            "DNS: no address",
        )
    })
}

/// The client-facing code for a Pingora error on the way to or from an upstream.
pub fn code_for(error: &Error) -> ErrorCode {
    match error.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            ErrorCode::DeadlineExceeded
        }
        ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::SocketError
        | ErrorType::BindError => ErrorCode::DependencyUnavailable,
        _ => ErrorCode::BadUpstreamResponse,
    }
}
