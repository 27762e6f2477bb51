//! cache::entry: one cached answer (the sections' bytes, their ETag, when it was made, when it
//! expires, how long it took to make), its byte form in Redis, and how fresh it is now
//! (XFetch's probabilistic early expiry).
//!
//! The byte form is `BFFC1\n{header JSON}\n{sections}`: readable with `redis-cli`, and a value
//! without the magic (foreign or corrupted) reads as a miss.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::sections::Sections;

const MAGIC: &[u8] = b"BFFC1\n";

/// A cached answer of one route for one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub version: u32,
    pub shape: String,
    /// A strong ETag over the sections: `"` + 16 hex digits + `"`.
    pub etag: String,
    pub created_ms: u64,
    /// The logical expiry; the entry is kept longer, for `stale_while_revalidate`.
    pub expires_ms: u64,
    /// How long the recompute that made it took: XFetch's `delta`.
    pub delta_ms: u64,
    pub sections: Sections,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    version: u32,
    shape: String,
    etag: String,
    created_ms: u64,
    expires_ms: u64,
    delta_ms: u64,
    degraded: Vec<String>,
}

/// How an entry may be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it.
    Fresh,
    /// Serve it, and recompute it in the background: XFetch drew an early expiry.
    Early,
    /// Past its expiry but inside `stale_while_revalidate`: serve it, refresh in the background.
    Stale,
    /// Too old to serve.
    Expired,
}

impl Entry {
    pub fn new(
        version: u32,
        shape: &str,
        sections: Sections,
        now_ms: u64,
        ttl: Duration,
        delta: Duration,
    ) -> Entry {
        Entry {
            version,
            shape: shape.to_string(),
            etag: etag(&sections.json),
            created_ms: now_ms,
            expires_ms: now_ms.saturating_add(millis(ttl)),
            delta_ms: millis(delta),
            sections,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let header = Header {
            version: self.version,
            shape: self.shape.clone(),
            etag: self.etag.clone(),
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            delta_ms: self.delta_ms,
            degraded: self.sections.degraded.clone(),
        };
        let mut out = Vec::with_capacity(MAGIC.len() + 160 + self.sections.json.len());
        out.extend_from_slice(MAGIC);
        // Serialising strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &header);
        out.push(b'\n');
        out.extend_from_slice(&self.sections.json);
        out
    }

    /// `None` for anything this sidecar did not write: no magic, a bad header.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let rest = bytes.strip_prefix(MAGIC)?;
        let newline = rest.iter().position(|b| *b == b'\n')?;
        let header: Header = serde_json::from_slice(&rest[..newline]).ok()?;
        let json = Bytes::copy_from_slice(&rest[newline + 1..]);
        // The ETag is recomputed rather than trusted, so damaged bytes cannot keep a tag.
        if etag(&json) != header.etag {
            return None;
        }
        Some(Entry {
            version: header.version,
            shape: header.shape,
            etag: header.etag,
            created_ms: header.created_ms,
            expires_ms: header.expires_ms,
            delta_ms: header.delta_ms,
            sections: Sections {
                json,
                degraded: header.degraded,
            },
        })
    }

    /// XFetch (Vattani et al., VLDB 2015): an entry counts as expired early when
    /// `now − delta·beta·ln(draw) ≥ expiry`, `draw` uniform in (0, 1]; the closer the expiry
    /// and the longer the recompute, the likelier. One request recomputes early in the
    /// background, so no expiry turns into a stampede.
    pub fn freshness(&self, now_ms: u64, beta: f64, stale_for: Duration, draw: f64) -> Freshness {
        if now_ms >= self.expires_ms {
            let stale_until = self.expires_ms.saturating_add(millis(stale_for));
            return if now_ms < stale_until {
                Freshness::Stale
            } else {
                Freshness::Expired
            };
        }
        let draw = draw.clamp(f64::MIN_POSITIVE, 1.0);
        let gap = -(self.delta_ms as f64) * beta * draw.ln();
        if now_ms as f64 + gap >= self.expires_ms as f64 {
            Freshness::Early
        } else {
            Freshness::Fresh
        }
    }

