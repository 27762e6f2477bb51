//! Which failed calls are tried again: idempotent ones that never reached the upstream or got
//! a 502/503/504, a bounded number of times, and only while the upstream's retry budget allows,
//! so retries can never multiply the load on an upstream that is already failing.

use std::future::{self, Ready};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use prometheus::IntCounter;
use tower::retry::budget::{Budget, TpsBudget};

use super::call::{Answer, CallError, Failure, Outbound};
use crate::policy::RetryPolicy;

/// Shared by every call to one upstream.
pub struct RetryBudget {
    budget: TpsBudget,
    attempts: u32,
    retries_total: IntCounter,
}

impl RetryBudget {
    pub fn new(policy: &RetryPolicy, retries_total: IntCounter) -> RetryBudget {
        RetryBudget {
            // Deposits count for 10 s: the budget follows the recent call rate.
            budget: TpsBudget::new(
                Duration::from_secs(10),
                policy.min_per_second,
                policy.budget,
            ),
            attempts: policy.attempts,
            retries_total,
        }
    }
}

/// The per-call state tower's `Retry` clones for each request.
#[derive(Clone)]
pub struct Retries {
    shared: Arc<RetryBudget>,
    left: u32,
    deposited: bool,
}

impl Retries {
    pub fn new(shared: Arc<RetryBudget>) -> Retries {
        let left = shared.attempts;
        Retries {
            shared,
            left,
            deposited: false,
        }
    }
}

impl tower::retry::Policy<Outbound, Answer, CallError> for Retries {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        request: &mut Outbound,
        result: &mut Result<Answer, CallError>,
    ) -> Option<Ready<()>> {
        let Err(error) = result else { return None };
        let retryable = match error.failure {
            Failure::Connect(_) => true,
            Failure::Status(status) => matches!(status, 502..=504),
            _ => false,
        };
        if !retryable || !is_idempotent(&request.method) || self.left == 0 {
            return None;
        }
        if !self.shared.budget.withdraw() {
            return None;
        }
        self.left -= 1;
        self.shared.retries_total.inc();
        Some(future::ready(()))
    }

    fn clone_request(&mut self, request: &Outbound) -> Option<Outbound> {
        // Every call earns the budget once, however many attempts it makes.
        if !self.deposited {
            self.deposited = true;
            self.shared.budget.deposit();
        }
        is_idempotent(&request.method).then(|| request.clone())
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}
