//! Each command runs in its own cgroup (v2), and whatever it leaves running is killed when it
//! is done: a failed test's VMMs and daemons (in process groups of their own, beyond the
//! command's group kill) must not load the test host for the tests after it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where the test host's root mounts cgroup2.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How long `cgroup.kill` may take to empty the cgroup.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// One command's cgroup.
pub struct CommandCgroup {
    path: PathBuf,
    /// `cgroup.procs`, opened before the fork: the child writes itself into it.
    procs: File,
}

impl CommandCgroup {
    /// A new, empty cgroup for one command.
    pub fn create() -> io::Result<CommandCgroup> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = PathBuf::from(CGROUP_ROOT).join(format!(
            "crx-testhost-command-{}",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            // Left by an agent before a restart of the server: reuse it once it is emptied.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let procs = OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))?;
        let cgroup = CommandCgroup { path, procs };
        cgroup.kill_all();
        Ok(cgroup)
    }

    /// For `pre_exec` in the forked child: moves the calling process into the cgroup. Only
    /// calls write(2), as a child between fork and exec may.
    pub fn enter_from_child(&self) -> io::Result<()> {
        let procs = self.procs.as_raw_fd();
        // SAFETY: writes one byte from a live static buffer to a descriptor this struct owns.
        let written = unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) };
        if written == 1 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Kills everything still in the cgroup and waits until it is empty. Returns what was
    /// killed, as `pid (comm)`.
    pub fn kill_all(&self) -> Vec<String> {
        let left: Vec<String> = std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                format!("{pid} ({})", comm.trim())
            })
            .collect();
        if left.is_empty() {
            return left;
        }
        if let Err(e) = std::fs::write(self.path.join("cgroup.kill"), "1") {
            tracing::warn!("cannot kill {}: {e}", self.path.display());
            return left;
        }
        let deadline = Instant::now() + KILL_WAIT;
        while Instant::now() < deadline && self.populated() {
            std::thread::sleep(Duration::from_millis(10));
        }
        left
    }

    fn populated(&self) -> bool {
        std::fs::read_to_string(self.path.join("cgroup.events"))
            .map(|events| events.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }
}

impl Drop for CommandCgroup {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir(&self.path);
    }
}
