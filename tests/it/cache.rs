//! The response cache of `fetch` routes through the real binary, in process (L1): hits and
//! misses, per-user keys, one recompute for many concurrent requests, stale and early
//! refreshes in the background, degraded answers, ETag and 304, and a renamed field that
//! changes the key.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::metrics::{metric, metric_eventually};
use crate::support::{http, tokens, write_policy, Bff, MockReply, MockServer, TempPolicy};

const SECRET: &str = "cache-test-secret-of-at-least-32-bytes!";

/// An upstream whose answers carry how many calls it has had: `{"n": 1, "name": …}`.
pub(crate) fn counting(delay: Duration) -> (MockServer, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let server = MockServer::start(move |req| {
        let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
        let who = req.path().rsplit('/').next().unwrap_or("").to_string();
        MockReply::json(
            200,
            json!({"n": n, "name": format!("user {who}"), "secret": "x"}),
        )
        .delay(delay)
    });
    (server, calls)
}

fn policy(upstream: &str, cache: &str, fields: &str) -> String {
    format!(
        r#"client: web
auth:
  jwt: {{ issuer: "https://id.example.com/", audience: web-app, algorithms: [HS256], hs256_secret: "{SECRET}" }}
upstreams:
  users: {{ url: "{upstream}", timeout: 2s }}
  flaky: {{ url: "http://127.0.0.1:9", timeout: 200ms }}
routes:
  - name: me
    method: GET
    path: /me
    version: 3
    headers: {{ Cache-Control: "private, max-age=30" }}
    cache: {cache}
    fetch:
      me: {{ upstream: users, path: "/users/{{jwt.sub}}", critical: true, fields: {fields} }}
  - name: page
    method: GET
    path: /page
    cache: {cache}
    fetch:
      me: {{ upstream: users, path: "/users/{{jwt.sub}}", critical: true, fields: [n] }}
      tips: {{ upstream: flaky, path: /tips, fields: [t], fallback: [] }}
"#
    )
}

async fn start(yaml: &str) -> (Bff, TempPolicy) {
    let file = write_policy(yaml);
    (Bff::start(file.path()).await, file)
}

fn bearer(sub: &str) -> String {
    format!(
        "Bearer {}",
        tokens::hs256(
            &tokens::claims("web-app", 600, json!({ "sub": sub })),
            SECRET
        )
    )
}

async fn get(bff: &Bff, path: &str, sub: &str) -> http::Reply {
    http::send(
        "GET",
        &bff.url(path),
        &[("authorization", &bearer(sub))],
        "",
    )
    .await
}

