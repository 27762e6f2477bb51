//! auth::jwt::keys: where the keys that verify client tokens come from, and how they are kept
//! fresh: the policy's `hs256_secret`, a `jwks_file`, or a `jwks_url` (fetched with a 2 s
//! timeout and a 1 MiB bound). Only the JWKS entries usable for verifying signatures are kept
//! (never an `oct` key). Keys sit behind an [`ArcSwap`]: a failed reload keeps the last good
//! set, and an unknown `kid` triggers at most one JWKS refetch per 30 s.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::ACCEPT;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::super::failure::AuthFailure;
use crate::policy::KeySource;
use crate::upstream::error_chain;

/// The largest JWKS document read, from a URL or a file.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Bounds one JWKS fetch: connect, request and body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one on-demand JWKS refetch (for an unknown `kid`) per this interval, so a client
/// sending random key ids cannot make the sidecar fetch on every request.
const REFETCH_FLOOR: Duration = Duration::from_secs(30);

/// Where the keys come from: the policy's `hs256_secret`, a `jwks_file` or a `jwks_url`.
enum Source {
    Secret(DecodingKey),
    File(PathBuf),
    Url {
        url: String,
        client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    },
}

/// One usable signing key of the JWKS.
pub(super) struct Key {
    kid: Option<String>,
    /// The key's own `alg`, when it names one.
    alg: Option<Algorithm>,
    curve: Option<EllipticCurve>,
    pub(super) key: DecodingKey,
    /// The SHA-256 of the JWK as parsed, to tell whether a reload changed the set.
    fingerprint: [u8; 32],
}

/// Why the key set could not be loaded; the previous keys stay in use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot load the JWT keys from {location}: {reason}")]
pub struct KeyLoadError {
    /// The JWKS URL or file.
    pub location: String,
    pub reason: String,
}

/// The keys tokens are verified with, and their source: loaded and reloaded here, read by
/// the [`Verifier`](super::Verifier).
pub(super) struct Keys {
    source: Source,
    /// The JWKS keys (empty until loaded; unused with an HS256 secret).
    set: ArcSwap<Vec<Key>>,
    /// When the last on-demand refetch started; held while it runs.
    refetch: tokio::sync::Mutex<Option<Instant>>,
    /// Bumped whenever the key set changes (see `Verifier::verify_token`).
    pub(super) generation: AtomicU64,
}

