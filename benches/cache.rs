//! The response cache through the real `bff` binary: what a cached route's L1 hit costs next
//! to an answer bff makes by itself and to the same route uncached; what XFetch's early
//! recompute saves at each expiry (requests that wait on a recompute) against the same cache
//! with XFetch all but off; and, with a `redis-server` on PATH, what an L2 hit costs on a
//! second instance. Everything is measured in one run, alternating, and the medians of several
//! rounds are printed with ratios: the machine is shared, so only the ratios travel.
//! `cargo bench --bench cache`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

mod support;
use support::{bff_run, free_port, ms, percentiles, Process};

/// The TTL of the XFetch comparison's routes.
const TTL: Duration = Duration::from_secs(1);
/// How long the XFetch comparison's upstream takes: the recompute requests may wait on.
const SLOW: Duration = Duration::from_millis(50);
/// "No XFetch": an early recompute is drawn only within `50 ms · 1e-6 · −ln(draw)`, a few µs,
/// of expiry.
const TINY_BETA: &str = "0.000001";

/// How much of everything one run does.
struct Plan {
    /// Part 1 (and 3): rounds, and sequential requests per variant in each.
    hit_rounds: usize,
    hit_requests: usize,
    /// Part 2: rounds, the length of each variant's load window, clients and their pause.
    load_rounds: usize,
    load_window: Duration,
    clients: usize,
    pause: Duration,
    /// Part 3: fresh keys per round.
    l2_keys: usize,
}

impl Plan {
    fn new(full: bool) -> Plan {
        if full {
            Plan {
                hit_rounds: 7,
                hit_requests: 400,
                load_rounds: 3,
                load_window: Duration::from_secs(7),
                clients: 16,
                pause: Duration::from_millis(10),
                l2_keys: 200,
            }
        } else {
            Plan {
                hit_rounds: 1,
                hit_requests: 5,
                load_rounds: 1,
                load_window: Duration::from_millis(1500),
                clients: 4,
                pause: Duration::from_millis(10),
                l2_keys: 5,
            }
        }
    }
}

/// A mock upstream answering a small JSON document after `delay`, counting its calls.
async fn mock(delay: Duration) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind mock: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("mock address: {e}"));
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_: Request<Incoming>| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let body = r#"{"id":"x-1","title":"Lamp","price":12,"internal":"no","items":[{"title":"a","sku":"s"}]}"#;
                        let mut response =
                            Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                        response.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, calls)
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// One running sidecar: its data-plane and admin addresses.
struct Sidecar {
    _process: Process,
    listen: u16,
    admin: u16,
}

impl Sidecar {
    async fn start(client: &HttpClient, policy: &Path, redis: Option<&str>) -> Sidecar {
        let (listen, admin) = (free_port(), free_port());
        let mut command = bff_run(policy, listen, admin, "error");
        if let Some(url) = redis {
            command.args(["--redis", url]);
        }
        let process = Process(command.spawn().unwrap_or_else(|e| panic!("start bff: {e}")));
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
        Sidecar {
            _process: process,
            listen,
            admin,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listen)
    }

    /// The sum of a metric's samples whose labels include `labels`.
    async fn metric(&self, client: &HttpClient, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (status, _, body) =
            get(client, &format!("http://127.0.0.1:{}/metrics", self.admin)).await;
        assert_eq!(status, 200, "GET /metrics");
        let text = String::from_utf8_lossy(&body);
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.rsplit_once(' '))
            .filter(|(series, _)| {
                let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
                metric == name && wanted.iter().all(|w| labels.contains(w.as_str()))
            })
            .filter_map(|(_, value)| value.parse::<f64>().ok())
            .sum()
    }
}

/// Status, time to the last byte, and the body.
async fn get(client: &HttpClient, url: &str) -> (u16, Duration, Bytes) {
    let started = Instant::now();
    let response = client
        .get(url.parse().unwrap_or_else(|e| panic!("{url}: {e}")))
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("body of {url}: {e}"))
        .to_bytes();
    (status, started.elapsed(), body)
}

/// The answer's `meta.cache` word (`hit`, `early`, `stale`, `miss`, `off`).
fn cache_word(url: &str, status: u16, body: &[u8]) -> String {
    assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(body));
    let value: serde_json::Value =
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("{url}: not JSON: {e}"));
    value["meta"]["cache"]
        .as_str()
        .unwrap_or_else(|| panic!("{url}: no meta.cache in {value}"))
        .to_string()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A table cell: `-` for a ratio with nothing to divide by.
