//! The cache's Redis layer through the real binary and real `redis-server` processes: the keys'
//! documented form, two instances sharing entries (and a rolling deploy of two shapes), one
//! recompute for a cold key across instances, a lock holder that dies, foreign bytes under a
//! key, Redis killed mid-load and back, and a 3-master Redis Cluster.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cache::{cache_word, counting};
use crate::support::metrics::{metric, metrics_text, parse_metrics};
use crate::support::redis::{RedisCluster, RedisServer};
use crate::support::{http, tokens, write_policy, Bff, MockReply, MockServer, TempPolicy};

const SECRET: &str = "cache-l2-test-secret-of-at-least-32-bytes";

fn policy(upstream: &str, fields: &str, deadline: &str) -> String {
    format!(
        r#"client: web
auth:
  jwt: {{ issuer: "https://id.example.com/", audience: web-app, algorithms: [HS256], hs256_secret: "{SECRET}" }}
upstreams:
  users: {{ url: "{upstream}", timeout: 2s }}
routes:
  - name: me
    method: GET
    path: /me
    version: 3
    deadline: {deadline}
    cache: {{ scope: user, ttl: 60s, jitter: 5s, stale_while_revalidate: 30s }}
    fetch:
      me: {{ upstream: users, path: "/users/{{jwt.sub}}", critical: true, fields: {fields} }}
"#
    )
}

async fn start(yaml: &str, redis: &str) -> (Bff, TempPolicy) {
    let file = write_policy(yaml);
    let bff = Bff::builder(file.path())
        .arg("--redis")
        .arg(redis)
        .start()
        .await;
    (bff, file)
}

async fn get(bff: &Bff, sub: &str) -> http::Reply {
    get_path(bff, "/me", sub).await
}