impl Keys {
    /// No I/O: the JWKS is read by [`Keys::load`].
    pub(super) fn new(source: &KeySource) -> Keys {
        let source = match source {
            KeySource::Hs256Secret(secret) => {
                Source::Secret(DecodingKey::from_secret(secret.as_bytes()))
            }
            KeySource::JwksFile(path) => Source::File(path.clone()),
            KeySource::JwksUrl(url) => Source::Url {
                url: url.clone(),
                client: Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .build(crate::upstream::tls::system_connector()),
            },
        };
        Keys {
            source,
            set: ArcSwap::from_pointee(Vec::new()),
            refetch: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }

    /// The policy's `hs256_secret`, when that is the source.
    pub(super) fn secret(&self) -> Option<&DecodingKey> {
        match &self.source {
            Source::Secret(secret) => Some(secret),
            Source::File(_) | Source::Url { .. } => None,
        }
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Fetches (`jwks_url`: 2 s timeout, 1 MiB body bound) or reads (`jwks_file`) the key set;
    /// an HS256 secret needs nothing. A failed load keeps the previous keys. `Ok(true)`: the
    /// set changed.
    pub(super) async fn load(&self) -> Result<bool, KeyLoadError> {
        let (location, document) = match &self.source {
            Source::Secret(_) => return Ok(false),
            Source::File(path) => (path.display().to_string(), read_bounded(path).await),
            Source::Url { url, client } => (url.clone(), fetch(client, url).await),
        };
        let keys = document
            .and_then(|bytes| parse_jwks(&bytes))
            .map_err(|reason| KeyLoadError { location, reason })?;
        tracing::debug!(keys = keys.len(), "JWT keys loaded");
        let previous = self.set.swap(Arc::new(keys));
        if fingerprints(&previous) == fingerprints(&self.set.load()) {
            return Ok(false);
        }
        // A removed key must stop validating its tokens at once: bumped after the swap, so
        // a verification that read the old generation may have used the old keys, and one
        // that reads the new generation uses the new keys.
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    /// Starts with the keys `previous` holds (same key source).
    pub(super) fn take_of(&self, previous: &Keys) {
        self.set.store(previous.set.load_full());
    }

    /// True once keys are usable (always for an HS256 secret).
    pub(super) fn has_keys(&self) -> bool {
        matches!(self.source, Source::Secret(_)) || !self.set.load().is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.set.load().len()
    }

    /// The key for `kid` that fits `alg`, refetching the JWKS (URL only) once for an unknown
    /// `kid` unless a refetch ran within the floor; `changed` runs when a refetch changed the
    /// set.
    pub(super) async fn find(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        changed: impl FnOnce(),
    ) -> Result<(Arc<Vec<Key>>, usize), AuthFailure> {
        let keys = self.set.load_full();
        match pick(&keys, kid, alg) {
            Pick::Found(at) => return Ok((keys, at)),
            Pick::Unfit => return Err(AuthFailure::DisallowedAlg),
            Pick::Missing => {}
        }
        let (Source::Url { url, .. }, Some(_)) = (&self.source, kid) else {
            return Err(AuthFailure::UnknownKey);
        };
        let mut last = self.refetch.lock().await;
        // A refetch that finished while we waited may have brought the key.
        let mut keys = self.set.load_full();
        let mut found = pick(&keys, kid, alg);
        if matches!(found, Pick::Missing) && last.is_none_or(|t| t.elapsed() >= REFETCH_FLOOR) {
            *last = Some(Instant::now());
            tracing::info!(jwks = %url, "unknown JWT key id: refetching the JWKS");
            match self.load().await {
                Ok(true) => changed(),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "JWKS refetch failed; keeping the previous keys")
                }
            }
            keys = self.set.load_full();
            found = pick(&keys, kid, alg);
        }
        match found {
            Pick::Found(at) => Ok((keys, at)),
            Pick::Unfit => Err(AuthFailure::DisallowedAlg),
            Pick::Missing => Err(AuthFailure::UnknownKey),
        }
    }
}

impl fmt::Display for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Secret(_) => write!(f, "hs256_secret"),
            Source::File(path) => write!(f, "jwks_file {}", path.display()),
            Source::Url { url, .. } => write!(f, "jwks_url {url}"),
        }
    }
}

/// The keys' fingerprints in a stable order, so two loads of the same set compare equal.
fn fingerprints(keys: &[Key]) -> Vec<[u8; 32]> {
    let mut fingerprints: Vec<[u8; 32]> = keys.iter().map(|key| key.fingerprint).collect();
    fingerprints.sort_unstable();
    fingerprints
}

enum Pick {
    Found(usize),
    /// A key has this id, but none of them fits the token's algorithm.
    Unfit,
    Missing,
}

/// By `kid`; a token without one may use the only key of a one-key set.
fn pick(keys: &[Key], kid: Option<&str>, alg: Algorithm) -> Pick {
    let mut candidates = keys
        .iter()
        .enumerate()
        .filter(|(_, key)| match kid {
            Some(kid) => key.kid.as_deref() == Some(kid),
            None => keys.len() == 1,
        })
        .peekable();
    if candidates.peek().is_none() {
        return Pick::Missing;
    }
    match candidates.find(|(_, key)| key.fits(alg)) {
        Some((at, _)) => Pick::Found(at),
        None => Pick::Unfit,
    }
}

impl Key {
    /// The key's kind (and its own `alg` and curve, when given) must match the token's alg.
    fn fits(&self, alg: Algorithm) -> bool {
        let curve = match alg {
            Algorithm::ES256 => Some(EllipticCurve::P256),
            Algorithm::ES384 => Some(EllipticCurve::P384),
            Algorithm::EdDSA => Some(EllipticCurve::Ed25519),
            _ => None,
        };
        self.key.family() == alg.family()
            && self.alg.is_none_or(|own| own == alg)
            && self.curve == curve
    }

