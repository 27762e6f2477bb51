//! Load benchmark: the release `bff` binary under `wrk`, each scenario measured side by side
//! with a peer in the same run (alternating, several rounds, medians), all on loopback.
//!
//! The internal services and the peers are nginx (Debian's, with the echo module for injected
//! delays); the pass-through peer is also a bare Pingora proxy (`benches/peers/bare_pingora.rs`).
//! Scenarios:
//! 1. aggregated homescreen, cache off, against a direct call to one upstream; then the
//!    latency overhead over the slowest dependency with 20, 40 and 60 ms injected;
//! 2. the same route, cache hit, against nginx serving the same final JSON from a file;
//! 3. fall-through pass-through against nginx `proxy_pass` (upstream keep-alive) and bare
//!    Pingora, and with the app named `localhost` against the same app at 127.0.0.1;
//! 4. a `proxy` route with projection against the same document passed through unprojected.
//!
//! Plus bff's footprint: RSS idle, peak RSS under 1,000 connections, start to ready. Prints a
//! table and writes `target/bench/results.json` with every figure, the ratios and the issue's
//! targets. `make bench` builds what it needs and runs it; `cargo test --benches` runs it once,
//! briefly, as a smoke test (nothing is written then).
//!
//! Settings (environment): `BENCH_ROUNDS` (default 7), `BENCH_SECONDS` per wrk run (3),
//! `BENCH_CONNECTIONS` (32), `BENCH_BFF_THREADS` (1, as bff's default).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Map, Value};

mod support;
use support::{bff_run, free_port, Process};

const ECHO_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_echo_module.so";
const INSTALL_HINT: &str =
    "install them with `apt-get install nginx libnginx-mod-http-echo wrk valgrind` (`make bench` does)";
/// Delays injected for the overhead part of scenario 1; each route's three dependencies wait
/// a quarter, a half and all of it.
const DELAYS_MS: [u64; 3] = [20, 40, 60];
const SUB: &str = "usr_9821";

struct Settings {
    full: bool,
    rounds: usize,
    seconds: u64,
    connections: usize,
    bff_threads: usize,
}

impl Settings {
    fn from_env() -> Settings {
        // `cargo bench` passes `--bench`; `cargo test --benches` does not: then one short round.
        let full = std::env::args().any(|a| a == "--bench");
        let var = |name: &str, default: u64| -> u64 {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .unwrap_or_else(|e| panic!("{name}={v}: not a number: {e}")),
                Err(_) => default,
            }
        };
        Settings {
            full,
            rounds: if full {
                var("BENCH_ROUNDS", 7) as usize
            } else {
                1
            },
            seconds: if full { var("BENCH_SECONDS", 3) } else { 1 },
            connections: var("BENCH_CONNECTIONS", 32) as usize,
            bff_threads: var("BENCH_BFF_THREADS", 1) as usize,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Documents the mock services answer with

fn user_document() -> Value {
    let mut user = Map::new();
    user.insert("userId".into(), json!(SUB));
    user.insert("displayName".into(), json!("Ada Lovelace"));
    user.insert(
        "avatarUrl".into(),
        json!("https://cdn.example.com/a/9821.png"),
    );
    user.insert("loyaltyTier".into(), json!("gold"));
    for i in 0..36 {
        user.insert(format!("internal{i}"), json!(format!("value number {i}")));
    }
    Value::Object(user)
}

fn order(i: usize) -> Value {
    json!({"orderId": format!("o-{i}"), "status": "shipped", "estimatedDelivery": "2026-12-01",
           "itemCount": 2, "warehouseId": "w-7", "internal": {"cost": 12.5, "margin": 0.3},
           "customerEmail": "ada@example.com",
           "items": [{"title": "Lamp", "sku": "L-1", "cost": 4.2}, {"title": "Desk", "sku": "D-9", "cost": 80.1}]})
}

fn orders_document() -> Value {
    json!({"orders": (0..10).map(order).collect::<Vec<_>>(), "total": 10})
}

fn reco_document() -> Value {
    let item = |i: usize| {
        json!({"productId": format!("p-{i}"), "thumbnailUrl": format!("https://cdn.example.com/p/{i}.jpg"),
               "title": format!("Product {i}"), "priceFormatted": "€19.99", "score": 0.93, "model": "als-v7"})
    };
    json!({"items": (0..20).map(item).collect::<Vec<_>>(), "experiment": "B"})
}

// ---------------------------------------------------------------------------------------------
// Processes

fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "`{tool}` is missing: {INSTALL_HINT}");
}

/// An nginx with its own prefix directory and config, stopped when dropped.
struct Nginx {
    _process: Process,
}

