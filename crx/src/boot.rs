//! `crx boot`: direct-boot a kernel (the default guest unless told otherwise), wait for it to end,
//! report the boot time and pass the guest command's exit status through.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use crx_core::{ConsoleOutput, CpuTemplate, VmConfig, VmExit};

#[derive(clap::Args)]
pub struct BootArgs {
    /// Kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage [default: the default guest's vmlinux]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd (cpio) [default: the default guest's initrd, when booting the default kernel]
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: console on ttyS0, quiet, reboot=k, panic=-1, no PCI]
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    #[arg(long, default_value_t = 128)]
    mem_mib: u32,
    /// CPU template: host or baseline
    #[arg(long, default_value_t = CpuTemplate::Host)]
    cpu_template: CpuTemplate,
    /// Write the guest console to this file instead of stdout
    #[arg(long)]
    console: Option<PathBuf>,
    /// Command for the guest's init to run (after `--`)
    #[arg(last = true)]
    command: Vec<String>,
}

/// Boots, waits, prints how the guest ended; returns the process exit code.
pub fn run(args: BootArgs, launch: Instant) -> anyhow::Result<i32> {
    let (kernel, initrd) = match args.kernel {
        Some(kernel) => (kernel, args.initrd),
        None => {
            let dir = crx_core::builder::default_guest_dir();
            let kernel = dir.join("vmlinux");
            anyhow::ensure!(
                kernel.exists(),
                "no default guest at {} (build it with `cargo xtask guest`, or pass --kernel)",
                dir.display()
            );
            (kernel, args.initrd.or_else(|| Some(dir.join("initrd.cpio"))))
        }
    };
    let mut config = VmConfig::new(kernel);
    config.initrd = initrd;
    if let Some(cmdline) = args.cmdline {
        config.cmdline = cmdline;
    }
    config.vcpus = args.vcpus;
    config.mem_mib = args.mem_mib;
    config.cpu_template = args.cpu_template;
    config.console = args.console.map_or(ConsoleOutput::Stdout, ConsoleOutput::File);
    let config = config.with_init_args(&args.command);

    let vmm = crx_core::builder::start_vm_at(&config, launch).context("cannot boot the guest")?;
    let outcome = vmm.wait();
    let ms = |d: Option<std::time::Duration>| {
        d.map_or("-".to_string(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
    };
    eprintln!(
        "crx: {}; boot time {} (launch → guest init), VMM setup {} (launch → first instruction)",
        outcome.exit,
        ms(outcome.times.guest_init),
        ms(outcome.times.first_instruction)
    );
    if !matches!(
        outcome.exit,
        VmExit::Exited(_) | VmExit::Reset | VmExit::PowerOff
    ) {
        eprintln!("crx: last console output:\n{}", outcome.console_tail);
    }
    Ok(outcome.exit.exit_code())
}
