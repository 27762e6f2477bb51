//! Integration tests for `bff`: one test binary (`cargo test --test it`) so Pingora links once.

mod harness_selftest;
mod passthrough;
mod proxy_route;
mod support;
