//! Validation: turns a `RawPolicy` into a `Policy`, collecting every rule violation with the
//! line and column of the value at fault.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Uri};
use indexmap::IndexMap;
use rustls::pki_types::ServerName;
use serde_saphyr::{Location, Spanned};

use super::api_keys::ApiKeySet;
use super::raw::{self, RawPolicy};
use super::route_table::RouteTable;
use super::secrets;
use super::template::{Template, Var};
use super::tls_files::{CaBundle, ClientIdentity, IdentityError};
use super::{
    Action, ApiKeyAuth, Auth, BreakerPolicy, CachePolicy, ClientAddress, Credential,
    CriticalFailure, Diagnostic, Fetch, FetchCache, JwtAuth, KeySource, OAuth2Client, Policy,
    ProxyTarget, RateLimit, RetryPolicy, Route, RouteAuth, SecretText, TlsPolicy, Upstream,
};
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

    let raw_auth = raw.auth.as_ref().map(|a| Identities {
        jwt: a.value.jwt.is_some(),
        api_key: a.value.api_key.is_some(),
    });
    let auth = raw
        .auth
        .and_then(|auth| compile_auth(auth, base_dir, &mut diags));
    // What templates may refer to, judged by what the policy says even when a part of its
    // `auth` is invalid (already reported): judging them by a broken `auth` would add noise.
    let identities = raw_auth.unwrap_or(Identities::NONE);

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
        if let Some(upstream) =
            compile_upstream(&name.value, spec, base_dir, identities, &mut diags)
        {
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

    let rate_limit = raw
        .rate_limit
        .and_then(|r| compile_rate_limit(r, "", "rate_limit", &mut diags));
    let client_address = raw
        .client_address
        .map(|spec| compile_client_address(spec, &mut diags))
        .unwrap_or_default();

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
        if let Some(route) = compile_route(spec.value, identities, &find_upstream, &mut diags) {
            routes.push(Arc::new(route));
            route_locations.push(location);
        }
    }

    let fallthrough = raw.fallthrough.as_ref().and_then(|name| {
        let upstream = find_upstream(&mut diags, name)?;
        // Pingora proxies the fallthrough itself, and it is built without TLS.
        if upstream.tls.is_some() {
            diags.at(
                &name.referenced,
                format!(
                    "`fallthrough` upstream `{}` has an https:// url; the app beside the sidecar is reached over http://",
                    name.value
                ),
            );
            return None;
        }
        Some(upstream)
    });

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
            rate_limit,
            client_address,
            routes,
            table,
            fallthrough,
        }),
        _ => Err(diags.0),
    }
}

/// Which verified identities the policy's templates may use.
#[derive(Debug, Clone, Copy)]
struct Identities {
    jwt: bool,
    api_key: bool,
}

impl Identities {
    const NONE: Identities = Identities {
        jwt: false,
        api_key: false,
    };

    /// Why `var` has no value under these identities, if it has none.
    fn lacks(self, var: &Var) -> Option<String> {
        match var {
            Var::Jwt(claim) if !self.jwt => Some(format!(
                "`{{jwt.{claim}}}` needs a verified token, but the policy has no `auth.jwt`"
            )),
            Var::AuthClient if !self.api_key => Some(
                "`{auth.client}` is the name of the request's API key, but the policy has no `auth.api_key`".into(),
            ),
            _ => None,
        }
    }
}

fn compile_auth(
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

/// `client_address`: each trusted proxy a CIDR (`10.0.0.0/8`) or one address.
fn compile_client_address(
    spec: Spanned<raw::RawClientAddress>,
    diags: &mut Diagnostics,
) -> ClientAddress {
    let spec = spec.value;
    let trusted_proxies = spec
        .trusted_proxies
        .iter()
        .filter_map(|proxy| {
            let text = proxy.value.trim();
            let net = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    format!("`client_address.trusted_proxies`: `{text}` is not an address or CIDR (like 10.0.0.0/8)")
                });
            diags.check(&proxy.referenced, net)
        })
        .collect();
    let header = match spec.header {
        Some(header) => {
            let name = HeaderName::from_bytes(header.value.as_bytes()).map_err(|_| {
                format!(
                    "`client_address.header`: `{}` is not a header name",
                    header.value
                )
            });
            diags.check(&header.referenced, name)
        }
        None => None,
    };
    ClientAddress {
        trusted_proxies,
        header: header.unwrap_or_else(|| ClientAddress::default().header),
    }
}

/// A header that carries a credential the sidecar reads itself: the one the policy names for
/// API keys may not be one of these.
fn is_credential_header(header: &HeaderName) -> bool {
    header == http::header::AUTHORIZATION || header == http::header::COOKIE
}

