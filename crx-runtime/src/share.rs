//! The container share of a pod VM with several containers: the host directory
//! `<sandbox dir>/containers`, exported to the guest over virtio-fs as the tag
//! [`CONTAINERS_TAG`]. Each container has a directory in it, `<id>/`, holding its image root
//! filesystem (`<id>/rootfs`, bind-mounted read-only) and its volumes (`<id>/volumes/<n>`, each
//! a bind mount of a host path, read-only or not), mounted while the VM runs.
//!
//! Two mounts of one directory make that work (as Kata's shared directory does). The host mounts
//! into `<sandbox dir>/containers.src`, a bind mount of itself with shared propagation; the
//! exported `containers` is a bind mount of it, a peer that receives every mount made in it,
//! and is itself read-only. Both are made before the VMM starts, so later mounts reach
//! virtiofsd's own mount namespace too (virtiofsd makes its mounts slaves of the host's) and the
//! guest sees a new container as a new directory of a share it already mounted. What the guest
//! may write is decided here, on the host, mount by mount: nothing at the top of the share or in
//! a container's directory (the read-only export), nothing in a root (a read-only bind), and
//! only what a writable volume's own bind mount allows. A peer receives a copy of a mount as it
//! is when it arrives, and a later remount changes only the original; so every bind is made and
//! given its flags in `<sandbox dir>/containers.stage`, a private mount, and only then moved
//! into the source.
//!
//! Removing the share unmounts everything below it, checks in `/proc/self/mountinfo` that
//! nothing is mounted there any more, and only then deletes entries one by one (never
//! recursively): a delete through a live bind mount would reach into the image store or a
//! volume.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::mount::{
    mount_bind, mount_bind_recursive, mount_change, mount_move, mount_remount, unmount, MountFlags,
    MountPropagationFlags, UnmountFlags,
};

/// The virtio-fs tag of the container share.
pub const CONTAINERS_TAG: &str = "containers";
/// The exported share's directory name inside the sandbox directory.
const SHARE_DIR: &str = "containers";
/// The directory the host mounts into, beside the share.
const SOURCE_DIR: &str = "containers.src";
/// Where binds get their flags before they move into the source, beside the share.
const STAGE_DIR: &str = "containers.stage";
/// A container's root filesystem, inside its directory of the share.
const ROOTFS: &str = "rootfs";
/// A container's volumes, inside its directory of the share.
const VOLUMES: &str = "volumes";

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
    #[error("volume host path {0:?}: {1}")]
    BadVolume(PathBuf, &'static str),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ShareError + 'a {
    move |source| ShareError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A host path a container gets at one of its paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// An absolute host path: a directory or a file.
    pub host_path: PathBuf,
    /// Where the container sees it (absolute, in the container).
    pub container_path: String,
    pub read_only: bool,
    /// With `read_only`, the mounts below the host path are read-only too (otherwise they keep
    /// their own flags, as a non-recursive read-only bind leaves them).
    pub recursive_read_only: bool,
    /// Whether mounts made later below the host path reach the container.
    pub propagation: Propagation,
}

/// How mounts made on the host below a volume's path after it was mounted reach the
/// container. Mounts made in the container never reach the host: the VM is the boundary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Propagation {
    /// They do not (a private mount).
    #[default]
    Private,
    /// They do (a slave of the host path's mount).
    HostToContainer,
}

/// The share directory of the sandbox whose directory is `sandbox_dir`.
pub fn share_dir(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join(SHARE_DIR)
}

/// The directory the host mounts into, for the share `share`.
fn source_of(share: &Path) -> PathBuf {
    share.with_file_name(SOURCE_DIR)
}

