//! The container share of a pod VM with several containers: one host directory
//! (`<sandbox dir>/containers`) exported read-only to the guest over virtio-fs as the tag
//! [`CONTAINERS_TAG`], into which each container's image root filesystem is bind-mounted (at
//! `<share>/<container id>`, read-only) while the VM runs. The share is a bind mount of itself
//! with shared propagation, made before the VMM starts, so the bind mounts made later reach
//! virtiofsd's own mount namespace (virtiofsd makes its mounts slaves of the host's) and the
//! guest sees a new container's root as a new directory of a share it already mounted.
//!
//! Removing the share unmounts every container bind and then the share itself, and checks in
//! `/proc/self/mountinfo` that nothing is mounted below it any more before its directory may
//! be deleted: a recursive delete through a live bind mount would reach into the image store.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::{
    mount_bind, mount_change, mount_remount, unmount, MountFlags, MountPropagationFlags,
    UnmountFlags,
};

/// The virtio-fs tag of the container share.
pub const CONTAINERS_TAG: &str = "containers";
/// The share's directory name inside the sandbox directory.
const SHARE_DIR: &str = "containers";

/// Why the container share could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} still has mounts below it: {1}")]
    StillMounted(PathBuf, String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ShareError + 'a {
    move |source| ShareError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The share directory of the sandbox whose directory is `sandbox_dir`.
pub fn share_dir(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join(SHARE_DIR)
}

/// Makes `<sandbox_dir>/containers` a mount point with shared propagation; returns its path.
pub fn create(sandbox_dir: &Path) -> Result<PathBuf, ShareError> {
    let dir = share_dir(sandbox_dir);
    fs::create_dir(&dir).map_err(io_err("cannot create", &dir))?;
    let made = mount_bind(&dir, &dir)
        .and_then(|()| mount_change(&dir, MountPropagationFlags::SHARED))
        .map_err(|e| io_err("cannot make a shared mount of", &dir)(e.into()));
    if let Err(e) = made {
        let _ = unmount(&dir, UnmountFlags::DETACH);
        let _ = fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(dir)
}

/// Checks a container id used as a directory name in the share.
fn entry(share: &Path, id: &str) -> Result<PathBuf, ShareError> {
    crate::sandbox::check_id(id).map_err(|e| {
        io_err("invalid container id for", share)(io::Error::new(
            io::ErrorKind::InvalidInput,
            e.to_string(),
        ))
    })?;
    Ok(share.join(id))
}

/// Bind-mounts `rootfs` read-only at `<share>/<id>`.
pub fn attach(share: &Path, id: &str, rootfs: &Path) -> Result<(), ShareError> {
    let target = entry(share, id)?;
    fs::create_dir(&target).map_err(io_err("cannot create", &target))?;
    let mounted = mount_bind(rootfs, &target)
        .and_then(|()| {
            mount_remount(
                &target,
                MountFlags::BIND | MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
                "",
            )
        })
        .map_err(|e| io_err("cannot bind-mount the container root at", &target)(e.into()));
    if let Err(e) = mounted {
        let _ = unmount(&target, UnmountFlags::DETACH);
        let _ = fs::remove_dir(&target);
        return Err(e);
    }
    tracing::debug!(id, rootfs = %rootfs.display(), "container root in the share");
    Ok(())
}

/// Unmounts and removes `<share>/<id>`; nothing there is fine.
pub fn detach(share: &Path, id: &str) -> Result<(), ShareError> {
    let target = entry(share, id)?;
    if !target.exists() {
        return Ok(());
    }
    if !mounts_below(&target, true).is_empty() {
        unmount(&target, UnmountFlags::DETACH)
            .map_err(|e| io_err("cannot unmount", &target)(e.into()))?;
    }
    fs::remove_dir(&target).map_err(io_err("cannot remove", &target))
}

/// Unmounts every container root and the share itself, then removes the directory. Safe to
/// repeat; a share that is not there is fine.
pub fn remove(share: &Path) -> Result<(), ShareError> {
    let mut mounts = mounts_below(share, true);
    // Deepest first: the container binds, then the share.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for mount in &mounts {
        if let Err(e) = unmount(mount, UnmountFlags::DETACH) {
            tracing::warn!(mount = %mount.display(), "unmounting: {e}");
        }
    }
    let left = mounts_below(share, true);
    if !left.is_empty() {
        let list: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
        return Err(ShareError::StillMounted(share.to_owned(), list.join(", ")));
    }
    match fs::read_dir(share) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let path = entry.path();
                fs::remove_dir(&path).map_err(io_err("cannot remove", &path))?;
            }
            fs::remove_dir(share).map_err(io_err("cannot remove", share))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("cannot list", share)(e)),
    }
}

/// Mount points at or (with `inclusive`) below `dir`, from `/proc/self/mountinfo`.
pub fn mounts_below(dir: &Path, inclusive: bool) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(dir) && (inclusive || p != dir))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape(r"/run/a\040b"), PathBuf::from("/run/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape(r"/x\134y"), PathBuf::from(r"/x\y"));
    }

    #[test]
    fn binds_propagate_and_removal_leaves_nothing() {
        let sandbox = tempfile::tempdir_in("/run").unwrap();
        let image = tempfile::tempdir().unwrap();
        fs::write(image.path().join("file"), b"image").unwrap();
        let share = create(sandbox.path()).unwrap();
        attach(&share, "c1", image.path()).unwrap();
        assert_eq!(fs::read(share.join("c1/file")).unwrap(), b"image");
        // Read-only: the image cannot be changed through the share.
        assert!(fs::write(share.join("c1/new"), b"x").is_err());
        assert!(attach(&share, "../x", image.path()).is_err());
        detach(&share, "c1").unwrap();
        assert!(!share.join("c1").exists());
        attach(&share, "c2", image.path()).unwrap();
        remove(&share).unwrap();
        assert!(!share.exists());
        assert!(mounts_below(sandbox.path(), true).is_empty());
        assert!(image.path().join("file").exists());
        remove(&share).unwrap();
    }
}
