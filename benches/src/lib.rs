//! Bench support: boots the same kernel and initrd under CRX, Firecracker and Cloud Hypervisor
//! (each as its own process, started the way `../shared/peers/README.md` says), reads each
//! VMM's own boot-time report, and measures VMM memory overhead the way Firecracker's memory
//! test counts it; [`snapshot`] saves and restores a guest under CRX and Firecracker.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crx_core::builder::{default_guest_dir, DEFAULT_CMDLINE};

pub mod snapshot;

/// For a bench binary's `main`: true when guests run on this host's KVM (go on here). Otherwise
/// re-runs this very bench binary, with its arguments, inside the shared KVM test host, streams
/// its output, exits with its status if it failed, and returns false.
pub fn run_bench_here() -> bool {
    match crx_testhost::guests_run_here() {
        Ok(true) => return true,
        Ok(false) => {}
        Err(e) => panic!("bench cannot run: {e}"),
    }
    if std::env::var_os(crx_testhost::IN_TESTHOST).is_some() {
        panic!("bench: inside the test host, yet its /dev/kvm is not standard KVM");
    }
    eprintln!("bench: this host's /dev/kvm is PVM; running inside the KVM test host (QEMU TCG + kvm_amd), where only ratios between VMMs are meaningful");
    let exe = std::env::current_exe().expect("the bench binary's path");
    let mut argv = vec![exe.into_os_string()];
    argv.extend(std::env::args_os().skip(1));
    let cwd = std::env::current_dir().expect("a working directory");
    let invocation = crx_testhost::Invocation::new(argv)
        .cwd(cwd)
        .env(crx_testhost::IN_TESTHOST, "1")
        .envs(std::env::vars_os().filter(|(k, _)| {
            let k = k.to_string_lossy();
            k.starts_with("CRX_") || k.starts_with("CARGO_") || k.starts_with("RUST_")
        }));
    let host = crx_testhost::TestHost::shared()
        .unwrap_or_else(|e| panic!("bench needs the KVM test host: {e}"));
    let status = host
        .run_streaming(&invocation)
        .unwrap_or_else(|e| panic!("bench could not run in the test host: {e}"));
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    false
}

/// Guest RAM for every boot.
pub const MEM_MIB: u32 = 128;
/// The longest a boot may take before the bench calls it failed.
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

