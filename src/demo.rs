//! `bff demo`: built-in mock services on loopback (the upstreams and the JWKS a policy names),
//! the sidecar in front of them as a child process, and ready-to-paste `curl` commands.
//!
//! The mocks serve realistic documents: every object carries internal fields no policy
//! whitelists (a user document has 40 fields, of which the mobile homescreen passes on 4), so a
//! `curl` through the sidecar shows them gone. The JWKS mock publishes the demo's own ES256 key,
//! and the demo prints tokens signed with it.
//!
//! Watching degradation: every data mock (`user`, `orders`, `reco`, `catalog`) obeys control
//! requests on its own port, which replace its whole mode at once:
//!
//! | request | what the mock does with every following request |
//! |---|---|
//! | `POST /_demo?fail=1` | answers `503` |
//! | `POST /_demo?delay_ms=N` | answers N ms late |
//! | `POST /_demo?hang=1` | does not answer (until the mode changes) |
//! | `POST /_demo?fail=1&delay_ms=300` | combined: a `503`, 300 ms late |
//! | `POST /_demo` | back to normal |
//!
//! A control request answers `200` with the mode now in force, e.g.
//! `{"mock":"reco","fail":true,"delay_ms":0,"hang":false}`; `GET /_demo` shows it unchanged.

use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How long the sidecar may take to answer `/readyz` with 200.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// The path of the control endpoint on every data mock.
const CONTROL_PATH: &str = "/_demo";

/// The longest `delay_ms` a control request may set (ten minutes).
const MAX_DELAY_MS: u64 = 600_000;

/// How many items a list endpoint answers without `?limit=`, and at most.
const DEFAULT_LIMIT: usize = 10;
const MAX_LIMIT: usize = 100;

/// The demo user: the `sub` of the printed token.
const DEMO_SUB: &str = "usr_9821";
/// A second demo user for the degradation walk-through: a cache key of its own, so a complete
/// homescreen cached for [`DEMO_SUB`] cannot hide a degraded one.
const WALK_SUB: &str = "usr_4242";
/// How long a demo token is valid.
const TOKEN_TTL_SECS: u64 = 3600;
/// The partner key the demo prints for a policy with `auth.api_key`. Like the signing key below
/// it is public: `policies/partner-keys.txt` lists its SHA-256 for the demo partner.
const DEMO_API_KEY: &str = "demo-partner-key";

// THE DEMO'S SIGNING KEY. A throwaway P-256 key pair generated for `bff demo` with
//   openssl ecparam -genkey -noout -name prime256v1 | openssl pkcs8 -topk8 -nocrypt
// and published here, in the source: anyone can sign tokens with it. It is trusted only by a
// sidecar whose policy points at the demo's JWKS mock; never put it in a real key set.

/// The `kid` of the demo key, in the JWKS and in every demo token's header.
const DEMO_KEY_ID: &str = "demo-1";

/// The demo key's private half (PKCS#8 PEM), which signs the demo tokens.
const DEMO_PRIVATE_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgGxk5//KxKDd8otsE
dksIKwIcI0WdJpOjlrGCOorUramhRANCAAS3ehZtLZ5PgDNRym/jBCBhNLyM+5J1
gRewx5B57bRCvOvILHq+L0bqeHWzGlMYE3EoMQYfHb350JIxVXRF9lcp
-----END PRIVATE KEY-----
";

/// The demo key's public half (SPKI PEM). The JWKS serves the same key as [`DEMO_JWK_X`] and
/// [`DEMO_JWK_Y`]; only the tests read the PEM, to check the two agree.
#[cfg(test)]
const DEMO_PUBLIC_KEY_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEt3oWbS2eT4AzUcpv4wQgYTS8jPuS
dYEXsMeQee20QrzryCx6vi9G6nh1sxpTGBNxKDEGHx29+dCSMVV0RfZXKQ==
-----END PUBLIC KEY-----
";

/// The public point's coordinates, base64url without padding (RFC 7518 §6.2.1), as
/// `openssl ec -pubin -outform DER` gives them: the last 64 bytes of the DER are x ‖ y.
const DEMO_JWK_X: &str = "t3oWbS2eT4AzUcpv4wQgYTS8jPuSdYEXsMeQee20Qrw";
const DEMO_JWK_Y: &str = "68gser4vRup4dbMaUxgTcSgxBh8dvfnQkjFVdEX2Vyk";

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

impl Mock {
    /// The mock for an upstream of this name, if the demo has one.
    fn for_upstream(name: &str) -> Option<Mock> {
        Some(match name {
            "user" => Mock::User,
            "orders" => Mock::Orders,
            "reco" => Mock::Reco,
            "catalog" => Mock::Catalog,
            "app" => Mock::App,
            _ => return None,
        })
    }

    /// A JSON data service: has the control endpoint and the `missing`/`broken` ids.
    fn is_data(&self) -> bool {
        matches!(self, Mock::User | Mock::Orders | Mock::Reco | Mock::Catalog)
    }
}

/// One running mock: what it serves, and the failure mode its control endpoint sets.
struct MockServer {
    /// The upstream name (`reco`), or `jwks`.
    name: String,
    mock: Mock,
    mode: Mutex<Mode>,
}

impl MockServer {
    fn new(name: &str, mock: Mock) -> Self {
        MockServer {
            name: name.to_string(),
            mock,
            mode: Mutex::new(Mode::default()),
        }
    }

    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner) = mode;
    }
}

/// A data mock's failure mode (all off: normal).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Mode {
    /// Answer `503` to every request.
    fail: bool,
    /// Delay every answer by this many milliseconds.
    delay_ms: u64,
    /// Do not answer at all while this is set.
    hang: bool,
}

