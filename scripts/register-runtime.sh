#!/usr/bin/env bash
# Registers io.containerd.custom.v2 as a runtime in containerd's config (CRI runtime entry "custom")
# without clobbering what is there: an existing config gets the section appended once; a missing
# config gets a minimal one. Usage: register-runtime.sh [CONFIG] (default /etc/containerd/config.toml)
set -euo pipefail
config=${1:-/etc/containerd/config.toml}
say() { echo "[register] $*"; }

if [ -f "$config" ] && grep -q 'runtime_type *= *"io.containerd.custom.v2"' "$config"; then
  say "$config already registers io.containerd.custom.v2"
  exit 0
fi

version=3
if [ -f "$config" ]; then
  v=$(sed -n 's/^ *version *= *\([0-9]\+\).*/\1/p' "$config" | head -1)
  [ -n "$v" ] && version=$v
  cp -a "$config" "$config.bak.$(date +%s)"
  say "backed up $config"
else
  mkdir -p "$(dirname "$config")"
  echo "version = 3" > "$config"
  say "created $config"
fi

case "$version" in
  3) section="[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.custom]" ;;
  2) section='[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.custom]' ;;
  *) echo "[register] unsupported containerd config version $version in $config" >&2; exit 1 ;;
esac

cat >> "$config" <<SECTION

# containerd-shim-custom-v2: consistent checkpoint/restore (https://containerd.io runtime v2 shim)
$section
  runtime_type = "io.containerd.custom.v2"
  # Pods choose it with a RuntimeClass whose handler is "custom".

# containerd hands this table to the shim as TOML. It reads io.containerd.runc.v2's keys
# (BinaryName, Root, SystemdCgroup, NoPivotRoot, NoNewKeyring, ShimCgroup, IoUid, IoGid,
# CriuWorkPath) and its own CriuTimeout: how many seconds one runc checkpoint or restore may take.
${section%]}.options]
  CriuTimeout = 600
  # BinaryName = "/usr/sbin/runc"
  # SystemdCgroup = true
SECTION
say "registered io.containerd.custom.v2 as CRI runtime 'custom' in $config (config version $version)"
say "restart containerd to pick it up; ctr and nerdctl need no config: --runtime io.containerd.custom.v2"
