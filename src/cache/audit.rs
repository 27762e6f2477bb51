//! `bff cache audit`: walks the cache keys in Redis (one node, or every master of a Redis
//! Cluster) with `SCAN`, sorts each client's keys against the loaded policies (live, orphaned,
//! unversioned, foreign, locks; TTL-less and memory on the side), and optionally `UNLINK`s the
//! orphans. The key and value format it reads is the cache contract (`{client}:{route}:v{N}:
//! {shape}:{inputs}`, values starting `BFFC1\n`).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::hash::{BuildHasher as _, RandomState};
use std::time::Duration;

use indexmap::IndexMap;
use rand::Rng;
use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, ConnectionInfo, Value};
use serde::Serialize;

use super::l2::{BadRedisUrl, RedisTarget};
use crate::policy::{Action, Policy};

/// The first line of every value the sidecar stores.
pub const MAGIC: &[u8] = b"BFFC1\n";
/// Keys asked for per `SCAN` call.
const SCAN_COUNT: usize = 1000;
/// At most this many `MEMORY USAGE` samples per row of the report; rows with more keys are
/// extrapolated from a uniform sample (reservoir sampling) and marked as estimates.
pub const MEMORY_SAMPLES: usize = 1000;
/// Most keys per `UNLINK` round trip.
pub const DELETE_BATCH: usize = 100;
/// Bounds on rows, so a keyspace full of strangers (`mobile:<uuid>`) cannot grow the report
/// without limit; the rest is summed into one overflow row.
const MAX_UNKNOWN_ROUTES: usize = 100;
const MAX_ORPHAN_PREFIXES: usize = 50;
const CLUSTER_SLOTS: u16 = 16384;

/// What the audit does besides reading.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub delete_orphans: bool,
    /// Bounds every Redis call (connecting included).
    pub timeout: Duration,
}

