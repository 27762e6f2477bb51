//! Per-route `auth` and `scopes`, partner API keys and the JWT cookie, through the real binary:
//! which credential decides (the first present, in the policy's order, never skipping an
//! invalid one), what each refusal looks like, and what reaches the upstream.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::metrics::metric_eventually;
use crate::support::{http, tokens, write_policy, Bff, MockReply, MockServer, TempPolicy};

const SECRET: &str = "auth-methods-secret-of-at-least-32-bytes";

fn token(sub: &str, extra: Value) -> String {
    let mut claims = tokens::claims("web-app", 300, extra);
    claims["sub"] = sub.into();
    tokens::hs256(&claims, SECRET)
}

async fn get(bff: &Bff, path: &str, headers: &[(&str, &str)]) -> http::Reply {
    http::send("GET", &bff.url(path), headers, "").await
}

async fn failures(bff: &Bff, reason: &str, want: f64) -> f64 {
    metric_eventually(
        bff,
        "bff_auth_failures_total",
        &[("client", "web"), ("reason", reason)],
        want,
    )
    .await
}

fn assert_refused(reply: &http::Reply, status: u16, code: &str, challenge: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], code);
    assert_eq!(reply.header("www-authenticate"), Some(challenge));
}

// ---------------------------------------------------------------------------------------------
// Route modes and scopes
// ---------------------------------------------------------------------------------------------

