//! Sidecar injection: the pod mutation shared by `bff inject` (YAML in, YAML out) and the
//! admission webhook (which diffs a pod before and after [`inject_pod`] into a JSON Patch).
//!
//! Kubernetes objects are plain `serde_json::Value`s (with `preserve_order`, so nothing is
//! reordered); only the fields the sidecar needs are read or written, everything else passes
//! through untouched. A pod carrying [`INJECTED_ANNOTATION`] (or already holding a container
//! named `bff`) is left as it is, which makes injection idempotent.

use serde_json::{json, Map, Value};

/// Pod (template) annotation written on injection; its value is the injecting bff's version.
pub const INJECTED_ANNOTATION: &str = "bff.dev/injected";
/// Workload or pod annotation that opts out with the value [`INJECT_DISABLED`] (and, for the
/// webhook, opts in with `enabled`).
pub const INJECT_ANNOTATION: &str = "bff.dev/inject";
pub const INJECT_DISABLED: &str = "disabled";
/// Name of the sidecar container.
pub const CONTAINER_NAME: &str = "bff";
/// Name of the volume holding the policy ConfigMap.
pub const POLICY_VOLUME: &str = "bff-policy";
/// Where the policy ConfigMap is mounted. A whole-directory mount (not `subPath`) so that a
/// ConfigMap update reaches the file through the kubelet's symlink swap and bff reloads it.
pub const POLICY_DIR: &str = "/etc/bff";
/// The Secret holding the admin port's bearer token (key `token`), its volume, and where it
/// is mounted: a directory mount, so a rotated Secret reaches bff, which re-reads the file.
pub const ADMIN_TOKEN_SECRET: &str = "bff-admin-token";
pub const ADMIN_TOKEN_VOLUME: &str = "bff-admin-token";
pub const ADMIN_TOKEN_DIR: &str = "/var/run/secrets/bff-admin";
/// Pod (template) annotations that set bff's data-plane and admin ports for that pod, over
/// the options (`--listen-port`, `--admin-port` of `bff inject`; 8080 and 9901 in the webhook).
/// A `hostNetwork` pod is injected only when it sets both (see [`inject_pod`]).
pub const LISTEN_PORT_ANNOTATION: &str = "bff.dev/listen-port";
pub const ADMIN_PORT_ANNOTATION: &str = "bff.dev/admin-port";
/// Port names of the sidecar (at most 15 characters, as Kubernetes requires).
pub const HTTP_PORT_NAME: &str = "bff-http";
pub const ADMIN_PORT_NAME: &str = "bff-admin";
/// The preStop sleep: time for the endpoints controller and the load balancers to stop
/// sending new connections before bff receives SIGTERM and starts draining.
pub const PRESTOP_SLEEP_SECONDS: u64 = 5;
/// bff's own drain after SIGTERM (`bff run --grace-period`, default 20 s).
pub const DRAIN_SECONDS: u64 = 20;
/// The pod's `terminationGracePeriodSeconds` is raised to at least this: the preStop sleep,
/// the drain, and a margin so the kubelet never kills bff mid-drain.
pub const MIN_TERMINATION_GRACE_SECONDS: u64 = PRESTOP_SLEEP_SECONDS + DRAIN_SECONDS + 5;
/// Default sidecar image.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/bff-dev/bff:", env!("CARGO_PKG_VERSION"));

/// Native sidecar (an `initContainers` entry with `restartPolicy: Always`, Kubernetes ≥ 1.29)
/// or classic (the first of the pod's `containers`, for older clusters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    Native,
    Classic,
}

/// What the sidecar looks like; [`Default`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    pub image: String,
    /// Name of the ConfigMap holding the policy file.
    pub policy_configmap: String,
    /// Key (file name) of the policy inside the ConfigMap.
    pub policy_file: String,
    /// Data-plane port of bff: Services are pointed at it.
    pub listen_port: u16,
    /// Admin port: probes and metrics.
    pub admin_port: u16,
    /// Port the app container serves on: Service ports targeting it are moved to bff.
    pub app_port: u16,
    pub mode: SidecarMode,
    /// Passed to bff as `BFF_REDIS_URL` (the shared L2 cache); written into the pod spec as is.
    pub redis_url: Option<String>,
}

impl Default for InjectOptions {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_string(),
            policy_configmap: "bff-policy".to_string(),
            policy_file: "policy.yaml".to_string(),
            listen_port: 8080,
            admin_port: 9901,
            app_port: 3000,
            mode: SidecarMode::Native,
            redis_url: None,
        }
    }
}

