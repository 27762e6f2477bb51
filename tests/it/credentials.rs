//! Machine credentials against the real binary: the client's `Authorization` and cookies stay
//! at the sidecar while the upstream's own credential goes out; credential files rotated in
//! place and the Kubernetes way (a symlinked `..data` directory swapped) take effect without a
//! restart, and a broken file keeps the last good value; OAuth2 client-credentials tokens are
//! fetched once for many concurrent calls, refreshed before expiry and after a 401, and a token
//! endpoint that is down or talks garbage fails only the calls that need it. No secret or token
//! ever shows in a log line or a client response.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;

use crate::support::metrics::{metric, metric_eventually};
use crate::support::{
    http, tokens, write_policy, Bff, MockReply, MockServer, RecordedRequest, TempPolicy,
};

const JWT_SECRET: &str = "credentials-test-secret-of-32-bytes!";
/// Bounds every wait for something the sidecar does on its own (a file re-read each second).
const WAIT: Duration = Duration::from_secs(15);

fn client_token() -> String {
    tokens::hs256(
        &tokens::claims("web-app", 600, json!({"sub": "u1"})),
        JWT_SECRET,
    )
}

const AUTH: &str = r#"auth:
  jwt:
    issuer: https://id.example.com/
    audience: web-app
    algorithms: [HS256]
    hs256_secret: "credentials-test-secret-of-32-bytes!"
"#;

/// Starts bff with debug logging from bff itself, so that even its debug lines are checked for
/// leaks.
async fn start(policy: &TempPolicy) -> Bff {
    Bff::builder(policy.path())
        .env("BFF_LOG", "info,bff=debug")
        .start()
        .await
}

/// Calls `path` with the client's token and cookie.
async fn get(bff: &Bff, path: &str, client_jwt: &str) -> http::Reply {
    let bearer = format!("Bearer {client_jwt}");
    http::send(
        "GET",
        &bff.url(path),
        &[
            ("authorization", bearer.as_str()),
            ("cookie", "session=client-cookie-value; theme=dark"),
        ],
        "",
    )
    .await
}

/// Asserts none of `secrets` is in the logs or in any of `replies` (headers and body).
fn assert_no_leak(bff: &Bff, replies: &[&http::Reply], secrets: &[&str]) {
    let logs = bff.logs();
    for secret in secrets {
        assert!(!logs.contains(secret), "`{secret}` is in the logs:\n{logs}");
        for reply in replies {
            let headers = format!("{:?}", reply.headers);
            assert!(
                !reply.text().contains(secret) && !headers.contains(secret),
                "`{secret}` is in a response: {headers} {}",
                reply.text()
            );
        }
    }
}