impl Nginx {
    fn start(dir: &Path, name: &str, servers: &str) -> Nginx {
        let prefix = dir.join(name);
        std::fs::create_dir_all(prefix.join("logs"))
            .unwrap_or_else(|e| panic!("nginx prefix {}: {e}", prefix.display()));
        let conf = format!(
            "load_module {ECHO_MODULE};\n\
             worker_processes 1;\ndaemon off;\nmaster_process off;\n\
             pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  default_type application/json;\n  keepalive_requests 1000000;\n\
             {servers}}}\n",
            prefix = prefix.display()
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap_or_else(|e| panic!("write nginx.conf: {e}"));
        let process = Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-e")
            .arg(prefix.join("logs/error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start nginx: {e}; {INSTALL_HINT}"));
        Nginx {
            _process: Process(process),
        }
    }
}

/// A free port no other part of this run was given: the bench hands out dozens before anything
/// binds them, and the kernel may offer a released port again.
fn new_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = free_port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until something accepts connections on `port`.
fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One HTTP/1.1 GET on a fresh connection: the status and body. Enough for the checks made
/// before each scenario; the load itself is wrk's.
fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("not an http URL: {url}"));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream =
        TcpStream::connect(authority).unwrap_or_else(|e| panic!("connect {authority}: {e}"));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (name, value) in headers {
        let _ = write!(request, "{name}: {value}\r\n");
    }
    request.push_str("\r\n");
    std::io::Write::write_all(&mut stream, request.as_bytes())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {url}: no complete response head"));
    let head = String::from_utf8_lossy(&response[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {url}: bad status line in {head:?}"));
    let mut body = response[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&raw[start..(start + size).min(raw.len())]);
        raw = &raw[(start + size + 2).min(raw.len())..];
    }
    out
}

fn json_of(url: &str, body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "{url}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )
    })
}

/// Resident set sizes of a process, from `/proc`: (current, peak since the last reset).
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Starts the peak (`VmHWM`) over again at the current RSS (`5` to `clear_refs`, Linux ≥ 4.0).
fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .unwrap_or_else(|e| panic!("reset peak RSS of {pid}: {e}"));
}

// ---------------------------------------------------------------------------------------------
// wrk

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

struct Load<'a> {
    url: String,
    token: Option<&'a str>,
    connections: usize,
    threads: usize,
    seconds: u64,
}

fn wrk(load: &Load<'_>) -> Sample {
    let mut command = Command::new("wrk");
    command
        .arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.seconds))
        .arg("--latency")
        .arg("--timeout")
        .arg("5s");
    if let Some(token) = load.token {
        command
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"));
    }
    let output = command
        .arg(&load.url)
        .output()
        .unwrap_or_else(|e| panic!("run wrk: {e}; {INSTALL_HINT}"));
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "wrk {} failed: {text}{}",
        load.url,
        String::from_utf8_lossy(&output.stderr)
    );
    // Every answer must be a success: a fast error page is not a result.
    assert!(
        !text.contains("Non-2xx"),
        "wrk {}: some answers were not 2xx:\n{text}",
        load.url
    );
    if let Some(errors) = text.lines().find(|l| l.contains("Socket errors")) {
        panic!("wrk {}: {errors}\n{text}", load.url);
    }
    let percentile = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .and_then(|v| duration_ms(v.trim()))
            .unwrap_or_else(|| panic!("wrk {}: no {p} latency in:\n{text}", load.url))
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk {}: no Requests/sec in:\n{text}", load.url));
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("wrk {}: no request count in:\n{text}", load.url));
    Sample {
        requests,
        rps,
        p50_ms: percentile("50%"),
        p99_ms: percentile("99%"),
    }
}

/// wrk's `265.00us`, `1.20ms`, `2.01s` in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(number / 1000.0),
        "ms" => Some(number),
        "s" => Some(number * 1000.0),
        "m" => Some(number * 60_000.0),
        _ => None,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

struct Subject<'a> {
    name: String,
    load: Load<'a>,
    /// The bff process whose peak RSS this subject reports, when it is bff.
    bff_pid: Option<u32>,
}

