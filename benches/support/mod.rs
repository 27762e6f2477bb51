//! What the benches that run the real binary share: free ports, a child process that dies with
//! the bench, and latency percentiles.

// Each bench compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// `bff run` of this build on `policy`, listening on loopback; logs only `log_level` and above.
pub fn bff_run(policy: &Path, listen: u16, admin: u16, log_level: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bff"));
    command
        .args(["run", "--policy"])
        .arg(policy)
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        // The footprint scenario holds 1,000 connections to measure what each costs; the
        // default cap (512) is sized for the manifests' memory limit, not for this.
        .args(["--max-connections", "2048"])
        .env("BFF_LOG", log_level)
        .stdout(Stdio::null());
    command
}

/// A child process killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Median and 99th percentile of `samples`.
pub fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
