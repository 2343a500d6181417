# hanlb: two entry points on a fresh machine, as root: `make demo` and `make test`.
# Both install whatever is missing (Debian packages, a virtualenv, the package).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_PKGS := nftables ethtool iproute2 curl procps haproxy wrk openssl
# Commands those packages provide; a missing one triggers the apt-get install.
APT_CMDS := nft ethtool ip curl pkill haproxy wrk openssl

.PHONY: all deps apt venv lint test unit lab-test demo bench clean lab-down

all: test

deps: apt venv

apt:
	@missing=""; for c in $(APT_CMDS); do command -v $$c >/dev/null 2>&1 || \
	  [ -x /usr/sbin/$$c ] || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
	fi
	@test -e /usr/lib/x86_64-linux-gnu/libnftables.so.1 -o -e /usr/lib/aarch64-linux-gnu/libnftables.so.1 \
	  || (echo "libnftables.so.1 missing after install" >&2; exit 1)

$(BIN)/hanlb: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/hanlb

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# The whole suite. HANLB_REQUIRE_LAB=1 turns a skipped or missing lab test into a failure.
test: deps lab-down lint
	HANLB_REQUIRE_LAB=1 PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest tests

unit: venv
	$(BIN)/python -m pytest tests/unit tests/sim

demo: deps lab-down
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/hanlb lab demo

bench: deps lab-down
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python bench/forwarding.py

lab-down:
	@[ -x $(BIN)/hanlb ] && $(BIN)/hanlb lab down >/dev/null 2>&1 || true

clean: lab-down
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
