//! `proxy` routes and routing envelopes against the real binary: path rewriting with encoded
//! values, projection, credentials, and every way an upstream can fail.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{http, write_policy, Bff, MockReply, MockServer, RecordedRequest};

fn policy(orders: &str, app: Option<&str>) -> String {
    let fallthrough = app.map_or(String::new(), |_| "fallthrough: app\n".to_string());
    let app = app.map_or(String::new(), |url| {
        format!("  app: {{ url: \"{url}\" }}\n")
    });
    format!(
        r#"client: mobile
upstreams:
  orders:
    url: "{orders}/api"
    timeout: 2s
    credential: {{ header: Authorization, value: "Bearer machine-token" }}
{app}routes:
  - name: order-detail
    method: GET
    path: /mobile/v1/orders/{{id}}
    headers: {{ Cache-Control: "private, max-age=10" }}
    proxy:
      upstream: orders
      path: "/orders/{{path.id}}?view={{query.view}}"
      fields: [orderId, status, "items[].title", "customer.name", "seller.name as sellerName"]
  - name: order-cancel
    method: POST
    path: /mobile/v1/orders/{{id}}/cancel
    proxy: {{ upstream: orders, path: "/orders/{{path.id}}/cancel", fields: [orderId, status] }}
{fallthrough}"#
    )
}

fn order(req: &RecordedRequest) -> MockReply {
    let id = req.path().rsplit('/').next().unwrap_or("").to_string();
    MockReply::json(
        200,
        json!({
            "orderId": id, "status": "shipped", "internalNotes": "fragile",
            "items": [{"title": "Lamp", "sku": "L-1", "costPrice": 3}, {"title": "Desk", "costPrice": 40}],
            "customer": {"name": "Ada", "email": "ada@example.com"},
            "seller": {"name": "ACME", "taxId": "T-1"}
        }),
    )
}

