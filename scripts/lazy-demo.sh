#!/usr/bin/env bash
# `make lazy-demo`: lazy (post-copy) migration on two hosts on this machine (two-hosts.sh). A
# workload holding MIB MiB (default 1024) of PRNG-filled memory (bench/memhog.c) moves A → B the
# usual way (straight across, the pages streamed to a CRIU page server on B during the dump), then
# B → A lazily: the container runs on A before its memory has arrived, and the pages follow from
# B's page server, on first touch and in the background. After each move every byte of the memory
# is checked against the PRNG stream. It prints downtime, total time and bytes of both moves side
# by side.
#
#   usage: scripts/lazy-demo.sh [MIB]
#
# Needs root, `make deps` and `make install` (containerd-shim-custom-v2 and container-migrate on
# PATH). Leaves nothing behind: namespaces, daemons and files go on exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
MIB=${1:-1024}
SEED=$RANDOM$RANDOM

DEMO=lazy-demo
TAG=lz
# shellcheck source=two-hosts.sh
source "$here/two-hosts.sh"

step "run 'hog' on A: $MIB MiB filled from a PRNG stream (seed $SEED), ticking every 50 ms"
ctr_on a run -d --runtime "$RT" "$IMG" hog memhog "$MIB" "$SEED"
pid_of() { ctr_on "$1" tasks ls | awk '$1=="hog"{print $2}'; }
report() { cat "/proc/$(pid_of "$1")/root/memhog" 2>/dev/null; }
field() { report "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
until [ -n "$(report a)" ]; do sleep 0.1; done
echo "on A: $(report a)"

# Asks the workload to compare its memory with the PRNG stream; fails unless every word matches.
verify() { # HOST
  local before; before=$(field "$1" verified)
  ctr_on "$1" tasks kill -s SIGUSR1 hog
  until [ "$(field "$1" verified)" -gt "$before" ] 2>/dev/null; do sleep 0.1; done
  [ "$(field "$1" bad)" = 0 ] || die "on $1: $(field "$1" bad) words of memory differ"
  echo "on $1: all $MIB MiB checked, intact ($(report "$1"))"
}

rows=()
move() { # FROM TO LABEL [args...]
  local from=$1 to=$2 label=$3; shift 3
  local to_addr=$NET.1; [ "$to" = b ] && to_addr=$NET.2
  step "move: $from → $to, $label"
  cm_on "$to" receive --once --listen "$to_addr:7070" >"$dir/receive.log" 2>&1 &
  local rpid=$!
  until nsenter --net="/run/netns/$tag-$to" ss -ltn | grep -q ":7070 "; do sleep 0.05; done
  local out
  out=$(cm_on "$from" --json migrate hog --to "tcp://$to_addr:7070" "$@") \
    || { cat "$dir/receive.log" >&2; echo "$out" >&2; die "migration failed"; }
  wait "$rpid" || { cat "$dir/receive.log" >&2; die "the receiver failed"; }
  local res; res=$(grep '"event":"result"' <<<"$out")
  local get; get() { python3 -c "import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2]) or 0)" "$res" "$1"; }
  local t1; t1=$(field "$to" tick)
  until [ "$(field "$to" tick)" -gt "$((t1 + 3))" ] 2>/dev/null; do sleep 0.05; done
  echo "on $to: ticking ($(report "$to"))"
  [ "$label" = lazy ] && echo "memory pages: $(get lazy_bytes) bytes pulled by A in $(printf '%.0f' "$(get lazy_transfer_ms)") ms, while the container ran"
  verify "$to"
  rows+=("$(printf '%-28s %12s %10s %14s' "$label" "$(get downtime_ms)" "$(printf '%.0f' "$(get total_ms)")" "$(get bytes_moved)")")
}
move a b "full (page server in the dump)"
move b a lazy --lazy

step "$MIB MiB, A → B full, then B → A lazy (downtime: the source stopped → the destination runs)"
printf '%-28s %12s %10s %14s\n' migration downtime_ms total_ms bytes_moved
printf '%s\n' "${rows[@]}"
echo
echo "OK: $MIB MiB moved twice, every byte intact; the lazy move ran the container before its memory arrived"