fn compile_api_key(
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

fn compile_upstream(
    name: &str,
    spec: Spanned<raw::RawUpstream>,
    base_dir: &Path,
    identities: Identities,
    diags: &mut Diagnostics,
) -> Option<Upstream> {
    let spec = spec.value;
    // Everything else is still checked when the URL is bad, so one run reports it all.
    let target = compile_url(name, &spec.url, base_dir, diags);

    if let Some(timeout) = &spec.timeout {
        if timeout.value.0.is_zero() {
            diags.at(&timeout.referenced, "`timeout` must be longer than zero");
        }
    }
    if let Some(concurrency) = &spec.concurrency {
        if concurrency.value == 0 {
            diags.at(
                &concurrency.referenced,
                format!("upstream `{name}`: `concurrency` must be at least 1"),
            );
        }
    }
    let retries = spec.retries.map(|r| compile_retries(name, r, diags));
    let circuit_breaker = match spec.circuit_breaker {
        Some(b) => compile_breaker(name, b, diags),
        None => Some(BreakerPolicy::default()),
    };
    let has_credential = spec.credential.is_some();
    let credential = spec
        .credential
        .and_then(|c| compile_credential(c.value, base_dir, diags));
    let oauth2 = spec.oauth2.and_then(|o| {
        if has_credential {
            diags.at(
                &o.referenced,
                format!("upstream `{name}`: `oauth2` and `credential` cannot both be given: an upstream gets one machine credential"),
            );
        }
        compile_oauth2(name, o, base_dir, diags)
    });
    // The header the machine credential goes in, and which key sets it.
    let machine_header = match (&credential, &oauth2) {
        (Some(c), _) => Some((c.header.clone(), "credential")),
        (None, Some(_)) => Some((http::header::AUTHORIZATION, "oauth2")),
        (None, None) => None,
    };
    let headers = compile_upstream_headers(
        name,
        &spec.headers,
        machine_header.as_ref().map(|(h, key)| (h, *key)),
        identities,
        diags,
    );

    let tls = match (spec.tls, &target) {
        (Some(tls), Some(target)) if !target.https => {
            diags.at(
                &tls.referenced,
                format!("upstream `{name}`: `tls` needs an https:// url"),
            );
            None
        }
        (Some(tls), _) => Some(compile_tls(name, tls, base_dir, diags)),
        (None, _) => None,
    };

    let target = target?;
    let tls = target.https.then(|| tls.unwrap_or_default());
    Some(Upstream {
        name: name.to_string(),
        host: target.host,
        port: target.port,
        authority: target.authority,
        base_path: target.base_path,
        timeout: spec.timeout.map(|t| t.value.0),
        concurrency: spec.concurrency.map(|c| c.value),
        retries,
        circuit_breaker,
        headers,
        credential,
        oauth2,
        tls,
    })
}

fn compile_credential(
    spec: raw::RawCredential,
    base_dir: &Path,
    diags: &mut Diagnostics,
) -> Option<Credential> {
    let header = diags.check(
        &spec.header.referenced,
        HeaderName::from_bytes(spec.header.value.as_bytes())
            .map_err(|_| format!("`{}` is not a valid header name", spec.header.value)),
    )?;
    let source = compile_secret(&spec.value, base_dir, diags)?;
    // The same test as when the file is read again (it also marks the value sensitive).
    let value = diags.check(
        &spec.value.referenced,
        secrets::header_value(source.resolved.clone())
            .map_err(|_| "credential value is not a valid header value".to_string()),
    )?;
    Some(Credential {
        header,
        value,
        source,
    })
}

/// A value that may refer to secrets, kept with what resolving it again takes.
fn compile_secret(
    spec: &Spanned<String>,
    base_dir: &Path,
    diags: &mut Diagnostics,
) -> Option<SecretText> {
    let resolved = diags.check(&spec.referenced, secrets::resolve(&spec.value, base_dir))?;
    Some(SecretText {
        written: spec.value.clone(),
        base_dir: base_dir.to_path_buf(),
        resolved,
    })
}

fn compile_oauth2(
    name: &str,
    spec: Spanned<raw::RawOAuth2>,
    base_dir: &Path,
    diags: &mut Diagnostics,
) -> Option<OAuth2Client> {
    let at = spec.referenced;
    let spec = spec.value;
    let mut required = |value: Option<Spanned<String>>, key: &str, what: &str| {
        if value.is_none() {
            diags.at(
                &at,
                format!("upstream `{name}`: `oauth2` needs `{key}`: {what}"),
            );
        }
        value
    };
    let token_url = required(
        spec.token_url,
        "token_url",
        "the URL tokens are requested from",
    );
    let client_id = required(
        spec.client_id,
        "client_id",
        "the sidecar's client identifier at the token endpoint",
    );
    let client_secret = required(
        spec.client_secret,
        "client_secret",
        "the sidecar's secret at the token endpoint (`${file:PATH}` or `${env:NAME}`)",
    );
    let token_url = token_url.and_then(|url| {
        let text = diags.check(&url.referenced, secrets::resolve(&url.value, base_dir))?;
        let parsed = text.parse::<Uri>().ok().filter(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|h| !h.is_empty())
        });
        if parsed.is_none() {
            diags.at(
                &url.referenced,
                format!("upstream `{name}`: `oauth2.token_url` `{text}` must be an http:// or https:// URL with a host"),
            );
        }
        parsed
    });
    let client_id = client_id.and_then(|id| {
        let value = diags.check(&id.referenced, secrets::resolve(&id.value, base_dir))?;
        if value.is_empty() || value.chars().any(char::is_control) {
            diags.at(
                &id.referenced,
                format!("upstream `{name}`: `oauth2.client_id` must be non-empty text without control characters"),
            );
        }
        Some(value)
    });
    let client_secret = client_secret.and_then(|secret| {
        let source = compile_secret(&secret, base_dir, diags)?;
        if source.resolved.is_empty() {
            diags.at(
                &secret.referenced,
                format!("upstream `{name}`: `oauth2.client_secret` is empty"),
            );
        }
        Some(source)
    });
    let scope = spec.scope.map(|scope| {
        // RFC 6749 §3.3: scope tokens of printable ASCII except `"` and `\`, space-separated.
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
        };
        if !scope.value.split(' ').all(token_ok) {
            diags.at(
                &scope.referenced,
                format!("upstream `{name}`: `oauth2.scope` must be scope names separated by single spaces (printable ASCII, no `\"` or `\\`)"),
            );
        }
        scope.value
    });
    Some(OAuth2Client {
        token_url: token_url?,
        client_id: client_id?,
        client_secret: client_secret?,
        scope,
    })
}

