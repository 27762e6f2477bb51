//! auth: which credential a request presents, and whether it passes the route's `auth` and
//! `scopes`.
//!
//! The credentials the policy accepts are looked for in its order (`jwt`: `Authorization:
//! Bearer`, then its cookie; `api_key`: its header). The first one present decides: a present
//! but invalid credential is refused, never skipped for the next, so a forged token cannot
//! fall back to a weaker method. A route with `auth: none` never looks at credentials.

mod api_key;
mod failure;
mod jwt;

use std::sync::Arc;

use http::{HeaderMap, HeaderValue};

pub use api_key::ApiKeys;
pub use failure::AuthFailure;
pub use jwt::{KeyLoadError, Verifier};

use crate::caller::Claims;
use crate::policy::{Route, RouteAuth};

/// Who the request is, by the credential it presented.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    Anonymous,
    Token(Arc<Claims>),
    /// The name of the API key (`{auth.client}`).
    ApiKey(Arc<str>),
}

/// A request the route does not let through.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// 401: no credential where one is required, or an invalid one.
    Unauthenticated {
        failure: AuthFailure,
        /// `WWW-Authenticate` values (RFC 7235 asks for at least one).
        challenges: Vec<HeaderValue>,
    },
    /// 403: a valid token without every scope the route needs.
    Forbidden { challenge: HeaderValue },
}

impl Refusal {
    /// The `reason` label of `bff_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated { failure, .. } => failure.reason(),
            Refusal::Forbidden { .. } => "insufficient_scope",
        }
    }

    /// No credential, where the route needs one: the challenge of every accepted method.
    pub fn missing(methods: Methods<'_>) -> Refusal {
        let mut challenges = Vec::new();
        if methods.verifier.is_some() {
            challenges.push(HeaderValue::from_static("Bearer"));
        }
        if let Some(keys) = methods.api_keys {
            challenges.push(api_key_challenge(keys, None));
        }
        Refusal::Unauthenticated {
            failure: AuthFailure::Missing,
            challenges,
        }
    }
}

/// The credentials a policy accepts, in the order they are looked for (see `Active::auth_methods`).
#[derive(Clone, Copy)]
pub struct Methods<'a> {
    pub verifier: Option<&'a Verifier>,
    pub api_keys: Option<&'a ApiKeys>,
    pub api_key_first: bool,
}

/// Checks the request's credential against the route's `auth` and `scopes`.
pub async fn authenticate(
    methods: Methods<'_>,
    route: &Route,
    headers: &HeaderMap,
) -> Result<Principal, Refusal> {
    if route.auth == RouteAuth::None {
        return Ok(Principal::Anonymous);
    }
    let principal = presented(methods, headers).await?;
    if principal == Principal::Anonymous && route.auth == RouteAuth::Required {
        return Err(Refusal::missing(methods));
    }
    if !route.scopes.is_empty() {
        let granted = match &principal {
            Principal::Token(claims) => granted_scopes(claims),
            _ => Vec::new(),
        };
        if !route.scopes.iter().all(|s| granted.contains(&s.as_str())) {
            // Scopes were checked by the loader to be header-safe.
            let challenge = format!(
                "Bearer error=\"insufficient_scope\", scope=\"{}\"",
                route.scopes.join(" ")
            );
            return Err(Refusal::Forbidden {
                challenge: HeaderValue::from_str(&challenge).unwrap_or(HeaderValue::from_static(
                    "Bearer error=\"insufficient_scope\"",
                )),
            });
        }
    }
    Ok(principal)
}

/// The first credential the request presents, in the policy's order, verified.
async fn presented(methods: Methods<'_>, headers: &HeaderMap) -> Result<Principal, Refusal> {
    let by_token = async {
        let Some(verifier) = methods.verifier else {
            return Ok(None);
        };
        match verifier.verify(headers).await {
            Ok(claims) => Ok(claims.map(Principal::Token)),
            Err(failure) => Err(Refusal::Unauthenticated {
                failure,
                challenges: vec![HeaderValue::from_static("Bearer error=\"invalid_token\"")],
            }),
        }
    };
    let by_key = || {
        let Some(keys) = methods.api_keys else {
            return Ok(None);
        };
        match keys.check(headers) {
            Ok(name) => Ok(name.map(Principal::ApiKey)),
            Err(failure) => Err(Refusal::Unauthenticated {
                failure,
                challenges: vec![api_key_challenge(keys, Some("invalid_key"))],
            }),
        }
    };
    let found = if methods.api_key_first {
        match by_key()? {
            Some(principal) => Some(principal),
            None => by_token.await?,
        }
    } else {
        match by_token.await? {
            Some(principal) => Some(principal),
            None => by_key()?,
        }
    };
    Ok(found.unwrap_or(Principal::Anonymous))
}

/// `ApiKey header="x-api-key"`: not a registered scheme, but it tells a client what to send.
fn api_key_challenge(keys: &ApiKeys, error: Option<&str>) -> HeaderValue {
    let mut challenge = format!("ApiKey header=\"{}\"", keys.header());
    if let Some(error) = error {
        challenge.push_str(&format!(", error=\"{error}\""));
    }
    HeaderValue::from_str(&challenge).unwrap_or(HeaderValue::from_static("ApiKey"))
}

/// The scopes a token grants: `scope` (space-separated, RFC 8693) and `scp` (an array, or a
/// space-separated string as some issuers write it).
fn granted_scopes(claims: &Claims) -> Vec<&str> {
    let mut granted = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(serde_json::Value::String(s)) => granted.extend(s.split(' ')),
            Some(serde_json::Value::Array(items)) => {
                granted.extend(items.iter().filter_map(|v| v.as_str()))
            }
            _ => {}
        }
    }
    granted.retain(|s| !s.is_empty());
    granted
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claims(value: serde_json::Value) -> Claims {
        match value {
            serde_json::Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    #[test]
    fn scopes_come_from_scope_and_scp() {
        let granted = |v| {
            let c = claims(v);
            granted_scopes(&c)
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(granted(json!({"scope": "a  b"})), ["a", "b"]);
        assert_eq!(granted(json!({"scp": ["c", 7, "d"]})), ["c", "d"]);
        assert_eq!(granted(json!({"scp": "e f"})), ["e", "f"]);
        assert_eq!(granted(json!({"scope": "a", "scp": ["b"]})), ["a", "b"]);
        assert!(granted(json!({"scope": {"a": true}})).is_empty());
        assert!(granted(json!({})).is_empty());
    }
}