/// Makes the share, its source and its stage in `sandbox_dir`; returns the share's path.
pub fn create(sandbox_dir: &Path) -> Result<PathBuf, ShareError> {
    let share = share_dir(sandbox_dir);
    let source = source_of(&share);
    let stage = share.with_file_name(STAGE_DIR);
    let self_bind = |dir: &Path, propagation: MountPropagationFlags| {
        fs::create_dir(dir).map_err(io_err("cannot create", dir))?;
        mount_bind(dir, dir)
            .and_then(|()| mount_change(dir, propagation))
            .map_err(|e| io_err("cannot make a mount of its own at", dir)(e.into()))
    };
    let made = self_bind(&stage, MountPropagationFlags::PRIVATE)
        .and_then(|()| self_bind(&source, MountPropagationFlags::SHARED))
        .and_then(|()| fs::create_dir(&share).map_err(io_err("cannot create", &share)))
        .and_then(|()| {
            mount_bind(&source, &share)
                .and_then(|()| mount_remount(&share, MountFlags::BIND | MountFlags::RDONLY, ""))
                .map_err(|e| io_err("cannot make a read-only peer mount at", &share)(e.into()))
        });
    if let Err(e) = made {
        for dir in [&share, &source, &stage] {
            let _ = unmount(dir, UnmountFlags::DETACH);
            let _ = fs::remove_dir(dir);
        }
        return Err(e);
    }
    Ok(share)
}

/// Checks a container id used as a directory name in the share; returns its directory in the
/// source.
fn entry(share: &Path, id: &str) -> Result<PathBuf, ShareError> {
    crate::sandbox::check_id(id).map_err(|e| {
        io_err("invalid container id for", share)(io::Error::new(
            io::ErrorKind::InvalidInput,
            e.to_string(),
        ))
    })?;
    Ok(source_of(share).join(id))
}

/// Where container `id`'s root is in the share, relative to it.
pub fn rootfs_path(id: &str) -> String {
    format!("{id}/{ROOTFS}")
}

/// Where container `id`'s volume `index` is in the share, relative to it.
pub fn volume_path(id: &str, index: usize) -> String {
    format!("{id}/{VOLUMES}/{index}")
}

/// Mounts container `id`'s root (`rootfs`, read-only) and `volumes` (in order, as
/// [`volume_path`] names them) into the share. On failure nothing of it is left.
pub fn attach(share: &Path, id: &str, rootfs: &Path, volumes: &[Volume]) -> Result<(), ShareError> {
    for volume in volumes {
        check_volume(&volume.host_path)?;
    }
    let dir = entry(share, id)?;
    fs::create_dir(&dir).map_err(io_err("cannot create", &dir))?;
    let attached = attach_in(share, &dir, rootfs, volumes);
    if attached.is_err() {
        let _ = detach(share, id);
    }
    attached?;
    tracing::debug!(id, rootfs = %rootfs.display(), volumes = volumes.len(), "container in the share");
    Ok(())
}

fn attach_in(
    share: &Path,
    dir: &Path,
    rootfs: &Path,
    volumes: &[Volume],
) -> Result<(), ShareError> {
    let root = dir.join(ROOTFS);
    fs::create_dir(&root).map_err(io_err("cannot create", &root))?;
    let read_only = MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID;
    bind_into(
        share,
        rootfs,
        &root,
        false,
        MountPropagationFlags::PRIVATE,
        read_only,
        false,
    )?;
    if volumes.is_empty() {
        return Ok(());
    }
    let volumes_dir = dir.join(VOLUMES);
    fs::create_dir(&volumes_dir).map_err(io_err("cannot create", &volumes_dir))?;
    for (index, volume) in volumes.iter().enumerate() {
        let target = volumes_dir.join(index.to_string());
        // A file is mounted on a file, a directory on a directory.
        let is_dir = fs::metadata(&volume.host_path)
            .map_err(io_err("cannot stat volume", &volume.host_path))?
            .is_dir();
        make_mount_point(&target, is_dir)?;
        if volume.recursive_read_only
            && (!volume.read_only || volume.propagation != Propagation::Private)
        {
            return Err(ShareError::BadVolume(
                volume.host_path.clone(),
                "a recursive read-only volume must be read-only and private",
            ));
        }
        let mut flags = MountFlags::NODEV | MountFlags::NOSUID;
        if volume.read_only {
            flags |= MountFlags::RDONLY;
        }
        // Recursive, as containerd binds volumes: mounts below the host path come along.
        let propagation = match volume.propagation {
            Propagation::Private => MountPropagationFlags::PRIVATE,
            Propagation::HostToContainer => MountPropagationFlags::DOWNSTREAM,
        };
        bind_into(
            share,
            &volume.host_path,
            &target,
            true,
            propagation,
            flags,
            volume.recursive_read_only,
        )?;
    }
    Ok(())
}

