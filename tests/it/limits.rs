//! Hostile upstreams and clients against the real binary, with memory read from
//! `/proc/PID/status`: compressed bombs in every encoding bff decodes, oversized and dripping
//! request heads, idle keep-alive connections, the connection cap, and freed memory going
//! back to the OS.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::metrics::metric;
use crate::support::raw::{connect, read_to_end, read_until};
use crate::support::{http, write_policy, Bff, MockReply, MockServer, TempPolicy};

const MIB: u64 = 1 << 20;

/// A field of `/proc/PID/status` in bytes (`VmHWM`: peak RSS; `VmRSS`: RSS now).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kb * 1024
}

// ----- item 1: compressed bombs -----

/// What the bombs inflate to: the size of the report's case.
const BOMB: usize = 1 << 30;

/// `BOMB` zeros in each encoding, compressed as a stream (the zeros are never in memory whole).
fn bombs() -> Vec<(&'static str, Vec<u8>)> {
    fn feed(mut encoder: impl Write) {
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..BOMB / zeros.len() {
            encoder.write_all(&zeros).unwrap();
        }
        encoder.flush().unwrap();
    }
    let gzip = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        feed(&mut e);
        e.finish().unwrap()
    };
    let deflate = {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        feed(&mut e);
        e.finish().unwrap()
    };
    let br = {
        let mut out = Vec::new();
        {
            let mut e = brotli::CompressorWriter::new(&mut out, 1 << 16, 5, 22);
            feed(&mut e);
        }
        out
    };
    let zstd = {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        feed(&mut e);
        e.finish().unwrap()
    };
    vec![
        ("gzip", gzip),
        ("deflate", deflate),
        ("br", br),
        ("zstd", zstd),
    ]
}

const ENCODINGS: [&str; 4] = ["gzip", "deflate", "br", "zstd"];

fn bomb_policy(svc: &str, app: &str) -> String {
    let mut yaml = format!(
        "client: web\nupstreams:\n  svc: {{ url: \"{svc}\", timeout: 20s }}\n  app: {{ url: \"{app}\" }}\nroutes:\n"
    );
    for encoding in ENCODINGS {
        yaml += &format!(
            r#"  - name: crit-{encoding}
    method: GET
    path: /crit/{encoding}
    on_critical_failure: {{ status: 502, code: BAD_UPSTREAM_RESPONSE, message: "Could not load this.", retryable: true }}
    fetch:
      user: {{ upstream: svc, path: /bomb/{encoding}, critical: true, fields: [id] }}
  - name: opt-{encoding}
    method: GET
    path: /opt/{encoding}
    fetch:
      user: {{ upstream: svc, path: /fine, critical: true, fields: [id] }}
      extras: {{ upstream: svc, path: /bomb/{encoding}, fields: [id], fallback: {{ id: null }} }}
  - name: proxy-{encoding}
    method: GET
    path: /proxy/{encoding}
    proxy: {{ upstream: svc, path: /bomb/{encoding}, fields: [id] }}
  - name: small-{encoding}
    method: GET
    path: /small/{encoding}
    proxy: {{ upstream: svc, path: /small/{encoding}, fields: [id] }}
"#
        );
    }
    yaml + "fallthrough: app\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bombs_are_refused_without_inflating_them() {
    let bombs = tokio::task::spawn_blocking(bombs).await.unwrap();
    let small: Vec<(&str, Vec<u8>)> = {
        let json = serde_json::to_vec(&json!({"id": 7, "secret": "x"})).unwrap();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&json).unwrap();
        let mut deflate =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        deflate.write_all(&json).unwrap();
        let mut br = Vec::new();
        {
            let mut e = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            e.write_all(&json).unwrap();
        }
        vec![
            ("gzip", gzip.finish().unwrap()),
            ("deflate", deflate.finish().unwrap()),
            ("br", br),
            ("zstd", zstd::encode_all(&json[..], 3).unwrap()),
        ]
    };
    let bodies = Arc::new((bombs, small));
    let svc = MockServer::start(move |req| {
        let path = req.path().to_string();
        if path == "/fine" {
            return MockReply::json(200, json!({"id": 7}));
        }
        let (kind, encoding) = path[1..].split_once('/').unwrap();
        let list = if kind == "bomb" { &bodies.0 } else { &bodies.1 };
        let (encoding, body) = list.iter().find(|(e, _)| *e == encoding).unwrap();
        MockReply::bytes(200, "application/json", body.clone()).header("content-encoding", encoding)
    });
    let app = MockServer::start(|_| MockReply::json(200, json!({"app": true})));
    let file = write_policy(&bomb_policy(&svc.url(), &app.url()));
    let bff = Bff::start(file.path()).await;

    // Every encoding is decoded (deflate and zstd used to be refused).
    for encoding in ENCODINGS {
        let reply = http::get(&bff.url(&format!("/small/{encoding}"))).await;
        assert_eq!(reply.status, 200, "{encoding}: {}", reply.text());
        assert_eq!(reply.json(), json!({"id": 7}), "{encoding}");
    }

    // Every bomb at once on the one worker thread, and meanwhile requests that have nothing
    // to do with them.
    let bombs = futures::future::join_all(ENCODINGS.iter().flat_map(|encoding| {
        ["crit", "opt", "proxy"].map(|kind| {
            let url = bff.url(&format!("/{kind}/{encoding}"));
            async move { (kind, *encoding, http::get(&url).await) }
        })
    }));
    let unrelated = async {
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let started = Instant::now();
            let reply = http::get(&bff.url("/somewhere/else")).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slowest
    };
    let (answers, slowest) = tokio::join!(bombs, unrelated);
    for (kind, encoding, reply) in answers {
        let what = format!("{kind} {encoding}");
        let body = reply.json();
        match kind {
            "opt" => {
                assert_eq!(reply.status, 200, "{what}: {body}");
                assert_eq!(
                    body["meta"]["degradedSections"],
                    json!(["extras"]),
                    "{what}"
                );
                assert_eq!(body["extras"], json!({"id": null}), "{what}");
                assert_eq!(body["user"], json!({"id": 7}), "{what}");
            }
            _ => {
                assert_eq!(reply.status, 502, "{what}: {body}");
                assert_eq!(body["error"]["code"], "BAD_UPSTREAM_RESPONSE", "{what}");
            }
        }
    }
    // It took seconds of one thread per bomb; now a bomb costs milliseconds.
    assert!(
        slowest < Duration::from_secs(3),
        "an unrelated request waited {slowest:?}"
    );
    let peak = proc_status(bff.pid(), "VmHWM");
    assert!(
        peak < 200 * MIB,
        "bff's peak RSS was {} MiB for bombs of {} MiB each",
        peak / MIB,
        BOMB as u64 / MIB
    );
    assert!(bff.logs().contains("once decoded"), "{}", bff.logs());
}

