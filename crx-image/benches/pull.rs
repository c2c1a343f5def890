//! Pull + unpack of a ~100 MB multi-layer image from a local `docker-registry`: crx (in a
//! child process, so its peak RSS is its own) against `skopeo copy` + `umoci unpack` of the
//! same image, in the same run. Prints both medians, the ratio and crx's peak RSS.

use crx_test_support as support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::Criterion;
use crx_image::{LogProgress, RegistryConfig, Store};
use support::layout::{random_bytes, Comp, Layer, Layout};
use support::Registry;

const CHILD_ROOT: &str = "CRX_BENCH_CHILD_ROOT";
const CHILD_REF: &str = "CRX_BENCH_CHILD_REF";

/// Child mode: pull once into a fresh store and print `VmHWM` (kB).
fn child(root: &str, reference: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Store::open(root, RegistryConfig::default()).unwrap();
    rt.block_on(store.pull(reference, &LogProgress)).unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim();
    println!("{hwm}");
}

/// ~100 MB over 5 layers: busybox, incompressible and compressible data, gzip only (Debian's umoci 0.4.7 cannot unpack zstd layers).
fn build_image(dir: &Path, reg: &Registry) {
    let text: Vec<u8> = (0..30u32 << 20)
        .map(|i| b"crx pulls images fast. "[(i % 23) as usize] ^ ((i >> 20) as u8 & 1))
        .collect();
    let mut layout = Layout::new(dir);
    let m = layout.image(
        &[
            Layer::busybox(),
            Layer::files(
                &[("data/random-a.bin", &random_bytes(30 << 20, 1))],
                Comp::Gzip,
            ),
            Layer::files(&[("data/text.txt", &text)], Comp::Gzip),
            Layer::files(
                &[
                    ("data/random-b.bin", &random_bytes(20 << 20, 2)),
                    ("data/small", b"x"),
                ],
                Comp::Gzip,
            ),
            Layer::files(
                &[("data/random-c.bin", &random_bytes(20 << 20, 3))],
                Comp::Gzip,
            ),
        ],
        "amd64",
    );
    layout.tag(m, "v1");
    reg.push(dir, "v1", "bench/big", None);
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if let (Ok(root), Ok(reference)) = (std::env::var(CHILD_ROOT), std::env::var(CHILD_REF)) {
        return child(&root, &reference);
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    build_image(&tmp.path().join("layout"), &reg);
    let reference = format!("{}/bench/big:v1", reg.addr());
    let work = tmp.path().join("work");

    let mut crx_times = Vec::new();
    let mut peak_kb = 0u64;
    let mut peer_times = Vec::new();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20))
        .configure_from_args();
    let mut group = c.benchmark_group("pull+unpack ~100MB");
    group.bench_function("crx", |b| {
        b.iter(|| {
            let _ = std::fs::remove_dir_all(&work);
            let start = Instant::now();
            let out = run(Command::new(std::env::current_exe().unwrap())
                .env(CHILD_ROOT, &work)
                .env(CHILD_REF, &reference));
            crx_times.push(start.elapsed());
            peak_kb = peak_kb.max(out.trim().parse().unwrap());
        })
    });
    group.bench_function("skopeo+umoci", |b| {
        b.iter(|| {
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).unwrap();
            let start = Instant::now();
            let oci = work.join("oci");
            run(Command::new("skopeo")
                .args(["copy", "--quiet", "--src-tls-verify=false"])
                .arg(format!("docker://{reference}"))
                .arg(format!("oci:{}:v1", oci.display())));
            run(Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:v1", oci.display()))
                .arg(work.join("bundle")));
            peer_times.push(start.elapsed());
        })
    });
    group.finish();
    c.final_summary();
    let (crx, peer) = (median(&mut crx_times), median(&mut peer_times));
    println!(
        "crx pull+unpack median:          {:.3} s",
        crx.as_secs_f64()
    );
    println!(
        "skopeo copy + umoci unpack median: {:.3} s",
        peer.as_secs_f64()
    );
    println!(
        "ratio crx / (skopeo+umoci):      {:.2}x (target <= 1.0x)",
        crx.as_secs_f64() / peer.as_secs_f64()
    );
    println!(
        "crx peak RSS (VmHWM):            {:.1} MiB (target <= 50 MiB)",
        peak_kb as f64 / 1024.0
    );
}
