//! The circuit breaker of one upstream: opens when the upstream fails too often, rejects calls
//! while open, then lets one probe call through to decide whether to close.
//!
//! One client must not be able to open it for everyone: a request whose own input makes the
//! upstream answer 500 says nothing of the upstream's health for others. So failed answers
//! (5xx, broken connections, bad bodies) are counted by the identity that asked (the one rate
//! limits use), and those of the identity with the most are set aside; calls that could not reach
//! the upstream in time (connect errors, timeouts) count whoever made them. The circuit opens on
//!
//! - `consecutive_failures` failures with no answered call between them, or
//! - `failure_ratio` of the calls in `window` failed, once it holds `min_requests` calls,
//!
//! both counted without the set-aside identity's failed answers (its calls leave the ratio's
//! denominator too). A half-open probe that cannot reach the upstream opens it again; one that
//! gets a failed answer does only when another identity's probe did too since it half-opened.
//!
//! A timeout above the breaker drops the call instead of ending it, so the call carries its
//! deadline: dropped past it, it timed out (a failure); dropped before, it was cancelled.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::IntGauge;
use tower::{Layer, Service};

use super::call::{Answer, CallError, Failure, Outbound};
use crate::caller::Identity;
use crate::policy::BreakerPolicy;

/// Most identities whose failed answers are told apart in one count; beyond them so many
/// clients fail that none is set aside for them.
const MAX_IDENTITIES: usize = 1024;

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

/// What one call tells the breaker about the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered (a 4xx included: an answer about the request).
    Answered,
    /// It answered with a failure (5xx, a broken connection or body): maybe the request's own
    /// doing, so it counts against the identity that asked.
    Failed,
    /// It could not be reached in time: a connect error or a timeout, whoever asked.
    Down,
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
    /// Half-open: whose probe got a failed answer.
    probe_failed_by: Option<Identity>,
    /// Failures since the last answered call.
    run_down: u32,
    run_failed: FailedAnswers,
    window_started: Instant,
    window_calls: u32,
    window_down: u32,
    window_failed: FailedAnswers,
}

/// Failed answers counted by who asked, so the identity with the most can be set aside.
#[derive(Default)]
struct FailedAnswers {
    by_identity: HashMap<Identity, u32>,
    total: u32,
    /// The count of the identity with the most.
    most: u32,
}

impl FailedAnswers {
    fn add(&mut self, who: &Identity) {
        self.total += 1;
        if !self.by_identity.contains_key(who) && self.by_identity.len() >= MAX_IDENTITIES {
            return;
        }
        let count = self.by_identity.entry(who.clone()).or_insert(0);
        *count += 1;
        self.most = self.most.max(*count);
    }

    /// The failed answers of every identity but the one with the most.
    fn of_others(&self) -> u32 {
        self.total - self.most
    }

    fn clear(&mut self) {
        self.by_identity.clear();
        self.total = 0;
        self.most = 0;
    }
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
                probe_failed_by: None,
                run_down: 0,
                run_failed: FailedAnswers::default(),
                window_started: now,
                window_calls: 0,
                window_down: 0,
                window_failed: FailedAnswers::default(),
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

    /// Records how an admitted call of `who` ended.
    pub fn record(&self, admission: Admission, health: Health, who: &Identity) {
        let Some(policy) = &self.policy else { return };
        let mut state = self.lock();
        let probe = admission.probe;
        if probe {
            state.probing = false;
        }
        if state.window_started.elapsed() >= policy.window {
            state.window_started = Instant::now();
            state.window_calls = 0;
            state.window_down = 0;
            state.window_failed.clear();
        }
        state.window_calls += 1;
        match health {
            Health::Answered => {
                state.run_down = 0;
                state.run_failed.clear();
                if probe {
                    self.close(&mut state);
                }
                return;
            }
            Health::Down => {
                state.run_down += 1;
                state.window_down += 1;
            }
            Health::Failed => {
                state.run_failed.add(who);
                state.window_failed.add(who);
            }
        }
        let trips = if probe {
            match health {
                Health::Failed => match &state.probe_failed_by {
                    Some(earlier) => earlier != who,
                    None => {
                        state.probe_failed_by = Some(who.clone());
                        false
                    }
                },
                _ => true,
            }
        } else {
            let in_a_row = state.run_down + state.run_failed.of_others();
            let failed = state.window_down + state.window_failed.of_others();
            let calls = state.window_calls - state.window_failed.most;
            in_a_row >= policy.consecutive_failures
                || (state.window_calls >= policy.min_requests
                    && failed > 0
                    && f64::from(failed) >= policy.failure_ratio * f64::from(calls))
        };
        if trips && state.circuit != CircuitState::Open {
            state.opened_at = Instant::now();
            state.probe_failed_by = None;
            self.set(&mut state, CircuitState::Open);
            tracing::warn!(upstream = %self.upstream, open_for = ?policy.open_for, "circuit opened");
        }
    }

