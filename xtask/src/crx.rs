//! `cargo xtask boot [-- ARGS]` and `cargo xtask run [-- ARGS]`: the release `crx boot ARGS`
//! (boots the default guest) and `crx run ARGS` (runs a pod, by default from the bundled busybox
//! image), on this host's KVM or in the test host.

use crate::kvm_here;

/// What `cargo xtask run` runs without arguments: a one-container pod from the bundled image.
const DEFAULT_RUN: &[&str] = &[
    "busybox",
    "--",
    "sh",
    "-c",
    "echo \"hello from $(hostname), a pod in a CRX microVM: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) vCPU\"",
];

#[derive(clap::Args)]
pub struct CrxArgs {
    /// Arguments for the crx subcommand (e.g. `-- --vcpus 2 -- /bin/sh -c "echo hi"`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn boot(args: CrxArgs) -> anyhow::Result<()> {
    crx("boot", args.args)
}

pub fn run(args: CrxArgs) -> anyhow::Result<()> {
    let args = if args.args.is_empty() {
        DEFAULT_RUN.iter().map(|a| a.to_string()).collect()
    } else {
        args.args
    };
    crx("run", args)
}

/// Builds crx and crx-vmm (release) and runs `crx SUBCOMMAND ARGS` where KVM is; exits with its
/// status.
fn crx(subcommand: &str, args: Vec<String>) -> anyhow::Result<()> {
    crate::cargo(&[
        "build",
        "--release",
        "--quiet",
        "-p",
        "crx",
        "-p",
        "crx-vmm",
    ])?;
    let crx = crate::target_dir().join("release/crx");
    let mut argv = vec![crx.into_os_string(), subcommand.into()];
    argv.extend(args.into_iter().map(Into::into));
    let status = kvm_here::run(argv)?;
    std::process::exit(kvm_here::exit_code(status));
}