impl Mode {
    /// The mode a control request's query asks for; what it does not name is off.
    fn from_query(query: &str) -> Result<Mode, String> {
        let mut mode = Mode::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, "1"));
            let flag = || match value {
                "1" | "true" | "on" | "yes" => Ok(true),
                "0" | "false" | "off" | "no" => Ok(false),
                _ => Err(format!("`{key}={value}`: use {key}=1 or {key}=0")),
            };
            match key {
                "fail" => mode.fail = flag()?,
                "hang" => mode.hang = flag()?,
                "delay_ms" => {
                    mode.delay_ms = value
                        .parse()
                        .ok()
                        .filter(|ms| *ms <= MAX_DELAY_MS)
                        .ok_or_else(|| {
                            format!("`delay_ms={value}`: use a number of milliseconds up to {MAX_DELAY_MS}")
                        })?;
                }
                _ => {
                    return Err(format!(
                    "unknown control `{key}`: use fail=1, delay_ms=N, hang=1, or no query to reset"
                ))
                }
            }
        }
        Ok(mode)
    }

    fn to_json(self, mock: &str) -> Value {
        json!({"mock": mock, "fail": self.fail, "delay_ms": self.delay_ms, "hang": self.hang})
    }
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
    let auth = DemoAuth::for_policy(&policy, jsonwebtoken::get_current_timestamp());
    print!(
        "{}",
        banner(&policy, &file.to_string(), listen, admin, &secrets, &auth)
    );
    let status = runtime.block_on(supervise(&mut child, &mut term, &mut int))?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    })
}

/// Binds a mock on the address of every upstream with a known name, and of the JWKS.
fn bind_mocks(policy: &Value) -> Result<Vec<(String, MockServer, StdListener)>, String> {
    let mut mocks = Vec::new();
    let upstreams = policy.get("upstreams").and_then(Value::as_object);
    for (name, spec) in upstreams.into_iter().flatten() {
        let url = spec.get("url").and_then(Value::as_str).unwrap_or("");
        let Some(mock) = Mock::for_upstream(name) else {
            println!("bff demo: note: no built-in mock for upstream `{name}` ({url}); calls to it will fail");
            continue;
        };
        let listener = bind(&format!("upstream `{name}`"), url)?;
        mocks.push((
            format!("{name} {url}"),
            MockServer::new(name, mock),
            listener,
        ));
    }
    if let Some(url) = policy.pointer("/auth/jwt/jwks_url").and_then(Value::as_str) {
        let path = url
            .parse::<http::Uri>()
            .map_or_else(|_| "/".into(), |u| u.path().into());
        let listener = bind("the JWKS", url)?;
        mocks.push((
            format!("JWKS {url}"),
            MockServer::new("jwks", Mock::Jwks(path)),
            listener,
        ));
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

async fn serve(listener: TcpListener, server: Arc<MockServer>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("bff demo: mock accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(handle(&server, &request).await) }
            });
            // A client hanging up mid-answer is nothing to report in a demo.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request to a mock: the control endpoint, else the canned answer in the current mode.
async fn handle<B>(server: &MockServer, request: &Request<B>) -> Response<Body> {
    if !server.mock.is_data() {
        return answer(&server.mock, request);
    }
    if request.uri().path() == CONTROL_PATH {
        return control(server, request);
    }
    // Hanging ends when the mode changes, so `POST /_demo` also frees the requests held so far.
    while server.mode().hang {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mode = server.mode();
    if mode.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(mode.delay_ms)).await;
    }
    if mode.fail {
        return json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": format!("{} is unavailable (demo fail mode; POST {CONTROL_PATH} resets it)", server.name)}),
        );
    }
    answer(&server.mock, request)
}

/// `POST /_demo?…` sets the mode (see the module doc); `GET /_demo` shows it.
fn control<B>(server: &MockServer, request: &Request<B>) -> Response<Body> {
    match *request.method() {
        Method::GET => ok(server.mode().to_json(&server.name)),
        Method::POST => match Mode::from_query(request.uri().query().unwrap_or("")) {
            Ok(mode) => {
                server.set_mode(mode);
                ok(mode.to_json(&server.name))
            }
            Err(e) => json_reply(StatusCode::BAD_REQUEST, json!({"error": e})),
        },
        _ => json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": format!("use POST {CONTROL_PATH}?… to set the mode, GET {CONTROL_PATH} to see it")}),
        ),
    }
}

/// The canned answers. Every object carries internal fields no policy whitelists, so a `curl`
/// through the sidecar shows them gone. Any id `missing` is a 404 and `broken` a torn JSON body.
fn answer<B>(mock: &Mock, request: &Request<B>) -> Response<Body> {
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
    let limit = || limit(request.uri().query().unwrap_or(""));
    let service_token = format!("Bearer {}", demo_secret("USER_SVC_TOKEN"));
    let authorized = request
        .headers()
        .get(AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == service_token.as_bytes());

    match (mock, segments.as_slice()) {
        (Mock::User, _) if !authorized => json_reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong service credential"}),
        ),
        (_, s) if mock.is_data() && s.contains(&"missing") => not_found(),
        (_, s) if mock.is_data() && s.contains(&"broken") => {
            let torn = if matches!(mock, Mock::Orders) {
                "{\"orderId\": "
            } else {
                "{\"id\": "
            };
            reply(StatusCode::OK, "application/json", full(torn))
        }
        (Mock::User, ["users", id]) => ok(user_document(id)),
        (Mock::Orders, ["users", id, "orders"]) => match limit() {
            Ok(n) => {
                ok(json!({"orders": (0..n).map(|i| order_summary(id, i)).collect::<Vec<_>>()}))
            }
            Err(e) => json_reply(StatusCode::BAD_REQUEST, json!({"error": e})),
        },
        (Mock::Orders, ["orders", id]) => ok(order_document(id)),
        (Mock::Reco, ["users", _, "recommendations"] | ["products", _, "similar"]) => {
            match limit() {
                Ok(n) => ok(json!({"items": (0..n).map(recommendation).collect::<Vec<_>>()})),
                Err(e) => json_reply(StatusCode::BAD_REQUEST, json!({"error": e})),
            }
        }
        (Mock::Catalog, ["products", id]) => ok(product_document(id)),
        (Mock::App, [""]) => reply(StatusCode::OK, "text/html; charset=utf-8", full(APP_PAGE)),
        (Mock::App, ["events"]) => events(),
        (Mock::App, _) => reply(StatusCode::NOT_FOUND, "text/plain", full("not found\n")),
        (Mock::Jwks(path), _) if request.uri().path() == path => ok(demo_jwks()),
        _ => not_found(),
    }
}

/// A list endpoint's `?limit=N`: [`DEFAULT_LIMIT`] without one, an error when it is not a
/// number up to [`MAX_LIMIT`].
fn limit(query: &str) -> Result<usize, String> {
    let Some(value) = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("limit="))
    else {
        return Ok(DEFAULT_LIMIT);
    };
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n <= MAX_LIMIT)
        .ok_or_else(|| format!("limit must be a number from 0 to {MAX_LIMIT}"))
}

