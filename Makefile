# bff: `make demo` runs the sidecar on built-in mocks, `make test` runs every test.
# Both install what a fresh Debian machine lacks (cmake for Pingora's zlib-ng, redis-server
# for the cache tests, kubectl, promtool and kubernetes-validate for deploy/k8s, nginx with its
# echo module, wrk and valgrind for the load benchmark, check-jsonschema for the policy schema)
# with apt-get and pip, only when missing.

CARGO ?= cargo
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# deploy/k8s/check.sh looks for kubernetes-validate here first (a venv: Debian's pip refuses
# to install into the system or --user site)
KV_VERSION = 1.31.0
KV_VENV = $(HOME)/.cache/bff/kubernetes-validate-$(KV_VERSION)
# tests/it/schema.rs validates the example policies against policies/bff-policy.schema.json
# with check-jsonschema from here (the same kind of venv)
CJ_VERSION = 0.39.0
CJ_VENV = $(HOME)/.cache/bff/check-jsonschema-$(CJ_VERSION)

.PHONY: demo test check lint bench build-deps test-deps load-deps k8s-check

demo: build-deps
	$(CARGO) run --bin bff -- demo

test: build-deps test-deps
	deploy/k8s/check.sh
	$(CARGO) build --all-targets
	$(CARGO) test --all-targets --no-fail-fast

k8s-check: test-deps
	deploy/k8s/check.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# The load benchmark starts the bare Pingora example built with the same (bench) profile, and
# runs last: target/bench/results.json also takes the projection ratios of the criterion run.
# `cargo bench --bench load` runs it alone.
bench: build-deps load-deps
	$(CARGO) build --profile bench --example bare_pingora
	$(CARGO) bench --bench micro --bench cache --bench fanout --bench jwt_cache
	$(CARGO) bench --bench load

build-deps:
	@command -v cc >/dev/null && command -v cmake >/dev/null || { \
	  echo "installing build tools (cmake, cc)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) $(APT_INSTALL) cmake build-essential; }

# The load benchmark's peers and load generator; `make test` runs it once as a smoke test.
load-deps:
	@command -v nginx >/dev/null && [ -f /usr/lib/nginx/modules/ngx_http_echo_module.so ] && command -v wrk >/dev/null \
	  && command -v callgrind_control >/dev/null || { \
	  echo "installing nginx, its echo module, wrk and valgrind for the load benchmark"; \
	  $(SUDO) apt-get update -qq && $(SUDO) $(APT_INSTALL) nginx libnginx-mod-http-echo wrk valgrind; }

# Debian ships redis-cli in redis-tools (a dependency of redis-server; named anyway: the cluster tests
# join their nodes with it).
test-deps: load-deps
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  echo "installing redis-server and redis-cli for the cache tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) $(APT_INSTALL) redis-server redis-tools; }
	@command -v promtool >/dev/null || { \
	  echo "installing promtool (Debian package prometheus) for deploy/k8s and the metrics test"; \
	  $(SUDO) apt-get update -qq && $(SUDO) $(APT_INSTALL) prometheus; }
	@command -v kubectl >/dev/null || { \
	  echo "installing kubectl for deploy/k8s"; \
	  $(SUDO) apt-get update -qq; \
	  if apt-cache show kubectl >/dev/null 2>&1; then $(SUDO) $(APT_INSTALL) kubectl; else \
	    echo "apt has no kubectl package (Debian's kubernetes-client is too old for kustomize v5):"; \
	    echo "add the pkgs.k8s.io repository and apt-get install kubectl, see"; \
	    echo "https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/#install-using-native-package-management"; \
	    exit 1; fi; }
	@[ "$$($(KV_VENV)/bin/kubernetes-validate --version 2>/dev/null)" = $(KV_VERSION) ] || { \
	  echo "installing kubernetes-validate==$(KV_VERSION) into $(KV_VENV)"; \
	  python3 -m venv $(KV_VENV) 2>/dev/null || { \
	    $(SUDO) apt-get update -qq && $(SUDO) $(APT_INSTALL) python3-venv && python3 -m venv $(KV_VENV); }; \
	  $(KV_VENV)/bin/pip install -q kubernetes-validate==$(KV_VERSION); }
	@[ "$$($(CJ_VENV)/bin/check-jsonschema --version 2>/dev/null)" = "check-jsonschema, version $(CJ_VERSION)" ] || { \
	  echo "installing check-jsonschema==$(CJ_VERSION) into $(CJ_VENV)"; \
	  python3 -m venv $(CJ_VENV) 2>/dev/null || { \
	    $(SUDO) apt-get update -qq && $(SUDO) $(APT_INSTALL) python3-venv && python3 -m venv $(CJ_VENV); }; \
	  $(CJ_VENV)/bin/pip install -q check-jsonschema==$(CJ_VERSION); }
