//! Proves the Redis test support works on its own: a node starts on its port, dies on SIGKILL,
//! comes back empty on the same port; a 3-master cluster covers every slot and routes keys.

use std::time::Duration;

use crate::support::redis::{redis_cli, RedisCluster, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_starts_answers_dies_and_restarts_on_its_port() {
    let mut server = RedisServer::start();
    let port = server.port();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(redis_cli(port, &["PING"]).trim(), "PONG");
    // No persistence: nothing would survive a restart, and nothing is written to disk.
    assert_eq!(
        redis_cli(port, &["CONFIG", "GET", "save"]).lines().nth(1),
        Some("")
    );
    assert_eq!(
        redis_cli(port, &["CONFIG", "GET", "appendonly"])
            .lines()
            .nth(1),
        Some("no")
    );

    let mut client = server.client().await;
    client.set("a:1", "one", None).await;
    client
        .set("a:2", b"\x00two", Some(Duration::from_secs(600)))
        .await;
    client.set("b:1", "other", None).await;
    assert_eq!(client.get("a:1").await.as_deref(), Some(&b"one"[..]));
    assert_eq!(client.get("missing").await, None);
    assert_eq!(client.pttl("a:1").await, -1);
    let ttl = client.pttl("a:2").await;
    assert!((1..=600_000).contains(&ttl), "PTTL {ttl}");
    assert_eq!(client.pttl("missing").await, -2);
    assert_eq!(client.key_names("a:*").await, ["a:1", "a:2"]);

    server.kill();
    assert!(!server.is_running());
    assert_eq!(
        redis_cli(port, &["PING"]).trim(),
        "",
        "a killed server must not answer"
    );

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    let mut client = server.client().await;
    assert!(
        client.keys("*").await.is_empty(),
        "a restarted node comes back empty"
    );
    client.set("c", "again", None).await;
    assert_eq!(client.get("c").await.as_deref(), Some(&b"again"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_started_together_get_distinct_ports() {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_covers_every_slot_and_routes_keys() {
    let cluster = RedisCluster::start(3);
    assert_eq!(cluster.urls().len(), 3);
    let node_ports: Vec<u16> = cluster.nodes().iter().map(RedisServer::port).collect();
    for node in cluster.nodes() {
        // The bus port is the node's port + 10000, and it is listening.
        assert!(std::net::TcpStream::connect(("127.0.0.1", node.port() + 10000)).is_ok());
    }

    let mut client = cluster.client().await;
    let slots: Vec<(i64, i64, Vec<redis::Value>)> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(client.conn())
        .await
        .map(|ranges: Vec<Vec<redis::Value>>| {
            ranges
                .into_iter()
                .map(|r| {
                    let start: i64 = redis::from_redis_value_ref(&r[0]).unwrap();
                    let end: i64 = redis::from_redis_value_ref(&r[1]).unwrap();
                    let master = match &r[2] {
                        redis::Value::Array(m) => m.clone(),
                        other => panic!("master entry {other:?}"),
                    };
                    (start, end, master)
                })
                .collect()
        })
        .expect("CLUSTER SLOTS");
    let mut ranges: Vec<(i64, i64)> = slots.iter().map(|(s, e, _)| (*s, *e)).collect();
    ranges.sort();
    let mut next = 0;
    for (start, end) in &ranges {
        assert_eq!(*start, next, "slots {ranges:?} leave a gap or overlap");
        next = end + 1;
    }
    assert_eq!(next, 16384, "slots {ranges:?} do not reach 16383");
    for (_, _, master) in &slots {
        let port: i64 = redis::from_redis_value_ref(&master[1]).unwrap();
        assert!(
            node_ports.contains(&(port as u16)),
            "slot owner {port} is not ours"
        );
    }

    for i in 0..200 {
        client.set(format!("k:{i}"), format!("v{i}"), None).await;
    }
    for i in 0..200 {
        let value = client.get(format!("k:{i}")).await;
        assert_eq!(value, Some(format!("v{i}").into_bytes()));
    }
    assert_eq!(client.keys("k:*").await.len(), 200);
    for node in cluster.nodes() {
        let on_node = node.client().await.keys("k:*").await.len();
        assert!(
            on_node > 20,
            "node {} holds only {on_node} of 200 keys",
            node.addr()
        );
    }
}
