//! auth::jwt: the client's token (`Authorization: Bearer`, or the policy's cookie) → verified
//! claims.
//!
//! A [`Verifier`] is built from the policy's `auth.jwt` block. It accepts only the algorithms
//! the policy lists, and only with a key of the matching kind: HS256 only with the policy's
//! `hs256_secret`, every other algorithm only with a key from the JWKS (whose `oct` keys are
//! ignored), so no token can pick a verification that its key was never meant for
//! (algorithm confusion). Keys sit behind an [`ArcSwap`]: a failed reload keeps the last good
//! set, and an unknown `kid` triggers at most one JWKS refetch per 30 s.
//!
//! A verified token is remembered (by its SHA-256, bounded in memory) until its `exp`, so the
//! signature check is paid once per token rather than once per request; a change of the key
//! set forgets every remembered token.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use moka::sync::Cache;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::AuthFailure;
use crate::caller::Claims;
use crate::policy::{self, JwtAuth, KeySource};
use crate::upstream::error_chain;

/// A token longer than this is refused before any parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The largest JWKS document read, from a URL or a file.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Bounds one JWKS fetch: connect, request and body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one on-demand JWKS refetch (for an unknown `kid`) per this interval, so a client
/// sending random key ids cannot make the sidecar fetch on every request.
const REFETCH_FLOOR: Duration = Duration::from_secs(30);
/// The policy's leeway is capped here, which also keeps the library's time arithmetic from
/// overflowing.
const MAX_LEEWAY: Duration = Duration::from_secs(24 * 3600);
/// A verified token is remembered until its `exp` (plus leeway), but never longer than this, so
/// a long-lived token is verified again now and then.
const CACHE_TTL_CAP: Duration = Duration::from_secs(300);
/// The memory the verified-token cache may use, as estimated by [`Verified::weight`]: about
/// 14 000 typical (1 KiB) tokens.
const CACHE_BUDGET_BYTES: u64 = 32 * 1024 * 1024;

/// Verifies the client's bearer tokens against one policy's `auth.jwt` settings.
pub struct Verifier {
    source: Source,
    /// One validation per accepted algorithm: those the policy lists that fit the key source.
    validations: Vec<(Algorithm, Validation)>,
    /// The JWKS keys (empty until loaded; unused with an HS256 secret).
    keys: ArcSwap<Vec<Key>>,
    /// When the last on-demand refetch started; held while it runs.
    refetch: tokio::sync::Mutex<Option<Instant>>,
    /// The cookie that may carry the token when there is no `Authorization` header.
    cookie: Option<String>,
    /// The policy's leeway in seconds (capped at [`MAX_LEEWAY`]).
    leeway: u64,
    /// Tokens that passed every check, by the SHA-256 of the token. Only successes go in, so a
    /// client cannot fill it with tokens of its own making.
    cache: Cache<[u8; 32], Verified>,
    /// Bumped whenever the key set changes: an entry verified under an older key set is never
    /// used, even one inserted by a verification that raced the change.
    key_generation: AtomicU64,
    /// How many tokens went through the full (signature) check.
    #[cfg(test)]
    signature_checks: std::sync::atomic::AtomicUsize,
}

/// A cache entry: the claims of a token that passed every check, and what must be re-checked
/// on each use because it depends on the time.
#[derive(Clone)]
struct Verified {
    claims: Arc<Claims>,
    exp: u64,
    nbf: Option<u64>,
    /// The key generation the token was verified under.
    generation: u64,
    /// How long the entry may live: until `exp` + leeway, at most [`CACHE_TTL_CAP`].
    ttl: Duration,
    /// Estimated memory, in bytes.
    weight: u32,
}

/// Gives each cache entry its own lifetime.
struct VerifiedExpiry;

impl moka::Expiry<[u8; 32], Verified> for VerifiedExpiry {
    fn expire_after_create(
        &self,
        _digest: &[u8; 32],
        verified: &Verified,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(verified.ttl)
    }
}

enum Source {
    Secret(DecodingKey),
    File(PathBuf),
    Url {
        url: String,
        client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    },
}

/// One usable signing key of the JWKS.
struct Key {
    kid: Option<String>,
    /// The key's own `alg`, when it names one.
    alg: Option<Algorithm>,
    curve: Option<EllipticCurve>,
    key: DecodingKey,
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

impl Verifier {
    /// How often the background task should call [`Verifier::load_keys`].
    pub const REFRESH_INTERVAL: Duration = Duration::from_secs(300);

