//! Finds the `crx-testhost-agent` binary the L1 runs: a prebuilt one named by
//! `CRX_TESTHOST_AGENT`, else a release build brought up to date with cargo in its own target dir
//! (`<target>/testhost-agent`), so it never waits for the workspace's other builds.
//!
//! The L1 sees the machine's root, so the agent is an ordinary host binary; the run dir keeps a
//! copy so rebuilding the workspace does not change the file under a running L1.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::Error;
use crate::settings::Settings;

const AGENT: &str = "crx-testhost-agent";

/// Returns an up-to-date agent binary (not yet copied into the run dir).
pub fn locate(settings: &Settings) -> Result<PathBuf, Error> {
    if let Some(path) = &settings.prebuilt_agent {
        return if path.is_file() {
            Ok(path.clone())
        } else {
            Err(Error::Agent(format!(
                "CRX_TESTHOST_AGENT={} is not a file",
                path.display()
            )))
        };
    }
    let agent_target = settings.target_dir.join("testhost-agent");
    let built = agent_target.join("release").join(AGENT);
    // Under cargo (tests, xtask) CARGO names the cargo that runs us.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    tracing::info!(
        "bringing {AGENT} up to date (cargo build --release in {})",
        agent_target.display()
    );
    let output = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "crx-testhost",
            "--bin",
            AGENT,
        ])
        .arg("--manifest-path")
        .arg(settings.workspace_root.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &agent_target)
        .output();
    let failure = match output {
        Ok(output) if output.status.success() => return Ok(built),
        Ok(output) => format!(
            "cargo build of {AGENT} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(e) => format!("cannot run {} ({e})", Path::new(&cargo).display()),
    };
    // The workspace may be mid-edit elsewhere: an earlier build still serves.
    if built.is_file() {
        tracing::warn!("{failure}; using the existing {}", built.display());
        Ok(built)
    } else {
        Err(Error::Agent(format!(
            "{failure}, and there is no earlier {} (or set CRX_TESTHOST_AGENT)",
            built.display()
        )))
    }
}

/// Copies the agent into the run dir; returns the copy's path.
pub fn install(agent: &Path, run_dir: &Path) -> Result<PathBuf, Error> {
    let installed = run_dir.join(AGENT);
    let partial = run_dir.join(format!("{AGENT}.partial"));
    std::fs::copy(agent, &partial).map_err(Error::io("cannot copy the agent", &partial))?;
    std::fs::rename(&partial, &installed)
        .map_err(Error::io("cannot install the agent", &installed))?;
    Ok(installed)
}
