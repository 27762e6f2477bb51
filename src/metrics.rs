//! Every Prometheus metric family the sidecar exports, registered in one place.

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Request and dependency latencies: sub-millisecond to a stuck upstream's timeout.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    /// `{client,route,dependency,outcome}`: one per call of a fetch or proxy route, retries
    /// included; `dependency` is the fetch's name (the upstream's for `proxy` routes).
    pub dependency_requests_total: IntCounterVec,
    pub dependency_duration_seconds: HistogramVec,
    /// Retries made, by upstream: what the retry budget lets through.
    pub dependency_retries_total: IntCounterVec,
    /// `{client,route,dependency}`: responses served with this fetch's fallback.
    pub degraded_responses_total: IntCounterVec,
    /// 0 closed, 1 half-open, 2 open.
    pub circuit_state: IntGaugeVec,
    pub upstream_bytes_total: IntCounterVec,
    pub response_bytes_total: IntCounterVec,
    pub loops_refused_total: IntCounterVec,
    /// `{client,reason}`: requests refused for their token (see `pipeline::auth`).
    pub auth_failures_total: IntCounterVec,
    /// `{client,route}`: requests refused by a rate limit (see `pipeline::rate_limit`).
    pub rate_limited_total: IntCounterVec,
    /// `{client,route,layer,result}`: cache lookups; `result` is hit, miss, stale or early.
    pub cache_lookups_total: IntCounterVec,
    /// `{client,route,trigger}`: recomputes of a cached route (miss, early, stale).
    pub cache_recomputes_total: IntCounterVec,
    /// `{client,route}`: requests that waited for a recompute another request started.
    pub cache_coalesced_total: IntCounterVec,
    /// `{client,route}`: degraded answers not stored because the key holds a complete entry.
    pub cache_degraded_discarded_total: IntCounterVec,
    /// `{client,op}`: Redis calls that failed or timed out (the cache went on without them).
    pub cache_l2_errors_total: IntCounterVec,
    pub cache_l2_duration_seconds: HistogramVec,
    pub policy_reloads_total: IntCounterVec,
    /// `{client,upstream,key,reason}`: re-reads of an upstream's secret or TLS file that failed
    /// (`unreadable`, `too_large`, `hanging`, `invalid`); the last good value stayed in use.
    pub secret_file_failures_total: IntCounterVec,
    pub in_flight_requests: IntGauge,
    /// Client connections open now (see `listener`).
    pub client_connections_open: IntGauge,
    /// `{reason}`: client connections the listener closed without serving a request.
    pub client_connections_refused_total: IntCounterVec,
}

/// Why the listener closed a client connection: the `reason` label.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    /// Over `--max-connections`.
    OverCap,
    /// A request head over `--max-header-bytes` (answered 431).
    HeadTooLarge,
    /// A request head not complete within `--header-timeout`.
    HeadTimeout,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::OverCap => "over_cap",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::HeadTimeout => "head_timeout",
        }
    }
}

/// How one call to a dependency ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error,
    Timeout,
    CircuitOpen,
    BadBody,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::BadBody => "bad_body",
        }
    }
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
        fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
            registry
                .register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("static metric definition");
            register(&registry, c)
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .expect("static metric definition");
            register(&registry, h)
        };
        let route = ["client", "route"];
        let dependency = ["client", "route", "dependency"];
        Metrics {
            requests_total: counter(
                "bff_requests_total",
                "Client requests answered, by route and status.",
                &["client", "route", "status"],
            ),
            request_duration_seconds: histogram(
                "bff_request_duration_seconds",
                "Time from request to the last byte of the response.",
                &route,
            ),
            dependency_requests_total: counter(
                "bff_dependency_requests_total",
                "Calls to dependencies, by outcome (ok, error, timeout, circuit_open, bad_body).",
                &["client", "route", "dependency", "outcome"],
            ),
            dependency_duration_seconds: histogram(
                "bff_dependency_duration_seconds",
                "Time one call to a dependency took, retries included.",
                &dependency,
            ),
            dependency_retries_total: counter(
                "bff_dependency_retries_total",
                "Retries of idempotent calls, as the retry budget allowed them.",
                &["client", "upstream"],
            ),
            degraded_responses_total: counter(
                "bff_degraded_responses_total",
                "Responses served with an optional dependency's fallback.",
                &dependency,
            ),
            circuit_state: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "bff_circuit_state",
                        "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open.",
                    ),
                    &["client", "upstream"],
                )
                .expect("static metric definition"),
            ),
            upstream_bytes_total: counter(
                "bff_upstream_bytes_total",
                "Body bytes received from dependencies (decompressed).",
                &route,
            ),
            response_bytes_total: counter(
                "bff_response_bytes_total",
                "Body bytes of the responses sent to clients.",
                &route,
            ),
            loops_refused_total: counter(
                "bff_loops_refused_total",
                "Requests refused because they already carried X-BFF-Client.",
                &["client"],
            ),
            auth_failures_total: counter(
                "bff_auth_failures_total",
                "Requests refused for their token, by reason.",
                &["client", "reason"],
            ),
            rate_limited_total: counter(
                "bff_rate_limited_total",
                "Requests refused with 429 because their client identity was over a rate limit.",
                &route,
            ),
            cache_lookups_total: counter(
                "bff_cache_lookups_total",
                "Cache lookups by layer (l1, l2) and result (hit, miss, stale, early).",
                &["client", "route", "layer", "result"],
            ),
            cache_recomputes_total: counter(
                "bff_cache_recomputes_total",
                "Recomputes of cached routes, by trigger (miss, early, stale).",
                &["client", "route", "trigger"],
            ),
            cache_coalesced_total: counter(
                "bff_cache_coalesced_total",
                "Requests that shared a recompute another request had started.",
                &route,
            ),
            cache_degraded_discarded_total: counter(
                "bff_cache_degraded_discarded_total",
                "Degraded answers not stored because the key holds a complete entry (a failed refresh).",
                &route,
            ),
            cache_l2_errors_total: counter(
                "bff_cache_l2_errors_total",
                "Redis calls that failed or timed out, by operation; the cache went on without them.",
                &["client", "op"],
            ),
            cache_l2_duration_seconds: histogram(
                "bff_cache_l2_duration_seconds",
                "Time one Redis call took, by operation.",
                &["client", "op"],
            ),
            policy_reloads_total: counter(
                "bff_policy_reloads_total",
                "Policy reload attempts; an invalid policy is refused and the old one kept.",
                &["result"],
            ),
            secret_file_failures_total: counter(
                "bff_secret_file_failures_total",
                "Failed re-reads of upstream secret and TLS files, by reason; the last good value stayed in use.",
                &["client", "upstream", "key", "reason"],
            ),
            in_flight_requests: register(
                &registry,
                IntGauge::new(
                    "bff_in_flight_requests",
                    "Client requests being served now.",
                )
                .expect("static metric definition"),
            ),
            client_connections_open: register(
                &registry,
                IntGauge::new(
                    "bff_client_connections_open",
                    "Client connections open now.",
                )
                .expect("static metric definition"),
            ),
            client_connections_refused_total: counter(
                "bff_client_connections_refused_total",
                "Client connections closed without a request served, by reason (over_cap, head_too_large, head_timeout).",
                &["reason"],
            ),
            registry,
        }
    }

    pub fn refused(&self, refusal: Refusal) {
        self.client_connections_refused_total
            .with_label_values(&[refusal.label()])
            .inc();
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