    /// Builds the verifier; no I/O (the JWKS is read by [`Verifier::load_keys`]).
    pub fn new(auth: &JwtAuth) -> Verifier {
        let source = match &auth.keys {
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
        let hmac = matches!(source, Source::Secret(_));
        let leeway = auth.leeway.min(MAX_LEEWAY).as_secs();
        let mut validations: Vec<(Algorithm, Validation)> = Vec::new();
        for alg in auth.algorithms.iter().map(|a| jwt_alg(*a)) {
            // HMAC only with the secret, and the secret only for HMAC.
            if (alg.family() == AlgorithmFamily::Hmac) != hmac
                || validations.iter().any(|(a, _)| *a == alg)
            {
                continue;
            }
            let mut validation = Validation::new(alg);
            validation.set_issuer(&[&auth.issuer]);
            validation.set_audience(&[&auth.audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            validation.validate_nbf = true;
            validation.leeway = leeway;
            validations.push((alg, validation));
        }
        Verifier {
            source,
            validations,
            keys: ArcSwap::from_pointee(Vec::new()),
            refetch: tokio::sync::Mutex::new(None),
            cookie: auth.cookie.clone(),
            leeway,
            cache: verified_cache(CACHE_BUDGET_BYTES),
            key_generation: AtomicU64::new(0),
            #[cfg(test)]
            signature_checks: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Fetches (`jwks_url`: 2 s timeout, 1 MiB body bound) or reads (`jwks_file`) the key set;
    /// an HS256 secret needs nothing. A failed load keeps the previous keys.
    pub async fn load_keys(&self) -> Result<(), KeyLoadError> {
        let (location, document) = match &self.source {
            Source::Secret(_) => return Ok(()),
            Source::File(path) => (path.display().to_string(), read_bounded(path).await),
            Source::Url { url, client } => (url.clone(), fetch(client, url).await),
        };
        let keys = document
            .and_then(|bytes| parse_jwks(&bytes))
            .map_err(|reason| KeyLoadError { location, reason })?;
        tracing::debug!(keys = keys.len(), "JWT keys loaded");
        let previous = self.keys.swap(Arc::new(keys));
        if fingerprints(&previous) != fingerprints(&self.keys.load()) {
            // A removed key must stop validating its tokens at once: bumped after the swap, so
            // a verification that read the old generation may have used the old keys, and one
            // that reads the new generation uses the new keys.
            self.key_generation.fetch_add(1, Ordering::SeqCst);
            self.cache.invalidate_all();
        }
        Ok(())
    }

    /// Starts with the keys `previous` holds (same key source, other settings): a reload that
    /// does not move the keys needs no fetch, and cannot fail on one.
    pub fn take_keys_of(&self, previous: &Verifier) {
        self.keys.store(previous.keys.load_full());
    }

    /// True once keys are usable (always for an HS256 secret).
    pub fn has_keys(&self) -> bool {
        matches!(self.source, Source::Secret(_)) || !self.keys.load().is_empty()
    }

    /// The token the request presents: `Authorization: Bearer <token>` (the scheme
    /// case-insensitively), else the policy's cookie. `None`: it presents neither.
    pub fn presented<'h>(&self, headers: &'h HeaderMap) -> Option<Result<&'h str, AuthFailure>> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        if let Some(value) = values.next() {
            if values.next().is_some() {
                return Some(Err(AuthFailure::Malformed));
            }
            return Some(bearer_token(value));
        }
        let cookie = cookie_value(headers, self.cookie.as_deref()?)?;
        Some(cookie.and_then(token_shape))
    }

    /// Verifies the token the request presents, if any: `Ok(None)` when it presents none.
    pub async fn verify(&self, headers: &HeaderMap) -> Result<Option<Arc<Claims>>, AuthFailure> {
        match self.presented(headers) {
            None => Ok(None),
            Some(token) => self.verify_token(token?).await.map(Some),
        }
    }

    /// Verifies one token whose size and shape [`token_shape`] checked: from the cache when
    /// this token passed every check before, under the same key set.
    async fn verify_token(&self, token: &str) -> Result<Arc<Claims>, AuthFailure> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Read before the keys are, so an entry is never tagged newer than the keys it used.
        let generation = self.key_generation.load(Ordering::SeqCst);
        if let Some(verified) = self.cache.get(&digest) {
            if verified.generation == generation {
                return self.still_valid(&digest, verified);
            }
        }
        let claims = Arc::new(self.decode(token).await?);
        if let Some(verified) = Verified::new(&claims, generation, token.len(), self.leeway) {
            self.cache.insert(digest, verified);
        }
        Ok(claims)
    }

    /// A remembered token is judged on `exp` and `nbf` as the full check would judge it now.
    fn still_valid(
        &self,
        digest: &[u8; 32],
        verified: Verified,
    ) -> Result<Arc<Claims>, AuthFailure> {
        let now = jsonwebtoken::get_current_timestamp();
        if verified.exp.saturating_add(self.leeway) < now {
            self.cache.invalidate(digest);
            return Err(AuthFailure::Expired);
        }
        if verified
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(self.leeway))
        {
            return Err(AuthFailure::NotYetValid);
        }
        Ok(verified.claims)
    }

    /// The full check: header, algorithm, key, signature and claims.
    async fn decode(&self, token: &str) -> Result<Claims, AuthFailure> {
        #[cfg(test)]
        self.signature_checks.fetch_add(1, Ordering::SeqCst);
        let header = jose_header(token)?;
        let alg: Algorithm = header.alg.parse().map_err(|_| AuthFailure::DisallowedAlg)?;
        let (alg, validation) = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .ok_or(AuthFailure::DisallowedAlg)?;
        let data = match &self.source {
            Source::Secret(secret) => jsonwebtoken::decode::<Claims>(token, secret, validation),
            Source::File(_) | Source::Url { .. } => {
                let (keys, at) = self.find_key(header.kid.as_deref(), *alg).await?;
                jsonwebtoken::decode::<Claims>(token, &keys[at].key, validation)
            }
        };
        data.map(|data| data.claims).map_err(|e| failure(e.kind()))
    }

