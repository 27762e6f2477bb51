//! Client JWTs against the real binary and a real JWKS endpoint on loopback: the happy path of
//! every asymmetric algorithm; each hostile token its own test (401, the exact failure reason in
//! `bff_auth_failures_total`, no upstream call, a message that tells nothing); unknown key ids
//! and their refetch floor; a JWKS that is down, garbage, or withdraws a key; claims that try
//! to escape their path template. HS256 (happy path, forged, expired, wrong audience, `alg:
//! none`, missing) is in `claims.rs`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::support::metrics::{metric, metric_eventually, metrics_text, parse_metrics};
use crate::support::{http, write_policy, Bff, MockReply, MockServer, TempPolicy};

const ISSUER: &str = "https://id.example.com/";
const AUDIENCE: &str = "mobile-app";
const CHALLENGE: &str = "Bearer error=\"invalid_token\"";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The fixture key set, plus the RSA key under one kid per other RSA algorithm (a JWK that
/// names its `alg` verifies only that one).
fn published_keys() -> Vec<Value> {
    let jwks: Value = serde_json::from_slice(&fixture("jwks.json")).expect("fixture jwks.json");
    let mut keys = jwks["keys"].as_array().expect("a keys array").clone();
    for (kid, alg) in [
        ("rsa-rs384", "RS384"),
        ("rsa-rs512", "RS512"),
        ("rsa-ps256", "PS256"),
    ] {
        let mut rsa = keys[0].clone();
        rsa["kid"] = json!(kid);
        rsa["alg"] = json!(alg);
        keys.push(rsa);
    }
    keys
}

fn jwks_document(keys: &[Value]) -> Vec<u8> {
    json!({ "keys": keys }).to_string().into_bytes()
}

/// The kid each algorithm's fixture key is published under.
fn kid_of(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::RS256 => "rsa-1",
        Algorithm::RS384 => "rsa-rs384",
        Algorithm::RS512 => "rsa-rs512",
        Algorithm::PS256 => "rsa-ps256",
        Algorithm::ES256 => "ec-1",
        Algorithm::ES384 => "ec384-1",
        Algorithm::EdDSA => "ed-1",
        other => panic!("no fixture key for {other:?}"),
    }
}

fn signing_key(alg: Algorithm) -> EncodingKey {
    let key = match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 => {
            EncodingKey::from_rsa_pem(&fixture("rsa_private.pem"))
        }
        Algorithm::ES256 => EncodingKey::from_ec_pem(&fixture("ec_private.pem")),
        Algorithm::ES384 => EncodingKey::from_ec_pem(&fixture("ec384_private.pem")),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&fixture("ed25519_private.pem")),
        other => panic!("no fixture key for {other:?}"),
    };
    key.unwrap_or_else(|e| panic!("fixture key for {alg:?}: {e}"))
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Valid claims, with `changes` applied (`null` removes a claim).
fn claims(changes: Value) -> Value {
    let mut claims = json!({"sub": "usr_9821", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600});
    for (name, value) in changes.as_object().expect("changes are an object") {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value.clone();
        }
    }
    claims
}

fn sign_with(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let header = Header {
        kid: Some(kid.to_owned()),
        ..Header::new(alg)
    };
    encode(&header, claims, key).unwrap_or_else(|e| panic!("sign a {alg:?} token: {e}"))
}

