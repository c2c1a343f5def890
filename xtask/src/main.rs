//! `cargo xtask`: the project's developer tasks, one module each.

mod guest;
mod testhost;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "CRX developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build (or reuse from cache) the guest kernel and the default initrd, and install them.
    Guest(guest::GuestArgs),
    /// Run a command inside the KVM test host (QEMU TCG with SVM), in the same working directory.
    Testhost(testhost::TesthostArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Guest(args) => guest::run(args),
        Task::Testhost(args) => testhost::run(args),
    }
}
