//! `bff demo`: built-in mock services on loopback (the upstreams and the JWKS a policy names),
//! the sidecar in front of them as a child process, and ready-to-paste `curl` commands.

use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How long the sidecar may take to answer `/readyz` with 200.
const READY_WITHIN: Duration = Duration::from_secs(10);

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What one mock serves.
enum Mock {
    User,
    Orders,
    Reco,
    Catalog,
    /// The frontend container beside the sidecar: HTML and Server-Sent Events.
    App,
    /// The JWKS document, at this path.
    Jwks(String),
}

pub fn run(policy: &Path, listen: &str, admin: &str) -> ExitCode {
    match demo(policy, listen, admin) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bff demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(policy_path: &Path, listen: &str, admin: &str) -> Result<ExitCode, String> {
    let file = policy_path.display();
    let text =
        std::fs::read_to_string(policy_path).map_err(|e| format!("cannot read {file}: {e}"))?;
    // Read generically: the sidecar itself validates the policy, with the demo's credentials.
    let policy: Value = serde_saphyr::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    let mocks = bind_mocks(&policy)?;
    // Pingora retries a taken port instead of failing, so check the sidecar's two first.
    for (address, flag) in [(listen, "--listen"), (admin, "--admin")] {
        StdListener::bind(address)
            .map_err(|e| format!("cannot give the sidecar {address} ({flag}): {e}"))?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bff-demo-mock")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the mocks' runtime: {e}"))?;
    let (mut term, mut int) = {
        let _context = runtime.enter();
        let mut labels = Vec::new();
        for (label, mock, listener) in mocks {
            let listener = TcpListener::from_std(listener)
                .map_err(|e| format!("cannot serve the mock for {label}: {e}"))?;
            runtime.spawn(serve(listener, Arc::new(mock)));
            labels.push(label);
        }
        if !labels.is_empty() {
            println!("bff demo: mocks for {}", labels.join(", "));
        }
        // Handled, not fatal: the demo outlives Ctrl-C and SIGTERM to report how the sidecar ended.
        let handler = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        (
            handler(SignalKind::terminate())?,
            handler(SignalKind::interrupt())?,
        )
    };

    let mut command = Command::new(
        std::env::current_exe().map_err(|e| format!("cannot find the bff binary: {e}"))?,
    );
    command
        .arg("run")
        .arg("--policy")
        .arg(policy_path)
        .args(["--listen", listen, "--admin", admin]);
    // Credentials go to the child only: the demo's own environment is never changed.
    let mut secrets = Vec::new();
    env_refs(&policy, &mut secrets);
    secrets.sort();
    secrets.dedup();
    for name in &secrets {
        command.env(name, demo_secret(name));
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start the sidecar: {e}"))?;

    runtime.block_on(wait_ready(&mut child, admin))?;
    print!(
        "{}",
        banner(&policy, &file.to_string(), listen, admin, &secrets)
    );
    let status = runtime.block_on(supervise(&mut child, &mut term, &mut int))?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    })
}

/// Binds a mock on the address of every upstream with a known name, and of the JWKS.
fn bind_mocks(policy: &Value) -> Result<Vec<(String, Mock, StdListener)>, String> {
    let mut mocks = Vec::new();
    let upstreams = policy.get("upstreams").and_then(Value::as_object);
    for (name, spec) in upstreams.into_iter().flatten() {
        let url = spec.get("url").and_then(Value::as_str).unwrap_or("");
        let mock = match name.as_str() {
            "user" => Mock::User,
            "orders" => Mock::Orders,
            "reco" => Mock::Reco,
            "catalog" => Mock::Catalog,
            "app" => Mock::App,
            _ => {
                println!("bff demo: note: no built-in mock for upstream `{name}` ({url}); calls to it will fail");
                continue;
            }
        };
        let listener = bind(&format!("upstream `{name}`"), url)?;
        mocks.push((format!("{name} {url}"), mock, listener));
    }
    if let Some(url) = policy.pointer("/auth/jwt/jwks_url").and_then(Value::as_str) {
        let path = url
            .parse::<http::Uri>()
            .map_or_else(|_| "/".into(), |u| u.path().into());
        let listener = bind("the JWKS", url)?;
        mocks.push((format!("JWKS {url}"), Mock::Jwks(path), listener));
    }
    Ok(mocks)
}