/// Where an upstream's `url` points.
struct Target {
    host: String,
    port: u16,
    authority: String,
    base_path: String,
    https: bool,
}

fn compile_url(
    name: &str,
    url: &Spanned<String>,
    base_dir: &Path,
    diags: &mut Diagnostics,
) -> Option<Target> {
    let url_at = url.referenced;
    let text = diags.check(&url_at, secrets::resolve(&url.value, base_dir))?;
    let uri = diags.check(
        &url_at,
        text.parse::<Uri>()
            .map_err(|e| format!("upstream `{name}`: `{text}` is not a URL: {e}")),
    )?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            diags.at(
                &url_at,
                format!("upstream `{name}`: url must start with http:// or https://"),
            );
            return None;
        }
    };
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
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let authority = uri
        .authority()
        .map_or_else(|| host.clone(), |a| a.as_str().to_string());
    let base_path = uri.path().trim_end_matches('/').to_string();
    Some(Target {
        host,
        port,
        authority,
        base_path,
        https,
    })
}

/// An upstream's `tls`, its files read and parsed now so that `bff check` reports them.
fn compile_tls(
    name: &str,
    spec: Spanned<raw::RawTls>,
    base_dir: &Path,
    diags: &mut Diagnostics,
) -> TlsPolicy {
    let at = spec.referenced;
    let spec = spec.value;
    let file = |path: &Spanned<String>| base_dir.join(&path.value);
    let ca = spec.ca.as_ref().and_then(|path| {
        let full = file(path);
        diags.check(
            &path.referenced,
            CaBundle::load(&full)
                .map_err(|e| format!("upstream `{name}`: `tls.ca` `{}`: {e}", full.display())),
        )
    });
    let identity = match (&spec.cert, &spec.key) {
        (Some(cert), Some(key)) => {
            let (cert_file, key_file) = (file(cert), file(key));
            match ClientIdentity::load(&cert_file, &key_file) {
                Ok(identity) => Some(identity),
                Err(IdentityError::Cert(e)) => {
                    diags.at(
                        &cert.referenced,
                        format!(
                            "upstream `{name}`: `tls.cert` `{}`: {e}",
                            cert_file.display()
                        ),
                    );
                    None
                }
                Err(IdentityError::Key(e)) => {
                    diags.at(
                        &key.referenced,
                        format!("upstream `{name}`: `tls.key` `{}`: {e}", key_file.display()),
                    );
                    None
                }
            }
        }
        (None, None) => None,
        _ => {
            diags.at(
                &at,
                format!("upstream `{name}`: `tls.cert` and `tls.key` go together: give both (mutual TLS) or neither"),
            );
            None
        }
    };
    let server_name = spec.server_name.as_ref().and_then(|server_name| {
        diags.check(
            &server_name.referenced,
            ServerName::try_from(server_name.value.clone()).map_err(|_| {
                format!(
                    "upstream `{name}`: `tls.server_name` `{}` is not a DNS name or IP address",
                    server_name.value
                )
            }),
        )
    });
    TlsPolicy {
        ca,
        identity,
        server_name,
    }
}

