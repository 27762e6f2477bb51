//! Every Prometheus metric family the sidecar exports, registered in one place.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub policy_reloads_total: IntCounterVec,
    pub in_flight_requests: IntGauge,
}

/// Why a reload attempt ended as it did: the `result` label of `bff_policy_reloads_total`.
#[derive(Debug, Clone, Copy)]
pub enum ReloadResult {
    Ok,
    Invalid,
}

impl ReloadResult {
    fn label(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Invalid => "invalid",
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "bff_requests_total",
                "Client requests answered, by route and status.",
            ),
            &["client", "route", "status"],
        )
        .expect("static metric definition");
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "bff_request_duration_seconds",
                "Time from request to the last byte of the response.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["client", "route"],
        )
        .expect("static metric definition");
        let policy_reloads_total = IntCounterVec::new(
            Opts::new(
                "bff_policy_reloads_total",
                "Policy reload attempts; an invalid policy is refused and the old one kept.",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let in_flight_requests = IntGauge::new(
            "bff_in_flight_requests",
            "Client requests being served now.",
        )
        .expect("static metric definition");
        for collector in [
            Box::new(requests_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration_seconds.clone()),
            Box::new(policy_reloads_total.clone()),
            Box::new(in_flight_requests.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Metrics {
            registry,
            requests_total,
            request_duration_seconds,
            policy_reloads_total,
            in_flight_requests,
        }
    }

    pub fn reloaded(&self, result: ReloadResult) {
        self.policy_reloads_total
            .with_label_values(&[result.label()])
            .inc();
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on a malformed family, which `new` cannot build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
