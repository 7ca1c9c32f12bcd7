#!/usr/bin/env bash
# Builds the real-program image of the workload tests: a Debian bookworm root made by debootstrap
# (minbase) with Debian's own packages — redis-server, postgresql, nginx-light, python3 — written as
# a one-layer OCI image-layout tar named docker.io/library/shimtest-workloads:latest. No registry
# is needed: the packages come from the Debian archive the machine uses.
#
#   usage: scripts/build-workload-image.sh [OUTPUT.tar]
#          (default: $SHIMTEST_CACHE_DIR/workloads.tar, SHIMTEST_CACHE_DIR defaulting to
#          /var/cache/containerd-shim-custom-v2)
#
# Cached: the tar is kept outside the work tree, with a stamp (this script, scripts/oci-image.sh
# and the package list); while the stamp matches nothing is done, so `make test` builds it once
# per machine (a few minutes: debootstrap downloads about 60 MB). Safe to run concurrently (flock).
set -euo pipefail

IMAGE_NAME="docker.io/library/shimtest-workloads:latest"
PACKAGES="redis-server,redis-tools,postgresql,postgresql-client,nginx-light,python3,procps,iproute2"
SUITE=bookworm
MIRROR="${DEBOOTSTRAP_MIRROR:-http://deb.debian.org/debian}"
EPOCH="${SOURCE_DATE_EPOCH:-0}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${SHIMTEST_CACHE_DIR:-/var/cache/containerd-shim-custom-v2}"
out="${1:-$cache/workloads.tar}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac

die() { echo "build-workload-image: $*" >&2; exit 1; }
for t in debootstrap tar gzip sha256sum flock; do
  command -v "$t" >/dev/null || die "$t is required (scripts/install-deps.sh installs it)"
done
[ "$(id -u)" = 0 ] || die "debootstrap needs root"

mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock 9

stamp_want=$( { sha256sum "${BASH_SOURCE[0]}" "$here/oci-image.sh" | cut -d' ' -f1; echo "$SUITE $PACKAGES $EPOCH $IMAGE_NAME"; } | sha256sum | cut -d' ' -f1)
if [ -f "$out" ] && [ -f "$out.stamp" ] && [ "$(cat "$out.stamp")" = "$stamp_want" ]; then
  echo "build-workload-image: $out is up to date ($IMAGE_NAME)"
  exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/shimtest-workloads.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
echo "build-workload-image: debootstrap $SUITE with $PACKAGES (a few minutes)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
  { tail -30 "$work/debootstrap.log"; die "debootstrap failed"; }
# What a container does not need or must not share: the package caches, the machine's identity.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
: >"$rootfs/etc/machine-id"
printf 'workloads\n' >"$rootfs/etc/hostname"
[ -d "$rootfs/var/lib/postgresql/15/main" ] || die "debootstrap made no PostgreSQL cluster"
mkdir -p "$rootfs/var/run/postgresql" && chroot "$rootfs" chown postgres:postgres /var/run/postgresql

# shellcheck source=scripts/oci-image.sh
. "$here/oci-image.sh"
write_oci_image "$rootfs" "$work" "$out" "$IMAGE_NAME" latest \
  '"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8"],"Cmd":["/bin/bash"],"WorkingDir":"/"' \
  "$EPOCH" keep
echo "$stamp_want" >"$out.stamp"
echo "build-workload-image: wrote $out ($IMAGE_NAME, manifest sha256:$OCI_MANIFEST_DIGEST, $(du -h "$out" | cut -f1))"
