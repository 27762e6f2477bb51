//! Validation: turns a `RawPolicy` into a `Policy`, collecting every rule violation with the
//! line and column of the value at fault.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Uri};
use indexmap::IndexMap;
use serde_saphyr::{Location, Spanned};

use super::raw::{self, RawPolicy};
use super::secrets;
use super::template::{Template, Var};
use super::{
    Action, CachePolicy, Credential, CriticalFailure, Diagnostic, Fetch, JwtAuth, KeySource,
    Policy, ProxyTarget, Route, Upstream,
};
use crate::pipeline::route::RouteTable;
use crate::projection::{self, FieldMask};

/// Looks an upstream up by name, reporting an undefined one.
type FindUpstream<'a> = &'a dyn Fn(&mut Diagnostics, &Spanned<String>) -> Option<Arc<Upstream>>;

#[derive(Default)]
struct Diagnostics(Vec<Diagnostic>);

impl Diagnostics {
    fn at(&mut self, location: &Location, message: impl Into<String>) {
        self.0.push(Diagnostic {
            line: location.line(),
            column: location.column(),
            message: message.into(),
        });
    }

    /// Keeps the value when `result` is Ok, records the error at `location` otherwise.
    fn check<T>(&mut self, location: &Location, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.at(location, message)).ok()
    }
}

pub(super) fn compile(raw: RawPolicy, path: &Path) -> Result<Policy, Vec<Diagnostic>> {
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut diags = Diagnostics::default();

    let client = raw.client.value.clone();
    if !is_identifier(&client) {
        diags.at(
            &raw.client.referenced,
            format!("client `{client}` must be lower-case letters, digits, `-` or `_`"),
        );
    }

    let has_auth = raw.auth.is_some();
    let auth = raw
        .auth
        .and_then(|auth| compile_jwt(auth.value.jwt, base_dir, &mut diags));

    let defined: HashSet<String> = raw
        .upstreams
        .0
        .iter()
        .map(|(n, _)| n.value.clone())
        .collect();
    let mut upstreams = IndexMap::new();
    for (name, spec) in raw.upstreams.0 {
        if !is_identifier(&name.value) {
            diags.at(
                &name.referenced,
                format!(
                    "upstream name `{}` must be lower-case letters, digits, `-` or `_`",
                    name.value
                ),
            );
        }
        if let Some(upstream) = compile_upstream(&name.value, spec, base_dir, &mut diags) {
            upstreams.insert(name.value, Arc::new(upstream));
        }
    }
    let find_upstream = |diags: &mut Diagnostics, name: &Spanned<String>| {
        let found = upstreams.get(&name.value).cloned();
        // An upstream that is defined but invalid was reported where it is defined.
        if found.is_none() && !defined.contains(&name.value) {
            diags.at(
                &name.referenced,
                format!("upstream `{}` is not defined under `upstreams`", name.value),
            );
        }
        found
    };

    let mut routes = Vec::new();
    let mut names = HashSet::new();
    let mut route_locations = Vec::new();
    for spec in raw.routes {
        let location = spec.referenced;
        let name = &spec.value.name;
        if !names.insert(name.value.clone()) {
            diags.at(
                &name.referenced,
                format!("route name `{}` is used twice", name.value),
            );
        }
        // An invalid `auth` was reported already; judging templates by it would only add noise.
        if let Some(route) = compile_route(spec.value, has_auth, &find_upstream, &mut diags) {
            routes.push(Arc::new(route));
            route_locations.push(location);
        }
    }

    let fallthrough = raw
        .fallthrough
        .as_ref()
        .and_then(|name| find_upstream(&mut diags, name));

    let table = match RouteTable::build(routes.iter().map(|r| (r.method.clone(), r.path.as_str())))
    {
        Ok(table) => Some(table),
        Err(collisions) => {
            for (index, message) in collisions {
                diags.at(&route_locations[index], message);
            }
            None
        }
    };

    match table {
        Some(table) if diags.0.is_empty() => Ok(Policy {
            client,
            source: path.to_path_buf(),
            auth,
            upstreams,
            routes,
            table,
            fallthrough,
        }),
        _ => Err(diags.0),
    }
}

fn compile_jwt(
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
    Some(JwtAuth {
        issuer: jwt.issuer,
        audience: jwt.audience,
        algorithms,
        keys,
        leeway: jwt.leeway.map_or(Duration::from_secs(30), |d| d.0),
    })
}

