# fxdit: `make demo` runs the main job, `make test` runs the tests. Each sets itself up on a fresh machine.
# `make setup` installs the exact versions in constraints.txt (the lock); `make lock` refreshes the lock to the newest
# versions pyproject.toml allows, runs lint and the test suite with them and rewrites constraints.txt only if they pass.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow lint lock clean

setup: $(VENV)/.fxdit-installed

$(VENV)/.fxdit-installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,diffusers]"
	touch $@

demo: setup
	$(VENV)/bin/fxdit demo --out demo_out

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

lock:
	bash tools/lock.sh

clean:
	rm -rf demo_out fxdit_dump .pytest_cache .venv-lock
