//! Starting a container process: `std::process::Command` (glibc `fork` + `execvp`) whose
//! `pre_exec` hook, running in the forked child, builds the container around it.
//!
//! A container's main process: the spawning thread first `unshare(CLONE_NEWPID)`s itself (a
//! thread's own pid namespace for children), so the child is PID 1 of a new pid namespace — or
//! `setns`es into the pod's shared one (whose PID 1 is the pause process [`start_pod_init`]
//! starts) or another container's, or stays in the VM's; the child joins the container's cgroup, unshares mount and UTS namespaces (the network and IPC
//! namespaces are the VM's: a pod's containers share them, as Kubernetes pods do, and the pod's
//! network and IPC sysctls apply to them), makes every mount private, sets the hostname,
//! mounts the spec's mounts inside the rootfs (plus the default devices on a `/dev` tmpfs), and
//! switches root. The agent runs from the initramfs, where `pivot_root` is refused (the
//! initramfs is the absolute root), so the child first `chroot("/run")` (a tmpfs mount, which
//! has a parent) and then `pivot_root(".", ".")` inside the rootfs (under `/run`), detaching the
//! old root, then makes the root read-only if asked and applies the read-only and masked
//! paths. The rootfs thereby sits on the namespace's `/run`, so an exec process that
//! `setns`es into the mount namespace (which puts it at the namespace's absolute root) does
//! `chroot("/run")` to reach the same root.
//!
//! Then, for every process: rlimits, a new session, the terminal (a pty opened *inside* the
//! container's devpts, so `tty` names `/dev/pts/N`; its master goes back to the agent over a
//! socketpair with SCM_RIGHTS), the capability bounding set, user and groups (keeping
//! capabilities across setuid), then permitted/effective/inheritable/ambient capabilities,
//! `no_new_privs`, the seccomp filters (before the user changes when there is no
//! `no_new_privs`, as runc does), and the working directory; `execvp` resolves the program with the
//! container's `PATH`. Any error ends the child before exec and comes back as the spawn error.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use caps::{CapSet, Capability, CapsHashSet};
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::unistd::{chdir, chroot, pivot_root, setsid, Gid, Pid, Uid};

use crate::reaper::Reaper;
use seccompiler::BpfProgram;
use std::sync::Arc;

/// A process as the container will run it (resolved from the spec or an exec request).
#[derive(Clone, Debug)]
pub struct ProcessPlan {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub caps: CapsPlan,
    /// (resource, soft, hard)
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
    pub no_new_privs: bool,
    /// Seccomp filters (compiled from the spec's profile; empty: none).
    pub seccomp: Arc<Vec<BpfProgram>>,
    pub terminal: bool,
}

/// The five capability sets.
#[derive(Clone, Debug, Default)]
pub struct CapsPlan {
    pub bounding: CapsHashSet,
    pub effective: CapsHashSet,
    pub permitted: CapsHashSet,
    pub inheritable: CapsHashSet,
    pub ambient: CapsHashSet,
}

/// One mount inside the rootfs (target already prefixed with the rootfs path).
#[derive(Clone, Debug)]
pub struct MountPlan {
    pub source: Option<PathBuf>,
    pub target: PathBuf,
    pub fstype: Option<String>,
    pub flags: MsFlags,
    pub data: String,
    /// A bind mount of a file (the target is created as a file).
    pub file: bool,
    /// Remount read-only after the bind (bind mounts ignore MS_RDONLY at first).
    pub bind_readonly: bool,
    /// A tmpfs on `/dev`: populate it with the default devices.
    pub dev: bool,
}

/// The pid namespace of a new container's processes.
pub enum PidNamespace {
    /// A new one: the main process is its PID 1.
    New,
    /// An existing one (the pod's, another container's, or an exec's container's).
    Join(OwnedFd),
    /// The agent's (the VM's).
    Agent,
}

/// The root and confinement of a new container.
#[derive(Clone, Debug)]
pub struct NewRoot {
    /// Absolute, under `/run`.
    pub rootfs: PathBuf,
    pub hostname: Option<String>,
    pub mounts: Vec<MountPlan>,
    pub readonly_root: bool,
    /// Hidden: `/dev/null` bound over files, an empty read-only tmpfs over directories.
    pub masked_paths: Vec<PathBuf>,
    /// Bound onto themselves read-only.
    pub readonly_paths: Vec<PathBuf>,
}

