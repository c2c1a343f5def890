//! Cross-process file locks (flock). Each acquisition opens its own file description, so two
//! tasks of one process exclude each other exactly like two processes do.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use crate::Error;

/// A held lock, released when dropped.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Block until `path` (created if missing) is locked, exclusively or shared.
    pub(crate) fn acquire(path: &Path, exclusive: bool) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(Error::io("open lock", path))?;
        let op = if exclusive {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::LockShared
        };
        flock(&file, op).map_err(|e| Error::Io {
            op: "lock",
            path: path.to_owned(),
            source: e.into(),
        })?;
        Ok(FileLock { _file: file })
    }

    /// [`FileLock::acquire`] without blocking the async runtime.
    pub(crate) async fn acquire_async(path: PathBuf, exclusive: bool) -> Result<Self, Error> {
        tokio::task::spawn_blocking(move || Self::acquire(&path, exclusive)).await?
    }
}
