# Two commands on a fresh Debian 12 / Raspberry Pi OS machine:
#   make demo   - the agent's lifecycle against the local bench (no AWS account)
#   make test   - the test suite (what CI runs)
# Both install the system packages they need (scripts/sysdeps.sh) and the virtualenv.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint bench sysdeps venv clean check-arm64

demo: sysdeps venv
	$(PY) -m localcloud.demo

# Tests mostly wait (handshakes, daemons, timeouts), so more workers than cores pays off.
TEST_WORKERS ?= 5

# Byte code compiled once up front: the suite starts hundreds of agent processes, and with
# PYTHONDONTWRITEBYTECODE (the kill sweeps set it) each would compile every module from source.
test: sysdeps venv
	$(PY) -m compileall -q agent localcloud tests
	$(PY) scripts/timed.py $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

# ruff (lint and format) over the tree, mypy over agent/ (settings in pyproject.toml); .ci/run runs it first.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The demo, the installed service and the identity/update/rotation tests on arm64 (Raspberry Pi OS's
# architecture) under qemu-user, from any x86_64 machine; root (binfmt_misc, chroot).
check-arm64:
	bash scripts/check-arm64.sh

# Every benchmark runs even when an earlier one misses its target (exit 1); make fails at the end if any did.
BENCHES = startup lifecycle_rss provision_many defender_cost download_throughput tunnel_throughput \
	local_messaging micropython_footprint
bench: sysdeps venv
	@status=0; for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/$$b.py || status=1; done; exit $$status

sysdeps:
	@bash scripts/sysdeps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .deps .pytest_cache
