//! cache::audit::render: the audit's report as text, a table per client.

use std::fmt::Write as _;

use super::report::{ClientReport, Memory, Report, Row};
use super::tally::{MAX_ORPHAN_PREFIXES, MAX_UNKNOWN_ROUTES, MEMORY_SAMPLES};
use crate::cache::nodes::DELETE_BATCH;

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