impl InjectOptions {
    /// Refuses options that would produce a pod Kubernetes rejects or a sidecar that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.image.trim().is_empty() {
            return Err("the image must not be empty".to_string());
        }
        if !is_dns_subdomain(&self.policy_configmap) {
            return Err(format!(
                "policy ConfigMap name {:?} is not a valid Kubernetes name (lower-case \
                 letters, digits, '-' and '.', at most 253 characters)",
                self.policy_configmap
            ));
        }
        if self.policy_file.is_empty()
            || self.policy_file.contains('/')
            || self.policy_file.starts_with("..")
        {
            return Err(format!(
                "policy file {:?} must be a plain file name (a key of the ConfigMap)",
                self.policy_file
            ));
        }
        let ports = [
            ("listen", self.listen_port),
            ("admin", self.admin_port),
            ("app", self.app_port),
        ];
        for (i, (name, port)) in ports.iter().enumerate() {
            if *port == 0 {
                return Err(format!("the {name} port must not be 0"));
            }
            for (other, other_port) in &ports[i + 1..] {
                if port == other_port {
                    return Err(format!(
                        "the {name} and {other} ports must differ (both {port})"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// The outcome of [`inject_pod`].
#[derive(Debug, Clone, PartialEq)]
pub enum Injection {
    /// The mutated pod (template); everything not named here is as it was.
    Injected(Value),
    /// The pod carries [`INJECTED_ANNOTATION`] or a container named `bff`: nothing to do.
    AlreadyInjected,
    /// The pod is annotated `bff.dev/inject: disabled`.
    OptedOut,
}

/// A pod that cannot be injected: `path` is the field inside the pod (template), e.g.
/// `spec.containers[1].ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for PodError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for PodError {}

fn pod_error(path: impl Into<String>, message: impl Into<String>) -> PodError {
    PodError {
        path: path.into(),
        message: message.into(),
    }
}

/// Injects the sidecar into a pod template (`{metadata, spec}` of a workload's
/// `spec.template`) or a whole Pod object (same shape; other fields pass through).
///
/// Adds the `bff` container (native or classic), the `bff-policy` volume from the ConfigMap,
/// raises `terminationGracePeriodSeconds` to [`MIN_TERMINATION_GRACE_SECONDS`] and sets
/// [`INJECTED_ANNOTATION`]. Callers that should honour an opt-out on the owning workload check
/// that themselves (see [`is_opted_out`]).
///
/// Refused (an error naming the field), since the sidecar could not run there:
/// - a pod whose containers, init containers or native sidecars already declare bff's listen
///   or admin port (bff would fail to bind in the shared network namespace);
/// - a `hostNetwork: true` pod that does not set both [`LISTEN_PORT_ANNOTATION`] and
///   [`ADMIN_PORT_ANNOTATION`]: bff would bind the default ports on the node, clashing with
///   every other such pod on it and putting the admin port on the node's addresses. With both
///   set, the sidecar declares them as `hostPort`s too, so the scheduler never places two pods
///   needing them on one node.
pub fn inject_pod(pod: &Value, options: &InjectOptions) -> Result<Injection, PodError> {
    let Some(pod_map) = pod.as_object() else {
        return Err(pod_error(
            "(pod)",
            format!("expected a mapping, found {}", type_name(pod)),
        ));
    };
    if is_opted_out(pod) {
        return Ok(Injection::OptedOut);
    }
    if annotation(pod, INJECTED_ANNOTATION).is_some() {
        return Ok(Injection::AlreadyInjected);
    }
    let spec = match pod_map.get("spec") {
        Some(Value::Object(spec)) => spec,
        Some(other) => {
            return Err(pod_error(
                "spec",
                format!("expected a mapping, found {}", type_name(other)),
            ))
        }
        None => return Err(pod_error("spec", "missing")),
    };
    let containers = list_field(spec, "containers", "spec.containers")?;
    let init_containers = list_field(spec, "initContainers", "spec.initContainers")?;
    if containers.is_empty() {
        return Err(pod_error("spec.containers", "the pod has no containers"));
    }
    for (field, list) in [
        ("containers", &containers),
        ("initContainers", &init_containers),
    ] {
        for (i, container) in list.iter().enumerate() {
            if !container.is_object() {
                return Err(pod_error(
                    format!("spec.{field}[{i}]"),
                    format!("expected a mapping, found {}", type_name(container)),
                ));
            }
            if container.get("name").and_then(Value::as_str) == Some(CONTAINER_NAME) {
                return Ok(Injection::AlreadyInjected);
            }
        }
    }
    let options = &pod_options(pod, options)?;
    let host_network = match spec.get("hostNetwork") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(on)) => *on,
        Some(other) => {
            return Err(pod_error(
                "spec.hostNetwork",
                format!("expected a boolean, found {}", type_name(other)),
            ))
        }
    };
    if host_network
        && (port_annotation(pod, LISTEN_PORT_ANNOTATION).is_none()
            || port_annotation(pod, ADMIN_PORT_ANNOTATION).is_none())
    {
        return Err(pod_error(
            "spec.hostNetwork",
            format!(
                "a hostNetwork pod shares the node's ports: bff's {} and {} could clash and \
                 the admin port would be on the node; set the annotations \
                 {LISTEN_PORT_ANNOTATION} and {ADMIN_PORT_ANNOTATION}",
                options.listen_port, options.admin_port
            ),
        ));
    }
    // A port another container already declares would make bff fail to bind inside the
    // shared network namespace: refuse rather than produce a crash-looping pod. Ordinary init
    // containers have exited before a classic sidecar starts; a native bff runs beside them.
    for (field, list) in [
        ("containers", &containers),
        ("initContainers", &init_containers),
    ] {
        for (i, container) in list.iter().enumerate() {
            let runs_beside_bff = field == "containers"
                || options.mode == SidecarMode::Native
                || container.get("restartPolicy").and_then(Value::as_str) == Some("Always");
            if !runs_beside_bff {
                continue;
            }
            for port in container_ports(container) {
                if port == options.listen_port || port == options.admin_port {
                    return Err(pod_error(
                        format!("spec.{field}[{i}].ports"),
                        format!(
                            "port {port} is already used by container {:?}; move bff with \
                             the annotations {LISTEN_PORT_ANNOTATION} and \
                             {ADMIN_PORT_ANNOTATION}",
                            container.get("name").and_then(Value::as_str).unwrap_or(""),
                        ),
                    ));
                }
            }
        }
    }
    let volumes = list_field(spec, "volumes", "spec.volumes")?;
    if let Some(taken) = volumes
        .iter()
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .find(|name| [POLICY_VOLUME, ADMIN_TOKEN_VOLUME].contains(name))
    {
        return Err(pod_error(
            "spec.volumes",
            format!("a volume named {taken:?} already exists"),
        ));
    }

    let mut out = pod.clone();
    let Some(out_map) = out.as_object_mut() else {
        return Err(pod_error("(pod)", "expected a mapping"));
    };
    let metadata = object_entry(out_map, "metadata").map_err(|m| pod_error("metadata", m))?;
    let annotations =
        object_entry(metadata, "annotations").map_err(|m| pod_error("metadata.annotations", m))?;
    annotations.insert(
        INJECTED_ANNOTATION.to_string(),
        Value::String(env!("CARGO_PKG_VERSION").to_string()),
    );

    let spec = object_entry(out_map, "spec").map_err(|m| pod_error("spec", m))?;
    let mut sidecar = sidecar_container(options);
    if host_network {
        // Declared, so the scheduler keeps two pods needing the same node ports apart.
        let ports = sidecar.get_mut("ports").and_then(Value::as_array_mut);
        for port in ports.into_iter().flatten() {
            if let Some(port) = port.as_object_mut() {
                let number = port.get("containerPort").cloned().unwrap_or(Value::Null);
                port.insert("hostPort".to_string(), number);
            }
        }
    }
    match options.mode {
        SidecarMode::Native => {
            // First, so it is up before any later init container or the app talks through it.
            let init = array_entry(spec, "initContainers")
                .map_err(|m| pod_error("spec.initContainers", m))?;
            init.insert(0, sidecar);
        }
        SidecarMode::Classic => {
            let containers =
                array_entry(spec, "containers").map_err(|m| pod_error("spec.containers", m))?;
            containers.insert(0, sidecar);
        }
    }
    let volumes = array_entry(spec, "volumes").map_err(|m| pod_error("spec.volumes", m))?;
    volumes.push(json!({
        "name": POLICY_VOLUME,
        "configMap": { "name": options.policy_configmap },
    }));
    volumes.push(json!({
        "name": ADMIN_TOKEN_VOLUME,
        "secret": { "secretName": ADMIN_TOKEN_SECRET },
    }));
    let grace = spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_u64);
    if grace.is_none_or(|g| g < MIN_TERMINATION_GRACE_SECONDS) {
        spec.insert(
            "terminationGracePeriodSeconds".to_string(),
            json!(MIN_TERMINATION_GRACE_SECONDS),
        );
    }
    Ok(Injection::Injected(out))
}

/// `options` with the ports the pod's [`LISTEN_PORT_ANNOTATION`] and
/// [`ADMIN_PORT_ANNOTATION`] choose, checked as the options are.
pub fn pod_options(pod: &Value, options: &InjectOptions) -> Result<InjectOptions, PodError> {
    let mut chosen = options.clone();
    let mut annotated = false;
    for (name, port) in [
        (LISTEN_PORT_ANNOTATION, &mut chosen.listen_port),
        (ADMIN_PORT_ANNOTATION, &mut chosen.admin_port),
    ] {
        let Some(value) = port_annotation(pod, name) else {
            continue;
        };
        // A number too: `bff inject` reads YAML, where an unquoted 18080 is one.
        let number = match value {
            Value::String(text) => text.trim().parse::<u16>().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        };
        *port = number.filter(|p| *p != 0).ok_or_else(|| {
            pod_error(
                format!("metadata.annotations.{name}"),
                format!("{value} is not a port number (1-65535)"),
            )
        })?;
        annotated = true;
    }
    if annotated {
        chosen
            .validate()
            .map_err(|m| pod_error("metadata.annotations", m))?;
    }
    Ok(chosen)
}

/// The `bff` container as injected.
pub fn sidecar_container(options: &InjectOptions) -> Value {
    let mut container = json!({
        "name": CONTAINER_NAME,
        "image": options.image,
        "args": [
            "run",
            "--policy", format!("{POLICY_DIR}/{}", options.policy_file),
            "--listen", format!("0.0.0.0:{}", options.listen_port),
            "--admin", format!("0.0.0.0:{}", options.admin_port),
            // The admin port is on the pod IP: its control endpoints need this token.
            "--admin-token-file", format!("{ADMIN_TOKEN_DIR}/token"),
        ],
        "ports": [
            { "name": HTTP_PORT_NAME, "containerPort": options.listen_port, "protocol": "TCP" },
            { "name": ADMIN_PORT_NAME, "containerPort": options.admin_port, "protocol": "TCP" },
        ],
        "livenessProbe": {
            "httpGet": { "path": "/healthz", "port": options.admin_port },
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": { "path": "/readyz", "port": options.admin_port },
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "resources": {
            "requests": { "cpu": "50m", "memory": "64Mi" },
            "limits": { "memory": "256Mi" },
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "lifecycle": {
            "preStop": { "sleep": { "seconds": PRESTOP_SLEEP_SECONDS } },
        },
        "volumeMounts": [
            { "name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": true },
            { "name": ADMIN_TOKEN_VOLUME, "mountPath": ADMIN_TOKEN_DIR, "readOnly": true },
        ],
    });
    if let Some(map) = container.as_object_mut() {
        if let Some(url) = &options.redis_url {
            map.insert(
                "env".to_string(),
                json!([{ "name": "BFF_REDIS_URL", "value": url }]),
            );
        }
        if options.mode == SidecarMode::Native {
            // Insert after "image" so the field sits where people look for it.
            let mut ordered = Map::new();
            for (key, value) in std::mem::take(map) {
                let after_image = key == "image";
                ordered.insert(key, value);
                if after_image {
                    ordered.insert("restartPolicy".to_string(), json!("Always"));
                }
            }
            *map = ordered;
        }
    }
    container
}

/// True when the object (workload or pod) is annotated `bff.dev/inject: disabled`.
pub fn is_opted_out(object: &Value) -> bool {
    annotation(object, INJECT_ANNOTATION) == Some(INJECT_DISABLED)
}

fn annotation<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object
        .get("metadata")?
        .get("annotations")?
        .get(key)?
        .as_str()
}

fn port_annotation<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod.get("metadata")?
        .get("annotations")?
        .get(name)
        .filter(|v| !v.is_null())
}

fn container_ports(container: &Value) -> impl Iterator<Item = u16> + '_ {
    container
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("containerPort")?.as_u64())
        .filter_map(|p| u16::try_from(p).ok())
}

