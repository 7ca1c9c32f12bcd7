#!/usr/bin/env bash
# Starts and stops a private containerd (its own root, state, socket and config) for the demo and
# the benchmark, so that nothing touches the host's containerd. Source it, then:
#   pc_start DIR   start containerd under DIR (sets PC_ADDR, PC_CTR)
#   pc_stop        stop it, kill its shims, unmount and remove DIR
set -euo pipefail

pc_start() {
  PC_DIR=$1
  mkdir -p "$PC_DIR"
  PC_ADDR=$PC_DIR/containerd.sock
  cat >"$PC_DIR/config.toml" <<CFG
version = 3
root = "$PC_DIR/root"
state = "$PC_DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.sandbox.controller.v1.shim", "io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$PC_ADDR"
[ttrpc]
  address = "$PC_ADDR.ttrpc"
CFG
  containerd --config "$PC_DIR/config.toml" >"$PC_DIR/containerd.log" 2>&1 &
  PC_PID=$!
  PC_CTR="ctr --address $PC_ADDR"
  for _ in $(seq 1 200); do
    $PC_CTR version >/dev/null 2>&1 && return 0
    kill -0 "$PC_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "containerd did not start; its log:" >&2
  tail -20 "$PC_DIR/containerd.log" >&2
  return 1
}

pc_stop() {
  [ -n "${PC_DIR:-}" ] || return 0
  local ns
  for ns in $($PC_CTR namespaces ls -q 2>/dev/null); do
    for t in $($PC_CTR -n "$ns" tasks ls -q 2>/dev/null); do
      $PC_CTR -n "$ns" tasks kill -s KILL "$t" >/dev/null 2>&1 || true
      $PC_CTR -n "$ns" tasks delete -f "$t" >/dev/null 2>&1 || true
    done
    for c in $($PC_CTR -n "$ns" containers ls -q 2>/dev/null); do
      $PC_CTR -n "$ns" containers delete "$c" >/dev/null 2>&1 || true
    done
  done
  kill "$PC_PID" 2>/dev/null || true
  wait "$PC_PID" 2>/dev/null || true
  # Shims of this containerd carry its address on their command line.
  pkill -KILL -f -- "-address $PC_ADDR" 2>/dev/null || true
  { grep -o " $PC_DIR[^ ]*" /proc/self/mountinfo || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$PC_DIR"
  PC_DIR=
  return 0
}
