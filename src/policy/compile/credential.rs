//! policy::compile::credential: an upstream's machine credential, a static header value or an
//! OAuth2 client, with the secrets it refers to resolved.

use std::path::Path;

use http::{HeaderName, Uri};
use serde_saphyr::Spanned;

use super::diagnostics::Diagnostics;
use crate::policy::raw;
use crate::policy::secrets;
use crate::policy::{Credential, OAuth2Client, SecretText};

pub(super) fn compile_credential(
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
        crate::policy::secrets::header_value(source.resolved.clone())
            .map_err(|_| "credential value is not a valid header value".to_string()),
    )?;
    Some(Credential {
        header,
        value,
        source,
    })
}

/// A value that may refer to secrets, kept with what resolving it again takes.
pub(super) fn compile_secret(
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

pub(super) fn compile_oauth2(
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