/// Why a bench boot failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0} is missing: {1}")]
    Missing(PathBuf, &'static str),
    #[error("cannot start {vmm}: {source}")]
    Spawn {
        vmm: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{vmm}: {detail}")]
    Boot { vmm: &'static str, detail: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A VMM under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Vmm {
    Crx,
    Firecracker,
    CloudHypervisor,
}

impl Vmm {
    pub const ALL: [Vmm; 3] = [Vmm::Crx, Vmm::Firecracker, Vmm::CloudHypervisor];

    /// The VMMs this run measures: `CRX_BENCH_VMMS` (comma-separated names), else all of them —
    /// except in the test host, where Cloud Hypervisor's boot of this guest wedges the emulated
    /// L1 (both L1 CPUs in soft lockup, seen twice), so it is left out there unless asked for.
    pub fn selected() -> Vec<Vmm> {
        if let Ok(names) = std::env::var("CRX_BENCH_VMMS") {
            return names
                .split(',')
                .map(|name| {
                    Vmm::ALL
                        .into_iter()
                        .find(|v| v.name() == name.trim())
                        .unwrap_or_else(|| panic!("CRX_BENCH_VMMS: unknown VMM {name:?}"))
                })
                .collect();
        }
        if std::env::var_os(crx_testhost::IN_TESTHOST).is_some() {
            eprintln!(
                "bench: cloud-hypervisor is not run in the test host (its boot of this guest hangs \
                 the emulated L1); set CRX_BENCH_VMMS=crx,firecracker,cloud-hypervisor to try"
            );
            return vec![Vmm::Crx, Vmm::Firecracker];
        }
        Vmm::ALL.to_vec()
    }

    pub fn name(self) -> &'static str {
        match self {
            Vmm::Crx => "crx",
            Vmm::Firecracker => "firecracker",
            Vmm::CloudHypervisor => "cloud-hypervisor",
        }
    }
}

/// The workspace root (benches/..).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

/// Binaries, guest and scratch space for one bench run.
pub struct Bench {
    crx: PathBuf,
    peers: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    scratch: tempfile::TempDir,
}

/// One boot's figures, each as the VMM itself reports it (time since the VMM started).
/// Host backends for a workload's virtio devices, attached the same way under every VMM.
#[derive(Clone, Debug, Default)]
pub struct Devices {
    /// A raw disk image (the guest's /dev/vda).
    pub disk: Option<PathBuf>,
    /// A tap interface by name (the guest's eth0), already up on the host.
    pub tap: Option<String>,
    /// A directory shared over virtio-fs with the tag `share`.
    pub share: Option<PathBuf>,
    /// A hybrid vsock device (guest CID 3) on this Unix socket path; guest connections to host
    /// port P reach `<path>_P`.
    pub vsock: Option<PathBuf>,
}

/// The guest's vsock context ID in the benches.
pub const GUEST_CID: u32 = 3;

impl Devices {
    /// Whether `vmm` can attach these devices (Firecracker has no virtio-fs).
    pub fn supported_by(&self, vmm: Vmm) -> bool {
        !(self.share.is_some() && vmm == Vmm::Firecracker)
    }
}

/// The guest's MAC on a bench tap.
pub const GUEST_MAC: &str = "02:c7:00:00:00:01";

#[derive(Clone, Copy, Debug)]
pub struct BootSample {
    pub guest_init: Duration,
    /// CRX only: launch → the boot vCPU's first KVM_RUN.
    pub first_instruction: Option<Duration>,
}

/// The bench guest's kernel command line, with init arguments `init_args`.
fn cmdline(init_args: &str) -> String {
    if init_args.is_empty() {
        DEFAULT_CMDLINE.to_string()
    } else {
        format!("{DEFAULT_CMDLINE} -- {init_args}")
    }
}

fn require(path: PathBuf, what: &'static str) -> Result<PathBuf, BenchError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(BenchError::Missing(path, what))
    }
}

/// A release binary of this workspace (`crx`, `crx-vmm`), as `cargo xtask bench` builds them.
pub fn release_binary(name: &str) -> Result<PathBuf, BenchError> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    require(
        target.join("release").join(name),
        "build it with `cargo build --release -p crx -p crx-vmm -p crx-cri` (`cargo xtask bench` does)",
    )
}