fn make_mount_point(path: &Path, is_dir: bool) -> Result<(), ShareError> {
    if is_dir {
        fs::create_dir(path).map_err(io_err("cannot create", path))
    } else {
        fs::File::create(path)
            .map(drop)
            .map_err(io_err("cannot create", path))
    }
}

/// Binds `from` (with the mounts below it if `recursive`) at `target`, an existing mount point
/// in the source, with `flags` (on every mount below too if `all_read_only`) and `propagation`
/// from `from`'s mounts (private: none; a bind of a shared mount would otherwise be its peer),
/// by way of the stage, so the peers' copies get the flags too.
fn bind_into(
    share: &Path,
    from: &Path,
    target: &Path,
    recursive: bool,
    propagation: MountPropagationFlags,
    flags: MountFlags,
    all_read_only: bool,
) -> Result<(), ShareError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let staged_path = share.with_file_name(STAGE_DIR).join(name);
    make_mount_point(&staged_path, target.is_dir())?;
    let bound = if recursive {
        mount_bind_recursive(from, &staged_path)
    } else {
        mount_bind(from, &staged_path)
    };
    let bound =
        bound.and_then(|()| mount_change(&staged_path, propagation | MountPropagationFlags::REC));
    let moved = bound
        .and_then(|()| mount_remount(&staged_path, MountFlags::BIND | flags, ""))
        .map_err(io::Error::from)
        .and_then(|()| match all_read_only {
            true => make_all_read_only(&staged_path),
            false => Ok(()),
        })
        .and_then(|()| mount_move(&staged_path, target).map_err(io::Error::from));
    if moved.is_err() {
        let _ = unmount(&staged_path, UnmountFlags::DETACH);
    }
    // Empty again: the mount moved away (or was undone).
    let _ = fs::remove_dir(&staged_path).or_else(|_| fs::remove_file(&staged_path));
    moved.map_err(io_err("cannot bind-mount", target))
}

/// Makes the mount at `path` and every mount below it read-only (mount_setattr(2) with
/// AT_RECURSIVE; Linux 5.12 and later).
fn make_all_read_only(path: &Path) -> io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is NUL-terminated and `attr` is a mount_attr of the size passed; the
    // kernel only reads both during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A volume's host path must be absolute, without `..`, and exist.
fn check_volume(path: &Path) -> Result<(), ShareError> {
    if !path.is_absolute() {
        return Err(ShareError::BadVolume(
            path.to_owned(),
            "not an absolute path",
        ));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(ShareError::BadVolume(
            path.to_owned(),
            "has a `..` component",
        ));
    }
    if fs::symlink_metadata(path).is_err() {
        return Err(ShareError::BadVolume(path.to_owned(), "does not exist"));
    }
    Ok(())
}

/// Unmounts container `id`'s root and volumes and removes its directory; nothing there is
/// fine.
pub fn detach(share: &Path, id: &str) -> Result<(), ShareError> {
    let dir = entry(share, id)?;
    if !dir.exists() {
        return Ok(());
    }
    unmount_below(&dir)?;
    remove_entries(&dir)
}

