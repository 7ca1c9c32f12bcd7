#!/bin/bash
# Mounts made inside a privileged container, and a volume bind-mounted from the host at create
# (/vol): a tmpfs with a file, a bind mount of a directory, a nested mount namespace with its own
# tmpfs. Logs "<tick> ok" or "<tick> FAIL <what>" to /tmp/client.log every 0.1 s.
set -e
mkdir -p /mnt/tmpfs /mnt/bind /srv/bound /mnt/nested
mount -t tmpfs -o size=16m tmpfs /mnt/tmpfs
echo tmpfs-data > /mnt/tmpfs/file
echo bound-data > /srv/bound/file
mount --bind /srv/bound /mnt/bind
unshare -m --propagation private bash -c \
  'mount -t tmpfs tmpfs /mnt/nested && echo nested-data > /mnt/nested/file && exec sleep infinity' &
nested=$!
until [ -f "/proc/$nested/root/mnt/nested/file" ] 2>/dev/null && grep -q nested-data "/proc/$nested/root/mnt/nested/file" 2>/dev/null; do sleep 0.05; done
echo volume-data > /vol/file
touch /tmp/ready
tick=0
while :; do
  tick=$((tick + 1))
  fails=""
  [ "$(cat /mnt/tmpfs/file)" = tmpfs-data ] || fails="$fails tmpfs"
  [ "$(cat /mnt/bind/file)" = bound-data ] || fails="$fails bind"
  [ "$(cat "/proc/$nested/root/mnt/nested/file" 2>/dev/null)" = nested-data ] || fails="$fails nested"
  [ ! -e /mnt/nested/file ] || fails="$fails nested-leaked"
  [ "$(cat /vol/file)" = volume-data ] || fails="$fails volume"
  grep -q ' /mnt/tmpfs tmpfs ' /proc/self/mountinfo 2>/dev/null || grep -q ' /mnt/tmpfs ' /proc/self/mountinfo || fails="$fails tmpfs-mount"
  if [ -z "$fails" ]; then echo "$tick ok"; else echo "$tick FAIL$fails"; fi >> /tmp/client.log
  sleep 0.1
done
