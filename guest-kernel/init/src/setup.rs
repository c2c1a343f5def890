//! Early environment of PID 1: devtmpfs (only if `/dev/mem` is missing), console file
//! descriptors, the pseudo filesystems and `PATH`.

use std::ffi::CStr;
use std::path::Path;

/// `PATH` for init and the command it runs.
pub const PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

/// Mounts devtmpfs on /dev unless `/dev/mem` is already there. The kernel's DEVTMPFS_MOUNT
/// does not apply to an initramfs `/init`, so this normally mounts it.
pub fn ensure_devtmpfs() {
    if Path::new("/dev/mem").exists() {
        return;
    }
    let _ = std::fs::create_dir("/dev");
    let _ = mount(
        c"devtmpfs",
        c"/dev",
        c"devtmpfs",
        libc::MS_NOSUID,
        c"mode=0755",
    );
}

/// Makes sure fds 0, 1 and 2 are open (on /dev/console). The kernel opens them for init only
/// if the initramfs has a /dev/console node; the command inherits them.
pub fn ensure_console_fds() {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor.
    let missing = |fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0;
    if !(0..=2).any(missing) {
        return;
    }
    // SAFETY: open(2) of a NUL-terminated path; the result is checked.
    let console = unsafe { libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if console < 0 {
        return;
    }
    for fd in 0..=2 {
        if fd != console && missing(fd) {
            // SAFETY: dup2 onto a descriptor number that is not open (checked just above).
            unsafe { libc::dup2(console, fd) };
        }
    }
    if console > 2 {
        // SAFETY: our own descriptor, now duplicated where needed.
        unsafe { libc::close(console) };
    }
}

/// Mounts /proc, /sys and cgroup2 at /sys/fs/cgroup; failures are reported, not fatal.
pub fn mount_filesystems() {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (dir, fstype) in [(c"/proc", c"proc"), (c"/sys", c"sysfs")] {
        let _ = std::fs::create_dir(dir.to_str().unwrap_or("/"));
        if let Err(e) = mount(fstype, dir, fstype, flags, c"") {
            eprintln!(
                "crx-init: mount {} on {}: {e}",
                fstype.to_string_lossy(),
                dir.to_string_lossy()
            );
        }
    }
    // cgroup2 if the kernel has it (the directory exists in sysfs with CONFIG_CGROUPS).
    if Path::new("/sys/fs/cgroup").is_dir() {
        let _ = mount(c"cgroup2", c"/sys/fs/cgroup", c"cgroup2", flags, c"");
    }
}

/// The guest agent's extra mounts: tmpfs on /run (container rootfs upper layers and shares)
/// and /tmp, devpts on /dev/pts, tmpfs on /dev/shm; failures are reported, not fatal.
pub fn mount_agent_filesystems() {
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    let mounts = [
        (c"tmpfs", c"/run", flags, c"mode=0755"),
        (c"tmpfs", c"/tmp", flags, c"mode=1777"),
        (
            c"devpts",
            c"/dev/pts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            c"mode=0620,ptmxmode=0666",
        ),
        (c"tmpfs", c"/dev/shm", flags, c"mode=1777"),
    ];
    for (fstype, dir, flags, data) in mounts {
        let _ = std::fs::create_dir(dir.to_str().unwrap_or("/"));
        if let Err(e) = mount(fstype, dir, fstype, flags, data) {
            eprintln!(
                "crx-agent: mount {} on {}: {e}",
                fstype.to_string_lossy(),
                dir.to_string_lossy()
            );
        }
    }
}

/// Sets `PATH` for init and, by inheritance, the command.
pub fn set_path() {
    // Single-threaded here (PID 1 before running anything), so changing the environment is
    // sound.
    std::env::set_var("PATH", PATH);
}

fn mount(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: &CStr,
) -> std::io::Result<()> {
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; mount(2) does
    // not keep them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
