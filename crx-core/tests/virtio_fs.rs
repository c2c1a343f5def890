//! virtio-fs with real guests and a real virtiofsd: the guest mounts the shared directory by its
//! tag, reads what the host put there, writes, unlinks and renames what the host then finds, lists
//! a directory of 10 000 entries, and sees an error (not a hang) when virtiofsd is killed under it.
//!
//! Scratch directories live under /tmp, which the test host shares. Each test starts with
//! `crx_testhost::vm_test_here!()` (see boot.rs).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crx_core::{start_vm, VmConfig, VmExit};
use crx_virtio::{DeviceConfig, FsConfig};

mod common;
use common::{boot, console_value, default_guest, expect_exit, run_script, BOOT_TIMEOUT};

const TAG: &str = "crxshare";

/// A test's shared directory and socket directory (under /run: the test host's /tmp is 9p, which
/// cannot hold a Unix socket), removed when it ends.
struct Scratch {
    root: PathBuf,
    sockets: PathBuf,
}

impl Scratch {
    /// The shared directory goes under `base`.
    fn new(test: &str, base: &str) -> Scratch {
        let root = PathBuf::from(format!(
            "{base}/crx-virtio-fs-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("shared")).unwrap();
        let sockets = PathBuf::from(format!(
            "/run/crx-virtio-fs-sockets-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&sockets);
        std::fs::create_dir_all(&sockets).unwrap();
        Scratch { root, sockets }
    }

    fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    fn sockets(&self) -> PathBuf {
        self.sockets.clone()
    }

    /// The default guest with 256 MiB and the shared directory attached under [`TAG`].
    fn guest(&self) -> VmConfig {
        let mut config = default_guest();
        config.mem_mib = 256;
        let mut fs = FsConfig::new(TAG, self.shared());
        fs.socket_dir = Some(self.sockets());
        config.devices = vec![DeviceConfig::Fs(fs)];
        config
    }

    /// The pids of the virtiofsd processes serving this test's sockets.
    fn virtiofsd_pids(&self) -> Vec<u32> {
        let wanted = format!("--socket-path={}/", self.sockets().display());
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let is_ours = cmdline
                .split(|&b| b == 0)
                .any(|arg| arg.starts_with(wanted.as_bytes()));
            // A virtiofsd in a namespace sandbox forks; its first process is the one we start.
            if is_ours && !pids.iter().any(|&p| is_parent(p, pid)) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.sockets);
    }
}

fn is_parent(parent: u32, pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_comm = &stat[stat.rfind(')')? + 2..];
            after_comm.split(' ').nth(1)?.parse::<u32>().ok()
        })
        == Some(parent)
}

/// The guest's mount, then `body`; the script exits with `body`'s status.
fn mounted(body: &str) -> String {
    format!("mkdir -p /mnt && mount -t virtiofs {TAG} /mnt || exit 90; {body}")
}

/// A pattern that makes misplaced or dropped pages visible.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 4096 + i * 7) as u8).collect()
}

