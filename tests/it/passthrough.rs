//! Fall-through to the app: requests no route owns reach it unchanged and stream both ways.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::support::{http, raw, write_policy, Bff, MockReply, MockServer, TempPolicy};

async fn start(app: &MockServer) -> (Bff, TempPolicy) {
    start_at(&app.url()).await
}

async fn start_at(app_url: &str) -> (Bff, TempPolicy) {
    let file = write_policy(&format!(
        "client: web\nupstreams:\n  app: {{ url: \"{app_url}\" }}\nroutes: []\nfallthrough: app\n"
    ));
    (Bff::start(file.path()).await, file)
}

fn echo_app() -> MockServer {
    MockServer::start(|req| match req.path() {
        "/events" => MockReply::chunked(
            200,
            "text/event-stream",
            ["data: one\n\n", "data: two\n\n", "data: three\n\n"],
            Duration::from_millis(400),
        ),
        "/ws" => MockReply::websocket_echo(),
        "/big" => MockReply::bytes(200, "application/octet-stream", pattern(6 << 20)),
        _ => MockReply::bytes(201, "application/octet-stream", req.body.clone())
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .header("x-app", "yes"),
    })
}

fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_path_query_headers_and_body_arrive_unchanged() {
    let app = echo_app();
    let (bff, _file) = start(&app).await;
    let body = pattern(3 << 20);
    let reply = http::send(
        "PUT",
        &bff.url("/profile/save?draft=1&x=%2F"),
        &[
            ("x-custom", "v1"),
            ("authorization", "Bearer app-session"),
            ("cookie", "s=1"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.body, body, "response body differs");
    let cookies: Vec<_> = reply.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(reply.header("x-app"), Some("yes"));
    assert!(reply.header("x-trace-id").is_some());

    let seen = app.requests().pop().expect("app got the request");
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.uri, "/profile/save?draft=1&x=%2F");
    assert_eq!(seen.header("x-custom"), Some("v1"));
    // The app is the client's own frontend: its session credentials pass through.
    assert_eq!(seen.header("authorization"), Some("Bearer app-session"));
    assert_eq!(seen.header("cookie"), Some("s=1"));
    assert_eq!(seen.body, body, "request body differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_chunked_bodies_stream_through() {
    let app = echo_app();
    let (bff, _file) = start(&app).await;
    let reply = http::get(&bff.url("/big")).await;
    assert_eq!(reply.body, pattern(6 << 20));

    let chunks: Vec<Bytes> = (0..40)
        .map(|i| Bytes::from(vec![i as u8; 100_000]))
        .collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let reply = http::send_chunked("POST", &bff.url("/upload"), &[], chunks, Duration::ZERO).await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.body.len(), expected.len());
    assert_eq!(reply.body, expected);
    let seen = app.requests().pop().expect("app got the upload");
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_are_not_buffered() {
    let app = echo_app();
    let (bff, _file) = start(&app).await;
    let started = Instant::now();
    let mut stream = http::open("GET", &bff.url("/events"), &[], "").await;
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    let first = stream.next_chunk().await.expect("first event");
    // The app sends the last event 800 ms after the first: the first must not wait for it.
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("data: one"));
    let rest = stream.rest().await;
    let all_at = started.elapsed();
    assert!(String::from_utf8_lossy(&rest).contains("data: three"));
    assert!(
        all_at - first_at >= Duration::from_millis(600),
        "events arrived together: first at {first_at:?}, last at {all_at:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_work_through() {
    let app = echo_app();
    let (bff, _file) = start(&app).await;
    let mut conn = raw::connect(bff.addr()).await;
    conn.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = raw::read_until(&mut conn, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for message in [&b"hello"[..], b"\x81\x05world"] {
        conn.write_all(message).await.unwrap();
        let echoed = raw::read_until(&mut conn, message).await;
        assert!(echoed.ends_with(message));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_named_by_host_name_is_reached() {
    let app = echo_app();
    let (bff, _file) = start_at(&format!("http://localhost:{}", app.addr().port())).await;
    for _ in 0..3 {
        let reply = http::send("POST", &bff.url("/named"), &[], "hi").await;
        assert_eq!((reply.status, &reply.body[..]), (201, &b"hi"[..]));
    }
    assert_eq!(app.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_the_trace_id_the_request_is_logged_under() {
    let app = echo_app();
    let (bff, _file) = start(&app).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    // The client's trace headers, and the trace id expected (`None`: a new one).
    type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);
    let cases: [Case; 4] = [
        (&[("x-trace-id", "req-42")], Some("req-42")),
        (
            &[("traceparent", traceparent), ("x-trace-id", "req-42")],
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        ),
        // A malformed id is replaced, not passed on beside another one in the logs.
        (&[("x-trace-id", "<script>")], None),
        (&[], None),
    ];
    for (headers, expected) in cases {
        let reply = http::send("GET", &bff.url("/t"), headers, "").await;
        let answered = reply.header("x-trace-id").expect("X-Trace-Id").to_string();
        let seen = app.requests().pop().expect("app got the request");
        let sent: Vec<_> = seen.headers.get_all("x-trace-id").iter().collect();
        assert_eq!(sent, [answered.as_str()], "{headers:?}");
        match expected {
            Some(id) => assert_eq!(answered, id, "{headers:?}"),
            None => assert_eq!(answered.len(), 32, "{headers:?}: {answered}"),
        }
    }
}
