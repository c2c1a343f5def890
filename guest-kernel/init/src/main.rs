//! `crx-init`: the guest's PID 1 in CRX's default initrd.
//!
//! The protocol (the VMM implements the other side):
//! 1. First thing, signal the boot timer: write byte 123 to guest-physical `0xc000_0000`
//!    (Firecracker's `--boot-timer` device) through `/dev/mem`, and 0x41 to I/O port 0x80
//!    (Cloud Hypervisor's debug port). devtmpfs is mounted on /dev first only if `/dev/mem` is
//!    missing (the kernel does not mount devtmpfs itself when it runs an initramfs `/init`).
//! 2. Mount proc, sysfs and cgroup2; set `PATH`.
//! 3. Run the command `argv[1..]` (what follows ` -- ` on the kernel command line) with the
//!    console as stdin/stdout/stderr, reaping every child meanwhile. No command: print
//!    `crx-init: ready`, status 0. Status = exit code, or 128 + signal; 127 if it cannot be run.
//! 4. Report: write the status as a little-endian u32 to `0xc000_0000 + 8` (CRX's exit
//!    register), then `sync()` and `reboot(RB_AUTOBOOT)` (the kernel's `reboot=k` makes that an
//!    i8042 reset, which Firecracker and Cloud Hypervisor turn into a VM exit).

mod command;

use crx_init::{hw, setup};

/// Environment variable (set from the kernel command line) that makes init print the status.
const VERBOSE_ENV: &str = "crx_init_verbose";

fn main() {
    // 1. Boot timer, before anything else that could take time.
    setup::ensure_devtmpfs();
    let page = hw::PhysPage::map(hw::BOOT_TIMER_ADDR);
    if let Some(page) = &page {
        page.write_u8(hw::BOOT_TIMER_OFFSET, hw::BOOT_TIMER_VALUE);
    }
    hw::debug_port_write(hw::DEBUG_PORT_VALUE);

    // 2. The rest of the environment.
    setup::ensure_console_fds();
    if page.is_none() {
        eprintln!("crx-init: warning: /dev/mem unusable, boot timer and exit register not written");
    }
    setup::mount_filesystems();
    setup::set_path();
    let verbose = std::env::var_os(VERBOSE_ENV).is_some_and(|v| v == "1");
    // Not passed on to the command. (Single-threaded: changing the environment is sound.)
    std::env::remove_var(VERBOSE_ENV);

    // 3. The command.
    let status = match command::Invocation::from_args(std::env::args_os().skip(1)) {
        None => {
            println!("crx-init: ready");
            0
        }
        Some(invocation) => command::run(&invocation),
    };

    // 4. Report and power off. `crx_init_verbose=1` on the kernel command line (a `name=value`
    // word the kernel does not know ends up in init's environment) also prints the status.
    if verbose {
        eprintln!("crx-init: exit status {status}");
    }
    if let Some(page) = &page {
        page.write_u32(hw::EXIT_REGISTER_OFFSET, status);
    }
    hw::power_off()
}
