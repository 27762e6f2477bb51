//! policy::compile::route: a route: method and path, headers, its action (fetches or a proxy),
//! its options, and the shape hash its cache keys carry.

use http::{HeaderName, HeaderValue, Method};
use serde_saphyr::Spanned;

use super::auth::compile_route_auth;
use super::cache::compile_cache;
use super::diagnostics::Diagnostics;
use super::fetch::{check_fetch_caches, compile_fetch, link_fetches, personal_fetches};
use super::names::is_identifier;
use super::rate_limit::compile_rate_limit;
use super::scope::{compile_fields, compile_template, Identities, TemplateScope};
use super::upstream::FindUpstream;
use crate::policy::raw;
use crate::policy::template::Var;
use crate::policy::{Action, CriticalFailure, ProxyTarget, Route, RouteAuth, Upstream};

pub(super) fn compile_route(
    spec: raw::RawRoute,
    identities: Identities,
    find_upstream: FindUpstream,
    diags: &mut Diagnostics,
) -> Option<Route> {
    let name = spec.name.value.clone();
    if !is_identifier(&name) {
        diags.at(
            &spec.name.referenced,
            format!("route name `{name}` must be lower-case letters, digits, `-` or `_`"),
        );
    }
    let method = diags.check(&spec.method.referenced, parse_method(&spec.method.value));
    let params = diags.check(&spec.path.referenced, path_params(&spec.path.value));
    let (auth, scopes) = compile_route_auth(&name, &spec.auth, spec.scopes, identities, diags);
    let has_auth = identities.jwt || identities.api_key;
    let scope = TemplateScope {
        params: params.as_deref(),
        identities,
        // Without the policy's `auth`, identity variables are refused for that reason instead.
        auth_none: auth == RouteAuth::None && has_auth,
        fetch_vars: spec.fetch.is_some(),
    };

    let mut headers = Vec::new();
    for (header, value) in &spec.headers.0 {
        let header = &header.value;
        let parsed = HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| format!("`{header}` is not a valid header name"))
            .and_then(|n| {
                HeaderValue::from_str(&value.value)
                    .map(|v| (n, v))
                    .map_err(|_| format!("header `{header}` has an invalid value"))
            });
        if let Some(pair) = diags.check(&value.referenced, parsed) {
            headers.push(pair);
        }
    }

    // Fetches whose answers are personal, with the reason, for a shared cache to refuse.
    let mut personal = Vec::new();
    let action = match (spec.fetch, spec.proxy) {
        (Some(fetch), None) => {
            if fetch.value.0.is_empty() {
                diags.at(&fetch.referenced, "`fetch` must name at least one fetch");
            }
            let mut nodes = Vec::new();
            let mut compiled = Vec::new();
            for (fetch_name, f) in fetch.value.0 {
                let (node, f) = compile_fetch(&fetch_name, f, &scope, find_upstream, diags);
                nodes.push(node);
                compiled.push(f);
            }
            let links = link_fetches(&name, &nodes, diags);
            personal = personal_fetches(&nodes, &links);
            check_fetch_caches(&nodes, &links, &personal, diags);
            let mut fetches = Vec::new();
            for (f, link) in compiled.into_iter().zip(links) {
                // A fetch that did not compile was reported; the route is refused anyway.
                if let Some(mut f) = f {
                    f.parents = link.parents;
                    f.wave = link.wave;
                    fetches.push(f);
                }
            }
            Action::Fetch(fetches)
        }
        (None, Some(proxy)) => {
            let at = proxy.referenced;
            let proxy = proxy.value;
            for (key, location) in [
                ("cache", spec.cache.as_ref().map(|c| c.referenced)),
                ("deadline", spec.deadline.as_ref().map(|d| d.referenced)),
                (
                    "on_critical_failure",
                    spec.on_critical_failure.as_ref().map(|c| c.referenced),
                ),
            ] {
                if let Some(location) = location {
                    diags.at(
                        &location,
                        format!("route `{name}`: `{key}` applies to `fetch` routes, not to `proxy` routes"),
                    );
                }
            }
            let upstream = find_upstream(diags, &proxy.upstream);
            let path = compile_template(&proxy.path, &scope, diags);
            let fields = compile_fields(
                proxy.fields,
                &at,
                &format!("proxy of route `{name}`"),
                diags,
            );
            Action::Proxy(ProxyTarget {
                upstream: upstream?,
                path: path?,
                fields: fields?,
            })
        }
        (Some(_), Some(_)) | (None, None) => {
            diags.at(
                &spec.name.referenced,
                format!("route `{name}` needs exactly one of `fetch` or `proxy`"),
            );
            return None;
        }
    };

    if scope.auth_none {
        let upstreams: Vec<&Upstream> = match &action {
            Action::Fetch(fetches) => fetches.iter().map(|f| &*f.upstream).collect(),
            Action::Proxy(target) => vec![&*target.upstream],
        };
        let at = spec
            .auth
            .as_ref()
            .map_or(spec.name.referenced, |a| a.referenced);
        for upstream in upstreams {
            let personal = upstream
                .headers
                .iter()
                .find(|(_, t)| t.vars().any(|v| matches!(v, Var::Jwt(_) | Var::AuthClient)));
            if let Some((header, template)) = personal {
                diags.at(
                    &at,
                    format!(
                        "route `{name}` has no identity (`auth: none`), but calls upstream `{}`, whose header `{header}` is `{}`",
                        upstream.name,
                        template.as_str()
                    ),
                );
            }
        }
    }
    let cache = spec.cache.map(|c| compile_cache(c, &personal, diags));
    let rate_limit = spec
        .rate_limit
        .and_then(|r| compile_rate_limit(r, &format!("route `{name}`: "), "rate_limit", diags));
    let on_critical_failure = spec
        .on_critical_failure
        .map(|c| compile_critical_failure(c, diags))
        .unwrap_or_default();
    let version = spec.version.as_ref().map_or(1, |v| v.value);
    if let Some(v) = &spec.version {
        if v.value == 0 {
            diags.at(&v.referenced, "`version` starts at 1");
        }
    }
    if let Some(deadline) = &spec.deadline {
        if deadline.value.0.is_zero() {
            diags.at(&deadline.referenced, "`deadline` must be longer than zero");
        }
    }
    let shape = shape_hash(&action);
    Some(Route {
        name,
        method: method?,
        path: spec.path.value,
        version,
        auth,
        scopes,
        deadline: spec.deadline.map(|d| d.value.0),
        cache: cache.flatten(),
        rate_limit,
        headers,
        on_critical_failure,
        action,
        shape,
    })
}

