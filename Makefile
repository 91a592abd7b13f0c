# KilnProxy: `make run` starts the proxy on embedded defaults; `make test` runs the test suite; `make dist` builds
# dist/kilnproxy.pyz and `make test-dist` tests it (both slow: kept out of `make test`; .ci/run runs them).
# They create the virtual environments (.venv, .venv-dist) from the requirements files when missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DIST_VENV := .venv-dist
# the wheels the pyz bundles, downloaded once (pip download) and reused offline after
WHEELHOUSE ?= build/wheelhouse

.PHONY: check run test deps system-deps version bench leakcheck clean dist test-dist

$(VENV)/.installed: requirements.txt requirements-runtime.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

deps: $(VENV)/.installed

run: deps
	$(PY) kilnproxy.py

# OpenSSH server (the tests' backend), git, mercurial and chromium (dashboard test) via apt-get when missing
system-deps:
	bash tools/install-system-deps.sh

test: deps system-deps
	$(PY) -X dev -m pytest -q -m "not dist" tests

# pex, in a virtual environment of its own; the pyz is for this Python's minor version
$(DIST_VENV)/.installed: requirements-dist.txt
	$(PYTHON) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install -q -r requirements-dist.txt
	touch $@

dist: $(DIST_VENV)/.installed
	$(DIST_VENV)/bin/python tools/build_dist.py --out dist/kilnproxy.pyz --wheelhouse $(WHEELHOUSE)

# builds the pyz again from the repository and from a clean clone (same bytes), runs it with the system python3
test-dist: deps system-deps dist
	KILN_PEX=$(CURDIR)/$(DIST_VENV)/bin/pex KILN_WHEELHOUSE=$(abspath $(WHEELHOUSE)) $(PY) -X dev -m pytest -q -m dist tests

# the whole suite: README's test command, and what .ci/run runs
check: test test-dist

version: deps
	$(PY) kilnproxy.py version --stamp

bench: deps system-deps
	$(PY) tools/bench.py

leakcheck: deps system-deps
	$(PY) tools/leakcheck.py --self-hosted

clean:
	rm -rf $(VENV) $(DIST_VENV) var .pytest_cache dist build
