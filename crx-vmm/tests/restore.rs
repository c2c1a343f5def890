//! `crx-vmm --restore DIR`: a guest saved by crx-core in this process runs on in a fresh
//! crx-vmm process (its console on stdout, its exit status passed through), and a truncated state
//! file is refused with a message saying so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crx_core::builder::default_guest_dir;
use crx_core::snapshot::STATE_FILE;
use crx_core::{start_vm, ConsoleOutput, VmConfig};

const SCRIPT: &str = "echo waiting-for-host; sleep 1; echo slept=yes; exit 3";

/// A scratch directory on tmpfs, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn restore(dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crx-vmm"))
        .arg("--restore")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .expect("crx-vmm runs")
}

#[test]
fn a_saved_guest_runs_on_in_crx_vmm_and_a_truncated_state_file_is_refused() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = Scratch(PathBuf::from(format!(
        "/dev/shm/crx-vmm-restore-{}",
        std::process::id()
    )));
    let snap = scratch.0.join("snap");
    let guest = default_guest_dir();
    let mut config = VmConfig::new(guest.join("vmlinux"));
    config.initrd = Some(guest.join("initrd.cpio"));
    config.console = ConsoleOutput::Discard;
    let vmm = start_vm(&config.with_init_args(&["/bin/sh", "-c", SCRIPT])).expect("boot");
    let started = Instant::now();
    while !vmm.console_tail().contains("waiting-for-host") {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the guest never got going: {}",
            vmm.console_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    vmm.pause().expect("pause");
    vmm.snapshot(&snap).expect("snapshot");
    let outcome = vmm.wait_timeout(Duration::ZERO);
    println!(
        "crx-vm-boot: crx-vmm restore, saved guest: 1 vCPU, 128 MiB: {}",
        outcome.exit
    );

    let damaged = scratch.0.join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    let state = std::fs::read(snap.join(STATE_FILE)).unwrap();
    std::fs::write(damaged.join(STATE_FILE), &state[..state.len() / 2]).unwrap();
    let refused = restore(&damaged);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "restored a truncated snapshot");
    assert!(
        stderr.contains("cannot restore the snapshot") && stderr.contains("truncated"),
        "{stderr}"
    );

    let restored = restore(&snap);
    let stdout = String::from_utf8_lossy(&restored.stdout);
    let stderr = String::from_utf8_lossy(&restored.stderr);
    println!("crx-vm-boot: crx-vmm restore, restored guest: 1 vCPU, 128 MiB: {stderr}");
    assert_eq!(restored.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(stdout.contains("slept=yes"), "{stdout}");
}
