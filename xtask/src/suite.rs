//! `cargo xtask test`: the whole test suite. Runs `cargo test --workspace` (VM tests boot real
//! guests, inside the test host where /dev/kvm is PVM), checks that the benches build, counts the
//! guest boots the VM tests reported, repeats every failure's panic message at the end (where a
//! log's tail shows it), stops the test host, and runs the fuzz targets (60 s in all).

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use anyhow::{bail, Context};

/// The line each VM test prints per boot (crx-core/tests/boot.rs).
const BOOT_MARKER: &str = "crx-vm-boot:";

pub fn run() -> anyhow::Result<()> {
    crate::cargo(&["build", "--release", "-p", "crx", "-p", "crx-vmm"])?;
    crate::cargo(&["bench", "--workspace", "--no-run"])?;

    let mut child = Command::new(crate::cargo_bin())
        .args(["test", "--workspace", "--no-fail-fast", "--", "--nocapture"])
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
        "xtask test: {boots} guest boots on KVM{}",
        if stopped { " (test host stopped)" } else { "" }
    );
    if !status.success() {
        panics.print();
        bail!("cargo test failed ({status})");
    }
    if boots == 0 {
        bail!("the VM tests booted no guest");
    }
    crate::fuzz::run(crate::fuzz::FuzzArgs::suite())
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
