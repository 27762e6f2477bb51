//! The on-disk policy schema: what a YAML file may say, with source locations. Never used by
//! the proxy directly; `compile` turns it into a validated `Policy`. The same types derive the
//! JSON Schema that `bff schema` prints for editors, so the two cannot drift; their doc comments
//! are the help an editor shows.

use std::borrow::Cow;
use std::time::Duration;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

// `Spanned<T>` (a value and its location) is serde-saphyr's: each field holding one says with
// `#[schemars(with = "T")]` that the file holds a plain `T` there.

/// A bff policy: what one client type's Backend-for-Frontend answers, from which upstreams, for
/// whom. `bff check FILE` validates everything, including the rules this schema cannot say.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "bff policy")]
pub struct RawPolicy {
    /// The client type, lower-case (`mobile`, `web`): labels metrics, prefixes cache keys, is
    /// sent upstream as `X-BFF-Client`.
    #[schemars(with = "Text")]
    pub client: Spanned<String>,
    /// How clients authenticate: `jwt`, `api_key` or both. Without it no route checks a
    /// credential.
    #[serde(default)]
    #[schemars(with = "Option<RawAuth>")]
    pub auth: Option<Spanned<RawAuth>>,
    /// The internal services routes call, by name.
    #[serde(default)]
    pub upstreams: Named<RawUpstream>,
    /// Requests per client identity across all routes.
    #[schemars(with = "Option<RawRateLimit>")]
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    /// Which peers are proxies whose header names the client's address (behind an ingress).
    #[schemars(with = "Option<RawClientAddress>")]
    pub client_address: Option<Spanned<RawClientAddress>>,
    /// The endpoints this BFF serves.
    #[serde(default)]
    #[schemars(with = "Vec<RawRoute>")]
    pub routes: Vec<Spanned<RawRoute>>,
    /// The upstream (by name) that gets unmatched requests unchanged; without it they are
    /// answered 404.
    #[serde(default)]
    #[schemars(with = "Option<Text>")]
    pub fallthrough: Option<Spanned<String>>,
}

/// `auth: { jwt: {…}, api_key: {…}, failure_limit: {…} }`; at least one method.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Bearer JWTs (`Authorization: Bearer`, or a cookie).
    #[schemars(with = "Option<RawJwt>")]
    pub jwt: Option<Spanned<RawJwt>>,
    /// API keys in a header, checked against a file of SHA-256 hashes.
    #[schemars(with = "Option<RawApiKey>")]
    pub api_key: Option<Spanned<RawApiKey>>,
    /// Failed authentications per client address; defaults to 30 a minute.
    #[schemars(with = "Option<RawRateLimit>")]
    pub failure_limit: Option<Spanned<RawRateLimit>>,
}

/// `client_address: { trusted_proxies: [CIDR…], header: X-Forwarded-For }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawClientAddress {
    /// Addresses or CIDRs of the proxies in front of the sidecar.
    #[serde(default)]
    #[schemars(with = "Vec<Text>")]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// The header those proxies write the client's address into; default `X-Forwarded-For`.
    #[schemars(with = "Option<Text>")]
    pub header: Option<Spanned<String>>,
}

/// `jwt: { issuer, audience, algorithms, jwks_url | jwks_file | hs256_secret, leeway, cookie }`:
/// exactly one key source.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// The token's `iss` must equal this.
    #[schemars(with = "Text")]
    pub issuer: String,
    /// The token's `aud` must be or contain this.
    #[schemars(with = "Text")]
    pub audience: String,
    /// The signature algorithms accepted.
    #[schemars(with = "Vec<Algorithm>")]
    pub algorithms: Spanned<Vec<Algorithm>>,
    /// URL of the JSON Web Key Set (http:// or https://; may use `${env:NAME}`).
    #[schemars(with = "Option<Text>")]
    pub jwks_url: Option<Spanned<String>>,
    /// A JWKS file, relative to the policy file.
    #[schemars(with = "Option<Text>")]
    pub jwks_file: Option<Spanned<String>>,
    /// The HS256 secret, at least 32 bytes: `${env:NAME}` or `${file:PATH}`.
    #[schemars(with = "Option<Text>")]
    pub hs256_secret: Option<Spanned<String>>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Option<Humane>,
    /// Also read the token from this cookie (after `Authorization: Bearer`).
    #[schemars(with = "Option<Text>")]
    pub cookie: Option<Spanned<String>>,
}

/// `api_key: { header: X-Api-Key, keys_file: PATH }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    /// The request header carrying the key.
    #[schemars(with = "Text")]
    pub header: Spanned<String>,
    /// Lines of `<sha256 hex> <name>`, relative to the policy file; re-read when it changes.
    #[schemars(with = "Text")]
    pub keys_file: Spanned<String>,
}

