//! Snapshot restore latency, CRX against Firecracker in one run on the same KVM: each VMM saves
//! the default guest (1 vCPU, 128 MiB) in a loop printing on its console, then fresh VMM
//! processes restore it in interleaved rounds (`CRX_BENCH_ROUNDS`, default 21); each sample runs
//! from just before the VMM process is spawned to the restored guest's next line on its stdout
//! (see `crx_benches::snapshot`). Inside the test host only the ratio counts.
//!
//! `cargo bench -p crx-benches --bench snapshot` (needs `cargo build --release -p crx-vmm` and
//! `cargo xtask guest` first; `cargo xtask bench -- -p crx-benches --bench snapshot` does both).

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{Criterion, SamplingMode};
use crx_benches::{bench_recorded, interleaved, median_p99, Bench, Vmm};

fn main() {
    if !crx_benches::run_bench_here() {
        return;
    }
    let bench = Bench::locate().unwrap_or_else(|e| panic!("snapshot bench: {e}"));
    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));

    // A VMM that cannot save this guest is reported, and fails the run at the end.
    let mut failures = Vec::new();
    let mut saved = BTreeMap::new();
    for vmm in Vmm::selected()
        .into_iter()
        .filter(|&v| v != Vmm::CloudHypervisor)
    {
        match bench.save_ticking_guest(vmm) {
            Ok(s) => {
                saved.insert(vmm, s);
            }
            Err(e) => {
                eprintln!("snapshot bench: {} cannot save the guest: {e}", vmm.name());
                failures.push(vmm.name());
            }
        }
    }
    let vmms: Vec<Vmm> = saved.keys().copied().collect();
    let measured = interleaved(&vmms, crx_benches::rounds(21), |vmm| {
        bench.restore_once(&saved[&vmm]).map_err(|e| e.to_string())
    });
    for (vmm, e) in &measured.failed {
        eprintln!(
            "snapshot bench: {} cannot restore the guest: {e}",
            vmm.name()
        );
        failures.push(vmm.name());
    }
    let mut group = criterion.benchmark_group("restore_to_guest_running");
    group.sampling_mode(SamplingMode::Flat);
    for (vmm, samples) in &measured.samples {
        bench_recorded(&mut group, vmm.name(), samples);
    }
    group.finish();

    println!("\nsnapshot bench summary (VMM spawn → the restored guest's first console line)");
    let reference = measured
        .samples
        .get(&Vmm::Firecracker)
        .map(|s| median_p99(s).0);
    for (vmm, samples) in &measured.samples {
        let (median, p99) = median_p99(samples);
        let ratio = reference.map_or("-".to_string(), |r| {
            format!("{:.2}x firecracker", median.as_secs_f64() / r.as_secs_f64())
        });
        println!(
            "  {:<17} n={:<3} median {:>9.2} ms  p99 {:>9.2} ms  {ratio}",
            vmm.name(),
            samples.len(),
            median.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    criterion.final_summary();
    assert!(
        failures.is_empty(),
        "snapshot bench: failed for {failures:?}"
    );
}
