#!/usr/bin/env bash
# Builds the release shim and container-migrate (`make release`, the bench). The shim ends up at
# target/release/containerd-shim-custom-v2 (CARGO_TARGET_DIR's release/ when that is set), as
# `cargo build --release` would put it, but linked statically (glibc's crt-static, static-pie):
#   - every container has a shim of its own, and a static shim maps no dynamic loader and no
#     shared libraries: its idle RSS goes down by over a megabyte (libc.so alone maps 1.3 MiB);
#   - CRIU runs the shim as its action script several times per restore: an exec with nothing to
#     load or relocate but the binary itself is quicker;
#   - it stays position-independent (ASLR), as the dynamic build is.
# crt-static has to be given with an explicit --target: without one, cargo would also apply it to
# the proc-macros, which cannot be linked statically. The shim resolves no host names (only IP
# literals), so glibc's NSS, which a static binary would load at run time, is never used.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
CARGO="${CARGO:-cargo}"
target="${CARGO_TARGET_DIR:-$root/target}"
host="$(rustc -vV | sed -n 's/^host: //p')"
[ -n "$host" ] || { echo "build-release: rustc -vV names no host triple" >&2; exit 1; }

RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  "$CARGO" build --release --target "$host" -p containerd-shim-custom-v2
"$CARGO" build --release -p container-migrate
install -D -m 0755 "$target/$host/release/containerd-shim-custom-v2" \
  "$target/release/containerd-shim-custom-v2"
