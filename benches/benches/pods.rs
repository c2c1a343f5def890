//! Pod start through the CRI, as kubelet drives it: `crictl runp` + `create` + `start` of a
//! busybox container (start answers once its process runs), against crx-cri (every pod a VM,
//! restored from its pod template) and containerd + runc (Debian's containerd 1.6 with its CRI
//! plugin and the runc v2 shim), with the same crictl, the same image pulled by both from the
//! same local registry, and the same CNI bridge plugin. Rounds are interleaved in alternating
//! order (`CRX_BENCH_ROUNDS`, default 20); each pod is removed after it is timed. Then 20 pods
//! are started at once on each runtime, and, while they idle, the memory each costs on the host
//! is counted as the proportional set size (PSS) of its processes: for CRX the VMM and its
//! virtiofsd, for containerd the pod's shim and its children (the pause process and the
//! container's). Where this host's /dev/kvm is PVM, all of it runs inside the test host,
//! containerd too, so the ratios compare like with like.
//!
//! `cargo xtask bench -- -p crx-benches --bench pods` (builds the release `crx-cri` and
//! `crx-vmm` first).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use crx_benches::{median_p99, release_binary, workspace_root};
use crx_test_support::cni::{BridgeNetwork, CNI_BIN};
use crx_test_support::containerd::{Containerd, ContainerdConfig};
use crx_test_support::crx_cri::CrxCri;

/// Pods started at once in the concurrent part.
const CONCURRENT: usize = 20;
/// The longest a runtime may take to answer one crictl call (the test host is slow).
const CALL_TIMEOUT: &str = "300s";

/// One CRI runtime under test, with the crictl that drives it.
struct Runtime {
    name: &'static str,
    endpoint: String,
    crictl: PathBuf,
    scratch: PathBuf,
    image: String,
}

impl Runtime {
    fn crictl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.crictl)
            .arg("--runtime-endpoint")
            .arg(&self.endpoint)
            .arg("--image-endpoint")
            .arg(&self.endpoint)
            .args(["--timeout", CALL_TIMEOUT])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("crictl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "{}: crictl {}: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn json(&self, name: &str, value: serde_json::Value) -> String {
        let path = self.scratch.join(name);
        fs::write(&path, value.to_string()).expect("writing a crictl config");
        path.display().to_string()
    }

    /// runp + create + start of pod `name`; how long that took, and the pod's ID.
    fn start_pod(&self, name: &str) -> Result<(Duration, String), String> {
        let pod_config = self.json(
            &format!("pod-{name}.json"),
            serde_json::json!({
                "metadata": {"name": name, "namespace": "bench", "uid": format!("uid-{name}"), "attempt": 1},
                "log_directory": self.scratch.join("logs").join(name),
                "linux": {}
            }),
        );
        let container_config = self.json(
            &format!("container-{name}.json"),
            serde_json::json!({
                "metadata": {"name": "sleeper"},
                "image": {"image": self.image},
                "command": ["sleep", "3600"],
                "log_path": "sleeper.log",
                "linux": {}
            }),
        );
        let started = Instant::now();
        let pod = self.crictl(&["runp", &pod_config])?;
        let container = self.crictl(&["create", &pod, &container_config, &pod_config])?;
        self.crictl(&["start", &container])?;
        Ok((started.elapsed(), pod))
    }

    fn remove_pod(&self, pod: &str) -> Result<(), String> {
        self.crictl(&["stopp", pod])?;
        self.crictl(&["rmp", pod]).map(drop)
    }
}