    /// The key for `kid` that fits `alg`, refetching the JWKS (URL only) once for an unknown
    /// `kid` unless a refetch ran within the floor.
    async fn find_key(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<(Arc<Vec<Key>>, usize), AuthFailure> {
        let keys = self.keys.load_full();
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
        let mut keys = self.keys.load_full();
        let mut found = pick(&keys, kid, alg);
        if matches!(found, Pick::Missing) && last.is_none_or(|t| t.elapsed() >= REFETCH_FLOOR) {
            *last = Some(Instant::now());
            tracing::info!(jwks = %url, "unknown JWT key id: refetching the JWKS");
            if let Err(e) = self.load_keys().await {
                tracing::warn!(error = %e, "JWKS refetch failed; keeping the previous keys");
            }
            keys = self.keys.load_full();
            found = pick(&keys, kid, alg);
        }
        match found {
            Pick::Found(at) => Ok((keys, at)),
            Pick::Unfit => Err(AuthFailure::DisallowedAlg),
            Pick::Missing => Err(AuthFailure::UnknownKey),
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            Source::Secret(_) => "hs256_secret".to_owned(),
            Source::File(path) => format!("jwks_file {}", path.display()),
            Source::Url { url, .. } => format!("jwks_url {url}"),
        };
        f.debug_struct("Verifier")
            .field("source", &source)
            .field(
                "algorithms",
                &self.validations.iter().map(|(a, _)| a).collect::<Vec<_>>(),
            )
            .field("keys", &self.keys.load().len())
            .field("cached_tokens", &self.cache.entry_count())
            .finish()
    }
}

fn verified_cache(budget_bytes: u64) -> Cache<[u8; 32], Verified> {
    Cache::builder()
        .max_capacity(budget_bytes)
        .weigher(|_digest, verified: &Verified| verified.weight)
        .expire_after(VerifiedExpiry)
        .build()
}

impl Verified {
    /// What to remember of a verified token; `None` when it is due to expire now anyway.
    fn new(
        claims: &Arc<Claims>,
        generation: u64,
        token_len: usize,
        leeway: u64,
    ) -> Option<Verified> {
        // Verification required `exp`; both are read as the library reads them.
        let exp = numeric_date(claims.get("exp")?)?;
        let nbf = match claims.get("nbf") {
            None => None,
            Some(nbf) => Some(numeric_date(nbf)?),
        };
        let now = jsonwebtoken::get_current_timestamp();
        let left = exp.saturating_add(leeway).checked_sub(now)?;
        let ttl = Duration::from_secs(left).min(CACHE_TTL_CAP);
        if ttl.is_zero() {
            return None;
        }
        // The parsed claims take about twice the token's size, plus the entry itself.
        let weight = u32::try_from(token_len.saturating_mul(2) + 256).unwrap_or(u32::MAX);
        Some(Verified {
            claims: claims.clone(),
            exp,
            nbf,
            generation,
            ttl,
            weight,
        })
    }
}

/// A NumericDate claim as `jsonwebtoken` reads it: a non-negative integer, or a float rounded.
fn numeric_date(value: &serde_json::Value) -> Option<u64> {
    match value.as_u64() {
        Some(seconds) => Some(seconds),
        None => value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64),
    }
}

/// The keys' fingerprints in a stable order, so two loads of the same set compare equal.
fn fingerprints(keys: &[Key]) -> Vec<[u8; 32]> {
    let mut fingerprints: Vec<[u8; 32]> = keys.iter().map(|key| key.fingerprint).collect();
    fingerprints.sort_unstable();
    fingerprints
}

fn jwt_alg(alg: policy::Algorithm) -> Algorithm {
    use policy::Algorithm as P;
    match alg {
        P::RS256 => Algorithm::RS256,
        P::RS384 => Algorithm::RS384,
        P::RS512 => Algorithm::RS512,
        P::PS256 => Algorithm::PS256,
        P::ES256 => Algorithm::ES256,
        P::ES384 => Algorithm::ES384,
        P::EdDSA => Algorithm::EdDSA,
        P::HS256 => Algorithm::HS256,
    }
}

/// The token of `Bearer <token>`.
fn bearer_token(value: &HeaderValue) -> Result<&str, AuthFailure> {
    let value = value.to_str().map_err(|_| AuthFailure::Malformed)?;
    let (scheme, token) = value
        .trim_matches(' ')
        .split_once(' ')
        .ok_or(AuthFailure::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthFailure::Malformed);
    }
    token_shape(token.trim_start_matches(' '))
}

/// The first cookie called `name` (RFC 6265 sends the most specific one first), its value
/// unquoted; an `Err` when a `Cookie` header is not text.
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<Result<&'h str, AuthFailure>> {
    for header in headers.get_all(COOKIE) {
        let Ok(text) = header.to_str() else {
            return Some(Err(AuthFailure::Malformed));
        };
        let found = text.split(';').find_map(|pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n.trim() == name).then(|| v.trim())
        });
        if let Some(value) = found {
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            return Some(Ok(value));
        }
    }
    None
}

/// A token as it must look before any decoding: bounded in size, three base64url parts.
fn token_shape(token: &str) -> Result<&str, AuthFailure> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthFailure::Malformed);
    }
    let is_b64url = |part: &str| {
        part.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        // The signature may be empty (`alg: none`): the algorithm check refuses those.
        (Some(h), Some(p), Some(s), None)
            if !h.is_empty() && !p.is_empty() && is_b64url(h) && is_b64url(p) && is_b64url(s) =>
        {
            Ok(token)
        }
        _ => Err(AuthFailure::Malformed),
    }
}

/// The JOSE header members the key choice needs.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// Critical extensions: this verifier understands none, so any makes the token invalid
    /// (RFC 7515 §4.1.11).
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// Parsed before the library does, so an algorithm it does not know (`none`) is refused as
/// disallowed rather than malformed.
fn jose_header(token: &str) -> Result<JoseHeader, AuthFailure> {
    let encoded = token.split('.').next().unwrap_or_default();
    let json = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| AuthFailure::Malformed)?;
    match serde_json::from_slice::<JoseHeader>(&json) {
        Ok(header) if header.crit.is_none() => Ok(header),
        _ => Err(AuthFailure::Malformed),
    }
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