/// Why the audit could not run; every variant names the Redis it was talking to.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    BadUrl(#[from] BadRedisUrl),
    #[error("cannot reach Redis at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Redis {node}: {command} failed: {source}")]
    Command {
        node: String,
        command: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("Redis {node}: {command} timed out after {timeout:?}")]
    Timeout {
        node: String,
        command: &'static str,
        timeout: Duration,
    },
    #[error("Redis Cluster at {url}: {reason}")]
    Cluster { url: String, reason: String },
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// The whole audit, as printed by `--json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `--redis`, password masked.
    pub redis: String,
    /// `single` or `cluster`.
    pub mode: &'static str,
    /// `host:port` of every node scanned (a cluster's masters).
    pub nodes: Vec<String>,
    /// Most `MEMORY USAGE` samples per row.
    pub memory_sample_limit: usize,
    pub clients: Vec<ClientReport>,
    pub totals: Totals,
    /// `None` unless `--delete-orphans`.
    pub deleted: Option<Deleted>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientReport {
    pub client: String,
    /// The policy files of this client.
    pub policies: Vec<String>,
    /// The `SCAN … MATCH` pattern walked.
    pub pattern: String,
    /// The policy's routes in policy order, then routes only Redis knows, by name.
    pub routes: Vec<RouteReport>,
    pub totals: Totals,
    /// Keys gone (expired, deleted) or unreadable between `SCAN` and their inspection.
    pub skipped: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteReport {
    /// As in the keys (bytes outside printable ASCII written `\xNN`).
    pub route: String,
    pub in_policy: bool,
    /// The route, or one of its fetches, has a `cache` section in at least one of the policies.
    pub cached: bool,
    /// The row sums routes beyond the report's limit rather than naming one.
    pub overflow: bool,
    /// One row per live `v{N}:{shape}` (two policies of one client may have two).
    pub live: Vec<PrefixRow>,
    /// Older versions or shapes (all of them for a route not in the policy).
    pub orphans: Vec<PrefixRow>,
    pub unversioned: Row,
    pub foreign: Row,
    pub locks: Row,
    pub totals: Row,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrefixRow {
    /// `v{N}:{shape}`, or `*` for the overflow row.
    pub prefix: String,
    pub overflow: bool,
    #[serde(flatten)]
    pub row: Row,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub keys: u64,
    /// Keys with no TTL (`PTTL` = -1).
    pub no_ttl: u64,
    pub memory: Memory,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// `MEMORY USAGE` summed, or extrapolated from the samples when `estimated`.
    pub bytes: u64,
    pub estimated: bool,
    /// Keys actually measured.
    pub sampled: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub keys: u64,
    pub no_ttl: u64,
    pub memory: Memory,
    pub live: u64,
    pub orphans: u64,
    pub orphan_memory: Memory,
    pub unversioned: u64,
    pub foreign: u64,
    pub locks: u64,
    pub skipped: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deleted {
    /// Keys `UNLINK` reported removed.
    pub keys: u64,
    /// `UNLINK` round trips (each at most `DELETE_BATCH` keys).
    pub batches: u64,
}

impl Memory {
    fn add(&mut self, other: Memory) {
        self.bytes += other.bytes;
        self.estimated |= other.estimated;
        self.sampled += other.sampled;
    }
}

impl Row {
    fn add(&mut self, other: &Row) {
        self.keys += other.keys;
        self.no_ttl += other.no_ttl;
        self.memory.add(other.memory);
    }
}

impl Totals {
    fn add_route(&mut self, route: &RouteReport) {
        self.keys += route.totals.keys;
        self.no_ttl += route.totals.no_ttl;
        self.memory.add(route.totals.memory);
        self.live += route.live.iter().map(|p| p.row.keys).sum::<u64>();
        for orphan in &route.orphans {
            self.orphans += orphan.row.keys;
            self.orphan_memory.add(orphan.row.memory);
        }
        self.unversioned += route.unversioned.keys;
        self.foreign += route.foreign.keys;
        self.locks += route.locks.keys;
    }

    fn add(&mut self, other: &Totals) {
        self.keys += other.keys;
        self.no_ttl += other.no_ttl;
        self.memory.add(other.memory);
        self.live += other.live;
        self.orphans += other.orphans;
        self.orphan_memory.add(other.orphan_memory);
        self.unversioned += other.unversioned;
        self.foreign += other.foreign;
        self.locks += other.locks;
        self.skipped += other.skipped;
    }
}

// ---------------------------------------------------------------------------------------------
// What the policies say is live
// ---------------------------------------------------------------------------------------------

/// One client's routes across every policy file given for it (during a rolling deploy the old
/// and the new policy are both live, so both files may be passed).
struct ClientPlan {
    client: String,
    policies: Vec<String>,
    /// Route name → its live `v{N}:{shape}` prefixes and whether it caches.
    routes: IndexMap<String, LiveRoute>,
}

#[derive(Default)]
struct LiveRoute {
    prefixes: Vec<String>,
    cached: bool,
}

fn plan(policies: &[Policy]) -> Vec<ClientPlan> {
    let mut plans: Vec<ClientPlan> = Vec::new();
    for policy in policies {
        let index = match plans.iter().position(|p| p.client == policy.client) {
            Some(index) => index,
            None => {
                plans.push(ClientPlan {
                    client: policy.client.clone(),
                    policies: Vec::new(),
                    routes: IndexMap::new(),
                });
                plans.len() - 1
            }
        };
        let plan = &mut plans[index];
        plan.policies.push(policy.source.display().to_string());
        for route in &policy.routes {
            let live = plan.routes.entry(route.name.clone()).or_default();
            // `key_prefix` is `{client}:{route}:v{N}:{shape}:`; the row is keyed by `v{N}:{shape}`.
            let full = route.key_prefix(&policy.client);
            let prefix = full
                .strip_prefix(&format!("{}:{}:", policy.client, route.name))
                .and_then(|p| p.strip_suffix(':'))
                .unwrap_or(&full)
                .to_string();
            if !live.prefixes.contains(&prefix) {
                live.prefixes.push(prefix);
            }
            // A route without a cache of its own may still have fetches cached on their own,
            // under its prefix (`…:~fetch.NAME:…`).
            let fetch_cached = match &route.action {
                Action::Fetch(fetches) => fetches.iter().any(|f| f.cache.is_some()),
                Action::Proxy(_) => false,
            };
            live.cached |= route.cache.is_some() || fetch_cached;
        }
    }
    plans
}

// ---------------------------------------------------------------------------------------------
// Reading keys
// ---------------------------------------------------------------------------------------------

/// A key split as the contract says, after its `{client}:`.
#[derive(Debug, PartialEq, Eq)]
struct KeyParts<'k> {
    route: &'k [u8],
    /// `v{N}:{shape}` when the third field is `v` + digits and the key goes on after the shape.
    prefix: Option<&'k [u8]>,
    /// Shaped like `{key}:lock` of a versioned key.
    lock_shaped: bool,
}

fn split_key(rest: &[u8]) -> KeyParts<'_> {
    let mut fields = rest.splitn(4, |b| *b == b':');
    let route = fields.next().unwrap_or_default();
    let version = fields.next();
    let shape = fields.next();
    let inputs = fields.next();
    let versioned = version
        .is_some_and(|v| v.len() >= 2 && v[0] == b'v' && v[1..].iter().all(u8::is_ascii_digit));
    match (versioned, version, shape, inputs) {
        (true, Some(version), Some(shape), Some(inputs)) => {
            let start = route.len() + 1;
            let end = start + version.len() + 1 + shape.len();
            KeyParts {
                route,
                prefix: rest.get(start..end),
                // A lock is `{key}:lock` and a key has an inputs field (maybe empty), so the
                // lock's remainder after the shape is `{inputs}:lock`.
                lock_shaped: inputs.ends_with(b":lock"),
            }
        }
        _ => KeyParts {
            route,
            prefix: None,
            lock_shaped: false,
        },
    }
}

/// What a key is, once its value's first bytes are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Live,
    Orphan,
    Unversioned,
    Foreign,
    Lock,
}

/// The row a key counts in: its route (by name as in the key), kind, and prefix for live and
/// orphan rows.
fn classify<'k>(
    parts: &KeyParts<'k>,
    ours: bool,
    live: Option<&LiveRoute>,
) -> (Kind, Option<&'k [u8]>) {
    if parts.lock_shaped && !ours {
        return (Kind::Lock, None);
    }
    if !ours {
        return (Kind::Foreign, None);
    }
    match parts.prefix {
        None => (Kind::Unversioned, None),
        Some(prefix) => {
            let is_live = live.is_some_and(|l| l.prefixes.iter().any(|p| p.as_bytes() == prefix));
            (
                if is_live { Kind::Live } else { Kind::Orphan },
                Some(prefix),
            )
        }
    }
}

