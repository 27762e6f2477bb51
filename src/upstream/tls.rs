//! TLS to `https://` upstreams (and to an `https://` `jwks_url`): rustls with the ring provider
//! under the pooled HTTP client, the PEM files of an upstream's `tls` policy, and their rotation.
//!
//! An upstream's trust anchors and client certificate sit behind `ArcSwap`s that
//! [`UpstreamTls::refresh`] replaces when their files change, so the next new connection uses
//! the rotated files; the caller then retires the client's pool, so that connections made with
//! the old identity or trust anchors are closed once their calls are done (see `client`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_rustls::{
    DefaultServerNameResolver, FixedServerNameResolver, HttpsConnector, ResolveServerName,
};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Resumption,
    Tls12ClientSessionValue, Tls13ClientSessionValue, WebPkiServerVerifier,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, NamedGroup, RootCertStore, SignatureScheme};
use tracing::{error, info, warn};

use super::call::FileFailures;
use crate::policy::files;
use crate::policy::tls_files::{parse_ca, parse_identity, provider, IdentityError, MAX_FILE};
use crate::policy::TlsPolicy;

/// TLS sessions remembered for resumption per upstream (one per server name).
const SESSIONS: usize = 32;

/// The system's trust store (`SSL_CERT_FILE` and `SSL_CERT_DIR` say where it is read from);
/// `None` when it holds no usable certificate.
fn system_roots() -> Option<Arc<RootCertStore>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        warn!(error = %e, "part of the system trust store cannot be read");
    }
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        error!("the system trust store holds no usable CA certificate: https servers can only be verified with `tls.ca`");
        return None;
    }
    Some(Arc::new(roots))
}

/// The base of every client config here: ring, TLS 1.3 and 1.2, the given verifier and
/// client certificate, and a session cache that can be emptied.
fn client_config(
    verifier: Arc<SwappableVerifier>,
    identity: Arc<SwappableIdentity>,
    sessions: Arc<SwappableSessions>,
) -> ClientConfig {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.3 and 1.2")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(identity);
    config.resumption = Resumption::store(sessions);
    config
}

fn plain_http(upstream_timeout: Option<std::time::Duration>) -> HttpConnector {
    let mut http = HttpConnector::new();
    // The TLS connector above it takes `https://` URLs; it hands `http://` ones straight down.
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(upstream_timeout);
    http
}

/// The connector of an upstream's client: TLS from `tls` for an `https://` upstream (plain
/// `http://` URLs are refused then), plain TCP for an `http://` one (`tls` is `None`).
pub fn connector(
    tls: Option<&UpstreamTls>,
    connect_timeout: std::time::Duration,
) -> HttpsConnector<HttpConnector> {
    let http = plain_http(Some(connect_timeout));
    match tls {
        Some(tls) => {
            let names: Arc<dyn ResolveServerName + Send + Sync> = match &tls.server_name {
                Some(name) => Arc::new(FixedServerNameResolver::new(name.clone())),
                None => Arc::new(DefaultServerNameResolver::default()),
            };
            HttpsConnector::new(http, tls.config.clone(), true, names)
        }
        // Never asked for TLS (an http:// upstream's URLs are all http://): it trusts nothing.
        None => HttpsConnector::new(
            http,
            client_config(
                Arc::new(SwappableVerifier::new(None)),
                Arc::new(SwappableIdentity(ArcSwapOption::empty())),
                Arc::new(SwappableSessions::new()),
            ),
            false,
            Arc::new(DefaultServerNameResolver::default()),
        ),
    }
}

/// A connector for `http://` and `https://` URLs whose servers are verified against the
/// system's trust store, without a client certificate: for fetching a `jwks_url` or an OAuth2
/// `token_url`.
pub fn system_connector() -> HttpsConnector<HttpConnector> {
    let config = client_config(
        Arc::new(SwappableVerifier::new(system_roots())),
        Arc::new(SwappableIdentity(ArcSwapOption::empty())),
        Arc::new(SwappableSessions::new()),
    );
    HttpsConnector::new(
        plain_http(None),
        config,
        false,
        Arc::new(DefaultServerNameResolver::default()),
    )
}

/// The TLS side of one `https://` upstream's client: its config, and the files it re-reads.
pub struct UpstreamTls {
    upstream: String,
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
    verifier: Arc<SwappableVerifier>,
    identity: Arc<SwappableIdentity>,
    sessions: Arc<SwappableSessions>,
    files: Mutex<WatchedFiles>,
    failures: FileFailures,
}

struct WatchedFiles {
    ca: Option<Watched>,
    identity: Option<(Watched, Watched)>,
}

/// A file and the content last read from it.
struct Watched {
    /// The policy key that names it, for metrics.
    key: &'static str,
    path: PathBuf,
    seen: Vec<u8>,
    /// Whether the last read failed (so the failure is logged once, not every poll).
    unreadable: bool,
}

impl Watched {
    fn new(key: &'static str, path: &Path, seen: &[u8]) -> Watched {
        Watched {
            key,
            path: path.to_path_buf(),
            seen: seen.to_vec(),
            unreadable: false,
        }
    }

    /// Reads the file again; true when its content differs from what was seen last.
    fn changed(&mut self, upstream: &str, failures: &FileFailures) -> bool {
        match files::read_remembered(&self.path, MAX_FILE) {
            Ok(now) => {
                self.unreadable = false;
                if now == self.seen {
                    return false;
                }
                self.seen = now;
                true
            }
            Err(reason) => {
                failures.count(self.key, reason.label());
                if !self.unreadable {
                    error!(upstream, file = %self.path.display(), error = %reason, "TLS file cannot be read; the one read before stays in use");
                }
                self.unreadable = true;
                false
            }
        }
    }
}

