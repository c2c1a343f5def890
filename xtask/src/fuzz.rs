//! `cargo xtask fuzz`: runs every cargo-fuzz target in `fuzz/` for a bounded time each (CI: at
//! least 60 s in all); any crash fails. cargo-fuzz needs nightly flags (sanitizers); with the
//! one stable toolchain machines have, RUSTC_BOOTSTRAP=1 unlocks them.

use std::process::Command;

use anyhow::{bail, Context};

/// The least fuzzing time in all that `cargo xtask test` spends.
pub const SUITE_TOTAL_SECS: u64 = 60;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target [default: an equal share of 60 s, at least 20 each]
    #[arg(long)]
    secs: Option<u64>,
    /// Targets to run [default: all]
    targets: Vec<String>,
}

impl FuzzArgs {
    /// What the test suite runs: every target, 60 s in all.
    pub fn suite() -> FuzzArgs {
        FuzzArgs {
            secs: None,
            targets: Vec::new(),
        }
    }
}

pub fn run(args: FuzzArgs) -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("fuzz");
    let targets = if args.targets.is_empty() {
        list_targets(&dir)?
    } else {
        args.targets
    };
    let secs = args.secs.unwrap_or_else(|| {
        SUITE_TOTAL_SECS
            .div_ceil(targets.len().max(1) as u64)
            .max(20)
    });
    for target in &targets {
        println!("xtask fuzz: {target} for {secs} s");
        let status = fuzz_command(&dir)
            .args(["run", "-O", target, "--"])
            .arg(format!("-max_total_time={secs}"))
            .arg("-rss_limit_mb=4096")
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            bail!("fuzz target {target} failed ({status}); the crashing input is under fuzz/artifacts/{target}/");
        }
    }
    println!(
        "xtask fuzz: {} targets, {secs} s each, no crash",
        targets.len()
    );
    Ok(())
}

fn fuzz_command(dir: &std::path::Path) -> Command {
    let mut command = Command::new(crate::cargo_bin());
    command
        .arg("fuzz")
        .current_dir(dir)
        .env("RUSTC_BOOTSTRAP", "1");
    command
}

fn list_targets(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let out = fuzz_command(dir)
        .arg("list")
        .output()
        .context("running cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz is not usable (install it with `cargo install cargo-fuzz --locked`; setup.sh does): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let targets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if targets.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(targets)
}
