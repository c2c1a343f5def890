#!/usr/bin/env bash
# Builds CRX's guest kernel (vmlinux with a PVH note + bzImage) from Debian's linux-source-6.12,
# cached by content.
#
#   guest-kernel/build.sh            # prints the cache directory holding vmlinux, bzImage, config
#
# Config: `make ARCH=x86_64 tinyconfig` + guest-kernel/config/*.fragment (merge_config.sh -m),
# then `make olddefconfig`; every line of every fragment is then checked against the final
# .config and the build fails if one did not survive (merge_config drops options whose
# dependencies are unmet, without failing).
#
# Cache: ${CRX_CACHE_DIR:-$HOME/.cache/crx}/guest-kernel/
#   <hash>/           vmlinux bzImage config System.map inputs.txt   (the result; <hash> = sha256 of
#                     the Debian package version + fragments + patches + this script)
#   src/<srchash>/    the unpacked (and patched) source tree, shared by builds of the same
#                     package version and patch set
#   obj/<srchash>/    the out-of-tree (O=) object directory of that source tree, reused by
#                     every build from it (kbuild rebuilds what a config change affects), so a
#                     fragment or script edit does not recompile the kernel from scratch
# Only the result directory's path goes to stdout (last line); progress goes to stderr.
# Environment: CRX_CACHE_DIR, CRX_KERNEL_TARBALL (default /usr/src/linux-source-6.12.tar.xz),
# CRX_JOBS (default nproc).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pkg=linux-source-6.12
tarball="${CRX_KERNEL_TARBALL:-/usr/src/${pkg}.tar.xz}"
cache="${CRX_CACHE_DIR:-$HOME/.cache/crx}/guest-kernel"
jobs="${CRX_JOBS:-$(nproc)}"

log() { printf 'guest-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

version="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null)" ||
    die "Debian package $pkg is not installed (apt-get install $pkg)"
[[ -n "$version" && -f "$tarball" ]] || die "$tarball missing ($pkg $version)"

shopt -s nullglob
fragments=("$here"/config/*.fragment)
patches=("$here"/patches/*.patch)
shopt -u nullglob
((${#fragments[@]})) || die "no config fragments in $here/config"

# hash_files NAME... -> "sha256  relative-name" lines (names relative to $here, so the hash
# does not depend on where the repository is checked out)
hash_files() {
    local f
    for f in "$@"; do
        printf '%s  %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" "${f#"$here"/}"
    done
}

inputs="$(
    printf 'package %s %s\n' "$pkg" "$version"
    hash_files "${fragments[@]}" ${patches[@]+"${patches[@]}"} "$here/build.sh"
)"
hash="$(printf '%s\n' "$inputs" | sha256sum | cut -d' ' -f1)"
src_inputs="$(
    printf 'package %s %s\n' "$pkg" "$version"
    hash_files ${patches[@]+"${patches[@]}"}
)"
srchash="$(printf '%s\n' "$src_inputs" | sha256sum | cut -d' ' -f1)"

out="$cache/$hash"
is_done() { [[ -f "$out/.done" && -f "$out/vmlinux" && -f "$out/bzImage" ]]; }
if is_done; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
log "waiting for the build lock $cache/.lock"
flock 9
if is_done; then # built by someone else while we waited
    echo "$out"
    exit 0
fi

# --- source tree --------------------------------------------------------------------------
src="$cache/src/$srchash"
if [[ ! -f "$src/.crx-src-ready" ]]; then
    log "unpacking $tarball ($version) into $src"
    rm -rf "$src" "$src.tmp"
    mkdir -p "$src.tmp"
    tar -xJf "$tarball" -C "$src.tmp" --strip-components=1
    for p in ${patches[@]+"${patches[@]}"}; do
        log "applying ${p#"$here"/}"
        patch -d "$src.tmp" -p1 --forward --batch <"$p"
    done
    printf '%s\n' "$src_inputs" >"$src.tmp/.crx-src-ready"
    mv "$src.tmp" "$src"
fi

# --- configuration ------------------------------------------------------------------------
obj="$cache/obj/$srchash"
mkdir -p "$obj"
kmake() {
    make -C "$src" O="$obj" ARCH=x86_64 KBUILD_BUILD_USER=crx KBUILD_BUILD_HOST=crx "$@"
}
log "configuring: tinyconfig + ${fragments[*]#"$here"/}"
kmake -s tinyconfig >&2
(cd "$src" && ARCH=x86_64 scripts/kconfig/merge_config.sh -m -O "$obj" "$obj/.config" \
    "${fragments[@]}") >"$obj/merge_config.log" 2>&1 ||
    { cat "$obj/merge_config.log" >&2; die "merge_config.sh failed"; }
kmake -s olddefconfig >&2

# verify: CONFIG_X=v must be in .config verbatim; "# CONFIG_X is not set" / CONFIG_X=n must
# leave no CONFIG_X= line.
missing=()
checked=0
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=n$ || "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        name="${BASH_REMATCH[1]}"
        checked=$((checked + 1))
        if got="$(grep -m1 "^${name}=" "$obj/.config")"; then
            missing+=("$name should be unset, is: $got")
        fi
    elif [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        name="${BASH_REMATCH[1]}"
        checked=$((checked + 1))
        if ! grep -qxF -- "$line" "$obj/.config"; then
            got="$(grep -m1 -E "^${name}=|^# ${name} is not set" "$obj/.config" || echo "absent")"
            missing+=("$line wanted, got: $got")
        fi
    fi
done < <(cat "${fragments[@]}")
if ((${#missing[@]})); then
    printf 'guest-kernel: config option not satisfied: %s\n' "${missing[@]}" >&2
    die "${#missing[@]} of $checked fragment options did not survive olddefconfig (unmet dependencies?)"
fi
log "config verified: all $checked fragment options present in $obj/.config"

# --- build --------------------------------------------------------------------------------
log "building vmlinux + bzImage with -j$jobs (log: $obj/build.log)"
start=$SECONDS
if ! kmake -j"$jobs" vmlinux bzImage >"$obj/build.log" 2>&1; then
    tail -n 40 "$obj/build.log" >&2
    die "kernel build failed (full log: $obj/build.log)"
fi
log "built in $((SECONDS - start)) s"

# PVH: the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) must be present in vmlinux.
if ! readelf -n "$obj/vmlinux" | grep -Eq '^[[:space:]]*Xen[[:space:]].*(0x00000012|PHYS32_ENTRY)'; then
    readelf -n "$obj/vmlinux" >&2 || true
    die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
fi

tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
cp "$obj/vmlinux" "$obj/arch/x86/boot/bzImage" "$obj/System.map" "$tmp/"
cp "$obj/.config" "$tmp/config"
printf '%s\n' "$inputs" >"$tmp/inputs.txt"
touch "$tmp/.done"
rm -rf "$out"
mv "$tmp" "$out"
log "vmlinux $(stat -c %s "$out/vmlinux") bytes, bzImage $(stat -c %s "$out/bzImage") bytes"
echo "$out"
