//! `crx run` end to end, as an operator types it: the bundled busybox image (built by
//! images/build-busybox.sh into a scratch OCI layout), imported into a scratch store, run in
//! its own microVM (crx-vmm, the agent as PID 1, the rootfs over virtio-fs from a real
//! virtiofsd). Checks exit codes and signals, separate stdout/stderr, stdin, env/cwd/user/hostname, a
//! detached container with exec/ps/stop/rm, and that nothing is left on the host afterwards:
//! no sandbox directory, no VMM or virtiofsd process, no image lease.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Env {
    scratch: PathBuf,
}

impl Env {
    fn new(test: &str) -> Env {
        // Sockets live in the run root: under /run, not the test host's 9p /tmp.
        let scratch = PathBuf::from(format!("/run/crx-run-test-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).unwrap();
        let layout = scratch.join("busybox");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build-busybox.sh");
        let built = Command::new(&script).arg(&layout).output().unwrap();
        assert!(
            built.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&built.stderr)
        );
        Env { scratch }
    }

    fn crx(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crx"));
        cmd.args(args)
            .env("CRX_ROOT", self.scratch.join("store"))
            .env("CRX_RUN_ROOT", self.scratch.join("run"))
            .stdin(Stdio::null());
        cmd
    }

    fn output(&self, args: &[&str]) -> Output {
        let out = self.crx(args).output().unwrap();
        println!(
            "crx {args:?}: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn layout(&self) -> String {
        self.scratch.join("busybox").display().to_string()
    }

    /// Nothing of any container is left: sandboxes, leases, VMM and virtiofsd processes.
    fn assert_clean(&self) {
        let sandboxes = self.scratch.join("run/sandboxes");
        let left: Vec<_> = std::fs::read_dir(&sandboxes)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "sandboxes left: {left:?}");
        let leases: Vec<_> = std::fs::read_dir(self.scratch.join("store/leases"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| !n.to_string_lossy().starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        assert!(leases.is_empty(), "leases left: {leases:?}");
        let marker = self.scratch.display().to_string();
        let procs: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker) && (c.contains("crx-vmm") || c.contains("virtiofsd")))
            .collect();
        assert!(procs.is_empty(), "processes left: {procs:?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

#[test]
fn crx_run_streams_stdio_and_returns_the_exit_code_and_leaves_nothing_behind() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let env = Env::new("fg");
    let out = env.output(&[
        "run",
        "--name",
        "fg1",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "-u",
        "app",
        &env.layout(),
        "--",
        "sh",
        "-c",
        "echo \"$GREETING from $(hostname) in $(pwd) as $(id -u):$(id -g)\"; echo to-stderr >&2; exit 7",
    ]);
    println!("crx-vm-boot: crx run (foreground)");
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi there from fg1 in /tmp as 1000:1000\n"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr\n"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("to-stderr"));
    env.assert_clean();

    // stdin (-i), and a signal: 128 + 9.
    let mut child = env
        .crx(&[
            "run",
            "-i",
            &env.layout(),
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; kill -9 $$",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"through the vm\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    println!("crx-vm-boot: crx run -i");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "THROUGH THE VM\n");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    env.assert_clean();
}

#[test]
fn crx_run_detached_then_exec_ps_stop_rm() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let env = Env::new("bg");
    let out = env.output(&[
        "run",
        "-d",
        "--name",
        "bg1",
        &env.layout(),
        "--",
        "sleep",
        "600",
    ]);
    println!("crx-vm-boot: crx run -d");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bg1");

    let ps = env.output(&["ps"]);
    let ps = String::from_utf8_lossy(&ps.stdout).to_string();
    assert!(
        ps.lines()
            .any(|l| l.starts_with("bg1 ") && l.contains("running") && l.contains("busybox")),
        "{ps}"
    );
    let exec = env.output(&["exec", "bg1", "--", "sh", "-c", "pidof sleep; exit 5"]);
    assert_eq!(exec.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&exec.stdout).trim(), "1");

    // A process killed by a signal: 128 + 9 (the exec'd shell is not its namespace's init,
    // which ignores signals it has no handler for, as in any container).
    let killed = env.output(&["exec", "bg1", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(killed.status.code(), Some(137));

    let rm_running = env.output(&["rm", "bg1"]);
    assert!(!rm_running.status.success());
    assert!(String::from_utf8_lossy(&rm_running.stderr).contains("is running"));
    // The image is leased while the container exists.
    let rmi = env.output(&["rmi", "busybox"]);
    assert!(!rmi.status.success());

    assert!(env.output(&["stop", "--time", "5", "bg1"]).status.success());
    let ps = env.output(&["ps"]);
    assert!(String::from_utf8_lossy(&ps.stdout).contains("exited"));
    assert!(env.output(&["rm", "bg1"]).status.success());
    env.assert_clean();
    let unknown = env.output(&["rm", "bg1"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no sandbox bg1"));
}
