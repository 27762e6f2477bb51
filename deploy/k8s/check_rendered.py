"""Checks on rendered kustomize output that schemas cannot make (called by check.sh).

usage: check_rendered.py RENDERED.yaml METRICS_RS RULES_OUT.yaml

Writes the PrometheusRule's `spec` (its rule groups) to RULES_OUT for `promtool check rules`,
and exits 1 naming every problem found: the sidecar's ports, probes and drain timing against its
environment, the Service and PodMonitor against the pod, and every metric the alerts and the
dashboard query against the families bff exports (src/metrics.rs).
"""

import json
import re
import sys

import yaml

rendered_path, metrics_rs_path, rules_out = sys.argv[1:4]
problems = []


def problem(text):
    problems.append(text)


with open(rendered_path) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
by_kind = {}
for doc in docs:
    by_kind.setdefault(doc["kind"], []).append(doc)

# --- metric families bff exports -------------------------------------------------------------
with open(metrics_rs_path) as f:
    metrics_rs = f.read()
families = set(re.findall(r'"(bff_[a-z0-9_]+)"', metrics_rs))
histograms = set(re.findall(r'histogram\(\s*"(bff_[a-z0-9_]+)"', metrics_rs))
if not families or not histograms:
    problem(f"{metrics_rs_path}: found no bff_ metric families (or no histograms): has it moved?")


def unknown_metrics(expr):
    """Names in a PromQL expression that bff does not export."""
    unknown = []
    for name in set(re.findall(r"\bbff_[a-z0-9_]+", expr)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in families or (base in histograms and base != name):
            continue
        unknown.append(name)
    return sorted(unknown)


def used_families(expr):
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\bbff_[a-z0-9_]+", expr)}


# --- PrometheusRule: rules out for promtool, metric names checked -----------------------------
rules = by_kind.get("PrometheusRule", [])
if len(rules) != 1:
    problem(f"expected one PrometheusRule, rendered {len(rules)}")
alert_families = set()
for rule_doc in rules:
    groups = rule_doc.get("spec", {}).get("groups", [])
    with open(rules_out, "w") as f:
        yaml.safe_dump({"groups": groups}, f)
    for group in groups:
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            for metric in unknown_metrics(rule.get("expr", "")):
                problem(f"PrometheusRule {name}: {metric} is not a metric bff exports")
            alert_families |= used_families(rule.get("expr", ""))
    wanted = {
        "bff_degraded_responses_total",
        "bff_requests_total",
        "bff_circuit_state",
        "bff_cache_l2_errors_total",
        "bff_request_duration_seconds",
    }
    for missing in sorted(wanted - alert_families):
        problem(f"PrometheusRule: no alert uses {missing}")

# --- dashboard (from its rendered ConfigMap): valid JSON, queries name only bff's metrics, ----
# --- shows what the alerts watch --------------------------------------------------------------
dashboard_cms = [
    cm for cm in by_kind.get("ConfigMap", [])
    if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
]
if len(dashboard_cms) != 1:
    problem(f"expected one ConfigMap labelled grafana_dashboard: \"1\", rendered {len(dashboard_cms)}")
dashboard = {}
dashboard_path = "the Grafana dashboard"
for cm in dashboard_cms:
    for key, text in cm.get("data", {}).items():
        dashboard_path = f"ConfigMap {cm['metadata']['name']} {key}"
        try:
            dashboard = json.loads(text)
        except ValueError as err:
            problem(f"{dashboard_path}: not valid JSON: {err}")
exprs = [
    target.get("expr", "")
    for panel in dashboard.get("panels", [])
    for target in panel.get("targets", [])
]
if dashboard and not exprs:
    problem(f"{dashboard_path}: no panel has a query")
dashboard_families = set()
for expr in exprs:
    for metric in unknown_metrics(expr):
        problem(f"{dashboard_path}: {metric} is not a metric bff exports (in {expr!r})")
    if not used_families(expr):
        problem(f"{dashboard_path}: a query reads no bff metric: {expr!r}")
    dashboard_families |= used_families(expr)
for missing in sorted(alert_families - dashboard_families):
    problem(f"{dashboard_path}: alerts use {missing}, no panel shows it")

# --- the pod: the sidecar, its ports, probes and drain ----------------------------------------
def duration_seconds(text):
    match = re.fullmatch(r"(\d+)(ms|s|m)", text)
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2)
    return {"ms": value / 1000, "s": value, "m": value * 60}[unit]


def prestop_seconds(container):
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return pre["sleep"]["seconds"]
    command = pre.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return int(command[1])
    return None


deployments = by_kind.get("Deployment", [])
if len(deployments) != 1:
    problem(f"expected one Deployment, rendered {len(deployments)}")