impl Bench {
    /// Finds the release `crx-vmm`, the peers and the default guest; fails naming what is
    /// missing.
    pub fn locate() -> Result<Bench, BenchError> {
        let peers = std::env::var_os("CRX_PEERS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("../shared/peers"));
        let guest = default_guest_dir();
        Ok(Bench {
            // The per-VM process itself, as an orchestrator starts it (`crx boot` execs it).
            crx: release_binary("crx-vmm")?,
            peers: require(peers, "the peer VMMs live in ../shared/peers")?,
            kernel: require(guest.join("vmlinux"), "run `cargo xtask guest`")?,
            initrd: require(guest.join("initrd.cpio"), "run `cargo xtask guest`")?,
            scratch: tempfile::tempdir()?,
        })
    }

    fn peer(&self, name: &'static str) -> Result<PathBuf, BenchError> {
        require(
            self.peers.join(name),
            "a peer VMM binary from ../shared/peers",
        )
    }

    /// Writes Firecracker's configuration for the bench guest with `cmdline` and `devices`
    /// (logging to `fc.log` in the scratch directory, emptied); returns its path.
    fn firecracker_config(&self, cmdline: &str, devices: &Devices) -> Result<PathBuf, BenchError> {
        let dir = self.scratch.path();
        let log = dir.join("fc.log");
        let _ = std::fs::remove_file(&log);
        std::fs::write(&log, b"")?;
        let config = format!(
            r#"{{"boot-source": {{"kernel_image_path": {k:?}, "initrd_path": {i:?}, "boot_args": {c:?}}},
                "drives": [{drives}],
                "network-interfaces": [{nets}],{vsock}
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": {MEM_MIB}}},
                "logger": {{"log_path": {l:?}, "level": "Info"}}}}"#,
            k = self.kernel,
            i = self.initrd,
            c = cmdline,
            l = log,
            drives = devices.disk.as_ref().map_or(String::new(), |d| format!(
                r#"{{"drive_id": "vda", "path_on_host": {d:?}, "is_root_device": false, "is_read_only": false}}"#
            )),
            nets = devices.tap.as_ref().map_or(String::new(), |t| format!(
                r#"{{"iface_id": "eth0", "host_dev_name": {t:?}, "guest_mac": "{GUEST_MAC}"}}"#
            )),
            vsock = devices.vsock.as_ref().map_or(String::new(), |u| format!(
                r#" "vsock": {{"guest_cid": {GUEST_CID}, "uds_path": {u:?}}},"#
            )),
        );
        let config_path = dir.join("vm.json");
        std::fs::write(&config_path, config)?;
        Ok(config_path)
    }

    /// The command that boots the bench guest under `vmm` with init arguments `init_args`.
    fn command(&self, vmm: Vmm, init_args: &str, devices: &Devices) -> Result<Command, BenchError> {
        let cmdline = cmdline(init_args);
        let dir = self.scratch.path();
        if let Some(uds) = &devices.vsock {
            // A VMM binds it afresh (Firecracker refuses an existing path).
            let _ = std::fs::remove_file(uds);
        }
        let mut cmd = match vmm {
            Vmm::Crx => {
                let mut cmd = Command::new(&self.crx);
                cmd.arg("--kernel")
                    .arg(&self.kernel)
                    .arg("--initrd")
                    .arg(&self.initrd)
                    .arg("--cmdline")
                    .arg(&cmdline)
                    .arg("--mem-mib")
                    .arg(MEM_MIB.to_string());
                if let Some(disk) = &devices.disk {
                    cmd.arg("--disk").arg(disk);
                }
                if let Some(tap) = &devices.tap {
                    cmd.arg("--net").arg(format!("{tap},mac={GUEST_MAC}"));
                }
                if let Some(dir) = &devices.share {
                    cmd.arg("--fs").arg(format!("share={}", dir.display()));
                }
                if let Some(uds) = &devices.vsock {
                    cmd.arg("--vsock")
                        .arg(format!("{GUEST_CID},{}", uds.display()));
                }
                cmd
            }
            Vmm::Firecracker => {
                let config_path = self.firecracker_config(&cmdline, devices)?;
                let mut cmd = Command::new(self.peer("firecracker")?);
                cmd.args(["--no-api", "--no-seccomp", "--boot-timer", "--config-file"])
                    .arg(config_path);
                cmd
            }
            Vmm::CloudHypervisor => {
                let log = dir.join("ch.log");
                let _ = std::fs::remove_file(&log);
                let mut cmd = Command::new(self.peer("cloud-hypervisor")?);
                cmd.arg("--kernel")
                    .arg(&self.kernel)
                    .arg("--initramfs")
                    .arg(&self.initrd)
                    .arg("--cmdline")
                    .arg(&cmdline)
                    .args(["--cpus", "boot=1", "--memory"])
                    .arg(format!("size={MEM_MIB}M"))
                    .args(["--serial", "tty", "--console", "off", "--log-file"])
                    .arg(log)
                    .arg("-vv");
                cmd
            }
        };
        cmd.current_dir(dir).stdin(Stdio::null());
        Ok(cmd)
    }

    /// Boots the default guest once under `vmm` and returns its own boot-time report.
    pub fn boot_once(&self, vmm: Vmm) -> Result<BootSample, BenchError> {
        let mut cmd = self.command(vmm, "", &Devices::default())?;
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|source| BenchError::Spawn {
            vmm: vmm.name(),
            source,
        })?;
        let failed = |detail: String| BenchError::Boot {
            vmm: vmm.name(),
            detail,
        };
        match vmm {
            Vmm::Crx => {
                let output = wait_with_deadline(child, vmm)?;
                let stderr = String::from_utf8_lossy(&output.stderr);
                let guest_init = parse_ms_after(&stderr, "boot time ")
                    .ok_or_else(|| failed(format!("no boot time reported: {stderr}")))?;
                Ok(BootSample {
                    guest_init,
                    first_instruction: parse_ms_after(&stderr, "VMM setup "),
                })
            }
            Vmm::Firecracker => {
                let output = wait_with_deadline(child, vmm)?;
                let log = std::fs::read_to_string(self.scratch.path().join("fc.log"))?;
                let us = log
                    .lines()
                    .find_map(|l| l.split("Guest-boot-time =").nth(1))
                    .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                    .ok_or_else(|| {
                        failed(format!(
                            "no Guest-boot-time in its log (exit {:?}): {log}",
                            output.status
                        ))
                    })?;
                Ok(BootSample {
                    guest_init: Duration::from_micros(us),
                    first_instruction: None,
                })
            }
            Vmm::CloudHypervisor => {
                let log = self.scratch.path().join("ch.log");
                let found = poll_until(child, vmm, || {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    text.lines()
                        .find(|l| l.contains("Kernel code 0x41"))
                        .and_then(parse_ch_debug_port_seconds)
                })?;
                Ok(BootSample {
                    guest_init: found,
                    first_instruction: None,
                })
            }
        }
    }

    /// Boots under `vmm` with `devices`, runs `script` with the guest's /bin/sh (no double quotes
    /// in it: it travels on the kernel command line) and returns the guest console's output.
    /// Only VMMs that exit when the guest does (CRX, Firecracker) run workloads.
    pub fn run_workload(
        &self,
        vmm: Vmm,
        devices: &Devices,
        script: &str,
    ) -> Result<String, BenchError> {
        let mut cmd = self.command(vmm, &format!("/bin/sh -c \"{script}\""), devices)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|source| BenchError::Spawn {
            vmm: vmm.name(),
            source,
        })?;
        let output = wait_with_deadline(child, vmm)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// VMM overhead memory in KiB: the RSS of every mapping of the VMM process except guest RAM,
    /// taken once the guest's init is running.
    pub fn overhead_rss_kib(&self, vmm: Vmm) -> Result<u64, BenchError> {
        let mut cmd = self.command(
            vmm,
            "/bin/sh -c \"echo measure-now; sleep 30\"",
            &Devices::default(),
        )?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|source| BenchError::Spawn {
            vmm: vmm.name(),
            source,
        })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let started = Instant::now();
        let mut seen = false;
        for line in BufReader::new(stdout).lines() {
            if line?.contains("measure-now") {
                seen = true;
                break;
            }
            if started.elapsed() > BOOT_DEADLINE {
                break;
            }
        }
        let result = if seen {
            smaps_overhead_kib(child.id(), u64::from(MEM_MIB) * 1024)
        } else {
            Err(BenchError::Boot {
                vmm: vmm.name(),
                detail: "the guest never said measure-now".into(),
            })
        };
        let _ = child.kill();
        let _ = child.wait();
        result
    }
}

