#!/usr/bin/env bash
# The main job, end to end: a container run by containerd-shim-custom-v2 changes its memory and its
# files, is checkpointed live (it keeps running), then checkpointed with exit (it stops), and is
# restored under a new name from the live checkpoint: same memory (its random token), its counter
# going on from where it was, and its file changes back. Runs on a private containerd.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
. "$here/private-containerd.sh"

RT=io.containerd.custom.v2
IMG=docker.io/library/shimtest:latest
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

command -v containerd-shim-custom-v2 >/dev/null || { echo "containerd-shim-custom-v2 is not on PATH: run 'make install'" >&2; exit 1; }
tar=$top/target/test-image/shimtest.tar
"$here/build-test-image.sh" "$tar"

dir=$(mktemp -d /tmp/shim-demo.XXXXXX)
trap pc_stop EXIT
step "private containerd in $dir"
pc_start "$dir"
C="$PC_CTR -n demo"
$C images import "$tar" >/dev/null
$C images ls -q

# The token lives only in the shell's memory: a restart would make a new one and count from 1.
WORKLOAD='token=$RANDOM$RANDOM; i=0; while :; do i=$((i+1)); echo "$token $i" > /counter; sleep 0.1; done'
step "run a container with --runtime $RT"
$C run -d --runtime "$RT" "$IMG" demo sh -c "$WORKLOAD"
counter() { $C task exec --exec-id "read-$RANDOM" "$1" cat /counter; }
until [ "$(counter demo | cut -d' ' -f2)" -ge 10 ] 2>/dev/null; do sleep 0.1; done
echo "counter (token i): $(counter demo)"

step "change files: create /created, append to /etc/passwd, delete /etc/group"
$C task exec --exec-id files demo sh -c 'echo made-before-checkpoint > /created; echo "demo:x:1000:1000::/:/bin/sh" >> /etc/passwd; rm /etc/group'

step "checkpoint, leaving it running (the shim freezes the cgroup around dump + rootfs diff)"
before=$(counter demo)
time $C container checkpoint --task --rw demo localhost/demo-checkpoint:live
after=$(counter demo)
echo "before checkpoint: $before   after: $after   (still counting)"
$C task ls

step "checkpoint with --exit: the original stops"
$C task checkpoint --exit demo
$C task ls

step "restore the live checkpoint under a new name: demo-restored"
$C container restore --live --rw demo-restored localhost/demo-checkpoint:live
$C task ls
sleep 0.5
restored=$(counter demo-restored)
echo "restored counter: $restored"
echo "/created:  $($C task exec --exec-id f1 demo-restored cat /created)"
echo "/etc/passwd last line: $($C task exec --exec-id f2 demo-restored tail -n1 /etc/passwd)"
if $C task exec --exec-id f3 demo-restored test -e /etc/group; then gone=no; else gone=yes; fi
echo "/etc/group deleted: $gone"

tok_before=${before%% *}; tok_restored=${restored%% *}
n_before=${before##* }; n_restored=${restored##* }
step "verdict"
if [ "$tok_before" = "$tok_restored" ] && [ "$n_restored" -ge "$n_before" ] && [ "$gone" = yes ]; then
  echo "OK: same memory (token $tok_restored), counter went on from $n_before to $n_restored, file changes restored"
else
  echo "FAILED: before '$before', restored '$restored', /etc/group deleted: $gone" >&2
  exit 1
fi