for deployment in deployments:
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    native = [c for c in spec.get("initContainers", []) if c["name"] == "bff"]
    classic = [c for c in spec.get("containers", []) if c["name"] == "bff"]
    if len(native) + len(classic) != 1:
        problem("the pod must run exactly one container named bff")
        continue
    bff = (native or classic)[0]
    if native and bff.get("restartPolicy") != "Always":
        problem("bff is an init container without restartPolicy: Always, so not a sidecar")
    env = {e["name"]: e for e in bff.get("env", [])}

    def env_value(name):
        return env.get(name, {}).get("value")

    listen, admin = env_value("BFF_LISTEN"), env_value("BFF_ADMIN")
    if not listen or not admin:
        problem("bff needs BFF_LISTEN and BFF_ADMIN set")
        continue
    listen_port, admin_port = int(listen.rsplit(":", 1)[1]), int(admin.rsplit(":", 1)[1])
    if listen.startswith("127.") or admin.startswith("127."):
        problem("bff's listener and admin port must be on the pod IP (0.0.0.0), not loopback")
    ports = {p.get("name"): p["containerPort"] for p in bff.get("ports", [])}
    if ports.get("http") != listen_port or ports.get("admin") != admin_port:
        problem(f"bff's ports {ports} do not match BFF_LISTEN {listen} / BFF_ADMIN {admin}")
    for probe_name, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        probe = bff.get(probe_name, {}).get("httpGet", {})
        port = ports.get(probe.get("port"), probe.get("port"))
        if probe.get("path") != path or port != admin_port:
            problem(f"bff's {probe_name} must GET {path} on the admin port {admin_port}")
    token_file = env_value("BFF_ADMIN_TOKEN_FILE")
    secret_volumes = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
    if not token_file or not any(
            m["name"] in secret_volumes and token_file.startswith(m["mountPath"].rstrip("/") + "/")
            for m in bff.get("volumeMounts", [])):
        problem("bff's admin port is on the pod IP: BFF_ADMIN_TOKEN_FILE must name a file in a mounted Secret")
    if "USER_SVC_TOKEN" not in env or "secretKeyRef" not in env["USER_SVC_TOKEN"].get("valueFrom", {}):
        problem("bff's USER_SVC_TOKEN must come from a Secret")
    security = bff.get("securityContext", {})
    if (security.get("allowPrivilegeEscalation") is not False
            or security.get("readOnlyRootFilesystem") is not True
            or security.get("capabilities", {}).get("drop") != ["ALL"]):
        problem("bff's securityContext must forbid privilege escalation, mount / read-only, drop ALL")
    if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
        problem("the pod must run as non-root")
    if "memory" not in bff.get("resources", {}).get("limits", {}):
        problem("bff needs a memory limit")

    grace = duration_seconds(env_value("BFF_GRACE_PERIOD") or "20s")
    termination = spec.get("terminationGracePeriodSeconds", 30)
    sleeps = {c["name"]: prestop_seconds(c) for c in spec.get("containers", []) + [bff]}
    if sleeps.get("bff") is None:
        problem("bff needs a preStop sleep, so endpoints are updated before it stops accepting")
    else:
        # natively the app stops first, then bff: the budget must hold both in turn
        app_budget = sum(s or 0 for n, s in sleeps.items() if n != "bff") + (10 if native else 0)
        needed = sleeps["bff"] + grace + (app_budget if native else 0)
        if termination <= needed:
            problem(f"terminationGracePeriodSeconds {termination} must exceed {needed} "
                    f"(preStop sleeps and bff's grace period {grace}s)")

    pod_labels = pod["metadata"].get("labels", {})
    for service in by_kind.get("Service", []):
        selector = service["spec"].get("selector", {})
        if selector.items() <= pod_labels.items():
            targets = [p.get("targetPort") for p in service["spec"]["ports"]]
            if targets != [listen_port] and targets != ["http"]:
                problem(f"Service {service['metadata']['name']} targets {targets}, not bff's {listen_port}")
    for monitor in by_kind.get("PodMonitor", []):
        selector = monitor["spec"]["selector"].get("matchLabels", {})
        if not selector.items() <= pod_labels.items():
            problem(f"PodMonitor {monitor['metadata']['name']} does not select the pod")
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            if ports.get(endpoint.get("port")) != admin_port or endpoint.get("path") != "/metrics":
                problem(f"PodMonitor {monitor['metadata']['name']} must scrape /metrics on bff's admin port")
    policy_volumes = [
        v for v in spec.get("volumes", []) if v.get("configMap", {}).get("name", "").startswith("bff-policy")
    ]
    policy_cms = [cm for cm in by_kind.get("ConfigMap", []) if cm["metadata"]["name"].startswith("bff-policy")]
    policy_file = (env_value("BFF_POLICY") or "").rsplit("/", 1)[-1]
    if not policy_volumes or not policy_cms or policy_file not in policy_cms[0].get("data", {}):
        problem(f"the pod must mount the bff-policy ConfigMap holding {policy_file!r}")

for pdb in by_kind.get("PodDisruptionBudget", []) or [None]:
    if pdb is None:
        problem("no PodDisruptionBudget")

if problems:
    for text in problems:
        print(f"check_rendered: {rendered_path}: {text}")
    sys.exit(1)
