//! Proves the test harness itself (mock upstream, clients, policy files) works without bff.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::support::{http, raw, write_policy, write_policy_configmap, MockReply, MockServer};

fn routes() -> MockServer {
    MockServer::start(|req| match req.path() {
        "/json" => MockReply::json(201, json!({"echo": req.query(), "len": req.body.len()})),
        "/bytes" => MockReply::bytes(
            200,
            "application/octet-stream",
            Bytes::from_static(b"\x00\x01raw"),
        )
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2"),
        "/slow" => MockReply::text(200, "late").delay(Duration::from_millis(300)),
        "/sse" => MockReply::chunked(
            200,
            "text/event-stream",
            ["data: one\n\n", "data: two\n\n", "data: three\n\n"],
            Duration::from_millis(150),
        ),
        _ => MockReply::empty(404),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_answers_and_records_requests() {
    let up = routes();
    assert_eq!(up.url(), format!("http://127.0.0.1:{}", up.addr().port()));

    let reply = http::send(
        "POST",
        &format!("{}/json?x=1&y=two", up.url()),
        &[("x-test", "hello")],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.json(), json!({"echo": "x=1&y=two", "len": 2}));

    let reply = http::get(&format!("{}/bytes", up.url())).await;
    assert_eq!((reply.status, &reply.body[..]), (200, &b"\x00\x01raw"[..]));
    let cookies: Vec<_> = reply.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);

    let start = Instant::now();
    assert_eq!(
        http::get(&format!("{}/slow", up.url())).await.text(),
        "late"
    );
    assert!(start.elapsed() >= Duration::from_millis(300));

    assert_eq!(http::get(&format!("{}/nope", up.url())).await.status, 404);

    let reqs = up.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path(), reqs[0].query()),
        ("POST", "/json", Some("x=1&y=two"))
    );
    assert_eq!(reqs[0].uri, "/json?x=1&y=two");
    assert_eq!(reqs[0].header("x-test"), Some("hello"));
    assert_eq!(reqs[0].json(), json!({}));
    assert_eq!((reqs[1].method.as_str(), reqs[1].query()), ("GET", None));
    assert!(up.connections() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_streams_chunked_replies() {
    let up = routes();
    let mut sse = http::open("GET", &format!("{}/sse", up.url()), &[], "").await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.header("transfer-encoding"), Some("chunked"));
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse.next_chunk().await.unwrap(), "data: one\n\n");
    let start = Instant::now();
    assert_eq!(sse.next_chunk().await.unwrap(), "data: two\n\n");
    assert!(
        start.elapsed() >= Duration::from_millis(100),
        "second event arrived before the gap"
    );
    assert_eq!(sse.rest().await, "data: three\n\n");

    let whole = http::get(&format!("{}/sse", up.url())).await;
    assert_eq!(whole.text(), "data: one\n\ndata: two\n\ndata: three\n\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_records_chunked_upload_of_3_mib() {
    let up = routes();
    let body: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<Bytes> = body
        .chunks(256 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();
    let url = format!("{}/json", up.url());
    let reply = http::send_chunked(
        "PUT",
        &url,
        &[("x-upload", "big")],
        chunks,
        Duration::from_millis(1),
    )
    .await;
    assert_eq!(reply.json()["len"], body.len());

    let req = &up.requests()[0];
    assert_eq!(req.method, "PUT");
    assert_eq!(req.header("transfer-encoding"), Some("chunked"));
    assert_eq!(req.header("content-length"), None);
    assert_eq!(req.header("x-upload"), Some("big"));
    assert!(req.body == body, "upstream body differs from what was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_over_raw_upgrade() {
    let up = MockServer::start(|_| MockReply::websocket_echo());
    let mut conn = raw::connect(up.addr()).await;
    let upgrade = "GET /ws HTTP/1.1\r\nHost: up\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    conn.write_all(upgrade.as_bytes()).await.unwrap();
    let head = String::from_utf8(raw::read_until(&mut conn, b"\r\n\r\n").await).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("upgrade: websocket") && head.contains("connection: upgrade"),
        "{head}"
    );

    for msg in [&b"hello"[..], b"\x81\x05binary\xff"] {
        conn.write_all(msg).await.unwrap();
        assert_eq!(raw::read_until(&mut conn, msg).await, msg);
    }
    assert_eq!(up.requests()[0].header("upgrade"), Some("websocket"));

    // Without an Upgrade header the echo handler refuses.
    assert_eq!(http::get(&format!("{}/ws", up.url())).await.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_exchange_reads_until_close() {
    let up = MockServer::start(|_| MockReply::text(200, "hi"));
    let out = raw::exchange(
        up.addr(),
        b"GET /x HTTP/1.1\r\nHost: up\r\nConnection: close\r\n\r\n",
    )
    .await;
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\nhi"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_port_refuses() {
    let port = MockServer::refused_port();
    let err = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let err = http::try_send("GET", &format!("http://127.0.0.1:{port}/"), &[], "")
        .await
        .unwrap_err();
    assert!(err.contains("127.0.0.1"), "{err}");
}

#[test]
fn policy_rewrite_replaces_content() {
    for policy in [write_policy("a: 1\n"), write_policy_configmap("a: 1\n")] {
        assert_eq!(std::fs::read_to_string(policy.path()).unwrap(), "a: 1\n");
        policy.rewrite("a: 2\n");
        policy.rewrite("a: 3\n");
        assert_eq!(std::fs::read_to_string(policy.path()).unwrap(), "a: 3\n");
        let mut names: Vec<_> = std::fs::read_dir(policy.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert!(
            names == ["policy.yaml"] || names == ["..data", "..gen2", "policy.yaml"],
            "{names:?}"
        );
    }
}
