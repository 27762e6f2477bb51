//! Hostile input from clients and upstreams: the sidecar answers or refuses, and keeps serving.

use serde_json::json;

use crate::support::{http, raw, write_policy, Bff, MockReply, MockServer, TempPolicy};

async fn start(upstream: &MockServer) -> (Bff, TempPolicy) {
    let file = write_policy(&format!(
        r#"client: mobile
upstreams:
  orders: {{ url: "{}", timeout: 2s }}
routes:
  - name: order-detail
    method: GET
    path: /orders/{{id}}
    proxy: {{ upstream: orders, path: "/orders/{{path.id}}", fields: [orderId, "items[].title"] }}
"#,
        upstream.url()
    ));
    (Bff::start(file.path()).await, file)
}

async fn still_serving(bff: &Bff) {
    let reply = http::get(&bff.url("/orders/ok")).await;
    assert_eq!(
        reply.status,
        200,
        "sidecar stopped serving: {}",
        reply.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_are_refused() {
    let upstream = MockServer::start(|_| MockReply::json(200, json!({"orderId": "ok"})));
    let (bff, _file) = start(&upstream).await;

    let huge_header = format!(
        "GET /orders/ok HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2 << 20)
    );
    let many_headers = format!(
        "GET /orders/ok HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..5000)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let requests = [
        b"NOT HTTP AT ALL\r\n\r\n".to_vec(),
        b"GET /orders/ok HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /orders/ok HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(),
        b"GET /orders/ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nzz\r\n".to_vec(),
        huge_header.into_bytes(),
        many_headers.into_bytes(),
    ];
    for request in &requests {
        let answer = raw::exchange(bff.addr(), request).await;
        let text = String::from_utf8_lossy(&answer);
        // Refused with a 4xx, or the connection closed: never a 2xx, never a crash.
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.0 4"),
            "{}",
            &text[..text.len().min(200)]
        );
        still_serving(&bff).await;
    }
    // Only the well-formed follow-up requests reached the internal service.
    assert_eq!(upstream.requests().len(), requests.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_upstream_bodies_become_502() {
    let upstream = MockServer::start(|req| match req.path() {
        "/orders/deep" => MockReply::bytes(200, "application/json", "[".repeat(100_000)),
        "/orders/scalar" => MockReply::json(200, json!("just a string")),
        "/orders/nul" => {
            MockReply::bytes(200, "application/json", &b"{\"orderId\":\"\x00\xff\"}"[..])
        }
        "/orders/ctype" => MockReply::bytes(200, "application/json-not-really", "{}"),
        _ => MockReply::json(
            200,
            json!({"orderId": "ok", "items": [{"title": "t", "cost": 1}]}),
        ),
    });
    let (bff, _file) = start(&upstream).await;
    for id in ["deep", "scalar", "nul", "ctype"] {
        let reply = http::get(&bff.url(&format!("/orders/{id}"))).await;
        assert_eq!(reply.status, 502, "{id}: {}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "BAD_UPSTREAM_RESPONSE");
    }
    let reply = http::get(&bff.url("/orders/ok")).await;
    assert_eq!(
        reply.json(),
        json!({"orderId": "ok", "items": [{"title": "t"}]})
    );
}
