//! Real `redis-server` processes for the cache tests: one node or a Redis Cluster of masters,
//! each on loopback ports of its own, in a temp dir of its own, with no persistence, killed on
//! drop; and a small async client to seed and inspect them.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use redis::{aio::ConnectionLike, AsyncCommands, Cmd, Pipeline, RedisFuture, Value};
use tempfile::TempDir;

const READY_TIMEOUT: Duration = Duration::from_secs(15);
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
/// Attempts at finding ports nobody else took between our probe and the server's bind.
const START_ATTEMPTS: usize = 5;
/// A cluster node also listens on its port + 10000 (the cluster bus).
const BUS_OFFSET: u16 = 10000;

const INSTALL_HINT: &str = "the cache tests need `redis-server` and `redis-cli` on PATH: \
     install them with `apt-get install redis-server` (Debian ships `redis-cli` in `redis-tools`, \
     which it pulls in), or run `make test`, which installs them";

/// One `redis-server` child on a loopback port.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    extra_args: Vec<String>,
}

impl RedisServer {
    /// A standalone node on a free port, answering `PING`.
    pub fn start() -> RedisServer {
        require_binaries();
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match RedisServer::spawn(port, Vec::new()) {
                Ok(server) => return server,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("redis-server did not start in {START_ATTEMPTS} attempts: {last_failure}");
    }

    /// Spawns a node with `extra_args` and waits for `PING`; `Err` with its log if it exits
    /// (typically: the port was taken meanwhile).
    fn spawn(port: u16, extra_args: Vec<String>) -> Result<RedisServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("bff-redis-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            extra_args,
        };
        server.launch()?;
        Ok(server)
    }

    fn launch(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot spawn redis-server ({e}); {INSTALL_HINT}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if ping(self.port) {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited with {status}:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILLs the server (a crash, not a shutdown) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) | None => false,
        }
    }

    /// Starts the server again on the same port (and dir, so a cluster node keeps its
    /// identity); it comes back empty. Kills it first if it still runs.
    pub fn restart(&mut self) {
        self.kill();
        // The port was ours a moment ago; only a stranger grabbing it meanwhile fails this.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(failure) if Instant::now() >= deadline => {
                    panic!("redis-server could not restart: {failure}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// A client connected to this node.
    pub async fn client(&self) -> RedisClient {
        RedisClient::single(&self.url()).await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "----- redis-server :{} log -----\n{}-----",
                self.port,
                self.log()
            );
        }
        self.kill();
    }
}