fn failure(kind: &ErrorKind) -> AuthFailure {
    match kind {
        ErrorKind::InvalidSignature => AuthFailure::BadSignature,
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
        ErrorKind::InvalidIssuer => AuthFailure::WrongIssuer,
        ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => AuthFailure::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => AuthFailure::WrongAudience,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm | ErrorKind::InvalidKeyFormat => {
            AuthFailure::DisallowedAlg
        }
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey | ErrorKind::InvalidRsaKey(_) => {
            AuthFailure::UnknownKey
        }
        // InvalidToken, Base64, Json, Utf8, a missing `exp`, a non-numeric `exp`/`nbf`, …
        _ => AuthFailure::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use jsonwebtoken::{EncodingKey, Header};
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::policy::Algorithm as P;

    const ISS: &str = "https://id.example.com/";
    const AUD: &str = "mobile-app";
    const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name)
    }

    fn read(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).unwrap()
    }

    fn jwt_auth(algorithms: &[P], keys: KeySource) -> JwtAuth {
        JwtAuth {
            issuer: ISS.to_owned(),
            audience: AUD.to_owned(),
            algorithms: algorithms.to_vec(),
            keys,
            leeway: Duration::from_secs(30),
            cookie: None,
        }
    }

    async fn file_verifier(algorithms: &[P]) -> Verifier {
        let verifier = Verifier::new(&jwt_auth(
            algorithms,
            KeySource::JwksFile(fixture("jwks.json")),
        ));
        verifier.load_keys().await.unwrap();
        verifier
    }

    fn secret_verifier() -> Verifier {
        Verifier::new(&jwt_auth(
            &[P::HS256],
            KeySource::Hs256Secret(SECRET.to_owned()),
        ))
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    /// Valid claims, with `changes` applied (`null` removes a claim).
    fn claims(changes: Value) -> Value {
        let mut claims =
            json!({"sub": "usr_9821", "iss": ISS, "aud": AUD, "iat": now(), "exp": now() + 600});
        for (name, value) in changes.as_object().unwrap() {
            match value {
                Value::Null => claims.as_object_mut().unwrap().remove(name),
                value => claims
                    .as_object_mut()
                    .unwrap()
                    .insert(name.clone(), value.clone()),
            };
        }
        claims
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&read("rsa_private.pem")).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&read("ec_private.pem")).unwrap(),
            Algorithm::HS256 => EncodingKey::from_secret(SECRET.as_bytes()),
            other => panic!("no test key for {other:?}"),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn bearer(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn b64url(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// `token` with its header replaced by `header`.
    fn with_header(token: &str, header: Value) -> String {
        let (_, rest) = token.split_once('.').unwrap();
        format!("{}.{rest}", b64url(header.to_string().as_bytes()))
    }

    async fn check(verifier: &Verifier, token: &str) -> Result<Option<Arc<Claims>>, AuthFailure> {
        verifier.verify(&bearer(&format!("Bearer {token}"))).await
    }

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

    #[test]
    fn new_does_no_io_and_reports_keys() {
        let url = Verifier::new(&jwt_auth(
            &[P::RS256],
            KeySource::JwksUrl("http://127.0.0.1:9/jwks".into()),
        ));
        let file = Verifier::new(&jwt_auth(
            &[P::RS256],
            KeySource::JwksFile(fixture("jwks.json")),
        ));
        assert!(!url.has_keys() && !file.has_keys());
        assert!(secret_verifier().has_keys());
    }

    #[test]
    fn verify_future_is_send() {
        fn is_send<T: Send>(_: &T) {}
        let verifier = secret_verifier();
        let headers = HeaderMap::new();
        is_send(&verifier.verify(&headers));
        is_send(&verifier.load_keys());
    }

    #[tokio::test]
    async fn valid_rs256_token_yields_claims() {
        let verifier = file_verifier(&[P::RS256, P::ES256]).await;
        let token = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"tier": "gold"})),
        );
        let claims = check(&verifier, &token).await.unwrap().unwrap();
        assert_eq!(claims["sub"], "usr_9821");
        assert_eq!(claims["tier"], "gold");
    }

    #[tokio::test]
    async fn valid_es256_token_yields_claims() {
        let verifier = file_verifier(&[P::RS256, P::ES256]).await;
        let token = sign(Algorithm::ES256, Some("ec-1"), &claims(json!({})));
        let claims = check(&verifier, &token).await.unwrap().unwrap();
        assert_eq!(claims["sub"], "usr_9821");
    }

    #[tokio::test]
    async fn valid_hs256_token_with_the_secret() {
        let token = sign(Algorithm::HS256, None, &claims(json!({})));
        let claims = check(&secret_verifier(), &token).await.unwrap().unwrap();
        assert_eq!(claims["iss"], ISS);
        // The scheme is case-insensitive.
        let lower = secret_verifier()
            .verify(&bearer(&format!("bearer {token}")))
            .await;
        assert!(matches!(lower, Ok(Some(_))));
    }

    #[tokio::test]
    async fn audience_may_be_an_array() {
        let verifier = file_verifier(&[P::RS256]).await;
        let token = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"aud": ["other", AUD]})),
        );
        assert!(check(&verifier, &token).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn expired_token_is_refused_past_the_leeway() {
        let verifier = file_verifier(&[P::RS256]).await;
        let expired = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"exp": now() - 120})),
        );
        assert_eq!(check(&verifier, &expired).await, Err(AuthFailure::Expired));
        let within_leeway = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"exp": now() - 5})),
        );
        assert!(check(&verifier, &within_leeway).await.is_ok());
    }

    #[tokio::test]
    async fn exp_is_required() {
        let verifier = file_verifier(&[P::RS256]).await;
        let token = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"exp": null})),
        );
        assert_eq!(check(&verifier, &token).await, Err(AuthFailure::Malformed));
    }

    #[tokio::test]
    async fn nbf_in_the_future_is_refused() {
        let verifier = file_verifier(&[P::ES256]).await;
        let token = sign(
            Algorithm::ES256,
            Some("ec-1"),
            &claims(json!({"nbf": now() + 3600})),
        );
        assert_eq!(
            check(&verifier, &token).await,
            Err(AuthFailure::NotYetValid)
        );
        let past = sign(
            Algorithm::ES256,
            Some("ec-1"),
            &claims(json!({"nbf": now() - 10})),
        );
        assert!(check(&verifier, &past).await.is_ok());
    }

    #[tokio::test]
    async fn wrong_or_missing_issuer_is_refused() {
        let verifier = file_verifier(&[P::RS256]).await;
        let wrong = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"iss": "https://evil.example/"})),
        );
        assert_eq!(
            check(&verifier, &wrong).await,
            Err(AuthFailure::WrongIssuer)
        );
        let missing = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"iss": null})),
        );
        assert_eq!(
            check(&verifier, &missing).await,
            Err(AuthFailure::WrongIssuer)
        );
    }

    #[tokio::test]
    async fn wrong_or_missing_audience_is_refused() {
        let verifier = file_verifier(&[P::RS256]).await;
        let wrong = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"aud": "web-app"})),
        );
        assert_eq!(
            check(&verifier, &wrong).await,
            Err(AuthFailure::WrongAudience)
        );
        let wrong_list = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"aud": ["web-app"]})),
        );
        assert_eq!(
            check(&verifier, &wrong_list).await,
            Err(AuthFailure::WrongAudience)
        );
        let missing = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"aud": null})),
        );
        assert_eq!(
            check(&verifier, &missing).await,
            Err(AuthFailure::WrongAudience)
        );
    }

    #[tokio::test]
    async fn tampered_token_is_refused() {
        let verifier = file_verifier(&[P::RS256, P::ES256]).await;
        for (alg, kid) in [(Algorithm::RS256, "rsa-1"), (Algorithm::ES256, "ec-1")] {
            let token = sign(alg, Some(kid), &claims(json!({})));
            // A flipped signature character (mid-signature, so never a padding bit).
            let mut bytes = token.clone().into_bytes();
            let at = token.rfind('.').unwrap() + 10;
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            let flipped = String::from_utf8(bytes).unwrap();
            assert_eq!(
                check(&verifier, &flipped).await,
                Err(AuthFailure::BadSignature),
                "{alg:?}"
            );
            // Claims swapped under the original signature.
            let parts: Vec<&str> = token.split('.').collect();
            let forged = claims(json!({"sub": "admin"})).to_string();
            let swapped = format!("{}.{}.{}", parts[0], b64url(forged.as_bytes()), parts[2]);
            assert_eq!(
                check(&verifier, &swapped).await,
                Err(AuthFailure::BadSignature),
                "{alg:?}"
            );
        }
        let hs = sign(Algorithm::HS256, None, &claims(json!({})));
        let forged = format!("{}x", &hs[..hs.len() - 1]);
        let result = check(&secret_verifier(), &forged).await;
        assert!(
            matches!(
                result,
                Err(AuthFailure::BadSignature | AuthFailure::Malformed)
            ),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn alg_none_is_disallowed() {
        let token = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        let unsigned = with_header(&token, json!({"alg": "none", "typ": "JWT"}));
        let unsigned = format!("{}.", &unsigned[..unsigned.rfind('.').unwrap()]);
        let verifier = file_verifier(&[P::RS256]).await;
        assert_eq!(
            check(&verifier, &unsigned).await,
            Err(AuthFailure::DisallowedAlg)
        );
        assert_eq!(
            check(&secret_verifier(), &unsigned).await,
            Err(AuthFailure::DisallowedAlg)
        );
        let none_upper = with_header(&token, json!({"alg": "NONE"}));
        assert_eq!(
            check(&verifier, &none_upper).await,
            Err(AuthFailure::DisallowedAlg)
        );
    }

    #[tokio::test]
    async fn header_claiming_another_alg_is_disallowed() {
        let verifier = file_verifier(&[P::RS256]).await;
        let token = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        for alg in ["HS256", "HS512", "ES256", "PS256", "RS384"] {
            let relabelled = with_header(&token, json!({"alg": alg, "kid": "rsa-1"}));
            assert_eq!(
                check(&verifier, &relabelled).await,
                Err(AuthFailure::DisallowedAlg),
                "{alg}"
            );
        }
    }

    #[tokio::test]
    async fn hs256_signed_with_the_rsa_public_key_is_refused() {
        // The classic confusion attack: HMAC keyed with the (public) verification key.
        let public_pem = read("rsa_public.pem");
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".into());
        let claims = claims(json!({}));
        let mut tokens =
            vec![
                jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&public_pem))
                    .unwrap(),
            ];
        // …and keyed with the JWK's raw modulus, for good measure.
        let jwks: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
        let n = jwks["keys"][0]["n"].as_str().unwrap().as_bytes().to_vec();
        tokens.push(jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&n)).unwrap());
        for token in tokens {
            let only_rs = file_verifier(&[P::RS256]).await;
            assert_eq!(
                check(&only_rs, &token).await,
                Err(AuthFailure::DisallowedAlg)
            );
            // Even when the policy lists HS256, a JWKS never supplies an HMAC key.
            let both = file_verifier(&[P::RS256, P::HS256]).await;
            assert_eq!(check(&both, &token).await, Err(AuthFailure::DisallowedAlg));
        }
    }

    #[tokio::test]
    async fn asymmetric_token_is_never_checked_with_the_secret() {
        let verifier = Verifier::new(&jwt_auth(
            &[P::HS256, P::RS256, P::ES256],
            KeySource::Hs256Secret(SECRET.into()),
        ));
        for (alg, kid) in [(Algorithm::RS256, "rsa-1"), (Algorithm::ES256, "ec-1")] {
            let token = sign(alg, Some(kid), &claims(json!({})));
            assert_eq!(
                check(&verifier, &token).await,
                Err(AuthFailure::DisallowedAlg),
                "{alg:?}"
            );
        }
        // HS256 does work with it.
        let token = sign(Algorithm::HS256, None, &claims(json!({})));
        assert!(check(&verifier, &token).await.is_ok());
    }

    #[tokio::test]
    async fn key_must_fit_the_token_alg() {
        let verifier = file_verifier(&[P::RS256, P::ES256]).await;
        // An ES256 token naming the RSA key, and an RS256 token naming the EC key.
        let es = sign(Algorithm::ES256, Some("rsa-1"), &claims(json!({})));
        assert_eq!(check(&verifier, &es).await, Err(AuthFailure::DisallowedAlg));
        let rs = sign(Algorithm::RS256, Some("ec-1"), &claims(json!({})));
        assert_eq!(check(&verifier, &rs).await, Err(AuthFailure::DisallowedAlg));
        // A key whose own `alg` differs from the token's (same family) is not used either.
        let dir = tempfile::tempdir().unwrap();
        let mut jwks: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
        jwks["keys"][0]["alg"] = json!("RS512");
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks.to_string()).unwrap();
        let verifier = Verifier::new(&jwt_auth(&[P::RS256], KeySource::JwksFile(path)));
        verifier.load_keys().await.unwrap();
        let token = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        assert_eq!(
            check(&verifier, &token).await,
            Err(AuthFailure::DisallowedAlg)
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

    #[tokio::test]
    async fn no_authorization_header_is_anonymous() {
        assert_eq!(secret_verifier().verify(&HeaderMap::new()).await, Ok(None));
        let verifier = file_verifier(&[P::RS256]).await;
        assert_eq!(verifier.verify(&HeaderMap::new()).await, Ok(None));
    }

    #[tokio::test]
    async fn other_schemes_and_shapes_are_malformed() {
        let verifier = file_verifier(&[P::RS256]).await;
        let good = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        let (h, rest) = good.split_once('.').unwrap();
        let (p, s) = rest.split_once('.').unwrap();
        let cases = [
            "Basic dXNlcjpwYXNz".to_owned(),
            "Bearer".to_owned(),
            "Bearer ".to_owned(),
            "Token abc.def.ghi".to_owned(),
            format!("Bearer{good}"),
            format!("Bearer {h}.{p}"),
            format!("Bearer {h}.{p}.{s}.{s}"),
            format!("Bearer .{p}.{s}"),
            format!("Bearer {h}..{s}"),
            format!("Bearer {h}.{p}.{s}="),
            format!("Bearer {h}.{p}.{s} extra"),
            "Bearer e30.e30.e30".to_owned(),
            "Bearer !!!.???.***".to_owned(),
            "Bearer a.b.c".to_owned(),
            format!("Bearer {}.{p}.{s}", b64url(b"[1,2]")),
            format!("Bearer {}.{p}.{s}", b64url(br#"{"alg":"RS256","kid":7}"#)),
            format!(
                "Bearer {}.{p}.{s}",
                b64url(br#"{"alg":"RS256","kid":"rsa-1","crit":["b64"],"b64":false}"#)
            ),
            format!("Bearer {}.{p}.{s}", b64url(br#"{"kid":"rsa-1"}"#)),
        ];
        for case in &cases {
            assert_eq!(
                verifier.verify(&bearer(case)).await,
                Err(AuthFailure::Malformed),
                "{case}"
            );
        }
        // Correctly signed, but the payload is not a claims object.
        let rsa = EncodingKey::from_rsa_pem(&read("rsa_private.pem")).unwrap();
        for payload in [&b"not json"[..], b"[1,2]", b"null"] {
            let message = format!("{h}.{}", b64url(payload));
            let signature =
                jsonwebtoken::crypto::sign(message.as_bytes(), &rsa, Algorithm::RS256).unwrap();
            let token = format!("{message}.{signature}");
            assert_eq!(check(&verifier, &token).await, Err(AuthFailure::Malformed));
        }
        // Not visible ASCII.
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff\xfe.a.b").unwrap(),
        );
        assert_eq!(verifier.verify(&headers).await, Err(AuthFailure::Malformed));
        // Two Authorization headers are ambiguous.
        let mut headers = bearer(&format!("Bearer {good}"));
        headers.append(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {good}")).unwrap(),
        );
        assert_eq!(verifier.verify(&headers).await, Err(AuthFailure::Malformed));
    }

    #[tokio::test]
    async fn huge_token_is_malformed_without_parsing() {
        let verifier = file_verifier(&[P::RS256]).await;
        let padding = "A".repeat(MAX_TOKEN_BYTES);
        let huge = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"pad": padding})),
        );
        assert!(huge.len() > MAX_TOKEN_BYTES);
        assert_eq!(check(&verifier, &huge).await, Err(AuthFailure::Malformed));
        let junk = format!("{}.{}.{}", "x".repeat(9000), "y", "z");
        assert_eq!(check(&verifier, &junk).await, Err(AuthFailure::Malformed));
    }

    #[tokio::test]
    async fn enormous_leeway_does_not_overflow() {
        let mut auth = jwt_auth(&[P::HS256], KeySource::Hs256Secret(SECRET.into()));
        auth.leeway = Duration::MAX;
        let verifier = Verifier::new(&auth);
        let token = sign(
            Algorithm::HS256,
            None,
            &claims(json!({"exp": 1, "nbf": i64::MAX})),
        );
        assert!(check(&verifier, &token).await.is_err());
    }

    fn signature_checks(verifier: &Verifier) -> usize {
        verifier.signature_checks.load(Ordering::SeqCst)
    }

    fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    #[tokio::test]
    async fn a_verified_token_is_not_checked_again() {
        let verifier = file_verifier(&[P::RS256, P::ES256]).await;
        let token = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        let first = check(&verifier, &token).await.unwrap().unwrap();
        assert_eq!(signature_checks(&verifier), 1);
        for _ in 0..5 {
            let again = check(&verifier, &token).await.unwrap().unwrap();
            assert!(Arc::ptr_eq(&first, &again), "the remembered claims");
        }
        assert_eq!(signature_checks(&verifier), 1, "served from the cache");
        // Another token is checked on its own; the first stays remembered.
        let other = sign(
            Algorithm::ES256,
            Some("ec-1"),
            &claims(json!({"sub": "u2"})),
        );
        assert_eq!(
            check(&verifier, &other).await.unwrap().unwrap()["sub"],
            "u2"
        );
        assert_eq!(
            check(&verifier, &token).await.unwrap().unwrap()["sub"],
            "usr_9821"
        );
        assert_eq!(signature_checks(&verifier), 2);
        // So is the HS256 secret's.
        let secret = secret_verifier();
        let hs = sign(Algorithm::HS256, None, &claims(json!({})));
        for _ in 0..3 {
            assert!(check(&secret, &hs).await.unwrap().is_some());
        }
        assert_eq!(signature_checks(&secret), 1);
    }

    #[tokio::test]
    async fn refused_tokens_are_never_remembered() {
        let verifier = file_verifier(&[P::RS256]).await;
        let good = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        let (rest, _) = good.rsplit_once('.').unwrap();
        let forged = format!("{rest}.{}", b64url(&[7; 256]));
        let expired = sign(
            Algorithm::RS256,
            Some("rsa-1"),
            &claims(json!({"exp": now() - 3600})),
        );
        for _ in 0..3 {
            assert_eq!(
                check(&verifier, &forged).await,
                Err(AuthFailure::BadSignature)
            );
            assert_eq!(check(&verifier, &expired).await, Err(AuthFailure::Expired));
        }
        assert_eq!(signature_checks(&verifier), 6);
        verifier.cache.run_pending_tasks();
        assert_eq!(verifier.cache.entry_count(), 0);
    }

    #[tokio::test]
    async fn a_remembered_token_is_still_judged_on_exp_and_nbf() {
        let verifier = file_verifier(&[P::RS256]).await;
        let token = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        check(&verifier, &token).await.unwrap();
        let at = digest(&token);
        let remembered = verifier.cache.get(&at).unwrap();
        let with = |exp: i64, nbf: Option<i64>| Verified {
            exp: exp as u64,
            nbf: nbf.map(|n| n as u64),
            ..remembered.clone()
        };
        // As the full check would: past `exp` only beyond the leeway (30 s).
        verifier.cache.insert(at, with(now() - 5, None));
        assert!(check(&verifier, &token).await.unwrap().is_some());
        verifier.cache.insert(at, with(now() - 120, None));
        assert_eq!(check(&verifier, &token).await, Err(AuthFailure::Expired));
        verifier
            .cache
            .insert(at, with(now() + 600, Some(now() + 3600)));
        assert_eq!(
            check(&verifier, &token).await,
            Err(AuthFailure::NotYetValid)
        );
        assert_eq!(signature_checks(&verifier), 1, "all judged from the cache");
        // The expired entry was dropped at once; the real token is checked again and cached.
        verifier.cache.insert(at, with(now() - 120, None));
        assert_eq!(check(&verifier, &token).await, Err(AuthFailure::Expired));
        assert!(verifier.cache.get(&at).is_none());
        assert!(check(&verifier, &token).await.unwrap().is_some());
        assert_eq!(signature_checks(&verifier), 2);
    }

    #[test]
    fn an_entry_lives_until_exp_plus_leeway_at_most_the_cap() {
        let ttl = |exp: i64, leeway: u64| {
            let claims = Arc::new(claims(json!({"exp": exp})).as_object().unwrap().clone());
            Verified::new(&claims, 0, 1000, leeway).map(|v| v.ttl)
        };
        let near = ttl(now() + 60, 30).unwrap();
        assert!(
            near <= Duration::from_secs(90) && near >= Duration::from_secs(88),
            "{near:?}"
        );
        assert_eq!(ttl(now() + 86_400, 30), Some(CACHE_TTL_CAP));
        assert_eq!(ttl(i64::MAX, 30), Some(CACHE_TTL_CAP));
        assert_eq!(ttl(now() - 60, 30), None, "beyond the leeway already");
        // A float `exp` is read as the library reads it.
        let claims = Arc::new(
            claims(json!({"exp": (now() + 100) as f64 + 0.4}))
                .as_object()
                .unwrap()
                .clone(),
        );
        assert!(Verified::new(&claims, 0, 10, 0).is_some());
    }

    #[tokio::test]
    async fn a_key_set_change_forgets_every_remembered_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let jwks: Value = serde_json::from_slice(&read("jwks.json")).unwrap();
        std::fs::write(&path, jwks.to_string()).unwrap();
        let verifier = Verifier::new(&jwt_auth(
            &[P::RS256, P::ES256],
            KeySource::JwksFile(path.clone()),
        ));
        verifier.load_keys().await.unwrap();
        let rs = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        let es = sign(Algorithm::ES256, Some("ec-1"), &claims(json!({})));
        assert!(check(&verifier, &rs).await.unwrap().is_some());
        assert!(check(&verifier, &es).await.unwrap().is_some());
        assert_eq!(signature_checks(&verifier), 2);

        // The same set again, keys in another order: nothing forgotten.
        let mut keys = jwks["keys"].as_array().unwrap().clone();
        keys.reverse();
        std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
        verifier.load_keys().await.unwrap();
        assert!(check(&verifier, &rs).await.unwrap().is_some());
        assert_eq!(signature_checks(&verifier), 2);

        // The RSA key is withdrawn: its token stops working at once.
        keys.retain(|key| key["kid"] != "rsa-1");
        std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
        verifier.load_keys().await.unwrap();
        assert_eq!(check(&verifier, &rs).await, Err(AuthFailure::UnknownKey));
        assert!(check(&verifier, &es).await.unwrap().is_some());
        assert_eq!(signature_checks(&verifier), 4, "both checked again");

        // A failed reload changes nothing, so forgets nothing.
        std::fs::write(&path, "{not json").unwrap();
        verifier.load_keys().await.unwrap_err();
        assert!(check(&verifier, &es).await.unwrap().is_some());
        assert_eq!(signature_checks(&verifier), 4);
    }

    #[tokio::test]
    async fn an_entry_from_an_older_key_set_is_never_used() {
        // A verification that raced a key change may insert after the cache was cleared; its
        // generation gives it away.
        let verifier = file_verifier(&[P::RS256]).await;
        let token = sign(Algorithm::RS256, Some("rsa-1"), &claims(json!({})));
        check(&verifier, &token).await.unwrap();
        let at = digest(&token);
        let stale = Verified {
            claims: Arc::new(claims(json!({"sub": "stale"})).as_object().unwrap().clone()),
            ..verifier.cache.get(&at).unwrap()
        };
        verifier.key_generation.fetch_add(1, Ordering::SeqCst);
        verifier.cache.insert(at, stale);
        let claims = check(&verifier, &token).await.unwrap().unwrap();
        assert_eq!(claims["sub"], "usr_9821");
        assert_eq!(signature_checks(&verifier), 2);
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let mut verifier = secret_verifier();
        let budget = 20 * 1024;
        verifier.cache = verified_cache(budget);
        let tokens: Vec<String> = (0..200)
            .map(|i| sign(Algorithm::HS256, None, &claims(json!({"jti": i}))))
            .collect();
        let weight = Verified::new(
            &Arc::new(claims(json!({})).as_object().unwrap().clone()),
            0,
            tokens[0].len(),
            30,
        )
        .unwrap()
        .weight as u64;
        for token in &tokens {
            assert!(check(&verifier, token).await.unwrap().is_some());
        }
        verifier.cache.run_pending_tasks();
        assert!(
            verifier.cache.weighted_size() <= budget,
            "{} > {budget}",
            verifier.cache.weighted_size()
        );
        assert!(verifier.cache.entry_count() <= budget / weight);
        assert!(verifier.cache.entry_count() > 0);
        // Every token still verifies, evicted or not.
        for token in &tokens {
            assert!(check(&verifier, token).await.unwrap().is_some());
        }
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
        *verifier.refetch.lock().await = Instant::now().checked_sub(REFETCH_FLOOR);
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

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn verify_never_panics_on_any_header(value in proptest::collection::vec(any::<u8>(), 0..200)) {
            let Ok(value) = HeaderValue::from_bytes(&value) else { return Ok(()) };
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, value);
            let rt = runtime();
            let _ = rt.block_on(secret_verifier().verify(&headers));
            let verifier = rt.block_on(file_verifier(&[P::RS256, P::ES256]));
            let _ = rt.block_on(verifier.verify(&headers));
        }

        #[test]
        fn verify_never_panics_on_any_jose_parts(
            header in prop_oneof![
                Just(json!({"alg": "RS256", "kid": "rsa-1"})),
                Just(json!({"alg": "ES256", "kid": "ec-1"})),
                Just(json!({"alg": "HS256"})),
                Just(json!({"alg": "EdDSA"})),
                any::<String>().prop_map(|alg| json!({"alg": alg})),
                any::<String>().prop_map(|kid| json!({"alg": "RS256", "kid": kid})),
            ],
            payload in prop_oneof![
                Just(json!({"iss": ISS, "aud": AUD, "exp": u64::MAX})),
                Just(json!({"iss": ISS, "aud": AUD, "exp": -1, "nbf": 1e300})),
                Just(json!({"iss": [ISS], "aud": {}, "exp": "soon"})),
                Just(json!([])),
                Just(json!(null)),
                any::<String>().prop_map(Value::String),
            ],
            signature in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let token = format!(
                "{}.{}.{}",
                b64url(header.to_string().as_bytes()),
                b64url(payload.to_string().as_bytes()),
                b64url(&signature)
            );
            let rt = runtime();
            let headers = bearer(&format!("Bearer {token}"));
            let verifier = rt.block_on(file_verifier(&[P::RS256, P::ES256, P::EdDSA]));
            let result = rt.block_on(verifier.verify(&headers));
            prop_assert!(result.is_err());
            let result = rt.block_on(secret_verifier().verify(&headers));
            prop_assert!(result.is_err());
        }
    }
}
