//! virtio device throughput, CRX against Firecracker in one run on the same KVM and the same
//! guest, the VMMs interleaved round by round (`CRX_BENCH_ROUNDS`, default 10): block
//! sequential read and write (O_DIRECT on /dev/vda), TCP from the guest to the host over a
//! tap, vsock from the guest to a host Unix socket (hybrid vsock); virtio-fs sequential read,
//! write and small-file metadata for CRX alone (Firecracker has no virtio-fs; Cloud Hypervisor,
//! the peer with one, offers only virtio-pci devices, which this PCI-less guest kernel cannot
//! see). Each sample boots a VM; the guest times its own transfer (/proc/uptime around the
//! command), so boot time does not count. Inside the test host the absolute figures are TCG's;
//! the ratios are what count.
//!
//! `cargo bench -p crx-benches --bench devices` (`cargo xtask bench -- -p crx-benches --bench
//! devices` builds what it needs first).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput};
use crx_benches::{bench_recorded, interleaved, median_p99, Bench, Devices, Vmm};

const BLOCK_MIB: usize = 16;
const NET_MIB: usize = 8;
const FS_MIB: usize = 16;
const VSOCK_MIB: usize = 32;
const VSOCK_PORT: u32 = 6000;
const TAP: &str = "crxbench0";
const HOST_IP: &str = "10.201.0.1";
const GUEST_IP: &str = "10.201.0.2";

/// Reads `elapsed=T0,T1` (the guest's /proc/uptime before and after) from the console.
fn guest_elapsed(console: &str) -> Option<Duration> {
    let (t0, t1) = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("elapsed="))?
        .split_once(',')?;
    let secs = t1.trim().parse::<f64>().ok()? - t0.trim().parse::<f64>().ok()?;
    Some(Duration::from_secs_f64(secs.max(0.001)))
}

fn timed(command: &str) -> String {
    // No timing at all when the command fails, so a failed transfer cannot pass as a fast one.
    format!("t0=$(cut -d' ' -f1 /proc/uptime); {command} && t1=$(cut -d' ' -f1 /proc/uptime) && echo elapsed=$t0,$t1")
}

/// A persistent tap with the host end addressed and up, removed when dropped.
struct BenchTap;

impl BenchTap {
    fn create() -> BenchTap {
        let _ = Command::new("ip").args(["link", "del", TAP]).status();
        for args in [
            vec!["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"],
            vec!["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP],
            vec!["link", "set", TAP, "up"],
        ] {
            let ok = Command::new("ip")
                .args(&args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "devices bench: ip {args:?} failed");
        }
        BenchTap
    }
}

impl Drop for BenchTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", TAP]).status();
    }
}

struct Workload {
    name: &'static str,
    mib: usize,
    devices: Devices,
    script: String,
}

