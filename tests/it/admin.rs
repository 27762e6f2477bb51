//! The admin port through the real binary: the control endpoints (`/policy`, `DELETE /cache/…`)
//! need the bearer token from `--admin-token-file` (rotated in place without a restart), are off
//! without one unless the port is on loopback, while the probes and `/metrics` stay open; and
//! the port keeps answering while SIGTERM drains, until the process exits.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{http, write_policy, Bff, MockReply, MockServer, TempPolicy};

fn policy(upstream: &MockServer) -> TempPolicy {
    write_policy(&format!(
        r#"client: web
upstreams:
  orders: {{ url: "{}", timeout: 10s }}
routes:
  - name: order
    method: GET
    path: /orders/{{id}}
    proxy: {{ upstream: orders, path: "/orders/{{path.id}}", fields: [orderId] }}
"#,
        upstream.url()
    ))
}

/// A free port on every interface: an admin port others can reach, as in a pod.
fn everywhere() -> SocketAddr {
    let listener = TcpListener::bind("0.0.0.0:0").expect("bind a free port");
    listener.local_addr().expect("its address")
}

fn free_loopback() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address")
}

/// Writes the token the way Kubernetes updates a mounted Secret: a new file renamed over it.
fn write_token(path: &Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).expect("write token");
    std::fs::rename(&tmp, path).expect("rename token");
}

async fn status(bff: &Bff, method: &str, path: &str, token: Option<&str>) -> http::Reply {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| ("authorization", b))
        .into_iter()
        .collect();
    http::send(method, &bff.admin_url(path), &headers, "").await
}

