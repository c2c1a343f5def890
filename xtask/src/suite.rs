//! `cargo xtask test`: the whole test suite. Runs `cargo test --release --workspace` (VM tests
//! boot real guests, inside the test host where /dev/kvm is PVM), checks that the benches build,
//! counts the guest boots the VM tests reported, repeats every failure's panic message at the end
//! (where a log's tail shows it), stops the test host, and runs the fuzz targets (60 s in all).
//!
//! Release, because setup.sh has already built the workspace so (the `bench` profile that
//! `cargo test --release` and `cargo bench` use shares its artifacts with `release`), and
//! because the VM tests' host side runs under TCG in the test host, where unoptimised code is
//! several times slower. Each phase's wall time is printed, for CI logs.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context};

/// The line each VM test prints per boot (crx-core/tests/boot.rs).
const BOOT_MARKER: &str = "crx-vm-boot:";

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    // The whole workspace, as setup.sh builds it: a build of fewer packages unifies features
    // differently and recompiles their dependencies.
    crate::cargo(&["build", "--release", "--workspace", "--bins"])?;
    crate::cargo(&["bench", "--workspace", "--no-run"])?;
    crate::cargo(&["test", "--release", "--workspace", "--no-run"])?;
    println!(
        "xtask test: builds took {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let testing = Instant::now();
    let mut child = Command::new(crate::cargo_bin())
        .args([
            "test",
            "--release",
            "--workspace",
            "--no-fail-fast",
            "--",
            "--nocapture",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (lines, received) = mpsc::channel();
    forward_lines(
        child.stdout.take().context("cargo test's stdout")?,
        false,
        &lines,
    );
    forward_lines(
        child.stderr.take().context("cargo test's stderr")?,
        true,
        &lines,
    );
    drop(lines);
    let mut boots = 0usize;
    let mut panics = Panics::default();
    for (is_stderr, line) in received {
        if line.contains(BOOT_MARKER) {
            boots += 1;
        }
        panics.see(&line);
        if is_stderr {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    let stopped = crx_testhost::TestHost::stop().unwrap_or(false);
    println!(
        "xtask test: {boots} guest boots on KVM{}; the tests took {:.0} s",
        if stopped { " (test host stopped)" } else { "" },
        testing.elapsed().as_secs_f64()
    );
    if !status.success() {
        panics.print();
        bail!("cargo test failed ({status})");
    }
    if boots == 0 {
        bail!("the VM tests booted no guest");
    }
    let fuzzing = Instant::now();
    crate::fuzz::run(crate::fuzz::FuzzArgs::suite())?;
    println!(
        "xtask test: fuzzing took {:.0} s; {:.0} s in all",
        fuzzing.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Sends `pipe`'s lines (lossy UTF-8) on a thread, tagged with which stream they came from.
fn forward_lines(
    pipe: impl Read + Send + 'static,
    is_stderr: bool,
    lines: &mpsc::Sender<(bool, String)>,
) {
    let lines = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).into_owned();
            if lines.send((is_stderr, line)).is_err() {
                return;
            }
        }
    });
}

/// The panic messages seen in the output: the `panicked at` line and what follows it up to the
/// backtrace.
#[derive(Default)]
struct Panics {
    blocks: Vec<Vec<String>>,
    open: bool,
}

impl Panics {
    /// Lines of one panic message kept at most.
    const MAX_LINES: usize = 40;

    fn see(&mut self, line: &str) {
        if line.contains("' panicked at ") || line.contains(") panicked at ") {
            self.blocks.push(vec![line.to_owned()]);
            self.open = true;
        } else if self.open {
            let block = self.blocks.last_mut().expect("an open block exists");
            if line.starts_with("stack backtrace:")
                || line.starts_with("note: run with `RUST_BACKTRACE")
                || block.len() >= Self::MAX_LINES
            {
                self.open = false;
            } else {
                block.push(line.to_owned());
            }
        }
    }

    fn print(&self) {
        eprintln!("xtask test: {} panics, repeated here:", self.blocks.len());
        for block in &self.blocks {
            eprintln!("----");
            for line in block {
                eprintln!("{line}");
            }
        }
        eprintln!("----");
    }
}
