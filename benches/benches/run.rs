//! `crx run busybox -- true` end to end (launch → the exit code back), restored from the pod
//! template (made once before the rounds) and booted cold (`--cold`), against `runc run` of an
//! OCI bundle of the same busybox image (Debian's runc, the bundle unpacked by umoci, its
//! config from `runc spec` running `true` without a terminal), interleaved round by round in
//! rotating order (`CRX_BENCH_ROUNDS`, default 20), in the same place: inside the test host
//! where this host's /dev/kvm is PVM (runc runs there too, so the comparison is like for like;
//! only the ratio counts there). Then, in detached pods: the agent's start → listening time (its
//! Hello reply) and its resident memory (its stats reply).
//!
//! `cargo bench -p crx-benches --bench run` (`cargo xtask bench -- -p crx-benches --bench run`
//! builds the release `crx` and `crx-vmm` first).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use crx_benches::{median_p99, release_binary, workspace_root};
use crx_runtime::sandbox::Sandbox;

/// What `crx run` should reach the bundled image by once it is imported.
const IMAGE: &str = "busybox";
/// How long one boot may take before the bench calls it failed (the test host is slow).
const DEADLINE: Duration = Duration::from_secs(300);

/// A scratch image store, run root, runc state root and bundle, removed when dropped.
struct Setup {
    scratch: tempfile::TempDir,
    crx: PathBuf,
}

