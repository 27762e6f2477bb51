//! auth::api_key: partner API keys, known only by the SHA-256 hashes of a keys file, each with
//! the name that becomes `{auth.client}` and the rate-limit identity.
//!
//! The keys file has one key per line, `<sha256 hex> <name>`, the way `sha256sum` prints
//! (`printf %s "$KEY" | sha256sum` gives the hash); `#` starts a comment. Several hashes may
//! share a name, so a partner's key can be rotated with both keys valid for a while. The file
//! is re-read when it changes, as Kubernetes rotates mounted secrets.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AuthFailure;
use crate::policy::files::{self, ReadError};
use crate::policy::ApiKeyAuth;

/// A presented key longer than this is refused before hashing.
const MAX_KEY_BYTES: usize = 1024;
/// A keys file larger than this is refused: it holds hashes, not data.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The keys of one keys file.
#[derive(Clone)]
pub struct ApiKeySet {
    keys: Vec<([u8; 32], Arc<str>)>,
    /// The file's bytes, to tell whether it changed.
    text: Arc<[u8]>,
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

/// The API keys a running policy accepts: the loader's set, replaced when the file changes.
pub struct ApiKeys {
    header: HeaderName,
    file: PathBuf,
    set: ArcSwap<ApiKeySet>,
    /// Whether the last read failed, so that a failure that lasts is logged once.
    failing: AtomicBool,
}

impl ApiKeys {
    pub fn new(auth: &ApiKeyAuth) -> ApiKeys {
        ApiKeys {
            header: auth.header.clone(),
            file: auth.keys_file.clone(),
            set: ArcSwap::from_pointee(auth.keys.clone()),
            failing: AtomicBool::new(false),
        }
    }

    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// The presented key's name; `Ok(None)` when the request carries no key header.
    pub fn check(&self, headers: &HeaderMap) -> Result<Option<Arc<str>>, AuthFailure> {
        let mut values = headers.get_all(&self.header).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() || value.is_empty() || value.len() > MAX_KEY_BYTES {
            return Err(AuthFailure::Malformed);
        }
        self.set
            .load()
            .find(value.as_bytes())
            .map(Some)
            .ok_or(AuthFailure::UnknownApiKey)
    }

    /// Re-reads the keys file; a file that changed and cannot be used keeps the last good keys.
    pub fn refresh(&self) {
        let bytes = match files::read(&self.file, MAX_FILE_BYTES) {
            Ok(bytes) => bytes,
            // Missing for a moment while Kubernetes swaps the directory; the next poll sees it.
            Err(ReadError::Unreadable(_)) => return,
            Err(reason) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(file = %self.file.display(), %reason, "API keys file not read again; the last good keys stay in use");
                }
                return;
            }
        };
        self.failing.store(false, Ordering::Relaxed);
        if *bytes == *self.set.load().text {
            return;
        }
        match ApiKeySet::parse(&bytes) {
            Ok(set) => {
                tracing::info!(file = %self.file.display(), keys = set.len(), "API keys reloaded");
                self.set.store(Arc::new(set));
            }
            Err(reason) => tracing::error!(
                file = %self.file.display(),
                %reason,
                "API keys file refused; the last good keys stay in use"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn hash(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The keys of a file written with `text`, and the directory that holds it.
    fn keys(text: &str) -> (tempfile::TempDir, ApiKeys) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, text).unwrap();
        let keys = ApiKeys::new(&ApiKeyAuth {
            header: HeaderName::from_static("x-api-key"),
            keys: ApiKeySet::read(&file).unwrap(),
            keys_file: file,
        });
        (dir, keys)
    }

    fn presented(key: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_bytes(key).unwrap());
        headers
    }

    #[test]
    fn a_listed_key_gives_its_name() {
        let text = format!(
            "# partners\n{}  acme\n{} acme # next key\n\n{} globex\n",
            hash("k1"),
            hash("k2"),
            hash("k3")
        );
        let (_dir, keys) = keys(&text);
        let name = |k: &str| {
            keys.check(&presented(k.as_bytes()))
                .map(|n| n.map(|n| n.to_string()))
        };
        assert_eq!(name("k1"), Ok(Some("acme".into())));
        assert_eq!(name("k2"), Ok(Some("acme".into())));
        assert_eq!(name("k3"), Ok(Some("globex".into())));
        assert_eq!(name("k4"), Err(AuthFailure::UnknownApiKey));
        // The hash itself is not the key.
        assert_eq!(name(&hash("k1")), Err(AuthFailure::UnknownApiKey));
        assert_eq!(keys.check(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn odd_presentations_are_malformed() {
        let (_dir, keys) = keys(&format!("{} acme\n", hash("k1")));
        let mut two = presented(b"k1");
        two.append("x-api-key", HeaderValue::from_static("k1"));
        assert_eq!(keys.check(&two), Err(AuthFailure::Malformed));
        assert_eq!(keys.check(&presented(b"")), Err(AuthFailure::Malformed));
        let long = vec![b'a'; MAX_KEY_BYTES + 1];
        assert_eq!(keys.check(&presented(&long)), Err(AuthFailure::Malformed));
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

    #[test]
    fn refresh_takes_a_good_file_and_keeps_the_keys_over_a_bad_one() {
        let (_dir, keys) = keys(&format!("{} acme\n", hash("k1")));
        std::fs::write(&keys.file, format!("{} globex\n", hash("k2"))).unwrap();
        keys.refresh();
        assert_eq!(
            keys.check(&presented(b"k1")),
            Err(AuthFailure::UnknownApiKey)
        );
        assert_eq!(
            keys.check(&presented(b"k2")).unwrap().as_deref(),
            Some("globex")
        );
        std::fs::write(&keys.file, "garbage\n").unwrap();
        keys.refresh();
        assert_eq!(
            keys.check(&presented(b"k2")).unwrap().as_deref(),
            Some("globex")
        );
        std::fs::remove_file(&keys.file).unwrap();
        keys.refresh();
        assert!(keys.check(&presented(b"k2")).unwrap().is_some());
    }
}