/// The JWT signature algorithms a policy may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
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

/// One internal service: where it is, how long to wait, how to call it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `http://` or `https://host[:port][/base-path]`; may use `${env:NAME}`.
    #[schemars(with = "Text")]
    pub url: Spanned<String>,
    /// Bounds one call, its retries included; default 10s.
    #[schemars(with = "Option<Humane>")]
    pub timeout: Option<Spanned<Humane>>,
    /// Most calls in flight (at least 1); more wait. Default: no limit.
    #[schemars(with = "Option<usize>")]
    pub concurrency: Option<Spanned<usize>>,
    /// Retries of idempotent calls that failed to connect or got 502/503/504; default none.
    #[schemars(with = "Option<RawRetries>")]
    pub retries: Option<Spanned<RawRetries>>,
    /// On by default; `enabled: false` turns it off.
    #[schemars(with = "Option<RawBreaker>")]
    pub circuit_breaker: Option<Spanned<RawBreaker>>,
    /// Headers added to every call; values may use only `{jwt.*}` and `{auth.client}`.
    #[serde(default)]
    #[schemars(with = "Named<Text>")]
    pub headers: Named<String>,
    /// The sidecar's own credential for this upstream, one header.
    #[schemars(with = "Option<RawCredential>")]
    pub credential: Option<Spanned<RawCredential>>,
    /// Instead of `credential`: a bearer token from the client credentials grant.
    #[schemars(with = "Option<RawOAuth2>")]
    pub oauth2: Option<Spanned<RawOAuth2>>,
    /// Certificates of an `https://` upstream.
    #[schemars(with = "Option<RawTls>")]
    pub tls: Option<Spanned<RawTls>>,
}

/// `tls: { ca: PATH, cert: PATH, key: PATH, server_name: NAME }`; every key is optional.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM of the CA certificates to trust instead of the system's.
    #[schemars(with = "Option<Text>")]
    pub ca: Option<Spanned<String>>,
    /// PEM client certificate (mutual TLS), with `key`.
    #[schemars(with = "Option<Text>")]
    pub cert: Option<Spanned<String>>,
    /// PEM private key of `cert`.
    #[schemars(with = "Option<Text>")]
    pub key: Option<Spanned<String>>,
    /// The name to verify the upstream's certificate against, if not the URL's host.
    #[schemars(with = "Option<Text>")]
    pub server_name: Option<Spanned<String>>,
}

/// `retries: { attempts: 2, budget: 0.2, min_per_second: 10 }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    /// Retries after the first try, 1-5.
    // Optional in the type so that its absence is reported with the upstream's name.
    #[schemars(with = "Option<u32>", required)]
    pub attempts: Option<Spanned<u32>>,
    /// Retries allowed as a fraction of the calls made, in (0, 1]; default 0.2.
    #[schemars(with = "Option<f64>")]
    pub budget: Option<Spanned<f64>>,
    /// Retries a second allowed beyond the budget; default 10.
    pub min_per_second: Option<u32>,
}

/// `circuit_breaker: { enabled: true, consecutive_failures: 5, … }`; every key is optional.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    /// Default true.
    pub enabled: Option<bool>,
    /// Opens after this many failures in a row; default 5.
    #[schemars(with = "Option<u32>")]
    pub consecutive_failures: Option<Spanned<u32>>,
    /// Opens when this fraction of the calls in `window` failed, in (0, 1]; default 0.5.
    #[schemars(with = "Option<f64>")]
    pub failure_ratio: Option<Spanned<f64>>,
    /// Calls `window` must hold before `failure_ratio` counts; default 20.
    #[schemars(with = "Option<u32>")]
    pub min_requests: Option<Spanned<u32>>,
    /// Default 10s.
    #[schemars(with = "Option<Humane>")]
    pub window: Option<Spanned<Humane>>,
    /// How long it stays open before a probe call; default 5s.
    #[schemars(with = "Option<Humane>")]
    pub open_for: Option<Spanned<Humane>>,
}

/// `credential: { header: Authorization, value: "Bearer ${env:TOKEN}" }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    /// The header it is sent in, e.g. `Authorization`.
    #[schemars(with = "Text")]
    pub header: Spanned<String>,
    /// May use `${env:NAME}` and `${file:PATH}` (a file is re-read when it changes).
    #[schemars(with = "Text")]
    pub value: Spanned<String>,
}

