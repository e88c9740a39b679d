# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tcc-installed
TORCH_VERSION := 2.13.0
# command:Debian package of the tools the tests use (RTL simulators, synthesis, the report's headless browser, the
# speech corpus's synthesizer)
DEBIAN_TOOLS := iverilog:iverilog verilator:verilator yosys:yosys chromium:chromium chromedriver:chromium-driver \
  espeak-ng:espeak-ng
PYTEST_ARGS ?=

.PHONY: install demo test test-all bench docs docs-check clean

install: $(STAMP) debian-tools

# torch is pinned and installed first: an open range would pull GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $(STAMP)

.PHONY: debian-tools
debian-tools:
	@missing=""; \
	for entry in $(DEBIAN_TOOLS); do \
	  command -v $${entry%%:*} >/dev/null 2>&1 || missing="$$missing $${entry#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: install
	$(BIN)/python examples/demo.py

# the default tier in parallel, one worker per core (at most 4); the slow tier (timings among
# it) runs serially
test: install
	$(BIN)/python -m pytest -q -m "not slow" -n auto --maxprocesses 4 $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/compile_time.py
	$(BIN)/python benchmarks/runtime.py
	$(BIN)/python benchmarks/formats.py
	$(BIN)/python benchmarks/sparse_runtime.py
	$(BIN)/python benchmarks/accel.py

# docs/ir.md and docs/isa.md, generated from the op table and the ISA (tests/test_docs.py fails when stale)
docs: $(STAMP)
	$(BIN)/python docs/generate.py

docs-check: $(STAMP)
	$(BIN)/python docs/generate.py --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
