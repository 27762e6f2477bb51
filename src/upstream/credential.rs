//! Machine credentials on internal calls: a header whose secret is read again when its file
//! rotates, or an OAuth2 client-credentials token (RFC 6749 §4.4) fetched, cached until shortly
//! before it expires, and refreshed once for every caller waiting on it. Secrets and tokens
//! stay out of logs, `Debug` output and error messages.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tracing::{info, warn};

use super::call::{error_chain, FileFailures, IDLE_TIMEOUT};
use crate::policy::secrets::{header_value, SecretError};
use crate::policy::{OAuth2Client, SecretText, Upstream};

/// Largest token endpoint answer read.
const MAX_TOKEN_ANSWER: usize = 64 << 10;
/// A token's lifetime when the endpoint does not say (`expires_in` is optional): short, so a
/// token that lives less than we assume is not used long after it died.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Shortest lifetime a token is used for, whatever its `expires_in` says (0 included): a token
/// that lives less is no use, and believing it would mean one token request per call. An
/// upstream that refuses it early answers 401, and the next call fetches another.
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(5);
/// Shortest time between two token requests of one upstream, successful or not: a call that
/// needs a token sooner (the last one was refused with 401) waits for it, within its timeout.
const MIN_FETCH_INTERVAL: Duration = Duration::from_secs(1);
/// Longest lifetime believed, so a silly `expires_in` cannot overflow a clock.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// After a failed token fetch, calls in this window get its failure instead of another fetch.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// A token is refreshed this long before it expires, or a tenth of its lifetime before if that
/// is sooner, so calls under way when it is refreshed still carry a valid one.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// What an upstream call carries: one header, and the token it came from, if any.
pub struct Attached {
    pub name: HeaderName,
    pub value: HeaderValue,
    token: Option<Arc<Token>>,
}

/// An upstream's machine credential while the sidecar runs.
// One per upstream per policy, behind an `Arc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum MachineCredential {
    Header {
        name: HeaderName,
        value: Rotating<HeaderValue>,
    },
    OAuth2(TokenSource),
}

impl MachineCredential {
    pub fn for_upstream(upstream: &Upstream, failures: &FileFailures) -> Option<MachineCredential> {
        if let Some(oauth2) = &upstream.oauth2 {
            return Some(MachineCredential::OAuth2(TokenSource::new(
                &upstream.name,
                oauth2,
                failures,
            )));
        }
        let credential = upstream.credential.as_ref()?;
        Some(MachineCredential::Header {
            name: credential.header.clone(),
            value: Rotating::new(
                &upstream.name,
                "credential",
                &credential.source,
                credential.value.clone(),
                header_value,
                failures,
            ),
        })
    }

    /// The header for one call; a token fetch, when one is due, ends by `deadline`. The error
    /// says why there is no credential, without any secret.
    pub async fn attach(&self, deadline: Instant) -> Result<Attached, String> {
        match self {
            MachineCredential::Header { name, value } => Ok(Attached {
                name: name.clone(),
                value: HeaderValue::clone(&value.current()),
                token: None,
            }),
            MachineCredential::OAuth2(source) => {
                let token = source.token(deadline).await?;
                Ok(Attached {
                    name: AUTHORIZATION,
                    value: token.header.clone(),
                    token: Some(token),
                })
            }
        }
    }

    /// The upstream refused the credential a call carried (401): a token is dropped, so the
    /// next call fetches another (the token endpoint may have revoked it early).
    pub fn rejected(&self, attached: &Attached) {
        if let (MachineCredential::OAuth2(source), Some(token)) = (self, &attached.token) {
            source.forget(token);
        }
    }

    /// Reads the secret's files again (see `Rotating::refresh`).
    pub fn refresh_files(&self) {
        match self {
            MachineCredential::Header { value, .. } => value.refresh(),
            MachineCredential::OAuth2(source) => source.client_secret.refresh(),
        }
    }
}

