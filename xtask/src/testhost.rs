//! `cargo xtask testhost [--stop] [-- CMD…]`: runs CMD in the KVM test host (see crx-testhost),
//! in the same working directory and with this environment, passing its output and exit code
//! through. Without CMD it shows the running test host; `--stop` powers it off; `--prepare`
//! builds and starts it when this host needs one (a PVM host) and does nothing elsewhere.

use std::ffi::OsString;

use anyhow::Context;
use crx_testhost::{Invocation, TestHost};

#[derive(clap::Args)]
pub struct TesthostArgs {
    /// Power off this workspace's running test host.
    #[arg(long, conflicts_with = "command")]
    pub stop: bool,
    /// Build and start the test host if this host's /dev/kvm needs one (PVM); else do nothing.
    #[arg(long, conflicts_with_all = ["command", "stop"])]
    pub prepare: bool,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

pub fn run(args: TesthostArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("crx_testhost=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if args.stop {
        let stopped = TestHost::stop().context("stopping the test host")?;
        eprintln!(
            "{}",
            if stopped {
                "test host stopped"
            } else {
                "no test host was running"
            }
        );
        return Ok(());
    }
    if args.prepare {
        if crx_testhost::guests_run_here().context("probing /dev/kvm")? {
            eprintln!("standard KVM here: no test host needed");
            return Ok(());
        }
        TestHost::shared().context("starting the test host")?;
        return show_status();
    }
    if args.command.is_empty() {
        return show_status();
    }
    let host = TestHost::shared().context("starting the test host")?;
    let invocation = Invocation::new(args.command).envs(caller_env());
    let status = match host.run_streaming(&invocation) {
        Ok(status) => status,
        // Like a shell: 127 for a command that cannot be started.
        Err(e @ crx_testhost::Error::Spawn { .. }) => {
            eprintln!("cargo xtask testhost: {e}");
            std::process::exit(127);
        }
        Err(e) => return Err(e.into()),
    };
    let code = crate::kvm_here::exit_code(status);
    std::process::exit(code);
}

fn show_status() -> anyhow::Result<()> {
    let Some(host) = TestHost::running().context("checking the test host")? else {
        println!(
            "no test host running (the first `cargo xtask testhost -- CMD` or VM test starts one)"
        );
        return Ok(());
    };
    println!(
        "test host: QEMU pid {}, agent at 127.0.0.1:{}",
        host.qemu_pid, host.port
    );
    println!("run dir:   {}", host.run_dir.display());
    match host.status {
        Ok(status) => {
            println!("L1 kernel: {}", status.kernel);
            println!(
                "/dev/kvm:  {}",
                status.kvm.as_deref().unwrap_or("not probed")
            );
            println!(
                "agent up {:.0} s, {} command(s) running, powers off after {} s idle",
                status.uptime_secs, status.active_commands, status.idle_shutdown_secs
            );
        }
        Err(e) => println!("agent does not answer: {e}"),
    }
    Ok(())
}

/// This process's environment for a command run in the test host, less `LD_LIBRARY_PATH`: cargo
/// sets it to run xtask (its target and toolchain directories), and inside the test host every
/// dynamically linked program would then look for each library in each of those directories
/// over the shared filesystem first (~0.2 s per process started).
pub(crate) fn caller_env() -> impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)> {
    std::env::vars_os().filter(|(key, _)| key != "LD_LIBRARY_PATH")
}