fn list_field<'a>(
    spec: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Vec<&'a Value>, PodError> {
    match spec.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.iter().collect()),
        Some(other) => Err(pod_error(
            path,
            format!("expected a list, found {}", type_name(other)),
        )),
    }
}

/// The mapping at `key`, created when missing or null.
fn object_entry<'a>(
    map: &'a mut Map<String, Value>,
    key: &str,
) -> Result<&'a mut Map<String, Value>, String> {
    let entry = map.entry(key.to_string()).or_insert(Value::Null);
    if entry.is_null() {
        *entry = Value::Object(Map::new());
    }
    let found = type_name(entry);
    entry
        .as_object_mut()
        .ok_or_else(|| format!("expected a mapping, found {found}"))
}

/// The list at `key`, created when missing or null.
fn array_entry<'a>(
    map: &'a mut Map<String, Value>,
    key: &str,
) -> Result<&'a mut Vec<Value>, String> {
    let entry = map.entry(key.to_string()).or_insert(Value::Null);
    if entry.is_null() {
        *entry = Value::Array(Vec::new());
    }
    let found = type_name(entry);
    entry
        .as_array_mut()
        .ok_or_else(|| format!("expected a list, found {found}"))
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Workload kinds whose `spec.template` is a pod template.
const WORKLOAD_KINDS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"];

