//! Reaching internal services: one client stack per upstream, built once per policy and
//! shared by every route, and the peer of the app that unmatched requests fall through to.
//! It knows nothing of requests or Pingora's proxy: who is calling comes as a `Caller`
//! (see `crate::caller`).
//!
//! A call goes down the stack in this order (`UpstreamClient::new` builds it; the first three
//! are applied by `UpstreamClient::call`, above the tower stack):
//!
//! ```text
//! metrics → timeout → machine credential → concurrency limit → circuit breaker → retry
//!         → headers → HTTP client → TLS (https:// upstreams; `tls`) → TCP
//! ```
//!
//! The machine credential is chosen above the stack, once per call, and travels in the
//! `Outbound` that every retry clones, so each retry carries the same credential. It sits
//! there rather than in a layer of its own because an OAuth2 token may have to be fetched
//! first (async): a fetch must not hold a concurrency slot while it waits, and a token endpoint
//! that is down is not a fault of the upstream, so it must not count at its breaker.

mod breaker;
mod call;
mod client;
pub mod credential;
mod decode;
mod retry;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use indexmap::IndexMap;
use pingora::prelude::HttpPeer;
use pingora::{Error, ErrorType};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tracing::warn;

pub use call::{error_chain, Answer, CallError, Failure, FileFailures, Outbound};
pub use call::{IDLE_TIMEOUT, MAX_BODY};
pub use client::BFF_CLIENT_HEADER;

use crate::caller::{Claims, Identity};
use crate::envelope::ErrorCode;
use crate::metrics::{Metrics, Outcome};
use crate::policy::{Policy, Upstream};
use breaker::{Breaker, BreakerLayer};
use credential::MachineCredential;
use retry::{Retries, RetryBudget};

/// Used for the app's connections when the policy gives it no `timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// What a route asks of an upstream.
pub struct Call {
    pub method: Method,
    /// Path and query, rendered, below the upstream's base path.
    pub path: String,
    /// Client headers the route forwards (none for fetches).
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Who is calling: the labels of the call's metrics and what its headers carry.
pub struct Caller<'a> {
    pub route: &'a str,
    /// The fetch's name, or the upstream's for a `proxy` route.
    pub dependency: &'a str,
    pub trace_id: &'a str,
    pub traceparent: Option<&'a HeaderValue>,
    pub claims: Option<&'a Arc<Claims>>,
    pub api_client: Option<&'a Arc<str>>,
    /// Who the client is, as its rate limits count it: what the circuit breaker tells apart.
    pub identity: &'a Identity,
}

type Stack = BoxCloneSyncService<Outbound, Answer, CallError>;

/// One upstream's client stack. Cheap to clone; clones share pool, limits and breaker.
#[derive(Clone)]
pub struct UpstreamClient {
    upstream: Arc<Upstream>,
    client: Arc<str>,
    credential: Option<Arc<MachineCredential>>,
    stack: Stack,
    metrics: Arc<Metrics>,
    /// The TLS files of an https:// upstream, re-read by `refresh_files`.
    tls: Option<Arc<tls::UpstreamTls>>,
    /// Retired when the TLS files rotate.
    pool: Arc<client::Pool>,
}

impl UpstreamClient {
    pub fn new(upstream: Arc<Upstream>, client: &str, metrics: &Arc<Metrics>) -> Self {
        let labels = [client, upstream.name.as_str()];
        let breaker = Arc::new(Breaker::new(
            &upstream.name,
            upstream.circuit_breaker.clone(),
            metrics.circuit_state.with_label_values(&labels),
        ));
        let retries = upstream.retries.as_ref().map(|policy| {
            Retries::new(Arc::new(RetryBudget::new(
                policy,
                metrics.dependency_retries_total.with_label_values(&labels),
            )))
        });
        let for_headers = (upstream.clone(), client.to_string());
        let failures = FileFailures {
            counter: metrics.secret_file_failures_total.clone(),
            client: Arc::from(client),
            upstream: Arc::from(upstream.name.as_str()),
        };
        let tls = upstream
            .tls
            .as_ref()
            .map(|policy| Arc::new(tls::UpstreamTls::new(&upstream.name, policy, &failures)));
        let http = client::HttpClient::new(&upstream, tls.as_deref());
        let pool = http.pool().clone();
        // The timeout and the metrics are applied by `call`, above this stack: tower's
        // `Timeout` starts its clock in `call`, after the concurrency limit's `poll_ready` has
        // already waited, so it could not bound the time spent queueing.
        let stack = ServiceBuilder::new()
            .option_layer(
                upstream
                    .concurrency
                    .map(tower::limit::ConcurrencyLimitLayer::new),
            )
            .layer(BreakerLayer::new(breaker))
            .option_layer(retries.map(tower::retry::RetryLayer::new))
            .map_request(move |outbound| client::prepare(&for_headers.0, &for_headers.1, outbound))
            .service(http);
        UpstreamClient {
            credential: MachineCredential::for_upstream(&upstream, &failures).map(Arc::new),
            upstream,
            client: Arc::from(client),
            stack: BoxCloneSyncService::new(stack),
            metrics: metrics.clone(),
            tls,
            pool,
        }
    }

