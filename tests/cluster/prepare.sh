#!/usr/bin/env bash
# Prepare a bare Debian 12 machine for the molecule scenarios:
#   1. Debian's docker.io and debootstrap (apt),
#   2. dockerd running (started in the background when it is not),
#   3. the deploy tool chain in .venv (requirements-deploy.txt),
#   4. the systemd base image (tests/cluster/image/build.sh, cached by hash).
# Idempotent: every step is skipped when already done.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${VENV:-$root/.venv}"
log() { echo "prepare.sh: $*" >&2; }

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! timeout 20 docker info >/dev/null 2>&1; then
  log "starting dockerd in the background (log: /var/log/dockerd-ssekit.log)"
  nohup dockerd >/var/log/dockerd-ssekit.log 2>&1 &
  echo $! >/run/dockerd-ssekit.pid
  for _ in $(seq 1 60); do
    timeout 5 docker info >/dev/null 2>&1 && break
    sleep 1
  done
  timeout 10 docker info >/dev/null 2>&1 || { log "dockerd did not come up"; exit 1; }
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import molecule, molecule_plugins, testinfra, ansible_collections.community.postgresql' 2>/dev/null; then
  log "installing requirements-deploy.txt into $venv"
  timeout 900 "$venv/bin/pip" install -q -r "$root/requirements-deploy.txt"
fi

"$root/tests/cluster/image/build.sh"