/// A manifest that cannot be injected. `document` counts from 1 in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InjectError {
    /// The input is not YAML; `line` is where the parser stopped.
    Yaml {
        document: usize,
        line: Option<u64>,
        message: String,
    },
    /// A document is a scalar or a list instead of a Kubernetes object.
    NotAMapping {
        document: usize,
        found: &'static str,
    },
    /// A workload whose pod template cannot take the sidecar.
    Pod {
        document: usize,
        object: String,
        error: PodError,
    },
    /// The output could not be written as YAML.
    Serialize(String),
}

impl std::fmt::Display for InjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Yaml {
                document,
                line: Some(line),
                message,
            } => write!(
                f,
                "document {document}, line {line}: not valid YAML: {message}"
            ),
            Self::Yaml {
                document, message, ..
            } => write!(f, "document {document}: not valid YAML: {message}"),
            Self::NotAMapping { document, found } => write!(
                f,
                "document {document}: expected a Kubernetes object (a mapping), found {found}"
            ),
            Self::Pod {
                document,
                object,
                error,
            } => write!(f, "document {document} ({object}): {error}"),
            Self::Serialize(message) => write!(f, "cannot write the output as YAML: {message}"),
        }
    }
}

impl std::error::Error for InjectError {}

/// The result of [`inject_yaml`]: the YAML to print and one line per thing done or skipped
/// (for stderr, like `linkerd inject`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub yaml: String,
    pub notes: Vec<String>,
}

/// Pod labels and app port names of a workload injected in this run; Services selecting it
/// are pointed at bff.
struct InjectedWorkload {
    namespace: Option<String>,
    /// bff's data-plane port in this workload (its annotation's, or the options').
    listen_port: u16,
    labels: Map<String, Value>,
    app_port_names: Vec<String>,
}

