#!/bin/bash
# Builds the test host's L1 boot assets from Debian packages (called by crx-testhost's assets.rs).
#
#   build-l1.sh inputs
#       Prints the inputs that decide the assets: the kernel image package that linux-image-amd64
#       currently depends on, its candidate version, and the installed busybox-static version.
#   build-l1.sh build OUT_DIR KERNEL_PACKAGE INIT_SCRIPT MODULE...
#       Downloads KERNEL_PACKAGE (apt-get download: not installed), unpacks it, and writes
#         OUT_DIR/vmlinux            the L1 kernel, decompressed from the bzImage: QEMU boots the
#                                    ELF through PVH, saving the ~6 s an emulated CPU spends on
#                                    the bzImage's own XZ decompression
#         OUT_DIR/modules/           its whole module tree with modules.dep (depmod), for modprobe in L1
#         OUT_DIR/kernel-release     e.g. 6.1.0-56-amd64
#         OUT_DIR/initramfs.cpio     busybox-static, INIT_SCRIPT as /init, the MODULEs and their
#                                    dependencies (from modules.dep) and /modules.order to insmod them
set -euo pipefail

die() { echo "build-l1.sh: $*" >&2; exit 1; }

# Unsigned little-endian integer of $3 bytes at offset $2 of file $1.
le() { od -An -tu"$3" -j "$2" -N "$3" "$1" | tr -d ' '; }

# Writes the ELF kernel inside bzImage $1 to $2 (boot protocol: setup_sects at 0x1f1, payload
# offset and length at 0x248/0x24c; the payload is XZ for Debian's kernels).
extract_vmlinux() {
    local bzimage=$1 out=$2 setup_bytes offset length
    setup_bytes=$(( ($(le "$bzimage" $((0x1f1)) 1) + 1) * 512 ))
    offset=$(le "$bzimage" $((0x248)) 4)
    length=$(le "$bzimage" $((0x24c)) 4)
    dd if="$bzimage" iflag=skip_bytes,count_bytes skip=$((setup_bytes + offset)) count="$length" status=none |
        xz -dc --single-stream >"$out" ||
        die "cannot decompress the kernel payload (not XZ?)"
    [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || die "the kernel payload is not an ELF file"
}

inputs() {
    local kpkg kver bbver
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$kpkg" ] || die "apt-cache depends linux-image-amd64 names no kernel image package (run apt-get update)"
    kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2; exit}')
    [ -n "$kver" ] && [ "$kver" != "(none)" ] || die "no candidate version of $kpkg"
    bbver=$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null) ||
        die "busybox-static is not installed (apt-get install busybox-static)"
    echo "$kpkg $kver busybox-static $bbver"
}

# Prints the module files (relative to the module tree) for the given module names, each after its
# dependencies, from modules.dep.
load_order() {
    local dep_file=$1; shift
    declare -A deps_of path_of seen
    local mod deps key
    while IFS=: read -r mod deps; do
        deps_of[$mod]=$deps
        key=${mod##*/}; key=${key%%.ko*}; key=${key//-/_}
        path_of[$key]=$mod
    done <"$dep_file"
    visit() {
        local m=$1 d
        [ -n "${seen[$m]:-}" ] && return
        seen[$m]=1
        for d in ${deps_of[$m]}; do visit "$d"; done
        echo "$m"
    }
    local name
    for name in "$@"; do
        key=${name//-/_}
        [ -n "${path_of[$key]:-}" ] || die "module $name is not in the kernel package"
        visit "${path_of[$key]}"
    done
}

build() {
    local out=$1 kpkg=$2 init_script=$3; shift 3
    command -v depmod >/dev/null || die "depmod not found (apt-get install kmod)"
    command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"
    command -v xz >/dev/null || die "xz not found (apt-get install xz-utils)"
    [ -x /bin/busybox ] || die "/bin/busybox not found (apt-get install busybox-static)"
    mkdir -p "$out"
    local work; work=$(mktemp -d "$out/work.XXXXXX")
    (cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>apt.err) ||
        die "apt-get download $kpkg failed: $(cat "$work/apt.err")"
    dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/root"
    local release; release=$(ls "$work/root/lib/modules")
    [ -n "$release" ] && [ -d "$work/root/lib/modules/$release/kernel" ] || die "no module tree in $kpkg"
    depmod -b "$work/root" "$release"
    extract_vmlinux "$work/root/boot/vmlinuz-$release" "$out/vmlinux"
    mv "$work/root/lib/modules/$release" "$out/modules"
    echo "$release" >"$out/kernel-release"

    local initrd="$work/initrd"
    mkdir -p "$initrd/bin" "$initrd/lib/modules"
    cp /bin/busybox "$initrd/bin/busybox"
    cp "$init_script" "$initrd/init"
    chmod 755 "$initrd/init"
    local m
    load_order "$out/modules/modules.dep" "$@" | while read -r m; do
        mkdir -p "$initrd/lib/modules/$(dirname "$m")"
        cp "$out/modules/$m" "$initrd/lib/modules/$m"
        echo "lib/modules/$m"
    done >"$initrd/modules.order"
    (cd "$initrd" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$out/initramfs.cpio"
    rm -rf "$work"
}

case "${1:-}" in
    inputs) inputs ;;
    build) shift; [ $# -ge 3 ] || die "usage: build-l1.sh build OUT_DIR KERNEL_PACKAGE INIT_SCRIPT MODULE..."; build "$@" ;;
    *) die "usage: build-l1.sh inputs | build OUT_DIR KERNEL_PACKAGE INIT_SCRIPT MODULE..." ;;
esac
