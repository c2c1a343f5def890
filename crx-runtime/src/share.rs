//! The container share of a pod VM with several containers: the host directory
//! `<sandbox dir>/containers`, exported to the guest over virtio-fs as the tag
//! [`CONTAINERS_TAG`]. Each container has a directory in it, `<id>/`, holding its image root
//! filesystem (`<id>/rootfs`, bind-mounted read-only) and its volumes (`<id>/volumes/<n>`, each
//! a bind mount of a host path, read-only or not), mounted while the VM runs.
//!
//! The share's mounts live in a mount namespace of its own, never in the host's: a mount there
//! keeps nothing busy on the host (a host directory a volume's mounts sit on can still be
//! removed, as with runc, whose binds live in the container's namespace). The namespace is a
//! copy of the host's made when the share is, kept by an nsfs bind at
//! `<sandbox dir>/containers.ns/mnt` ([`namespace_file`]); the VMM is started in it (so is its
//! virtiofsd), and every change runs on a thread that enters it.
//!
//! Two mounts of one directory make the share work (as Kata's shared directory does). Mounts go
//! into `<sandbox dir>/containers.src`, a bind mount of itself with shared propagation; the
//! exported `containers` is a bind mount of it, a peer that receives every mount made in it,
//! and is itself read-only. Both are made before the VMM starts, so later mounts reach
//! virtiofsd's own mount namespace too (virtiofsd makes its mounts slaves of the VMM's) and the
//! guest sees a new container as a new directory of a share it already mounted. What the guest
//! may write is decided here, on the host, mount by mount: nothing at the top of the share or in
//! a container's directory (the read-only export), nothing in a root (a read-only bind), and
//! only what a writable volume's own bind mount allows. Each bind is a detached copy of its
//! host path (open_tree(2), taken in the host's namespace, where the path is), given its flags
//! and propagation (mount_setattr(2)) before it is attached (move_mount(2)), so the peers'
//! copies get them too.
//!
//! Removing the share unmounts everything below it, checks in the namespace's mountinfo that
//! nothing is mounted there any more, and only then deletes entries one by one (never
//! recursively): a delete through a live bind mount would reach into the image store or a
//! volume.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use rustix::mount::{
    mount_bind, mount_change, mount_remount, move_mount, open_tree, unmount, MountFlags,
    MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

/// The virtio-fs tag of the container share.
pub const CONTAINERS_TAG: &str = "containers";
/// The exported share's directory name inside the sandbox directory.
const SHARE_DIR: &str = "containers";
/// The directory the host mounts into, beside the share.
const SOURCE_DIR: &str = "containers.src";
/// The directory holding the nsfs bind of the share's mount namespace, beside the share.
const NAMESPACE_DIR: &str = "containers.ns";
/// The nsfs bind, in [`NAMESPACE_DIR`].
const NAMESPACE_FILE: &str = "mnt";
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

/// The nsfs bind of the mount namespace the share `share`'s mounts live in.
pub fn namespace_file(share: &Path) -> PathBuf {
    share.with_file_name(NAMESPACE_DIR).join(NAMESPACE_FILE)
}

/// Makes the share and its source in a new mount namespace (a copy of this one, receiving its
/// later mounts, sending none back) and binds that namespace at [`namespace_file`]; returns the
/// share's path. `sandbox_dir` must be absolute.
pub fn create(sandbox_dir: &Path) -> Result<PathBuf, ShareError> {
    let share = share_dir(sandbox_dir);
    let ns_dir = share.with_file_name(NAMESPACE_DIR);
    let ns_file = namespace_file(&share);
    // A private mount to hold the nsfs bind: a bind of a mount namespace must not propagate.
    let made = fs::create_dir(&ns_dir)
        .map_err(io_err("cannot create", &ns_dir))
        .and_then(|()| {
            mount_bind(&ns_dir, &ns_dir)
                .and_then(|()| mount_change(&ns_dir, MountPropagationFlags::PRIVATE))
                .map_err(|e| io_err("cannot make a mount of its own at", &ns_dir)(e.into()))
        })
        .and_then(|()| {
            fs::File::create(&ns_file)
                .map(drop)
                .map_err(io_err("cannot create", &ns_file))
        })
        .and_then(|()| on_thread(None, || make_in_new_namespace(&share)))
        .and_then(|ns| {
            let ns_path = PathBuf::from(format!("/proc/self/fd/{}", ns.as_raw_fd()));
            mount_bind(&ns_path, &ns_file).map_err(|e| {
                io_err("cannot bind the share's mount namespace at", &ns_file)(e.into())
            })
        });
    if let Err(e) = made {
        let _ = unmount(&ns_file, UnmountFlags::DETACH);
        let _ = unmount(&ns_dir, UnmountFlags::DETACH);
        let _ = fs::remove_file(&ns_file);
        for dir in [&share, &source_of(&share), &ns_dir] {
            let _ = fs::remove_dir(dir);
        }
        return Err(e);
    }
    Ok(share)
}