/// The user service's document: 40 fields, of which a client needs 4 (`userId`,
/// `displayName`, `avatarUrl`, `loyaltyTier`); the other 36 must never leave the sidecar.
fn user_document(id: &str) -> Value {
    json!({
        "userId": id,
        "displayName": "Ada Lovelace",
        "avatarUrl": "https://cdn.example.com/avatars/ada.png",
        "loyaltyTier": "gold",
        // Internal from here on.
        "email": "ada.lovelace@example.com",
        "emailVerified": true,
        "phone": "+44 20 7946 0958",
        "phoneVerified": true,
        "dateOfBirth": "1815-12-10",
        "locale": "en-GB",
        "timezone": "Europe/London",
        "currency": "GBP",
        "addresses": [
            {"type": "home", "line1": "12 St James's Square", "city": "London",
             "postcode": "SW1Y 4JH", "country": "GB", "doorCode": "4711"},
            {"type": "work", "line1": "Ockham Park", "city": "Ripley", "postcode": "GU23 6NP",
             "country": "GB", "doorCode": null},
        ],
        "defaultPaymentMethodId": "pm_1NcL8x2eZvKYlo2C",
        "savedCards": [{"brand": "visa", "last4": "4242", "expiry": "2028-07", "fingerprint": "fp_8c1d0e"}],
        "fraudScore": 0.07,
        "fraudReviewStatus": "cleared",
        "riskFlags": ["high_value_buyer"],
        "internalSegmentTag": "seg-whale-eu-2026q2",
        "abTestBuckets": {"checkout-v3": "treatment", "reco-model": "b"},
        "marketingOptIn": false,
        "consent": {"version": "2026-01", "grantedAt": "2026-01-14T09:12:44Z", "ip": "203.0.113.24"},
        "accountStatus": "active",
        "kycStatus": "verified",
        "taxId": "GB987654321",
        "createdAt": "2019-03-02T18:40:11Z",
        "updatedAt": "2026-05-30T07:01:09Z",
        "lastLoginAt": "2026-06-01T06:58:30Z",
        "lastLoginIp": "203.0.113.24",
        "mfaEnabled": true,
        "passwordUpdatedAt": "2025-11-20T21:05:00Z",
        "lifetimeValue": 18_422.9,
        "orderCount": 137,
        "returnRate": 0.04,
        "loyaltyPoints": 12_840,
        "supportTier": "priority",
        "internalNotes": "VIP; goodwill credit issued in March",
        "crmId": "crm-00418823",
        "legacyAccountId": "LA-1843-0007",
        "pushTokens": ["fcm:dK3x9Q7v0:APA91bH"],
    })
}

/// The `i`th order in a user's order list.
fn order_summary(user: &str, i: usize) -> Value {
    let statuses = ["shipped", "processing", "delivered", "out_for_delivery"];
    json!({
        "orderId": format!("o-{}", 1001 + i),
        "status": statuses[i % statuses.len()],
        "estimatedDelivery": format!("2026-12-{:02}", 1 + i % 28),
        "itemCount": 1 + i % 4,
        // Internal from here on.
        "customerId": user,
        "customerEmail": "ada.lovelace@example.com",
        "costPrice": 41.5 + i as f64,
        "marginPct": 31.0 - i as f64,
        "warehouseId": format!("wh-eu-{}", 3 + i % 2),
        "carrierAccountId": "dhl-acct-778201",
        "paymentTransactionId": format!("txn_9f2c{:04}", 17 + i),
        "fulfilmentPriority": if i == 0 { "express" } else { "standard" },
        "fraudCheck": {"score": 0.02, "reviewer": null},
    })
}

/// One order, with its items.
fn order_document(id: &str) -> Value {
    json!({
        "orderId": id, "status": "shipped", "estimatedDelivery": "2026-12-01",
        "items": [
            {"title": "Analytical Engine, scale model", "sku": "AE-1843", "costPrice": 41.5},
            {"title": "Punched cards, pack of 100", "sku": "PC-100", "costPrice": 3.2},
        ],
        "customerEmail": "ada.lovelace@example.com", "warehouseId": "wh-eu-3",
        "paymentTransactionId": "txn_9f2c0017", "carrierAccountId": "dhl-acct-778201",
    })
}

/// The catalog: product `p-N` is entry N (1-based, wrapping): title and price in cents.
const PRODUCTS: [(&str, u32); 8] = [
    ("Analytical Engine, scale model", 12_900),
    ("Difference Engine kit", 4_900),
    ("Brass gear set", 1_900),
    ("Jacquard loom poster", 2_400),
    ("Punched cards, pack of 100", 900),
    ("Arithmometer, 1820 replica", 8_900),
    ("Notes on the Analytical Engine, facsimile", 3_500),
    ("Cogwheel bookends", 5_400),
];

fn product(id: &str) -> (&'static str, String) {
    let n = id
        .strip_prefix("p-")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| id.bytes().map(usize::from).sum());
    let (title, cents) = PRODUCTS[n.wrapping_sub(1) % PRODUCTS.len()];
    (title, format!("€{}.{:02}", cents / 100, cents % 100))
}

/// The `i`th recommended product: `p-1`, `p-2`, … (the ids the catalog knows).
fn recommendation(i: usize) -> Value {
    let id = format!("p-{}", 1 + i);
    let (title, price) = product(&id);
    json!({
        "productId": id,
        "thumbnailUrl": format!("https://cdn.example.com/p/{id}/thumb.jpg"),
        "title": title,
        "priceFormatted": price,
        // Internal from here on.
        "marginScore": 0.62 - 0.04 * i as f64,
        "score": (97 - 3 * i as i64) as f64 / 100.0,
        "modelVersion": "reco-2026.05",
        "experimentArm": "b",
        "supplierId": format!("sup-{}", 300 + i % 5),
        "stockLevel": 40 + 7 * i,
    })
}

/// One catalog product.
fn product_document(id: &str) -> Value {
    let (title, price) = product(id);
    json!({
        "id": id, "title": title, "priceFormatted": price,
        "images": [
            {"url": format!("https://cdn.example.com/p/{id}/front.jpg"), "width": 1200},
            {"url": format!("https://cdn.example.com/p/{id}/side.jpg"), "width": 800},
            {"url": format!("https://cdn.example.com/p/{id}/detail.jpg"), "width": 800},
        ],
        "seller": {"name": "Babbage & Co.", "taxId": "GB123456789", "payoutAccount": "GB29NWBK60161331926819"},
        // Internal from here on.
        "costPrice": 41.5,
        "marginPct": 67.8,
        "supplierId": "sup-301",
        "supplierContractId": "ctr-2026-0042",
        "warehouseId": "wh-eu-3",
        "stockLevel": 57,
        "internalCategoryCode": "HIST-MECH-07",
        "lastRepricedBy": "pricing-bot-3",
    })
}