fn compile_upstream(
    name: &str,
    spec: Spanned<raw::RawUpstream>,
    base_dir: &Path,
    diags: &mut Diagnostics,
) -> Option<Upstream> {
    let spec = spec.value;
    let url_at = spec.url.referenced;
    let text = diags.check(&url_at, secrets::resolve(&spec.url.value, base_dir))?;
    let uri = diags.check(
        &url_at,
        text.parse::<Uri>()
            .map_err(|e| format!("upstream `{name}`: `{text}` is not a URL: {e}")),
    )?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            diags.at(
                &url_at,
                format!("upstream `{name}`: https upstreams are not supported yet; use http://"),
            );
            return None;
        }
        _ => {
            diags.at(
                &url_at,
                format!("upstream `{name}`: url must start with http://"),
            );
            return None;
        }
    }
    let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
        diags.at(&url_at, format!("upstream `{name}`: url has no host"));
        return None;
    };
    if uri.query().is_some() {
        diags.at(
            &url_at,
            format!("upstream `{name}`: url must not have a query"),
        );
    }
    let port = uri.port_u16().unwrap_or(80);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let authority = uri
        .authority()
        .map_or_else(|| host.clone(), |a| a.as_str().to_string());

    if let Some(timeout) = &spec.timeout {
        if timeout.value.0.is_zero() {
            diags.at(&timeout.referenced, "`timeout` must be longer than zero");
        }
    }
    let credential = spec.credential.and_then(|c| {
        let c = c.value;
        let header = diags.check(
            &c.header.referenced,
            HeaderName::from_bytes(c.header.value.as_bytes())
                .map_err(|_| format!("`{}` is not a valid header name", c.header.value)),
        )?;
        let value = diags.check(
            &c.value.referenced,
            secrets::resolve(&c.value.value, base_dir),
        )?;
        let mut value = diags.check(
            &c.value.referenced,
            HeaderValue::from_str(&value)
                .map_err(|_| "credential value is not a valid header value".to_string()),
        )?;
        value.set_sensitive(true);
        Some(Credential { header, value })
    });

    Some(Upstream {
        name: name.to_string(),
        host,
        port,
        authority,
        base_path: uri.path().trim_end_matches('/').to_string(),
        timeout: spec.timeout.map(|t| t.value.0),
        credential,
    })
}

