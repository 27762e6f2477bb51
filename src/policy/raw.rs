//! The on-disk policy schema: what a YAML file may say, with source locations. Never used by
//! the proxy directly; `compile` turns it into a validated `Policy`.

use std::time::Duration;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub client: Spanned<String>,
    #[serde(default)]
    pub auth: Option<Spanned<RawAuth>>,
    #[serde(default)]
    pub upstreams: Named<RawUpstream>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    pub client_address: Option<Spanned<RawClientAddress>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub fallthrough: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub jwt: Option<Spanned<RawJwt>>,
    pub api_key: Option<Spanned<RawApiKey>>,
    /// Failed authentications per client address; defaults to 30 a minute.
    pub failure_limit: Option<Spanned<RawRateLimit>>,
}

/// `client_address: { trusted_proxies: [CIDR…], header: X-Forwarded-For }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientAddress {
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    pub header: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub issuer: String,
    pub audience: String,
    pub algorithms: Spanned<Vec<Algorithm>>,
    pub jwks_url: Option<Spanned<String>>,
    pub jwks_file: Option<Spanned<String>>,
    pub hs256_secret: Option<Spanned<String>>,
    pub leeway: Option<Humane>,
    /// Also read the token from this cookie (after `Authorization: Bearer`).
    pub cookie: Option<Spanned<String>>,
}

/// `api_key: { header: X-Api-Key, keys_file: PATH }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    pub header: Spanned<String>,
    pub keys_file: Spanned<String>,
}

/// The JWT signature algorithms a policy may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    ES256,
    ES384,
    EdDSA,
    HS256,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Spanned<String>,
    pub timeout: Option<Spanned<Humane>>,
    pub concurrency: Option<Spanned<usize>>,
    pub retries: Option<Spanned<RawRetries>>,
    pub circuit_breaker: Option<Spanned<RawBreaker>>,
    #[serde(default)]
    pub headers: Named<String>,
    pub credential: Option<Spanned<RawCredential>>,
    pub oauth2: Option<Spanned<RawOAuth2>>,
    pub tls: Option<Spanned<RawTls>>,
}

/// `tls: { ca: PATH, cert: PATH, key: PATH, server_name: NAME }`; every key is optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: Option<Spanned<String>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
}

/// `retries: { attempts: 2, budget: 0.2, min_per_second: 10 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    /// Required; optional here so that its absence is reported with the upstream's name.
    pub attempts: Option<Spanned<u32>>,
    pub budget: Option<Spanned<f64>>,
    pub min_per_second: Option<u32>,
}

/// `circuit_breaker: { enabled: true, consecutive_failures: 5, … }`; every key is optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<Spanned<u32>>,
    pub failure_ratio: Option<Spanned<f64>>,
    pub min_requests: Option<Spanned<u32>>,
    pub window: Option<Spanned<Humane>>,
    pub open_for: Option<Spanned<Humane>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub header: Spanned<String>,
    pub value: Spanned<String>,
}

/// `oauth2: { token_url, client_id, client_secret, scope }`: the client credentials grant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth2 {
    /// Required, like `client_id` and `client_secret`; optional here so that an absence is
    /// reported with the upstream's name.
    pub token_url: Option<Spanned<String>>,
    pub client_id: Option<Spanned<String>>,
    pub client_secret: Option<Spanned<String>>,
    pub scope: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Spanned<String>,
    pub method: Spanned<String>,
    pub path: Spanned<String>,
    pub version: Option<Spanned<u32>>,
    pub auth: Option<Spanned<RouteAuth>>,
    pub scopes: Option<Spanned<Vec<String>>>,
    pub deadline: Option<Spanned<Humane>>,
    pub cache: Option<Spanned<RawCache>>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    #[serde(default)]
    pub headers: Named<String>,
    pub on_critical_failure: Option<Spanned<RawCriticalFailure>>,
    pub fetch: Option<Spanned<Named<RawFetch>>>,
    pub proxy: Option<Spanned<RawProxy>>,
}

/// `rate_limit: { requests: 10, per: 1s, burst: 20 }`, for the whole policy or one route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests: Spanned<u32>,
    pub per: Spanned<Humane>,
    /// Defaults to `requests`.
    pub burst: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub scope: CacheScope,
    pub ttl: Spanned<Humane>,
    pub jitter: Option<Humane>,
    pub beta: Option<Spanned<f64>>,
    pub stale_while_revalidate: Option<Humane>,
    pub degraded_ttl: Option<Humane>,
}

/// Whether a route needs a credential: `required` (the default when the policy has `auth`),
/// `optional` (checked when present) or `none` (never looked at).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteAuth {
    Required,
    Optional,
    None,
}

/// Whose response a cache entry is: one identity's, or everyone's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    User,
    Shared,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCriticalFailure {
    pub status: Spanned<u16>,
    pub code: Spanned<String>,
    pub message: String,
    #[serde(default)]
    pub retryable: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFetch {
    pub upstream: Spanned<String>,
    pub path: Spanned<String>,
    #[serde(default)]
    pub critical: bool,
    pub select: Option<Spanned<String>>,
    pub fields: Option<Spanned<Vec<Spanned<String>>>>,
    pub fallback: Option<Spanned<serde_json::Value>>,
    pub cache: Option<Spanned<RawFetchCache>>,
}

/// `cache: { ttl: 10m, jitter: 1m }` on a fetch: its projected answer, shared by every request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFetchCache {
    pub ttl: Spanned<Humane>,
    pub jitter: Option<Humane>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub upstream: Spanned<String>,
    pub path: Spanned<String>,
    pub fields: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A duration written the way people write them: `300ms`, `60s`, `10m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Humane(pub Duration);

impl<'de> Deserialize<'de> for Humane {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        // Only the units a proxy timeout or TTL needs: humantime alone would read `10M` as ten
        // months and `5 minutes` as five minutes, both easy to write by mistake.
        let units_ok = text
            .trim()
            .split(|c: char| c.is_ascii_digit())
            .all(|unit| matches!(unit, "" | "ms" | "s" | "m" | "h"));
        units_ok
            .then(|| humantime::parse_duration(text.trim()).ok())
            .flatten()
            .map(Humane)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a duration; write a number and a unit (ms, s, m, h), like 300ms, 60s or 10m"
                ))
            })
    }
}

/// A mapping whose keys are names (upstreams, fetches, headers), kept in file order with the
/// location of each key, so an error about a name points at the name.
#[derive(Debug)]
pub struct Named<V>(pub Vec<(Spanned<String>, Spanned<V>)>);

impl<V> Default for Named<V> {
    fn default() -> Self {
        Named(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Named<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NamedVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for NamedVisitor<V> {
            type Value = Named<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping of names")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Named<V>, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Named(entries))
            }
        }
        deserializer.deserialize_map(NamedVisitor(std::marker::PhantomData))
    }
}