/// The JWKS mock's document: the demo's public key.
fn demo_jwks() -> Value {
    json!({"keys": [{
        "kty": "EC", "crv": "P-256", "x": DEMO_JWK_X, "y": DEMO_JWK_Y,
        "kid": DEMO_KEY_ID, "alg": "ES256", "use": "sig",
    }]})
}

/// The credentials the banner prints, or why there are none.
#[derive(Debug, PartialEq)]
enum DemoAuth {
    /// The policy has no `auth.jwt`: no token needed.
    Open,
    /// One token for [`DEMO_SUB`] and one for [`WALK_SUB`], and how they are signed.
    Tokens {
        main: String,
        walk: String,
        signed: String,
    },
    /// The policy takes partner API keys: the demo's key, and the header it goes in.
    ApiKey { header: String },
    /// The demo cannot sign a token this policy accepts, for this reason.
    Unavailable(String),
}

impl DemoAuth {
    fn for_policy(policy: &Value, now: u64) -> DemoAuth {
        if let Some(header) = policy
            .pointer("/auth/api_key/header")
            .and_then(Value::as_str)
        {
            return DemoAuth::ApiKey {
                header: header.to_string(),
            };
        }
        let Some(jwt) = policy.pointer("/auth/jwt") else {
            return DemoAuth::Open;
        };
        let tokens = demo_token(jwt, DEMO_SUB, now)
            .and_then(|(main, signed)| Ok((main, demo_token(jwt, WALK_SUB, now)?.0, signed)));
        match tokens {
            Ok((main, walk, signed)) => DemoAuth::Tokens { main, walk, signed },
            Err(why) => DemoAuth::Unavailable(why),
        }
    }
}

/// A token for `sub` that the policy's `auth.jwt` accepts: ES256 with the demo key when the keys
/// come from `jwks_url` (the demo's JWKS mock), HS256 when the policy has `hs256_secret`. Also
/// says how it is signed.
fn demo_token(jwt: &Value, sub: &str, now: u64) -> Result<(String, String), String> {
    let mut claims = json!({
        "sub": sub, "iat": now, "exp": now + TOKEN_TTL_SECS, "scope": "profile orders",
    });
    for (claim, setting) in [("iss", "issuer"), ("aud", "audience")] {
        if let Some(value) = jwt.get(setting) {
            claims[claim] = value.clone();
        }
    }
    let allows = |alg: &str| {
        jwt.get("algorithms")
            .and_then(Value::as_array)
            .is_none_or(|algs| algs.iter().any(|a| a.as_str() == Some(alg)))
    };
    let (header, key, signed) = if let Some(secret) = jwt.get("hs256_secret") {
        let secret = secret.as_str().unwrap_or("");
        let secret = match secret
            .strip_prefix("${env:")
            .and_then(|s| s.strip_suffix('}'))
        {
            Some(name) => demo_secret(name),
            None if secret.contains("${") => {
                return Err(format!(
                    "`hs256_secret: {secret}` is not a value the demo sets"
                ))
            }
            None => secret.to_string(),
        };
        (
            Header::new(Algorithm::HS256),
            EncodingKey::from_secret(secret.as_bytes()),
            "HS256 with the policy's hs256_secret".to_string(),
        )
    } else if jwt.get("jwks_url").is_some() {
        if !allows("ES256") {
            return Err(
                "the policy's `auth.jwt.algorithms` does not allow ES256, the demo key's algorithm"
                    .into(),
            );
        }
        let key = EncodingKey::from_ec_pem(DEMO_PRIVATE_KEY_PEM.as_bytes())
            .map_err(|e| format!("the demo key does not load: {e}"))?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(DEMO_KEY_ID.to_string());
        (
            header,
            key,
            format!("ES256 with the demo key `{DEMO_KEY_ID}` the JWKS mock serves"),
        )
    } else {
        return Err(
            "the policy's keys are not served by the demo (only `jwks_url` and `hs256_secret` are)"
                .into(),
        );
    };
    let token = jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| format!("cannot sign the demo token: {e}"))?;
    Ok((token, signed))
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
    /// An aggregated route's fetches, in policy order.
    fetches: Vec<FetchInfo<'a>>,
    spec: &'a Value,
}

/// One fetch of an aggregated route.
struct FetchInfo<'a> {
    /// The section name (`recommendations`).
    name: &'a str,
    upstream: &'a str,
    path: &'a str,
    critical: bool,
}

impl<'a> RouteInfo<'a> {
    fn new(spec: &'a Value) -> Self {
        let fetches: Vec<FetchInfo> = spec
            .get("fetch")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(name, f)| FetchInfo {
                name,
                upstream: str_at(f, "/upstream").unwrap_or(""),
                path: str_at(f, "/path").unwrap_or("/"),
                critical: f.get("critical").and_then(Value::as_bool) == Some(true),
            })
            .collect();
        RouteInfo {
            name: str_at(spec, "/name").unwrap_or("?"),
            method: str_at(spec, "/method").unwrap_or("GET"),
            path: str_at(spec, "/path").unwrap_or("/"),
            upstream: str_at(spec, "/proxy/upstream")
                .or_else(|| fetches.first().map(|f| f.upstream))
                .unwrap_or(""),
            proxy_path: str_at(spec, "/proxy/path"),
            fetches,
            spec,
        }
    }

    /// The route's path with a sample id the mocks know in every `{param}`.
    fn sample_path(&self) -> String {
        fill(self.path, sample_id(self.upstream))
    }
}