/// Bytes as text: printable ASCII as is, anything else `\xNN`; long names cut.
fn show(bytes: &[u8]) -> String {
    const MAX: usize = 120;
    let mut out = String::new();
    for &b in bytes.iter().take(MAX) {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    if bytes.len() > MAX {
        out.push('…');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tallies
// ---------------------------------------------------------------------------------------------

/// A row being counted, with its memory reservoir.
#[derive(Default)]
struct Tally {
    keys: u64,
    no_ttl: u64,
    /// Keys offered to the reservoir (the row's keys whose memory could be measured).
    offered: u64,
    samples: Vec<u64>,
}

/// Where a measured size goes in a row's reservoir.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Push,
    Replace(usize),
}

impl Tally {
    fn count(&mut self, no_ttl: bool) {
        self.keys += 1;
        self.no_ttl += u64::from(no_ttl);
    }

    /// Reservoir sampling (Algorithm R): every key ends up measured with equal probability.
    /// Decided before the sizes are known (a page's keys are measured in one round trip).
    fn offer(&mut self, rng: &mut impl Rng) -> Option<Slot> {
        self.offered += 1;
        if self.offered <= MEMORY_SAMPLES as u64 {
            // Filled when measured; a key gone by then leaves no sample.
            return Some(Slot::Push);
        }
        let pick = rng.random_range(0..self.offered) as usize;
        (pick < MEMORY_SAMPLES).then_some(Slot::Replace(pick))
    }

    fn measured(&mut self, slot: Slot, bytes: u64) {
        match slot {
            Slot::Push => self.samples.push(bytes),
            Slot::Replace(i) => {
                if let Some(s) = self.samples.get_mut(i) {
                    *s = bytes;
                }
            }
        }
    }

    fn row(&self) -> Row {
        let sum: u64 = self.samples.iter().sum();
        let sampled = self.samples.len() as u64;
        let estimated = self.offered > MEMORY_SAMPLES as u64;
        let bytes = if estimated && sampled > 0 {
            (sum as f64 / sampled as f64 * self.keys as f64).round() as u64
        } else {
            sum
        };
        Row {
            keys: self.keys,
            no_ttl: self.no_ttl,
            memory: Memory {
                bytes,
                estimated,
                sampled,
            },
        }
    }
}

#[derive(Default)]
struct RouteTally {
    in_policy: bool,
    cached: bool,
    overflow: bool,
    live: IndexMap<Vec<u8>, Tally>,
    orphans: IndexMap<Vec<u8>, Tally>,
    other_orphans: Option<Tally>,
    unversioned: Tally,
    foreign: Tally,
    locks: Tally,
}

impl RouteTally {
    fn tally(&mut self, kind: Kind, prefix: Option<&[u8]>) -> &mut Tally {
        match (kind, prefix) {
            (Kind::Live, Some(prefix)) => self.live.entry(prefix.to_vec()).or_default(),
            (Kind::Orphan, Some(prefix)) => {
                if self.orphans.contains_key(prefix) || self.orphans.len() < MAX_ORPHAN_PREFIXES {
                    self.orphans.entry(prefix.to_vec()).or_default()
                } else {
                    self.other_orphans.get_or_insert_with(Tally::default)
                }
            }
            (Kind::Lock, _) => &mut self.locks,
            (Kind::Foreign, _) => &mut self.foreign,
            (Kind::Unversioned, _) | (Kind::Live | Kind::Orphan, None) => &mut self.unversioned,
        }
    }

    fn report(&self, route: String) -> RouteReport {
        let prefix_row = |(prefix, tally): (&Vec<u8>, &Tally)| PrefixRow {
            prefix: show(prefix),
            overflow: false,
            row: tally.row(),
        };
        let live: Vec<PrefixRow> = self.live.iter().map(prefix_row).collect();
        let mut orphans: Vec<PrefixRow> = self.orphans.iter().map(prefix_row).collect();
        orphans.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        if let Some(other) = &self.other_orphans {
            orphans.push(PrefixRow {
                prefix: "*".into(),
                overflow: true,
                row: other.row(),
            });
        }
        let (unversioned, foreign, locks) =
            (self.unversioned.row(), self.foreign.row(), self.locks.row());
        let mut totals = Row::default();
        for row in live.iter().chain(&orphans).map(|p| &p.row) {
            totals.add(row);
        }
        for row in [&unversioned, &foreign, &locks] {
            totals.add(row);
        }
        RouteReport {
            route,
            in_policy: self.in_policy,
            cached: self.cached,
            overflow: self.overflow,
            live,
            orphans,
            unversioned,
            foreign,
            locks,
            totals,
        }
    }
}

/// One client's tallies: its policy routes first, then routes found only in Redis.
struct ClientTally {
    routes: IndexMap<Vec<u8>, RouteTally>,
    unknown_routes: usize,
    other_routes: Option<RouteTally>,
    skipped: u64,
    walked: WalkedKeys,
}

/// The keys a client's walk has already taken, so each is counted (and unlinked) once:
/// `SCAN` may return a key again, e.g. when the keyspace's hash table shrinks between calls.
/// Kept as two independent 64-bit hashes per key (16 bytes, whatever the key's length); two
/// keys agreeing on both is not a practical concern (~n²/2¹²⁹).
struct WalkedKeys {
    first: RandomState,
    second: RandomState,
    digests: HashSet<u128>,
}

impl WalkedKeys {
    fn new() -> WalkedKeys {
        WalkedKeys {
            first: RandomState::new(),
            second: RandomState::new(),
            digests: HashSet::new(),
        }
    }

    /// True the first time `key` is offered.
    fn first_time(&mut self, key: &[u8]) -> bool {
        let digest =
            (u128::from(self.first.hash_one(key)) << 64) | u128::from(self.second.hash_one(key));
        self.digests.insert(digest)
    }
}

impl ClientTally {
    fn new(plan: &ClientPlan) -> ClientTally {
        let mut routes = IndexMap::new();
        for (name, live) in &plan.routes {
            let mut tally = RouteTally {
                in_policy: true,
                cached: live.cached,
                ..RouteTally::default()
            };
            for prefix in &live.prefixes {
                tally
                    .live
                    .insert(prefix.as_bytes().to_vec(), Tally::default());
            }
            routes.insert(name.as_bytes().to_vec(), tally);
        }
        ClientTally {
            routes,
            unknown_routes: 0,
            other_routes: None,
            skipped: 0,
            walked: WalkedKeys::new(),
        }
    }

    fn route(&mut self, name: &[u8]) -> &mut RouteTally {
        if let Some(index) = self.routes.get_index_of(name) {
            return &mut self.routes[index];
        }
        if self.unknown_routes < MAX_UNKNOWN_ROUTES {
            self.unknown_routes += 1;
            return self.routes.entry(name.to_vec()).or_default();
        }
        self.other_routes.get_or_insert_with(|| RouteTally {
            overflow: true,
            ..RouteTally::default()
        })
    }

    fn report(&self, plan: &ClientPlan, pattern: String) -> ClientReport {
        let mut known = Vec::new();
        let mut unknown = Vec::new();
        for (name, tally) in &self.routes {
            let report = tally.report(show(name));
            if tally.in_policy {
                known.push(report);
            } else {
                unknown.push(report);
            }
        }
        unknown.sort_by(|a, b| a.route.cmp(&b.route));
        let mut routes = known;
        routes.extend(unknown);
        if let Some(other) = &self.other_routes {
            routes.push(other.report("*".into()));
        }
        let mut totals = Totals::default();
        for route in &routes {
            totals.add_route(route);
        }
        totals.skipped = self.skipped;
        ClientReport {
            client: plan.client.clone(),
            policies: plan.policies.clone(),
            pattern,
            routes,
            totals,
            skipped: self.skipped,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Talking to Redis
// ---------------------------------------------------------------------------------------------

struct Node {
    addr: String,
    conn: MultiplexedConnection,
}

/// Runs one Redis call under the audit's timeout, naming the node and command if it fails.
async fn call<T>(
    node: &str,
    command: &'static str,
    timeout: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, AuditError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(AuditError::Command {
            node: node.to_string(),
            command,
            source,
        }),
        Err(_) => Err(AuditError::Timeout {
            node: node.to_string(),
            command,
            timeout,
        }),
    }
}

async fn connect(info: &ConnectionInfo, timeout: Duration) -> Result<Node, String> {
    let addr = info.addr().to_string();
    let client = redis::Client::open(info.clone()).map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let conn = tokio::time::timeout(
        timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| format!("{addr}: no connection within {timeout:?}"))?
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut node = Node { addr, conn };
    // A connection can open on a port that is not Redis (or not ready): ask it something.
    let pong: String = call(
        &node.addr,
        "PING",
        timeout,
        redis::cmd("PING").query_async(&mut node.conn),
    )
    .await
    .map_err(|e| e.to_string())?;
    if pong != "PONG" {
        return Err(format!("{}: PING answered {pong:?}", node.addr));
    }
    Ok(node)
}

/// The nodes to scan: the seed alone, or every master when the seed is a cluster node.
async fn discover(
    target: &RedisTarget,
    timeout: Duration,
) -> Result<(bool, Vec<Node>), AuditError> {
    let mut failures = Vec::new();
    let mut seed = None;
    for info in &target.seeds {
        match connect(info, timeout).await {
            Ok(node) => {
                seed = Some((info, node));
                break;
            }
            Err(reason) => failures.push(reason),
        }
    }
    let Some((seed_info, mut seed)) = seed else {
        return Err(AuditError::Unreachable {
            url: target.shown.clone(),
            reason: failures.join("; "),
        });
    };
    let info: String = call(
        &seed.addr,
        "INFO cluster",
        timeout,
        redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut seed.conn),
    )
    .await?;
    let cluster_enabled = info.lines().any(|l| l.trim() == "cluster_enabled:1");
    if !cluster_enabled {
        if target.cluster {
            return Err(AuditError::Cluster {
                url: target.shown.clone(),
                reason: format!(
                    "{} is not a cluster node (cluster_enabled:0); use redis://",
                    seed.addr
                ),
            });
        }
        return Ok((false, vec![seed]));
    }
    let nodes: String = call(
        &seed.addr,
        "CLUSTER NODES",
        timeout,
        redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut seed.conn),
    )
    .await?;
    let masters = cluster_masters(&nodes).map_err(|reason| AuditError::Cluster {
        url: target.shown.clone(),
        reason,
    })?;
    let seed_host = match seed_info.addr() {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
        // Not reachable from a `redis://` URL with a host; a cluster is reached over TCP.
        _ => "127.0.0.1".into(),
    };
    let mut connected = Vec::new();
    for master in masters {
        let host = if master.host.is_empty() {
            // A node that never learnt its own address prints `:port`: it is the seed's host.
            seed_host.clone()
        } else {
            master.host
        };
        let info = seed_info
            .clone()
            .set_addr(ConnectionAddr::Tcp(host, master.port));
        let node = connect(&info, timeout)
            .await
            .map_err(|reason| AuditError::Unreachable {
                url: format!("{} (cluster master {})", target.shown, info.addr()),
                reason,
            })?;
        connected.push(node);
    }
    Ok((true, connected))
}

#[derive(Debug, PartialEq, Eq)]
struct MasterAddr {
    host: String,
    port: u16,
}

/// Every master in `CLUSTER NODES` output; an error if one is failed or has no address,
/// since auditing the rest would under-count without saying so.
fn cluster_masters(nodes: &str) -> Result<Vec<MasterAddr>, String> {
    let mut masters = Vec::new();
    for line in nodes.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(id), Some(addr), Some(flags)) = (fields.first(), fields.get(1), fields.get(2))
        else {
            return Err(format!("unreadable CLUSTER NODES line: {line}"));
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") {
            continue;
        }
        if flags
            .iter()
            .any(|f| matches!(*f, "fail" | "noaddr" | "handshake"))
        {
            return Err(format!(
                "master {id} ({addr}) is {}: its keys cannot be audited",
                flags.join(",")
            ));
        }
        // `ip:port@cport[,hostname]`; the ip may be IPv6 (colons) or empty.
        let host_port = addr.split([',', '@']).next().unwrap_or_default();
        let parsed = host_port
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)));
        let Some((host, port)) = parsed else {
            return Err(format!("master {id} has an unreadable address {addr}"));
        };
        masters.push(MasterAddr {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
        });
    }
    if masters.is_empty() {
        return Err("CLUSTER NODES lists no master".into());
    }
    Ok(masters)
}

