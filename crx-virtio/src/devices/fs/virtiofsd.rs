//! The virtiofsd child process behind one virtio-fs device: finding the binary, starting it on a
//! fresh vhost-user socket, waiting for that socket, watching the child through a pidfd, and
//! killing and reaping it (and removing its socket and the `<socket>.pid` file virtiofsd writes
//! beside it) when the device goes.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{FsConfig, FsError};

/// How long virtiofsd may take to create its socket (the test host emulates the CPU).
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);
const SOCKET_POLL: Duration = Duration::from_millis(5);
/// How long virtiofsd gets to exit by itself once the device has hung up.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// Tells the sockets of one process's devices apart.
static SOCKET_SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A running virtiofsd.
pub struct Virtiofsd {
    child: Child,
    /// Readable once the child has exited (pidfd_open(2)).
    pidfd: OwnedFd,
    socket_path: PathBuf,
}

/// `$XDG_RUNTIME_DIR/crx`, or `/run/crx` (a local tmpfs: vhost-user sockets cannot live on 9p).
fn default_socket_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map_or_else(|| PathBuf::from("/run"), PathBuf::from)
        .join("crx")
}

impl Virtiofsd {
    /// Starts virtiofsd for `config` and waits until its vhost-user socket exists.
    pub fn start(config: &FsConfig) -> Result<Virtiofsd, FsError> {
        let binary = match &config.virtiofsd {
            Some(path) => path.clone(),
            None => find_binary().ok_or(FsError::VirtiofsdNotFound)?,
        };
        let socket_dir = config.socket_dir.clone().unwrap_or_else(default_socket_dir);
        // The socket gives whoever reaches it the guest's memory: only its owner may.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&socket_dir)
            .map_err(|source| FsError::SocketDir {
                path: socket_dir.clone(),
                source,
            })?;
        let socket_path = socket_dir.join(format!(
            "crx-virtiofs-{}-{}.sock",
            std::process::id(),
            SOCKET_SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        // A stale socket from a crashed run would make virtiofsd's bind fail.
        let _ = std::fs::remove_file(&socket_path);
        let mut command = Command::new(&binary);
        if config.read_only {
            command.arg("--readonly");
        }
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                // virtiofsd must not outlive the VMM that spawned it, even one that is killed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .arg(format!("--socket-path={}", socket_path.display()))
            .arg(format!("--shared-dir={}", config.shared_dir.display()))
            .arg(format!("--tag={}", config.tag))
            .arg(format!("--sandbox={}", config.sandbox.as_arg()))
            .arg("--cache=auto")
            // Mounts below the shared directory (a volume's own submounts) stay mounts of their
            // own in the guest, so a read-only bind of a volume leaves them as they are, as a
            // non-recursive read-only mount does on a host.
            .arg("--announce-submounts")
            // Requests are served one after another, in ring order: what lets the device fail the
            // requests still in flight when virtiofsd dies (see `orphaned`).
            .arg("--thread-pool-size=0")
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| FsError::Spawn {
                path: binary.clone(),
                source,
            })?;
        let pidfd = match pidfd_open(&child) {
            Ok(fd) => fd,
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(FsError::Pidfd(source));
            }
        };
        let mut daemon = Virtiofsd {
            child,
            pidfd,
            socket_path,
        };
        daemon.wait_for_socket()?;
        tracing::debug!(
            "virtiofsd (pid {}) for tag {} serves {} on {}",
            daemon.pid(),
            config.tag,
            config.shared_dir.display(),
            daemon.socket_path.display()
        );
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The fd the event loop watches: readable once virtiofsd has exited.
    pub fn exit_event(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Reaps virtiofsd after its pidfd became readable.
    pub fn reap(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait()
    }

    /// Waits up to `timeout` for virtiofsd to exit (without reaping it).
    fn exited_within(&self, timeout: Duration) -> bool {
        let mut pollfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout_ms = timeout.as_millis().try_into().unwrap_or(libc::c_int::MAX);
        // SAFETY: poll on one pollfd we own, for at most `timeout_ms`.
        unsafe { libc::poll(&mut pollfd, 1, timeout_ms) == 1 }
    }

    fn wait_for_socket(&mut self) -> Result<(), FsError> {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().map_err(FsError::Wait)? {
                return Err(FsError::ExitedAtStart(status));
            }
            if self.socket_path.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(FsError::SocketTimeout(self.socket_path.clone()));
            }
            std::thread::sleep(SOCKET_POLL);
        }
    }
}

impl Drop for Virtiofsd {
    /// Reaps virtiofsd, killing it if it does not exit on its own within [`EXIT_GRACE`] (it
    /// does once the device closed the vhost-user connection, and with the namespace sandbox its
    /// parent exits only after the serving process), and removes its socket and pid file.
    fn drop(&mut self) {
        if !self.exited_within(EXIT_GRACE) {
            if let Err(e) = self.child.kill() {
                tracing::warn!("cannot kill virtiofsd (pid {}): {e}", self.child.id());
            }
        }
        if let Err(e) = self.child.wait() {
            tracing::warn!("cannot reap virtiofsd (pid {}): {e}", self.child.id());
        }
        let mut pid_file = self.socket_path.clone().into_os_string();
        pid_file.push(".pid");
        for path in [self.socket_path.as_path(), Path::new(&pid_file)] {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", path.display());
                }
            }
        }
    }
}

fn pidfd_open(child: &Child) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; the pid is our
    // unreaped child, so it cannot have been reused.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of pidfd_open is a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `virtiofsd` on PATH, else where `cargo install virtiofsd` puts it.
/// The virtiofsd a device starts unless told which: the first executable `virtiofsd` on PATH,
/// else in ~/.cargo/bin (where `cargo install virtiofsd` puts it).
pub fn find_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("virtiofsd"));
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|cargo| cargo.join("bin/virtiofsd"));
    on_path
        .chain(cargo_bin)
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