/// On a thread that has just unshared its mount namespace: makes every mount a slave, then the
/// share and its source; returns the namespace.
fn make_in_new_namespace(share: &Path) -> Result<OwnedFd, ShareError> {
    // SAFETY: CLONE_NEWNS (with CLONE_FS, which it implies) gives only this thread its own mount
    // namespace, root and working directory; no file descriptor table is unshared.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::FS | UnshareFlags::NEWNS) }
        .map_err(|e| io_err("cannot make a mount namespace for", share)(e.into()))?;
    let root = Path::new("/");
    mount_change(
        root,
        MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
    )
    .map_err(|e| io_err("cannot make the mounts slaves in the namespace of", share)(e.into()))?;
    let source = source_of(share);
    fs::create_dir(&source).map_err(io_err("cannot create", &source))?;
    mount_bind(&source, &source)
        .and_then(|()| mount_change(&source, MountPropagationFlags::SHARED))
        .map_err(|e| io_err("cannot make a mount of its own at", &source)(e.into()))?;
    fs::create_dir(share).map_err(io_err("cannot create", share))?;
    mount_bind(&source, share)
        .and_then(|()| mount_remount(share, MountFlags::BIND | MountFlags::RDONLY, ""))
        .map_err(|e| io_err("cannot make a read-only peer mount at", share)(e.into()))?;
    let ns_path = Path::new("/proc/thread-self/ns/mnt");
    fs::File::open(ns_path)
        .map(OwnedFd::from)
        .map_err(io_err("cannot open", ns_path))
}

/// Runs `f` on a thread of its own that first enters the mount namespace `ns` (if any), so that
/// no other thread of this process changes namespace.
fn on_thread<T: Send>(
    ns: Option<(&fs::File, &Path)>,
    f: impl FnOnce() -> Result<T, ShareError> + Send,
) -> Result<T, ShareError> {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            if let Some((ns, path)) = ns {
                // SAFETY: CLONE_FS gives this thread its own root and working directory, which
                // setns(2) into a mount namespace requires; no file descriptor table is unshared.
                unsafe { rustix::thread::unshare_unsafe(UnshareFlags::FS) }
                    .and_then(|()| {
                        rustix::thread::move_into_link_name_space(
                            ns.as_fd(),
                            Some(LinkNameSpaceType::Mount),
                        )
                    })
                    .map_err(|e| io_err("cannot enter the mount namespace at", path)(e.into()))?;
            }
            f()
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs `f` in the mount namespace of the share `share` (in this one if it has none: a share
/// made before shares had namespaces, or one half made).
fn in_namespace<T: Send>(
    share: &Path,
    f: impl FnOnce() -> Result<T, ShareError> + Send,
) -> Result<T, ShareError> {
    let file = namespace_file(share);
    if !mounts_below(&file, true).contains(&file) {
        return on_thread(None, f);
    }
    let ns = fs::File::open(&file).map_err(io_err("cannot open", &file))?;
    on_thread(Some((&ns, &file)), f)
}

/// Has the process `cmd` starts run in the share `share`'s mount namespace.
pub fn spawn_inside(cmd: &mut Command, share: &Path) -> Result<(), ShareError> {
    let file = namespace_file(share);
    let ns = OwnedFd::from(fs::File::open(&file).map_err(io_err("cannot open", &file))?);
    // SAFETY: runs in the forked child before exec; setns(2) is async-signal-safe, and the child
    // is single-threaded with its own root and working directory, as setns(2) into a mount
    // namespace requires. The closure owns the descriptor, open until the command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            rustix::thread::move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Mount))
                .map_err(io::Error::from)
        });
    }
    Ok(())
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
    let dir = entry(share, id)?;
    // Detached copies of the host paths, taken here, in the host's namespace, where they are.
    let root = detached_copy(
        rootfs,
        false,
        MountPropagationFlags::PRIVATE,
        libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOSUID,
        false,
    )?;
    let mut copies = Vec::with_capacity(volumes.len());
    for volume in volumes {
        check_volume(&volume.host_path)?;
        if volume.recursive_read_only
            && (!volume.read_only || volume.propagation != Propagation::Private)
        {
            return Err(ShareError::BadVolume(
                volume.host_path.clone(),
                "a recursive read-only volume must be read-only and private",
            ));
        }
        // A file is mounted on a file, a directory on a directory.
        let is_dir = fs::metadata(&volume.host_path)
            .map_err(io_err("cannot stat volume", &volume.host_path))?
            .is_dir();
        let mut attr = libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOSUID;
        if volume.read_only {
            attr |= libc::MOUNT_ATTR_RDONLY;
        }
        let propagation = match volume.propagation {
            Propagation::Private => MountPropagationFlags::PRIVATE,
            Propagation::HostToContainer => MountPropagationFlags::DOWNSTREAM,
        };
        // Recursive, as containerd binds volumes: mounts below the host path come along.
        let copy = detached_copy(
            &volume.host_path,
            true,
            propagation,
            attr,
            volume.recursive_read_only,
        )?;
        copies.push((copy, is_dir));
    }
    in_namespace(share, || {
        fs::create_dir(&dir).map_err(io_err("cannot create", &dir))?;
        let attached = attach_in(&dir, &root, &copies);
        if attached.is_err() {
            let _ = unmount_below(&dir).and_then(|()| remove_entries(&dir));
        }
        attached
    })?;
    tracing::debug!(id, rootfs = %rootfs.display(), volumes = volumes.len(), "container in the share");
    Ok(())
}

