//! `cargo xtask guest`: builds the guest kernel and default initrd (placeholder).

#[derive(clap::Args)]
pub struct GuestArgs {}

pub fn run(_args: GuestArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
