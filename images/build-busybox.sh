#!/usr/bin/env bash
# Builds CRX's bundled default image: an OCI image layout holding one layer made from Debian's
# busybox-static (every applet a symlink in /bin, /etc/passwd and /etc/group with root and an
# unprivileged `app` user, /tmp, /root, /home/app), named docker.io/library/busybox:latest.
# Reproducible: sorted tar entries, owner 0, mtime 0, gzip -n.
#
#   images/build-busybox.sh [OUT]   # default OUT: /usr/local/share/crx/images/busybox
#
# `crx run OUT -- CMD` imports it; setup.sh also imports it into the image store, so
# `crx run busybox -- CMD` works offline.
set -euo pipefail

out="${1:-/usr/local/share/crx/images/busybox}"
busybox="${CRX_BUSYBOX:-/bin/busybox}"
die() { printf 'build-busybox: error: %s\n' "$*" >&2; exit 1; }
[[ -x "$busybox" ]] || die "$busybox missing (Debian package busybox-static)"
file -L "$busybox" | grep -q 'statically linked' || die "$busybox is not statically linked"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{bin,etc,tmp,root,home/app,proc,sys,dev}
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [[ "$applet" == busybox ]] || ln -s busybox "$root/bin/$applet"
done
ln -s bin "$root/sbin"
mkdir -p "$root/usr"
ln -s ../bin "$root/usr/bin"
ln -s ../bin "$root/usr/sbin"
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\napp:x:1000:\nnogroup:x:65534:\n' >"$root/etc/group"
chown 1000:1000 "$root/home/app" 2>/dev/null || true

blobs="$work/layout/blobs/sha256"
mkdir -p "$blobs"
sha() { sha256sum "$1" | cut -d' ' -f1; }
put() { # put FILE → prints digest hex; moves FILE into blobs/
    local hex
    hex="$(sha "$1")"
    mv "$1" "$blobs/$hex"
    echo "$hex"
}
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$root" -cf "$work/layer.tar" .
diff_id="$(sha "$work/layer.tar")"
gzip -n -6 "$work/layer.tar"
layer_size="$(stat -c %s "$work/layer.tar.gz")"
layer="$(put "$work/layer.tar.gz")"

printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"CRX images/build-busybox.sh from Debian busybox-static"}]}' \
    "$diff_id" >"$work/config.json"
config_size="$(stat -c %s "$work/config.json")"
config="$(put "$work/config.json")"

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
manifest_size="$(stat -c %s "$work/manifest.json")"
manifest="$(put "$work/manifest.json")"

printf '{"imageLayoutVersion":"1.0.0"}' >"$work/layout/oci-layout"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"docker.io/library/busybox:latest","org.opencontainers.image.ref.name":"latest"}}]}' \
    "$manifest" "$manifest_size" >"$work/layout/index.json"

mkdir -p "$(dirname "$out")"
rm -rf "$out.new"
mv "$work/layout" "$out.new"
rm -rf "$out"
mv "$out.new" "$out"
echo "$out"
