//! The sidecar's life cycle against the real binary: the admin port, policy reload (file change,
//! ConfigMap symlink swap, SIGHUP, invalid policies, reload under load), SIGTERM draining, the
//! access log, and startup failures.

use std::{
    future::Future,
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::support::metrics::{metrics_text, parse_metrics, series, Sample};
use crate::support::{
    http, write_policy, write_policy_configmap, Bff, MockReply, MockServer, RecordedRequest,
    TempPolicy,
};

const ORDER: &str = "/mobile/v1/orders/o-7";
/// How long a reload may take to become visible (the file is polled every second).
const RELOAD_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn policy(orders: &str, app: &str, fields: &[&str], timeout: &str) -> String {
    format!(
        r#"client: mobile
upstreams:
  orders: {{ url: "{orders}", timeout: {timeout} }}
  app: {{ url: "{app}" }}
routes:
  - name: order-detail
    method: GET
    path: /mobile/v1/orders/{{id}}
    proxy: {{ upstream: orders, path: "/orders/{{path.id}}", fields: [{fields}] }}
fallthrough: app
"#,
        fields = fields.join(", ")
    )
}

/// A policy with an unknown key in the route; returns the YAML and the (line, column) of the key.
fn invalid_policy(orders: &str, app: &str) -> (String, usize, usize) {
    let good = policy(orders, app, &["orderId", "status"], "2s");
    let yaml = good.replacen("    method: GET\n", "    method: GET\n    retries: 3\n", 1);
    let line = yaml
        .lines()
        .position(|l| l.contains("retries: 3"))
        .expect("the unknown key is in the YAML")
        + 1;
    (yaml, line, 5)
}

fn order_reply(req: &RecordedRequest) -> MockReply {
    let id = req
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    MockReply::json(
        200,
        json!({"orderId": id, "status": "shipped", "internalNotes": "fragile", "costPrice": 3}),
    )
}

/// The orders upstream: `/orders/{id}` answers with a full order (after `delay`).
fn orders_mock(delay: Duration) -> MockServer {
    MockServer::start(move |req| order_reply(&req).delay(delay))
}

fn app_mock() -> MockServer {
    MockServer::start(|req| MockReply::json(200, json!({"app": req.path()})))
}

/// What `GET /mobile/v1/orders/o-7` must answer with the given `fields`.
fn projection(fields: &[&str]) -> Value {
    let full = json!({"orderId": "o-7", "status": "shipped"});
    let mut out = serde_json::Map::new();
    for f in fields {
        out.insert((*f).to_string(), full[*f].clone());
    }
    Value::Object(out)
}

/// Polls `probe` every 25 ms until it yields `Some`, or panics with `what` after `timeout`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Requests `ORDER` until its body equals `want` (a reload became visible).
async fn wait_for_body(bff: &Bff, want: &Value) {
    let url = bff.url(ORDER);
    wait_for(
        &format!("GET {ORDER} to answer {want}"),
        RELOAD_WAIT,
        || async {
            let reply = http::get(&url).await;
            (reply.status == 200 && reply.json() == *want).then_some(())
        },
    )
    .await;
}

async fn scrape(bff: &Bff) -> Vec<Sample> {
    parse_metrics(&metrics_text(bff).await)
}

fn reloads(samples: &[Sample], result: &str) -> f64 {
    series(samples, "bff_policy_reloads_total", &[("result", result)]).unwrap_or(0.0)
}

/// Polls `/metrics` until `bff_policy_reloads_total{result}` is at least `at_least`; returns it.
async fn wait_reloads(bff: &Bff, result: &str, at_least: f64) -> f64 {
    wait_for(
        &format!("bff_policy_reloads_total{{result=\"{result}\"}} >= {at_least}"),
        RELOAD_WAIT,
        || async {
            let n = reloads(&scrape(bff).await, result);
            (n >= at_least).then_some(n)
        },
    )
    .await
}

/// Every JSON object bff logged (one per line); other lines are skipped.
fn json_logs(bff: &Bff) -> Vec<Value> {
    bff.logs()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn reload_lines(bff: &Bff) -> Vec<Value> {
    json_logs(bff)
        .into_iter()
        .filter(|l| l["message"] == "policy reloaded")
        .collect()
}

async fn route_description(bff: &Bff) -> Value {
    let reply = http::get(&bff.admin_url("/policy")).await;
    assert_eq!(reply.status, 200, "/policy: {}", reply.text());
    let policy = reply.json();
    let routes = policy["routes"]
        .as_array()
        .unwrap_or_else(|| panic!("/policy has no routes array: {policy}"));
    routes
        .iter()
        .find(|r| r["name"] == "order-detail")
        .unwrap_or_else(|| panic!("/policy does not list order-detail: {policy}"))
        .clone()
}

/// Checks `cacheKeyPrefix` is `mobile:order-detail:v1:<8 hex>:` and agrees with `shape`;
/// returns the shape.
fn shape_of(route: &Value) -> String {
    let prefix = route["cacheKeyPrefix"]
        .as_str()
        .unwrap_or_else(|| panic!("no cacheKeyPrefix: {route}"));
    let shape = prefix
        .strip_prefix("mobile:order-detail:v1:")
        .and_then(|rest| rest.strip_suffix(':'))
        .unwrap_or_else(|| {
            panic!("cacheKeyPrefix {prefix:?} is not mobile:order-detail:v1:<shape>:")
        });
    assert!(
        shape.len() == 8 && shape.chars().all(|c| c.is_ascii_hexdigit()),
        "shape {shape:?} in {prefix:?} is not 8 hex digits"
    );
    assert_eq!(route["shape"], shape, "shape field vs prefix: {route}");
    shape.to_string()
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Admin port
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_reports_health_metrics_and_policy() {
    let orders = orders_mock(Duration::ZERO);
    let app = app_mock();
    let file = write_policy(&policy(
        &orders.url(),
        &app.url(),
        &["orderId", "status"],
        "2s",
    ));
    let bff = Bff::start(file.path()).await;

    let health = http::get(&bff.admin_url("/healthz")).await;
    assert_eq!(health.status, 200, "/healthz: {}", health.text());
    let ready = http::get(&bff.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200, "/readyz: {}", ready.text());

    // Nothing counted before the first request.
    let before = scrape(&bff).await;
    assert_eq!(
        series(
            &before,
            "bff_requests_total",
            &[
                ("client", "mobile"),
                ("route", "order-detail"),
                ("status", "200")
            ]
        ),
        None
    );

    let reply = http::get(&bff.url(ORDER)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), projection(&["orderId", "status"]));

    // Metrics are recorded in the logging phase, which may end just after the client has the
    // response: wait for the counter, then check it is exactly 1.
    let labels = [
        ("client", "mobile"),
        ("route", "order-detail"),
        ("status", "200"),
    ];
    let samples = wait_for(
        "bff_requests_total for the request",
        RELOAD_WAIT,
        || async {
            let s = scrape(&bff).await;
            series(&s, "bff_requests_total", &labels).map(|_| s)
        },
    )
    .await;
    assert_eq!(series(&samples, "bff_requests_total", &labels), Some(1.0));
    let route = [("client", "mobile"), ("route", "order-detail")];
    assert_eq!(
        series(&samples, "bff_request_duration_seconds_count", &route),
        Some(1.0),
        "histogram count of the route"
    );
    let sum = series(&samples, "bff_request_duration_seconds_sum", &route)
        .expect("bff_request_duration_seconds_sum of the route");
    assert!(sum > 0.0 && sum < 10.0, "duration sum {sum}");
    let inf = [
        ("client", "mobile"),
        ("route", "order-detail"),
        ("le", "+Inf"),
    ];
    assert_eq!(
        series(&samples, "bff_request_duration_seconds_bucket", &inf),
        Some(1.0)
    );
    let text = http::get(&bff.admin_url("/metrics")).await.text();
    assert!(
        text.lines()
            .any(|l| l == "# TYPE bff_request_duration_seconds histogram"),
        "bff_request_duration_seconds is not declared a histogram:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "# TYPE bff_requests_total counter"),
        "bff_requests_total is not declared a counter:\n{text}"
    );

    // /policy: the route with its cache-key prefix and shape.
    let route = route_description(&bff).await;
    assert_eq!(route["method"], "GET", "{route}");
    assert_eq!(route["path"], "/mobile/v1/orders/{id}", "{route}");
    assert_eq!(route["kind"], "proxy", "{route}");
    shape_of(&route);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shape_hash_follows_the_route_fields() {
    let orders = orders_mock(Duration::ZERO);
    let app = app_mock();
    let narrow = policy(&orders.url(), &app.url(), &["orderId"], "2s");
    let wide = policy(&orders.url(), &app.url(), &["orderId", "status"], "2s");
    let file = write_policy(&narrow);
    let bff = Bff::start(file.path()).await;
    let narrow_shape = shape_of(&route_description(&bff).await);

    // A reload that changes `fields` changes the shape, and so every cache key of the route.
    file.rewrite(&wide);
    let wide_shape = wait_for("/policy to show a new shape", RELOAD_WAIT, || async {
        let shape = shape_of(&route_description(&bff).await);
        (shape != narrow_shape).then_some(shape)
    })
    .await;

    // The same fields give the same shape again (deterministic, not per reload)...
    file.rewrite(&narrow);
    wait_for(
        "/policy to show the first shape again",
        RELOAD_WAIT,
        || async { (shape_of(&route_description(&bff).await) == narrow_shape).then_some(()) },
    )
    .await;

    // ...and in another process (stable across runs, so all replicas share cache keys).
    let other_file = write_policy(&wide);
    let other = Bff::start(other_file.path()).await;
    assert_eq!(shape_of(&route_description(&other).await), wide_shape);
}

// ---------------------------------------------------------------------------------------------
// 2. Reload on file change
// ---------------------------------------------------------------------------------------------

/// Rewrites the policy to also whitelist `status`, and waits until that policy is served and
/// counted as the one good reload.
async fn add_status_and_see_it_served(
    bff: &Bff,
    file: &TempPolicy,
    orders: &MockServer,
    app: &MockServer,
) {
    file.rewrite(&policy(
        &orders.url(),
        &app.url(),
        &["orderId", "status"],
        "2s",
    ));
    wait_for_body(bff, &projection(&["orderId", "status"])).await;
    assert_eq!(wait_reloads(bff, "ok", 1.0).await, 1.0);
}

async fn reload_on_file_change(file: TempPolicy, orders: &MockServer, app: &MockServer) {
    let bff = Bff::start(file.path()).await;
    let reply = http::get(&bff.url(ORDER)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), projection(&["orderId"]));
    assert_eq!(reloads(&scrape(&bff).await, "ok"), 0.0);

    add_status_and_see_it_served(&bff, &file, orders, app).await;
    assert_eq!(reloads(&scrape(&bff).await, "invalid"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_when_the_file_is_replaced() {
    let (orders, app) = (orders_mock(Duration::ZERO), app_mock());
    let file = write_policy(&policy(&orders.url(), &app.url(), &["orderId"], "2s"));
    reload_on_file_change(file, &orders, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_when_the_configmap_symlink_is_swapped() {
    let (orders, app) = (orders_mock(Duration::ZERO), app_mock());
    let file = write_policy_configmap(&policy(&orders.url(), &app.url(), &["orderId"], "2s"));
    reload_on_file_change(file, &orders, &app).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Reload on SIGHUP
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_changed_policy() {
    let (orders, app) = (orders_mock(Duration::ZERO), app_mock());
    let file = write_policy(&policy(&orders.url(), &app.url(), &["orderId"], "2s"));
    let bff = Bff::builder(file.path())
        .env("BFF_LOG_FORMAT", "json")
        .start()
        .await;
    assert_eq!(
        http::get(&bff.url(ORDER)).await.json(),
        projection(&["orderId"])
    );

    file.rewrite(&policy(
        &orders.url(),
        &app.url(),
        &["orderId", "status"],
        "2s",
    ));
    bff.signal("HUP");
    wait_for_body(&bff, &projection(&["orderId", "status"])).await;

    // The file poll may have seen the change first; either reason is a correct log line.
    let lines = wait_for("a `policy reloaded` log line", RELOAD_WAIT, || async {
        let lines = reload_lines(&bff);
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    let why = lines[0]["why"].as_str().unwrap_or_default().to_string();
    assert!(
        why == "SIGHUP" || why == "file changed",
        "unexpected reload reason {why:?}: {}",
        lines[0]
    );
    assert_eq!(lines[0]["level"], "INFO", "{}", lines[0]);
    assert!(wait_reloads(&bff, "ok", 1.0).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_even_an_unchanged_file() {
    let (orders, app) = (orders_mock(Duration::ZERO), app_mock());
    let file = write_policy(&policy(&orders.url(), &app.url(), &["orderId"], "2s"));
    let bff = Bff::builder(file.path())
        .env("BFF_LOG_FORMAT", "json")
        .start()
        .await;
    assert!(reload_lines(&bff).is_empty(), "{}", bff.logs());

    bff.signal("HUP");
    let lines = wait_for("a `policy reloaded` log line", RELOAD_WAIT, || async {
        let lines = reload_lines(&bff);
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    assert_eq!(lines[0]["why"], "SIGHUP", "{}", lines[0]);
    assert_eq!(wait_reloads(&bff, "ok", 1.0).await, 1.0);
    // Still serving the same policy.
    let reply = http::get(&bff.url(ORDER)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), projection(&["orderId"]));
}

// ---------------------------------------------------------------------------------------------
// 4. Invalid reload
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_refused_and_the_old_one_keeps_serving() {
    let (orders, app) = (orders_mock(Duration::ZERO), app_mock());
    let file = write_policy(&policy(&orders.url(), &app.url(), &["orderId"], "2s"));
    let bff = Bff::start(file.path()).await;
    let before = http::get(&bff.url(ORDER)).await;
    assert_eq!(before.status, 200, "{}", before.text());
    assert_eq!(before.json(), projection(&["orderId"]));
    let app_before = http::get(&bff.url("/some/page")).await;
    assert_eq!(app_before.status, 200, "{}", app_before.text());

    let route_before = route_description(&bff).await;

    let (bad, line, col) = invalid_policy(&orders.url(), &app.url());
    file.rewrite(&bad);
    assert_eq!(wait_reloads(&bff, "invalid", 1.0).await, 1.0);
    let diagnostic = format!("{}:{line}:{col}: ", file.path().display());
    let logs = bff.logs();
    let logged = logs
        .lines()
        .find(|l| l.contains(&diagnostic))
        .unwrap_or_else(|| panic!("no `{diagnostic}…` diagnostic in the logs:\n{logs}"));
    assert!(logged.contains("retries"), "{logged}");

    // The old policy answers exactly as before.
    let after = http::get(&bff.url(ORDER)).await;
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(after.json(), before.json());
    let app_after = http::get(&bff.url("/some/page")).await;
    assert_eq!(app_after.json(), app_before.json());
    assert_eq!(route_description(&bff).await, route_before);
    let samples = scrape(&bff).await;
    assert_eq!(reloads(&samples, "ok"), 0.0);
    assert_eq!(
        reloads(&samples, "invalid"),
        1.0,
        "refused once, not per poll"
    );

    // A good policy after the bad one is picked up.
    add_status_and_see_it_served(&bff, &file, &orders, &app).await;
    assert_eq!(reloads(&scrape(&bff).await, "invalid"), 1.0);
}

// ---------------------------------------------------------------------------------------------
// 5. Reload under load
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_no_request() {
    const WORKERS: usize = 4;
    const MIN_REQUESTS: usize = 300;
    const MAX_REQUESTS: usize = 3000;
    let (orders, app) = (orders_mock(Duration::ZERO), app_mock());
    let narrow = policy(&orders.url(), &app.url(), &["orderId"], "2s");
    let wide = policy(&orders.url(), &app.url(), &["orderId", "status"], "2s");
    let file = write_policy(&narrow);
    let bff = Arc::new(Bff::start(file.path()).await);
    let (narrow_body, wide_body) = (projection(&["orderId"]), projection(&["orderId", "status"]));

    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (bff, done, sent) = (bff.clone(), done.clone(), sent.clone());
        let (narrow_body, wide_body) = (narrow_body.clone(), wide_body.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = (0, 0);
            let mut failures = Vec::new();
            loop {
                let n = sent.fetch_add(1, Ordering::SeqCst);
                if n >= MAX_REQUESTS || (done.load(Ordering::SeqCst) && n >= MIN_REQUESTS) {
                    break;
                }
                match http::try_send("GET", &bff.url(ORDER), &[], "").await {
                    Ok(r) if r.status == 200 && r.json() == narrow_body => seen.0 += 1,
                    Ok(r) if r.status == 200 && r.json() == wide_body => seen.1 += 1,
                    Ok(r) => failures.push(format!("{} {}", r.status, r.text())),
                    Err(e) => failures.push(e),
                }
                // Pacing so the load spans all the reloads.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (seen, failures)
        }));
    }

    // Five rewrites, each waited for on /policy so every one really is a reload under load.
    let mut shapes = vec![shape_of(&route_description(&bff).await)];
    for i in 0..5 {
        file.rewrite(if i % 2 == 0 { &wide } else { &narrow });
        let last = shapes.last().unwrap().clone();
        let shape = wait_for(&format!("reload #{}", i + 1), RELOAD_WAIT, || async {
            let shape = shape_of(&route_description(&bff).await);
            (shape != last).then_some(shape)
        })
        .await;
        shapes.push(shape);
    }
    done.store(true, Ordering::SeqCst);

    let (mut narrow_seen, mut wide_seen, mut failures) = (0, 0, Vec::new());
    let deadline = Duration::from_secs(60);
    for worker in workers {
        let ((n, w), f) = tokio::time::timeout(deadline, worker)
            .await
            .expect("load workers finish")
            .unwrap();
        narrow_seen += n;
        wide_seen += w;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during reloads, e.g. {:?}",
        failures.len(),
        narrow_seen + wide_seen + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        narrow_seen + wide_seen >= MIN_REQUESTS,
        "{narrow_seen} + {wide_seen}"
    );
    assert!(
        narrow_seen > 0 && wide_seen > 0,
        "both projections must have been served: {narrow_seen} narrow, {wide_seen} wide"
    );
    let samples = scrape(&bff).await;
    assert_eq!(reloads(&samples, "ok"), 5.0);
    assert_eq!(reloads(&samples, "invalid"), 0.0);
    let non_200: Vec<_> = samples
        .iter()
        .filter(|s| {
            s.name == "bff_requests_total"
                && s.labels.get("status").map(String::as_str) != Some("200")
        })
        .collect();
    assert!(non_200.is_empty(), "{non_200:?}");
    // Every answer was proxied (no route cache here), none served from thin air.
    assert!(orders.requests().len() >= narrow_seen + wide_seen);
}

// ---------------------------------------------------------------------------------------------
// 6./7. SIGTERM
// ---------------------------------------------------------------------------------------------

/// Starts bff with `--grace-period grace`, sends one request whose upstream answers after
/// `delay`, and returns once the upstream holds it. The mocks and policy must outlive the test.
async fn request_in_flight(
    delay: Duration,
    fields: &[&str],
    upstream_timeout: &str,
    grace: &str,
) -> (
    Bff,
    tokio::task::JoinHandle<Result<http::Reply, String>>,
    (MockServer, MockServer, TempPolicy),
) {
    let (orders, app) = (orders_mock(delay), app_mock());
    let file = write_policy(&policy(&orders.url(), &app.url(), fields, upstream_timeout));
    let bff = Bff::builder(file.path())
        .arg("--grace-period")
        .arg(grace)
        .start()
        .await;
    let url = bff.url(ORDER);
    let in_flight = tokio::spawn(async move { http::try_send("GET", &url, &[], "").await });
    wait_for(
        "the upstream to receive the request",
        Duration::from_secs(5),
        || async { (!orders.requests().is_empty()).then_some(()) },
    )
    .await;
    (bff, in_flight, (orders, app, file))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_request_in_flight_then_exits() {
    let (mut bff, in_flight, _mocks) = request_in_flight(
        Duration::from_millis(1500),
        &["orderId", "status"],
        "5s",
        "30s",
    )
    .await;
    let samples = scrape(&bff).await;
    assert_eq!(series(&samples, "bff_in_flight_requests", &[]), Some(1.0));

    let termed = Instant::now();
    bff.signal("TERM");

    // Readiness goes away: /readyz answers 503, or the admin port stops answering.
    let readyz = bff.admin_url("/readyz");
    let not_ready = wait_for(
        "/readyz to stop answering 200",
        Duration::from_secs(5),
        || async {
            match http::try_send("GET", &readyz, &[], "").await {
                Ok(r) if r.status == 200 => None,
                Ok(r) => Some(format!("/readyz answered {}", r.status)),
                Err(e) => Some(format!("admin port: {e}")),
            }
        },
    )
    .await;
    eprintln!("after SIGTERM: {not_ready}");

    // A new connection after SIGTERM: record what happens (refused, or answered).
    let late = http::try_send("GET", &bff.url(ORDER), &[], "").await;
    eprintln!(
        "new request after SIGTERM: {}",
        match &late {
            Ok(r) => format!("answered {} {}", r.status, r.text()),
            Err(e) => format!("failed: {e}"),
        }
    );

    let reply = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight request completes")
        .unwrap()
        .unwrap_or_else(|e| panic!("in-flight request failed during drain: {e}\n{}", bff.logs()));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), projection(&["orderId", "status"]));

    let status = bff
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("bff still running 10 s after SIGTERM\n{}", bff.logs()));
    let took = termed.elapsed();
    assert!(status.success(), "exit status {status}\n{}", bff.logs());
    assert!(
        took < Duration::from_secs(10),
        "drain took {took:?} (grace period 30 s)"
    );
    // The late request, if it was answered, must have been a complete answer too.
    if let Ok(r) = late {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), projection(&["orderId", "status"]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_after_the_grace_period_even_with_a_request_in_flight() {
    let (mut bff, in_flight, _mocks) =
        request_in_flight(Duration::from_secs(10), &["orderId"], "30s", "1s").await;
    bff.signal("TERM");
    let status = bff.wait_exit(Duration::from_secs(5)).await;
    assert!(
        status.is_some(),
        "bff still running 5 s after SIGTERM with --grace-period 1s\n{}",
        bff.logs()
    );
    eprintln!("exit status with a request outliving the grace period: {status:?}");
    let outcome = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the client sees the connection end")
        .unwrap();
    assert!(
        !matches!(&outcome, Ok(r) if r.status == 200),
        "the request cannot have completed before its upstream answered: {outcome:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Access log
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_writes_one_json_access_line() {
    let (orders, app) = (orders_mock(Duration::ZERO), app_mock());
    let file = write_policy(&policy(&orders.url(), &app.url(), &["orderId"], "2s"));
    let bff = Bff::builder(file.path())
        .env("BFF_LOG_FORMAT", "json")
        .start()
        .await;

    let secret = "s3cr3t-token-value";
    let requests = [
        (
            format!("{ORDER}?token={secret}"),
            "/mobile/v1/orders/o-7",
            "order-detail",
        ),
        (
            format!("/home/page?session={secret}"),
            "/home/page",
            "_fallthrough",
        ),
        (ORDER.to_string(), "/mobile/v1/orders/o-7", "order-detail"),
    ];
    let mut expected = Vec::new();
    for (target, path, route) in &requests {
        let reply = http::get(&bff.url(target)).await;
        assert_eq!(reply.status, 200, "{target}: {}", reply.text());
        let trace = reply
            .header("x-trace-id")
            .unwrap_or_else(|| panic!("{target}: no X-Trace-Id"))
            .to_string();
        expected.push((trace, *path, *route));
    }

    let access = |bff: &Bff| -> Vec<Value> {
        json_logs(bff)
            .into_iter()
            .filter(|l| l["target"] == "access")
            .collect()
    };
    // Each line is written just after its response: wait until every request has one.
    let lines = wait_for("the access log lines", RELOAD_WAIT, || async {
        let lines = access(&bff);
        expected
            .iter()
            .all(|(trace, _, _)| lines.iter().any(|l| l["trace_id"] == trace.as_str()))
            .then_some(lines)
    })
    .await;
    assert_eq!(
        lines.len(),
        requests.len(),
        "one access line per request:\n{lines:#?}"
    );
    for (trace, path, route) in &expected {
        let mine: Vec<_> = lines
            .iter()
            .filter(|l| l["trace_id"] == trace.as_str())
            .collect();
        assert_eq!(mine.len(), 1, "access lines for trace {trace}: {lines:#?}");
        let line = mine[0];
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["path"], *path, "{line}");
        assert_eq!(line["route"], *route, "{line}");
        assert_eq!(line["status"], 200, "{line}");
        let latency = line["latency_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("latency_ms is not a number: {line}"));
        assert!((0.0..10_000.0).contains(&latency), "{line}");
    }
    let logs = bff.logs();
    assert!(
        !logs.contains(secret),
        "the query string was logged:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Startup failures
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_fails_startup_with_a_diagnostic() {
    let (bad, line, col) = invalid_policy("http://127.0.0.1:1", "http://127.0.0.1:2");
    let file = write_policy(&bad);
    let mut bff = Bff::builder(file.path()).spawn();
    let status = bff
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            panic!(
                "bff with an invalid policy is still running\n{}",
                bff.logs()
            )
        });
    assert_eq!(status.code(), Some(1), "{}", bff.logs());
    let logs = bff.logs();
    let diagnostic = format!("{}:{line}:{col}: ", file.path().display());
    let printed = logs
        .lines()
        .find(|l| l.starts_with(&diagnostic))
        .unwrap_or_else(|| panic!("no line starting `{diagnostic}`:\n{logs}"));
    assert!(printed.contains("unknown field `retries`"), "{printed}");
}

/// Starts bff with one of its ports held by another socket; it must exit non-zero.
async fn port_in_use(busy_is_admin: bool) {
    let (orders, app) = (orders_mock(Duration::ZERO), app_mock());
    let file = write_policy(&policy(&orders.url(), &app.url(), &["orderId"], "2s"));
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let (listen, admin) = if busy_is_admin {
        (free_addr(), busy.local_addr().unwrap())
    } else {
        (busy.local_addr().unwrap(), free_addr())
    };
    let mut bff = Bff::builder(file.path()).ports(listen, admin).spawn();
    // Generous: Pingora itself retries a busy address for up to 30 s before giving up.
    let status = bff.wait_exit(Duration::from_secs(40)).await;
    drop(busy);
    let status = status.unwrap_or_else(|| {
        panic!(
            "bff still running 40 s after starting with {} in use\n{}",
            if busy_is_admin { admin } else { listen },
            bff.logs()
        )
    });
    assert!(!status.success(), "exit status {status}\n{}", bff.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_port_in_use_fails_startup() {
    port_in_use(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_in_use_fails_startup() {
    port_in_use(true).await;
}
