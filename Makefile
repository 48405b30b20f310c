# ssekit: the two commands are `make up` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := redis-server postgresql pgbouncer nginx caddy curl chromium iptables

.PHONY: help deps venv up-local down-local test lint test-app bench wheel

help:
	@echo "make up      the cluster in Vagrant (docker): proxy, app hosts, Redis, PostgreSQL deployed by site.yml; smoke-tested"
	@echo "make down    vagrant destroy -f"
	@echo "make up-local    start Redis, PostgreSQL, the hub (gunicorn) and nginx on loopback; smoke-test it"
	@echo "make down-local  stop what make up-local started"
	@echo "make test    lint (Python, roles), the app's tests (real Redis, PostgreSQL, pgbouncer, nginx, Caddy, Chromium), both Molecule scenarios, test-vagrant"
	@echo "make bench   the benchmark (prints figures)"

# Debian packages the stack and the tests run (skipped when already there).
deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): app/pyproject.toml $(wildcard requirements-deploy.txt)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e 'app[test]'
	@if [ -f requirements-deploy.txt ]; then $(PY) -m pip install -q -r requirements-deploy.txt; fi
	touch $@

venv: $(STAMP)

up-local: deps venv
	$(PY) tests/stack.py up

down-local:
	$(PY) tests/stack.py down

lint: venv
	$(VENV)/bin/ruff check app tests ansible
	cd app && ../$(VENV)/bin/mypy src/ssehub

test-app: deps venv
	$(VENV)/bin/pytest app/tests

# lint-deploy and test-cluster live in mk/cluster.mk: yamllint, ansible-lint
# production profile, role checks; then both Molecule scenarios (docker, systemd).
test: lint lint-deploy test-app test-cluster test-vagrant

bench: deps venv
	$(PY) tests/bench/run.py

wheel: venv
	$(PY) -m pip wheel --no-deps -w dist ./app

-include mk/cluster.mk
-include mk/vagrant.mk
