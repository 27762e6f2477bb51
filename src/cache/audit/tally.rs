//! cache::audit::tally: the rows being counted while keys are walked, with a reservoir per row
//! so memory is measured on a bounded uniform sample, and the walked-keys set that counts each
//! key once.

use std::collections::HashSet;
use std::hash::{BuildHasher as _, RandomState};

use indexmap::IndexMap;
use rand::Rng;

use super::classify::{show, ClientPlan, Kind};
use super::report::{ClientReport, Memory, PrefixRow, RouteReport, Row, Totals};

/// At most this many `MEMORY USAGE` samples per row of the report; rows with more keys are
/// extrapolated from a uniform sample (reservoir sampling) and marked as estimates.
pub const MEMORY_SAMPLES: usize = 1000;
/// Bounds on rows, so a keyspace full of strangers (`mobile:<uuid>`) cannot grow the report
/// without limit; the rest is summed into one overflow row.
pub(super) const MAX_UNKNOWN_ROUTES: usize = 100;
pub(super) const MAX_ORPHAN_PREFIXES: usize = 50;

/// A row being counted, with its memory reservoir.
#[derive(Default)]
pub(super) struct Tally {
    keys: u64,
    no_ttl: u64,
    /// Keys offered to the reservoir (the row's keys whose memory could be measured).
    offered: u64,
    samples: Vec<u64>,
}

/// Where a measured size goes in a row's reservoir.
#[derive(Debug, Clone, Copy)]
pub(super) enum Slot {
    Push,
    Replace(usize),
}

impl Tally {
    pub(super) fn count(&mut self, no_ttl: bool) {
        self.keys += 1;
        self.no_ttl += u64::from(no_ttl);
    }

    /// Reservoir sampling (Algorithm R): every key ends up measured with equal probability.
    /// Decided before the sizes are known (a page's keys are measured in one round trip).
    pub(super) fn offer(&mut self, rng: &mut impl Rng) -> Option<Slot> {
        self.offered += 1;
        if self.offered <= MEMORY_SAMPLES as u64 {
            // Filled when measured; a key gone by then leaves no sample.
            return Some(Slot::Push);
        }
        let pick = rng.random_range(0..self.offered) as usize;
        (pick < MEMORY_SAMPLES).then_some(Slot::Replace(pick))
    }

    pub(super) fn measured(&mut self, slot: Slot, bytes: u64) {
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
pub(super) struct RouteTally {
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
    pub(super) fn tally(&mut self, kind: Kind, prefix: Option<&[u8]>) -> &mut Tally {
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

    pub(super) fn report(&self, route: String) -> RouteReport {
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
pub(super) struct ClientTally {
    pub(super) routes: IndexMap<Vec<u8>, RouteTally>,
    pub(super) unknown_routes: usize,
    pub(super) other_routes: Option<RouteTally>,
    pub(super) skipped: u64,
    pub(super) walked: WalkedKeys,
}

/// The keys a client's walk has already taken, so each is counted (and unlinked) once:
/// `SCAN` may return a key again, e.g. when the keyspace's hash table shrinks between calls.
/// Kept as two independent 64-bit hashes per key (16 bytes, whatever the key's length); two
/// keys agreeing on both is not a practical concern (~n²/2¹²⁹).
pub(super) struct WalkedKeys {
    first: RandomState,
    second: RandomState,
    digests: HashSet<u128>,
}

impl WalkedKeys {
    pub(super) fn new() -> WalkedKeys {
        WalkedKeys {
            first: RandomState::new(),
            second: RandomState::new(),
            digests: HashSet::new(),
        }
    }

    /// True the first time `key` is offered.
    pub(super) fn first_time(&mut self, key: &[u8]) -> bool {
        let digest =
            (u128::from(self.first.hash_one(key)) << 64) | u128::from(self.second.hash_one(key));
        self.digests.insert(digest)
    }
}

impl ClientTally {
    pub(super) fn new(plan: &ClientPlan) -> ClientTally {
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

    pub(super) fn route(&mut self, name: &[u8]) -> &mut RouteTally {
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

    pub(super) fn report(&self, plan: &ClientPlan, pattern: String) -> ClientReport {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
