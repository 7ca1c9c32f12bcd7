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

RT=io.containerd.custom.v2
NET=10.213.0
REG=$NET.254:5000
VIP=$NET.100
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "migrate-demo: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run me as root"
for t in containerd ctr runc criu docker-registry ip nsenter iptables containerd-shim-custom-v2 container-migrate busybox; do
  command -v "$t" >/dev/null || die "$t is not on PATH: run 'make deps' and 'make install'"
done
bash "$here/build-test-image.sh" "$top/target/test-image/shimtest.tar" >/dev/null
bash "$top/bench/build-bench-image.sh" "$top/target/bench-image/shimbench.tar" >/dev/null

dir=$(mktemp -d /tmp/migrate-demo.XXXXXX)
tag=md$$
pids=()
cleanup() {
  set +e
  for h in a b; do
    [ -S "$dir/$h/containerd.sock" ] || continue
    for t in $(ctr -a "$dir/$h/containerd.sock" -n "$tag$h" tasks ls -q 2>/dev/null); do
      ctr -a "$dir/$h/containerd.sock" -n "$tag$h" tasks kill -s KILL "$t" >/dev/null 2>&1
    done
  done
  sleep 0.5
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  pkill -f "containerd-shim-custom-v2 -namespace $tag[ab] -address $dir" 2>/dev/null
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  for h in a b; do
    for c in $(runc --root "/run/containerd/runc/$tag$h" list -q 2>/dev/null); do
      runc --root "/run/containerd/runc/$tag$h" delete -f "$c" 2>/dev/null
    done
    rm -rf "/run/containerd/runc/$tag$h"
  done
  for n in net a b; do ip netns del "$tag-$n" 2>/dev/null; done
  grep -o " $dir[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
  for h in a b; do
    for cg in /sys/fs/cgroup/$tag$h /sys/fs/cgroup/*/$tag$h; do
      [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
    done
  done
  rm -rf "$dir"
}
trap cleanup EXIT

step "network: $tag-net (bridge $NET.254, registry, client), $tag-a ($NET.1), $tag-b ($NET.2)"
for n in net a b; do ip netns add "$tag-$n"; ip -n "$tag-$n" link set lo up; done
ip -n "$tag-net" link add br0 type bridge
ip -n "$tag-net" addr add "$NET.254/24" dev br0
ip -n "$tag-net" link set br0 up
i=1
for h in a b; do
  ip link add "$tag$h" netns "$tag-$h" type veth peer name "$tag${h}n" netns "$tag-net"
  ip -n "$tag-$h" addr add "$NET.$i/24" dev "$tag$h"
  ip -n "$tag-$h" link set "$tag$h" up
  ip -n "$tag-net" link set "$tag${h}n" master br0 up
  # The service address: on both hosts; the network routes it to where the container is.
  ip -n "$tag-$h" addr add "$VIP/32" dev lo
  i=$((i + 1))
done
ip -n "$tag-net" route add "$VIP" via "$NET.1"

mkdir -p "$dir/registry"
cat >"$dir/registry/config.yml" <<CFG
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $dir/registry/storage
http:
  addr: $REG
CFG
nsenter --net="/run/netns/$tag-net" docker-registry serve "$dir/registry/config.yml" >"$dir/registry/log" 2>&1 &
pids+=($!)

start_host() { # NAME
  local h=$1 d=$dir/$1
  mkdir -p "$d"
  cat >"$d/config.toml" <<CFG
version = 3
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.sandbox.controller.v1.shim", "io.containerd.nri.v1.nri"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
CFG
  nsenter --net="/run/netns/$tag-$h" containerd --config "$d/config.toml" >"$d/containerd.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 200); do
    ctr -a "$d/containerd.sock" version >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  tail "$d/containerd.log" >&2
  die "containerd $h did not start"
}
step "containerd A and containerd B, each in its own namespace, root, state and socket"
start_host a
start_host b
# One machine, one cgroup tree: each host its own namespace, so that the cgroups differ.
ctr_on() { local h=$1; shift; nsenter --net="/run/netns/$tag-$h" ctr -a "$dir/$h/containerd.sock" -n "$tag$h" "$@"; }
cm_on() {
  local h=$1; shift
  nsenter --net="/run/netns/$tag-$h" container-migrate -a "$dir/$h/containerd.sock" -n "$tag$h" \
    --work-dir "$dir/$h/migrate" --plain-http "$@"
}

IMG=$REG/shimbench:latest
ctr_on a images import "$top/target/bench-image/shimbench.tar" >/dev/null
ctr_on a images tag docker.io/library/shimbench:latest "$IMG" >/dev/null
ctr_on a images push --plain-http "$IMG" >/dev/null
echo "base image $IMG: in the registry and on A; B pulls it when it needs it"

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
