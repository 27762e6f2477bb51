//! cache::l2: the shared layer in Redis, a single node or a Redis Cluster. Every call has a
//! tight timeout, and a failure is counted and reads as a miss: when Redis is slow or down the
//! sidecar serves from L1 and upstreams, and the connection comes back by itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, RedisFuture, Value};

use super::target::RedisTarget;
use crate::metrics::Metrics;

/// Longest wait for one Redis call: a cache that waits longer than an upstream call is no cache.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(50);
/// Bounds each Redis call of an operator's invalidation.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long calls are skipped after Redis was unreachable (or too slow).
const PAUSE_AFTER_FAILURE: Duration = Duration::from_millis(500);
/// How often a cluster connection that could not be made is tried again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis layer: a connection that reconnects by itself, and counted, timed calls.
pub struct L2 {
    target: RedisTarget,
    /// Until when (ms since `epoch`) calls are skipped after Redis was unreachable.
    paused_until: AtomicU64,
    epoch: Instant,
    conn: Arc<ArcSwapOption<Conn>>,
    client: String,
    metrics: Arc<Metrics>,
}

impl L2 {
    /// Connects lazily: the sidecar starts and serves while Redis is down. Must run inside the
    /// Tokio runtime (the connection tasks live there).
    pub fn new(target: &RedisTarget, client: &str, metrics: &Arc<Metrics>) -> Result<L2, String> {
        let conn = Arc::new(ArcSwapOption::empty());
        let url = &target.shown;
        match (target.cluster, target.seeds.first()) {
            (false, Some(node)) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_millis(500)))
                    .set_response_timeout(Some(CALL_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let manager = redis::Client::open(node.clone())
                    .and_then(|c| c.get_connection_manager_lazy(config))
                    .map_err(|e| format!("Redis `{url}`: {e}"))?;
                conn.store(Some(Arc::new(Conn::Single(manager))));
            }
            (false, None) => return Err(format!("Redis `{url}` names no node")),
            (true, _) => {
                let cluster = ClusterClient::builder(target.seeds.clone())
                    .connection_timeout(Duration::from_millis(500))
                    .response_timeout(CALL_TIMEOUT)
                    .build()
                    .map_err(|e| format!("Redis Cluster `{url}`: {e}"))?;
                let slot = conn.clone();
                // A cluster connection needs the cluster to answer once; until it does, L2
                // reads as missing, and this keeps trying.
                tokio::spawn(async move {
                    loop {
                        match cluster.get_async_connection().await {
                            Ok(c) => {
                                slot.store(Some(Arc::new(Conn::Cluster(c))));
                                tracing::info!("connected to the Redis Cluster");
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "Redis Cluster not reachable; retrying");
                                tokio::time::sleep(RECONNECT_EVERY).await;
                            }
                        }
                    }
                });
            }
        }
        Ok(L2 {
            target: target.clone(),
            paused_until: AtomicU64::new(0),
            epoch: Instant::now(),
            conn,
            client: client.to_string(),
            metrics: metrics.clone(),
        })
    }

    /// Runs one command within [`CALL_TIMEOUT`]; counts and times it under `op`.
    async fn call<T: FromRedisValue>(&self, op: &str, cmd: &Cmd) -> Option<T> {
        let labels = [self.client.as_str(), op];
        let count_error = || {
            self.metrics
                .cache_l2_errors_total
                .with_label_values(&labels)
                .inc();
        };
        // Redis was unreachable a moment ago: go on without it rather than pay a timeout on
        // every call; the first call after the pause finds out whether it is back.
        if self.paused_until.load(Ordering::Relaxed) > elapsed_ms(self.epoch) {
            return None;
        }
        let Some(conn) = self.conn.load_full() else {
            count_error();
            return None;
        };
        let started = Instant::now();
        let mut conn = (*conn).clone();
        let result = tokio::time::timeout(CALL_TIMEOUT, cmd.query_async::<T>(&mut conn)).await;
        self.metrics
            .cache_l2_duration_seconds
            .with_label_values(&labels)
            .observe(started.elapsed().as_secs_f64());
        let unreachable = match result {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(e)) => {
                tracing::debug!(op, error = %e, "Redis call failed");
                e.is_io_error()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || e.is_timeout()
            }
            Err(_) => {
                tracing::debug!(op, "Redis call timed out");
                true
            }
        };
        count_error();
        if unreachable {
            let until = elapsed_ms(self.epoch) + PAUSE_AFTER_FAILURE.as_millis() as u64;
            self.paused_until.store(until, Ordering::Relaxed);
        }
        None
    }

    /// The value under `key`; `None` when absent or Redis failed.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.call::<Option<Vec<u8>>>("get", redis::cmd("GET").arg(key))
            .await
            .flatten()
    }

    /// Stores `value` for `ttl` (Redis `PX`). Failures are counted, never fatal.
    pub async fn set(&self, key: &str, value: &[u8], ttl: Duration) {
        let ms = ttl.as_millis().max(1) as u64;
        let _: Option<()> = self
            .call(
                "set",
                redis::cmd("SET").arg(key).arg(value).arg("PX").arg(ms),
            )
            .await;
    }

    /// Takes the recompute lock of `key` for `ttl`: `Some(true)` taken, `Some(false)` someone
    /// holds it, `None` Redis failed (then the caller recomputes without it).
    pub async fn lock(&self, key: &str, token: &str, ttl: Duration) -> Option<bool> {
        let ms = ttl.as_millis().max(1) as u64;
        let reply: Option<Option<String>> = self
            .call(
                "lock",
                redis::cmd("SET")
                    .arg(lock_key(key))
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms),
            )
            .await;
        reply.map(|r| r.is_some())
    }

    /// Whether someone holds the recompute lock of `key`; `None` when Redis failed.
    pub async fn is_locked(&self, key: &str) -> Option<bool> {
        self.call::<i64>("lock", redis::cmd("EXISTS").arg(lock_key(key)))
            .await
            .map(|n| n > 0)
    }

    /// Releases the lock if it is still ours (it may have expired and been taken since).
    pub async fn unlock(&self, key: &str, token: &str) {
        const RELEASE: &str =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
        let _: Option<i64> = self
            .call(
                "unlock",
                redis::cmd("EVAL")
                    .arg(RELEASE)
                    .arg(1)
                    .arg(lock_key(key))
                    .arg(token),
            )
            .await;
    }

    /// Removes one key.
    pub async fn unlink(&self, key: &str) -> Option<i64> {
        self.call("unlink", redis::cmd("UNLINK").arg(key)).await
    }

    /// Removes every key starting with `prefix` on every node (every master of a cluster),
    /// with `SCAN` and batched `UNLINK`: an operator's call, so it may take longer than a
    /// request's Redis call. `None` when Redis failed (logged).
    pub async fn unlink_prefix(&self, prefix: &str) -> Option<u64> {
        match super::nodes::unlink_prefix(&self.target, prefix, ADMIN_TIMEOUT).await {
            Ok(removed) => Some(removed),
            Err(e) => {
                tracing::warn!(error = %e, %prefix, "cache invalidation in Redis failed");
                None
            }
        }
    }
}

const LOCK_SUFFIX: &str = ":lock";

fn elapsed_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn lock_key(key: &str) -> String {
    format!("{key}{LOCK_SUFFIX}")
}