/// Calls `path` until the upstream's last request carries `header: want`, and returns how
/// many calls that took. Every call must succeed: a rotation loses no request.
async fn until_upstream_sees(
    bff: &Bff,
    path: &str,
    upstream: &MockServer,
    header: &str,
    want: &str,
) -> usize {
    let started = Instant::now();
    let jwt = client_token();
    for calls in 1.. {
        let reply = get(bff, path, &jwt).await;
        assert_eq!(reply.status, 200, "call {calls}: {}", reply.text());
        let seen = upstream.requests().pop().expect("the upstream was called");
        if seen.header(header) == Some(want) {
            return calls;
        }
        assert!(
            started.elapsed() < WAIT,
            "the upstream still sees {:?} after {WAIT:?}, not {want:?}\n{}",
            seen.header(header),
            bff.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// Waits until the logs contain every one of `phrases` on one line; returns that line.
async fn log_line(bff: &Bff, phrases: &[&str]) -> String {
    let started = Instant::now();
    loop {
        let logs = bff.logs();
        if let Some(line) = logs.lines().find(|l| phrases.iter().all(|p| l.contains(p))) {
            return line.to_string();
        }
        assert!(
            started.elapsed() < WAIT,
            "no log line with {phrases:?} after {WAIT:?}:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An echo upstream: answers every call, recording what it saw.
fn echo() -> MockServer {
    MockServer::start(|_| MockReply::json(200, json!({"name": "Ada"})))
}

// ---------------------------------------------------------------------------------------------
// What reaches an upstream
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_token_and_cookies_stay_out_and_the_machine_credential_goes_in() {
    let guarded = echo();
    let open = echo();
    let policy = write_policy(&format!(
        r#"client: web
{AUTH}upstreams:
  guarded:
    url: "{guarded}"
    timeout: 2s
    credential: {{ header: Authorization, value: "Bearer ${{file:machine-token}}" }}
  keyed:
    url: "{guarded}/keyed"
    timeout: 2s
    credential: {{ header: X-Api-Key, value: "${{file:machine-token}}" }}
  open: {{ url: "{open}", timeout: 2s }}
routes:
  - name: page
    method: GET
    path: /page
    fetch:
      a: {{ upstream: guarded, path: /a, critical: true, fields: [name] }}
      b: {{ upstream: keyed, path: /b, critical: true, fields: [name] }}
      c: {{ upstream: open, path: /c, critical: true, fields: [name] }}
  - name: proxied
    method: GET
    path: /proxied
    proxy: {{ upstream: guarded, path: /p, fields: [name] }}
  - name: proxied-open
    method: GET
    path: /proxied-open
    proxy: {{ upstream: open, path: /p, fields: [name] }}
"#,
        guarded = guarded.url(),
        open = open.url(),
    ));
    fs::write(policy.dir().join("machine-token"), "m4chine-s3cret\n").unwrap();
    let bff = start(&policy).await;
    let jwt = client_token();

    let mut replies = Vec::new();
    for path in ["/page", "/proxied", "/proxied-open"] {
        let reply = get(&bff, path, &jwt).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        replies.push(reply);
    }

    let seen: Vec<RecordedRequest> = guarded
        .requests()
        .into_iter()
        .chain(open.requests())
        .collect();
    let by_path = |path: &str| -> &RecordedRequest {
        seen.iter()
            .find(|r| r.path() == path)
            .unwrap_or_else(|| panic!("no call to {path}: {seen:?}"))
    };
    assert_eq!(seen.len(), 5, "{seen:?}");
    // The machine credential, where the policy gives one, and only there.
    assert_eq!(
        by_path("/a").header("authorization"),
        Some("Bearer m4chine-s3cret")
    );
    assert_eq!(
        by_path("/p").header("authorization"),
        Some("Bearer m4chine-s3cret")
    );
    assert_eq!(
        by_path("/keyed/b").header("x-api-key"),
        Some("m4chine-s3cret")
    );
    assert_eq!(by_path("/keyed/b").header("authorization"), None);
    assert_eq!(by_path("/c").header("authorization"), None);
    for request in open.requests() {
        assert_eq!(request.header("authorization"), None, "{request:?}");
        assert_eq!(request.header("x-api-key"), None, "{request:?}");
    }
    // Nothing of the client's credentials, under any header name.
    for request in &seen {
        assert_eq!(request.header("cookie"), None, "{request:?}");
        for (name, value) in &request.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            for client_secret in [jwt.as_str(), "client-cookie-value"] {
                assert!(
                    !value.contains(client_secret),
                    "{} got the client's credential in `{name}`",
                    request.uri
                );
            }
        }
    }
    let replies: Vec<&http::Reply> = replies.iter().collect();
    assert_no_leak(&bff, &replies, &["m4chine-s3cret"]);
}

// ---------------------------------------------------------------------------------------------
// Rotation
// ---------------------------------------------------------------------------------------------

fn rotating_policy(upstream: &MockServer, file: &str) -> String {
    format!(
        r#"client: web
upstreams:
  svc:
    url: "{url}"
    timeout: 2s
    credential: {{ header: Authorization, value: "Bearer ${{file:{file}}}" }}
routes:
  - name: page
    method: GET
    path: /page
    fetch:
      a: {{ upstream: svc, path: /a, critical: true, fields: [name] }}
"#,
        url = upstream.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_credential_file_is_used_without_a_restart() {
    let upstream = echo();
    let policy = write_policy(&rotating_policy(&upstream, "token"));
    let file = policy.dir().join("token");
    fs::write(&file, "rot-one\n").unwrap();
    let bff = start(&policy).await;
    let pid = bff.pid();

    until_upstream_sees(&bff, "/page", &upstream, "authorization", "Bearer rot-one").await;
    // Written in place (truncated, then written), as many tools do.
    fs::write(&file, "rot-two\n").unwrap();
    until_upstream_sees(&bff, "/page", &upstream, "authorization", "Bearer rot-two").await;
    // And renamed over, as editors and `kubectl cp` do.
    fs::write(policy.dir().join(".token.tmp"), "rot-three").unwrap();
    fs::rename(policy.dir().join(".token.tmp"), &file).unwrap();
    until_upstream_sees(
        &bff,
        "/page",
        &upstream,
        "authorization",
        "Bearer rot-three",
    )
    .await;

    assert_eq!(bff.pid(), pid);
    log_line(
        &bff,
        &["svc", "secret file changed", &file.display().to_string()],
    )
    .await;
    assert_no_leak(&bff, &[], &["rot-one", "rot-two", "rot-three"]);
}

/// A Kubernetes secret volume: `NAME -> ..data/NAME`, `..data -> ..<generation>/`, and an
/// update writes a new generation and renames a fresh `..data` link over the old one.
struct SecretVolume {
    dir: PathBuf,
    generation: usize,
}

impl SecretVolume {
    fn new(dir: &Path, name: &str, value: &str) -> SecretVolume {
        fs::create_dir(dir).unwrap();
        let mut volume = SecretVolume {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        volume.update(name, value);
        symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
        volume
    }

    fn update(&mut self, name: &str, value: &str) {
        self.generation += 1;
        let generation = format!(
            "..2024_01_01_00_00_{:02}.{}",
            self.generation, self.generation
        );
        fs::create_dir(self.dir.join(&generation)).unwrap();
        fs::write(self.dir.join(&generation).join(name), value).unwrap();
        let old = fs::read_link(self.dir.join("..data")).ok();
        symlink(&generation, self.dir.join("..data_tmp")).unwrap();
        fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        if let Some(old) = old {
            fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_volume_update_is_used_without_a_restart() {
    let upstream = echo();
    let policy = write_policy(&rotating_policy(&upstream, "secrets/token"));
    let mut volume = SecretVolume::new(&policy.dir().join("secrets"), "token", "k8s-one");
    let bff = start(&policy).await;

    until_upstream_sees(&bff, "/page", &upstream, "authorization", "Bearer k8s-one").await;
    volume.update("token", "k8s-two");
    until_upstream_sees(&bff, "/page", &upstream, "authorization", "Bearer k8s-two").await;
    volume.update("token", "k8s-three");
    until_upstream_sees(
        &bff,
        "/page",
        &upstream,
        "authorization",
        "Bearer k8s-three",
    )
    .await;
    assert_no_leak(&bff, &[], &["k8s-one", "k8s-two", "k8s-three"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_missing_credential_file_keeps_the_last_good_value() {
    let upstream = echo();
    let policy = write_policy(&rotating_policy(&upstream, "token"));
    let file = policy.dir().join("token");
    let path = file.display().to_string();
    fs::write(&file, "good-value").unwrap();
    let bff = start(&policy).await;
    let jwt = client_token();

    // Not a header value: refused, logged once with the upstream and the file.
    fs::write(&file, "garbage-one\ngarbage-two\n").unwrap();
    let line = log_line(&bff, &["svc", &path, "not a valid header value"]).await;
    assert!(line.contains("WARN"), "{line}");
    let reply = get(&bff, "/page", &jwt).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.requests().pop().expect("a call");
    assert_eq!(seen.header("authorization"), Some("Bearer good-value"));

    // Gone, as in the middle of a clumsy swap; then empty, as in the middle of a write.
    fs::remove_file(&file).unwrap();
    log_line(&bff, &["svc", &path, "cannot read"]).await;
    let reply = get(&bff, "/page", &jwt).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.requests().pop().expect("a call");
    assert_eq!(seen.header("authorization"), Some("Bearer good-value"));
    fs::write(&file, "").unwrap();
    log_line(&bff, &["svc", &path, "is empty"]).await;
    let reply = get(&bff, "/page", &jwt).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = upstream.requests().pop().expect("a call");
    assert_eq!(seen.header("authorization"), Some("Bearer good-value"));

    // A good value again is used again.
    fs::write(&file, "next-value").unwrap();
    until_upstream_sees(
        &bff,
        "/page",
        &upstream,
        "authorization",
        "Bearer next-value",
    )
    .await;
    assert_no_leak(
        &bff,
        &[&reply],
        &["good-value", "garbage-one", "garbage-two", "next-value"],
    );
}

/// The resident memory of a process, in bytes (Linux).
fn resident_bytes(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_or_unusable_secret_file_keeps_the_last_good_value() {
    let upstream = echo();
    let policy = write_policy(&rotating_policy(&upstream, "token"));
    let file = policy.dir().join("token");
    let path = file.display().to_string();
    fs::write(&file, "good-value").unwrap();
    let bff = start(&policy).await;
    let jwt = client_token();
    let failures = |reason: &'static str| {
        [
            ("client", "web"),
            ("upstream", "svc"),
            ("key", "credential"),
            ("reason", reason),
        ]
    };
    let assert_good_value_serves = |reply: &http::Reply| {
        assert_eq!(reply.status, 200, "{}", reply.text());
        let seen = upstream.requests().pop().expect("a call");
        assert_eq!(seen.header("authorization"), Some("Bearer good-value"));
    };
    assert_good_value_serves(&get(&bff, "/page", &jwt).await);
    let resident = resident_bytes(bff.pid());

    // 100 MB of characters that would all be valid in a header: refused unread, not sent.
    fs::write(&file, vec![b'a'; 100 << 20]).unwrap();
    let line = log_line(&bff, &["svc", &path, "larger than 65536 bytes"]).await;
    assert!(line.contains("WARN"), "{line}");
    for _ in 0..3 {
        assert_good_value_serves(&get(&bff, "/page", &jwt).await);
    }
    let counted = metric(
        &bff,
        "bff_secret_file_failures_total",
        &failures("too_large"),
    )
    .await;
    assert!(counted >= 1.0, "{counted}");
    // Read again every second, and never whole.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let grown = resident_bytes(bff.pid()).saturating_sub(resident);
    assert!(grown < 32 << 20, "resident memory grew by {grown} bytes");
    assert_eq!(
        bff.logs().matches("larger than 65536 bytes").count(),
        1,
        "a failure that lasts is logged once"
    );
    assert!(
        metric(
            &bff,
            "bff_secret_file_failures_total",
            &failures("too_large")
        )
        .await
            > counted,
        "and counted at every read"
    );

    // Values that are no header value: a control character, a byte above 127.
    for (n, bad) in ["unusable\u{1}value", "unusable\u{e9}-token"]
        .into_iter()
        .enumerate()
    {
        fs::write(&file, bad).unwrap();
        let until = Instant::now() + WAIT;
        while bff.logs().matches("not a valid header value").count() <= n {
            assert!(
                Instant::now() < until,
                "{bad:?} not refused:\n{}",
                bff.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_good_value_serves(&get(&bff, "/page", &jwt).await);
        // The good value back, so that the next failure is a new one (and logged).
        fs::write(&file, "good-value").unwrap();
        while bff.logs().matches("secret file readable again").count() <= n {
            assert!(Instant::now() < until, "{}", bff.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(metric(&bff, "bff_secret_file_failures_total", &failures("invalid")).await >= 2.0);

    fs::write(&file, "next-value").unwrap();
    until_upstream_sees(
        &bff,
        "/page",
        &upstream,
        "authorization",
        "Bearer next-value",
    )
    .await;
    // Markers that cannot occur by chance in a trace id (hex) or a log line.
    assert_no_leak(&bff, &[], &["good-value", "unusable", "next-value"]);
}

// ---------------------------------------------------------------------------------------------
// OAuth2 client credentials
// ---------------------------------------------------------------------------------------------

const CLIENT_ID: &str = "bff web";
const CLIENT_SECRET: &str = "cl1ent:s3cret+/";

/// A token endpoint issuing `tok-1`, `tok-2`, … with `expires_in`, after `delay`.
struct TokenEndpoint {
    server: MockServer,
    issued: Arc<AtomicUsize>,
}

impl TokenEndpoint {
    fn start(expires_in: u64, delay: Duration) -> TokenEndpoint {
        let issued = Arc::new(AtomicUsize::new(0));
        let counter = issued.clone();
        let server = MockServer::start(move |_| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            MockReply::json(
                200,
                json!({"access_token": format!("tok-{n}"), "token_type": "bearer", "expires_in": expires_in}),
            )
            .delay(delay)
        });
        TokenEndpoint { server, issued }
    }

    fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

/// A policy whose upstream `svc` authenticates with OAuth2 at `token_url`; routes `/page`
/// (critical fetch), `/optional` (the fetch optional beside a critical one to `plain`) and
/// `/proxied` (a proxy route).
fn oauth2_policy(upstream: &MockServer, token_url: &str, plain: &MockServer) -> String {
    format!(
        r#"client: web
{AUTH}upstreams:
  svc:
    url: "{url}"
    timeout: 2s
    oauth2:
      token_url: "{token_url}"
      client_id: "{CLIENT_ID}"
      client_secret: "${{file:client-secret}}"
      scope: "orders:read profile"
  plain: {{ url: "{plain}", timeout: 2s }}
routes:
  - name: page
    method: GET
    path: /page
    fetch:
      orders: {{ upstream: svc, path: /orders, critical: true, fields: [name] }}
  - name: optional
    method: GET
    path: /optional
    fetch:
      orders: {{ upstream: svc, path: /orders, fields: [name], fallback: {{}} }}
      profile: {{ upstream: plain, path: /profile, critical: true, fields: [name] }}
  - name: proxied
    method: GET
    path: /proxied
    proxy: {{ upstream: svc, path: /orders, fields: [name] }}
"#,
        url = upstream.url(),
        plain = plain.url(),
    )
}

fn oauth2_bff_policy(upstream: &MockServer, token_url: &str, plain: &MockServer) -> TempPolicy {
    let policy = write_policy(&oauth2_policy(upstream, token_url, plain));
    fs::write(
        policy.dir().join("client-secret"),
        format!("{CLIENT_SECRET}\n"),
    )
    .unwrap();
    policy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_calls_share_one_token_request() {
    // The token answer is slow, so every call arrives while the one fetch is under way.
    let tokens = TokenEndpoint::start(3600, Duration::from_millis(300));
    let upstream = echo();
    let policy = oauth2_bff_policy(
        &upstream,
        &format!("{}/oauth/token", tokens.server.url()),
        &upstream,
    );
    let bff = start(&policy).await;
    let jwt = client_token();

    let calls = (0..50).map(|i| {
        let (url, jwt) = (
            bff.url(if i % 2 == 0 { "/page" } else { "/proxied" }),
            jwt.clone(),
        );
        tokio::spawn(async move {
            let bearer = format!("Bearer {jwt}");
            http::send("GET", &url, &[("authorization", bearer.as_str())], "").await
        })
    });
    let replies: Vec<http::Reply> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("the call's task"))
        .collect();
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(tokens.issued(), 1, "one token request for all the calls");
    let seen = upstream.requests();
    assert_eq!(seen.len(), 50);
    for request in &seen {
        assert_eq!(request.header("authorization"), Some("Bearer tok-1"));
    }

    // The token request itself: RFC 6749 §4.4 with the client in HTTP Basic (§2.3.1).
    let asked = tokens.server.requests();
    assert_eq!(asked.len(), 1);
    let request = &asked[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.uri, "/oauth/token");
    assert_eq!(
        request.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        String::from_utf8_lossy(&request.body),
        "grant_type=client_credentials&scope=orders%3Aread+profile"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode("bff+web:cl1ent%3As3cret%2B%2F");
    assert_eq!(
        request.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );

    let replies: Vec<&http::Reply> = replies.iter().collect();
    assert_no_leak(&bff, &replies, &["tok-1", CLIENT_SECRET, &basic]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_near_its_expiry_is_fetched_again() {
    // One second of life, taken as the shortest useful one (5 s): due for refresh after 4.5 s.
    let tokens = TokenEndpoint::start(1, Duration::ZERO);
    let upstream = echo();
    let policy = oauth2_bff_policy(&upstream, &tokens.server.url(), &upstream);
    let bff = start(&policy).await;

    until_upstream_sees(&bff, "/page", &upstream, "authorization", "Bearer tok-1").await;
    until_upstream_sees(&bff, "/page", &upstream, "authorization", "Bearer tok-2").await;
    assert!(tokens.issued() >= 2);
    // Every call carried a token that was issued, the newest at the time.
    let mut last = 0;
    for request in upstream.requests() {
        let n: usize = request
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer tok-"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not an issued token: {request:?}"));
        assert!(n >= last && n <= tokens.issued(), "{n} after {last}");
        last = n;
    }
    assert_no_leak(&bff, &[], &["tok-1", "tok-2", CLIENT_SECRET]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_drops_the_token_and_the_next_call_fetches_another() {
    let tokens = TokenEndpoint::start(3600, Duration::ZERO);
    // tok-1 is revoked at the upstream before it expires.
    let upstream = MockServer::start(|req| match req.header("authorization") {
        Some("Bearer tok-1") => MockReply::json(401, json!({"error": "revoked"})),
        _ => MockReply::json(200, json!({"name": "Ada"})),
    });
    let policy = oauth2_bff_policy(&upstream, &tokens.server.url(), &upstream);
    let bff = start(&policy).await;
    let jwt = client_token();

    let refused = get(&bff, "/page", &jwt).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(tokens.issued(), 1);

    // The client secret rotates meanwhile: the next token request uses the new one.
    fs::write(policy.dir().join("client-secret"), "n3w-secret").unwrap();
    log_line(
        &bff,
        &["svc", "oauth2.client_secret", "secret file changed"],
    )
    .await;

    let reply = get(&bff, "/page", &jwt).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(tokens.issued(), 2);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("authorization"), Some("Bearer tok-2"));
    let basic = base64::engine::general_purpose::STANDARD.encode("bff+web:n3w-secret");
    let asked = tokens.server.requests();
    assert_eq!(
        asked[1].header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );

    // The new token stays in use.
    let reply = get(&bff, "/proxied", &jwt).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(tokens.issued(), 2);
    assert_no_leak(
        &bff,
        &[&refused, &reply],
        &["tok-1", "tok-2", CLIENT_SECRET, "n3w-secret", &basic],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_down_or_talking_garbage_fails_only_the_calls_that_need_it() {
    let upstream = echo();
    let down = format!("http://127.0.0.1:{}/token", MockServer::refused_port());
    let garbage_tokens = MockServer::start(|req| match req.path() {
        "/html" => MockReply::text(200, "<html>tok-secret-in-garbage</html>"),
        "/mac" => MockReply::json(
            200,
            json!({"access_token": "tok-secret-mac", "token_type": "mac"}),
        ),
        "/huge" => MockReply::json(
            200,
            json!({"access_token": "tok-secret-huge", "token_type": "Bearer", "pad": "x".repeat(70_000)}),
        ),
        _ => MockReply::json(
            401,
            json!({"error": "invalid_client", "error_description": "tok-secret-desc"}),
        ),
    });
    let cases = [
        (down.clone(), "cannot reach the token endpoint"),
        (format!("{}/html", garbage_tokens.url()), "not JSON"),
        (format!("{}/mac", garbage_tokens.url()), "not Bearer"),
        (
            format!("{}/huge", garbage_tokens.url()),
            "more than 65536 bytes",
        ),
        (
            format!("{}/refuse", garbage_tokens.url()),
            "answered 401 (invalid_client)",
        ),
    ];
    for (token_url, reason) in cases {
        let policy = oauth2_bff_policy(&upstream, &token_url, &upstream);
        let bff = start(&policy).await;
        let jwt = client_token();
        let before = upstream.requests().len();

        // Critical: the page fails with the dependency's code.
        let critical = get(&bff, "/page", &jwt).await;
        assert_eq!(critical.status, 503, "{token_url}: {}", critical.text());
        assert_eq!(
            critical.json()["error"]["code"],
            "DEPENDENCY_UNAVAILABLE",
            "{token_url}"
        );
        // A proxy route too.
        let proxied = get(&bff, "/proxied", &jwt).await;
        assert_eq!(proxied.status, 503, "{token_url}: {}", proxied.text());
        // Optional: degraded beside the section that works.
        let optional = get(&bff, "/optional", &jwt).await;
        assert_eq!(optional.status, 200, "{token_url}: {}", optional.text());
        let body = optional.json();
        assert_eq!(
            body["meta"]["degradedSections"],
            json!(["orders"]),
            "{body}"
        );
        assert_eq!(body["profile"], json!({"name": "Ada"}), "{body}");

        // The upstream needing the token was never called without one.
        let called: Vec<String> = upstream.requests()[before..]
            .iter()
            .map(|r| r.uri.clone())
            .collect();
        assert_eq!(called, ["/profile"], "{token_url}");
        for (route, dependency) in [
            ("page", "orders"),
            ("optional", "orders"),
            ("proxied", "svc"),
        ] {
            let labels = [
                ("client", "web"),
                ("route", route),
                ("dependency", dependency),
                ("outcome", "error"),
            ];
            assert_eq!(
                metric_eventually(&bff, "bff_dependency_requests_total", &labels, 1.0).await,
                1.0,
                "{token_url}: {route}/{dependency}"
            );
        }
        // The failure is the token endpoint's, not the upstream's: its circuit stays closed
        // however often it happens (the breaker opens after 5 failures in a row by default).
        for _ in 0..8 {
            let reply = get(&bff, "/page", &jwt).await;
            assert_eq!(reply.status, 503, "{token_url}");
        }
        let circuit = [("client", "web"), ("upstream", "svc")];
        assert_eq!(
            metric(&bff, "bff_circuit_state", &circuit).await,
            0.0,
            "{token_url}"
        );
        // The log says which upstream and why, and the process keeps serving.
        log_line(&bff, &["upstream `svc`", "machine credential", reason]).await;
        let ready = http::get(&bff.admin_url("/readyz")).await;
        assert_eq!(ready.status, 200);
        assert_no_leak(
            &bff,
            &[&critical, &proxied, &optional],
            &[CLIENT_SECRET, "tok-secret"],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_token_endpoint_fails_the_call_within_its_timeout() {
    let tokens = TokenEndpoint::start(3600, Duration::from_secs(30));
    let upstream = echo();
    let policy = write_policy(
        &oauth2_policy(&upstream, &tokens.server.url(), &upstream)
            .replace("timeout: 2s\n    oauth2", "timeout: 300ms\n    oauth2"),
    );
    fs::write(policy.dir().join("client-secret"), CLIENT_SECRET).unwrap();
    let bff = start(&policy).await;

    // The token endpoint takes 30 s; the call's timeout ends the fetch (the test client
    // would give up after 10 s).
    let reply = get(&bff, "/page", &client_token()).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    log_line(&bff, &["upstream `svc`", "within the call's timeout"]).await;
    assert_eq!(upstream.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_keeps_using_the_token_until_it_expires() {
    // tok-1 lives 10 s (due for refresh after 9 s); every later request fails.
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = issued.clone();
    let tokens = MockServer::start(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            MockReply::json(
                200,
                json!({"access_token": "tok-1", "token_type": "Bearer", "expires_in": 10}),
            )
        } else {
            MockReply::json(500, json!({"error": "server_error"}))
        }
    });
    let upstream = echo();
    let policy = oauth2_bff_policy(&upstream, &tokens.url(), &upstream);
    let bff = start(&policy).await;
    let jwt = client_token();

    // Until the refresh has failed (and been logged), every call still succeeds with tok-1.
    let started = Instant::now();
    while !bff.logs().contains("OAuth2 token not refreshed") {
        let reply = get(&bff, "/page", &jwt).await;
        assert_eq!(reply.status, 200, "{}\n{}", reply.text(), bff.logs());
        let seen = upstream.requests().pop().expect("a call");
        assert_eq!(seen.header("authorization"), Some("Bearer tok-1"));
        assert!(
            started.elapsed() < WAIT,
            "no failed refresh:\n{}",
            bff.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(issued.load(Ordering::SeqCst) >= 2);
    log_line(&bff, &["svc", "answered 500 (server_error)"]).await;
    assert_no_leak(&bff, &[], &["tok-1", CLIENT_SECRET]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_already_expired_when_issued_is_used_and_not_fetched_per_call() {
    let tokens = TokenEndpoint::start(0, Duration::ZERO);
    let upstream = echo();
    let policy = oauth2_bff_policy(&upstream, &tokens.server.url(), &upstream);
    let bff = start(&policy).await;
    let jwt = client_token();

    for _ in 0..40 {
        let reply = get(&bff, "/page", &jwt).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 40);
    assert!(seen.iter().all(|r| r
        .header("authorization")
        .is_some_and(|v| v.starts_with("Bearer tok-"))));
    // The 40 calls take well under the shortest lifetime; a very slow machine may refresh once.
    assert!(
        tokens.issued() <= 2,
        "{} token requests for 40 calls",
        tokens.issued()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_every_token_gets_at_most_one_new_token_a_second() {
    let tokens = TokenEndpoint::start(3600, Duration::ZERO);
    let upstream = MockServer::start(|_| MockReply::json(401, json!({"error": "revoked"})));
    let policy = oauth2_bff_policy(&upstream, &tokens.server.url(), &upstream);
    let bff = start(&policy).await;
    let jwt = client_token();

    // Every call is refused (and drops its token); the next call's fetch waits for the floor.
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let reply = get(&bff, "/page", &jwt).await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        calls += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        (tokens.issued() as f64) <= seconds + 2.0,
        "{} token requests in {seconds:.1} s ({calls} calls)",
        tokens.issued()
    );
    assert!(tokens.issued() >= 2, "tokens are still fetched");
}