fn compile_retries(
    name: &str,
    spec: Spanned<raw::RawRetries>,
    diags: &mut Diagnostics,
) -> RetryPolicy {
    let at = spec.referenced;
    let spec = spec.value;
    let attempts = match &spec.attempts {
        Some(attempts) => {
            if !(1..=5).contains(&attempts.value) {
                diags.at(
                    &attempts.referenced,
                    format!("upstream `{name}`: `retries.attempts` must be 1 to 5 (retries after the first try)"),
                );
            }
            attempts.value
        }
        None => {
            diags.at(
                &at,
                format!("upstream `{name}`: `retries` needs `attempts`: how many times to retry after the first try (1 to 5)"),
            );
            0
        }
    };
    let budget = spec.budget.as_ref().map_or(0.2, |b| b.value);
    if let Some(b) = &spec.budget {
        if !is_fraction(b.value) {
            diags.at(
                &b.referenced,
                format!("upstream `{name}`: `retries.budget` must be a fraction above 0 and at most 1 (0.2 lets retries add a fifth to the calls)"),
            );
        }
    }
    RetryPolicy {
        attempts,
        budget: budget as f32,
        min_per_second: spec.min_per_second.unwrap_or(10),
    }
}

/// `None` when the policy turns the breaker off.
fn compile_breaker(
    name: &str,
    spec: Spanned<raw::RawBreaker>,
    diags: &mut Diagnostics,
) -> Option<BreakerPolicy> {
    let spec = spec.value;
    let default = BreakerPolicy::default();
    // The values are checked even when the breaker is off, so turning it back on cannot fail.
    let mut count = |value: &Option<Spanned<u32>>, key: &str, default: u32| match value {
        Some(v) if v.value == 0 => {
            diags.at(
                &v.referenced,
                format!("upstream `{name}`: `circuit_breaker.{key}` must be at least 1"),
            );
            default
        }
        Some(v) => v.value,
        None => default,
    };
    let consecutive_failures = count(
        &spec.consecutive_failures,
        "consecutive_failures",
        default.consecutive_failures,
    );
    let min_requests = count(&spec.min_requests, "min_requests", default.min_requests);
    let failure_ratio = match &spec.failure_ratio {
        Some(r) if !is_fraction(r.value) => {
            diags.at(
                &r.referenced,
                format!("upstream `{name}`: `circuit_breaker.failure_ratio` must be a fraction above 0 and at most 1 (0.5 opens when half the calls fail)"),
            );
            default.failure_ratio
        }
        Some(r) => r.value,
        None => default.failure_ratio,
    };
    let mut duration =
        |value: &Option<Spanned<raw::Humane>>, key: &str, default: Duration| match value {
            Some(d) if d.value.0.is_zero() => {
                diags.at(
                    &d.referenced,
                    format!("upstream `{name}`: `circuit_breaker.{key}` must be longer than zero"),
                );
                default
            }
            Some(d) => d.value.0,
            None => default,
        };
    let window = duration(&spec.window, "window", default.window);
    let open_for = duration(&spec.open_for, "open_for", default.open_for);
    spec.enabled.unwrap_or(true).then_some(BreakerPolicy {
        consecutive_failures,
        failure_ratio,
        min_requests,
        window,
        open_for,
    })
}

fn is_fraction(value: f64) -> bool {
    value > 0.0 && value <= 1.0
}

/// Request headers the sidecar sets itself, with the reason an upstream's `headers` may not.
fn reserved_header(header: &HeaderName) -> Option<&'static str> {
    match header.as_str() {
        "host" | "x-bff-client" | "x-trace-id" | "traceparent" => {
            Some("the sidecar sets it itself")
        }
        "content-length" | "transfer-encoding" | "connection" | "keep-alive"
        | "proxy-connection" | "te" | "trailer" | "upgrade" => {
            Some("it governs the connection or the body's framing, which the sidecar manages")
        }
        _ => None,
    }
}

