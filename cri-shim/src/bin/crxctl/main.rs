//! `crxctl`: the operator's companion to `crx-cri`. Lists the pod sandboxes of an instance as
//! the VMs they are (size, how they started, how long until their agent answered, VMM pid,
//! memory), inspects one, prints or follows a VM's console, and checks whether a host can run
//! pod VMs at all (`check`). It only reads: the sandboxes' state directories and `/proc`.

mod check;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use crx_cri::config::{Config, DEFAULT_CONFIG};
use crx_cri::POD_LABEL;
use crx_runtime::pod::IMAGE_LABEL;
use crx_runtime::sandbox::Sandbox;

#[derive(Parser, Debug)]
#[command(
    name = "crxctl",
    version,
    about = "Inspect CRX pod VMs and check a host for them"
)]
struct Cli {
    /// crx-cri's configuration file [default: /etc/crx/config.toml, if present].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The instance's state directory [default: the configuration's state_dir, /run/crx].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List pod VMs: id, pod (or image), state, how the VM started, vCPUs, memory, ms from
    /// its VMM's start until its agent answered, VMM pid, resident memory of the VMM and its
    /// virtiofsd processes.
    Ps,
    /// One pod VM in detail (JSON): its recorded state, whether it runs, its processes, their
    /// resident memory and seccomp mode.
    Inspect { id: String },
    /// Print a pod VM's console output.
    Console {
        id: String,
        /// Keep printing what the guest writes until its VM ends (or ^C).
        #[arg(short, long)]
        follow: bool,
    },
    /// Check this host: KVM (and not PVM), the guest kernel, initrd and agent, crx-vmm,
    /// virtiofsd, the CNI configuration and plugins, the image store and the CRI socket.
    /// Exits 1 if anything a pod needs is missing.
    Check,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => Config::load(path, true)?,
        None => Config::load(Path::new(DEFAULT_CONFIG), false)?,
    };
    if let Some(dir) = cli.state_dir {
        config.state_dir = dir;
    }
    let code = match cli.command {
        Command::Ps => ps(&config.state_dir).map(|()| 0)?,
        Command::Inspect { id } => inspect(&config.state_dir, &id).map(|()| 0)?,
        Command::Console { id, follow } => console(&config.state_dir, &id, follow).map(|()| 0)?,
        Command::Check => check::run(&config),
    };
    std::process::exit(code)
}

/// Resident memory of `pids`, KiB (a process gone meanwhile counts nothing).
fn rss_kib(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|&pid| {
            procfs::process::Process::new(pid)
                .ok()?
                .status()
                .ok()?
                .vmrss
        })
        .sum()
}

fn ps(state_dir: &Path) -> anyhow::Result<()> {
    println!(
        "{:<32} {:<24} {:<8} {:<8} {:>5} {:>7} {:>8} {:>8} {:>7}",
        "ID", "POD", "STATE", "STARTED", "VCPUS", "MEM_MIB", "READY_MS", "VMM_PID", "RSS_MIB"
    );
    for sandbox in Sandbox::list(state_dir)? {
        let mut sandbox = match sandbox {
            Ok(sandbox) => sandbox,
            Err(e) => {
                eprintln!("crxctl: {e}");
                continue;
            }
        };
        let processes = sandbox.processes();
        let state = sandbox.state();
        let name = state
            .labels
            .get(POD_LABEL)
            .or_else(|| state.labels.get(IMAGE_LABEL))
            .map_or("-", String::as_str);
        println!(
            "{:<32} {:<24} {:<8} {:<8} {:>5} {:>7} {:>8} {:>8} {:>7.1}",
            state.id,
            name,
            if processes.is_empty() {
                "exited"
            } else {
                "running"
            },
            if state.template.is_some() {
                "restored"
            } else {
                "booted"
            },
            state.vcpus,
            state.mem_mib,
            state.ready_ms.map_or("-".into(), |ms| ms.to_string()),
            state.vmm_pid,
            rss_kib(&processes) as f64 / 1024.0
        );
    }
    Ok(())
}

fn inspect(state_dir: &Path, id: &str) -> anyhow::Result<()> {
    let mut sandbox = Sandbox::open(state_dir, id)?;
    let processes: Vec<serde_json::Value> = sandbox
        .processes()
        .into_iter()
        .map(|pid| {
            let process = procfs::process::Process::new(pid).ok();
            let seccomp = match process.as_ref().and_then(|p| p.status().ok()?.seccomp) {
                Some(0) => "off",
                Some(1) => "strict",
                Some(2) => "filter",
                _ => "unknown",
            };
            serde_json::json!({
                "pid": pid,
                "command": process.as_ref().and_then(|p| p.cmdline().ok()).unwrap_or_default(),
                "rssKiB": rss_kib(&[pid]),
                "seccomp": seccomp,
            })
        })
        .collect();
    let report = serde_json::json!({
        "dir": sandbox.dir(),
        "running": !processes.is_empty(),
        "console": sandbox.console_path(),
        "processes": processes,
        "state": sandbox.state(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn console(state_dir: &Path, id: &str, follow: bool) -> anyhow::Result<()> {
    let mut sandbox = Sandbox::open(state_dir, id)?;
    let path = sandbox.console_path();
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        if !follow || !sandbox.is_running() {
            // One last read: what the guest wrote just before its VM ended.
            std::io::copy(&mut file, &mut out)?;
            return Ok(out.flush()?);
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(200));
    }
}
