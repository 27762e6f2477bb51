//! HTTPS and mutual TLS to upstreams: the loader's `tls` rules through `bff check`, and calls
//! through the real binary to a real TLS upstream (`support::tls`) with the fixtures of
//! `tests/fixtures/tls`: client certificates, untrusted servers, `server_name`, rotation of the
//! files the way Kubernetes swaps a mounted secret, and a `jwks_url` over https.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::check::{assert_rejected, assert_valid, bff_check, edit, insert, run, BASE};
use crate::support::metrics::metric;
use crate::support::tls::{fixture, TlsUpstream};
use crate::support::{http, write_policy, Bff, MockReply, MockServer, TempPolicy};

fn path(name: &str) -> String {
    fixture(name).display().to_string()
}

// ---------------------------------------------------------------------------------------------
// The loader: `bff check`
// ---------------------------------------------------------------------------------------------

/// `BASE` with a new, unreferenced upstream `billing` on lines 13–14 and its `tls` mapping on
/// the lines from 15 (`tls:` on 15, one key per line from 16 in the order given).
fn with_billing(url: &str, tls: &[(&str, &str)]) -> String {
    let mut text = format!("  billing:\n    url: {url}");
    if !tls.is_empty() {
        text.push_str("\n    tls:");
        for (key, value) in tls {
            text.push_str(&format!("\n      {key}: \"{value}\""));
        }
    }
    insert(BASE, 12, &text)
}

/// The column of a `tls` key's value in [`with_billing`].
fn column(key: &str) -> u64 {
    "      : \"".len() as u64 + key.len() as u64
}

fn mutual(ca: &str, cert: &str, key: &str) -> Vec<(&'static str, String)> {
    vec![("ca", path(ca)), ("cert", path(cert)), ("key", path(key))]
}

fn pairs<'a>(list: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    list.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn https_upstreams_load_with_or_without_tls_files() {
    assert_valid(&with_billing("https://billing.internal", &[]));
    assert_valid(&with_billing("https://billing.internal:8443/api", &[]));
    let mut all = mutual("ca.pem", "client-a.pem", "client-a.key");
    all.push(("server_name", "upstream.test".into()));
    assert_valid(&with_billing("https://127.0.0.1:9443", &pairs(&all)));
    // RSA as well as ECDSA keys; a CA alone; a client certificate alone (system roots).
    let rsa = mutual("ca.pem", "client-b.pem", "client-b.key");
    assert_valid(&with_billing("https://127.0.0.1:9443", &pairs(&rsa)));
    assert_valid(&with_billing(
        "https://127.0.0.1:9443",
        &[("ca", &path("ca.pem"))],
    ));
    assert_valid(&with_billing(
        "https://127.0.0.1:9443",
        &[
            ("cert", &path("client-a.pem")),
            ("key", &path("client-a.key")),
        ],
    ));
}

#[test]
fn tls_needs_an_https_url() {
    let yaml = with_billing("http://127.0.0.1:9103", &[("ca", &path("ca.pem"))]);
    assert_rejected(&yaml, 16, Some(7), "`tls` needs an https:// url");
}

#[test]
fn cert_and_key_go_together() {
    let cert_only = with_billing("https://127.0.0.1:9443", &[("cert", &path("client-a.pem"))]);
    assert_rejected(
        &cert_only,
        16,
        Some(7),
        "`tls.cert` and `tls.key` go together",
    );
    let key_only = with_billing("https://127.0.0.1:9443", &[("key", &path("client-a.key"))]);
    assert_rejected(
        &key_only,
        16,
        Some(7),
        "`tls.cert` and `tls.key` go together",
    );
}

