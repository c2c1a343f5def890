//! `crx run` end to end, as an operator types it: the bundled busybox image (built by
//! images/build-busybox.sh into a scratch OCI layout), imported into a scratch store (or pushed
//! to a real Debian `docker-registry` and pulled), run in its own microVM (crx-vmm, the agent as
//! PID 1, the rootfs over virtio-fs from a real virtiofsd). Checks exit codes and signals,
//! separate stdout/stderr (also 100 MB of each at once), stdin, env/cwd/user/hostname, a
//! detached container with exec/ps/stop/rm, a pod whose VMM is killed, images whose layers try
//! to escape the store, and that nothing is left on the host afterwards: no sandbox directory,
//! socket or mount, no VMM or virtiofsd process, no image lease.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crx_runtime::sandbox::Sandbox;
use crx_test_support::cni::{BridgeNetwork, CNI_BIN};
use crx_test_support::files_under;
use crx_test_support::layout::{Comp, Layer, Layout};
use sha2::{Digest, Sha256};

/// How long the test host may take for what is awaited here (it emulates the CPU); a hang
/// still fails.
const WAIT: Duration = Duration::from_secs(300);

struct Env {
    scratch: PathBuf,
}

impl Env {
    /// A scratch store and run root, without an image.
    fn empty(test: &str) -> Env {
        let vmm = Path::new(env!("CARGO_BIN_EXE_crx")).with_file_name("crx-vmm");
        assert!(
            vmm.is_file(),
            "{} is missing: `cargo build -p crx-vmm` (crx runs the crx-vmm beside it)",
            vmm.display()
        );
        // Sockets live in the run root: under /run, not the test host's 9p /tmp.
        let scratch = PathBuf::from(format!("/run/crx-run-test-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).unwrap();
        Env { scratch }
    }

    /// A scratch store and run root, and the bundled busybox image as an OCI layout.
    fn new(test: &str) -> Env {
        let env = Env::empty(test);
        crx_test_support::build_busybox_layout(&env.scratch.join("busybox"));
        env
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

    fn run_root(&self) -> PathBuf {
        self.scratch.join("run")
    }

    /// Nothing of any container is left: sandboxes, sockets and mounts under the run root,
    /// leases, VMM and virtiofsd processes.
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
        let procs: Vec<String> = self.processes().into_iter().map(|(_, c)| c).collect();
        assert!(procs.is_empty(), "processes left: {procs:?}");
        let marker = self.scratch.display().to_string();
        let sockets: Vec<_> = files_under(&self.run_root())
            .into_iter()
            .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()))
            .collect();
        assert!(sockets.is_empty(), "sockets left: {sockets:?}");
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&marker))
            .map(str::to_owned)
            .collect();
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    }
}

impl Env {
    /// The VMM and virtiofsd processes of this test's pods: pid and command line.
    fn processes(&self) -> Vec<(i32, String)> {
        let marker = self.scratch.display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
            })
            .filter(|(_, c)| {
                c.contains(&marker) && (c.contains("crx-vmm") || c.contains("virtiofsd"))
            })
            .collect()
    }
}

