//! The guest agent with real guests: the default kernel and initrd booted with
//! `rdinit=/bin/crx-agent`, a real vsock device (requests on port 1024, stdio on 1025 through the
//! hybrid-vsock socket) and a real virtio-fs share (virtiofsd) holding a busybox rootfs that the
//! test builds from the host's static busybox. Two guest boots: one for what containers do, one
//! for what must not hurt the agent.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crx_agent_proto::{
    encode_frame, read_frame, ContainerState, ErrorCode, ExecProcess, ExitKind, ExitStatus, Hello,
    Request, Response, Rootfs, User, MAX_FRAME_LEN, PROTOCOL_VERSION, REQUEST_PORT,
};
use crx_core::builder::default_guest_dir;
use crx_core::{start_vm, ConsoleOutput, VmConfig, VmExit, Vmm};
use crx_runtime::agent::{connect_vsock, AgentClient, AgentError, StdioAttachment};
use crx_runtime::spec::{set_pid_namespace, PidNamespace};
use crx_virtio::{DeviceConfig, FsConfig, VsockConfig};
use oci_spec::runtime::{
    LinuxBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder, ProcessBuilder,
    RootBuilder, Spec, UserBuilder,
};
use sha2::{Digest, Sha256};

const TAG: &str = "images";
/// The test host is slow (TCG): generous, but a hang still fails.
const WAIT: Duration = Duration::from_secs(300);

/// A booted pod VM with the agent as PID 1, its vsock socket and rootfs share.
struct Pod {
    vmm: Option<Vmm>,
    /// Set when the test ends the VM itself (shutdown, drop).
    ending: Arc<AtomicBool>,
    test: &'static str,
    config: VmConfig,
    sockets: PathBuf,
    share: PathBuf,
}

impl Pod {
    fn boot(test: &'static str) -> Pod {
        let sockets = PathBuf::from(format!("/run/crx-agent-test-{test}-{}", std::process::id()));
        let share =
            std::env::temp_dir().join(format!("crx-agent-test-{test}-{}", std::process::id()));
        for dir in [&sockets, &share] {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir).unwrap();
        }
        build_rootfs(&share.join("busybox"));

