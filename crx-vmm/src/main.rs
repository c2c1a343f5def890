//! `crx-vmm`: one microVM per process. Direct-boots a kernel (the default guest unless told
//! otherwise), waits for it to end, reports the boot time and passes the guest command's exit
//! status through. `crx boot` execs it; it links only crx-core, so the host memory each pod VM
//! costs is this small binary's, not the whole CLI's.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use crx_core::{ConsoleOutput, CpuTemplate, VmConfig, VmExit};

#[derive(clap::Parser)]
#[command(
    name = "crx-vmm",
    version,
    about = "Boot one microVM and wait for it (crx boot)"
)]
struct BootArgs {
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

fn main() -> anyhow::Result<()> {
    let launch = crx_core::launch::launch_instant();
    // An EnvFilter costs milliseconds to build; only pay for it when CRX_LOG asks for one.
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr);
    match tracing_subscriber::EnvFilter::try_from_env("CRX_LOG") {
        Ok(filter) => logs.with_env_filter(filter).init(),
        Err(_) => logs.with_max_level(tracing::Level::WARN).init(),
    }
    let code = run(<BootArgs as clap::Parser>::parse(), launch)?;
    std::process::exit(code)
}

/// Boots, waits, prints how the guest ended; returns the process exit code.
fn run(args: BootArgs, launch: Instant) -> anyhow::Result<i32> {
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
            (
                kernel,
                args.initrd.or_else(|| Some(dir.join("initrd.cpio"))),
            )
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
    config.console = args
        .console
        .map_or(ConsoleOutput::Stdout, ConsoleOutput::File);
    let config = config.with_init_args(&args.command);

    let vmm = crx_core::builder::start_vm_at(&config, launch).context("cannot boot the guest")?;
    let outcome = vmm.wait();
    let ms = |d: Option<std::time::Duration>| {
        d.map_or("-".to_string(), |d| {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        })
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
