//! Directory-fd based filesystem primitives that never follow a symlink out of the root:
//! beneath-root lookups, recursive removal, and applying ownership/mode/xattrs/times.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{
    fchmod, fchown, fsetxattr, futimens, openat, openat2, statat, unlinkat, AtFlags, Dir, FileType,
    Gid, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

use crate::LayerError;

/// Open directory `rel` (relative, already normalised; empty = `root` itself) below `root`,
/// resolving symlinks only while they stay beneath `root`. `flags` adds to `O_DIRECTORY`.
pub(crate) fn open_dir_beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
) -> Result<OwnedFd, Errno> {
    let path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    openat2(
        root,
        path,
        flags | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Map a beneath-lookup failure to a layer error, telling escapes apart from plain I/O errors.
pub(crate) fn lookup_error(entry: &Path, errno: Errno) -> LayerError {
    let path = entry.display().to_string();
    match errno {
        Errno::XDEV => LayerError::Escape {
            path,
            reason: "a symlink on the way leads outside the root",
        },
        Errno::LOOP => LayerError::Escape {
            path,
            reason: "symlink loop or magic link on the way",
        },
        Errno::NOTDIR => LayerError::InvalidEntry {
            path,
            reason: "a parent is not a directory".into(),
        },
        e => LayerError::io("resolve", entry, e),
    }
}

/// `lstat` of `name` in `dir`, `None` if it does not exist.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Stat>> {
    match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Remove `name` in `dir` and, if it is a directory, everything below it. Absent is fine.
pub(crate) fn remove_all_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let child = openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        for entry in dir_entries(child.as_fd())? {
            remove_all_at(child.as_fd(), &entry)?;
        }
        unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}

/// Names in an open (readable) directory, without `.` and `..`, collected before any change.
pub(crate) fn dir_entries(dir: BorrowedFd<'_>) -> io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    Ok(names)
}

/// Ownership, permissions, extended attributes and modification time of one inode.
#[derive(Debug, Clone, Default)]
pub(crate) struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timespec,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    pub(crate) fn timestamps(&self) -> Timestamps {
        Timestamps {
            last_access: self.mtime,
            last_modification: self.mtime,
        }
    }
}

/// Apply `meta` to an open regular file or directory, in the order that keeps set-id bits and
/// file capabilities (chown clears both): owner, mode, xattrs, then times unless `skip_times`.
pub(crate) fn apply_meta_fd(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    privileged: bool,
    skip_times: bool,
) -> io::Result<()> {
    if privileged {
        fchown(
            fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )?;
    }
    fchmod(fd, Mode::from_raw_mode(meta.mode & 0o7777))?;
    for (name, value) in &meta.xattrs {
        set_xattr(fd, name, value, privileged)?;
    }
    if !skip_times {
        futimens(fd, &meta.timestamps())?;
    }
    Ok(())
}

/// Set one xattr; namespaces the caller may not write (or the filesystem lacks) are skipped
/// with a log line rather than failing the whole layer.
pub(crate) fn set_xattr(
    fd: BorrowedFd<'_>,
    name: &[u8],
    value: &[u8],
    privileged: bool,
) -> io::Result<()> {
    let shown = String::from_utf8_lossy(name);
    if !privileged && !name.starts_with(b"user.") {
        tracing::debug!(xattr = %shown, "not root: skipping xattr");
        return Ok(());
    }
    use std::os::unix::ffi::OsStrExt;
    match fsetxattr(fd, OsStr::from_bytes(name), value, XattrFlags::empty()) {
        Ok(()) => Ok(()),
        Err(e @ (Errno::OPNOTSUPP | Errno::PERM)) => {
            tracing::warn!(xattr = %shown, error = %e, "cannot set xattr, skipping");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
