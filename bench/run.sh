#!/usr/bin/env bash
# `make bench`: containerd-shim-custom-v2 (release) against containerd's Go runc shim, side by side
# in one run on one private containerd. Builds what it needs (the release shim, the bench binary,
# the test and bench images), runs the benchmark as root, writes bench/results/results.md,
# results.json and chart.png.
#
#   usage: bench/run.sh [--quick] [--out DIR] [--only memory,lifecycle,checkpoint,restore,diff,cri,migrate]
#                       [--rounds N] [--ckpt-mib 16,256,1024] [--diff-mib N] [--diff-files 1,10000]
#
# --quick: fewer rounds and smaller sizes, a sanity check (about a minute); the full run takes a
# few minutes and wants a quiet machine. Needs `make deps` (containerd, runc, CRIU, busybox-static,
# protoc), gcc with a static libc, and python3 (matplotlib is installed from bench/requirements.txt
# into target/bench-venv when python3 lacks it).
# Environment: SHIM_BINARY (default target/release/containerd-shim-custom-v2, built here unless
# set), MIGRATE_BINARY (default target/release/container-migrate, likewise), BENCH_SKIP_BUILD=1 (use what is built), BENCH_VERBOSE=1 (each checkpoint's figures as they
# come), BENCH_DIFF_FS=default|xfs (the diff scenario on one of its two filesystems only; both by
# default), CARGO, CARGO_TARGET_DIR.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"
CARGO="${CARGO:-cargo}"
target="${CARGO_TARGET_DIR:-$root/target}"

die() { echo "bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run me as root (containerd, runc and CRIU need it)"
for t in containerd ctr runc criu containerd-shim-runc-v2 gcc python3 tar gzip; do
  command -v "$t" >/dev/null || die "$t not found: run \`make deps\`"
done

out="$here/results"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = --out ] && out="${args[$((i + 1))]:-$out}"
done
mkdir -p "$out"

# --- build ---------------------------------------------------------------------------------------
if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  if [ -z "${SHIM_BINARY:-}" ] || [ -z "${MIGRATE_BINARY:-}" ]; then
    echo "bench: building the release shim (static, LTO: minutes when it is out of date) and container-migrate"
    CARGO="$CARGO" bash scripts/build-release.sh
  fi
  echo "bench: building the bench binary"
  "$CARGO" build -p integration --bin bench
fi
bash scripts/build-test-image.sh target/test-image/shimtest.tar
bash bench/build-bench-image.sh target/bench-image/shimbench.tar

# --- python for the chart ----------------------------------------------------------------------------
venv="$root/target/bench-venv"
python=""
if python3 -c 'import matplotlib' 2>/dev/null; then
  python=python3
elif [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python="$venv/bin/python"
else
  echo "bench: installing matplotlib into $venv (bench/requirements.txt)"
  if python3 -m venv "$venv" && "$venv/bin/python" -m pip install -q -r bench/requirements.txt; then
    python="$venv/bin/python"
  elif python3 -m pip install -q --target "$root/target/bench-pydeps" -r bench/requirements.txt; then
    export PYTHONPATH="$root/target/bench-pydeps${PYTHONPATH:+:$PYTHONPATH}"
    python=python3
  else
    echo "bench: WARNING: no matplotlib, there will be no chart.png" >&2
  fi
fi

# --- run ----------------------------------------------------------------------------------------------
status=0
SHIM_BINARY="${SHIM_BINARY:-$target/release/containerd-shim-custom-v2}" \
  MIGRATE_BINARY="${MIGRATE_BINARY:-$target/release/container-migrate}" \
  "$target/debug/bench" --out "$out" "$@" || status=$?
if [ -f "$out/results.json" ] && [ -n "$python" ]; then
  "$python" bench/chart.py "$out/results.json" "$out/chart.png" || status=1
fi
[ -f "$out/results.md" ] && echo "bench: results in $out/results.md"
exit "$status"
