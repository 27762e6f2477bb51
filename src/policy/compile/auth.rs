//! policy::compile::auth: the policy's `auth` (JWT key source and checks, API keys, failure
//! limit) and each route's `auth` and `scopes`.

use std::path::Path;
use std::time::Duration;

use http::{HeaderName, Uri};
use serde_saphyr::{Location, Spanned};

use super::diagnostics::Diagnostics;
use super::rate_limit::compile_rate_limit;
use super::scope::Identities;
use super::upstream::reserved_header;
use crate::policy::api_keys::ApiKeySet;
use crate::policy::raw;
use crate::policy::secrets;
use crate::policy::{ApiKeyAuth, Auth, JwtAuth, KeySource, RouteAuth};

pub(super) fn compile_auth(
    auth: Spanned<raw::RawAuth>,
    base_dir: &Path,
    diags: &mut Diagnostics,
) -> Option<Auth> {
    let (at, auth) = (auth.referenced, auth.value);
    if auth.jwt.is_none() && auth.api_key.is_none() {
        diags.at(&at, "`auth` needs at least one method: `jwt` or `api_key`");
        return None;
    }
    let position = |l: &Location| (l.line(), l.column());
    let api_key_first = match (&auth.jwt, &auth.api_key) {
        (Some(jwt), Some(key)) => position(&key.referenced) < position(&jwt.referenced),
        _ => false,
    };
    let jwt = auth.jwt.map(|jwt| compile_jwt(jwt, base_dir, diags));
    let api_key = auth
        .api_key
        .map(|key| compile_api_key(key, base_dir, diags));
    let failure_limit = match auth.failure_limit {
        Some(limit) => compile_rate_limit(limit, "", "auth.failure_limit", diags),
        None => Some(Auth::DEFAULT_FAILURE_LIMIT),
    };
    Some(Auth {
        jwt: match jwt {
            Some(jwt) => Some(jwt?),
            None => None,
        },
        api_key: match api_key {
            Some(key) => Some(key?),
            None => None,
        },
        api_key_first,
        failure_limit: failure_limit?,
    })
}

/// A header that carries a credential the sidecar reads itself: the one the policy names for
/// API keys may not be one of these.
pub(super) fn is_credential_header(header: &HeaderName) -> bool {
    header == http::header::AUTHORIZATION || header == http::header::COOKIE
}

pub(super) fn compile_api_key(
    spec: Spanned<raw::RawApiKey>,
    base_dir: &Path,
    diags: &mut Diagnostics,
) -> Option<ApiKeyAuth> {
    let spec = spec.value;
    let header = diags.check(
        &spec.header.referenced,
        HeaderName::from_bytes(spec.header.value.as_bytes())
            .map_err(|_| format!("`{}` is not a valid header name", spec.header.value))
            .and_then(|h| {
                if is_credential_header(&h) || reserved_header(&h).is_some() {
                    Err(format!(
                        "`api_key.header` cannot be `{}`: use a header of its own, such as X-Api-Key",
                        spec.header.value
                    ))
                } else {
                    Ok(h)
                }
            }),
    );
    let keys_file = base_dir.join(&spec.keys_file.value);
    let keys = diags.check(
        &spec.keys_file.referenced,
        ApiKeySet::read(&keys_file).map_err(|e| e.to_string()),
    );
    Some(ApiKeyAuth {
        header: header?,
        keys_file,
        keys: keys?,
    })
}

