//! Named network namespaces, made the way `ip netns add` makes them: an empty file in a
//! directory (`/run/netns` by default, so `ip netns` and CNI plugins see them), a new namespace
//! bind-mounted onto it by a thread that unshared its own network namespace, and the directory
//! a shared mount point so the bind mounts propagate to other mount namespaces. Removal is a
//! lazy unmount and an unlink, and succeeds when either is already done.
//!
//! Work inside a namespace runs on a thread of its own that joins it ([`run_in`]); the calling
//! thread's namespace never changes.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::mount::{MountPropagationFlags, UnmountFlags};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

/// Creates the network namespace `name` under `dir` and returns its path. Fails if it exists.
pub fn create(dir: &Path, name: &str) -> io::Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad namespace name {name:?}"),
        ));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    make_shared(dir)?;
    let path = dir.join(name);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&path)?;
    let target = path.clone();
    let mounted =
        run_in_new(move || rustix::mount::mount_bind("/proc/thread-self/ns/net", &target))
            .and_then(|bound| Ok(bound?));
    if let Err(e) = mounted {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Makes `dir` a shared mount point (bind-mounting it onto itself first if it is not a mount
/// point), as iproute2 does for `/run/netns`.
fn make_shared(dir: &Path) -> io::Result<()> {
    let shared = MountPropagationFlags::SHARED | MountPropagationFlags::REC;
    match rustix::mount::mount_change(dir, shared) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) => {
            rustix::mount::mount_bind(dir, dir)?;
            Ok(rustix::mount::mount_change(dir, shared)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Unmounts and removes the namespace file at `path`. Already gone (or never mounted) is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match rustix::mount::unmount(path, UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Runs `f` on a new thread inside a new, unnamed network namespace of its own and returns its
/// result. The namespace lives as long as something made in it does (a tap's descriptor keeps
/// its device, and the device its namespace), and is never visible to `ip netns`.
pub fn run_in_new<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    std::thread::spawn(move || -> io::Result<T> {
        // SAFETY: only the network namespace is unshared, and only for this thread, which
        // ends right after `f`; no file descriptor table is unshared.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNET) }?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
}

/// Runs `f` on a new thread inside the network namespace at `path` and returns its result.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let ns = fs::File::open(path)?;
    std::thread::spawn(move || -> io::Result<T> {
        rustix::thread::move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))?;
        drop(ns);
        Ok(f())
    })
    .join()
    .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_leave_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", ".", "..", "a/b"] {
            let err = create(dir.path(), bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn removing_what_is_not_there_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        remove(&dir.path().join("none")).unwrap();
        let plain = dir.path().join("plain");
        fs::write(&plain, b"").unwrap();
        remove(&plain).unwrap();
        assert!(!plain.exists());
    }
}
