//! `cargo xtask bench [-- ARGS]`: builds what the benches need (release `crx`, `crx-vmm` and
//! `crx-cri`) and runs `cargo bench` (the VM benches run themselves in the test host where
//! /dev/kvm is PVM).

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Arguments for `cargo bench` (e.g. `-- -p crx-benches --bench boot`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    crate::cargo(&[
        "build",
        "--release",
        "-p",
        "crx",
        "-p",
        "crx-vmm",
        "-p",
        "crx-cri",
    ])?;
    let mut argv = vec!["bench"];
    if args.args.is_empty() {
        argv.push("--workspace");
    }
    argv.extend(args.args.iter().map(String::as_str));
    crate::cargo(&argv)
}
