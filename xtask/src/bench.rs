//! `cargo xtask bench [-- ARGS]`: builds what the benches need (release `crx`, the default guest)
//! and runs `cargo bench` (the boot bench runs itself in the test host where /dev/kvm is PVM).

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Arguments for `cargo bench` (e.g. `-- -p crx-benches --bench boot`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    crate::cargo(&["build", "--release", "-p", "crx", "-p", "crx-vmm"])?;
    let mut argv = vec!["bench"];
    if args.args.is_empty() {
        argv.push("--workspace");
    }
    argv.extend(args.args.iter().map(String::as_str));
    crate::cargo(&argv)
}