/// Attaches a container's root and volumes (each a detached copy, and whether it is a
/// directory) in its directory `dir` of the source.
fn attach_in(dir: &Path, root: &OwnedFd, volumes: &[(OwnedFd, bool)]) -> Result<(), ShareError> {
    let root_path = dir.join(ROOTFS);
    fs::create_dir(&root_path).map_err(io_err("cannot create", &root_path))?;
    attach_copy(root, &root_path)?;
    if volumes.is_empty() {
        return Ok(());
    }
    let volumes_dir = dir.join(VOLUMES);
    fs::create_dir(&volumes_dir).map_err(io_err("cannot create", &volumes_dir))?;
    for (index, (copy, is_dir)) in volumes.iter().enumerate() {
        let target = volumes_dir.join(index.to_string());
        make_mount_point(&target, *is_dir)?;
        attach_copy(copy, &target)?;
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

/// A detached copy of the mount at `from` (with the mounts below it if `recursive`), with
/// `propagation` from `from`'s mounts on every mount of it (private: none; a copy of a shared
/// mount would otherwise be its peer), the `MOUNT_ATTR_*` bits `attr` on its top mount, and
/// read-only on every mount if `all_read_only`.
fn detached_copy(
    from: &Path,
    recursive: bool,
    propagation: MountPropagationFlags,
    attr: u64,
    all_read_only: bool,
) -> Result<OwnedFd, ShareError> {
    let mut how = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        how |= OpenTreeFlags::AT_RECURSIVE;
    }
    let copy = open_tree(rustix::fs::CWD, from, how)
        .map_err(|e| io_err("cannot copy the mounts at", from)(e.into()))?;
    set_attr(&copy, 0, u64::from(propagation.bits()), true)
        .and_then(|()| set_attr(&copy, attr, 0, false))
        .and_then(|()| match all_read_only {
            true => set_attr(&copy, libc::MOUNT_ATTR_RDONLY, 0, true),
            false => Ok(()),
        })
        .map_err(io_err("cannot set the flags of the copy of", from))?;
    Ok(copy)
}

/// Attaches the detached copy `copy` at `target`, an existing mount point in the source.
fn attach_copy(copy: &OwnedFd, target: &Path) -> Result<(), ShareError> {
    move_mount(
        copy.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| io_err("cannot bind-mount", target)(e.into()))
}

/// Sets `attr` and `propagation` (0: unchanged) on the detached copy `copy`, on its top mount
/// or on every mount of it (mount_setattr(2); Linux 5.12 and later).
fn set_attr(copy: &OwnedFd, attr: u64, propagation: u64, recursive: bool) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: attr,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    let mut how = libc::AT_EMPTY_PATH;
    if recursive {
        how |= libc::AT_RECURSIVE;
    }
    // SAFETY: the path is an empty NUL-terminated string, `copy` an open mount descriptor and
    // `attr` a mount_attr of the size passed; the kernel only reads them during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            copy.as_raw_fd(),
            c"".as_ptr(),
            how,
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
    in_namespace(share, || {
        if !dir.exists() {
            return Ok(());
        }
        unmount_below(&dir)?;
        remove_entries(&dir)
    })
}