fn compile_route(
    spec: raw::RawRoute,
    has_auth: bool,
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
    let scope = TemplateScope {
        params: params.as_deref(),
        has_auth,
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

    let action = match (spec.fetch, spec.proxy) {
        (Some(fetch), None) => {
            let mut fetches = Vec::new();
            if fetch.value.0.is_empty() {
                diags.at(&fetch.referenced, "`fetch` must name at least one fetch");
            }
            for (fetch_name, f) in fetch.value.0 {
                if let Some(f) = compile_fetch(&fetch_name, f, &scope, find_upstream, diags) {
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

    let cache = spec.cache.map(|c| compile_cache(c, &action, diags));
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
        deadline: spec.deadline.map(|d| d.value.0),
        cache: cache.flatten(),
        headers,
        on_critical_failure,
        action,
        shape,
    })
}

fn compile_fetch(
    name: &Spanned<String>,
    spec: Spanned<raw::RawFetch>,
    scope: &TemplateScope,
    find_upstream: FindUpstream,
    diags: &mut Diagnostics,
) -> Option<Fetch> {
    let at = spec.referenced;
    let spec = spec.value;
    let (name_at, name) = (name.referenced, name.value.as_str());
    if !is_section_name(name) {
        diags.at(
            &name_at,
            format!("fetch name `{name}` must be letters, digits or `_`, starting with a letter"),
        );
    }
    let upstream = find_upstream(diags, &spec.upstream);
    let path = compile_template(&spec.path, scope, diags);
    let fields = compile_fields(spec.fields, &at, &format!("fetch `{name}`"), diags);
    let select = spec.select.and_then(|s| {
        diags
            .check(&s.referenced, projection::validate_select(&s.value))
            .map(|()| s.value)
    });
    match (spec.critical, &spec.fallback) {
        (true, Some(fallback)) => diags.at(
            &fallback.referenced,
            format!("fetch `{name}` is critical: its `fallback` would never be used"),
        ),
        (false, None) => diags.at(
            &at,
            format!(
                "fetch `{name}` must say `critical: true`, or be optional and give a `fallback`"
            ),
        ),
        _ => {}
    }
    Some(Fetch {
        name: name.to_string(),
        upstream: upstream?,
        path: path?,
        critical: spec.critical,
        select,
        fields: fields?,
        fallback: spec.fallback.map(|f| f.value),
    })
}

/// What a route's templates may refer to.
struct TemplateScope<'a> {
    /// The route path's parameters; `None` when the path itself is invalid (already reported).
    params: Option<&'a [String]>,
    has_auth: bool,
}

fn compile_template(
    spec: &Spanned<String>,
    scope: &TemplateScope,
    diags: &mut Diagnostics,
) -> Option<Template> {
    let template = diags.check(&spec.referenced, Template::parse(&spec.value))?;
    for var in template.vars() {
        match (var, scope.params) {
            (Var::Path(p), Some(params)) if !params.contains(p) => diags.at(
                &spec.referenced,
                format!("`{{path.{p}}}` is not a parameter of the route's path"),
            ),
            (Var::Jwt(claim), _) if !scope.has_auth => diags.at(
                &spec.referenced,
                format!("`{{jwt.{claim}}}` needs a verified token, but the policy has no `auth`"),
            ),
            _ => {}
        }
    }
    Some(template)
}

fn compile_fields(
    fields: Option<Spanned<Vec<Spanned<String>>>>,
    owner_at: &Location,
    owner: &str,
    diags: &mut Diagnostics,
) -> Option<FieldMask> {
    let Some(fields) = fields else {
        diags.at(
            owner_at,
            format!("{owner} needs `fields`: the whitelist of what reaches the client"),
        );
        return None;
    };
    if fields.value.is_empty() {
        diags.at(
            &fields.referenced,
            format!("{owner}: `fields` must list at least one field"),
        );
        return None;
    }
    let specs: Vec<&str> = fields.value.iter().map(|f| f.value.as_str()).collect();
    FieldMask::compile(&specs)
        .map_err(|e| {
            // Point at the entry at fault, not at the list.
            let at = fields
                .value
                .iter()
                .find(|f| f.value.trim() == e.field)
                .map_or(fields.referenced, |f| f.referenced);
            diags.at(&at, format!("{owner}: {e}"));
        })
        .ok()
}

fn compile_cache(
    spec: Spanned<raw::RawCache>,
    action: &Action,
    diags: &mut Diagnostics,
) -> Option<CachePolicy> {
    let at = spec.referenced;
    let spec = spec.value;
    if spec.ttl.value.0.is_zero() {
        diags.at(&spec.ttl.referenced, "cache `ttl` must be longer than zero");
    }
    let beta = spec.beta.as_ref().map_or(1.0, |b| b.value);
    if let Some(b) = &spec.beta {
        if !(b.value.is_finite() && b.value > 0.0) {
            diags.at(
                &b.referenced,
                "cache `beta` must be a positive number (1.0 is the usual)",
            );
        }
    }
    if spec.scope == raw::CacheScope::Shared {
        if let Action::Fetch(fetches) = action {
            for fetch in fetches {
                if let Some(var) = fetch.path.vars().find(|v| matches!(v, Var::Jwt(_))) {
                    diags.at(
                        &at,
                        format!(
                            "`scope: shared` caches one answer for everyone, but fetch `{}` uses `{{{var}}}`: personalised data must use `scope: user`",
                            fetch.name
                        ),
                    );
                }
            }
        }
    }
    Some(CachePolicy {
        scope: spec.scope,
        ttl: spec.ttl.value.0,
        jitter: spec.jitter.map_or(Duration::ZERO, |d| d.0),
        beta,
        stale_while_revalidate: spec.stale_while_revalidate.map_or(Duration::ZERO, |d| d.0),
        degraded_ttl: spec.degraded_ttl.map(|d| d.0),
    })
}

fn compile_critical_failure(
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

fn parse_method(text: &str) -> Result<Method, String> {
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
fn path_params(path: &str) -> Result<Vec<String>, String> {
    if !path.starts_with('/') {
        return Err(format!("route path `{path}` must start with `/`"));
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

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn is_section_name(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// FNV-1a over the parts of a route that decide its response's shape. Stable across builds and
/// platforms, unlike std's hasher, because every instance must derive the same cache keys.
fn shape_hash(action: &Action) -> String {
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
