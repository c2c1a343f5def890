//! containerd (Debian's 1.6) running containers in CRX microVMs through
//! `containerd-shim-crx-v2`, in VMs (the test host): `ctr run --runtime io.containerd.crx.v2`
//! (output, exit code, the guest's kernel, nothing left after `--rm`), `ctr run -d` with
//! `ctr task exec` and `ctr task kill`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crx_test_support::cni::BridgeNetwork;
use crx_test_support::containerd::{Containerd, ContainerdConfig, ExtraRuntime};
use crx_test_support::Registry;

const RUNTIME: &str = "io.containerd.crx.v2";
const NAMESPACE: &str = "crx-test";
/// Where the shims keep their pod VMs (containerd-shim-crx's `RUN_ROOT`).
const SANDBOXES: &str = "/run/crx/containerd/sandboxes";

fn shim_dir() -> PathBuf {
    let shim = Path::new(env!("CARGO_BIN_EXE_containerd-shim-crx-v2"));
    let dir = shim.parent().expect("the shim's directory").to_owned();
    assert!(
        dir.join("crx-vmm").is_file(),
        "crx-vmm is not beside {} (cargo build --release -p crx-vmm)",
        shim.display()
    );
    dir
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Setup {
    containerd: Containerd,
    image: String,
    _registry: Registry,
    _scratch: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        crx_test_support::require_tools();
        // Sockets and containerd's overlay snapshots cannot live on the test host's 9p /tmp.
        let scratch = tempfile::Builder::new()
            .prefix("s")
            .tempdir_in("/run")
            .expect("a scratch dir under /run");
        let layout = scratch.path().join("busybox");
        crx_test_support::build_busybox_layout(&layout);
        let registry = Registry::start(&scratch.path().join("registry"), None);
        registry.push(&layout, "latest", "busybox", None);
        let config = scratch.path().join("crx.toml");
        std::fs::write(&config, "[runtime]\nboot_timeout_secs = 300\n").expect("crx config");
        let addr = registry.addr();
        let containerd = Containerd::start(
            &scratch.path().join("containerd"),
            &ContainerdConfig {
                registry: &addr,
                network: BridgeNetwork {
                    name: "shim-test",
                    bridge: "cxshim0",
                    prefix: "10.89.43",
                    dns: None,
                },
                runtimes: &[ExtraRuntime {
                    handler: "crx",
                    runtime_type: RUNTIME,
                }],
                path: &[shim_dir()],
                env: &[("CRX_CONFIG", &config)],
            },
        );
        let image = format!("{addr}/busybox:latest");
        let pulled = containerd.ctr(NAMESPACE, &["images", "pull", "--plain-http", &image]);
        assert!(
            pulled.status.success(),
            "ctr images pull: {}",
            text(&pulled)
        );
        Setup {
            containerd,
            image,
            _registry: registry,
            _scratch: scratch,
        }
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.containerd.ctr(NAMESPACE, args)
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\ncontainerd:\n{}\n{}",
            text(&out),
            self.containerd.log(),
            vm_logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The status column of `ctr task ls` for `id`.
    fn task_status(&self, id: &str) -> Option<String> {
        self.ctr_ok(&["task", "ls"])
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
    }
}

/// The tails of the pod VMs' logs, for a failure's message.
fn vm_logs() -> String {
    let mut logs = String::new();
    for sandbox in std::fs::read_dir(SANDBOXES).into_iter().flatten().flatten() {
        for log in ["vmm.log", "console.log"] {
            let text = std::fs::read_to_string(sandbox.path().join(log)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            logs.push_str(&format!("--- {}/{log}:\n", sandbox.path().display()));
            for line in tail.into_iter().rev() {
                logs.push_str(line);
                logs.push('\n');
            }
        }
    }
    logs
}

fn sandbox_exists(id: &str) -> bool {
    Path::new(SANDBOXES).join(id).exists()
}

#[test]
fn ctr_runs_containers_in_crx_vms() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let s = Setup::start();

    // A one-shot container: its output, its exit code, the guest kernel's command line.
    let out = s.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        &s.image,
        "oneshot",
        "sh",
        "-c",
        "echo out: $(cat /proc/cmdline); echo to-stderr >&2; exit 3",
    ]);
    let shown = text(&out);
    assert_eq!(
        out.status.code(),
        Some(3),
        "ctr run: {shown}\ncontainerd:\n{}\n{}",
        s.containerd.log(),
        vm_logs()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let guest_cmdline = stdout
        .lines()
        .find_map(|l| l.strip_prefix("out: "))
        .unwrap_or_else(|| panic!("no output: {shown}"));
    assert!(
        guest_cmdline.contains("rdinit="),
        "not the pod VM's kernel: {shown}"
    );
    let own_cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    assert_ne!(
        guest_cmdline.trim(),
        own_cmdline.trim(),
        "ran on the host's kernel: {shown}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("to-stderr"),
        "stderr: {shown}"
    );
    assert!(
        !sandbox_exists("oneshot"),
        "ctr run --rm left the pod VM's sandbox"
    );

    // A detached container, an exec in it, a kill.
    s.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        &s.image,
        "daemon",
        "sleep",
        "1000",
    ]);
    assert!(
        sandbox_exists("daemon"),
        "no pod VM for the detached container"
    );
    assert_eq!(s.task_status("daemon").as_deref(), Some("RUNNING"));
    let exec = s.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "probe",
        "daemon",
        "sh",
        "-c",
        "echo in-exec; exit 5",
    ]);
    assert_eq!(
        exec.status.code(),
        Some(5),
        "ctr task exec: {}",
        text(&exec)
    );
    assert!(
        String::from_utf8_lossy(&exec.stdout).contains("in-exec"),
        "{}",
        text(&exec)
    );
    s.ctr_ok(&["task", "kill", "--signal", "SIGKILL", "daemon"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.task_status("daemon").as_deref() != Some("STOPPED") {
        assert!(
            Instant::now() < deadline,
            "the killed task did not stop:\n{}",
            s.containerd.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    s.ctr_ok(&["task", "rm", "daemon"]);
    s.ctr_ok(&["container", "rm", "daemon"]);
    assert!(
        !sandbox_exists("daemon"),
        "the pod VM's sandbox outlived its last task"
    );
}