impl Setup {
    fn prepare() -> Setup {
        require_tool(
            "runc",
            "apt-get install runc (setup/apt-packages.txt lists it)",
        );
        require_tool(
            "umoci",
            "apt-get install umoci (setup/apt-packages.txt lists it)",
        );
        // Sockets (the VM's vsock, virtiofsd's) cannot live on the test host's 9p /tmp.
        let scratch = tempfile::tempdir_in("/run").expect("a scratch dir under /run");
        let setup = Setup {
            scratch,
            crx: release_binary("crx").unwrap_or_else(|e| panic!("run bench: {e}")),
        };
        let layout = setup.path("busybox");
        run_ok(
            Command::new(workspace_root().join("images/build-busybox.sh")).arg(&layout),
            "images/build-busybox.sh",
        );
        run_ok(
            &mut setup.crx(&["image", "import", &layout.display().to_string()]),
            "crx image import",
        );
        let bundle = setup.bundle();
        run_ok(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:latest", layout.display()))
                .arg(&bundle),
            "umoci unpack",
        );
        std::fs::remove_file(bundle.join("config.json")).expect("umoci's config.json");
        run_ok(
            Command::new("runc").args(["spec", "--bundle"]).arg(&bundle),
            "runc spec",
        );
        let config_path = bundle.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config_path).expect("runc's config.json"))
                .expect("runc's config.json is JSON");
        config["process"]["args"] = serde_json::json!(["true"]);
        config["process"]["terminal"] = serde_json::json!(false);
        std::fs::write(&config_path, config.to_string()).expect("writing config.json");
        setup
    }

    fn path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    fn bundle(&self) -> PathBuf {
        self.path("bundle")
    }

    fn run_root(&self) -> PathBuf {
        self.path("run")
    }

    fn crx(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.crx);
        cmd.args(args)
            .env("CRX_ROOT", self.path("store"))
            .env("CRX_RUN_ROOT", self.run_root())
            .stdin(Stdio::null());
        cmd
    }

    /// `crx run busybox -- true` (restored from the pod template, or `--cold`): launch → exit
    /// code back.
    fn crx_run(&self, cold: bool) -> Result<Duration, String> {
        let mut args = vec!["run"];
        if cold {
            args.push("--cold");
        }
        args.extend([IMAGE, "--", "true"]);
        timed(self.crx(&args))
    }

    /// `runc run` of the bundle (it deletes the container when it exits).
    fn runc_run(&self, round: usize) -> Result<Duration, String> {
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(self.path("runc"))
            .args(["run", "--bundle"])
            .arg(self.bundle())
            .arg(format!("bench-{round}"))
            .stdin(Stdio::null());
        timed(cmd)
    }

    /// A detached pod's agent: (start → listening, its RSS in bytes).
    fn agent_figures(&self, round: usize) -> Result<(Duration, u64), String> {
        let id = format!("agent-{round}");
        let started = self
            .crx(&[
                "run", "-d", "--cold", "--name", &id, IMAGE, "--", "sleep", "600",
            ])
            .output()
            .map_err(|e| format!("crx run -d: {e}"))?;
        if !started.status.success() {
            return Err(format!(
                "crx run -d: {}",
                String::from_utf8_lossy(&started.stderr)
            ));
        }
        let figures = (|| {
            let mut sandbox = Sandbox::open(&self.run_root(), &id).map_err(|e| e.to_string())?;
            let mut agent = sandbox
                .agent(Instant::now() + DEADLINE)
                .map_err(|e| e.to_string())?;
            let listen = Duration::from_micros(agent.hello().boot_to_listen_us);
            let rss = agent.stats(&[]).map_err(|e| e.to_string())?.agent_rss_bytes;
            if rss == 0 {
                return Err(
                    "the agent reports no RSS: an older agent? (`cargo xtask guest`)".into(),
                );
            }
            Ok((listen, rss))
        })();
        let removed = self.crx(&["rm", "-f", &id]).output();
        match removed {
            Ok(out) if out.status.success() => figures,
            Ok(out) => Err(format!(
                "crx rm -f {id}: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => Err(format!("crx rm -f {id}: {e}")),
        }
    }
}

fn require_tool(tool: &str, hint: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    assert!(found, "run bench: `{tool}` is not installed: {hint}");
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run bench: {what}: {e}"));
    assert!(
        out.status.success(),
        "run bench: {what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` to its end (output discarded) and times it; a failure is an error, not a sample.
fn timed(mut cmd: Command) -> Result<Duration, String> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let started = Instant::now();
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    let elapsed = started.elapsed();
    if out.status.success() {
        Ok(elapsed)
    } else {
        Err(format!(
            "{:?} exited with {}: {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if !crx_benches::run_bench_here() {
        return;
    }
    let setup = Setup::prepare();
    let rounds: usize = std::env::var("CRX_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);

    // The pod template `crx run` restores from, made before the rounds (as `crx template
    // build` does once per host).
    run_ok(&mut setup.crx(&["template", "build"]), "crx template build");
    // Rounds interleave crx (from the template), crx --cold and runc, in rotating order, so a
    // change in the host's load falls on all alike.
    let mut crx = Vec::new();
    let mut cold = Vec::new();
    let mut runc = Vec::new();
    for round in 0..rounds {
        for turn in 0..3 {
            match (round + turn) % 3 {
                0 => crx.push(
                    setup
                        .crx_run(false)
                        .unwrap_or_else(|e| panic!("run bench: crx run: {e}")),
                ),
                1 => cold.push(
                    setup
                        .crx_run(true)
                        .unwrap_or_else(|e| panic!("run bench: crx run --cold: {e}")),
                ),
                _ => runc.push(
                    setup
                        .runc_run(round)
                        .unwrap_or_else(|e| panic!("run bench: runc run: {e}")),
                ),
            }
        }
        eprintln!(
            "run bench: round {}/{rounds}: crx {:.1} ms, crx --cold {:.1} ms, runc {:.1} ms",
            round + 1,
            ms(crx[round]),
            ms(cold[round]),
            ms(runc[round])
        );
    }
    let mut listen = Vec::new();
    let mut rss = Vec::new();
    for round in 0..rounds {
        let (l, r) = setup
            .agent_figures(round)
            .unwrap_or_else(|e| panic!("run bench: agent figures: {e}"));
        listen.push(l);
        rss.push(r);
    }

    // Criterion analyses the recorded samples (each one a whole run).
    let mut criterion = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    let mut group = criterion.benchmark_group("run_true");
    group.sampling_mode(SamplingMode::Flat);
    for (name, samples) in [("crx", &crx), ("crx_cold", &cold), ("runc", &runc)] {
        let mut next = samples.iter().cycle();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| *next.next().expect("samples")).sum())
        });
    }
    group.finish();

    let (crx_median, crx_p99) = median_p99(&crx);
    let (cold_median, cold_p99) = median_p99(&cold);
    let (runc_median, runc_p99) = median_p99(&runc);
    let ratio = crx_median.as_secs_f64() / runc_median.as_secs_f64();
    let cold_ratio = cold_median.as_secs_f64() / runc_median.as_secs_f64();
    println!("\nrun bench summary (launch → exit code back, `true` in busybox, {rounds} rounds)");
    println!(
        "  crx run          median {:>9.1} ms  p99 {:>9.1} ms  {ratio:.2}x runc (from the template; target ≤ 1x: {})",
        ms(crx_median),
        ms(crx_p99),
        if ratio <= 1.0 { "met" } else { "not met" }
    );
    println!(
        "  crx run --cold   median {:>9.1} ms  p99 {:>9.1} ms  {cold_ratio:.2}x runc (target ≤ 3x: {})",
        ms(cold_median),
        ms(cold_p99),
        if cold_ratio <= 3.0 { "met" } else { "not met" }
    );
    println!(
        "  runc run         median {:>9.1} ms  p99 {:>9.1} ms",
        ms(runc_median),
        ms(runc_p99)
    );
    let (listen_median, listen_p99) = median_p99(&listen);
    println!(
        "  agent start → listening: median {:.2} ms, p99 {:.2} ms",
        ms(listen_median),
        ms(listen_p99)
    );
    let mut rss_sorted = rss.clone();
    rss_sorted.sort_unstable();
    println!(
        "  agent RSS: median {:.2} MiB (min {:.2}, max {:.2})",
        rss_sorted[rss_sorted.len() / 2] as f64 / (1 << 20) as f64,
        rss_sorted[0] as f64 / (1 << 20) as f64,
        rss_sorted[rss_sorted.len() - 1] as f64 / (1 << 20) as f64
    );
    criterion.final_summary();
}