    /// A JWKS entry usable for verifying signatures: never an `oct` (HMAC) key, an encryption
    /// key or an unsupported curve; checked by the crypto backend now rather than per request.
    fn from_jwk(jwk: &Jwk) -> Option<Key> {
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            return None;
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
            Some(KeyAlgorithm::RS384) => Some(Algorithm::RS384),
            Some(KeyAlgorithm::RS512) => Some(Algorithm::RS512),
            Some(KeyAlgorithm::PS256) => Some(Algorithm::PS256),
            Some(KeyAlgorithm::PS384) => Some(Algorithm::PS384),
            Some(KeyAlgorithm::PS512) => Some(Algorithm::PS512),
            Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
            Some(KeyAlgorithm::ES384) => Some(Algorithm::ES384),
            Some(KeyAlgorithm::EdDSA) => Some(Algorithm::EdDSA),
            Some(_) => return None,
        };
        let (curve, probe) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (None, Algorithm::RS256),
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => (Some(EllipticCurve::P256), Algorithm::ES256),
                EllipticCurve::P384 => (Some(EllipticCurve::P384), Algorithm::ES384),
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                (Some(EllipticCurve::Ed25519), Algorithm::EdDSA)
            }
            AlgorithmParameters::OctetKeyPair(_) | AlgorithmParameters::OctetKey(_) => return None,
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        // The Ed25519 verifier slices the first 32 bytes unchecked.
        if probe == Algorithm::EdDSA && key.as_bytes().len() != 32 {
            return None;
        }
        // Building a verifier validates an EC or Ed25519 point (an empty signature never
        // verifies; only an error means the key itself is bad).
        jsonwebtoken::crypto::verify("", b"", &key, probe).ok()?;
        let kid = jwk.common.key_id.clone();
        let fingerprint = Sha256::digest(serde_json::to_vec(jwk).ok()?).into();
        Some(Key {
            kid,
            alg,
            curve,
            key,
            fingerprint,
        })
    }
}

/// The usable signing keys of a JWKS document; entries this sidecar cannot use are skipped.
fn parse_jwks(bytes: &[u8]) -> Result<Vec<Key>, String> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let keys: Vec<Key> = document
        .keys
        .into_iter()
        .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
        .filter_map(|jwk| Key::from_jwk(&jwk))
        .collect();
    if keys.is_empty() {
        return Err("the JWKS holds no usable signing key".to_owned());
    }
    Ok(keys)
}

/// The JWKS file, bounded and off the async loop: a file that hangs fails this load (the
/// keys in use stay) instead of holding up the policy watch.
async fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    crate::policy::files::read_off_loop(path, MAX_JWKS_BYTES as u64)
        .await
        .map_err(|e| e.to_string())
}

