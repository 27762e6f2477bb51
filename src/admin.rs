//! The admin port, apart from client traffic: `/metrics`, `/healthz`, `/readyz`, `/policy`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::policy::{Action, Policy, RouteAuth};
use crate::proxy::Shared;

pub struct Admin {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => {
                let in_flight = self.shared.in_flight.load(Ordering::SeqCst);
                let metrics = &self.shared.metrics;
                metrics
                    .in_flight_requests
                    .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
                reply(200, "text/plain; version=0.0.4", metrics.render())
            }
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" if self.shared.is_ready() => reply(200, "text/plain", b"ready\n".to_vec()),
            "/readyz" => reply(503, "text/plain", b"not ready\n".to_vec()),
            "/policy" => {
                let body = describe(&self.shared.policy.load());
                reply(200, "application/json", body.to_string().into_bytes())
            }
            _ => reply(404, "text/plain", b"not found\n".to_vec()),
        }
    }
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut response = Response::new(body);
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// The live policy as operators want to see it: routes with their cache-key prefix and shape.
fn describe(policy: &Policy) -> serde_json::Value {
    let routes: Vec<_> = policy
        .routes
        .iter()
        .map(|r| {
            let (kind, upstreams): (_, Vec<_>) = match &r.action {
                Action::Fetch(fetches) => (
                    "fetch",
                    fetches.iter().map(|f| f.upstream.name.as_str()).collect(),
                ),
                Action::Proxy(p) => ("proxy", vec![p.upstream.name.as_str()]),
            };
            json!({
                "name": r.name,
                "method": r.method.as_str(),
                "path": r.path,
                "kind": kind,
                "auth": match r.auth {
                    RouteAuth::Required => "required",
                    RouteAuth::Optional => "optional",
                    RouteAuth::None => "none",
                },
                "scopes": r.scopes,
                "upstreams": upstreams,
                "version": r.version,
                "shape": r.shape,
                "cacheKeyPrefix": r.key_prefix(&policy.client),
            })
        })
        .collect();
    json!({
        "client": policy.client,
        "source": policy.source.display().to_string(),
        "upstreams": policy.upstreams.keys().collect::<Vec<_>>(),
        "fallthrough": policy.fallthrough.as_ref().map(|u| u.name.as_str()),
        "routes": routes,
    })
}
