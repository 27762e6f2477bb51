//! policy::compile::upstream: an upstream's URL, TLS, timeouts, retries, circuit breaker and
//! headers. Its machine credential is `credential`.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use rustls::pki_types::ServerName;
use serde_saphyr::Spanned;

use super::credential::{compile_credential, compile_oauth2};
use super::diagnostics::Diagnostics;
use super::scope::Identities;
use crate::policy::raw;
use crate::policy::secrets;
use crate::policy::template::{Template, Var};
use crate::policy::tls_files::{CaBundle, ClientIdentity, IdentityError};
use crate::policy::{BreakerPolicy, RetryPolicy, TlsPolicy, Upstream};

/// Looks an upstream up by name, reporting an undefined one.
pub(super) type FindUpstream<'a> =
    &'a dyn Fn(&mut Diagnostics, &Spanned<String>) -> Option<Arc<Upstream>>;

pub(super) fn compile_upstream(
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

/// Where an upstream's `url` points.
pub(super) struct Target {
    host: String,
    port: u16,
    authority: String,
    base_path: String,
    https: bool,
}

pub(super) fn compile_url(
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
pub(super) fn compile_tls(
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

pub(super) fn compile_retries(
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
pub(super) fn compile_breaker(
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

pub(super) fn is_fraction(value: f64) -> bool {
    value > 0.0 && value <= 1.0
}

/// Request headers the sidecar sets itself, with the reason an upstream's `headers` may not.
pub(super) fn reserved_header(header: &HeaderName) -> Option<&'static str> {
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
pub(super) fn compile_upstream_headers(
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

#[cfg(test)]
mod tests {
    use crate::policy::{BreakerPolicy, Policy, RetryPolicy};
    use std::path::Path;

    /// A policy whose one route fetches from upstream `svc`; `options` go under `svc`.
    fn policy(options: &str) -> String {
        format!(
            "client: t
upstreams:
  svc:
    url: http://127.0.0.1:9
{options}routes:
  - name: r
    method: GET
    path: /r
    fetch:
      a: {{ upstream: svc, path: \"/a\", critical: true, fields: [a] }}
"
        )
    }

    #[test]
    fn the_breaker_is_on_by_default_and_off_when_disabled() {
        let load =
            |options: &str| Policy::from_yaml(&policy(options), Path::new("t.yaml")).unwrap();
        let default = load("");
        let svc = &default.upstreams["svc"];
        assert_eq!(svc.circuit_breaker, Some(BreakerPolicy::default()));
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
            Some(RetryPolicy {
                attempts: 3,
                budget: 0.2,
                min_per_second: 10
            })
        );
        assert_eq!(
            svc.circuit_breaker,
            Some(BreakerPolicy {
                failure_ratio: 0.9,
                open_for: std::time::Duration::from_secs(1),
                ..BreakerPolicy::default()
            })
        );
    }
}
