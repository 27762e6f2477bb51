//! `bff demo`: built-in mock services on loopback and the sidecar in front of them.

use std::path::Path;
use std::process::ExitCode;

pub fn run(_policy: &Path, _listen: &str, _admin: &str) -> ExitCode {
    eprintln!("demo: not built yet");
    ExitCode::FAILURE
}
