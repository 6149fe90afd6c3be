# siocluster: `make help` lists the targets. Everything installs what it needs by itself.

# the interpreter of the virtual environment: scripts/pick-python says which and why
PYTHON ?= $(shell scripts/pick-python 2>/dev/null)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

# run-cluster settings (see README): an embedded redis-server unless REDIS_URL is set
REDIS_URL ?=
FRONTEND_PORT ?= 8080
IO_PORTS ?= 8081 8082
APP_NODES ?= 2
# app-node n serves its /metrics, /healthz and /readyz on APP_PORT + n - 1
APP_PORT ?= 8091
# 843 needs root: without it the runner says so and uses 10843
POLICY_PORT ?= 843
HOST ?= 127.0.0.1

PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install system-deps browser-deps proxy-deps client-js test test-fast lint run-cluster bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'

install: $(STAMP) system-deps client-js ## virtual environment, Python packages, redis-server, browser client

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 9))' || \
		{ echo "siocluster needs Python 3.9 or newer as $(PYTHON) (set PYTHON=...)"; exit 1; }
	@test -x $(PY) || { $(if $(filter file,$(origin PYTHON)),scripts/pick-python >/dev/null;) echo "creating $(VENV) with $(PYTHON)"; \
		$(PYTHON) -m venv $(VENV); } || \
		{ echo "could not create $(VENV): install your system's python3-venv package"; exit 1; }
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[test,server]"
	@touch $@

system-deps: ## redis-server from the system's packages when it is missing
	@scripts/install-system-deps redis

browser-deps: ## headless Chromium and its driver for the browser test
	@scripts/install-system-deps browser

proxy-deps: ## nginx, for the reverse-proxy test (tests/test_proxy.py)
	@scripts/install-system-deps nginx

client-js: $(STAMP) ## the Socket.IO browser client, fetched from the npm registry
	@scripts/fetch-socketio-client siocluster/static

test: install browser-deps proxy-deps ## run every test (unit, integration, browser)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install proxy-deps ## every test but the browser ones
	$(PY) -m pytest -m "not browser" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff over the code
	$(VENV)/bin/ruff check siocluster tests example_chat examples bench policy_server.py

run-cluster: install ## start the example chat as a real cluster (Ctrl-C stops it)
	$(PY) -m siocluster.cluster --host $(HOST) --frontend-port $(FRONTEND_PORT) \
		--io-ports "$(IO_PORTS)" --app-nodes $(APP_NODES) --app-port $(APP_PORT) --policy-port $(POLICY_PORT) \
		$(if $(REDIS_URL),--redis-url "$(REDIS_URL)")

bench: install ## benchmarks side by side; prints a table and writes bench/results/*.json
	$(PY) -m bench

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache siocluster.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
