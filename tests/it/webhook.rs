//! `bff webhook`: the real binary over real TLS (the fixture CA of `tests/fixtures/tls`),
//! answering AdmissionReview v1 requests for each case; the returned JSON Patch is applied to
//! the pod with `json-patch` to show the sidecar.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::{json, Value};
use tempfile::{NamedTempFile, TempDir};
use tokio_rustls::TlsConnector;

use crate::support::tls::fixture;

const DEADLINE: Duration = Duration::from_secs(15);

/// `bff webhook` on a free loopback port; SIGKILLed on Drop.
struct Webhook {
    child: Child,
    addr: SocketAddr,
    log: NamedTempFile,
}

impl Webhook {
    async fn start(cert: &Path, key: &Path, extra: &[&str]) -> Webhook {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bff"))
            .args(["webhook", "--listen", &addr.to_string()])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["--image", "registry.test/bff:9.9"])
            .args(["--policy-configmap", "web-policy"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.as_file().try_clone().unwrap())
            .stderr(log.as_file().try_clone().unwrap())
            .spawn()
            .expect("spawn bff webhook");
        let mut webhook = Webhook { child, addr, log };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = webhook.child.try_wait().unwrap() {
                panic!("bff webhook exited with {status}:\n{}", webhook.logs());
            }
            if let Ok(reply) = webhook.try_send("GET", "/healthz", Bytes::new()).await {
                assert_eq!(reply.status, 200, "{}", reply.text());
                return webhook;
            }
            assert!(
                Instant::now() < deadline,
                "bff webhook not healthy within {DEADLINE:?}:\n{}",
                webhook.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn start_with_fixtures(extra: &[&str]) -> Webhook {
        Self::start(&fixture("server.pem"), &fixture("server.key"), extra).await
    }

    fn logs(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.log.path()).unwrap_or_default()).into_owned()
    }

    async fn try_send(&self, method: &str, path: &str, body: Bytes) -> Result<Reply, String> {
        exchange(self.addr, method, path, body).await
    }

    async fn send(&self, method: &str, path: &str, body: impl Into<Bytes>) -> Reply {
        self.try_send(method, path, body.into())
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// POSTs the review to `path`; the answer's `response`, checked to be a v1 AdmissionReview.
    async fn review(&self, path: &str, review: &Value) -> Value {
        let reply = self.send("POST", path, review.to_string()).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let answer: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        answer["response"].clone()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    body: Bytes,
    /// The leaf certificate the server presented.
    server_cert: CertificateDer<'static>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn roots() -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in ["ca.pem", "other-ca.pem"] {
        for cert in CertificateDer::pem_file_iter(fixture(ca)).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    Arc::new(roots)
}

/// One request on a new TLS connection that verifies the server as `localhost` against the
/// fixture CAs.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<Reply, String> {
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots())
            .with_no_client_auth();
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0]
            .clone()
            .into_owned();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(conn);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{method} {path}: reading the body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status,
            body,
            server_cert,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| format!("{method} {path} timed out"))?
}

/// Writes raw bytes on a new TLS connection and returns what comes back until the server
/// closes or goes quiet for a second.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots())
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    // The server may answer and close before it has read everything: a failed write is fine.
    let _ = tls.write_all(bytes).await;
    let _ = tls.flush().await;
    let mut reply = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), tls.read(&mut buffer)).await
    {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8_lossy(&reply).into_owned()
}

fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-7d9f-", "namespace": "shop",
                     "labels": {"app": "web"}, "annotations": annotations},
        "spec": {
            "initContainers": [{"name": "migrate", "image": "web:1", "args": ["migrate"]}],
            "containers": [{"name": "web", "image": "web:1"}],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    })
}

fn admission_review(uid: &str, object: Value) -> Value {
    let kind = object["kind"].as_str().unwrap_or("Pod").to_string();
    let (group, version, resource) = match kind.as_str() {
        "Pod" => ("", "v1", "pods"),
        "Deployment" => ("apps", "v1", "deployments"),
        _ => ("", "v1", "configmaps"),
    };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    })
}