    /// Bytes it holds in memory, roughly: what L1 counts against its bound.
    pub fn weight(&self) -> u32 {
        let degraded: usize = self.sections.degraded.iter().map(String::len).sum();
        u32::try_from(self.sections.json.len() + degraded + 160).unwrap_or(u32::MAX)
    }
}

/// `"` + 16 hex digits of the SHA-256 of the sections + `"`.
pub fn etag(sections: &[u8]) -> String {
    let mut tag = String::with_capacity(18);
    tag.push('"');
    for byte in &Sha256::digest(sections)[..8] {
        tag.push_str(&format!("{byte:02x}"));
    }
    tag.push('"');
    tag
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(degraded: &[&str]) -> Entry {
        Entry::new(
            2,
            "3f9a1c2e",
            Sections {
                json: Bytes::from_static(br#""user":{"id":1},"tips":[]"#),
                degraded: degraded.iter().map(|s| s.to_string()).collect(),
            },
            1_000_000,
            Duration::from_secs(60),
            Duration::from_millis(40),
        )
    }

    #[test]
    fn encode_decode_round_trip() {
        for e in [entry(&[]), entry(&["tips"])] {
            let bytes = e.encode();
            assert!(bytes.starts_with(b"BFFC1\n{\"version\":2,\"shape\":\"3f9a1c2e\""));
            assert_eq!(Entry::decode(&bytes), Some(e));
        }
        assert_eq!(entry(&[]).expires_ms, 1_060_000);
        assert_eq!(entry(&[]).etag.len(), 18);
    }

    #[test]
    fn foreign_or_damaged_bytes_are_no_entry() {
        let good = entry(&[]).encode();
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        for bad in [
            &b""[..],
            b"hello",
            b"BFFC1\n",
            b"BFFC1\n{}\n",
            b"BFFC1\nnot json\n\"a\":1",
            b"BFFC2\n{}\n",
            &good[..good.len() - 3],
            &flipped,
            &[0xff; 64],
        ] {
            assert_eq!(
                Entry::decode(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn freshness_follows_expiry_the_stale_window_and_the_draw() {
        let e = entry(&[]);
        let swr = Duration::from_secs(30);
        // Far from expiry, even the unluckiest draw is fresh (40 ms · ln(1e-9) ≈ 0.8 s).
        assert_eq!(e.freshness(1_000_000, 1.0, swr, 1e-9), Freshness::Fresh);
        // Close to expiry: a small draw recomputes early, a large one does not.
        assert_eq!(e.freshness(1_059_990, 1.0, swr, 0.01), Freshness::Early);
        assert_eq!(e.freshness(1_059_990, 1.0, swr, 0.99), Freshness::Fresh);
        // beta 0 never recomputes early; a draw of 0 is treated as the smallest one.
        assert_eq!(e.freshness(1_059_999, 0.0, swr, 1e-9), Freshness::Fresh);
        assert_eq!(e.freshness(1_059_990, 1.0, swr, 0.0), Freshness::Early);
        assert_eq!(e.freshness(1_060_000, 1.0, swr, 0.5), Freshness::Stale);
        assert_eq!(e.freshness(1_089_999, 1.0, swr, 0.5), Freshness::Stale);
        assert_eq!(e.freshness(1_090_000, 1.0, swr, 0.5), Freshness::Expired);
        assert_eq!(
            e.freshness(1_060_000, 1.0, Duration::ZERO, 0.5),
            Freshness::Expired
        );
    }

    #[test]
    fn early_recompute_gets_likelier_towards_expiry() {
        let e = entry(&[]);
        let share = |now: u64| {
            let early = (1..=1000)
                .filter(|i| {
                    let draw = *i as f64 / 1000.0;
                    e.freshness(now, 1.0, Duration::ZERO, draw) == Freshness::Early
                })
                .count();
            early as f64 / 1000.0
        };
        let (far, near, nearer) = (share(1_059_800), share(1_059_960), share(1_059_995));
        assert!(far < near && near < nearer, "{far} {near} {nearer}");
        assert!(far < 0.01 && nearer > 0.8, "{far} {nearer}");
    }
}