impl Drop for Env {
    /// A failed test may leave its pods running: they are removed (`crx rm -f`: also their
    /// network namespaces and addresses, which outlive the scratch directory, so a retry can
    /// use the same names), and whatever is left is killed, so they do not slow the tests
    /// after it.
    fn drop(&mut self) {
        let sandboxes = std::fs::read_dir(self.run_root().join("sandboxes"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default();
        for id in sandboxes {
            let _ = self.crx(&["rm", "-f", &id.to_string_lossy()]).output();
        }
        for (pid, _) in self.processes() {
            // SAFETY: kill(2) takes no pointers; the pid is one of this test's own VMMs.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
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

    // Volumes: a directory read-write (the host sees what the container writes), a file
    // read-only, a read-only directory with a tmpfs mounted below it (which stays writable, as
    // with a non-recursive read-only bind on a host); a missing host path is refused before
    // any VM starts.
    let data = env.scratch.join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in"), "from the host\n").unwrap();
    let setting = env.scratch.join("setting");
    std::fs::write(&setting, "s=1\n").unwrap();
    let fixed = env.scratch.join("fixed");
    std::fs::create_dir_all(fixed.join("scratch")).unwrap();
    let tmpfs = fixed.join("scratch");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&tmpfs)
        .status()
        .unwrap();
    assert!(mounted.success());
    let out = env.output(&[
        "run",
        "--cold",
        "-v",
        &format!("{}:/data", data.display()),
        "-v",
        &format!("{}:/etc/setting:ro", setting.display()),
        "-v",
        &format!("{}:/fixed:ro", fixed.display()),
        &env.layout(),
        "--",
        "sh",
        "-c",
        "cat /data/in /etc/setting; echo from-vm > /data/out; \
         echo x > /etc/setting || echo read-only; touch /fixed/top || echo top-read-only; \
         echo below > /fixed/scratch/file && echo below-writable",
    ]);
    println!("crx-vm-boot: crx run -v");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from the host\ns=1\nread-only\ntop-read-only\nbelow-writable\n"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(data.join("out")).unwrap(),
        "from-vm\n"
    );
    assert_eq!(std::fs::read_to_string(&setting).unwrap(), "s=1\n");
    assert_eq!(
        std::fs::read_to_string(tmpfs.join("file")).unwrap(),
        "below\n"
    );
    let unmounted = Command::new("umount").arg(&tmpfs).status().unwrap();
    assert!(unmounted.success());
    env.assert_clean();
    let missing = env.scratch.join("missing");
    let out = env.output(&[
        "run",
        "-v",
        &format!("{}:/m", missing.display()),
        &env.layout(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("host path"));
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

/// Deletes a network interface of the test host when dropped (a test's CNI bridge).
struct DeleteLink(&'static str);

impl Drop for DeleteLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", self.0]).output();
    }
}

/// The pod templates under the run root (complete ones: with a state file).
fn templates(env: &Env) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(env.run_root().join("templates"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    found.retain(|p| p.join("vmstate").is_file());
    found.sort();
    found
}

/// The template a pod's VM was restored from (`None`: booted cold).
fn restored_from(env: &Env, id: &str) -> Option<PathBuf> {
    Sandbox::open(&env.run_root(), id)
        .expect("the pod's sandbox")
        .state()
        .template
        .clone()
}

/// Proportional set size (PSS) of a pod: its VMM and every process under it (virtiofsd), in
/// bytes. Guest RAM pages mapped by both the VMM and virtiofsd count once in all.
fn pod_pss(env: &Env, id: &str) -> u64 {
    let vmm = Sandbox::open(&env.run_root(), id)
        .expect("the pod's sandbox")
        .state()
        .vmm_pid as i32;
    let processes: Vec<procfs::process::Process> = procfs::process::all_processes()
        .expect("/proc")
        .flatten()
        .collect();
    let parent = |p: &procfs::process::Process| p.stat().map(|s| s.ppid).unwrap_or(0);
    let mut pod = vec![vmm];
    let mut grew = true;
    while grew {
        grew = false;
        for p in &processes {
            if !pod.contains(&p.pid) && pod.contains(&parent(p)) {
                pod.push(p.pid);
                grew = true;
            }
        }
    }
    pod.iter()
        .map(|&pid| {
            procfs::process::Process::new(pid)
                .and_then(|p| p.smaps_rollup())
                .map(|r| {
                    r.memory_map_rollup
                        .0
                        .iter()
                        .filter_map(|m| m.extension.map.get("Pss"))
                        .sum::<u64>()
                })
                .unwrap_or_else(|e| panic!("PSS of pid {pid} in pod {id}: {e}"))
        })
        .sum()
}

/// Pod templates: the first `crx run` makes one (a VM with a network device, snapshotted once
/// its agent answers); 20 pods on a CNI bridge are then restored from it and run at once, each
/// with its own hostname, its own address on the bridge (reached from the host) and its own
/// random numbers (the host's entropy reseeds each guest), and all together in far less memory
/// than 20 booted pods (PSS); `--cold` boots; a damaged template is discarded and the pod boots
/// cold; a changed kernel gets a template of its own.
#[test]
fn crx_run_restores_pods_from_a_template_each_with_its_own_ip_and_random_numbers() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let env = Env::new("template");
    // A bridge in the test host with host-local addresses from 10.88.90.0/24.
    let conf_dir = env.scratch.join("net.d");
    BridgeNetwork {
        name: "crx-run-tpl",
        bridge: "crxruntpl0",
        prefix: "10.88.90",
        dns: None,
    }
    .write(&conf_dir);
    let _bridge = DeleteLink("crxruntpl0");
    let conf_dir = conf_dir.to_str().unwrap().to_owned();
    let net_run = |args: &[&str]| {
        let mut all = vec![
            "run",
            "--network",
            "crx-run-tpl",
            "--cni-conf-dir",
            &conf_dir,
            "--cni-bin-dir",
            CNI_BIN,
        ];
        all.extend_from_slice(args);
        env.output(&all)
    };
    let out = net_run(&["--name", "first", &env.layout(), "--", "echo", "made"]);
    println!("crx-vm-boot: crx run (template made)");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "made\n");
    let made = templates(&env);
    assert_eq!(made.len(), 1, "{made:?}");

    let pods: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
    for pod in &pods {
        let out = net_run(&["-d", "--name", pod, &env.layout(), "--", "sleep", "600"]);
        assert!(out.status.success());
        if restored_from(&env, pod).as_ref() != Some(&made[0]) {
            let dir = env.run_root().join("sandboxes").join(pod);
            let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            panic!(
                "{pod} was not restored from the template; its failed restore's VMM log:\n{}\n\
                 and console:\n{}",
                log("restore-failed.vmm.log"),
                log("restore-failed.console.log")
            );
        }
    }
    println!(
        "crx-vm-boot: crx run -d ({} pods restored from the template)",
        pods.len()
    );
    let mut randoms = Vec::new();
    let mut ips = Vec::new();
    for pod in &pods {
        let out = env.output(&[
            "exec",
            pod,
            "--",
            "sh",
            "-c",
            "hostname; head -c 16 /dev/urandom | od -An -tx1; ip -4 -o addr show dev eth0",
        ]);
        assert!(out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        let [hostname, random, address] = lines[..] else {
            panic!("three lines expected: {stdout}")
        };
        assert_eq!(hostname, pod, "the pod's hostname");
        let random = random.split_whitespace().collect::<String>();
        assert_eq!(random.len(), 32, "{random:?}");
        randoms.push(random);
        // The address CNI gave the pod is the guest's, and the host reaches it.
        let network = Sandbox::open(&env.run_root(), pod)
            .unwrap()
            .state()
            .network
            .clone()
            .expect("the pod's network");
        let given = &network.guest.addresses[0];
        assert!(
            address.contains(&format!("inet {given} ")),
            "{pod}: CNI gave {given}, the guest has {address:?}"
        );
        let ip = given.split('/').next().unwrap().to_owned();
        let ping = Command::new("busybox")
            .args(["ping", "-c", "1", "-W", "10", &ip])
            .output()
            .unwrap();
        assert!(ping.status.success(), "ping {pod} at {ip}: {ping:?}");
        ips.push(ip);
    }
    for distinct in [&mut randoms, &mut ips] {
        distinct.sort();
        distinct.dedup();
    }
    assert_eq!(
        randoms.len(),
        pods.len(),
        "pods restored from one template share random numbers"
    );
    assert_eq!(ips.len(), pods.len(), "pods share addresses: {ips:?}");
    let restored_pss: u64 = pods.iter().map(|pod| pod_pss(&env, pod)).sum();
    // The template's memory file is shared by all of them (tmpfs pages, read by each VMM's
    // page loader).
    let template_file =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(made[0].join("memory")).unwrap())
            * 512;

    let out = net_run(&[
        "-d",
        "--cold",
        "--name",
        "cold",
        &env.layout(),
        "--",
        "sleep",
        "600",
    ]);
    assert!(out.status.success());
    assert_eq!(restored_from(&env, "cold"), None);
    println!("crx-vm-boot: crx run -d --cold");
    // Idle, like the restored ones once their exec ended.
    assert!(env.output(&["exec", "cold", "--", "true"]).status.success());
    let cold_pss = pod_pss(&env, "cold");
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let n = pods.len() as u64;
    println!(
        "crx-pss: {n} restored idle pods {:.1} MiB in all ({:.1} MiB each) + their template's memory file {:.1} MiB; one booted idle pod {:.1} MiB ({n}x: {:.1} MiB)",
        mib(restored_pss),
        mib(restored_pss / n),
        mib(template_file),
        mib(cold_pss),
        mib(cold_pss * n)
    );
    assert!(
        restored_pss + template_file < cold_pss * n / 2,
        "{n} restored pods take {restored_pss} bytes (+ {template_file} of template), not far below {n} booted pods' {}",
        cold_pss * n
    );
    let mut rm = vec!["rm", "-f", "cold"];
    rm.extend(pods.iter().map(String::as_str));
    assert!(env.output(&rm).status.success());
    // Their networks went with them: namespaces and addresses.
    for pod in pods.iter().map(String::as_str).chain(["cold"]) {
        let netns = Path::new("/run/netns").join(format!("crx-{pod}"));
        assert!(!netns.exists(), "{} is left", netns.display());
    }
    let allocated: Vec<_> = std::fs::read_dir("/var/lib/cni/networks/crx-run-tpl")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().starts_with("10.88.90."))
                .collect()
        })
        .unwrap_or_default();
    assert!(allocated.is_empty(), "addresses left: {allocated:?}");

