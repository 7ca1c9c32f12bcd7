#!/usr/bin/env bash
# Builds the integration-test image as an OCI image-layout tar, from local parts only (no registry):
# a rootfs with Debian's static busybox (package busybox-static) and a symlink per applet in /bin,
# /tmp, /etc/passwd and /etc/group for root. One gzip layer, a linux/amd64 config with Cmd ["/bin/sh"],
# a manifest and an index.json whose annotations name the image.
#
#   usage: scripts/build-test-image.sh [OUTPUT.tar]      (default: target/test-image/shimtest.tar)
#          scripts/build-test-image.sh --pause [OUTPUT.tar]
#                                        (default: target/test-image/pause.tar)
#
# --pause builds the CRI tests' sandbox image instead: scripts/pause.c compiled static as /pause,
# the entrypoint, named docker.io/library/shimtest-pause:latest.
#
# Load it with `ctr -n NS images import OUTPUT.tar`; containerd 2.1 then names the image
#   docker.io/library/shimtest:latest
# (taken from the `io.containerd.image.name` annotation of the index entry).
#
# Reproducible: fixed mtimes (SOURCE_DATE_EPOCH, default 0), sorted entries, numeric root owner,
# `gzip -n`; the same busybox gives the same digests. Idempotent and fast: when OUTPUT exists and
# its stamp (hash of this script + the busybox binary) matches, nothing is done. Safe to run
# concurrently (flock on OUTPUT.lock; the tar is written to a temp file and renamed).
set -euo pipefail

PAUSE=0
if [ "${1:-}" = --pause ]; then PAUSE=1; shift; fi
IMAGE_NAME="docker.io/library/shimtest:latest"
[ "$PAUSE" = 1 ] && IMAGE_NAME="docker.io/library/shimtest-pause:latest"
IMAGE_TAG="latest"
BUSYBOX="${BUSYBOX:-/bin/busybox}"
EPOCH="${SOURCE_DATE_EPOCH:-0}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
default_out="$root/target/test-image/shimtest.tar"
[ "$PAUSE" = 1 ] && default_out="$root/target/test-image/pause.tar"
out="${1:-$default_out}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac

die() { echo "build-test-image: $*" >&2; exit 1; }
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found: install Debian's busybox-static (scripts/install-deps.sh)"
file_ok=$(LC_ALL=C od -An -tx1 -N4 "$BUSYBOX" | tr -d ' \n')
[ "$file_ok" = "7f454c46" ] || die "$BUSYBOX is not an ELF binary"
for t in tar gzip sha256sum flock; do command -v "$t" >/dev/null || die "$t is required"; done

mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock 9

stamp_want=$( { sha256sum "${BASH_SOURCE[0]}" "$here/oci-image.sh" "$BUSYBOX" "$here/pause.c" | cut -d' ' -f1; echo "$EPOCH $IMAGE_NAME"; } | sha256sum | cut -d' ' -f1)
if [ -f "$out" ] && [ -f "$out.stamp" ] && [ "$(cat "$out.stamp")" = "$stamp_want" ]; then
  echo "build-test-image: $out is up to date ($IMAGE_NAME)"
  exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/shimtest-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- rootfs -----------------------------------------------------------------------------------
rootfs="$work/rootfs"
if [ "$PAUSE" = 1 ]; then
  command -v cc >/dev/null || die "cc is required (build-essential)"
  mkdir -p "$rootfs"
  cc -static -Os -Wall -o "$rootfs/pause" "$here/pause.c" || die "cannot build $here/pause.c statically"
  strip "$rootfs/pause" 2>/dev/null || true
  image_config='"Entrypoint":["/pause"],"WorkingDir":"/"'
  n=0
else
image_config='"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"'
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev,run,var/tmp}
chmod 1777 "$rootfs/tmp" "$rootfs/var/tmp"
chmod 0700 "$rootfs/root"
cp "$BUSYBOX" "$rootfs/bin/busybox"
chmod 0755 "$rootfs/bin/busybox"
# Every applet as a relative symlink in /bin (PATH of the image covers /bin).
n=0
while IFS= read -r applet; do
  [ -n "$applet" ] && [ "$applet" != busybox ] || continue
  ln -sf busybox "$rootfs/bin/$applet"
  n=$((n + 1))
done < <("$BUSYBOX" --list)
[ "$n" -gt 50 ] || die "busybox --list gave only $n applets"
for a in sh sleep cat echo ls true false; do
  [ -L "$rootfs/bin/$a" ] || die "applet $a missing from $BUSYBOX"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
printf 'shimtest\n' >"$rootfs/etc/hostname"
: >"$rootfs/etc/hosts"
: >"$rootfs/etc/resolv.conf"
chmod 0644 "$rootfs"/etc/*
# A nested file and a name that is not UTF-8, for the rootfs diff tests (deletions at depth, names
# as bytes).
mkdir -p "$rootfs/data/sub"
printf 'keep\n' >"$rootfs/data/sub/keep.txt"
printf 'latin1\n' >"$rootfs/data/$(printf 'caf\351')"
# Files a workload changes, deletes, and a directory it replaces (the CRI checkpoint tests).
printf 'original\n' >"$rootfs/data/change.txt"
printf 'doomed\n' >"$rootfs/data/delete.txt"
mkdir -p "$rootfs/data/replace"
printf 'old\n' >"$rootfs/data/replace/old.txt"
fi

# --- layer and OCI layout ----------------------------------------------------------------------
# shellcheck source=scripts/oci-image.sh
. "$here/oci-image.sh"
write_oci_image "$rootfs" "$work" "$out" "$IMAGE_NAME" "$IMAGE_TAG" "$image_config" "$EPOCH" root
echo "$stamp_want" >"$out.stamp"
echo "build-test-image: wrote $out ($IMAGE_NAME, manifest sha256:$OCI_MANIFEST_DIGEST, $n applets)"