/// The cluster slot of a key (CRC16/XMODEM of the key or of its `{hash tag}`, mod 16384).
fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let tag = &key[open + 1..];
            let close = tag.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &tag[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(hashed) % CLUSTER_SLOTS
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// `SCAN` glob for `{client}:*`, with glob characters in the name escaped.
fn scan_pattern(client: &str) -> String {
    format!("{}:*", escape_glob(client))
}

/// `text` with the characters `SCAN MATCH` reads as a pattern (`*?[]\`) escaped.
fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Removes every key starting with `prefix`, on every node (every master of a cluster),
/// walking them with `SCAN` and removing them with `UNLINK` in batches: what the admin port's
/// `DELETE /cache/{route}` does to L2. Returns how many keys were removed.
pub async fn unlink_prefix(
    target: &RedisTarget,
    prefix: &str,
    timeout: Duration,
) -> Result<u64, AuditError> {
    let (cluster, nodes) = discover(target, timeout).await?;
    let pattern = format!("{}*", escape_glob(prefix));
    let mut deleter = Deleter {
        enabled: true,
        cluster,
        pending: Vec::new(),
        done: Deleted::default(),
    };
    for mut node in nodes {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = call(
                &node.addr,
                "SCAN",
                timeout,
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut node.conn),
            )
            .await?;
            for key in keys {
                deleter.push(&mut node, key, timeout).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        deleter.flush(&mut node, timeout).await?;
    }
    Ok(deleter.done.keys)
}

/// Orphans waiting for `UNLINK`, flushed every `DELETE_BATCH` keys.
struct Deleter {
    enabled: bool,
    cluster: bool,
    pending: Vec<Vec<u8>>,
    done: Deleted,
}

impl Deleter {
    async fn push(
        &mut self,
        node: &mut Node,
        key: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), AuditError> {
        if !self.enabled {
            return Ok(());
        }
        self.pending.push(key);
        if self.pending.len() >= DELETE_BATCH {
            self.flush(node, timeout).await?;
        }
        Ok(())
    }

    /// One round trip: a single `UNLINK` on one node; on a cluster node one `UNLINK` per
    /// hash slot in a pipeline, since a multi-key command must stay within one slot there.
    async fn flush(&mut self, node: &mut Node, timeout: Duration) -> Result<(), AuditError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let keys = std::mem::take(&mut self.pending);
        let mut groups: BTreeMap<u16, Vec<Vec<u8>>> = BTreeMap::new();
        if self.cluster {
            for key in keys {
                groups.entry(key_slot(&key)).or_default().push(key);
            }
        } else {
            groups.insert(0, keys);
        }
        let mut pipe = redis::pipe();
        for keys in groups.values() {
            pipe.cmd("UNLINK").arg(keys);
        }
        let removed: Vec<u64> = call(
            &node.addr,
            "UNLINK",
            timeout,
            pipe.query_async(&mut node.conn),
        )
        .await?;
        self.done.keys += removed.iter().sum::<u64>();
        self.done.batches += 1;
        Ok(())
    }
}

