//! cache::nodes: direct connections to every node of the Redis behind a `RedisTarget` (the one
//! node, or every master of a Redis Cluster), for the walks the pooled L2 client cannot make:
//! discovery, calls bounded by a timeout, and `SCAN` + batched `UNLINK` by hash slot. Shared by
//! `bff cache audit` and L2's prefix invalidation.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, ConnectionInfo};
use serde::Serialize;

use super::target::{BadRedisUrl, RedisTarget};

/// Most keys per `UNLINK` round trip.
pub const DELETE_BATCH: usize = 100;
const CLUSTER_SLOTS: u16 = 16384;

/// Why a walk over the nodes (an audit, an invalidation) could not run; every variant names
/// the Redis it was talking to.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
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

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deleted {
    /// Keys `UNLINK` reported removed.
    pub keys: u64,
    /// `UNLINK` round trips (each at most `DELETE_BATCH` keys).
    pub batches: u64,
}

pub(super) struct Node {
    pub(super) addr: String,
    pub(super) conn: MultiplexedConnection,
}

/// Runs one Redis call under the audit's timeout, naming the node and command if it fails.
pub(super) async fn call<T>(
    node: &str,
    command: &'static str,
    timeout: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, NodeError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(NodeError::Command {
            node: node.to_string(),
            command,
            source,
        }),
        Err(_) => Err(NodeError::Timeout {
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
pub(super) async fn discover(
    target: &RedisTarget,
    timeout: Duration,
) -> Result<(bool, Vec<Node>), NodeError> {
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
        return Err(NodeError::Unreachable {
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
            return Err(NodeError::Cluster {
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
    let masters = cluster_masters(&nodes).map_err(|reason| NodeError::Cluster {
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
            .map_err(|reason| NodeError::Unreachable {
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

/// `text` with the characters `SCAN MATCH` reads as a pattern (`*?[]\`) escaped.
pub(super) fn escape_glob(text: &str) -> String {
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
) -> Result<u64, NodeError> {
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
pub(super) struct Deleter {
    pub(super) enabled: bool,
    pub(super) cluster: bool,
    pub(super) pending: Vec<Vec<u8>>,
    pub(super) done: Deleted,
}

impl Deleter {
    pub(super) async fn push(
        &mut self,
        node: &mut Node,
        key: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), NodeError> {
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
    pub(super) async fn flush(
        &mut self,
        node: &mut Node,
        timeout: Duration,
    ) -> Result<(), NodeError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
