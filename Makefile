# fieldkube developer entry points. `make dev` sets up everything (idempotent); `make test` runs all checks.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
PKGS := contract/src vision/src trainer/src serving/src operator/src hack/localcluster/src
# Scripts of hack/ that are not in a package but are type-checked like one.
TYPED_SCRIPTS := hack/dashboards.py hack/render_dashboards.py hack/dashboards_example.py hack/vision_constraints.py

-include mk/*.mk

.PHONY: dev test unit integration lint fmt typecheck cluster cluster-down demo demo-down demo-cluster \
        bench-train bench-train-gpu gpu-wheels bench-layout bench-loader bench-decode bench-serve bench-serve-gpu bench-accuracy bench-operator dashboards dashboards-png \
        dashboards-example clean

dev:  ## set up Debian packages, .venv, Horovod and the local control plane binaries
	@hack/dev.sh

# The suite runs in TEST_WORKERS pytest-xdist processes: the tests that use the local cluster stay together in
# one (one control plane and one real node), the rest spread over the others. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: lint  ## lint + type check + the whole test suite (unit and integration)
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

unit:
	$(PY) -m pytest tests/unit

integration:
	$(PY) -m pytest tests/integration

lint:  ## ruff (lint + format check) and mypy on all four packages
	$(PY) -m ruff check $(PKGS) tests bench hack
	$(PY) -m ruff format --check $(PKGS) tests bench hack
	$(PY) -m mypy $(PKGS)
	$(PY) -m mypy $(TYPED_SCRIPTS)

fmt:
	$(PY) -m ruff check --fix $(PKGS) tests bench hack
	$(PY) -m ruff format $(PKGS) tests bench hack

dashboards:  ## regenerate charts/fieldkube/files/ (Grafana dashboards, Prometheus rules) from hack/dashboards.py
	$(PY) hack/dashboards.py

PROMETHEUS ?= http://127.0.0.1:9090
dashboards-png:  ## draw each dashboard from $(PROMETHEUS) (last $(MINUTES) min) to dashboards-png/<uid>.png
	$(PY) hack/render_dashboards.py --prometheus $(PROMETHEUS) --out dashboards-png --minutes $(or $(MINUTES),30)

dashboards-example:  ## real training, serving and operator metrics under load, drawn to docs/dashboards/*.png
	$(PY) hack/dashboards_example.py --out docs/dashboards

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache

# images/vision-constraints.txt: the pins of fieldkube-vision's dependency closure, all that the images'
# shared vision-deps stage copies (a pin outside that closure then leaves their torch layer cached).
lock:  ## re-pin constraints.txt (and images/vision-constraints.txt) from the current .venv (after changing a pyproject's dependencies)
	@{ echo "# Exact versions for the whole .venv, resolved on Python 3.11 / Debian 12 x86_64. Regenerate with"; \
	   echo "# 'make lock' after changing a pyproject's dependencies. horovod is built from its sdist by hack/build-horovod.sh."; \
	   $(PY) -m pip freeze --all --exclude-editable | grep -viE "^(horovod|fieldkube|pip)[=@ ]"; } > constraints.txt
	$(PY) hack/vision_constraints.py
