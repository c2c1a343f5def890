//! The run dir's lock: one process at a time checks, starts, restarts or stops the L1.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::Error;

/// Holds an exclusive `flock` on `<run dir>/lock` until dropped.
pub struct RunLock {
    // Closing the file releases the lock.
    _file: File,
}

impl RunLock {
    pub fn acquire(run_dir: &Path) -> Result<RunLock, Error> {
        let path = run_dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io("cannot open the run dir lock", &path))?;
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(Error::io("cannot lock", &path))? {
            tracing::info!(
                "waiting for another process that is checking or starting the test host"
            );
            flock(&file, libc::LOCK_EX).map_err(Error::io("cannot lock", &path))?;
        }
        Ok(RunLock { _file: file })
    }
}

/// `flock(2)`; `Ok(false)` when a non-blocking attempt finds the lock taken.
fn flock(file: &File, operation: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock(2) on a file descriptor this function borrows; no pointers involved.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(error),
        }
    }
}
