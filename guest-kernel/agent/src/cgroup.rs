//! cgroup v2 for containers: `/sys/fs/cgroup/crx/<id>` with `memory.max`, `pids.max` and
//! `cpu.max` from the spec's `linux.resources`, joining it, OOM-kill counts, stats and cleanup.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: &str = "+cpu +memory +pids";

/// Enables the cpu, memory and pids controllers for `/sys/fs/cgroup/crx` and its children.
pub fn init() -> io::Result<()> {
    fs::write(Path::new(ROOT).join("cgroup.subtree_control"), CONTROLLERS)?;
    let crx = Path::new(ROOT).join("crx");
    match fs::create_dir(&crx) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    fs::write(crx.join("cgroup.subtree_control"), CONTROLLERS)
}

/// One container's cgroup.
pub struct Cgroup {
    dir: PathBuf,
}

/// A container's resource usage.
pub struct Usage {
    pub cpu_usage_usec: u64,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids_current: u64,
}

impl Cgroup {
    /// Creates the cgroup of container `id` with the limits in `resources`.
    pub fn create(id: &str, resources: Option<&LinuxResources>) -> io::Result<Cgroup> {
        let dir = Path::new(ROOT).join("crx").join(id);
        fs::create_dir(&dir)?;
        let cgroup = Cgroup { dir };
        if let Err(e) = cgroup.apply(resources) {
            let _ = cgroup.remove();
            return Err(e);
        }
        Ok(cgroup)
    }

    /// Writes the limits `resources` sets (memory, pids, CPU quota and period, CPU shares as
    /// a weight); those it leaves out stay as they are.
    pub fn apply(&self, resources: Option<&LinuxResources>) -> io::Result<()> {
        let Some(resources) = resources else {
            return Ok(());
        };
        let set = |file: &str, value: String| {
            fs::write(self.dir.join(file), &value)
                .map_err(|e| io::Error::new(e.kind(), format!("{file} = {value}: {e}")))
        };
        if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit()) {
            set("memory.max", max_value(limit))?;
            // No swap in the guest, but never let a limit be bypassed if one appears.
            let _ = set("memory.swap.max", "0".into());
        }
        if let Some(pids) = resources.pids() {
            set("pids.max", max_value(pids.limit()))?;
        }
        if let Some(cpu) = resources.cpu() {
            if let Some(quota) = cpu.quota() {
                let period = cpu.period().unwrap_or(100_000);
                set("cpu.max", format!("{} {period}", max_value(quota)))?;
            }
            if let Some(shares) = cpu.shares().filter(|&s| s > 0) {
                set("cpu.weight", cpu_weight(shares).to_string())?;
            }
        }
        Ok(())
    }

    /// `cgroup.procs` opened for writing: a forked child writes `0` to it to join.
    pub fn procs_file(&self) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
    }

    /// How many processes the kernel's OOM killer has killed in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        read_key(&self.dir.join("memory.events"), "oom_kill").unwrap_or(0)
    }

    pub fn usage(&self) -> Usage {
        let single = |file: &str| {
            fs::read_to_string(self.dir.join(file))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        Usage {
            cpu_usage_usec: read_key(&self.dir.join("cpu.stat"), "usage_usec").unwrap_or(0),
            memory_usage_bytes: single("memory.current").unwrap_or(0),
            memory_limit_bytes: single("memory.max").unwrap_or(0), // "max" → 0
            pids_current: single("pids.current").unwrap_or(0),
        }
    }

    /// Kills every process in the cgroup (`cgroup.kill`).
    pub fn kill_all(&self) -> io::Result<()> {
        fs::write(self.dir.join("cgroup.kill"), "1")
    }

    /// Removes the cgroup, waiting up to a second for its killed processes to go.
    pub fn remove(&self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match fs::remove_dir(&self.dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                other => return other,
            }
        }
    }
}

/// cgroup v1 CPU shares (2..=262144) as a cgroup v2 weight (1..=10000), the way runc and crun
/// map them.
fn cpu_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + (shares - 2) * 9999 / 262_142
}

/// A limit as cgroup v2 writes it: negative means unlimited.
fn max_value(limit: i64) -> String {
    if limit < 0 {
        "max".into()
    } else {
        limit.to_string()
    }
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_shares_map_to_weights_as_runc_maps_them() {
        assert_eq!(cpu_weight(2), 1);
        assert_eq!(cpu_weight(1024), 39);
        assert_eq!(cpu_weight(262_144), 10_000);
        assert_eq!(cpu_weight(1), 1);
        assert_eq!(cpu_weight(1 << 30), 10_000);
    }
}