/// A token signed with the fixture key of `alg`, under its published kid.
fn sign(alg: Algorithm, claims: &Value) -> String {
    sign_with(alg, kid_of(alg), &signing_key(alg), claims)
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWKS endpoint whose answer the test can change; it counts what it was asked.
struct Jwks {
    server: MockServer,
    reply: Arc<Mutex<(u16, Vec<u8>)>>,
}

impl Jwks {
    fn start(body: Vec<u8>) -> Jwks {
        Self::start_on(0, body)
    }

    fn start_on(port: u16, body: Vec<u8>) -> Jwks {
        let reply = Arc::new(Mutex::new((200, body)));
        let answer = reply.clone();
        let server = MockServer::start_on(port, move |_| {
            let (status, body) = answer.lock().expect("jwks reply").clone();
            MockReply::bytes(status, "application/json", body)
        });
        Jwks { server, reply }
    }

    fn set(&self, status: u16, body: impl Into<Vec<u8>>) {
        *self.reply.lock().expect("jwks reply") = (status, body.into());
    }

    fn fetches(&self) -> usize {
        self.server.requests().len()
    }
}

fn policy(jwks_url: &str, upstream: &str) -> String {
    keyed_policy(&format!("jwks_url: \"{jwks_url}\""), "30s", upstream)
}

/// The policy with its key source given as one line (`jwks_url: …` or `jwks_file: …`).
fn keyed_policy(key_source: &str, leeway: &str, upstream: &str) -> String {
    format!(
        r#"client: mobile
auth:
  jwt:
    issuer: {ISSUER}
    audience: {AUDIENCE}
    algorithms: [RS256, RS384, RS512, PS256, ES256, ES384, EdDSA]
    {key_source}
    leeway: {leeway}
  # These tests refuse many tokens from one address; the limit on that is pipeline::rate_limit's.
  failure_limit: {{ requests: 1000, per: 1m }}
upstreams:
  user: {{ url: "{upstream}", timeout: 1s }}
routes:
  - name: me
    method: GET
    path: /me
    fetch:
      profile: {{ upstream: user, path: "/users/{{jwt.sub}}", critical: true, fields: [name] }}
"#
    )
}

/// A sidecar verifying against a JWKS mock, in front of a recording upstream.
struct Setup {
    jwks: Jwks,
    upstream: MockServer,
    bff: Bff,
    policy_file: TempPolicy,
}

fn jwks_url(jwks: &Jwks) -> String {
    format!("{}/.well-known/jwks.json", jwks.server.url())
}

fn user_service() -> MockServer {
    MockServer::start(|_| MockReply::json(200, json!({"name": "Ada", "ssn": "078-05-1120"})))
}

/// Ready: the key set is fetched.
async fn start() -> Setup {
    let jwks = Jwks::start(jwks_document(&published_keys()));
    let upstream = user_service();
    let policy = write_policy(&policy(&jwks_url(&jwks), &upstream.url()));
    let bff = Bff::start(policy.path()).await;
    Setup {
        jwks,
        upstream,
        bff,
        policy_file: policy,
    }
}

async fn get_me(bff: &Bff, authorization: &str) -> http::Reply {
    http::send(
        "GET",
        &bff.url("/me"),
        &[("authorization", authorization)],
        "",
    )
    .await
}

async fn bearer(bff: &Bff, token: &str) -> http::Reply {
    get_me(bff, &format!("Bearer {token}")).await
}

/// What a refused token must look like: 401 with the `invalid_token` challenge, counted under
/// exactly `reason` (`count` times, and no other reason counted), no upstream call, and a body
/// that says no more than a request without any token gets.
async fn assert_refused(setup: &Setup, reply: &http::Reply, reason: &str, count: f64) {
    assert_eq!(reply.status, 401, "{reason}: {}", reply.text());
    assert_eq!(
        reply.header("www-authenticate"),
        Some(CHALLENGE),
        "{reason}"
    );
    let body = reply.json();
    let error = body["error"].as_object().expect("an error envelope");
    let mut members: Vec<&str> = error.keys().map(String::as_str).collect();
    members.sort_unstable();
    assert_eq!(
        members,
        ["code", "message", "retryable", "traceId"],
        "{body}"
    );
    assert_eq!(error["code"], "UNAUTHENTICATED", "{reason}");
    let message = error["message"].as_str().expect("a message").to_lowercase();
    for telling in [
        reason,
        "expire",
        "signature",
        "issuer",
        "audience",
        "kid",
        "key",
        "alg",
        "malformed",
        "not yet",
        "nbf",
        "exp",
        "claim",
        "jwks",
    ] {
        assert!(
            !message.contains(telling),
            "{reason}: the message tells {telling:?}: {message}"
        );
    }
    let labels = [("client", "mobile"), ("reason", reason)];
    let counted = metric_eventually(&setup.bff, "bff_auth_failures_total", &labels, count).await;
    assert_eq!(counted, count, "bff_auth_failures_total{{reason={reason}}}");
    let all: f64 = parse_metrics(&metrics_text(&setup.bff).await)
        .iter()
        .filter(|s| s.name == "bff_auth_failures_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(all, count, "failures counted under another reason");
    assert!(
        setup.upstream.requests().is_empty(),
        "{reason}: the upstream was called"
    );
}

/// The refused request's message is the one given to a request with no token at all.
async fn assert_same_message_as_no_token(setup: &Setup, reply: &http::Reply) {
    let anonymous = http::get(&setup.bff.url("/me")).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert_eq!(
        reply.json()["error"]["message"],
        anonymous.json()["error"]["message"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_asymmetric_algorithm_verifies_with_its_published_key() {
    let setup = start().await;
    let fetched = setup.jwks.fetches();
    let algorithms = [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];
    for (i, alg) in algorithms.into_iter().enumerate() {
        let sub = format!("user-{alg:?}");
        let token = sign(alg, &claims(json!({ "sub": sub })));
        let reply = bearer(&setup.bff, &token).await;
        assert_eq!(reply.status, 200, "{alg:?}: {}", reply.text());
        assert_eq!(reply.json()["profile"], json!({"name": "Ada"}), "{alg:?}");
        let seen = setup.upstream.requests();
        assert_eq!(seen.len(), i + 1, "{alg:?}");
        assert_eq!(seen[i].path(), format!("/users/{sub}"), "{alg:?}");
        assert_eq!(seen[i].header("authorization"), None, "{alg:?}");
    }
    assert_eq!(
        setup.jwks.fetches(),
        fetched,
        "every kid was known: no refetch"
    );
    let failures = metrics_text(&setup.bff).await;
    assert!(!failures.contains("bff_auth_failures_total{"), "{failures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_signed_with_the_rsa_public_key_is_disallowed() {
    let setup = start().await;
    // The classic confusion: HMAC keyed with what the verifier holds as the RSA key.
    let public_pem = fixture("rsa_public.pem");
    let token = sign_with(
        Algorithm::HS256,
        "rsa-1",
        &EncodingKey::from_secret(&public_pem),
        &claims(json!({})),
    );
    let reply = bearer(&setup.bff, &token).await;
    assert_refused(&setup, &reply, "disallowed_alg", 1.0).await;
    assert_same_message_as_no_token(&setup, &reply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_by_another_key_under_a_published_kid_is_refused() {
    let setup = start().await;
    let impostor = EncodingKey::from_rsa_pem(&fixture("rsa_other_private.pem"))
        .expect("fixture rsa_other_private.pem");
    let token = sign_with(Algorithm::RS256, "rsa-1", &impostor, &claims(json!({})));
    let reply = bearer(&setup.bff, &token).await;
    assert_refused(&setup, &reply, "bad_signature", 1.0).await;
    assert_same_message_as_no_token(&setup, &reply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_not_yet_valid_is_refused() {
    let setup = start().await;
    let token = sign(Algorithm::ES256, &claims(json!({"nbf": now() + 3600})));
    let reply = bearer(&setup.bff, &token).await;
    assert_refused(&setup, &reply, "not_yet_valid", 1.0).await;
    assert_same_message_as_no_token(&setup, &reply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_another_issuer_is_refused() {
    let setup = start().await;
    let token = sign(
        Algorithm::RS256,
        &claims(json!({"iss": "https://evil.example/"})),
    );
    let reply = bearer(&setup.bff, &token).await;
    assert_refused(&setup, &reply, "wrong_issuer", 1.0).await;
    assert_same_message_as_no_token(&setup, &reply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_payload_is_refused() {
    let setup = start().await;
    let token = sign(Algorithm::EdDSA, &claims(json!({})));
    let parts: Vec<&str> = token.split('.').collect();
    let forged = claims(json!({"sub": "admin"})).to_string();
    let tampered = format!("{}.{}.{}", parts[0], b64url(forged.as_bytes()), parts[2]);
    let reply = bearer(&setup.bff, &tampered).await;
    assert_refused(&setup, &reply, "bad_signature", 1.0).await;
    assert_same_message_as_no_token(&setup, &reply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_tokens_are_malformed() {
    let setup = start().await;
    let valid = sign(Algorithm::RS256, &claims(json!({})));
    let (header, _) = valid.split_once('.').expect("a JWT");
    let garbage = [
        "garbage".to_owned(),
        "a.b.c".to_owned(),
        "...".to_owned(),
        format!("{header}.!!!.???"),
        format!("{}.{}.{}", b64url(b"\x00\xff"), b64url(b"{"), b64url(b"x")),
    ];
    // Correctly signed, but the payload is not a claims object.
    let mut garbage = garbage.to_vec();
    for payload in [&b"not json"[..], b"[1,2]", b"null"] {
        let message = format!("{header}.{}", b64url(payload));
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &signing_key(Algorithm::RS256),
            Algorithm::RS256,
        )
        .expect("sign a garbage payload");
        garbage.push(format!("{message}.{signature}"));
    }
    for (i, token) in garbage.iter().enumerate() {
        let reply = bearer(&setup.bff, token).await;
        assert_refused(&setup, &reply, "malformed", (i + 1) as f64).await;
    }
    let reply = bearer(&setup.bff, &garbage[0]).await;
    assert_same_message_as_no_token(&setup, &reply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_48_kib_authorization_header_is_refused_and_the_sidecar_keeps_serving() {
    // Request heads up to 64 KiB are read (`--max-header-bytes`; larger ones are 431, see
    // `limits`), so this reaches the verifier, which refuses a token over 8 KiB before
    // parsing it.
    let setup = start().await;
    let valid = sign(Algorithm::RS256, &claims(json!({})));
    let (header, rest) = valid.split_once('.').expect("a JWT");
    let huge = format!("{header}.{}{rest}", "A".repeat(48 * 1024));
    assert!(huge.len() > 48 * 1024);
    let reply = bearer(&setup.bff, &huge).await;
    assert_refused(&setup, &reply, "malformed", 1.0).await;
    assert_same_message_as_no_token(&setup, &reply).await;
    // Still serving, on fresh connections.
    let reply = bearer(&setup.bff, &valid).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_refetches_the_set_once_and_is_refused() {
    let setup = start().await;
    let fetched = setup.jwks.fetches();
    let token = sign_with(
        Algorithm::RS256,
        "rsa-2",
        &signing_key(Algorithm::RS256),
        &claims(json!({})),
    );
    let reply = bearer(&setup.bff, &token).await;
    assert_refused(&setup, &reply, "unknown_key", 1.0).await;
    assert_eq!(setup.jwks.fetches(), fetched + 1, "one refetch");
    // Within the 30 s floor, the same kid again does not fetch again.
    let reply = bearer(&setup.bff, &token).await;
    assert_refused(&setup, &reply, "unknown_key", 2.0).await;
    assert_eq!(setup.jwks.fetches(), fetched + 1);
    assert_same_message_as_no_token(&setup, &reply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_kids_costs_one_jwks_fetch() {
    let setup = Arc::new(start().await);
    let fetched = setup.jwks.fetches();
    let key = signing_key(Algorithm::RS256);
    let random_kid_token = || {
        let kid = format!("kid-{:016x}", rand::random::<u64>());
        sign_with(Algorithm::RS256, &kid, &key, &claims(json!({})))
    };
    for _ in 0..20 {
        let reply = bearer(&setup.bff, &random_kid_token()).await;
        assert_eq!(reply.status, 401, "{}", reply.text());
    }
    let concurrent: Vec<_> = (0..30)
        .map(|_| {
            let (setup, token) = (setup.clone(), random_kid_token());
            tokio::spawn(async move { bearer(&setup.bff, &token).await })
        })
        .collect();
    let mut last = None;
    for task in concurrent {
        let reply = task.await.expect("request task");
        assert_eq!(reply.status, 401, "{}", reply.text());
        last = Some(reply);
    }
    assert_refused(&setup, &last.expect("a reply"), "unknown_key", 50.0).await;
    assert_eq!(
        setup.jwks.fetches(),
        fetched + 1,
        "at most one refetch per 30 s"
    );
}

/// Polls `done` every 20 ms; panics naming `what` after 15 s.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < until, "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_endpoint_down_at_start_keeps_the_sidecar_unready_until_it_is_up() {
    let port = MockServer::refused_port();
    let upstream = user_service();
    let url = format!("http://127.0.0.1:{port}/.well-known/jwks.json");
    let file = write_policy(&policy(&url, &upstream.url()));
    let mut bff = Bff::builder(file.path()).spawn();
    // The failed fetch is logged by the job that also made the sidecar ready otherwise.
    let failed = format!("cannot load the JWT keys from {url}");
    wait_until("the key fetch failed", || bff.logs().contains(&failed)).await;
    let readyz = http::get(&bff.admin_url("/readyz")).await;
    assert_eq!(readyz.status, 503, "ready without keys");
    let jwks = Jwks::start_on(port, jwks_document(&published_keys()));
    bff.wait_ready().await;
    assert!(jwks.fetches() >= 1);
    let token = sign(Algorithm::ES384, &claims(json!({})));
    let reply = bearer(&bff, &token).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_jwks_at_start_keeps_the_sidecar_unready() {
    let jwks = Jwks::start(b"<html>sign in</html>".to_vec());
    let upstream = user_service();
    let file = write_policy(&policy(&jwks_url(&jwks), &upstream.url()));
    let mut bff = Bff::builder(file.path()).spawn();
    // Each answer is fetched (retried every 2 s) before readiness is judged on it.
    wait_until("the key set was fetched", || jwks.fetches() >= 1).await;
    let answers = [
        &br#"{"keys":[]}"#[..],
        br#"{"keys":[{"kty":"RSA"}]}"#,
        b"[]",
    ];
    for answer in answers {
        let readyz = http::get(&bff.admin_url("/readyz")).await;
        assert_eq!(readyz.status, 503, "ready without usable keys");
        jwks.set(200, answer);
        let seen = jwks.fetches();
        wait_until("the key set was fetched again", || jwks.fetches() > seen).await;
    }
    let readyz = http::get(&bff.admin_url("/readyz")).await;
    assert_eq!(readyz.status, 503, "ready without usable keys");
    // Valid keys at last.
    jwks.set(200, jwks_document(&published_keys()));
    bff.wait_ready().await;
    let reply = bearer(&bff, &sign(Algorithm::PS256, &claims(json!({})))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refetch_keeps_the_last_good_keys() {
    let setup = start().await;
    let fetched = setup.jwks.fetches();
    setup.jwks.set(200, "<html>maintenance</html>");
    // An unknown kid makes the sidecar refetch, and the refetch gets garbage.
    let stranger = sign_with(
        Algorithm::RS256,
        "rsa-9",
        &signing_key(Algorithm::RS256),
        &claims(json!({})),
    );
    assert_eq!(bearer(&setup.bff, &stranger).await.status, 401);
    assert_eq!(setup.jwks.fetches(), fetched + 1);
    // Tokens of every published key still verify (none of them seen before, so none cached).
    for alg in [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA] {
        let reply = bearer(&setup.bff, &sign(alg, &claims(json!({})))).await;
        assert_eq!(reply.status, 200, "{alg:?}: {}", reply.text());
    }
    let readyz = http::get(&setup.bff.admin_url("/readyz")).await;
    assert_eq!(readyz.status, 200, "still ready with the last good keys");
}

/// Waits (15 s at most) until `bff_policy_reloads_total{result}` reaches `want`.
async fn reloads_reach(bff: &Bff, result: &str, want: f64) {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let got = metric(bff, "bff_policy_reloads_total", &[("result", result)]).await;
        if got >= want {
            assert_eq!(got, want, "bff_policy_reloads_total{{result={result}}}");
            return;
        }
        assert!(
            Instant::now() < until,
            "bff_policy_reloads_total{{result={result}}} is {got}, not {want}, after 15 s:\n{}",
            bff.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh token (never verified before, so not remembered) of a published key verifies, and
/// the sidecar is ready: the keys in force are good.
async fn assert_tokens_verify(setup: &Setup, round: usize) {
    for alg in [Algorithm::RS256, Algorithm::ES256] {
        let token = sign(alg, &claims(json!({ "jti": format!("round-{round}") })));
        let reply = bearer(&setup.bff, &token).await;
        assert_eq!(
            reply.status,
            200,
            "round {round}, {alg:?}: {}",
            reply.text()
        );
    }
    let readyz = http::get(&setup.bff.admin_url("/readyz")).await;
    assert_eq!(readyz.status, 200, "round {round}: {}", readyz.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_key_source_cannot_be_loaded_is_refused_and_the_old_policy_serves() {
    let setup = start().await;
    let upstream = setup.upstream.url();
    let dir = setup.policy_file.dir().to_path_buf();
    let misspelled = dir.join("jwks.jsno");
    let not_a_key_set = dir.join("jwks.html");
    std::fs::write(&not_a_key_set, "<html>sign in</html>").expect("write jwks.html");
    let unreadable = dir.join("jwks-dir");
    std::fs::create_dir(&unreadable).expect("create jwks-dir");
    let garbage = Jwks::start(b"<html>sign in</html>".to_vec());
    let down = format!(
        "http://127.0.0.1:{}/.well-known/jwks.json",
        MockServer::refused_port()
    );
    let broken: Vec<(String, String)> = [&misspelled, &not_a_key_set, &unreadable]
        .iter()
        .map(|file| {
            let file = file.display().to_string();
            (format!("jwks_file: \"{file}\""), file)
        })
        .chain(
            [&down, &jwks_url(&garbage)]
                .iter()
                .map(|url| (format!("jwks_url: \"{url}\""), url.to_string())),
        )
        .collect();
    assert_tokens_verify(&setup, 0).await;
    for (round, (source, location)) in broken.iter().enumerate() {
        setup
            .policy_file
            .rewrite(&keyed_policy(source, "30s", &upstream));
        reloads_reach(&setup.bff, "invalid", (round + 1) as f64).await;
        let logs = setup.bff.logs();
        let refused = logs
            .lines()
            .find(|l| l.contains("policy refused") && l.contains(location.as_str()))
            .unwrap_or_else(|| panic!("no `policy refused` line naming {location}:\n{logs}"));
        assert!(
            refused.contains("cannot load the JWT keys"),
            "the log does not say why: {refused}"
        );
        assert_tokens_verify(&setup, round + 1).await;
    }
    assert_eq!(
        metric(&setup.bff, "bff_policy_reloads_total", &[("result", "ok")]).await,
        0.0
    );

    // A new key source that loads is taken.
    let good = dir.join("jwks.json");
    std::fs::write(&good, jwks_document(&published_keys())).expect("write jwks.json");
    let file_source = format!("jwks_file: \"{}\"", good.display());
    setup
        .policy_file
        .rewrite(&keyed_policy(&file_source, "30s", &upstream));
    reloads_reach(&setup.bff, "ok", 1.0).await;
    let fetched = setup.jwks.fetches();
    assert_tokens_verify(&setup, 10).await;
    assert_eq!(
        setup.jwks.fetches(),
        fetched,
        "the old key source was asked"
    );

    // A reload that keeps the key source keeps its keys: no read, so it cannot fail on one.
    std::fs::remove_file(&good).expect("remove jwks.json");
    setup
        .policy_file
        .rewrite(&keyed_policy(&file_source, "45s", &upstream));
    reloads_reach(&setup.bff, "ok", 2.0).await;
    assert_tokens_verify(&setup, 11).await;
    assert_eq!(
        metric(
            &setup.bff,
            "bff_policy_reloads_total",
            &[("result", "invalid")]
        )
        .await,
        broken.len() as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_key_stops_validating_its_tokens_at_once() {
    let setup = start().await;
    let token = sign(Algorithm::RS256, &claims(json!({})));
    // Verified, and so remembered by the sidecar's token cache.
    for _ in 0..2 {
        let reply = bearer(&setup.bff, &token).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // The identity provider withdraws rsa-1; an unknown kid makes the sidecar notice.
    let mut keys = published_keys();
    keys.retain(|key| key["kid"] != "rsa-1");
    setup.jwks.set(200, jwks_document(&keys));
    let fetched = setup.jwks.fetches();
    let stranger = sign_with(
        Algorithm::ES256,
        "ec-new",
        &signing_key(Algorithm::ES256),
        &claims(json!({})),
    );
    assert_eq!(bearer(&setup.bff, &stranger).await.status, 401);
    assert_eq!(setup.jwks.fetches(), fetched + 1);
    let reply = bearer(&setup.bff, &token).await;
    assert_eq!(reply.status, 401, "the cached token outlived its key");
    let unknown = [("client", "mobile"), ("reason", "unknown_key")];
    let counted = metric_eventually(&setup.bff, "bff_auth_failures_total", &unknown, 2.0).await;
    assert_eq!(counted, 2.0);
    assert_eq!(setup.upstream.requests().len(), 2);
    // The keys that stayed still work.
    let reply = bearer(&setup.bff, &sign(Algorithm::ES384, &claims(json!({})))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_cannot_escape_their_path_segment() {
    let setup = start().await;
    // `../admin?x=1` is in claims.rs.
    let escapes = [
        ("a/b", "a%2Fb"),
        ("x?y=z", "x%3Fy%3Dz"),
        ("%2e%2e", "%252e%252e"),
        ("..%2f..%2fadmin", "..%252f..%252fadmin"),
        ("a#frag", "a%23frag"),
        ("line\nbreak", "line%0Abreak"),
        ("\r\nX-Injected: 1", "%0D%0AX-Injected%3A%201"),
        ("nul\u{0}byte", "nul%00byte"),
        ("tab\there", "tab%09here"),
        ("\u{7f}", "%7F"),
        ("a&b=c", "a%26b%3Dc"),
        ("ü/..", "%C3%BC%2F.."),
        ("...", "..."),
    ];
    for (i, (sub, encoded)) in escapes.iter().enumerate() {
        let token = sign(Algorithm::RS256, &claims(json!({ "sub": sub })));
        let reply = bearer(&setup.bff, &token).await;
        assert_eq!(reply.status, 200, "{sub:?}: {}", reply.text());
        let seen = setup.upstream.requests();
        assert_eq!(seen.len(), i + 1, "{sub:?}");
        let path = seen[i].path();
        assert_eq!(path, format!("/users/{encoded}"), "{sub:?}");
        assert_eq!(seen[i].query(), None, "{sub:?}");
        let segment = path.strip_prefix("/users/").expect("the template's prefix");
        assert!(!segment.contains(['/', '?', '#']), "{sub:?}: {path}");
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        assert_eq!(decoded, *sub, "the upstream reads back exactly the claim");
    }
    // Whole segments that would climb or vanish once an upstream normalises the path.
    for sub in ["..", ".", ""] {
        let token = sign(Algorithm::RS256, &claims(json!({ "sub": sub })));
        let reply = bearer(&setup.bff, &token).await;
        assert_eq!(reply.status, 400, "{sub:?}: {}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "BAD_REQUEST", "{sub:?}");
    }
    assert_eq!(setup.upstream.requests().len(), escapes.len());
}
