//! The Kubernetes deliverables checked from `cargo test`: `deploy/k8s/check.sh` (kustomize
//! renders, schema validation, `promtool check rules`, dashboard and alert metric names) passes,
//! and the real binary's `/metrics` passes `promtool check metrics`.

use std::{
    io::Write,
    path::Path,
    process::{Command, Output, Stdio},
};

use serde_json::json;

use crate::support::metrics::{metrics_text, parse_metrics};
use crate::support::{http, write_policy, Bff, MockReply, MockServer};

const PROMTOOL_MISSING: &str =
    "promtool is not installed: run `make test-deps` (or `sudo apt-get install prometheus`)";

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn deploy_k8s_renders_validates_and_matches_the_metrics() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s/check.sh");
    let output = Command::new(&script)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", script.display()));
    assert!(
        output.status.success(),
        "{} failed ({}); a missing tool is installed by `make test-deps`:\n{}",
        script.display(),
        output.status,
        output_text(&output)
    );
    // the script prints one line per rendered kustomization it checked
    let text = output_text(&output);
    for dir in ["base", "overlays/classic-sidecar"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("ok   {dir} "))),
            "{dir} not checked:\n{text}"
        );
    }
}

/// Every kind of family has samples (counters, gauges, histograms, labelled and not), so the
/// lint sees real output rather than bare HELP/TYPE lines.
#[tokio::test]
async fn metrics_pass_promtool_check_metrics() {
    let promtool_found = Command::new("promtool")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(promtool_found, "{PROMTOOL_MISSING}");

    let svc = MockServer::start(|req| match req.path() {
        "/me" => MockReply::json(200, json!({"name": "Ada", "secret": 1})),
        _ => MockReply::json(404, json!({})),
    });
    let refused = MockServer::refused_port();
    let file = write_policy(&format!(
        r#"client: web
upstreams:
  svc: {{ url: "{url}", timeout: 2s }}
  down: {{ url: "http://127.0.0.1:{refused}", timeout: 200ms }}
routes:
  - name: home
    method: GET
    path: /home
    cache: {{ scope: shared, ttl: 10m }}
    fetch:
      me: {{ upstream: svc, path: /me, critical: true, fields: [name] }}
      tips: {{ upstream: down, path: /tips, fields: [t], fallback: [] }}
  - name: broken
    method: GET
    path: /broken
    fetch:
      me: {{ upstream: down, path: /me, critical: true, fields: [name] }}
"#,
        url = svc.url()
    ));
    let bff = Bff::start(file.path()).await;

    let home = http::get(&bff.url("/home")).await;
    assert_eq!(home.status, 200, "{}", home.text());
    assert_eq!(home.header("x-bff-degraded"), Some("tips"));
    let cached = http::get(&bff.url("/home")).await;
    assert_eq!(cached.status, 200, "{}", cached.text());
    let broken = http::get(&bff.url("/broken")).await;
    assert_eq!(broken.status, 503, "{}", broken.text());
    let unmatched = http::get(&bff.url("/nowhere")).await;
    assert_eq!(unmatched.status, 404, "{}", unmatched.text());

    let text = metrics_text(&bff).await;
    let samples = parse_metrics(&text);
    for family in [
        "bff_requests_total",
        "bff_request_duration_seconds_bucket",
        "bff_dependency_requests_total",
        "bff_dependency_duration_seconds_bucket",
        "bff_degraded_responses_total",
        "bff_cache_lookups_total",
        "bff_circuit_state",
        "bff_in_flight_requests",
    ] {
        assert!(
            samples.iter().any(|s| s.name == family),
            "no {family} sample in /metrics:\n{text}"
        );
    }

    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("{PROMTOOL_MISSING} ({err})"));
    child
        .stdin
        .take()
        .expect("promtool's stdin is piped")
        .write_all(text.as_bytes())
        .expect("write /metrics to promtool");
    let output = child.wait_with_output().expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool check metrics ({}):\n{}\n--- /metrics ---\n{text}",
        output.status,
        output_text(&output)
    );
}
