//! The admin port, apart from client traffic: `/metrics`, `/healthz`, `/readyz`, `/policy`,
//! and `DELETE /cache/{route}[?key=INPUTS]` to invalidate cached answers.

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
            cache if cache.starts_with("/cache/") => {
                if session.req_header().method != http::Method::DELETE {
                    return reply(405, "text/plain", b"use DELETE\n".to_vec());
                }
                let route = &cache["/cache/".len()..];
                let query = session.req_header().uri.query().unwrap_or("").to_string();
                self.invalidate(route, &query).await
            }
            _ => reply(404, "text/plain", b"not found\n".to_vec()),
        }
    }
}

impl Admin {
    /// `DELETE /cache/{route}`: every key of the route, of any version; with `?key=INPUTS`
    /// (the part of a key after the shape, as `/policy`'s `cacheKeyPrefix` is followed in
    /// Redis) that one key of the live version and shape.
    async fn invalidate(&self, route: &str, query: &str) -> Response<Vec<u8>> {
        let active = self.shared.policy.load_full();
        let Some(found) = active.routes.iter().find(|r| r.name == route) else {
            let body = json!({"error": format!("no route `{route}` in the policy")});
            return reply(404, "application/json", body.to_string().into_bytes());
        };
        let inputs = crate::pipeline::inputs::query_value(query, "key");
        let (key, prefix) = match &inputs {
            Some(inputs) => (
                format!("{}{inputs}", found.key_prefix(&active.client)),
                false,
            ),
            None => (format!("{}:{}:", active.client, found.name), true),
        };
        let (l1, l2) = self.shared.cache.invalidate(&key, prefix).await;
        tracing::info!(route, %key, prefix, l1, l2, "cache invalidated");
        let body = json!({
            "route": found.name,
            "key": key,
            "prefix": prefix,
            "l1Removed": l1,
            "l2Removed": l2,
        });
        let status = if self.shared.cache.l2().is_some() && l2.is_none() {
            502
        } else {
            200
        };
        reply(status, "application/json", body.to_string().into_bytes())
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