/// A secret from the policy, live: read again from its files on every `refresh`, the last good
/// value kept when a read fails (a file missing while Kubernetes swaps its `..data` link,
/// half-written, too large, hanging, or holding a value that cannot be used).
pub struct Rotating<T> {
    upstream: String,
    /// The policy key it comes from, for log lines.
    key: &'static str,
    source: SecretText,
    files: Vec<PathBuf>,
    parse: fn(String) -> Result<T, String>,
    live: ArcSwap<T>,
    /// The failure last logged: one that lasts is logged once, not every second.
    failing: Mutex<Option<String>>,
    failures: FileFailures,
}

impl<T: PartialEq> Rotating<T> {
    fn new(
        upstream: &str,
        key: &'static str,
        source: &SecretText,
        loaded: T,
        parse: fn(String) -> Result<T, String>,
        failures: &FileFailures,
    ) -> Self {
        Rotating {
            upstream: upstream.to_string(),
            key,
            files: source.files(),
            source: source.clone(),
            parse,
            live: ArcSwap::from_pointee(loaded),
            failing: Mutex::new(None),
            failures: failures.clone(),
        }
    }

    pub fn current(&self) -> Arc<T> {
        self.live.load_full()
    }

    /// Reads the value again when it comes from files. Reading (rather than watching for
    /// events) follows every way a file changes: rewritten in place, renamed over, or a
    /// Kubernetes secret volume swapping the symlinked directory the path goes through.
    pub fn refresh(&self) {
        if self.files.is_empty() {
            return;
        }
        let read = self.source.reread().and_then(|text| {
            (self.parse)(text).map_err(|message| SecretError {
                reason: "invalid",
                message,
            })
        });
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        let files = self.file_list();
        match read {
            Ok(value) => {
                if failing.take().is_some() {
                    info!(upstream = %self.upstream, key = self.key, files = %files, "secret file readable again");
                }
                if *self.live.load_full() != value {
                    self.live.store(Arc::new(value));
                    info!(upstream = %self.upstream, key = self.key, files = %files, "secret file changed; the new value is in use");
                }
            }
            Err(SecretError { reason, message }) => {
                self.failures.count(self.key, reason);
                if failing.as_deref() != Some(message.as_str()) {
                    warn!(upstream = %self.upstream, key = self.key, files = %files, reason = %message, "cannot read the secret again; the last good value stays in use");
                    *failing = Some(message);
                }
            }
        }
    }

    fn file_list(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| format!("`{}`", f.display()))
            .collect();
        names.join(", ")
    }
}

impl<T> fmt::Debug for Rotating<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Rotating({}.{}: {:?})",
            self.upstream, self.key, self.source
        )
    }
}

fn client_secret(text: String) -> Result<String, String> {
    if text.is_empty() {
        return Err("the client secret read is empty".into());
    }
    Ok(text)
}

