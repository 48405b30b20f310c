# ssekit: the two commands are `make up` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := redis-server postgresql pgbouncer nginx caddy curl chromium iptables

.PHONY: help deps venv lock up-local down-local test lint test-app test-deploy bench wheel

help:
	@echo "make up      the cluster in Vagrant (docker): proxy, app hosts, Redis, PostgreSQL deployed by site.yml; smoke-tested"
	@echo "make down    vagrant destroy -f"
	@echo "make up-local    start Redis, PostgreSQL, the hub (gunicorn) and nginx on loopback; smoke-test it"
	@echo "make down-local  stop what make up-local started"
	@echo "make test    lint (Python, roles), the app's tests (real Redis, PostgreSQL, pgbouncer, nginx, Caddy, Chromium), the deploy's tests on loopback, both Molecule scenarios, test-vagrant"
	@echo "make bench   the benchmark (prints figures)"

# Debian packages the stack and the tests run (skipped when already there).
deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The hub's runtime dependencies, and the setuptools that builds its wheel,
# pinned with hashes for the deploy target, Debian 12's Python on x86_64 glibc
# (the ssehub role builds each release's wheelhouse from this file). Markers
# are decided for that exact Python: redis needs async-timeout below 3.11.3, so
# the lock has it, and a newer 3.11 (this controller's) installs it harmlessly.
LOCK := app/requirements.lock
LOCK_PYTHON_VERSION := 3.11.2
LOCK_PLATFORM := x86_64-manylinux_2_36
UV_VERSION := 0.13.9
# make lock keeps every pin the ranges in app/pyproject.toml still allow;
# UPGRADE=uvicorn (names, space-separated) moves those, UPGRADE=all moves everything.
UPGRADE ?=

# The venv runs what a deploy installs: the lock with its hashes checked, then
# the app without resolving anything, then the test tools, which may not move
# a locked version (-c: a conflict fails here, not later in a test), and the
# tests' harness (ssekit_testing, tests/support).
$(STAMP): app/pyproject.toml $(LOCK) $(wildcard requirements-deploy.txt) tests/support/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e app
	sed -n 's/^\([A-Za-z0-9][^ ]*==[^ ]*\).*/\1/p' $(LOCK) > $(VENV)/lock-constraints.txt
	$(PY) -m pip install -q -c $(VENV)/lock-constraints.txt -e 'app[test]'
	@if [ -f requirements-deploy.txt ]; then $(PY) -m pip install -q -c $(VENV)/lock-constraints.txt -r requirements-deploy.txt; fi
	$(PY) -m pip install -q --no-deps -e tests/support
	touch $@

venv: $(STAMP)

# uv resolves for the target's Python and platform, not this machine's; the
# build backend's range comes from app/pyproject.toml's [build-system].
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/uv --version 2>/dev/null | grep -qw '$(UV_VERSION)' || $(PY) -m pip install -q uv==$(UV_VERSION)
	set -o pipefail; $(PY) -c 'import tomllib; print(*tomllib.load(open("app/pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	| $(VENV)/bin/uv pip compile -q app/pyproject.toml - --generate-hashes \
	  --python-version $(LOCK_PYTHON_VERSION) --python-platform $(LOCK_PLATFORM) \
	  --custom-compile-command 'make lock' --output-file $(LOCK) \
	  $(if $(filter all,$(UPGRADE)),--upgrade,$(addprefix --upgrade-package ,$(UPGRADE)))

up-local: deps venv
	$(PY) tests/stack.py up

down-local:
	$(PY) tests/stack.py down

lint: venv
	$(VENV)/bin/ruff check app tests ansible
	cd app && ../$(VENV)/bin/mypy src/ssehub

test-app: deps venv
	$(VENV)/bin/pytest app/tests

# The deploy side on this machine, no containers (tests/deploy): the roles' templates
# against templates/, the proxies as configured, the smoke check and its module.
test-deploy: deps venv
	$(VENV)/bin/pytest tests/deploy

# lint-deploy and test-cluster live in mk/cluster.mk: yamllint, ansible-lint
# production profile, role checks; then both Molecule scenarios (docker, systemd).
test: lint lint-deploy test-app test-deploy test-cluster test-vagrant

bench: deps venv
	$(PY) tests/bench/run.py

wheel: venv
	$(PY) -m pip wheel --no-deps -w dist ./app

-include mk/cluster.mk
-include mk/vagrant.mk
