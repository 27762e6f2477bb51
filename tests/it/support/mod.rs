//! Shared integration-test support: mock upstream, the real `bff` child process, policy files, clients.

#[allow(dead_code)]
pub mod bff;
#[allow(dead_code)]
pub mod http;
#[allow(dead_code)]
pub mod metrics;
#[allow(dead_code)]
pub mod mock;
#[allow(dead_code)]
pub mod policy;
#[allow(dead_code)]
pub mod raw;
#[allow(dead_code)]
pub mod redis;
#[allow(dead_code)]
pub mod tls;
#[allow(dead_code)]
pub mod tokens;

#[allow(unused_imports)]
pub use self::{
    bff::Bff,
    mock::{MockReply, MockServer, RecordedRequest},
    policy::{write_policy, write_policy_configmap, TempPolicy},
};
