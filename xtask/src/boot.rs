//! `cargo xtask boot [-- ARGS]`: boots the default guest with the release `crx boot ARGS`, on
//! this host's KVM or in the test host.

use crate::kvm_here;

#[derive(clap::Args)]
pub struct BootArgs {
    /// Arguments for `crx boot` (e.g. `-- --vcpus 2 -- /bin/sh -c "echo hi"`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(args: BootArgs) -> anyhow::Result<()> {
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
    let mut argv = vec![crx.into_os_string(), "boot".into()];
    argv.extend(args.args.into_iter().map(Into::into));
    let status = kvm_here::run(argv)?;
    std::process::exit(kvm_here::exit_code(status));
}
