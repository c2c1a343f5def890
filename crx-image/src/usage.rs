//! Image filesystem usage: bytes and inodes the store occupies (hard links counted once) and
//! the capacity of the filesystem it lives on.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::Error;

/// Disk usage of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsUsage {
    /// Allocated bytes under the store root, each inode once.
    pub used_bytes: u64,
    /// Distinct inodes under the store root.
    pub inodes_used: u64,
    /// Size of the filesystem holding the store.
    pub fs_total_bytes: u64,
    /// Bytes available to unprivileged users on that filesystem.
    pub fs_available_bytes: u64,
}

pub(crate) fn measure(root: &Path) -> Result<FsUsage, Error> {
    let mut seen = HashSet::new();
    let mut usage = FsUsage::default();
    walk(root, &mut seen, &mut usage)?;
    let st = rustix::fs::statvfs(root).map_err(|e| Error::Io {
        op: "statvfs",
        path: root.to_owned(),
        source: e.into(),
    })?;
    usage.fs_total_bytes = st.f_blocks * st.f_frsize;
    usage.fs_available_bytes = st.f_bavail * st.f_frsize;
    Ok(usage)
}

fn walk(path: &Path, seen: &mut HashSet<(u64, u64)>, usage: &mut FsUsage) -> Result<(), Error> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()), // removed meanwhile
        Err(e) => {
            return Err(Error::Io {
                op: "stat",
                path: path.to_owned(),
                source: e,
            })
        }
    };
    if seen.insert((meta.dev(), meta.ino())) {
        usage.used_bytes += meta.blocks() * 512;
        usage.inodes_used += 1;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(Error::io("list", path))? {
            walk(&entry.map_err(Error::io("list", path))?.path(), seen, usage)?;
        }
    }
    Ok(())
}