/// An upstream's `headers`: templates that may only use the caller's identity (`{jwt.*}`,
/// `{auth.client}`), since every route that calls the upstream sends them.
fn compile_upstream_headers(
    name: &str,
    spec: &raw::Named<String>,
    machine_header: Option<(&HeaderName, &str)>,
    identities: Identities,
    diags: &mut Diagnostics,
) -> Vec<(HeaderName, Template)> {
    let mut headers: Vec<(HeaderName, Template)> = Vec::new();
    for (header, value) in &spec.0 {
        let what = format!("upstream `{name}`: header `{}`", header.value);
        let Some(parsed) = diags.check(
            &header.referenced,
            HeaderName::from_bytes(header.value.as_bytes())
                .map_err(|_| format!("{what}: not a valid header name")),
        ) else {
            continue;
        };
        if let Some(reason) = reserved_header(&parsed) {
            diags.at(
                &header.referenced,
                format!("{what} cannot be set: {reason}"),
            );
            continue;
        }
        if let Some((_, key)) = machine_header.filter(|(h, _)| **h == parsed) {
            diags.at(
                &header.referenced,
                format!("{what} carries the upstream's machine credential; `{key}` sets it"),
            );
            continue;
        }
        if headers.iter().any(|(h, _)| *h == parsed) {
            diags.at(
                &header.referenced,
                format!("{what} is given twice (header names ignore case)"),
            );
            continue;
        }
        let at = value.referenced;
        let Some(template) = diags.check(
            &at,
            Template::parse_header(&value.value).map_err(|e| format!("{what}: {e}")),
        ) else {
            continue;
        };
        // Every variable stands for a valid value, so only the literal text can spoil it.
        let literal_ok = template
            .render(|_| Some(Cow::Borrowed("x")))
            .is_ok_and(|sample| HeaderValue::from_str(&sample).is_ok());
        if !literal_ok {
            diags.at(
                &at,
                format!("{what}: the value is not a valid header value (no control characters such as newlines)"),
            );
        }
        for var in template.vars() {
            match var {
                Var::Jwt(_) | Var::AuthClient => {
                    if let Some(reason) = identities.lacks(var) {
                        diags.at(&at, format!("{what}: {reason}"));
                    }
                }
                other => diags.at(
                    &at,
                    format!("{what}: `{{{other}}}` cannot be used here: an upstream's headers are sent by every route that calls it, so they may only use `{{jwt.*}}` or `{{auth.client}}`"),
                ),
            }
        }
        headers.push((parsed, template));
    }
    headers
}