#[test]
fn unreadable_tls_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.pem").display().to_string();
    let cases = [
        (mutual("ca.pem", "client-a.pem", "client-a.key"), 0),
        (mutual("ca.pem", "client-a.pem", "client-a.key"), 1),
        (mutual("ca.pem", "client-a.pem", "client-a.key"), 2),
    ];
    for (mut tls, at) in cases {
        tls[at].1 = absent.clone();
        let key = tls[at].0;
        let yaml = with_billing("https://127.0.0.1:9443", &pairs(&tls));
        let message = assert_rejected(&yaml, 16 + at as u64, Some(column(key)), "cannot read");
        assert!(message.contains(&format!("`tls.{key}`")), "{message}");
        assert!(message.contains(&absent), "{message}");
        assert!(message.contains("upstream `billing`"), "{message}");
    }
}

#[test]
fn garbage_tls_files_are_refused_without_quoting_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let file = dir.path().join(name);
        fs::write(&file, text).unwrap();
        file.display().to_string()
    };
    let secret_body = "c2VjcmV0LWtleS1tYXRlcmlhbC10aGF0LW11c3Qtbm90LWxlYWs=";
    let not_pem = write("not.pem", "hello, I am not a certificate\n");
    let bad_der = write(
        "bad-der.pem",
        "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
    );
    let bad_key = write(
        "bad.key",
        &format!("-----BEGIN PRIVATE KEY-----\n{secret_body}\n-----END PRIVATE KEY-----\n"),
    );
    let cases: [(usize, &str, &str); 6] = [
        (0, &not_pem, "holds no PEM certificate"),
        (0, &bad_der, "cannot be a trust anchor"),
        (1, &not_pem, "holds no PEM certificate"),
        (1, &bad_der, "not a usable certificate"),
        (2, &not_pem, "holds no PEM private key"),
        (2, &bad_key, "not a usable private key"),
    ];
    for (at, file, phrase) in cases {
        let mut tls = mutual("ca.pem", "client-a.pem", "client-a.key");
        tls[at].1 = file.to_string();
        let yaml = with_billing("https://127.0.0.1:9443", &pairs(&tls));
        let message = assert_rejected(&yaml, 16 + at as u64, Some(column(tls[at].0)), phrase);
        assert!(message.contains(file), "{message}");
        assert!(!message.contains(secret_body), "{message}");
    }
    // A key that is a key, but not the certificate's.
    let tls = mutual("ca.pem", "client-a.pem", "client-b.key");
    let yaml = with_billing("https://127.0.0.1:9443", &pairs(&tls));
    let message = assert_rejected(&yaml, 18, Some(12), "does not belong to the certificate");
    let key = fs::read_to_string(fixture("client-b.key")).unwrap();
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!message.contains(line), "{message}");
    }
}

#[test]
fn server_name_must_be_a_name() {
    let yaml = with_billing(
        "https://127.0.0.1:9443",
        &[("server_name", "not a host name!")],
    );
    assert_rejected(&yaml, 16, Some(20), "`tls.server_name` `not a host name!`");
}

#[test]
fn the_fallthrough_cannot_be_https() {
    // `users` is the fallthrough (line 39); Pingora proxies it and has no TLS.
    let yaml = edit(BASE, 9, "http://127.0.0.1:9101", "https://127.0.0.1:9101");
    let message = assert_rejected(&yaml, 39, Some(14), "`fallthrough` upstream `users`");
    assert!(message.contains("https://"), "{message}");
}

#[test]
fn tls_files_are_found_relative_to_the_policy_file() {
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("conf");
    fs::create_dir_all(conf.join("certs")).unwrap();
    for name in ["ca.pem", "client-a.pem", "client-a.key"] {
        fs::copy(fixture(name), conf.join("certs").join(name)).unwrap();
    }
    let yaml = with_billing(
        "https://127.0.0.1:9443",
        &[
            ("ca", "certs/ca.pem"),
            ("cert", "certs/client-a.pem"),
            ("key", "certs/client-a.key"),
        ],
    );
    fs::write(conf.join("policy.yaml"), yaml).unwrap();
    let mut cmd = bff_check();
    cmd.current_dir(root.path()).arg("conf/policy.yaml");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        (code, stdout.as_str(), stderr.trim()),
        (0, "conf/policy.yaml: ok\n", "")
    );
}

// ---------------------------------------------------------------------------------------------
// Calls through the real binary
// ---------------------------------------------------------------------------------------------