    /// Re-reads the upstream's credential and TLS files and uses those that changed.
    pub fn refresh_files(&self) {
        if let Some(credential) = &self.credential {
            credential.refresh_files();
        }
        if let Some(tls) = &self.tls {
            if tls.refresh() {
                self.pool.retire();
            }
        }
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Makes one call within the upstream's timeout and turns the answer into `T` with
    /// `decode` (an `Err` from it is a bad body). Counts and times the call; logs nothing,
    /// since the caller knows whether the failure matters.
    pub async fn call<T>(
        &self,
        call: Call,
        caller: &Caller<'_>,
        decode: impl FnOnce(Answer) -> Result<T, String>,
    ) -> Result<T, CallError> {
        let started = Instant::now();
        let limit = self.upstream.call_timeout();
        let deadline = started + limit;
        let fail = |failure| CallError {
            upstream: self.upstream.name.clone(),
            failure,
        };
        let result = async {
            let attached = match &self.credential {
                Some(credential) => Some(
                    credential
                        .attach(deadline)
                        .await
                        .map_err(|reason| fail(Failure::Credential(reason)))?,
                ),
                None => None,
            };
            let outbound = Outbound {
                method: call.method,
                path: call.path,
                headers: call.headers,
                body: call.body,
                trace_id: caller.trace_id.to_string(),
                traceparent: caller.traceparent.cloned(),
                claims: caller.claims.cloned(),
                api_client: caller.api_client.cloned(),
                identity: caller.identity.clone(),
                credential: attached.as_ref().map(|a| (a.name.clone(), a.value.clone())),
                deadline,
            };
            let answer = tokio::time::timeout_at(
                tokio::time::Instant::from_std(deadline),
                self.stack.clone().oneshot(outbound),
            )
            .await;
            match answer {
                Err(_) => Err(fail(Failure::Timeout(limit))),
                Ok(Err(e)) => {
                    if let (Failure::Status(401), Some(credential), Some(attached)) =
                        (&e.failure, &self.credential, &attached)
                    {
                        credential.rejected(attached);
                    }
                    Err(e)
                }
                Ok(Ok(answer)) => {
                    let bytes = answer.body.len() as u64;
                    self.metrics
                        .upstream_bytes_total
                        .with_label_values(&[&*self.client, caller.route])
                        .inc_by(bytes);
                    decode(answer).map_err(|reason| fail(Failure::BadBody(reason)))
                }
            }
        }
        .await;
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(e) => e.failure.outcome(),
        };
        let dependency = [&*self.client, caller.route, caller.dependency];
        self.metrics
            .dependency_duration_seconds
            .with_label_values(&dependency)
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .dependency_requests_total
            .with_label_values(&[
                &*self.client,
                caller.route,
                caller.dependency,
                outcome.label(),
            ])
            .inc();
        result
    }
}

/// Every upstream's client, by name: built once per policy.
pub struct Upstreams(IndexMap<String, UpstreamClient>);

impl Upstreams {
    pub fn build(policy: &Policy, metrics: &Arc<Metrics>) -> Upstreams {
        Upstreams(
            policy
                .upstreams
                .iter()
                .map(|(name, upstream)| {
                    let client = UpstreamClient::new(upstream.clone(), &policy.client, metrics);
                    (name.clone(), client)
                })
                .collect(),
        )
    }

    /// Re-reads the files the clients use (credentials, OAuth2 client secrets, TLS CAs,
    /// certificates and keys) and puts in use those whose content changed, as Kubernetes
    /// rotates mounted secrets. Called every second, off the async loop (reads block, up to
    /// `policy::files::READ_TIMEOUT`); a rotated file is used from the next call on, with no
    /// restart (TLS: on new connections, and the pooled ones close when their calls end).
    pub fn refresh_files(&self) {
        for client in self.0.values() {
            client.refresh_files();
        }
    }

    /// The client of an upstream of the same policy (`build` made one for each).
    pub fn client(&self, upstream: &Upstream) -> Result<&UpstreamClient, CallError> {
        self.0.get(&upstream.name).ok_or_else(|| CallError {
            upstream: upstream.name.clone(),
            failure: Failure::Request("upstream has no client".into()),
        })
    }
}

/// How long a looked-up address of the app is used before it is looked up again.
const APP_LOOKUP_INTERVAL: Duration = Duration::from_secs(5);

/// The app's peer for Pingora's proxy, one per policy. A host name is looked up without
/// blocking a worker and at most once per `APP_LOOKUP_INTERVAL`: a lookup per request (a
/// blocking-pool hop to getaddrinfo) halved the fall-through's throughput to `localhost`.
/// When a lookup fails, the last address found serves until the next try.
/// No read timeout, so long-lived streams (SSE, WebSocket) are not cut.
pub struct AppPeer {
    upstream: Arc<Upstream>,
    address: AppAddress,
}

