//! Runs a command on this host's KVM when guests run here, else inside the KVM test host, and
//! says on screen which one it chose.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};

use anyhow::Context;
use crx_testhost::{Invocation, TestHost};

/// Runs `argv` where guests boot: directly on standard KVM, or in the test host on a PVM host.
pub fn run(argv: Vec<OsString>) -> anyhow::Result<ExitStatus> {
    if crx_testhost::guests_run_here().context("probing /dev/kvm")? {
        eprintln!("xtask: standard KVM here: running directly");
        let (program, args) = argv.split_first().context("no command")?;
        return Command::new(program)
            .args(args)
            .status()
            .with_context(|| format!("running {}", program.to_string_lossy()));
    }
    eprintln!(
        "xtask: this host's /dev/kvm is PVM (stock guests cannot boot on it): running inside the \
         KVM test host (QEMU TCG emulating an AMD CPU with SVM, kvm_amd inside; expect seconds per boot)"
    );
    let host = TestHost::shared().context("starting the KVM test host")?;
    let invocation = Invocation::new(argv).envs(crate::testhost::caller_env());
    Ok(host.run_streaming(&invocation)?)
}

/// The exit code a shell would report for `status`.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1)
}