    // A damaged template: the pod boots cold, and the template is gone, to be made again.
    let state = made[0].join("vmstate");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = net_run(&[
        "-d",
        "--name",
        "damaged",
        &env.layout(),
        "--",
        "sleep",
        "600",
    ]);
    println!("crx-vm-boot: crx run -d (damaged template, cold boot)");
    assert!(out.status.success());
    assert_eq!(restored_from(&env, "damaged"), None);
    assert!(!made[0].exists(), "the damaged template was kept");
    let out = env.output(&["exec", "damaged", "--", "echo", "cold"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cold\n");
    assert!(env.output(&["rm", "-f", "damaged"]).status.success());

    // Another kernel (a copy of the default one, then rewritten): another template.
    let guest = crx_core::builder::default_guest_dir();
    let kernel = env.scratch.join("vmlinux");
    std::fs::copy(guest.join("vmlinux"), &kernel).unwrap();
    let initrd = guest.join("initrd.cpio");
    let build = |env: &Env| {
        let out = env.output(&[
            "template",
            "build",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
        ]);
        assert!(out.status.success());
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    let before = build(&env);
    assert!(before.join("vmstate").is_file());
    assert_eq!(
        build(&env),
        before,
        "an unchanged kernel rebuilt its template"
    );
    let rewritten = env.scratch.join("vmlinux.new");
    std::fs::copy(&kernel, &rewritten).unwrap();
    std::fs::rename(&rewritten, &kernel).unwrap();
    let after = build(&env);
    println!("crx-vm-boot: crx template build (2 kernels)");
    assert_ne!(after, before);
    assert!(after.join("vmstate").is_file());
    assert!(env.output(&["template", "rm"]).status.success());
    assert!(templates(&env).is_empty());
    env.assert_clean();
}

/// Reads `stream` to its end, keeping none of it but its last 4 KiB (where crx's own error
/// message would be): its length, sha256 (hex) and that tail.
fn drain_hashing(mut stream: impl Read) -> (u64, String, String) {
    const TAIL: usize = 4096;
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut tail = Vec::with_capacity(2 * TAIL);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n as u64;
                tail.extend_from_slice(&buf[n.saturating_sub(TAIL)..n]);
                if tail.len() > TAIL {
                    tail.drain(..tail.len() - TAIL);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading crx's output: {e}"),
        }
    }
    (
        len,
        format!("{:x}", hasher.finalize()),
        String::from_utf8_lossy(&tail).into_owned(),
    )
}

#[test]
fn crx_run_streams_100_mb_of_stdout_and_of_stderr_at_once_complete_and_apart() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    const LEN: u64 = 100_000_000;
    // Different line lengths, so bytes of one stream in the other break both digests.
    const OUT_LINE: &str = "stdout 0123456789";
    const ERR_LINE: &str = "STDERR abcdefghijklmnopqrstuvwxyz";
    // `yes 'LINE' | head -c 100000000 | sha256sum`, taken once on the host: hashing 200 MB
    // more in the emulated test host would cost minutes.
    const OUT_SHA256: &str = "4e6fdf7b11926534c12a452125b6f7a99aed4ce4455e76300e8ff0857a3a45c4";
    const ERR_SHA256: &str = "000e3a6c5b42c30ddf9d34d41c652840965eb9089503fd49285883a9162bd2da";
    let env = Env::new("big");
    let script =
        format!("yes '{OUT_LINE}' | head -c {LEN} & yes '{ERR_LINE}' | head -c {LEN} >&2; wait");
    let started = Instant::now();
    let mut child = env
        .crx(&[
            "run",
            "--name",
            "big1",
            &env.layout(),
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || drain_hashing(stdout));
    let err = std::thread::spawn(move || drain_hashing(stderr));
    let (out_len, out_digest, _) = out.join().unwrap();
    let (err_len, err_digest, err_tail) = err.join().unwrap();
    let status = child.wait().unwrap();
    println!("crx-vm-boot: crx run (100 MB on stdout and on stderr)");
    println!(
        "crx run: {out_len} bytes of stdout and {err_len} of stderr in {:?} (boot included)",
        started.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(0),
        "crx run: {status:?}; the end of its stderr:\n{err_tail}"
    );
    assert_eq!((out_len, err_len), (LEN, LEN));
    assert_eq!(out_digest, OUT_SHA256, "stdout is not `yes '{OUT_LINE}'`");
    assert_eq!(err_digest, ERR_SHA256, "stderr is not `yes '{ERR_LINE}'`");
    env.assert_clean();
}

/// The pids of `pid`'s children.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (_, rest) = stat.rsplit_once(") ")?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Polls `done` until it holds; panics naming `what` after `WAIT`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not after {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_pod_whose_vmm_was_killed_shows_exited_and_rm_removes_everything() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let env = Env::new("crash");
    let out = env.output(&[
        "run",
        "-d",
        "--name",
        "crash1",
        &env.layout(),
        "--",
        "sleep",
        "600",
    ]);
    println!("crx-vm-boot: crx run -d (its VMM then killed)");
    assert!(out.status.success());

    // The VMM, as the sandbox state records it, and its virtiofsd.
    let sandbox = Sandbox::open(&env.run_root(), "crash1").unwrap();
    let vmm = sandbox.state().vmm_pid;
    assert!(alive(vmm), "VMM {vmm} of crash1 is not running");
    let virtiofsd = children_of(vmm);
    assert!(
        virtiofsd.iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.contains("virtiofsd"))
        }),
        "no virtiofsd child of the VMM {vmm}: {virtiofsd:?}"
    );
    // SAFETY: kill(2) on the VMM pid the sandbox recorded, checked alive just above.
    assert_eq!(unsafe { libc::kill(vmm as libc::pid_t, libc::SIGKILL) }, 0);
    wait_until("the killed VMM exits", || !alive(vmm));
    wait_until("virtiofsd dies with its VMM", || {
        virtiofsd.iter().all(|&pid| !alive(pid))
    });

    let ps = env.output(&["ps"]);
    let ps = String::from_utf8_lossy(&ps.stdout).to_string();
    let line = ps
        .lines()
        .find(|l| l.starts_with("crash1 "))
        .unwrap_or_else(|| panic!("crash1 not listed:\n{ps}"));
    assert!(
        line.contains("exited") && !line.contains("running"),
        "{line}"
    );
    let exec = env.output(&["exec", "crash1", "--", "true"]);
    assert!(!exec.status.success());
    assert!(String::from_utf8_lossy(&exec.stderr).contains("not running"));

    // Not running, so no -f needed.
    let rm = env.output(&["rm", "crash1"]);
    assert!(rm.status.success());
    env.assert_clean();
    let ps = env.output(&["ps"]);
    assert!(!String::from_utf8_lossy(&ps.stdout).contains("crash1"));
    // The image is no longer leased.
    assert!(env.output(&["rmi", "busybox"]).status.success());
}

