//! virtio-blk and virtio-rng with real guests: an ext4 image made on the host with mkfs.ext4 is
//! mounted, written and flushed in the guest; after the VM is gone the host's fsck is clean and
//! the data is there. A read-only disk refuses writes; the serial reaches the guest; the guest's
//! hwrng reads from the rng device.

use std::path::{Path, PathBuf};
use std::process::Command;

use crx_virtio::{BlockConfig, DeviceConfig};

mod common;
use common::{console_value, default_guest, run_script};

/// A fresh ext4 image of `mib` MiB under /tmp (shared with the test host), holding `seed.txt`.
fn ext4_image(name: &str, mib: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("crx-block-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("root")).unwrap();
    std::fs::write(dir.join("root/seed.txt"), "from the host\n").unwrap();
    let image = dir.join("disk.ext4");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(mib << 20).unwrap();
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(dir.join("root"))
        .arg(&image)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(status.success(), "mkfs.ext4 failed");
    image
}

/// `debugfs -R "cat PATH"` on the image.
fn host_cat(image: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    out.stdout
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn ext4_written_in_the_guest_is_clean_and_complete_on_the_host() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let image = ext4_image("rw", 64);
    let mut config = default_guest();
    config.mem_mib = 256;
    config.devices = vec![DeviceConfig::Block(BlockConfig {
        path: image.clone(),
        read_only: false,
        serial: Some("crx-disk-0".into()),
    })];
    let script = "set -e; mkdir -p /mnt; mount -t ext4 /dev/vda /mnt; \
        echo seed=$(cat /mnt/seed.txt); \
        echo serial=$(cat /sys/block/vda/serial); \
        dd if=/dev/urandom of=/mnt/random.bin bs=1M count=24 2>/dev/null; \
        echo guestsum=$(sha256sum /mnt/random.bin | cut -d' ' -f1); \
        mkdir /mnt/dir; echo written in the guest > /mnt/dir/note.txt; \
        rm /mnt/seed.txt; sync; fstrim -v /mnt || true; umount /mnt; echo unmounted=yes";
    let outcome = run_script("block rw", config, script);
    assert_eq!(console_value(&outcome, "seed"), Some("from the host"));
    assert_eq!(console_value(&outcome, "serial"), Some("crx-disk-0"));
    assert_eq!(console_value(&outcome, "unmounted"), Some("yes"));
    let guest_sum = console_value(&outcome, "guestsum")
        .expect("guest checksum")
        .to_string();

    let fsck = Command::new("fsck.ext4")
        .arg("-fn")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "host fsck after the VM: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let random = host_cat(&image, "/random.bin");
    assert_eq!(random.len(), 24 << 20);
    assert_eq!(sha256_hex(&random), guest_sum);
    assert_eq!(host_cat(&image, "/dir/note.txt"), b"written in the guest\n");
    assert!(
        host_cat(&image, "/seed.txt").is_empty(),
        "seed.txt was removed in the guest"
    );
    let _ = std::fs::remove_dir_all(image.parent().unwrap());
}

#[test]
fn a_read_only_disk_refuses_writes_and_keeps_its_bytes() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let image = ext4_image("ro", 16);
    let before = std::fs::read(&image).unwrap();
    let mut config = default_guest();
    config.devices = vec![DeviceConfig::Block(BlockConfig {
        path: image.clone(),
        read_only: true,
        serial: None,
    })];
    // busybox mount falls back to a read-only mount on a write-protected disk.
    let script = "mkdir -p /mnt; echo ro=$(cat /sys/block/vda/ro); \
        mount -t ext4 -o noload /dev/vda /mnt && echo seed=$(cat /mnt/seed.txt); \
        touch /mnt/new 2>/dev/null && echo fswrite=yes || echo fswrite=no; \
        dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null && echo rawwrite=yes || echo rawwrite=no";
    let outcome = run_script("block ro", config, script);
    assert_eq!(console_value(&outcome, "ro"), Some("1"));
    assert_eq!(console_value(&outcome, "seed"), Some("from the host"));
    assert_eq!(console_value(&outcome, "fswrite"), Some("no"));
    assert_eq!(console_value(&outcome, "rawwrite"), Some("no"));
    assert!(
        std::fs::read(&image).unwrap() == before,
        "a read-only disk changed"
    );
    let _ = std::fs::remove_dir_all(image.parent().unwrap());
}

#[test]
fn the_guest_hwrng_reads_from_the_rng_device() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let mut config = default_guest();
    config.devices = vec![DeviceConfig::Rng];
    let script = "echo rng=$(cat /sys/class/misc/hw_random/rng_current); \
        dd if=/dev/hwrng of=/tmp/a bs=4096 count=4 2>/dev/null; \
        dd if=/dev/hwrng of=/tmp/b bs=4096 count=4 2>/dev/null; \
        echo bytes=$(cat /tmp/a | wc -c); \
        cmp -s /tmp/a /tmp/b && echo differ=no || echo differ=yes; \
        echo distinct=$(od -An -v -tx1 /tmp/a | tr ' ' '\\n' | grep . | sort -u | wc -l)";
    let outcome = run_script("rng", config, script);
    assert!(
        console_value(&outcome, "rng").is_some_and(|r| r.starts_with("virtio_rng")),
        "{}",
        outcome.console_tail
    );
    assert_eq!(console_value(&outcome, "bytes"), Some("16384"));
    assert_eq!(console_value(&outcome, "differ"), Some("yes"));
    let distinct: u32 = console_value(&outcome, "distinct")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        distinct > 250,
        "16 KiB of entropy shows only {distinct} distinct byte values"
    );
}
