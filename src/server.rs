//! Wiring: the Pingora server with the data-plane listener and the policy watcher, the admin
//! port beside it, and SIGTERM draining.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

use crate::admin::{self, Admin, ControlAccess};
use crate::cache::{RedisTarget, L2};
use crate::listener::{ClientLimits, GuardedListener};
use crate::metrics::ReloadResult;
use crate::pipeline::auth::Verifier;
use crate::pipeline::Shared;
use crate::policy::files::{self, ReadError};
use crate::policy::{Policy, MAX_POLICY_FILE};
use crate::proxy::Bff;

/// Bytes a client connection's writes are gathered in before a syscall. Pingora's default
/// (1460, one segment) sends a response head and a body of a few KiB, such as an aggregated
/// answer, in separate writes; this size sends them in one. Only bodies of a known length are
/// held back: chunked and close-delimited ones (streams, server-sent events) are flushed at
/// every write whatever the size.
const CLIENT_WRITE_BUFFER: usize = 16 * 1024;

/// How often missing token keys are fetched again.
const KEY_RETRY: Duration = Duration::from_secs(2);

/// How often the policy file is compared with the one in force, and the upstreams' secret
/// files are read again. Polling the content (not inotify) also sees Kubernetes ConfigMap and
/// Secret updates, which swap a symlinked directory.
const POLICY_POLL: Duration = Duration::from_secs(1);

pub struct RunOptions {
    pub policy: PathBuf,
    pub listen: String,
    pub admin: String,
    /// The bearer token of the admin port's control endpoints.
    pub admin_token_file: Option<PathBuf>,
    pub threads: usize,
    /// Longest time SIGTERM waits for in-flight requests before the process exits.
    pub grace_period: Duration,
    /// The cache's L2, when there is one.
    pub redis: Option<RedisTarget>,
    /// Bounds on client connections and their request heads.
    pub client_limits: ClientLimits,
}

/// Runs the sidecar until SIGTERM (drain, then exit) or SIGINT (exit at once).
pub fn run(options: RunOptions, policy: Policy) -> ! {
    // Pingora retries a busy port for half a minute and then fails inside its runtime, leaving
    // a process that looks alive; a sidecar should fail at once and say why.
    if let Err(e) = std::net::TcpListener::bind(options.listen.as_str()) {
        fail(&format!(
            "cannot listen on {} (--listen): {e}",
            options.listen
        ));
    }
    let admin_listener = std::net::TcpListener::bind(options.admin.as_str()).unwrap_or_else(|e| {
        fail(&format!(
            "cannot listen on {} (--admin): {e}",
            options.admin
        ))
    });
    let control = admin_listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {} (--admin): {e}", options.admin))
        .and_then(|address| ControlAccess::new(options.admin_token_file.as_deref(), address))
        .unwrap_or_else(|e| fail(&e));
    if matches!(control, ControlAccess::Off) {
        tracing::warn!(admin = %options.admin, "no --admin-token-file and the admin port is not on loopback: /policy and DELETE /cache/… answer 403");
    }
    let conf = ServerConf {
        threads: options.threads.max(1),
        // Pingora waits this long after SIGTERM before stopping its runtimes; `DrainOnTerm`
        // exits earlier as soon as no request is in flight.
        grace_period_seconds: Some(options.grace_period.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let shared = Arc::new(Shared::new(policy));
    let app = pingora::proxy::http_proxy(
        &server.configuration,
        Bff {
            shared: shared.clone(),
        },
    );
    let mut proxy = Service::new(
        "bff".to_string(),
        GuardedListener::new(app, options.client_limits.clone(), shared.metrics.clone()),
    );
    proxy.add_listener(
        ListenerConfig::tcp(options.listen.as_str()).l4_buffer(L4BufferSettings {
            read: None,
            write: Some(CLIENT_WRITE_BUFFER),
        }),
    );

    // Outside Pingora's services: they stop at SIGTERM, and the probes and Prometheus must
    // still be answered while the data plane drains.
    let admin = Admin {
        shared: shared.clone(),
        control,
    };
    if let Err(e) = admin::spawn(admin_listener, admin) {
        fail(&e);
    }

    let watcher = background_service(
        "policy-watch",
        PolicyWatch {
            shared: shared.clone(),
            path: options.policy.clone(),
            listen: options.listen.clone(),
            redis: options.redis.clone(),
        },
    );

    server.add_service(proxy);
    server.add_service(watcher);
    info!(listen = %options.listen, admin = %options.admin, policy = %options.policy.display(), "bff starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnTerm {
            shared,
            grace_period: options.grace_period,
        }),
    });
    std::process::exit(0)
}

fn fail(message: &str) -> ! {
    error!("{message}");
    eprintln!("bff: {message}");
    std::process::exit(1)
}

/// Reloads the policy on SIGHUP and when the file's content changes. An invalid policy, or one
/// whose new token key source cannot be loaded, is refused and counted, and the one in force
/// keeps serving.
struct PolicyWatch {
    shared: Arc<Shared>,
    path: PathBuf,
    /// The data-plane address: the sidecar is not ready before it accepts connections there.
    listen: String,
    redis: Option<RedisTarget>,
}

