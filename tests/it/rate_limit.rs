//! Rate limits against the real binary: 429 `RATE_LIMITED` with `Retry-After` beyond the burst,
//! the upstream never called for a refused request, a budget per `sub`, per API key name, or
//! (without either) per client address, the policy's and a route's limits together, buckets kept across a reload of
//! an unchanged limit; failed authentications limited per client address; the client address
//! taken from a trusted proxy's `X-Forwarded-For`; and the loader's rules for `rate_limit`,
//! `auth.failure_limit` and `client_address`. Every limit refills by the hour,
//! so nothing comes back while a test runs.

use std::net::{IpAddr, SocketAddr};

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

use crate::check::{assert_rejected, assert_valid, insert, BASE};
use crate::support::metrics::{metric, metric_eventually};
use crate::support::{http, raw, tokens, write_policy, Bff, MockReply, MockServer, TempPolicy};

const SECRET: &str = "rate-limit-test-secret-of-32-bytes-or-more";

/// A policy with `auth` (HS256), a fetch route `a` that anonymous clients may call, a proxy
/// route `b` that needs a token, and an app to fall through to. `policy_limit` is a top-level line (or empty), `route_limit` a line of route `b`.
fn policy(svc: &MockServer, app: &MockServer, policy_limit: &str, route_limit: &str) -> String {
    format!(
        r#"client: mobile
auth:
  jwt:
    issuer: https://id.example.com/
    audience: mobile-app
    algorithms: [HS256]
    hs256_secret: "{SECRET}"
{policy_limit}
upstreams:
  svc: {{ url: "{svc}", timeout: 2s }}
  app: {{ url: "{app}", timeout: 2s }}
routes:
  - name: a
    method: GET
    path: /a
    auth: optional
    fetch:
      info: {{ upstream: svc, path: /a, critical: true, fields: [name] }}
  - name: b
    method: GET
    path: /b
    {route_limit}
    proxy: {{ upstream: svc, path: /b, fields: [name] }}
fallthrough: app
"#,
        svc = svc.url(),
        app = app.url(),
    )
}

struct Setup {
    svc: MockServer,
    app: MockServer,
    bff: Bff,
    file: TempPolicy,
}

async fn start(policy_limit: &str, route_limit: &str) -> Setup {
    let svc = MockServer::start(|_| MockReply::json(200, json!({"name": "Ada", "secret": "x"})));
    let app = MockServer::start(|_| MockReply::text(200, "app page"));
    let file = write_policy(&policy(&svc, &app, policy_limit, route_limit));
    let bff = Bff::start(file.path()).await;
    Setup {
        svc,
        app,
        bff,
        file,
    }
}

/// A valid token for `sub` (`None`: a token without a `sub` claim).
fn token(sub: Option<&str>) -> String {
    tokens::hs256(
        &tokens::claims("mobile-app", 600, json!({ "sub": sub })),
        SECRET,
    )
}

async fn get(bff: &Bff, path: &str, token: Option<&str>) -> http::Reply {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    http::send("GET", &bff.url(path), &headers, "").await
}

/// The status of an anonymous `GET path` sent from the local address `from` (any 127.x.y.z).
async fn status_from(from: IpAddr, bff: &Bff, path: &str) -> u16 {
    status_with(from, bff, path, &[]).await
}

/// The status of `GET path` with `headers`, sent from the local address `from`.
async fn status_with(from: IpAddr, bff: &Bff, path: &str, headers: &[(&str, &str)]) -> u16 {
    let socket = TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    let mut stream = socket
        .connect(bff.addr())
        .await
        .unwrap_or_else(|e| panic!("connect from {from}: {e}"));
    let headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!("GET {path} HTTP/1.1\r\nHost: bff\r\n{headers}Connection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let reply = String::from_utf8_lossy(&raw::read_to_end(&mut stream).await).into_owned();
    reply
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {reply:?}"))
}

/// Asserts a 429 envelope whose `Retry-After` is whole seconds from 1 to `at_most`.
#[track_caller]
fn assert_limited(reply: &http::Reply, at_most: u64) {
    assert_eq!(reply.status, 429, "{}", reply.text());
    let retry_after = reply.header("retry-after").expect("Retry-After on a 429");
    let seconds: u64 = retry_after
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After `{retry_after}` is not whole seconds"));
    assert!(
        (1..=at_most).contains(&seconds),
        "Retry-After {seconds} should be 1 to {at_most}"
    );
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "RATE_LIMITED");
    assert_eq!(error["retryable"], true);
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert!(reply.header("x-trace-id").is_some());
}