/// `meta.cache` of a 200 answer.
pub(crate) fn cache_word(reply: &http::Reply) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["meta"]["cache"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn lookups(bff: &Bff, route: &str, layer: &str, result: &str) -> f64 {
    metric(
        bff,
        "bff_cache_lookups_total",
        &[
            ("client", "web"),
            ("route", route),
            ("layer", layer),
            ("result", result),
        ],
    )
    .await
}

/// Polls until `calls` reaches `want` (a background recompute lands on its own time).
async fn wait_calls(calls: &AtomicUsize, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls.load(Ordering::SeqCst) < want {
        assert!(
            Instant::now() < deadline,
            "the upstream was never called again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_route_is_computed_once_then_served_from_memory() {
    let (users, calls) = counting(Duration::ZERO);
    let (bff, _file) = start(&policy(
        &users.url(),
        "{ scope: user, ttl: 60s }",
        "[n, name]",
    ))
    .await;

    let first = get(&bff, "/me", "ada").await;
    assert_eq!(cache_word(&first), "miss");
    let second = get(&bff, "/me", "ada").await;
    assert_eq!(cache_word(&second), "hit");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(first.json()["me"], json!({"n": 1, "name": "user ada"}));
    assert_eq!(second.json()["me"], first.json()["me"]);
    // `meta` is this response's own; the ETag and the route's headers are the entry's.
    assert_ne!(
        second.json()["meta"]["traceId"],
        first.json()["meta"]["traceId"]
    );
    let etag = first.header("etag").expect("an ETag").to_string();
    assert!(etag.starts_with('"') && etag.len() == 18, "{etag}");
    assert_eq!(second.header("etag"), Some(etag.as_str()));
    assert_eq!(second.header("cache-control"), Some("private, max-age=30"));
    assert_eq!(lookups(&bff, "me", "l1", "miss").await, 1.0);
    assert_eq!(lookups(&bff, "me", "l1", "hit").await, 1.0);
    let recomputes = metric(
        &bff,
        "bff_cache_recomputes_total",
        &[("client", "web"), ("route", "me"), ("trigger", "miss")],
    )
    .await;
    assert_eq!(recomputes, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_never_share_an_entry() {
    let (users, calls) = counting(Duration::ZERO);
    let (bff, _file) = start(&policy(
        &users.url(),
        "{ scope: user, ttl: 60s }",
        "[n, name]",
    ))
    .await;
    for (sub, n) in [
        ("ada", 1),
        ("bob", 2),
        ("ada", 1),
        ("bob", 2),
        ("../ada", 3),
    ] {
        let reply = get(&bff, "/me", sub).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["me"]["n"], json!(n), "{sub}");
        let name = reply.json()["me"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            name.ends_with(sub.rsplit('/').next().unwrap_or(sub)),
            "{sub}: {name}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_on_a_cold_key_share_one_recompute() {
    // The upstream answers slowly, so every request arrives while the first recompute runs.
    let (users, calls) = counting(Duration::from_millis(300));
    let (bff, _file) = start(&policy(
        &users.url(),
        "{ scope: user, ttl: 60s }",
        "[n, name]",
    ))
    .await;
    let bff = Arc::new(bff);
    let requests: Vec<_> = (0..500)
        .map(|_| {
            let bff = bff.clone();
            tokio::spawn(async move { get(&bff, "/me", "ada").await })
        })
        .collect();
    let mut words = Vec::new();
    for request in requests {
        let reply = request.await.expect("request task");
        assert_eq!(reply.json()["me"]["n"], json!(1));
        words.push(cache_word(&reply));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one upstream call for 500 requests"
    );
    let coalesced = metric(
        &bff,
        "bff_cache_coalesced_total",
        &[("client", "web"), ("route", "me")],
    )
    .await;
    let hits = words.iter().filter(|w| *w == "hit").count();
    assert_eq!(
        words.iter().filter(|w| *w == "miss").count() as f64,
        1.0 + coalesced
    );
    assert_eq!(coalesced as usize + hits, 499, "{words:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_ttl_an_entry_is_served_stale_while_one_refresh_runs() {
    let (users, calls) = counting(Duration::ZERO);
    let cache = "{ scope: user, ttl: 1s, stale_while_revalidate: 60s, beta: 0.000001 }";
    let (bff, _file) = start(&policy(&users.url(), cache, "[n]")).await;
    assert_eq!(cache_word(&get(&bff, "/me", "ada").await), "miss");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = get(&bff, "/me", "ada").await;
    assert_eq!(cache_word(&stale), "stale");
    assert_eq!(stale.json()["me"]["n"], json!(1), "the old answer, at once");
    wait_calls(&calls, 2).await;
    // The refresh landed: the next answer is the new one, a hit.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = get(&bff, "/me", "ada").await;
        if reply.json()["me"]["n"] == json!(2) {
            assert_eq!(cache_word(&reply), "hit");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refreshed entry never arrived"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_recompute_runs_in_the_background_before_expiry() {
    // A recompute of ~100 ms and a huge beta: XFetch draws an early expiry on nearly every
    // hit, long before the 60 s TTL, and the client never waits for it.
    let (users, calls) = counting(Duration::from_millis(100));
    let cache = "{ scope: user, ttl: 60s, beta: 100000 }";
    let (bff, _file) = start(&policy(&users.url(), cache, "[n]")).await;
    assert_eq!(cache_word(&get(&bff, "/me", "ada").await), "miss");
    let mut early = 0;
    for _ in 0..20 {
        let reply = get(&bff, "/me", "ada").await;
        if cache_word(&reply) == "early" {
            early += 1;
        }
    }
    assert!(early > 0, "no early recompute was drawn");
    wait_calls(&calls, 2).await;
    let recomputes = metric(
        &bff,
        "bff_cache_recomputes_total",
        &[("client", "web"), ("route", "me"), ("trigger", "early")],
    )
    .await;
    assert!(recomputes >= 1.0);
    // Early refreshes of one key never overlap: at most one per 100 ms recompute.
    assert!(calls.load(Ordering::SeqCst) <= 1 + early);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_answers_are_stored_only_with_a_degraded_ttl() {
    let (users, calls) = counting(Duration::ZERO);
    let (bff, _file) = start(&policy(&users.url(), "{ scope: user, ttl: 60s }", "[n]")).await;
    for n in 1..=2 {
        let reply = get(&bff, "/page", "ada").await;
        assert_eq!(cache_word(&reply), "miss");
        assert_eq!(reply.json()["meta"]["degraded"], json!(true));
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            n,
            "a degraded answer is never reused"
        );
    }

    let (users, calls) = counting(Duration::ZERO);
    let cache = "{ scope: user, ttl: 60s, degraded_ttl: 30s }";
    let (bff, _file) = start(&policy(&users.url(), cache, "[n]")).await;
    assert_eq!(cache_word(&get(&bff, "/page", "ada").await), "miss");
    let again = get(&bff, "/page", "ada").await;
    assert_eq!(cache_word(&again), "hit");
    assert_eq!(again.json()["meta"]["degradedSections"], json!(["tips"]));
    assert_eq!(again.header("x-bff-degraded"), Some("tips"));
    assert_eq!(again.header("cache-control"), Some("no-store"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_refresh_never_replaces_a_complete_entry() {
    let (users, calls) = counting(Duration::ZERO);
    // The optional `tips` upstream answers until it is switched off, then fails (503).
    let tips_up = Arc::new(AtomicBool::new(true));
    let up = tips_up.clone();
    let tips = MockServer::start(move |_| {
        if up.load(Ordering::SeqCst) {
            MockReply::json(200, json!({"t": "drink water"}))
        } else {
            MockReply::json(503, json!({}))
        }
    });
    let cache =
        "{ scope: user, ttl: 2s, stale_while_revalidate: 30s, degraded_ttl: 10s, beta: 0.000001 }";
    let yaml = policy(&users.url(), cache, "[n]").replace("http://127.0.0.1:9", &tips.url());
    let (bff, _file) = start(&yaml).await;
    let complete = get(&bff, "/page", "ada").await;
    assert_eq!(cache_word(&complete), "miss");
    assert_eq!(complete.json()["tips"], json!({"t": "drink water"}));

    tips_up.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let stale = get(&bff, "/page", "ada").await;
    assert_eq!(cache_word(&stale), "stale");
    // The refresh it started comes back degraded, and is discarded.
    let discarded = metric_eventually(
        &bff,
        "bff_cache_degraded_discarded_total",
        &[("client", "web"), ("route", "page")],
        1.0,
    )
    .await;
    assert_eq!(discarded, 1.0, "{}", bff.logs());
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one refresh ran");
    for _ in 0..5 {
        let reply = get(&bff, "/page", "ada").await;
        assert_eq!(cache_word(&reply), "stale");
        assert_eq!(
            reply.json()["tips"],
            json!({"t": "drink water"}),
            "{}",
            reply.text()
        );
        assert_ne!(reply.json()["meta"]["degraded"], json!(true));
        assert_eq!(reply.header("x-bff-degraded"), None);
        assert_eq!(reply.json()["me"], complete.json()["me"]);
    }

    // Where no complete entry is held, a degraded one is stored for `degraded_ttl`.
    let first = get(&bff, "/page", "bob").await;
    assert_eq!(cache_word(&first), "miss");
    assert_eq!(first.json()["meta"]["degraded"], json!(true));
    let again = get(&bff, "/page", "bob").await;
    assert_eq!(cache_word(&again), "hit");
    assert_eq!(again.json()["meta"]["degraded"], json!(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_gets_304_without_calling_upstreams() {
    let (users, calls) = counting(Duration::ZERO);
    let (bff, _file) = start(&policy(
        &users.url(),
        "{ scope: user, ttl: 60s }",
        "[n, name]",
    ))
    .await;
    let first = get(&bff, "/me", "ada").await;
    let etag = first.header("etag").expect("etag").to_string();
    for held in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
        "*".into(),
    ] {
        let reply = http::send(
            "GET",
            &bff.url("/me"),
            &[("authorization", &bearer("ada")), ("if-none-match", &held)],
            "",
        )
        .await;
        assert_eq!(reply.status, 304, "{held}");
        assert!(reply.body.is_empty());
        assert_eq!(reply.header("etag"), Some(etag.as_str()));
        assert_eq!(reply.header("cache-control"), Some("private, max-age=30"));
    }
    let other = http::send(
        "GET",
        &bff.url("/me"),
        &[
            ("authorization", &bearer("ada")),
            ("if-none-match", "\"stale-tag\""),
        ],
        "",
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_field_changes_the_key_and_the_old_shape_is_never_served() {
    let (users, calls) = counting(Duration::ZERO);
    let file = write_policy(&policy(
        &users.url(),
        "{ scope: user, ttl: 60s }",
        "[n, name]",
    ));
    let bff = Bff::start(file.path()).await;
    let before = http::get(&bff.admin_url("/policy")).await.json();
    assert_eq!(
        get(&bff, "/me", "ada").await.json()["me"]["name"],
        json!("user ada")
    );
    assert_eq!(cache_word(&get(&bff, "/me", "ada").await), "hit");

    file.rewrite(&policy(
        &users.url(),
        "{ scope: user, ttl: 60s }",
        "[n, \"name as displayName\"]",
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while http::get(&bff.admin_url("/policy")).await.json() == before {
        assert!(Instant::now() < deadline, "the new policy never loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = get(&bff, "/me", "ada").await;
    assert_eq!(
        cache_word(&reply),
        "miss",
        "the new shape has a key of its own"
    );
    let me: &Value = &reply.json()["me"];
    assert_eq!(me["displayName"], json!("user ada"));
    assert!(me.get("name").is_none(), "{me}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_invalidates_one_key_or_a_whole_route() {
    let (users, calls) = counting(Duration::ZERO);
    let (bff, _file) = start(&policy(&users.url(), "{ scope: user, ttl: 60s }", "[n]")).await;
    let delete = |path: &str| {
        let url = bff.admin_url(path);
        async move { http::send("DELETE", &url, &[], "").await }
    };
    for sub in ["ada", "bob"] {
        assert_eq!(cache_word(&get(&bff, "/me", sub).await), "miss");
    }
    // One key: the inputs part of the key, here the user.
    let one = delete("/cache/me?key=ada").await;
    assert_eq!(one.status, 200, "{}", one.text());
    assert_eq!(one.json()["l1Removed"], json!(1));
    assert!(one.json()["key"]
        .as_str()
        .unwrap_or_default()
        .ends_with(":ada"));
    assert_eq!(cache_word(&get(&bff, "/me", "ada").await), "miss");
    assert_eq!(cache_word(&get(&bff, "/me", "bob").await), "hit");
    // The whole route.
    let all = delete("/cache/me").await;
    assert_eq!(all.json()["l1Removed"], json!(2));
    assert_eq!(all.json()["l2Removed"], Value::Null, "no Redis here");
    for sub in ["ada", "bob"] {
        assert_eq!(cache_word(&get(&bff, "/me", sub).await), "miss");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);

    assert_eq!(delete("/cache/nope").await.status, 404);
    assert_eq!(http::get(&bff.admin_url("/cache/me")).await.status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_refreshes_come_before_expiry_and_nobody_waits() {
    // A 1 s TTL with no stale window, a recompute of ~50 ms, a request every ~10 ms: XFetch
    // starts each refresh in the background before the entry expires, so after the first
    // request nobody ever waits for a recompute.
    let (users, calls) = counting(Duration::from_millis(50));
    let cache = "{ scope: user, ttl: 1s, beta: 4.0 }";
    let (bff, _file) = start(&policy(&users.url(), cache, "[n]")).await;
    assert_eq!(cache_word(&get(&bff, "/me", "ada").await), "miss");
    let until = Instant::now() + Duration::from_millis(3500);
    let mut words = std::collections::BTreeMap::<String, usize>::new();
    let mut seen = std::collections::BTreeSet::new();
    while Instant::now() < until {
        let reply = get(&bff, "/me", "ada").await;
        *words.entry(cache_word(&reply)).or_default() += 1;
        seen.insert(reply.json()["me"]["n"].as_u64().unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(words.get("miss"), None, "a request waited: {words:?}");
    assert_eq!(words.get("stale"), None, "{words:?}");
    let early = metric(
        &bff,
        "bff_cache_recomputes_total",
        &[("client", "web"), ("route", "me"), ("trigger", "early")],
    )
    .await;
    assert!(
        early >= 3.0,
        "{early} early recomputes in 3.5 s of a 1 s TTL: {words:?}"
    );
    assert!(seen.len() >= 3, "the answers were refreshed: {seen:?}");
    assert_eq!(calls.load(Ordering::SeqCst) as f64, 1.0 + early);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_with_its_own_cache_is_shared_by_every_request_of_the_route() {
    let (users, user_calls) = counting(Duration::ZERO);
    let (catalog, catalog_calls) = counting(Duration::ZERO);
    let yaml = format!(
        r#"client: web
auth:
  jwt: {{ issuer: "https://id.example.com/", audience: web-app, algorithms: [HS256], hs256_secret: "{SECRET}" }}
upstreams:
  users: {{ url: "{}", timeout: 2s }}
  catalog: {{ url: "{}", timeout: 2s }}
routes:
  - name: product
    method: GET
    path: /products/{{id}}
    fetch:
      me: {{ upstream: users, path: "/users/{{jwt.sub}}", critical: true, fields: [n] }}
      product:
        upstream: catalog
        path: "/products/{{path.id}}"
        critical: true
        fields: [n]
        cache: {{ ttl: 10m, jitter: 1m }}
"#,
        users.url(),
        catalog.url()
    );
    let (bff, _file) = start(&yaml).await;
    for (sub, id, catalog_n) in [
        ("ada", "p-1", 1),
        ("bob", "p-1", 1),
        ("ada", "p-2", 2),
        ("bob", "p-2", 2),
    ] {
        let reply = get(&bff, &format!("/products/{id}"), sub).await;
        assert_eq!(cache_word(&reply), "off", "the route itself is not cached");
        assert_eq!(reply.json()["product"]["n"], json!(catalog_n), "{sub} {id}");
    }
    assert_eq!(catalog_calls.load(Ordering::SeqCst), 2, "once per product");
    assert_eq!(
        user_calls.load(Ordering::SeqCst),
        4,
        "the personal fetch every time"
    );
    assert_eq!(lookups(&bff, "product.product", "l1", "hit").await, 2.0);
}
