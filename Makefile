# bff: `make demo` runs the sidecar on built-in mocks, `make test` runs every test.
# Both install what a fresh Debian machine lacks (cmake for Pingora's zlib-ng, redis-server
# for the cache tests) with apt-get.

CARGO ?= cargo
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test check lint bench build-deps test-deps

demo: build-deps
	$(CARGO) run --bin bff -- demo

test: build-deps test-deps
	$(CARGO) build --all-targets
	$(CARGO) test --all-targets --no-fail-fast

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

bench: build-deps
	$(CARGO) bench

build-deps:
	@command -v cc >/dev/null && command -v cmake >/dev/null || { \
	  echo "installing build tools (cmake, cc)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) $(APT_INSTALL) cmake build-essential; }

# Debian ships redis-cli in redis-tools (a dependency of redis-server; named anyway: the cluster tests
# join their nodes with it).
test-deps:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  echo "installing redis-server and redis-cli for the cache tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) $(APT_INSTALL) redis-server redis-tools; }
