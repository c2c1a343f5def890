//! `cargo xtask testhost`: exit codes, output streams and working directory pass through.

use std::path::Path;
use std::process::{Command, Output};

fn xtask_testhost(args: &[&str], cwd: &Path) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    Command::new(cargo)
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "xtask",
            "--manifest-path",
        ])
        .arg(manifest)
        .args(["--", "testhost"])
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run cargo xtask")
}

#[test]
fn exit_codes_pass_through() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (command, code) in [
        (&["true"][..], 0),
        (&["false"][..], 1),
        (&["sh", "-c", "exit 7"][..], 7),
    ] {
        let mut args = vec!["--"];
        args.extend_from_slice(command);
        let output = xtask_testhost(&args, here);
        assert_eq!(output.status.code(), Some(code), "{command:?}: {output:?}");
    }
}

#[test]
fn output_streams_and_cwd_pass_through() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = xtask_testhost(&["--", "sh", "-c", "pwd; echo to-err >&2"], here);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{}\n", here.display())
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).ends_with("to-err\n"),
        "{output:?}"
    );
}

#[test]
fn without_a_command_it_shows_the_test_host() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Make sure one runs, then ask.
    assert!(xtask_testhost(&["--", "true"], here).status.success());
    let output = xtask_testhost(&[], here);
    assert!(output.status.success(), "{output:?}");
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        shown.contains("QEMU pid") && shown.contains("/dev/kvm:  Standard"),
        "{shown}"
    );
}
