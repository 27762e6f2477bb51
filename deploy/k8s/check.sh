#!/usr/bin/env bash
# Validates deploy/k8s offline (run by `make test` and by `cargo test --test it k8s::`):
# renders the base and every overlay with `kubectl kustomize`, validates each rendered object
# against the Kubernetes schemas (kubernetes-validate, pinned), checks the PrometheusRule's rules
# with `promtool check rules`, and cross-checks ports, probes, drain timing, the dashboard and
# the alerts' metric names against src/metrics.rs (check_rendered.py).
# A missing tool is an error that says how to install it, never a skip.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

KV_VERSION=1.31.0
# where `make test-deps` installs kubernetes-validate (a venv: Debian's pip refuses --user)
KV_VENV="${BFF_K8S_VENV:-${HOME}/.cache/bff/kubernetes-validate-${KV_VERSION}}"

# "dir:kubernetes versions to validate against" — the base needs 1.30 (native sidecars are 1.29,
# the preStop sleep action is on by default from 1.30); the classic overlay is for older ones.
targets=(
  "base:1.30.0 1.31.0"
  "overlays/classic-sidecar:1.28.0 1.31.0"
)

missing() {
  echo "check.sh: $1 is missing: $2" >&2
  exit 2
}

command -v kubectl >/dev/null ||
  missing kubectl "run \`make test-deps\` (Debian package kubectl, from the pkgs.k8s.io apt repository: https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/)"
command -v promtool >/dev/null ||
  missing promtool "run \`make test-deps\` or \`sudo apt-get install prometheus\`"
if [ -x "$KV_VENV/bin/kubernetes-validate" ]; then
  kv="$KV_VENV/bin/kubernetes-validate"
  python="$KV_VENV/bin/python"
elif command -v kubernetes-validate >/dev/null; then
  kv="$(command -v kubernetes-validate)"
  python=python3
else
  missing kubernetes-validate "run \`make test-deps\` (python3 -m venv $KV_VENV && $KV_VENV/bin/pip install kubernetes-validate==$KV_VERSION)"
fi
kv_version="$("$kv" --version 2>&1)"
[ "$kv_version" = "$KV_VERSION" ] ||
  missing "kubernetes-validate $KV_VERSION" "found $kv_version at $kv; run \`make test-deps\`"
"$python" -c 'import yaml' 2>/dev/null ||
  missing "PyYAML for $python" "it comes with kubernetes-validate; run \`make test-deps\`"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0

for target in "${targets[@]}"; do
  dir="${target%%:*}"
  versions="${target#*:}"
  name="${dir//\//-}"
  before="$failed"
  failed=0
  rendered="$work/$name.yaml"
  if ! kubectl kustomize "$here/$dir" >"$rendered" 2>"$work/$name.err"; then
    echo "FAIL $dir: kubectl kustomize failed (kubectl with kustomize v5 needed: $(kubectl version --client 2>/dev/null | tr '\n' ' '))"
    cat "$work/$name.err"
    failed=1
    continue
  fi
  for version in $versions; do
    # --strict rejects unknown fields; the Prometheus Operator's kinds have no schema here
    # (a warning), every other kind must have one
    if ! "$kv" --strict --quiet -k "$version" "$rendered" >"$work/$name-$version.out" 2>&1; then
      echo "FAIL $dir: schema validation against Kubernetes $version"
      cat "$work/$name-$version.out"
      failed=1
    elif grep "Couldn't find schema" "$work/$name-$version.out" | grep -v -E "kind (PodMonitor|PrometheusRule) with api version monitoring.coreos.com/v1 " ; then
      echo "FAIL $dir: objects without a schema against Kubernetes $version (above)"
      failed=1
    fi
  done
  rules="$work/$name-rules.yaml"
  if ! "$python" "$here/check_rendered.py" "$rendered" "$repo/src/metrics.rs" "$rules"; then
    echo "FAIL $dir: rendered objects (above)"
    failed=1
  elif ! promtool check rules "$rules" >"$work/$name-promtool.out" 2>&1; then
    echo "FAIL $dir: promtool check rules"
    cat "$work/$name-promtool.out"
    failed=1
  fi
  [ "$failed" = 0 ] && echo "ok   $dir ($(grep -c '^kind:' "$rendered") objects; Kubernetes $versions)"
  [ "$before" = 0 ] || failed=1
done

# the injector (bff webhook): rendered and validated; cert-manager's kinds have no schema here
injector="$work/injector.yaml"
if ! kubectl kustomize "$here/injector" >"$injector" 2>"$work/injector.err"; then
  echo "FAIL injector: kubectl kustomize failed"
  cat "$work/injector.err"
  failed=1
else
  injector_ok=1
  for version in 1.30.0 1.31.0; do
    if ! "$kv" --strict --quiet -k "$version" "$injector" >"$work/injector-$version.out" 2>&1; then
      echo "FAIL injector: schema validation against Kubernetes $version"
      cat "$work/injector-$version.out"
      failed=1
      injector_ok=0
    elif grep "Couldn't find schema" "$work/injector-$version.out" | grep -v -E "kind (Issuer|Certificate) with api version cert-manager.io/v1 "; then
      echo "FAIL injector: objects without a schema against Kubernetes $version (above)"
      failed=1
      injector_ok=0
    fi
  done
  [ "$injector_ok" = 1 ] && echo "ok   injector ($(grep -c '^kind:' "$injector") objects; Kubernetes 1.30.0 1.31.0)"
fi

# not in the kustomization (it would carry a placeholder token), but it must still apply
example="$here/base/secret.example.yaml"
if ! "$kv" --strict --quiet -k "$KV_VERSION" "$example" >"$work/secret.out" 2>&1 ||
  grep -q "Couldn't find schema" "$work/secret.out"; then
  echo "FAIL base/secret.example.yaml: schema validation against Kubernetes $KV_VERSION"
  cat "$work/secret.out"
  failed=1
else
  echo "ok   base/secret.example.yaml"
fi

exit "$failed"