impl<'a> Subject<'a> {
    /// bff under `load`: its peak RSS is reported.
    fn bff(name: impl Into<String>, load: Load<'a>, pid: u32) -> Subject<'a> {
        Subject {
            name: name.into(),
            load,
            bff_pid: Some(pid),
        }
    }

    /// A peer (nginx, bare Pingora, an upstream called directly).
    fn peer(name: impl Into<String>, load: Load<'a>) -> Subject<'a> {
        Subject {
            name: name.into(),
            load,
            bff_pid: None,
        }
    }
}

struct Measured {
    name: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_mib: Option<f64>,
}

impl Measured {
    fn to_json(&self) -> Value {
        json!({"name": self.name, "rps": round(self.rps, 1), "p50_ms": round(self.p50_ms, 3),
               "p99_ms": round(self.p99_ms, 3), "bff_peak_rss_mib": self.peak_rss_mib.map(|v| round(v, 1))})
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// Runs every subject once per round, the order rotating each round so none is always first;
/// medians per subject. A bff subject's peak RSS is over all its runs.
fn compare(settings: &Settings, subjects: &[Subject<'_>]) -> Vec<Measured> {
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); subjects.len()];
    let mut peaks = vec![0f64; subjects.len()];
    for round in 0..settings.rounds {
        for offset in 0..subjects.len() {
            let index = (round + offset) % subjects.len();
            let subject = &subjects[index];
            if let Some(pid) = subject.bff_pid {
                reset_peak_rss(pid);
            }
            samples[index].push(wrk(&subject.load));
            if let Some(pid) = subject.bff_pid {
                peaks[index] = peaks[index].max(rss_mib(pid).1);
            }
        }
    }
    subjects
        .iter()
        .zip(samples)
        .zip(peaks)
        .map(|((subject, runs), peak)| Measured {
            name: subject.name.clone(),
            rps: median(runs.iter().map(|s| s.rps).collect()),
            p50_ms: median(runs.iter().map(|s| s.p50_ms).collect()),
            p99_ms: median(runs.iter().map(|s| s.p99_ms).collect()),
            peak_rss_mib: subject.bff_pid.map(|_| peak),
        })
        .collect()
}

struct Report {
    table: String,
    scenarios: Vec<Value>,
    targets: Vec<Value>,
}

impl Report {
    fn scenario(&mut self, title: &str, measured: &[Measured], ratios: &[(&str, f64)]) {
        let _ = writeln!(self.table, "\n{title}");
        let _ = writeln!(
            self.table,
            "  {:<40} {:>10} {:>9} {:>9} {:>13}",
            "", "req/s", "p50 ms", "p99 ms", "bff peak MiB"
        );
        for m in measured {
            let rss = m.peak_rss_mib.map_or(String::new(), |v| format!("{v:.1}"));
            let _ = writeln!(
                self.table,
                "  {:<40} {:>10.0} {:>9.3} {:>9.3} {:>13}",
                m.name, m.rps, m.p50_ms, m.p99_ms, rss
            );
        }
        for (name, value) in ratios {
            let _ = writeln!(self.table, "  {name:<40} {value:>10.3}");
        }
        self.scenarios.push(json!({
            "title": title,
            "subjects": measured.iter().map(Measured::to_json).collect::<Vec<_>>(),
            "ratios": ratios.iter().map(|(n, v)| (n.to_string(), json!(round(*v, 3)))).collect::<Map<_, _>>(),
        }));
    }

    /// A target from the issue: `at_least` true means `value >= bound`, else `value <= bound`.
    fn target(&mut self, name: &str, value: f64, at_least: bool, bound: f64, unit: &str) {
        let met = if at_least {
            value >= bound
        } else {
            value <= bound
        };
        self.targets.push(json!({
            "name": name, "value": round(value, 3), "bound": bound,
            "comparison": if at_least { ">=" } else { "<=" }, "unit": unit, "met": met,
        }));
    }
}

fn main() {
    let settings = Settings::from_env();
    for tool in ["nginx", "wrk", "valgrind", "callgrind_control"] {
        require(tool);
    }
    assert!(
        Path::new(ECHO_MODULE).exists(),
        "nginx's echo module ({ECHO_MODULE}) is missing: {INSTALL_HINT}"
    );
    let bare_pingora = bare_pingora_binary();

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    // nginx's workers run as `nobody` when the master is root: they must read the documents.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
    }
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap_or_else(|e| panic!("docs dir: {e}"));
    let write_doc = |name: &str, doc: &Value| {
        std::fs::write(docs.join(name), doc.to_string())
            .unwrap_or_else(|e| panic!("write {name}: {e}"))
    };
    write_doc("user.json", &user_document());
    write_doc("orders.json", &orders_document());
    write_doc("reco.json", &reco_document());
    write_doc("order.json", &order(1001));

    // The internal services: each (document, delay) on a port of its own.
    let mut services = String::new();
    let mut service_port = BTreeMap::new();
    let mut delays = vec![0u64];
    for d in DELAYS_MS {
        delays.extend([d / 4, d / 2, d]);
    }
    delays.sort_unstable();
    delays.dedup();
    for doc in ["user", "orders", "reco", "order"] {
        // The app (fall-through and proxy route) is only needed without delay.
        let doc_delays = if doc == "order" {
            &delays[..1]
        } else {
            &delays[..]
        };
        for &delay in doc_delays {
            let port = new_port();
            service_port.insert((doc, delay), port);
            let location = if delay == 0 {
                format!("location / {{ try_files /{doc}.json =404; }}")
            } else {
                format!(
                    "location / {{ echo_sleep {}; echo_exec /_doc; }}\n    \
                     location = /_doc {{ internal; try_files /{doc}.json =404; }}",
                    delay as f64 / 1000.0
                )
            };
            let _ = writeln!(
                services,
                "  server {{\n    listen 127.0.0.1:{port};\n    root {};\n    {location}\n  }}",
                docs.display()
            );
        }
    }
    let _upstreams = Nginx::start(dir.path(), "services", &services);
    let port = |doc: &str, delay: u64| service_port[&(doc, delay)];
    let app_port = port("order", 0);

    // The sidecar: one process, one policy with a route per scenario.
    let jwks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt/jwks.json");
    let policy_path = dir.path().join("bench.yaml");
    std::fs::write(&policy_path, policy(&jwks, &port, "127.0.0.1", app_port))
        .unwrap_or_else(|e| panic!("write policy: {e}"));
    // Leaked: every wrk run of the whole bench borrows it.
    let token: &'static str = Box::leak(token().into_boxed_str());
    let (listen, admin) = (new_port(), new_port());
    let bff = start_bff(&policy_path, listen, admin, settings.bff_threads);
    let bff_pid = bff.0.id();
    let idle = rss_mib(bff_pid).0;

    // The peers: nginx serving the final homescreen JSON, and proxying to the app.
    let hit_url = format!("http://127.0.0.1:{listen}/home-cached");
    let auth = format!("Bearer {token}");
    let auth_header = [("Authorization", auth.as_str())];
    let (status, _) = get(&hit_url, &auth_header);
    assert_eq!(
        status, 200,
        "{hit_url}: the first (miss) request must succeed"
    );
    let (status, final_body) = get(&hit_url, &auth_header);
    assert_eq!(status, 200, "{hit_url}");
    let final_doc = json_of(&hit_url, &final_body);
    assert_eq!(
        final_doc["meta"]["cache"], "hit",
        "{hit_url}: the second request must be a cache hit"
    );
    assert!(
        !final_body.windows(8).any(|w| w == b"internal"),
        "{hit_url}: a field outside the whitelist left the sidecar"
    );
    std::fs::write(docs.join("final.json"), &final_body)
        .unwrap_or_else(|e| panic!("write final.json: {e}"));
    let (static_port, proxy_pass_port, bare_port) = (new_port(), new_port(), new_port());
    let peers = format!(
        "  upstream app {{ server 127.0.0.1:{app_port}; keepalive 64; }}\n\
         \x20 server {{ listen 127.0.0.1:{static_port}; root {docs}; location / {{ try_files /final.json =404; }} }}\n\
         \x20 server {{ listen 127.0.0.1:{proxy_pass_port};\n    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n",
        docs = docs.display()
    );
    let _peers = Nginx::start(dir.path(), "peers", &peers);
    let _bare = start_bare_pingora(&bare_pingora, bare_port, app_port, settings.bff_threads);
    for (port, what) in [
        (static_port, "nginx static"),
        (proxy_pass_port, "nginx proxy_pass"),
        (bare_port, "bare Pingora"),
    ] {
        wait_for_port(port, what);
    }

    let mut report = Report {
        table: String::new(),
        scenarios: Vec::new(),
        targets: Vec::new(),
    };
    let load = |url: String, token: Option<&'static str>| Load {
        url,
        token,
        connections: settings.connections,
        threads: 1,
        seconds: settings.seconds,
    };
    let bff_url = |path: &str| format!("http://127.0.0.1:{listen}{path}");
    let check = |url: &str, token: Option<&str>| -> Value {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let (status, body) = get(url, &headers);
        assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&body));
        json_of(url, &body)
    };

    // 1. Aggregated, cache off.
    let home = bff_url("/home");
    let answer = check(&home, Some(token));
    assert_eq!(answer["meta"]["degraded"], false, "{home}: {answer}");
    assert_eq!(answer["meta"]["cache"], "off", "{home}: {answer}");
    let direct = format!("http://127.0.0.1:{}/users/{SUB}", port("user", 0));
    check(&direct, None);
    let measured = compare(
        &settings,
        &[
            Subject::bff(
                "bff homescreen (3 fetches), cache off",
                load(home, Some(token)),
                bff_pid,
            ),
            Subject::peer("direct to the user service", load(direct, None)),
        ],
    );
    let ratio = measured[0].rps / measured[1].rps;
    report.scenario(
        "1. aggregated homescreen, cache off, against one upstream called directly",
        &measured,
        &[("req/s bff / direct", ratio)],
    );

    for d in DELAYS_MS {
        let url = bff_url(&format!("/home-d{d}"));
        let answer = check(&url, Some(token));
        assert_eq!(answer["meta"]["degraded"], false, "{url}: {answer}");
        let slowest = format!("http://127.0.0.1:{}/users/{SUB}", port("reco", d));
        check(&slowest, None);
        // What any Pingora hop costs in latency here: the floor under bff's overhead.
        let hop_port = new_port();
        let _hop = start_bare_pingora(
            &bare_pingora,
            hop_port,
            port("reco", d),
            settings.bff_threads,
        );
        wait_for_port(hop_port, "bare Pingora");
        let hop = format!("http://127.0.0.1:{hop_port}/users/{SUB}");
        check(&hop, None);
        let measured = compare(
            &settings,
            &[
                Subject::bff(
                    format!("bff homescreen, deps {}/{}/{d} ms", d / 4, d / 2),
                    load(url, Some(token)),
                    bff_pid,
                ),
                Subject::peer(
                    format!("direct to the slowest ({d} ms)"),
                    load(slowest, None),
                ),
                Subject::peer("bare Pingora in front of the slowest", load(hop, None)),
            ],
        );
        let (p50, p99) = (
            measured[0].p50_ms - measured[1].p50_ms,
            measured[0].p99_ms - measured[1].p99_ms,
        );
        report.scenario(
            &format!("1.{d}. latency overhead over the slowest dependency ({d} ms)"),
            &measured,
            &[
                ("overhead p50 ms", p50),
                ("overhead p99 ms", p99),
                (
                    "bare Pingora hop p50 ms",
                    measured[2].p50_ms - measured[1].p50_ms,
                ),
                (
                    "bare Pingora hop p99 ms",
                    measured[2].p99_ms - measured[1].p99_ms,
                ),
            ],
        );
        report.target(&format!("overhead p50 at {d} ms"), p50, false, 1.0, "ms");
        report.target(&format!("overhead p99 at {d} ms"), p99, false, 3.0, "ms");
    }

    // 2. Cache hit against nginx serving the same bytes.
    let static_url = format!("http://127.0.0.1:{static_port}/home");
    let served = check(&static_url, None);
    assert_eq!(
        served["user"], final_doc["user"],
        "nginx must serve bff's answer"
    );
    let measured = compare(
        &settings,
        &[
            Subject::bff(
                "bff homescreen, cache hit",
                load(hit_url.clone(), Some(token)),
                bff_pid,
            ),
            Subject::peer("nginx static, the same JSON", load(static_url, None)),
        ],
    );
    let ratio = measured[0].rps / measured[1].rps;
    report.scenario(
        "2. aggregated homescreen, cache hit, against nginx serving the same JSON",
        &measured,
        &[("req/s bff / nginx static", ratio)],
    );
    report.target("cache hit req/s / nginx static", ratio, true, 0.6, "x");

    // 3. Fall-through pass-through.
    let through = bff_url("/app/orders/o-1001");
    let passed = check(&through, None);
    assert_eq!(
        passed,
        order(1001),
        "{through}: the app's answer, unchanged"
    );
    let nginx_pp = format!("http://127.0.0.1:{proxy_pass_port}/app/orders/o-1001");
    let bare = format!("http://127.0.0.1:{bare_port}/app/orders/o-1001");
    for url in [&nginx_pp, &bare] {
        assert_eq!(check(url, None), passed, "{url}");
    }
    // The same policy with the app named `localhost`, as a pod names the container beside it:
    // a host name must not cost a DNS lookup per request.
    let named_policy = dir.path().join("bench-named-app.yaml");
    std::fs::write(&named_policy, policy(&jwks, &port, "localhost", app_port))
        .unwrap_or_else(|e| panic!("write policy: {e}"));
    let (named_listen, named_admin) = (new_port(), new_port());
    let named_bff = start_bff(
        &named_policy,
        named_listen,
        named_admin,
        settings.bff_threads,
    );
    let named = format!("http://127.0.0.1:{named_listen}/app/orders/o-1001");
    assert_eq!(check(&named, None), passed, "{named}");
    let measured = compare(
        &settings,
        &[
            Subject::bff("bff fall-through", load(through.clone(), None), bff_pid),
            Subject::peer("bare Pingora proxy", load(bare, None)),
            Subject::peer("nginx proxy_pass (keep-alive)", load(nginx_pp, None)),
            Subject::bff(
                "bff fall-through, app at localhost",
                load(named, None),
                named_bff.0.id(),
            ),
        ],
    );
    drop(named_bff);
    let (vs_bare, vs_nginx) = (
        measured[0].rps / measured[1].rps,
        measured[0].rps / measured[2].rps,
    );
    report.scenario(
        "3. fall-through pass-through",
        &measured,
        &[
            ("req/s bff / bare Pingora", vs_bare),
            ("req/s bff / nginx proxy_pass", vs_nginx),
            (
                "req/s app at localhost / at 127.0.0.1",
                measured[3].rps / measured[0].rps,
            ),
        ],
    );
    report.target(
        "pass-through req/s / bare Pingora",
        vs_bare,
        true,
        0.95,
        "x",
    );
    report.target(
        "pass-through req/s / nginx proxy_pass",
        vs_nginx,
        true,
        0.8,
        "x",
    );

    // The same fall-through counted in instructions, which this noisy machine cannot blur.
    let app_path = "/app/orders/o-1001";
    let threads = settings.bff_threads;
    let (listen, admin) = (new_port(), new_port());
    let out = dir.path().join("callgrind.bff");
    let counted_bff = under_callgrind(&bff_command(&policy_path, listen, admin, threads), &out);
    wait_ready(admin, Duration::from_millis(20));
    let url = format!("http://127.0.0.1:{listen}{app_path}");
    let bff_instructions = instructions_per_request(&counted_bff, &out, &url, settings.seconds);
    drop(counted_bff);
    let port = new_port();
    let out = dir.path().join("callgrind.bare");
    let counted_bare = under_callgrind(
        &bare_pingora_command(&bare_pingora, port, app_port, threads),
        &out,
    );
    wait_for_port(port, "bare Pingora under callgrind");
    let url = format!("http://127.0.0.1:{port}{app_path}");
    let bare_instructions = instructions_per_request(&counted_bare, &out, &url, settings.seconds);
    drop(counted_bare);
    let instructions_ratio = bff_instructions / bare_instructions;
    let _ = writeln!(
        report.table,
        "\ninstructions per fall-through request (callgrind, wrk -c8)\n  \
         bff                                      {:>10.0}\n  \
         bare Pingora proxy                       {:>10.0}\n  \
         instructions bff / bare Pingora          {instructions_ratio:>10.3}",
        bff_instructions, bare_instructions
    );

    // 4. A proxy route with projection against the same document unprojected.
    let projected_url = bff_url("/orders/o-1001");
    let projected = check(&projected_url, None);
    assert_eq!(
        projected,
        json!({"orderId": "o-1001", "status": "shipped", "estimatedDelivery": "2026-12-01",
               "items": [{"title": "Lamp"}, {"title": "Desk"}]}),
        "{projected_url}: projected through the whitelist"
    );
    let measured = compare(
        &settings,
        &[
            Subject::bff(
                "bff proxy route, projected",
                load(projected_url, None),
                bff_pid,
            ),
            Subject::bff(
                "bff fall-through, same document",
                load(through, None),
                bff_pid,
            ),
        ],
    );
    let ratio = measured[0].rps / measured[1].rps;
    report.scenario(
        "4. proxy route with projection against the same pass-through without",
        &measured,
        &[("req/s projected / pass-through", ratio)],
    );

    // Footprint: idle, 1,000 connections on the hit path, start to ready.
    reset_peak_rss(bff_pid);
    let thousand = wrk(&Load {
        url: hit_url,
        token: Some(token),
        connections: 1000,
        threads: 2,
        seconds: settings.seconds,
    });
    let peak_1000 = rss_mib(bff_pid).1;
    drop(bff);
    let starts: Vec<f64> = (0..if settings.full { 7 } else { 1 })
        .map(|_| start_to_ready_ms(&policy_path, settings.bff_threads))
        .collect();
    let start = median(starts);
    let _ = writeln!(
        report.table,
        "\nfootprint of bff\n  RSS idle after start                     {idle:>10.1} MiB\n  \
         peak RSS, 1,000 connections (cache hit)  {peak_1000:>10.1} MiB   ({:.0} req/s, p99 {:.2} ms)\n  \
         start to ready (file key set, median)    {start:>10.1} ms",
        thousand.rps, thousand.p99_ms
    );
    report.target("RSS idle", idle, false, 20.0, "MiB");
    report.target(
        "peak RSS under 1,000 connections",
        peak_1000,
        false,
        64.0,
        "MiB",
    );
    report.target("start to ready", start, false, 100.0, "ms");

    // Projection's target is criterion's (`benches/micro.rs`): read back from its last run.
    let mut micro = Map::new();
    for (group, document) in [
        ("user_40_fields_keep_4", "40-field user"),
        ("orders_1MiB", "1 MiB of orders"),
    ] {
        let medians = (
            criterion_median_ns(group, "projection"),
            criterion_median_ns(group, "value_round_trip"),
        );
        let (Some(projection), Some(round_trip)) = medians else {
            let _ = writeln!(
                report.table,
                "\nprojection ({document}): no criterion result; run `cargo bench --bench micro` first (make bench does)"
            );
            continue;
        };
        let ratio = round_trip / projection;
        let _ = writeln!(
            report.table,
            "\nprojection ({document}, criterion medians): {:.1} µs against a Value round trip's {:.1} µs, {ratio:.2}x",
            projection / 1000.0,
            round_trip / 1000.0
        );
        micro.insert(
            group.into(),
            json!({"projection_ns": round(projection, 1), "value_round_trip_ns": round(round_trip, 1), "ratio": round(ratio, 2)}),
        );
        report.target(
            &format!("projection, {document}: Value trip / projection"),
            ratio,
            true,
            3.0,
            "x",
        );
    }

    let mut table = format!(
        "load benchmark: {} rounds x {} s per subject, {} connections (wrk -t1), bff --threads {}; \
         medians of the rounds\n",
        settings.rounds, settings.seconds, settings.connections, settings.bff_threads
    );
    table.push_str(&report.table);
    if !settings.full {
        // A debug build for a second: the run checks the harness, its figures mean nothing.
        table.push_str("\n(smoke run under cargo test: targets are judged by `make bench` only)\n");
        report.targets.clear();
    } else {
        table.push_str("\ntargets\n");
    }
    for t in &report.targets {
        let _ = writeln!(
            table,
            "  {:<42} {:>9} {} {:<6} {}",
            t["name"].as_str().unwrap_or(""),
            t["value"],
            t["comparison"].as_str().unwrap_or(""),
            format!("{}{}", t["bound"], t["unit"].as_str().unwrap_or("")),
            if t["met"] == true { "met" } else { "MISSED" }
        );
    }
    println!("{table}");
    if settings.full {
        let results = json!({
            "generated_at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            "settings": {"rounds": settings.rounds, "seconds": settings.seconds,
                         "connections": settings.connections, "bff_threads": settings.bff_threads,
                         "cores": std::thread::available_parallelism().map_or(0, |n| n.get())},
            "scenarios": report.scenarios,
            "projection": micro,
            "fallthrough_instructions_per_request": {"bff": round(bff_instructions, 0),
                "bare_pingora": round(bare_instructions, 0), "ratio": round(instructions_ratio, 3)},
            "footprint": {"rss_idle_mib": round(idle, 1), "peak_rss_1000_connections_mib": round(peak_1000, 1),
                          "start_to_ready_ms": round(start, 1)},
            "targets": report.targets,
        });
        let out = results_dir();
        std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        let path = out.join("results.json");
        let text = serde_json::to_string_pretty(&results).unwrap_or_default();
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        println!("written: {}", path.display());
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn results_dir() -> PathBuf {
    target_dir().join("bench")
}