/// One inspected key and the row it counts in.
struct Seen {
    key: Vec<u8>,
    route: Vec<u8>,
    kind: Kind,
    prefix: Option<Vec<u8>>,
    no_ttl: bool,
}

/// Walks one client's keys on one node.
async fn scan_client(
    node: &mut Node,
    plan: &ClientPlan,
    tally: &mut ClientTally,
    deleter: &mut Deleter,
    timeout: Duration,
) -> Result<(), AuditError> {
    let pattern = scan_pattern(&plan.client);
    let client_prefix = format!("{}:", plan.client);
    let mut rng = rand::rng();
    let mut cursor = String::from("0");
    loop {
        let (next, mut keys): (String, Vec<Vec<u8>>) = call(
            &node.addr,
            "SCAN",
            timeout,
            redis::cmd("SCAN")
                .arg(&cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut node.conn),
        )
        .await?;
        keys.retain(|key| tally.walked.first_time(key));

        // The first bytes of each value (a non-string answers WRONGTYPE: foreign) and its TTL,
        // in one round trip; PTTL after GETRANGE, so -2 means the key went in between.
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for key in &keys {
            pipe.cmd("GETRANGE").arg(key).arg(0).arg(MAGIC.len() - 1);
            pipe.cmd("PTTL").arg(key);
        }
        let replies: Vec<Value> = if keys.is_empty() {
            Vec::new()
        } else {
            call(
                &node.addr,
                "GETRANGE/PTTL",
                timeout,
                pipe.query_async(&mut node.conn),
            )
            .await?
        };

        let mut seen = Vec::with_capacity(keys.len());
        for (key, reply) in keys.into_iter().zip(replies.chunks(2)) {
            let [head, ttl] = reply else {
                tally.skipped += 1;
                continue;
            };
            let ttl = match ttl {
                Value::Int(ttl) if *ttl != -2 => *ttl,
                // Gone since SCAN, or an error (e.g. the slot moved): not counted anywhere.
                _ => {
                    tally.skipped += 1;
                    continue;
                }
            };
            let ours = matches!(head, Value::BulkString(bytes) if bytes == MAGIC);
            let Some(rest) = key.strip_prefix(client_prefix.as_bytes()) else {
                tally.skipped += 1;
                continue;
            };
            let parts = split_key(rest);
            let live = std::str::from_utf8(parts.route)
                .ok()
                .and_then(|route| plan.routes.get(route));
            let (kind, prefix) = classify(&parts, ours, live);
            seen.push(Seen {
                route: parts.route.to_vec(),
                prefix: prefix.map(<[u8]>::to_vec),
                kind,
                no_ttl: ttl == -1,
                key,
            });
        }

        // Count every key, and pick the ones whose memory the reservoirs want measured.
        let mut measure = Vec::new();
        for (i, s) in seen.iter().enumerate() {
            let row = tally.route(&s.route).tally(s.kind, s.prefix.as_deref());
            row.count(s.no_ttl);
            if let Some(slot) = row.offer(&mut rng) {
                measure.push((i, slot));
            }
        }
        if !measure.is_empty() {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for (i, _) in &measure {
                pipe.cmd("MEMORY").arg("USAGE").arg(&seen[*i].key);
            }
            let sizes: Vec<Value> = call(
                &node.addr,
                "MEMORY USAGE",
                timeout,
                pipe.query_async(&mut node.conn),
            )
            .await?;
            for ((i, slot), size) in measure.iter().zip(sizes) {
                if let Value::Int(bytes) = size {
                    let s = &seen[*i];
                    let row = tally.route(&s.route).tally(s.kind, s.prefix.as_deref());
                    row.measured(*slot, u64::try_from(bytes).unwrap_or(0));
                }
            }
        }

        for s in seen {
            if s.kind == Kind::Orphan {
                deleter.push(node, s.key, timeout).await?;
            }
        }

        if next == "0" {
            break;
        }
        cursor = next;
    }
    deleter.flush(node, timeout).await
}

