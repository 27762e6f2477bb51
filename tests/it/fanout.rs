//! Aggregated `fetch` routes against the real binary: concurrent fan-out, dependent fetches,
//! projection, degradation of optional fetches, critical failures, deadlines, circuit breaker,
//! retry budget, loop refusal and the dependency metrics.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::{json, Value};

use crate::support::metrics::{metric, metric_eventually, metrics_text};
use crate::support::{http, write_policy, Bff, MockReply, MockServer, RecordedRequest, TempPolicy};

const CLIENT_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const CLIENT_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

async fn start(yaml: &str) -> (Bff, TempPolicy) {
    let file = write_policy(yaml);
    (Bff::start(file.path()).await, file)
}

/// `bff_dependency_requests_total` of one fetch and outcome.
async fn dependency_calls(bff: &Bff, route: &str, dependency: &str, outcome: &str) -> f64 {
    metric(
        bff,
        "bff_dependency_requests_total",
        &[
            ("client", "web"),
            ("route", route),
            ("dependency", dependency),
            ("outcome", outcome),
        ],
    )
    .await
}

async fn degraded_count(bff: &Bff, route: &str, dependency: &str) -> f64 {
    metric(
        bff,
        "bff_degraded_responses_total",
        &[
            ("client", "web"),
            ("route", route),
            ("dependency", dependency),
        ],
    )
    .await
}

// ----- response checks -----

/// A whole 200 answer: `meta` first and not degraded, then exactly `sections` in this order.
fn assert_whole(reply: &http::Reply, sections: &[&str]) -> Value {
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    let keys: Vec<&str> = body
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    let want: Vec<&str> = std::iter::once("meta")
        .chain(sections.iter().copied())
        .collect();
    assert_eq!(keys, want, "{body}");
    let meta = &body["meta"];
    assert_eq!(meta["degraded"], false, "{body}");
    assert_eq!(meta["degradedSections"], json!([]), "{body}");
    assert_eq!(meta["cache"], "off", "{body}");
    assert_eq!(
        meta["traceId"].as_str(),
        reply.header("x-trace-id"),
        "{body}"
    );
    assert!(meta["latencyMs"].is_u64(), "{body}");
    assert!(meta["generatedAt"].is_string(), "{body}");
    assert_eq!(reply.header("x-bff-degraded"), None);
    body
}

/// A 200 answer with `degraded` (in fetch order) served from their fallbacks.
fn assert_degraded(reply: &http::Reply, degraded: &[&str], what: &str) -> Value {
    assert_eq!(reply.status, 200, "{what}: {}", reply.text());
    let body = reply.json();
    let meta = &body["meta"];
    assert_eq!(meta["degraded"], true, "{what}: {body}");
    assert_eq!(meta["degradedSections"], json!(degraded), "{what}: {body}");
    assert_eq!(
        meta["traceId"].as_str(),
        reply.header("x-trace-id"),
        "{what}: {body}"
    );
    assert_eq!(
        reply.header("x-bff-degraded"),
        Some(degraded.join(", ").as_str()),
        "{what}"
    );
    let cache_control: Vec<_> = reply.headers.get_all("cache-control").iter().collect();
    assert_eq!(cache_control, ["no-store"], "{what}");
    body
}

/// An error envelope, and nothing else in the body.
fn assert_envelope(reply: &http::Reply, status: u16, code: &str, what: &str) -> Value {
    let body = reply.json();
    assert_eq!(reply.status, status, "{what}: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert_eq!(
        body["error"]["traceId"].as_str(),
        Some(reply.header("x-trace-id").expect("x-trace-id")),
        "{what}: {body}"
    );
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
    assert!(body["error"]["retryable"].is_boolean(), "{what}: {body}");
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "{what}: only `error`: {body}"
    );
    assert_eq!(reply.header("x-bff-degraded"), None, "{what}");
    body
}

fn paths(mock: &MockServer) -> Vec<String> {
    mock.requests().into_iter().map(|r| r.uri).collect()
}

// ----- 1. projection, assembly, headers -----

fn profile_body() -> Value {
    json!({
        "userId": "u1",
        "displayName": "Ada",
        "passwordHash": "SECRET-1",
        "__proto__": {"isAdmin": "SECRET-2"},
        "profile": {"city": "Oslo", "ssn": "SECRET-3", "geo": {"lat": "SECRET-4"}},
        "badges": [
            {"name": "gold", "grantedBy": "SECRET-5"},
            {"name": "early", "audit": {"by": "SECRET-6"}},
            "SECRET-7"
        ],
        "seller": {"name": "ACME", "taxId": "SECRET-8"},
        // Listed, but an object: listing `loyaltyTier` must not leak what is inside it.
        "loyaltyTier": {"level": "SECRET-9", "__proto__": {"x": "SECRET-10"}},
        "padding": "SECRET-".repeat(200)
    })
}

