//! Boots real guests on KVM (the test host where /dev/kvm is PVM): the default guest kernel and
//! initrd from `cargo xtask guest`, plus a synthetic kernel that triple-faults.
//!
//! Each test starts with `crx_testhost::vm_test_here!()`, which runs the test body here on
//! standard KVM, or re-runs this very test inside the shared test host otherwise. Every boot
//! prints one `crx-vm-boot:` line; `cargo xtask test` counts them.

use std::path::PathBuf;

use crx_core::builder::default_guest_dir;
use crx_core::{start_vm, ConsoleOutput, CpuTemplate, Error, VmConfig, VmExit};

mod common;
use common::{boot, default_guest, expect_exit};

#[test]
fn boots_to_init_with_1_vcpu_and_128_mib() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let outcome = boot("1 vCPU", &default_guest());
    expect_exit(&outcome, VmExit::Exited(0));
    assert!(
        outcome.console_tail.contains("ready"),
        "{}",
        outcome.console_tail
    );
    let times = outcome.times;
    assert!(times.first_instruction.is_some() && times.guest_init.is_some());
    assert!(times.first_instruction < times.guest_init);
}

#[test]
fn boots_with_2_vcpus_and_512_mib_and_the_guest_sees_them() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let mut config = default_guest();
    config.vcpus = 2;
    config.mem_mib = 512;
    let script = "echo cpus=$(grep -c ^processor /proc/cpuinfo); \
                  echo deadline=$(grep -c tsc_deadline_timer /proc/cpuinfo); \
                  echo memkb=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo)";
    let outcome = boot(
        "2 vCPUs",
        &config.with_init_args(&["/bin/sh", "-c", script]),
    );
    expect_exit(&outcome, VmExit::Exited(0));
    assert!(
        outcome.console_tail.contains("cpus=2"),
        "{}",
        outcome.console_tail
    );
    // Each vCPU's LAPIC offers the TSC-deadline mode (no timer calibration at boot).
    assert!(
        outcome.console_tail.contains("deadline=2"),
        "{}",
        outcome.console_tail
    );
    let memkb: u64 = outcome
        .console_tail
        .lines()
        .find_map(|l| l.trim().strip_prefix("memkb="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in:\n{}", outcome.console_tail));
    assert!(
        (400 * 1024..=512 * 1024).contains(&memkb),
        "guest sees {memkb} kB of 512 MiB"
    );
}

#[test]
fn boots_a_bzimage_through_the_64_bit_boot_protocol() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let mut config = default_guest();
    config.kernel = default_guest_dir().join("bzImage");
    let outcome = boot(
        "bzImage",
        &config.with_init_args(&["/bin/sh", "-c", "echo via-bzimage"]),
    );
    expect_exit(&outcome, VmExit::Exited(0));
    assert!(
        outcome.console_tail.contains("via-bzimage"),
        "{}",
        outcome.console_tail
    );
}

#[test]
fn the_baseline_cpu_template_hides_what_the_host_template_shows() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    // BMI2 is in every recent x86 CPU (and in the test host's) but not in x86-64-v2.
    // (The kernel command line cannot carry a double quote inside an argument.)
    let script = "flags=$(grep -m1 ^flags /proc/cpuinfo); for f in bmi2 hypervisor vmx svm; do \
                  echo $flags | grep -qw $f && echo has-$f || echo no-$f; done";
    let flags_under = |template: CpuTemplate| {
        let mut config = default_guest();
        config.cpu_template = template;
        let config = config.with_init_args(&["/bin/sh", "-c", script]);
        let outcome = boot(&format!("{template} template"), &config);
        expect_exit(&outcome, VmExit::Exited(0));
        outcome.console_tail
    };
    let host = flags_under(CpuTemplate::Host);
    let baseline = flags_under(CpuTemplate::Baseline);
    assert!(host.contains("has-bmi2"), "host template:\n{host}");
    assert!(
        baseline.contains("no-bmi2"),
        "baseline template:\n{baseline}"
    );
    for tail in [&host, &baseline] {
        assert!(
            tail.contains("has-hypervisor") && tail.contains("no-vmx") && tail.contains("no-svm"),
            "{tail}"
        );
    }
}

