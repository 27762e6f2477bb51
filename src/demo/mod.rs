//! `bff demo`: built-in mock services on loopback (the upstreams and the JWKS a policy names),
//! the sidecar in front of them as a child process, and ready-to-paste `curl` commands.
//!
//! The parts: `mocks` (the services and their control endpoint), `tokens` (the demo's
//! signing key, tokens, API key and the secrets the sidecar is given) and `banner` (what the
//! demo prints once the sidecar is ready, with the degradation walk-through).

mod banner;
mod mocks;
mod tokens;

use std::net::TcpListener as StdListener;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, Signal, SignalKind};

use banner::banner;
use mocks::{serve, Mock, MockServer};
use tokens::{demo_secret, DemoAuth};

/// How long the sidecar may take to answer `/readyz` with 200.
const READY_WITHIN: Duration = Duration::from_secs(10);

pub fn run(policy: &Path, listen: &str, admin: &str) -> ExitCode {
    match demo(policy, listen, admin) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bff demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(policy_path: &Path, listen: &str, admin: &str) -> Result<ExitCode, String> {
    let file = policy_path.display();
    let text =
        std::fs::read_to_string(policy_path).map_err(|e| format!("cannot read {file}: {e}"))?;
    // Read generically: the sidecar itself validates the policy, with the demo's credentials.
    let policy: Value = serde_saphyr::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    let mocks = bind_mocks(&policy)?;
    // Pingora retries a taken port instead of failing, so check the sidecar's two first.
    for (address, flag) in [(listen, "--listen"), (admin, "--admin")] {
        StdListener::bind(address)
            .map_err(|e| format!("cannot give the sidecar {address} ({flag}): {e}"))?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bff-demo-mock")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the mocks' runtime: {e}"))?;
    let (mut term, mut int) = {
        let _context = runtime.enter();
        let mut labels = Vec::new();
        for (label, mock, listener) in mocks {
            let listener = TcpListener::from_std(listener)
                .map_err(|e| format!("cannot serve the mock for {label}: {e}"))?;
            runtime.spawn(serve(listener, Arc::new(mock)));
            labels.push(label);
        }
        if !labels.is_empty() {
            println!("bff demo: mocks for {}", labels.join(", "));
        }
        // Handled, not fatal: the demo outlives Ctrl-C and SIGTERM to report how the sidecar ended.
        let handler = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        (
            handler(SignalKind::terminate())?,
            handler(SignalKind::interrupt())?,
        )
    };

    let mut command = Command::new(
        std::env::current_exe().map_err(|e| format!("cannot find the bff binary: {e}"))?,
    );
    command
        .arg("run")
        .arg("--policy")
        .arg(policy_path)
        .args(["--listen", listen, "--admin", admin]);
    // Credentials go to the child only: the demo's own environment is never changed.
    let mut secrets = Vec::new();
    env_refs(&policy, &mut secrets);
    secrets.sort();
    secrets.dedup();
    for name in &secrets {
        command.env(name, demo_secret(name));
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start the sidecar: {e}"))?;

    runtime.block_on(wait_ready(&mut child, admin))?;
    let auth = DemoAuth::for_policy(&policy, jsonwebtoken::get_current_timestamp());
    print!(
        "{}",
        banner(&policy, &file.to_string(), listen, admin, &secrets, &auth)
    );
    let status = runtime.block_on(supervise(&mut child, &mut term, &mut int))?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    })
}

/// Binds a mock on the address of every upstream with a known name, and of the JWKS.
fn bind_mocks(policy: &Value) -> Result<Vec<(String, MockServer, StdListener)>, String> {
    let mut mocks = Vec::new();
    let upstreams = policy.get("upstreams").and_then(Value::as_object);
    for (name, spec) in upstreams.into_iter().flatten() {
        let url = spec.get("url").and_then(Value::as_str).unwrap_or("");
        let Some(mock) = Mock::for_upstream(name) else {
            println!("bff demo: note: no built-in mock for upstream `{name}` ({url}); calls to it will fail");
            continue;
        };
        let listener = bind(&format!("upstream `{name}`"), url)?;
        mocks.push((
            format!("{name} {url}"),
            MockServer::new(name, mock),
            listener,
        ));
    }
    if let Some(url) = policy.pointer("/auth/jwt/jwks_url").and_then(Value::as_str) {
        let path = url
            .parse::<http::Uri>()
            .map_or_else(|_| "/".into(), |u| u.path().into());
        let listener = bind("the JWKS", url)?;
        mocks.push((
            format!("JWKS {url}"),
            MockServer::new("jwks", Mock::Jwks(path)),
            listener,
        ));
    }
    Ok(mocks)
}

fn bind(what: &str, url: &str) -> Result<StdListener, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{what}: `{url}` is not a URL: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{what}: `{url}` has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let listener = StdListener::bind((host, port)).map_err(|e| {
        format!("cannot start the mock for {what} on {host}:{port}: {e} (is another demo or service using port {port}?)")
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("mock for {what}: {e}"))?;
    Ok(listener)
}

/// Every `${env:NAME}` the policy uses.
fn env_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.extend(
            s.split("${env:")
                .skip(1)
                .filter_map(|rest| rest.split_once('}'))
                .map(|(name, _)| name.to_string()),
        ),
        Value::Array(items) => items.iter().for_each(|v| env_refs(v, out)),
        Value::Object(map) => map.values().for_each(|v| env_refs(v, out)),
        _ => {}
    }
}

/// Polls the admin port until `/readyz` answers 200, the child exits, or time runs out.
async fn wait_ready(child: &mut Child, admin: &str) -> Result<(), String> {
    let deadline = Instant::now() + READY_WITHIN;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "the sidecar exited ({status}) before it was ready; its log is above"
            ));
        }
        if readyz(admin).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!(
        "the sidecar was not ready within {READY_WITHIN:?} (http://{admin}/readyz); stopped it"
    ))
}

async fn readyz(admin: &str) -> bool {
    let check = async {
        let mut stream = TcpStream::connect(admin).await.ok()?;
        let request = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        // Read the whole answer: hanging up early makes the admin port log a reset.
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        Some(answer.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Some(true))
    )
}

/// Waits for the sidecar to exit. Ctrl-C reaches it straight from the terminal (same process
/// group); SIGTERM sent to the demo alone is passed on, so the sidecar drains and exits too.
async fn supervise(
    child: &mut Child,
    term: &mut Signal,
    int: &mut Signal,
) -> Result<ExitStatus, String> {
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        tokio::select! {
            _ = term.recv() => {
                let pid = child.id().to_string();
                let sent = Command::new("kill").args(["-s", "TERM", &pid]).status();
                if !sent.is_ok_and(|s| s.success()) {
                    let _ = child.kill();
                }
            }
            _ = int.recv() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