/// Parses one or many YAML documents, injects every workload and fixes the Services that
/// select them. Comments and YAML formatting are not kept (the output is re-serialised).
pub fn inject_yaml(input: &str, options: &InjectOptions) -> Result<Output, InjectError> {
    // Kubernetes reads manifests as YAML 1.1, where `defaultMode: 0644` is octal (420); the
    // YAML 1.2 default would turn it into decimal 644, an invalid file mode.
    let mut parse_options = serde_saphyr::Options::default();
    parse_options.legacy_octal_numbers = true;
    let mut documents: Vec<Value> =
        serde_saphyr::from_str_multiple_with_options(input, parse_options)
            .map_err(|e| yaml_error(input, &e))?;
    let notes = inject_documents(&mut documents, options)?;
    let yaml = serde_saphyr::to_string_multiple(&documents)
        .map_err(|e| InjectError::Serialize(e.to_string()))?;
    Ok(Output { yaml, notes })
}

/// [`inject_yaml`] on already-parsed documents, in place; returns the notes.
pub fn inject_documents(
    documents: &mut [Value],
    options: &InjectOptions,
) -> Result<Vec<String>, InjectError> {
    let mut notes = Vec::new();
    let mut injected = Vec::new();
    for (i, document) in documents.iter_mut().enumerate() {
        if !document.is_object() {
            return Err(InjectError::NotAMapping {
                document: i + 1,
                found: type_name(document),
            });
        }
        inject_object(document, i + 1, options, &mut notes, &mut injected)?;
    }
    // Services second, so their order relative to the workloads does not matter.
    for document in documents.iter_mut() {
        retarget_services(document, options, &injected, &mut notes);
    }
    Ok(notes)
}

fn inject_object(
    object: &mut Value,
    document: usize,
    options: &InjectOptions,
    notes: &mut Vec<String>,
    injected: &mut Vec<InjectedWorkload>,
) -> Result<(), InjectError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let label = object_label(object);
    if kind.ends_with("List") {
        if let Some(items) = object.get_mut("items").and_then(Value::as_array_mut) {
            for item in items.iter_mut().filter(|item| item.is_object()) {
                inject_object(item, document, options, notes, injected)?;
            }
        }
        return Ok(());
    }
    let is_pod = kind == "Pod";
    if !is_pod && !WORKLOAD_KINDS.contains(&kind.as_str()) {
        return Ok(());
    }
    if !is_pod && is_opted_out(object) {
        notes.push(format!(
            "{label}: skipped ({INJECT_ANNOTATION}: {INJECT_DISABLED})"
        ));
        return Ok(());
    }
    let namespace = object
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let pod_error = |error: PodError, prefix: &str| InjectError::Pod {
        document,
        object: label.clone(),
        error: PodError {
            path: format!("{prefix}{}", error.path),
            message: error.message,
        },
    };
    let (template, prefix) = if is_pod {
        (&mut *object, "")
    } else {
        match object.get_mut("spec").and_then(|s| s.get_mut("template")) {
            Some(template) => (template, "spec.template."),
            None => {
                return Err(pod_error(pod_error_missing(), "spec."));
            }
        }
    };
    match inject_pod(template, options).map_err(|e| pod_error(e, prefix))? {
        Injection::Injected(pod) => {
            *template = pod;
            notes.push(format!("{label}: injected"));
            let listen_port = pod_options(template, options)
                .map_err(|e| pod_error(e, prefix))?
                .listen_port;
            injected.push(InjectedWorkload {
                namespace,
                listen_port,
                labels: template
                    .get("metadata")
                    .and_then(|m| m.get("labels"))
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default(),
                app_port_names: app_port_names(template, options.app_port),
            });
        }
        Injection::AlreadyInjected => notes.push(format!("{label}: already injected")),
        Injection::OptedOut => notes.push(format!(
            "{label}: skipped ({INJECT_ANNOTATION}: {INJECT_DISABLED})"
        )),
    }
    Ok(())
}

fn pod_error_missing() -> PodError {
    pod_error("template", "missing (a workload needs a pod template)")
}

/// Names the app containers give `app_port` (a Service may target it by name).
fn app_port_names(pod: &Value, app_port: u16) -> Vec<String> {
    pod.get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| c.get("name").and_then(Value::as_str) != Some(CONTAINER_NAME))
        .filter_map(|c| c.get("ports").and_then(Value::as_array))
        .flatten()
        .filter(|p| p.get("containerPort").and_then(Value::as_u64) == Some(u64::from(app_port)))
        .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_string))
        .collect()
}