/// `oauth2: { token_url, client_id, client_secret, scope }`: the client credentials grant.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth2 {
    /// The token endpoint, an http(s) URL; may use `${env:NAME}`.
    // Required, like `client_id` and `client_secret`; optional in the type so that an absence
    // is reported with the upstream's name.
    #[schemars(with = "Option<Text>", required)]
    pub token_url: Option<Spanned<String>>,
    /// May use `${env:NAME}` and `${file:PATH}`.
    #[schemars(with = "Option<Text>", required)]
    pub client_id: Option<Spanned<String>>,
    /// `${file:PATH}` or `${env:NAME}`; a file is re-read when it changes.
    #[schemars(with = "Option<Text>", required)]
    pub client_secret: Option<Spanned<String>>,
    /// Scope names separated by single spaces.
    #[schemars(with = "Option<Text>")]
    pub scope: Option<Spanned<String>>,
}

/// One endpoint: a `proxy` of one upstream, or the `fetch`es it aggregates.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Unique; the metrics label.
    #[schemars(with = "Text")]
    pub name: Spanned<String>,
    /// `GET`, `POST`, …
    #[schemars(with = "Text")]
    pub method: Spanned<String>,
    /// `/v1/orders/{id}`: a `{param}` is a whole segment; static segments win over params.
    #[schemars(with = "Text")]
    pub path: Spanned<String>,
    /// Part of every cache key; default 1.
    #[schemars(with = "Option<u32>")]
    pub version: Option<Spanned<u32>>,
    /// Default `required` when the policy has `auth`.
    #[schemars(with = "Option<RouteAuth>")]
    pub auth: Option<Spanned<RouteAuth>>,
    /// Every one must be in the token's `scope`/`scp`, else 403.
    #[schemars(with = "Option<Vec<Text>>")]
    pub scopes: Option<Spanned<Vec<String>>>,
    /// The whole aggregated answer's time limit.
    #[schemars(with = "Option<Humane>")]
    pub deadline: Option<Spanned<Humane>>,
    /// Caches the route's answer.
    #[schemars(with = "Option<RawCache>")]
    pub cache: Option<Spanned<RawCache>>,
    /// This route's own budget, on top of the policy's.
    #[schemars(with = "Option<RawRateLimit>")]
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    /// Headers added to the route's answers.
    #[serde(default)]
    #[schemars(with = "Named<Text>")]
    pub headers: Named<String>,
    /// The answer when a critical fetch fails.
    #[schemars(with = "Option<RawCriticalFailure>")]
    pub on_critical_failure: Option<Spanned<RawCriticalFailure>>,
    /// The calls whose projected answers make up the response, by name (its members).
    #[schemars(with = "Option<Named<RawFetch>>")]
    pub fetch: Option<Spanned<Named<RawFetch>>>,
    /// Instead of `fetch`: one upstream call, its JSON projected.
    #[schemars(with = "Option<RawProxy>")]
    pub proxy: Option<Spanned<RawProxy>>,
}

/// `rate_limit: { requests: 10, per: 1s, burst: 20 }`, for the whole policy or one route.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Requests allowed per `per`.
    #[schemars(with = "u32")]
    pub requests: Spanned<u32>,
    /// The period `requests` are counted over.
    #[schemars(with = "Humane")]
    pub per: Spanned<Humane>,
    /// Defaults to `requests`.
    #[schemars(with = "Option<u32>")]
    pub burst: Option<Spanned<u32>>,
}

/// `cache: { scope: user, ttl: 60s, jitter: 15s, beta: 1.0, stale_while_revalidate: 30s }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// `user`: one entry per identity; `shared`: one for everyone.
    pub scope: CacheScope,
    /// How long an entry is fresh.
    #[schemars(with = "Humane")]
    pub ttl: Spanned<Humane>,
    /// Each entry's TTL is moved by up to ± this at random, so entries expire apart.
    pub jitter: Option<Humane>,
    /// XFetch's early refresh before expiry; above 1 refreshes earlier. Default 1.
    #[schemars(with = "Option<f64>")]
    pub beta: Option<Spanned<f64>>,
    /// How long an expired entry may still be answered while it is refreshed.
    pub stale_while_revalidate: Option<Humane>,
    /// Store a degraded answer (an optional fetch fell back) this long; default: not stored.
    pub degraded_ttl: Option<Humane>,
}

/// Whether a route needs a credential: `required` (the default when the policy has `auth`),
/// `optional` (checked when present) or `none` (never looked at).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouteAuth {
    Required,
    Optional,
    None,
}

/// Whose response a cache entry is: one identity's, or everyone's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    User,
    Shared,
}

/// `on_critical_failure: { status: 503, code: CODE, message: "…", retryable: true }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCriticalFailure {
    /// The HTTP status answered.
    #[schemars(with = "u16")]
    pub status: Spanned<u16>,
    /// The error envelope's machine-readable code.
    #[schemars(with = "Text")]
    pub code: Spanned<String>,
    /// The error envelope's message for people.
    #[schemars(with = "Text")]
    pub message: String,
    /// Tells the client it may try again; default false.
    #[serde(default)]
    pub retryable: bool,
}