async fn fetch(
    client: &Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    url: &str,
) -> Result<Vec<u8>, String> {
    let request = http::Request::get(url)
        .header(ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| format!("invalid URL: {e}"))?;
    let exchange = async {
        let response = client.request(request).await.map_err(|e| error_chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {}", error_chain(e.as_ref())))?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{json, Value};

    use super::super::test_support::*;
    use super::super::Verifier;
    use super::*;
    use crate::policy::Algorithm as P;

    #[test]
    fn fixture_jwks_matches_the_private_keys() {
        let jwks: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
        let published = |kid: &str| {
            jwks["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|k| k["kid"] == kid)
                .unwrap()
                .clone()
        };
        let rsa = Jwk::from_encoding_key(
            &EncodingKey::from_rsa_pem(&read("rsa_private.pem")).unwrap(),
            Algorithm::RS256,
        )
        .unwrap();
        let rsa = serde_json::to_value(rsa).unwrap();
        assert_eq!(
            (&rsa["n"], &rsa["e"]),
            (&published("rsa-1")["n"], &published("rsa-1")["e"])
        );
        let ec = Jwk::from_encoding_key(
            &EncodingKey::from_ec_pem(&read("ec_private.pem")).unwrap(),
            Algorithm::ES256,
        )
        .unwrap();
        let ec = serde_json::to_value(ec).unwrap();
        assert_eq!(
            (&ec["x"], &ec["y"], &ec["crv"]),
            (
                &published("ec-1")["x"],
                &published("ec-1")["y"],
                &published("ec-1")["crv"]
            )
        );
    }

    #[tokio::test]
    async fn unknown_kid_with_a_jwks_file() {
        let verifier = file_verifier(&[P::RS256, P::ES256]).await;
        let token = sign(Algorithm::RS256, Some("rsa-2"), &claims(json!({})));
        assert_eq!(check(&verifier, &token).await, Err(AuthFailure::UnknownKey));
        // Without a kid, a set of two keys gives no choice.
        let token = sign(Algorithm::RS256, None, &claims(json!({})));
        assert_eq!(check(&verifier, &token).await, Err(AuthFailure::UnknownKey));
    }

    #[tokio::test]
    async fn a_single_key_set_serves_tokens_without_kid() {
        let dir = tempfile::tempdir().unwrap();
        let jwks: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({"keys": [jwks["keys"][1]]}).to_string()).unwrap();
        let verifier = Verifier::new(&jwt_auth(&[P::ES256], KeySource::JwksFile(path)));
        verifier.load_keys().await.unwrap();
        let token = sign(Algorithm::ES256, None, &claims(json!({})));
        assert!(check(&verifier, &token).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn jwks_entries_that_cannot_verify_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let jwks: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
        let oct =
            json!({"kty": "oct", "kid": "hmac", "alg": "HS256", "k": b64url(SECRET.as_bytes())});
        let enc = json!({"kty": "RSA", "kid": "enc", "use": "enc", "alg": "RSA-OAEP", "n": jwks["keys"][0]["n"], "e": "AQAB"});
        let odd_curve = json!({"kty": "EC", "kid": "k1", "crv": "secp256k1", "x": "AA", "y": "AA"});
        let bad_point =
            json!({"kty": "EC", "kid": "bad", "crv": "P-256", "x": "AAAA", "y": "AAAA"});
        let short_ed = json!({"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AAAA"});
        let garbage = json!({"kty": 7});
        let unusable = [oct.clone(), enc, odd_curve, bad_point, short_ed, garbage];
        std::fs::write(&path, json!({"keys": unusable}).to_string()).unwrap();
        let verifier = Verifier::new(&jwt_auth(
            &[P::RS256, P::HS256],
            KeySource::JwksFile(path.clone()),
        ));
        let err = verifier.load_keys().await.unwrap_err();
        assert!(err.to_string().contains("no usable signing key"), "{err}");
        assert!(!verifier.has_keys());
        // Alongside a good key the others are ignored: the `oct` key never verifies HS256.
        std::fs::write(&path, json!({"keys": [oct, jwks["keys"][0]]}).to_string()).unwrap();
        verifier.load_keys().await.unwrap();
        let hs = jsonwebtoken::encode(
            &Header {
                kid: Some("hmac".into()),
                ..Header::new(Algorithm::HS256)
            },
            &claims(json!({})),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(check(&verifier, &hs).await, Err(AuthFailure::DisallowedAlg));
        let rs = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        assert!(check(&verifier, &rs).await.is_ok());
    }

    #[tokio::test]
    async fn missing_or_unreadable_jwks_file_names_the_file() {
        let verifier = Verifier::new(&jwt_auth(
            &[P::RS256],
            KeySource::JwksFile("/nonexistent/jwks.json".into()),
        ));
        let err = verifier.load_keys().await.unwrap_err();
        assert_eq!(err.location, "/nonexistent/jwks.json");
        assert!(err.to_string().contains("/nonexistent/jwks.json"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, "{not json").unwrap();
        let verifier = Verifier::new(&jwt_auth(&[P::RS256], KeySource::JwksFile(path)));
        let err = verifier.load_keys().await.unwrap_err();
        assert!(err.reason.contains("not a JWKS document"), "{err}");
    }

    /// A JWKS endpoint on loopback that counts its requests; the reply can be changed.
    struct JwksServer {
        url: String,
        hits: Arc<AtomicUsize>,
        reply: Arc<Mutex<(u16, Bytes)>>,
    }

    impl JwksServer {
        async fn start(body: Vec<u8>) -> JwksServer {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!(
                "http://{}/.well-known/jwks.json",
                listener.local_addr().unwrap()
            );
            let hits = Arc::new(AtomicUsize::new(0));
            let reply = Arc::new(Mutex::new((200, Bytes::from(body))));
            let (hits2, reply2) = (hits.clone(), reply.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (hits, reply) = (hits2.clone(), reply2.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |_request| {
                            hits.fetch_add(1, Ordering::SeqCst);
                            let (status, body) = reply.lock().unwrap().clone();
                            let response = http::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(body))
                                .unwrap();
                            async move { Ok::<_, Infallible>(response) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            JwksServer { url, hits, reply }
        }

        fn set(&self, status: u16, body: impl Into<Bytes>) {
            *self.reply.lock().unwrap() = (status, body.into());
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    fn url_verifier(url: &str) -> Verifier {
        Verifier::new(&jwt_auth(
            &[P::RS256, P::ES256],
            KeySource::JwksUrl(url.to_owned()),
        ))
    }

    #[tokio::test]
    async fn jwks_url_is_fetched_and_a_failed_refresh_keeps_the_keys() {
        let server = JwksServer::start(read("jwks.json")).await;
        let verifier = url_verifier(&server.url);
        assert!(!verifier.has_keys());
        verifier.load_keys().await.unwrap();
        assert!(verifier.has_keys());
        let token = sign(Algorithm::ES256, Some("ec-1"), &claims(json!({})));
        assert!(check(&verifier, &token).await.unwrap().is_some());

        for (status, body) in [
            (500, &b"oops"[..]),
            (200, &b"<html>"[..]),
            (200, &br#"{"keys":[]}"#[..]),
        ] {
            server.set(status, body);
            let err = verifier.load_keys().await.unwrap_err();
            assert_eq!(err.location, server.url);
            assert!(err.to_string().contains(&server.url), "{err}");
            assert!(verifier.has_keys());
            assert!(check(&verifier, &token).await.unwrap().is_some(), "{err}");
        }
        assert_eq!(server.hits(), 4);
    }

    #[tokio::test]
    async fn unknown_kid_refetches_at_most_once_per_floor() {
        // The server starts with only the EC key; the RSA key "rotates in" later.
        let jwks: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
        let server =
            JwksServer::start(json!({"keys": [jwks["keys"][1]]}).to_string().into_bytes()).await;
        let verifier = url_verifier(&server.url);
        verifier.load_keys().await.unwrap();
        assert_eq!(server.hits(), 1);

        server.set(200, read("jwks.json"));
        let token = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        assert!(check(&verifier, &token).await.unwrap().is_some());
        assert_eq!(server.hits(), 2, "the unknown kid refetched the set");
        assert!(check(&verifier, &token).await.unwrap().is_some());
        assert_eq!(server.hits(), 2, "a known kid needs no fetch");

        // Random kids: no fetch within the floor, whatever the number of attempts.
        for i in 0..20 {
            let stranger = sign(
                Algorithm::RS256,
                Some(&format!("nope-{i}")),
                &claims(json!({})),
            );
            assert_eq!(
                check(&verifier, &stranger).await,
                Err(AuthFailure::UnknownKey)
            );
        }
        assert_eq!(server.hits(), 2);
        // Once the floor has passed, one more refetch is allowed.
        *verifier.keys.refetch.lock().await = Instant::now().checked_sub(REFETCH_FLOOR);
        let stranger = sign(Algorithm::RS256, Some("nope"), &claims(json!({})));
        assert_eq!(
            check(&verifier, &stranger).await,
            Err(AuthFailure::UnknownKey)
        );
        assert_eq!(server.hits(), 3);
    }

    #[tokio::test]
    async fn concurrent_unknown_kids_share_one_refetch() {
        let server = JwksServer::start(read("jwks.json")).await;
        let verifier = Arc::new(url_verifier(&server.url));
        verifier.load_keys().await.unwrap();
        let stranger = sign(Algorithm::RS256, Some("nope"), &claims(json!({})));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (verifier, stranger) = (verifier.clone(), stranger.clone());
                tokio::spawn(async move { check(&verifier, &stranger).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Err(AuthFailure::UnknownKey));
        }
        assert_eq!(server.hits(), 2);
    }

    #[tokio::test]
    async fn jwks_body_is_bounded() {
        let big = format!(r#"{{"keys":[],"pad":"{}"}}"#, "x".repeat(MAX_JWKS_BYTES));
        let server = JwksServer::start(big.into_bytes()).await;
        let verifier = url_verifier(&server.url);
        let err = verifier.load_keys().await.unwrap_err();
        assert!(err.reason.contains("length limit"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_or_silent_jwks_url_fails_in_time() {
        // Nothing listens on a port we just released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/jwks.json");
        let err = url_verifier(&url).load_keys().await.unwrap_err();
        assert_eq!(err.location, url);
        // A listener that never answers: the fetch gives up after FETCH_TIMEOUT.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks.json", silent.local_addr().unwrap());
        let started = Instant::now();
        let err = url_verifier(&url).load_keys().await.unwrap_err();
        assert!(started.elapsed() < FETCH_TIMEOUT + Duration::from_secs(2));
        assert!(err.reason.contains("no answer"), "{err}");
        // https needs TLS, which this client does not have: a clear error, no panic.
        let err = url_verifier("https://127.0.0.1:1/jwks.json")
            .load_keys()
            .await
            .unwrap_err();
        assert!(!err.reason.is_empty());
    }
}