/// Unmounts every container's root and volumes and the share itself, then removes its
/// directories. Safe to repeat; a share that is not there is fine.
pub fn remove(share: &Path) -> Result<(), ShareError> {
    let source = source_of(share);
    let stage = share.with_file_name(STAGE_DIR);
    for dir in [share, &source, &stage] {
        unmount_below(dir)?;
    }
    for dir in [share, &source, &stage] {
        remove_entries(dir)?;
    }
    Ok(())
}

/// Unmounts everything at or below `dir`, deepest first; fails if anything stays mounted.
fn unmount_below(dir: &Path) -> Result<(), ShareError> {
    let mut mounts = mounts_below(dir, true);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for mount in &mounts {
        if let Err(e) = unmount(mount, UnmountFlags::DETACH) {
            // A peer's unmount may have taken it already.
            if e != rustix::io::Errno::INVAL && e != rustix::io::Errno::NOENT {
                tracing::warn!(mount = %mount.display(), "unmounting: {e}");
            }
        }
    }
    let left = mounts_below(dir, true);
    if !left.is_empty() {
        let list: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
        return Err(ShareError::StillMounted(dir.to_owned(), list.join(", ")));
    }
    Ok(())
}

/// Removes `dir` and what is below it, entry by entry, where nothing is mounted any more:
/// directories (empty once their mounts are gone) and the empty files volumes were mounted on.
fn remove_entries(dir: &Path) -> Result<(), ShareError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cannot list", dir)(e)),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err("cannot stat", &path))?;
        if kind.is_dir() {
            remove_entries(&path)?;
        } else {
            fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
        }
    }
    fs::remove_dir(dir).map_err(io_err("cannot remove", dir))
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
        let data = tempfile::tempdir().unwrap();
        let config = data.path().join("config");
        fs::write(&config, b"setting").unwrap();
        let share = create(sandbox.path()).unwrap();
        let volumes = [
            Volume {
                host_path: data.path().to_owned(),
                container_path: "/data".into(),
                read_only: false,
                recursive_read_only: false,
                propagation: Propagation::Private,
            },
            Volume {
                host_path: config.clone(),
                container_path: "/etc/config".into(),
                read_only: true,
                recursive_read_only: false,
                propagation: Propagation::Private,
            },
        ];
        attach(&share, "c1", image.path(), &volumes).unwrap();
        // Mounts made in the source show in the exported share.
        assert_eq!(
            fs::read(share.join(rootfs_path("c1")).join("file")).unwrap(),
            b"image"
        );
        assert_eq!(
            fs::read(share.join(volume_path("c1", 1))).unwrap(),
            b"setting"
        );
        // What the export allows writing: a writable volume, nothing else.
        fs::write(share.join(volume_path("c1", 0)).join("new"), b"x").unwrap();
        assert_eq!(fs::read(data.path().join("new")).unwrap(), b"x");
        assert!(fs::write(share.join(volume_path("c1", 1)), b"x").is_err());
        assert!(fs::write(share.join(rootfs_path("c1")).join("new"), b"x").is_err());
        assert!(fs::write(share.join("top"), b"x").is_err());
        assert!(fs::create_dir(share.join("c1/more")).is_err());
        // Bad ids and volumes are refused, leaving nothing.
        assert!(attach(&share, "../x", image.path(), &[]).is_err());
        let relative = [Volume {
            host_path: "etc".into(),
            container_path: "/etc".into(),
            read_only: true,
            recursive_read_only: false,
            propagation: Propagation::Private,
        }];
        assert!(attach(&share, "c3", image.path(), &relative).is_err());
        let missing = [Volume {
            host_path: data.path().join("absent"),
            container_path: "/absent".into(),
            read_only: true,
            recursive_read_only: false,
            propagation: Propagation::Private,
        }];
        assert!(attach(&share, "c3", image.path(), &missing).is_err());
        assert!(!source_of(&share).join("c3").exists());

        detach(&share, "c1").unwrap();
        assert!(!share.join("c1").exists());
        attach(&share, "c2", image.path(), &volumes).unwrap();
        remove(&share).unwrap();
        assert!(!share.exists() && !source_of(&share).exists());
        assert!(mounts_below(sandbox.path(), true).is_empty());
        // The image and the volumes' contents are untouched.
        assert!(image.path().join("file").exists());
        assert_eq!(fs::read(&config).unwrap(), b"setting");
        assert!(data.path().join("new").exists());
        remove(&share).unwrap();
    }

    #[test]
    fn host_mounts_reach_host_to_container_volumes_only() {
        let sandbox = tempfile::tempdir_in("/run").unwrap();
        let image = tempfile::tempdir().unwrap();
        // A host path that is a shared mount, as a kubelet's volume directories are.
        let host = tempfile::tempdir_in("/run").unwrap();
        mount_bind(host.path(), host.path()).unwrap();
        mount_change(host.path(), MountPropagationFlags::SHARED).unwrap();
        fs::create_dir(host.path().join("later")).unwrap();
        let share = create(sandbox.path()).unwrap();
        let volume = |propagation| Volume {
            host_path: host.path().to_owned(),
            container_path: "/v".into(),
            read_only: false,
            recursive_read_only: false,
            propagation,
        };
        attach(
            &share,
            "private",
            image.path(),
            &[volume(Propagation::Private)],
        )
        .unwrap();
        attach(
            &share,
            "slave",
            image.path(),
            &[volume(Propagation::HostToContainer)],
        )
        .unwrap();
        let tmpfs = host.path().join("later");
        rustix::mount::mount("tmpfs", &tmpfs, "tmpfs", MountFlags::empty(), None).unwrap();
        fs::write(tmpfs.join("mark"), b"m").unwrap();
        let seen = |id: &str| share.join(volume_path(id, 0)).join("later/mark").exists();
        assert!(
            seen("slave"),
            "a host mount did not reach the host-to-container volume"
        );
        assert!(!seen("private"), "a host mount reached the private volume");
        remove(&share).unwrap();
        unmount(&tmpfs, UnmountFlags::DETACH).unwrap();
        unmount(host.path(), UnmountFlags::DETACH).unwrap();
        assert!(mounts_below(sandbox.path(), true).is_empty());
    }

    #[test]
    fn read_only_volumes_leave_mounts_below_writable_unless_recursive() {
        let sandbox = tempfile::tempdir_in("/run").unwrap();
        let image = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir_in("/run").unwrap();
        let tmpfs = host.path().join("tmpfs");
        fs::create_dir(&tmpfs).unwrap();
        rustix::mount::mount("tmpfs", &tmpfs, "tmpfs", MountFlags::empty(), None).unwrap();
        let share = create(sandbox.path()).unwrap();
        let volume = |recursive_read_only, propagation| Volume {
            host_path: host.path().to_owned(),
            container_path: "/v".into(),
            read_only: true,
            recursive_read_only,
            propagation,
        };
        attach(
            &share,
            "plain",
            image.path(),
            &[volume(false, Propagation::Private)],
        )
        .unwrap();
        attach(
            &share,
            "recursive",
            image.path(),
            &[volume(true, Propagation::Private)],
        )
        .unwrap();
        let write =
            |id: &str, path: &str| fs::write(share.join(volume_path(id, 0)).join(path), b"x");
        assert!(write("plain", "top").is_err());
        write("plain", "tmpfs/below").unwrap();
        let refused = write("recursive", "tmpfs/below2").unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EROFS));
        // Recursive read-only is for read-only private volumes only.
        for bad in [
            Volume {
                read_only: false,
                ..volume(true, Propagation::Private)
            },
            volume(true, Propagation::HostToContainer),
        ] {
            assert!(matches!(
                attach(&share, "bad", image.path(), &[bad]),
                Err(ShareError::BadVolume(..))
            ));
        }
        remove(&share).unwrap();
        unmount(&tmpfs, UnmountFlags::DETACH).unwrap();
        assert!(mounts_below(sandbox.path(), true).is_empty());
    }
}
