//! The per-request context: everything one request carries through the phases, dropped when
//! the request ends.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::active::Active;
use crate::caller::Claims;
use crate::policy::{Route, Upstream};

pub struct RequestCtx {
    pub started: Instant,
    pub trace_id: String,
    /// What upstream calls carry as `traceparent` (see `pipeline::edge`).
    pub traceparent: Option<http::HeaderValue>,
    /// The policy this request started under: a reload never changes a request in flight.
    pub policy: Arc<Active>,
    pub route: Option<Arc<Route>>,
    /// Percent-decoded path parameters of the matched route.
    pub params: Vec<(String, String)>,
    /// Set when no route matched and the policy falls through to the app.
    pub fallthrough: Option<Arc<Upstream>>,
    /// The verified token's claims, when the request carried one.
    pub claims: Option<Arc<Claims>>,
    /// The name of the API key the request carried (`{auth.client}`).
    pub api_client: Option<Arc<str>>,
    /// Where the request comes from, behind a trusted proxy as its header says (set once a
    /// route matched; `None` for a client without an IP address).
    pub client_address: Option<IpAddr>,
    _in_flight: InFlight,
}

impl RequestCtx {
    pub fn new(policy: Arc<Active>, in_flight: &Arc<AtomicUsize>) -> Self {
        RequestCtx {
            started: Instant::now(),
            trace_id: String::new(),
            traceparent: None,
            policy,
            route: None,
            params: Vec::new(),
            fallthrough: None,
            claims: None,
            api_client: None,
            client_address: None,
            _in_flight: InFlight::enter(in_flight),
        }
    }

    /// The `route` label of metrics and logs: bounded to the policy's route names.
    pub fn route_label(&self) -> &str {
        match (&self.route, &self.fallthrough) {
            (Some(route), _) => &route.name,
            (None, Some(_)) => "_fallthrough",
            (None, None) => "_unmatched",
        }
    }
}

/// Counts a request as in flight for as long as it lives, so shutdown can wait for zero.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
