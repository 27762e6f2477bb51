//! Integration tests for `bff`: one test binary (`cargo test --test it`) so Pingora links once.

mod check;
mod claims;
mod fanout;
mod harness_selftest;
mod hostile;
mod jwt;
mod lifecycle;
mod passthrough;
mod proxy_route;
mod support;
