//! containerd (Debian's 1.6) running containers in CRX microVMs through
//! `containerd-shim-crx-v2`, in VMs (the test host): `ctr run --runtime io.containerd.crx.v2`
//! (output, exit code, the guest's kernel, nothing left after `--rm`), `ctr run -d` with
//! `ctr task exec` and `ctr task kill`; and crictl through containerd's CRI with the RuntimeClass
//! handler `crx`: a pod VM joined to the pod network containerd made, a container in it, exec,
//! logs, stop and removal.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crx_test_support::cni::BridgeNetwork;
use crx_test_support::containerd::{Containerd, ContainerdConfig, ExtraRuntime};
use crx_test_support::Registry;

/// cri-tools' crictl (`../shared/cri-tools/bin`, or `$CRX_CRI_TOOLS/bin`).
fn crictl_binary() -> PathBuf {
    let crictl = std::env::var_os("CRX_CRI_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/cri-tools"))
        .join("bin/crictl");
    assert!(
        crictl.is_file(),
        "{} is missing (cri-tools in ../shared/cri-tools/bin)",
        crictl.display()
    );
    crictl
}

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
    scratch: tempfile::TempDir,
}

/// The CRI pod network of a test's containerd: its own bridge and addresses, since tests run
/// side by side.
struct Network {
    name: &'static str,
    bridge: &'static str,
    prefix: &'static str,
}

impl Setup {
    fn start(network: Network) -> Setup {
        // Sockets and containerd's overlay snapshots cannot live on the test host's 9p /tmp.
        let scratch = tempfile::Builder::new()
            .prefix("s")
            .tempdir_in("/run")
            .expect("a scratch dir under /run");
        let registry = crx_test_support::registry_with_busybox_and_pause(scratch.path());
        let config = scratch.path().join("crx.toml");
        std::fs::write(&config, "[runtime]\nboot_timeout_secs = 300\n").expect("crx config");
        let addr = registry.addr();
        let containerd = Containerd::start(
            &scratch.path().join("containerd"),
            &ContainerdConfig {
                registry: &addr,
                network: BridgeNetwork {
                    name: network.name,
                    bridge: network.bridge,
                    prefix: network.prefix,
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
            scratch,
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

    /// crictl against containerd's CRI.
    fn crictl(&self, args: &[&str]) -> Output {
        std::process::Command::new(crictl_binary())
            .args(["--runtime-endpoint", &self.containerd.endpoint()])
            .args(["--image-endpoint", &self.containerd.endpoint()])
            .args(["--timeout", "300s"])
            .args(args)
            .output()
            .expect("run crictl")
    }

    fn crictl_ok(&self, args: &[&str]) -> String {
        let out = self.crictl(args);
        assert!(
            out.status.success(),
            "crictl {args:?}: {}\ncontainerd:\n{}\n{}",
            text(&out),
            self.containerd.log(),
            vm_logs()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
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
    let s = Setup::start(Network {
        name: "shim-ctr",
        bridge: "cxshimctr0",
        prefix: "10.89.43",
    });

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
    // Its metrics: the container's cgroup in the VM (cgroup v2 figures).
    let metrics = s.ctr(&["task", "metrics", "daemon"]);
    let shown_metrics = text(&metrics);
    assert!(
        metrics.status.success(),
        "ctr task metrics: {shown_metrics}"
    );
    let value = |name: &str| -> u64 {
        String::from_utf8_lossy(&metrics.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in ctr task metrics: {shown_metrics}"))
    };
    assert!(value("pids.current") >= 1, "{shown_metrics}");
    assert!(value("memory.usage") > 0, "{shown_metrics}");
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

#[test]
fn crictl_runs_a_pod_through_containerd_in_a_crx_vm() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let s = Setup::start(Network {
        name: "shim-cri",
        bridge: "cxshimcri0",
        prefix: "10.89.44",
    });
    let dir = s.scratch.path().join("crictl");
    std::fs::create_dir_all(dir.join("logs")).expect("a log directory");
    let pod_json = dir.join("pod.json");
    std::fs::write(
        &pod_json,
        serde_json::json!({
            "metadata": {"name": "shim-pod", "namespace": "default", "uid": "shim-pod-uid"},
            "hostname": "shim-pod",
            "log_directory": dir.join("logs"),
            "linux": {},
        })
        .to_string(),
    )
    .expect("pod.json");
    let container_json = dir.join("container.json");
    std::fs::write(
        &container_json,
        serde_json::json!({
            "metadata": {"name": "main"},
            "image": {"image": s.image},
            "command": ["sh", "-c", "echo started in $(hostname); exec sleep 1000"],
            "log_path": "main.log",
        })
        .to_string(),
    )
    .expect("container.json");

    s.crictl_ok(&["pull", &s.image]);
    let pod = s.crictl_ok(&["runp", "--runtime", "crx", pod_json.to_str().unwrap()]);
    let pod_ip = s.crictl_ok(&[
        "inspectp",
        "--output",
        "go-template",
        "--template",
        "{{.status.network.ip}}",
        &pod,
    ]);
    assert!(
        pod_ip.starts_with("10.89.44."),
        "the pod's IP from containerd's CNI: {pod_ip:?}"
    );
    let container = s.crictl_ok(&[
        "create",
        &pod,
        container_json.to_str().unwrap(),
        pod_json.to_str().unwrap(),
    ]);
    s.crictl_ok(&["start", &container]);

    // The container runs in the pod VM, whose interface has the address CNI gave the pod.
    let cmdline = s.crictl_ok(&["exec", "-s", &container, "cat", "/proc/cmdline"]);
    assert!(
        cmdline.contains("rdinit="),
        "not the pod VM's kernel: {cmdline}"
    );
    let addresses = s.crictl_ok(&["exec", "-s", &container, "ip", "-4", "addr", "show", "eth0"]);
    assert!(
        addresses.contains(&format!("inet {pod_ip}/")),
        "the guest's eth0: {addresses}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = s.crictl_ok(&["logs", &container]);
        if logs.contains("started in shim-pod") {
            break;
        }
        assert!(Instant::now() < deadline, "the container's log: {logs:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let vm = pod_vm_of(&pod);
    assert!(
        Path::new(SANDBOXES).join(&vm).exists(),
        "no pod VM sandbox {vm}"
    );

    s.crictl_ok(&["stop", &container]);
    s.crictl_ok(&["rm", &container]);
    s.crictl_ok(&["stopp", &pod]);
    s.crictl_ok(&["rmp", &pod]);
    assert!(
        !Path::new(SANDBOXES).join(&vm).exists(),
        "the pod VM outlived its pod"
    );
}

/// The sandbox id the shim gives the pod VM of CRI pod `pod` (its first 32 characters).
fn pod_vm_of(pod: &str) -> String {
    pod.chars().take(32).collect()
}
