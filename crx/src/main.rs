//! `crx`: the operator's command line for CRX microVMs.

mod boot;
mod image;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "crx", version, about = "CRX: every pod in its own microVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel straight into its init and wait for it to end.
    Boot(boot::BootArgs),
    #[command(flatten)]
    Image(image::ImageCommand),
}

fn main() -> anyhow::Result<()> {
    let launch = std::time::Instant::now();
    // An EnvFilter costs milliseconds to build; only pay for it when CRX_LOG asks for one.
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr);
    match tracing_subscriber::EnvFilter::try_from_env("CRX_LOG") {
        Ok(filter) => logs.with_env_filter(filter).init(),
        Err(_) => logs.with_max_level(tracing::Level::WARN).init(),
    }
    let code = match Cli::parse().command {
        Command::Boot(args) => boot::run(args, launch)?,
        Command::Image(cmd) => {
            image::run(cmd)?;
            0
        }
    };
    std::process::exit(code)
}
