# KilnProxy: `make run` starts the proxy on embedded defaults; `make test` runs the whole test suite.
# Both create the virtual environment (.venv) from requirements.txt when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test deps system-deps version bench leakcheck clean

$(VENV)/.installed: requirements.txt
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
	$(PY) -X dev -m pytest -q tests

version: deps
	$(PY) kilnproxy.py version --stamp

bench: deps system-deps
	$(PY) tools/bench.py

leakcheck: deps system-deps
	$(PY) tools/leakcheck.py --self-hosted

clean:
	rm -rf $(VENV) var .pytest_cache
