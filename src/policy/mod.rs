//! The policy a sidecar runs on (the bottom layer, the contract): loaded from YAML (`raw`),
//! validated and compiled (`compile`) into the immutable `Policy` below, which the pipeline
//! swaps atomically on reload. It owns what the compiled policy holds: the route table
//! (`route_table`), the API keys file (`api_keys`), the TLS files (`tls_files`), secrets
//! (`secrets`, `files`) and templates (`template`). `load` reads a policy file and runs the
//! two, reporting every problem as `file:line:col: message`. It imports only `projection`.

pub mod api_keys;
mod compile;
pub mod files;
pub mod load;
pub mod raw;
pub mod route_table;
pub mod secrets;
pub mod template;
pub mod tls_files;

use std::fmt;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Uri};
use indexmap::IndexMap;

use crate::projection::FieldMask;
pub use raw::{Algorithm, CacheScope, RouteAuth};
use route_table::RouteTable;
pub use template::{RenderError, Template, Var};
use tls_files::{CaBundle, ClientIdentity};

/// Largest policy file read: it is read again every second to see whether it changed.
pub const MAX_POLICY_FILE: u64 = 16 << 20;

/// A validated policy: everything the proxy needs, nothing it has to check again.
#[derive(Debug)]
pub struct Policy {
    pub client: String,
    pub source: PathBuf,
    pub auth: Option<Auth>,
    pub upstreams: IndexMap<String, Arc<Upstream>>,
    /// One budget per client identity, shared by every matched route.
    pub rate_limit: Option<RateLimit>,
    /// Where a request's client address is read from (behind a proxy, its header).
    pub client_address: ClientAddress,
    pub routes: Vec<Arc<Route>>,
    pub table: RouteTable,
    pub fallthrough: Option<Arc<Upstream>>,
}

/// The client credentials a policy accepts. A request is judged by the first one it presents,
/// in the order the policy lists them; a present but invalid one is never skipped for the next.
#[derive(Debug)]
pub struct Auth {
    pub jwt: Option<JwtAuth>,
    pub api_key: Option<ApiKeyAuth>,
    /// `api_key` is listed before `jwt`.
    pub api_key_first: bool,
    /// How many presented credentials one client address may have refused.
    pub failure_limit: RateLimit,
}

impl Auth {
    /// `failure_limit` when the policy gives none: 30 a minute, 30 at once.
    pub const DEFAULT_FAILURE_LIMIT: RateLimit = RateLimit {
        requests: NonZeroU32::new(30).unwrap(),
        per: Duration::from_secs(60),
        burst: NonZeroU32::new(30).unwrap(),
    };
}

/// Which address a request comes from: the TCP peer's, or, when the peer is one of the
/// `trusted_proxies`, the one its `header` names (see `pipeline::edge::client_address`).
#[derive(Debug, Clone)]
pub struct ClientAddress {
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub header: HeaderName,
}

impl Default for ClientAddress {
    fn default() -> Self {
        ClientAddress {
            trusted_proxies: Vec::new(),
            header: HeaderName::from_static("x-forwarded-for"),
        }
    }
}

#[derive(Debug, PartialEq)]
pub struct JwtAuth {
    pub issuer: String,
    pub audience: String,
    pub algorithms: Vec<Algorithm>,
    pub keys: KeySource,
    pub leeway: Duration,
    /// The cookie that may carry the token, besides `Authorization: Bearer`.
    pub cookie: Option<String>,
}

/// Partner credentials: a key in `header`, known by the SHA-256 hashes in `keys_file`.
#[derive(Debug)]
pub struct ApiKeyAuth {
    pub header: HeaderName,
    pub keys_file: PathBuf,
    /// The keys as the loader read them; the sidecar re-reads the file when it changes.
    pub keys: api_keys::ApiKeySet,
}

#[derive(Debug, PartialEq)]
pub enum KeySource {
    JwksUrl(String),
    JwksFile(PathBuf),
    Hs256Secret(String),
}

/// An internal service the sidecar may call.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// `host:port`, sent as the `Host` header.
    pub authority: String,
    /// Prefix of every path sent to this upstream, without a trailing `/` (often empty).
    pub base_path: String,
    pub timeout: Option<Duration>,
    /// Most calls in flight at once; callers beyond it wait (inside their timeout).
    pub concurrency: Option<usize>,
    pub retries: Option<RetryPolicy>,
    /// `None` when the policy turns the breaker off.
    pub circuit_breaker: Option<BreakerPolicy>,
    /// Extra request headers; their templates may only use `{jwt.*}`.
    pub headers: Vec<(HeaderName, Template)>,
    /// A header with a secret value, or (never both) `oauth2` tokens.
    pub credential: Option<Credential>,
    pub oauth2: Option<OAuth2Client>,
    /// `Some` exactly for an `https://` upstream.
    pub tls: Option<TlsPolicy>,
}

impl Upstream {
    /// Bounds one call (all its retries included) when the policy gives no `timeout`.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn call_timeout(&self) -> Duration {
        self.timeout.unwrap_or(Self::DEFAULT_TIMEOUT)
    }
}

/// How the sidecar speaks TLS to an `https://` upstream. The files were read and checked when
/// the policy was loaded; the upstream's client re-reads them when they rotate.
#[derive(Debug, Default)]
pub struct TlsPolicy {
    /// CA certificates trusted for this upstream; `None`: the system's trust store.
    pub ca: Option<CaBundle>,
    /// The certificate and key presented to the upstream (mutual TLS).
    pub identity: Option<ClientIdentity>,
    /// Sent as SNI and checked against the server's certificate instead of the URL's host.
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
}

