//! A task's root filesystem on the host: containerd's snapshot mounts (an overlay, or a bind
//! mount) mounted on the bundle's `rootfs`, from where the container share carries it into the
//! VM; unmounted when the task goes. Mounted here rather than through the shim crate's helper,
//! which forks and waits through a child reaper this shim does not run.

use std::ffi::CString;
use std::path::Path;

use containerd_shim::protos::types::mount::Mount;
use rustix::mount::{MountFlags, UnmountFlags};

/// Why a snapshot could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("mount option {0:?} holds a NUL byte")]
    Nul(String),
    #[error("mounting {fs_type} {device:?} on {target}: {errno}")]
    Mount {
        fs_type: String,
        device: String,
        target: String,
        errno: rustix::io::Errno,
    },
}

/// Splits mount options into flags and the file system's data.
fn flags_and_data(options: &[String]) -> (MountFlags, Vec<&str>) {
    let mut flags = MountFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MountFlags::RDONLY,
            "rw" | "suid" | "dev" | "exec" => {}
            "nosuid" => flags |= MountFlags::NOSUID,
            "nodev" => flags |= MountFlags::NODEV,
            "noexec" => flags |= MountFlags::NOEXEC,
            "bind" => flags |= MountFlags::BIND,
            "rbind" => flags |= MountFlags::BIND | MountFlags::REC,
            "noatime" => flags |= MountFlags::NOATIME,
            "relatime" => flags |= MountFlags::RELATIME,
            other => data.push(other),
        }
    }
    (flags, data)
}

/// Mounts `mounts` on `target`, in order.
pub fn mount(mounts: &[Mount], target: &Path) -> Result<(), RootfsError> {
    for m in mounts {
        let (flags, data) = flags_and_data(&m.options);
        let data = data.join(",");
        let data_c = CString::new(data.clone()).map_err(|_| RootfsError::Nul(data.clone()))?;
        let fs_type = if flags.contains(MountFlags::BIND) {
            ""
        } else {
            m.type_.as_str()
        };
        let mounted = rustix::mount::mount(
            m.source.as_str(),
            target,
            fs_type,
            flags,
            (!data.is_empty()).then_some(data_c.as_c_str()),
        );
        let error = |errno| RootfsError::Mount {
            fs_type: m.type_.clone(),
            device: m.source.clone(),
            target: target.display().to_string(),
            errno,
        };
        mounted.map_err(error)?;
        // A bind mount takes "ro" only on a remount.
        if flags.contains(MountFlags::BIND | MountFlags::RDONLY) {
            rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, c"")
                .map_err(error)?;
        }
    }
    Ok(())
}

/// Unmounts what [`mount`] put on `target` (nothing mounted is fine).
pub fn unmount(target: &Path) -> Result<(), rustix::io::Errno> {
    loop {
        match rustix::mount::unmount(target, UnmountFlags::DETACH) {
            Ok(()) => {}
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let options: Vec<String> = ["ro", "rbind", "nosuid", "lowerdir=/a:/b", "index=off"]
            .map(String::from)
            .into();
        let (flags, data) = flags_and_data(&options);
        assert_eq!(
            flags,
            MountFlags::RDONLY | MountFlags::BIND | MountFlags::REC | MountFlags::NOSUID
        );
        assert_eq!(data, ["lowerdir=/a:/b", "index=off"]);
    }
}
