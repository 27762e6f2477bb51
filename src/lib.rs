//! bff: a Backend-for-Frontend sidecar proxy on Pingora.
//!
//! One instance runs beside each frontend pod and owns everything between that client type and
//! the internal services. A request flows through these stages, each in its own module:
//!
//! ```text
//! client ─▶ edge         trace id                      pipeline::edge
//!        ─▶ route        method + path → Route          pipeline::route (404/405, or fall through)
//!        ─▶ proxy route  one upstream, body projected   pipeline::proxy_route, projection
//!        ─▶ respond      JSON or error envelope         pipeline::respond, envelope
//!        ─▶ observe      metrics + access log           pipeline::observe, metrics
//! ```
//!
//! `policy` is the contract the stages run on; `proxy` maps them onto Pingora's phases;
//! `upstream` reaches internal services; `server` and `admin` wire the process.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod demo;
pub mod envelope;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod projection;
pub mod proxy;
pub mod server;
pub mod upstream;
