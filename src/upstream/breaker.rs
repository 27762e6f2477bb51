//! The circuit breaker of one upstream: opens on consecutive failures or a failure ratio,
//! rejects calls while open, then lets one probe call through to decide whether to close.
//!
//! A timeout above the breaker drops the call instead of ending it, so the call carries its
//! deadline: dropped past it, it timed out (a failure); dropped before, it was cancelled.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::IntGauge;
use tower::{Layer, Service};

use super::{Answer, CallError, Failure, Outbound};
use crate::policy::BreakerPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

impl CircuitState {
    fn gauge_value(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

pub struct Breaker {
    upstream: String,
    policy: Option<BreakerPolicy>,
    state: Mutex<State>,
    gauge: IntGauge,
}

struct State {
    circuit: CircuitState,
    opened_at: Instant,
    /// Half-open: the one call allowed through is under way.
    probing: bool,
    consecutive_failures: u32,
    window_started: Instant,
    window_calls: u32,
    window_failures: u32,
}

/// Admission to call the upstream, given back through `record` or `release`.
#[must_use]
pub struct Admission {
    /// The one call a half-open circuit lets through.
    probe: bool,
}

impl Breaker {
    /// `policy: None` is a breaker that never opens.
    pub fn new(upstream: &str, policy: Option<BreakerPolicy>, gauge: IntGauge) -> Breaker {
        gauge.set(CircuitState::Closed.gauge_value());
        let now = Instant::now();
        Breaker {
            upstream: upstream.to_string(),
            policy,
            state: Mutex::new(State {
                circuit: CircuitState::Closed,
                opened_at: now,
                probing: false,
                consecutive_failures: 0,
                window_started: now,
                window_calls: 0,
                window_failures: 0,
            }),
            gauge,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a few counters, consistent after every update; a panic elsewhere
        // while holding the lock leaves nothing half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets a call through, or refuses it while the circuit is open.
    pub fn admit(&self) -> Result<Admission, CircuitOpen> {
        let Some(policy) = &self.policy else {
            return Ok(Admission { probe: false });
        };
        let mut state = self.lock();
        match state.circuit {
            CircuitState::Closed => Ok(Admission { probe: false }),
            CircuitState::Open if state.opened_at.elapsed() < policy.open_for => Err(CircuitOpen),
            CircuitState::HalfOpen if state.probing => Err(CircuitOpen),
            CircuitState::Open | CircuitState::HalfOpen => {
                self.set(&mut state, CircuitState::HalfOpen);
                state.probing = true;
                Ok(Admission { probe: true })
            }
        }
    }

    /// A call was cancelled: it tells nothing about the upstream, but a probe's slot is freed.
    fn release(&self, admission: Admission) {
        if admission.probe {
            self.lock().probing = false;
        }
    }

    /// Records how an admitted call ended. `healthy`: the upstream answered (a 4xx included).
    pub fn record(&self, admission: Admission, healthy: bool) {
        let Some(policy) = &self.policy else { return };
        let mut state = self.lock();
        let probe = admission.probe;
        if probe {
            state.probing = false;
        }
        if state.window_started.elapsed() >= policy.window {
            state.window_started = Instant::now();
            state.window_calls = 0;
            state.window_failures = 0;
        }
        state.window_calls += 1;
        if healthy {
            state.consecutive_failures = 0;
            if probe {
                self.close(&mut state);
            }
            return;
        }
        state.window_failures += 1;
        state.consecutive_failures += 1;
        let ratio = f64::from(state.window_failures) / f64::from(state.window_calls);
        let trips = probe
            || state.consecutive_failures >= policy.consecutive_failures
            || (state.window_calls >= policy.min_requests && ratio >= policy.failure_ratio);
        if trips && state.circuit != CircuitState::Open {
            state.opened_at = Instant::now();
            self.set(&mut state, CircuitState::Open);
            tracing::warn!(upstream = %self.upstream, open_for = ?policy.open_for, "circuit opened");
        }
    }

    fn close(&self, state: &mut State) {
        state.window_started = Instant::now();
        state.window_calls = 0;
        state.window_failures = 0;
        self.set(state, CircuitState::Closed);
        tracing::info!(upstream = %self.upstream, "circuit closed");
    }

    fn set(&self, state: &mut State, circuit: CircuitState) {
        state.circuit = circuit;
        self.gauge.set(circuit.gauge_value());
    }
}

/// The circuit is open: the call was refused without reaching the upstream.
#[derive(Debug)]
pub struct CircuitOpen;

/// The breaker as a Tower layer: refuses calls at once while open, records how the rest end.
#[derive(Clone)]
pub struct BreakerLayer {
    breaker: Arc<Breaker>,
}

impl BreakerLayer {
    pub fn new(breaker: Arc<Breaker>) -> Self {
        BreakerLayer { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S> Service<Outbound> for Gate<S>
where
    S: Service<Outbound, Response = Answer, Error = CallError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Answer;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, CallError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Outbound) -> Self::Future {
        let breaker = self.breaker.clone();
        let deadline = request.deadline;
        let admitted = breaker.admit();
        let call = admitted.is_ok().then(|| self.inner.call(request));
        Box::pin(async move {
            let (Ok(admission), Some(call)) = (admitted, call) else {
                return Err(CallError {
                    upstream: breaker.upstream.clone(),
                    failure: Failure::CircuitOpen,
                });
            };
            let mut pending = Pending {
                breaker: &breaker,
                admission: Some(admission),
                deadline,
            };
            let result = call.await;
            let healthy = match &result {
                Ok(_) => true,
                Err(e) => !e.failure.is_upstream_fault(),
            };
            if let Some(admission) = pending.admission.take() {
                breaker.record(admission, healthy);
            }
            result
        })
    }
}

/// An admitted call still under way. Dropped unfinished, it was either timed out from above
/// (its deadline has passed: the upstream's fault) or cancelled (a sibling failed, the client
/// left: nothing learned).
struct Pending<'a> {
    breaker: &'a Breaker,
    admission: Option<Admission>,
    deadline: Instant,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            if Instant::now() >= self.deadline {
                self.breaker.record(admission, false);
            } else {
                self.breaker.release(admission);
            }
        }
    }
}
