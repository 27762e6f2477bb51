//! auth::jwt: the client's token (`Authorization: Bearer`, or the policy's cookie) → verified
//! claims.
//!
//! A [`Verifier`] is built from the policy's `auth.jwt` block. It accepts only the algorithms
//! the policy lists, and only with a key of the matching kind: HS256 only with the policy's
//! `hs256_secret`, every other algorithm only with a key from the JWKS (whose `oct` keys are
//! ignored), so no token can pick a verification that its key was never meant for
//! (algorithm confusion). Where the keys come from and how they are reloaded is `keys`.
//!
//! A verified token is remembered (by its SHA-256, bounded in memory) until its `exp`, so the
//! signature check is paid once per token rather than once per request; a change of the key
//! set forgets every remembered token.

mod keys;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, Validation};
use moka::sync::Cache;
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use keys::KeyLoadError;
use keys::Keys;

use super::failure::AuthFailure;
use crate::caller::Claims;
use crate::policy::{self, JwtAuth};

/// A token longer than this is refused before any parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
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
    keys: Keys,
    /// One validation per accepted algorithm: those the policy lists that fit the key source.
    validations: Vec<(Algorithm, Validation)>,
    /// The cookie that may carry the token when there is no `Authorization` header.
    cookie: Option<String>,
    /// The policy's leeway in seconds (capped at [`MAX_LEEWAY`]).
    leeway: u64,
    /// Tokens that passed every check, by the SHA-256 of the token. Only successes go in, so a
    /// client cannot fill it with tokens of its own making.
    cache: Cache<[u8; 32], Verified>,
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

impl Verifier {
    /// How often the background task should call [`Verifier::load_keys`].
    pub const REFRESH_INTERVAL: Duration = Duration::from_secs(300);

    /// Builds the verifier; no I/O (the JWKS is read by [`Verifier::load_keys`]).
    pub fn new(auth: &JwtAuth) -> Verifier {
        let keys = Keys::new(&auth.keys);
        let hmac = keys.secret().is_some();
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
            keys,
            validations,
            cookie: auth.cookie.clone(),
            leeway,
            cache: verified_cache(CACHE_BUDGET_BYTES),
            #[cfg(test)]
            signature_checks: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Loads the key set (see `keys::Keys::load`); a failed load keeps the previous keys. A
    /// changed set forgets every remembered token.
    pub async fn load_keys(&self) -> Result<(), KeyLoadError> {
        if self.keys.load().await? {
            self.cache.invalidate_all();
        }
        Ok(())
    }

    /// Starts with the keys `previous` holds (same key source, other settings): a reload that
    /// does not move the keys needs no fetch, and cannot fail on one.
    pub fn take_keys_of(&self, previous: &Verifier) {
        self.keys.take_of(&previous.keys);
    }

    /// True once keys are usable (always for an HS256 secret).
    pub fn has_keys(&self) -> bool {
        self.keys.has_keys()
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
        // Read before the keys are, so an entry is never tagged newer than the keys it used: an
        // entry verified under an older key set is never used, even one inserted by a
        // verification that raced the change.
        let generation = self.keys.generation();
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
        self.signature_checks
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let header = jose_header(token)?;
        let alg: Algorithm = header.alg.parse().map_err(|_| AuthFailure::DisallowedAlg)?;
        let (alg, validation) = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .ok_or(AuthFailure::DisallowedAlg)?;
        let data = match self.keys.secret() {
            Some(secret) => jsonwebtoken::decode::<Claims>(token, secret, validation),
            None => {
                let changed = || self.cache.invalidate_all();
                let (keys, at) = self.keys.find(header.kid.as_deref(), *alg, changed).await?;
                jsonwebtoken::decode::<Claims>(token, &keys[at].key, validation)
            }
        };
        data.map(|data| data.claims).map_err(|e| failure(e.kind()))
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("source", &self.keys.to_string())
            .field(
                "algorithms",
                &self.validations.iter().map(|(a, _)| a).collect::<Vec<_>>(),
            )
            .field("keys", &self.keys.len())
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
mod test_support;

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use jsonwebtoken::{EncodingKey, Header};
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::test_support::*;
    use super::*;
    use crate::policy::{Algorithm as P, KeySource};

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
        verifier.keys.generation.fetch_add(1, Ordering::SeqCst);
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