/// An uncompressed layer tar of `(name, kind, link target, data)`; names are written as given,
/// `..` and all, as a hostile image would.
fn hostile_layer(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Layer {
    let mut builder = tar::Builder::new(Vec::new());
    for &(name, kind, link, data) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    Layer {
        tar: builder.into_inner().unwrap(),
        comp: Comp::None,
    }
}

#[test]
fn crx_run_refuses_images_whose_layers_escape_and_writes_nothing_outside_the_store() {
    // No guest boots: the image is refused before any sandbox exists.
    let env = Env::empty("escape");
    let pid = std::process::id();
    // Far enough up to reach / from anywhere in the store, then a path of our own.
    let up = "../".repeat(16);
    let outside_dotdot = PathBuf::from(format!("/tmp/crx-escape-dotdot-{pid}"));
    let outside_link = PathBuf::from(format!("/tmp/crx-escape-link-{pid}"));
    std::fs::create_dir_all(&outside_link).unwrap();
    let cases = [
        (
            "dotdot",
            hostile_layer(&[
                ("etc/", tar::EntryType::Directory, "", b""),
                ("../escape", tar::EntryType::Regular, "", b"pwned\n"),
            ]),
            // Wherever it landed in the store, the scan below finds it.
            vec![],
        ),
        (
            "dotdot-far",
            hostile_layer(&[(
                &format!("{up}tmp/crx-escape-dotdot-{pid}"),
                tar::EntryType::Regular,
                "",
                b"pwned\n",
            )]),
            vec![outside_dotdot.clone()],
        ),
        (
            "symlink",
            hostile_layer(&[
                (
                    "out",
                    tar::EntryType::Symlink,
                    &outside_link.display().to_string(),
                    b"",
                ),
                ("out/pwned", tar::EntryType::Regular, "", b"pwned\n"),
            ]),
            vec![outside_link.join("pwned")],
        ),
        (
            "symlink-dotdot",
            hostile_layer(&[
                ("up", tar::EntryType::Symlink, &format!("{up}tmp"), b""),
                (
                    &format!("up/crx-escape-link-{pid}/pwned-relative"),
                    tar::EntryType::Regular,
                    "",
                    b"pwned\n",
                ),
            ]),
            vec![outside_link.join("pwned-relative")],
        ),
    ];
    for (name, layer, targets) in cases {
        let layout_dir = env.scratch.join(name);
        let mut layout = Layout::new(&layout_dir);
        let manifest = layout.image(&[layer], "amd64");
        layout.tag(manifest, "latest");
        let out = env.output(&[
            "run",
            "--name",
            name,
            &layout_dir.display().to_string(),
            "--",
            "true",
        ]);
        assert!(!out.status.success(), "{name}: crx run succeeded");
        assert_ne!(out.status.code(), Some(0));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("escapes the root directory"),
            "{name}: the error does not say the layer escapes:\n{stderr}"
        );
        for target in targets {
            assert!(!target.exists(), "{name}: {} was written", target.display());
        }
        // Nothing named by the layers anywhere in the scratch tree either.
        let written: Vec<_> = files_under(&env.scratch)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains("pwned") || n == "escape")
            })
            .collect();
        assert!(written.is_empty(), "{name}: written {written:?}");
        assert!(
            !env.run_root().join("sandboxes").join(name).exists(),
            "{name}: a sandbox was made"
        );
        env.assert_clean();
    }
    let leaked: Vec<_> = std::fs::read_dir(&outside_link)
        .unwrap()
        .flatten()
        .collect();
    let _ = std::fs::remove_dir_all(&outside_link);
    assert!(leaked.is_empty(), "written outside: {leaked:?}");
    assert!(!outside_dotdot.exists());
}

#[test]
fn crx_run_pulls_a_registry_reference() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let env = Env::new("registry");
    // Started here, in the test body: in the test host when guests need it, like crx.
    let registry = crx_test_support::Registry::start(&env.scratch.join("registry"), None);
    registry.push(Path::new(&env.layout()), "latest", "crx/busybox", None);
    let reference = format!("{}/crx/busybox:latest", registry.addr());
    let out = env.output(&[
        "run",
        "--insecure-registry",
        &registry.addr(),
        &reference,
        "--",
        "sh",
        "-c",
        "echo pulled",
    ]);
    println!("crx-vm-boot: crx run of a registry reference");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pulled\n");
    let images = env.output(&["images"]);
    assert!(
        String::from_utf8_lossy(&images.stdout)
            .lines()
            .any(|l| l.starts_with(&reference)),
        "{reference} not listed"
    );
    env.assert_clean();
}