// ----- item 2: client connections and request heads -----

async fn start_with(app: &MockServer, args: &[&str]) -> (Bff, TempPolicy) {
    let file = write_policy(&format!(
        "client: web\nupstreams:\n  app: {{ url: \"{}\" }}\nroutes: []\nfallthrough: app\n",
        app.url()
    ));
    let mut builder = Bff::builder(file.path());
    for arg in args {
        builder = builder.arg(*arg);
    }
    (builder.start().await, file)
}

fn app() -> MockServer {
    MockServer::start(|_| MockReply::json(200, json!({"app": true})))
}

/// A head that never ends: the request line and a header `size` bytes long, without its end.
fn endless_head(size: usize) -> Vec<u8> {
    let mut head = b"GET /x HTTP/1.1\r\nHost: bff\r\nX-Big: ".to_vec();
    head.resize(head.len() + size, b'a');
    head
}

/// Whether the server closed (or reset) the connection within `within`; anything it sends
/// first is read and dropped.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        while let Ok(1..) = stream.read(&mut buf).await {}
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_over_the_bound_are_answered_431_in_bounded_memory() {
    let app = app();
    let (bff, _file) = start_with(&app, &[]).await;

    // Under the default 64 KiB a large head still passes, on a kept-alive connection.
    let mut stream = connect(bff.addr()).await;
    for _ in 0..2 {
        let mut request = endless_head(60 * 1024);
        request.extend_from_slice(b"\r\n\r\n");
        stream.write_all(&request).await.unwrap();
        let reply = read_until(&mut stream, b"{\"app\":true}").await;
        assert!(
            reply.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    }

    let mut request = endless_head(100 * 1024);
    request.extend_from_slice(b"\r\n\r\n");
    let reply = crate::support::raw::exchange(bff.addr(), &request).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    assert!(text.contains("\"code\":\"HEADERS_TOO_LARGE\""), "{text}");
    assert!(text.to_ascii_lowercase().contains("x-trace-id: "), "{text}");

    // The report's case: 150 connections each sending a 1 MB header line.
    let before = proc_status(bff.pid(), "VmHWM");
    let addr = bff.addr();
    let clients = (0..150).map(|_| {
        tokio::spawn(async move {
            let mut stream = connect(addr).await;
            // The server answers once the bound is passed and then stops reading for good.
            let _ = stream.write_all(&endless_head(1 << 20)).await;
            read_to_end(&mut stream).await
        })
    });
    for reply in futures::future::join_all(clients).await {
        let reply = reply.unwrap();
        let text = String::from_utf8_lossy(&reply);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 431 "),
            "{text}"
        );
    }
    let grown = proc_status(bff.pid(), "VmHWM").saturating_sub(before);
    assert!(
        grown < 64 * MIB,
        "150 oversized heads raised bff's peak RSS by {} MiB",
        grown / MIB
    );
    assert_eq!(app.requests().len(), 2, "an oversized head reached the app");
    assert_eq!(refused(&bff, "head_too_large").await, 151.0);
}

