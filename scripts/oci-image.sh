# Sourced by the image build scripts: writes a directory as a one-layer OCI image-layout tar.
#
#   write_oci_image ROOTFS WORK OUT NAME TAG CONFIG EPOCH OWNERS
#
# ROOTFS: the image's files; WORK: a scratch dir; OUT: the tar to write (through a temp file and a
# rename); NAME/TAG: the io.containerd.image.name and ref.name annotations (what `ctr images
# import` names it); CONFIG: the JSON members of the image config's "config" object; EPOCH: the
# mtime of every entry (reproducible); OWNERS: "root" makes every entry root's, "keep" keeps the
# numeric owners (a Debian root with its service users). Sets OCI_MANIFEST_DIGEST.

write_oci_image() {
  local rootfs=$1 work=$2 out=$3 name=$4 tag=$5 image_config=$6 epoch=$7 owners=$8
  local owner_args=(--numeric-owner)
  [ "$owners" = root ] && owner_args+=(--owner=0 --group=0)
  local layer_tar="$work/layer.tar"
  tar --create --file "$layer_tar" --directory "$rootfs" \
    --sort=name --format=gnu "${owner_args[@]}" \
    --mtime="@$epoch" --no-acls --no-xattrs --no-selinux \
    .
  local diff_id
  diff_id=$(sha256sum "$layer_tar" | cut -d' ' -f1)
  gzip -n -6 -c "$layer_tar" >"$work/layer.tar.gz"
  rm -f "$layer_tar"

  local layout="$work/layout"
  local blobs="$layout/blobs/sha256"
  mkdir -p "$blobs"
  # add_blob FILE -> prints "DIGEST SIZE", moves FILE into blobs/
  add_blob() {
    local d s
    d=$(sha256sum "$1" | cut -d' ' -f1)
    s=$(stat -c %s "$1")
    mv "$1" "$blobs/$d"
    echo "$d $s"
  }
  local layer_digest layer_size config_digest config_size manifest_digest manifest_size created
  read -r layer_digest layer_size < <(add_blob "$work/layer.tar.gz")
  created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
  printf '%s' \
    '{"architecture":"amd64","os":"linux","created":"'"$created"'",' \
    '"config":{'"$image_config"'},' \
    '"rootfs":{"type":"layers","diff_ids":["sha256:'"$diff_id"'"]},' \
    '"history":[{"created":"'"$created"'","created_by":"'"$(basename "$0")"'"}]}' \
    >"$work/config.json"
  read -r config_digest config_size < <(add_blob "$work/config.json")
  printf '%s' \
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
    '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config_digest"'","size":'"$config_size"'},' \
    '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$layer_digest"'","size":'"$layer_size"'}]}' \
    >"$work/manifest.json"
  read -r manifest_digest manifest_size < <(add_blob "$work/manifest.json")
  printf '%s' \
    '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[' \
    '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$manifest_digest"'","size":'"$manifest_size"',' \
    '"platform":{"architecture":"amd64","os":"linux"},' \
    '"annotations":{"io.containerd.image.name":"'"$name"'","org.opencontainers.image.ref.name":"'"$tag"'"}}]}' \
    >"$layout/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

  local tmp_out="$out.tmp.$$"
  tar --create --file "$tmp_out" --directory "$layout" \
    --sort=name --format=gnu --numeric-owner --owner=0 --group=0 --mtime="@$epoch" \
    oci-layout index.json blobs
  mv -f "$tmp_out" "$out"
  OCI_MANIFEST_DIGEST=$manifest_digest
}