#[test]
fn guest_reads_writes_unlinks_and_renames_host_files() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = Scratch::new("rw", "/tmp");
    let shared = scratch.shared();
    std::fs::write(shared.join("hello.txt"), "hello from the host\n").unwrap();
    std::fs::write(shared.join("big.bin"), pattern(3 << 20)).unwrap();
    std::fs::write(shared.join("remove-me"), "x").unwrap();
    std::fs::write(shared.join("rename-me"), "renamed content").unwrap();
    let script = mounted(
        "echo hello=$(cat /mnt/hello.txt); \
         echo bigsize=$(wc -c < /mnt/big.bin); \
         cp /mnt/big.bin /mnt/big.copy || exit 91; \
         echo 'written by the guest' > /mnt/from-guest.txt || exit 92; \
         mkdir /mnt/dir && echo nested > /mnt/dir/file || exit 93; \
         rm /mnt/remove-me || exit 94; \
         mv /mnt/rename-me /mnt/renamed || exit 95; \
         echo listing=$(ls /mnt | tr '\\n' ,); \
         umount /mnt || exit 96",
    );
    let started = Instant::now();
    let outcome = boot(
        "virtio-fs read/write",
        &scratch.guest().with_init_args(&["/bin/sh", "-c", &script]),
    );
    expect_exit(&outcome, VmExit::Exited(0));
    println!("virtio-fs read/write: VM ran {:?}", started.elapsed());
    assert_eq!(
        console_value(&outcome, "hello"),
        Some("hello from the host")
    );
    assert_eq!(console_value(&outcome, "bigsize"), Some("3145728"));
    assert_eq!(
        console_value(&outcome, "listing"),
        Some("big.bin,big.copy,dir,from-guest.txt,hello.txt,renamed,")
    );
    assert_eq!(
        std::fs::read(shared.join("big.copy")).unwrap(),
        pattern(3 << 20)
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("from-guest.txt")).unwrap(),
        "written by the guest\n"
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("dir/file")).unwrap(),
        "nested\n"
    );
    assert!(!shared.join("remove-me").exists());
    assert!(!shared.join("rename-me").exists());
    assert_eq!(
        std::fs::read_to_string(shared.join("renamed")).unwrap(),
        "renamed content"
    );
    // The VMM's teardown killed and reaped virtiofsd and removed its socket.
    assert_eq!(scratch.virtiofsd_pids(), Vec::<u32>::new());
    assert_eq!(std::fs::read_dir(scratch.sockets()).unwrap().count(), 0);
}

#[test]
fn a_read_only_share_can_be_read_but_not_changed_by_the_guest() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = Scratch::new("ro", "/tmp");
    let shared = scratch.shared();
    std::fs::write(shared.join("keep.txt"), "host data\n").unwrap();
    let mut config = scratch.guest();
    if let [DeviceConfig::Fs(fs)] = config.devices.as_mut_slice() {
        fs.read_only = true;
    }
    let script = mounted(
        "echo read=$(cat /mnt/keep.txt); \
         echo new > /mnt/new.txt 2>/dev/null && exit 91; \
         rm /mnt/keep.txt 2>/dev/null && exit 92; \
         echo append >> /mnt/keep.txt 2>/dev/null && exit 93; \
         echo refused=yes",
    );
    let outcome = boot(
        "virtio-fs read-only",
        &config.with_init_args(&["/bin/sh", "-c", &script]),
    );
    expect_exit(&outcome, VmExit::Exited(0));
    assert_eq!(console_value(&outcome, "read"), Some("host data"));
    assert_eq!(console_value(&outcome, "refused"), Some("yes"));
    assert_eq!(
        std::fs::read_to_string(shared.join("keep.txt")).unwrap(),
        "host data\n"
    );
    assert!(!shared.join("new.txt").exists());
}

#[test]
fn guest_lists_a_directory_of_10000_host_files() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    // On the test host's tmpfs: 10 000 files on its 9p /tmp take minutes to create and list.
    let scratch = Scratch::new("ls", "/run");
    let many = scratch.shared().join("many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..10_000 {
        std::fs::File::create(many.join(format!("entry-{i:05}"))).unwrap();
    }
    let script = mounted(
        "ls /mnt/many > /listing || exit 91; \
         echo count=$(wc -l < /listing); \
         echo last=$(tail -n 1 /listing)",
    );
    let started = Instant::now();
    let outcome = boot(
        "virtio-fs 10k entries",
        &scratch.guest().with_init_args(&["/bin/sh", "-c", &script]),
    );
    expect_exit(&outcome, VmExit::Exited(0));
    println!("virtio-fs 10k entries: VM ran {:?}", started.elapsed());
    assert_eq!(console_value(&outcome, "count"), Some("10000"));
    assert_eq!(console_value(&outcome, "last"), Some("entry-09999"));
}

