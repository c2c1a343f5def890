//! Hard-link copy of an unpacked rootfs: the starting point for applying the next layer of a
//! chain without modifying the parent snapshot (files are shared, directories are copied).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{
    fgetxattr, flistxattr, fstat, linkat, mkdirat, openat, statat, AtFlags, FileType, Mode, OFlags,
    Stat, Timespec, CWD,
};

use crate::fsops::{apply_meta_fd, dir_entries, Meta};
use crate::LayerError;

/// Recreate the tree at `src` as the new directory `dst`: directories are copied with their
/// owner, mode, xattrs and mtime; every other inode is hard-linked. Layers applied to `dst`
/// afterwards replace files by unlinking them first, so `src` is never modified.
pub fn clone_tree(src: &Path, dst: &Path) -> Result<(), LayerError> {
    let privileged = rustix::process::geteuid().is_root();
    let open = |p: &Path| {
        openat(
            CWD,
            p,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| LayerError::io("open dir", p, e))
    };
    let src_fd = open(src)?;
    rustix::fs::mkdir(dst, Mode::from_raw_mode(0o700))
        .map_err(|e| LayerError::io("mkdir", dst, e))?;
    let dst_fd = open(dst)?;
    clone_dir(src_fd.as_fd(), dst_fd.as_fd(), privileged)
        .map_err(|e| LayerError::io("clone", src, e))?;
    let st = fstat(&src_fd).map_err(|e| LayerError::io("stat", src, e))?;
    copy_dir_meta(src_fd.as_fd(), &st, dst_fd.as_fd(), privileged)
        .map_err(|e| LayerError::io("set metadata", dst, e))
}

fn clone_dir(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, privileged: bool) -> io::Result<()> {
    for name in dir_entries(src)? {
        let st = statat(src, &name, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            mkdirat(dst, &name, Mode::from_raw_mode(0o700))?;
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let s = openat(src, &name, flags, Mode::empty())?;
            let d = openat(dst, &name, flags, Mode::empty())?;
            clone_dir(s.as_fd(), d.as_fd(), privileged)?;
            copy_dir_meta(s.as_fd(), &st, d.as_fd(), privileged)?;
        } else {
            linkat(src, &name, dst, &name, AtFlags::empty())?;
        }
    }
    Ok(())
}

fn copy_dir_meta(
    src: BorrowedFd<'_>,
    st: &Stat,
    dst: BorrowedFd<'_>,
    privileged: bool,
) -> io::Result<()> {
    let meta = Meta {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
        xattrs: read_xattrs(src)?,
    };
    apply_meta_fd(dst, &meta, privileged, false)
}

fn read_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; rustix::fs::flistxattr_query(fd)?];
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let len = flistxattr(fd, &mut names[..])?;
    let mut out = Vec::new();
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::OsStr::from_bytes(name);
        let mut value = vec![0u8; rustix::fs::fgetxattr_query(fd, cname)?];
        let n = fgetxattr(fd, cname, &mut value[..])?;
        value.truncate(n);
        out.push((name.to_vec(), value));
    }
    Ok(out)
}