/// A Redis Cluster of masters without replicas, slots spread evenly by `redis-cli`.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `masters` nodes (at least 3, Redis' minimum), joined, with `cluster_state:ok` on each.
    pub fn start(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters");
        require_binaries();
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            match RedisCluster::try_start(masters) {
                Ok(cluster) => return cluster,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("the Redis Cluster did not start in {START_ATTEMPTS} attempts: {last_failure}");
    }

    fn try_start(masters: usize) -> Result<RedisCluster, String> {
        let ports = free_cluster_ports(masters);
        let mut nodes = Vec::with_capacity(masters);
        for port in ports {
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ];
            nodes.push(RedisServer::spawn(
                port,
                args.iter().map(|a| a.to_string()).collect(),
            )?);
        }
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(RedisServer::addr))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run redis-cli ({e}); {INSTALL_HINT}"))?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed with {}:\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_state_ok()?;
        Ok(cluster)
    }

    fn wait_state_ok(&self) -> Result<(), String> {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        for node in &self.nodes {
            loop {
                let info = redis_cli(node.port, &["CLUSTER", "INFO"]);
                let ok = info.lines().any(|l| l.trim() == "cluster_state:ok")
                    && info
                        .lines()
                        .any(|l| l.trim() == format!("cluster_known_nodes:{}", self.nodes.len()));
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "node {} never reported cluster_state:ok; last CLUSTER INFO:\n{info}",
                        node.addr()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// `redis://127.0.0.1:<port>` of every master.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,…`, the form `bff` takes for a cluster.
    pub fn cluster_url(&self) -> String {
        let addrs: Vec<String> = self.nodes.iter().map(RedisServer::addr).collect();
        format!("redis+cluster://{}", addrs.join(","))
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One node, e.g. to `kill` and `restart` it.
    pub fn node_mut(&mut self, index: usize) -> &mut RedisServer {
        &mut self.nodes[index]
    }

    /// A cluster connection (keys routed by slot), with `keys` scanning every master.
    pub async fn client(&self) -> RedisClient {
        RedisClient::cluster(&self.urls()).await
    }
}

/// Either connection, so tests can send any command through [`RedisClient::conn`].
#[derive(Clone)]
pub enum RedisConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// A test's view of Redis: plain commands through one connection, and `keys` by `SCAN` on
/// every node (a cluster's `SCAN` only sees the node it reaches).
pub struct RedisClient {
    conn: RedisConn,
    nodes: Vec<redis::aio::MultiplexedConnection>,
}

impl RedisClient {
    pub async fn single(url: &str) -> RedisClient {
        let node = connect(url).await;
        RedisClient {
            conn: RedisConn::Single(node.clone()),
            nodes: vec![node],
        }
    }

    /// `urls` must be every master: `keys` scans exactly these.
    pub async fn cluster(urls: &[String]) -> RedisClient {
        let client = redis::cluster::ClusterClient::builder(urls.to_vec())
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(10))
            .build()
            .expect("cluster client");
        let conn = client
            .get_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the cluster {urls:?}: {e}"));
        let mut nodes = Vec::new();
        for url in urls {
            nodes.push(connect(url).await);
        }
        RedisClient {
            conn: RedisConn::Cluster(conn),
            nodes,
        }
    }

    /// The connection, for any other command or a pipeline (`redis::cmd(..).query_async(c.conn())`).
    pub fn conn(&mut self) -> &mut RedisConn {
        &mut self.conn
    }

    /// `SET key value [PX ttl]`.
    pub async fn set(
        &mut self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key.as_ref()).arg(value.as_ref());
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        let key = String::from_utf8_lossy(key.as_ref()).into_owned();
        let _: () = cmd
            .query_async(&mut self.conn)
            .await
            .unwrap_or_else(|e| panic!("SET {key}: {e}"));
    }

    pub async fn get(&mut self, key: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        let key = key.as_ref();
        self.conn
            .get(key)
            .await
            .unwrap_or_else(|e| panic!("GET {}: {e}", String::from_utf8_lossy(key)))
    }

    /// Milliseconds left; -1 without a TTL, -2 for a missing key.
    pub async fn pttl(&mut self, key: impl AsRef<[u8]>) -> i64 {
        let key = key.as_ref();
        self.conn
            .pttl(key)
            .await
            .unwrap_or_else(|e| panic!("PTTL {}: {e}", String::from_utf8_lossy(key)))
    }

    /// Every key matching `pattern` on every node, by `SCAN … MATCH … COUNT 1000`, sorted.
    pub async fn keys(&mut self, pattern: &str) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        for node in &mut self.nodes {
            let mut cursor: u64 = 0;
            loop {
                let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(node)
                    .await
                    .unwrap_or_else(|e| panic!("SCAN {pattern}: {e}"));
                keys.extend(page);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// [`keys`](Self::keys) as lossy strings, for readable assertions.
    pub async fn key_names(&mut self, pattern: &str) -> Vec<String> {
        self.keys(pattern)
            .await
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }
}

async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap_or_else(|e| panic!("bad redis url {url}: {e}"));
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// Fails the test (never skips it) when the Redis binaries are missing.
fn require_binaries() {
    for binary in ["redis-server", "redis-cli"] {
        let found = Command::new(binary)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(found, "`{binary}` not found: {INSTALL_HINT}");
    }
}

/// `redis-cli -p PORT ARGS…`'s output; empty if it fails (the caller polls).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// True when something on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A port the OS just handed out (and we released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Next candidate for a cluster node: 10000..22767, so the bus port (+10000) stays below the
/// kernel's ephemeral range (32768…), where outgoing connections would keep taking it. Each
/// process starts at its own offset so parallel test binaries rarely probe the same ports.
static NEXT_CLUSTER_PORT: AtomicU16 = AtomicU16::new(0);
const CLUSTER_PORTS: std::ops::Range<u16> = 10000..22767;

/// `count` ports whose port and port + 10000 were both free a moment ago.
fn free_cluster_ports(count: usize) -> Vec<u16> {
    let span = CLUSTER_PORTS.end - CLUSTER_PORTS.start;
    if NEXT_CLUSTER_PORT.load(Ordering::Relaxed) == 0 {
        let offset = rand::random_range(0..span);
        let _ = NEXT_CLUSTER_PORT.compare_exchange(
            0,
            offset.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..span {
        if ports.len() == count {
            break;
        }
        let step = NEXT_CLUSTER_PORT.fetch_add(1, Ordering::Relaxed) % span;
        let port = CLUSTER_PORTS.start + step;
        let (Ok(a), Ok(b)) = (
            TcpListener::bind(("127.0.0.1", port)),
            TcpListener::bind(("127.0.0.1", port + BUS_OFFSET)),
        ) else {
            continue;
        };
        // Held until all are chosen, so we never pick the same port twice.
        held.push((a, b));
        ports.push(port);
    }
    assert_eq!(
        ports.len(),
        count,
        "no {count} free cluster port pairs in {CLUSTER_PORTS:?}"
    );
    ports
}