fn bind(what: &str, url: &str) -> Result<StdListener, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{what}: `{url}` is not a URL: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{what}: `{url}` has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let listener = StdListener::bind((host, port)).map_err(|e| {
        format!("cannot start the mock for {what} on {host}:{port}: {e} (is another demo or service using port {port}?)")
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("mock for {what}: {e}"))?;
    Ok(listener)
}

/// Every `${env:NAME}` the policy uses.
fn env_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.extend(
            s.split("${env:")
                .skip(1)
                .filter_map(|rest| rest.split_once('}'))
                .map(|(name, _)| name.to_string()),
        ),
        Value::Array(items) => items.iter().for_each(|v| env_refs(v, out)),
        Value::Object(map) => map.values().for_each(|v| env_refs(v, out)),
        _ => {}
    }
}

/// The demo's value for `${env:NAME}`: `USER_SVC_TOKEN` → `demo-user-svc-token`.
fn demo_secret(name: &str) -> String {
    format!("demo-{}", name.to_ascii_lowercase().replace('_', "-"))
}

/// Polls the admin port until `/readyz` answers 200, the child exits, or time runs out.
async fn wait_ready(child: &mut Child, admin: &str) -> Result<(), String> {
    let deadline = Instant::now() + READY_WITHIN;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "the sidecar exited ({status}) before it was ready; its log is above"
            ));
        }
        if readyz(admin).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!(
        "the sidecar was not ready within {READY_WITHIN:?} (http://{admin}/readyz); stopped it"
    ))
}

async fn readyz(admin: &str) -> bool {
    let check = async {
        let mut stream = TcpStream::connect(admin).await.ok()?;
        let request = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        // Read the whole answer: hanging up early makes the admin port log a reset.
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        Some(answer.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Some(true))
    )
}

/// Waits for the sidecar to exit. Ctrl-C reaches it straight from the terminal (same process
/// group); SIGTERM sent to the demo alone is passed on, so the sidecar drains and exits too.
async fn supervise(
    child: &mut Child,
    term: &mut Signal,
    int: &mut Signal,
) -> Result<ExitStatus, String> {
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        tokio::select! {
            _ = term.recv() => {
                let pid = child.id().to_string();
                let sent = Command::new("kill").args(["-s", "TERM", &pid]).status();
                if !sent.is_ok_and(|s| s.success()) {
                    let _ = child.kill();
                }
            }
            _ = int.recv() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

async fn serve(listener: TcpListener, mock: Arc<Mock>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("bff demo: mock accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mock = mock.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = answer(&mock, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            // A client hanging up mid-answer is nothing to report in a demo.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The canned answers. Every object carries internal fields no policy whitelists, so a `curl`
/// through the sidecar shows them gone. Any id `missing` is a 404 and `broken` a torn JSON body.
fn answer(mock: &Mock, request: &Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET {
        return json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        );
    }
    let decoded: Vec<String> = request
        .uri()
        .path()
        .split('/')
        .skip(1)
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let limit = request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("limit="))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(3)
        .min(20);
    let service_token = format!("Bearer {}", demo_secret("USER_SVC_TOKEN"));
    let authorized = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == service_token.as_bytes());
    let json_mock = !matches!(mock, Mock::App | Mock::Jwks(_));

    match (mock, segments.as_slice()) {
        (Mock::User, _) if !authorized => json_reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong service credential"}),
        ),
        (_, s) if json_mock && s.contains(&"missing") => not_found(),
        (_, s) if json_mock && s.contains(&"broken") => {
            let torn = if matches!(mock, Mock::Orders) {
                "{\"orderId\": "
            } else {
                "{\"id\": "
            };
            reply(StatusCode::OK, "application/json", full(torn))
        }
        (Mock::User, ["users", id]) => ok(json!({
            "userId": id, "displayName": "Ada Lovelace",
            "avatarUrl": "https://cdn.example.com/avatars/ada.png", "loyaltyTier": "gold",
            "email": "ada@example.com", "internalNotes": "VIP; goodwill credit issued in March",
        })),
        (Mock::Orders, ["users", _, "orders"]) => {
            let statuses = ["shipped", "processing", "delivered"];
            let orders: Vec<Value> = (0..limit)
                .map(|i| {
                    json!({
                        "orderId": format!("o-{}", 1001 + i),
                        "status": statuses[i % 3],
                        "estimatedDelivery": format!("2026-12-{:02}", 1 + i),
                        "itemCount": 1 + i % 4, "warehouseId": format!("wh-eu-{}", 3 + i % 2),
                    })
                })
                .collect();
            ok(json!({"orders": orders}))
        }
        (Mock::Orders, ["orders", id]) => ok(json!({
            "orderId": id, "status": "shipped", "estimatedDelivery": "2026-12-01",
            "items": [
                {"title": "Analytical Engine, scale model", "sku": "AE-1843", "costPrice": 41.5},
                {"title": "Punched cards, pack of 100", "sku": "PC-100", "costPrice": 3.2},
            ],
            "customerEmail": "ada@example.com", "warehouseId": "wh-eu-3",
        })),
        (Mock::Reco, ["users", _, "recommendations"] | ["products", _, "similar"]) => {
            let titles = [
                "Difference Engine kit",
                "Brass gear set",
                "Jacquard loom poster",
            ];
            let items: Vec<Value> = (0..limit)
                .map(|i| {
                    json!({
                        "productId": format!("p-{}", 2001 + i),
                        "thumbnailUrl": format!("https://cdn.example.com/p/{}/thumb.jpg", 2001 + i),
                        "title": titles[i % titles.len()],
                        "priceFormatted": format!("€{}.00", 19 + 10 * i),
                        "score": (97 - 5 * i) as f64 / 100.0, "modelVersion": "reco-2026.05",
                    })
                })
                .collect();
            ok(json!({"items": items}))
        }
        (Mock::Catalog, ["products", id]) => ok(json!({
            "id": id, "title": "Analytical Engine, scale model", "priceFormatted": "€129.00",
            "images": [
                {"url": format!("https://cdn.example.com/p/{id}/front.jpg"), "width": 1200},
                {"url": format!("https://cdn.example.com/p/{id}/side.jpg"), "width": 800},
            ],
            "seller": {"name": "Babbage & Co.", "taxId": "GB123456789"},
            "costPrice": 41.5, "warehouseId": "wh-eu-3",
        })),
        (Mock::App, [""]) => reply(StatusCode::OK, "text/html; charset=utf-8", full(APP_PAGE)),
        (Mock::App, ["events"]) => events(),
        (Mock::App, _) => reply(StatusCode::NOT_FOUND, "text/plain", full("not found\n")),
        (Mock::Jwks(path), _) if request.uri().path() == path => ok(json!({"keys": []})),
        _ => not_found(),
    }
}