pub(super) fn compile_jwt(
    jwt: Spanned<raw::RawJwt>,
    base_dir: &Path,
    diags: &mut Diagnostics,
) -> Option<JwtAuth> {
    let location = jwt.referenced;
    let jwt = jwt.value;
    let algorithms = jwt.algorithms.value.clone();
    if algorithms.is_empty() {
        diags.at(
            &jwt.algorithms.referenced,
            "`algorithms` must list at least one algorithm",
        );
    }
    let hs256 = algorithms.contains(&raw::Algorithm::HS256);
    let sources = [
        jwt.jwks_url.is_some(),
        jwt.jwks_file.is_some(),
        jwt.hs256_secret.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        diags.at(
            &location,
            "`auth.jwt` needs exactly one key source: `jwks_url`, `jwks_file` or `hs256_secret`",
        );
        return None;
    }
    let keys = if let Some(url) = jwt.jwks_url {
        let value = diags.check(&url.referenced, secrets::resolve(&url.value, base_dir))?;
        let parsed = diags.check(
            &url.referenced,
            value
                .parse::<Uri>()
                .map_err(|e| format!("`jwks_url` `{value}` is not a URL: {e}")),
        )?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
            diags.at(
                &url.referenced,
                "`jwks_url` must be an http:// or https:// URL",
            );
        }
        KeySource::JwksUrl(value)
    } else if let Some(file) = jwt.jwks_file {
        KeySource::JwksFile(base_dir.join(&file.value))
    } else {
        let secret = jwt.hs256_secret?;
        if !hs256 {
            diags.at(
                &secret.referenced,
                "`hs256_secret` is given but `algorithms` does not list HS256",
            );
        }
        let value = diags.check(
            &secret.referenced,
            secrets::resolve(&secret.value, base_dir),
        )?;
        if value.len() < 32 {
            diags.at(
                &secret.referenced,
                "`hs256_secret` must be at least 32 bytes long",
            );
        }
        KeySource::Hs256Secret(value)
    };
    if hs256 && !matches!(keys, KeySource::Hs256Secret(_)) {
        diags.at(
            &jwt.algorithms.referenced,
            "HS256 is only accepted with an `hs256_secret`",
        );
    }
    let cookie = jwt.cookie.and_then(|cookie| {
        let valid = !cookie.value.is_empty()
            && cookie
                .value
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !valid {
            diags.at(
                &cookie.referenced,
                format!("`cookie`: `{}` is not a valid cookie name", cookie.value),
            );
        }
        valid.then_some(cookie.value)
    });
    Some(JwtAuth {
        issuer: jwt.issuer,
        audience: jwt.audience,
        algorithms,
        keys,
        leeway: jwt.leeway.map_or(Duration::from_secs(30), |d| d.0),
        cookie,
    })
}

/// A route's `auth` (by default `required` when the policy has `auth`, `none` otherwise) and
/// `scopes`.
pub(super) fn compile_route_auth(
    route: &str,
    auth: &Option<Spanned<RouteAuth>>,
    scopes: Option<Spanned<Vec<String>>>,
    identities: Identities,
    diags: &mut Diagnostics,
) -> (RouteAuth, Vec<String>) {
    let has_auth = identities.jwt || identities.api_key;
    let mode = match auth {
        Some(mode) if mode.value != RouteAuth::None && !has_auth => {
            diags.at(
                &mode.referenced,
                format!(
                    "route `{route}`: `auth` needs the policy's `auth` section, which is missing"
                ),
            );
            RouteAuth::None
        }
        Some(mode) => mode.value,
        None if has_auth => RouteAuth::Required,
        None => RouteAuth::None,
    };
    let Some(scopes) = scopes else {
        return (mode, Vec::new());
    };
    let at = scopes.referenced;
    if !identities.jwt {
        diags.at(
            &at,
            format!("route `{route}`: `scopes` are granted by a token, but the policy has no `auth.jwt`"),
        );
    } else if mode != RouteAuth::Required {
        diags.at(
            &at,
            format!("route `{route}`: `scopes` need `auth: required` (a request without a token has no scope)"),
        );
    }
    let valid = |s: &String| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    };
    if let Some(bad) = scopes.value.iter().find(|s| !valid(s)) {
        diags.at(
            &at,
            format!("route `{route}`: `{bad}` is not a scope (printable characters, no spaces, quotes or backslashes)"),
        );
    }
    if scopes.value.is_empty() {
        diags.at(
            &at,
            format!("route `{route}`: `scopes` must list at least one scope, or be left out"),
        );
    }
    (mode, scopes.value)
}
