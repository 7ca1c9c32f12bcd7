# Sourced by the demos (migrate-demo.sh, lazy-demo.sh): two hosts on this machine. containerd A
# and containerd B, each in a network namespace of its own with its own root, state and socket; a
# bridge namespace between them with a registry (the base image is pushed there from A); a service
# address $VIP on both hosts' loopback, routed by the bridge to one of them. Defines step, die,
# ctr_on HOST ..., cm_on HOST ... (container-migrate against that host), $dir, $tag, $IMG, $RT,
# $NET, $REG; everything goes on exit.
#
# The caller sets DEMO (its name, for messages and the temp dir) and TAG (a short prefix for
# namespaces), and `here` and `top` (the scripts dir and the repository).
RT=io.containerd.custom.v2
NET=10.213.0
REG=$NET.254:5000
VIP=$NET.100
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "$DEMO: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run me as root"
for t in containerd ctr runc criu docker-registry ip nsenter iptables containerd-shim-custom-v2 container-migrate busybox; do
  command -v "$t" >/dev/null || die "$t is not on PATH: run 'make deps' and 'make install'"
done
bash "$here/build-test-image.sh" "$top/target/test-image/shimtest.tar" >/dev/null
bash "$top/bench/build-bench-image.sh" "$top/target/bench-image/shimbench.tar" >/dev/null

dir=$(mktemp -d "/tmp/$DEMO.XXXXXX")
tag=$TAG$$
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