async fn assert_probes_open(bff: &Bff) {
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = status(bff, "GET", path, None).await;
        assert_eq!(reply.status, 200, "GET {path}: {}", reply.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_file_control_endpoints_are_off_unless_on_loopback() {
    let upstream = MockServer::start(|_| MockReply::json(200, json!({"orderId": "1"})));
    let file = policy(&upstream);
    let bff = Bff::builder(file.path())
        .ports(free_loopback(), everywhere())
        .start()
        .await;
    assert_probes_open(&bff).await;
    for (method, path) in [
        ("GET", "/policy"),
        ("DELETE", "/cache/order"),
        ("GET", "/cache/order"),
    ] {
        let reply = status(&bff, method, path, None).await;
        assert_eq!(reply.status, 403, "{method} {path}: {}", reply.text());
        let reply = status(&bff, method, path, Some("anything")).await;
        assert_eq!(
            reply.status,
            403,
            "{method} {path} with a token: {}",
            reply.text()
        );
    }

    // On loopback, only the pod's own processes reach the port: open.
    let local = Bff::builder(file.path()).start().await;
    assert_eq!(status(&local, "GET", "/policy", None).await.status, 200);
    assert_eq!(
        status(&local, "DELETE", "/cache/order", None).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_endpoints_need_the_token_which_rotates_without_a_restart() {
    let upstream = MockServer::start(|_| MockReply::json(200, json!({"orderId": "1"})));
    let file = policy(&upstream);
    let token_file = file.dir().join("admin-token");
    write_token(&token_file, "first-token-0123456789\n");
    let bff = Bff::builder(file.path())
        .ports(free_loopback(), everywhere())
        .arg("--admin-token-file")
        .arg(&token_file)
        .start()
        .await;
    assert_probes_open(&bff).await;

    for (method, path) in [("GET", "/policy"), ("DELETE", "/cache/order")] {
        for token in [None, Some("wrong"), Some("first-token-012345678"), Some("")] {
            let reply = status(&bff, method, path, token).await;
            assert_eq!(
                reply.status,
                401,
                "{method} {path} with {token:?}: {}",
                reply.text()
            );
            assert_eq!(
                reply.header("www-authenticate"),
                Some("Bearer realm=\"bff-admin\"")
            );
        }
        let reply = status(&bff, method, path, Some("first-token-0123456789")).await;
        assert_eq!(reply.status, 200, "{method} {path}: {}", reply.text());
    }
    let lower = http::send(
        "GET",
        &bff.admin_url("/policy"),
        &[("authorization", "bearer first-token-0123456789")],
        "",
    )
    .await;
    assert_eq!(lower.status, 200, "the scheme is case-insensitive");
    let described = status(&bff, "GET", "/policy", Some("first-token-0123456789")).await;
    assert_eq!(described.json()["routes"][0]["name"], "order");
    // The method is checked once the caller is known.
    let reply = status(&bff, "GET", "/cache/order", Some("first-token-0123456789")).await;
    assert_eq!(reply.status, 405);

    // Rotated: the new token works at once, the old one no longer.
    write_token(&token_file, "second-token-abcdef");
    assert_eq!(
        status(&bff, "GET", "/policy", Some("second-token-abcdef"))
            .await
            .status,
        200
    );
    assert_eq!(
        status(&bff, "GET", "/policy", Some("first-token-0123456789"))
            .await
            .status,
        401
    );
    // Caught half-way (empty) or gone: the last good token stays.
    write_token(&token_file, "");
    assert_eq!(
        status(&bff, "GET", "/policy", Some("second-token-abcdef"))
            .await
            .status,
        200
    );
    assert_eq!(status(&bff, "GET", "/policy", None).await.status, 401);
    std::fs::remove_file(&token_file).expect("remove token");
    assert_eq!(
        status(&bff, "GET", "/policy", Some("second-token-abcdef"))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_or_empty_token_file_fails_startup() {
    let upstream = MockServer::start(|_| MockReply::json(200, json!({"orderId": "1"})));
    let file = policy(&upstream);
    let empty = file.dir().join("empty-token");
    std::fs::write(&empty, "\n").expect("write empty token");
    for (token_file, says) in [
        (
            file.dir().join("no-such-token"),
            "cannot read the admin token file",
        ),
        (empty, "is empty"),
    ] {
        let mut bff = Bff::builder(file.path())
            .arg("--admin-token-file")
            .arg(&token_file)
            .spawn();
        let exit = bff
            .wait_exit(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "bff still running with {}\n{}",
                    token_file.display(),
                    bff.logs()
                )
            });
        assert!(!exit.success());
        let logs = bff.logs();
        assert!(logs.contains(says), "{logs}");
        assert!(logs.contains(&token_file.display().to_string()), "{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_answers_until_the_drained_process_exits() {
    let upstream = MockServer::start(|_| {
        // Long enough that the request is surely still in flight while the port is checked.
        MockReply::json(200, json!({"orderId": "1"})).delay(Duration::from_secs(5))
    });
    let file = policy(&upstream);
    let mut bff = Bff::builder(file.path())
        .arg("--grace-period")
        .arg("30s")
        .start()
        .await;
    let url = bff.url("/orders/1");
    let in_flight = tokio::spawn(async move { http::try_send("GET", &url, &[], "").await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.requests().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the upstream never got the request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bff.signal("TERM");

    // Draining: not ready, still alive, still scraped, on fresh connections each time.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = http::try_send("GET", &bff.admin_url("/readyz"), &[], "")
            .await
            .unwrap_or_else(|e| panic!("/readyz during the drain: {e}\n{}", bff.logs()));
        if ready.status == 503 {
            break;
        }
        assert_eq!(ready.status, 200);
        assert!(
            Instant::now() < deadline,
            "/readyz still 200 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for path in ["/healthz", "/metrics"] {
        let reply = http::try_send("GET", &bff.admin_url(path), &[], "")
            .await
            .unwrap_or_else(|e| panic!("{path} during the drain: {e}\n{}", bff.logs()));
        assert_eq!(reply.status, 200, "{path} during the drain");
    }
    let metrics = http::get(&bff.admin_url("/metrics")).await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("bff_in_flight_requests 1")),
        "{metrics}"
    );
    let readyz = http::get(&bff.admin_url("/readyz")).await;
    assert_eq!(readyz.status, 503);

    let reply = tokio::time::timeout(Duration::from_secs(15), in_flight)
        .await
        .expect("the in-flight request completes")
        .expect("task")
        .unwrap_or_else(|e| panic!("in-flight request failed: {e}\n{}", bff.logs()));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let exit = bff.wait_exit(Duration::from_secs(10)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "exit {exit:?}\n{}",
        bff.logs()
    );
}
