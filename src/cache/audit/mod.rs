//! `bff cache audit`: walks the cache keys in Redis (one node, or every master of a Redis
//! Cluster) with `SCAN`, sorts each client's keys against the loaded policies (live, orphaned,
//! unversioned, foreign, locks; TTL-less and memory on the side), and optionally `UNLINK`s the
//! orphans. The key and value format it reads is the cache contract (`{client}:{route}:v{N}:
//! {shape}:{inputs}`, values starting `BFFC1\n`).
//!
//! The parts: `classify` (what the policies say is live, and what a key is), `tally` (counting
//! and memory sampling per row), `scan` (walking one client's keys on one node), `report` (the
//! result, as printed by `--json`) and `render` (the same as text). Deletion is
//! `cache::nodes`, which L2's prefix invalidation shares.

mod classify;
mod render;
mod report;
mod scan;
mod tally;

use std::time::Duration;

use crate::cache::nodes::{discover, Deleter};
pub use crate::cache::nodes::{Deleted, NodeError, DELETE_BATCH};
use crate::cache::target::RedisTarget;
use crate::policy::Policy;
use classify::plan;
pub use report::{ClientReport, Memory, PrefixRow, Report, RouteReport, Row, Totals};
pub use scan::MAGIC;
use scan::{scan_client, scan_pattern};
use tally::ClientTally;
pub use tally::MEMORY_SAMPLES;

/// What the audit does besides reading.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub delete_orphans: bool,
    /// Bounds every Redis call (connecting included).
    pub timeout: Duration,
}

/// Audits every client of `policies` on the Redis of `target`.
pub async fn audit(
    target: &RedisTarget,
    policies: &[Policy],
    options: &AuditOptions,
) -> Result<Report, NodeError> {
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