#[test]
fn the_share_works_again_after_the_guest_driver_resets_the_device() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = Scratch::new("rebind", "/tmp");
    std::fs::write(scratch.shared().join("hello.txt"), "still here\n").unwrap();
    // Unbinding resets the device (status 0: virtiofsd's rings are stopped); binding sets it up
    // and activates it again.
    let script = mounted(
        "echo before=$(cat /mnt/hello.txt); umount /mnt || exit 91; \
         [ -d /sys/bus/virtio ] || mount -t sysfs sysfs /sys; \
         driver=/sys/bus/virtio/drivers/virtiofs; dev=$(basename $(ls -d $driver/virtio*)); echo dev=$dev; \
         echo $dev > $driver/unbind || exit 92; echo $dev > $driver/bind || exit 93; \
         mount -t virtiofs crxshare /mnt || exit 94; \
         echo after=$(cat /mnt/hello.txt); echo again > /mnt/after-rebind.txt",
    );
    let outcome = run_script("virtio-fs rebind", scratch.guest(), &script);
    assert!(console_value(&outcome, "dev").is_some_and(|d| d.starts_with("virtio")));
    assert_eq!(console_value(&outcome, "before"), Some("still here"));
    assert_eq!(console_value(&outcome, "after"), Some("still here"));
    assert_eq!(
        std::fs::read_to_string(scratch.shared().join("after-rebind.txt")).unwrap(),
        "again\n"
    );
}

/// The host log lines (tracing) of this test process.
fn host_log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        struct Capture;
        impl Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                host_log().lock().unwrap().extend_from_slice(buf);
                std::io::stderr().write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_writer(|| Capture)
            .with_max_level(tracing::Level::WARN)
            .init();
        Mutex::new(Vec::new())
    })
}

#[test]
fn killing_virtiofsd_mid_use_fails_the_guests_requests_and_the_vm_ends() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    host_log();
    let scratch = Scratch::new("kill", "/tmp");
    let shared = scratch.shared();
    // Large enough that the kill most likely lands while a read is being served.
    std::fs::write(shared.join("data"), pattern(4 << 20)).unwrap();
    // The guest reads the file in a loop until a read fails (announcing the third read to the host
    // through the share), then reports the error and what fresh accesses (a listing, a create)
    // see on the dead mount.
    let script = mounted(
        "n=0; \
         while cat /mnt/data > /dev/null 2> /cat.err; do \
           n=$((n+1)); [ $n = 3 ] && echo up > /mnt/ready; \
         done; \
         echo reads=$n; echo read-error=$(cat /cat.err); \
         echo ls-error=$(ls /mnt/ 2>&1 >/dev/null); \
         echo create-error=$(echo x 2>&1 > /mnt/new-file)",
    );
    let config = scratch.guest().with_init_args(&["/bin/sh", "-c", &script]);
    let started = Instant::now();
    let vmm = start_vm(&config).expect("start the VM");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !shared.join("ready").exists() {
        assert!(
            Instant::now() < deadline,
            "the guest never reached its third read of the share"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest keeps reading: kill virtiofsd with requests in flight.
    let pids = scratch.virtiofsd_pids();
    assert_eq!(pids.len(), 1, "virtiofsd processes: {pids:?}");
    // SAFETY: kill(2) on a pid of our own child, found by its socket path.
    assert_eq!(
        unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) },
        0
    );
    let killed = Instant::now();
    let outcome = vmm.wait_timeout(BOOT_TIMEOUT);
    println!(
        "virtio-fs kill: VM ended {:?} after the kill ({:?} in all)",
        killed.elapsed(),
        started.elapsed()
    );
    expect_exit(&outcome, VmExit::Exited(0));
    let log = String::from_utf8_lossy(&host_log().lock().unwrap()).into_owned();
    println!(
        "guest saw, and the host log:\n{}",
        outcome
            .console_tail
            .lines()
            .filter(|l| l.contains("error=") || l.contains("reads="))
            .chain(log.lines().filter(|l| l.contains("left unanswered")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let reads: u32 = console_value(&outcome, "reads").unwrap().parse().unwrap();
    assert!(reads >= 3, "reads={reads}");
    let not_connected = "Transport endpoint is not connected";
    for key in ["read-error", "ls-error", "create-error"] {
        let value = console_value(&outcome, key).unwrap_or_default();
        assert!(
            value.contains(not_connected),
            "{key}={value}\n{}",
            outcome.console_tail
        );
    }
    assert!(
        log.contains(&format!(
            "virtiofsd for tag {TAG} (pid {}) exited: status signal: 9",
            pids[0]
        )),
        "host log:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "virtio-fs {TAG}: virtiofsd closed its vhost-user connection"
        )),
        "host log:\n{log}"
    );
    assert_eq!(std::fs::read_dir(scratch.sockets()).unwrap().count(), 0);
}