/// A CRI server of the bench: crx-cri (killed when dropped) or containerd.
enum Server {
    CrxCri(Child),
    /// Stopped when dropped.
    Containerd {
        _daemon: Containerd,
    },
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::CrxCri(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// containerd with its CRI plugin and runc, everything under `dir`: its root and state, its
/// socket, its CNI configuration, the pause image and the registry reached over plain HTTP.
fn start_containerd(dir: &Path, registry: &str) -> (Server, String) {
    let containerd = Containerd::start(
        dir,
        &ContainerdConfig {
            registry,
            network: BridgeNetwork {
                name: "bench-runc",
                bridge: "cxbrunc0",
                prefix: "10.89.41",
                dns: None,
            },
            runtimes: &[],
            path: &[],
            env: &[],
        },
    );
    let endpoint = containerd.endpoint();
    (
        Server::Containerd {
            _daemon: containerd,
        },
        endpoint,
    )
}

/// crx-cri (release build), everything under `dir`: its state, image store, socket and CNI
/// configuration.
fn start_crx_cri(dir: &Path) -> (Server, String) {
    let net = dir.join("net.d");
    BridgeNetwork {
        name: "bench-crx",
        bridge: "cxbcrx0",
        prefix: "10.89.42",
        dns: None,
    }
    .write(&net);
    let vmm = release_binary("crx-vmm").unwrap_or_else(|e| panic!("pods bench: {e}"));
    let binary = release_binary("crx-cri").unwrap_or_else(|e| panic!("pods bench: {e}"));
    let socket = dir.join("crx.sock");
    let daemon = CrxCri {
        binary: &binary,
        dir,
        socket: &socket,
        store: &dir.join("store"),
        config: &format!(
            "[runtime]\nvmm = {vmm:?}\nboot_timeout_secs = 300\n[network]\ncni_conf_dir = {net:?}\ncni_bin_dirs = [{CNI_BIN:?}]\n"
        ),
    }
    .start();
    (
        Server::CrxCri(daemon),
        format!("unix://{}", socket.display()),
    )
}

/// The PSS of `pids`, summed, in bytes (from `/proc/PID/smaps_rollup`).
fn pss(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|rollup| {
            rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .sum()
}

/// Every process: (pid, parent pid, command name).
fn processes() -> Vec<(u32, u32, String)> {
    fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let ppid = rest.split(' ').nth(1)?.parse().ok()?;
            Some((pid, ppid, name.to_owned()))
        })
        .collect()
}

/// The processes pods of `runtime` keep on the host while they idle.
fn pod_processes(runtime: &str) -> Vec<u32> {
    let all = processes();
    match runtime {
        // The VMMs and the virtiofsd each starts.
        "crx" => all
            .iter()
            .filter(|(_, _, name)| name == "crx-vmm" || name == "virtiofsd")
            .map(|(pid, _, _)| *pid)
            .collect(),
        // Each pod's shim and its children.
        _ => {
            let shims: Vec<u32> = all
                .iter()
                .filter(|(_, _, name)| name.starts_with("containerd-shim"))
                .map(|(pid, _, _)| *pid)
                .collect();
            all.iter()
                .filter(|(pid, ppid, _)| shims.contains(pid) || shims.contains(ppid))
                .map(|(pid, _, _)| *pid)
                .collect()
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Starts [`CONCURRENT`] pods at once and removes them after; the time until the last was
/// running, each pod's own time, and the PSS per idle pod.
fn concurrent_start(runtime: &Runtime) -> (Duration, Vec<Duration>, u64) {
    let started = Instant::now();
    let results: Vec<Result<(Duration, String), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CONCURRENT)
            .map(|i| scope.spawn(move || runtime.start_pod(&format!("{}-burst-{i}", runtime.name))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a pod start thread"))
            .collect()
    });
    let wall = started.elapsed();
    let (each, pods): (Vec<Duration>, Vec<String>) = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("pods bench: {e}")))
        .unzip();
    // Let the pods settle into idleness before counting their memory.
    std::thread::sleep(Duration::from_secs(5));
    let per_pod = pss(&pod_processes(runtime.name)) / CONCURRENT as u64;
    for pod in &pods {
        runtime
            .remove_pod(pod)
            .unwrap_or_else(|e| panic!("pods bench: {e}"));
    }
    (wall, each, per_pod)
}

fn main() {
    if !crx_benches::run_bench_here() {
        return;
    }
    // Sockets cannot live on the test host's 9p /tmp; containerd's overlay snapshots need a
    // file system that can be an overlay's upper layer. Short: a sandbox's socket paths must
    // fit a Unix socket address.
    let scratch = tempfile::Builder::new()
        .prefix("c")
        .tempdir_in("/run")
        .expect("a scratch dir under /run");
    let rounds: usize = std::env::var("CRX_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let crictl = std::env::var_os("CRX_CRI_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/cri-tools"))
        .join("bin/crictl");
    assert!(
        crictl.is_file(),
        "pods bench: {} is missing (cri-tools v1.32 in ../shared/cri-tools/bin)",
        crictl.display()
    );

    let registry = crx_test_support::registry_with_busybox_and_pause(scratch.path());
    let image = format!("{}/busybox:latest", registry.addr());
    let mut daemons = Vec::new();
    let mut runtimes = Vec::new();
    for name in ["crx", "runc"] {
        let dir = scratch.path().join(name);
        fs::create_dir_all(dir.join("logs")).expect("a runtime's scratch dir");
        let (daemon, endpoint) = match name {
            "crx" => start_crx_cri(&dir),
            _ => start_containerd(&dir, &registry.addr()),
        };
        daemons.push(daemon);
        let runtime = Runtime {
            name,
            endpoint,
            crictl: crictl.clone(),
            scratch: dir,
            image: image.clone(),
        };
        runtime
            .crictl(&["pull", &image])
            .unwrap_or_else(|e| panic!("pods bench: {e}"));
        // The first pod of each makes what later ones reuse (crx: the pod template;
        // containerd: the pause image), as a node's first pod does.
        let (first, pod) = runtime
            .start_pod(&format!("{name}-first"))
            .unwrap_or_else(|e| panic!("pods bench: {e}"));
        eprintln!("pods bench: {name}: first pod {:.1} ms", ms(first));
        runtime
            .remove_pod(&pod)
            .unwrap_or_else(|e| panic!("pods bench: {e}"));
        runtimes.push(runtime);
    }

    let mut samples = vec![Vec::new(), Vec::new()];
    for round in 0..rounds {
        for turn in 0..2 {
            let which = (round + turn) % 2;
            let runtime = &runtimes[which];
            let (took, pod) = runtime
                .start_pod(&format!("{}-{round}", runtime.name))
                .unwrap_or_else(|e| panic!("pods bench: {e}"));
            runtime
                .remove_pod(&pod)
                .unwrap_or_else(|e| panic!("pods bench: {e}"));
            samples[which].push(took);
        }
        eprintln!(
            "pods bench: round {}/{rounds}: crx {:.1} ms, containerd+runc {:.1} ms",
            round + 1,
            ms(samples[0][round]),
            ms(samples[1][round])
        );
    }
    let bursts: Vec<(Duration, Vec<Duration>, u64)> =
        runtimes.iter().map(concurrent_start).collect();

    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    let mut group = criterion.benchmark_group("pod_start");
    group.sampling_mode(SamplingMode::Flat);
    for (name, runtime_samples) in ["crx", "containerd_runc"].iter().zip(&samples) {
        let mut next = runtime_samples.iter().cycle();
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| *next.next().expect("samples")).sum())
        });
    }
    group.finish();

    let (crx_median, crx_p99) = median_p99(&samples[0]);
    let (runc_median, runc_p99) = median_p99(&samples[1]);
    let ratio = crx_median.as_secs_f64() / runc_median.as_secs_f64();
    println!(
        "\npods bench summary (crictl runp + create + start of busybox `sleep`, {rounds} rounds each)"
    );
    println!(
        "  crx-cri          median {:>9.1} ms  p99 {:>9.1} ms  {ratio:.2}x containerd+runc (target ≤ 2x now: {})",
        ms(crx_median),
        ms(crx_p99),
        if ratio <= 2.0 { "met" } else { "not met" }
    );
    println!(
        "  containerd+runc  median {:>9.1} ms  p99 {:>9.1} ms",
        ms(runc_median),
        ms(runc_p99)
    );
    for ((runtime, (wall, each, per_pod)), label) in runtimes
        .iter()
        .zip(&bursts)
        .zip(["crx-cri", "containerd+runc"])
    {
        let (median, p99) = median_p99(each);
        println!(
            "  {CONCURRENT} at once, {label:<15} all running after {:>9.1} ms (each: median {:.1} ms, p99 {:.1} ms); PSS per idle pod {:.1} MiB ({})",
            ms(*wall),
            ms(median),
            ms(p99),
            *per_pod as f64 / (1 << 20) as f64,
            match runtime.name {
                "crx" => "VMM + virtiofsd",
                _ => "shim + pause + container",
            }
        );
    }
    let burst_ratio = bursts[0].0.as_secs_f64() / bursts[1].0.as_secs_f64();
    println!("  {CONCURRENT} at once: {burst_ratio:.2}x containerd+runc");
    drop(daemons);
    drop(registry);
    criterion.final_summary();
}