pub(super) fn compile_critical_failure(
    spec: Spanned<raw::RawCriticalFailure>,
    diags: &mut Diagnostics,
) -> CriticalFailure {
    let spec = spec.value;
    if !(400..=599).contains(&spec.status.value) {
        diags.at(
            &spec.status.referenced,
            "`on_critical_failure.status` must be an error status (400-599)",
        );
    }
    let code = &spec.code.value;
    if code.is_empty()
        || !code
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    {
        diags.at(
            &spec.code.referenced,
            format!("error code `{code}` must be UPPER_SNAKE_CASE"),
        );
    }
    CriticalFailure {
        status: spec.status.value,
        code: spec.code.value,
        message: spec.message,
        retryable: spec.retryable,
    }
}

pub(super) fn parse_method(text: &str) -> Result<Method, String> {
    match text {
        "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => {
            Method::from_bytes(text.as_bytes()).map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "method `{text}` must be one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        )),
    }
}

/// Checks a route path and returns its `{param}` names.
pub(super) fn path_params(path: &str) -> Result<Vec<String>, String> {
    if !path.starts_with('/') {
        return Err(format!("route path `{path}` must start with `/`"));
    }
    // Requests are routed on their normalised path (`pipeline::path`), which has none of these.
    if path.contains("//") || path.split('/').any(|s| s == "." || s == "..") {
        return Err(format!(
            "route path `{path}` has an empty, `.` or `..` segment, which no request path can match"
        ));
    }
    let mut params = Vec::new();
    for segment in path.split('/').skip(1) {
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`{{{name}}}` in `{path}` is not a valid parameter name"
                ));
            }
            if params.iter().any(|p| p == name) {
                return Err(format!("parameter `{{{name}}}` appears twice in `{path}`"));
            }
            params.push(name.to_string());
        } else if segment.contains(['{', '}', '*', '?', '#', '%']) {
            return Err(format!(
                "segment `{segment}` of `{path}`: a parameter is a whole segment like `{{id}}`, and `* ? # %` are not allowed"
            ));
        }
    }
    Ok(params)
}

/// FNV-1a over the parts of a route that decide its response's shape. Stable across builds and
/// platforms, unlike std's hasher, because every instance must derive the same cache keys.
pub(super) fn shape_hash(action: &Action) -> String {
    let mut text = String::new();
    match action {
        Action::Fetch(fetches) => {
            for f in fetches {
                let fallback = f
                    .fallback
                    .as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                text.push_str(&format!(
                    "fetch\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1e}",
                    f.name,
                    f.upstream.name,
                    f.path.as_str(),
                    f.select.as_deref().unwrap_or(""),
                    f.fields.canonical(),
                    fallback
                ));
            }
        }
        Action::Proxy(p) => text.push_str(&format!(
            "proxy\u{1f}{}\u{1f}{}\u{1f}{}",
            p.upstream.name,
            p.path.as_str(),
            p.fields.canonical()
        )),
    }
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{:08x}", hash >> 32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn route_paths_are_in_the_normal_form_requests_are_routed_on() {
        assert_eq!(super::path_params("/a/{id}/"), Ok(vec!["id".to_string()]));
        for path in ["/a//b", "//a", "/a/./b", "/a/..", "/./a"] {
            let err = super::path_params(path).unwrap_err();
            assert!(err.contains("`.` or `..` segment"), "{path}: {err}");
        }
    }
}
