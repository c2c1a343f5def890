//! What the VM tests share: the default guest, one boot with its `crx-vm-boot:` line (counted by
//! `cargo xtask test`), and exit assertions that show the console on failure.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

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
