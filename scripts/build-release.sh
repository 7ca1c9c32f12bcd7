#!/usr/bin/env bash
# Builds the release shim and container-migrate (`make release`, the bench). The shim ends up at
# <target dir>/release/containerd-shim-custom-v2, as `cargo build --release` would put it, but
# linked statically (glibc's crt-static, static-pie):
#   - every container has a shim of its own, and a static shim maps no dynamic loader and no
#     shared libraries: its idle RSS goes down by over a megabyte (libc.so alone maps 1.3 MiB);
#   - CRIU runs the shim as its action script several times per restore and once per dump: an
#     exec with nothing to load or relocate but the binary itself is quicker;
#   - it stays position-independent (ASLR), as the dynamic build is.
# crt-static has to be given with an explicit --target: without one, cargo would also apply it to
# the proc-macros, which cannot be linked statically. The shim resolves no host or user names
# (only IP literals and numeric ids), so glibc's NSS, which a static binary would load at run
# time, is never used. Without glibc's static library (libc.a: Debian's libc6-dev, Fedora's
# glibc-static) the shim is linked dynamically, with a warning.
# RUSTFLAGS from the environment are kept (cargo's own build.rustflags are not read when
# RUSTFLAGS is set).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
CARGO="${CARGO:-cargo}"
shim=containerd-shim-custom-v2

# Wherever cargo puts its output (CARGO_TARGET_DIR, build.target-dir), as it says itself.
target="$("$CARGO" metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
[ -n "$target" ] || { echo "build-release: cargo metadata names no target directory" >&2; exit 1; }
host="$(rustc -vV | sed -n 's/^host: //p')"
[ -n "$host" ] || { echo "build-release: rustc -vV names no host triple" >&2; exit 1; }

libc_a="$(${CC:-cc} -print-file-name=libc.a 2>/dev/null || true)"
if [ -n "$libc_a" ] && [ -f "$libc_a" ]; then
  unset CARGO_ENCODED_RUSTFLAGS
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    "$CARGO" build --release --target "$host" -p "$shim"
  built="$target/$host/release/$shim"
  # Static means no program interpreter: anything else is a build that went wrong.
  if readelf -lW "$built" | grep -q 'Requesting program interpreter'; then
    echo "build-release: $built was linked dynamically despite crt-static" >&2
    exit 1
  fi
  install -D -m 0755 "$built" "$target/release/$shim"
else
  echo "build-release: warning: no static glibc (libc.a) for ${CC:-cc}: the shim is linked" \
    "dynamically (install libc6-dev, or glibc-static)" >&2
  "$CARGO" build --release -p "$shim"
fi
"$CARGO" build --release -p container-migrate