/// A `tls` mapping with the fixture `ca` and, when given, the client certificate `client`
/// (`client-a`, `client-b`), plus `extra` keys (`server_name: …`).
fn tls(ca: &str, client: Option<&str>, extra: &str) -> String {
    let mut keys = vec![format!("ca: \"{}\"", path(ca))];
    if let Some(client) = client {
        keys.push(format!("cert: \"{}\"", path(&format!("{client}.pem"))));
        keys.push(format!("key: \"{}\"", path(&format!("{client}.key"))));
    }
    if !extra.is_empty() {
        keys.push(extra.to_string());
    }
    format!("{{ {} }}", keys.join(", "))
}

/// Routes over the https upstream `secure` (`tls` as given) and the plain upstream `plain`.
fn policy(secure_url: &str, secure_tls: &str, plain_url: &str) -> String {
    format!(
        r#"client: web
upstreams:
  secure:
    url: "{secure_url}"
    timeout: 5s
    tls: {secure_tls}
  plain: {{ url: "{plain_url}", timeout: 5s }}
routes:
  - name: who
    method: GET
    path: /who
    fetch:
      who: {{ upstream: secure, path: /whoami, critical: true, fields: [cn, sni, path] }}
  - name: who-optional
    method: GET
    path: /who-optional
    fetch:
      who: {{ upstream: secure, path: /whoami, fields: [cn], fallback: {{}} }}
      plain: {{ upstream: plain, path: /plain, critical: true, fields: [ok] }}
  - name: proxied
    method: GET
    path: /items/{{id}}
    proxy: {{ upstream: secure, path: "/items/{{path.id}}", fields: [cn, path] }}
"#
    )
}

fn plain_upstream() -> MockServer {
    MockServer::start(|_| MockReply::json(200, json!({"ok": true, "other": 1})))
}

async fn start(yaml: &str) -> (Bff, TempPolicy) {
    let file = write_policy(yaml);
    let bff = Bff::builder(file.path())
        .env("BFF_LOG_FORMAT", "json")
        .start()
        .await;
    (bff, file)
}

/// `GET path`, the JSON body of a 200.
async fn get_ok(bff: &Bff, path: &str) -> Value {
    let reply = http::get(&bff.url(path)).await;
    assert_eq!(reply.status, 200, "GET {path}: {}", reply.text());
    reply.json()
}

async fn dependency_calls(bff: &Bff, route: &str, outcome: &str) -> f64 {
    metric(
        bff,
        "bff_dependency_requests_total",
        &[
            ("client", "web"),
            ("route", route),
            ("dependency", "who"),
            ("outcome", outcome),
        ],
    )
    .await
}

