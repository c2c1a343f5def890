//! What the VM tests share: the default guest, one boot with its `crx-vm-boot:` line (counted by
//! `cargo xtask test`), exit assertions that show the console on failure, and the host side of
//! vsock (a directory that can hold the device's sockets, connecting to a guest port) and of
//! virtio-net (a network namespace to hold a tap).
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crx_core::builder::default_guest_dir;
use crx_core::{start_vm, ConsoleOutput, VmConfig, VmExit, VmOutcome};

/// A guest that has not ended by then is stopped and the test fails (the test host is slow).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn default_guest() -> VmConfig {
    let dir = default_guest_dir();
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initrd.cpio");
    assert!(
        kernel.exists() && initrd.exists(),
        "the default guest is missing from {} (run `cargo xtask guest`)",
        dir.display()
    );
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd);
    config.console = ConsoleOutput::Discard;
    config
}

pub fn boot(test: &str, config: &VmConfig) -> VmOutcome {
    let vmm = start_vm(config).unwrap_or_else(|e| panic!("{test}: cannot start the VM: {e}"));
    let outcome = vmm.wait_timeout(BOOT_TIMEOUT);
    println!(
        "crx-vm-boot: {test}: {} vCPU, {} MiB: {} (guest init at {:?})",
        config.vcpus, config.mem_mib, outcome.exit, outcome.times.guest_init
    );
    outcome
}

pub fn expect_exit(outcome: &VmOutcome, expected: VmExit) {
    assert_eq!(
        outcome.exit, expected,
        "console tail:\n{}",
        outcome.console_tail
    );
}

/// Runs `script` with the guest's /bin/sh; returns the outcome after checking it exited 0.
pub fn run_script(test: &str, config: VmConfig, script: &str) -> VmOutcome {
    let outcome = boot(test, &config.with_init_args(&["/bin/sh", "-c", script]));
    expect_exit(&outcome, VmExit::Exited(0));
    outcome
}

/// The value of the first console line `key=value` (a kernel message printed into the same
/// line before it is skipped). When there is none, the console tail goes to stderr, so the
/// failing assertion comes with it.
pub fn console_value<'a>(outcome: &'a VmOutcome, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    let found = outcome.console_tail.lines().find_map(|line| {
        line.match_indices(prefix.as_str())
            .find(|(at, _)| {
                line[..*at]
                    .chars()
                    .last()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '-' || c == '_'))
            })
            .map(|(at, _)| line[at + prefix.len()..].trim())
    });
    if found.is_none() {
        eprintln!(
            "no `{prefix}` line on the guest console; its tail:\n{}",
            outcome.console_tail
        );
    }
    found
}

/// How long the host side waits for the guest (booting under TCG in the test host is slow).
pub const HOST_WAIT: Duration = Duration::from_secs(300);

/// A scratch directory for the sockets, on a file system that can hold Unix sockets (in the
/// test host the temp dir is a 9p share, which cannot: bind fails with ENXIO).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let name = format!("crx-{test}-{}", std::process::id());
        let candidates = [
            PathBuf::from("/dev/shm"),
            PathBuf::from("/run"),
            std::env::temp_dir(),
        ];
        for base in candidates {
            let dir = base.join(&name);
            let _ = std::fs::remove_dir_all(&dir);
            if std::fs::create_dir_all(&dir).is_err() {
                continue;
            }
            if UnixListener::bind(dir.join("probe")).is_ok() {
                return Scratch(dir);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("no directory here can hold Unix sockets");
    }

    pub fn uds(&self) -> PathBuf {
        self.0.join("v.sock")
    }

    /// Where a guest connecting to host port `port` is sent.
    pub fn host_port(&self, port: u32) -> PathBuf {
        self.0.join(format!("v.sock_{port}"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Connects to the guest's `port` through the device's listener, retrying while the guest is
/// not listening yet (the device answers with a closed stream). Returns the stream after `OK`
/// and the host port the device reported.
pub fn connect_to_guest(uds: &Path, port: u32) -> (UnixStream, u32) {
    let deadline = Instant::now() + HOST_WAIT;
    loop {
        assert!(
            Instant::now() < deadline,
            "the guest never accepted port {port}"
        );
        let Ok(mut stream) = UnixStream::connect(uds) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        stream.set_read_timeout(Some(HOST_WAIT)).unwrap();
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let line = String::from_utf8(line).unwrap();
        if let Some(host_port) = line.strip_prefix("OK ") {
            return (stream, host_port.parse().expect("OK <port>"));
        }
        assert!(line.is_empty(), "unexpected handshake reply {line:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A network namespace, deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn create(test: &str) -> Netns {
        let name = format!("crx-{test}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        Netns(name)
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            // SAFETY: setns on this thread only, with an fd that stays open for the call.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    pub fn exec(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("iproute2's ip");
    assert!(status.success(), "ip {args:?} failed");
}
