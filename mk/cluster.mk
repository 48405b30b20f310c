# Deployment targets (roles, lint, molecule scenarios). Included by the root
# Makefile with `-include mk/cluster.mk`.

VENV ?= .venv
DEPLOY_BIN := $(CURDIR)/$(VENV)/bin
DEPLOY_ENV := PATH=$(DEPLOY_BIN):$$PATH ANSIBLE_FORCE_COLOR=0 PY_COLORS=0
CLUSTER_SCENARIOS ?= cluster single-host-caddy

.PHONY: deploy-deps cluster-prepare test-cluster lint-deploy $(addprefix test-cluster-,$(CLUSTER_SCENARIOS))

# Controller tool chain (ansible, molecule, testinfra, linters) in the venv, and
# the tests' harness the cluster's checks import (tokens, the SSE parser).
deploy-deps:
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	timeout 900 $(VENV)/bin/pip install -q -r requirements-deploy.txt
	$(VENV)/bin/pip install -q --no-deps -e tests/support

# docker.io + debootstrap, dockerd running, the systemd base image (cached).
cluster-prepare:
	VENV=$(CURDIR)/$(VENV) timeout 1800 tests/cluster/prepare.sh

# Both molecule scenarios from scratch: create, converge, idempotence, verify, destroy.
test-cluster: cluster-prepare $(addprefix test-cluster-,$(CLUSTER_SCENARIOS))

# A static pattern rule: plain pattern rules are never used for .PHONY targets.
$(addprefix test-cluster-,$(CLUSTER_SCENARIOS)): test-cluster-%:
	cd tests/cluster && $(DEPLOY_ENV) timeout 2700 molecule test -s $*

lint-deploy:
	$(DEPLOY_ENV) timeout 600 yamllint -s site.yml roles inventories ansible tests/cluster .config/molecule .yamllint .ansible-lint
	$(DEPLOY_ENV) timeout 900 ansible-lint site.yml roles ansible tests/cluster/molecule
	$(DEPLOY_ENV) timeout 300 pytest -q -p no:cacheprovider tests/cluster/test_roles_static.py
