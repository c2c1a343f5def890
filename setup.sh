#!/usr/bin/env bash
# Sets up a machine for CRX: installs the Debian packages in setup/apt-packages.txt and virtiofsd
# (the virtio-fs backend, `cargo install`), builds the workspace (release), builds and installs the
# default guest (kernel + initrd, cached by content), builds the bundled busybox OCI image and
# imports it into the image store (/var/lib/crx, or $CRX_ROOT), and, where this host's /dev/kvm is
# PVM, prepares the KVM test host (QEMU TCG + kvm_amd).
# Idempotent: a second run installs nothing and rebuilds nothing that is unchanged.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

log() { printf "\033[1msetup:\033[0m [%4d s] %s\n" "$SECONDS" "$*" >&2; }

[[ $(id -u) == 0 ]] || { log "run as root (it installs packages and /usr/local/share/crx)"; exit 1; }
command -v cargo >/dev/null || { log "cargo (Rust toolchain) is required"; exit 1; }
[[ -e /dev/kvm ]] || { log "/dev/kvm is missing: CRX needs KVM (load kvm_intel or kvm_amd)"; exit 1; }

mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' setup/apt-packages.txt | grep -v '^$')
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "Debian packages: all present"
fi

thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
if [[ -w $thp ]] && ! grep -q '\[advise\]\|\[always\]\|\[within_size\]' "$thp"; then
    log "letting guest RAM (memfd, MADV_HUGEPAGE) use transparent huge pages: advise > $thp"
    echo advise >"$thp" || log "cannot set $thp: guest RAM stays on 4 KiB pages"
fi

# The guest kernel (cached by content) builds in the background while the Rust builds below run:
# both use every core, but each leaves some idle (link steps, serial make stages) that the
# other fills. `cargo xtask guest` below finds it in the cache.
kernel_log=$(mktemp /tmp/crx-setup-kernel.XXXXXX)
log "building the guest kernel in the background (log: $kernel_log)"
guest-kernel/build.sh >"$kernel_log" 2>&1 &
kernel_build=$!

# Rust tools from crates.io, installed unless present.
cargo_tool() { # CRATE [BINARY]
    local crate=$1 bin=${2:-$1}
    if command -v "$bin" >/dev/null || [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/$bin ]]; then
        log "$crate: present"
    else
        log "installing $crate (cargo install --locked)"
        cargo install --locked "$crate"
    fi
}
cargo_tool cargo-fuzz
cargo_tool virtiofsd  # virtio-fs devices start it (PATH or ~/.cargo/bin)

# critest's stand-in images (cri-tools' bench.sh) need Debian's *dynamic* busybox package, which
# conflicts with busybox-static: fetched, hash-checked, to an absolute path (`apt-get download`
# writes to the working directory, which a sandboxed CI can make unresolvable).
debs=/var/cache/crx/debs
if ! compgen -G "$debs/busybox_*.deb" >/dev/null; then
    log "downloading Debian's busybox package (critest's images) into $debs"
    mkdir -p "$debs"
    read -r uri name _size hash < <(apt-get download --print-uris busybox | tr -d "'")
    [[ $hash == SHA256:* ]] || { log "apt-get download --print-uris busybox gave no SHA256"; exit 1; }
    /usr/lib/apt/apt-helper download-file "$uri" "$debs/${name//%3a/:}" "$hash"
fi

log "building the workspace (release)"
cargo build --release --workspace --bins
log "waiting for the guest kernel build"
if ! wait "$kernel_build"; then
    tail -n 40 "$kernel_log" >&2
    log "the guest kernel build failed (log: $kernel_log)"
    exit 1
fi
rm -f "$kernel_log"
log "building the default guest (kernel from the cache + initrd)"
cargo xtask guest
log "building the bundled busybox image and importing it into the image store"
images/build-busybox.sh /usr/local/share/crx/images/busybox
./target/release/crx image import /usr/local/share/crx/images/busybox
log "preparing the test host if this host needs it"
cargo xtask testhost --prepare
log "done"
