# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, run the quickstart meta-training
#   make test   install everything the tests need (Python and Debian packages), run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_PACKAGES := prometheus redis-server

.PHONY: demo test test-slow lint proto bench bench-peers lock system-deps venv clean

# --no-compile: byte-compiling every file of every package takes half the install (measured:
# 86 s -> 39 s for requirements.lock); what is imported compiles on first use and is cached then.
# (Compiling it all after the install, on both cores, did not pay either: in a fresh clone the
# install took 92 s instead of 46 s, and the tests ran about 20 s faster.)
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

venv: $(STAMP)

# Real tools the tests run: promtool (Debian's prometheus) checks the learner's metrics;
# redis-server backs the job store tests.
system-deps:
	@command -v promtool >/dev/null && command -v redis-server >/dev/null || { \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  $(SUDO) apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES); }

demo: venv
	$(BIN)/metaopt train examples/quickstart.yaml

# Bytecode is cached during the tests even where PYTHONDONTWRITEBYTECODE is set (as on our CI):
# otherwise every Ray worker and CLI subprocess compiles metaopt and its imports from source anew.
# Two test processes: the files that compute alone run beside the rest, which runs file after file
# in one of them (tests/conftest.py says which and why).
test: venv system-deps
	$(BIN)/ruff check .
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -m "not slow" -n 2

# Tests marked slow, left out of `make test`: every benchmark in its --quick form and the long
# fault and service scenarios (kills by the clock, outages, interrupted and resumed runs).
test-slow: venv system-deps
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -m slow

lint: venv
	$(BIN)/ruff check .

proto: venv
	$(BIN)/python scripts/gen_proto.py

bench: venv
	$(BIN)/python benchmarks/lopt_step.py --out bench-out
	$(BIN)/python benchmarks/worker_throughput.py --out bench-out
	$(BIN)/python benchmarks/pes_profile.py --one-core --out bench-out
	$(BIN)/python benchmarks/zoo.py --out bench-out
	$(BIN)/python benchmarks/meta_training.py --out bench-out
	$(BIN)/python benchmarks/learner_ingest.py --out bench-out
	$(BIN)/python benchmarks/chaos.py --out bench-out
	$(BIN)/python benchmarks/torch_numerics.py --out bench-out
	$(BIN)/python benchmarks/torch_step.py --out bench-out $(if $(PYLO_SRC),--pylo-src $(PYLO_SRC))

# The peer comparison needs a google/learned_optimization checkout: make bench-peers LO_SRC=PATH
# (and `make bench PYLO_SRC=PATH` times PyLO's torch small_fc beside metaopt.torch's)
bench-peers: venv
	$(BIN)/python benchmarks/peers/run.py --lo-src $(LO_SRC) --out bench-out

lock: venv
	# `pip list`, not `pip freeze`: freeze writes `NAME @ file:///…` for a package installed from
	# a local wheel, a path no other machine has.
	{ grep '^#' requirements.lock; $(BIN)/pip list --format=freeze --exclude-editable \
	  --exclude pip --exclude setuptools | grep -v '^metaopt'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) runs bench-out .pytest_cache
