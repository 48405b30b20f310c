# The local cluster through Vagrant's docker provider: the Vagrantfile at the
# repo root, the inventory in inventories/vagrant/. Included by the root
# Makefile after mk/cluster.mk (uses its cluster-prepare and the Makefile's venv).
#   make up            this machine prepared, `vagrant up`, URLs and curl lines
#   make down          vagrant destroy -f
#   make test-vagrant  make up from scratch, smoke test, chat page, re-deploy changes
#                      nothing, curl lines work, make down (tests/vagrant/test.sh)

VAGRANT_IMAGE ?= ssekit/vagrant-debian:latest
# The venv's ansible-playbook for the provisioner; plain output for logs.
VAGRANT = env PATH=$(DEPLOY_BIN):$$PATH SSEKIT_VAGRANT_IMAGE=$(VAGRANT_IMAGE) VAGRANT_NO_COLOR=1 vagrant

.PHONY: vagrant-deps vagrant-image up down test-vagrant

# Debian's vagrant (its docker provider drives the containers), docker.io and
# debootstrap in one apt run, python3-venv where python3 cannot make a venv;
# then dockerd and the systemd base image (cluster-prepare) and the venv with
# ansible and the ssehub CLI (for tokens). Each step is skipped when done.
VAGRANT_DEBIAN_PACKAGES := vagrant docker.io debootstrap
vagrant-deps:
	@missing=""; for p in $(VAGRANT_DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "==> apt-get install$$missing"; \
	  timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  timeout 900 apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@echo "==> dockerd, the systemd base image (tests/cluster/prepare.sh), the venv"
	@$(MAKE) --no-print-directory cluster-prepare venv

# The base image plus sshd and a vagrant user (tests/vagrant/Dockerfile).
vagrant-image: vagrant-deps
	@echo "==> docker build $(VAGRANT_IMAGE) (tests/vagrant/Dockerfile; cached after the first time)"
	@timeout 900 docker build -q -t $(VAGRANT_IMAGE) tests/vagrant >/dev/null

up: vagrant-image
	@echo "==> vagrant up: the machines one by one, then site.yml deploys them and smoke-tests the proxy"
	timeout 2400 $(VAGRANT) up --provider=docker
	@tests/vagrant/urls.sh

down:
	timeout 600 $(VAGRANT) destroy -f

# test.sh runs `make up` and `make down` itself (up's vagrant-image is cached by
# then); its own vagrant ssh/provision/status see the same image.
test-vagrant: vagrant-image
	SSEKIT_VAGRANT_IMAGE=$(VAGRANT_IMAGE) timeout 3600 tests/vagrant/test.sh
