//! bff: a Backend-for-Frontend sidecar proxy on Pingora.
//!
//! One instance runs beside each frontend pod and owns everything between that client type and
//! the internal services. A request flows through these stages, each in its own module:
//!
//! ```text
//! client ─▶ listener     connection cap, head bounds    listener (431, or close)
//!        ─▶ edge         trace id, loop refusal (508)   pipeline::edge
//!        ─▶ route        method + path → Route          pipeline::route (404/405, or fall through)
//!        ─▶ auth         JWT or API key; scopes (403)   pipeline::auth (401)
//!        ─▶ rate limit   sub, API key or address (429)  pipeline::rate_limit
//!        ─▶ inputs       path, query, claims checked    pipeline::inputs
//!        ─▶ fan-out      every fetch at once, projected pipeline::fanout, upstream, projection
//!        ─▶ assemble     {meta, sections}, degradation  pipeline::assemble
//!           (or proxy route: one upstream, projected    pipeline::proxy_route)
//!        ─▶ respond      JSON or error envelope         pipeline::respond, envelope
//!        ─▶ observe      metrics + access log           pipeline::observe, metrics
//! ```
//!
//! `policy` is the contract the stages run on; `proxy` maps them onto Pingora's phases;
//! `upstream` is one client stack per internal service; `server` and `admin` wire the process.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod policy;
pub mod caller;
pub mod listener;
pub mod proxy;
pub mod pipeline;
pub mod upstream;
pub mod cache;
pub mod projection;
pub mod envelope;
pub mod metrics;
pub mod admin;
pub mod server;
pub mod demo;
pub mod inject;
pub mod webhook;