/// A bearer token, as the `Authorization` header value it is sent in.
pub struct Token {
    header: HeaderValue,
    /// When it was asked for.
    fetched_at: Instant,
    /// From then on the next call fetches a new token...
    refresh_at: Instant,
    /// ...and this one may still be used until then if that fetch fails.
    expires_at: Instant,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("header", &"<redacted>")
            .field("fetched_at", &self.fetched_at)
            .field("refresh_at", &self.refresh_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A token fetch that failed, shared with the calls that were waiting for it.
struct FailedFetch {
    at: Instant,
    reason: String,
}

/// What the call holding `TokenSource::fetching` knows of the fetches before it.
#[derive(Default)]
struct Fetches {
    /// When the last token request was sent.
    last: Option<Instant>,
    failure: Option<FailedFetch>,
}

/// The HTTP client token requests go out on. Kept to this one function so that the connector
/// (plain HTTP here) can be swapped for one that speaks TLS in one place.
fn token_http_client() -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(super::tls::system_connector())
}

/// One upstream's OAuth2 client-credentials tokens.
pub struct TokenSource {
    upstream: String,
    token_url: Uri,
    /// The token URL without its query, for messages.
    endpoint: String,
    client_id: String,
    client_secret: Rotating<String>,
    /// `grant_type=client_credentials` and the scope, form-encoded.
    form: Bytes,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    cached: ArcSwapOption<Token>,
    /// Held by the one call fetching a token; the others wait on it, then use its result.
    fetching: tokio::sync::Mutex<Fetches>,
}

impl TokenSource {
    fn new(upstream: &str, policy: &OAuth2Client, failures: &FileFailures) -> TokenSource {
        let mut form = String::from("grant_type=client_credentials");
        if let Some(scope) = &policy.scope {
            form.push_str("&scope=");
            form.push_str(&form_encode(scope));
        }
        let endpoint = format!(
            "{}://{}{}",
            policy.token_url.scheme_str().unwrap_or("http"),
            policy.token_url.authority().map_or("", |a| a.as_str()),
            policy.token_url.path()
        );
        TokenSource {
            upstream: upstream.to_string(),
            token_url: policy.token_url.clone(),
            endpoint,
            client_id: policy.client_id.clone(),
            client_secret: Rotating::new(
                upstream,
                "oauth2.client_secret",
                &policy.client_secret,
                policy.client_secret.resolved.clone(),
                client_secret,
                failures,
            ),
            form: Bytes::from(form),
            http: token_http_client(),
            cached: ArcSwapOption::empty(),
            fetching: tokio::sync::Mutex::new(Fetches::default()),
        }
    }

    /// The cached token while it is fresh; otherwise one fetch for all the calls that need a
    /// token at the same moment (the first fetches, the others wait and share its result).
    async fn token(&self, deadline: Instant) -> Result<Arc<Token>, String> {
        let asked = Instant::now();
        if let Some(token) = self.fresh(asked) {
            return Ok(token);
        }
        let timed_out = || {
            format!(
                "no token from the token endpoint {} within the call's timeout",
                self.endpoint
            )
        };
        let until = tokio::time::Instant::from_std(deadline);
        let mut fetches = match self.fetching.try_lock() {
            Ok(guard) => guard,
            // Another call is fetching: a token that has not expired yet serves meanwhile.
            Err(_) => match self.unexpired() {
                Some(token) => return Ok(token),
                None => tokio::time::timeout_at(until, self.fetching.lock())
                    .await
                    .map_err(|_| timed_out())?,
            },
        };
        // Fetched while this call waited: used even if its lifetime is so short that it is due
        // for refresh already, or every waiting call would fetch one in turn.
        let waited_for = self.cached.load_full().filter(|t| t.fetched_at >= asked);
        if let Some(token) = waited_for.or_else(|| self.fresh(Instant::now())) {
            return Ok(token);
        }
        // The fetch this call waited for failed, or one failed a moment ago: its answer stands,
        // so a token endpoint in trouble gets one request per moment, not one per call.
        let shared = fetches
            .failure
            .as_ref()
            .filter(|f| f.at >= asked || f.at.elapsed() < RETRY_AFTER_FAILURE)
            .map(|f| f.reason.clone());
        let failure = match shared {
            Some(reason) => reason,
            None => {
                let floor = fetches.last.map(|at| at + MIN_FETCH_INTERVAL);
                let last = &mut fetches.last;
                let fetched = tokio::time::timeout_at(until, async {
                    if let Some(floor) = floor {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(floor)).await;
                    }
                    *last = Some(Instant::now());
                    self.fetch().await
                })
                .await
                .unwrap_or_else(|_| Err(timed_out()));
                match fetched {
                    Ok(token) => {
                        let token = Arc::new(token);
                        self.cached.store(Some(token.clone()));
                        fetches.failure = None;
                        return Ok(token);
                    }
                    Err(reason) => {
                        fetches.failure = Some(FailedFetch {
                            at: Instant::now(),
                            reason: reason.clone(),
                        });
                        if self.unexpired().is_some() {
                            warn!(upstream = %self.upstream, %reason, "OAuth2 token not refreshed; the current one is used until it expires");
                        }
                        reason
                    }
                }
            }
        };
        // A token due for refresh may not have expired yet: better than failing the call.
        self.unexpired().ok_or(failure)
    }