/// One upstream call of an aggregated route; either `critical: true` or a `fallback`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFetch {
    /// The upstream's name.
    #[schemars(with = "Text")]
    pub upstream: Spanned<String>,
    /// Under the upstream's base path; may use `{jwt.CLAIM}`, `{auth.client}`, `{path.NAME}`,
    /// `{query.NAME}`, `{fetch.NAME.FIELD}`.
    #[schemars(with = "Text")]
    pub path: Spanned<String>,
    /// Its failure fails the route (`on_critical_failure`).
    #[serde(default)]
    pub critical: bool,
    /// Take this member of the body first.
    #[schemars(with = "Option<Text>")]
    pub select: Option<Spanned<String>>,
    /// The whitelist of the answer's fields: `a`, `a.b`, `items[].x`, `tags[]`, `a.b as c`.
    #[schemars(with = "Option<Vec<Text>>")]
    pub fields: Option<Spanned<Vec<Spanned<String>>>>,
    /// What an optional fetch degrades to when it fails.
    #[schemars(with = "Option<serde_json::Value>")]
    pub fallback: Option<Spanned<serde_json::Value>>,
    /// Caches this fetch's projected answer for every request (shared, impersonal data only).
    #[schemars(with = "Option<RawFetchCache>")]
    pub cache: Option<Spanned<RawFetchCache>>,
}

/// `cache: { ttl: 10m, jitter: 1m }` on a fetch: its projected answer, shared by every request.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFetchCache {
    /// How long the answer is kept.
    #[schemars(with = "Humane")]
    pub ttl: Spanned<Humane>,
    /// Each entry's TTL is moved by up to ± this at random.
    pub jitter: Option<Humane>,
}

/// `proxy: { upstream, path, fields }`: one upstream call, its JSON projected.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    /// The upstream's name.
    #[schemars(with = "Text")]
    pub upstream: Spanned<String>,
    /// Under the upstream's base path; may use `{jwt.CLAIM}`, `{auth.client}`, `{path.NAME}`,
    /// `{query.NAME}`.
    #[schemars(with = "Text")]
    pub path: Spanned<String>,
    /// The whitelist of the answer's fields: `a`, `a.b`, `items[].x`, `tags[]`, `a.b as c`.
    #[schemars(with = "Option<Vec<Text>>")]
    pub fields: Option<Spanned<Vec<Spanned<String>>>>,
}

/// What the schema says of a `String` field: serde-saphyr reads any YAML scalar as its text
/// (`X-Version: 2` is the header value "2"), so numbers and booleans are accepted too.
enum Text {}

impl JsonSchema for Text {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Text".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": ["string", "number", "boolean"] })
    }
}

/// A duration written the way people write them: `300ms`, `60s`, `10m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Humane(pub Duration);

/// The schema's form of what `Humane` accepts: numbers each with a unit of ms, s, m or h.
const HUMANE_PATTERN: &str = r"^\s*([0-9]+(ms|s|m|h))+\s*$";

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

impl JsonSchema for Humane {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": HUMANE_PATTERN,
            "description": "A number and a unit (ms, s, m, h), like 300ms, 60s, 10m or 1h30m.",
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

impl<V: JsonSchema> JsonSchema for Named<V> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        format!("Named_{}", V::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "additionalProperties": generator.subschema_for::<V>(),
        })
    }
}

/// The JSON Schema of policy files, as `bff schema` prints it: draft-07, which every YAML
/// language server reads.
pub fn json_schema() -> serde_json::Value {
    let mut schema = schemars::generate::SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<RawPolicy>()
        .to_value();
    unwrap_descriptions(&mut schema);
    schema
}

/// Joins the lines of each description: a doc comment is wrapped at 100 columns for the source,
/// an editor wraps it for its own width.
fn unwrap_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, member) in map.iter_mut() {
                match member {
                    serde_json::Value::String(text) if key == "description" => {
                        *text = text.replace('\n', " ");
                    }
                    _ => unwrap_descriptions(member),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema's pattern must accept exactly what the loader reads as a duration, or an
    /// editor would flag good policies (or pass bad ones).
    #[test]
    fn the_duration_pattern_agrees_with_the_loader() {
        let pattern = regex::Regex::new(HUMANE_PATTERN).unwrap();
        for text in [
            "300ms",
            "60s",
            "10m",
            "1h",
            "1h30m",
            "0s",
            " 5s ",
            "10",
            "10M",
            "5 minutes",
            "1.5s",
            "",
            "s",
            "1 s",
            "1h 30m",
            "-1s",
            "1d",
            "ms10",
        ] {
            let loads = serde_json::from_value::<Humane>(serde_json::json!(text)).is_ok();
            assert_eq!(pattern.is_match(text), loads, "`{text}`");
        }
    }
}
