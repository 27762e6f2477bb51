//! `bff cache audit`: the real binary against real `redis-server` processes (one node and a
//! 3-master cluster) seeded in the cache contract's exact format with every kind of key: live,
//! older version, older shape, unknown route, unversioned, TTL-less, locks, foreign values,
//! binary keys, non-string types and another client's keys. The report must count each, and
//! `--delete-orphans` must remove exactly the orphans, in `UNLINK`s of at most 100 keys. One
//! test lets the real sidecar write the keys, so the audit and the cache agree on the format.

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::check::run;
use crate::support::{
    http,
    redis::{RedisClient, RedisCluster, RedisServer},
    tokens, write_policy, Bff, MockReply, MockServer, TempPolicy,
};

const TTL: Option<Duration> = Some(Duration::from_secs(600));

const MOBILE: &str = r#"
client: mobile
auth:
  jwt:
    issuer: https://id.example.com/
    audience: mobile-app
    algorithms: [RS256]
    jwks_url: http://127.0.0.1:9/jwks.json
upstreams:
  users: { url: http://127.0.0.1:9 }
routes:
  - name: homescreen
    method: GET
    path: /m/home
    version: 2
    cache: { scope: user, ttl: 60s, jitter: 5s }
    fetch:
      user: { upstream: users, path: "/users/{jwt.sub}", fields: [id, name], critical: true }
  - name: product
    method: GET
    path: /m/products/{id}
    version: 1
    cache: { scope: shared, ttl: 10m, jitter: 1m }
    fetch:
      product: { upstream: users, path: "/products/{path.id}", fields: [id], critical: true }
"#;

/// A stored entry exactly as the contract writes it.
fn entry(version: u32, shape: &str) -> Vec<u8> {
    let header = json!({
        "version": version, "shape": shape, "etag": "\"9c1f\"", "createdMs": 1_764_040_000_000u64,
        "expiresMs": 1_764_040_060_000u64, "deltaMs": 37, "degraded": false
    });
    format!("BFFC1\n{header}\n\"user\":{{\"id\":1,\"name\":\"Ann\"}}").into_bytes()
}

/// The policy's live `{client}:{route}:v{N}:{shape}:` per route, as the sidecar computes it.
fn prefixes(policy: &Path) -> (String, String) {
    let policy = bff::policy::Policy::load(policy).expect("test policy loads");
    let prefix = |name: &str| {
        let route = policy
            .routes
            .iter()
            .find(|r| r.name == name)
            .expect("route");
        route.key_prefix(&policy.client)
    };
    (prefix("homescreen"), prefix("product"))
}

/// `v{N}:{shape}` of a full key prefix.
fn row_prefix(key_prefix: &str) -> String {
    key_prefix
        .splitn(3, ':')
        .nth(2)
        .unwrap()
        .trim_end_matches(':')
        .to_string()
}

/// What was seeded, by what the audit must call it.
#[derive(Default)]
struct Seeded {
    live: BTreeSet<Vec<u8>>,
    orphans: BTreeSet<Vec<u8>>,
    kept: BTreeSet<Vec<u8>>,
    other_client: BTreeSet<Vec<u8>>,
}

/// The mixed keyspace; `spread` more live and orphan keys so a cluster has some on each node.
async fn seed(redis: &mut RedisClient, policy: &Path, spread: usize) -> Seeded {
    let (home, product) = prefixes(policy);
    let home_shape = home.split(':').nth(3).unwrap().to_string();
    let mut seeded = Seeded::default();

    // Live: with a TTL, without one, an input that happens to be `lock`, and the other route.
    for i in 0..5 + spread {
        let key = format!("{home}usr_{i}");
        redis.set(&key, entry(2, &home_shape), TTL).await;
        seeded.live.insert(key.into_bytes());
    }
    for i in 100..102 {
        let key = format!("{home}usr_{i}");
        redis.set(&key, entry(2, &home_shape), None).await;
        seeded.live.insert(key.into_bytes());
    }
    let key = format!("{home}lock");
    redis.set(&key, entry(2, &home_shape), TTL).await;
    seeded.live.insert(key.into_bytes());
    for id in ["p-1", "p-2"] {
        let key = format!("{product}{id}");
        redis.set(&key, entry(1, "whatever"), TTL).await;
        seeded.live.insert(key.into_bytes());
    }

    // Orphans: an older version, an older shape, a route gone from the policy (one without a
    // TTL), and a binary route name.
    for i in 0..3 + spread {
        let key = format!("mobile:homescreen:v1:{home_shape}:usr_{i}");
        redis.set(&key, entry(1, &home_shape), TTL).await;
        seeded.orphans.insert(key.into_bytes());
    }
    for i in 0..2 {
        let key = format!("mobile:homescreen:v2:0badc0de:usr_{i}");
        redis.set(&key, entry(2, "0badc0de"), TTL).await;
        seeded.orphans.insert(key.into_bytes());
    }
    for i in 0..4 {
        let key = format!("mobile:retired:v1:12345678:x{i}");
        redis
            .set(&key, entry(1, "12345678"), if i == 0 { None } else { TTL })
            .await;
        seeded.orphans.insert(key.into_bytes());
    }
    let key = b"mobile:\xff\xfe:v1:aaaaaaaa:\x00bin".to_vec();
    redis.set(&key, entry(1, "aaaaaaaa"), TTL).await;
    seeded.orphans.insert(key);

    // Never deleted: unversioned (the pre-versioning format), locks (one of an old version),
    // foreign values (one under an old version's prefix), non-string types.
    for key in ["mobile:homescreen:usr_1", "mobile:homescreen:usr_2"] {
        redis.set(key, entry(2, &home_shape), None).await;
        seeded.kept.insert(key.as_bytes().to_vec());
    }
    for key in [
        format!("{home}usr_1:lock"),
        format!("mobile:homescreen:v1:{home_shape}:usr_1:lock"),
    ] {
        redis
            .set(&key, "holder-7f3a", Some(Duration::from_secs(600)))
            .await;
        seeded.kept.insert(key.into_bytes());
    }
    let foreign = [
        format!("{home}usr_77"),
        format!("mobile:homescreen:v1:{home_shape}:usr_99"),
    ];
    for key in &foreign {
        redis.set(key, "{\"legacy\":true}", None).await;
        seeded.kept.insert(key.clone().into_bytes());
    }
    let hash = format!("{home}usr_78");
    let _: () = redis::cmd("HSET")
        .arg(&hash)
        .arg("field")
        .arg("value")
        .query_async(redis.conn())
        .await
        .unwrap();
    seeded.kept.insert(hash.into_bytes());
    let _: () = redis::cmd("RPUSH")
        .arg("mobile:junk")
        .arg("a")
        .query_async(redis.conn())
        .await
        .unwrap();
    seeded.kept.insert(b"mobile:junk".to_vec());

    // Another client's keys, orphans by its own standards: not this audit's business.
    for key in [
        format!("web:homescreen:v1:{home_shape}:usr_1"),
        "web:retired:v1:12345678:x".to_string(),
        "mobile-web:homescreen:v1:aaaaaaaa:x".to_string(),
    ] {
        redis.set(&key, entry(1, &home_shape), TTL).await;
        seeded.other_client.insert(key.into_bytes());
    }
    seeded
}

fn audit(redis_url: &str, policies: &[&Path], extra: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bff"));
    cmd.args(["cache", "audit", "--redis", redis_url, "--policy"])
        .args(policies)
        .args(extra);
    run(cmd)
}

fn audit_json(redis_url: &str, policies: &[&Path], extra: &[&str]) -> Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = audit(redis_url, policies, &args);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("--json output is not JSON ({e}):\n{stdout}"))
}