fn wait_with_deadline(child: Child, vmm: Vmm) -> Result<std::process::Output, BenchError> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(BOOT_DEADLINE) {
        Ok(output) => Ok(output?),
        Err(_) => {
            // SAFETY: kill(2) on the child's pid; it is still our unreaped child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            Err(BenchError::Boot {
                vmm: vmm.name(),
                detail: format!("no exit within {BOOT_DEADLINE:?}"),
            })
        }
    }
}

/// Polls `probe` until it answers, then kills the child (a VMM that does not exit by itself).
fn poll_until(
    mut child: Child,
    vmm: Vmm,
    mut probe: impl FnMut() -> Option<Duration>,
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    let result = loop {
        if let Some(found) = probe() {
            break Ok(found);
        }
        if let Some(status) = child.try_wait()? {
            break probe().ok_or_else(|| BenchError::Boot {
                vmm: vmm.name(),
                detail: format!("exited with {status} before the guest's init ran"),
            });
        }
        if started.elapsed() > BOOT_DEADLINE {
            break Err(BenchError::Boot {
                vmm: vmm.name(),
                detail: format!("no boot report within {BOOT_DEADLINE:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// `… boot time 12.3 ms …` → 12.3 ms.
fn parse_ms_after(text: &str, label: &str) -> Option<Duration> {
    let rest = text.split(label).nth(1)?;
    let ms: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64(ms / 1e3))
}

/// Cloud Hypervisor's debug-port line ends with `… 0.123456 seconds`.
fn parse_ch_debug_port_seconds(line: &str) -> Option<Duration> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "seconds")?;
    let secs: f64 = words.get(at.checked_sub(1)?)?.parse().ok()?;
    Some(Duration::from_secs_f64(secs))
}

/// Sums `Rss:` over the mappings of `pid` whose size is not the guest RAM size.
fn smaps_overhead_kib(pid: u32, guest_ram_kib: u64) -> Result<u64, BenchError> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut total = 0;
    let mut skip = false;
    for line in smaps.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            skip = parse_kib(size) == Some(guest_ram_kib);
        } else if let Some(rss) = line.strip_prefix("Rss:") {
            if !skip {
                total += parse_kib(rss).unwrap_or(0);
            }
        }
    }
    Ok(total)
}