fn retarget_services(
    object: &mut Value,
    options: &InjectOptions,
    injected: &[InjectedWorkload],
    notes: &mut Vec<String>,
) {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind.ends_with("List") {
        if let Some(items) = object.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                retarget_services(item, options, injected, notes);
            }
        }
        return;
    }
    if kind != "Service" {
        return;
    }
    let label = object_label(object);
    let namespace = object
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let Some(selector) = spec.get("selector").and_then(Value::as_object) else {
        return;
    };
    // An empty selector selects nothing (the Service's endpoints are managed by hand).
    let Some(workload) = injected.iter().find(|w| {
        w.namespace == namespace
            && !selector.is_empty()
            && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
    }) else {
        return;
    };
    let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) else {
        return;
    };
    for port in ports.iter_mut().filter_map(Value::as_object_mut) {
        let target = port.get("targetPort").or_else(|| port.get("port"));
        let targets_app = match target {
            Some(Value::Number(n)) => n.as_u64() == Some(u64::from(options.app_port)),
            Some(Value::String(name)) => workload.app_port_names.contains(name),
            _ => false,
        };
        if targets_app {
            let name = port.get("port").map(Value::to_string).unwrap_or_default();
            port.insert("targetPort".to_string(), json!(workload.listen_port));
            notes.push(format!(
                "{label}: port {name} now targets bff on {}",
                workload.listen_port
            ));
        }
    }
}

/// `deployment/web` (or `deployment/web in shop`) for notes and errors.
fn object_label(object: &Value) -> String {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let metadata = object.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    match metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{}/{name} in {ns}", kind.to_lowercase()),
        None => format!("{}/{name}", kind.to_lowercase()),
    }
}

