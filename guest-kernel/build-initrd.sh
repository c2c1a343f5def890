#!/usr/bin/env bash
# Builds CRX's default initrd, an uncompressed newc cpio, cached by content.
#
#   guest-kernel/build-initrd.sh     # prints the cache directory holding initrd.cpio
#
# Contents: /init = crx-init (static, glibc, built from guest-kernel/init), /bin/crx-vsock (the
# guest side of the vsock tests, same crate), /bin/crx-agent (the guest agent, PID 1 when booted
# with rdinit=/bin/crx-agent; built from guest-kernel/agent), /bin/busybox from
# Debian's busybox-static with every applet as a hard link in /bin (Debian's static busybox
# would otherwise run applets inside its own shell instead of exec'ing them), /sbin, /usr/bin,
# /usr/sbin as symlinks to /bin, /dev/console (char 5:1), /dev /proc /sys /tmp /run /root /etc
# (minimal passwd/group). Made with the kernel's usr/gen_init_cpio from a file list, so device
# nodes and root ownership need no root; timestamps are 0 (reproducible).
#
# Cache: ${CRX_CACHE_DIR:-$HOME/.cache/crx}/guest-initrd/<hash>/ with initrd.cpio, crx-init,
# cpio-list.txt, inputs.txt; <hash> = sha256 of this script, busybox-static's version, the
# sources of crx-init, crx-agent and crx-agent-proto, the rustc version and Cargo.lock (or of the
# binaries given as CRX_INIT_BIN, CRX_VSOCK_BIN, CRX_AGENT_BIN). The gen_init_cpio tool is cached in .../guest-initrd/tools/.
# Only the result directory's path goes to stdout (last line); progress goes to stderr.
# Environment: CRX_CACHE_DIR, CRX_INIT_BIN (use this crx-init instead of building it; crx-vsock
# and crx-agent are then taken from CRX_VSOCK_BIN and CRX_AGENT_BIN, else from beside it),
# CRX_KERNEL_TARBALL (source of gen_init_cpio.c), CRX_BUSYBOX (default /bin/busybox).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${CRX_CACHE_DIR:-$HOME/.cache/crx}/guest-initrd"
busybox="${CRX_BUSYBOX:-/bin/busybox}"
kpkg=linux-source-6.12
tarball="${CRX_KERNEL_TARBALL:-/usr/src/${kpkg}.tar.xz}"
target=x86_64-unknown-linux-gnu

log() { printf 'guest-initrd: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

bb_version="$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null)" ||
    die "Debian package busybox-static is not installed"
[[ -x "$busybox" ]] || die "$busybox missing"
file -L "$busybox" | grep -q 'statically linked' || die "$busybox is not statically linked"

sha() { sha256sum | cut -d' ' -f1; }
inputs="$(
    printf 'script %s\n' "$(sha <"$here/build-initrd.sh")"
    printf 'busybox-static %s %s\n' "$bb_version" "$(sha <"$busybox")"
    if [[ -n "${CRX_INIT_BIN:-}" ]]; then
        printf 'crx-init binary %s\n' "$(sha <"$CRX_INIT_BIN")"
        printf 'crx-vsock binary %s\n' "$(sha <"${CRX_VSOCK_BIN:-$(dirname "$CRX_INIT_BIN")/crx-vsock}")"
        printf 'crx-agent binary %s\n' "$(sha <"${CRX_AGENT_BIN:-$(dirname "$CRX_INIT_BIN")/crx-agent}")"
    else
        for crate in guest-kernel/init guest-kernel/agent crx-agent-proto; do
            (cd "$repo/$crate" && find . -path ./target -prune -o -type f \( -name '*.rs' -o -name Cargo.toml \) -print |
                LC_ALL=C sort | while read -r f; do printf '%s %s %s\n' "$crate" "$(sha <"$f")" "$f"; done)
        done
        printf 'rustc %s\n' "$(rustc -vV | tr '\n' ' ')"
        printf 'Cargo.lock %s\n' "$(sha <"$repo/Cargo.lock")"
    fi
)"
hash="$(printf '%s\n' "$inputs" | sha)"
out="$cache/$hash"
is_done() { [[ -f "$out/.done" && -f "$out/initrd.cpio" ]]; }
if is_done; then
    log "cached: $out"
    echo "$out"
    exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if is_done; then
    echo "$out"
    exit 0
