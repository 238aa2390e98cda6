# Build and test entry points. `make drill` and `make test` work on a fresh Debian/Ubuntu machine:
# they install what is missing (Debian packages, the virtual environment) and then do their job.

PYTHON ?= /usr/bin/python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DRILL_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help system-packages venv lint typecheck test test-kubernetes drill mixed-run format clean distclean

help:
	@echo "make drill      install what is missing, start the local topology, run the default drill"
	@echo "make test       install what is missing, then lint, typecheck, the test suite and the real Kubernetes cluster's end-to-end test"
	@echo "make test-kubernetes  the real Kubernetes cluster's test alone (builds Kubernetes first on a fresh machine: 12-15 min)"
	@echo "make mixed-run  the headline's local rehearsal: 500 + 2,500 TPS for 60 s through the entry, Locust's gates"
	@echo "make venv       install missing Debian packages and the project into $(VENV)"
	@echo "make lint       ruff check and ruff format --check"
	@echo "make typecheck  mypy"
	@echo "make format     ruff format and ruff check --fix (rewrites files)"
	@echo "make clean      remove caches and build output; make distclean also removes $(VENV)"

# runs every time (cheap when nothing is missing) but never forces the venv to be rebuilt
system-packages:
	@./scripts/install-system-packages

venv: $(STAMP)

# the interpreter is Debian's, the tree world-readable: the postgres user runs it too
$(STAMP): pyproject.toml core-app/pyproject.toml | system-packages
	@if [ -d $(VENV) ] && ! grep -qx 'home = $(patsubst %/,%,$(dir $(PYTHON)))' $(VENV)/pyvenv.cfg 2>/dev/null; then \
		echo "==> $(VENV) was not made from $(PYTHON); recreating it"; rm -rf $(VENV); fi
	@if [ ! -x $(BIN)/python ]; then \
		echo "==> creating the virtual environment $(VENV) with $(PYTHON) -m venv"; \
		$(PYTHON) -m venv $(VENV); fi
	@echo "==> installing the core, watertight and its dev tools into $(VENV) (pip install -e ./core-app -e '.[dev]')"
	@$(BIN)/pip install --disable-pip-version-check --progress-bar off -q -e ./core-app -e '.[dev]'
	@echo "==> installing the kubernetes.core collection for the runbooks' kubernetes target"
	@$(BIN)/python -m watertight.runbooks.kube
	@chmod -R a+rX $(VENV)
	@touch $@
	@echo "==> $(VENV) is ready"

lint: venv
	@echo "==> ruff check"
	@$(BIN)/ruff check .
	@echo "==> ruff format --check"
	@$(BIN)/ruff format --check .

typecheck: venv
	@echo "==> mypy"
	@$(BIN)/mypy

# the suite, then the end-to-end test on a real Kubernetes cluster here (scripts/run-tests: on a
# machine without the cluster's binaries they are built in the background, at nice 19, while the
# suite runs; WATERTIGHT_KUBERNETES_E2E=0 leaves the cluster out)
test: venv lint typecheck
	@BIN=$(BIN) PYTEST_ARGS="$(PYTEST_ARGS)" ./scripts/run-tests

# the real cluster's test alone (builds the binaries and images first on a fresh machine: 12-15
# minutes more; cached outside the work tree)
test-kubernetes: venv
	@echo "==> pytest tests/test_kubernetes_cluster.py (a real cluster)"
	@$(BIN)/pytest -q tests/test_kubernetes_cluster.py $(PYTEST_ARGS)

drill: venv
	@echo "==> watertight drill $(DRILL_ARGS)"
	@$(BIN)/watertight drill $(DRILL_ARGS)

mixed-run: venv
	@./scripts/mixed-run

format: venv
	@$(BIN)/ruff format .
	@$(BIN)/ruff check --fix .

# leaves run/ and reports/ alone: `watertight down --purge` owns the runtime data
clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
