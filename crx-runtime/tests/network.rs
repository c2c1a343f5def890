//! Pod networking with the real CNI plugins (Debian's containernetworking-plugins: bridge,
//! host-local, loopback) from a scratch configuration directory, real network namespaces, a
//! real tap joined to the CNI veth by tc redirect, and real guests: a pod VM (crx-vmm, the agent
//! as PID 1, the bundled busybox image over virtio-fs) that the test host's root namespace,
//! where the CNI bridge lives, pings and talks TCP to both ways; pods restored from one pod
//! template, each onto its own tap with its own MAC and address. Removal, also of a pod whose
//! VMM was killed, leaves no namespace, veth or IP allocation behind.
//!
//! Everything runs inside the KVM test host (`vm_test_here!`), also the test without a guest:
//! bridges and namespaces are made there, never on the machine running `cargo test`. Each test
//! has its own bridge, subnet and network name, so they can run side by side.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crx_agent_proto::{ExecProcess, ExitKind, Rootfs, User};
use crx_image::{RegistryConfig, Store};
use crx_runtime::agent::{AgentClient, StdioAttachment};
use crx_runtime::network::{self, NetworkConfig, PodNetwork};
use crx_runtime::sandbox::{GuestSettings, Sandbox, SandboxConfig, Share};
use crx_runtime::spec::{container_spec, ProcessOverrides};
use crx_test_support::cni::{BridgeNetwork, CNI_BIN};

/// The test host is slow (TCG): generous, but a hang still fails.
const WAIT: Duration = Duration::from_secs(300);

/// A CNI network of the test's own: a bridge with the gateway address in the test host's root
/// namespace, host-local addresses from `<prefix>.0/24`, loopback chained after the bridge.
struct TestNetwork {
    name: String,
    bridge: String,
    prefix: String,
    conf_dir: PathBuf,
}

impl TestNetwork {
    /// The network for pod `id`, with whatever an earlier failed run of the test left (in the
    /// same test host) removed first.
    fn new(scratch: &Path, id: &str, name: &str, bridge: &str, prefix: &str) -> TestNetwork {
        let _ = Command::new("ip")
            .args(["netns", "del", &network::netns_name(id)])
            .output();
        let conf_dir = scratch.join("net.d");
        let nameserver = format!("{prefix}.53");
        BridgeNetwork {
            name,
            bridge,
            prefix,
            dns: Some((&[nameserver.as_str()], &["pods.test"])),
        }
        .write(&conf_dir);
        TestNetwork {
            name: name.into(),
            bridge: bridge.into(),
            prefix: prefix.into(),
            conf_dir,
        }
    }

    fn config(&self) -> NetworkConfig {
        NetworkConfig {
            conf_dir: self.conf_dir.clone(),
            bin_dirs: vec![CNI_BIN.into()],
            ..NetworkConfig::default()
        }
    }

    fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// host-local's allocations: one file per address, named by it.
    fn allocations(&self) -> Vec<String> {
        std::fs::read_dir(Path::new("/var/lib/cni/networks").join(&self.name))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&self.prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The veths on the bridge.
    fn bridge_ports(&self) -> Vec<String> {
        std::fs::read_dir(format!("/sys/class/net/{}/brif", self.bridge))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Nothing of pod `id` is left: namespace, veth on the bridge, address allocation.
    fn assert_clean(&self, id: &str) {
        let netns = Path::new(network::DEFAULT_NETNS_DIR).join(network::netns_name(id));
        assert!(!netns.exists(), "{} is left", netns.display());
        assert_eq!(
            self.bridge_ports(),
            Vec::<String>::new(),
            "veths left on the bridge"
        );
        assert_eq!(
            self.allocations(),
            Vec::<String>::new(),
            "addresses left allocated"
        );
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// A scratch directory under /run (sockets cannot live on the test host's 9p /tmp).
fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/run/crx-net-test-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `cmd` in network namespace `netns` (by path) with iproute2's `ip netns exec`.
fn in_netns(netns: &Path, cmd: &[&str]) -> std::process::Output {
    let name = netns.file_name().unwrap().to_str().unwrap();
    Command::new("ip")
        .args(["netns", "exec", name])
        .args(cmd)
        .output()
        .expect("iproute2's ip")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn cni_setup_joins_a_tap_to_the_veth_and_teardown_undoes_everything() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = scratch("up");
    let id = "nettest-up";
    let net = TestNetwork::new(&scratch, id, "crx-nettest-up", "crxtest1", "10.88.78");

    let (state, tap) = network::setup(&net.config(), id).expect("network setup");
    println!("network state: {state:?}");
    assert_eq!(state.netns, Path::new("/run/netns/crx-nettest-up"));
    assert_eq!(
        state.list.as_ref().map(|l| l.name.as_str()),
        Some("crx-nettest-up")
    );
    let [address] = state.guest.addresses.as_slice() else {
        panic!("one address expected: {:?}", state.guest.addresses)
    };
    let ip = address.strip_suffix("/24").expect("a /24 address");
    assert!(ip.starts_with("10.88.78."), "{address}");
    assert_eq!(net.allocations(), [ip]);
    assert!(
        state
            .guest
            .routes
            .iter()
            .any(|r| r.destination == "default" && r.gateway == net.gateway()),
        "no default route via the gateway: {:?}",
        state.guest.routes
    );
    assert_eq!(
        state.dns().map(|d| (d.servers, d.searches)),
        Some((
            vec!["10.88.78.53".to_string()],
            vec!["pods.test".to_string()]
        ))
    );
    // The guest gets the veth's MAC; the tap sits beside it, both redirected to the other.
    let eth0 = in_netns(&state.netns, &["cat", "/sys/class/net/eth0/address"]);
    assert_eq!(
        String::from_utf8_lossy(&eth0.stdout).trim(),
        state.guest.mac
    );
    let tap_mtu = in_netns(&state.netns, &["cat", "/sys/class/net/tap0/mtu"]);
    assert_eq!(
        String::from_utf8_lossy(&tap_mtu.stdout).trim(),
        state.guest.mtu.to_string()
    );
    for (dev, to) in [("eth0", "tap0"), ("tap0", "eth0")] {
        let filters = in_netns(
            &state.netns,
            &["tc", "filter", "show", "dev", dev, "ingress"],
        );
        let shown = text(&filters);
        assert!(
            shown.contains("mirred") && shown.contains(&format!("Redirect to device {to}")),
            "{dev} ingress:\n{shown}"
        );
        assert!(shown.contains("protocol all"), "{dev} ingress:\n{shown}");
    }
    assert_eq!(net.bridge_ports().len(), 1);

    // The tap lives as long as its descriptor.
    drop(tap);
    let link = in_netns(&state.netns, &["ip", "link", "show", "tap0"]);
    assert!(!link.status.success(), "tap0 outlived its descriptor");

    network::teardown(&state).expect("teardown");
    net.assert_clean(id);
    network::teardown(&state).expect("a second teardown");

    // A chain that fails halfway leaves nothing either.
    let broken = scratch.join("broken.d");
    std::fs::create_dir_all(&broken).unwrap();
    let text_conf = std::fs::read_to_string(net.conf_dir.join("10-test.conflist"))
        .unwrap()
        .replace("\"loopback\"", "\"no-such-plugin\"");
    std::fs::write(broken.join("10-test.conflist"), text_conf).unwrap();
    let mut config = net.config();
    config.conf_dir = broken;
    let err = network::setup(&config, id).unwrap_err();
    assert!(err.to_string().contains("no-such-plugin"), "{err}");
    net.assert_clean(id);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A store with the bundled busybox image (images/build-busybox.sh) imported.
fn busybox_store(scratch: &Path) -> (Store, crx_image::ImageRecord) {
    let layout = scratch.join("busybox");
    crx_test_support::build_busybox_layout(&layout);
    let store = Store::open(scratch.join("store"), RegistryConfig::default()).unwrap();
    let mut images = store.import(&layout, None).unwrap();
    assert_eq!(images.len(), 1);
    (store, images.remove(0))
}

/// `crx-vmm`, built beside this test's binary by `cargo test` of the workspace.
fn vmm_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let vmm = exe.parent().unwrap().parent().unwrap().join("crx-vmm");
    assert!(
        vmm.exists(),
        "{} is missing: build it (`cargo build -p crx-vmm`) or run the workspace's tests",
        vmm.display()
    );
    vmm
}

fn sandbox_config(id: &str, net: &TestNetwork, rootfs: Option<PathBuf>) -> SandboxConfig {
    SandboxConfig {
        id: id.into(),
        vcpus: 1,
        mem_mib: 256,
        kernel: None,
        initrd: None,
        shares: rootfs
            .into_iter()
            .map(|dir| Share {
                tag: "rootfs".into(),
                dir,
                read_only: true,
            })
            .collect(),
        vmm: vmm_binary(),
        labels: BTreeMap::new(),
        network: Some(PodNetwork::Cni(net.config())),
        container_share: false,
        template: false,
    }
}

/// Starts container `id` in the sandbox (busybox from the `rootfs` share, hostname `hostname`),
/// serving TCP on 8080: each connection gets `cat`, an echo.
fn start_echo_server(
    agent: &mut AgentClient,
    store: &Store,
    image: &crx_image::ImageRecord,
    rootfs: &Path,
    id: &str,
    hostname: &str,
) {
    let spec = container_spec(
        rootfs,
        &store.run_config(image).unwrap(),
        &ProcessOverrides {
            args: ["nc", "-ll", "-p", "8080", "-e", "cat"]
                .map(String::from)
                .to_vec(),
            hostname: Some(hostname.into()),
            ..ProcessOverrides::default()
        },
    )
    .unwrap();
    let rootfs_ref = Rootfs {
        fs_tag: "rootfs".into(),
        path: String::new(),
    };
    agent
        .create_container(id, rootfs_ref, &spec, false, Vec::new())
        .unwrap();
    agent.start_container(id).unwrap();
}

/// Sends a line to `ip`:8080 and checks it comes back.
fn echo_through(ip: &str, line: &str) {
    let mut stream = connect(&format!("{ip}:8080"));
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut echoed = String::new();
    stream.read_to_string(&mut echoed).unwrap();
    assert_eq!(echoed, line, "echo from {ip}");
}

/// Runs `script` in the container (`sh -c`) as root; returns its output and whether it exited 0.
fn exec(
    sandbox: &Sandbox,
    agent: &mut AgentClient,
    id: &str,
    exec_id: &str,
    script: &str,
) -> (String, bool) {
    agent
        .exec_process(ExecProcess {
            container_id: id.into(),
            exec_id: exec_id.into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin:/sbin".into()],
            cwd: "/".into(),
            user: Some(User {
                uid: 0,
                gid: 0,
                additional_gids: vec![],
            }),
            terminal: false,
        })
        .unwrap_or_else(|e| panic!("exec {exec_id}: {e}"));
    let stdio = StdioAttachment::attach(&sandbox.vsock_path(), Instant::now() + WAIT, id, exec_id)
        .unwrap_or_else(|e| panic!("attach {exec_id}: {e}"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = stdio.collect(&mut out, &mut err).unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    println!("exec {exec_id}: {:?}\n{output}", exit.status);
    (output, exit.status == Some(ExitKind::Code(0)))
}

fn boot_line(test: &str, sandbox: &Sandbox, agent: &AgentClient) {
    println!(
        "crx-vm-boot: {test}: 1 vCPU, 256 MiB, crx-vmm pid {}, agent listening {} us after its start",
        sandbox.state().vmm_pid,
        agent.hello().boot_to_listen_us
    );
}

/// Connects to `addr` until it accepts or `WAIT` passes.
fn connect(addr: &str) -> TcpStream {
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(10)) {
            Ok(stream) => return stream,
            Err(e) if Instant::now() > deadline => panic!("{addr} never accepted: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

#[test]
fn a_pod_vm_on_a_cni_bridge_talks_to_the_host_both_ways_and_leaves_nothing() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = scratch("pod");
    let id = "nettest-pod";
    let net = TestNetwork::new(&scratch, id, "crx-nettest-pod", "crxtest0", "10.88.77");
    let (store, image) = busybox_store(&scratch);
    let rootfs = store.rootfs(&image).expect("the image has layers");
    let run_root = scratch.join("run");

    let mut sandbox = Sandbox::start(&run_root, &sandbox_config(id, &net, Some(rootfs.clone())))
        .expect("sandbox with a network");
    let state = sandbox.state().network.clone().expect("network state");
    let pod_ip = state.guest.addresses[0]
        .strip_suffix("/24")
        .unwrap()
        .to_owned();
    println!("pod {id}: {pod_ip}, MAC {}", state.guest.mac);
    let mut agent = sandbox
        .agent(Instant::now() + WAIT)
        .unwrap_or_else(|e| panic!("agent: {e}\n{}", sandbox.log_tail()));
    boot_line("network-pod", &sandbox, &agent);
    let settings = GuestSettings {
        hostname: "web".into(),
        dns: None,
        sysctls: BTreeMap::from([(
            "net.ipv4.ip_unprivileged_port_start".to_owned(),
            "80".to_owned(),
        )]),
    };
    sandbox
        .configure(&mut agent, &settings)
        .expect("configure the guest");

    start_echo_server(&mut agent, &store, &image, &rootfs, id, "web");

    // The guest has the veth's identity and the CNI routes and sysctl.
    let (out, ok) = exec(
        &sandbox,
        &mut agent,
        id,
        "look",
        "cat /sys/class/net/eth0/address; ip -4 addr show dev eth0; ip route; \
         cat /proc/sys/net/ipv4/ip_unprivileged_port_start",
    );
    assert!(ok, "{out}");
    assert!(out.contains(&state.guest.mac), "{out}");
    assert!(out.contains(&format!("inet {pod_ip}/24")), "{out}");
    assert!(
        out.contains(&format!("default via {} dev eth0", net.gateway())),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.trim() == "80"),
        "sysctl not applied: {out}"
    );

    // Host → pod: ping, then a TCP round trip to the container's server.
    let ping = Command::new("busybox")
        .args(["ping", "-c", "3", "-W", "10", &pod_ip])
        .output()
        .unwrap();
    assert!(ping.status.success(), "ping {pod_ip}:\n{}", text(&ping));
    echo_through(&pod_ip, "hello through the tap\n");

    // Pod → host: the gateway address (the bridge, in the test host's root namespace).
    let listener =
        TcpListener::bind((net.gateway().as_str(), 9090)).expect("listen on the gateway");
    let upload = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        (peer.ip().to_string(), got)
    });
    let (out, ok) = exec(
        &sandbox,
        &mut agent,
        id,
        "up",
        &format!("echo from the pod | nc {} 9090", net.gateway()),
    );
    assert!(ok, "{out}");
    let (peer, got) = upload.join().unwrap();
    assert_eq!(
        (peer.as_str(), got.as_str()),
        (pod_ip.as_str(), "from the pod\n")
    );

    // Removal: the VM stops, CNI DEL releases the address and the veth, the namespace goes.
    drop(agent);
    sandbox.remove(Duration::from_secs(30)).expect("remove");
    assert!(!run_root.join("sandboxes").join(id).exists());
    net.assert_clean(id);
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn a_pod_whose_vmm_was_killed_is_dead_and_removal_reclaims_its_network() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = scratch("kill");
    let id = "nettest-kill";
    let net = TestNetwork::new(&scratch, id, "crx-nettest-kill", "crxtest2", "10.88.79");
    let run_root = scratch.join("run");

    let mut sandbox =
        Sandbox::start(&run_root, &sandbox_config(id, &net, None)).expect("sandbox with a network");
    let state = sandbox.state().network.clone().expect("network state");
    let agent = sandbox
        .agent(Instant::now() + WAIT)
        .unwrap_or_else(|e| panic!("agent: {e}\n{}", sandbox.log_tail()));
    boot_line("network-kill", &sandbox, &agent);
    let tap = in_netns(&state.netns, &["ip", "link", "show", "tap0"]);
    assert!(
        tap.status.success(),
        "no tap0 while the VM runs: {}",
        text(&tap)
    );

    let pid = sandbox.state().vmm_pid;
    // SAFETY: kill(2) on the VMM this test started, which has not been reaped yet (this
    // process is its parent), so the pid is still its.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    drop(agent);

    // Another process's view (a restarted shim): the sandbox is there, and dead.
    let mut found = Sandbox::open(&run_root, id).unwrap();
    assert!(found.wait_exit(WAIT), "the VMM did not die");
    assert!(!found.is_running());
    assert_eq!(found.state().network.as_ref(), Some(&state));
    // The tap died with the VMM; the namespace and the CNI resources wait for removal.
    let tap = in_netns(&state.netns, &["ip", "link", "show", "tap0"]);
    assert!(!tap.status.success(), "tap0 outlived the VMM");
    assert_eq!(net.allocations().len(), 1);

    found.remove(Duration::ZERO).expect("remove a dead sandbox");
    drop(sandbox);
    assert!(!run_root.join("sandboxes").join(id).exists());
    net.assert_clean(id);
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn pods_restored_from_one_template_each_get_their_own_mac_and_ip_and_talk_to_the_host() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = scratch("tpl");
    let ids = ["nettest-tpl-a", "nettest-tpl-b", "nettest-tpl-c"];
    let net = TestNetwork::new(&scratch, ids[0], "crx-nettest-tpl", "crxtest3", "10.88.80");
    for id in &ids[1..] {
        let _ = Command::new("ip")
            .args(["netns", "del", &network::netns_name(id)])
            .output();
    }
    let (store, image) = busybox_store(&scratch);
    let rootfs = store.rootfs(&image).expect("the image has layers");
    let run_root = scratch.join("run");

    // The first pod makes the template (a VM with a network device on a throwaway tap), and
    // every pod, the first too, is restored from it onto its own tap.
    let mut pods = Vec::new();
    for id in ids {
        let mut config = sandbox_config(id, &net, Some(rootfs.clone()));
        config.template = true;
        let mut sandbox = Sandbox::start(&run_root, &config).expect("sandbox with a network");
        let template = sandbox.state().template.clone();
        assert!(
            template.is_some(),
            "{id} was booted cold, not restored from a template:\n{}",
            sandbox.log_tail()
        );
        let mut agent = sandbox
            .agent(Instant::now() + WAIT)
            .unwrap_or_else(|e| panic!("agent: {e}\n{}", sandbox.log_tail()));
        let settings = GuestSettings {
            hostname: id.into(),
            ..GuestSettings::default()
        };
        sandbox
            .configure(&mut agent, &settings)
            .unwrap_or_else(|e| panic!("configure {id}: {e}\n{}", sandbox.log_tail()));
        start_echo_server(&mut agent, &store, &image, &rootfs, id, id);
        pods.push((id, sandbox, agent, template));
    }
    assert!(
        pods.windows(2).all(|w| w[0].3 == w[1].3),
        "one template for all"
    );

    let mut seen = Vec::new();
    for (id, sandbox, agent, _) in &mut pods {
        let state = sandbox.state().network.clone().expect("network state");
        let pod_ip = state.guest.addresses[0]
            .strip_suffix("/24")
            .unwrap()
            .to_owned();
        let (out, ok) = exec(
            sandbox,
            agent,
            id,
            "look",
            "cat /sys/class/net/eth0/address; ip -4 addr show dev eth0; hostname",
        );
        assert!(ok, "{out}");
        assert!(
            out.contains(&state.guest.mac),
            "{id}: MAC {}: {out}",
            state.guest.mac
        );
        assert!(out.contains(&format!("inet {pod_ip}/24")), "{id}: {out}");
        assert!(
            out.lines().any(|l| l.trim() == *id),
            "{id}: hostname: {out}"
        );
        let ping = Command::new("busybox")
            .args(["ping", "-c", "2", "-W", "10", &pod_ip])
            .output()
            .unwrap();
        assert!(ping.status.success(), "ping {pod_ip}:\n{}", text(&ping));
        echo_through(&pod_ip, &format!("hello {id}\n"));
        seen.push((pod_ip, state.guest.mac));
    }
    let mut ips: Vec<_> = seen.iter().map(|(ip, _)| ip).collect();
    let mut macs: Vec<_> = seen.iter().map(|(_, mac)| mac).collect();
    ips.sort();
    ips.dedup();
    macs.sort();
    macs.dedup();
    assert_eq!((ips.len(), macs.len()), (ids.len(), ids.len()), "{seen:?}");

    for (id, sandbox, agent, _) in pods {
        drop(agent);
        sandbox.remove(Duration::from_secs(30)).expect("remove");
        let netns = Path::new(network::DEFAULT_NETNS_DIR).join(network::netns_name(id));
        assert!(!netns.exists(), "{} is left", netns.display());
    }
    net.assert_clean(ids[0]);
    let _ = std::fs::remove_dir_all(&scratch);
}
