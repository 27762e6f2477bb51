//! `bff webhook`: the mutating admission webhook that adds the bff sidecar to pods as they are
//! created: HTTPS (rustls, ring) with certificate files re-read when they change, AdmissionReview
//! v1 in and out, the injection decision, and the RFC 6902 JSON Patch of the mutation.
//!
//! Which pods are sent here is the MutatingWebhookConfiguration's business (see
//! `deploy/k8s/injector/`); the rule applied to a pod that arrives is:
//!
//! - not a `CREATE` of a core/v1 `Pod` (no subresource): allowed, untouched;
//! - annotation `bff.dev/inject: disabled`: untouched;
//! - annotation `bff.dev/injected` present (injected already, by `bff inject` or here): untouched;
//! - on `POST /mutate` (the namespace opt-in: the API server only sends pods of namespaces
//!   labelled `bff.dev/inject=enabled` there): injected;
//! - on `POST /mutate-annotated` (every other namespace): injected only when annotated
//!   `bff.dev/inject: enabled`.
//!
//! A review whose pod cannot be injected (a malformed object, a pod the sidecar cannot join:
//! bff's ports taken, `hostNetwork` without ports of its own, see
//! [`crate::inject::inject_pod`]) is answered by `--failure-policy`: `ignore` allows the pod as
//! it is, with a warning naming the reason; `fail` denies it.
//! A body that is not an AdmissionReview v1 at all has no `uid` to answer to: it gets HTTP 400
//! (413 when larger than 1 MiB), and the API server's own `failurePolicy` decides, as it does
//! when the webhook cannot be reached.
//!
//! Whatever can reach the port is bounded: every request has a deadline for its head and body
//! (`--request-timeout`), and the connections served at once are capped (`--max-connections`),
//! so held bodies cannot grow the webhook past `--max-connections` × [`MAX_BODY`].

use std::convert::Infallible;
use std::fmt;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use x509_cert::der::Decode as _;

/// Largest AdmissionReview accepted: a pod spec is a few KiB; the API server caps objects at
/// about 1.5 MiB, and a pod anywhere near that is not one to mutate.
pub const MAX_BODY: usize = 1 << 20;
/// Largest certificate or key file read.
const MAX_PEM_FILE: u64 = 1 << 20;
pub use crate::inject::{INJECTED_ANNOTATION, INJECT_ANNOTATION};
/// How long open connections get to finish their request after SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);
/// Default of `--max-connections`: with at most [`MAX_BODY`] buffered per connection, this
/// bounds what bodies can hold to 32 MiB; reviews are answered in milliseconds, so a few
/// connections per API server instance are plenty.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;
/// At most one warning this often about connections closed at `--max-connections`, with how
/// many were closed since the last one: a flood must not flood the log too.
const CAP_WARNING_EVERY: Duration = Duration::from_secs(60);
/// hyper's read buffer per connection (its default grows to ~400 KiB for a long head); the
/// API server's request heads are well under 1 KiB.
const MAX_READ_BUFFER: usize = 64 * 1024;

/// What the mutation needs to know: which sidecar to add and where its policy comes from.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    /// The bff container image of the sidecar.
    pub image: String,
    /// The ConfigMap holding the policy file, mounted into the sidecar.
    pub policy_configmap: String,
}

/// What to do with a pod that should be injected but cannot be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Allow the pod as it is (fail open), with a warning to the client.
    Ignore,
    /// Deny the pod (fail closed).
    Fail,
}

/// Everything `bff webhook` runs with.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub failure_policy: FailurePolicy,
    /// How often the certificate and key files are checked for a change.
    pub cert_reload_interval: Duration,
    /// A request's head must arrive within this of the connection being ready for it (which
    /// also closes a kept-alive connection idle that long), and its body within this of the
    /// head.
    pub request_timeout: Duration,
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    pub webhook: WebhookOptions,
}

// ─── The mutation ───────────────────────────────────────────────────────────────────────────

