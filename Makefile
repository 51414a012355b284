# The two commands of the README, and what they need on a fresh machine.
#   make demo   the east/west active-active demo on embedded PostgreSQL clusters
#   make test   every test, against real throwaway PostgreSQL clusters
# Extra demo flags: make demo ARGS="--duration 60s --rate 500 --keep"

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_UPDATED := /tmp/.meridian-apt-updated

.PHONY: demo test deps deps-test bench

demo: deps
	cargo run --release -- demo $(ARGS)

test: deps deps-test
	cargo test

bench: deps
	cargo bench --bench apply
	cargo bench --bench userscript
	cargo bench --bench replication

# PostgreSQL server binaries (initdb, pg_ctl) and psql.
deps:
	@if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing PostgreSQL server binaries"; \
	  [ -f $(APT_UPDATED) ] || { $(SUDO) apt-get update && touch $(APT_UPDATED); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y postgresql; \
	fi
	@command -v psql >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/psql >/dev/null 2>&1 || { \
	  [ -f $(APT_UPDATED) ] || { $(SUDO) apt-get update && touch $(APT_UPDATED); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y postgresql-client; }

# Prometheus, which the dashboard test runs against a live demo.
deps-test:
	@command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || { \
	  echo "installing Prometheus"; \
	  [ -f $(APT_UPDATED) ] || { $(SUDO) apt-get update && touch $(APT_UPDATED); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends prometheus; \
	  $(SUDO) pkill -x prometheus || true; }