fn compile_route(
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

/// A route's `auth` (by default `required` when the policy has `auth`, `none` otherwise) and
/// `scopes`.
fn compile_route_auth(
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

/// The fetch, and what the route's dependency checks need to know of it even when something
/// else in it is wrong.
fn compile_fetch(
    name: &Spanned<String>,
    spec: Spanned<raw::RawFetch>,
    scope: &TemplateScope,
    find_upstream: FindUpstream,
    diags: &mut Diagnostics,
) -> (FetchNode, Option<Fetch>) {
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
    let cache_at = spec.cache.as_ref().map(|c| c.referenced);
    let cache = spec.cache.map(|c| {
        let c = c.value;
        if c.ttl.value.0.is_zero() {
            diags.at(&c.ttl.referenced, "cache `ttl` must be longer than zero");
        }
        FetchCache {
            ttl: c.ttl.value.0,
            jitter: c.jitter.map_or(Duration::ZERO, |j| j.0),
        }
    });
    let node = FetchNode {
        name: name.to_string(),
        cache_at,
        path_at: spec.path.referenced,
        critical: spec.critical,
        path: path.clone(),
        upstream: upstream.clone(),
    };
    let fetch = match (upstream, path, fields) {
        (Some(upstream), Some(path), Some(fields)) => Some(Fetch {
            name: name.to_string(),
            upstream,
            path,
            critical: spec.critical,
            select,
            fields,
            fallback: spec.fallback.map(|f| f.value),
            // Filled in by `link_fetches`, once every fetch of the route is known.
            parents: Vec::new(),
            wave: 0,
            cache,
        }),
        _ => None,
    };
    (node, fetch)
}

/// What the dependency checks need to know of one fetch, valid or not.
struct FetchNode {
    name: String,
    /// Where its own `cache` is, if it has one.
    cache_at: Option<Location>,
    path_at: Location,
    critical: bool,
    path: Option<Template>,
    upstream: Option<Arc<Upstream>>,
}

/// Where a fetch stands among the route's fetches.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Link {
    /// Indexes of the fetches its path uses, in file order, once each.
    parents: Vec<usize>,
    wave: usize,
    /// False for a fetch that is in a cycle or waits on one (reported).
    ordered: bool,
}

/// Resolves `{fetch.NAME.FIELD}` between the fetches of route `route`, giving each fetch its
/// parents and wave; reports unknown names, self-references, cycles, and critical fetches that
/// wait on optional ones.
fn link_fetches(route: &str, nodes: &[FetchNode], diags: &mut Diagnostics) -> Vec<Link> {
    let index_of = |name: &str| nodes.iter().position(|n| n.name == name);
    let mut links = vec![Link::default(); nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        let Some(path) = &node.path else { continue };
        let mut reported = HashSet::new();
        for var in path.vars() {
            let Var::Fetch { fetch, .. } = var else {
                continue;
            };
            match index_of(fetch) {
                Some(j) if j == i => {
                    if reported.insert(fetch) {
                        diags.at(
                            &node.path_at,
                            format!(
                                "fetch `{}` uses `{{{var}}}`: a fetch cannot wait for its own answer",
                                node.name
                            ),
                        );
                    }
                }
                Some(j) => links[i].parents.push(j),
                None => {
                    if reported.insert(fetch) {
                        let known: Vec<String> =
                            nodes.iter().map(|n| format!("`{}`", n.name)).collect();
                        diags.at(
                            &node.path_at,
                            format!(
                                "fetch `{}` uses `{{{var}}}`, but route `{route}` has no fetch `{fetch}` (its fetches: {})",
                                node.name,
                                known.join(", ")
                            ),
                        );
                    }
                }
            }
        }
        links[i].parents.sort_unstable();
        links[i].parents.dedup();
        for &j in &links[i].parents {
            if node.critical && !nodes[j].critical {
                diags.at(
                    &node.path_at,
                    format!(
                        "critical fetch `{}` uses the answer of optional fetch `{}`: when `{}` fails, `{}` cannot run; make `{}` critical or `{}` optional",
                        node.name, nodes[j].name, nodes[j].name, node.name, nodes[j].name, node.name
                    ),
                );
            }
        }
    }

    // Waves, in topological order (Kahn): a fetch is ready once all its parents are.
    let mut waiting: Vec<usize> = links.iter().map(|l| l.parents.len()).collect();
    let mut children = vec![Vec::new(); nodes.len()];
    for (i, link) in links.iter().enumerate() {
        for &j in &link.parents {
            children[j].push(i);
        }
    }
    let mut ready: VecDeque<usize> = (0..nodes.len()).filter(|&i| waiting[i] == 0).collect();
    while let Some(i) = ready.pop_front() {
        links[i].ordered = true;
        links[i].wave = links[i]
            .parents
            .iter()
            .map(|&j| links[j].wave + 1)
            .max()
            .unwrap_or(0);
        for &child in &children[i] {
            waiting[child] -= 1;
            if waiting[child] == 0 {
                ready.push_back(child);
            }
        }
    }

    // Every fetch left has a parent left, so following those parents must come round: report
    // each circle once, starting from its first fetch in the file.
    let mut walked = vec![false; nodes.len()];
    for start in 0..nodes.len() {
        if links[start].ordered || walked[start] {
            continue;
        }
        let mut trail = vec![start];
        walked[start] = true;
        let parents_left = |i: usize| {
            links[i]
                .parents
                .iter()
                .copied()
                .find(|&j| !links[j].ordered)
        };
        let closed_at = loop {
            match parents_left(trail[trail.len() - 1]) {
                Some(j) if walked[j] => break trail.iter().position(|&i| i == j),
                Some(j) => {
                    walked[j] = true;
                    trail.push(j);
                }
                None => break None,
            }
        };
        // `None`: ran into a circle reported already.
        let Some(from) = closed_at else { continue };
        let mut circle = trail[from..].to_vec();
        let first = (0..circle.len())
            .min_by_key(|&k| circle[k])
            .unwrap_or_default();
        circle.rotate_left(first);
        let names: Vec<String> = circle
            .iter()
            .chain(circle.first())
            .map(|&i| format!("`{}`", nodes[i].name))
            .collect();
        diags.at(
            &nodes[circle[0]].path_at,
            format!(
                "route `{route}`: fetches {} form a cycle (each uses the next one's answer), so none of them can start",
                names.join(" → ")
            ),
        );
    }
    links
}

/// A fetch's own `cache` holds its projected answer for everyone: never a personal one, and
/// never one whose answer another fetch reads (that needs the answer before projection).
fn check_fetch_caches(
    nodes: &[FetchNode],
    links: &[Link],
    personal: &[(String, String)],
    diags: &mut Diagnostics,
) {
    for (index, node) in nodes.iter().enumerate() {
        let Some(at) = &node.cache_at else { continue };
        if let Some((_, reason)) = personal.iter().find(|(name, _)| *name == node.name) {
            diags.at(
                at,
                format!("fetch `{}` {reason}: its own `cache` is shared by everyone, so it is only for data that is the same for every user", node.name),
            );
        }
        if let Some(child) = links.iter().position(|l| l.parents.contains(&index)) {
            diags.at(
                at,
                format!(
                    "fetch `{}` cannot have its own `cache`: fetch `{}` uses its answer, which the cache does not keep (only the projected section)",
                    node.name, nodes[child].name
                ),
            );
        }
    }
}

/// The fetches whose answer depends on who asks, each with the reason: a `{jwt.*}` in its path
/// or in its upstream's headers, or a parent that is personal.
fn personal_fetches(nodes: &[FetchNode], links: &[Link]) -> Vec<(String, String)> {
    let direct = |node: &FetchNode| -> Option<String> {
        let jwt = |t: &Template| {
            t.vars()
                .find(|v| matches!(v, Var::Jwt(_) | Var::AuthClient))
                .cloned()
        };
        if let Some(var) = node.path.as_ref().and_then(jwt) {
            return Some(format!("uses `{{{var}}}`"));
        }
        let upstream = node.upstream.as_ref()?;
        upstream.headers.iter().find_map(|(header, value)| {
            jwt(value).map(|var| {
                format!(
                    "calls upstream `{}`, whose header `{header}` uses `{{{var}}}`",
                    upstream.name
                )
            })
        })
    };
    let reasons: Vec<Option<String>> = nodes.iter().map(direct).collect();
    // The personal fetch each fetch's answer comes from (itself first), in dependency order.
    let mut root: Vec<Option<usize>> = reasons
        .iter()
        .enumerate()
        .map(|(i, r)| r.as_ref().map(|_| i))
        .collect();
    let mut order: Vec<usize> = (0..nodes.len()).filter(|&i| links[i].ordered).collect();
    order.sort_by_key(|&i| links[i].wave);
    for i in order {
        if root[i].is_none() {
            root[i] = links[i].parents.iter().find_map(|&j| root[j]);
        }
    }
    root.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let r = (*r)?;
            let reason = reasons[r].clone()?;
            let reason = if r == i {
                reason
            } else {
                format!("depends on fetch `{}`, which {reason}", nodes[r].name)
            };
            Some((nodes[i].name.clone(), reason))
        })
        .collect()
}

