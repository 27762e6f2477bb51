//! Integration tests for `bff`: one test binary (`cargo test --test it`) so Pingora links once.

mod admin;
mod auth_methods;
mod breaker;
mod cache;
mod cache_audit;
mod cache_l2;
mod check;
mod claims;
mod credentials;
mod fanout;
mod harness_selftest;
mod hostile;
mod inject;
mod jwt;
mod k8s;
mod limits;
mod lifecycle;
mod passthrough;
mod paths;
mod proxy_route;
mod rate_limit;
mod redis_harness;
mod schema;
mod support;
mod tls;
mod webhook;
