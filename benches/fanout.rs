//! Fan-out overhead: the real `bff` binary serving a three-fetch route whose mock upstreams
//! answer after 10, 20 and 40 ms, against a direct call to the slowest of them, measured in
//! the same run, alternating. What bff adds is the difference of the two. `cargo bench`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

mod support;
use support::{bff_run, free_port, ms, percentiles, Process};

const DELAYS_MS: [u64; 3] = [10, 20, 40];

/// A mock service answering a small JSON document after `delay`.
async fn mock(delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind mock: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("mock address: {e}"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |_: Request<Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    let body = r#"{"id":"x-1","title":"Lamp","price":12,"internal":"no","items":[{"title":"a","sku":"s"}]}"#;
                    let mut response =
                        Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    response.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --benches` runs this once as a smoke test; `cargo bench` passes `--bench`.
    let full = std::env::args().any(|a| a == "--bench");
    let requests = if full { 300 } else { 5 };

    let mut upstreams = Vec::new();
    for delay in DELAYS_MS {
        upstreams.push(mock(Duration::from_millis(delay)).await);
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let policy = dir.path().join("bench.yaml");
    let mut yaml = String::from("client: bench\nupstreams:\n");
    for (i, addr) in upstreams.iter().enumerate() {
        yaml.push_str(&format!(
            "  u{i}: {{ url: \"http://{addr}\", timeout: 1s }}\n"
        ));
    }
    yaml.push_str("routes:\n  - name: page\n    method: GET\n    path: /page\n    fetch:\n");
    for i in 0..upstreams.len() {
        yaml.push_str(&format!(
            "      f{i}: {{ upstream: u{i}, path: /doc, critical: true, fields: [id, title, \"items[].title\"] }}\n"
        ));
    }
    std::fs::write(&policy, yaml).unwrap_or_else(|e| panic!("write policy: {e}"));

    let (listen, admin) = (free_port(), free_port());
    let _sidecar = Process(
        bff_run(&policy, listen, admin, "error")
            .spawn()
            .unwrap_or_else(|e| panic!("start bff: {e}")),
    );

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let get = |url: String| {
        let client = client.clone();
        async move {
            let started = Instant::now();
            let response = client
                .get(url.parse().unwrap_or_else(|e| panic!("{url}: {e}")))
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            let status = response.status();
            let _ = response.into_body().collect().await;
            (status, started.elapsed())
        }
    };
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reachable = client
            .get(ready.parse().unwrap_or_else(|e| panic!("{e}")))
            .await
            .is_ok_and(|r| r.status() == 200);
        if reachable {
            break;
        }
        assert!(Instant::now() < deadline, "bff did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let slowest = upstreams[upstreams.len() - 1];
    let (mut through, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..requests {
        let (status, took) = get(format!("http://127.0.0.1:{listen}/page")).await;
        assert_eq!(status, 200, "the route must answer whole");
        through.push(took);
        let (status, took) = get(format!("http://{slowest}/doc")).await;
        assert_eq!(status, 200);
        direct.push(took);
    }
    let (bff50, bff99) = percentiles(through);
    let (direct50, direct99) = percentiles(direct);
    println!("fan-out of {DELAYS_MS:?} ms, {requests} requests each, alternating:");
    println!("{:<28} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    println!(
        "{:<28} {:>9.2} {:>9.2}",
        "direct to the slowest",
        ms(direct50),
        ms(direct99)
    );
    println!(
        "{:<28} {:>9.2} {:>9.2}",
        "through bff",
        ms(bff50),
        ms(bff99)
    );
    println!(
        "{:<28} {:>9.2} {:>9.2}",
        "overhead",
        ms(bff50.saturating_sub(direct50)),
        ms(bff99.saturating_sub(direct99))
    );
    let sum: u64 = DELAYS_MS.iter().sum();
    println!(
        "through bff / sum of delays ({sum} ms): {:.2} (1.0 would mean sequential calls)",
        ms(bff50) / sum as f64
    );
}
