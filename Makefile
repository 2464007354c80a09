# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv when missing and install what they need (Debian packages
# through apt-get only when a command is missing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PKGS ?=

.PHONY: demo test test-slow bench venv deps bytecode clean-demo install

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# Every `pit` run imports the CLI and its packages; with PYTHONDONTWRITEBYTECODE
# set (CI images often do) Python would compile them from source each time.
bytecode: venv
	@$(BIN)/python -m compileall -q store replicator davserver >/dev/null

deps:
	@./.ci/apt-deps

demo: venv deps bytecode
	$(BIN)/pit demo

test: venv deps bytecode
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

test-slow: venv deps bytecode
	$(BIN)/python -m pytest -q -m slow

bench: venv deps bytecode
	$(BIN)/python bench/ingest.py

# A node of a real cluster (docs/quickstart.md): the venv, the Debian packages, `pit` on the PATH.
install: venv deps bytecode
	ln -sf $(abspath $(BIN))/pit /usr/local/bin/pit
	@echo "pit installed: $$(command -v pit)"

clean-demo:
	@# a failing `demo down` is reported, not hidden by removing its data under running processes
	@if test -x $(BIN)/pit; then $(BIN)/pit demo down; else rm -rf demo-data; fi
