//! Snapshots with real guests on KVM. A 2-vCPU guest computes a secret, starts a vsock echo
//! server and polls its disk (O_DIRECT reads) for a word from the host; the host pauses it there,
//! saves it, resumes it and lets it finish. Then two VMs are restored from the same files at
//! once (one mapping the memory file privately, one copying it into a memfd), each with its own
//! copy of the disk and its own vsock CID and socket, and each runs on: the secret computed
//! before the snapshot is still in its memory, its clock reads the time of the restore, and its
//! disk, rng and vsock devices work. Damaged, foreign and mismatched snapshots are refused with
//! the error that names the problem, and a VM with virtio-fs cannot be snapshotted. A guest with
//! a network interface, restored in another network namespace through the tap given to the
//! restore, answers there.
//!
//! Every boot and every restore prints one `crx-vm-boot:` line.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crx_core::snapshot::{format, read_state_file, SnapshotError, CRX_VERSION, STATE_FILE};
use crx_core::{
    restore_vm, start_vm, CpuTemplate, Error, MemoryBacking, RestoreConfig, VmExit, VmOutcome, Vmm,
};
use crx_virtio::devices::tap::Tap;
use crx_virtio::{BlockConfig, DeviceConfig, FsConfig, NetConfig, TapSource, VsockConfig};

mod common;
use common::{
    connect_to_guest, console_value, default_guest, expect_exit, Netns, Scratch, BOOT_TIMEOUT,
    HOST_WAIT,
};

/// The guest's vsock echo server port.
const ECHO_PORT: u32 = 5000;
/// The guest's exit status when it ran to the end.
const DONE: u32 = 7;

/// (The kernel command line carries it: no double quotes.) Before the snapshot: a secret from the rng device, an echo server, the time; then a poll of
/// the disk's first sector until it says `go`. After: the boot timer (restore → guest running),
/// the secret again, the time, fresh randomness from /dev/urandom and the rng device (64 KiB
/// hashed: the guest's hwrng drivers keep a few bytes read ahead, which are in the snapshot), a
/// write to the disk's second sector, and the echo server's end.
const SCRIPT: &str = "set -e; \
    secret=$(od -An -N16 -tx1 /dev/hwrng | tr -d ' \\n'); echo secret=$secret; \
    /bin/crx-vsock echo-server 5000 1 > /tmp/echo.log 2>&1 & \
    echo date-before=$(date +%s); \
    echo waiting-for-host; \
    until [ x$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 2) = xgo ]; do sleep 0.05; done; \
    devmem 0xc0000000 8 123; \
    echo date-after=$(date +%s); \
    echo secret-after=$secret; \
    echo urandom-after=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n'); \
    echo rng-after=$(head -c 65536 /dev/hwrng | sha256sum | cut -c1-32); \
    printf 'written after restore %s' $secret | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync oflag=direct 2>/dev/null; \
    wait; cat /tmp/echo.log; exit 7";

/// Logs to the test's output, as RUST_LOG says.
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A 1 MiB raw disk of zeros.
fn disk(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    path
}

/// Writes `go` into the disk's first sector: the guest's loop ends.
fn say_go(disk: &Path) {
    let file = OpenOptions::new().write(true).open(disk).unwrap();
    file.write_all_at(b"go", 0).unwrap();
    file.sync_all().unwrap();
}

/// The disk's second sector, up to its first zero byte.
fn second_sector(disk: &Path) -> String {
    let mut sector = [0u8; 512];
    std::fs::File::open(disk)
        .unwrap()
        .read_exact_at(&mut sector, 512)
        .unwrap();
    let end = sector.iter().position(|&b| b == 0).unwrap_or(512);
    String::from_utf8_lossy(&sector[..end]).into_owned()
}

