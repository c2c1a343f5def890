//! `cargo xtask testhost -- CMD…`: runs CMD in the KVM test host (placeholder).

#[derive(clap::Args)]
pub struct TesthostArgs {
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

pub fn run(_args: TesthostArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