/// The pod with the bff sidecar added (the mutation of `bff inject`), or `None` when there is
/// nothing to add.
pub fn mutate_pod(pod: &Value, options: &WebhookOptions) -> Result<Option<Value>, String> {
    let inject = crate::inject::InjectOptions {
        image: options.image.clone(),
        policy_configmap: options.policy_configmap.clone(),
        ..crate::inject::InjectOptions::default()
    };
    match crate::inject::inject_pod(pod, &inject) {
        Ok(crate::inject::Injection::Injected(pod)) => Ok(Some(pod)),
        Ok(crate::inject::Injection::AlreadyInjected | crate::inject::Injection::OptedOut) => {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

// ─── The decision ───────────────────────────────────────────────────────────────────────────

/// Which webhook of the configuration a review came through (by its path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `/mutate`: the pod's namespace opted in; every pod is injected unless it opts out.
    Namespace,
    /// `/mutate-annotated`: only pods annotated `bff.dev/inject: enabled` are injected.
    Annotated,
}

/// Why a pod is left alone, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    NotAPodCreate,
    OptedOut,
    AlreadyInjected,
    NotOptedIn,
    NothingToAdd,
}

fn annotation<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod.get("metadata")?.get("annotations")?.get(name)
}

/// Whether the pod of a review is to be injected (`None`) or why not.
pub fn skip_reason(pod: &Value, scope: Scope) -> Option<Skip> {
    if annotation(pod, INJECTED_ANNOTATION).is_some() {
        return Some(Skip::AlreadyInjected);
    }
    match annotation(pod, INJECT_ANNOTATION).and_then(Value::as_str) {
        Some("disabled") => Some(Skip::OptedOut),
        Some("enabled") => None,
        _ if scope == Scope::Namespace => None,
        _ => Some(Skip::NotOptedIn),
    }
}

/// A request the webhook cannot answer as a review: HTTP status and a message.
#[derive(Debug)]
pub struct BadRequest(pub StatusCode, pub String);

/// The AdmissionReview v1 answering `body`.
pub fn review(
    body: &[u8],
    scope: Scope,
    options: &WebhookOptions,
    failure_policy: FailurePolicy,
) -> Result<Value, BadRequest> {
    let bad = |message: String| BadRequest(StatusCode::BAD_REQUEST, message);
    let review: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    if review.get("apiVersion").and_then(Value::as_str) != Some("admission.k8s.io/v1")
        || review.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return Err(bad(
            "the body is not an AdmissionReview of apiVersion admission.k8s.io/v1".into(),
        ));
    }
    let request = review
        .get("request")
        .filter(|r| r.is_object())
        .ok_or_else(|| bad("the AdmissionReview has no `request` object".into()))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|uid| !uid.is_empty())
        .ok_or_else(|| bad("the AdmissionReview's request has no `uid`".into()))?;

    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = pod_name(request);
    let response = match admit(request, scope, options) {
        Ok(Ok(patch)) => {
            let patch = serde_json::to_vec(&patch).expect("a JSON Patch serialises");
            info!(uid, namespace, pod = %name, "injected the bff sidecar");
            json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            })
        }
        Ok(Err(skip)) => {
            debug!(uid, namespace, pod = %name, reason = ?skip, "left the pod alone");
            json!({"uid": uid, "allowed": true})
        }
        Err(problem) => {
            let message = format!("bff webhook: cannot inject the bff sidecar: {problem}");
            warn!(uid, namespace, pod = %name, policy = ?failure_policy, "{message}");
            match failure_policy {
                FailurePolicy::Ignore => {
                    json!({"uid": uid, "allowed": true, "warnings": [message]})
                }
                FailurePolicy::Fail => json!({
                    "uid": uid,
                    "allowed": false,
                    "status": {"status": "Failure", "code": 500, "message": message},
                }),
            }
        }
    };
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// The pod's name for the log: its name, or its `generateName` prefix on a create.
fn pod_name(request: &Value) -> String {
    let metadata = request.get("object").and_then(|o| o.get("metadata"));
    let field = |name| metadata.and_then(|m| m.get(name)).and_then(Value::as_str);
    match (field("name"), field("generateName")) {
        (Some(name), _) if !name.is_empty() => name.to_string(),
        (_, Some(prefix)) => format!("{prefix}*"),
        _ => String::new(),
    }
}