/// Where the process goes: its pid namespace and its root.
pub struct Target {
    pub pid: PidNamespace,
    pub root: TargetRoot,
}

/// The root a process gets.
pub enum TargetRoot {
    /// A new container's.
    New(NewRoot),
    /// An existing container's: its mount and UTS namespaces.
    Existing(Vec<(OwnedFd, CloneFlags)>),
}

/// The agent's ends of a started process's stdio.
pub enum ProcessIo {
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    Pty {
        master: OwnedFd,
    },
}

/// The devices bind-mounted from the agent's /dev into a container's `/dev` tmpfs.
const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
const DEV_LINKS: [(&str, &str); 5] = [
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// Starts `plan` in `target` inside cgroup `cgroup_procs`; returns its pid and stdio.
pub fn spawn(
    reaper: &Reaper,
    plan: &ProcessPlan,
    target: Target,
    cgroup_procs: &std::fs::File,
) -> io::Result<(Pid, ProcessIo)> {
    let program = plan
        .args
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "process has no args"))?;
    let mut command = Command::new(program);
    command
        .args(&plan.args[1..])
        .env_clear()
        .envs(plan.env.iter().cloned());

    let (agent_io, pty_socket) = if plan.terminal {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        (None, Some((ours, theirs)))
    } else {
        let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC);
        let (stdin_r, stdin_w) = pipe()?;
        let (stdout_r, stdout_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        command.stdin(stdin_r).stdout(stdout_w).stderr(stderr_w);
        (
            Some(ProcessIo::Pipes {
                stdin: stdin_w,
                stdout: stdout_r,
                stderr: stderr_r,
            }),
            None,
        )
    };

    let child = ChildSetup {
        plan: plan.clone(),
        cgroup_procs: cgroup_procs.as_raw_fd(),
        pty_socket: pty_socket.as_ref().map(|(_, theirs)| theirs.as_raw_fd()),
        root: match &target.root {
            TargetRoot::New(root) => Root::New(root.clone()),
            TargetRoot::Existing(namespaces) => Root::Join(
                namespaces
                    .iter()
                    .map(|(fd, kind)| (fd.as_raw_fd(), *kind))
                    .collect(),
            ),
        },
    };
    // SAFETY: the hook runs in the forked child before exec. glibc's fork leaves malloc usable
    // in the child, and the hook touches only its own captured data, descriptors the parent
    // keeps open until spawn() returns, and system calls.
    // A setup error reaches the host as the spawn's errno; its context goes to the process's
    // stderr (the host's stderr stream) as well.
    unsafe {
        command.pre_exec(move || {
            child
                .run()
                .inspect_err(|e| eprintln!("crx-agent: container setup: {e}"))
        })
    };

    // The pid namespace is a property of the spawning thread, so a fresh thread enters it.
    let pid = std::thread::scope(|scope| {
        scope
            .spawn(|| -> io::Result<Pid> {
                match &target.pid {
                    PidNamespace::New => unshare(CloneFlags::CLONE_NEWPID)?,
                    PidNamespace::Join(pid_ns) => setns(pid_ns, CloneFlags::CLONE_NEWPID)?,
                    PidNamespace::Agent => {}
                }
                reaper.spawn(|| command.spawn().map(|c| Pid::from_raw(c.id() as i32)))
            })
            .join()
            .map_err(|_| io::Error::other("spawning thread panicked"))?
    })?;
    drop(command); // closes the child's pipe ends

    let io = match (agent_io, pty_socket) {
        (Some(io), _) => io,
        (None, Some((ours, theirs))) => {
            drop(theirs);
            ProcessIo::Pty {
                master: receive_fd(&ours)?,
            }
        }
        (None, None) => unreachable!("a process has pipes or a terminal"),
    };
    Ok((pid, io))
}

/// Receives one descriptor sent with SCM_RIGHTS.
fn receive_fd(socket: &OwnedFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us; nobody else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(io::Error::other("the container did not send its terminal"))
}

enum Root {
    New(NewRoot),
    Join(Vec<(RawFd, CloneFlags)>),
}

/// What the forked child does before exec.
struct ChildSetup {
    plan: ProcessPlan,
    cgroup_procs: RawFd,
    pty_socket: Option<RawFd>,
    root: Root,
}

