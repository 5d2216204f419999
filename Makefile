# The two set-up commands of the README. Both create .venv/ at the repository root when it is
# missing and install the project into it; nothing is installed outside it except the system
# services the tests need (through apt, as root).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the test suite needs: a private sshd, rsync and nc for the `ray up` test; SLURM
# and munge for the SLURM clusters the SLURM tests start, and iproute2 for their nodes' network
# namespaces (tests/cluster.py); Java for
# pycocoevalcap's tokenizer and METEOR; headless Chromium for the report test.
SYSTEM_PACKAGES := openssh-server rsync netcat-openbsd iproute2 slurmctld slurmd slurm-client munge default-jre-headless chromium

# Compiled code that outlives a run, kept in .venv so that `make clean` is the one way to drop
# it: DeepSpeed's JIT-built ops (built once by `venv`: the CPU Adam of the offload configs and
# the shared-memory collectives every DeepSpeed run on a CPU loads) and TorchInductor's kernels.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/$(VENV)/inductor_cache
# Test processes side by side (pytest-xdist). Most of the suite's time is waiting (clusters coming
# up, SLURM noticing a dead node, Ray starting), so more workers than the 2 cores pay off; the unit
# tests hardly wait, and there each worker's start (torch, collecting every module: about 10 CPU
# seconds) costs more than it gains (measured, 2 cores: test-fast 248 s on 4 workers, 200 s on 2).
TEST_WORKERS ?= 4
FAST_WORKERS ?= 2
# Every CI log shows where the time went. Work is handed out in collection order, which
# tests/conftest.py makes longest first (xdist's own order is by tests per group).
PYTEST := $(PY) -m pytest -q --durations=20 --dist loadgroup --no-loadscope-reorder

.PHONY: venv lock system-deps test test-fast lint demo clean

$(STAMP): setup.py constraints.txt preprocessing/_bpe.c tools/build_ops.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	$(PY) tools/build_ops.py
	touch $(STAMP)

venv: $(STAMP)

# Re-resolve every dependency (constraints.in's hand-kept pins, setup.py's ranges) and write the
# exact versions to constraints.txt, which `venv` and CI install. Commit the result on its own:
# its CI run shows what the new releases break.
lock: venv
	$(PY) tools/lock.py

system-deps:
ifneq ($(strip $(SYSTEM_PACKAGES)),)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES)
endif

lint: venv
	$(VENV)/bin/ruff check .

test: venv system-deps lint
	$(PYTEST) -n $(TEST_WORKERS) tests

# The unit tests alone: no SLURM, sshd, Ray cluster, browser or multi-process
# training; tests marked `slow` (tests/conftest.py) are left out. Java is the one system package
# they need (pycocoevalcap's tokenizer).
test-fast: venv lint
	command -v java >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless)
	$(PYTEST) -n $(FAST_WORKERS) -m "not slow" tests

# The demo needs only Java of the system packages (pycocoevalcap's tokenizer and METEOR).
demo: venv
	command -v java >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless)
	$(VENV)/bin/lverse demo --output runs/demo

clean:
	rm -rf $(VENV) runs