/// Unmounts every container's root and volumes and the share itself, then removes its
/// directories and the nsfs bind of its namespace. Safe to repeat; a share that is not there
/// is fine.
pub fn remove(share: &Path) -> Result<(), ShareError> {
    let source = source_of(share);
    in_namespace(share, || {
        for dir in [share, &source] {
            unmount_below(dir)?;
        }
        for dir in [share, &source] {
            remove_entries(dir)?;
        }
        Ok(())
    })?;
    // The namespace itself lasts as long as a process in it (the VMM, its virtiofsd).
    let ns_dir = share.with_file_name(NAMESPACE_DIR);
    unmount_below(&ns_dir)?;
    remove_entries(&ns_dir)
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

/// Mount points at or (with `inclusive`) below `dir` in the calling thread's mount namespace.
pub fn mounts_below(dir: &Path, inclusive: bool) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
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

    /// A host directory with a tmpfs mounted at `tmpfs` in it.
    fn host_dir_with_a_tmpfs() -> (tempfile::TempDir, PathBuf) {
        let host = tempfile::tempdir_in("/run").unwrap();
        let tmpfs = host.path().join("tmpfs");
        fs::create_dir(&tmpfs).unwrap();
        rustix::mount::mount("tmpfs", &tmpfs, "tmpfs", MountFlags::empty(), None).unwrap();
        (host, tmpfs)
    }

    /// Runs `f` where the share's mounts are.
    fn inside<T: Send>(share: &Path, f: impl FnOnce() -> T + Send) -> T {
        in_namespace(share, || Ok(f())).unwrap()
    }

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
        // The host's namespace has none of the share's mounts.
        let ns_file = namespace_file(&share);
        assert_eq!(
            mounts_below(sandbox.path(), true),
            [ns_file.parent().unwrap(), &ns_file]
        );
        assert!(!share.join(rootfs_path("c1")).join("file").exists());
        inside(&share, || {
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
            assert!(fs::write(share.join(volume_path("c1", 1)), b"x").is_err());
            assert!(fs::write(share.join(rootfs_path("c1")).join("new"), b"x").is_err());
            assert!(fs::write(share.join("top"), b"x").is_err());
            assert!(fs::create_dir(share.join("c1/more")).is_err());
        });
        assert_eq!(fs::read(data.path().join("new")).unwrap(), b"x");
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
        assert!(!namespace_file(&share).exists());
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
        let seen = |id: &str| {
            let mark = share.join(volume_path(id, 0)).join("later/mark");
            inside(&share, || mark.exists())
        };
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
        let (host, tmpfs) = host_dir_with_a_tmpfs();
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
        let write = |id: &str, path: &str| {
            let file = share.join(volume_path(id, 0)).join(path);
            inside(&share, || fs::write(&file, b"x"))
        };
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

    #[test]
    fn the_host_can_remove_a_directory_a_volume_holds() {
        let sandbox = tempfile::tempdir_in("/run").unwrap();
        let image = tempfile::tempdir().unwrap();
        let (host, tmpfs) = host_dir_with_a_tmpfs();
        let share = create(sandbox.path()).unwrap();
        let volume = Volume {
            host_path: host.path().to_owned(),
            container_path: "/v".into(),
            read_only: true,
            recursive_read_only: true,
            propagation: Propagation::Private,
        };
        attach(&share, "c", image.path(), &[volume]).unwrap();
        // What critest's read-only mount specs do while the container runs: unmount the host's
        // mount below the volume, then remove its directory (EBUSY had the share's copy of
        // that mount been in the host's namespace).
        unmount(&tmpfs, UnmountFlags::DETACH).unwrap();
        fs::remove_dir(&tmpfs).unwrap();
        remove(&share).unwrap();
        assert!(mounts_below(sandbox.path(), true).is_empty());
    }
}