/// The JSON Patch for the request's pod, why it is left alone, or why it cannot be injected.
fn admit(
    request: &Value,
    scope: Scope,
    options: &WebhookOptions,
) -> Result<Result<json_patch::Patch, Skip>, String> {
    let kind = |name: &str| {
        request
            .get("kind")
            .and_then(|kind| kind.get(name))
            .and_then(Value::as_str)
    };
    let is_pod = kind("group") == Some("")
        && kind("version") == Some("v1")
        && kind("kind") == Some("Pod")
        && request
            .get("subResource")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty();
    if !is_pod || request.get("operation").and_then(Value::as_str) != Some("CREATE") {
        return Ok(Err(Skip::NotAPodCreate));
    }
    let pod = request
        .get("object")
        .filter(|o| o.is_object())
        .ok_or("the review's `request.object` is not a pod object")?;
    if let Some(skip) = skip_reason(pod, scope) {
        return Ok(Err(skip));
    }
    match mutate_pod(pod, options)? {
        None => Ok(Err(Skip::NothingToAdd)),
        Some(mutated) => Ok(Ok(json_patch::diff(pod, &mutated))),
    }
}

// ─── TLS with rotating files ────────────────────────────────────────────────────────────────

/// The serving certificate, replaced when its files change (cert-manager renews it in place).
struct RotatingCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<Loaded>,
    /// What the last check warned about, so a file left broken is reported once, not on
    /// every interval.
    warned: Mutex<Option<Problem>>,
}

/// Why the files on disk are not being served.
#[derive(PartialEq, Eq)]
enum Problem {
    Unreadable(String),
    /// This content was tried and does not load (mismatched, expired, not PEM).
    Rejected {
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    },
}

struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for RotatingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RotatingCert(cert: {}, key: {})",
            self.cert.display(),
            self.key.display()
        )
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified.clone())
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(format!(
            "{}: larger than {MAX_PEM_FILE} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

fn load_identity(cert: &Path, key: &Path) -> Result<Loaded, String> {
    let (cert_pem, key_pem) = (read_pem(cert)?, read_pem(key)?);
    let certified = parse_identity(cert, key, &cert_pem, &key_pem)?;
    Ok(Loaded {
        cert_pem,
        key_pem,
        certified,
    })
}

/// The certificate chain and key of the files `cert` and `key` (named in errors), refused when
/// the certificate has expired: the API server would fail every call on it.
fn parse_identity(
    cert: &Path,
    key: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate: {e}", cert.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{}: holds no PEM certificate", cert.display()));
    };
    let leaf = x509_cert::Certificate::from_der(leaf)
        .map_err(|e| format!("{}: not an X.509 certificate: {e}", cert.display()))?;
    let not_after = leaf.tbs_certificate.validity.not_after;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    if not_after.to_unix_duration() <= now {
        return Err(format!(
            "{}: the certificate expired at {}",
            cert.display(),
            not_after.to_date_time()
        ));
    }
    // The parser's message may quote the file: a key's content stays unsaid.
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| {
        format!(
            "{}: holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        )
    })?;
    let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{}: does not belong to the certificate in {}",
            key.display(),
            cert.display()
        ),
        _ => format!(
            "{} and {}: not a usable certificate and key",
            cert.display(),
            key.display()
        ),
    })?;
    Ok(Arc::new(certified))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl RotatingCert {
    fn load(cert: &Path, key: &Path) -> Result<RotatingCert, String> {
        Ok(RotatingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(load_identity(cert, key)?),
            warned: Mutex::new(None),
        })
    }

    /// Takes the files again when their bytes changed; a pair that does not load (e.g. the
    /// certificate written, the key not yet, or an expired one) keeps the old one, and is
    /// tried again only once its content changes.
    fn refresh(&self) {
        let (cert_pem, key_pem) = match (read_pem(&self.cert), read_pem(&self.key)) {
            (Ok(cert_pem), Ok(key_pem)) => (cert_pem, key_pem),
            (Err(e), _) | (_, Err(e)) => {
                if self.warn_once(Problem::Unreadable(e.clone())) {
                    warn!(error = %e, "cannot read the serving certificate files; keeping the loaded ones");
                }
                return;
            }
        };
        let current = self.current.load();
        if current.cert_pem == cert_pem && current.key_pem == key_pem {
            self.set_warned(None);
            return;
        }
        let rejected_before = matches!(&*self.warned(),
            Some(Problem::Rejected { cert_pem: c, key_pem: k }) if *c == cert_pem && *k == key_pem);
        if rejected_before {
            return;
        }
        match parse_identity(&self.cert, &self.key, &cert_pem, &key_pem) {
            Ok(certified) => {
                self.current.store(Arc::new(Loaded {
                    cert_pem,
                    key_pem,
                    certified,
                }));
                self.set_warned(None);
                info!(cert = %self.cert.display(), "loaded the renewed serving certificate");
            }
            Err(e) => {
                self.set_warned(Some(Problem::Rejected { cert_pem, key_pem }));
                warn!(error = %e, "the changed serving certificate does not load; keeping the loaded one until the files change again")
            }
        }
    }

    fn warned(&self) -> std::sync::MutexGuard<'_, Option<Problem>> {
        self.warned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_warned(&self, problem: Option<Problem>) {
        *self.warned() = problem;
    }

    /// Records `problem`; true when it is not the one warned about last time.
    fn warn_once(&self, problem: Problem) -> bool {
        let mut warned = self.warned();
        let new = warned.as_ref() != Some(&problem);
        *warned = Some(problem);
        new
    }
}