/// Both routes through `secure` fail as a dependency failure, and the sidecar keeps serving.
async fn assert_secure_calls_fail(bff: &Bff, upstream: &TlsUpstream) {
    let critical = http::get(&bff.url("/who")).await;
    assert_eq!(critical.status, 503, "{}", critical.text());
    assert_eq!(critical.json()["error"]["code"], "DEPENDENCY_UNAVAILABLE");
    let optional = get_ok(bff, "/who-optional").await;
    assert_eq!(optional["meta"]["degraded"], true, "{optional}");
    assert_eq!(optional["meta"]["degradedSections"], json!(["who"]));
    assert_eq!(optional["plain"], json!({"ok": true}));
    assert_eq!(dependency_calls(bff, "who", "error").await, 1.0);
    assert_eq!(dependency_calls(bff, "who-optional", "error").await, 1.0);
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    let ready = http::get(&bff.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_and_proxy_routes_present_the_client_certificate() {
    let upstream = TlsUpstream::builder().start();
    let plain = plain_upstream();
    let yaml = policy(
        &upstream.url(),
        &tls("ca.pem", Some("client-a"), ""),
        &plain.url(),
    );
    let (bff, _file) = start(&yaml).await;

    let body = get_ok(&bff, "/who").await;
    assert_eq!(
        body["who"],
        json!({"cn": "client-a", "sni": null, "path": "/whoami"}),
        "an IP address is verified against the certificate's IP SAN and sent without SNI"
    );
    let body = get_ok(&bff, "/items/7").await;
    assert_eq!(body, json!({"cn": "client-a", "path": "/items/7"}));
    let body = get_ok(&bff, "/who-optional").await;
    assert_eq!(body["meta"]["degraded"], false, "{body}");
    assert_eq!(body["who"], json!({"cn": "client-a"}));
    assert_eq!(
        body["plain"],
        json!({"ok": true}),
        "http:// upstreams still work"
    );

    let seen = upstream.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|s| s.cn.as_deref() == Some("client-a")));
    assert_eq!(dependency_calls(&bff, "who", "ok").await, 1.0);
    assert_eq!(
        upstream.connections(),
        1,
        "one pooled connection serves all three"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_signed_by_an_untrusted_ca_is_a_dependency_failure() {
    let upstream = TlsUpstream::builder().start();
    let plain = plain_upstream();
    let yaml = policy(
        &upstream.url(),
        &tls("other-ca.pem", Some("client-a"), ""),
        &plain.url(),
    );
    let (bff, _file) = start(&yaml).await;
    assert_secure_calls_fail(&bff, &upstream).await;
    let logs = bff.logs();
    assert!(logs.contains("UnknownIssuer"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_requires_a_client_certificate_refuses_a_sidecar_without_one() {
    let upstream = TlsUpstream::builder().start();
    let plain = plain_upstream();
    let yaml = policy(&upstream.url(), &tls("ca.pem", None, ""), &plain.url());
    let (bff, _file) = start(&yaml).await;
    assert_secure_calls_fail(&bff, &upstream).await;

    // The same policy against a server that only asks: no certificate is presented.
    let asking = TlsUpstream::builder().require_client_cert(false).start();
    let yaml = policy(&asking.url(), &tls("ca.pem", None, ""), &plain.url());
    let (bff, _file) = start(&yaml).await;
    let body = get_ok(&bff, "/who").await;
    assert_eq!(body["who"]["cn"], Value::Null, "{body}");
    assert_eq!(asking.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_replaces_the_url_host_for_sni_and_verification() {
    let upstream = TlsUpstream::builder().start();
    let plain = plain_upstream();
    let wrong = tls("ca.pem", Some("client-a"), "server_name: other.test");
    let (bff, _file) = start(&policy(&upstream.url(), &wrong, &plain.url())).await;
    // The URL's 127.0.0.1 is in the certificate, but the name checked is `other.test`.
    assert_secure_calls_fail(&bff, &upstream).await;
    assert!(
        bff.logs().contains("certificate not valid for name"),
        "{}",
        bff.logs()
    );

    let right = tls("ca.pem", Some("client-a"), "server_name: upstream.test");
    let (bff, _file) = start(&policy(&upstream.url(), &right, &plain.url())).await;
    let body = get_ok(&bff, "/who").await;
    assert_eq!(
        body["who"],
        json!({"cn": "client-a", "sni": "upstream.test", "path": "/whoami"})
    );
}

/// A directory laid out like a mounted Kubernetes secret: `tls.crt -> ..data/tls.crt`,
/// `tls.key -> ..data/tls.key`, `ca.crt -> ..data/ca.crt`, `..data -> ..genN`; `swap` writes a
/// new generation and renames a new `..data` symlink over the old one.
struct SecretDir {
    dir: TempDir,
    generation: AtomicUsize,
}

const SECRET_FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

impl SecretDir {
    fn new(cert: &[u8], key: &[u8], ca: &[u8]) -> SecretDir {
        let secret = SecretDir {
            dir: tempfile::tempdir().unwrap(),
            generation: AtomicUsize::new(0),
        };
        secret.swap(cert, key, ca);
        for name in SECRET_FILES {
            symlink(Path::new("..data").join(name), secret.file(name)).unwrap();
        }
        secret
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn swap(&self, cert: &[u8], key: &[u8], ca: &[u8]) {
        let dir = self.dir.path();
        let generation = format!("..gen{}", self.generation.fetch_add(1, Ordering::SeqCst));
        fs::create_dir(dir.join(&generation)).unwrap();
        for (name, content) in SECRET_FILES.into_iter().zip([cert, key, ca]) {
            fs::write(dir.join(&generation).join(name), content).unwrap();
        }
        let old = fs::read_link(dir.join("..data")).ok();
        symlink(&generation, dir.join("..data_tmp")).unwrap();
        fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if let Some(old) = old {
            fs::remove_dir_all(dir.join(old)).unwrap();
        }
    }

    /// The upstream `tls` mapping that reads this secret.
    fn tls(&self) -> String {
        format!(
            "{{ ca: \"{}\", cert: \"{}\", key: \"{}\" }}",
            self.file("ca.crt").display(),
            self.file("tls.crt").display(),
            self.file("tls.key").display()
        )
    }
}

fn read(name: &str) -> Vec<u8> {
    fs::read(fixture(name)).unwrap()
}

/// The JSON log lines (`BFF_LOG_FORMAT=json`) whose message is `message`.
fn log_lines(bff: &Bff, message: &str) -> Vec<Value> {
    bff.logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == message)
        .collect()
}

/// Waits (up to 10 s; the files are polled every second) until `count` lines say `message`.
async fn wait_for_log(bff: &Bff, message: &str, count: usize) -> Vec<Value> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = log_lines(bff, message);
        if lines.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < until,
            "no {count} log lines {message:?}:\n{}",
            bff.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn cn_of_a_new_connection(bff: &Bff, upstream: &TlsUpstream) -> Value {
    let before = upstream.connections();
    let body = get_ok(bff, "/who").await;
    assert_eq!(upstream.connections(), before + 1, "a new connection");
    body["who"]["cn"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_certificate_is_presented_on_new_connections() {
    // Every connection closes after one answer, so each call makes a new one.
    let upstream = TlsUpstream::builder().close_after_response().start();
    let plain = plain_upstream();
    let ca = read("ca.pem");
    let secret = SecretDir::new(&read("client-a.pem"), &read("client-a.key"), &ca);
    let (bff, _file) = start(&policy(&upstream.url(), &secret.tls(), &plain.url())).await;
    assert_eq!(cn_of_a_new_connection(&bff, &upstream).await, "client-a");

    // A broken key beside a good certificate: logged, naming the upstream and the file but
    // not the key, and client-a stays in use.
    let secret_body = "c2VjcmV0LWtleS1tYXRlcmlhbC10aGF0LW11c3Qtbm90LWxlYWs=";
    let garbage =
        format!("-----BEGIN PRIVATE KEY-----\n{secret_body}\n-----END PRIVATE KEY-----\n");
    secret.swap(&read("client-b.pem"), garbage.as_bytes(), &ca);
    let refused = wait_for_log(
        &bff,
        "TLS client key not reloaded; the previous certificate and key stay in use",
        1,
    )
    .await;
    assert_eq!(refused[0]["upstream"], "secure", "{}", refused[0]);
    assert_eq!(
        refused[0]["file"],
        secret.file("tls.key").display().to_string()
    );
    assert!(!bff.logs().contains(secret_body));
    assert_eq!(cn_of_a_new_connection(&bff, &upstream).await, "client-a");

    // A good pair: the next new connection presents client-b, without a restart.
    secret.swap(&read("client-b.pem"), &read("client-b.key"), &ca);
    wait_for_log(&bff, "TLS client certificate reloaded", 1).await;
    assert_eq!(cn_of_a_new_connection(&bff, &upstream).await, "client-b");
    assert_eq!(cn_of_a_new_connection(&bff, &upstream).await, "client-b");
    assert_eq!(
        log_lines(
            &bff,
            "TLS client key not reloaded; the previous certificate and key stay in use"
        )
        .len(),
        1,
        "a refused file is reported once, not at every poll"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_ca_bundle_is_used_by_new_connections() {
    let upstream = TlsUpstream::builder().close_after_response().start();
    let plain = plain_upstream();
    let (cert, key) = (read("client-a.pem"), read("client-a.key"));
    let secret = SecretDir::new(&cert, &key, &read("other-ca.pem"));
    let (bff, _file) = start(&policy(&upstream.url(), &secret.tls(), &plain.url())).await;
    let refused = http::get(&bff.url("/who")).await;
    assert_eq!(refused.status, 503, "{}", refused.text());

    secret.swap(&cert, &key, &read("ca.pem"));
    wait_for_log(&bff, "TLS CA certificates reloaded", 1).await;
    assert_eq!(cn_of_a_new_connection(&bff, &upstream).await, "client-a");

    secret.swap(&cert, &key, b"not a CA bundle\n");
    let refused = wait_for_log(
        &bff,
        "TLS CA file not reloaded; the previous one stays in use",
        1,
    )
    .await;
    assert_eq!(
        refused[0]["file"],
        secret.file("ca.crt").display().to_string()
    );
    assert_eq!(cn_of_a_new_connection(&bff, &upstream).await, "client-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_over_https_is_verified_against_the_system_trust_store() {
    let jwks = fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/jwt/jwks.json"
    ))
    .unwrap();
    let idp = TlsUpstream::builder()
        .require_client_cert(false)
        .body(jwks)
        .start();
    let yaml = format!(
        r#"client: mobile
auth:
  jwt:
    issuer: https://id.example.com/
    audience: mobile-app
    algorithms: [RS256, ES256]
    jwks_url: "https://localhost:{}/.well-known/jwks.json"
upstreams: {{ app: {{ url: "http://127.0.0.1:9" }} }}
fallthrough: app
"#,
        idp.addr().port()
    );
    let file = write_policy(&yaml);
    // The fixture CA as the system's store: ready means the keys came over verified TLS.
    let bff = Bff::builder(file.path())
        .env("SSL_CERT_FILE", fixture("ca.pem"))
        .start()
        .await;
    let seen = idp.seen();
    assert!(!seen.is_empty());
    assert_eq!(seen[0].path, "/.well-known/jwks.json");
    assert_eq!(seen[0].sni.as_deref(), Some("localhost"));
    drop(bff);

    // A store without the CA that signed the server: the keys are never fetched.
    let mut bff = Bff::builder(file.path())
        .env("SSL_CERT_FILE", fixture("other-ca.pem"))
        .spawn();
    let until = Instant::now() + Duration::from_secs(10);
    while !bff.logs().contains("UnknownIssuer") {
        assert!(Instant::now() < until, "{}", bff.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = http::get(&bff.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503, "not ready without keys");
    assert_eq!(
        idp.seen().len(),
        seen.len(),
        "no request after a failed handshake"
    );
    assert!(
        bff.wait_exit(Duration::ZERO).await.is_none(),
        "still running"
    );
}

/// Waits (up to 10 s) until `check` holds.
async fn eventually(what: &str, bff: &Bff, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < until, "{what}\n{}", bff.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_closes_the_pooled_connections_made_before_it() {
    // Keep-alive: without a rotation, every call reuses the one pooled connection.
    let upstream = TlsUpstream::builder().start();
    let plain = plain_upstream();
    let ca = read("ca.pem");
    let secret = SecretDir::new(&read("client-a.pem"), &read("client-a.key"), &ca);
    let (bff, _file) = start(&policy(&upstream.url(), &secret.tls(), &plain.url())).await;
    for _ in 0..3 {
        assert_eq!(get_ok(&bff, "/who").await["who"]["cn"], "client-a");
    }
    assert_eq!(upstream.connections(), 1, "pooled");

    // A new client certificate: the connection made with client-a is closed, and the next
    // call presents client-b on a new one (the old identity may have been revoked).
    secret.swap(&read("client-b.pem"), &read("client-b.key"), &ca);
    wait_for_log(&bff, "TLS client certificate reloaded", 1).await;
    eventually("the client-a connection is closed", &bff, || {
        upstream.closed() == 1
    })
    .await;
    assert_eq!(cn_of_a_new_connection(&bff, &upstream).await, "client-b");
    for _ in 0..3 {
        assert_eq!(get_ok(&bff, "/who").await["who"]["cn"], "client-b");
    }
    assert_eq!(upstream.connections(), 2, "pooled again after the rotation");

    // New trust anchors that no longer trust the server: the pooled connection verified with
    // the old ones goes too, so calls fail instead of going on over it.
    let (cert, key) = (read("client-b.pem"), read("client-b.key"));
    secret.swap(&cert, &key, &read("other-ca.pem"));
    wait_for_log(&bff, "TLS CA certificates reloaded", 1).await;
    eventually(
        "the connection verified with the old CA is closed",
        &bff,
        || upstream.closed() == 2,
    )
    .await;
    let refused = http::get(&bff.url("/who")).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let served = upstream.seen().len();
    assert_eq!(
        served, 7,
        "no call after the CA rotation reached the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_file_that_hangs_holds_up_neither_reloads_nor_rotation() {
    let upstream = TlsUpstream::builder().close_after_response().start();
    let plain = plain_upstream();
    let ca = read("ca.pem");
    let secret = SecretDir::new(&read("client-a.pem"), &read("client-a.key"), &ca);
    // `plain` carries a credential from the file `token`, beside the policy.
    let yaml = policy(&upstream.url(), &secret.tls(), &plain.url()).replace(
        "timeout: 5s }",
        "timeout: 5s, credential: { header: Authorization, value: \"Bearer ${file:token}\" } }",
    );
    let file = write_policy(&yaml);
    let token = file.dir().join("token");
    fs::write(&token, "good-token\n").unwrap();
    let bff = Bff::builder(file.path())
        .env("BFF_LOG_FORMAT", "json")
        .start()
        .await;
    assert_eq!(
        get_ok(&bff, "/who-optional").await["plain"],
        json!({"ok": true})
    );
    assert_eq!(cn_of_a_new_connection(&bff, &upstream).await, "client-a");

    // The token file becomes a FIFO nobody writes to: opening it blocks for good (as a read
    // from a hung NFS or CSI mount does).
    fs::remove_file(&token).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&token)
        .status()
        .unwrap();
    assert!(made.success());
    let stuck = wait_for_log(
        &bff,
        "cannot read the secret again; the last good value stays in use",
        1,
    )
    .await;
    assert!(
        stuck[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("did not finish within")),
        "{}",
        stuck[0]
    );

    // A policy change is still picked up (the hanging secret keeps its last good value)...
    file.rewrite(&yaml.replace("path: /items/{id}", "path: /things/{id}"));
    eventually("the changed policy is reloaded", &bff, || {
        log_lines(&bff, "policy reloaded").len() == 1
    })
    .await;
    let body = get_ok(&bff, "/things/7").await;
    assert_eq!(body, json!({"cn": "client-a", "path": "/items/7"}));
    // ...and so is SIGHUP...
    bff.signal("HUP");
    eventually("SIGHUP reloads the policy", &bff, || {
        log_lines(&bff, "policy reloaded").len() == 2
    })
    .await;
    // ...and a rotated client certificate.
    secret.swap(&read("client-b.pem"), &read("client-b.key"), &ca);
    wait_for_log(&bff, "TLS client certificate reloaded", 1).await;
    assert_eq!(cn_of_a_new_connection(&bff, &upstream).await, "client-b");

    // The calls that need the secret still carry its last good value.
    let optional = get_ok(&bff, "/who-optional").await;
    assert_eq!(optional["plain"], json!({"ok": true}));
    let last = plain.requests().pop().expect("a call");
    assert_eq!(last.header("authorization"), Some("Bearer good-token"));
    let hanging = [
        ("client", "web"),
        ("upstream", "plain"),
        ("key", "credential"),
        ("reason", "hanging"),
    ];
    assert!(metric(&bff, "bff_secret_file_failures_total", &hanging).await >= 1.0);
    assert_eq!(
        log_lines(&bff, "policy refused; the previous policy keeps serving").len(),
        0
    );
}