enum AppAddress {
    /// The url names an IP address: nothing to look up, ever.
    Literal(SocketAddr),
    /// The last address found for the host name and when; `None` until a lookup succeeds.
    Named(Mutex<Option<(SocketAddr, Instant)>>),
}

impl AppPeer {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        let address = match upstream.host.parse() {
            Ok(ip) => AppAddress::Literal(SocketAddr::new(ip, upstream.port)),
            Err(_) => AppAddress::Named(Mutex::new(None)),
        };
        AppPeer { upstream, address }
    }

    pub async fn peer(&self) -> Result<HttpPeer, CallError> {
        let address = match &self.address {
            AppAddress::Literal(address) => *address,
            AppAddress::Named(found) => self.look_up(found).await?,
        };
        let mut peer = HttpPeer::new(address, false, String::new());
        peer.options.connection_timeout =
            Some(self.upstream.timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT));
        peer.options.idle_timeout = Some(IDLE_TIMEOUT);
        Ok(peer)
    }

    async fn look_up(
        &self,
        found: &Mutex<Option<(SocketAddr, Instant)>>,
    ) -> Result<SocketAddr, CallError> {
        let last = *found.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((address, at)) = last {
            if at.elapsed() < APP_LOOKUP_INTERVAL {
                return Ok(address);
            }
        }
        let address = match (resolve(&self.upstream).await, last) {
            (Ok(address), _) | (Err(_), Some((address, _))) => address,
            (Err(e), None) => return Err(e),
        };
        *found.lock().unwrap_or_else(PoisonError::into_inner) = Some((address, Instant::now()));
        Ok(address)
    }
}

async fn resolve(upstream: &Upstream) -> Result<SocketAddr, CallError> {
    let fail = |reason: String| {
        warn!(upstream = %upstream.name, %reason, "cannot resolve upstream");
        CallError {
            upstream: upstream.name.clone(),
            failure: Failure::Connect(reason),
        }
    };
    let found: Vec<SocketAddr> = tokio::net::lookup_host((upstream.host.as_str(), upstream.port))
        .await
        .map_err(|e| fail(format!("DNS: {e}")))?
        .collect();
    // `localhost` often names ::1 first, where an app listening on 0.0.0.0 is not.
    let ipv4 = found.iter().find(|a| a.is_ipv4());
    ipv4.or(found.first())
        .copied()
        .ok_or_else(|| fail("DNS: no address".into()))
}

/// The client-facing code for a Pingora error on the way to or from the app.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn app_of(url: &str) -> Arc<Upstream> {
        let yaml = format!(
            "client: web\nupstreams:\n  app: {{ url: \"{url}\" }}\nroutes: []\nfallthrough: app\n"
        );
        let policy = Policy::from_yaml(&yaml, std::path::Path::new("test.yaml")).expect("policy");
        policy.fallthrough.clone().expect("fallthrough")
    }

    /// Puts `address`, found `age` ago, in a named app's lookup cache.
    fn seed(app: &AppPeer, address: &str, age: Duration) {
        let AppAddress::Named(found) = &app.address else {
            panic!("not a named host")
        };
        *found.lock().unwrap() = Some((address.parse().unwrap(), Instant::now() - age));
    }

    async fn address_of(app: &AppPeer) -> Result<String, CallError> {
        app.peer().await.map(|peer| peer._address.to_string())
    }

    #[tokio::test]
    async fn an_ip_literal_is_used_as_it_is() {
        let app = AppPeer::new(app_of("http://127.0.0.1:8081"));
        assert!(matches!(app.address, AppAddress::Literal(_)));
        assert_eq!(address_of(&app).await.unwrap(), "127.0.0.1:8081");
    }

    #[tokio::test]
    async fn a_host_name_is_looked_up_once_per_interval() {
        let app = AppPeer::new(app_of("http://localhost:8081"));
        assert_eq!(address_of(&app).await.unwrap(), "127.0.0.1:8081");
        // Within the interval the address found is used, whatever DNS would say now.
        seed(&app, "10.9.8.7:8081", Duration::ZERO);
        assert_eq!(address_of(&app).await.unwrap(), "10.9.8.7:8081");
        // Past it, the host is looked up again.
        seed(
            &app,
            "10.9.8.7:8081",
            APP_LOOKUP_INTERVAL + Duration::from_secs(1),
        );
        assert_eq!(address_of(&app).await.unwrap(), "127.0.0.1:8081");
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_address_and_names_the_upstream_without_one() {
        let app = AppPeer::new(app_of("http://no-such-host.invalid:8081"));
        let error = address_of(&app).await.unwrap_err();
        assert_eq!(error.upstream, "app");
        assert!(matches!(error.failure, Failure::Connect(ref reason) if reason.starts_with("DNS")));
        seed(
            &app,
            "10.9.8.7:8081",
            APP_LOOKUP_INTERVAL + Duration::from_secs(1),
        );
        assert_eq!(address_of(&app).await.unwrap(), "10.9.8.7:8081");
    }
}