fn main() {
    if !crx_benches::run_bench_here() {
        return;
    }
    let bench = Bench::locate().unwrap_or_else(|e| panic!("devices bench: {e}"));
    let scratch = tempfile::tempdir().expect("scratch dir");
    let disk = scratch.path().join("disk.raw");
    std::fs::write(&disk, vec![0x5a; BLOCK_MIB << 20]).expect("disk image");
    let _tap = BenchTap::create();
    let listener = TcpListener::bind((HOST_IP, 5000)).expect("host listener on the tap");
    std::thread::spawn(move || {
        // Each guest upload: read it all, then close so the guest's nc ends.
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = NET_MIB << 20;
            while left > 0 {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        }
    });

    // Unix sockets cannot live on the test host's 9p /tmp: the vsock sockets go to /dev/shm.
    let sockets = tempfile::tempdir_in("/dev/shm").expect("socket dir");
    let uds = sockets.path().join("v.sock");
    let sink =
        UnixListener::bind(format!("{}_{VSOCK_PORT}", uds.display())).expect("host vsock listener");
    std::thread::spawn(move || {
        // Each guest stream: read it to its end.
        for stream in sink.incoming().flatten() {
            let _ = std::io::copy(&mut { stream }, &mut std::io::sink());
        }
    });

    let with_disk = Devices {
        disk: Some(disk.clone()),
        ..Devices::default()
    };
    let share = scratch.path().join("share");
    std::fs::create_dir_all(&share).expect("share dir");
    std::fs::write(share.join("big"), vec![0xa5; FS_MIB << 20]).expect("shared file");
    let with_share = Devices {
        share: Some(share),
        ..Devices::default()
    };
    let mount = "mkdir -p /mnt && mount -t virtiofs share /mnt";
    let workloads = [
        Workload {
            name: "block_read",
            mib: BLOCK_MIB,
            devices: with_disk.clone(),
            script: timed(&format!("dd if=/dev/vda of=/dev/null bs=1M count={BLOCK_MIB} iflag=direct 2>/dev/null")),
        },
        Workload {
            name: "block_write",
            mib: BLOCK_MIB,
            devices: with_disk,
            script: timed(&format!("dd if=/dev/zero of=/dev/vda bs=1M count={BLOCK_MIB} oflag=direct 2>/dev/null; sync")),
        },
        Workload {
            name: "net_tcp_guest_to_host",
            mib: NET_MIB,
            devices: Devices {
                tap: Some(TAP.to_string()),
                ..Devices::default()
            },
            script: format!(
                "ip link set eth0 up; ip addr add {GUEST_IP}/24 dev eth0; ping -c 1 -W 5 {HOST_IP} >/dev/null; {}",
                timed(&format!("dd if=/dev/zero bs=1M count={NET_MIB} 2>/dev/null | nc {HOST_IP} 5000"))
            ),
        },
        Workload {
            name: "vsock_guest_to_host",
            mib: VSOCK_MIB,
            devices: Devices {
                vsock: Some(uds),
                ..Devices::default()
            },
            script: timed(&format!("crx-vsock send-zeros {VSOCK_PORT} {}", VSOCK_MIB << 20)),
        },
        Workload {
            name: "fs_read",
            mib: FS_MIB,
            devices: with_share.clone(),
            script: format!("{mount}; {}", timed("cat /mnt/big > /dev/null")),
        },
        Workload {
            name: "fs_write",
            mib: FS_MIB,
            devices: with_share.clone(),
            script: format!(
                "{mount}; {}",
                timed(&format!("dd if=/dev/zero of=/mnt/out bs=1M count={FS_MIB} 2>/dev/null; sync"))
            ),
        },
        Workload {
            name: "fs_metadata_1000_files",
            mib: 0,
            devices: with_share,
            script: format!(
                "{mount}; mkdir -p /mnt/m; {}",
                timed("for i in $(seq 1000); do echo x > /mnt/m/f$i; done; ls -l /mnt/m > /dev/null; rm -r /mnt/m")
            ),
        },
    ];

    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    let vmms: Vec<Vmm> = Vmm::selected()
        .into_iter()
        .filter(|v| *v != Vmm::CloudHypervisor)
        .collect();
    let rounds = crx_benches::rounds(10);
    let mut results: BTreeMap<(&str, &str), Vec<Duration>> = BTreeMap::new();
    let mut failures = Vec::new();
    for workload in &workloads {
        let supported: Vec<Vmm> = vmms
            .iter()
            .copied()
            .filter(|v| workload.devices.supported_by(*v))
            .collect();
        let measured = interleaved(&supported, rounds, |vmm| {
            let console = bench
                .run_workload(vmm, &workload.devices, &workload.script)
                .map_err(|e| e.to_string())?;
            guest_elapsed(&console).ok_or_else(|| format!("no timing in the console:\n{console}"))
        });
        for (vmm, e) in measured.failed {
            eprintln!("devices bench: {} {}: {e}", vmm.name(), workload.name);
            failures.push((vmm.name(), workload.name));
        }
        // Criterion analyses the recorded samples (each one a VM's guest-timed transfer).
        let mut group = criterion.benchmark_group(workload.name);
        group.sampling_mode(SamplingMode::Flat);
        if workload.mib > 0 {
            group.throughput(Throughput::Bytes((workload.mib << 20) as u64));
        }
        for (vmm, samples) in measured.samples {
            bench_recorded(&mut group, vmm.name(), &samples);
            results.insert((workload.name, vmm.name()), samples);
        }
        group.finish();
    }

    println!("\ndevices bench summary (guest-timed; MiB/s or ms at the median)");
    for workload in &workloads {
        let reference = results
            .get(&(workload.name, "firecracker"))
            .map(|s| median_p99(s).0);
        for &vmm in &vmms {
            let Some(samples) = results.get(&(workload.name, vmm.name())) else {
                continue;
            };
            let (median, _) = median_p99(samples);
            let rate = if workload.mib > 0 {
                format!("{:>8.1} MiB/s", workload.mib as f64 / median.as_secs_f64())
            } else {
                format!("{:>8.1} ms", median.as_secs_f64() * 1e3)
            };
            let ratio = reference.map_or("-".into(), |r| {
                format!(
                    "{:.2}x firecracker's rate",
                    r.as_secs_f64() / median.as_secs_f64()
                )
            });
            println!(
                "  {:<22} {:<12} n={:<3} {rate}  {ratio}",
                workload.name,
                vmm.name(),
                samples.len()
            );
        }
    }
    criterion.final_summary();
    assert!(
        failures.is_empty(),
        "devices bench: failed for {failures:?}"
    );
}
