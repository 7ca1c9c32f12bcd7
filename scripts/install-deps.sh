#!/usr/bin/env bash
# Installs what building and testing containerd-shim-custom-v2 needs on a fresh Debian bookworm
# machine: containerd 2.x (sid), runc, CRIU >= 4.2 built from Debian's source package, busybox-static,
# protoc, docker-registry, checkpointctl, debootstrap (the workload image). Idempotent: each step checks first and says what it does.
set -euo pipefail

say() { echo "[deps] $*"; }
need_root() { [ "$(id -u)" = 0 ] || { echo "[deps] must run as root" >&2; exit 1; }; }
need_root

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update() {
  if [ "$APT_UPDATED" = 0 ]; then say "apt-get update"; apt-get update -qq; APT_UPDATED=1; fi
}

# Sid and trixie are available at a low pin so that only packages named explicitly come from them.
setup_sources() {
  local f=/etc/apt/sources.list.d/shim-custom-extra.sources
  if [ ! -f "$f" ]; then
    say "adding trixie and sid sources (pinned low) in $f"
    cat >"$f" <<'SRC'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: trixie sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    cat >/etc/apt/preferences.d/shim-custom-extra <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: *
Pin: release n=sid
Pin-Priority: 50
PIN
    APT_UPDATED=0
  fi
}

install_pkgs() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "${p%%/*}" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    say "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

containerd_ok() {
  command -v containerd >/dev/null && containerd --version | grep -qE ' v?2\.'
}

setup_sources
if ! containerd_ok; then
  apt_update
  say "installing containerd from sid"
  apt-get install -y -qq --no-install-recommends containerd/sid >/dev/null
fi
say "containerd: $(containerd --version)"

# xfsprogs: mkfs.xfs for the tests' and the bench's containerd root on an xfs loop filesystem (the
# rootfs diff's reflink path).
install_pkgs runc busybox-static protobuf-compiler iproute2 iptables xz-utils dpkg-dev util-linux build-essential \
  debootstrap xfsprogs
say "runc: $(runc --version | head -1)"

# 4.2: on Linux >= 6.16 CRIU 4.1 cannot dump TCP sockets (SO_PASSCRED/SO_PASSSEC refused), and it
# runs a config-file action script twice.
CRIU_VERSION_MIN=4.2
criu_ok() {
  command -v criu >/dev/null || return 1
  local v; v=$(criu --version 2>/dev/null | awk '/Version/{print $2}')
  [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$CRIU_VERSION_MIN" "$v" | sort -V | head -1)" = "$CRIU_VERSION_MIN" ]
}

if ! criu_ok; then
  say "building CRIU >= $CRIU_VERSION_MIN from Debian's sid source package"
  install_pkgs build-essential libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler \
    python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev pkg-config libnftables-dev \
    libgnutls28-dev uuid-dev libaio-dev
  apt_update
  work=$(mktemp -d /tmp/criu-build.XXXXXX)
  (
    cd "$work"
    apt-get source --download-only criu/sid >/dev/null 2>&1 || true
    orig=$(ls criu_*.orig.tar.* 2>/dev/null | head -1)
    [ -n "$orig" ] || { echo "[deps] could not download CRIU source" >&2; exit 1; }
    # The checksum comes from the signed Sources index (the .dsc itself may be missing upstream).
    want=$(apt-cache showsrc criu 2>/dev/null | awk -v o="$orig" '/^Checksums-Sha256:/{f=1;next} f&&/^ /{if($3==o)print $1; next} {f=0}' | head -1)
    got=$(sha256sum "$orig" | awk '{print $1}')
    [ -n "$want" ] && [ "$want" = "$got" ] || { echo "[deps] checksum mismatch for $orig (want '$want', got $got)" >&2; exit 1; }
    say "verified $orig ($got)"
    tar xf "$orig"
    cd criu-*/
    make -j"$(nproc)" criu >build.log 2>&1 || { tail -30 build.log; exit 1; }
    install -m 0755 criu/criu /usr/local/sbin/criu
  )
  rm -rf "$work"