    /// The cached token if it has not expired (it may be due for refresh).
    fn unexpired(&self) -> Option<Arc<Token>> {
        let now = Instant::now();
        self.cached.load_full().filter(|t| now < t.expires_at)
    }

    fn fresh(&self, now: Instant) -> Option<Arc<Token>> {
        self.cached.load_full().filter(|t| now < t.refresh_at)
    }

    fn forget(&self, token: &Arc<Token>) {
        // Only the token the call carried: another call may have fetched a new one meanwhile.
        let previous = self.cached.compare_and_swap(token, None);
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, token)) {
            info!(upstream = %self.upstream, "upstream refused the OAuth2 token (401); the next call fetches a new one");
        }
    }

    async fn fetch(&self) -> Result<Token, String> {
        let endpoint = &self.endpoint;
        let secret = self.client_secret.current();
        // RFC 6749 §2.3.1: the id and secret are form-encoded before they are joined.
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            form_encode(&self.client_id),
            form_encode(&secret)
        ));
        let mut authorization = HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|_| "the client credentials cannot be sent as a header".to_string())?;
        authorization.set_sensitive(true);
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .header(AUTHORIZATION, authorization)
            .body(Full::new(self.form.clone()))
            .map_err(|e| format!("cannot build the token request for {endpoint}: {e}"))?;
        let sent = Instant::now();
        let response = self.http.request(request).await.map_err(|e| {
            format!(
                "cannot reach the token endpoint {endpoint}: {}",
                error_chain(&e)
            )
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_TOKEN_ANSWER)
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!(
                        "the token endpoint {endpoint} answered more than {MAX_TOKEN_ANSWER} bytes"
                    )
                } else {
                    format!("reading the token endpoint {endpoint}'s answer: {e}")
                }
            })?;
        if !status.is_success() {
            let code = oauth_error_code(&body)
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            return Err(format!(
                "the token endpoint {endpoint} answered {}{code}",
                status.as_u16()
            ));
        }
        let token = read_token(&body, sent)
            .map_err(|reason| format!("the token endpoint {endpoint}'s answer: {reason}"))?;
        tracing::debug!(upstream = %self.upstream, lifetime = ?token.expires_at.saturating_duration_since(sent), "OAuth2 token fetched");
        Ok(token)
    }
}

/// The token from a token endpoint's 2xx answer (RFC 6749 §5.1), asked for at `sent`. The
/// messages quote nothing from the answer: it holds the token.
fn read_token(body: &[u8], sent: Instant) -> Result<Token, String> {
    let answer: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "not JSON".to_string())?;
    let access_token = answer
        .get("access_token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or("no `access_token` string")?;
    let token_type = answer
        .get("token_type")
        .and_then(|t| t.as_str())
        .ok_or("no `token_type` string")?;
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err("`token_type` is not Bearer".into());
    }
    let lifetime = match answer.get("expires_in") {
        None | Some(serde_json::Value::Null) => DEFAULT_TOKEN_LIFETIME,
        Some(value) => {
            // A number, or (from some servers) a number in a string.
            let seconds = value
                .as_f64()
                .or_else(|| value.as_str().and_then(|s| s.trim().parse::<f64>().ok()))
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or("`expires_in` is not a number of seconds")?;
            Duration::from_secs_f64(seconds.min(MAX_TOKEN_LIFETIME.as_secs_f64()))
        }
    };
    let mut header = HeaderValue::from_str(&format!("Bearer {access_token}"))
        .map_err(|_| "`access_token` cannot be sent as a header value".to_string())?;
    header.set_sensitive(true);
    let lifetime = lifetime.max(MIN_TOKEN_LIFETIME);
    let margin = REFRESH_MARGIN.min(lifetime / 10);
    Ok(Token {
        header,
        fetched_at: sent,
        refresh_at: sent + (lifetime - margin),
        expires_at: sent + lifetime,
    })
}