impl UpstreamTls {
    pub fn new(upstream: &str, policy: &TlsPolicy, failures: &FileFailures) -> UpstreamTls {
        let roots = match &policy.ca {
            Some(ca) => Some(ca.roots.clone()),
            None => system_roots(),
        };
        let verifier = Arc::new(SwappableVerifier::new(roots));
        let identity = Arc::new(SwappableIdentity(ArcSwapOption::new(
            policy.identity.as_ref().map(|id| id.certified.clone()),
        )));
        let sessions = Arc::new(SwappableSessions::new());
        let config = client_config(verifier.clone(), identity.clone(), sessions.clone());
        let files = WatchedFiles {
            ca: policy
                .ca
                .as_ref()
                .map(|ca| Watched::new("tls.ca", &ca.path, &ca.pem)),
            identity: policy.identity.as_ref().map(|id| {
                (
                    Watched::new("tls.cert", &id.cert, &id.cert_pem),
                    Watched::new("tls.key", &id.key, &id.key_pem),
                )
            }),
        };
        UpstreamTls {
            upstream: upstream.to_string(),
            config: Arc::new(config),
            server_name: policy.server_name.clone(),
            verifier,
            identity,
            sessions,
            files: Mutex::new(files),
            failures: failures.clone(),
        }
    }

    /// Re-reads the `ca`, `cert` and `key` files and puts in use those whose content changed
    /// and parses; one that does not parse is logged and the previous one stays in use. True
    /// when the trust anchors or the client certificate changed.
    pub fn refresh(&self) -> bool {
        let upstream = self.upstream.as_str();
        let failures = &self.failures;
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let mut rotated = false;
        if let Some(ca) = &mut files.ca {
            if ca.changed(upstream, failures) {
                match parse_ca(&ca.seen) {
                    Ok(roots) => {
                        self.verifier.set(Some(roots));
                        rotated = true;
                        info!(upstream, file = %ca.path.display(), "TLS CA certificates reloaded");
                    }
                    Err(reason) => {
                        failures.count(ca.key, "invalid");
                        error!(upstream, file = %ca.path.display(), error = %reason, "TLS CA file not reloaded; the previous one stays in use");
                    }
                }
            }
        }
        if let Some((cert, key)) = &mut files.identity {
            // Both read every time, so a pair rotated between two polls is seen as one change.
            let cert_changed = cert.changed(upstream, failures);
            let key_changed = key.changed(upstream, failures);
            if cert_changed || key_changed {
                match parse_identity(&cert.seen, &key.seen) {
                    Ok(certified) => {
                        self.identity.0.store(Some(certified));
                        rotated = true;
                        info!(upstream, cert = %cert.path.display(), key = %key.path.display(), "TLS client certificate reloaded");
                    }
                    Err(IdentityError::Cert(reason)) => {
                        failures.count(cert.key, "invalid");
                        error!(upstream, file = %cert.path.display(), error = %reason, "TLS client certificate not reloaded; the previous one stays in use");
                    }
                    Err(IdentityError::Key(reason)) => {
                        failures.count(key.key, "invalid");
                        error!(upstream, file = %key.path.display(), error = %reason, "TLS client key not reloaded; the previous certificate and key stay in use");
                    }
                }
            }
        }
        if rotated {
            self.sessions.clear();
        }
        rotated
    }
}

/// Verifies servers against trust anchors that can be replaced; `None` trusts nothing.
struct SwappableVerifier {
    current: ArcSwapOption<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
}

impl SwappableVerifier {
    fn new(roots: Option<Arc<RootCertStore>>) -> SwappableVerifier {
        let verifier = SwappableVerifier {
            current: ArcSwapOption::empty(),
            provider: provider(),
        };
        verifier.set(roots);
        verifier
    }

    fn set(&self, roots: Option<Arc<RootCertStore>>) {
        let built = roots.and_then(|roots| {
            WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone())
                .build()
                .map_err(|e| error!(error = %e, "TLS trust anchors cannot be used"))
                .ok()
        });
        self.current.store(built);
    }
}

impl fmt::Debug for SwappableVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SwappableVerifier")
    }
}

impl ServerCertVerifier for SwappableVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.current.load_full() {
            Some(verifier) => verifier.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            None => Err(rustls::Error::General(
                "no CA certificates to verify the server with".into(),
            )),
        }
    }

    // Signatures are checked by the provider's algorithms, whichever anchors are in force.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client certificate presented when a server asks for one, replaceable.
struct SwappableIdentity(ArcSwapOption<CertifiedKey>);

impl fmt::Debug for SwappableIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SwappableIdentity")
    }
}

impl ResolvesClientCert for SwappableIdentity {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

/// TLS sessions for resumption, forgotten when the files rotate: a resumed session keeps the
/// identity and server verification of the handshake that made it.
#[derive(Debug)]
struct SwappableSessions(ArcSwap<ClientSessionMemoryCache>);

impl SwappableSessions {
    fn new() -> SwappableSessions {
        SwappableSessions(ArcSwap::from_pointee(ClientSessionMemoryCache::new(
            SESSIONS,
        )))
    }

    fn clear(&self) {
        self.0
            .store(Arc::new(ClientSessionMemoryCache::new(SESSIONS)));
    }
}

impl ClientSessionStore for SwappableSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.0.load().set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.0.load().kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.0.load().set_tls12_session(server_name, value)
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.0.load().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.0.load().remove_tls12_session(server_name)
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.0.load().insert_tls13_ticket(server_name, value)
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.0.load().take_tls13_ticket(server_name)
    }
}