const APP_PAGE: &str = "<!doctype html>\n<title>demo app</title>\n\
<h1>The frontend app</h1>\n<p>Served by the app container; the sidecar passed this request \
through unchanged. Live ticks: <code>curl -N /events</code>.</p>\n";

/// Three Server-Sent Events, one a second, then the end of the stream.
fn events() -> Response<Body> {
    let stream = futures::stream::unfold(1u32, |n| async move {
        if n > 3 {
            return None;
        }
        if n > 1 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let event = format!(
            "id: {n}\nevent: tick\ndata: {}\n\n",
            json!({"tick": n, "of": 3})
        );
        Some((Ok(Frame::data(Bytes::from(event))), n + 1))
    });
    let mut response = reply(
        StatusCode::OK,
        "text/event-stream",
        StreamBody::new(stream).boxed_unsync(),
    );
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

fn reply(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_reply(status: StatusCode, body: Value) -> Response<Body> {
    reply(status, "application/json", full(body.to_string()))
}

fn ok(body: Value) -> Response<Body> {
    json_reply(StatusCode::OK, body)
}

fn not_found() -> Response<Body> {
    json_reply(StatusCode::NOT_FOUND, json!({"error": "not found"}))
}

/// One policy route, as much of it as the banner needs.
struct RouteInfo<'a> {
    name: &'a str,
    method: &'a str,
    path: &'a str,
    /// The upstream of a `proxy` route, or of the first fetch of an aggregated one.
    upstream: &'a str,
    proxy_path: Option<&'a str>,
}

/// What the demo prints once the sidecar is ready: curl commands for this policy's routes.
fn banner(policy: &Value, file: &str, listen: &str, admin: &str, secrets: &[String]) -> String {
    let routes: Vec<RouteInfo> = policy
        .get("routes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| RouteInfo {
            name: str_at(r, "/name").unwrap_or("?"),
            method: str_at(r, "/method").unwrap_or("GET"),
            path: str_at(r, "/path").unwrap_or("/"),
            upstream: str_at(r, "/proxy/upstream")
                .or_else(|| {
                    r.get("fetch")
                        .and_then(Value::as_object)
                        .and_then(|f| f.values().next())
                        .and_then(|f| str_at(f, "/upstream"))
                })
                .unwrap_or(""),
            proxy_path: str_at(r, "/proxy/path"),
        })
        .collect();
    let base = format!("http://{listen}");
    let curl = |method: &str, path: &str| {
        let flag = if method == "GET" {
            String::new()
        } else {
            format!("-X {method} ")
        };
        format!("  curl -i {flag}{base}{path}\n")
    };

    let client = str_at(policy, "/client").unwrap_or("?");
    let mut out = format!(
        "\nbff demo: the `{client}` sidecar ({file}) is ready on {base}, admin on http://{admin}\n"
    );
    for name in secrets {
        out += &format!("  it was given {name}={}\n", demo_secret(name));
    }
    out += "\nTry:\n";
    let proxies = routes.iter().filter(|r| r.proxy_path.is_some());
    for (i, route) in proxies.enumerate() {
        let sample = sample_id(route.upstream);
        let path = fill(route.path, sample);
        out += &format!(
            "  # {}: proxied to `{}`, answer projected: fields outside the whitelist never leave\n",
            route.name, route.upstream
        );
        out += &curl(route.method, &path);
        let upstream_url = str_at(policy, &format!("/upstreams/{}/url", route.upstream));
        let direct = route.proxy_path.map(|p| fill_template(p, sample));
        if let (Some(url), Some(direct)) = (upstream_url, direct.filter(|d| !d.contains('{'))) {
            out += &format!("  #   the same object straight from the mock, unprojected:\n  curl -s {url}{direct}\n");
        }
        if i > 0 || route.method != "GET" || !route.path.contains('{') {
            continue;
        }
        out += "  # the upstream answers 404 → the 404 envelope; torn JSON → the 502 envelope\n";
        out += &curl("GET", &fill(route.path, "missing"));
        out += &curl("GET", &fill(route.path, "broken"));
        if !routes
            .iter()
            .any(|r| r.path == route.path && r.method == "DELETE")
        {
            out += "  # a method the route does not serve → the 405 envelope\n";
            out += &curl("DELETE", &path);
        }
    }
    let aggregated: Vec<&RouteInfo> = routes.iter().filter(|r| r.proxy_path.is_none()).collect();
    if !aggregated.is_empty() {
        let names: Vec<&str> = aggregated.iter().map(|r| r.name).collect();
        out += &format!(
            "  # {}: aggregated, answered 501 NOT_IMPLEMENTED until aggregation lands\n",
            names.join(", ")
        );
        for route in aggregated {
            out += &curl(route.method, &fill(route.path, sample_id(route.upstream)));
        }
    }
    match str_at(policy, "/fallthrough") {
        Some(app) => {
            out += &format!("  # anything else falls through to `{app}` unchanged, streams too\n");
            out += &curl("GET", "/");
            out += &format!("  curl -N {base}/events\n");
        }
        None => {
            out += "  # no fallthrough: anything else is the 404 envelope\n";
            out += &curl("GET", "/no/such/page");
        }
    }
    out += &format!(
        "  # the admin port\n  curl -s http://{admin}/metrics | grep bff_\n  curl -s http://{admin}/policy\n"
    );
    if policy.pointer("/auth/jwt/jwks_url").is_some() {
        out += "\nThe JWKS mock serves no keys yet: the demo token comes with the auth work.\n";
    }
    out += "Ctrl-C stops the demo.\n\n";
    out
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// An id the mocks know for the route's upstream.
fn sample_id(upstream: &str) -> &'static str {
    match upstream {
        "orders" => "o-1001",
        "catalog" | "reco" => "p-2001",
        "user" => "u-42",
        _ => "1",
    }
}

/// The route path with every `{param}` segment set to `value`.
fn fill(path: &str, value: &str) -> String {
    let segments: Vec<&str> = path
        .split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                value
            } else {
                s
            }
        })
        .collect();
    segments.join("/")
}

/// An upstream path template with every `{path.*}` variable set to `value`.
fn fill_template(template: &str, value: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{path.") {
        out.push_str(&rest[..start]);
        match rest[start..].find('}') {
            Some(end) => {
                out.push_str(value);
                rest = &rest[start + end + 1..];
            }
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out + rest
}
