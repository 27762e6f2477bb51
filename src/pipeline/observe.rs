//! The end of every request: one access-log line and the request metrics, written from
//! Pingora's logging phase so early answers and failures are counted too.

use pingora::proxy::Session;
use tracing::info;

use super::ctx::RequestCtx;
use crate::metrics::Metrics;

pub fn finish(
    session: &Session,
    ctx: &RequestCtx,
    metrics: &Metrics,
    error: Option<&pingora::Error>,
) {
    let status = session.response_written().map(|r| r.status);
    let route = ctx.route_label();
    let client = ctx.policy.client.as_str();
    let elapsed = ctx.started.elapsed();
    // Status 0: the connection failed before any response was written.
    let status_label = status.as_ref().map_or("0", http::StatusCode::as_str);
    metrics
        .requests_total
        .with_label_values(&[client, route, status_label])
        .inc();
    metrics
        .request_duration_seconds
        .with_label_values(&[client, route])
        .observe(elapsed.as_secs_f64());
    metrics
        .response_bytes_total
        .with_label_values(&[client, route])
        .inc_by(session.body_bytes_sent() as u64);
    let request = session.req_header();
    info!(
        target: "access",
        trace_id = %ctx.trace_id,
        method = %request.method,
        path = %request.uri.path(),
        route,
        status = status.map_or(0, |s| s.as_u16()),
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        error = error.map(|e| e.etype().as_str()),
        "request"
    );
}
