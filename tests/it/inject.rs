//! `bff inject`: the real binary on realistic multi-document manifests, from a file and from
//! stdin. Every output is parsed back and checked field by field, and fed to a second run,
//! which must print it again byte for byte. Malformed and hostile inputs fail with the
//! document and line, never a crash.

use std::{
    fs,
    io::{Read, Seek, Write},
    os::unix::process::ExitStatusExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// Far above what an injection takes; only here so a hang fails the test instead of the suite.
const TIMEOUT: Duration = Duration::from_secs(60);

/// `bff inject ARGS` with `stdin` as its input; returns `(exit code, stdout, stderr)`.
fn inject(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut input = tempfile::tempfile().expect("temp file for stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    input.rewind().expect("rewind stdin");
    let mut out = tempfile::tempfile().expect("temp file for stdout");
    let mut err = tempfile::tempfile().expect("temp file for stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bff"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::from(input))
        .stdout(out.try_clone().expect("clone stdout"))
        .stderr(err.try_clone().expect("clone stderr"))
        .spawn()
        .expect("spawn bff inject");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for bff inject") {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`bff inject` did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |file: &mut fs::File| {
        let mut bytes = Vec::new();
        file.rewind().expect("rewind");
        file.read_to_end(&mut bytes).expect("read");
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let (stdout, stderr) = (read(&mut out), read(&mut err));
    if let Some(signal) = status.signal() {
        panic!("`bff inject` was killed by signal {signal}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    }
    (status.code().expect("an exit code"), stdout, stderr)
}

/// Injects `manifest` from a file with `args`, asserts success, that a second run over the
/// output changes nothing (byte for byte), and returns the parsed documents and stderr.
fn inject_file(manifest: &str, args: &[&str]) -> (Vec<Value>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("manifest.yaml");
    fs::write(&path, manifest).expect("write manifest");
    let path = path.to_str().expect("utf-8 path");
    let mut all_args = vec![path];
    all_args.extend_from_slice(args);
    let (code, stdout, stderr) = inject(&all_args, "");
    assert_eq!(code, 0, "stderr:\n{stderr}");
    assert_unchanged_on_second_run(&stdout, args);
    (parse(&stdout), stderr)
}

fn assert_unchanged_on_second_run(output: &str, args: &[&str]) {
    let mut again_args = vec!["-"];
    again_args.extend_from_slice(args);
    let (code, again, stderr) = inject(&again_args, output);
    assert_eq!(code, 0, "second run failed:\n{stderr}");
    assert_eq!(again, output, "the second run changed the output");
}

fn parse(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_str_multiple(yaml)
        .unwrap_or_else(|e| panic!("output is not YAML: {e}\n{yaml}"))
}

/// The pod template of a workload, or the Pod itself.
fn pod_of(object: &Value) -> &Value {
    if object["kind"] == "Pod" {
        object
    } else {
        &object["spec"]["template"]
    }
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|items| items.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

/// Asserts the pod carries the native sidecar with its defaults, before the app.
fn assert_native_sidecar(pod: &Value) {
    let spec = &pod["spec"];
    assert_eq!(
        names(&spec["initContainers"]).first(),
        Some(&"bff"),
        "{spec}"
    );
    assert!(!names(&spec["containers"]).contains(&"bff"), "{spec}");
    let bff = &spec["initContainers"][0];
    assert_eq!(bff["restartPolicy"], "Always");
    assert_eq!(bff["image"], bff::inject::DEFAULT_IMAGE);
    assert!(bff::inject::DEFAULT_IMAGE.starts_with("ghcr.io/bff-dev/bff:"));
    assert_sidecar_shape(bff, 8080, 9901, "policy.yaml");
    assert_policy_volume(spec, "bff-policy");
    assert_eq!(
        pod["metadata"]["annotations"]["bff.dev/injected"],
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        spec["terminationGracePeriodSeconds"].as_u64() >= Some(30),
        "{spec}"
    );
}

fn assert_sidecar_shape(bff: &Value, listen: u16, admin: u16, file: &str) {
    assert_eq!(
        bff["args"],
        json!([
            "run",
            "--policy",
            format!("/etc/bff/{file}"),
            "--listen",
            format!("0.0.0.0:{listen}"),
            "--admin",
            format!("0.0.0.0:{admin}"),
            "--admin-token-file",
            "/var/run/secrets/bff-admin/token"
        ])
    );
    let ports: Vec<&Value> = bff["ports"].as_array().expect("ports").iter().collect();
    assert_eq!(ports[0]["containerPort"], listen);
    assert_eq!(ports[1]["containerPort"], admin);
    assert_eq!(
        bff["livenessProbe"]["httpGet"],
        json!({ "path": "/healthz", "port": admin })
    );
    assert_eq!(
        bff["readinessProbe"]["httpGet"],
        json!({ "path": "/readyz", "port": admin })
    );
    assert_eq!(
        bff["volumeMounts"],
        json!([
            { "name": "bff-policy", "mountPath": "/etc/bff", "readOnly": true },
            { "name": "bff-admin-token", "mountPath": "/var/run/secrets/bff-admin", "readOnly": true }
        ])
    );
    assert_eq!(bff["securityContext"]["runAsNonRoot"], true);
    assert_eq!(bff["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(bff["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        bff["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert!(bff["resources"]["requests"]["memory"].is_string(), "{bff}");
    assert!(
        bff["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64() > Some(0),
        "{bff}"
    );
}

fn assert_policy_volume(spec: &Value, configmap: &str) {
    let volumes = spec["volumes"].as_array().expect("volumes");
    let policy: Vec<&Value> = volumes
        .iter()
        .filter(|v| v["name"] == "bff-policy")
        .collect();
    assert_eq!(
        policy,
        [&json!({ "name": "bff-policy", "configMap": { "name": configmap } })]
    );
    // The admin port is on the pod IP: its token comes from a Secret.
    let token: Vec<&Value> = volumes
        .iter()
        .filter(|v| v["name"] == "bff-admin-token")
        .collect();
    assert_eq!(
        token,
        [&json!({ "name": "bff-admin-token", "secret": { "secretName": "bff-admin-token" } })]
    );
}

const FRONTEND: &str = r#"# The web frontend: comments are not kept.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: { app: web }
spec:
  replicas: 3
  selector:
    matchLabels: { app: web }
  template:
    metadata:
      labels: { app: web, version: "1.10" }
    spec:
      terminationGracePeriodSeconds: 10
      containers:
        - name: app
          image: registry.example.com/web:1.10
          ports:
            - { name: http, containerPort: 3000 }
            - { name: debug, containerPort: 6060 }
          env:
            - { name: ENABLE_X, value: "true" }
            - { name: RATIO, value: "0.5" }
          volumeMounts: [{ name: certs, mountPath: /certs }]
      volumes:
        - name: certs
          secret: { secretName: web-certs, defaultMode: 0440 }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  selector: { app: web }
  ports:
    - { name: http, port: 80, targetPort: http }
    - { name: debug, port: 6060, targetPort: 6060 }
---
apiVersion: v1
kind: Service
metadata: { name: api, namespace: shop }
spec:
  selector: { app: api }
  ports: [{ name: http, port: 80, targetPort: 3000 }]
---
apiVersion: v1
kind: ConfigMap
metadata: { name: bff-policy, namespace: shop }
data:
  policy.yaml: |
    client: web
    routes: []
"#;

#[test]
fn deployment_service_and_configmap() {
    let (docs, stderr) = inject_file(FRONTEND, &[]);
    assert_eq!(docs.len(), 4);
    let pod = pod_of(&docs[0]);
    assert_native_sidecar(pod);
    assert_eq!(
        pod["spec"]["terminationGracePeriodSeconds"], 30,
        "raised from 10"
    );
    assert_eq!(names(&pod["spec"]["containers"]), ["app"]);
    assert_eq!(
        pod["spec"]["volumes"][0]["secret"]["defaultMode"], 0o440,
        "octal as Kubernetes reads it"
    );
    assert_eq!(
        pod["metadata"]["labels"]["version"], "1.10",
        "a string stays a string"
    );
    assert_eq!(pod["spec"]["containers"][0]["env"][0]["value"], "true");
    assert_eq!(docs[0]["spec"]["replicas"], 3);

    let web = &docs[1]["spec"]["ports"];
    assert_eq!(
        web[0]["targetPort"], 8080,
        "the app's named port moves to bff"
    );
    assert_eq!(web[1]["targetPort"], 6060, "other ports stay");
    assert_eq!(
        docs[2]["spec"]["ports"][0]["targetPort"], 3000,
        "selects nothing injected"
    );

    let input = parse(FRONTEND);
    assert_eq!(docs[3], input[3], "ConfigMap passes through");
    assert!(
        stderr.contains("deployment/web in shop: injected"),
        "{stderr}"
    );
    assert!(stderr.contains("service/web in shop: port 80"), "{stderr}");
}

#[test]
fn statefulset_daemonset_pod_and_list() {
    let manifest = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: cart }
spec:
  serviceName: cart
  selector: { matchLabels: { app: cart } }
  template:
    metadata: { labels: { app: cart } }
    spec:
      containers: [{ name: app, image: cart:1, ports: [{ containerPort: 3000 }] }]
  volumeClaimTemplates:
    - metadata: { name: data }
      spec: { accessModes: [ReadWriteOnce], resources: { requests: { storage: 1Gi } } }
---
apiVersion: apps/v1
kind: DaemonSet
metadata: { name: edge }
spec:
  selector: { matchLabels: { app: edge } }
  template:
    metadata: { labels: { app: edge } }
    spec:
      containers: [{ name: app, image: edge:1 }]
---
apiVersion: v1
kind: Pod
metadata: { name: debug, labels: { app: debug } }
spec:
  containers: [{ name: app, image: debug:1 }]
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: { name: mobile }
    spec:
      selector: { matchLabels: { app: mobile } }
      template:
        metadata: { labels: { app: mobile } }
        spec:
          containers: [{ name: app, image: mobile:1 }]
  - apiVersion: v1
    kind: Service
    metadata: { name: mobile }
    spec:
      selector: { app: mobile }
      ports: [{ port: 3000 }]
  - apiVersion: v1
    kind: Secret
    metadata: { name: token }
    stringData: { token: abc }
"#;
    let (docs, _) = inject_file(manifest, &[]);
    for doc in &docs[..3] {
        assert_native_sidecar(pod_of(doc));
    }
    assert_eq!(
        docs[0]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    let items = &docs[3]["items"];
    assert_native_sidecar(pod_of(&items[0]));
    assert_eq!(
        items[1]["spec"]["ports"][0]["targetPort"], 8080,
        "implicit targetPort = port"
    );
    assert_eq!(
        items[2],
        parse(manifest)[3]["items"][2],
        "Secret passes through"
    );
}

#[test]
fn already_injected_input_comes_out_byte_for_byte() {
    let (code, once, stderr) = inject(&["-"], FRONTEND);
    assert_eq!(code, 0, "{stderr}");
    let (code, twice, stderr) = inject(&["-"], &once);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(twice, once);
    assert!(
        stderr.contains("deployment/web in shop: already injected"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("port 80"),
        "the Service was already right: {stderr}"
    );
}

#[test]
fn opted_out_workloads_and_their_services_are_left_alone() {
    let manifest = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: legacy
  annotations: { bff.dev/inject: disabled }
spec:
  selector: { matchLabels: { app: legacy } }
  template:
    metadata: { labels: { app: legacy } }
    spec:
      containers: [{ name: app, image: legacy:1, ports: [{ containerPort: 3000 }] }]
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: admin }
spec:
  selector: { matchLabels: { app: admin } }
  template:
    metadata:
      labels: { app: admin }
      annotations: { bff.dev/inject: disabled }
    spec:
      containers: [{ name: app, image: admin:1 }]
---
apiVersion: v1
kind: Service
metadata: { name: legacy }
spec:
  selector: { app: legacy }
  ports: [{ port: 80, targetPort: 3000 }]
"#;
    let (docs, stderr) = inject_file(manifest, &[]);
    assert_eq!(docs, parse(manifest), "nothing changed");
    assert!(stderr.contains("deployment/legacy: skipped"), "{stderr}");
    assert!(stderr.contains("deployment/admin: skipped"), "{stderr}");
}

#[test]
fn classic_sidecar_with_custom_options() {
    let args = [
        "--classic",
        "--image",
        "registry.example.com/bff:0.1.0",
        "--policy-configmap",
        "web-policy",
        "--policy-file",
        "web.yaml",
        "--listen-port",
        "8081",
        "--admin-port",
        "9902",
        "--app-port",
        "3000",
        "--redis-url",
        "redis://redis.shop:6379",
    ];
    let (docs, _) = inject_file(FRONTEND, &args);
    let spec = &pod_of(&docs[0])["spec"];
    assert_eq!(names(&spec["containers"]), ["bff", "app"]);
    assert!(spec.get("initContainers").is_none(), "{spec}");
    let bff = &spec["containers"][0];
    assert!(bff.get("restartPolicy").is_none(), "{bff}");
    assert_eq!(bff["image"], "registry.example.com/bff:0.1.0");
    assert_sidecar_shape(bff, 8081, 9902, "web.yaml");
    assert_eq!(
        bff["env"],
        json!([{ "name": "BFF_REDIS_URL", "value": "redis://redis.shop:6379" }])
    );
    assert_policy_volume(spec, "web-policy");
    assert_eq!(docs[1]["spec"]["ports"][0]["targetPort"], 8081);
}

#[test]
fn reads_stdin_without_a_file_argument() {
    let (code, stdout, stderr) = inject(&[], FRONTEND);
    assert_eq!(code, 0, "{stderr}");
    assert_native_sidecar(pod_of(&parse(&stdout)[0]));
}

#[test]
fn malformed_yaml_names_the_document_and_line() {
    let manifest = "kind: ConfigMap\nmetadata: { name: a }\n---\nkind: Pod\nspec:\n  containers: [ { name: a\n";
    let (code, stdout, stderr) = inject(&["-"], manifest);
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty(), "nothing printed on failure: {stdout}");
    assert!(
        stderr.starts_with("bff inject: stdin: document 2, line "),
        "{stderr}"
    );
}

#[test]
fn a_document_that_is_not_an_object_is_refused() {
    let (code, _, stderr) = inject(&["-"], "kind: ConfigMap\n---\njust a string\n");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("document 2: expected a Kubernetes object (a mapping), found a string"),
        "{stderr}"
    );
}

#[test]
fn a_broken_workload_names_the_document_object_and_field() {
    let manifest = "kind: Deployment\nmetadata: { name: web }\nspec:\n  template:\n    spec: { containers: app }\n";
    let (code, _, stderr) = inject(&["-"], manifest);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "document 1 (deployment/web): spec.template.spec.containers: expected a list"
        ),
        "{stderr}"
    );
}

#[test]
fn bad_options_and_missing_files_are_refused() {
    let (code, _, stderr) = inject(&["-", "--listen-port", "3000"], FRONTEND);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("the listen and app ports must differ"),
        "{stderr}"
    );
    let (code, _, stderr) = inject(&["/nonexistent/manifest.yaml"], "");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot read /nonexistent/manifest.yaml"),
        "{stderr}"
    );
}

#[test]
fn hostile_inputs_fail_cleanly() {
    let deep = "[".repeat(100_000);
    let bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n\
                g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n";
    for input in [
        deep.as_str(),
        bomb,
        "\u{0}\u{1}binary",
        "kind: [",
        "- - -",
        "42",
    ] {
        let (code, _, stderr) = inject(&["-"], input);
        assert_eq!(
            code,
            1,
            "input {:?}: {stderr}",
            &input[..input.len().min(20)]
        );
        assert!(
            stderr.starts_with("bff inject: stdin: document 1"),
            "{stderr}"
        );
    }
}

#[test]
fn host_network_workloads_and_taken_ports_are_refused_unless_bff_ports_are_chosen() {
    let daemonset = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: { name: agent, namespace: ops }
spec:
  selector: { matchLabels: { app: agent } }
  template:
    metadata:
      labels: { app: agent }
    spec:
      hostNetwork: true
      containers: [{ name: agent, image: agent:1, ports: [{ name: http, containerPort: 3000 }] }]
---
apiVersion: v1
kind: Service
metadata: { name: agent, namespace: ops }
spec:
  selector: { app: agent }
  ports: [{ port: 80, targetPort: http }]
"#;
    let (code, stdout, stderr) = inject(&["-"], daemonset);
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("document 1 (daemonset/agent in ops): spec.template.spec.hostNetwork:"),
        "{stderr}"
    );
    assert!(stderr.contains("bff.dev/listen-port"), "{stderr}");

    // With both ports chosen, it is injected on them, declared as host ports, and the Service
    // is pointed at the chosen listen port.
    let chosen = daemonset.replace(
        "labels: { app: agent }\n    spec:",
        "labels: { app: agent }\n      annotations: { bff.dev/listen-port: \"18080\", \
         bff.dev/admin-port: \"19901\" }\n    spec:",
    );
    let (docs, _) = inject_file(&chosen, &[]);
    let bff = &pod_of(&docs[0])["spec"]["initContainers"][0];
    assert_sidecar_shape(bff, 18080, 19901, "policy.yaml");
    assert_eq!(bff["ports"][0]["hostPort"], 18080);
    assert_eq!(bff["ports"][1]["hostPort"], 19901);
    assert_eq!(docs[1]["spec"]["ports"][0]["targetPort"], 18080);

    // A native sidecar already on Envoy's admin port 9901 (bff's default admin port).
    let envoy = r#"
kind: Deployment
metadata: { name: web }
spec:
  template:
    spec:
      initContainers:
        - { name: envoy, image: envoy:1, restartPolicy: Always, ports: [{ containerPort: 9901 }] }
      containers: [{ name: app, image: web:1 }]
"#;
    let (code, _, stderr) = inject(&["-"], envoy);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("spec.template.spec.initContainers[0].ports: port 9901 is already used by container \"envoy\""),
        "{stderr}"
    );
    let (docs, _) = inject_file(envoy, &["--admin-port", "9902"]);
    assert_sidecar_shape(
        &pod_of(&docs[0])["spec"]["initContainers"][0],
        8080,
        9902,
        "policy.yaml",
    );
}
