//! A TLS upstream for tests: tokio-rustls on loopback serving the fixtures of
//! `tests/fixtures/tls` (`gen.sh`), requiring a client certificate or not. It answers every
//! request with JSON naming the client certificate's CN, the SNI name and the path (or with a
//! fixed body), and can close each connection after one response to force new connections.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde_json::json;
use tokio::{net::TcpListener, task::AbortHandle};
use tokio_rustls::TlsAcceptor;
use x509_cert::der::Decode;

/// `tests/fixtures/tls/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The CN of the client certificate, `None` when the client presented none.
    pub cn: Option<String>,
    /// The name the client sent in SNI (none for an IP address).
    pub sni: Option<String>,
    pub path: String,
}

#[derive(Default)]
struct State {
    seen: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
    closed: AtomicUsize,
    handshake_failures: AtomicUsize,
}

/// How to start a [`TlsUpstream`].
pub struct TlsUpstreamBuilder {
    require_client_cert: bool,
    close_after_response: bool,
    body: Option<Bytes>,
}

impl TlsUpstreamBuilder {
    /// Whether a handshake without a client certificate (signed by the fixture CA) fails.
    /// Default: required. Without it a client certificate is still asked for and checked.
    pub fn require_client_cert(mut self, required: bool) -> Self {
        self.require_client_cert = required;
        self
    }

    /// Closes every connection after its first response (`Connection: close`).
    pub fn close_after_response(mut self) -> Self {
        self.close_after_response = true;
        self
    }

    /// Answers every request with this JSON body instead of what it saw.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Must be called inside a tokio runtime.
    pub fn start(self) -> TlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(fixture("ca.pem")).expect("fixture CA") {
            roots.add(cert.expect("fixture CA")).expect("fixture CA");
        }
        let clients =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let clients = if self.require_client_cert {
            clients
        } else {
            clients.allow_unauthenticated()
        }
        .build()
        .expect("client verifier");
        let chain = CertificateDer::pem_file_iter(fixture("server.pem"))
            .expect("fixture server certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("fixture server certificate");
        let key = PrivateKeyDer::from_pem_file(fixture("server.key")).expect("fixture server key");
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_client_cert_verifier(clients)
            .with_single_cert(chain, key)
            .expect("server certificate and key");
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind TLS upstream");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = TcpListener::from_std(listener).expect("a tokio runtime");
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept_loop(
            listener,
            acceptor,
            state.clone(),
            Arc::new(self),
        ));
        TlsUpstream {
            addr,
            state,
            task: task.abort_handle(),
        }
    }
}

/// An HTTPS upstream on `127.0.0.1:0` with the fixture server certificate; stopped on Drop.
pub struct TlsUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: AbortHandle,
}

impl TlsUpstream {
    pub fn builder() -> TlsUpstreamBuilder {
        TlsUpstreamBuilder {
            require_client_cert: true,
            close_after_response: false,
            body: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Every request answered so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Connections that ended after a successful handshake (closed by either side).
    pub fn closed(&self) -> usize {
        self.state.closed.load(Ordering::SeqCst)
    }

    /// Connections whose TLS handshake failed.
    pub fn handshake_failures(&self) -> usize {
        self.state.handshake_failures.load(Ordering::SeqCst)
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    options: Arc<TlsUpstreamBuilder>,
) {
    // Connection tasks end with the accept loop: they are in this set, dropped on abort.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let (acceptor, state, options) = (acceptor.clone(), state.clone(), options.clone());
        connections.spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                state.handshake_failures.fetch_add(1, Ordering::SeqCst);
                return;
            };
            let session = tls.get_ref().1;
            let cn = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| common_name(cert));
            let sni = session.server_name().map(str::to_string);
            let keep_alive = !options.close_after_response;
            let served = state.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let seen = Seen {
                    cn: cn.clone(),
                    sni: sni.clone(),
                    path: request.uri().path().to_string(),
                };
                state.seen.lock().unwrap().push(seen.clone());
                let body = options.body.clone().unwrap_or_else(|| {
                    Bytes::from(
                        json!({"cn": seen.cn, "sni": seen.sni, "path": seen.path}).to_string(),
                    )
                });
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(body))
                            .unwrap(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(keep_alive)
                .serve_connection(TokioIo::new(tls), service)
                .await;
            served.closed.fetch_add(1, Ordering::SeqCst);
        });
        while connections.try_join_next().is_some() {}
    }
}

/// The CN of a DER certificate's subject.
fn common_name(der: &CertificateDer<'_>) -> String {
    let cert =
        x509_cert::Certificate::from_der(der).expect("the verifier accepted a valid certificate");
    let subject = cert.tbs_certificate.subject.to_string();
    subject
        .split(',')
        .find_map(|part| part.strip_prefix("CN="))
        .unwrap_or_else(|| panic!("no CN in {subject}"))
        .to_string()
}