/// The pod with the response's JSON Patch applied.
fn apply(response: &Value, pod: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("a base64 patch"))
        .expect("the patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("an RFC 6902 patch");
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies to the pod");
    patched
}

fn assert_injected(patched: &Value, original: &Value) {
    let init = patched["spec"]["initContainers"].as_array().unwrap();
    let sidecar = init
        .iter()
        .find(|c| c["name"] == "bff")
        .unwrap_or_else(|| panic!("no bff init container: {patched}"));
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["image"], "registry.test/bff:9.9");
    // The app's own containers and volumes are all still there.
    assert!(init.iter().any(|c| c["name"] == "migrate"), "{patched}");
    assert_eq!(
        patched["spec"]["containers"],
        original["spec"]["containers"]
    );
    let volumes = patched["spec"]["volumes"].as_array().unwrap();
    assert!(volumes.iter().any(|v| v["name"] == "tmp"), "{patched}");
    assert!(
        volumes
            .iter()
            .any(|v| v["configMap"]["name"] == "web-policy"),
        "{patched}"
    );
    assert_eq!(
        patched["metadata"]["annotations"]["bff.dev/injected"],
        env!("CARGO_PKG_VERSION"),
        "{patched}"
    );
    assert_eq!(
        patched["metadata"]["labels"],
        original["metadata"]["labels"]
    );
}

#[tokio::test]
async fn an_annotated_pod_gets_the_sidecar_through_a_json_patch() {
    let webhook = Webhook::start_with_fixtures(&[]).await;
    let pod = pod(json!({"bff.dev/inject": "enabled", "team": "a/b~c"}));
    for path in ["/mutate-annotated", "/mutate"] {
        let response = webhook
            .review(path, &admission_review("6f0c-1", pod.clone()))
            .await;
        assert_eq!(response["uid"], "6f0c-1");
        assert_eq!(response["allowed"], true);
        let patched = apply(&response, &pod);
        assert_injected(&patched, &pod);
        assert_eq!(patched["metadata"]["annotations"]["team"], "a/b~c");
        // Applying the mutation twice changes nothing: the patched pod is left alone.
        let again = webhook
            .review(path, &admission_review("6f0c-2", patched))
            .await;
        assert_eq!(again, json!({"uid": "6f0c-2", "allowed": true}));
    }
}

#[tokio::test]
async fn a_pod_in_an_opted_in_namespace_is_injected_without_the_annotation() {
    let webhook = Webhook::start_with_fixtures(&[]).await;
    let pod = pod(json!({}));
    let response = webhook
        .review("/mutate", &admission_review("ns-1", pod.clone()))
        .await;
    assert_injected(&apply(&response, &pod), &pod);

    // No annotations object at all: the patch creates it.
    let mut bare = pod.clone();
    bare["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let response = webhook
        .review("/mutate", &admission_review("ns-2", bare.clone()))
        .await;
    assert_injected(&apply(&response, &bare), &bare);

    // Through the other webhook (namespace not opted in), it is left alone.
    let response = webhook
        .review("/mutate-annotated", &admission_review("ns-3", pod))
        .await;
    assert_eq!(response, json!({"uid": "ns-3", "allowed": true}));
}

#[tokio::test]
async fn opted_out_injected_and_non_pod_objects_are_allowed_untouched() {
    let webhook = Webhook::start_with_fixtures(&[]).await;
    let cases = [
        ("off", pod(json!({"bff.dev/inject": "disabled"}))),
        ("done", pod(json!({"bff.dev/injected": "true"}))),
        (
            "deploy",
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "web", "annotations": {"bff.dev/inject": "enabled"}},
                   "spec": {"template": {"spec": {"containers": []}}}}),
        ),
        (
            "cm",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "x", "annotations": {"bff.dev/inject": "enabled"}}}),
        ),
    ];
    for (uid, object) in cases {
        for path in ["/mutate", "/mutate-annotated"] {
            let response = webhook
                .review(path, &admission_review(uid, object.clone()))
                .await;
            assert_eq!(response, json!({"uid": uid, "allowed": true}), "{path}");
        }
    }
    // An UPDATE of an annotated pod is not a create: left alone.
    let mut update = admission_review("upd", pod(json!({"bff.dev/inject": "enabled"})));
    update["request"]["operation"] = json!("UPDATE");
    let response = webhook.review("/mutate", &update).await;
    assert_eq!(response, json!({"uid": "upd", "allowed": true}));
}

