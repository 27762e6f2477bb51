//! cache::audit::scan: walks one client's keys on one node with `SCAN`, reads each value's
//! first bytes and TTL, counts each key in its row, measures the sampled ones, and hands the
//! orphans to the deleter.

use std::time::Duration;

use redis::Value;

use super::classify::{classify, split_key, ClientPlan, Kind};
use super::tally::ClientTally;
use crate::cache::nodes::{call, escape_glob, Deleter, Node, NodeError};

/// The first line of every value the sidecar stores.
pub const MAGIC: &[u8] = b"BFFC1\n";
/// Keys asked for per `SCAN` call.
const SCAN_COUNT: usize = 1000;

/// One inspected key and the row it counts in.
struct Seen {
    key: Vec<u8>,
    route: Vec<u8>,
    kind: Kind,
    prefix: Option<Vec<u8>>,
    no_ttl: bool,
}

/// Walks one client's keys on one node.
pub(super) async fn scan_client(
    node: &mut Node,
    plan: &ClientPlan,
    tally: &mut ClientTally,
    deleter: &mut Deleter,
    timeout: Duration,
) -> Result<(), NodeError> {
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

/// `SCAN` glob for `{client}:*`, with glob characters in the name escaped.
pub(super) fn scan_pattern(client: &str) -> String {
    format!("{}:*", escape_glob(client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_patterns_escape_glob_characters() {
        assert_eq!(scan_pattern("mobile"), "mobile:*");
        assert_eq!(scan_pattern("a*b?[c]"), "a\\*b\\?\\[c\\]:*");
    }
}