/// Retries of idempotent calls that failed to connect or got 502/503/504.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Retries may add at most this fraction of the calls made...
    pub budget: f32,
    /// ...plus this many per second, so a quiet upstream can still be retried.
    pub min_per_second: u32,
}

/// When an upstream's circuit opens, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    /// Opens after this many failures in a row...
    pub consecutive_failures: u32,
    /// ...or when this fraction of the calls in `window` failed...
    pub failure_ratio: f64,
    /// ...once the window holds at least this many calls.
    pub min_requests: u32,
    pub window: Duration,
    /// How long it stays open before one probe call may test the upstream.
    pub open_for: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        }
    }
}

/// The machine credential added to every request to an upstream.
#[derive(Clone)]
pub struct Credential {
    pub header: HeaderName,
    /// The value resolved at load (marked sensitive).
    pub value: HeaderValue,
    /// What the value is read from again when a file it refers to rotates.
    pub source: SecretText,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}: {:?})", self.header, self.source)
    }
}

/// OAuth2 client credentials (RFC 6749 §4.4): the sidecar fetches its own bearer token for an
/// upstream from `token_url`.
#[derive(Debug, Clone)]
pub struct OAuth2Client {
    /// http or https, with a host.
    pub token_url: Uri,
    pub client_id: String,
    pub client_secret: SecretText,
    pub scope: Option<String>,
}

/// A policy value that may refer to `${env:…}` and `${file:…}`: what it resolved to at load,
/// and what resolving it again takes, for secrets whose files rotate while the sidecar runs.
#[derive(Clone)]
pub struct SecretText {
    /// As the policy writes it; may itself be a literal secret.
    pub written: String,
    /// The policy file's directory: relative file paths are taken from it.
    pub base_dir: PathBuf,
    pub resolved: String,
}

impl SecretText {
    /// The files it is read from; none when it cannot rotate.
    pub fn files(&self) -> Vec<PathBuf> {
        secrets::files(&self.written, &self.base_dir)
    }

    /// Reads the value again (see `secrets::reread`).
    pub fn reread(&self) -> Result<String, secrets::SecretError> {
        secrets::reread(&self.written, &self.base_dir)
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, from files {:?}>", self.files())
    }
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub method: Method,
    pub path: String,
    pub version: u32,
    pub auth: RouteAuth,
    /// Every one of these must be granted by the token's `scope` or `scp`.
    pub scopes: Vec<String>,
    pub deadline: Option<Duration>,
    pub cache: Option<CachePolicy>,
    /// This route's own budget per client identity, on top of the policy's.
    pub rate_limit: Option<RateLimit>,
    /// Response headers the route adds (e.g. `Cache-Control`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub on_critical_failure: CriticalFailure,
    pub action: Action,
    /// Short hash of everything that decides the response's shape.
    pub shape: String,
}

impl Route {
    /// `{client}:{route}:v{version}:{shape}:` — every cache key of this route starts so.
    pub fn key_prefix(&self, client: &str) -> String {
        format!("{client}:{}:v{}:{}:", self.name, self.version, self.shape)
    }
}

#[derive(Debug)]
pub enum Action {
    /// Aggregated: fetches run concurrently and are assembled under their names.
    Fetch(Vec<Fetch>),
    /// One upstream, proxied through Pingora, the body projected.
    Proxy(ProxyTarget),
}

#[derive(Debug)]
pub struct Fetch {
    pub name: String,
    pub upstream: Arc<Upstream>,
    pub path: Template,
    pub critical: bool,
    pub select: Option<String>,
    pub fields: FieldMask,
    pub fallback: Option<serde_json::Value>,
    /// Indexes, in the route's fetch list, of the fetches whose results `path` uses
    /// (`{fetch.NAME.FIELD}`).
    pub parents: Vec<usize>,
    /// 0 for fetches without parents; otherwise one more than the latest parent's wave.
    pub wave: usize,
    /// Its projected answer cached on its own, for everyone (shared domain data).
    pub cache: Option<FetchCache>,
}

/// A fetch's own cache: a plain TTL (with jitter), no early recompute.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchCache {
    pub ttl: Duration,
    pub jitter: Duration,
}

#[derive(Debug)]
pub struct ProxyTarget {
    pub upstream: Arc<Upstream>,
    pub path: Template,
    pub fields: FieldMask,
}

/// How many requests one client identity may make: `burst` at once, then `requests` every
/// `per`, spread evenly (one every `per / requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: NonZeroU32,
    pub per: Duration,
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// How long one spent request takes to come back; the loader keeps it above zero.
    pub fn interval(&self) -> Duration {
        self.per / self.requests.get()
    }
}

#[derive(Debug, Clone)]
pub struct CachePolicy {
    pub scope: CacheScope,
    pub ttl: Duration,
    pub jitter: Duration,
    pub beta: f64,
    pub stale_while_revalidate: Duration,
    pub degraded_ttl: Option<Duration>,
}

/// The envelope answered when a critical dependency fails.
#[derive(Debug, Clone)]
pub struct CriticalFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

impl Default for CriticalFailure {
    fn default() -> Self {
        CriticalFailure {
            status: 503,
            code: "DEPENDENCY_UNAVAILABLE".into(),
            message: "A service this page depends on is unavailable. Please try again.".into(),
            retryable: true,
        }
    }
}

/// One problem in a policy file, printed as `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl Policy {
    pub fn route(&self, index: usize) -> Option<&Arc<Route>> {
        self.routes.get(index)
    }
}
