//! The policy a sidecar runs on: loaded from YAML (`raw`), validated and compiled (`compile`)
//! into the immutable `Policy` below, which the proxy swaps atomically on reload.

mod compile;
pub mod raw;
pub mod secrets;
pub mod template;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use indexmap::IndexMap;

use crate::pipeline::route::RouteTable;
use crate::projection::FieldMask;
pub use raw::{Algorithm, CacheScope};
pub use template::{RenderError, Template, Var};

/// A validated policy: everything the proxy needs, nothing it has to check again.
#[derive(Debug)]
pub struct Policy {
    pub client: String,
    pub source: PathBuf,
    pub auth: Option<JwtAuth>,
    pub upstreams: IndexMap<String, Arc<Upstream>>,
    pub routes: Vec<Arc<Route>>,
    pub table: RouteTable,
    pub fallthrough: Option<Arc<Upstream>>,
}

#[derive(Debug)]
pub struct JwtAuth {
    pub issuer: String,
    pub audience: String,
    pub algorithms: Vec<Algorithm>,
    pub keys: KeySource,
    pub leeway: Duration,
}

#[derive(Debug)]
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
    pub credential: Option<Credential>,
}

/// The machine credential added to every request to an upstream.
#[derive(Clone)]
pub struct Credential {
    pub header: HeaderName,
    pub value: HeaderValue,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}: <redacted>)", self.header)
    }
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub method: Method,
    pub path: String,
    pub version: u32,
    pub deadline: Option<Duration>,
    pub cache: Option<CachePolicy>,
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
}

#[derive(Debug)]
pub struct ProxyTarget {
    pub upstream: Arc<Upstream>,
    pub path: Template,
    pub fields: FieldMask,
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

/// Every problem found in one policy file.
#[derive(Debug)]
pub struct PolicyError {
    pub file: PathBuf,
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                d.line,
                d.column,
                d.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

impl Policy {
    /// Reads, parses, resolves and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let fail = |message: String| PolicyError {
            file: path.to_path_buf(),
            diagnostics: vec![Diagnostic {
                line: 1,
                column: 1,
                message,
            }],
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        Policy::from_yaml(&text, path)
    }

    /// Parses and validates policy text; `path` names it in errors and anchors relative paths.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let raw: raw::RawPolicy = serde_saphyr::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            let message = parser_message(&e.without_snippet().to_string());
            PolicyError {
                file: path.to_path_buf(),
                diagnostics: vec![Diagnostic {
                    line,
                    column,
                    message,
                }],
            }
        })?;
        compile::compile(raw, path).map_err(|diagnostics| PolicyError {
            file: path.to_path_buf(),
            diagnostics,
        })
    }

    pub fn route(&self, index: usize) -> Option<&Arc<Route>> {
        self.routes.get(index)
    }
}

/// The YAML parser's message without what we print ourselves (the trailing `at line L, column
/// C`) or what speaks to the programmer rather than the policy's author.
fn parser_message(message: &str) -> String {
    let message = match message.rsplit_once(" at line ") {
        Some((head, tail))
            if tail
                .split_once(", column ")
                .is_some_and(|(l, c)| l.parse::<u64>().is_ok() && c.parse::<u64>().is_ok()) =>
        {
            head
        }
        _ => message,
    };
    message
        .replace(", set DuplicateKeyPolicy in Options if acceptable", "")
        .replace("budget breached", "too large or too deeply nested")
}