impl ChildSetup {
    fn run(&self) -> io::Result<()> {
        // SAFETY: writes 1 byte from a static buffer to a descriptor the parent keeps open.
        if unsafe { libc::write(self.cgroup_procs, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(context("joining the cgroup", io::Error::last_os_error()));
        }
        match &self.root {
            Root::New(root) => new_root(root)?,
            Root::Join(namespaces) => {
                for &(fd, kind) in namespaces {
                    // SAFETY: fd is a namespace descriptor the parent keeps open; borrowed
                    // only for this call.
                    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                    setns(fd, kind).map_err(|e| context("setns", e.into()))?;
                }
                chroot("/run").map_err(|e| context("chroot /run", e.into()))?;
            }
        }
        self.process()
    }

    fn process(&self) -> io::Result<()> {
        let plan = &self.plan;
        for &(resource, soft, hard) in &plan.rlimits {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit with a valid pointer to a local struct.
            if unsafe { libc::setrlimit(resource, &limit) } != 0 {
                return Err(context("setrlimit", io::Error::last_os_error()));
            }
        }
        setsid().map_err(|e| context("setsid", e.into()))?;
        if let Some(socket) = self.pty_socket {
            let pty = nix::pty::openpty(None, None).map_err(|e| context("openpty", e.into()))?;
            // SAFETY: TIOCSCTTY on the slave we just opened; this process leads a session.
            if unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
                return Err(context("TIOCSCTTY", io::Error::last_os_error()));
            }
            for fd in 0..=2 {
                // SAFETY: replaces stdin/stdout/stderr of this single-threaded child, which
                // owns no Rust object for them (std set them up as plain descriptors).
                if unsafe { libc::dup2(pty.slave.as_raw_fd(), fd) } < 0 {
                    return Err(context("dup2", io::Error::last_os_error()));
                }
            }
            let fds = [pty.master.as_raw_fd()];
            sendmsg::<()>(
                socket,
                &[IoSlice::new(b"t")],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )
            .map_err(|e| context("sending the terminal", e.into()))?;
        }
        // Seccomp as runc installs it: without no_new_privs while the process still has
        // CAP_SYS_ADMIN (before the user and capabilities change), with it as late as possible.
        let install_seccomp =
            || crate::seccomp::install(&plan.seccomp).map_err(|e| context("seccomp", e));
        if !plan.no_new_privs {
            install_seccomp()?;
        }
        set_user_and_caps(plan)?;
        if plan.no_new_privs {
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) only sets a flag on this process.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(context("no_new_privs", io::Error::last_os_error()));
            }
            install_seccomp()?;
        }
        chdir(&plan.cwd).map_err(|e| context(&format!("chdir {:?}", plan.cwd), e.into()))
    }
}

fn new_root(root: &NewRoot) -> io::Result<()> {
    let flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS;
    unshare(flags).map_err(|e| context("unshare", e.into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| context("making / private", e.into()))?;
    if let Some(name) = &root.hostname {
        nix::unistd::sethostname(name).map_err(|e| context("sethostname", e.into()))?;
    }
    for m in &root.mounts {
        mount_one(m).map_err(|e| context(&format!("mount {:?}", m.target), e))?;
    }
    chdir(&root.rootfs).map_err(|e| context("chdir rootfs", e.into()))?;
    chroot("/run").map_err(|e| context("chroot /run", e.into()))?;
    pivot_root(".", ".").map_err(|e| context("pivot_root", e.into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| context("detaching old root", e.into()))?;
    chdir("/").map_err(|e| context("chdir /", e.into()))?;
    if root.readonly_root {
        let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
        mount(None::<&str>, "/", None::<&str>, ro, None::<&str>)
            .map_err(|e| context("read-only root", e.into()))?;
    }
    for path in &root.readonly_paths {
        make_readonly(path).map_err(|e| context(&format!("read-only path {path:?}"), e))?;
    }
    for path in &root.masked_paths {
        mask(path).map_err(|e| context(&format!("masked path {path:?}"), e))?;
    }
    Ok(())
}

/// Binds `path` onto itself and makes that read-only (as runc does); a path the container does
/// not have is left alone.
fn make_readonly(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(path), path, None::<&str>, bind, None::<&str>)?;
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC;
    mount(None::<&str>, path, None::<&str>, ro, None::<&str>)?;
    Ok(())
}

/// Hides `path` (as runc does): an empty read-only tmpfs over a directory, `/dev/null` bound
/// over anything else; a path the container does not have is left alone.
fn mask(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if metadata.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )?;
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
    }
    Ok(())
}