#[tokio::test]
async fn malformed_requests_get_a_clear_error() {
    let webhook = Webhook::start_with_fixtures(&[]).await;
    let cases = [
        ("{not json", "not JSON"),
        (
            r#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#,
            "admission.k8s.io/v1",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            "`request`",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#,
            "`uid`",
        ),
        ("[1,2,3]", "not an AdmissionReview"),
    ];
    for (body, says) in cases {
        let reply = webhook.send("POST", "/mutate", body).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        assert!(reply.text().contains(says), "{body}: {}", reply.text());
    }

    // Over 1 MiB, declared: refused before the body is read.
    let head = "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                content-length: 1048577\r\n\r\n{";
    let reply = raw_exchange(webhook.addr, head.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // Over 1 MiB, chunked (no length announced): refused once the limit is passed.
    let review = admission_review(
        "big",
        pod(json!({"bff.dev/inject": "enabled",
                                                    "filler": "x".repeat(1 << 20)})),
    )
    .to_string();
    let mut chunked = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\n{:x}\r\n",
        review.len()
    )
    .into_bytes();
    chunked.extend_from_slice(review.as_bytes());
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let reply = raw_exchange(webhook.addr, &chunked).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");

    assert_eq!(webhook.send("GET", "/mutate", "").await.status, 405);
    assert_eq!(webhook.send("GET", "/nope", "").await.status, 404);
    // Still serving after all that.
    assert_eq!(webhook.send("GET", "/healthz", "").await.status, 200);
}

#[tokio::test]
async fn a_pod_that_cannot_be_injected_follows_the_failure_policy() {
    let mut broken = pod(json!({"bff.dev/inject": "enabled"}));
    broken["spec"]["volumes"] = json!("not a list");

    let open = Webhook::start_with_fixtures(&[]).await;
    let response = open
        .review("/mutate", &admission_review("fo", broken.clone()))
        .await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap()
            .contains("spec.volumes"),
        "{response}"
    );

    let closed = Webhook::start_with_fixtures(&["--failure-policy", "fail"]).await;
    let response = closed
        .review("/mutate", &admission_review("fc", broken))
        .await;
    assert_eq!(response["uid"], "fc");
    assert_eq!(response["allowed"], false);
    assert!(
        response["status"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.volumes"),
        "{response}"
    );
}

