#!/usr/bin/env bash
# Build the systemd test image for the molecule scenarios, from debootstrap.
#
# There is no image registry here: the root filesystem is made by debootstrap
# from the Debian mirror and `docker import`ed; the Dockerfile beside this
# script adds systemd and python3 on top. Both images are tagged with a hash of
# this recipe (this script + Dockerfile), so they are rebuilt only when it
# changes. Prints the final image reference on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
suite="${SSEKIT_SUITE:-bookworm}"
mirror="${SSEKIT_MIRROR:-http://deb.debian.org/debian}"
repo="${SSEKIT_IMAGE_REPO:-ssekit/debian-systemd}"

hash="$(cat "$here/build.sh" "$here/Dockerfile" | sha256sum | cut -c1-12)"
base="ssekit/debian-rootfs:${suite}-${hash}"
image="${repo}:${suite}-${hash}"

log() { echo "build.sh: $*" >&2; }

if docker image inspect "$image" >/dev/null 2>&1; then
  log "up to date: $image"
  docker tag "$image" "${repo}:latest"
  echo "$image"
  exit 0
fi

if ! docker image inspect "$base" >/dev/null 2>&1; then
  work="$(mktemp -d /var/tmp/ssekit-rootfs.XXXXXX)"
  trap 'rm -rf "$work"' EXIT
  log "debootstrap $suite from $mirror into $work"
  timeout 900 debootstrap --variant=minbase --components=main \
    "$suite" "$work/rootfs" "$mirror" >&2
  cat > "$work/rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb ${mirror%/debian}/debian-security $suite-security main
SOURCES
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  log "docker import -> $base"
  tar -C "$work/rootfs" -c . | docker import - "$base" >&2
fi

log "docker build -> $image"
timeout 900 docker build --build-arg "BASE=$base" -t "$image" -t "${repo}:latest" "$here" >&2
echo "$image"