fi
say "criu: $(criu --version | head -1)"
criu check >/dev/null 2>&1 && say "criu check: looks good" || say "WARNING: 'criu check' reports problems: $(criu check 2>&1 | tail -1)"

# A lazy checkpoint's page server (criu/page-xfer.c) makes pipes of ~3.2 MiB, past the default
# fs.pipe-max-size (1 MiB); without CAP_SYS_RESOURCE (which a container host may withhold) CRIU
# then fails. Raised to 4 MiB, now and at boot.
PIPE_MAX=4194304
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt "$PIPE_MAX" ]; then
  echo "$PIPE_MAX" >/proc/sys/fs/pipe-max-size || say "WARNING: cannot raise fs.pipe-max-size: lazy migration needs it"
fi
if [ -d /etc/sysctl.d ] && [ ! -f /etc/sysctl.d/90-containerd-shim-custom.conf ]; then
  echo "fs.pipe-max-size = $PIPE_MAX" >/etc/sysctl.d/90-containerd-shim-custom.conf
fi
say "fs.pipe-max-size: $(cat /proc/sys/fs/pipe-max-size)"

# The CRI tests serve base images from a loopback registry: containerd's CRI pulls a checkpoint's base
# image again by its repo digest, which an image that was only imported does not have.
install_pkgs docker-registry
say "docker-registry: $(docker-registry --version 2>/dev/null | head -1)"

# checkpointctl 1.3.0 is a trixie package built against trixie's glibc (2.38, newer than bookworm's):
# both are unpacked into a private dir and run through that glibc's loader by a wrapper on PATH.
CHECKPOINTCTL_DIR=/usr/local/lib/checkpointctl
checkpointctl_ok() {
  [ -x /usr/local/bin/checkpointctl ] || return 1
  local help; help=$(/usr/local/bin/checkpointctl --help 2>/dev/null) || return 1
  [[ "$help" == *"checkpoint archives"* ]]
}
if ! checkpointctl_ok; then
  say "installing checkpointctl (trixie) with trixie's glibc in $CHECKPOINTCTL_DIR"
  apt_update
  work=$(mktemp -d /tmp/checkpointctl.XXXXXX)
  chmod 0777 "$work" # apt-get download fetches as the _apt user
  (
    cd "$work"
    apt-get download -qq checkpointctl/trixie libc6/trixie >/dev/null
    rm -rf "$CHECKPOINTCTL_DIR"
    mkdir -p "$CHECKPOINTCTL_DIR"
    for deb in ./checkpointctl_*.deb ./libc6_*.deb; do dpkg -x "$deb" "$CHECKPOINTCTL_DIR"; done
    ls checkpointctl_*.deb >"$CHECKPOINTCTL_DIR/VERSION"
  )
  rm -rf "$work"
  cat >/usr/local/bin/checkpointctl <<WRAP
#!/bin/sh
# checkpointctl from Debian trixie, run with trixie's glibc (installed by containerd-shim-custom-v2's make deps)
exec $CHECKPOINTCTL_DIR/usr/lib64/ld-linux-x86-64.so.2 --library-path $CHECKPOINTCTL_DIR/usr/lib/x86_64-linux-gnu $CHECKPOINTCTL_DIR/usr/bin/checkpointctl "\$@"
WRAP
  chmod 0755 /usr/local/bin/checkpointctl
  checkpointctl_ok || { echo "[deps] checkpointctl does not run: $(/usr/local/bin/checkpointctl --help 2>&1 | tail -1)" >&2; exit 1; }
fi
say "checkpointctl: $(cat "$CHECKPOINTCTL_DIR/VERSION" 2>/dev/null)"

# containerd's Debian package may start a system containerd: the project never depends on it.
say "done"
