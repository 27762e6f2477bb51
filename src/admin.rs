//! The admin port, apart from client traffic: `/metrics`, `/healthz`, `/readyz` open to the
//! kubelet and Prometheus; the control endpoints `/policy` and `DELETE /cache/{route}[?key=INPUTS]`
//! behind a bearer token. It runs on a thread of its own, outside Pingora's services, so it keeps
//! answering (`/readyz` 503) while the data plane drains, until the process exits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{error, warn};

use crate::pipeline::Shared;
use crate::policy::{Action, Policy, RouteAuth};

/// A client that sends no complete request head in this time is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Admin {
    pub shared: Arc<Shared>,
    pub control: ControlAccess,
}

/// Who may use the control endpoints (`/policy`, `DELETE /cache/…`), which flush the cache of
/// every instance and show the policy.
pub enum ControlAccess {
    /// `Authorization: Bearer <token>` with the token in this file.
    Token(TokenFile),
    /// No token file, on a loopback listener: only processes of this host (pod) reach it.
    Loopback,
    /// No token file on a listener others can reach: refused with 403.
    Off,
}

impl ControlAccess {
    /// `token_file` when there is one; otherwise open on loopback, off elsewhere.
    pub fn new(token_file: Option<&Path>, admin: SocketAddr) -> Result<ControlAccess, String> {
        match token_file {
            Some(path) => TokenFile::load(path).map(ControlAccess::Token),
            None if admin.ip().is_loopback() => Ok(ControlAccess::Loopback),
            None => Ok(ControlAccess::Off),
        }
    }
}

/// The admin token, read again at each control request so a rotated Secret takes effect
/// without a restart; an unreadable or empty file (a rotation caught half-way) keeps the last
/// good token. Only its SHA-256 is held, and compared in constant time.
pub struct TokenFile {
    path: PathBuf,
    digest: Mutex<[u8; 32]>,
}

impl TokenFile {
    pub fn load(path: &Path) -> Result<TokenFile, String> {
        Ok(TokenFile {
            path: path.to_owned(),
            digest: Mutex::new(read_token(path)?),
        })
    }

    fn admits(&self, presented: &str) -> bool {
        let mut digest = self.digest.lock().unwrap_or_else(PoisonError::into_inner);
        match read_token(&self.path) {
            Ok(now) => *digest = now,
            Err(e) => warn!(error = %e, "admin token not re-read; the last good one stays"),
        }
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(presented.ct_eq(&*digest))
    }
}

/// The token is the file's content without surrounding whitespace (`echo token > file`).
fn read_token(path: &Path) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the admin token file `{}`: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "the admin token file `{}` is empty",
            path.display()
        ));
    }
    Ok(Sha256::digest(token.as_bytes()).into())
}

/// Serves the admin port on a thread and runtime of its own until the process exits.
pub fn spawn(listener: std::net::TcpListener, admin: Admin) -> Result<(), String> {
    let address = listener
        .local_addr()
        .map_or_else(|_| "the admin port".to_string(), |a| a.to_string());
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot set up the admin listener {address}: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the admin port's runtime: {e}"))?;
    let admin = Arc::new(admin);
    std::thread::Builder::new()
        .name("bff-admin".into())
        .spawn(move || runtime.block_on(accept(listener, admin)))
        .map_err(|e| format!("cannot start the admin port's thread: {e}"))?;
    Ok(())
}

async fn accept(listener: std::net::TcpListener, admin: Arc<Admin>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            error!(error = %e, "the admin port cannot accept connections");
            return;
        }
    };
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "admin port: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.respond(request, peer).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

impl Admin {
    async fn respond(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        match path {
            "/metrics" => {
                let in_flight = self.shared.in_flight.load(Ordering::SeqCst);
                let metrics = &self.shared.metrics;
                metrics
                    .in_flight_requests
                    .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
                return reply(200, "text/plain; version=0.0.4", metrics.render());
            }
            "/healthz" => return reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" if self.shared.is_ready() => {
                return reply(200, "text/plain", b"ready\n".to_vec())
            }
            "/readyz" => return reply(503, "text/plain", b"not ready\n".to_vec()),
            "/policy" => {}
            control if control.starts_with("/cache/") => {}
            _ => return reply(404, "text/plain", b"not found\n".to_vec()),
        }
        if let Some(refused) = self.refuse_control(&request, peer) {
            return refused;
        }
        if path == "/policy" {
            let body = describe(&self.shared.policy.load());
            return reply(200, "application/json", body.to_string().into_bytes());
        }
        if request.method() != Method::DELETE {
            return reply(405, "text/plain", b"use DELETE\n".to_vec());
        }
        let route = &path["/cache/".len()..];
        self.invalidate(route, request.uri().query().unwrap_or(""))
            .await
    }

    /// The refusal of a control request, unless it may go on.
    fn refuse_control(
        &self,
        request: &Request<Incoming>,
        peer: SocketAddr,
    ) -> Option<Response<Full<Bytes>>> {
        let path = request.uri().path();
        match &self.control {
            ControlAccess::Loopback => None,
            ControlAccess::Off => {
                warn!(%peer, path, "admin control request refused: no --admin-token-file and the admin port is not on loopback");
                Some(reply(
                    403,
                    "text/plain",
                    b"control endpoints need --admin-token-file when the admin port is not on loopback\n"
                        .to_vec(),
                ))
            }
            ControlAccess::Token(token) => {
                let presented = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split_once(' '))
                    // The scheme is case-insensitive (RFC 9110 §11.1).
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, token)| token.trim());
                if presented.is_some_and(|presented| token.admits(presented)) {
                    return None;
                }
                warn!(%peer, path, credential = if presented.is_some() { "wrong" } else { "missing" }, "admin control request refused");
                let mut refused = reply(401, "text/plain", b"admin token required\n".to_vec());
                refused.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"bff-admin\""),
                );
                Some(refused)
            }
        }
    }

    /// `DELETE /cache/{route}`: every key of the route, of any version; with `?key=INPUTS`
    /// (the part of a key after the shape, as `/policy`'s `cacheKeyPrefix` is followed in
    /// Redis) that one key of the live version and shape.
    async fn invalidate(&self, route: &str, query: &str) -> Response<Full<Bytes>> {
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

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
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