/// What a route's templates may refer to.
struct TemplateScope<'a> {
    /// The route path's parameters; `None` when the path itself is invalid (already reported).
    params: Option<&'a [String]>,
    identities: Identities,
    /// The route has `auth: none`: no identity is known.
    auth_none: bool,
    /// `{fetch.*}` is for the fetches of a `fetch` route; `link_fetches` checks the names.
    fetch_vars: bool,
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
            (Var::Jwt(_) | Var::AuthClient, _) if scope.auth_none => diags.at(
                &spec.referenced,
                format!("`{{{var}}}` has no value on a route with `auth: none`"),
            ),
            (Var::Jwt(_) | Var::AuthClient, _) => {
                if let Some(reason) = scope.identities.lacks(var) {
                    diags.at(&spec.referenced, reason);
                }
            }
            (Var::Fetch { .. }, _) if !scope.fetch_vars => diags.at(
                &spec.referenced,
                format!("`{{{var}}}` takes a value from another fetch's answer, so only the fetches of a `fetch` route can use it, not a `proxy` route"),
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

/// `personal`: the route's fetches whose answer depends on who asks, with the reason.
fn compile_cache(
    spec: Spanned<raw::RawCache>,
    personal: &[(String, String)],
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
        for (fetch, reason) in personal {
            diags.at(
                &at,
                format!(
                    "`scope: shared` caches one answer for everyone, but fetch `{fetch}` {reason}: personalised data must use `scope: user`"
                ),
            );
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

/// `owner`: how messages start (`route `x`: `), empty for the policy's own limit; `key`: the
/// limit's key (`rate_limit`, `auth.failure_limit`).
fn compile_rate_limit(
    spec: Spanned<raw::RawRateLimit>,
    owner: &str,
    key: &str,
    diags: &mut Diagnostics,
) -> Option<RateLimit> {
    let spec = spec.value;
    let requests = NonZeroU32::new(spec.requests.value);
    if requests.is_none() {
        diags.at(
            &spec.requests.referenced,
            format!("{owner}`{key}.requests` must be at least 1"),
        );
    }
    let per = spec.per.value.0;
    if per.is_zero() {
        diags.at(
            &spec.per.referenced,
            format!("{owner}`{key}.per` must be longer than zero"),
        );
    }
    let burst = match &spec.burst {
        Some(b) => {
            let burst = NonZeroU32::new(b.value);
            if burst.is_none() {
                diags.at(
                    &b.referenced,
                    format!("{owner}`{key}.burst` must be at least 1 (leave it out to allow `requests` at once)"),
                );
            }
            burst
        }
        None => requests,
    };
    let limit = RateLimit {
        requests: requests?,
        per,
        burst: burst?,
    };
    // The limiter spends one request every `per / requests`, counted in whole nanoseconds.
    if !per.is_zero() && limit.interval().is_zero() {
        diags.at(
            &spec.requests.referenced,
            format!(
                "{owner}`{key}` of {} requests per {} is more than one a nanosecond; use fewer `requests` or a longer `per`",
                limit.requests,
                humantime::format_duration(per)
            ),
        );
        return None;
    }
    // Buckets count time in u64 nanoseconds (about 584 years); a year is plenty for a budget.
    const LONGEST_REFILL: Duration = Duration::from_secs(366 * 24 * 3600);
    let refill = limit.interval().checked_mul(limit.burst.get());
    if refill.is_none_or(|refill| refill > LONGEST_REFILL) {
        let at = spec
            .burst
            .as_ref()
            .map_or(spec.per.referenced, |b| b.referenced);
        diags.at(
            &at,
            format!(
                "{owner}`{key}` would take more than a year to refill a burst of {} at {} requests per {}; use a smaller `burst` or a shorter `per`",
                limit.burst,
                limit.requests,
                humantime::format_duration(per)
            ),
        );
        return None;
    }
    (!per.is_zero()).then_some(limit)
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

#[cfg(test)]
mod tests {
    use super::super::{Action, Policy};
    use std::path::Path;

    const HEAD: &str = "client: t
upstreams:
  svc:
    url: http://127.0.0.1:9
routes:
  - name: r
    method: GET
    path: /r
    fetch:
";

    /// `(name, parents, wave)` of each fetch of the one route of a policy with these fetches.
    fn links(fetches: &str) -> Vec<(String, Vec<usize>, usize)> {
        let policy = Policy::from_yaml(&format!("{HEAD}{fetches}"), Path::new("t.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let Action::Fetch(fetches) = &policy.routes[0].action else {
            panic!("a fetch route")
        };
        fetches
            .iter()
            .map(|f| (f.name.clone(), f.parents.clone(), f.wave))
            .collect()
    }

    fn fetch(name: &str, path: &str) -> String {
        format!(
            "      {name}: {{ upstream: svc, path: \"{path}\", critical: true, fields: [a] }}\n"
        )
    }

    #[test]
    fn a_chain_runs_in_successive_waves_in_file_order() {
        // Written child first: the list keeps file order, indexes point into it.
        let got = links(
            &[
                fetch("c", "/c/{fetch.b.id}"),
                fetch("b", "/b/{fetch.a.id}"),
                fetch("a", "/a"),
            ]
            .concat(),
        );
        assert_eq!(
            got,
            [
                ("c".to_string(), vec![1], 2),
                ("b".to_string(), vec![2], 1),
                ("a".to_string(), vec![], 0),
            ]
        );
    }

    #[test]
    fn parents_are_sorted_and_unique_and_the_wave_follows_the_latest() {
        let got = links(
            &[
                fetch("a", "/a"),
                fetch("b", "/b/{fetch.a.id}"),
                fetch("c", "/c"),
                fetch(
                    "d",
                    "/d/{fetch.c.x}/{fetch.b.y}?again={fetch.c.z}&a={fetch.a.w}",
                ),
            ]
            .concat(),
        );
        let waves: Vec<_> = got.iter().map(|(_, _, w)| *w).collect();
        assert_eq!(waves, [0, 1, 0, 2]);
        assert_eq!(got[3].1, [0, 1, 2]);
    }

    #[test]
    fn the_breaker_is_on_by_default_and_off_when_disabled() {
        let yaml = |options: &str| {
            format!("{HEAD}{}", fetch("a", "/a")).replace(
                "    url: http://127.0.0.1:9\n",
                &format!("    url: http://127.0.0.1:9\n{options}"),
            )
        };
        let load = |options: &str| Policy::from_yaml(&yaml(options), Path::new("t.yaml")).unwrap();
        let default = load("");
        let svc = &default.upstreams["svc"];
        assert_eq!(svc.circuit_breaker, Some(super::BreakerPolicy::default()));
        assert_eq!((svc.concurrency, &svc.retries), (None, &None));
        assert!(svc.headers.is_empty());

        let off = load("    circuit_breaker: { enabled: false, window: 1m }\n");
        assert_eq!(off.upstreams["svc"].circuit_breaker, None);

        let tuned = load(
            "    concurrency: 4\n    retries: { attempts: 3 }\n    circuit_breaker: { failure_ratio: 0.9, open_for: 1s }\n",
        );
        let svc = &tuned.upstreams["svc"];
        assert_eq!(svc.concurrency, Some(4));
        assert_eq!(
            svc.retries,
            Some(super::RetryPolicy {
                attempts: 3,
                budget: 0.2,
                min_per_second: 10
            })
        );
        assert_eq!(
            svc.circuit_breaker,
            Some(super::BreakerPolicy {
                failure_ratio: 0.9,
                open_for: std::time::Duration::from_secs(1),
                ..super::BreakerPolicy::default()
            })
        );
    }

    #[test]
    fn route_paths_are_in_the_normal_form_requests_are_routed_on() {
        assert_eq!(super::path_params("/a/{id}/"), Ok(vec!["id".to_string()]));
        for path in ["/a//b", "//a", "/a/./b", "/a/..", "/./a"] {
            let err = super::path_params(path).unwrap_err();
            assert!(err.contains("`.` or `..` segment"), "{path}: {err}");
        }
    }
}