async fn get_path(bff: &Bff, path: &str, sub: &str) -> http::Reply {
    let token = tokens::hs256(
        &tokens::claims("web-app", 600, json!({ "sub": sub })),
        SECRET,
    );
    http::send(
        "GET",
        &bff.url(path),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await
}

async fn shape(bff: &Bff) -> String {
    let policy = http::get(&bff.admin_url("/policy")).await.json();
    policy["routes"][0]["shape"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn l2_lookups(bff: &Bff, result: &str) -> f64 {
    metric(
        bff,
        "bff_cache_lookups_total",
        &[
            ("client", "web"),
            ("route", "me"),
            ("layer", "l2"),
            ("result", result),
        ],
    )
    .await
}

/// Waits until `key` is in Redis (a write lands just after the answer is sent).
async fn wait_for_key(redis: &mut crate::support::redis::RedisClient, key: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = redis.get(key).await {
            return value;
        }
        assert!(Instant::now() < deadline, "`{key}` never reached Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_have_the_documented_form_and_instances_share_them() {
    let redis = RedisServer::start();
    let (users, calls) = counting(Duration::ZERO);
    let yaml = policy(&users.url(), "[n, name]", "1s");
    let (a, _fa) = start(&yaml, &redis.url()).await;
    let (b, _fb) = start(&yaml, &redis.url()).await;

    assert_eq!(cache_word(&get(&a, "usr_9821").await), "miss");
    let key = format!("web:me:v3:{}:usr_9821", shape(&a).await);
    let mut client = redis.client().await;
    let value = wait_for_key(&mut client, &key).await;
    assert!(
        value.starts_with(b"BFFC1\n{\"version\":3,"),
        "{}",
        String::from_utf8_lossy(&value)
    );
    // TTL = 60 s ± 5 s of jitter + the 30 s stale window.
    let pttl = client.pttl(&key).await;
    assert!((85_000..=95_000).contains(&pttl), "PTTL {pttl}");
    // A hostile subject is one hashed segment, never a key of its own making.
    assert_eq!(cache_word(&get(&a, "x:y:*").await), "miss");
    let keys = client.key_names("web:me:*").await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter().any(|k| k.contains(":~") && !k.contains("x:y")),
        "{keys:?}"
    );

    // The other instance answers from Redis, without calling the upstream.
    let from_l2 = get(&b, "usr_9821").await;
    assert_eq!(cache_word(&from_l2), "hit");
    assert_eq!(from_l2.json()["me"]["n"], json!(1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(l2_lookups(&b, "hit").await, 1.0);
    // ...and then from its own memory.
    assert_eq!(cache_word(&get(&b, "usr_9821").await), "hit");
    assert_eq!(l2_lookups(&b, "hit").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_of_two_shapes_never_mixes_them() {
    let redis = RedisServer::start();
    let (users, calls) = counting(Duration::ZERO);
    let (old, _fo) = start(&policy(&users.url(), "[n, name]", "1s"), &redis.url()).await;
    let (new, _fn) = start(
        &policy(&users.url(), "[n, \"name as displayName\"]", "1s"),
        &redis.url(),
    )
    .await;
    assert_ne!(shape(&old).await, shape(&new).await);
    for _ in 0..3 {
        let o = get(&old, "ada").await;
        let n = get(&new, "ada").await;
        assert_eq!(o.json()["me"]["name"], json!("user ada"), "{}", o.text());
        assert!(o.json()["me"].get("displayName").is_none());
        assert_eq!(
            n.json()["me"]["displayName"],
            json!("user ada"),
            "{}",
            n.text()
        );
        assert!(n.json()["me"].get("name").is_none());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one recompute per shape");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_key_under_load_is_recomputed_once_per_instance_at_most() {
    let redis = RedisServer::start();
    let (users, calls) = counting(Duration::from_millis(300));
    let yaml = policy(&users.url(), "[n]", "2s");
    let (a, _fa) = start(&yaml, &redis.url()).await;
    let (b, _fb) = start(&yaml, &redis.url()).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    // A Redis call that misses its 50 ms deadline (a loaded machine) sets Redis aside for a
    // moment, and an instance then recomputes without the lock, as designed. Such a round must
    // still recompute once per instance; a cold key is tried again until a round ran with
    // Redis answering in time, where the lock must make it once in all.
    for round in 0..5 {
        let sub = format!("ada{round}");
        let errors_before = l2_errors(&a).await + l2_errors(&b).await;
        let calls_before = calls.load(Ordering::SeqCst);
        let requests: Vec<_> = (0..500)
            .map(|i| {
                let bff = if i % 2 == 0 { a.clone() } else { b.clone() };
                let sub = sub.clone();
                tokio::spawn(async move { get(&bff, &sub).await })
            })
            .collect();
        let mut answers = [BTreeSet::new(), BTreeSet::new()];
        for (i, request) in requests.into_iter().enumerate() {
            let reply = request.await.expect("request task");
            assert_eq!(reply.status, 200, "{}", reply.text());
            answers[i % 2].insert(reply.json()["me"]["n"].to_string());
        }
        let recomputes = calls.load(Ordering::SeqCst) - calls_before;
        for (instance, seen) in ["a", "b"].iter().zip(&answers) {
            assert_eq!(
                seen.len(),
                1,
                "instance {instance} answered from more than one recompute: {seen:?}"
            );
        }
        assert!(recomputes <= 2, "{recomputes} recomputes for two instances");
        if l2_errors(&a).await + l2_errors(&b).await == errors_before {
            assert_eq!(
                recomputes, 1,
                "Redis answered in time, yet both instances recomputed"
            );
            assert_eq!(
                answers[0], answers[1],
                "every answer is the one recompute's"
            );
            return;
        }
        // Past the pause in which a sidecar leaves Redis alone after a failed call.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("a Redis call failed in each of 5 rounds: the machine is too loaded to test the lock");
}

/// Redis calls a sidecar counted as failed or timed out, whatever the operation.
async fn l2_errors(bff: &Bff) -> f64 {
    parse_metrics(&metrics_text(bff).await)
        .iter()
        .filter(|s| s.name == "bff_cache_l2_errors_total")
        .map(|s| s.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lock_holder_blocks_a_key_no_longer_than_its_lock() {
    let redis = RedisServer::start();
    let (users, calls) = counting(Duration::ZERO);
    let (bff, _f) = start(&policy(&users.url(), "[n]", "3s"), &redis.url()).await;
    let key = format!("web:me:v3:{}:ada", shape(&bff).await);
    // An instance took the lock and died: nobody will write the entry or release the lock.
    let mut client = redis.client().await;
    let locked_at = Instant::now();
    client
        .set(
            format!("{key}:lock"),
            "dead-instance",
            Some(Duration::from_millis(800)),
        )
        .await;
    let reply = get(&bff, "ada").await;
    assert_eq!(cache_word(&reply), "miss");
    // It waited for the holder's answer as long as the lock lived, then computed itself.
    assert!(
        locked_at.elapsed() >= Duration::from_millis(800),
        "it did not wait for the lock holder"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "then recomputed itself");
    wait_for_key(&mut client, &key).await;

    // A lock that outlives the waiter's deadline: the answer still comes by the deadline (a
    // critical fetch unfinished at it is 504), never when the lock ends.
    let key = format!("web:me:v3:{}:bob", shape(&bff).await);
    client
        .set(
            format!("{key}:lock"),
            "dead-instance",
            Some(Duration::from_secs(30)),
        )
        .await;
    let started = Instant::now();
    let reply = get(&bff, "bob").await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "DEADLINE_EXCEEDED");
    assert!(
        took < Duration::from_secs(6),
        "answered after {took:?}, deadline 3 s"
    );
}

/// Three upstreams: `missing` answers 404 after `SLOW_FAILURE` (nothing to store), `users`
/// answers at once, `failing` 503 after `SLOW_FAILURE` (the `page` route's optional section is
/// degraded, and a degraded answer is not stored).
fn waiter_policy(missing: &str, users: &str, failing: &str) -> String {
    format!(
        r#"client: web
auth:
  jwt: {{ issuer: "https://id.example.com/", audience: web-app, algorithms: [HS256], hs256_secret: "{SECRET}" }}
upstreams:
  missing: {{ url: "{missing}", timeout: 5s }}
  users: {{ url: "{users}", timeout: 5s }}
  failing: {{ url: "{failing}", timeout: 5s }}
routes:
  - name: gone
    method: GET
    path: /gone
    cache: {{ scope: user, ttl: 60s }}
    fetch:
      me: {{ upstream: missing, path: "/users/{{jwt.sub}}", critical: true, fields: [n] }}
  - name: page
    method: GET
    path: /page
    deadline: 3s
    cache: {{ scope: user, ttl: 60s }}
    fetch:
      me: {{ upstream: users, path: "/users/{{jwt.sub}}", critical: true, fields: [n] }}
      tips: {{ upstream: failing, path: /tips, fields: [t], fallback: [] }}
"#
    )
}

const SLOW_FAILURE: Duration = Duration::from_millis(500);

/// Sends `path` to `a`, then, once `a`'s recompute has called `upstream`, to `b`: `b` finds
/// `a` holding the key's lock. Returns both answers and how long `b`'s took.
async fn a_then_b(
    a: &Arc<Bff>,
    b: &Bff,
    upstream: &MockServer,
    path: &'static str,
) -> (http::Reply, http::Reply, Duration) {
    let first = {
        let a = a.clone();
        tokio::spawn(async move { get_path(&a, path, "ada").await })
    };
    let until = Instant::now() + Duration::from_secs(10);
    while upstream.requests().is_empty() {
        assert!(
            Instant::now() < until,
            "instance a never called {path}'s upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let second = get_path(b, path, "ada").await;
    let took = started.elapsed();
    (first.await.expect("a's request"), second, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_computes_at_once_when_the_lock_is_released_without_an_entry() {
    let redis = RedisServer::start();
    let missing = MockServer::start(|_| {
        MockReply::json(404, json!({"error": "no such user"})).delay(SLOW_FAILURE)
    });
    let (users, _) = counting(Duration::ZERO);
    let failing = MockServer::start(|_| MockReply::json(503, json!({})).delay(SLOW_FAILURE));
    let yaml = waiter_policy(&missing.url(), &users.url(), &failing.url());
    let (a, _fa) = start(&yaml, &redis.url()).await;
    let (b, _fb) = start(&yaml, &redis.url()).await;
    let a = Arc::new(a);

    // No deadline: the lock lives 3 s. The holder's 404 is not stored; the waiter sees the
    // lock go and asks the upstream itself, instead of waiting out the lock.
    let (first, second, took) = a_then_b(&a, &b, &missing, "/gone").await;
    assert_eq!(first.status, 404, "{}", first.text());
    assert_eq!(second.status, 404, "{}", second.text());
    assert_eq!(missing.requests().len(), 2, "each instance asked once");
    assert!(
        took < Duration::from_secs(2),
        "the waiter took {took:?}: it waited for the lock to expire (3 s)"
    );

    // A 3 s deadline (the lock lives as long) and a degraded answer (not stored): the waiter
    // computes as soon as the holder is done, well within its deadline, instead of waiting
    // out the lock and then computing past it.
    let (first, second, took) = a_then_b(&a, &b, &failing, "/page").await;
    for reply in [&first, &second] {
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["meta"]["degradedSections"], json!(["tips"]));
    }
    assert_eq!(failing.requests().len(), 2, "each instance asked once");
    assert!(
        took < Duration::from_millis(2500),
        "the waiter took {took:?}: it waited for the lock to expire (3 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_or_corrupted_bytes_under_a_key_are_a_miss() {
    let redis = RedisServer::start();
    let (users, calls) = counting(Duration::ZERO);
    let (bff, _f) = start(&policy(&users.url(), "[n]", "1s"), &redis.url()).await;
    let prefix = format!("web:me:v3:{}:", shape(&bff).await);
    let mut client = redis.client().await;
    let valid_other_shape = format!(
        "BFFC1\n{{\"version\":3,\"shape\":\"00000000\",\"etag\":\"\\\"x\\\"\",\"createdMs\":0,\"expiresMs\":{},\"deltaMs\":1,\"degraded\":[]}}\n\"me\":{{\"n\":99}}",
        u64::MAX / 2
    );
    let garbage: [(&str, Vec<u8>); 4] = [
        ("u1", b"hello".to_vec()),
        ("u2", vec![0xff, 0x00, 0xfe]),
        ("u3", b"BFFC1\n{not json\n".to_vec()),
        ("u4", valid_other_shape.into_bytes()),
    ];
    for (n, (sub, bytes)) in garbage.iter().enumerate() {
        client.set(format!("{prefix}{sub}"), bytes, None).await;
        let reply = get(&bff, sub).await;
        assert_eq!(cache_word(&reply), "miss", "{sub}");
        assert_eq!(reply.json()["me"]["n"], json!(n + 1), "{sub}");
        // The recompute replaced the bytes with an entry of its own.
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.get(format!("{prefix}{sub}")).await.as_deref() == Some(&bytes[..]) {
            assert!(Instant::now() < deadline, "{sub} was never rewritten");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_costs_no_error_and_is_used_again_when_back() {
    let mut redis = RedisServer::start();
    let (users, _calls) = counting(Duration::ZERO);
    let (bff, _f) = start(&policy(&users.url(), "[n]", "1s"), &redis.url()).await;
    let prefix = format!("web:me:v3:{}:", shape(&bff).await);
    for i in 0..20 {
        assert_eq!(get(&bff, &format!("before{i}")).await.status, 200);
    }
    redis.kill();
    for i in 0..50 {
        let reply = get(&bff, &format!("during{}", i % 10)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let errors: f64 = {
        let text = crate::support::metrics::metrics_text(&bff).await;
        crate::support::metrics::parse_metrics(&text)
            .iter()
            .filter(|s| s.name == "bff_cache_l2_errors_total")
            .map(|s| s.value)
            .sum()
    };
    assert!(errors > 0.0, "L2 errors are counted");

    redis.restart();
    let mut client = redis.client().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 0;
    loop {
        i += 1;
        let sub = format!("after{i}");
        assert_eq!(get(&bff, &sub).await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if client.get(format!("{prefix}{sub}")).await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "L2 was never used again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_holds_the_entries_across_its_slots() {
    let cluster = RedisCluster::start(3);
    let (users, calls) = counting(Duration::ZERO);
    let yaml = policy(&users.url(), "[n, name]", "1s");
    let (a, _fa) = start(&yaml, &cluster.cluster_url()).await;
    let (b, _fb) = start(&yaml, &cluster.cluster_url()).await;
    let subs: Vec<String> = (0..30).map(|i| format!("user{i}")).collect();
    // The cluster connection comes up in the background: wait until entries land there.
    let mut client = cluster.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = format!("probe{}", calls.load(Ordering::SeqCst));
        assert_eq!(get(&a, &probe).await.status, 200);
        let key = format!("web:me:v3:{}:{probe}", shape(&a).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if client.get(&key).await.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster was never written to"
        );
    }
    let before = calls.load(Ordering::SeqCst);
    for sub in &subs {
        assert_eq!(cache_word(&get(&a, sub).await), "miss");
    }
    let keys = client.key_names("web:me:*").await;
    for sub in &subs {
        assert!(
            keys.iter().any(|k| k.ends_with(&format!(":{sub}"))),
            "{sub}: {keys:?}"
        );
    }
    // Spread over the masters: each holds some of them.
    for node in cluster.nodes() {
        let mut one = node.client().await;
        let there = one.key_names("web:me:*:user*").await;
        assert!(!there.is_empty(), "a master holds none of 30 keys");
    }
    assert_eq!(calls.load(Ordering::SeqCst), before + subs.len());

    // The second instance's cluster connection comes up on its own time too: probe it with
    // subjects it has never seen, so its memory cannot answer for Redis.
    let deadline = Instant::now() + Duration::from_secs(20);
    for k in 0.. {
        let probe = format!("bprobe{k}");
        assert_eq!(cache_word(&get(&a, &probe).await), "miss");
        let key = format!("web:me:v3:{}:{probe}", shape(&a).await);
        wait_for_key(&mut client, &key).await;
        if cache_word(&get(&b, &probe).await) == "hit" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second instance never read the cluster"
        );
    }
    let calls_before_b = calls.load(Ordering::SeqCst);
    let hits_before = l2_lookups(&b, "hit").await;
    for sub in &subs {
        assert_eq!(cache_word(&get(&b, sub).await), "hit", "{sub}");
    }
    assert_eq!(l2_lookups(&b, "hit").await, hits_before + subs.len() as f64);
    assert_eq!(calls.load(Ordering::SeqCst), calls_before_b);

    // The admin port drops the route's keys from every master.
    let stored = client.key_names("web:me:*").await.len();
    let dropped = http::send("DELETE", &a.admin_url("/cache/me"), &[], "").await;
    assert_eq!(dropped.status, 200, "{}", dropped.text());
    assert_eq!(dropped.json()["l2Removed"], json!(stored));
    assert!(client.key_names("web:me:*").await.is_empty());
    assert_eq!(
        cache_word(&get(&b, &subs[0]).await),
        "hit",
        "b's own memory is b's"
    );
    assert_eq!(cache_word(&get(&a, &subs[1]).await), "miss");
}
