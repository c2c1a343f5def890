//! `cargo xtask test`: the whole test suite. Runs `cargo test --workspace` (VM tests boot real
//! guests, inside the test host where /dev/kvm is PVM), checks that the benches build, counts the
//! guest boots the VM tests reported, stops the test host, and runs the fuzz targets (60 s in all).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// The line each VM test prints per boot (crx-core/tests/boot.rs).
const BOOT_MARKER: &str = "crx-vm-boot:";

pub fn run() -> anyhow::Result<()> {
    crate::cargo(&["build", "--release", "-p", "crx", "-p", "crx-vmm"])?;
    crate::cargo(&["bench", "--workspace", "--no-run"])?;

    let mut child = Command::new(crate::cargo_bin())
        .args(["test", "--workspace", "--no-fail-fast", "--", "--nocapture"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    let mut boots = 0usize;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        if line.contains(BOOT_MARKER) {
            boots += 1;
        }
        writeln!(out, "{line}")?;
    }
    drop(out);
    let status = child.wait().context("waiting for cargo test")?;
    let stopped = crx_testhost::TestHost::stop().unwrap_or(false);
    println!(
        "xtask test: {boots} guest boots on KVM{}",
        if stopped { " (test host stopped)" } else { "" }
    );
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if boots == 0 {
        bail!("the VM tests booted no guest");
    }
    crate::fuzz::run(crate::fuzz::FuzzArgs::suite())
}