// ─── The server ─────────────────────────────────────────────────────────────────────────────

struct Shared {
    options: WebhookOptions,
    failure_policy: FailurePolicy,
    request_timeout: Duration,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Counted from the head: hyper has bounded the wait for it (`header_read_timeout`).
    let body_deadline = tokio::time::Instant::now() + shared.request_timeout;
    let scope = match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => return Ok(text(StatusCode::OK, "ok\n")),
        (&Method::POST, "/mutate") => Scope::Namespace,
        (&Method::POST, "/mutate-annotated") => Scope::Annotated,
        (_, "/healthz" | "/mutate" | "/mutate-annotated") => {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"))
        }
        _ => return Ok(text(StatusCode::NOT_FOUND, "not found\n")),
    };
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the AdmissionReview is larger than {MAX_BODY} bytes\n"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return Ok(too_large());
    }
    let collect = Limited::new(request.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout_at(body_deadline, collect).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Ok(too_large()),
        Ok(Err(e)) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}\n"),
            ))
        }
        // Dropping the collection frees what was buffered; hyper closes the connection, as
        // the rest of the body is never read.
        Err(_) => {
            debug!(timeout = ?shared.request_timeout, "a request body did not arrive in time");
            let mut response = text(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {:?}\n",
                    shared.request_timeout
                ),
            );
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return Ok(response);
        }
    };
    match review(&body, scope, &shared.options, shared.failure_policy) {
        Ok(answer) => {
            let bytes = serde_json::to_vec(&answer).expect("a JSON value serialises");
            let mut response = Response::new(Full::new(Bytes::from(bytes)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            Ok(response)
        }
        Err(BadRequest(status, message)) => {
            warn!(%status, "refused a webhook request: {message}");
            Ok(text(status, format!("{message}\n")))
        }
    }
}

/// Runs the webhook until SIGTERM or SIGINT; the error says what kept it from starting.
pub async fn serve(options: ServeOptions) -> Result<(), String> {
    if options.cert_reload_interval.is_zero() {
        return Err("--cert-reload-interval must be longer than 0".into());
    }
    if options.request_timeout.is_zero() {
        return Err("--request-timeout must be longer than 0".into());
    }
    if options.max_connections == 0 || options.max_connections > Semaphore::MAX_PERMITS {
        return Err(format!(
            "--max-connections must be from 1 to {}",
            Semaphore::MAX_PERMITS
        ));
    }
    let cert = Arc::new(RotatingCert::load(&options.cert, &options.key)?);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(&options.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    let local: SocketAddr = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    info!(listen = %local, cert = %options.cert.display(), "bff webhook serving");

    let refresher = {
        let cert = cert.clone();
        let every = options.cert_reload_interval;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let cert = cert.clone();
                // File reads block: off the async workers.
                let _ = tokio::task::spawn_blocking(move || cert.refresh()).await;
            }
        })
    };

    let shared = Arc::new(Shared {
        options: options.webhook.clone(),
        failure_policy: options.failure_policy,
        request_timeout: options.request_timeout,
    });
    let slots = Arc::new(Semaphore::new(options.max_connections));
    // Connections closed at the cap, logged at most every CAP_WARNING_EVERY.
    let mut turned_away: u64 = 0;
    let mut last_warning: Option<Instant> = None;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Closed at once rather than left waiting: each one served may hold a body of up
                // to MAX_BODY, and a client cut off fails fast instead of at its own timeout.
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    turned_away += 1;
                    if last_warning.is_none_or(|at| at.elapsed() >= CAP_WARNING_EVERY) {
                        warn!(max = options.max_connections, turned_away, last = %peer,
                              "at --max-connections: closed new connections as they came");
                        last_warning = Some(Instant::now());
                        turned_away = 0;
                    }
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let served = connection(tcp, peer, acceptor.clone(), shared.clone(), stop_rx.clone());
                connections.spawn(async move {
                    served.await;
                    drop(slot);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    info!("stopping: finishing open requests");
    refresher.abort();
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("connections still open after {DRAIN:?}; closing them");
    }
    Ok(())
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let timeout = shared.request_timeout;
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |request| handle(request, shared.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(timeout)
        .max_buf_size(MAX_READ_BUFFER)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stop.wait_for(|stopping| *stopping) => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        warn!("cannot listen for SIGTERM; stop with SIGINT");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> WebhookOptions {
        WebhookOptions {
            image: "bff:test".into(),
            policy_configmap: "bff-policy".into(),
        }
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "annotations": annotations},
            "spec": {"containers": [{"name": "web", "image": "web:1"}]},
        })
    }

    #[test]
    fn decision_follows_annotations_and_scope() {
        let enabled = pod(json!({"bff.dev/inject": "enabled"}));
        let disabled = pod(json!({"bff.dev/inject": "disabled"}));
        let plain = pod(json!({}));
        let injected = pod(json!({"bff.dev/inject": "enabled", "bff.dev/injected": "true"}));
        assert_eq!(skip_reason(&enabled, Scope::Annotated), None);
        assert_eq!(skip_reason(&enabled, Scope::Namespace), None);
        assert_eq!(skip_reason(&plain, Scope::Namespace), None);
        assert_eq!(
            skip_reason(&plain, Scope::Annotated),
            Some(Skip::NotOptedIn)
        );
        assert_eq!(
            skip_reason(&disabled, Scope::Namespace),
            Some(Skip::OptedOut)
        );
        assert_eq!(
            skip_reason(&injected, Scope::Namespace),
            Some(Skip::AlreadyInjected)
        );
    }

    #[test]
    fn patch_paths_escape_slashes_and_apply() {
        let before = pod(json!({"bff.dev/inject": "enabled"}));
        let after = mutate_pod(&before, &options()).unwrap().unwrap();
        let patch = json_patch::diff(&before, &after);
        let text = serde_json::to_string(&patch).unwrap();
        assert!(
            text.contains("/metadata/annotations/bff.dev~1injected"),
            "{text}"
        );
        let mut patched = before.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        assert_eq!(patched, after);
    }

    #[test]
    fn patch_creates_missing_parents() {
        let before = json!({"apiVersion": "v1", "kind": "Pod",
                            "spec": {"containers": [{"name": "web"}]}});
        let after = mutate_pod(&before, &options()).unwrap().unwrap();
        let mut patched = before.clone();
        json_patch::patch(&mut patched, &json_patch::diff(&before, &after)).unwrap();
        assert_eq!(patched["spec"]["initContainers"][0]["name"], "bff");
        assert_eq!(
            patched["metadata"]["annotations"]["bff.dev/injected"],
            env!("CARGO_PKG_VERSION")
        );
    }

    #[test]
    fn a_malformed_pod_follows_the_failure_policy() {
        let body = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "operation": "CREATE",
                        "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "object": {"metadata": {}, "spec": {"initContainers": "oops"}}},
        }))
        .unwrap();
        let open = review(&body, Scope::Namespace, &options(), FailurePolicy::Ignore).unwrap();
        assert_eq!(open["response"]["allowed"], true);
        assert!(open["response"].get("patch").is_none());
        assert!(open["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("spec.initContainers"));
        let closed = review(&body, Scope::Namespace, &options(), FailurePolicy::Fail).unwrap();
        assert_eq!(closed["response"]["allowed"], false);
        assert_eq!(closed["response"]["uid"], "u1");
        assert_eq!(closed["response"]["status"]["code"], 500);
    }

    #[test]
    fn a_subresource_is_left_alone() {
        let body = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u2", "operation": "CREATE", "subResource": "binding",
                        "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "object": pod(json!({"bff.dev/inject": "enabled"}))},
        }))
        .unwrap();
        let answer = review(&body, Scope::Namespace, &options(), FailurePolicy::Fail).unwrap();
        assert_eq!(answer["response"], json!({"uid": "u2", "allowed": true}));
    }
}