/// The median time in nanoseconds criterion recorded for `group/function`, if it ran.
fn criterion_median_ns(group: &str, function: &str) -> Option<f64> {
    let path = target_dir()
        .join("criterion")
        .join(group)
        .join(function)
        .join("new/estimates.json");
    let estimates: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

/// `benches/peers/bare_pingora.rs`, built as an example of the same profile: beside this bench's
/// own directory (`target/<profile>/deps/load-…` → `target/<profile>/examples/`).
fn bare_pingora_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("own path: {e}"));
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("examples/bare_pingora"))
        .unwrap_or_else(|| panic!("no profile directory above {}", exe.display()));
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --profile bench --example bare_pingora` \
         (`make bench` does)",
        path.display()
    );
    path
}

/// The bare Pingora proxy on `port`, forwarding to `upstream`, with as many worker threads as
/// bff is given.
fn bare_pingora_command(binary: &Path, port: u16, upstream: u16, threads: usize) -> Command {
    let mut command = Command::new(binary);
    command
        .arg(format!("127.0.0.1:{port}"))
        .arg(format!("127.0.0.1:{upstream}"))
        .arg(threads.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

fn start_bare_pingora(binary: &Path, port: u16, upstream: u16, threads: usize) -> Process {
    Process(
        bare_pingora_command(binary, port, upstream, threads)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display())),
    )
}

/// `proxy` started under valgrind's callgrind, its counts written to `out` and `out.N`.
fn under_callgrind(proxy: &Command, out: &Path) -> Process {
    let mut command = Command::new("valgrind");
    command
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(proxy.get_program())
        .args(proxy.get_args())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (key, value) in proxy.get_envs() {
        if let Some(value) = value {
            command.env(key, value);
        }
    }
    Process(
        command
            .spawn()
            .unwrap_or_else(|e| panic!("start valgrind: {e}; {INSTALL_HINT}")),
    )
}

/// Instructions one request to `url` costs a proxy started by `under_callgrind`: unlike req/s,
/// the count repeats whatever else the machine is doing, so a few percent of difference shows.
/// The counters are zeroed after a warm-up and dumped after `wrk`: starting up is not counted.
fn instructions_per_request(proxy: &Process, out: &Path, url: &str, seconds: u64) -> f64 {
    let load = |seconds| Load {
        url: url.to_string(),
        token: None,
        connections: 8,
        threads: 1,
        seconds,
    };
    wrk(&load(1));
    let control = |command: &str| {
        let output = Command::new("callgrind_control")
            .args([command, &proxy.0.id().to_string()])
            .output()
            .unwrap_or_else(|e| panic!("run callgrind_control: {e}; {INSTALL_HINT}"));
        assert!(
            output.status.success(),
            "callgrind_control {command} ({url}) failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    control("--zero");
    let measured = wrk(&load(seconds));
    control("--dump");
    // The first dump after the start is `<out>.1`; its `summary:` line totals the events.
    let dump = PathBuf::from(format!("{}.1", out.display()));
    let deadline = Instant::now() + Duration::from_secs(20);
    let instructions = loop {
        let summary = std::fs::read_to_string(&dump).ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("summary:"))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if let Some(total) = summary {
            break total;
        }
        assert!(
            Instant::now() < deadline,
            "no callgrind dump {}",
            dump.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(measured.requests > 0, "{url}: no request under callgrind");
    instructions / measured.requests as f64
}

/// The bench policy: one route per scenario, each fetch on the port of its (document, delay),
/// the app (fall-through and proxy route) at `app_host:app_port`.
fn policy(jwks: &Path, port: &dyn Fn(&str, u64) -> u16, app_host: &str, app_port: u16) -> String {
    let mut yaml = format!(
        "client: bench\n\
         auth:\n  jwt: {{ issuer: bench-issuer, audience: bench, algorithms: [ES256], jwks_file: \"{}\" }}\n\
         upstreams:\n  app: {{ url: \"http://{app_host}:{app_port}\", timeout: 1s }}\n",
        jwks.display()
    );
    let mut routes = String::from("routes:\n");
    let homescreen = |name: &str, path: &str, delays: [u64; 3], cache: &str| {
        let [user, orders, reco] = delays;
        format!(
            "  - name: {name}\n    method: GET\n    path: {path}\n    deadline: 2s\n{cache}\
             \x20   fetch:\n\
             \x20     user: {{ upstream: user_{user}, path: \"/users/{{jwt.sub}}\", critical: true, fields: [userId, displayName, avatarUrl, loyaltyTier] }}\n\
             \x20     recentOrders: {{ upstream: orders_{orders}, path: \"/users/{{jwt.sub}}/orders?limit=3\", select: orders, fields: [orderId, status, estimatedDelivery, itemCount], fallback: [] }}\n\
             \x20     recommendations: {{ upstream: reco_{reco}, path: \"/users/{{jwt.sub}}/recommendations?limit=6\", select: items, fields: [productId, thumbnailUrl, title, priceFormatted], fallback: [] }}\n"
        )
    };
    let mut delay_sets = vec![("home".to_string(), "/home".to_string(), [0, 0, 0], "")];
    delay_sets.push((
        "home-cached".into(),
        "/home-cached".into(),
        [0, 0, 0],
        "    cache: { scope: user, ttl: 10m }\n",
    ));
    for d in DELAYS_MS {
        delay_sets.push((
            format!("home-d{d}"),
            format!("/home-d{d}"),
            [d / 4, d / 2, d],
            "",
        ));
    }
    let mut declared = std::collections::BTreeSet::new();
    for (name, path, delays, cache) in &delay_sets {
        routes.push_str(&homescreen(name, path, *delays, cache));
        for (service, delay) in ["user", "orders", "reco"].into_iter().zip(delays) {
            if declared.insert((service, *delay)) {
                let _ = writeln!(
                    yaml,
                    "  {service}_{delay}: {{ url: \"http://127.0.0.1:{}\", timeout: 1s }}",
                    port(service, *delay)
                );
            }
        }
    }
    routes.push_str(
        "  - name: order-detail\n    method: GET\n    path: /orders/{id}\n    auth: none\n    proxy:\n\
         \x20     upstream: app\n      path: /orders/{path.id}\n\
         \x20     fields: [orderId, status, estimatedDelivery, \"items[].title\"]\n",
    );
    yaml.push_str(&routes);
    yaml.push_str("fallthrough: app\n");
    yaml
}

/// An ES256 token for `SUB`, signed with the fixture key `ec-1` published in the bench's JWKS.
fn token() -> String {
    let pem = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt/ec_private.pem"),
    )
    .unwrap_or_else(|e| panic!("fixture key: {e}"));
    let key =
        jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap_or_else(|e| panic!("fixture key: {e}"));
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("ec-1".into());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims =
        json!({"sub": SUB, "iss": "bench-issuer", "aud": "bench", "iat": now, "exp": now + 3600});
    jsonwebtoken::encode(&header, &claims, &key).unwrap_or_else(|e| panic!("sign: {e}"))
}

fn bff_command(policy: &Path, listen: u16, admin: u16, threads: usize) -> Command {
    // The access log is off, as nginx's is: both would cost the same formatting and I/O.
    let mut command = bff_run(policy, listen, admin, "warn");
    command.args(["--threads", &threads.to_string()]);
    command
}

fn start_bff(policy: &Path, listen: u16, admin: u16, threads: usize) -> Process {
    let process = Process(
        bff_command(policy, listen, admin, threads)
            .spawn()
            .unwrap_or_else(|e| panic!("start bff: {e}")),
    );
    wait_ready(admin, Duration::from_millis(5));
    process
}

/// Polls `/readyz` until it answers 200.
fn wait_ready(admin: u16, every: Duration) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(("127.0.0.1", admin)).is_ok()
            && get(&format!("http://127.0.0.1:{admin}/readyz"), &[]).0 == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "bff did not become ready");
        std::thread::sleep(every);
    }
}

/// From spawning the process to `/readyz` answering 200, polled every millisecond.
fn start_to_ready_ms(policy: &Path, threads: usize) -> f64 {
    let (listen, admin) = (new_port(), new_port());
    let started = Instant::now();
    let process = Process(
        bff_command(policy, listen, admin, threads)
            .spawn()
            .unwrap_or_else(|e| panic!("start bff: {e}")),
    );
    wait_ready(admin, Duration::from_millis(1));
    let took = started.elapsed();
    drop(process);
    took.as_secs_f64() * 1000.0
}
