//! cache::audit::report: the audit's result, one row per route, kind of key and prefix; what
//! `--json` prints and `render` draws.

use serde::Serialize;

use crate::cache::nodes::Deleted;

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

impl Memory {
    pub(super) fn add(&mut self, other: Memory) {
        self.bytes += other.bytes;
        self.estimated |= other.estimated;
        self.sampled += other.sampled;
    }
}

impl Row {
    pub(super) fn add(&mut self, other: &Row) {
        self.keys += other.keys;
        self.no_ttl += other.no_ttl;
        self.memory.add(other.memory);
    }
}

impl Totals {
    pub(super) fn add_route(&mut self, route: &RouteReport) {
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

    pub(super) fn add(&mut self, other: &Totals) {
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