/// The `error` code of a token endpoint's error answer (RFC 6749 §5.2), when it is one: the
/// codes are a short fixed vocabulary, safe to log, unlike the rest of the answer.
fn oauth_error_code(body: &[u8]) -> Option<String> {
    let answer: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = answer.get("error")?.as_str()?;
    (code.len() <= 40 && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .then(|| code.to_string())
}

/// `application/x-www-form-urlencoded` bytes: letters, digits and `*-._` stay, a space is `+`.
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

fn form_encode(text: &str) -> String {
    // `%` itself is encoded, so every `%20` left is a space.
    utf8_percent_encode(text, FORM)
        .to_string()
        .replace("%20", "+")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_follows_the_html_rules() {
        assert_eq!(
            form_encode("a b+c%20:d/é*-._~"),
            "a+b%2Bc%2520%3Ad%2F%C3%A9*-._%7E"
        );
    }

    #[test]
    fn a_token_is_refreshed_a_tenth_or_a_minute_before_it_expires() {
        let sent = Instant::now();
        let token = |body: &str| read_token(body.as_bytes(), sent);
        let t = token(r#"{"access_token":"x","token_type":"bearer","expires_in":100}"#).unwrap();
        assert_eq!(t.expires_at - sent, Duration::from_secs(100));
        assert_eq!(t.refresh_at - sent, Duration::from_secs(90));
        let t = token(r#"{"access_token":"x","token_type":"Bearer","expires_in":"3600"}"#).unwrap();
        assert_eq!(t.refresh_at - sent, Duration::from_secs(3540));
        let t = token(r#"{"access_token":"x","token_type":"BEARER"}"#).unwrap();
        assert_eq!(t.expires_at - sent, DEFAULT_TOKEN_LIFETIME);
        assert_eq!(t.header, "Bearer x");
        assert!(t.header.is_sensitive());
        let t = token(r#"{"access_token":"x","token_type":"Bearer","expires_in":1e300}"#).unwrap();
        assert_eq!(t.expires_at - sent, MAX_TOKEN_LIFETIME);
        // Already expired, or nearly: used for the shortest useful lifetime all the same.
        for expires_in in ["0", "0.2", "1"] {
            let body = format!(
                r#"{{"access_token":"x","token_type":"Bearer","expires_in":{expires_in}}}"#
            );
            let t = token(&body).unwrap();
            assert_eq!(t.expires_at - sent, MIN_TOKEN_LIFETIME, "{expires_in}");
            assert_eq!(t.refresh_at - sent, MIN_TOKEN_LIFETIME * 9 / 10);
        }
    }

    #[test]
    fn bad_token_answers_are_refused_without_quoting_them() {
        let sent = Instant::now();
        for body in [
            "not json s3cret",
            r#"{"token_type":"Bearer"}"#,
            r#"{"access_token":"","token_type":"Bearer"}"#,
            r#"{"access_token":"s3cret","token_type":"mac"}"#,
            r#"{"access_token":"s3cret"}"#,
            r#"{"access_token":"s3cret\n","token_type":"Bearer"}"#,
            r#"{"access_token":"s3cret","token_type":"Bearer","expires_in":-1}"#,
            r#"{"access_token":"s3cret","token_type":"Bearer","expires_in":"soon s3cret"}"#,
            r#"{"access_token":12345,"token_type":"Bearer"}"#,
        ] {
            let err = read_token(body.as_bytes(), sent).unwrap_err();
            assert!(!err.contains("s3cret") && !err.contains("12345"), "{err}");
        }
    }

    #[test]
    fn only_a_plain_oauth_error_code_is_quoted() {
        assert_eq!(
            oauth_error_code(br#"{"error":"invalid_client","error_description":"x"}"#),
            Some("invalid_client".into())
        );
        assert_eq!(oauth_error_code(br#"{"error":"secret=abc"}"#), None);
        assert_eq!(oauth_error_code(b"<html>"), None);
    }

    #[test]
    fn debug_output_hides_the_token() {
        let t = read_token(
            br#"{"access_token":"s3cret","token_type":"Bearer"}"#,
            Instant::now(),
        )
        .unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