fn modes_policy(upstream: &str) -> String {
    format!(
        r#"client: web
auth:
  jwt: {{ issuer: "https://id.example.com/", audience: web-app, algorithms: [HS256], hs256_secret: "{SECRET}" }}
upstreams:
  info: {{ url: "{upstream}", timeout: 1s }}
routes:
  - {{ name: required, method: GET, path: /required, fetch: {{ info: {{ upstream: info, path: /info, critical: true, fields: [name] }} }} }}
  - name: optional
    method: GET
    path: /optional
    auth: optional
    fetch: {{ info: {{ upstream: info, path: /info, critical: true, fields: [name] }} }}
  - name: open
    method: GET
    path: /open
    auth: none
    fetch: {{ info: {{ upstream: info, path: /info, critical: true, fields: [name] }} }}
  - name: admin
    method: GET
    path: /admin
    scopes: [orders.read, orders.write]
    proxy: {{ upstream: info, path: /info, fields: [name] }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_optional_and_none_routes() {
    let info = MockServer::start(|_| MockReply::json(200, json!({"name": "Ada"})));
    let file = write_policy(&modes_policy(&info.url()));
    let bff = Bff::start(file.path()).await;
    let valid = format!("Bearer {}", token("u1", json!({})));
    let forged = format!(
        "Bearer {}",
        tokens::hs256(
            &tokens::claims("web-app", 300, json!({"sub": "u1"})),
            "not-the-secret-not-the-secret-not-it"
        )
    );

    // Required is the default: no token, no call.
    assert_refused(
        &get(&bff, "/required", &[]).await,
        401,
        "UNAUTHENTICATED",
        "Bearer",
    );
    assert_eq!(failures(&bff, "missing", 1.0).await, 1.0);
    assert!(info.requests().is_empty());
    let ok = get(&bff, "/required", &[("authorization", &valid)]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(info.requests().len(), 1);

    // Optional: anonymous is served, a present but invalid token never is.
    assert_eq!(get(&bff, "/optional", &[]).await.status, 200);
    assert_refused(
        &get(&bff, "/optional", &[("authorization", &forged)]).await,
        401,
        "UNAUTHENTICATED",
        "Bearer error=\"invalid_token\"",
    );
    assert_eq!(failures(&bff, "bad_signature", 1.0).await, 1.0);
    assert_eq!(info.requests().len(), 2);

    // None: credentials are not even looked at, so a forged one is no failure.
    let open = get(&bff, "/open", &[("authorization", &forged)]).await;
    assert_eq!(open.status, 200, "{}", open.text());
    assert_eq!(info.requests().len(), 3);
    assert_eq!(failures(&bff, "bad_signature", 1.0).await, 1.0);

    // The admin port tells an operator what each route asks for.
    let described = http::get(&bff.admin_url("/policy")).await.json();
    let modes: Vec<(String, String, Value)> = described["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (text(&r["name"]), text(&r["auth"]), r["scopes"].clone())
        })
        .collect();
    assert_eq!(
        modes,
        [
            ("required".into(), "required".into(), json!([])),
            ("optional".into(), "optional".into(), json!([])),
            ("open".into(), "none".into(), json!([])),
            (
                "admin".into(),
                "required".into(),
                json!(["orders.read", "orders.write"])
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_must_all_be_granted() {
    let info = MockServer::start(|_| MockReply::json(200, json!({"name": "Ada"})));
    let file = write_policy(&modes_policy(&info.url()));
    let bff = Bff::start(file.path()).await;
    let challenge = "Bearer error=\"insufficient_scope\", scope=\"orders.read orders.write\"";
    let refused = [
        json!({}),
        json!({"scope": "orders.read"}),
        json!({"scope": "orders.readorders.write"}),
        json!({"scp": ["orders.read", "orders.writer"]}),
        json!({"scope": {"orders.read": true, "orders.write": true}}),
    ];
    for (n, extra) in refused.iter().enumerate() {
        let bearer = format!("Bearer {}", token("u1", extra.clone()));
        let reply = get(&bff, "/admin", &[("authorization", &bearer)]).await;
        assert_eq!(reply.status, 403, "{extra}");
        assert_refused(&reply, 403, "FORBIDDEN", challenge);
        assert!(!reply.text().contains("orders."), "{}", reply.text());
        assert_eq!(
            failures(&bff, "insufficient_scope", (n + 1) as f64).await,
            (n + 1) as f64
        );
    }
    assert!(
        info.requests().is_empty(),
        "a refused request calls nothing"
    );
    for extra in [
        json!({"scope": "profile orders.write orders.read"}),
        json!({"scp": ["orders.write", "orders.read"]}),
        json!({"scp": "orders.read orders.write"}),
        json!({"scope": "orders.read", "scp": ["orders.write"]}),
    ] {
        let bearer = format!("Bearer {}", token("u1", extra.clone()));
        let reply = get(&bff, "/admin", &[("authorization", &bearer)]).await;
        assert_eq!(reply.status, 200, "{extra}: {}", reply.text());
    }
    // Without a token it is a 401, not a 403.
    assert_refused(
        &get(&bff, "/admin", &[]).await,
        401,
        "UNAUTHENTICATED",
        "Bearer",
    );
}

// ---------------------------------------------------------------------------------------------
// API keys, the JWT cookie, and their order
// ---------------------------------------------------------------------------------------------

/// A keys file in the layout Kubernetes mounts secrets with: `keys.txt -> ..data/keys.txt`,
/// `..data -> ..genN`.
fn write_keys(dir: &Path, generation: usize, text: &str) {
    let gen = format!("..gen{generation}");
    fs::create_dir(dir.join(&gen)).expect("generation dir");
    fs::write(dir.join(&gen).join("keys.txt"), text).expect("keys file");
    let tmp = dir.join("..data_tmp");
    symlink(&gen, &tmp).expect("symlink");
    fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    if generation == 0 {
        symlink("..data/keys.txt", dir.join("keys.txt")).expect("keys.txt link");
    }
}

fn partner_policy(upstream: &str) -> String {
    // `api_key` first: a request with a key is judged by it, whatever else it carries.
    format!(
        r#"client: web
auth:
  api_key: {{ header: X-Api-Key, keys_file: secrets/keys.txt }}
  jwt:
    issuer: "https://id.example.com/"
    audience: web-app
    algorithms: [HS256]
    hs256_secret: "{SECRET}"
    cookie: session
upstreams:
  catalog:
    url: "{upstream}"
    timeout: 1s
    headers: {{ X-Partner: "{{auth.client}}" }}
  users: {{ url: "{upstream}", timeout: 1s }}
routes:
  - name: products
    method: GET
    path: /products
    proxy: {{ upstream: catalog, path: "/partners/{{auth.client}}/products", fields: [name] }}
  - name: me
    method: GET
    path: /me
    fetch: {{ me: {{ upstream: users, path: "/users/{{jwt.sub}}", critical: true, fields: [name] }} }}
"#
    )
}

struct Partner {
    upstream: MockServer,
    bff: Bff,
    _policy: TempPolicy,
    secrets: std::path::PathBuf,
}

async fn start_partner() -> Partner {
    let upstream = MockServer::start(|_| {
        MockReply::json(200, json!({"name": "Ada", "internal": "never shown"}))
    });
    let policy = write_policy(&partner_policy(&upstream.url()));
    let secrets = policy.dir().join("secrets");
    fs::create_dir(&secrets).expect("secrets dir");
    write_keys(
        &secrets,
        0,
        &format!(
            "# partner keys: sha256 name\n{}  acme\n{}  globex\n",
            tokens::api_key_hash("acme-key-1"),
            tokens::api_key_hash("globex-key-1")
        ),
    );
    let bff = Bff::start(policy.path()).await;
    Partner {
        upstream,
        bff,
        _policy: policy,
        secrets,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_names_the_partner_and_never_reaches_the_upstream() {
    let p = start_partner().await;
    let reply = get(
        &p.bff,
        "/products",
        &[
            ("x-api-key", "acme-key-1"),
            ("cookie", "session=x; other=y"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"name": "Ada"}));
    let seen = p.upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path(), "/partners/acme/products");
    assert_eq!(seen[0].header("x-partner"), Some("acme"));
    for header in ["x-api-key", "authorization", "cookie"] {
        assert_eq!(
            seen[0].header(header),
            None,
            "{header} reached the upstream"
        );
    }

    // An unknown key, or the hash itself, is refused even with a valid token beside it.
    let valid = format!("Bearer {}", token("u1", json!({})));
    let hash = tokens::api_key_hash("acme-key-1");
    for key in ["acme-key-2", hash.as_str()] {
        let reply = get(
            &p.bff,
            "/products",
            &[("x-api-key", key), ("authorization", &valid)],
        )
        .await;
        assert_refused(
            &reply,
            401,
            "UNAUTHENTICATED",
            "ApiKey header=\"x-api-key\", error=\"invalid_key\"",
        );
    }
    assert_eq!(failures(&p.bff, "unknown_api_key", 2.0).await, 2.0);
    let long = "k".repeat(2000);
    let reply = get(&p.bff, "/products", &[("x-api-key", &long)]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(failures(&p.bff, "malformed", 1.0).await, 1.0);
    assert_eq!(p.upstream.requests().len(), 1);

    // A route that needs `{auth.client}` has no value for a token holder.
    let reply = get(&p.bff, "/products", &[("authorization", &valid)]).await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    let challenges: Vec<&str> = reply
        .headers
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(challenges, ["Bearer", "ApiKey header=\"x-api-key\""]);
    assert_eq!(p.upstream.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_the_header_else_the_cookie_and_an_invalid_one_is_never_skipped() {
    let p = start_partner().await;
    let ada = token("ada", json!({}));
    let bob = token("bob", json!({}));

    let cookie = format!("theme=dark; session={ada}");
    let reply = get(&p.bff, "/me", &[("cookie", &cookie)]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(p.upstream.requests()[0].path(), "/users/ada");
    assert_eq!(p.upstream.requests()[0].header("cookie"), None);

    // The header is looked at first.
    let bearer = format!("Bearer {bob}");
    let reply = get(
        &p.bff,
        "/me",
        &[("cookie", &cookie), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(p.upstream.requests()[1].path(), "/users/bob");

    // A present but invalid credential is refused, whatever valid one follows it.
    let tampered = format!("Bearer {}x", &bob[..bob.len() - 1]);
    for headers in [
        vec![
            ("authorization", tampered.as_str()),
            ("cookie", cookie.as_str()),
        ],
        vec![("cookie", "session=not.a.token")],
        vec![("cookie", "session=")],
    ] {
        let reply = get(&p.bff, "/me", &headers).await;
        assert_refused(
            &reply,
            401,
            "UNAUTHENTICATED",
            "Bearer error=\"invalid_token\"",
        );
    }
    // A cookie of another name is no credential at all.
    let reply = get(&p.bff, "/me", &[("cookie", &format!("sessionx={ada}"))]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(failures(&p.bff, "missing", 1.0).await, 1.0);
    assert_eq!(p.upstream.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_keys_file_takes_effect_without_a_restart() {
    let p = start_partner().await;
    let bff = &p.bff;
    let with_key = |key: &'static str| async move {
        get(bff, "/products", &[("x-api-key", key)]).await.status
    };
    assert_eq!(with_key("acme-key-1").await, 200);
    write_keys(
        &p.secrets,
        1,
        &format!("{}  acme\n", tokens::api_key_hash("acme-key-2")),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while with_key("acme-key-2").await != 200 {
        assert!(Instant::now() < deadline, "the new key was never accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(with_key("acme-key-1").await, 401, "the old key still works");
    assert_eq!(with_key("globex-key-1").await, 401);

    // A broken file keeps the last good keys.
    write_keys(&p.secrets, 2, "not a keys file\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.bff.logs().contains("API keys file refused") {
        assert!(Instant::now() < deadline, "the broken file was never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(with_key("acme-key-2").await, 200);
    assert!(!p.bff.logs().contains("acme-key"), "a key reached the log");
}