async fn start(orders: &MockServer, app: Option<&MockServer>) -> (Bff, crate::support::TempPolicy) {
    let file = write_policy(&policy(&orders.url(), app.map(|a| a.url()).as_deref()));
    (Bff::start(file.path()).await, file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_the_upstream_body_through_the_whitelist() {
    let orders = MockServer::start(|req| order(&req));
    let (bff, _file) = start(&orders, None).await;

    let reply = http::send(
        "GET",
        &bff.url("/mobile/v1/orders/o-1?view=full"),
        &[
            ("authorization", "Bearer client-jwt"),
            ("cookie", "session=1"),
            ("x-user-id", "admin"),
        ],
        "",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"orderId": "o-1", "status": "shipped", "items": [{"title": "Lamp"}, {"title": "Desk"}],
               "customer": {"name": "Ada"}, "sellerName": "ACME"})
    );
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("cache-control"), Some("private, max-age=10"));
    let trace = reply.header("x-trace-id").expect("trace id").to_string();

    let seen = orders.requests();
    assert_eq!(seen.len(), 1);
    let up = &seen[0];
    assert_eq!(up.uri, "/api/orders/o-1?view=full");
    // The machine credential replaces the client's; client credentials and identity headers stay out.
    assert_eq!(up.header("authorization"), Some("Bearer machine-token"));
    assert_eq!(up.header("cookie"), None);
    assert_eq!(up.header("x-user-id"), None);
    assert_eq!(up.header("x-bff-client"), Some("mobile"));
    assert_eq!(up.header("x-trace-id"), Some(trace.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_path_values_stay_one_segment() {
    let orders = MockServer::start(|req| order(&req));
    let (bff, _file) = start(&orders, None).await;

    for (client_path, upstream_uri) in [
        (
            "/mobile/v1/orders/..%2Fadmin?view=a%26role%3Dadmin",
            "/api/orders/..%2Fadmin?view=a%26role%3Dadmin",
        ),
        (
            "/mobile/v1/orders/x%3Frole%3Dadmin?view=",
            "/api/orders/x%3Frole%3Dadmin?view=",
        ),
        (
            "/mobile/v1/orders/%C3%A9?view=1",
            "/api/orders/%C3%A9?view=1",
        ),
    ] {
        let reply = http::get(&bff.url(client_path)).await;
        assert_eq!(reply.status, 200, "{client_path}: {}", reply.text());
        let last = orders
            .requests()
            .pop()
            .expect("request reached the upstream");
        assert_eq!(last.uri, upstream_uri, "{client_path}");
    }
    let before = orders.requests().len();
    // `%2E%2E` is a `..` segment (RFC 3986), resolved before routing: the path is
    // `/mobile/v1/`, not this route's, and never becomes a parameter an upstream would climb with.
    let reply = http::get(&bff.url("/mobile/v1/orders/%2E%2E?view=1")).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "NOT_FOUND");
    // A missing query value the template needs is a bad request, not an upstream call.
    let reply = http::get(&bff.url("/mobile/v1/orders/o-1")).await;
    assert_eq!(reply.status, 400);
    assert_eq!(orders.requests().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_the_request_body_and_bounds_it() {
    let orders = MockServer::start(|req| {
        MockReply::json(
            200,
            json!({"orderId": "o-2", "status": "cancelled", "echo": req.json()}),
        )
    });
    let (bff, _file) = start(&orders, None).await;
    let reply = http::send(
        "POST",
        &bff.url("/mobile/v1/orders/o-2/cancel"),
        &[("content-type", "application/json")],
        r#"{"reason":"late"}"#,
    )
    .await;
    assert_eq!(
        reply.json(),
        json!({"orderId": "o-2", "status": "cancelled"})
    );
    let up = orders.requests().pop().expect("request");
    assert_eq!(up.method, "POST");
    assert_eq!(up.json(), json!({"reason": "late"}));

    let big = vec![b'x'; (1 << 20) + 1];
    let reply = http::send("POST", &bff.url("/mobile/v1/orders/o-2/cancel"), &[], big).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["error"]["code"], "PAYLOAD_TOO_LARGE");
    assert_eq!(orders.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompresses_gzip_upstream_bodies() {
    use std::io::Write;
    let body = serde_json::to_vec(&json!({"orderId": "z", "status": "ok", "secret": 1})).unwrap();
    let mut gz = flate2_encoder();
    gz.write_all(&body).unwrap();
    let compressed = gz.finish().unwrap();
    let orders = MockServer::start(move |_| {
        MockReply::bytes(200, "application/json", compressed.clone())
            .header("content-encoding", "gzip")
    });
    let (bff, _file) = start(&orders, None).await;
    let reply = http::get(&bff.url("/mobile/v1/orders/z?view=1")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-encoding"), None);
    assert_eq!(reply.json(), json!({"orderId": "z", "status": "ok"}));
}

/// A gzip encoder from the std-only `flate2` that Pingora already links.
fn flate2_encoder() -> flate2::write::GzEncoder<Vec<u8>> {
    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default())
}

async fn envelope(url: &str) -> (u16, Value, http::Reply) {
    let reply = http::get(url).await;
    let json = reply.json();
    (reply.status, json, reply)
}

fn assert_envelope(
    status: u16,
    body: &Value,
    reply: &http::Reply,
    want_status: u16,
    want_code: &str,
) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    let trace = reply.header("x-trace-id").expect("x-trace-id");
    assert_eq!(body["error"]["traceId"], trace);
    assert!(body["error"]["message"].is_string());
    assert!(body["error"]["retryable"].is_boolean());
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only `error`: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_become_envelopes_without_leaking() {
    let orders = MockServer::start(|req| match req.path() {
        "/api/orders/html500" => {
            MockReply::bytes(500, "text/html", "<h1>stack trace at db-7.internal</h1>")
        }
        "/api/orders/missing" => {
            MockReply::json(404, json!({"detail": "no row in orders-db.internal"}))
        }
        "/api/orders/denied" => MockReply::json(403, json!({"detail": "svc acl"})),
        "/api/orders/broken" => {
            MockReply::bytes(200, "application/json", r#"{"orderId": "db-7.internal"#)
        }
        "/api/orders/html200" => MockReply::bytes(200, "text/html", "<html>db-7.internal</html>"),
        "/api/orders/huge" => {
            let big = format!(r#"{{"orderId":"x","pad":"{}"}}"#, "a".repeat(5 << 20));
            MockReply::bytes(200, "application/json", big)
        }
        "/api/orders/hugechunks" => MockReply::chunked(
            200,
            "application/json",
            std::iter::once("[".to_string())
                .chain(
                    (0..500)
                        .map(|i| format!(r#"{{"orderId":"{i}","pad":"{}"}},"#, "b".repeat(10_000))),
                )
                .chain(std::iter::once(r#"{"orderId":"end"}]"#.to_string())),
            Duration::ZERO,
        ),
        // Far beyond the 2 s timeout; the timeout itself leaves room for the 4 MiB reads above
        // on a loaded machine, which must fail as too large, not as too slow.
        "/api/orders/slow" => order(&req).delay(Duration::from_secs(6)),
        "/api/orders/redirect" => MockReply::empty(302).header("location", "http://db-7.internal/"),
        _ => order(&req),
    });
    let (bff, _file) = start(&orders, None).await;
    let url = |id: &str| bff.url(&format!("/mobile/v1/orders/{id}?view=1"));

    for (id, status, code) in [
        ("html500", 502, "BAD_UPSTREAM_RESPONSE"),
        ("missing", 404, "NOT_FOUND"),
        ("denied", 403, "FORBIDDEN"),
        ("broken", 502, "BAD_UPSTREAM_RESPONSE"),
        ("html200", 502, "BAD_UPSTREAM_RESPONSE"),
        ("huge", 502, "BAD_UPSTREAM_RESPONSE"),
        ("hugechunks", 502, "BAD_UPSTREAM_RESPONSE"),
        ("slow", 504, "DEADLINE_EXCEEDED"),
        ("redirect", 502, "BAD_UPSTREAM_RESPONSE"),
    ] {
        let (got, body, reply) = envelope(&url(id)).await;
        assert_envelope(got, &body, &reply, status, code);
        let text = reply.text();
        assert!(
            !text.contains("internal"),
            "{id} leaked upstream text: {text}"
        );
        assert_eq!(reply.header("location"), None);
    }
    // A good request after all of that still works (the pool dropped the broken connections).
    assert_eq!(http::get(&url("fine")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_dependency_unavailable() {
    let port = MockServer::refused_port();
    let file = write_policy(&policy(&format!("http://127.0.0.1:{port}"), None));
    let bff = Bff::start(file.path()).await;
    let (status, body, reply) = envelope(&bff.url("/mobile/v1/orders/1?view=1")).await;
    assert_envelope(status, &body, &reply, 503, "DEPENDENCY_UNAVAILABLE");
    assert_eq!(body["error"]["retryable"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_envelopes_and_trace_ids() {
    let orders = MockServer::start(|req| order(&req));
    let (bff, _file) = start(&orders, None).await;

    let (status, body, reply) = envelope(&bff.url("/nowhere")).await;
    assert_envelope(status, &body, &reply, 404, "NOT_FOUND");

    let reply = http::send("DELETE", &bff.url("/mobile/v1/orders/1"), &[], "").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    assert_eq!(reply.json()["error"]["code"], "METHOD_NOT_ALLOWED");

    let reply = http::send(
        "GET",
        &bff.url("/nowhere"),
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
        "",
    )
    .await;
    assert_eq!(
        reply.header("x-trace-id"),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(
        reply.json()["error"]["traceId"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );

    let reply = http::send("GET", &bff.url("/nowhere"), &[("x-trace-id", "req-77")], "").await;
    assert_eq!(reply.header("x-trace-id"), Some("req-77"));
    let reply = http::send(
        "GET",
        &bff.url("/nowhere"),
        &[("x-trace-id", "<script>")],
        "",
    )
    .await;
    let generated = reply.header("x-trace-id").expect("generated");
    assert_eq!(generated.len(), 32);

    // Proxy answers carry a trace id too, and it reached the upstream.
    let reply = http::get(&bff.url("/mobile/v1/orders/1?view=1")).await;
    let trace = reply.header("x-trace-id").expect("trace").to_string();
    assert_eq!(
        orders
            .requests()
            .pop()
            .and_then(|r| r.header("x-trace-id").map(str::to_string)),
        Some(trace)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_fall_through_to_the_app_when_configured() {
    let orders = MockServer::start(|req| order(&req));
    let app = MockServer::start(|req| MockReply::text(200, &format!("app saw {}", req.uri)));
    let (bff, _file) = start(&orders, Some(&app)).await;
    let reply = http::get(&bff.url("/some/page?x=1")).await;
    assert_eq!(
        (reply.status, reply.text()),
        (200, "app saw /some/page?x=1".to_string())
    );
    // Routes owned by the sidecar are not given to the app, even with the wrong method.
    assert_eq!(
        http::send("DELETE", &bff.url("/mobile/v1/orders/1"), &[], "")
            .await
            .status,
        405
    );
    assert_eq!(app.requests().len(), 1);
}