fn calls(svc: &MockServer, path: &str) -> usize {
    svc.requests().iter().filter(|r| r.path() == path).count()
}

async fn limited(bff: &Bff, route: &str) -> f64 {
    metric(
        bff,
        "bff_rate_limited_total",
        &[("client", "mobile"), ("route", route)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_burst_get_429_and_never_reach_the_upstream() {
    // Two an hour (one every 1800 s), three at once.
    let s = start("rate_limit: { requests: 2, per: 1h, burst: 3 }", "").await;
    let ada = token(Some("ada"));
    for i in 1..=3 {
        let reply = get(&s.bff, "/a", Some(&ada)).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
    }
    assert_eq!(limited(&s.bff, "a").await, 0.0);

    for refused in 1..=2 {
        assert_limited(&get(&s.bff, "/a", Some(&ada)).await, 1800);
        assert_eq!(limited(&s.bff, "a").await, f64::from(refused));
    }
    assert_eq!(
        calls(&s.svc, "/a"),
        3,
        "refused requests never reach the upstream"
    );

    // The policy's budget is one for all routes: the proxy route refuses ada too.
    assert_limited(&get(&s.bff, "/b", Some(&ada)).await, 1800);
    assert_eq!(limited(&s.bff, "b").await, 1.0);
    assert_eq!(calls(&s.svc, "/b"), 0);
    let status_429 = [("client", "mobile"), ("route", "b"), ("status", "429")];
    assert_eq!(
        metric_eventually(&s.bff, "bff_requests_total", &status_429, 1.0).await,
        1.0
    );

    // What falls through to the app is the app's to limit.
    for _ in 0..4 {
        let reply = get(&s.bff, "/elsewhere", Some(&ada)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(s.app.requests().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_subject_has_its_own_budget() {
    let s = start("rate_limit: { requests: 1, per: 1h, burst: 2 }", "").await;
    let (ada, bob) = (token(Some("ada")), token(Some("bob")));
    for _ in 0..2 {
        assert_eq!(get(&s.bff, "/a", Some(&ada)).await.status, 200);
    }
    assert_limited(&get(&s.bff, "/a", Some(&ada)).await, 3600);

    // Same address, another subject: a full budget of its own.
    for _ in 0..2 {
        assert_eq!(get(&s.bff, "/a", Some(&bob)).await.status, 200);
    }
    assert_limited(&get(&s.bff, "/a", Some(&bob)).await, 3600);
    // Without a token the address counts, and it has spent nothing yet.
    assert_eq!(get(&s.bff, "/a", None).await.status, 200);
    assert_eq!(calls(&s.svc, "/a"), 5);
    assert_eq!(limited(&s.bff, "a").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_numeric_subject_has_its_own_budget_not_its_address() {
    let s = start("rate_limit: { requests: 1, per: 1h, burst: 2 }", "").await;
    let numeric = |sub: u64| {
        tokens::hs256(
            &tokens::claims("mobile-app", 600, json!({ "sub": sub })),
            SECRET,
        )
    };
    let (user_111, user_222) = (numeric(111), numeric(222));
    for _ in 0..2 {
        assert_eq!(get(&s.bff, "/a", Some(&user_111)).await.status, 200);
    }
    assert_limited(&get(&s.bff, "/a", Some(&user_111)).await, 3600);
    // Same address, another number: a budget of its own (it used to share the address's).
    for _ in 0..2 {
        assert_eq!(get(&s.bff, "/a", Some(&user_222)).await.status, 200);
    }
    assert_limited(&get(&s.bff, "/a", Some(&user_222)).await, 3600);
    // The address has spent nothing; the string "111" is the same subject as the number, as
    // in cache keys.
    assert_eq!(get(&s.bff, "/a", None).await.status, 200);
    assert_limited(&get(&s.bff, "/a", Some(&token(Some("111")))).await, 3600);
    assert_eq!(calls(&s.svc, "/a"), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_subject_are_limited_by_address() {
    let s = start("rate_limit: { requests: 1, per: 1h, burst: 2 }", "").await;
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    assert_eq!(status_from(local, &s.bff, "/a").await, 200);
    // A verified token without `sub` counts against its address too.
    let no_sub = token(None);
    assert_eq!(get(&s.bff, "/a", Some(&no_sub)).await.status, 200);
    assert_eq!(status_from(local, &s.bff, "/a").await, 429);
    assert_limited(&get(&s.bff, "/a", Some(&no_sub)).await, 3600);

    assert_eq!(status_from(other, &s.bff, "/a").await, 200);
    assert_eq!(status_from(other, &s.bff, "/a").await, 200);
    assert_eq!(status_from(other, &s.bff, "/a").await, 429);
    // A subject is not its address: ada from 127.0.0.1 still has her budget.
    let ada = token(Some("ada"));
    assert_eq!(get(&s.bff, "/a", Some(&ada)).await.status, 200);
    assert_eq!(calls(&s.svc, "/a"), 5);
    assert_eq!(limited(&s.bff, "a").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_limit_applies_on_top_of_the_policy_limit() {
    let s = start(
        "rate_limit: { requests: 1, per: 1h, burst: 4 }",
        "rate_limit: { requests: 1, per: 1h, burst: 2 }",
    )
    .await;
    let ada = token(Some("ada"));
    assert_eq!(get(&s.bff, "/b", Some(&ada)).await.status, 200);
    assert_eq!(get(&s.bff, "/b", Some(&ada)).await.status, 200);
    // Over the route's limit; this request still spent from the policy's budget (3 of 4).
    assert_limited(&get(&s.bff, "/b", Some(&ada)).await, 3600);
    assert_eq!(calls(&s.svc, "/b"), 2);
    // So route `a` has one left under the policy's limit, not two.
    assert_eq!(get(&s.bff, "/a", Some(&ada)).await.status, 200);
    assert_limited(&get(&s.bff, "/a", Some(&ada)).await, 3600);
    assert_limited(&get(&s.bff, "/b", Some(&ada)).await, 3600);
    assert_eq!((calls(&s.svc, "/a"), calls(&s.svc, "/b")), (1, 2));
    assert_eq!(limited(&s.bff, "a").await, 1.0);
    assert_eq!(limited(&s.bff, "b").await, 2.0);

    // The route's buckets are per identity too.
    let bob = token(Some("bob"));
    assert_eq!(get(&s.bff, "/b", Some(&bob)).await.status, 200);
    assert_eq!(get(&s.bff, "/b", Some(&bob)).await.status, 200);
    assert_limited(&get(&s.bff, "/b", Some(&bob)).await, 3600);
    assert_eq!(calls(&s.svc, "/b"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_buckets_of_unchanged_limits() {
    let policy_limit = "rate_limit: { requests: 1, per: 1h, burst: 2 }";
    let route_limit = "rate_limit: { requests: 1, per: 1h, burst: 2 }";
    let s = start(policy_limit, route_limit).await;
    let (ada, bob) = (token(Some("ada")), token(Some("bob")));
    assert_eq!(get(&s.bff, "/a", Some(&ada)).await.status, 200);
    assert_eq!(get(&s.bff, "/a", Some(&ada)).await.status, 200);
    // Refused by the policy's limit, this leaves ada's bucket of route `b` alone.
    assert_limited(&get(&s.bff, "/b", Some(&ada)).await, 3600);
    assert_eq!(get(&s.bff, "/b", Some(&bob)).await.status, 200);
    assert_eq!(get(&s.bff, "/b", Some(&bob)).await.status, 200);
    assert_limited(&get(&s.bff, "/b", Some(&bob)).await, 3600);

    // The same limits in a changed policy (the upstreams' timeout): the budgets stay spent.
    let same = policy(&s.svc, &s.app, policy_limit, route_limit).replace("2s", "3s");
    s.file.rewrite(&same);
    reloaded(&s.bff, 1.0).await;
    assert_limited(&get(&s.bff, "/a", Some(&ada)).await, 3600);
    assert_limited(&get(&s.bff, "/b", Some(&bob)).await, 3600);

    // A changed policy limit starts afresh; the unchanged route limit keeps its buckets.
    let wider = "rate_limit: { requests: 1, per: 1h, burst: 5 }";
    s.file.rewrite(&policy(&s.svc, &s.app, wider, route_limit));
    reloaded(&s.bff, 2.0).await;
    assert_eq!(get(&s.bff, "/a", Some(&ada)).await.status, 200);
    assert_eq!(get(&s.bff, "/b", Some(&ada)).await.status, 200);
    assert_eq!(get(&s.bff, "/b", Some(&ada)).await.status, 200);
    assert_limited(&get(&s.bff, "/b", Some(&ada)).await, 3600);
    assert_limited(&get(&s.bff, "/b", Some(&bob)).await, 3600);
    assert_eq!((calls(&s.svc, "/a"), calls(&s.svc, "/b")), (3, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_limited_by_its_name() {
    let svc = MockServer::start(|_| MockReply::json(200, json!({"name": "Acme"})));
    let file = write_policy(&format!(
        r#"client: partners
auth:
  api_key: {{ header: X-Api-Key, keys_file: keys.txt }}
  jwt:
    issuer: https://id.example.com/
    audience: mobile-app
    algorithms: [HS256]
    hs256_secret: "{SECRET}"
rate_limit: {{ requests: 1, per: 1h, burst: 2 }}
upstreams:
  svc: {{ url: "{svc}", timeout: 2s }}
routes:
  - name: a
    method: GET
    path: /a
    auth: optional
    fetch:
      info: {{ upstream: svc, path: /a, critical: true, fields: [name] }}
"#,
        svc = svc.url()
    ));
    let sha256 = tokens::api_key_hash;
    std::fs::write(
        file.dir().join("keys.txt"),
        format!(
            "{}  acme\n{}  acme\n{}  globex\n",
            sha256("acme-key-1"),
            sha256("acme-key-2"),
            sha256("globex-key-1")
        ),
    )
    .expect("write the keys file");
    let bff = Bff::start(file.path()).await;
    let with_key = |key: &'static str| {
        let bff = &bff;
        async move { http::send("GET", &bff.url("/a"), &[("x-api-key", key)], "").await }
    };

    // Two keys of one partner share its budget.
    assert_eq!(with_key("acme-key-1").await.status, 200);
    assert_eq!(with_key("acme-key-2").await.status, 200);
    assert_limited(&with_key("acme-key-1").await, 3600);
    assert_eq!(with_key("globex-key-1").await.status, 200);
    // A token whose `sub` is the partner's name, and a request with neither, count apart.
    assert_eq!(
        get(&bff, "/a", Some(&token(Some("acme")))).await.status,
        200
    );
    assert_eq!(get(&bff, "/a", None).await.status, 200);
    assert_eq!(calls(&svc, "/a"), 5);
    let labels = [("client", "partners"), ("route", "a")];
    assert_eq!(metric(&bff, "bff_rate_limited_total", &labels).await, 1.0);
}

/// A policy with both credentials, a route that needs one (`/p`), one without auth (`/open`),
/// and `extra` top-level lines; the keys file holds `good-key` (partner `acme`).
fn start_partners(extra: &str, failure_limit: &str) -> (MockServer, TempPolicy) {
    let svc = MockServer::start(|_| MockReply::json(200, json!({"name": "Acme"})));
    let file = write_policy(&format!(
        r#"client: partners
auth:
  api_key: {{ header: X-Api-Key, keys_file: keys.txt }}
  jwt:
    issuer: https://id.example.com/
    audience: mobile-app
    algorithms: [HS256]
    hs256_secret: "{SECRET}"
  {failure_limit}
{extra}
upstreams:
  svc: {{ url: "{svc}", timeout: 2s }}
routes:
  - name: p
    method: GET
    path: /p
    proxy: {{ upstream: svc, path: /p, fields: [name] }}
  - name: open
    method: GET
    path: /open
    auth: none
    proxy: {{ upstream: svc, path: /open, fields: [name] }}
"#,
        svc = svc.url()
    ));
    std::fs::write(
        file.dir().join("keys.txt"),
        format!("{}  acme\n", tokens::api_key_hash("good-key")),
    )
    .expect("write the keys file");
    (svc, file)
}

async fn with_key(bff: &Bff, path: &str, key: &str) -> http::Reply {
    http::send("GET", &bff.url(path), &[("x-api-key", key)], "").await
}

async fn too_many_failures(bff: &Bff) -> f64 {
    let labels = [("client", "partners"), ("reason", "too_many_failures")];
    metric(bff, "bff_auth_failures_total", &labels).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_limited_per_client_address() {
    let (svc, file) = start_partners("", "failure_limit: { requests: 3, per: 1h }");
    let bff = Bff::start(file.path()).await;
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let other: IpAddr = "127.0.0.2".parse().unwrap();

    // A missing credential guesses nothing; three guesses are answered 401, as before.
    for _ in 0..5 {
        assert_eq!(get(&bff, "/p", None).await.status, 401);
    }
    for guess in 1..=3 {
        let reply = with_key(&bff, "/p", &format!("guess-{guess}")).await;
        assert_eq!(reply.status, 401, "guess {guess}: {}", reply.text());
    }
    // Then the address is out of failures: 429, the credential not even looked at, so the
    // right key gets no further than a wrong one, and neither do tokens.
    assert_limited(&with_key(&bff, "/p", "guess-4").await, 1200);
    assert_limited(&with_key(&bff, "/p", "good-key").await, 1200);
    let forged = tokens::hs256(
        &tokens::claims("mobile-app", 600, json!({"sub": "x"})),
        "wrong-secret-of-32-bytes-or-more-!!",
    );
    assert_limited(&get(&bff, "/p", Some(&forged)).await, 1200);
    assert_eq!(too_many_failures(&bff).await, 3.0);
    // A route that never looks at credentials is not refused.
    assert_eq!(with_key(&bff, "/open", "guess-5").await.status, 200);

    // Another address with the valid key is served, and has a budget of failures of its own.
    assert_eq!(
        status_with(other, &bff, "/p", &[("x-api-key", "good-key")]).await,
        200
    );
    for _ in 0..3 {
        assert_eq!(
            status_with(other, &bff, "/p", &[("x-api-key", "nope")]).await,
            401
        );
    }
    assert_eq!(
        status_with(other, &bff, "/p", &[("x-api-key", "good-key")]).await,
        429
    );
    assert_eq!(
        status_with(local, &bff, "/p", &[("x-api-key", "good-key")]).await,
        429
    );
    assert_eq!(
        calls(&svc, "/p"),
        1,
        "only the valid key from 127.0.0.2 reached the upstream"
    );
    let unknown = [("client", "partners"), ("reason", "unknown_api_key")];
    assert_eq!(metric(&bff, "bff_auth_failures_total", &unknown).await, 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_failed_authentications_a_minute_by_default() {
    let (_svc, file) = start_partners("", "");
    let bff = Bff::start(file.path()).await;
    // Thirty at once, then one every 2 s: on a slow machine a few more may come back while
    // the thirty are sent.
    let started = std::time::Instant::now();
    let mut refused_after = None;
    for guess in 1..=100 {
        let reply = with_key(&bff, "/p", &format!("guess-{guess}")).await;
        if reply.status == 429 {
            assert_limited(&reply, 2);
            refused_after = Some(guess - 1);
            break;
        }
        assert_eq!(reply.status, 401, "guess {guess}: {}", reply.text());
    }
    let failures = refused_after.expect("failed authentications were never limited");
    let came_back = started.elapsed().as_secs() / 2 + 1;
    assert!(
        (30..=30 + came_back).contains(&failures),
        "{failures} failures before the 429"
    );
    assert_eq!(
        status_from("127.0.0.2".parse().unwrap(), &bff, "/open").await,
        200
    );
    assert_eq!(
        status_with(
            "127.0.0.2".parse().unwrap(),
            &bff,
            "/p",
            &[("x-api-key", "good-key")]
        )
        .await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_forwarded_address_is_the_client() {
    let (svc, file) = start_partners(
        "client_address: { trusted_proxies: [127.0.0.1/32, 10.0.0.0/8], header: X-Forwarded-For }\nrate_limit: { requests: 1, per: 1h, burst: 4 }",
        "failure_limit: { requests: 2, per: 1h }",
    );
    let bff = Bff::start(file.path()).await;
    let proxy: IpAddr = "127.0.0.1".parse().unwrap();
    let untrusted: IpAddr = "127.0.0.2".parse().unwrap();
    let from = |client: &'static str, key: &'static str| {
        let bff = &bff;
        async move {
            status_with(
                proxy,
                bff,
                "/p",
                &[("x-forwarded-for", client), ("x-api-key", key)],
            )
            .await
        }
    };

    // One client behind the ingress runs out of failures...
    assert_eq!(from("203.0.113.5", "guess-1").await, 401);
    assert_eq!(from("203.0.113.5", "guess-2").await, 401);
    assert_eq!(from("203.0.113.5", "good-key").await, 429);
    // ...and prepending a forged hop does not get it a fresh budget: the right-most untrusted
    // address is the client, past the trusted ones.
    assert_eq!(from("198.51.100.1, 203.0.113.5", "good-key").await, 429);
    assert_eq!(from("203.0.113.5, 10.1.2.3", "good-key").await, 429);
    // Everyone else behind the same ingress is served.
    assert_eq!(from("203.0.113.6", "good-key").await, 200);
    assert_eq!(from("198.51.100.1, 203.0.113.7", "good-key").await, 200);
    // A peer that is not a trusted proxy cannot name another address: it is itself.
    let forged = [("x-forwarded-for", "203.0.113.8"), ("x-api-key", "guess")];
    assert_eq!(status_with(untrusted, &bff, "/p", &forged).await, 401);
    assert_eq!(status_with(untrusted, &bff, "/p", &forged).await, 401);
    assert_eq!(from("203.0.113.8", "good-key").await, 200);
    assert_eq!(
        status_with(untrusted, &bff, "/p", &[("x-api-key", "good-key")]).await,
        429
    );

    // Rate limits count anonymous clients by the forwarded address too.
    let anonymous = |client: &'static str| {
        let bff = &bff;
        async move { status_with(proxy, bff, "/open", &[("x-forwarded-for", client)]).await }
    };
    for _ in 0..4 {
        assert_eq!(anonymous("203.0.113.20").await, 200);
    }
    assert_eq!(anonymous("203.0.113.20").await, 429);
    assert_eq!(anonymous("203.0.113.21").await, 200);
    assert_eq!(calls(&svc, "/open"), 5);
}

/// Waits until `bff_policy_reloads_total{result="ok"}` reaches `count` (the file is polled
/// every second).
async fn reloaded(bff: &Bff, count: f64) {
    let got = metric_eventually(bff, "bff_policy_reloads_total", &[("result", "ok")], count).await;
    assert_eq!(got, count, "policy reloads; logs:\n{}", bff.logs());
}

// ---------------------------------------------------------------------------------------------
// The loader's rules, on `check.rs`'s base policy (line 39 is its last, line 19 route
// `profile`'s `cache`)
// ---------------------------------------------------------------------------------------------

#[test]
fn rate_limits_at_policy_and_route_level_load() {
    let yaml = insert(BASE, 39, "rate_limit: { requests: 100, per: 1m }");
    let yaml = insert(
        &yaml,
        19,
        "    rate_limit: { requests: 5, per: 1s, burst: 20 }",
    );
    assert_valid(&yaml);
}

#[test]
fn rate_limit_requests_must_be_at_least_one() {
    let yaml = insert(BASE, 39, "rate_limit: { requests: 0, per: 1s }");
    assert_rejected(
        &yaml,
        40,
        Some(25),
        "`rate_limit.requests` must be at least 1",
    );
}

#[test]
fn rate_limit_per_must_be_longer_than_zero() {
    let yaml = insert(BASE, 39, "rate_limit: { requests: 1, per: 0s }");
    assert_rejected(
        &yaml,
        40,
        Some(33),
        "`rate_limit.per` must be longer than zero",
    );
}

#[test]
fn rate_limit_per_needs_a_unit() {
    let yaml = insert(BASE, 39, "rate_limit: { requests: 1, per: 60 }");
    assert_rejected(&yaml, 40, Some(33), "`60` is not a duration");
}

#[test]
fn rate_limit_burst_must_be_at_least_one() {
    let yaml = insert(BASE, 39, "rate_limit: { requests: 1, per: 1s, burst: 0 }");
    assert_rejected(&yaml, 40, Some(44), "`rate_limit.burst` must be at least 1");
}

#[test]
fn rate_limit_needs_requests_and_per() {
    let yaml = insert(BASE, 39, "rate_limit: { per: 1s }");
    assert_rejected(&yaml, 40, None, "missing field `requests`");
    let yaml = insert(BASE, 39, "rate_limit: { requests: 1 }");
    assert_rejected(&yaml, 40, None, "missing field `per`");
}

#[test]
fn rate_limit_refuses_unknown_keys() {
    let yaml = insert(BASE, 39, "rate_limit: { requests: 1, per: 1s, window: 1m }");
    assert_rejected(&yaml, 40, Some(37), "unknown field `window`");
    let yaml = insert(
        BASE,
        19,
        "    rate_limit: { requests: 1, per: 1s, key: ip }",
    );
    assert_rejected(&yaml, 20, Some(41), "unknown field `key`");
}

#[test]
fn rate_limit_refuses_negative_and_huge_numbers() {
    let yaml = insert(BASE, 39, "rate_limit: { requests: -1, per: 1s }");
    assert_rejected(&yaml, 40, Some(25), "");
    let yaml = insert(
        BASE,
        39,
        "rate_limit: { requests: 1, per: 1s, burst: 4294967296 }",
    );
    assert_rejected(&yaml, 40, Some(44), "");
}

#[test]
fn rate_limit_of_more_than_one_request_a_nanosecond_is_refused() {
    let yaml = insert(BASE, 39, "rate_limit: { requests: 2000000, per: 1ms }");
    assert_rejected(&yaml, 40, Some(25), "more than one a nanosecond");
}

#[test]
fn rate_limit_that_takes_more_than_a_year_to_refill_is_refused() {
    let yaml = insert(
        BASE,
        39,
        "rate_limit: { requests: 1, per: 5000h, burst: 2 }",
    );
    assert_rejected(&yaml, 40, Some(47), "more than a year to refill");
    // Without `burst`, a burst of `requests` refills in `per`.
    let yaml = insert(BASE, 39, "rate_limit: { requests: 3, per: 9000h }");
    assert_rejected(&yaml, 40, Some(33), "more than a year to refill");
}

#[test]
fn route_rate_limit_errors_name_the_route() {
    let yaml = insert(BASE, 19, "    rate_limit: { requests: 0, per: 1s }");
    assert_rejected(
        &yaml,
        20,
        Some(29),
        "route `profile`: `rate_limit.requests` must be at least 1",
    );
}

#[test]
fn failure_limit_and_client_address_load_and_are_checked() {
    let yaml = insert(
        BASE,
        7,
        "  failure_limit: { requests: 10, per: 1m, burst: 5 }",
    );
    let yaml = insert(
        &yaml,
        40,
        "client_address: { trusted_proxies: [10.0.0.0/8, \"192.0.2.7\", \"2001:db8::/32\"], header: X-Real-IP }",
    );
    assert_valid(&yaml);
    let yaml = insert(BASE, 7, "  failure_limit: { requests: 0, per: 1m }");
    assert_rejected(
        &yaml,
        8,
        Some(30),
        "`auth.failure_limit.requests` must be at least 1",
    );
    let yaml = insert(
        BASE,
        39,
        "client_address: { trusted_proxies: [10.0.0.0/33] }",
    );
    assert_rejected(
        &yaml,
        40,
        Some(37),
        "`10.0.0.0/33` is not an address or CIDR",
    );
    let yaml = insert(BASE, 39, "client_address: { header: \"X Forwarded\" }");
    assert_rejected(&yaml, 40, Some(27), "`X Forwarded` is not a header name");
    let yaml = insert(BASE, 39, "client_address: { trusted: [10.0.0.0/8] }");
    assert_rejected(&yaml, 40, None, "unknown field `trusted`");
}
