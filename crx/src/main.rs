//! `crx`: the operator's command line for CRX microVMs.

mod image;
mod pod;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "crx", version, about = "CRX: every pod in its own microVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel straight into its init and wait for it to end (`crx boot --help`).
    #[command(disable_help_flag = true)]
    Boot {
        /// Arguments for crx-vmm: [--kernel K] [--initrd I] [--cmdline C] [--vcpus N]
        /// [--mem-mib M] [--cpu-template T] [--console FILE] [--disk D] [--net TAP] [--fs TAG=DIR] [--rng] [--vsock CID,UDS] [-- CMD…]
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    #[command(flatten)]
    Image(image::ImageCommand),
    #[command(flatten)]
    Pod(pod::PodCommand),
}

fn main() -> anyhow::Result<()> {
    let launch_ns = crx_core::launch::monotonic_ns();
    // An EnvFilter costs milliseconds to build; only pay for it when CRX_LOG asks for one.
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match tracing_subscriber::EnvFilter::try_from_env("CRX_LOG") {
        Ok(filter) => logs.with_env_filter(filter).init(),
        Err(_) => logs.with_max_level(tracing::Level::WARN).init(),
    }
    let code = match Cli::parse().command {
        Command::Boot { args } => return Err(exec_vmm(args, launch_ns)),
        Command::Image(cmd) => {
            image::run(cmd)?;
            0
        }
        Command::Pod(cmd) => pod::run(cmd)?,
    };
    std::process::exit(code)
}

/// Becomes `crx-vmm` (installed beside `crx`): one lean process per VM. Returns only on failure.
fn exec_vmm(args: Vec<std::ffi::OsString>, launch_ns: u64) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let vmm = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("crx-vmm"),
        Err(e) => return anyhow::anyhow!("cannot find crx's own path: {e}"),
    };
    let error = std::process::Command::new(&vmm)
        .args(args)
        .env(crx_core::launch::LAUNCH_ENV, launch_ns.to_string())
        .exec();
    anyhow::anyhow!(
        "cannot run {} (it is built and installed beside crx): {error}",
        vmm.display()
    )
}