/// Audits every client of `policies` on the Redis of `target`.
pub async fn audit(
    target: &RedisTarget,
    policies: &[Policy],
    options: &AuditOptions,
) -> Result<Report, AuditError> {
    let (cluster, mut nodes) = discover(target, options.timeout).await?;
    let plans = plan(policies);
    let mut deleter = Deleter {
        enabled: options.delete_orphans,
        cluster,
        pending: Vec::new(),
        done: Deleted::default(),
    };
    let mut clients = Vec::new();
    for plan in &plans {
        let mut tally = ClientTally::new(plan);
        for node in &mut nodes {
            scan_client(node, plan, &mut tally, &mut deleter, options.timeout).await?;
        }
        clients.push(tally.report(plan, scan_pattern(&plan.client)));
    }
    let mut totals = Totals::default();
    for client in &clients {
        totals.add(&client.totals);
    }
    let nodes = nodes.into_iter().map(|n| n.addr).collect();
    Ok(Report {
        redis: target.shown.clone(),
        mode: if cluster { "cluster" } else { "single" },
        nodes,
        memory_sample_limit: MEMORY_SAMPLES,
        clients,
        totals,
        deleted: options.delete_orphans.then_some(deleter.done),
    })
}

// ---------------------------------------------------------------------------------------------
// Human output
// ---------------------------------------------------------------------------------------------