/// Locates a parse error: the parser knows the line, the document number is counted from the
/// `---` separators before it.
fn yaml_error(input: &str, error: &serde_saphyr::Error) -> InjectError {
    let line = error.location().map(|l| l.line()).filter(|l| *l > 0);
    let mut document = 1;
    let mut seen_content = false;
    let before = line.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    for text in input.lines().take(before.saturating_sub(1)) {
        let marker = text
            .strip_prefix("---")
            .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t']));
        if let Some(rest) = marker {
            if seen_content {
                document += 1;
            }
            seen_content = !rest.trim().is_empty();
        } else if !text.trim().is_empty() && !text.trim_start().starts_with('#') {
            seen_content = true;
        }
    }
    InjectError::Yaml {
        document,
        line,
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({
            "metadata": { "labels": { "app": "web" } },
            "spec": {
                "containers": [{
                    "name": "app",
                    "image": "example/web:1",
                    "ports": [{ "name": "http", "containerPort": 3000 }],
                }],
            },
        })
    }

    fn injected(pod: &Value, options: &InjectOptions) -> Value {
        match inject_pod(pod, options) {
            Ok(Injection::Injected(pod)) => pod,
            other => panic!("expected an injection, got {other:?}"),
        }
    }

    #[test]
    fn native_sidecar_goes_first_in_init_containers_with_restart_always() {
        let mut pod = pod();
        pod["spec"]["initContainers"] = json!([{ "name": "migrate", "image": "m" }]);
        let out = injected(&pod, &InjectOptions::default());
        let init = out["spec"]["initContainers"]
            .as_array()
            .expect("initContainers");
        assert_eq!(init.len(), 2);
        assert_eq!(init[0]["name"], "bff");
        assert_eq!(init[0]["restartPolicy"], "Always");
        assert_eq!(init[1]["name"], "migrate");
        assert_eq!(out["spec"]["containers"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            out["metadata"]["annotations"][INJECTED_ANNOTATION],
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(out["metadata"]["labels"]["app"], "web");
    }

    #[test]
    fn classic_sidecar_is_the_first_container_without_restart_policy() {
        let options = InjectOptions {
            mode: SidecarMode::Classic,
            ..InjectOptions::default()
        };
        let out = injected(&pod(), &options);
        let containers = out["spec"]["containers"].as_array().expect("containers");
        assert_eq!(containers[0]["name"], "bff");
        assert_eq!(containers[1]["name"], "app");
        assert!(containers[0].get("restartPolicy").is_none());
        assert!(out["spec"].get("initContainers").is_none());
    }

    #[test]
    fn sidecar_has_args_probes_mount_volume_and_hardening() {
        let options = InjectOptions {
            policy_configmap: "web-policy".into(),
            policy_file: "web.yaml".into(),
            listen_port: 8081,
            admin_port: 9902,
            redis_url: Some("redis://redis:6379".into()),
            ..InjectOptions::default()
        };
        let out = injected(&pod(), &options);
        let bff = &out["spec"]["initContainers"][0];
        assert_eq!(
            bff["args"],
            json!([
                "run",
                "--policy",
                "/etc/bff/web.yaml",
                "--listen",
                "0.0.0.0:8081",
                "--admin",
                "0.0.0.0:9902",
                "--admin-token-file",
                "/var/run/secrets/bff-admin/token"
            ])
        );
        assert_eq!(
            bff["livenessProbe"]["httpGet"],
            json!({ "path": "/healthz", "port": 9902 })
        );
        assert_eq!(
            bff["readinessProbe"]["httpGet"],
            json!({ "path": "/readyz", "port": 9902 })
        );
        assert_eq!(
            bff["volumeMounts"],
            json!([
                { "name": "bff-policy", "mountPath": "/etc/bff", "readOnly": true },
                { "name": "bff-admin-token", "mountPath": "/var/run/secrets/bff-admin", "readOnly": true }
            ])
        );
        assert_eq!(
            out["spec"]["volumes"],
            json!([
                { "name": "bff-policy", "configMap": { "name": "web-policy" } },
                { "name": "bff-admin-token", "secret": { "secretName": "bff-admin-token" } }
            ])
        );
        assert_eq!(
            bff["env"],
            json!([{ "name": "BFF_REDIS_URL", "value": "redis://redis:6379" }])
        );
        let security = &bff["securityContext"];
        assert_eq!(security["runAsNonRoot"], true);
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(bff["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
        assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 30);
    }

    #[test]
    fn grace_period_is_raised_never_lowered() {
        let mut short = pod();
        short["spec"]["terminationGracePeriodSeconds"] = json!(10);
        assert_eq!(
            injected(&short, &InjectOptions::default())["spec"]["terminationGracePeriodSeconds"],
            30
        );
        let mut long = pod();
        long["spec"]["terminationGracePeriodSeconds"] = json!(120);
        assert_eq!(
            injected(&long, &InjectOptions::default())["spec"]["terminationGracePeriodSeconds"],
            120
        );
    }

    #[test]
    fn injected_or_hand_written_sidecar_is_left_alone() {
        let once = injected(&pod(), &InjectOptions::default());
        assert_eq!(
            inject_pod(&once, &InjectOptions::default()),
            Ok(Injection::AlreadyInjected)
        );
        let mut by_hand = pod();
        by_hand["spec"]["containers"] = json!([{ "name": "app" }, { "name": "bff" }]);
        assert_eq!(
            inject_pod(&by_hand, &InjectOptions::default()),
            Ok(Injection::AlreadyInjected)
        );
    }

    #[test]
    fn opted_out_pod_is_left_alone() {
        let mut pod = pod();
        pod["metadata"]["annotations"] = json!({ "bff.dev/inject": "disabled" });
        assert_eq!(
            inject_pod(&pod, &InjectOptions::default()),
            Ok(Injection::OptedOut)
        );
    }

    #[test]
    fn malformed_pods_are_errors_with_the_field() {
        let options = InjectOptions::default();
        let cases = [
            (json!("text"), "(pod)"),
            (json!({ "metadata": {} }), "spec"),
            (
                json!({ "spec": { "containers": "app" } }),
                "spec.containers",
            ),
            (json!({ "spec": { "containers": [] } }), "spec.containers"),
            (
                json!({ "spec": { "containers": [7] } }),
                "spec.containers[0]",
            ),
            (
                json!({ "spec": { "containers": [{ "name": "a" }], "volumes": {} } }),
                "spec.volumes",
            ),
            (
                json!({ "spec": { "containers": [{ "name": "a" }], "volumes": [{ "name": "bff-policy" }] } }),
                "spec.volumes",
            ),
            (
                json!({ "spec": { "containers": [{ "name": "a" }], "volumes": [{ "name": "bff-admin-token" }] } }),
                "spec.volumes",
            ),
            (
                json!({ "spec": { "containers": [{ "name": "a", "ports": [{ "containerPort": 8080 }] }] } }),
                "spec.containers[0].ports",
            ),
            (
                json!({ "metadata": [], "spec": { "containers": [{ "name": "a" }] } }),
                "metadata",
            ),
        ];
        for (pod, path) in cases {
            match inject_pod(&pod, &options) {
                Err(e) => assert_eq!(e.path, path, "{pod}: {e}"),
                Ok(other) => panic!("{pod}: expected an error at {path}, got {other:?}"),
            }
        }
    }

    #[test]
    fn every_container_kind_is_checked_for_bff_ports() {
        let native_sidecar = json!({ "name": "envoy", "restartPolicy": "Always",
                                     "ports": [{ "containerPort": 9901 }] });
        let plain_init = json!({ "name": "setup", "ports": [{ "containerPort": 9901 }] });
        let classic = InjectOptions {
            mode: SidecarMode::Classic,
            ..InjectOptions::default()
        };
        for options in [InjectOptions::default(), classic.clone()] {
            let mut p = pod();
            p["spec"]["initContainers"] = json!([{ "name": "migrate" }, native_sidecar]);
            let error = inject_pod(&p, &options).expect_err("9901 is taken");
            assert_eq!(error.path, "spec.initContainers[1].ports", "{error}");
            assert!(error.message.contains("\"envoy\""), "{error}");
        }
        // An ordinary init container has exited before a classic sidecar starts, not before a
        // native one does.
        let mut p = pod();
        p["spec"]["initContainers"] = json!([plain_init]);
        assert!(inject_pod(&p, &classic).is_ok());
        assert_eq!(
            inject_pod(&p, &InjectOptions::default()).map_err(|e| e.path),
            Err("spec.initContainers[0].ports".to_string())
        );
        // Moved by the annotations, bff no longer collides.
        p["metadata"]["annotations"] = json!({ ADMIN_PORT_ANNOTATION: "9902" });
        let out = injected(&p, &InjectOptions::default());
        assert_eq!(out["spec"]["initContainers"][0]["args"][6], "0.0.0.0:9902");
    }

    #[test]
    fn host_network_pods_need_ports_of_their_own() {
        let mut p = pod();
        p["spec"]["hostNetwork"] = json!(true);
        let error = inject_pod(&p, &InjectOptions::default()).expect_err("refused");
        assert_eq!(error.path, "spec.hostNetwork");
        assert!(error.message.contains(LISTEN_PORT_ANNOTATION), "{error}");
        p["metadata"]["annotations"] = json!({ LISTEN_PORT_ANNOTATION: "18080" });
        assert!(inject_pod(&p, &InjectOptions::default()).is_err());

        p["metadata"]["annotations"] =
            json!({ LISTEN_PORT_ANNOTATION: "18080", ADMIN_PORT_ANNOTATION: 19901 });
        let out = injected(&p, &InjectOptions::default());
        let bff = &out["spec"]["initContainers"][0];
        assert_eq!(
            bff["ports"],
            json!([
                { "name": "bff-http", "containerPort": 18080, "protocol": "TCP", "hostPort": 18080 },
                { "name": "bff-admin", "containerPort": 19901, "protocol": "TCP", "hostPort": 19901 },
            ])
        );
        assert_eq!(bff["readinessProbe"]["httpGet"]["port"], 19901);

        p["spec"]["hostNetwork"] = json!("yes");
        assert_eq!(
            inject_pod(&p, &InjectOptions::default()).map_err(|e| e.path),
            Err("spec.hostNetwork".to_string())
        );
    }

    #[test]
    fn port_annotations_are_checked() {
        for (annotations, path) in [
            (
                json!({ LISTEN_PORT_ANNOTATION: "http" }),
                "metadata.annotations.bff.dev/listen-port",
            ),
            (
                json!({ ADMIN_PORT_ANNOTATION: "0" }),
                "metadata.annotations.bff.dev/admin-port",
            ),
            (
                json!({ ADMIN_PORT_ANNOTATION: 70000 }),
                "metadata.annotations.bff.dev/admin-port",
            ),
            (
                json!({ LISTEN_PORT_ANNOTATION: "9901" }),
                "metadata.annotations",
            ),
            (
                json!({ LISTEN_PORT_ANNOTATION: "3000" }),
                "metadata.annotations",
            ),
        ] {
            let mut p = pod();
            p["metadata"]["annotations"] = annotations.clone();
            match inject_pod(&p, &InjectOptions::default()) {
                Err(e) => assert_eq!(e.path, path, "{annotations}: {e}"),
                Ok(other) => panic!("{annotations}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn options_are_validated() {
        assert_eq!(InjectOptions::default().validate(), Ok(()));
        let bad = [
            InjectOptions {
                listen_port: 3000,
                ..InjectOptions::default()
            },
            InjectOptions {
                admin_port: 0,
                ..InjectOptions::default()
            },
            InjectOptions {
                policy_configmap: "Bad_Name".into(),
                ..InjectOptions::default()
            },
            InjectOptions {
                policy_file: "../x".into(),
                ..InjectOptions::default()
            },
            InjectOptions {
                image: " ".into(),
                ..InjectOptions::default()
            },
        ];
        for options in bad {
            assert!(options.validate().is_err(), "{options:?}");
        }
    }

    #[test]
    fn services_selecting_an_injected_workload_move_from_the_app_port_only() {
        let input = r#"
apiVersion: v1
kind: Service
metadata: { name: web }
spec:
  selector: { app: web }
  ports:
    - { name: by-name, port: 80, targetPort: http }
    - { name: by-number, port: 81, targetPort: 3000 }
    - { name: implicit, port: 3000 }
    - { name: other, port: 9000, targetPort: 9000 }
---
apiVersion: v1
kind: Service
metadata: { name: elsewhere, namespace: other }
spec:
  selector: { app: web }
  ports: [{ port: 80, targetPort: 3000 }]
---
apiVersion: v1
kind: Pod
metadata: { name: web, labels: { app: web, tier: front } }
spec:
  containers: [{ name: app, image: x, ports: [{ name: http, containerPort: 3000 }] }]
"#;
        let out = inject_yaml(input, &InjectOptions::default()).expect("injects");
        let docs: Vec<Value> = serde_saphyr::from_str_multiple(&out.yaml).expect("parses back");
        let targets: Vec<&Value> = docs[0]["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| &p["targetPort"])
            .collect();
        assert_eq!(
            targets,
            [&json!(8080), &json!(8080), &json!(8080), &json!(9000)]
        );
        assert_eq!(
            docs[1]["spec"]["ports"][0]["targetPort"], 3000,
            "other namespace"
        );
        let again = inject_yaml(&out.yaml, &InjectOptions::default()).expect("injects");
        assert_eq!(again.yaml, out.yaml);
    }

    #[test]
    fn parse_errors_name_the_document_and_line() {
        let input = "kind: ConfigMap\n---\n# second\nkind: Pod\nspec: [unclosed\n";
        match inject_yaml(input, &InjectOptions::default()) {
            Err(InjectError::Yaml { document, line, .. }) => {
                assert_eq!(document, 2);
                assert!(line.is_some_and(|l| l >= 5), "{line:?}");
            }
            other => panic!("expected a YAML error, got {other:?}"),
        }
        assert_eq!(
            inject_yaml("kind: ConfigMap\n---\n- a\n", &InjectOptions::default()),
            Err(InjectError::NotAMapping {
                document: 2,
                found: "a list"
            })
        );
    }
}