fn route<'a>(report: &'a Value, client: &str, route: &str) -> &'a Value {
    let client = report["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client"] == client)
        .unwrap_or_else(|| panic!("no client {client} in {report:#}"));
    client["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == route)
        .unwrap_or_else(|| panic!("no route {route} in {client:#}"))
}

/// `{prefix: [keys, noTtl]}` of a route's `live` or `orphans` rows.
fn rows(route: &Value, kind: &str) -> Value {
    let mut out = serde_json::Map::new();
    for row in route[kind].as_array().unwrap() {
        out.insert(
            row["prefix"].as_str().unwrap().to_string(),
            json!([row["keys"], row["noTtl"]]),
        );
    }
    Value::Object(out)
}

fn counts(row: &Value) -> Value {
    json!([row["keys"], row["noTtl"]])
}

/// Checks the report of the keyspace `seed` wrote (with `spread` extra keys).
fn assert_report(report: &Value, policy: &Path, spread: u64) {
    let (home, product) = prefixes(policy);
    let (home, product) = (row_prefix(&home), row_prefix(&product));
    let home_shape = home.split(':').nth(1).unwrap();

    let homescreen = route(report, "mobile", "homescreen");
    assert_eq!(
        (&homescreen["inPolicy"], &homescreen["cached"]),
        (&json!(true), &json!(true))
    );
    assert_eq!(rows(homescreen, "live"), json!({ &home: [8 + spread, 2] }));
    assert_eq!(
        rows(homescreen, "orphans"),
        json!({ format!("v1:{home_shape}"): [3 + spread, 0], "v2:0badc0de": [2, 0] })
    );
    assert_eq!(counts(&homescreen["unversioned"]), json!([2, 2]));
    assert_eq!(counts(&homescreen["foreign"]), json!([3, 3]));
    assert_eq!(counts(&homescreen["locks"]), json!([2, 0]));
    assert_eq!(counts(&homescreen["totals"]), json!([20 + 2 * spread, 7]));

    let product_route = route(report, "mobile", "product");
    assert_eq!(rows(product_route, "live"), json!({ &product: [2, 0] }));
    assert_eq!(rows(product_route, "orphans"), json!({}));

    let retired = route(report, "mobile", "retired");
    assert_eq!(retired["inPolicy"], json!(false));
    assert_eq!(rows(retired, "live"), json!({}));
    assert_eq!(rows(retired, "orphans"), json!({ "v1:12345678": [4, 1] }));
    let binary = route(report, "mobile", "\\xff\\xfe");
    assert_eq!(rows(binary, "orphans"), json!({ "v1:aaaaaaaa": [1, 0] }));
    let junk = route(report, "mobile", "junk");
    assert_eq!(counts(&junk["foreign"]), json!([1, 1]));

    let totals = &report["clients"][0]["totals"];
    assert_eq!(
        [
            &totals["keys"],
            &totals["live"],
            &totals["orphans"],
            &totals["unversioned"],
            &totals["foreign"],
            &totals["locks"],
            &totals["noTtl"],
        ],
        [
            &json!(28 + 2 * spread),
            &json!(10 + spread),
            &json!(10 + spread),
            &json!(2),
            &json!(4),
            &json!(2),
            &json!(9),
        ],
        "{totals:#}"
    );
    // Small rows are measured exactly, key by key.
    let memory = &totals["memory"];
    assert_eq!(memory["estimated"], json!(false));
    assert_eq!(memory["sampled"], totals["keys"]);
    assert!(memory["bytes"].as_u64().unwrap() > 28 * 50, "{memory}");
    assert!(totals["orphanMemory"]["bytes"].as_u64().unwrap() > 0);
    // Only the audited client was walked.
    assert_eq!(report["clients"].as_array().unwrap().len(), 1);
    assert_eq!(report["clients"][0]["pattern"], "mobile:*");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_counts_each_kind_of_key_and_deletes_only_orphans() {
    let server = RedisServer::start();
    let policy = write_policy(MOBILE);
    let mut redis = server.client().await;
    let seeded = seed(&mut redis, policy.path(), 0).await;

    let report = audit_json(&server.url(), &[policy.path()], &[]);
    assert_eq!(report["mode"], "single");
    assert_eq!(
        report["nodes"],
        json!([format!("127.0.0.1:{}", server.port())])
    );
    assert_eq!(report["deleted"], Value::Null);
    assert_report(&report, policy.path(), 0);

    // The same numbers for a person.
    let (code, text, stderr) = audit(&server.url(), &[policy.path()], &[]);
    assert_eq!(code, 0, "{stderr}");
    let (home, _) = prefixes(policy.path());
    let home_shape = home.split(':').nth(3).unwrap();
    // The words of the line that has `first` and `second` next to each other.
    let row = |first: &str, second: &str| -> Vec<String> {
        text.lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|w| w.windows(2).any(|p| p[0] == first && p[1] == second))
            .unwrap_or_else(|| panic!("no line with `{first} {second}` in:\n{text}"))
    };
    let orphan_row = row("orphan", &format!("v1:{home_shape}"));
    assert_eq!(orphan_row[2..4], ["3", "0"], "{text}");
    let retired_row = row("orphan", "v1:12345678");
    assert_eq!(
        retired_row[..7],
        [
            "retired",
            "(not",
            "in",
            "policy)",
            "orphan",
            "v1:12345678",
            "4"
        ],
        "{text}"
    );
    assert!(text.contains("\\xff\\xfe (not in policy)"), "{text}");
    assert!(text.contains("10 live, 10 orphans ("), "{text}");
    assert!(text.contains("2 unversioned, 4 foreign, 2 locks"), "{text}");
    assert!(text.contains("run again with --delete-orphans"), "{text}");
    assert!(
        !text.contains('~'),
        "small sets are measured exactly:\n{text}"
    );
    // Nothing was touched by looking.
    let all: BTreeSet<Vec<u8>> = redis.keys("*").await.into_iter().collect();
    assert_eq!(all.len(), 31);

    let report = audit_json(&server.url(), &[policy.path()], &["--delete-orphans"]);
    assert_report(&report, policy.path(), 0);
    assert_eq!(report["deleted"], json!({"keys": 10, "batches": 1}));
    let left: BTreeSet<Vec<u8>> = redis.keys("*").await.into_iter().collect();
    let expected: BTreeSet<Vec<u8>> = seeded
        .live
        .iter()
        .chain(&seeded.kept)
        .chain(&seeded.other_client)
        .cloned()
        .collect();
    assert_eq!(left, expected);
    assert!(seeded.orphans.iter().all(|k| !left.contains(k)));

    // A second pass finds no orphans and deletes nothing.
    let report = audit_json(&server.url(), &[policy.path()], &["--delete-orphans"]);
    assert_eq!(report["clients"][0]["totals"]["orphans"], 0);
    assert_eq!(report["deleted"], json!({"keys": 0, "batches": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_report_and_delete_cover_every_master() {
    let cluster = RedisCluster::start(3);
    let policy = write_policy(MOBILE);
    let mut redis = cluster.client().await;
    let spread = 60;
    let seeded = seed(&mut redis, policy.path(), spread).await;
    for node in cluster.nodes() {
        let on_node = node
            .client()
            .await
            .keys("mobile:homescreen:v1:*")
            .await
            .len();
        assert!(
            on_node > 0,
            "node {} holds no orphan: the test would not span masters",
            node.addr()
        );
    }

    let report = audit_json(&cluster.cluster_url(), &[policy.path()], &[]);
    assert_eq!(report["mode"], "cluster");
    let mut nodes: Vec<String> = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    let mut expected_nodes: Vec<String> = cluster.nodes().iter().map(RedisServer::addr).collect();
    expected_nodes.sort();
    assert_eq!(nodes, expected_nodes);
    assert_report(&report, policy.path(), spread as u64);

    // A plain redis:// URL of one node still audits the whole cluster.
    let report = audit_json(&cluster.urls()[1], &[policy.path()], &[]);
    assert_eq!(report["mode"], "cluster");
    assert_report(&report, policy.path(), spread as u64);

    let report = audit_json(
        &cluster.cluster_url(),
        &[policy.path()],
        &["--delete-orphans"],
    );
    let orphans = 10 + spread as u64;
    assert_eq!(report["deleted"]["keys"], orphans);
    let left: BTreeSet<Vec<u8>> = redis.keys("*").await.into_iter().collect();
    let expected: BTreeSet<Vec<u8>> = seeded
        .live
        .iter()
        .chain(&seeded.kept)
        .chain(&seeded.other_client)
        .cloned()
        .collect();
    assert_eq!(left, expected);
}

/// Every `UNLINK` the slow log saw on `port` (which logs every command), as its key count.
async fn unlink_sizes(server: &RedisServer) -> Vec<usize> {
    let mut redis = server.client().await;
    let log: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(redis.conn())
        .await
        .unwrap();
    let mut sizes = Vec::new();
    for entry in log {
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let Some(redis::Value::Array(args)) = fields.get(3) else {
            continue;
        };
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                redis::from_redis_value_ref::<Vec<u8>>(a)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            })
            .collect();
        if !args
            .first()
            .is_some_and(|c| c.eq_ignore_ascii_case("UNLINK"))
        {
            continue;
        }
        // The slow log keeps 32 arguments; the last says how many more there were.
        let more = args
            .last()
            .and_then(|a| a.strip_prefix("... ("))
            .and_then(|a| a.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok());
        sizes.push(match more {
            Some(more) => args.len() - 2 + more,
            None => args.len() - 1,
        });
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_unlinked_in_batches_of_at_most_100() {
    let server = RedisServer::start();
    let policy = write_policy(MOBILE);
    let (home, _) = prefixes(policy.path());
    let mut redis = server.client().await;
    let mut pipe = redis::pipe();
    for i in 0..250 {
        pipe.cmd("SET")
            .arg(format!("mobile:homescreen:v1:00000000:usr_{i}"))
            .arg(entry(1, "00000000"))
            .arg("PX")
            .arg(600_000)
            .ignore();
    }
    for i in 0..20 {
        pipe.cmd("SET")
            .arg(format!("{home}usr_{i}"))
            .arg(entry(2, "x"))
            .ignore();
    }
    let _: () = pipe.query_async(redis.conn()).await.unwrap();
    for (name, value) in [
        ("slowlog-log-slower-than", "0"),
        ("slowlog-max-len", "100000"),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(redis.conn())
            .await
            .unwrap();
    }

    let report = audit_json(&server.url(), &[policy.path()], &["--delete-orphans"]);
    assert_eq!(report["deleted"], json!({"keys": 250, "batches": 3}));
    let sizes = unlink_sizes(&server).await;
    assert_eq!(sizes.iter().sum::<usize>(), 250, "{sizes:?}");
    assert!(sizes.iter().all(|n| (1..=100).contains(n)), "{sizes:?}");
    assert_eq!(redis.keys("mobile:*").await.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_policies_of_one_client_keep_both_versions_live() {
    let server = RedisServer::start();
    let old = write_policy(MOBILE);
    let new = write_policy(&MOBILE.replace("fields: [id, name]", "fields: [id, displayName]"));
    let (old_home, _) = prefixes(old.path());
    let (new_home, _) = prefixes(new.path());
    assert_ne!(old_home, new_home, "renaming a field must change the shape");
    let mut redis = server.client().await;
    redis
        .set(format!("{old_home}usr_1"), entry(2, "old"), TTL)
        .await;
    redis
        .set(format!("{new_home}usr_1"), entry(2, "new"), TTL)
        .await;
    redis
        .set(format!("{new_home}usr_2"), entry(2, "new"), TTL)
        .await;

    // During the rolling deploy both shapes are live: nothing to delete.
    let report = audit_json(
        &server.url(),
        &[old.path(), new.path()],
        &["--delete-orphans"],
    );
    let homescreen = route(&report, "mobile", "homescreen");
    assert_eq!(
        rows(homescreen, "live"),
        json!({ row_prefix(&old_home): [1, 0], row_prefix(&new_home): [2, 0] })
    );
    assert_eq!(report["deleted"]["keys"], 0);
    assert_eq!(
        report["clients"][0]["policies"].as_array().unwrap().len(),
        2
    );

    // After it, the old shape is an orphan.
    let report = audit_json(&server.url(), &[new.path()], &["--delete-orphans"]);
    let homescreen = route(&report, "mobile", "homescreen");
    assert_eq!(
        rows(homescreen, "orphans"),
        json!({ row_prefix(&old_home): [1, 0] })
    );
    assert_eq!(report["deleted"]["keys"], 1);
    assert_eq!(redis.keys("mobile:*").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_set_reports_memory_as_an_estimate() {
    let server = RedisServer::start();
    let policy = write_policy(MOBILE);
    let (home, _) = prefixes(policy.path());
    let home_shape = home.split(':').nth(3).unwrap().to_string();
    let mut redis = server.client().await;
    let value = entry(2, &home_shape);
    for chunk in 0..20 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("SET")
                .arg(format!("{home}usr_{}", chunk * 1000 + i))
                .arg(&value)
                .arg("PX")
                .arg(600_000)
                .ignore();
        }
        let _: () = pipe.query_async(redis.conn()).await.unwrap();
    }
    for i in 0..50 {
        redis
            .set(
                format!("mobile:homescreen:v1:{home_shape}:usr_{i}"),
                entry(1, &home_shape),
                TTL,
            )
            .await;
    }

    let report = audit_json(&server.url(), &[policy.path()], &[]);
    let homescreen = route(&report, "mobile", "homescreen");
    let live = &homescreen["live"][0];
    assert_eq!(live["keys"], 20_000);
    assert_eq!(live["memory"]["estimated"], true);
    assert_eq!(live["memory"]["sampled"], 1000);
    // The values differ only by a few bytes of key, so a 1000-key sample lands within 5 % of
    // the exact sum.
    let mut exact = 0u64;
    for chunk in 0..20 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("{home}usr_{}", chunk * 1000 + i));
        }
        let sizes: Vec<u64> = pipe.query_async(redis.conn()).await.unwrap();
        exact += sizes.iter().sum::<u64>();
    }
    let bytes = live["memory"]["bytes"].as_u64().unwrap();
    assert!(
        bytes.abs_diff(exact) * 20 <= exact,
        "estimate {bytes} vs exact {exact}"
    );
    // The small row beside it is still exact.
    let orphan = &homescreen["orphans"][0];
    assert_eq!(
        (
            orphan["keys"].as_u64(),
            orphan["memory"]["estimated"].as_bool()
        ),
        (Some(50), Some(false))
    );
    assert_eq!(report["totals"]["memory"]["estimated"], true);

    let (code, text, stderr) = audit(&server.url(), &[policy.path()], &[]);
    assert_eq!(code, 0, "{stderr}");
    let live_line = text.lines().find(|l| l.contains(" live ")).unwrap();
    assert!(
        live_line.contains("20000") && live_line.contains('~'),
        "{text}"
    );
    assert!(
        text.contains("~ memory estimated from a sample of at most 1000 keys"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_or_silent_redis_exits_2_naming_it() {
    let policy = write_policy(MOBILE);
    let mut server = RedisServer::start();
    let port = server.port();
    server.kill();

    let url = format!("redis://:hunter2@127.0.0.1:{port}");
    let (code, stdout, stderr) = audit(&url, &[policy.path()], &[]);
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot reach Redis at redis://:***@127.0.0.1:{port}"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2") && !stdout.contains("hunter2"));

    let cluster_url = format!("redis+cluster://127.0.0.1:{port},127.0.0.1:{port}");
    let (code, _, stderr) = audit(&cluster_url, &[policy.path()], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach Redis at {cluster_url}")),
        "{stderr}"
    );

    // Something that accepts connections and never answers: the timeout ends the wait.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("redis://{}", silent.local_addr().unwrap());
    let (code, _, stderr) = audit(&silent_url, &[policy.path()], &["--timeout", "300ms"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach Redis at {silent_url}")),
        "{stderr}"
    );
    drop(silent);

    // A cluster URL whose node is no cluster node is refused, not half-audited.
    let single = RedisServer::start();
    let (code, _, stderr) = audit(
        &format!("redis+cluster://{}", single.addr()),
        &[policy.path()],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is not a cluster node"), "{stderr}");

    let (code, _, stderr) = audit("localhost:6379", &[policy.path()], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("bad --redis URL localhost:6379"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policy_exits_1_with_its_diagnostics() {
    let server = RedisServer::start();
    let good = write_policy(MOBILE);
    let bad: TempPolicy = write_policy(&MOBILE.replace("version: 2", "version: two"));
    let (code, stdout, stderr) = audit(&server.url(), &[good.path(), bad.path()], &[]);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    // Every file is checked; the bad one's diagnostic points at `version`'s value.
    assert_eq!(
        stderr.trim(),
        format!("{}:15:14: invalid u32", bad.path().display())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_bounded_and_overflow_rows_still_count_and_delete() {
    let server = RedisServer::start();
    let policy = write_policy(MOBILE);
    let mut redis = server.client().await;
    let mut pipe = redis::pipe();
    // 105 routes nobody knows, and 55 old shapes of a known route.
    for i in 0..105 {
        pipe.cmd("SET")
            .arg(format!("mobile:gone-{i:03}:v1:aaaaaaaa:x"))
            .arg(entry(1, "aaaaaaaa"))
            .ignore();
    }
    for i in 0..55 {
        pipe.cmd("SET")
            .arg(format!("mobile:homescreen:v2:{i:08x}:usr_1"))
            .arg(entry(2, "old"))
            .ignore();
    }
    let _: () = pipe.query_async(redis.conn()).await.unwrap();

    let report = audit_json(&server.url(), &[policy.path()], &["--delete-orphans"]);
    let routes = report["clients"][0]["routes"].as_array().unwrap();
    let unknown: Vec<&Value> = routes.iter().filter(|r| r["inPolicy"] == false).collect();
    assert_eq!(unknown.len(), 101, "100 named routes and one overflow row");
    let overflow = unknown.last().unwrap();
    assert_eq!(
        (&overflow["route"], &overflow["overflow"]),
        (&json!("*"), &json!(true))
    );
    assert_eq!(overflow["totals"]["keys"], 5);

    let homescreen = route(&report, "mobile", "homescreen");
    let orphans = homescreen["orphans"].as_array().unwrap();
    assert_eq!(orphans.len(), 51);
    assert_eq!(orphans[50]["prefix"], "*");
    assert_eq!(orphans[50]["overflow"], true);
    assert_eq!(orphans[50]["keys"], 5);
    assert_eq!(report["clients"][0]["totals"]["orphans"], 160);
    assert_eq!(report["deleted"]["keys"], 160);
    assert!(redis.keys("mobile:*").await.is_empty());
}

const SECRET: &str = "cache-audit-test-secret-of-at-least-32-bytes";

fn sidecar_policy(upstream: &str, fields: &str) -> String {
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
    cache: {{ scope: user, ttl: 60s, jitter: 5s }}
    fetch:
      me: {{ upstream: users, path: "/users/{{jwt.sub}}", critical: true, fields: {fields} }}
  - name: plans
    method: GET
    path: /plans
    fetch:
      me: {{ upstream: users, path: "/users/{{jwt.sub}}", critical: true, fields: [id] }}
      plans: {{ upstream: users, path: "/users/plans", critical: true, fields: [id], cache: {{ ttl: 60s }} }}
"#
    )
}

/// Asks `bff` for `path` as each user, then waits until Redis holds `entries` entries of
/// `prefix` and no recompute lock (the write lands just after the answer, the unlock after it).
async fn fill(
    bff: &Bff,
    redis: &mut RedisClient,
    path: &str,
    users: &[&str],
    prefix: &str,
    entries: usize,
) {
    for sub in users {
        let claims = tokens::claims("web-app", 600, json!({ "sub": sub }));
        let token = tokens::hs256(&claims, SECRET);
        let reply = http::send(
            "GET",
            &bff.url(path),
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = redis.key_names(&format!("{prefix}*")).await;
        let locks = keys.iter().filter(|k| k.ends_with(":lock")).count();
        if locks == 0 && keys.len() >= entries {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar never wrote {prefix}*"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_the_sidecar_writes_read_as_live_and_go_orphan_when_the_shape_changes() {
    let server = RedisServer::start();
    let users = MockServer::start(|req| {
        let who = req.path().rsplit('/').next().unwrap_or("").to_string();
        MockReply::json(200, json!({"name": who, "nick": who, "id": 1}))
    });
    let old = write_policy(&sidecar_policy(&users.url(), "[id, name]"));
    let new = write_policy(&sidecar_policy(&users.url(), "[id, nick]"));
    let (old_prefix, new_prefix) = (
        bff::policy::Policy::load(old.path()).unwrap().routes[0].key_prefix("web"),
        bff::policy::Policy::load(new.path()).unwrap().routes[0].key_prefix("web"),
    );
    assert_ne!(old_prefix, new_prefix);
    let mut redis = server.client().await;

    let old_bff = Bff::builder(old.path())
        .arg("--redis")
        .arg(server.url())
        .start()
        .await;
    let users = ["usr_1", "usr_2", "a:b"];
    fill(&old_bff, &mut redis, "/me", &users, &old_prefix, 3).await;
    // A route cached only per fetch: its one shared key lives under the route's prefix.
    let plans_prefix = bff::policy::Policy::load(old.path()).unwrap().routes[1].key_prefix("web");
    fill(
        &old_bff,
        &mut redis,
        "/plans",
        &["usr_1", "usr_2"],
        &plans_prefix,
        1,
    )
    .await;
    assert_eq!(
        redis.key_names(&format!("{plans_prefix}*")).await,
        [format!("{plans_prefix}~fetch.plans:")]
    );
    let report = audit_json(&server.url(), &[old.path()], &[]);
    let me = route(&report, "web", "me");
    assert_eq!(rows(me, "live"), json!({ row_prefix(&old_prefix): [3, 0] }));
    let plans = route(&report, "web", "plans");
    assert_eq!(plans["cached"], true);
    assert_eq!(
        rows(plans, "live"),
        json!({ row_prefix(&plans_prefix): [1, 0] })
    );
    let totals = &report["clients"][0]["totals"];
    assert_eq!(
        (&totals["keys"], &totals["foreign"], &totals["unversioned"]),
        (&json!(4), &json!(0), &json!(0)),
        "every key the sidecar writes is a live, well-formed entry: {report:#}"
    );

    // The field rename is deployed: the new sidecar writes new keys, the old ones are orphans.
    let new_bff = Bff::builder(new.path())
        .arg("--redis")
        .arg(server.url())
        .start()
        .await;
    fill(&new_bff, &mut redis, "/me", &["usr_1"], &new_prefix, 1).await;
    let report = audit_json(&server.url(), &[new.path()], &["--delete-orphans"]);
    let me = route(&report, "web", "me");
    assert_eq!(rows(me, "live"), json!({ row_prefix(&new_prefix): [1, 0] }));
    assert_eq!(
        rows(me, "orphans"),
        json!({ row_prefix(&old_prefix): [3, 0] })
    );
    assert_eq!(report["deleted"]["keys"], 3);
    assert_eq!(
        redis.key_names("web:*").await,
        [
            format!("{new_prefix}usr_1"),
            format!("{plans_prefix}~fetch.plans:"),
        ]
    );
}

/// A TCP relay in front of a real Redis that passes everything through, except that the
/// `nth` `SCAN` command it sees (counted over all connections) is sent with cursor 0: Redis
/// then walks from the start again and returns keys it returned before, as its `SCAN`
/// contract allows at any time (e.g. when the keyspace's hash table shrinks between calls).
async fn rewinding_relay(redis_port: u16, nth: usize) -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let scans = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            let scans = scans.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buffer = vec![0u8; 64 * 1024];
                loop {
                    let n = match client_read.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buffer[..n]);
                    let mut out = Vec::new();
                    while let Some((mut args, used)) = resp_command(&pending) {
                        pending.drain(..used);
                        let is_scan = args
                            .first()
                            .is_some_and(|a| a.eq_ignore_ascii_case(b"SCAN"));
                        if is_scan && scans.fetch_add(1, Ordering::SeqCst) + 1 == nth {
                            args[1] = b"0".to_vec();
                        }
                        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
                        for arg in args {
                            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                            out.extend_from_slice(&arg);
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                    if server_write.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One complete RESP command (an array of bulk strings) at the start of `bytes`, and how many
/// bytes it took; `None` until all of it has arrived.
fn resp_command(bytes: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    fn line(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = bytes[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&bytes[at..end], end + 2))
    }
    let (head, mut at) = line(bytes, 0)?;
    assert_eq!(
        head.first(),
        Some(&b'*'),
        "the relay reads RESP arrays only"
    );
    let count: usize = std::str::from_utf8(&head[1..]).ok()?.parse().ok()?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let (length, next) = line(bytes, at)?;
        let length: usize = std::str::from_utf8(&length[1..]).ok()?.parse().ok()?;
        if bytes.len() < next + length + 2 {
            return None;
        }
        args.push(bytes[next..next + length].to_vec());
        at = next + length + 2;
    }
    Some((args, at))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_scan_returns_twice_are_counted_and_unlinked_once() {
    const ORPHANS: usize = 5000;
    let server = RedisServer::start();
    let policy = write_policy(MOBILE);
    let mut redis = server.client().await;
    let mut pipe = redis::pipe();
    for i in 0..ORPHANS {
        pipe.cmd("SET")
            .arg(format!("mobile:gone:v1:aaaaaaaa:{i}"))
            .arg(entry(1, "aaaaaaaa"))
            .ignore();
    }
    let _: () = pipe.query_async(redis.conn()).await.unwrap();

    // Let Redis finish growing its hash table (it rehashes incrementally), so that cursor 0
    // gives the same first page again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let policy_path = policy.path().to_path_buf();
    let audit_through = |relay: std::net::SocketAddr, extra: &'static [&'static str]| {
        let policy_path = policy_path.clone();
        tokio::task::spawn_blocking(move || {
            audit_json(&format!("redis://{relay}"), &[&policy_path], extra)
        })
    };

    // The second page starts over: the first page's keys come back again.
    let report = audit_through(rewinding_relay(server.port(), 2).await, &[])
        .await
        .unwrap();
    let totals = &report["clients"][0]["totals"];
    assert_eq!(totals["keys"], ORPHANS, "{totals}");
    assert_eq!(totals["orphans"], ORPHANS, "{totals}");
    assert_eq!(route(&report, "mobile", "gone")["totals"]["keys"], ORPHANS);

    // Deleting: each key is unlinked once, and all are gone.
    let report = audit_through(
        rewinding_relay(server.port(), 2).await,
        &["--delete-orphans"],
    )
    .await
    .unwrap();
    assert_eq!(report["clients"][0]["totals"]["orphans"], ORPHANS);
    assert_eq!(report["deleted"]["keys"], ORPHANS);
    assert!(redis.keys("mobile:*").await.is_empty());
}