/// Waits until the console shows `marker`; returns the console so far.
fn wait_for_console(vmm: &Vmm, marker: &str) -> String {
    let deadline = Instant::now() + HOST_WAIT;
    loop {
        let tail = vmm.console_tail();
        if tail.contains(marker) {
            return tail;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never printed {marker:?}; console:\n{tail}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One echo round trip with the guest's echo server, through the device's socket `uds`.
fn echo_once(uds: &Path, payload: &str) {
    let (mut stream, _) = connect_to_guest(uds, ECHO_PORT);
    stream.write_all(payload.as_bytes()).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut echoed = String::new();
    stream.read_to_string(&mut echoed).unwrap();
    assert_eq!(echoed, payload, "vsock echo");
}

fn report(what: &str, outcome: &VmOutcome) {
    println!(
        "crx-vm-boot: snapshot {what}: 2 vCPU, 128 MiB: {} (guest init at {:?})",
        outcome.exit, outcome.times.guest_init
    );
}

/// What every run of the script must show after the host's `go`.
fn check_after(outcome: &VmOutcome, secret: &str, disk: &Path) {
    expect_exit(outcome, VmExit::Exited(DONE));
    let tail = &outcome.console_tail;
    assert_eq!(
        console_value(outcome, "secret-after"),
        Some(secret),
        "{tail}"
    );
    assert_eq!(console_value(outcome, "echo-served"), Some("1"), "{tail}");
    let rng = console_value(outcome, "rng-after").unwrap_or_default();
    assert_eq!(rng.len(), 32, "a hash of the rng device's bytes: {tail}");
    assert_eq!(
        second_sector(disk),
        format!("written after restore {secret}")
    );
}

fn guest_devices(dir: &Path, disk: &Path, cid: u32) -> Vec<DeviceConfig> {
    vec![
        DeviceConfig::Block(BlockConfig {
            path: disk.to_path_buf(),
            read_only: false,
            serial: None,
        }),
        DeviceConfig::Rng,
        DeviceConfig::Vsock(VsockConfig {
            guest_cid: cid,
            uds_path: dir.join(format!("v{cid}.sock")),
        }),
    ]
}

#[test]
fn a_paused_guest_resumes_and_two_vms_restored_from_its_snapshot_run_on() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    logs();
    let scratch = Scratch::new("snapshot-restore");
    let dir = scratch.0.clone();
    let original_disk = disk(&dir, "disk3.img");
    let mut config = default_guest();
    config.vcpus = 2;
    config.devices = guest_devices(&dir, &original_disk, 3);
    let config = config.with_init_args(&["/bin/sh", "-c", SCRIPT]);
    let vmm = start_vm(&config).expect("boot");

    let before = wait_for_console(&vmm, "waiting-for-host");
    let secret = before
        .lines()
        .find_map(|l| l.trim().strip_prefix("secret="))
        .expect("the guest printed its secret")
        .trim()
        .to_string();
    assert_eq!(secret.len(), 32, "{before}");
    assert!(matches!(
        vmm.snapshot(&dir.join("unpaused")),
        Err(Error::Snapshot(SnapshotError::NotPaused))
    ));
    vmm.pause().expect("pause");
    let snap = dir.join("snap");
    let files = vmm.snapshot(&snap).expect("snapshot");
    let taken_at = Instant::now();
    println!(
        "snapshot: {} bytes of 128 MiB of guest RAM written",
        files.memory_bytes_written
    );
    // Each restored VM gets the disk as it was at the snapshot.
    let clone_disks: Vec<PathBuf> = (4..=5)
        .map(|cid| {
            let path = dir.join(format!("disk{cid}.img"));
            std::fs::copy(&original_disk, &path).unwrap();
            path
        })
        .collect();

    // The original goes on where it stopped.
    vmm.resume();
    say_go(&original_disk);
    echo_once(&dir.join("v3.sock"), "to the original");
    let outcome = vmm.wait_timeout(BOOT_TIMEOUT);
    report("original, paused and resumed", &outcome);
    check_after(&outcome, &secret, &original_disk);

    // Time passes before the restores: their guests' clocks must catch up with it.
    let wait = Duration::from_secs(20);
    std::thread::sleep(wait.saturating_sub(taken_at.elapsed()));
    let restored: Vec<(u32, Vmm, u64)> = [(4, MemoryBacking::Private), (5, MemoryBacking::Memfd)]
        .into_iter()
        .zip(&clone_disks)
        .map(|((cid, backing), disk)| {
            say_go(disk);
            let mut restore = RestoreConfig::new(&snap);
            restore.memory_backing = backing;
            restore.devices = Some(guest_devices(&dir, disk, cid));
            let restored_at = unix_now();
            let vmm = restore_vm(&restore).unwrap_or_else(|e| panic!("restore {cid}: {e}"));
            (cid, vmm, restored_at)
        })
        .collect();
    let mut randomness = Vec::new();
    for ((cid, vmm, restored_at), disk) in restored.into_iter().zip(&clone_disks) {
        echo_once(&dir.join(format!("v{cid}.sock")), &format!("to copy {cid}"));
        let outcome = vmm.wait_timeout(BOOT_TIMEOUT);
        report(&format!("restore {cid}"), &outcome);
        check_after(&outcome, &secret, disk);
        assert!(
            outcome.times.guest_init.is_some(),
            "the boot timer works after a restore"
        );
        let date: u64 = console_value(&outcome, "date-after")
            .and_then(|d| d.parse().ok())
            .expect("the guest's date");
        assert!(
            date + 3 >= restored_at && date <= unix_now() + 3,
            "guest clock {date} after a restore at {restored_at} (snapshot {}s earlier)",
            wait.as_secs()
        );
        randomness.push((
            console_value(&outcome, "rng-after").unwrap().to_string(),
            console_value(&outcome, "urandom-after")
                .unwrap_or_default()
                .to_string(),
        ));
    }
    assert_ne!(
        randomness[0].0, randomness[1].0,
        "each restored guest reads fresh bytes from its rng device"
    );
    println!(
        "urandom after restore: {} / {} ({})",
        randomness[0].1,
        randomness[1].1,
        if randomness[0].1 == randomness[1].1 {
            "identical"
        } else {
            "different"
        }
    );
}

/// Copies the snapshot's state file to `name`, changed by `change`.
fn damaged(snap: &Path, name: &str, change: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(snap.join(STATE_FILE)).unwrap();
    change(&mut bytes);
    let path = snap.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn restore_error(snap: &Path, change: impl FnOnce(&mut RestoreConfig)) -> SnapshotError {
    let mut config = RestoreConfig::new(snap);
    change(&mut config);
    match restore_vm(&config) {
        Ok(_) => panic!("a damaged snapshot was restored"),
        Err(Error::Snapshot(e)) => e,
        Err(other) => panic!("refused, but not as a snapshot error: {other}"),
    }
}

#[test]
fn damaged_foreign_and_mismatched_snapshots_are_refused() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    logs();
    let scratch = Scratch::new("snapshot-refused");
    let dir = scratch.0.clone();
    let mut config = default_guest();
    config.devices = vec![DeviceConfig::Rng];
    let script = "echo waiting-for-host; sleep 1; echo slept=yes; exit 3";
    let vmm = start_vm(&config.with_init_args(&["/bin/sh", "-c", script])).expect("boot");
    wait_for_console(&vmm, "waiting-for-host");
    vmm.pause().expect("pause");
    let snap = dir.join("snap");
    vmm.snapshot(&snap).expect("snapshot");
    let outcome = vmm.wait_timeout(Duration::ZERO);
    println!(
        "crx-vm-boot: snapshot refusals, saved guest: 1 vCPU, 128 MiB: {}",
        outcome.exit
    );

    let state = |path: PathBuf| move |c: &mut RestoreConfig| c.state = path;
    let truncated = damaged(&snap, "truncated", |b| b.truncate(b.len() / 2));
    assert!(matches!(
        restore_error(&snap, state(truncated)),
        SnapshotError::Truncated { .. }
    ));
    let flipped = damaged(&snap, "flipped", |b| {
        let at = b.len() - 100;
        b[at] ^= 0x01;
    });
    assert!(matches!(
        restore_error(&snap, state(flipped)),
        SnapshotError::Checksum
    ));
    let other_crx = damaged(&snap, "other-crx", |b| {
        let version = &mut b[14..14 + CRX_VERSION.len()];
        version[0] = if version[0] == b'9' { b'8' } else { b'9' };
    });
    assert!(matches!(
        restore_error(&snap, state(other_crx)),
        SnapshotError::CrxVersion { .. }
    ));
    let other_format = damaged(&snap, "other-format", |b| b[8] = b[8].wrapping_add(1));
    assert!(matches!(
        restore_error(&snap, state(other_format)),
        SnapshotError::FormatVersion { .. }
    ));
    let not_a_snapshot = damaged(&snap, "not-a-snapshot", |b| {
        b[..8].copy_from_slice(b"ELF\0\0\0\0\0")
    });
    assert!(matches!(
        restore_error(&snap, state(not_a_snapshot)),
        SnapshotError::BadMagic
    ));

    // Checksummed files that describe another CPU.
    let (cpu, saved) = read_state_file(&snap.join(STATE_FILE)).unwrap();
    let mut other_cpu = cpu;
    other_cpu.fingerprint[0] ^= 0xff;
    let other_template = format::CpuIdentity {
        template: match cpu.template {
            CpuTemplate::Host => CpuTemplate::Baseline,
            CpuTemplate::Baseline => CpuTemplate::Host,
        },
        ..cpu
    };
    for (name, identity) in [("other-cpu", other_cpu), ("other-template", other_template)] {
        let path = snap.join(name);
        std::fs::write(&path, format::encode(&identity, &saved).unwrap()).unwrap();
        let err = restore_error(&snap, state(path));
        assert!(
            matches!(err, SnapshotError::CpuMismatch { .. }),
            "{name}: {err}"
        );
    }

    let short_memory = snap.join("short-memory");
    std::fs::write(&short_memory, [0u8; 4096]).unwrap();
    assert!(matches!(
        restore_error(&snap, |c| c.memory = short_memory),
        SnapshotError::MemoryFileSize { .. }
    ));
    assert!(matches!(
        restore_error(&snap, |c| c.devices = Some(Vec::new())),
        SnapshotError::DeviceCount { saved: 1, given: 0 }
    ));
    let block = DeviceConfig::Block(BlockConfig {
        path: disk(&dir, "other.img"),
        read_only: true,
        serial: None,
    });
    assert!(matches!(
        restore_error(&snap, |c| c.devices = Some(vec![block])),
        SnapshotError::DeviceKind { index: 0, .. }
    ));

    // The untouched snapshot restores, and the guest finishes its sleep.
    let vmm = restore_vm(&RestoreConfig::new(&snap)).expect("restore");
    let outcome = vmm.wait_timeout(BOOT_TIMEOUT);
    println!(
        "crx-vm-boot: snapshot refusals, restored guest: 1 vCPU, 128 MiB: {}",
        outcome.exit
    );
    expect_exit(&outcome, VmExit::Exited(3));
    assert_eq!(console_value(&outcome, "slept"), Some("yes"));
}

/// A virtio-fs share the guest has not mounted is saved; a new virtiofsd (any shared directory)
/// serves it after a restore, into a memfd copy of guest RAM; a mounted one is refused.
#[test]
fn virtio_fs_is_saved_until_the_guest_mounts_it() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    logs();
    let scratch = Scratch::new("snapshot-fs");
    let dir = scratch.0.clone();
    let fs_config = |name: &str| {
        let shared = dir.join(name);
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::write(shared.join("hello"), format!("from-{name}")).unwrap();
        let mut config = FsConfig::new("share", &shared);
        config.socket_dir = Some(dir.clone());
        DeviceConfig::Fs(config)
    };
    let mut config = default_guest();
    config.devices = vec![DeviceConfig::Rng, fs_config("template")];
    let script = "mkdir -p /mnt; echo waiting-for-host; sleep 2; mount -t virtiofs share /mnt; \
                  echo share=$(cat /mnt/hello); exit 4";
    let vmm = start_vm(&config.clone().with_init_args(&["/bin/sh", "-c", script]))
        .expect("boot with virtio-fs");
    wait_for_console(&vmm, "waiting-for-host");
    vmm.pause().expect("pause");
    let snap = dir.join("snap");
    vmm.snapshot(&snap)
        .expect("a share not mounted yet is saved");
    report("virtio-fs saved guest", &vmm.wait_timeout(Duration::ZERO));

    let mut restore = RestoreConfig::new(&snap);
    restore.devices = Some(vec![DeviceConfig::Rng, fs_config("pod")]);
    assert!(matches!(
        restore_error(&snap, |c| *c = restore.clone()),
        SnapshotError::VirtioFsNeedsMemfd { index: 1 }
    ));
    // RAM loaded page by page on first touch: virtiofsd maps the memfd too.
    restore.memory_backing = MemoryBacking::LazyMemfd;
    let outcome = restore_vm(&restore)
        .expect("restore with virtio-fs")
        .wait_timeout(BOOT_TIMEOUT);
    report("virtio-fs restored guest", &outcome);
    expect_exit(&outcome, VmExit::Exited(4));
    assert_eq!(
        console_value(&outcome, "share"),
        Some("from-pod"),
        "console:\n{}",
        outcome.console_tail
    );

    // Mounted: virtiofsd holds the guest's FUSE session, which cannot be saved.
    let script = "mkdir -p /mnt; mount -t virtiofs share /mnt && echo mounted; sleep 1000";
    let vmm = start_vm(&config.with_init_args(&["/bin/sh", "-c", script])).expect("boot");
    wait_for_console(&vmm, "mounted");
    vmm.pause().expect("pause");
    let refused = vmm.snapshot(&dir.join("mounted-snap"));
    assert!(
        matches!(
            &refused,
            Err(Error::Snapshot(SnapshotError::Device { index: 1, .. }))
        ),
        "{:?}",
        refused.err()
    );
    assert!(!dir.join("mounted-snap").join(STATE_FILE).exists());
    report("virtio-fs mounted guest", &vmm.wait_timeout(Duration::ZERO));
}

const HOST_IP: &str = "10.201.0.1";
const GUEST_IP: &str = "10.201.0.2";
/// The host side of both namespaces' taps: the same gateway address, as the guest learned it.
const HOST_TAP_MAC: &str = "02:c7:00:00:aa:01";

/// A tap in `ns` with the host's address, up; its fd for the VMM.
fn host_tap(ns: &Netns) -> OwnedFd {
    let tap: OwnedFd = ns
        .run(|| Tap::open("crxtap0").expect("tap in the namespace").into())
        .join()
        .unwrap();
    for args in [
        &["ip", "link", "set", "crxtap0", "address", HOST_TAP_MAC][..],
        &[
            "ip",
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            "crxtap0",
        ],
        &["ip", "link", "set", "crxtap0", "up"],
    ] {
        assert!(ns.exec(args), "{args:?} in {}", ns.0);
    }
    tap
}

#[test]
fn a_guest_restored_with_another_tap_talks_through_it() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    logs();
    let scratch = Scratch::new("snapshot-net");
    let first = Netns::create("snap-net-a");
    let second = Netns::create("snap-net-b");
    let mac = [0x02, 0xc7, 0x00, 0x00, 0x00, 0x07];
    let net = |tap: &OwnedFd| {
        vec![DeviceConfig::Net(NetConfig {
            tap: TapSource::Fd(tap.as_raw_fd()),
            mac,
        })]
    };
    let tap = host_tap(&first);
    let mut config = default_guest();
    config.devices = net(&tap);
    let script = format!(
        "ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 || exit 1; \
         ping -c 1 -W 10 {HOST_IP} >/dev/null && echo ping-before=ok; \
         echo waiting-for-host; \
         nc -l -p 5001 > /tmp/in; \
         echo got=$(cat /tmp/in); \
         ping -c 2 -W 10 {HOST_IP} >/dev/null && echo ping-after=ok; \
         echo mac=$(cat /sys/class/net/eth0/address)"
    );
    let vmm = start_vm(&config.with_init_args(&["/bin/sh", "-c", &script])).expect("boot");
    let before = wait_for_console(&vmm, "waiting-for-host");
    assert!(before.contains("ping-before=ok"), "{before}");
    vmm.pause().expect("pause");
    let snap = scratch.0.join("snap");
    vmm.snapshot(&snap).expect("snapshot");
    let outcome = vmm.wait_timeout(Duration::ZERO);
    println!(
        "crx-vm-boot: snapshot net, saved guest: 1 vCPU, 128 MiB: {}",
        outcome.exit
    );
    drop(tap);

    let tap = host_tap(&second);
    let mut restore = RestoreConfig::new(&snap);
    restore.devices = Some(net(&tap));
    let vmm = restore_vm(&restore).expect("restore");
    let sent = second.run(|| {
        let deadline = Instant::now() + HOST_WAIT;
        let mut stream = loop {
            match TcpStream::connect((GUEST_IP, 5001)) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => panic!("the guest never answered: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        stream.write_all(b"from-the-second-namespace").unwrap();
    });
    let outcome = vmm.wait_timeout(BOOT_TIMEOUT);
    println!(
        "crx-vm-boot: snapshot net, restored guest: 1 vCPU, 128 MiB: {}",
        outcome.exit
    );
    sent.join().expect("the second namespace reached the guest");
    expect_exit(&outcome, VmExit::Exited(0));
    assert_eq!(
        console_value(&outcome, "got"),
        Some("from-the-second-namespace")
    );
    assert_eq!(
        console_value(&outcome, "ping-after"),
        Some("ok"),
        "{}",
        outcome.console_tail
    );
    assert_eq!(console_value(&outcome, "mac"), Some("02:c7:00:00:00:07"));
}