fn orders_body() -> Value {
    json!({
        "orders": [
            {"orderId": "o1", "status": "shipped", "costPrice": "SECRET-11", "meta": {"x": "SECRET-12"}},
            {"orderId": "o2", "status": {"code": "SECRET-13"}, "__proto__": {"y": "SECRET-14"}}
        ],
        "total": "SECRET-15",
        "__proto__": {"orders": "SECRET-16"}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sections_are_projected_assembled_and_upstreams_get_the_right_headers() {
    let users = MockServer::start(|req| match req.path() {
        "/api/users/u1" => MockReply::json(200, profile_body()),
        _ => MockReply::empty(404),
    });
    let orders = MockServer::start(|req| match req.path() {
        "/users/u1/orders" => MockReply::json(200, orders_body()),
        _ => MockReply::empty(404),
    });
    let (bff, _file) = start(&format!(
        r#"client: web
upstreams:
  users:
    url: "{users}/api"
    timeout: 2s
    credential: {{ header: Authorization, value: "Bearer machine-token" }}
    headers: {{ X-Api-Version: "2" }}
  orders: {{ url: "{orders}", timeout: 2s }}
routes:
  - name: home
    method: GET
    path: /web/v1/home/{{id}}
    headers: {{ Cache-Control: "private, max-age=30", X-Frame-Options: DENY }}
    fetch:
      user:
        upstream: users
        path: /users/{{path.id}}
        critical: true
        fields: [userId, displayName, profile.city, "badges[].name", "seller.name as sellerName", loyaltyTier]
      recentOrders:
        upstream: orders
        path: /users/{{path.id}}/orders?limit=3
        select: orders
        fields: [orderId, status]
        fallback: []
"#,
        users = users.url(),
        orders = orders.url(),
    ))
    .await;

    let reply = http::send(
        "GET",
        &bff.url("/web/v1/home/u1"),
        &[
            ("traceparent", CLIENT_TRACEPARENT),
            ("authorization", "Bearer client-jwt"),
            ("cookie", "session=client-cookie"),
        ],
        "",
    )
    .await;
    let first_len = reply.body.len();
    let body = assert_whole(&reply, &["user", "recentOrders"]);
    assert_eq!(
        body["user"],
        json!({"userId": "u1", "displayName": "Ada", "profile": {"city": "Oslo"},
               "badges": [{"name": "gold"}, {"name": "early"}], "sellerName": "ACME"})
    );
    assert_eq!(
        body["recentOrders"],
        json!([{"orderId": "o1", "status": "shipped"}, {"orderId": "o2"}])
    );
    let text = reply.text();
    for leak in [
        "SECRET",
        "__proto__",
        "passwordHash",
        "total",
        "loyaltyTier",
    ] {
        assert!(!text.contains(leak), "`{leak}` leaked: {text}");
    }
    assert_eq!(body["meta"]["traceId"], CLIENT_TRACE_ID);
    assert_eq!(reply.header("x-trace-id"), Some(CLIENT_TRACE_ID));
    assert_eq!(reply.header("cache-control"), Some("private, max-age=30"));
    assert_eq!(reply.header("x-frame-options"), Some("DENY"));

    // What the upstreams saw.
    let seen = users.requests();
    assert_eq!(seen.len(), 1);
    let up = &seen[0];
    assert_eq!(up.method, "GET");
    assert_eq!(up.uri, "/api/users/u1");
    assert_eq!(up.header("x-bff-client"), Some("web"));
    assert_eq!(up.header("x-trace-id"), Some(CLIENT_TRACE_ID));
    assert_eq!(up.header("traceparent"), Some(CLIENT_TRACEPARENT));
    assert_eq!(up.header("authorization"), Some("Bearer machine-token"));
    assert_eq!(up.header("x-api-version"), Some("2"));
    assert_eq!(up.header("cookie"), None);
    let seen = orders.requests();
    assert_eq!(seen.len(), 1);
    let up = &seen[0];
    assert_eq!(up.uri, "/users/u1/orders?limit=3");
    assert_eq!(up.header("x-bff-client"), Some("web"));
    assert_eq!(up.header("x-trace-id"), Some(CLIENT_TRACE_ID));
    assert_eq!(up.header("traceparent"), Some(CLIENT_TRACEPARENT));
    // Neither the client's credentials nor another upstream's options.
    assert_eq!(up.header("authorization"), None);
    assert_eq!(up.header("cookie"), None);
    assert_eq!(up.header("x-api-version"), None);

    // Without a client traceparent, upstreams still get one carrying the request's trace id.
    let reply = http::send(
        "GET",
        &bff.url("/web/v1/home/u1"),
        &[("x-trace-id", "req-42")],
        "",
    )
    .await;
    assert_whole(&reply, &["user", "recentOrders"]);
    assert_eq!(reply.header("x-trace-id"), Some("req-42"));
    let up = users.requests().pop().expect("second call");
    assert_eq!(up.header("x-trace-id"), Some("req-42"));

    // Metrics: one ok call per fetch and request, timed; bytes in and out.
    for dependency in ["user", "recentOrders"] {
        assert_eq!(dependency_calls(&bff, "home", dependency, "ok").await, 2.0);
        assert_eq!(
            metric(
                &bff,
                "bff_dependency_duration_seconds_count",
                &[
                    ("client", "web"),
                    ("route", "home"),
                    ("dependency", dependency)
                ],
            )
            .await,
            2.0
        );
        assert_eq!(degraded_count(&bff, "home", dependency).await, 0.0);
    }
    let upstream_bytes = 2
        * (serde_json::to_vec(&profile_body()).unwrap().len()
            + serde_json::to_vec(&orders_body()).unwrap().len());
    assert_eq!(
        metric(
            &bff,
            "bff_upstream_bytes_total",
            &[("client", "web"), ("route", "home")]
        )
        .await,
        upstream_bytes as f64
    );
    let sent = (first_len + reply.body.len()) as f64;
    let got = metric_eventually(
        &bff,
        "bff_response_bytes_total",
        &[("client", "web"), ("route", "home")],
        sent,
    )
    .await;
    assert_eq!(
        got, sent,
        "bff_response_bytes_total{{client=web,route=home}}"
    );
    assert!(got < upstream_bytes as f64, "projection saved nothing?");
}

// ----- 2. concurrency -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_run_concurrently() {
    let svc = MockServer::start(|req| {
        let name = req.path().trim_start_matches('/').to_string();
        MockReply::json(200, json!({"name": name, "hidden": 1})).hold_until_in_flight(3)
    });
    // Each reply waits until all three calls are in flight: made one after another, the
    // first would wait for ever, time out after 2 s and fail the route.
    let (bff, _file) = start(&format!(
        r#"client: web
upstreams:
  svc: {{ url: "{url}", timeout: 2s }}
routes:
  - name: trio
    method: GET
    path: /trio
    fetch:
      a: {{ upstream: svc, path: /a, critical: true, fields: [name] }}
      b: {{ upstream: svc, path: /b, critical: true, fields: [name] }}
      c: {{ upstream: svc, path: /c, fields: [name], fallback: {{}} }}
"#,
        url = svc.url()
    ))
    .await;
    let reply = http::get(&bff.url("/trio")).await;
    let body = assert_whole(&reply, &["a", "b", "c"]);
    assert_eq!(body["a"], json!({"name": "a"}));
    assert_eq!(body["b"], json!({"name": "b"}));
    assert_eq!(body["c"], json!({"name": "c"}));
    assert_eq!(svc.max_in_flight(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_concurrency_limit_caps_calls_in_flight() {
    let svc = MockServer::start(|req| {
        let name = req.path().trim_start_matches('/').to_string();
        MockReply::json(200, json!({"name": name})).hold_until_in_flight(2)
    });
    let (bff, _file) = start(&format!(
        r#"client: web
upstreams:
  svc: {{ url: "{url}", timeout: 3s, concurrency: 2 }}
routes:
  - name: quad
    method: GET
    path: /quad
    fetch:
      a: {{ upstream: svc, path: /a, critical: true, fields: [name] }}
      b: {{ upstream: svc, path: /b, critical: true, fields: [name] }}
      c: {{ upstream: svc, path: /c, critical: true, fields: [name] }}
      d: {{ upstream: svc, path: /d, critical: true, fields: [name] }}
"#,
        url = svc.url()
    ))
    .await;
    let reply = http::get(&bff.url("/quad")).await;
    let body = assert_whole(&reply, &["a", "b", "c", "d"]);
    assert_eq!(body["d"], json!({"name": "d"}));
    assert_eq!(svc.requests().len(), 4);
    assert_eq!(
        svc.max_in_flight(),
        2,
        "concurrency: 2 let more calls through"
    );
}

// ----- 3, 4. every way a fetch can fail -----

/// What the misbehaving mock does for `/k/<kind>`.
fn misbehave(req: &RecordedRequest) -> MockReply {
    let kind = req.path().rsplit('/').next().unwrap_or("");
    let fine = json!({"id": 7, "title": "fine", "secret": "x"});
    match kind {
        // Through a circuit that opens on one failure: one client's 500 would not open it.
        "trip" => MockReply::json(200, fine).delay(Duration::from_secs(3600)),
        "status500" => MockReply::bytes(
            500,
            "text/html",
            "<h1>NullPointerException at db-7.internal</h1>",
        ),
        "notfound" => MockReply::json(404, json!({"detail": "no row in db-7.internal"})),
        "slow" => MockReply::json(200, fine).delay(Duration::from_secs(1)),
        "hang" => MockReply::json(200, fine).delay(Duration::from_secs(3600)),
        "badjson" => MockReply::bytes(
            200,
            "application/json",
            r#"{"id": 7, "title": "db-7.internal"#,
        ),
        "emptybody" => MockReply::bytes(200, "application/json", ""),
        "huge" => MockReply::bytes(
            200,
            "application/json",
            format!(r#"{{"id":7,"pad":"{}"}}"#, "a".repeat(5 << 20)),
        ),
        "hugechunked" => MockReply::chunked(
            200,
            "application/json",
            std::iter::once(r#"{"id":7,"pad":""#.to_string())
                .chain((0..50).map(|_| "b".repeat(100_000)))
                .chain(std::iter::once(r#""}"#.to_string())),
            Duration::ZERO,
        ),
        "html" => MockReply::bytes(200, "text/html", "<html>db-7.internal</html>"),
        _ => MockReply::json(200, fine),
    }
}

/// `(kind, upstream, outcome label)`: `dead` refuses connections, `trip` opens its circuit on
/// the first failure (a timeout), `flaky` answers as `misbehave` says.
const KINDS: [(&str, &str, &str); 11] = [
    ("refused", "dead", "error"),
    ("status500", "flaky", "error"),
    ("slow", "flaky", "timeout"),
    ("hang", "flaky", "timeout"),
    ("badjson", "flaky", "bad_body"),
    ("emptybody", "flaky", "bad_body"),
    ("huge", "flaky", "bad_body"),
    ("hugechunked", "flaky", "bad_body"),
    ("html", "flaky", "bad_body"),
    ("trip", "trip", "circuit_open"),
    ("notfound", "flaky", "error"),
];

fn failing_upstreams(flaky: &MockServer) -> String {
    format!(
        r#"upstreams:
  good: {{ url: "{flaky}", timeout: 2s }}
  flaky: {{ url: "{flaky}", timeout: 300ms, circuit_breaker: {{ enabled: false }} }}
  dead: {{ url: "http://127.0.0.1:{dead}", timeout: 300ms, circuit_breaker: {{ enabled: false }} }}
  trip:
    url: "{flaky}"
    timeout: 300ms
    circuit_breaker: {{ enabled: true, consecutive_failures: 1, open_for: 10m }}
"#,
        flaky = flaky.url(),
        dead = MockServer::refused_port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_optional_fetch_degrades_to_its_fallback() {
    let flaky = MockServer::start(|req| misbehave(&req));
    let mut yaml = format!("client: web\n{}routes:\n", failing_upstreams(&flaky));
    for (kind, upstream, _) in KINDS {
        yaml += &format!(
            r#"  - name: opt-{kind}
    method: GET
    path: /opt/{kind}
    headers: {{ Cache-Control: "private, max-age=30", X-Frame-Options: DENY }}
    fetch:
      user: {{ upstream: good, path: /k/fine, critical: true, fields: [id, title] }}
      extras: {{ upstream: {upstream}, path: /k/{kind}, fields: [id, title], fallback: {{ id: null, title: unavailable }} }}
"#
        );
    }
    let (bff, _file) = start(&yaml).await;

    for (kind, _, outcome) in KINDS {
        let route = format!("opt-{kind}");
        let url = bff.url(&format!("/opt/{kind}"));
        // The circuit opens on the first failure; the second call is refused without a call.
        let requests = if kind == "trip" { 2 } else { 1 };
        for _ in 0..requests {
            let reply = http::get(&url).await;
            let body = assert_degraded(&reply, &["extras"], kind);
            assert_eq!(body["user"], json!({"id": 7, "title": "fine"}), "{kind}");
            assert_eq!(
                body["extras"],
                json!({"id": null, "title": "unavailable"}),
                "{kind}"
            );
            assert_eq!(reply.header("x-frame-options"), Some("DENY"), "{kind}");
            assert!(
                !reply.text().contains("internal"),
                "{kind}: {}",
                reply.text()
            );
        }
        assert_eq!(
            dependency_calls(&bff, &route, "extras", outcome).await,
            1.0,
            "{kind}: bff_dependency_requests_total{{outcome={outcome}}}\n{}",
            metrics_text(&bff).await
        );
        assert_eq!(
            degraded_count(&bff, &route, "extras").await,
            requests as f64,
            "{kind}"
        );
        assert_eq!(
            dependency_calls(&bff, &route, "user", "ok").await,
            requests as f64
        );
    }
    assert_eq!(
        dependency_calls(&bff, "opt-trip", "extras", "timeout").await,
        1.0
    );
    let trips = paths(&flaky).iter().filter(|p| *p == "/k/trip").count();
    assert_eq!(trips, 1, "an open circuit still called the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_critical_fetch_answers_on_critical_failure() {
    let flaky = MockServer::start(|req| misbehave(&req));
    let mut yaml = format!("client: web\n{}routes:\n", failing_upstreams(&flaky));
    for (kind, upstream, _) in KINDS {
        yaml += &format!(
            r#"  - name: crit-{kind}
    method: GET
    path: /crit/{kind}
    headers: {{ Cache-Control: "private, max-age=30" }}
    on_critical_failure: {{ status: 502, code: PROFILE_UNAVAILABLE, message: "Could not load your profile.", retryable: true }}
    fetch:
      extras: {{ upstream: good, path: /k/fine, fields: [id], fallback: [] }}
      user: {{ upstream: {upstream}, path: /k/{kind}, critical: true, fields: [id, title] }}
"#
        );
    }
    yaml += r#"  - name: crit-default
    method: GET
    path: /crit-default
    fetch:
      user: { upstream: flaky, path: /k/status500, critical: true, fields: [id] }
"#;
    let (bff, _file) = start(&yaml).await;

    for (kind, _, outcome) in KINDS {
        let route = format!("crit-{kind}");
        let url = bff.url(&format!("/crit/{kind}"));
        let requests = if kind == "trip" { 2 } else { 1 };
        for _ in 0..requests {
            let reply = http::get(&url).await;
            if kind == "notfound" {
                // A missing resource is the client's answer, not an outage.
                assert_envelope(&reply, 404, "NOT_FOUND", kind);
            } else {
                let body = assert_envelope(&reply, 502, "PROFILE_UNAVAILABLE", kind);
                assert_eq!(body["error"]["message"], "Could not load your profile.");
                assert_eq!(body["error"]["retryable"], true);
            }
            assert!(
                !reply.text().contains("internal"),
                "{kind}: {}",
                reply.text()
            );
            assert_ne!(
                reply.header("cache-control"),
                Some("private, max-age=30"),
                "{kind}: an error must not carry the route's caching"
            );
        }
        assert_eq!(
            dependency_calls(&bff, &route, "user", outcome).await,
            1.0,
            "{kind}: bff_dependency_requests_total{{outcome={outcome}}}\n{}",
            metrics_text(&bff).await
        );
        assert_eq!(degraded_count(&bff, &route, "user").await, 0.0, "{kind}");
    }
    let trips = paths(&flaky).iter().filter(|p| *p == "/k/trip").count();
    assert_eq!(trips, 1, "an open circuit still called the upstream");

    let reply = http::get(&bff.url("/crit-default")).await;
    assert_envelope(&reply, 503, "DEPENDENCY_UNAVAILABLE", "default");
}

// ----- 5. a critical failure does not wait for the others -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_failure_answers_without_waiting_for_a_hanging_sibling() {
    let svc = MockServer::start(|req| match req.path() {
        // Fails only once the optional call is under way too.
        "/profile" => MockReply::json(500, json!({})).hold_until_in_flight(2),
        _ => MockReply::json(200, json!({"id": 1})).delay(Duration::from_secs(3600)),
    });
    // The hanging fetch's timeout is longer than the test client's (10 s): had bff waited for
    // it, the request would fail.
    let (bff, _file) = start(&format!(
        r#"client: web
upstreams:
  profile: {{ url: "{url}", timeout: 5s }}
  tips: {{ url: "{url}", timeout: 60s }}
routes:
  - name: page
    method: GET
    path: /page
    fetch:
      user: {{ upstream: profile, path: /profile, critical: true, fields: [id] }}
      tips: {{ upstream: tips, path: /tips, fields: [id], fallback: [] }}
"#,
        url = svc.url()
    ))
    .await;
    let reply = http::get(&bff.url("/page")).await;
    assert_envelope(&reply, 503, "DEPENDENCY_UNAVAILABLE", "page");
    let mut seen = paths(&svc);
    seen.sort();
    assert_eq!(seen, ["/profile", "/tips"]);
    assert_eq!(dependency_calls(&bff, "page", "user", "error").await, 1.0);
}

// ----- 6. the route's deadline -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_deadline_fails_critical_and_degrades_optional_fetches() {
    let svc = MockServer::start(|req| match req.path() {
        "/hang" => MockReply::json(200, json!({"id": 1})).delay(Duration::from_secs(3600)),
        _ => MockReply::json(200, json!({"id": 2})),
    });
    let (bff, _file) = start(&format!(
        r#"client: web
upstreams:
  svc: {{ url: "{url}", timeout: 5s, circuit_breaker: {{ enabled: false }} }}
routes:
  - name: late-critical
    method: GET
    path: /late-critical
    deadline: 300ms
    on_critical_failure: {{ status: 502, code: PROFILE_UNAVAILABLE, message: "No profile." }}
    fetch:
      user: {{ upstream: svc, path: /hang, critical: true, fields: [id] }}
      tips: {{ upstream: svc, path: /fine, fields: [id], fallback: [] }}
  - name: late-optional
    method: GET
    path: /late-optional
    deadline: 300ms
    headers: {{ Cache-Control: "private, max-age=30" }}
    fetch:
      user: {{ upstream: svc, path: /fine, critical: true, fields: [id] }}
      tips: {{ upstream: svc, path: /hang, fields: [id], fallback: [] }}
"#,
        url = svc.url()
    ))
    .await;

    let reply = http::get(&bff.url("/late-critical")).await;
    assert_envelope(&reply, 504, "DEADLINE_EXCEEDED", "critical at the deadline");

    let reply = http::get(&bff.url("/late-optional")).await;
    let body = assert_degraded(&reply, &["tips"], "optional at the deadline");
    assert_eq!(body["user"], json!({"id": 2}));
    assert_eq!(body["tips"], json!([]));
    assert_eq!(
        dependency_calls(&bff, "late-optional", "tips", "timeout").await,
        1.0
    );
    assert_eq!(degraded_count(&bff, "late-optional", "tips").await, 1.0);
}

// ----- 7. dependent fetches -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependent_fetches_get_their_parents_value_encoded() {
    let users = MockServer::start(|req| {
        let id = req.path().rsplit('/').next().unwrap_or("").to_string();
        let tier = match id.as_str() {
            "u1" => json!("gold"),
            "evil" => json!("../admin?x=1"),
            "num" => json!(3),
            _ => Value::Null,
        };
        let mut data = json!({"userId": id, "ssn": "SECRET"});
        if !tier.is_null() {
            data["loyaltyTier"] = tier;
        }
        match req.path() {
            p if p.starts_with("/prefs/") => MockReply::json(500, json!({})),
            _ => MockReply::json(200, json!({"data": data, "loyaltyTier": "not-this-one"})),
        }
    });
    let tiers = MockServer::start(|req| {
        let segment = req.path().rsplit('/').next().unwrap_or("").to_string();
        MockReply::json(
            200,
            json!({"tier": segment, "discount": 10, "internal": "SECRET"}),
        )
    });
    let (bff, _file) = start(&format!(
        r#"client: web
upstreams:
  users: {{ url: "{users}", timeout: 2s }}
  tiers: {{ url: "{tiers}", timeout: 2s }}
routes:
  - name: dep
    method: GET
    path: /dep/{{id}}
    fetch:
      user:
        upstream: users
        path: /users/{{path.id}}
        critical: true
        select: data
        fields: [userId]
      perk:
        upstream: tiers
        path: /tiers/{{fetch.user.loyaltyTier}}
        fields: [tier, discount]
        fallback: {{}}
  - name: chain
    method: GET
    path: /chain
    fetch:
      user: {{ upstream: users, path: /users/u1, critical: true, select: data, fields: [userId] }}
      prefs: {{ upstream: users, path: /prefs/u1, fields: [theme], fallback: {{ theme: default }} }}
      theme: {{ upstream: tiers, path: "/themes/{{fetch.prefs.theme}}", fields: [tier], fallback: {{}} }}
"#,
        users = users.url(),
        tiers = tiers.url()
    ))
    .await;

    // The value comes from the parent's answer after `select`, before projection: the
    // parent's section does not list `loyaltyTier`, and never shows it.
    let reply = http::get(&bff.url("/dep/u1")).await;
    let body = assert_whole(&reply, &["user", "perk"]);
    assert_eq!(body["user"], json!({"userId": "u1"}));
    assert_eq!(body["perk"], json!({"tier": "gold", "discount": 10}));
    assert_eq!(paths(&tiers), ["/tiers/gold"]);
    assert!(!reply.text().contains("SECRET"));
    let up = tiers.requests().pop().expect("tiers call");
    assert_eq!(up.header("x-bff-client"), Some("web"));
    assert_eq!(up.header("x-trace-id"), reply.header("x-trace-id"));

    // A hostile value stays one path segment.
    let reply = http::get(&bff.url("/dep/evil")).await;
    let body = assert_whole(&reply, &["user", "perk"]);
    assert_eq!(
        tiers.requests().pop().expect("tiers call").uri,
        "/tiers/..%2Fadmin%3Fx%3D1"
    );
    assert_eq!(body["perk"]["tier"], "..%2Fadmin%3Fx%3D1");

    // Numbers are values too.
    let reply = http::get(&bff.url("/dep/num")).await;
    assert_whole(&reply, &["user", "perk"]);
    assert_eq!(tiers.requests().pop().expect("tiers call").uri, "/tiers/3");

    // A parent answer without the value: the child cannot be called and is degraded.
    let before = tiers.requests().len();
    let reply = http::get(&bff.url("/dep/none")).await;
    let body = assert_degraded(&reply, &["perk"], "parent without the value");
    assert_eq!(body["perk"], json!({}));
    assert_eq!(tiers.requests().len(), before);

    // A failed optional parent degrades its child, which is never called.
    let reply = http::get(&bff.url("/chain")).await;
    let body = assert_degraded(&reply, &["prefs", "theme"], "failed parent");
    assert_eq!(body["user"], json!({"userId": "u1"}));
    assert_eq!(body["prefs"], json!({"theme": "default"}));
    assert_eq!(body["theme"], json!({}));
    assert_eq!(tiers.requests().len(), before, "the child was called");
    assert!(paths(&tiers).iter().all(|p| !p.starts_with("/themes")));
    assert_eq!(dependency_calls(&bff, "chain", "prefs", "error").await, 1.0);
    assert_eq!(degraded_count(&bff, "chain", "prefs").await, 1.0);
    assert_eq!(degraded_count(&bff, "chain", "theme").await, 1.0);
}

// ----- 8. circuit breaker -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_after_consecutive_failures_and_recovers() {
    let healthy = Arc::new(AtomicBool::new(false));
    // It does not answer in time: a failure whoever asks (one client's 500s would not open
    // the circuit, see `breaker.rs`).
    let reco = MockServer::start({
        let healthy = healthy.clone();
        move |_| {
            let items = json!({"items": [{"productId": "p1", "cost": 1}]});
            if healthy.load(Ordering::SeqCst) {
                MockReply::json(200, items)
            } else {
                MockReply::json(200, items).delay(Duration::from_secs(3600))
            }
        }
    });
    let users = MockServer::start(|_| MockReply::json(200, json!({"userId": "u1"})));
    let (bff, _file) = start(&format!(
        r#"client: web
upstreams:
  users: {{ url: "{users}", timeout: 2s }}
  reco:
    url: "{reco}"
    timeout: 300ms
    circuit_breaker: {{ enabled: true, consecutive_failures: 3, open_for: 300ms }}
routes:
  - name: home
    method: GET
    path: /home
    fetch:
      user: {{ upstream: users, path: /u, critical: true, fields: [userId] }}
      recommendations: {{ upstream: reco, path: /r, select: items, fields: [productId], fallback: [] }}
"#,
        users = users.url(),
        reco = reco.url()
    ))
    .await;
    let gauge = [("client", "web"), ("upstream", "reco")];
    assert_eq!(metric(&bff, "bff_circuit_state", &gauge).await, 0.0);

    for i in 0..3 {
        let reply = http::get(&bff.url("/home")).await;
        assert_degraded(&reply, &["recommendations"], &format!("failure {i}"));
    }
    assert_eq!(reco.requests().len(), 3);
    assert_eq!(
        dependency_calls(&bff, "home", "recommendations", "timeout").await,
        3.0
    );
    assert_eq!(metric(&bff, "bff_circuit_state", &gauge).await, 2.0);

    // Open: refused without a call.
    let reply = http::get(&bff.url("/home")).await;
    let body = assert_degraded(&reply, &["recommendations"], "circuit open");
    assert_eq!(body["recommendations"], json!([]));
    assert_eq!(
        reco.requests().len(),
        3,
        "an open circuit called the upstream"
    );
    assert_eq!(
        dependency_calls(&bff, "home", "recommendations", "circuit_open").await,
        1.0
    );

    // After `open_for`, a probe goes through; the upstream is well again, so it closes.
    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reply = http::get(&bff.url("/home")).await;
    let body = assert_whole(&reply, &["user", "recommendations"]);
    assert_eq!(body["recommendations"], json!([{"productId": "p1"}]));
    assert_eq!(reco.requests().len(), 4);
    assert_eq!(metric(&bff, "bff_circuit_state", &gauge).await, 0.0);
    let reply = http::get(&bff.url("/home")).await;
    assert_whole(&reply, &["user", "recommendations"]);
    assert_eq!(reco.requests().len(), 5);
}

// ----- 9. retries -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_by_attempts_and_budget_and_skip_posts() {
    let flaky = MockServer::start(|_| MockReply::json(503, json!({"detail": "overloaded"})));
    let (bff, _file) = start(&format!(
        r#"client: web
upstreams:
  flaky:
    url: "{url}"
    timeout: 2s
    retries: {{ attempts: 2, budget: 0.2, min_per_second: 10 }}
    circuit_breaker: {{ enabled: false }}
routes:
  - name: get
    method: GET
    path: /get
    fetch:
      thing: {{ upstream: flaky, path: /thing, critical: true, fields: [id] }}
  - name: submit
    method: POST
    path: /submit
    proxy: {{ upstream: flaky, path: /submit, fields: [id] }}
"#,
        url = flaky.url()
    ))
    .await;
    let retries = [("client", "web"), ("upstream", "flaky")];

    // Not idempotent: one call only (first, while the budget is full).
    let reply = http::send("POST", &bff.url("/submit"), &[], r#"{"a":1}"#).await;
    assert!(reply.status >= 500, "{}: {}", reply.status, reply.text());
    assert_eq!(paths(&flaky), ["/submit"]);
    assert_eq!(
        metric(&bff, "bff_dependency_retries_total", &retries).await,
        0.0
    );

    // One GET: the try and two retries.
    let reply = http::get(&bff.url("/get")).await;
    assert_envelope(&reply, 503, "DEPENDENCY_UNAVAILABLE", "get");
    assert_eq!(flaky.requests().len(), 1 + 3);
    assert_eq!(
        metric(&bff, "bff_dependency_retries_total", &retries).await,
        2.0
    );

    // Many GETs: the budget (tower's TpsBudget, 10 s of deposits) allows the reserve of
    // min_per_second × 10 s = 100 retries, plus `budget` (1/5) of the calls made. Allow 1/4
    // in case 1/0.2 rounds down to a withdrawal of 4.
    let gets = 150;
    for _ in 0..gets {
        let reply = http::get(&bff.url("/get")).await;
        assert_eq!(reply.status, 503, "{}", reply.text());
    }
    let requests = 1 + 1 + gets; // every call deposits once, the POST included
    let calls = flaky.requests().len();
    let made = calls - requests;
    let bound = 100 + requests / 4;
    assert!(
        made <= bound,
        "{made} retries for {requests} calls; the budget allows at most {bound}"
    );
    assert!(
        made >= 100,
        "{made} retries: the reserve alone allows 100 (the budget refused too early)"
    );
    assert!(
        made < 2 * (requests - 1),
        "the budget never refused a retry"
    );
    assert_eq!(
        metric(&bff, "bff_dependency_retries_total", &retries).await,
        made as f64
    );
    let posts = flaky
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 1);
}

// ----- 10. loops -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_another_bff_is_refused() {
    let svc = MockServer::start(|_| MockReply::json(200, json!({"id": 1})));
    let (bff, _file) = start(&format!(
        r#"client: web
upstreams:
  svc: {{ url: "{url}", timeout: 2s }}
routes:
  - name: page
    method: GET
    path: /page
    fetch:
      thing: {{ upstream: svc, path: /thing, critical: true, fields: [id] }}
"#,
        url = svc.url()
    ))
    .await;
    for value in ["mobile", "web", ""] {
        let reply = http::send("GET", &bff.url("/page"), &[("x-bff-client", value)], "").await;
        assert_envelope(&reply, 508, "LOOP_DETECTED", value);
    }
    assert_eq!(svc.requests().len(), 0);
    assert_eq!(
        metric(&bff, "bff_loops_refused_total", &[("client", "web")]).await,
        3.0
    );
    // Without the header, the route works.
    assert_whole(&http::get(&bff.url("/page")).await, &["thing"]);
}

// ----- 11. empty is not degraded -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_section_is_not_degraded() {
    let svc = MockServer::start(|req| match req.path() {
        "/orders" => MockReply::json(200, json!({"orders": [], "count": 0})),
        _ => MockReply::json(200, json!({"userId": "u1"})),
    });
    let (bff, _file) = start(&format!(
        r#"client: web
upstreams:
  svc: {{ url: "{url}", timeout: 2s }}
routes:
  - name: home
    method: GET
    path: /home
    headers: {{ Cache-Control: "private, max-age=30" }}
    fetch:
      user: {{ upstream: svc, path: /user, critical: true, fields: [userId] }}
      recentOrders: {{ upstream: svc, path: /orders, select: orders, fields: [orderId], fallback: [] }}
"#,
        url = svc.url()
    ))
    .await;
    let reply = http::get(&bff.url("/home")).await;
    let body = assert_whole(&reply, &["user", "recentOrders"]);
    assert_eq!(body["recentOrders"], json!([]));
    assert_eq!(reply.header("cache-control"), Some("private, max-age=30"));
    assert_eq!(
        dependency_calls(&bff, "home", "recentOrders", "ok").await,
        1.0
    );
    assert_eq!(degraded_count(&bff, "home", "recentOrders").await, 0.0);
}