        let dir = default_guest_dir();
        let initrd = dir.join("initrd.cpio");
        let archive = std::fs::read(&initrd)
            .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask guest`)", initrd.display()));
        assert!(
            archive.windows(13).any(|w| w == b"bin/crx-agent"),
            "{} has no /bin/crx-agent (run `cargo xtask guest`)",
            initrd.display()
        );
        let mut config = VmConfig::new(dir.join("vmlinux"));
        config.initrd = Some(initrd);
        // Kept after the test (the test host shares /tmp): the agent logs there.
        config.console = ConsoleOutput::File(
            std::env::temp_dir().join(format!("crx-agent-test-{test}.console")),
        );
        config.vcpus = 2;
        config.mem_mib = 512;
        config
            .cmdline
            .push_str(" rdinit=/bin/crx-agent crx_agent_verbose=1");
        let mut fs = FsConfig::new(TAG, &share);
        fs.socket_dir = Some(sockets.clone());
        config.devices = vec![
            DeviceConfig::Vsock(VsockConfig {
                guest_cid: 3,
                uds_path: sockets.join("vsock"),
            }),
            DeviceConfig::Fs(fs),
        ];
        let vmm = start_vm(&config).unwrap_or_else(|e| panic!("{test}: cannot start the VM: {e}"));
        let ending = Arc::new(AtomicBool::new(false));
        watch_for_an_early_end(test, &vmm, &config, Arc::clone(&ending));
        Pod {
            ending,
            vmm: Some(vmm),
            test,
            config,
            sockets,
            share,
        }
    }

    fn uds(&self) -> PathBuf {
        self.sockets.join("vsock")
    }

    fn client(&self) -> AgentClient {
        progress(self.test, "connect");
        AgentClient::connect(&self.uds(), Instant::now() + WAIT)
            .unwrap_or_else(|e| panic!("cannot reach the agent: {e}"))
    }

    fn attach(&self, id: &str, exec_id: &str) -> StdioAttachment {
        StdioAttachment::attach(&self.uds(), Instant::now() + WAIT, id, exec_id)
            .unwrap_or_else(|e| panic!("attach {id}/{exec_id}: {e}"))
    }

    /// Shuts the VM down through the agent and checks it powered off cleanly.
    fn shut_down(mut self, client: &mut AgentClient) {
        self.ending.store(true, Ordering::SeqCst);
        client.shutdown().expect("shutdown");
        let outcome = self.vmm.take().unwrap().wait_timeout(WAIT);
        println!(
            "crx-vm-boot: {}: {} vCPU, {} MiB: {} (guest init at {:?})",
            self.test,
            self.config.vcpus,
            self.config.mem_mib,
            outcome.exit,
            outcome.times.guest_init
        );
        let listening = outcome
            .console_tail
            .lines()
            .find(|l| l.contains("crx-agent: listening"))
            .unwrap_or("(no listening line)");
        println!("{}: {listening}", self.test);
        assert_eq!(
            outcome.exit,
            VmExit::Exited(0),
            "console:\n{}",
            outcome.console_tail
        );
    }
}

/// A VM that ends while the test still talks to it would leave the test blocked on its sockets
/// for good (the in-process VMM keeps them open): a watcher says how it ended, with the console's
/// tail, and ends the test process.
fn watch_for_an_early_end(
    test: &'static str,
    vmm: &Vmm,
    config: &VmConfig,
    ending: Arc<AtomicBool>,
) {
    let latch = vmm.exit_latch();
    let ConsoleOutput::File(console) = config.console.clone() else {
        unreachable!("the pod's console goes to a file")
    };
    std::thread::spawn(move || {
        latch.wait(None);
        if ending.load(Ordering::SeqCst) {
            return;
        }
        let log = std::fs::read(&console).unwrap_or_default();
        let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(8192)..]);
        eprintln!(
            "{test}: the VM ended while the test was using it: {}\nconsole tail ({}):\n{tail}",
            latch.get().map_or_else(|| "?".into(), |e| e.to_string()),
            console.display()
        );
        std::process::exit(101);
    });
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.ending.store(true, Ordering::SeqCst);
        if let Some(vmm) = self.vmm.take() {
            let outcome = vmm.wait_timeout(Duration::ZERO);
            eprintln!(
                "{}: VM stopped; console tail:\n{}",
                self.test, outcome.console_tail
            );
        }
        let _ = std::fs::remove_dir_all(&self.sockets);
        let _ = std::fs::remove_dir_all(&self.share);
    }
}

/// A rootfs from the host's static busybox (Debian's busybox-static): every applet a symlink,
/// /etc/passwd and /etc/group with a non-root user.
fn build_rootfs(root: &Path) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing (Debian package busybox-static)"
    );
    for dir in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "home/user",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    // World-writable and sticky, as in every image: the non-root user's test writes there.
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .unwrap();
    assert!(list.status.success());
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nuser:x:1000:\nextra:x:2000:\n",
    )
    .unwrap();
}

/// Appends a progress line to /tmp/crx-agent-test-<test>.progress (the test host shares /tmp),
/// so a hang shows where it is.
fn progress(test: &str, step: &str) {
    let path = std::env::temp_dir().join(format!("crx-agent-test-{test}.progress"));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{step}");
    }
}

fn rootfs() -> Rootfs {
    Rootfs {
        fs_tag: TAG.into(),
        path: "busybox".into(),
    }
}

/// The default OCI spec running `sh -c SCRIPT` as root in `/`, with a writable root.
fn spec(script: &str) -> Spec {
    let mut spec = Spec::default();
    let process = ProcessBuilder::default()
        .args(vec!["/bin/sh".to_string(), "-c".into(), script.into()])
        .env(vec!["PATH=/bin".to_string()])
        .cwd("/")
        .build()
        .unwrap();
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()
            .unwrap(),
    ));
    spec
}

fn with_limits(mut spec: Spec, memory: Option<i64>, pids: Option<i64>) -> Spec {
    let mut resources = LinuxResourcesBuilder::default();
    if let Some(limit) = memory {
        resources = resources.memory(LinuxMemoryBuilder::default().limit(limit).build().unwrap());
    }
    if let Some(limit) = pids {
        resources = resources.pids(LinuxPidsBuilder::default().limit(limit).build().unwrap());
    }
    let linux = LinuxBuilder::default()
        .resources(resources.build().unwrap())
        .build()
        .unwrap();
    spec.set_linux(Some(linux));
    spec
}

/// Creates and starts container `id`, attaching its stdio first.
fn run(pod: &Pod, client: &mut AgentClient, id: &str, spec: &Spec, tty: bool) -> StdioAttachment {
    progress(pod.test, &format!("create {id}"));
    client
        .create_container(id, rootfs(), spec, tty, Vec::new())
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
    progress(pod.test, &format!("attach {id}"));
    let stdio = pod.attach(id, "");
    progress(pod.test, &format!("start {id}"));
    client
        .start_container(id)
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
    progress(pod.test, &format!("started {id}"));
    stdio
}

/// Everything up to the exit: (stdout, stderr, exit).
fn collect(stdio: StdioAttachment) -> (String, String, ExitStatus) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = stdio.collect(&mut out, &mut err).expect("stdio");
    (
        String::from_utf8_lossy(&out).into(),
        String::from_utf8_lossy(&err).into(),
        exit,
    )
}

fn code(code: i32) -> Option<ExitKind> {
    Some(ExitKind::Code(code))
}

fn remote_code(result: Result<impl std::fmt::Debug, AgentError>) -> ErrorCode {
    match result {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not an agent error: {e}")),
        Ok(v) => panic!("expected an error reply, got {v:?}"),
    }
}

#[test]
fn agent_runs_containers() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let pod = Pod::boot("runs");
    let mut client = pod.client();
    assert_eq!(client.hello().protocol_version, PROTOCOL_VERSION);
    println!(
        "agent boot → listening: {} us",
        client.hello().boot_to_listen_us
    );

    // Exit codes, stdout and stderr apart.
    let stdio = run(
        &pod,
        &mut client,
        "exit3",
        &spec("echo out; echo err >&2; exit 3"),
        false,
    );
    let (out, err, exit) = collect(stdio);
    assert_eq!(
        (out.as_str(), err.as_str(), exit.status),
        ("out\n", "err\n", code(3))
    );
    assert!(!exit.oom_killed);
    assert_eq!(client.wait_process("exit3", "").unwrap().status, code(3));

    // 20 MB of stdout, complete and in order, while stderr carries its own text.
    const BIG: usize = 20_000_000;
    let script = format!("echo before >&2; yes 0123456789abcdef | head -c {BIG}; echo after >&2");
    let stdio = run(&pod, &mut client, "big", &spec(&script), false);
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    let mut err = Vec::new();
    struct Hashing<'a>(&'a mut Sha256, &'a mut usize);
    impl Write for Hashing<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            *self.1 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let started = Instant::now();
    let exit = stdio
        .collect(&mut Hashing(&mut hasher, &mut len), &mut err)
        .unwrap();
    println!("20 MB of stdout in {:?}", started.elapsed());
    let expected: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(BIG)
        .collect();
    assert_eq!(len, BIG);
    assert_eq!(
        hasher.finalize().as_slice(),
        Sha256::digest(&expected).as_slice()
    );
    assert_eq!(String::from_utf8_lossy(&err), "before\nafter\n");
    assert_eq!(exit.status, code(0));

    // stdin: cat echoes what the host writes; EOF ends it.
    let stdio = run(
        &pod,
        &mut client,
        "cat",
        &spec("cat; echo cat-done >&2"),
        false,
    );
    let (mut input, output) = stdio.split();
    let payload: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let sent = payload.clone();
    let writer = std::thread::spawn(move || {
        input.write_stdin(&sent).unwrap();
        input.close_stdin().unwrap();
    });
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = output.collect(&mut out, &mut err).unwrap();
    writer.join().unwrap();
    assert!(
        out == payload,
        "cat returned {} of {} bytes",
        out.len(),
        payload.len()
    );
    assert_eq!(
        (String::from_utf8_lossy(&err).as_ref(), exit.status),
        ("cat-done\n", code(0))
    );

    // Environment, working directory, user and groups, hostname from the spec.
    let mut user_spec = spec("echo $FOO; pwd; id -u; id -g; id -G; hostname; touch /tmp/x && ls -ln /tmp/x | awk '{print $3}'");
    let process = user_spec.process_mut().as_mut().unwrap();
    process.set_env(Some(vec!["PATH=/bin".into(), "FOO=bar baz".into()]));
    process.set_cwd("/home/user".into());
    process.set_user(
        UserBuilder::default()
            .uid(1000u32)
            .gid(1000u32)
            .additional_gids(vec![2000u32])
            .build()
            .unwrap(),
    );
    user_spec.set_hostname(Some("pod-host".into()));
    let (out, err, exit) = collect(run(&pod, &mut client, "user", &user_spec, false));
    assert_eq!(
        out, "bar baz\n/home/user\n1000\n1000\n1000 2000\npod-host\n1000\n",
        "stderr: {err}"
    );
    assert_eq!(exit.status, code(0));

    // Two containers cannot see each other's processes or files.
    let a_script = "echo secret > /tmp/a-only; echo $$; sleep 600";
    let a = run(&pod, &mut client, "a", &spec(a_script), false);
    let (_a_in, mut a_out) = a.split();
    match a_out.next_output().unwrap() {
        crx_runtime::agent::Output::Stdout(data) => {
            assert_eq!(data, b"1\n", "a is PID 1 of its own namespace")
        }
        other => panic!("unexpected {other:?}"),
    }
    let b_script = "echo $$; ls /proc | grep -c '^[0-9]'; ps -o comm | grep -c sleep; test -e /tmp/a-only && echo SEES-A || echo no-a";
    let (out, err, exit) = collect(run(&pod, &mut client, "b", &spec(b_script), false));
    // b's own shell plus ls, grep and ps at most; no sleep
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "stdout {out:?} stderr {err:?}");
    assert_eq!(lines[0], "1");
    assert!(
        lines[1].parse::<u32>().unwrap() <= 4,
        "b sees {} processes",
        lines[1]
    );
    assert_eq!((lines[2], lines[3]), ("0", "no-a"));
    assert_eq!(exit.status, code(0));

    // Exec into the running container a: sees its files and processes.
    let exec = |id: &str, args: &[&str], tty: bool| ExecProcess {
        container_id: "a".into(),
        exec_id: id.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin".into()],
        cwd: "/tmp".into(),
        user: Some(User {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
        }),
        terminal: tty,
    };
    client
        .exec_process(exec(
            "look",
            &["sh", "-c", "cat a-only; pwd; ps -o comm | grep -c sleep"],
            false,
        ))
        .unwrap();
    let (out, _, exit) = collect(pod.attach("a", "look"));
    assert_eq!((out.as_str(), exit.status), ("secret\n/tmp\n1\n", code(0)));
    // kill -9 of itself: reported as signal 9 (an exec process is not its namespace's PID 1).
    client
        .exec_process(exec("kill", &["sh", "-c", "kill -9 $$"], false))
        .unwrap();
    assert_eq!(
        client.wait_process("a", "kill").unwrap().status,
        Some(ExitKind::Signal(9))
    );
    let (_, _, exit) = collect(pod.attach("a", "kill"));
    assert_eq!(exit.status, Some(ExitKind::Signal(9)));

    // A terminal: tty names /dev/pts/N, and a resize reaches stty.
    client
        .exec_process(exec(
            "tty",
            &["sh", "-c", "tty; read line; stty size"],
            true,
        ))
        .unwrap();
    let mut stdio = pod.attach("a", "tty");
    stdio.resize(33, 77).unwrap();
    client.resize_terminal("a", "tty", 33, 77).unwrap();
    stdio.write_stdin(b"go\n").unwrap();
    let (out, err, exit) = collect(stdio);
    assert!(out.contains("/dev/pts/"), "tty said {out:?}");
    assert!(out.contains("33 77"), "stty size said {out:?}");
    assert_eq!((err.as_str(), exit.status), ("", code(0)));

    // Confinement from the spec: a read-only root; read-only and masked paths (a masked file
    // reads empty, a masked directory lists empty); the spec's capabilities only (the default
    // OCI set: AUDIT_WRITE, KILL, NET_BIND_SERVICE).
    let mut read_only_root = spec("touch /x");
    read_only_root
        .root_mut()
        .as_mut()
        .unwrap()
        .set_readonly(Some(true));
    let (_, err, exit) = collect(run(&pod, &mut client, "ro", &read_only_root, false));
    assert!(err.contains("Read-only file system"), "{err:?}");
    assert_eq!(exit.status, code(1));
    let mut masked = spec(
        "touch /x && echo root-writable; touch /tmp/y; wc -c < /etc/passwd; ls /home | wc -l; \
         wc -c < /proc/cmdline; grep CapBnd /proc/self/status",
    );
    let linux = masked.linux_mut().as_mut().unwrap();
    linux.set_masked_paths(Some(vec![
        "/etc/passwd".into(),
        "/home".into(),
        "/proc/cmdline".into(),
        "/not/there".into(),
    ]));
    linux.set_readonly_paths(Some(vec!["/tmp".into()]));
    let (out, err, exit) = collect(run(&pod, &mut client, "masked", &masked, false));
    assert_eq!(
        out, "root-writable\n0\n0\n0\nCapBnd:\t0000000020000420\n",
        "stderr: {err}"
    );
    assert!(
        err.contains("touch: /tmp/y: Read-only file system"),
        "{err:?}"
    );
    assert_eq!(exit.status, code(0));

    // A seccomp profile from the spec: chmod refused, everything else allowed.
    let mut filtered = spec("chmod 700 /tmp; grep Seccomp: /proc/self/status");
    let profile = serde_json::from_value(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["chmod", "fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO"}]
    }))
    .unwrap();
    filtered
        .linux_mut()
        .as_mut()
        .unwrap()
        .set_seccomp(Some(profile));
    let (out, err, _) = collect(run(&pod, &mut client, "seccomp", &filtered, false));
    assert!(err.contains("Operation not permitted"), "{err:?}");
    assert_eq!(out, "Seccomp:\t2\n");

    // Pid namespaces: containers in the pod's share one whose PID 1 is the agent's pause
    // process and see each other; one in the VM's sees every process of the VM; a main
    // process that is not its namespace's PID 1 takes the rest of its container with it.
    let with_pid_namespace = |script: &str, namespace: PidNamespace| {
        let mut spec = spec(script);
        set_pid_namespace(spec.linux_mut().as_mut().unwrap(), &namespace).unwrap();
        spec
    };
    let (_p1_in, mut p1_out) = run(
        &pod,
        &mut client,
        "p1",
        &with_pid_namespace("echo $$; exec sh -c 'sleep 600; true'", PidNamespace::Pod),
        false,
    )
    .split();
    match p1_out.next_output().unwrap() {
        crx_runtime::agent::Output::Stdout(data) => {
            assert_ne!(data, b"1\n", "p1 is not PID 1 of the pod's namespace")
        }
        other => panic!("unexpected {other:?}"),
    }
    let count = "ps -o comm | grep -c '^sleep$'; ls /proc | grep -c '^[0-9]'";
    let pid1 = "tr '\\0' ' ' < /proc/1/cmdline | grep -c crx-agent";
    let (out, err, _) = collect(run(
        &pod,
        &mut client,
        "p2",
        &with_pid_namespace(&format!("{pid1}; {count}"), PidNamespace::Pod),
        false,
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "stdout {out:?} stderr {err:?}");
    assert_eq!((lines[0], lines[1]), ("1", "1"), "p2 sees p1's sleep");
    let in_pod: u32 = lines[2].parse().unwrap();
    assert!(in_pod <= 8, "the pod's namespace has {in_pod} processes");
    let (out, err, _) = collect(run(
        &pod,
        &mut client,
        "vm",
        &with_pid_namespace(&format!("{pid1}; {count}"), PidNamespace::Vm),
        false,
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "stdout {out:?} stderr {err:?}");
    let in_vm: u32 = lines[2].parse().unwrap();
    assert!(
        in_vm > in_pod + 10,
        "the VM's namespace has {in_vm} processes"
    );
    client.signal_process("p1", "", 15).unwrap();
    assert_eq!(
        client.wait_process("p1", "").unwrap().status,
        Some(ExitKind::Signal(15))
    );
    let gone =
        "for i in $(seq 100); do ps -o comm | grep -q '^sleep$' || break; usleep 50000; done; \
                ps -o comm | grep -c '^sleep$'";
    let (out, _, _) = collect(run(
        &pod,
        &mut client,
        "p3",
        &with_pid_namespace(gone, PidNamespace::Pod),
        false,
    ));
    assert_eq!(out, "0\n", "p1's sleep outlived p1");
    let mut stray = spec("true");
    let linux = stray.linux_mut().as_mut().unwrap();
    set_pid_namespace(linux, &PidNamespace::Pod).unwrap();
    let mut namespaces = linux.namespaces().clone().unwrap();
    for ns in &mut namespaces {
        ns.set_path(Some("/proc/1/ns/pid".into())); // a path of the VM, not a namespace it names
    }
    linux.set_namespaces(Some(namespaces));
    assert_eq!(
        remote_code(client.create_container("stray", rootfs(), &stray, false, Vec::new())),
        ErrorCode::BadRequest
    );

    // Signals, list, stats, remove.
    let list = client.list_containers().unwrap();
    let a_info = list.iter().find(|c| c.container_id == "a").unwrap();
    assert_eq!(a_info.state(), ContainerState::Running);
    let stats = client.stats(&["a"]).unwrap();
    assert!(
        stats.containers[0].memory_usage_bytes > 0 && stats.containers[0].pids_current >= 1,
        "{stats:?}"
    );
    assert!(stats.agent_rss_bytes > 0, "{stats:?}");
    println!("agent RSS: {} KiB", stats.agent_rss_bytes >> 10);
    client.signal_process("a", "", 9).unwrap();
    assert_eq!(
        client.wait_process("a", "").unwrap().status,
        Some(ExitKind::Signal(9))
    );
    for id in [
        "exit3", "big", "cat", "user", "a", "b", "ro", "masked", "seccomp", "p1", "p2", "vm", "p3",
    ] {
        client
            .remove_container(id)
            .unwrap_or_else(|e| panic!("remove {id}: {e}"));
    }
    assert!(client.list_containers().unwrap().is_empty());
    pod.shut_down(&mut client);
}

#[test]
fn agent_survives_hostile_requests_oom_and_fork_bombs() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let pod = Pod::boot("hostile");
    let mut client = pod.client();
    let deadline = || Instant::now() + WAIT;

    // Garbage frame: an error reply with id 0, and the connection still works.
    let mut raw = connect_vsock(&pod.uds(), REQUEST_PORT, deadline()).unwrap();
    raw.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    let reply: Response = read_frame(&mut raw).unwrap().unwrap();
    assert_eq!(reply.id, 0);
    assert!(
        matches!(reply.result, Some(crx_agent_proto::response::Result::Error(ref e)) if e.code() == ErrorCode::BadRequest),
        "{reply:?}"
    );
    // Requests before Hello are refused; Hello then works on the same connection.
    let list = Request {
        id: 5,
        kind: Some(crx_agent_proto::request::Kind::ListContainers(
            Default::default(),
        )),
    };
    raw.write_all(&encode_frame(&list).unwrap()).unwrap();
    let reply: Response = read_frame(&mut raw).unwrap().unwrap();
    assert!(
        matches!(reply.result, Some(crx_agent_proto::response::Result::Error(ref e)) if e.code() == ErrorCode::HandshakeRequired),
        "{reply:?}"
    );
    let hello = Request {
        id: 6,
        kind: Some(crx_agent_proto::request::Kind::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            entropy: Vec::new(),
        })),
    };
    raw.write_all(&encode_frame(&hello).unwrap()).unwrap();
    let reply: Response = read_frame(&mut raw).unwrap().unwrap();
    assert_eq!(reply.id, 6);
    assert!(
        matches!(
            reply.result,
            Some(crx_agent_proto::response::Result::Hello(_))
        ),
        "{reply:?}"
    );
    // Oversized frame: an error reply, then the agent closes that connection.
    raw.write_all(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes())
        .unwrap();
    let reply: Response = read_frame(&mut raw).unwrap().unwrap();
    assert!(
        matches!(
            reply.result,
            Some(crx_agent_proto::response::Result::Error(_))
        ),
        "{reply:?}"
    );
    let mut rest = Vec::new();
    assert_eq!(raw.read_to_end(&mut rest).unwrap_or(0), 0);
    // A wrong protocol version.
    let mut old = connect_vsock(&pod.uds(), REQUEST_PORT, deadline()).unwrap();
    let hello = Request {
        id: 1,
        kind: Some(crx_agent_proto::request::Kind::Hello(Hello {
            protocol_version: 999,
            entropy: Vec::new(),
        })),
    };
    old.write_all(&encode_frame(&hello).unwrap()).unwrap();
    let reply: Response = read_frame(&mut old).unwrap().unwrap();
    assert!(
        matches!(reply.result, Some(crx_agent_proto::response::Result::Error(ref e)) if e.code() == ErrorCode::VersionMismatch),
        "{reply:?}"
    );
    drop((raw, old));

    // Bad requests on the typed client.
    assert_eq!(
        remote_code(client.wait_process("nope", "")),
        ErrorCode::NotFound
    );
    assert_eq!(
        remote_code(client.signal_process("nope", "", 9)),
        ErrorCode::NotFound
    );
    assert_eq!(
        remote_code(client.start_container("nope")),
        ErrorCode::NotFound
    );
    let bad_json =
        crx_agent_proto::request::Kind::CreateContainer(crx_agent_proto::CreateContainer {
            container_id: "bad".into(),
            rootfs: Some(rootfs()),
            oci_spec_json: b"{not json".to_vec(),
            terminal: false,
            volumes: Vec::new(),
        });
    assert_eq!(remote_code(client.call(bad_json)), ErrorCode::BadRequest);
    assert_eq!(
        remote_code(client.create_container("../x", rootfs(), &spec("true"), false, Vec::new())),
        ErrorCode::BadRequest
    );
    let escape = Rootfs {
        fs_tag: TAG.into(),
        path: "../../etc".into(),
    };
    assert_eq!(
        remote_code(client.create_container("esc", escape, &spec("true"), false, Vec::new())),
        ErrorCode::BadRequest
    );
    let missing = Rootfs {
        fs_tag: TAG.into(),
        path: "nonexistent".into(),
    };
    assert_eq!(
        remote_code(client.create_container("miss", missing, &spec("true"), false, Vec::new())),
        ErrorCode::NotFound
    );
    // Volumes: a path out of the share, a destination out of the root, a path not there.
    let volume = |path: &str, destination: &str| crx_agent_proto::Volume {
        fs_tag: TAG.into(),
        path: path.into(),
        destination: destination.into(),
    };
    for (volumes, code) in [
        (vec![volume("../../etc", "/etc2")], ErrorCode::BadRequest),
        (vec![volume("bin", "/../../x")], ErrorCode::BadRequest),
        (vec![volume("nonexistent", "/x")], ErrorCode::NotFound),
    ] {
        assert_eq!(
            remote_code(client.create_container("vol", rootfs(), &spec("true"), false, volumes)),
            code
        );
    }
    let mut no_such_program = spec("true");
    no_such_program
        .process_mut()
        .as_mut()
        .unwrap()
        .set_args(Some(vec!["/no/such".into()]));
    client
        .create_container("noexec", rootfs(), &no_such_program, false, Vec::new())
        .unwrap();
    assert_eq!(
        remote_code(client.start_container("noexec")),
        ErrorCode::Internal
    );
    client.remove_container("noexec").unwrap();

    // Over its memory limit: OOM-killed, reported as such.
    let oom = with_limits(
        spec("head -c 200000000 /dev/zero | tail; echo survived"),
        Some(32 << 20),
        None,
    );
    let (out, _, exit) = collect(run(&pod, &mut client, "oom", &oom, false));
    assert!(
        exit.oom_killed,
        "not reported OOM-killed: {exit:?}, stdout {out:?}"
    );

    // A fork bomb is held at pids.max; the agent keeps answering and removes it.
    let bomb = with_limits(spec("b() { b | b & }; b; sleep 600"), None, Some(64));
    client
        .create_container("bomb", rootfs(), &bomb, false, Vec::new())
        .unwrap();
    client.start_container("bomb").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let stats = client.stats(&["bomb"]).unwrap().containers;
    assert!(stats[0].pids_current <= 64, "{stats:?}");
    println!("fork bomb: {} pids", stats[0].pids_current);
    let mut second = pod.client(); // new connections still get served
    assert_eq!(second.list_containers().unwrap().len(), 2);
    client.remove_container("bomb").unwrap();
    client.remove_container("oom").unwrap();
    assert!(second.list_containers().unwrap().is_empty());
    pod.shut_down(&mut client);
}
