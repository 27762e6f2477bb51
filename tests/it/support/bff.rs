//! The real `bff` binary as a child process on free ports, with captured logs and a readiness wait.

use std::{
    ffi::OsString,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tempfile::NamedTempFile;

const READY_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

/// How to start `bff run`; see [`Bff::builder`].
pub struct BffBuilder {
    policy: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

impl BffBuilder {
    /// Listen on these addresses instead of free ports (e.g. to test a busy port).
    pub fn ports(mut self, listen: SocketAddr, admin: SocketAddr) -> Self {
        (self.listen, self.admin) = (Some(listen), Some(admin));
        self
    }

    /// Extra CLI argument after the defaults (e.g. `.arg("--threads").arg("1")`).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Spawns the process and waits until `GET /readyz` on the admin port answers 200.
    pub async fn start(self) -> Bff {
        let mut bff = self.spawn();
        bff.wait_ready().await;
        bff
    }

    /// Spawns the process without waiting for readiness (for tests of failing startups).
    pub fn spawn(self) -> Bff {
        // Hold both listeners while reading the ports so the two are distinct.
        let (l1, l2) = (free_listener(), free_listener());
        let listen = self.listen.unwrap_or_else(|| l1.local_addr().unwrap());
        let admin = self.admin.unwrap_or_else(|| l2.local_addr().unwrap());
        drop((l1, l2));

        let log = NamedTempFile::new().expect("create bff log file");
        let stdout = log.as_file().try_clone().unwrap();
        let stderr = log.as_file().try_clone().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bff"))
            .arg("run")
            .arg("--policy")
            .arg(&self.policy)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .args(&self.args)
            .envs(self.envs)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn bff binary");
        Bff {
            child,
            listen,
            admin,
            log,
            show_logs_on_panic: true,
        }
    }
}

/// A running `bff` child process; SIGKILLed on Drop (its logs are printed if the test panicked).
pub struct Bff {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    log: NamedTempFile,
    show_logs_on_panic: bool,
}

impl Bff {
    pub fn builder(policy: impl AsRef<Path>) -> BffBuilder {
        BffBuilder {
            policy: policy.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            listen: None,
            admin: None,
        }
    }

    /// `Bff::builder(policy).start()` with no extra arguments.
    pub async fn start(policy: impl AsRef<Path>) -> Bff {
        Self::builder(policy).start().await
    }

    /// Polls `/readyz` every 20 ms for up to 15 s; panics (with the logs) if bff exits or times out.
    pub async fn wait_ready(&mut self) {
        let url = self.admin_url("/readyz");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.fail(&format!(
                    "bff exited with {status} before {url} answered 200"
                ));
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "{url} did not answer 200 within {READY_TIMEOUT:?}"
                ));
            }
            let probe = super::http::try_send("GET", &url, &[], "");
            if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(1), probe).await {
                if reply.status == 200 {
                    return;
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn fail(&mut self, what: &str) -> ! {
        self.show_logs_on_panic = false;
        panic!("{what}\n----- bff logs -----\n{}-----", self.logs())
    }

    /// Proxy listener address.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://<listen><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    /// `http://<admin><path>`
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything bff wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.log.path()).unwrap_or_default()).into_owned()
    }

    /// Sends a signal by name (`"TERM"`, `"HUP"`, `"INT"`, ...) via `kill -s`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -s {name} {} failed: {status}",
            self.pid()
        );
    }

    /// Polls until the process exits; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Bff {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() && self.show_logs_on_panic {
            eprintln!(
                "----- bff logs (pid {}) -----\n{}-----",
                self.child.id(),
                self.logs()
            );
        }
    }
}

fn free_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port")
}