impl Report {
    /// A table per client: one line per route and kind of key, then totals.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let nodes = self.nodes.join(", ");
        let _ = match self.mode {
            "cluster" => writeln!(out, "Redis {} (cluster, masters {nodes})", self.redis),
            _ => writeln!(out, "Redis {} (single node {nodes})", self.redis),
        };
        for client in &self.clients {
            render_client(&mut out, client);
        }
        let t = &self.totals;
        let _ = writeln!(
            out,
            "\nall clients: {} keys, {}: {} live, {} orphans ({}), {} unversioned, {} foreign, {} locks, {} without TTL",
            t.keys,
            human_bytes(t.memory),
            t.live,
            t.orphans,
            human_bytes(t.orphan_memory),
            t.unversioned,
            t.foreign,
            t.locks,
            t.no_ttl
        );
        match &self.deleted {
            Some(deleted) => {
                let _ = writeln!(
                    out,
                    "deleted {} orphan keys in {} UNLINK round trip{} (at most {DELETE_BATCH} keys each)",
                    deleted.keys,
                    deleted.batches,
                    if deleted.batches == 1 { "" } else { "s" }
                );
            }
            None if t.orphans > 0 => {
                let _ = writeln!(out, "run again with --delete-orphans to remove the orphans");
            }
            None => {}
        }
        if t.unversioned + t.foreign > 0 {
            let _ = writeln!(
                out,
                "unversioned and foreign keys may not be bff's: they are reported, never deleted"
            );
        }
        if t.memory.estimated {
            let _ = writeln!(
                out,
                "~ memory estimated from a sample of at most {MEMORY_SAMPLES} keys per line"
            );
        }
        out
    }
}