/// What the demo prints once the sidecar is ready: demo tokens, then curl commands for this
/// policy's routes, a walk-through of degradation and the admin port.
fn banner(
    policy: &Value,
    file: &str,
    listen: &str,
    admin: &str,
    secrets: &[String],
    auth: &DemoAuth,
) -> String {
    let routes: Vec<RouteInfo> = policy
        .get("routes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(RouteInfo::new)
        .collect();
    let base = format!("http://{listen}");
    // The curl option that sends the client's credential, when the policy wants one.
    let credential = |token: &str| match auth {
        DemoAuth::Tokens { .. } => format!(" -H \"Authorization: Bearer {token}\""),
        DemoAuth::ApiKey { header } => format!(" -H \"{header}: {DEMO_API_KEY}\""),
        _ => String::new(),
    };
    // A curl to the sidecar, with the client's credential.
    let with_token = |method: &str, path: &str, token: &str| {
        let flag = if method == "GET" {
            String::new()
        } else {
            format!("-X {method} ")
        };
        format!("  curl -i {flag}{base}{path}{}\n", credential(token))
    };
    let curl = |method: &str, path: &str| with_token(method, path, "$TOKEN");

    let client = str_at(policy, "/client").unwrap_or("?");
    let mut out = format!(
        "\nbff demo: the `{client}` sidecar ({file}) is ready on {base}, admin on http://{admin}\n"
    );
    for name in secrets {
        out += &format!("  it was given {name}={}\n", demo_secret(name));
    }
    match auth {
        DemoAuth::Open => {}
        DemoAuth::Tokens { main, walk, signed } => {
            out += &format!(
                "\nDemo tokens ({signed}; valid {} min, restart the demo for fresh ones).\n\
                 Paste these two lines first: the curls below use them.\n",
                TOKEN_TTL_SECS / 60
            );
            out += &format!("  TOKEN={main}\n  TOKEN2={walk}\n");
            out += &format!(
                "  # TOKEN is user {DEMO_SUB}; TOKEN2 is user {WALK_SUB}, for the degradation walk-through\n"
            );
        }
        DemoAuth::ApiKey { header } => {
            out += &format!(
                "\nDemo partner key: {DEMO_API_KEY} (sent in {header}; the keys file holds only its SHA-256).\n"
            );
        }
        DemoAuth::Unavailable(why) => {
            out += &format!("\nNo demo token: {why}. Routes behind auth answer 401.\n");
        }
    }

    out += "\nTry:\n";
    let aggregated: Vec<&RouteInfo> = routes.iter().filter(|r| !r.fetches.is_empty()).collect();
    for (i, route) in aggregated.iter().enumerate() {
        let sections: Vec<String> = route
            .fetches
            .iter()
            .map(|f| {
                let kind = if f.critical { ", critical" } else { "" };
                format!("{} (`{}`{kind})", f.name, f.upstream)
            })
            .collect();
        let how = if sections.len() > 1 {
            "fetched concurrently, each projected to its whitelist"
        } else {
            "projected to its whitelist"
        };
        out += &format!("  # {}: {} {how}\n", route.name, sections.join(", "));
        if let Some(cache) = route.spec.get("cache") {
            let scope = str_at(cache, "/scope").unwrap_or("?");
            let ttl = str_at(cache, "/ttl").unwrap_or("?");
            let scope = if scope == "user" {
                "per user"
            } else {
                "for everyone"
            };
            out += &format!("  #   the policy caches it {scope} for {ttl}: see `meta.cache`\n");
        }
        // The first curl stands alone: the token itself, not the shell variable.
        out += &match (i, auth) {
            (0, DemoAuth::Tokens { main, .. }) => {
                with_token(route.method, &route.sample_path(), main)
            }
            _ => curl(route.method, &route.sample_path()),
        };
        if let Some((fetch, direct)) = route
            .fetches
            .iter()
            .find_map(|f| Some((f, direct_curl(policy, f.upstream, f.path)?)))
        {
            out += &format!(
                "  #   the raw `{}` answer behind `{}`, before projection:\n{direct}",
                fetch.upstream, fetch.name
            );
        }
    }

    let proxies = routes.iter().filter(|r| r.proxy_path.is_some());
    for (i, route) in proxies.enumerate() {
        let sample = sample_id(route.upstream);
        let path = fill(route.path, sample);
        out += &format!(
            "  # {}: proxied to `{}`, answer projected: fields outside the whitelist never leave\n",
            route.name, route.upstream
        );
        out += &curl(route.method, &path);
        if let Some(direct) = route
            .proxy_path
            .and_then(|p| direct_curl(policy, route.upstream, &fill_template(p, sample)))
        {
            out += &format!("  #   the same object straight from the mock, unprojected:\n{direct}");
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
    if let (DemoAuth::Tokens { .. } | DemoAuth::ApiKey { .. }, Some(route)) = (auth, routes.first())
    {
        out += "  # no credential → the 401 envelope\n";
        out += &format!("  curl -i {base}{}\n", route.sample_path());
    }
    match str_at(policy, "/fallthrough") {
        Some(app) => {
            out += &format!("  # anything else falls through to `{app}` unchanged, streams too\n");
            out += &curl("GET", "/");
            out += &format!("  curl -N {base}/events{}\n", credential("$TOKEN"));
        }
        None => {
            out += "  # no fallthrough: anything else is the 404 envelope\n";
            out += &curl("GET", "/no/such/page");
        }
    }

    let walk_note = match auth {
        DemoAuth::Tokens { .. } => {
            "These use TOKEN2: the policy caches a complete page per user, and a hit would hide the failure.\n"
        }
        _ => "",
    };
    out += &degrade_walk(policy, &aggregated, walk_note, |path| {
        with_token("GET", path, "$TOKEN2")
    });
    out += &format!(
        "\nThe admin port (bff_degraded_responses_total counts the degradations):\n  \
         curl -s http://{admin}/metrics | grep bff_\n  curl -s http://{admin}/policy\n"
    );
    out += "\nCtrl-C stops the demo.\n\n";
    out
}

/// "Watch it degrade": steps that break the mocks behind the first aggregated GET route with an
/// optional fetch, and the curl that shows what the client gets each time. Empty when no route
/// fits.
fn degrade_walk(
    policy: &Value,
    aggregated: &[&RouteInfo],
    note: &str,
    curl: impl Fn(&str) -> String,
) -> String {
    let has_mock = |upstream: &str| Mock::for_upstream(upstream).is_some_and(|m| m.is_data());
    let timeout = |upstream: &str| {
        str_at(policy, &format!("/upstreams/{upstream}/timeout"))
            .and_then(|t| humantime::parse_duration(t).ok().map(|d| (t, d)))
    };
    let Some((route, optional)) = aggregated
        .iter()
        .filter(|r| r.method == "GET")
        .find_map(|r| {
            // The optional fetch likeliest to time out: the one with the shortest timeout.
            let optional = r
                .fetches
                .iter()
                .filter(|f| !f.critical && has_mock(f.upstream))
                .min_by_key(|f| timeout(f.upstream).map_or(Duration::MAX, |(_, d)| d))?;
            Some((r, optional))
        })
    else {
        return String::new();
    };
    let control = |upstream: &str, query: &str| {
        let origin = str_at(policy, &format!("/upstreams/{upstream}/url"))
            .and_then(origin)
            .unwrap_or_default();
        if query.is_empty() {
            format!("  curl -s -X POST {origin}{CONTROL_PATH}; echo\n")
        } else {
            format!("  curl -s -X POST '{origin}{CONTROL_PATH}?{query}'; echo\n")
        }
    };
    let page = curl(&route.sample_path());
    let (section, upstream) = (optional.name, optional.upstream);

    let mut out = format!(
        "\nWatch it degrade. Every data mock obeys control requests on its own port:\n\
         POST {CONTROL_PATH}?fail=1 (answer 503), ?delay_ms=N (answer N ms late), ?hang=1 (never \
         answer), combined as ?fail=1&delay_ms=300; POST {CONTROL_PATH} alone is back to normal.\n{note}"
    );
    out += &format!(
        "  # 1. `{upstream}` fails: still 200, with meta.degraded: true, X-BFF-Degraded: {section}, and {section} holds its fallback\n"
    );
    out += &control(upstream, "fail=1");
    out += &page;
    let delay = timeout(upstream).map_or(500, |(_, d)| {
        u64::try_from(d.as_millis())
            .unwrap_or(0)
            .saturating_add(300)
    });
    let (slower, after) = timeout(upstream).map_or_else(
        || {
            (
                "slower than its timeout".to_string(),
                "at the timeout".to_string(),
            )
        },
        |(t, _)| (format!("slower than its {t} timeout"), format!("after {t}")),
    );
    out += &format!(
        "  # 2. `{upstream}` {slower}: the same fallback, {after} rather than {delay}ms (meta.latencyMs); then reset it\n"
    );
    out += &control(upstream, &format!("delay_ms={delay}"));
    out += &page;
    out += &control(upstream, "");
    if let Some(critical) = route
        .fetches
        .iter()
        .find(|f| f.critical && has_mock(f.upstream))
    {
        let status = route
            .spec
            .pointer("/on_critical_failure/status")
            .and_then(Value::as_u64)
            .unwrap_or(503);
        let code =
            str_at(route.spec, "/on_critical_failure/code").unwrap_or("DEPENDENCY_UNAVAILABLE");
        out += &format!(
            "  # 3. `{}` is critical: when it fails the whole answer is the {status} {code} envelope\n",
            critical.upstream
        );
        out += &control(critical.upstream, "fail=1");
        out += &page;
        out += "  # 4. back to normal: a complete page again\n";
        out += &control(critical.upstream, "");
        out += &page;
    }
    out
}

/// A curl straight to an upstream's mock at `path` (a fetch or proxy path template), with the
/// sidecar's machine credential if the upstream needs one. None when the template has inputs the
/// demo cannot fill or the upstream has no data mock.
fn direct_curl(policy: &Value, upstream: &str, template: &str) -> Option<String> {
    if !Mock::for_upstream(upstream)?.is_data() {
        return None;
    }
    let path = fill_template(
        &template.replace("{jwt.sub}", DEMO_SUB),
        sample_id(upstream),
    );
    if path.contains('{') {
        return None;
    }
    let url = str_at(policy, &format!("/upstreams/{upstream}/url"))?.trim_end_matches('/');
    let spec = policy.pointer(&format!("/upstreams/{upstream}/credential"));
    let credential = match spec.map(|c| (str_at(c, "/header"), str_at(c, "/value"))) {
        None => String::new(),
        Some((Some(header), Some(value))) => {
            let value = fill_env(value)?;
            format!(" -H '{header}: {value}'")
        }
        Some(_) => return None,
    };
    let quote = if path.contains(['?', '&']) { "'" } else { "" };
    Some(format!(
        "  curl -s{credential} {quote}{url}{path}{quote}; echo\n"
    ))
}

/// A policy value with every `${env:NAME}` set to the demo's secret; None if it reads a file.
fn fill_env(value: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let (name, after) = rest[start..].strip_prefix("${env:")?.split_once('}')?;
        out += &demo_secret(name);
        rest = after;
    }
    Some(out + rest)
}

/// `scheme://host:port` of a URL: where a mock listens, whatever path the upstream URL has.
fn origin(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// An id the mocks know for the route's upstream.
fn sample_id(upstream: &str) -> &'static str {
    match upstream {
        "orders" => "o-1001",
        "catalog" | "reco" => "p-1",
        "user" => DEMO_SUB,
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

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
    use jsonwebtoken::{DecodingKey, Validation};

    fn mobile_policy() -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/mobile.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        serde_saphyr::from_str(&text).unwrap()
    }

    fn json_body(response: Response<Body>) -> Value {
        let bytes = futures::executor::block_on(response.into_body().collect())
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn get(mock: &Mock, uri: &str) -> Response<Body> {
        let request = Request::get(uri)
            .header(AUTHORIZATION, "Bearer demo-user-svc-token")
            .body(())
            .unwrap();
        answer(mock, &request)
    }

    fn validation(algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&["https://id.example.com/"]);
        validation.set_audience(&["mobile-app"]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation
    }

    #[test]
    fn served_jwk_verifies_a_token_signed_by_the_demo_key() {
        let jwks: JwkSet = serde_json::from_value(demo_jwks()).unwrap();
        let jwk = jwks.find(DEMO_KEY_ID).unwrap();
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let policy = mobile_policy();
        let DemoAuth::Tokens { main, walk, .. } = DemoAuth::for_policy(&policy, now) else {
            panic!("no demo token for policies/mobile.yaml");
        };
        for (token, sub) in [(main, DEMO_SUB), (walk, WALK_SUB)] {
            let data =
                jsonwebtoken::decode::<Value>(&token, &key, &validation(Algorithm::ES256)).unwrap();
            assert_eq!(data.header.alg, Algorithm::ES256);
            assert_eq!(data.header.kid.as_deref(), Some(DEMO_KEY_ID));
            let claims = data.claims;
            assert_eq!(claims["sub"], sub);
            assert_eq!(claims["iss"], "https://id.example.com/");
            assert_eq!(claims["aud"], "mobile-app");
            assert_eq!(claims["scope"], "profile orders");
            assert_eq!(claims["iat"], now);
            assert_eq!(claims["exp"], now + 3600);
        }
    }

    #[test]
    fn served_jwk_is_the_demo_key_pair() {
        let served = &demo_jwks()["keys"][0];
        for (field, value) in [
            ("kty", "EC"),
            ("crv", "P-256"),
            ("kid", "demo-1"),
            ("alg", "ES256"),
            ("use", "sig"),
        ] {
            assert_eq!(served[field], value, "{field}");
        }
        // The coordinates jsonwebtoken derives from the private key are the hard-coded ones.
        let private = EncodingKey::from_ec_pem(DEMO_PRIVATE_KEY_PEM.as_bytes()).unwrap();
        let derived = Jwk::from_encoding_key(&private, Algorithm::ES256).unwrap();
        let AlgorithmParameters::EllipticCurve(ec) = derived.algorithm else {
            panic!("not an EC key: {derived:?}");
        };
        assert_eq!((ec.x.as_str(), ec.y.as_str()), (DEMO_JWK_X, DEMO_JWK_Y));
        // And the public PEM is the same key: it verifies what the private key signs.
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &json!({"iss": "https://id.example.com/", "aud": "mobile-app", "sub": "s", "exp": u64::MAX / 2}),
            &private,
        )
        .unwrap();
        let public = DecodingKey::from_ec_pem(DEMO_PUBLIC_KEY_PEM.as_bytes()).unwrap();
        jsonwebtoken::decode::<Value>(&token, &public, &validation(Algorithm::ES256)).unwrap();
    }

    #[test]
    fn no_token_for_a_policy_the_demo_key_cannot_satisfy() {
        let rs256_only = json!({"auth": {"jwt": {
            "issuer": "https://id.example.com/", "audience": "partner-api",
            "algorithms": ["RS256"], "jwks_url": "http://127.0.0.1:9100/jwks.json",
        }}});
        assert!(matches!(
            DemoAuth::for_policy(&rs256_only, 0),
            DemoAuth::Unavailable(why) if why.contains("ES256")
        ));
        let jwks_file = json!({"auth": {"jwt": {"jwks_file": "/etc/keys.json"}}});
        assert!(matches!(
            DemoAuth::for_policy(&jwks_file, 0),
            DemoAuth::Unavailable(_)
        ));
        assert!(matches!(
            DemoAuth::for_policy(&json!({}), 0),
            DemoAuth::Open
        ));
    }

    #[test]
    fn the_partner_policy_takes_the_demo_key() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let text = std::fs::read_to_string(dir.join("partner.yaml")).unwrap();
        let policy: Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            DemoAuth::for_policy(&policy, 0),
            DemoAuth::ApiKey {
                header: "X-Api-Key".into()
            }
        );
        let keys = crate::policy::api_keys::ApiKeySet::read(&dir.join("partner-keys.txt")).unwrap();
        assert_eq!(keys.find(DEMO_API_KEY.as_bytes()).as_deref(), Some("demo"));
    }

    #[test]
    fn hs256_tokens_use_the_demo_secret() {
        let policy = json!({"auth": {"jwt": {
            "issuer": "https://id.example.com/", "audience": "mobile-app",
            "algorithms": ["HS256"], "hs256_secret": "${env:JWT_SECRET}",
        }}});
        let now = jsonwebtoken::get_current_timestamp();
        let DemoAuth::Tokens { main, .. } = DemoAuth::for_policy(&policy, now) else {
            panic!("no HS256 token");
        };
        let key = DecodingKey::from_secret(b"demo-jwt-secret");
        let data = jsonwebtoken::decode::<Value>(&main, &key, &validation(Algorithm::HS256));
        assert_eq!(data.unwrap().claims["sub"], DEMO_SUB);
    }

    #[test]
    fn user_document_has_forty_fields_four_of_them_public() {
        let user = json_body(get(&Mock::User, "/users/usr_9821"));
        let fields = user.as_object().unwrap();
        assert_eq!(fields.len(), 40, "{:?}", fields.keys().collect::<Vec<_>>());
        assert_eq!(user["userId"], "usr_9821");
        for field in ["displayName", "avatarUrl", "loyaltyTier", "email", "phone"] {
            assert!(user.get(field).is_some(), "{field}");
        }
        for field in ["fraudScore", "internalSegmentTag", "addresses"] {
            assert!(user.get(field).is_some(), "{field}");
        }
        // The machine credential is still required.
        let anonymous = Request::get("/users/usr_9821").body(()).unwrap();
        assert_eq!(
            answer(&Mock::User, &anonymous).status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn lists_respect_limit() {
        let orders = json_body(get(&Mock::Orders, "/users/usr_9821/orders?limit=3"));
        let orders = orders["orders"].as_array().unwrap();
        assert_eq!(orders.len(), 3);
        for field in [
            "orderId",
            "status",
            "estimatedDelivery",
            "itemCount",
            "costPrice",
            "warehouseId",
        ] {
            assert!(orders[0].get(field).is_some(), "{field}");
        }
        let items = json_body(get(&Mock::Reco, "/users/usr_9821/recommendations?limit=6"));
        let items = items["items"].as_array().unwrap();
        assert_eq!(items.len(), 6);
        for field in [
            "productId",
            "thumbnailUrl",
            "title",
            "priceFormatted",
            "marginScore",
        ] {
            assert!(items[0].get(field).is_some(), "{field}");
        }
        let none = json_body(get(&Mock::Reco, "/users/u/recommendations?limit=0"));
        assert_eq!(none["items"], json!([]));
        let unlimited = json_body(get(&Mock::Orders, "/users/u/orders"));
        assert_eq!(unlimited["orders"].as_array().unwrap().len(), DEFAULT_LIMIT);
        for bad in ["limit=x", "limit=-1", "limit=101"] {
            let response = get(&Mock::Orders, &format!("/users/u/orders?{bad}"));
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn catalog_and_order_answers() {
        let product = json_body(get(&Mock::Catalog, "/products/p-1"));
        assert_eq!(product["id"], "p-1");
        assert_eq!(product["title"], "Analytical Engine, scale model");
        assert_eq!(product["priceFormatted"], "€129.00");
        assert!(product["images"][0]["url"].is_string());
        assert!(product["images"][0]["width"].is_number());
        assert_eq!(product["seller"]["name"], "Babbage & Co.");
        assert!(product["seller"]["taxId"].is_string());
        assert!(product.get("costPrice").is_some());
        // Recommendations name products the catalog knows, with the same title.
        let items = json_body(get(&Mock::Reco, "/users/u/recommendations?limit=1"));
        assert_eq!(items["items"][0]["productId"], "p-1");
        assert_eq!(items["items"][0]["title"], product["title"]);

        let order = json_body(get(&Mock::Orders, "/orders/o-1001"));
        assert_eq!(order["orderId"], "o-1001");
        assert!(order["items"][0]["title"].is_string());
        assert_eq!(
            get(&Mock::Orders, "/orders/missing").status(),
            StatusCode::NOT_FOUND
        );
        let torn = get(&Mock::Orders, "/orders/broken");
        assert_eq!(torn.status(), StatusCode::OK);
        let bytes = futures::executor::block_on(torn.into_body().collect())
            .unwrap()
            .to_bytes();
        assert!(serde_json::from_slice::<Value>(&bytes).is_err());
        for mock in [Mock::User, Mock::Orders, Mock::Reco, Mock::Catalog] {
            let response = get(&mock, "/no/such/path");
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
            assert_eq!(json_body(response)["error"], "not found");
        }
    }

    #[test]
    fn control_query_sets_the_whole_mode() {
        assert_eq!(Mode::from_query(""), Ok(Mode::default()));
        assert_eq!(
            Mode::from_query("fail=1&delay_ms=300"),
            Ok(Mode {
                fail: true,
                delay_ms: 300,
                hang: false
            })
        );
        assert_eq!(
            Mode::from_query("hang=1"),
            Ok(Mode {
                hang: true,
                ..Mode::default()
            })
        );
        for bad in [
            "fail=maybe",
            "delay_ms=soon",
            "delay_ms=600001",
            "explode=1",
        ] {
            assert!(Mode::from_query(bad).is_err(), "{bad}");
        }
    }

    /// One HTTP/1.1 exchange with a mock: the status and the body.
    async fn call(address: std::net::SocketAddr, method: &str, target: &str) -> (u16, Value) {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let request = format!(
            "{method} {target} HTTP/1.1\r\nHost: mock\r\nAuthorization: Bearer demo-user-svc-token\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let text = String::from_utf8(answer).unwrap();
        let status = text[9..12].parse().unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        (status, serde_json::from_str(body).unwrap())
    }

    #[tokio::test]
    async fn control_endpoint_fails_delays_hangs_and_resets() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(MockServer::new("reco", Mock::Reco)),
        ));
        let items = "/users/usr_9821/recommendations?limit=2";

        let (status, mode) = call(address, "POST", "/_demo?fail=1").await;
        assert_eq!(status, 200);
        assert_eq!(
            mode,
            json!({"mock": "reco", "fail": true, "delay_ms": 0, "hang": false})
        );
        assert_eq!(call(address, "GET", items).await.0, 503);
        assert_eq!(call(address, "GET", "/_demo").await.1["fail"], true);

        call(address, "POST", "/_demo?fail=1&delay_ms=150").await;
        let started = Instant::now();
        assert_eq!(call(address, "GET", items).await.0, 503);
        assert!(started.elapsed() >= Duration::from_millis(150));

        call(address, "POST", "/_demo?hang=1").await;
        let held = tokio::spawn(async move { call(address, "GET", items).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!held.is_finished(), "a hanging mock answered");
        // Resetting frees the held request, which is then answered normally.
        let (status, mode) = call(address, "POST", "/_demo").await;
        assert_eq!((status, mode["hang"].clone()), (200, json!(false)));
        let (status, body) = tokio::time::timeout(Duration::from_secs(2), held)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["items"].as_array().unwrap().len(), 2);

        let (status, body) = call(address, "POST", "/_demo?bogus=1").await;
        assert_eq!(status, 400);
        assert!(body["error"].as_str().unwrap().contains("bogus"));
        assert_eq!(call(address, "GET", items).await.0, 200);
    }

    #[test]
    fn banner_prints_tokens_curls_and_the_degradation_walk() {
        let policy = mobile_policy();
        let auth = DemoAuth::for_policy(&policy, jsonwebtoken::get_current_timestamp());
        let DemoAuth::Tokens { main, .. } = &auth else {
            panic!("no demo token");
        };
        let secrets = vec!["USER_SVC_TOKEN".to_string()];
        let out = banner(
            &policy,
            "policies/mobile.yaml",
            "127.0.0.1:8080",
            "127.0.0.1:9901",
            &secrets,
            &auth,
        );
        let expect = [
            format!("TOKEN={main}\n"),
            format!(
                "curl -i http://127.0.0.1:8080/mobile/v1/home -H \"Authorization: Bearer {main}\"\n"
            ),
            "curl -s -H 'Authorization: Bearer demo-user-svc-token' http://127.0.0.1:9101/users/usr_9821".into(),
            "curl -i http://127.0.0.1:8080/mobile/v1/products/p-1 -H \"Authorization: Bearer $TOKEN\"\n".into(),
            "curl -i http://127.0.0.1:8080/mobile/v1/orders/o-1001 -H \"Authorization: Bearer $TOKEN\"\n".into(),
            "curl -s -X POST 'http://127.0.0.1:9103/_demo?fail=1'".into(),
            "curl -i http://127.0.0.1:8080/mobile/v1/home -H \"Authorization: Bearer $TOKEN2\"\n".into(),
            "X-BFF-Degraded: recommendations".into(),
            "curl -s -X POST 'http://127.0.0.1:9103/_demo?delay_ms=500'".into(),
            "slower than its 200ms timeout".into(),
            "curl -s -X POST http://127.0.0.1:9103/_demo;".into(),
            "curl -s -X POST 'http://127.0.0.1:9101/_demo?fail=1'".into(),
            "503 USER_PROFILE_UNAVAILABLE".into(),
            "curl -s -X POST http://127.0.0.1:9101/_demo;".into(),
            "curl -s http://127.0.0.1:9901/metrics | grep bff_".into(),
        ];
        for line in expect {
            assert!(out.contains(&line), "missing {line:?} in:\n{out}");
        }
        assert!(!out.contains("NOT_IMPLEMENTED"), "{out}");
    }

    #[test]
    fn fill_env_and_origin() {
        assert_eq!(
            fill_env("Bearer ${env:USER_SVC_TOKEN}").as_deref(),
            Some("Bearer demo-user-svc-token")
        );
        assert_eq!(fill_env("${file:/run/secret}"), None);
        assert_eq!(
            origin("http://127.0.0.1:9103/api/v2").as_deref(),
            Some("http://127.0.0.1:9103")
        );
    }
}