    fn close(&self, state: &mut State) {
        state.window_started = Instant::now();
        state.window_calls = 0;
        state.window_down = 0;
        state.window_failed.clear();
        state.probe_failed_by = None;
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
        let who = request.identity.clone();
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
            let health = match &result {
                Ok(_) => Health::Answered,
                Err(e) => e.failure.health(),
            };
            if let Some(admission) = pending.admission.take() {
                breaker.record(admission, health, &who);
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
                // Timed out: whoever asked, the upstream did not answer in time.
                self.breaker
                    .record(admission, Health::Down, &Identity::Unknown);
            } else {
                self.breaker.release(admission);
            }
        }
    }
}

/// What a failure tells the upstream's circuit breaker.
impl Failure {
    fn health(&self) -> Health {
        match self {
            // A 4xx is an answer about the request, not about the upstream's health.
            Failure::Status(status) if *status < 500 => Health::Answered,
            Failure::Status(_) | Failure::Transport(_) | Failure::BadBody(_) => Health::Failed,
            Failure::Connect(_) | Failure::Timeout(_) => Health::Down,
            // A token endpoint's failure says nothing of the upstream (and never reaches it).
            Failure::Request(_) | Failure::CircuitOpen | Failure::Credential(_) => Health::Answered,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn breaker(consecutive_failures: u32, min_requests: u32) -> Breaker {
        let policy = BreakerPolicy {
            consecutive_failures,
            failure_ratio: 0.5,
            min_requests,
            window: Duration::from_secs(60),
            open_for: Duration::from_secs(60),
        };
        let gauge = IntGauge::new("circuit", "test").unwrap();
        Breaker::new("svc", Some(policy), gauge)
    }

    fn who(sub: &str) -> Identity {
        Identity::Subject(sub.into())
    }

    /// Records `calls` calls of `sub` ending so; whether the circuit is open after them.
    fn calls(breaker: &Breaker, sub: &str, health: Health, calls: u32) -> bool {
        for _ in 0..calls {
            let Ok(admission) = breaker.admit() else {
                return true;
            };
            breaker.record(admission, health, &who(sub));
        }
        breaker.admit().is_err()
    }

    #[test]
    fn one_identity_alone_never_opens_it_with_failed_answers() {
        let b = breaker(5, 20);
        assert!(!calls(&b, "mallory", Health::Failed, 1000));
        assert!(!calls(&b, "ada", Health::Answered, 10));
        assert!(!calls(&b, "mallory", Health::Failed, 1000));
        // Nor does one innocent failure among them.
        assert!(!calls(&b, "ada", Health::Failed, 1));
        assert!(!calls(&b, "ada", Health::Answered, 30));
        assert!(!calls(&b, "mallory", Health::Failed, 1000));
    }

    #[test]
    fn failed_answers_of_several_identities_open_it() {
        // In a row: five without the identity with the most.
        let b = breaker(5, 1000);
        assert!(!calls(&b, "a", Health::Failed, 5));
        assert!(!calls(&b, "b", Health::Failed, 4));
        assert!(calls(&b, "c", Health::Failed, 1));
        // In the window: half of the calls, once it holds 20, answered ones between them.
        let b = breaker(1000, 20);
        for _ in 0..3 {
            assert!(!calls(&b, "c", Health::Answered, 1));
            assert!(!calls(&b, "a", Health::Failed, 3));
            assert!(!calls(&b, "b", Health::Failed, 1));
        }
        assert!(!calls(&b, "c", Health::Answered, 1));
        assert!(!calls(&b, "a", Health::Failed, 3));
        // The 20th call: 16 failed, 12 of them a's; without a, 4 of 8.
        assert!(calls(&b, "b", Health::Failed, 1), "4 of 8 is half");
    }

    #[test]
    fn connect_errors_and_timeouts_open_it_whoever_has_them() {
        let b = breaker(5, 1000);
        assert!(!calls(&b, "a", Health::Down, 4));
        assert!(calls(&b, "a", Health::Down, 1));
        let b = breaker(1000, 10);
        assert!(!calls(&b, "a", Health::Answered, 5));
        assert!(!calls(&b, "a", Health::Down, 4));
        assert!(calls(&b, "a", Health::Down, 1));
    }

    #[test]
    fn a_failed_probe_reopens_only_when_a_second_identity_fails_it() {
        let policy = BreakerPolicy {
            consecutive_failures: 1,
            open_for: Duration::ZERO,
            ..BreakerPolicy::default()
        };
        let b = Breaker::new("svc", Some(policy), IntGauge::new("c", "t").unwrap());
        let admission = b.admit().expect("closed");
        b.record(admission, Health::Down, &Identity::Unknown);
        assert_eq!(b.lock().circuit, CircuitState::Open);
        let probe = |sub: &str, health| {
            let admission = b.admit().expect("a probe");
            assert!(admission.probe);
            b.record(admission, health, &who(sub));
            b.lock().circuit
        };
        assert_eq!(probe("mallory", Health::Failed), CircuitState::HalfOpen);
        assert_eq!(probe("mallory", Health::Failed), CircuitState::HalfOpen);
        assert_eq!(probe("ada", Health::Failed), CircuitState::Open);
        assert_eq!(probe("mallory", Health::Failed), CircuitState::HalfOpen);
        assert_eq!(probe("ada", Health::Answered), CircuitState::Closed);
    }
}
