//! cache::audit::classify: what the loaded policies say is live for each client, and what one
//! key is against that (live, orphan, unversioned, foreign, lock), read as the cache contract
//! says (`{client}:{route}:v{N}:{shape}:{inputs}`).

use std::fmt::Write as _;

use indexmap::IndexMap;

use crate::policy::{Action, Policy};

/// One client's routes across every policy file given for it (during a rolling deploy the old
/// and the new policy are both live, so both files may be passed).
pub(super) struct ClientPlan {
    pub(super) client: String,
    pub(super) policies: Vec<String>,
    /// Route name → its live `v{N}:{shape}` prefixes and whether it caches.
    pub(super) routes: IndexMap<String, LiveRoute>,
}

#[derive(Default)]
pub(super) struct LiveRoute {
    pub(super) prefixes: Vec<String>,
    pub(super) cached: bool,
}

pub(super) fn plan(policies: &[Policy]) -> Vec<ClientPlan> {
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

/// A key split as the contract says, after its `{client}:`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct KeyParts<'k> {
    pub(super) route: &'k [u8],
    /// `v{N}:{shape}` when the third field is `v` + digits and the key goes on after the shape.
    pub(super) prefix: Option<&'k [u8]>,
    /// Shaped like `{key}:lock` of a versioned key.
    pub(super) lock_shaped: bool,
}

pub(super) fn split_key(rest: &[u8]) -> KeyParts<'_> {
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
pub(super) enum Kind {
    Live,
    Orphan,
    Unversioned,
    Foreign,
    Lock,
}

/// The row a key counts in: its route (by name as in the key), kind, and prefix for live and
/// orphan rows.
pub(super) fn classify<'k>(
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
pub(super) fn show(bytes: &[u8]) -> String {
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
    fn odd_bytes_show_escaped_and_cut() {
        assert_eq!(show(b"ok-name_1"), "ok-name_1");
        assert_eq!(show(b"a\xff\n\\b"), "a\\xff\\x0a\\x5cb");
        assert_eq!(show(&[b'x'; 200]).chars().count(), 121);
    }
}