fn cell(value: f64, digits: usize) -> String {
    if value.is_finite() {
        format!("{value:.digits$}")
    } else {
        "-".to_string()
    }
}

/// Per-round p50s and p99s of several variants, in ms.
struct Rounds<const N: usize> {
    p50: [Vec<f64>; N],
    p99: [Vec<f64>; N],
}

impl<const N: usize> Rounds<N> {
    fn new() -> Self {
        Rounds {
            p50: std::array::from_fn(|_| Vec::new()),
            p99: std::array::from_fn(|_| Vec::new()),
        }
    }

    fn push(&mut self, samples: [Vec<Duration>; N]) {
        for (i, s) in samples.into_iter().enumerate() {
            let (p50, p99) = percentiles(s);
            self.p50[i].push(ms(p50));
            self.p99[i].push(ms(p99));
        }
    }

    fn medians(&self, i: usize) -> (f64, f64) {
        (median(self.p50[i].clone()), median(self.p99[i].clone()))
    }
}

fn row(name: &str, (p50, p99): (f64, f64)) {
    println!("{name:<40} {p50:>9.3} {p99:>9.3}");
}

fn policy(fast: SocketAddr, slow_xfetch: SocketAddr, slow_plain: SocketAddr) -> String {
    let ttl = TTL.as_millis();
    format!(
        r#"client: bench
upstreams:
  fast: {{ url: "http://{fast}", timeout: 2s }}
  slow_xfetch: {{ url: "http://{slow_xfetch}", timeout: 2s }}
  slow_plain: {{ url: "http://{slow_plain}", timeout: 2s }}
routes:
  - name: cached
    method: GET
    path: /cached
    cache: {{ scope: shared, ttl: 1h }}
    fetch:
      doc: {{ upstream: fast, path: /doc, critical: true, fields: [id, title, "items[].title"] }}
  - name: uncached
    method: GET
    path: /uncached
    fetch:
      doc: {{ upstream: fast, path: /doc, critical: true, fields: [id, title, "items[].title"] }}
  - name: keyed
    method: GET
    path: /keyed/{{id}}
    cache: {{ scope: shared, ttl: 1h }}
    fetch:
      doc: {{ upstream: fast, path: "/doc/{{path.id}}", critical: true, fields: [id, title, "items[].title"] }}
  - name: xfetch
    method: GET
    path: /xfetch
    cache: {{ scope: shared, ttl: {ttl}ms, beta: 1.0 }}
    fetch:
      doc: {{ upstream: slow_xfetch, path: /doc, critical: true, fields: [id, title] }}
  - name: plain
    method: GET
    path: /plain
    cache: {{ scope: shared, ttl: {ttl}ms, beta: {TINY_BETA} }}
    fetch:
      doc: {{ upstream: slow_plain, path: /doc, critical: true, fields: [id, title] }}
"#
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --benches` runs this once as a smoke test; `cargo bench` passes `--bench`.
    let full = std::env::args().any(|a| a == "--bench");
    let plan = Plan::new(full);
    let started = Instant::now();

    let (fast, _) = mock(Duration::ZERO).await;
    let (slow_xfetch, xfetch_calls) = mock(SLOW).await;
    let (slow_plain, plain_calls) = mock(SLOW).await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let policy_file = dir.path().join("bench.yaml");
    std::fs::write(&policy_file, policy(fast, slow_xfetch, slow_plain))
        .unwrap_or_else(|e| panic!("write policy: {e}"));

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let bff = Sidecar::start(&client, &policy_file, None).await;

    hit_path(&client, &bff, &plan).await;
    let variants = [
        Variant {
            label: "beta 1.0 (XFetch)",
            route: "xfetch",
            calls: xfetch_calls,
        },
        Variant {
            label: "beta 1e-6 (none)",
            route: "plain",
            calls: plain_calls,
        },
    ];
    xfetch(&client, &bff, &plan, &variants).await;
    drop(bff);
    l2_hit_path(&client, &policy_file, dir.path(), &plan).await;
    println!(
        "\n(the whole run took {:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// Part 1: one client, sequential requests, the three variants interleaved (their order
/// rotating) so that whatever else the machine does falls on all of them alike.
async fn hit_path(client: &HttpClient, bff: &Sidecar, plan: &Plan) {
    let urls = [
        bff.url("/nothing-here"),
        bff.url("/cached"),
        bff.url("/uncached"),
    ];
    // Warm the connection pools, the cache entry and the allocator.
    for _ in 0..50.min(plan.hit_requests * 4) {
        for url in &urls {
            get(client, url).await;
        }
    }
    let mut rounds = Rounds::<3>::new();
    for _ in 0..plan.hit_rounds {
        let mut samples: [Vec<Duration>; 3] = std::array::from_fn(|_| Vec::new());
        for i in 0..plan.hit_requests {
            for k in 0..3 {
                let v = (i + k) % 3;
                let (status, took, body) = get(client, &urls[v]).await;
                match v {
                    0 => assert_eq!(status, 404, "an unmatched path"),
                    1 => assert_eq!(cache_word(&urls[v], status, &body), "hit"),
                    _ => assert_eq!(cache_word(&urls[v], status, &body), "off"),
                }
                samples[v].push(took);
            }
        }
        rounds.push(samples);
    }
    let (base, hit, off) = (rounds.medians(0), rounds.medians(1), rounds.medians(2));
    println!(
        "1. hit path: {} rounds x {} sequential requests per variant, interleaved; medians of the rounds",
        plan.hit_rounds, plan.hit_requests
    );
    println!("{:<40} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    row("404 bff answers itself (baseline)", base);
    row("cached route, L1 hit", hit);
    row("same route uncached (instant mock)", off);
    row("hit - baseline", (hit.0 - base.0, hit.1 - base.1));
    row("uncached - hit", (off.0 - hit.0, off.1 - hit.1));
    println!(
        "ratios (p50): hit / baseline {:.2}, uncached / hit {:.2}",
        hit.0 / base.0,
        off.0 / hit.0
    );
}

/// A route of the XFetch comparison and its upstream's call counter.
struct Variant {
    label: &'static str,
    route: &'static str,
    calls: Arc<AtomicU64>,
}

/// What one load window of one variant saw.
#[derive(Default)]
struct Window {
    seconds: f64,
    requests: u64,
    words: std::collections::BTreeMap<String, u64>,
    recomputes_miss: f64,
    recomputes_early: f64,
    recomputes_stale: f64,
    coalesced: f64,
    upstream_calls: u64,
    latencies: Vec<Duration>,
}

impl Window {
    fn word(&self, w: &str) -> u64 {
        self.words.get(w).copied().unwrap_or(0)
    }

    /// Per TTL period, so that "per expiry" reads the same whichever TTL the routes have.
    fn per_ttl(&self, n: f64) -> f64 {
        n / (self.seconds / TTL.as_secs_f64())
    }
}

async fn counters(client: &HttpClient, bff: &Sidecar, route: &str) -> [f64; 4] {
    let r = [("client", "bench"), ("route", route)];
    let recomputes = |trigger| {
        let labels = [r[0], r[1], ("trigger", trigger)];
        async move {
            bff.metric(client, "bff_cache_recomputes_total", &labels)
                .await
        }
    };
    [
        recomputes("miss").await,
        recomputes("early").await,
        recomputes("stale").await,
        bff.metric(client, "bff_cache_coalesced_total", &r).await,
    ]
}

/// `plan.clients` clients, each asking, pausing, asking again, for `plan.load_window`.
async fn load(client: &HttpClient, bff: &Sidecar, plan: &Plan, variant: &Variant) -> Window {
    let url = bff.url(&format!("/{}", variant.route));
    // A fresh entry to start from: the window measures expiries under load, not a cold key.
    let (status, _, body) = get(client, &url).await;
    cache_word(&url, status, &body);
    let before = counters(client, bff, variant.route).await;
    let calls_before = variant.calls.load(Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + plan.load_window;
    let mut tasks = Vec::new();
    for _ in 0..plan.clients {
        let (client, url, pause) = (client.clone(), url.clone(), plan.pause);
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while Instant::now() < deadline {
                let (status, took, body) = get(&client, &url).await;
                seen.push((cache_word(&url, status, &body), took));
                tokio::time::sleep(pause).await;
            }
            seen
        }));
    }
    let mut window = Window::default();
    for task in tasks {
        for (word, took) in task.await.unwrap_or_else(|e| panic!("a load client: {e}")) {
            *window.words.entry(word).or_default() += 1;
            window.latencies.push(took);
        }
    }
    window.seconds = started.elapsed().as_secs_f64();
    // A background refresh started in the window's last moments lands in its counts.
    tokio::time::sleep(SLOW * 3).await;
    let after = counters(client, bff, variant.route).await;
    window.requests = window.latencies.len() as u64;
    window.recomputes_miss = after[0] - before[0];
    window.recomputes_early = after[1] - before[1];
    window.recomputes_stale = after[2] - before[2];
    window.coalesced = after[3] - before[3];
    window.upstream_calls = variant.calls.load(Ordering::Relaxed) - calls_before;
    window
}

/// Part 2: the same load on a 1 s-TTL route whose upstream takes 50 ms, with and without
/// XFetch, alternating which goes first.
async fn xfetch(client: &HttpClient, bff: &Sidecar, plan: &Plan, variants: &[Variant; 2]) {
    let mut windows: [Vec<Window>; 2] = [Vec::new(), Vec::new()];
    for round in 0..plan.load_rounds {
        for k in 0..2 {
            let v = (round + k) % 2;
            windows[v].push(load(client, bff, plan, &variants[v]).await);
        }
    }
    println!(
        "\n2. XFetch: TTL {} ms, upstream {} ms, {} clients pausing {} ms, {} rounds x {:.0} s per variant, alternating; medians of the rounds",
        TTL.as_millis(),
        SLOW.as_millis(),
        plan.clients,
        plan.pause.as_millis(),
        plan.load_rounds,
        plan.load_window.as_secs_f64()
    );
    let med = |v: usize, f: &dyn Fn(&Window) -> f64| median(windows[v].iter().map(f).collect());
    println!(
        "{:<44} {:>18} {:>18}",
        "", variants[0].label, variants[1].label
    );
    let line = |name: &str, f: &dyn Fn(&Window) -> f64, digits: usize| {
        println!(
            "{name:<44} {:>18} {:>18}",
            cell(med(0, f), digits),
            cell(med(1, f), digits)
        );
    };
    // Over all rounds: a round may have no expiry at all.
    let per_expiry = |v: usize| {
        let waited: u64 = windows[v].iter().map(|w| w.word("miss")).sum();
        let expiries: f64 = windows[v].iter().map(|w| w.recomputes_miss).sum();
        waited as f64 / expiries
    };
    line("requests / s", &|w| w.requests as f64 / w.seconds, 0);
    line(
        "answers hit / early / stale: share %",
        &|w| 100.0 * (w.word("hit") + w.word("early") + w.word("stale")) as f64 / w.requests as f64,
        2,
    );
    line(
        "recomputes / TTL: early (background)",
        &|w| w.per_ttl(w.recomputes_early),
        2,
    );
    line(
        "recomputes / TTL: stale (background)",
        &|w| w.per_ttl(w.recomputes_stale),
        2,
    );
    line(
        "recomputes / TTL: miss (requests wait)",
        &|w| w.per_ttl(w.recomputes_miss),
        2,
    );
    line(
        "upstream calls / TTL (at the mock)",
        &|w| w.per_ttl(w.upstream_calls as f64),
        2,
    );
    line(
        "waited / TTL: `miss` answers",
        &|w| w.per_ttl(w.word("miss") as f64),
        2,
    );
    line(
        "waited / TTL: miss recomputes + coalesced",
        &|w| w.per_ttl(w.recomputes_miss + w.coalesced),
        2,
    );
    println!(
        "{:<44} {:>18} {:>18}",
        "waited per expiry (all rounds)",
        cell(per_expiry(0), 2),
        cell(per_expiry(1), 2)
    );
    line(
        "waited: share of requests %",
        &|w| 100.0 * w.word("miss") as f64 / w.requests as f64,
        3,
    );
    line(
        "latency p50 ms",
        &|w| ms(percentiles(w.latencies.clone()).0),
        3,
    );
    line(
        "latency p99 ms",
        &|w| ms(percentiles(w.latencies.clone()).1),
        3,
    );
    line(
        "latency max ms",
        &|w| ms(w.latencies.iter().max().copied().unwrap_or_default()),
        3,
    );
    let waited = |v: usize| med(v, &|w| w.per_ttl(w.word("miss") as f64));
    let calls = |v: usize| med(v, &|w| w.per_ttl(w.upstream_calls as f64));
    let p99 = |v: usize| med(v, &|w| ms(percentiles(w.latencies.clone()).1));
    let (with, without) = (waited(0), waited(1));
    let waited_ratio = if with > 0.0 {
        format!("{:.1}", without / with)
    } else {
        format!("inf (none waited with XFetch; {without:.1} per TTL without)")
    };
    println!(
        "ratios: requests that waited, without / with XFetch {waited_ratio}; p99 without / with {:.2}; upstream calls with / without {:.2}",
        p99(1) / p99(0),
        calls(0) / calls(1)
    );
    println!(
        "(both coalesce: without single-flight as well, each waiting request would be an upstream call, {} per expiry here without XFetch)",
        cell(per_expiry(1), 1)
    );
}

/// Part 3: two sidecars on one `redis-server`; B reads what A wrote. Per key: B's first read
/// (L1 empty, L2 hit), a 404 on B, B's second read (L1 hit).
async fn l2_hit_path(client: &HttpClient, policy: &Path, dir: &Path, plan: &Plan) {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!("\n3. L2 hit path: skipped, no `redis-server` on PATH");
        return;
    }
    let port = free_port();
    let _redis = Process(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start redis-server: {e}")),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "redis-server did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let redis = format!("redis://127.0.0.1:{port}");
    let a = Sidecar::start(client, policy, Some(&redis)).await;
    let b = Sidecar::start(client, policy, Some(&redis)).await;
    let l2_hits = || async {
        b.metric(
            client,
            "bff_cache_lookups_total",
            &[("route", "keyed"), ("layer", "l2"), ("result", "hit")],
        )
        .await
    };
    let base = b.url("/nothing-here");
    for _ in 0..50.min(plan.hit_requests * 4) {
        get(client, &base).await;
    }
    let mut rounds = Rounds::<3>::new();
    let (mut reads, mut not_from_l2) = (0u64, 0u64);
    for round in 0..plan.hit_rounds {
        // Written through A (misses there): entries B has never seen.
        let urls: Vec<(String, String)> = (0..plan.l2_keys)
            .map(|i| {
                let path = format!("/keyed/r{round}k{i}");
                (a.url(&path), b.url(&path))
            })
            .collect();
        for (at_a, _) in &urls {
            let (status, _, body) = get(client, at_a).await;
            cache_word(at_a, status, &body);
        }
        let hits_before = l2_hits().await;
        let mut samples: [Vec<Duration>; 3] = std::array::from_fn(|_| Vec::new());
        for (_, at_b) in &urls {
            let (status, took, body) = get(client, at_b).await;
            let first = cache_word(at_b, status, &body);
            let (status, base_took, _) = get(client, &base).await;
            assert_eq!(status, 404, "an unmatched path");
            let (status, l1_took, body) = get(client, at_b).await;
            assert_eq!(cache_word(at_b, status, &body), "hit");
            reads += 1;
            // A slow Redis (tight timeouts) makes B recompute: not an L2 hit, left out.
            if first == "hit" {
                samples[2].push(took);
            } else {
                not_from_l2 += 1;
            }
            samples[0].push(base_took);
            samples[1].push(l1_took);
        }
        let from_l2 = l2_hits().await - hits_before;
        assert!(!samples[2].is_empty(), "no first read on B came from L2");
        // B's L1 never held these keys: a first read's `hit` can only have come from L2.
        assert_eq!(from_l2 as usize, samples[2].len(), "L2 hits counted on B");
        rounds.push(samples);
    }
    let (base, l1, l2) = (rounds.medians(0), rounds.medians(1), rounds.medians(2));
    println!(
        "\n3. L2 hit path: two bff on one redis-server; {} rounds x {} keys written through A, each read twice on B (L2, then L1); medians of the rounds",
        plan.hit_rounds, plan.l2_keys
    );
    println!("{:<40} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    row("404 on B (baseline)", base);
    row("L1 hit on B", l1);
    row("L2 hit on B (first read)", l2);
    row("L2 hit - L1 hit", (l2.0 - l1.0, l2.1 - l1.1));
    println!(
        "ratios (p50): L2 hit / L1 hit {:.2}, L1 hit / baseline {:.2}; {not_from_l2} of {reads} first reads were not L2 hits (left out)",
        l2.0 / l1.0,
        l1.0 / base.0
    );
}
