//! cache::key: the key of one request's cached answer, `{client}:{route}:v{version}:{shape}:{inputs}`.
//!
//! The prefix up to the shape is the route's (`Route::key_prefix`): a policy change that
//! renames a field changes the shape, so the new policy never reads an entry of the old shape.
//! The inputs are the request's values the answer depends on, each written as it is when it is
//! plain (`[A-Za-z0-9_.-]`, at most 64 bytes) and as `~` and 16 hex digits of its SHA-256
//! otherwise, so no value can forge another key (`~` is never plain, `:` is always hashed).

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::policy::{Action, CacheScope, Route, Var};

/// Longest input written as it is.
const MAX_PLAIN: usize = 64;

/// The identity part of a `scope: user` key of a request without a credential (an `optional`
/// route): no plain or hashed value looks like it.
pub const ANONYMOUS: &str = "~anon";

/// The template variables a route's answer depends on, in the order of their first use: the
/// fetch paths' and their upstreams' headers', except `{fetch.*}` values, which follow from
/// the others.
pub fn inputs_of(route: &Route) -> Vec<Var> {
    let mut vars: Vec<Var> = Vec::new();
    let Action::Fetch(fetches) = &route.action else {
        return vars;
    };
    let headers = fetches
        .iter()
        .flat_map(|f| f.upstream.headers.iter().map(|(_, t)| t));
    for template in fetches.iter().map(|f| &f.path).chain(headers) {
        for var in template.vars() {
            if !matches!(var, Var::Fetch { .. }) && !vars.contains(var) {
                vars.push(var.clone());
            }
        }
    }
    vars
}

/// The key of one request: the route's prefix, then (for `scope: user`) `identity`, then the
/// value of each of `inputs` (a missing one is written as hashed empty text).
pub fn key<'a>(
    prefix: &str,
    scope: CacheScope,
    identity: Option<&str>,
    inputs: impl IntoIterator<Item = Option<Cow<'a, str>>>,
) -> String {
    let mut key = String::with_capacity(prefix.len() + 64);
    key.push_str(prefix);
    let mut parts = 0;
    if scope == CacheScope::User {
        match identity {
            Some(id) => push_input(&mut key, id),
            None => key.push_str(ANONYMOUS),
        }
        parts += 1;
    }
    for value in inputs {
        if parts > 0 {
            key.push(':');
        }
        push_input(&mut key, value.as_deref().unwrap_or(""));
        parts += 1;
    }
    key
}

fn push_input(key: &mut String, value: &str) {
    let plain = !value.is_empty()
        && value.len() <= MAX_PLAIN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if plain {
        key.push_str(value);
        return;
    }
    key.push('~');
    for byte in &Sha256::digest(value.as_bytes())[..8] {
        key.push_str(&format!("{byte:02x}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(scope: CacheScope, identity: Option<&str>, inputs: &[Option<&str>]) -> String {
        key(
            "mobile:home:v2:3f9a1c2e:",
            scope,
            identity,
            inputs.iter().map(|v| v.map(Cow::Borrowed)),
        )
    }

    #[test]
    fn plain_values_are_readable() {
        assert_eq!(
            k(CacheScope::User, Some("usr_9821"), &[Some("p-1")]),
            "mobile:home:v2:3f9a1c2e:usr_9821:p-1"
        );
        assert_eq!(
            k(
                CacheScope::Shared,
                Some("usr_9821"),
                &[Some("p-1"), Some("3")]
            ),
            "mobile:home:v2:3f9a1c2e:p-1:3",
            "a shared key never holds the identity"
        );
        assert_eq!(k(CacheScope::Shared, None, &[]), "mobile:home:v2:3f9a1c2e:");
        assert_eq!(
            k(CacheScope::User, None, &[Some("x")]),
            "mobile:home:v2:3f9a1c2e:~anon:x"
        );
    }

    #[test]
    fn other_values_are_hashed_and_cannot_forge_a_key() {
        let colon = k(CacheScope::Shared, None, &[Some("a:b")]);
        let split = k(CacheScope::Shared, None, &[Some("a"), Some("b")]);
        assert_ne!(colon, split);
        assert!(colon.starts_with("mobile:home:v2:3f9a1c2e:~"), "{colon}");
        let hashed = &colon["mobile:home:v2:3f9a1c2e:".len()..];
        assert_eq!(hashed.len(), 17);
        assert!(hashed[1..].bytes().all(|b| b.is_ascii_hexdigit()));
        // Nothing plain starts with `~`, and empty, missing and long values are hashed too.
        assert_ne!(
            k(CacheScope::Shared, None, &[Some(hashed)]),
            colon,
            "a value that looks hashed is itself hashed"
        );
        assert_eq!(
            k(CacheScope::Shared, None, &[Some("")]),
            k(CacheScope::Shared, None, &[None])
        );
        let long = "a".repeat(65);
        assert!(k(CacheScope::Shared, None, &[Some(&long)]).contains('~'));
        for hostile in ["../x", "x y", "é", "a\nb", "~anon"] {
            let key = k(CacheScope::User, Some(hostile), &[]);
            assert!(!key.contains(hostile), "{hostile:?} → {key}");
        }
    }
}
