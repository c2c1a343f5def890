//! Boot latency and VMM memory, CRX against Firecracker and Cloud Hypervisor, in one run on the
//! same KVM (inside the test host where this host's /dev/kvm is PVM; ratios are what count there).
//! The VMMs boot in interleaved rounds (`CRX_BENCH_ROUNDS`, default 11).
//!
//! `cargo bench -p crx-benches --bench boot` (needs `cargo build --release -p crx -p crx-vmm` and
//! `cargo xtask guest` first; `cargo xtask bench` does both).

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{Criterion, SamplingMode};
use crx_benches::{bench_recorded, interleaved, median_p99, Bench, Vmm};

fn main() {
    if !crx_benches::run_bench_here() {
        return;
    }
    let bench = Bench::locate().unwrap_or_else(|e| panic!("boot bench: {e}"));
    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));

    let vmms = Vmm::selected();
    let mut first_instruction = Vec::new();
    let mut failures = Vec::new();
    // Each VMM boots the guest once per round, the VMMs interleaved, as separate processes.
    let measured = interleaved(&vmms, crx_benches::rounds(11), |vmm| {
        let sample = bench.boot_once(vmm).map_err(|e| e.to_string())?;
        first_instruction.extend(sample.first_instruction);
        Ok(sample.guest_init)
    });
    for (vmm, e) in &measured.failed {
        eprintln!("boot bench: {} cannot boot the guest: {e}", vmm.name());
        failures.push(vmm.name());
    }
    let mut group = criterion.benchmark_group("launch_to_guest_init");
    group.sampling_mode(SamplingMode::Flat);
    for (vmm, samples) in &measured.samples {
        bench_recorded(&mut group, vmm.name(), samples);
    }
    group.finish();
    let init: BTreeMap<&str, &Vec<Duration>> = measured
        .samples
        .iter()
        .map(|(vmm, samples)| (vmm.name(), samples))
        .collect();

    println!("\nboot bench summary (launch → guest init, as each VMM reports it)");
    let reference = init.get("firecracker").map(|s| median_p99(s).0);
    for (name, samples) in &init {
        let (median, p99) = median_p99(samples);
        let ratio = reference.map_or("-".to_string(), |r| {
            format!("{:.2}x firecracker", median.as_secs_f64() / r.as_secs_f64())
        });
        println!(
            "  {name:<17} n={:<3} median {:>9.2} ms  p99 {:>9.2} ms  {ratio}",
            samples.len(),
            ms(median),
            ms(p99)
        );
    }
    if !first_instruction.is_empty() {
        let (median, p99) = median_p99(&first_instruction);
        println!(
            "  crx launch → first guest instruction: median {:.2} ms, p99 {:.2} ms",
            ms(median),
            ms(p99)
        );
    }
    println!("VMM overhead memory (RSS minus guest RAM, 1 vCPU, 128 MiB)");
    for &vmm in &vmms {
        match bench.overhead_rss_kib(vmm) {
            Ok(kib) => println!("  {:<17} {:.2} MiB", vmm.name(), kib as f64 / 1024.0),
            Err(e) => {
                eprintln!("boot bench: memory of {}: {e}", vmm.name());
                failures.push(vmm.name());
            }
        }
    }
    criterion.final_summary();
    assert!(failures.is_empty(), "boot bench: failed for {failures:?}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