fn render_client(out: &mut String, client: &ClientReport) {
    let _ = writeln!(
        out,
        "\nclient {} (SCAN MATCH {}; policies: {})",
        client.client,
        client.pattern,
        client.policies.join(", ")
    );
    let mut lines: Vec<[String; 6]> = vec![[
        "ROUTE".into(),
        "KIND".into(),
        "PREFIX".into(),
        "KEYS".into(),
        "NO TTL".into(),
        "MEMORY".into(),
    ]];
    let mut notes = Vec::new();
    for route in &client.routes {
        let mut name = route.route.clone();
        if route.overflow {
            name = format!("* (more than {MAX_UNKNOWN_ROUTES} routes)");
        } else if !route.in_policy {
            name.push_str(" (not in policy)");
        } else if !route.cached {
            name.push_str(" (not cached)");
        }
        let start = lines.len();
        let no_rows = route.live.is_empty()
            && route.orphans.is_empty()
            && route.unversioned.keys + route.foreign.keys + route.locks.keys == 0;
        let mut line = |kind: &str, prefix: &str, row: &Row| {
            // The route's name on its first line only.
            let route = if lines.len() == start {
                name.clone()
            } else {
                String::new()
            };
            lines.push([
                route,
                kind.into(),
                prefix.into(),
                row.keys.to_string(),
                row.no_ttl.to_string(),
                human_bytes(row.memory),
            ]);
        };
        for p in &route.live {
            line("live", &p.prefix, &p.row);
        }
        for p in &route.orphans {
            let prefix = if p.overflow {
                format!("* (more than {MAX_ORPHAN_PREFIXES})")
            } else {
                p.prefix.clone()
            };
            line("orphan", &prefix, &p.row);
        }
        for (kind, row) in [
            ("unversioned", &route.unversioned),
            ("foreign", &route.foreign),
            ("locks", &route.locks),
        ] {
            if row.keys > 0 {
                line(kind, "", row);
            }
        }
        if no_rows {
            line("(no keys)", "", &Row::default());
        }
    }
    let t = &client.totals;
    lines.push([
        "total".into(),
        String::new(),
        String::new(),
        t.keys.to_string(),
        t.no_ttl.to_string(),
        human_bytes(t.memory),
    ]);
    if client.skipped > 0 {
        notes.push(format!(
            "{} keys vanished or became unreadable during the walk (not counted)",
            client.skipped
        ));
    }

    let mut widths = [0usize; 6];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for line in &lines {
        let mut text = String::from(" ");
        for (i, (cell, w)) in line.iter().zip(widths).enumerate() {
            let pad = w - cell.chars().count();
            // Text columns to the left, numbers to the right.
            if i < 3 {
                let _ = write!(text, " {cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(text, "  {}{cell}", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    }
    let _ = writeln!(
        out,
        "  {} live, {} orphans ({}), {} unversioned, {} foreign, {} locks",
        t.live,
        t.orphans,
        human_bytes(t.orphan_memory),
        t.unversioned,
        t.foreign,
        t.locks
    );
    for note in notes {
        let _ = writeln!(out, "  {note}");
    }
}

/// `1.2 MiB`, with `~` in front of an estimate.
fn human_bytes(memory: Memory) -> String {
    let tilde = if memory.estimated { "~" } else { "" };
    let bytes = memory.bytes as f64;
    let text = if memory.bytes < 1024 {
        format!("{} B", memory.bytes)
    } else if bytes < 1024.0 * 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else if bytes < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    } else {
        format!("{:.1} GiB", bytes / (1024.0 * 1024.0 * 1024.0))
    };
    format!("{tilde}{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_as_the_contract_says() {
        let parts = split_key(b"homescreen:v2:3f9a1c2e:usr_9821");
        assert_eq!(parts.route, b"homescreen");
        assert_eq!(parts.prefix, Some(&b"v2:3f9a1c2e"[..]));
        assert!(!parts.lock_shaped);

        // No inputs: the key ends with the shape's colon.
        let parts = split_key(b"card:v1:0b1c2d3e:");
        assert_eq!(parts.prefix, Some(&b"v1:0b1c2d3e"[..]));

        // Inputs may hold colons (several inputs); only the first four fields are split off.
        let parts = split_key(b"r:v10:aaaaaaaa:usr_1:p-1:~0123456789abcdef");
        assert_eq!(parts.prefix, Some(&b"v10:aaaaaaaa"[..]));

        for (lock, shaped) in [
            (&b"r:v1:aaaaaaaa::lock"[..], true),
            (b"r:v1:aaaaaaaa:usr_1:lock", true),
            // A single input that happens to be `lock` is a key, not a lock.
            (b"r:v1:aaaaaaaa:lock", false),
            (b"r:usr_1:x:y:lock", false),
        ] {
            assert_eq!(split_key(lock).lock_shaped, shaped, "{}", show(lock));
        }

        for unversioned in [
            &b"homescreen:usr_1"[..],
            b"homescreen",
            b"",
            b"r:v:aaaaaaaa:x",
            b"r:vx2:aaaaaaaa:x",
            b"r:V2:aaaaaaaa:x",
            b"r:v2",
            b"r:v2:aaaaaaaa",
            b"\xff\xfe:v1",
        ] {
            let parts = split_key(unversioned);
            assert_eq!(parts.prefix, None, "{}", show(unversioned));
        }
    }

    #[test]
    fn classification_follows_value_and_policy() {
        let live = LiveRoute {
            prefixes: vec!["v2:3f9a1c2e".into()],
            cached: true,
        };
        let key = split_key(b"homescreen:v2:3f9a1c2e:usr_1");
        assert_eq!(classify(&key, true, Some(&live)).0, Kind::Live);
        assert_eq!(classify(&key, false, Some(&live)).0, Kind::Foreign);
        assert_eq!(classify(&key, true, None).0, Kind::Orphan);
        let old = split_key(b"homescreen:v1:3f9a1c2e:usr_1");
        assert_eq!(
            classify(&old, true, Some(&live)),
            (Kind::Orphan, Some(&b"v1:3f9a1c2e"[..]))
        );
        let lock = split_key(b"homescreen:v2:3f9a1c2e:usr_1:lock");
        assert_eq!(classify(&lock, false, Some(&live)).0, Kind::Lock);
        // An entry whose last input is `lock` still reads as an entry.
        assert_eq!(classify(&lock, true, Some(&live)).0, Kind::Live);
        let bare = split_key(b"homescreen:usr_1");
        assert_eq!(classify(&bare, true, Some(&live)).0, Kind::Unversioned);
        assert_eq!(classify(&bare, false, Some(&live)).0, Kind::Foreign);
    }

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` and the cluster spec (CRC16 of "123456789" = 0x31C3).
        assert_eq!(crc16_xmodem(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"hello"), 866);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % 16384);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn cluster_nodes_output_gives_masters() {
        let out = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002,node-2 master - 0 1426238316232 2 connected 5461-10922
292f :30001@40001 myself,master - 0 0 1 connected 0-5460
6ec2 ::1:30003@40003 master - 0 1426238318243 3 connected 10923-16383
";
        let masters = cluster_masters(out).unwrap();
        let addrs: Vec<(String, u16)> = masters.into_iter().map(|m| (m.host, m.port)).collect();
        assert_eq!(
            addrs,
            [
                ("127.0.0.1".into(), 30002),
                (String::new(), 30001),
                ("::1".into(), 30003)
            ]
        );
        let failed = "67ed 127.0.0.1:30002@40002 master,fail - 0 0 2 connected 0-16383\n";
        assert!(cluster_masters(failed).unwrap_err().contains("master,fail"));
        assert!(cluster_masters("garbage\n").is_err());
        assert!(cluster_masters("").is_err());
    }

    #[test]
    fn reservoir_is_exact_when_small_and_estimates_when_large() {
        let mut rng = rand::rng();
        let mut small = Tally::default();
        for _ in 0..10 {
            small.count(false);
            let slot = small.offer(&mut rng).unwrap();
            small.measured(slot, 100);
        }
        let row = small.row();
        assert_eq!(
            (row.memory.bytes, row.memory.estimated, row.memory.sampled),
            (1000, false, 10)
        );

        let mut large = Tally::default();
        let n = 5 * MEMORY_SAMPLES as u64;
        let mut measured = 0;
        for _ in 0..n {
            large.count(true);
            if let Some(slot) = large.offer(&mut rng) {
                measured += 1;
                large.measured(slot, 50);
            }
        }
        let row = large.row();
        assert!(row.memory.estimated);
        assert_eq!(row.memory.sampled, MEMORY_SAMPLES as u64);
        assert_eq!(row.memory.bytes, 50 * n);
        assert_eq!(row.no_ttl, n);
        assert!(measured < n, "sampling measured every key");
    }

    #[test]
    fn a_key_walked_again_is_not_taken_twice() {
        let mut walked = WalkedKeys::new();
        assert!(walked.first_time(b"mobile:home:v1:aa:u1"));
        assert!(walked.first_time(b"mobile:home:v1:aa:u2"));
        assert!(walked.first_time(b""));
        assert!(!walked.first_time(b"mobile:home:v1:aa:u1"));
        assert!(!walked.first_time(b""));
    }

    #[test]
    fn odd_bytes_show_escaped_and_cut() {
        assert_eq!(show(b"ok-name_1"), "ok-name_1");
        assert_eq!(show(b"a\xff\n\\b"), "a\\xff\\x0a\\x5cb");
        assert_eq!(show(&[b'x'; 200]).chars().count(), 121);
        assert_eq!(scan_pattern("mobile"), "mobile:*");
        assert_eq!(scan_pattern("a*b?[c]"), "a\\*b\\?\\[c\\]:*");
    }
}