async fn refused(bff: &Bff, reason: &str) -> f64 {
    metric(
        bff,
        "bff_client_connections_refused_total",
        &[("reason", reason)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_drips_in_is_cut_at_the_header_timeout() {
    let app = app();
    let (bff, _file) = start_with(&app, &["--header-timeout", "2s"]).await;

    // One byte every 300 ms: each read is quick, the head never ends.
    let mut stream = connect(bff.addr()).await;
    stream
        .write_all(b"GET /x HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let drip = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if writer.write_all(b"a").await.is_err() {
                return;
            }
        }
    });
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 1024];
        while let Ok(1..) = reader.read(&mut buf).await {}
    })
    .await;
    drip.abort();
    assert!(
        closed.is_ok(),
        "a dripping head kept its connection for 20 s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed only after {:?}",
        started.elapsed()
    );

    // A connection that sends nothing at all is closed too.
    let mut silent = connect(bff.addr()).await;
    assert!(closed_within(&mut silent, Duration::from_secs(10)).await);
    assert!(app.requests().is_empty());
    assert_eq!(refused(&bff, "head_timeout").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_connections_close_after_the_idle_timeout() {
    let app = app();
    let (bff, _file) = start_with(&app, &["--idle-timeout", "1s", "--header-timeout", "30s"]).await;
    let mut stream = connect(bff.addr()).await;
    for _ in 0..3 {
        stream
            .write_all(b"GET /x HTTP/1.1\r\nHost: bff\r\n\r\n")
            .await
            .unwrap();
        let reply = read_until(&mut stream, b"{\"app\":true}").await;
        assert!(
            reply.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        closed_within(&mut stream, Duration::from_secs(10)).await,
        "an idle kept-alive connection stayed open"
    );
    assert_eq!(app.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once() {
    let app = app();
    let (bff, _file) =
        start_with(&app, &["--max-connections", "3", "--header-timeout", "60s"]).await;
    // Readiness probes from inside bff may still hold a slot for a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = connect(bff.addr()).await;
        stream.write_all(b"GET /x HTTP/1.1\r\n").await.unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = connect(bff.addr()).await;
    assert!(
        closed_within(&mut over, Duration::from_secs(5)).await,
        "a connection over the cap was kept"
    );
    for stream in &mut held {
        assert!(!closed_within(stream, Duration::from_millis(100)).await);
    }
    assert!(refused(&bff, "over_cap").await >= 1.0);

    // A slot frees up when a connection closes.
    held.pop();
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let reply = crate::support::raw::exchange(
                bff.addr(),
                b"GET /x HTTP/1.1\r\nHost: bff\r\nConnection: close\r\n\r\n",
            )
            .await;
            if reply.starts_with(b"HTTP/1.1 200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(served.is_ok(), "no connection was served after one closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_freed_after_a_spike_goes_back_to_the_os() {
    let app = app();
    // A 1 MiB bound (Pingora's own) lets 150 heads cost the report's 150 MB.
    let (bff, _file) = start_with(&app, &["--max-header-bytes", "1048576"]).await;
    let baseline = proc_status(bff.pid(), "VmRSS");
    let addr: SocketAddr = bff.addr();
    let mut clients = Vec::new();
    for _ in 0..150 {
        let mut stream = connect(addr).await;
        stream.write_all(&endless_head(1_000_000)).await.unwrap();
        clients.push(stream);
    }
    let spiked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let rss = proc_status(bff.pid(), "VmRSS");
            if rss > baseline + 100 * MIB {
                return rss;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no spike: RSS {} MiB",
            proc_status(bff.pid(), "VmRSS") / MIB
        )
    });
    drop(clients);
    // Half the spike back within seconds; without jemalloc's background purging an idle
    // process kept all of it.
    let settled = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let rss = proc_status(bff.pid(), "VmRSS");
            if rss < baseline + (spiked - baseline) / 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "RSS went from {} to {} MiB and stayed at {} MiB",
        baseline / MIB,
        spiked / MIB,
        proc_status(bff.pid(), "VmRSS") / MIB
    );
}