impl PolicyWatch {
    async fn reload(&self, why: &str) {
        match Policy::load_off_loop(&self.path).await {
            Ok(policy) => match self.shared.install(policy).await {
                Ok(()) => {
                    self.shared.metrics.reloaded(ReloadResult::Ok);
                    info!(why, policy = %self.path.display(), "policy reloaded");
                }
                Err(e) => {
                    self.shared.metrics.reloaded(ReloadResult::Invalid);
                    error!(why, policy = %self.path.display(), errors = %e, "policy refused: its token keys cannot be loaded; the previous policy keeps serving");
                }
            },
            Err(e) => {
                self.shared.metrics.reloaded(ReloadResult::Invalid);
                error!(why, errors = %e, "policy refused; the previous policy keeps serving");
            }
        }
    }
}

impl PolicyWatch {
    /// The policy file's bytes, read off the async loop (see `policy::files`); `None` while it
    /// cannot be read. A file missing for a moment (a ConfigMap update) is normal; one that is
    /// too large or hangs is logged when that starts.
    async fn read_policy(&self, unreadable: &mut bool) -> Option<Vec<u8>> {
        match files::read_off_loop(&self.path, MAX_POLICY_FILE).await {
            Ok(bytes) => {
                *unreadable = false;
                Some(bytes)
            }
            Err(e) => {
                if !matches!(e, ReadError::Unreadable(_)) && !*unreadable {
                    error!(policy = %self.path.display(), error = %e, "policy file not read; the policy in force keeps serving");
                }
                *unreadable = true;
                None
            }
        }
    }
}

#[async_trait]
impl BackgroundService for PolicyWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGHUP; policy reload by signal is off");
                return;
            }
        };
        // L2's connection tasks live on this service's runtime, which lasts as long as the process.
        if let Some(target) = &self.redis {
            let client = self.shared.policy.load().client.clone();
            match L2::new(target, &client, &self.shared.metrics) {
                Ok(l2) => self.shared.cache.set_l2(l2),
                Err(e) => error!(error = %e, "the cache's L2 is off"),
            }
        }
        let mut policy_unreadable = false;
        let mut seen = self.read_policy(&mut policy_unreadable).await;
        // SIGHUP is handled now (its default would kill the process); Pingora retries a busy
        // port instead of failing, so readiness also waits for the listener to accept.
        while tokio::net::TcpStream::connect(&self.listen).await.is_err() {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        self.shared.ready.store(true, Ordering::SeqCst);
        let mut poll = tokio::time::interval(POLICY_POLL);
        // Token keys: loaded at once (readiness waits for them), retried every few seconds
        // while missing, refreshed on an interval once there (a failed refresh keeps them).
        let mut keys = tokio::time::interval(KEY_RETRY);
        let mut since_refresh = Duration::ZERO;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = keys.tick() => {
                    let active = self.shared.policy.load_full();
                    let Some(verifier) = &active.verifier else { continue };
                    since_refresh += KEY_RETRY;
                    if verifier.has_keys() && since_refresh < Verifier::REFRESH_INTERVAL {
                        continue;
                    }
                    since_refresh = Duration::ZERO;
                    if let Err(e) = verifier.load_keys().await {
                        if verifier.has_keys() {
                            error!(error = %e, "token keys not refreshed; the last good keys stay in use");
                        } else {
                            error!(error = %e, retry_in = ?KEY_RETRY, "no token keys yet: tokens are refused and /readyz fails until they load");
                        }
                    }
                }
                _ = hangup.recv() => {
                    seen = self.read_policy(&mut policy_unreadable).await;
                    self.reload("SIGHUP").await;
                }
                _ = poll.tick() => {
                    self.shared.policy.load().rate_limits.sweep();
                    let now = self.read_policy(&mut policy_unreadable).await;
                    if now.is_some() && now != seen {
                        seen = now;
                        self.reload("file changed").await;
                    }
                    // Mounted secrets rotate without the policy changing. Read on the
                    // blocking pool, each file within its time limit, so one that hangs holds
                    // up neither this loop nor the other files after its first timeout.
                    let active = self.shared.policy.load_full();
                    if let Err(e) = tokio::task::spawn_blocking(move || active.refresh_files()).await {
                        error!(error = %e, "re-reading the secret files failed");
                    }
                }
            }
        }
    }
}

/// SIGTERM: report not-ready, stop accepting, let in-flight requests finish, and exit as soon
/// as none is left (or when the grace period ends). SIGINT exits at once.
struct DrainOnTerm {
    shared: Arc<Shared>,
    grace_period: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnTerm {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            error!("cannot install signal handlers; SIGTERM will not drain");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => return ShutdownSignal::FastShutdown,
            _ = term.recv() => {}
            // No socket hand-over: a sidecar is replaced by its pod, so SIGQUIT drains too.
            _ = quit.recv() => {}
        }
        info!(grace_period = ?self.grace_period, "draining: no new connections, waiting for in-flight requests");
        self.shared.ready.store(false, Ordering::SeqCst);
        let in_flight = self.shared.in_flight.clone();
        let deadline = Instant::now() + self.grace_period;
        std::thread::spawn(move || {
            // A connection accepted just before the signal may not have created its request yet.
            std::thread::sleep(Duration::from_millis(200));
            while in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            info!(left = in_flight.load(Ordering::SeqCst), "drained; exiting");
            std::process::exit(0);
        });
        ShutdownSignal::GracefulTerminate
    }
}
