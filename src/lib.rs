//! bff: a Backend-for-Frontend sidecar proxy on Pingora.
//!
//! One instance runs beside each frontend pod and owns everything between that client type and
//! the internal services. The crate is built in layers, listed here from the top down; each
//! imports only from the lines below it, never from one above, and no files import each other
//! in a circle:
//!
//! ```text
//! commands   main, demo, inject, webhook, cache::audit (`bff cache audit`)
//! process    server (wiring, signals, reload), admin (admin port), listener (client sockets)
//! adapter    proxy       Pingora's ProxyHttp: one delegation per phase, nothing else
//! stages     pipeline    the stages below, and what a request carries through them:
//!                        RequestCtx, Shared (state of every request), Active (a policy put to
//!                        work: its clients, verifier, API keys, rate limiters)
//! services   cache       answers of `fetch` routes: L1, L2 (Redis), keys, entries, sections
//!            upstream    one client stack per internal service: credential, breaker, retry, TLS
//! request    caller      who a request is, as `upstream` sees it: claims, identity, trace header
//! contract   envelope    the error body every client sees
//!            policy      the loaded, compiled policy, with what it holds: route table, API key
//!                        set, TLS files, secrets
//!            metrics     the Prometheus families
//!            projection  field masks
//! ```
//!
//! `cache` and `upstream` know nothing of requests or of Pingora. A request flows through these
//! stages, each in its own module:
//!
//! ```text
//! client ─▶ listener     connection cap, head bounds    listener (431, or close)
//!        ─▶ edge         trace id, loop refusal (508),  pipeline::edge, pipeline::path
//!                        path normalised (400)
//!        ─▶ route        method + path → Route          policy::route_table (404/405, or fall through)
//!        ─▶ auth         JWT or API key; scopes (403)   pipeline::auth (401)
//!        ─▶ rate limit   sub, API key or address (429)  pipeline::rate_limit
//!        ─▶ inputs       path, query, claims checked    pipeline::inputs
//!        ─▶ cache        versioned key, L1 → L2, XFetch pipeline::cache, cache
//!        ─▶ fan-out      every fetch at once, projected pipeline::fanout, upstream, projection
//!        ─▶ assemble     {meta, sections}, degradation  pipeline::assemble
//!           (or proxy route: one upstream, projected    pipeline::proxy_route)
//!        ─▶ respond      JSON or error envelope         pipeline::respond, envelope
//!        ─▶ observe      metrics + access log           pipeline::observe, metrics
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod projection;
pub mod metrics;
pub mod policy;
pub mod envelope;
pub mod caller;
pub mod upstream;
pub mod cache;
pub mod pipeline;
pub mod proxy;
pub mod listener;
pub mod admin;
pub mod server;
pub mod demo;
pub mod inject;
pub mod webhook;