/// Starts the pod's pause process: PID 1 of a new pid namespace, which containers that share
/// their pod's processes join. It only reaps the orphans that namespace hands it, and runs
/// until the VM powers off. Returns its pid.
pub fn start_pod_init(reaper: &Reaper) -> io::Result<Pid> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> io::Result<Pid> {
                unshare(CloneFlags::CLONE_NEWPID)?;
                reaper.spawn(|| {
                    // SAFETY: the child runs only async-signal-safe system calls
                    // (pod_init), never returns and never touches the parent's state.
                    match unsafe { libc::fork() } {
                        -1 => Err(io::Error::last_os_error()),
                        0 => pod_init(),
                        pid => Ok(Pid::from_raw(pid)),
                    }
                })
            })
            .join()
            .map_err(|_| io::Error::other("spawning thread panicked"))?
    })
}

/// The pause process's loop: reap every exited child, sleep until the next SIGCHLD.
fn pod_init() -> ! {
    extern "C" fn on_sigchld(_: libc::c_int) {}
    // SAFETY: in the freshly forked child, only async-signal-safe calls on local data: drop
    // the agent's descriptors, block SIGCHLD (so none is lost between the reaping and the
    // wait), give it a handler (an ignored SIGCHLD would not end sigsuspend), then alternate
    // waitpid and sigsuspend forever.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0);
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &chld, std::ptr::null_mut());
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigchld as *const () as usize;
        libc::sigaction(libc::SIGCHLD, &action, std::ptr::null_mut());
        let mut unblocked: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut unblocked);
        loop {
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            libc::sigsuspend(&unblocked);
        }
    }
}

fn mount_one(m: &MountPlan) -> io::Result<()> {
    if m.file {
        if let Some(parent) = m.target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&m.target)?;
    } else {
        std::fs::create_dir_all(&m.target)?;
    }
    let data = (!m.data.is_empty()).then_some(m.data.as_str());
    mount(
        m.source.as_deref(),
        &m.target,
        m.fstype.as_deref(),
        m.flags,
        data,
    )?;
    if m.bind_readonly {
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | m.flags;
        mount(None::<&str>, &m.target, None::<&str>, flags, None::<&str>)?;
    }
    if m.dev {
        for dev in DEFAULT_DEVICES {
            let target = m.target.join(dev);
            std::fs::File::create(&target)?;
            mount(
                Some(&Path::new("/dev").join(dev)),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
        }
        for (name, to) in DEV_LINKS {
            std::os::unix::fs::symlink(to, m.target.join(name))?;
        }
    }
    Ok(())
}

fn set_user_and_caps(plan: &ProcessPlan) -> io::Result<()> {
    let caps_err =
        |what: &str, e: caps::errors::CapsError| context(what, io::Error::other(e.to_string()));
    for cap in caps::all() {
        if !plan.caps.bounding.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| caps_err("bounding set", e))?;
        }
    }
    // SAFETY: prctl(PR_SET_KEEPCAPS) only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let groups: Vec<Gid> = plan
        .additional_gids
        .iter()
        .map(|&g| Gid::from_raw(g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| context("setgroups", e.into()))?;
    let (gid, uid) = (Gid::from_raw(plan.gid), Uid::from_raw(plan.uid));
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| context("setgid", e.into()))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| context("setuid", e.into()))?;
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    let effective_now: CapsHashSet = plan
        .caps
        .effective
        .intersection(&plan.caps.permitted)
        .copied()
        .collect();
    caps::set(None, CapSet::Effective, &effective_now).map_err(|e| caps_err("effective", e))?;
    caps::set(None, CapSet::Inheritable, &plan.caps.inheritable)
        .map_err(|e| caps_err("inheritable", e))?;
    caps::set(None, CapSet::Permitted, &plan.caps.permitted)
        .map_err(|e| caps_err("permitted", e))?;
    for &cap in &plan.caps.ambient {
        caps::raise(None, CapSet::Ambient, cap).map_err(|e| caps_err("ambient", e))?;
    }
    Ok(())
}

/// The capability named `name` (`CAP_…`).
pub fn capability(name: &str) -> Option<Capability> {
    name.parse().ok()
}

fn context(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