#[tokio::test]
async fn a_missing_or_mismatched_certificate_stops_startup_with_the_file_named() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("tls.crt");
    let output = Command::new(env!("CARGO_BIN_EXE_bff"))
        .args(["webhook", "--listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(&missing)
        .arg("--key")
        .arg(fixture("server.key"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tls.crt"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_bff"))
        .args(["webhook", "--listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(fixture("server.pem"))
        .arg("--key")
        .arg(fixture("client-a.key"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not belong"), "{stderr}");
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
}

/// A serving certificate for localhost signed by the fixtures' unrelated CA, made with openssl.
fn second_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (key, csr, cert, ext) = (
        dir.join("new.key"),
        dir.join("new.csr"),
        dir.join("new.pem"),
        dir.join("new.ext"),
    );
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let path = |p: &Path| p.to_str().unwrap().to_string();
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &path(&key),
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &path(&key),
        "-subj",
        "/CN=webhook.rotated",
        "-out",
        &path(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &path(&csr),
        "-CA",
        &path(&fixture("other-ca.pem")),
        "-CAkey",
        &path(&fixture("other-ca.key")),
        "-CAcreateserial",
        "-CAserial",
        &path(&dir.join("ca.srl")),
        "-days",
        "2",
        "-sha256",
        "-extfile",
        &path(&ext),
        "-out",
        &path(&cert),
    ]);
    (cert, key)
}

fn first_cert(path: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_rotated_certificate_is_served_on_new_connections() {
    let dir = TempDir::new().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(fixture("server.pem"), &cert).unwrap();
    std::fs::copy(fixture("server.key"), &key).unwrap();
    let webhook = Webhook::start(&cert, &key, &["--cert-reload-interval", "100ms"]).await;
    let before = webhook.send("GET", "/healthz", "").await;
    assert_eq!(before.server_cert, first_cert(&fixture("server.pem")));

    // Half a rotation (a new certificate, the old key) is not taken: the old pair still serves.
    let (new_cert, new_key) = second_certificate(dir.path());
    let staged = dir.path().join("staged");
    std::fs::copy(&new_cert, &staged).unwrap();
    std::fs::rename(&staged, &cert).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !webhook.logs().contains("does not load") {
        assert!(
            Instant::now() < deadline,
            "the mismatched pair was not noticed within {DEADLINE:?}:\n{}",
            webhook.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let half = webhook.send("GET", "/healthz", "").await;
    assert_eq!(half.server_cert, first_cert(&fixture("server.pem")));

    std::fs::copy(&new_key, &staged).unwrap();
    std::fs::rename(&staged, &key).unwrap();
    let want = first_cert(&new_cert);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = webhook.send("GET", "/healthz", "").await;
        if reply.server_cert == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not served within {DEADLINE:?}:\n{}",
            webhook.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        webhook.logs().contains("renewed serving certificate"),
        "{}",
        webhook.logs()
    );
}

/// `deploy/k8s/injector/NAME`, parsed.
fn manifest(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/k8s/injector")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn the_manifests_send_pods_to_paths_the_webhook_serves_as_they_say() {
    let config = manifest("mutatingwebhookconfiguration.yaml");
    let webhooks = config["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 2);
    let webhook = Webhook::start_with_fixtures(&[]).await;
    let plain = pod(json!({}));
    let annotated = pod(json!({"bff.dev/inject": "enabled"}));
    for entry in webhooks {
        assert_eq!(entry["admissionReviewVersions"], json!(["v1"]));
        assert_eq!(entry["sideEffects"], "None");
        assert_eq!(entry["failurePolicy"], "Ignore");
        assert_eq!(entry["clientConfig"]["service"]["name"], "bff-injector");
        let path = entry["clientConfig"]["service"]["path"].as_str().unwrap();
        let opted_in_namespace = entry["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["key"] == "bff.dev/inject" && e["operator"] == "In");
        // An annotated pod is injected through either webhook; an unannotated one only through
        // the namespace opt-in's.
        let response = webhook
            .review(path, &admission_review("a", annotated.clone()))
            .await;
        assert_injected(&apply(&response, &annotated), &annotated);
        let response = webhook
            .review(path, &admission_review("p", plain.clone()))
            .await;
        assert_eq!(
            response.get("patch").is_some(),
            opted_in_namespace,
            "{path}: {response}"
        );
    }

    // The Deployment's arguments are ones `bff webhook` takes, and its port is the Service's
    // target.
    let deployment = manifest("deployment.yaml");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "webhook");
    let output = Command::new(env!("CARGO_BIN_EXE_bff"))
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(container["ports"][0]["name"], "https");
    let service = manifest("service.yaml");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "https");
    assert_eq!(service["spec"]["ports"][0]["port"], 443);
}

/// `VmRSS` or `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A TLS connection that has sent a review's head declaring 1 MiB and all of the body but its
/// last byte, then falls silent; `None` when the server closed it before that.
async fn hold_a_body(
    addr: SocketAddr,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio::io::AsyncWriteExt as _;
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots())
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        bff::webhook::MAX_BODY
    );
    tls.write_all(head.as_bytes()).await.ok()?;
    tls.write_all(&vec![b' '; bff::webhook::MAX_BODY - 1])
        .await
        .ok()?;
    tls.flush().await.ok()?;
    Some(tls)
}

/// What a held connection reads until the server closes it, or `None` if it is still open
/// at `deadline`.
async fn closed_by(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    deadline: Instant,
) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut reply = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tls.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&reply).into_owned()),
            Ok(Ok(n)) => reply.extend_from_slice(&buffer[..n]),
        }
    }
}

