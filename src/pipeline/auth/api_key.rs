//! auth::api_key: partner API keys checked against the keys file's hashes (see
//! `policy::api_keys` for the file), each key giving the name that becomes `{auth.client}` and
//! the rate-limit identity. The file is re-read when it changes, as Kubernetes rotates mounted
//! secrets.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName};

use super::failure::AuthFailure;
use crate::policy::api_keys::{ApiKeySet, MAX_FILE_BYTES};
use crate::policy::files::{self, ReadError};
use crate::policy::ApiKeyAuth;

/// A presented key longer than this is refused before hashing.
const MAX_KEY_BYTES: usize = 1024;
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
    use sha2::{Digest, Sha256};

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
