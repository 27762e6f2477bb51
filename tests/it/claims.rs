//! Verified claims in templates, against the real binary with real HS256 tokens: `{jwt.sub}` in
//! fetch paths and upstream headers, the 401s of missing, forged, expired and `none` tokens, and
//! readiness waiting for the key set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::metrics::metric_eventually;
use crate::support::{http, tokens, write_policy, Bff, MockReply, MockServer, TempPolicy};

const SECRET: &str = "claims-test-secret-of-at-least-32-bytes";

fn policy(upstream: &str) -> String {
    format!(
        r#"client: mobile
auth:
  jwt:
    issuer: https://id.example.com/
    audience: mobile-app
    algorithms: [HS256]
    hs256_secret: "{SECRET}"
upstreams:
  user:
    url: "{upstream}"
    timeout: 1s
    headers: {{ X-User-Id: "{{jwt.sub}}" }}
  info: {{ url: "{upstream}", timeout: 1s }}
routes:
  - name: me
    method: GET
    path: /me
    fetch:
      profile: {{ upstream: user, path: "/users/{{jwt.sub}}", critical: true, fields: [name] }}
  - name: me-proxied
    method: GET
    path: /me/proxied
    proxy: {{ upstream: user, path: /info, fields: [name] }}
  - name: public
    method: GET
    path: /public
    auth: optional
    fetch:
      info: {{ upstream: info, path: /info, critical: true, fields: [name] }}
"#
    )
}

fn token(claims: Value, secret: &str) -> String {
    tokens::hs256(&claims, secret)
}

fn claims(sub: &str, exp_offset: i64) -> Value {
    tokens::claims("mobile-app", exp_offset, json!({ "sub": sub }))
}

async fn start() -> (MockServer, Bff, TempPolicy) {
    let user = MockServer::start(|_| MockReply::json(200, json!({"name": "Ada", "ssn": "x"})));
    let file = write_policy(&policy(&user.url()));
    let bff = Bff::start(file.path()).await;
    (user, bff, file)
}

async fn get_with(bff: &Bff, path: &str, authorization: Option<&str>) -> http::Reply {
    let mut headers = vec![("cookie", "session=client-secret".to_string())];
    if let Some(value) = authorization {
        headers.push(("authorization", value.to_string()));
    }
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    http::send("GET", &bff.url(path), &headers, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subject_reaches_paths_encoded_and_headers_as_is() {
    let (user, bff, _file) = start().await;
    let bearer = format!("Bearer {}", token(claims("../admin?x=1", 300), SECRET));
    let reply = get_with(&bff, "/me", Some(&bearer)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["profile"], json!({"name": "Ada"}));

    let seen = user.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path(), "/users/..%2Fadmin%3Fx%3D1");
    assert_eq!(seen[0].header("x-user-id"), Some("../admin?x=1"));
    assert_eq!(
        seen[0].header("authorization"),
        None,
        "the client's token stays at the sidecar"
    );
    assert_eq!(seen[0].header("cookie"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_or_missing_tokens_get_401_and_never_reach_an_upstream() {
    let (user, bff, _file) = start().await;
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let forged = token(
        claims("u1", 300),
        "another-secret-that-is-also-32-bytes-long",
    );
    let expired = token(claims("u1", -3600), SECRET);
    let wrong_audience = token(
        json!({"iss": "https://id.example.com/", "aud": "web-app", "sub": "u1", "exp": now + 300}),
        SECRET,
    );
    let valid = token(claims("u1", 300), SECRET);
    let (_, rest) = valid.split_once('.').expect("three parts");
    // {"alg":"none","typ":"JWT"} with the valid payload and no signature.
    let unsigned = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        rest.split('.').next().expect("payload")
    );
    let cases = [
        (None, "missing", "Bearer"),
        (
            Some("Basic dTpw".to_string()),
            "malformed",
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some(format!("Bearer {forged}")),
            "bad_signature",
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some(format!("Bearer {expired}")),
            "expired",
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some(format!("Bearer {wrong_audience}")),
            "wrong_audience",
            "Bearer error=\"invalid_token\"",
        ),
        (
            Some(format!("Bearer {unsigned}")),
            "disallowed_alg",
            "Bearer error=\"invalid_token\"",
        ),
    ];
    for (authorization, reason, challenge) in cases {
        let reply = get_with(&bff, "/me", authorization.as_deref()).await;
        assert_eq!(reply.status, 401, "{reason}: {}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "UNAUTHENTICATED", "{reason}");
        assert_eq!(
            reply.header("www-authenticate"),
            Some(challenge),
            "{reason}"
        );
        // The client learns it is unauthenticated, not which check failed.
        assert!(!reply.text().contains(reason), "{reason}: {}", reply.text());
        let counted = metric_eventually(
            &bff,
            "bff_auth_failures_total",
            &[("client", "mobile"), ("reason", reason)],
            1.0,
        )
        .await;
        assert_eq!(counted, 1.0, "bff_auth_failures_total{{reason={reason}}}");
    }
    assert!(
        user.requests().is_empty(),
        "no upstream is called without a verified identity"
    );

    // A route with `auth: optional` serves anonymous requests, but never a bad token; one whose
    // upstream sends a claim in a header needs a token like one using it in the path.
    assert_eq!(get_with(&bff, "/public", None).await.status, 200);
    let forged = format!("Bearer {forged}");
    assert_eq!(get_with(&bff, "/public", Some(&forged)).await.status, 401);
    assert_eq!(user.requests().len(), 1);
    let proxied = get_with(&bff, "/me/proxied", None).await;
    assert_eq!(proxied.status, 401, "{}", proxied.text());
    assert_eq!(proxied.header("www-authenticate"), Some("Bearer"));
    assert_eq!(user.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_key_set_is_fetched() {
    let jwks_up = Arc::new(AtomicBool::new(false));
    let up = jwks_up.clone();
    let jwks = MockServer::start(move |_| {
        if up.load(Ordering::SeqCst) {
            let keys = std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/jwt/jwks.json"
            ))
            .expect("fixture key set");
            MockReply::bytes(200, "application/json", keys)
        } else {
            MockReply::text(503, "identity provider starting")
        }
    });
    let file = write_policy(&format!(
        r#"client: mobile
auth:
  jwt:
    issuer: https://id.example.com/
    audience: mobile-app
    algorithms: [RS256, ES256]
    jwks_url: "{}/.well-known/jwks.json"
upstreams: {{ app: {{ url: "http://127.0.0.1:9" }} }}
fallthrough: app
"#,
        jwks.url()
    ));
    let mut bff = Bff::builder(file.path()).spawn();
    // Once it has asked for the keys and been refused, it is up but not ready.
    let asked = std::time::Instant::now() + Duration::from_secs(10);
    while jwks.requests().is_empty() {
        assert!(
            std::time::Instant::now() < asked,
            "the key set was never asked for"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let readyz = http::get(&bff.admin_url("/readyz")).await;
    assert_eq!(readyz.status, 503, "ready without keys");
    jwks_up.store(true, Ordering::SeqCst);
    bff.wait_ready().await;
}
