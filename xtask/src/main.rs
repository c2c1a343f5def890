//! `cargo xtask`: the project's developer tasks, one module each.

mod bench;
mod crx;
mod fuzz;
mod guest;
mod kvm_here;
mod suite;
mod testhost;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
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
    /// Boot the default guest with `crx boot` (directly on KVM, or in the test host on PVM).
    Boot(crx::CrxArgs),
    /// Run a pod with `crx run` (default: a shell command in the bundled busybox image).
    Run(crx::CrxArgs),
    /// Run the whole test suite.
    Test,
    /// Run the benchmarks (criterion; peers side by side).
    Bench(bench::BenchArgs),
    /// Run the cargo-fuzz targets for a bounded time each.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Guest(args) => guest::run(args),
        Task::Testhost(args) => testhost::run(args),
        Task::Boot(args) => crx::boot(args),
        Task::Run(args) => crx::run(args),
        Task::Test => suite::run(),
        Task::Bench(args) => bench::run(args),
        Task::Fuzz(args) => fuzz::run(args),
    }
}

/// The workspace root (xtask/..).
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

/// Cargo's target directory for this workspace.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The cargo that runs this xtask.
fn cargo_bin() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Runs `cargo ARGS` in the workspace root; fails if it fails.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(cargo_bin())
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