fn parse_kib(field: &str) -> Option<u64> {
    field.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The rounds a bench runs: `CRX_BENCH_ROUNDS`, else `default`.
pub fn rounds(default: usize) -> usize {
    std::env::var("CRX_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// What [`interleaved`] measured: each subject's samples, and the subjects that failed (why).
pub struct Measured<K> {
    pub samples: BTreeMap<K, Vec<Duration>>,
    pub failed: Vec<(K, String)>,
}

/// Measures every subject once per round, the subjects interleaved in alternating order, so a
/// change in the host's load falls on all of them alike. A subject that fails once is dropped.
pub fn interleaved<K: Copy + Ord>(
    subjects: &[K],
    rounds: usize,
    mut measure: impl FnMut(K) -> Result<Duration, String>,
) -> Measured<K> {
    let mut running = subjects.to_vec();
    let mut measured = Measured {
        samples: BTreeMap::new(),
        failed: Vec::new(),
    };
    for round in 0..rounds {
        let mut order = running.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for subject in order {
            match measure(subject) {
                Ok(sample) => measured.samples.entry(subject).or_default().push(sample),
                Err(e) => {
                    measured.failed.push((subject, e));
                    running.retain(|s| *s != subject);
                }
            }
        }
    }
    for (subject, _) in &measured.failed {
        measured.samples.remove(subject);
    }
    measured
}

/// Hands recorded samples to criterion for its analysis, as one benchmark of `group`.
pub fn bench_recorded(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    samples: &[Duration],
) {
    let mut next = samples.iter().cycle();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| (0..iters).map(|_| *next.next().expect("samples")).sum())
    });
}

/// Median and 99th percentile of `samples`.
pub fn median_p99(samples: &[Duration]) -> (Duration, Duration) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_vmms_report() {
        let crx = "crx: guest command exited with status 0; boot time 41.5 ms (launch → guest init), VMM setup 3.2 ms (…)";
        assert_eq!(
            parse_ms_after(crx, "boot time "),
            Some(Duration::from_micros(41_500))
        );
        assert_eq!(
            parse_ms_after(crx, "VMM setup "),
            Some(Duration::from_micros(3_200))
        );
        let ch = "cloud-hypervisor: 1.2s: <vcpu0> INFO:devices/src/legacy/debug_port.rs:74 -- [Debug I/O port: Kernel code 0x41] 0.250000 seconds";
        assert_eq!(
            parse_ch_debug_port_seconds(ch),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_kib("   4404 kB"), Some(4404));
    }

    #[test]
    fn median_and_p99() {
        let s: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(
            median_p99(&s),
            (Duration::from_millis(6), Duration::from_millis(10))
        );
    }
}