#[tokio::test]
async fn held_bodies_are_cut_off_at_the_deadline_and_connections_are_capped() {
    let webhook =
        Webhook::start_with_fixtures(&["--request-timeout", "2s", "--max-connections", "16"]).await;
    let pid = webhook.child.id();
    let before = memory_kib(pid, "VmRSS");

    // 100 clients hold a nearly complete 1 MiB body each: unbounded, that is ~100 MiB buffered.
    let attempts = futures::future::join_all((0..100).map(|_| hold_a_body(webhook.addr))).await;
    let mut held: Vec<_> = attempts.into_iter().flatten().collect();
    assert!(
        !held.is_empty(),
        "no connection was served:\n{}",
        webhook.logs()
    );

    // Each is answered 408 and closed once the deadline passes (2 s; generous for a loaded CI).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut timed_out = 0;
    for tls in &mut held {
        let reply = closed_by(tls, deadline)
            .await
            .unwrap_or_else(|| panic!("a held body is still open after 20 s:\n{}", webhook.logs()));
        timed_out += usize::from(reply.starts_with("HTTP/1.1 408"));
    }
    assert!(timed_out >= 1, "no held body was answered 408");
    assert!(
        timed_out <= 16,
        "{timed_out} bodies were read at once, over --max-connections 16"
    );
    // Logged once, not once per connection closed.
    let logs = webhook.logs();
    assert_eq!(logs.matches("at --max-connections").count(), 1, "{logs}");

    // At most 16 bodies were ever buffered at once: the peak stays far below the ~100 MiB the
    // 100 connections would hold without the cap.
    let peak = memory_kib(pid, "VmHWM");
    let grown_mib = peak.saturating_sub(before) / 1024;
    assert!(
        grown_mib < 60,
        "the webhook grew by {grown_mib} MiB (RSS before {before} kB, peak {peak} kB)"
    );

    // And it still answers reviews.
    let pod = pod(json!({"bff.dev/inject": "enabled"}));
    let response = webhook
        .review("/mutate", &admission_review("after", pod.clone()))
        .await;
    assert_injected(&apply(&response, &pod), &pod);
}

