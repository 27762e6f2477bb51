//! Circuit breakers against the real binary, with real tokens telling clients apart: one
//! identity whose requests make the upstream fail cannot open the circuit for everyone; failed
//! answers from several identities, over the breaker's volume, do; connect errors and timeouts
//! open it whoever has them.

use std::time::Duration;

use serde_json::json;

use crate::support::metrics::metric;
use crate::support::{http, tokens, write_policy, Bff, MockReply, MockServer, TempPolicy};

const SECRET: &str = "breaker-test-secret-of-32-bytes-or-more";

/// The upstream of the reports: `/b/boom` answers 500 (its input breaks it), anything else 200.
fn boom_upstream() -> MockServer {
    MockServer::start(|req| {
        if req.path() == "/b/boom" {
            MockReply::json(500, json!({"error": "boom"}))
        } else {
            MockReply::json(200, json!({"name": "fine"}))
        }
    })
}

/// A policy whose route `GET /b/{id}` proxies `/b/{id}` of upstream `svc` at `url`, behind a
/// breaker that opens after 5 failures in a row or half of 10 calls, and stays open 10 minutes.
async fn start(url: &str, timeout: &str) -> (Bff, TempPolicy) {
    let file = write_policy(&format!(
        r#"client: web
auth:
  jwt:
    issuer: https://id.example.com/
    audience: web-app
    algorithms: [HS256]
    hs256_secret: "{SECRET}"
upstreams:
  svc:
    url: "{url}"
    timeout: {timeout}
    circuit_breaker: {{ consecutive_failures: 5, failure_ratio: 0.5, min_requests: 10, window: 10m, open_for: 10m }}
routes:
  - name: b
    method: GET
    path: /b/{{id}}
    auth: optional
    proxy: {{ upstream: svc, path: "/b/{{path.id}}", fields: [name] }}
"#
    ));
    (Bff::start(file.path()).await, file)
}

async fn get_as(bff: &Bff, sub: Option<&str>, path: &str) -> http::Reply {
    let bearer = sub.map(|sub| {
        let claims = tokens::claims("web-app", 600, json!({ "sub": sub }));
        format!("Bearer {}", tokens::hs256(&claims, SECRET))
    });
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    http::send("GET", &bff.url(path), &headers, "").await
}

async fn circuit(bff: &Bff) -> f64 {
    let labels = [("client", "web"), ("upstream", "svc")];
    metric(bff, "bff_circuit_state", &labels).await
}

#[track_caller]
fn assert_circuit_open(reply: &http::Reply) {
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "DEPENDENCY_UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_whose_requests_fail_cannot_open_the_circuit_for_others() {
    let svc = boom_upstream();
    let (bff, _file) = start(&svc.url(), "2s").await;

    // Far past every threshold, in a row and as a ratio: each request still reaches the
    // upstream, and gets its own failure.
    for i in 0..40 {
        let reply = get_as(&bff, Some("mallory"), "/b/boom").await;
        assert_eq!(reply.status, 502, "request {i}: {}", reply.text());
    }
    assert_eq!(
        svc.requests().len(),
        40,
        "the circuit refused mallory's calls"
    );
    assert_eq!(circuit(&bff).await, 0.0);

    // Everyone else is served, while mallory keeps failing between them.
    for i in 0..10 {
        let reply = get_as(&bff, Some("ada"), "/b/1").await;
        assert_eq!(reply.status, 200, "ada {i}: {}", reply.text());
        assert_eq!(get_as(&bff, Some("mallory"), "/b/boom").await.status, 502);
    }
    assert_eq!(get_as(&bff, None, "/b/2").await.status, 200);
    assert_eq!(circuit(&bff).await, 0.0);

    // An anonymous client is its address: hammering alone, it opens nothing either.
    let (bff, _file) = start(&svc.url(), "2s").await;
    for _ in 0..40 {
        assert_eq!(get_as(&bff, None, "/b/boom").await.status, 502);
    }
    assert_eq!(get_as(&bff, Some("bob"), "/b/3").await.status, 200);
    assert_eq!(circuit(&bff).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_of_several_identities_over_the_volume_open_the_circuit() {
    let svc = boom_upstream();
    let (bff, _file) = start(&svc.url(), "2s").await;

    // Four users fail, three calls each, with some answered calls between them: well over
    // half of the calls are failures however the one with the most is set aside.
    for sub in ["u1", "u2", "u3"] {
        assert_eq!(get_as(&bff, Some(sub), "/b/1").await.status, 200);
    }
    let mut opened = false;
    'calls: for _ in 0..3 {
        for sub in ["u1", "u2", "u3", "u4"] {
            let reply = get_as(&bff, Some(sub), "/b/boom").await;
            if reply.json()["error"]["code"] == "DEPENDENCY_UNAVAILABLE" {
                opened = true;
                break 'calls;
            }
            assert_eq!(reply.status, 502, "{}", reply.text());
        }
    }
    assert!(opened, "12 failures of 4 users did not open the circuit");
    assert_eq!(circuit(&bff).await, 2.0);

    // Open: everyone is refused at once, without a call.
    let calls = svc.requests().len();
    assert_circuit_open(&get_as(&bff, Some("ada"), "/b/1").await);
    assert_circuit_open(&get_as(&bff, None, "/b/1").await);
    assert_eq!(
        svc.requests().len(),
        calls,
        "an open circuit called the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_open_the_circuit_whoever_has_them() {
    let port = MockServer::refused_port();
    let (bff, _file) = start(&format!("http://127.0.0.1:{port}"), "2s").await;
    for i in 0..5 {
        let reply = get_as(&bff, Some("mallory"), "/b/1").await;
        assert_eq!(reply.status, 503, "call {i}: {}", reply.text());
    }
    assert_eq!(circuit(&bff).await, 2.0);
    // The next caller is refused by the circuit, not by a failed connection.
    assert_circuit_open(&get_as(&bff, Some("ada"), "/b/1").await);
    let labels = [
        ("client", "web"),
        ("route", "b"),
        ("dependency", "svc"),
        ("outcome", "circuit_open"),
    ];
    assert_eq!(
        metric(&bff, "bff_dependency_requests_total", &labels).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_open_the_circuit_whoever_has_them() {
    let svc = MockServer::start(|_| {
        MockReply::json(200, json!({"name": "late"})).delay(Duration::from_secs(3600))
    });
    let (bff, _file) = start(&svc.url(), "200ms").await;
    for i in 0..5 {
        let reply = get_as(&bff, Some("mallory"), "/b/1").await;
        assert_eq!(reply.status, 504, "call {i}: {}", reply.text());
    }
    assert_eq!(circuit(&bff).await, 2.0);
    assert_circuit_open(&get_as(&bff, Some("ada"), "/b/1").await);
    assert_eq!(
        svc.requests().len(),
        5,
        "an open circuit called the upstream"
    );
}
