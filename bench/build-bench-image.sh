#!/usr/bin/env bash
# Builds the benchmark image as an OCI image-layout tar: the integration-test image
# (scripts/build-test-image.sh: static busybox) with a second layer holding /bin/workload and
# /bin/memhog, the static C programs of bench/workload.c and bench/memhog.c (gcc -static -O2).
#
#   usage: bench/build-bench-image.sh [OUTPUT.tar]      (default: target/bench-image/shimbench.tar)
#
# `ctr images import OUTPUT.tar` names it docker.io/library/shimbench:latest.
# Idempotent like build-test-image.sh: nothing is done when OUTPUT's stamp (this script,
# workload.c, memhog.c, the base image) matches. Needs gcc with a static libc (libc6-dev), tar, gzip,
# sha256sum, python3 (to edit the base image's JSON).
set -euo pipefail

IMAGE_NAME="docker.io/library/shimbench:latest"
IMAGE_TAG="latest"
EPOCH="${SOURCE_DATE_EPOCH:-0}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="${1:-$root/target/bench-image/shimbench.tar}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
base_tar="${BASE_IMAGE_TAR:-$root/target/test-image/shimtest.tar}"

die() { echo "build-bench-image: $*" >&2; exit 1; }
for t in gcc tar gzip sha256sum python3 flock; do command -v "$t" >/dev/null || die "$t is required"; done

bash "$root/scripts/build-test-image.sh" "$base_tar" >/dev/null

mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock 9

stamp_want=$( { sha256sum "${BASH_SOURCE[0]}" "$here/workload.c" "$here/memhog.c" "$base_tar" | cut -d' ' -f1; echo "$EPOCH $IMAGE_NAME"; } | sha256sum | cut -d' ' -f1)
if [ -f "$out" ] && [ -f "$out.stamp" ] && [ "$(cat "$out.stamp")" = "$stamp_want" ]; then
  echo "build-bench-image: $out is up to date ($IMAGE_NAME)"
  exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/shimbench-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- the workload layer ---------------------------------------------------------------------------
mkdir -p "$work/rootfs/bin"
gcc -static -O2 -Wall -Wextra -o "$work/rootfs/bin/workload" "$here/workload.c" \
  || die "gcc -static failed (a static libc comes with libc6-dev)"
gcc -static -O2 -Wall -Wextra -o "$work/rootfs/bin/memhog" "$here/memhog.c" \
  || die "gcc -static failed (a static libc comes with libc6-dev)"
chmod 0755 "$work/rootfs/bin/workload" "$work/rootfs/bin/memhog"
layer_tar="$work/layer.tar"
tar --create --file "$layer_tar" --directory "$work/rootfs" \
  --sort=name --format=gnu --numeric-owner --owner=0 --group=0 \
  --mtime="@$EPOCH" --no-acls --no-xattrs --no-selinux --no-recursion \
  ./bin ./bin/memhog ./bin/workload
gzip -n -6 -c "$layer_tar" >"$work/layer.tar.gz"

# --- the base image, extended -----------------------------------------------------------------------
layout="$work/layout"
mkdir -p "$layout"
tar --extract --file "$base_tar" --directory "$layout"
python3 - "$layout" "$layer_tar" "$work/layer.tar.gz" "$IMAGE_NAME" "$IMAGE_TAG" "$EPOCH" <<'PY'
import hashlib, json, os, shutil, sys, datetime

layout, layer_tar, layer_gz, name, tag, epoch = sys.argv[1:]
blobs = os.path.join(layout, "blobs", "sha256")

def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def read_blob(digest):
    with open(os.path.join(blobs, digest.split(":", 1)[1]), "rb") as f:
        return json.load(f)

def add_json(obj):
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)

index = json.load(open(os.path.join(layout, "index.json")))
old = index["manifests"][0]
manifest = read_blob(old["digest"])
config = read_blob(manifest["config"]["digest"])
for m in [old["digest"], manifest["config"]["digest"]]:
    os.remove(os.path.join(blobs, m.split(":", 1)[1]))

gz_digest = sha(layer_gz)
shutil.copy(layer_gz, os.path.join(blobs, gz_digest))
created = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
config["rootfs"]["diff_ids"].append("sha256:" + sha(layer_tar))
config["history"].append({"created": created, "created_by": "bench/build-bench-image.sh (bin/workload, bin/memhog)"})
config_digest, config_size = add_json(config)
manifest["config"] = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size}
manifest["layers"].append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                           "digest": "sha256:" + gz_digest, "size": os.path.getsize(layer_gz)})
manifest_digest, manifest_size = add_json(manifest)
index["manifests"] = [{
    "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
    "platform": {"architecture": "amd64", "os": "linux"},
    "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
}]
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump(index, f, separators=(",", ":"), sort_keys=True)
PY

tmp_out="$out.tmp.$$"
tar --create --file "$tmp_out" --directory "$layout" \
  --sort=name --format=gnu --numeric-owner --owner=0 --group=0 --mtime="@$EPOCH" \
  oci-layout index.json blobs
mv -f "$tmp_out" "$out"
echo "$stamp_want" >"$out.stamp"
echo "build-bench-image: wrote $out ($IMAGE_NAME)"