#[test]
fn the_guest_commands_exit_status_reaches_the_host() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let config = default_guest().with_init_args(&["/bin/sh", "-c", "echo bye; exit 7"]);
    let outcome = boot("exit 7", &config);
    expect_exit(&outcome, VmExit::Exited(7));
    assert!(outcome.console_tail.contains("bye"));
}

#[test]
fn guest_reboot_ends_the_vm() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let config = default_guest().with_init_args(&["/bin/reboot", "-f"]);
    expect_exit(&boot("reboot", &config), VmExit::Reset);
}

#[test]
fn guest_kernel_panic_is_reported_as_a_panic() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    // An init that exits at once makes the kernel panic ("Attempted to kill init!").
    let mut config = default_guest();
    config.cmdline.push_str(" rdinit=/bin/false");
    let outcome = boot("panic", &config);
    match &outcome.exit {
        VmExit::Panic { message } => assert!(message.contains("Kernel panic"), "{message}"),
        other => panic!(
            "expected a panic, got {other}; console:\n{}",
            outcome.console_tail
        ),
    }
}

/// A minimal ELF64 kernel whose only instruction is `ud2`: with the boot IDT empty, the #UD
/// escalates to a triple fault.
fn triple_fault_kernel() -> PathBuf {
    const ENTRY: u64 = 0x10_0000;
    const CODE_OFFSET: u64 = 64 + 56;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes()); // ehsize phentsize phnum shentsize shnum shstrndx
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [CODE_OFFSET, ENTRY, ENTRY, 2, 2, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(&[0x0f, 0x0b]); // ud2
    let path = std::env::temp_dir().join(format!("crx-triple-fault-{}.elf", std::process::id()));
    std::fs::write(&path, elf).unwrap();
    path
}

#[test]
fn a_triple_fault_is_reported_as_such() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let kernel = triple_fault_kernel();
    let mut config = VmConfig::new(&kernel);
    config.console = ConsoleOutput::Discard;
    let outcome = boot("triple fault", &config);
    std::fs::remove_file(kernel).unwrap();
    // Intel keeps the faulting RIP; AMD resets the vCPU on the shutdown intercept (RIP 0xfff0).
    assert!(
        matches!(outcome.exit, VmExit::TripleFault { vcpu: 0, .. }),
        "expected a triple fault, got {}",
        outcome.exit
    );
}

#[test]
fn a_missing_or_corrupt_kernel_is_a_clear_error() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let missing = start_vm(&VmConfig::new("/nonexistent/vmlinux")).err();
    assert!(
        matches!(missing, Some(Error::KernelOpen { .. })),
        "{missing:?}"
    );
    let corrupt = std::env::temp_dir().join(format!("crx-corrupt-{}", std::process::id()));
    let mut bytes = std::fs::read(default_guest().kernel).unwrap();
    bytes.truncate(4096);
    bytes[0] = b'X';
    std::fs::write(&corrupt, bytes).unwrap();
    let err = start_vm(&VmConfig::new(&corrupt)).err();
    std::fs::remove_file(&corrupt).unwrap();
    let message = err.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(matches!(err, Some(Error::KernelFormat { .. })), "{message}");
    assert!(
        message.contains("neither an ELF vmlinux nor a bzImage"),
        "{message}"
    );
}

/// Open fds, threads, and resident memory of this process.
fn resources() -> (usize, usize, u64) {
    let count = |dir: &str| std::fs::read_dir(dir).unwrap().count();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (count("/proc/self/fd"), count("/proc/self/task"), rss_kb)
}

#[test]
fn twenty_boots_in_a_row_leak_no_fd_thread_or_memory() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let mut config = default_guest();
    config.vcpus = 2;
    let config = config.with_init_args(&["/bin/true"]);
    // The first boot warms up lazily allocated process state (signal handler, allocator arenas).
    expect_exit(&boot("leak warm-up", &config), VmExit::Exited(0));
    let before = resources();
    for i in 1..=20 {
        expect_exit(&boot(&format!("leak {i}/20"), &config), VmExit::Exited(0));
    }
    let after = resources();
    assert_eq!(after.0, before.0, "open fds before/after 20 boots");
    assert_eq!(after.1, before.1, "threads before/after 20 boots");
    assert!(
        after.2 <= before.2 + 8 * 1024,
        "RSS grew from {} kB to {} kB over 20 boots",
        before.2,
        after.2
    );
}
