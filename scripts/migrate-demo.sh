#!/usr/bin/env bash
# `make migrate-demo`: two hosts on this machine (containerd A and containerd B, each in a network
# namespace of its own, a bridge and a registry between them, a client on the bridge), one
# container with memory (128 MiB touched, a token only its memory holds), files (rootfs changes, a
# bind-mounted volume) and an established TCP connection from the client, moved A → B straight
# across, B → A through an archive file, and A → B through the registry. Per path it prints the
# downtime (the source stopped → the destination started), the total time and the bytes moved,
# and checks that the memory, the files and the connection came along.
#
# Needs root, `make deps` and `make install` (containerd-shim-custom-v2 and container-migrate on
# PATH). Leaves nothing behind: namespaces, daemons and files go on exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")

DEMO=migrate-demo
TAG=md
# shellcheck source=two-hosts.sh
source "$here/two-hosts.sh"

step "run 'demo' on A: 128 MiB of memory, a token only its memory holds, file changes, a volume, a TCP server"
mkdir -p "$dir/vol-a" "$dir/vol-b"
echo "written on A" >"$dir/vol-a/seed"
WORKLOAD='workload 128 >/dev/null & token=$RANDOM$RANDOM; echo moved-with-me > /etc/motd; sleep 1000000 | nc -l -p 6000 > /tmp/got &
i=0; while :; do i=$((i+1)); echo "$token $i" > /counter; echo "$token $i" > /data/counter; sleep 0.1; done'
ctr_on a run -d --net-host --runtime "$RT" --label app=demo \
  --mount "type=bind,src=$dir/vol-a,dst=/data,options=rbind:rw" "$IMG" demo sh -c "$WORKLOAD"
pid_of() { ctr_on "$1" tasks ls | awk '$1=="demo"{print $2}'; }
# The workload rewrites /counter with `>` (truncate, then write): read until a whole line shows.
counter() {
  local c
  for _ in $(seq 1 50); do
    c=$(cat "/proc/$(pid_of "$1")/root/counter" 2>/dev/null) || true
    [ -n "$c" ] && { echo "$c"; return 0; }
    sleep 0.02
  done
  return 1
}
until [ -n "$(counter a)" ] && [ -e "/proc/$(pid_of a)/root/maxgap" ]; do sleep 0.1; done
sleep 0.5
nsenter --net="/run/netns/$tag-net" busybox sh -c \
  "i=0; while :; do i=\$((i+1)); echo \$i; sleep 0.1; done | busybox nc $VIP 6000" &
client=$!
pids+=($client)
received() { tail -n1 "/proc/$(pid_of "$1")/root/tmp/got" 2>/dev/null; }
until [ "$(received a)" -gt 5 ] 2>/dev/null; do sleep 0.1; done
echo "counter (token i): $(counter a); the server received ${VIP}:6000 line $(received a) from the client"

rows=()
move() { # FROM TO VIA [args...]
  local from=$1 to=$2 via=$3; shift 3
  local to_addr=$NET.1; [ "$to" = b ] && to_addr=$NET.2
  step "move A/B: $from → $to via $via"
  local before; before=$(counter "$from")
  cm_on "$to" receive --once --listen "$to_addr:7070" --allow-bind "$dir" --allow-host-network >"$dir/receive.log" 2>&1 &
  local rpid=$!
  until nsenter --net="/run/netns/$tag-$to" ss -ltn | grep -q ":7070 "; do sleep 0.05; done
  local out
  out=$(cm_on "$from" --json migrate demo --to "tcp://$to_addr:7070" --via "$via" --tcp-established \
    --volume-map "/data=$dir/vol-$to" "$@") || { cat "$dir/receive.log" >&2; echo "$out" >&2; die "migration failed"; }
  wait "$rpid" || { cat "$dir/receive.log" >&2; die "the receiver failed"; }
  # The service address moves with the container.
  ip -n "$tag-net" route replace "$VIP" via "$to_addr"
  local res; res=$(grep '"event":"result"' <<<"$out")
  local get; get() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$res" "$1"; }
  local got_before; got_before=$(received "$to")
  until [ "$(received "$to")" -gt "$((got_before + 5))" ] 2>/dev/null; do sleep 0.1; done
  local after; after=$(counter "$to")
  [ "${after%% *}" = "${before%% *}" ] || die "the token changed: $before → $after"
  [ "$(cut -d' ' -f1 "$dir/vol-$to/counter")" = "${before%% *}" ] || die "the volume did not come along"
  kill -0 "$client" || die "the client's connection broke"
  echo "on $to: counter $after (was $before on $from), the server received line $(received "$to") on the same connection"
  echo "files: /etc/motd '$(cat "/proc/$(pid_of "$to")/root/etc/motd")', volume seed '$(cat "$dir/vol-$to/seed")'"
  echo "labels on $to: $(ctr_on "$to" containers info demo | python3 -c 'import json,sys; print(json.load(sys.stdin)["Labels"].get("app"))')"
  rows+=("$(printf '%-9s %10s %10s %12s %12s' "$via" "$(get downtime_ms)" "$(printf '%.0f' "$(get total_ms)")" "$(get bytes_moved)" "$(printf '%.1f' "$(get dump_ms)")")")
}
move a b stream
move b a archive --archive "$dir/demo-checkpoint.tar"
move a b registry --image "$REG/demo-checkpoint:1"

step "per path (downtime: the source stopped → the destination started)"
printf '%-9s %10s %10s %12s %12s\n' path downtime_ms total_ms bytes_moved dump_ms
printf '%s\n' "${rows[@]}"
echo
echo "OK: the container moved three times with its memory (token $(counter b | cut -d' ' -f1)), files, volume, labels and its client's TCP connection"
