//! The keys file of `auth.api_key`, as the policy holds it: partner API keys known only by
//! their SHA-256 hashes, each with the name that becomes `{auth.client}`.
//!
//! The keys file has one key per line, `<sha256 hex> <name>`, the way `sha256sum` prints
//! (`printf %s "$KEY" | sha256sum` gives the hash); `#` starts a comment. Several hashes may
//! share a name, so a partner's key can be rotated with both keys valid for a while.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::files::{self, ReadError};

/// A keys file larger than this is refused: it holds hashes, not data.
pub(crate) const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The keys of one keys file.
#[derive(Clone)]
pub struct ApiKeySet {
    keys: Vec<([u8; 32], Arc<str>)>,
    /// The file's bytes, to tell whether it changed.
    pub(crate) text: Arc<[u8]>,
}

/// Why a keys file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("keys file `{file}`: {reason}")]
pub struct ApiKeyError {
    pub file: String,
    pub reason: String,
}

impl ApiKeySet {
    pub fn read(path: &Path) -> Result<ApiKeySet, ApiKeyError> {
        let fail = |reason: String| ApiKeyError {
            file: path.display().to_string(),
            reason,
        };
        let bytes = read_keys_file(path).map_err(fail)?;
        ApiKeySet::parse(&bytes).map_err(fail)
    }

    pub fn parse(bytes: &[u8]) -> Result<ApiKeySet, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
        let mut keys: Vec<([u8; 32], Arc<str>)> = Vec::new();
        for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l)) {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(hash), Some(name), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!(
                    "line {number}: write `<sha256 hex> <name>` (the hash of the key, not the key)"
                ));
            };
            let hash = parse_hash(hash).ok_or_else(|| {
                format!("line {number}: `{hash}` is not a SHA-256 hash (64 hex digits)")
            })?;
            let name_ok = name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !name_ok {
                return Err(format!(
                    "line {number}: name `{name}` must be at most 64 letters, digits, `-`, `_` or `.`"
                ));
            }
            if keys.iter().any(|(h, _)| *h == hash) {
                return Err(format!("line {number}: this hash is listed twice"));
            }
            keys.push((hash, Arc::from(name)));
        }
        if keys.is_empty() {
            return Err("lists no key".into());
        }
        Ok(ApiKeySet {
            keys,
            text: Arc::from(bytes),
        })
    }

    /// The name of the presented key. Every listed hash is compared, in constant time, so
    /// neither the answer's timing nor its path tells how close a guess came.
    pub fn find(&self, presented: &[u8]) -> Option<Arc<str>> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for (hash, name) in &self.keys {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(name.clone());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for ApiKeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeySet({} keys)", self.keys.len())
    }
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

/// The keys file's bytes, bounded and timed (see `policy::files`).
fn read_keys_file(path: &Path) -> Result<Vec<u8>, String> {
    files::read(path, MAX_FILE_BYTES).map_err(|e| match e {
        ReadError::Unreadable(e) => format!("cannot read it: {e}"),
        e => e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn bad_files_say_which_line() {
        let h = hash("k");
        for (text, expect) in [
            ("".to_string(), "lists no key"),
            ("# only a comment\n".to_string(), "lists no key"),
            (format!("{h}\n"), "line 1: write"),
            (format!("{h} a b\n"), "line 1: write"),
            (
                "k1 acme\n".to_string(),
                "line 1: `k1` is not a SHA-256 hash",
            ),
            (format!("{} acme\n", &h[..63]), "is not a SHA-256 hash"),
            (format!("{}zz acme\n", &h[..62]), "is not a SHA-256 hash"),
            (format!("\n{h} ac/me\n"), "line 2: name `ac/me`"),
            (
                format!("{h} a\n{h} b\n"),
                "line 2: this hash is listed twice",
            ),
        ] {
            let err = ApiKeySet::parse(text.as_bytes()).unwrap_err();
            assert!(err.contains(expect), "{text:?}: {err}");
        }
        assert!(ApiKeySet::parse(b"\xff\xfe").is_err());
        let err = ApiKeySet::read(Path::new("/nonexistent/keys")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/keys"), "{err}");
    }
}