#[tokio::test]
async fn a_held_body_is_cut_off_by_the_default_deadline() {
    let webhook = Webhook::start_with_fixtures(&[]).await;
    let started = Instant::now();
    let mut tls = hold_a_body(webhook.addr).await.expect("served");
    let reply = closed_by(&mut tls, started + Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("a held body is still open after 30 s:\n{}", webhook.logs()));
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    // The default is 10 s: not cut off early.
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn pods_the_sidecar_cannot_join_are_allowed_without_it_and_with_a_warning() {
    let webhook = Webhook::start_with_fixtures(&[]).await;
    let mut host_network = pod(json!({"bff.dev/inject": "enabled"}));
    host_network["spec"]["hostNetwork"] = json!(true);
    let mut envoy_admin = pod(json!({"bff.dev/inject": "enabled"}));
    envoy_admin["spec"]["initContainers"] = json!([
        {"name": "migrate", "image": "web:1"},
        {"name": "envoy", "image": "envoy:1", "restartPolicy": "Always",
         "ports": [{"containerPort": 9901}]},
    ]);
    let mut app_port = pod(json!({"bff.dev/inject": "enabled"}));
    app_port["spec"]["containers"][0]["ports"] = json!([{"containerPort": 8080}]);
    let cases = [
        ("host", host_network.clone(), "spec.hostNetwork"),
        (
            "envoy",
            envoy_admin,
            "spec.initContainers[1].ports: port 9901",
        ),
        ("app", app_port, "spec.containers[0].ports: port 8080"),
    ];
    for (uid, pod, reason) in cases {
        let response = webhook.review("/mutate", &admission_review(uid, pod)).await;
        assert_eq!(response["allowed"], true, "{uid}: {response}");
        assert!(response.get("patch").is_none(), "{uid}: {response}");
        let warning = response["warnings"][0].as_str().unwrap_or_default();
        assert!(
            warning.starts_with("bff webhook: cannot inject the bff sidecar:")
                && warning.contains(reason),
            "{uid}: {response}"
        );
        // The API server may cut warnings longer than 256 characters.
        assert!(
            warning.len() <= 256,
            "{uid}: {} characters: {warning}",
            warning.len()
        );
    }

    // A hostNetwork pod that chooses bff's ports is injected on them, as host ports.
    let annotations = &mut host_network["metadata"]["annotations"];
    annotations["bff.dev/listen-port"] = json!("18080");
    annotations["bff.dev/admin-port"] = json!("19901");
    let response = webhook
        .review(
            "/mutate",
            &admission_review("host-ports", host_network.clone()),
        )
        .await;
    let patched = apply(&response, &host_network);
    assert_injected(&patched, &host_network);
    let sidecar = &patched["spec"]["initContainers"][0];
    assert_eq!(
        sidecar["ports"],
        json!([
            {"name": "bff-http", "containerPort": 18080, "protocol": "TCP", "hostPort": 18080},
            {"name": "bff-admin", "containerPort": 19901, "protocol": "TCP", "hostPort": 19901},
        ])
    );
    assert_eq!(sidecar["args"][4], "0.0.0.0:18080");
}

/// A localhost serving certificate signed by the fixture CA that expired in 2020 (`openssl ca`
/// is what sets a validity in the past).
fn expired_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (key, csr, cert, config) = (
        dir.join("expired.key"),
        dir.join("expired.csr"),
        dir.join("expired.pem"),
        dir.join("ca.cnf"),
    );
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "01\n").unwrap();
    std::fs::write(
        &config,
        format!(
            "[ca]\ndefault_ca = ca_default\n[ca_default]\ndatabase = {dir}/index.txt\n\
             new_certs_dir = {dir}\nserial = {dir}/serial\ndefault_md = sha256\n\
             policy = any\n[any]\ncommonName = supplied\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &path(&key),
        ],
        vec![
            "req",
            "-new",
            "-key",
            &path(&key),
            "-subj",
            "/CN=localhost",
            "-out",
            &path(&csr),
        ],
        vec![
            "ca",
            "-batch",
            "-notext",
            "-config",
            &path(&config),
            "-cert",
            &path(&fixture("ca.pem")),
            "-keyfile",
            &path(&fixture("ca.key")),
            "-in",
            &path(&csr),
            "-out",
            &path(&cert),
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200102000000Z",
        ],
    ] {
        let output = Command::new("openssl")
            .args(&args)
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (cert, key)
}

#[tokio::test]
async fn an_expired_certificate_is_refused_at_start_and_on_rotation_warned_about_once() {
    let dir = TempDir::new().unwrap();
    let (expired_cert, expired_key) = expired_certificate(dir.path());
    let output = Command::new(env!("CARGO_BIN_EXE_bff"))
        .args(["webhook", "--listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(&expired_cert)
        .arg("--key")
        .arg(&expired_key)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("expired.pem: the certificate expired at 2020-01-02"),
        "{stderr}"
    );

    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(fixture("server.pem"), &cert).unwrap();
    std::fs::copy(fixture("server.key"), &key).unwrap();
    let webhook = Webhook::start(&cert, &key, &["--cert-reload-interval", "100ms"]).await;
    let staged = dir.path().join("staged");
    for (from, to) in [(&expired_key, &key), (&expired_cert, &cert)] {
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, to).unwrap();
    }
    let deadline = Instant::now() + DEADLINE;
    while !webhook.logs().contains("expired at") {
        assert!(
            Instant::now() < deadline,
            "the expired certificate was not noticed within {DEADLINE:?}:\n{}",
            webhook.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Twenty more checks of the same files: no new warning, and the old pair still serves.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs = webhook.logs();
    assert_eq!(logs.matches("expired at").count(), 1, "{logs}");
    let reply = webhook.send("GET", "/healthz", "").await;
    assert_eq!(reply.server_cert, first_cert(&fixture("server.pem")));

    // Unreadable files are reported once too.
    std::fs::remove_file(&cert).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs = webhook.logs();
    assert_eq!(logs.matches("cannot read the serving").count(), 1, "{logs}");
    assert_eq!(
        webhook.send("GET", "/healthz", "").await.server_cert,
        first_cert(&fixture("server.pem"))
    );
}
