//! The per-request context: everything one request carries through the phases, dropped when
//! the request ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::policy::{Policy, Route, Upstream};

pub struct RequestCtx {
    pub started: Instant,
    pub trace_id: String,
    /// The policy this request started under: a reload never changes a request in flight.
    pub policy: Arc<Policy>,
    pub route: Option<Arc<Route>>,
    /// Percent-decoded path parameters of the matched route.
    pub params: Vec<(String, String)>,
    /// Set when no route matched and the policy falls through to the app.
    pub fallthrough: Option<Arc<Upstream>>,
    _in_flight: InFlight,
}

impl RequestCtx {
    pub fn new(policy: Arc<Policy>, in_flight: &Arc<AtomicUsize>) -> Self {
        RequestCtx {
            started: Instant::now(),
            trace_id: String::new(),
            policy,
            route: None,
            params: Vec::new(),
            fallthrough: None,
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