fi

# --- gen_init_cpio from the kernel source tarball (one C file) ---------------------------------
kversion="$(dpkg-query -W -f='${Version}' "$kpkg" 2>/dev/null)" || die "$kpkg is not installed"
gen="$cache/tools/gen_init_cpio-$kversion"
if [[ ! -x "$gen" ]]; then
    log "building gen_init_cpio from $tarball"
    mkdir -p "$cache/tools"
    tar -xJOf "$tarball" "$kpkg/usr/gen_init_cpio.c" >"$gen.c"
    cc -O2 -o "$gen.tmp" "$gen.c"
    mv "$gen.tmp" "$gen"
fi

# --- crx-init: static glibc build; the explicit --target and separate target dir keep the
#     RUSTFLAGS away from host builds of the workspace --------------------------------------------
if [[ -n "${CRX_INIT_BIN:-}" ]]; then
    init_bin="$CRX_INIT_BIN"
    vsock_bin="${CRX_VSOCK_BIN:-$(dirname "$CRX_INIT_BIN")/crx-vsock}"
    agent_bin="${CRX_AGENT_BIN:-$(dirname "$CRX_INIT_BIN")/crx-agent}"
else
    log "building crx-init and crx-agent (static, $target)"
    RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static -C strip=symbols" \
        cargo build --manifest-path "$repo/Cargo.toml" -p crx-init -p crx-agent --release --locked \
        --target "$target" --target-dir "$repo/target/guest" >&2
    init_bin="$repo/target/guest/$target/release/crx-init"
    vsock_bin="$repo/target/guest/$target/release/crx-vsock"
    agent_bin="$repo/target/guest/$target/release/crx-agent"
fi
for bin in "$init_bin" "$vsock_bin" "$agent_bin"; do
    file -L "$bin" | grep -q 'statically linked' || die "$bin is not statically linked: $(file -L "$bin")"
done

# --- the archive -------------------------------------------------------------------------------
tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
cp "$init_bin" "$tmp/crx-init"
cp "$vsock_bin" "$tmp/crx-vsock"
cp "$agent_bin" "$tmp/crx-agent"
applets=()
while read -r a; do
    [[ -n "$a" && "$a" != busybox && "$a" != */* ]] && applets+=("/bin/$a")
done < <("$busybox" --list)
{
    for d in /bin /dev /etc /proc /sys /run /root /usr; do echo "dir $d 0755 0 0"; done
    echo "dir /tmp 1777 0 0"
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "nod /dev/null 0666 0 0 c 1 3"
    echo "slink /sbin bin 0777 0 0"
    echo "slink /usr/bin ../bin 0777 0 0"
    echo "slink /usr/sbin ../bin 0777 0 0"
    echo "file /init $tmp/crx-init 0755 0 0"
    echo "file /bin/crx-vsock $tmp/crx-vsock 0755 0 0"
    echo "file /bin/crx-agent $tmp/crx-agent 0755 0 0"
    echo "file /bin/busybox $busybox 0755 0 0 ${applets[*]}"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$tmp/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$tmp/group"
    echo "file /etc/passwd $tmp/passwd 0644 0 0"
    echo "file /etc/group $tmp/group 0644 0 0"
} >"$tmp/cpio-list.txt"
"$gen" -t 0 "$tmp/cpio-list.txt" >"$tmp/initrd.cpio"
printf '%s\n' "$inputs" >"$tmp/inputs.txt"
touch "$tmp/.done"
rm -rf "$out"
mv "$tmp" "$out"
log "initrd.cpio $(stat -c %s "$out/initrd.cpio") bytes, ${#applets[@]} busybox applets, crx-init $(stat -c %s "$out/crx-init") bytes, crx-vsock $(stat -c %s "$out/crx-vsock") bytes, crx-agent $(stat -c %s "$out/crx-agent") bytes"
echo "$out"
