//! The agent's containers: the table of them, each one's rootfs (an overlay of the read-only
//! image on a virtio-fs share, mounted once per tag under `/run/crx/fs/<tag>`, with upper and
//! work directories on the `/run` tmpfs), its cgroup, its main and exec processes, and every
//! request that acts on them. Plans for [`crate::spawn`] are built here from the OCI spec.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crx_agent_proto::{
    self as proto, ContainerInfo, ContainerState, ContainerStats, ErrorCode, ExitKind, ExitStatus,
    Volume,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, MountBuilder, PosixRlimitType, Spec};
use seccompiler::BpfProgram;

use crate::cgroup::Cgroup;
use crate::reaper::{Exit, Reaper};
use crate::spawn::{
    self, CapsPlan, MountPlan, NewRoot, ProcessIo, ProcessPlan, Target, TargetRoot,
};
use crate::{fail, io_fail, lock, Result};

const FS_DIR: &str = "/run/crx/fs";
const CONTAINERS_DIR: &str = "/run/crx/containers";

/// One process of a container; its stdio waits here until the host attaches.
#[derive(Default)]
pub struct Process {
    state: Mutex<ProcState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProcState {
    pid: Option<Pid>,
    io: IoSlot,
    terminal: Option<Arc<OwnedFd>>,
}

#[derive(Default)]
enum IoSlot {
    /// Not started yet.
    #[default]
    Pending,
    Ready(ProcessIo),
    /// Attached, or the container was removed.
    Taken,
}

impl Process {
    fn started(&self, pid: Pid, io: ProcessIo) {
        let mut state = lock(&self.state);
        state.pid = Some(pid);
        if let ProcessIo::Pty { master } = &io {
            state.terminal = master.try_clone().ok().map(Arc::new);
        }
        state.io = IoSlot::Ready(io);
        self.changed.notify_all();
    }

    pub fn pid(&self) -> Option<Pid> {
        lock(&self.state).pid
    }

    /// The process's stdio for its one attachment, waiting until it has started.
    pub fn take_io(&self) -> Result<(Pid, ProcessIo)> {
        let mut state = lock(&self.state);
        loop {
            match std::mem::replace(&mut state.io, IoSlot::Taken) {
                IoSlot::Pending => {
                    state.io = IoSlot::Pending;
                    state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                IoSlot::Ready(io) => {
                    let pid = state.pid.expect("a started process has a pid");
                    return Ok((pid, io));
                }
                IoSlot::Taken => {
                    return Err(fail(
                        ErrorCode::InvalidState,
                        "stdio already attached (or container removed)",
                    ))
                }
            }
        }
    }

    fn close(&self) {
        let mut state = lock(&self.state);
        state.io = IoSlot::Taken;
        state.terminal = None;
        self.changed.notify_all();
    }
}

/// Which pid namespace a container's processes live in, from its spec's `linux.namespaces`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PidMode {
    /// Its own (a `pid` entry without a path).
    Own,
    /// The pod's shared one ([`proto::POD_PID_NAMESPACE`]).
    Pod,
    /// Another container's ([`proto::container_pid_namespace`]).
    Of(String),
    /// The VM's (no `pid` entry).
    Vm,
}

impl PidMode {
    fn of(spec: &Spec) -> Result<PidMode> {
        let pid = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Pid));
        let Some(pid) = pid else {
            return Ok(PidMode::Vm);
        };
        let Some(path) = pid.path() else {
            return Ok(PidMode::Own);
        };
        if path == Path::new(proto::POD_PID_NAMESPACE) {
            return Ok(PidMode::Pod);
        }
        let target = path
            .strip_prefix(proto::CONTAINER_NAMESPACES_DIR)
            .ok()
            .and_then(|rest| rest.to_str())
            .and_then(|rest| rest.strip_suffix("/ns/pid"))
            .filter(|id| check_name("container id", id).is_ok());
        match target {
            Some(id) => Ok(PidMode::Of(id.to_owned())),
            None => Err(fail(
                ErrorCode::BadRequest,
                format!(
                    "pid namespace path {path:?} is neither the pod's ({}) nor a container's",
                    proto::POD_PID_NAMESPACE
                ),
            )),
        }
    }
}

pub struct Container {
    id: String,
    dir: PathBuf,
    spec: Spec,
    pid_mode: PidMode,
    /// The spec's seccomp profile, compiled (empty: unconfined); every process gets it.
    seccomp: Arc<Vec<BpfProgram>>,
    terminal: bool,
    cgroup: Cgroup,
    main: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.main.clone());
        }
        lock(&self.execs).get(exec_id).cloned().ok_or_else(|| {
            fail(
                ErrorCode::NotFound,
                format!("container {} has no exec {exec_id:?}", self.id),
            )
        })
    }

    fn running_pid(&self, reaper: &Reaper) -> Option<Pid> {
        self.main.pid().filter(|&pid| reaper.status(pid).is_none())
    }
}

/// Everything the agent runs.
#[derive(Default)]
pub struct Agent {
    pub reaper: Reaper,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// virtio-fs tags mounted under [`FS_DIR`].
    shares: Mutex<HashSet<String>>,
    /// The pod's shared pid namespace, made when a container first asks for it.
    pod_pid_namespace: Mutex<Option<OwnedFd>>,
}

impl Agent {
    /// The pod's shared pid namespace, starting its pause process the first time.
    fn pod_pid_namespace(&self) -> Result<OwnedFd> {
        let mut namespace = lock(&self.pod_pid_namespace);
        if namespace.is_none() {
            let pid = spawn::start_pod_init(&self.reaper)
                .map_err(io_fail("starting the pod's pause process"))?;
            let fd = File::open(format!("/proc/{pid}/ns/pid"))
                .map_err(io_fail("opening the pod's pid namespace"))?;
            *namespace = Some(fd.into());
        }
        let fd = namespace.as_ref().expect("made above");
        fd.try_clone()
            .map_err(io_fail("duplicating the pod's pid namespace"))
    }

    /// The pid namespace container `container`'s main process goes into.
    fn pid_namespace_for(&self, container: &Container) -> Result<spawn::PidNamespace> {
        Ok(match &container.pid_mode {
            PidMode::Own => spawn::PidNamespace::New,
            PidMode::Vm => spawn::PidNamespace::Agent,
            PidMode::Pod => spawn::PidNamespace::Join(self.pod_pid_namespace()?),
            PidMode::Of(id) => {
                let target = self.container(id)?;
                let init = target.running_pid(&self.reaper).ok_or_else(|| {
                    fail(
                        ErrorCode::InvalidState,
                        format!(
                            "container {id}, whose processes this one would share, is not running"
                        ),
                    )
                })?;
                let fd = File::open(format!("/proc/{init}/ns/pid"))
                    .map_err(io_fail("opening the target container's pid namespace"))?;
                spawn::PidNamespace::Join(fd.into())
            }
        })
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| fail(ErrorCode::NotFound, format!("no container {id:?}")))
    }

    pub fn process(&self, target: &proto::ProcessRef) -> Result<(Arc<Container>, Arc<Process>)> {
        let container = self.container(&target.container_id)?;
        let process = container.process(&target.exec_id)?;
        Ok((container, process))
    }

    pub fn create(&self, req: proto::CreateContainer) -> Result<()> {
        check_name("container id", &req.container_id)?;
        let mut spec: Spec = serde_json::from_slice(&req.oci_spec_json)
            .map_err(|e| fail(ErrorCode::BadRequest, format!("bad OCI spec: {e}")))?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| fail(ErrorCode::BadRequest, "the spec has no process"))?;
        let terminal = req.terminal || process.terminal().unwrap_or(false);
        let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
            Some(profile) => crate::seccomp::compile(profile)
                .map_err(|e| fail(ErrorCode::BadRequest, format!("seccomp profile: {e}")))?,
            None => Vec::new(),
        };
        let seccomp = Arc::new(seccomp);
        plan_process(process, terminal, &seccomp)?; // refuse a bad process now, not at start
        let pid_mode = PidMode::of(&spec)?;
        let rootfs = req
            .rootfs
            .ok_or_else(|| fail(ErrorCode::BadRequest, "no rootfs"))?;
        check_name("virtio-fs tag", &rootfs.fs_tag)?;
        let lower = self
            .share(&rootfs.fs_tag)?
            .join(relative_path(&rootfs.path)?);
        if !lower.is_dir() {
            return Err(fail(
                ErrorCode::NotFound,
                format!(
                    "rootfs {:?} is not a directory on {}",
                    rootfs.path, rootfs.fs_tag
                ),
            ));
        }
        self.add_volumes(&mut spec, &req.volumes)?;
        if lock(&self.containers).contains_key(&req.container_id) {
            return Err(fail(ErrorCode::AlreadyExists, "container exists"));
        }
        let dir = Path::new(CONTAINERS_DIR).join(&req.container_id);
        for sub in ["upper", "work", "rootfs"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(io_fail("creating the container dir"))?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        let mounted = mount(
            Some("overlay"),
            &dir.join("rootfs"),
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        );
        let cleanup = |dir: &Path| {
            let _ = umount2(&dir.join("rootfs"), MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir_all(dir);
        };
        if let Err(e) = mounted {
            cleanup(&dir);
            return Err(io_fail("mounting the overlay rootfs")(e.into()));
        }
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let cgroup = match Cgroup::create(&req.container_id, resources) {
            Ok(cgroup) => cgroup,
            Err(e) => {
                cleanup(&dir);
                return Err(io_fail("creating the cgroup")(e));
            }
        };
        let container = Arc::new(Container {
            id: req.container_id.clone(),
            dir,
            spec,
            pid_mode,
            seccomp,
            terminal,
            cgroup,
            main: Arc::default(),
            execs: Mutex::default(),
        });
        let mut containers = lock(&self.containers);
        if containers.contains_key(&req.container_id) {
            drop(containers);
            let _ = container.cgroup.remove();
            cleanup(&container.dir);
            return Err(fail(ErrorCode::AlreadyExists, "container exists"));
        }
        containers.insert(req.container_id, container);
        Ok(())
    }

    /// Appends `volumes` to the spec's mounts: recursive bind mounts of paths in virtio-fs
    /// shares, which must exist (writable: the host's share decides what may be written).
    fn add_volumes(&self, spec: &mut Spec, volumes: &[Volume]) -> Result<()> {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for volume in volumes {
            check_name("virtio-fs tag", &volume.fs_tag)?;
            relative_path(&volume.destination)?;
            let source = self
                .share(&volume.fs_tag)?
                .join(relative_path(&volume.path)?);
            if source.symlink_metadata().is_err() {
                return Err(fail(
                    ErrorCode::NotFound,
                    format!("volume {:?} is not on {}", volume.path, volume.fs_tag),
                ));
            }
            let options = vec!["rbind".to_owned()];
            let mount = MountBuilder::default()
                .destination(&volume.destination)
                .typ("bind")
                .source(source)
                .options(options)
                .build()
                .map_err(|e| fail(ErrorCode::BadRequest, format!("volume: {e}")))?;
            mounts.push(mount);
        }
        spec.set_mounts(Some(mounts));
        Ok(())
    }

    /// Mounts virtio-fs `tag` under [`FS_DIR`] once; returns its directory. It is mounted
    /// writable: what the guest may write is the host's decision (virtiofsd's `--readonly`, or
    /// the read-only host mounts in the container share).
    fn share(&self, tag: &str) -> Result<PathBuf> {
        let dir = Path::new(FS_DIR).join(tag);
        let mut shares = lock(&self.shares);
        if !shares.contains(tag) {
            std::fs::create_dir_all(&dir).map_err(io_fail("creating the share dir"))?;
            mount(
                Some(tag),
                &dir,
                Some("virtiofs"),
                MsFlags::MS_NODEV,
                None::<&str>,
            )
            .map_err(|e| io_fail(&format!("mounting virtio-fs {tag}"))(e.into()))?;
            shares.insert(tag.to_string());
        }
        Ok(dir)
    }

    pub fn start(&self, id: &str) -> Result<u32> {
        let container = self.container(id)?;
        let _serial = lock(&container.execs); // no exec while the container starts
        if container.main.pid().is_some() {
            return Err(fail(ErrorCode::InvalidState, "container already started"));
        }
        let spec = &container.spec;
        let process = spec.process().as_ref().expect("checked at create");
        let plan = plan_process(process, container.terminal, &container.seccomp)?;
        let rootfs = container.rootfs();
        let linux = spec.linux().as_ref();
        let paths = |list: Option<&Vec<String>>| -> Result<Vec<PathBuf>> {
            list.into_iter()
                .flatten()
                .map(|p| relative_path(p).map(|r| Path::new("/").join(r)))
                .collect()
        };
        let target = Target {
            root: TargetRoot::New(NewRoot {
                mounts: plan_mounts(spec, &rootfs)?,
                rootfs,
                hostname: spec.hostname().clone(),
                readonly_root: spec.root().as_ref().and_then(|r| r.readonly()) == Some(true),
                masked_paths: paths(linux.and_then(|l| l.masked_paths().as_ref()))?,
                readonly_paths: paths(linux.and_then(|l| l.readonly_paths().as_ref()))?,
            }),
            pid: self.pid_namespace_for(&container)?,
        };
        let procs = container
            .cgroup
            .procs_file()
            .map_err(io_fail("cgroup.procs"))?;
        let (pid, io) = spawn::spawn(&self.reaper, &plan, target, &procs)
            .map_err(io_fail("starting the container"))?;
        container.main.started(pid, io);
        Ok(pid.as_raw() as u32)
    }

    pub fn exec(&self, req: proto::ExecProcess) -> Result<u32> {
        let container = self.container(&req.container_id)?;
        check_name("exec id", &req.exec_id)?;
        let mut execs = lock(&container.execs);
        if execs.contains_key(&req.exec_id) {
            return Err(fail(ErrorCode::AlreadyExists, "exec id in use"));
        }
        let init = container
            .running_pid(&self.reaper)
            .ok_or_else(|| fail(ErrorCode::InvalidState, "container is not running"))?;
        let spec_process = container
            .spec
            .process()
            .as_ref()
            .expect("checked at create");
        let mut plan = plan_process(spec_process, req.terminal, &container.seccomp)?;
        if req.args.is_empty() {
            return Err(fail(ErrorCode::BadRequest, "exec without args"));
        }
        plan.args = req.args;
        plan.env = parse_env(&req.env)?;
        plan.cwd = PathBuf::from(if req.cwd.is_empty() { "/" } else { &req.cwd });
        if let Some(user) = req.user {
            plan.uid = user.uid;
            plan.gid = user.gid;
            plan.additional_gids = user.additional_gids;
        }
        let ns = |name: &str| {
            File::open(format!("/proc/{init}/ns/{name}"))
                .map(OwnedFd::from)
                .map_err(io_fail("opening the container's namespaces"))
        };
        let target = Target {
            pid: spawn::PidNamespace::Join(ns("pid")?),
            root: TargetRoot::Existing(vec![
                (ns("mnt")?, CloneFlags::CLONE_NEWNS),
                (ns("uts")?, CloneFlags::CLONE_NEWUTS),
            ]),
        };
        let procs = container
            .cgroup
            .procs_file()
            .map_err(io_fail("cgroup.procs"))?;
        let (pid, io) = spawn::spawn(&self.reaper, &plan, target, &procs)
            .map_err(io_fail("starting the exec process"))?;
        let process = Arc::new(Process::default());
        process.started(pid, io);
        execs.insert(req.exec_id, process);
        Ok(pid.as_raw() as u32)
    }

    /// Blocks until the process exits.
    pub fn wait(&self, target: &proto::ProcessRef) -> Result<ExitStatus> {
        let (container, process) = self.process(target)?;
        let pid = process
            .pid()
            .ok_or_else(|| fail(ErrorCode::InvalidState, "process not started"))?;
        Ok(self.exit_status(&container, pid))
    }

    /// `pid`'s exit (waiting for it) as the protocol reports it. When a container's main
    /// process ends and the container does not have a pid namespace of its own (whose end
    /// would have ended them), the container's other processes are killed, as runc does.
    pub fn exit_status(&self, container: &Container, pid: Pid) -> ExitStatus {
        let status = match self.reaper.wait(pid) {
            Exit::Code(code) => ExitKind::Code(code),
            Exit::Signal(signal) => ExitKind::Signal(signal),
        };
        if container.pid_mode != PidMode::Own && container.main.pid() == Some(pid) {
            if let Err(e) = container.cgroup.kill_all() {
                eprintln!("crx-agent: {}: cgroup.kill: {e}", container.id);
            }
        }
        ExitStatus {
            status: Some(status),
            oom_killed: container.cgroup.oom_kills() > 0,
        }
    }

    pub fn signal(&self, req: &proto::SignalProcess) -> Result<()> {
        let target = proto::ProcessRef {
            container_id: req.container_id.clone(),
            exec_id: req.exec_id.clone(),
        };
        let (container, process) = self.process(&target)?;
        let signal = Signal::try_from(req.signal)
            .map_err(|_| fail(ErrorCode::BadRequest, format!("bad signal {}", req.signal)))?;
        let pid = process
            .pid()
            .filter(|&pid| self.reaper.status(pid).is_none())
            .ok_or_else(|| fail(ErrorCode::InvalidState, "process is not running"))?;
        let sent = if req.exec_id.is_empty() && container.pid_mode == PidMode::Own {
            crate::init_signal::send(pid, signal) // PID 1 of the container's pid namespace
        } else {
            kill(pid, signal)
        };
        sent.map_err(|e| io_fail("kill")(e.into()))
    }

    pub fn resize(&self, req: &proto::ResizeTerminal) -> Result<()> {
        let target = proto::ProcessRef {
            container_id: req.container_id.clone(),
            exec_id: req.exec_id.clone(),
        };
        let (_, process) = self.process(&target)?;
        let terminal = lock(&process.state).terminal.clone();
        let terminal =
            terminal.ok_or_else(|| fail(ErrorCode::InvalidState, "process has no terminal"))?;
        set_window_size(&*terminal, req.rows, req.cols).map_err(io_fail("TIOCSWINSZ"))
    }

    pub fn stats(&self, ids: &[String]) -> Result<Vec<ContainerStats>> {
        let containers: Vec<Arc<Container>> = if ids.is_empty() {
            lock(&self.containers).values().cloned().collect()
        } else {
            ids.iter()
                .map(|id| self.container(id))
                .collect::<Result<_>>()?
        };
        Ok(containers
            .iter()
            .map(|c| {
                let usage = c.cgroup.usage();
                ContainerStats {
                    container_id: c.id.clone(),
                    cpu_usage_usec: usage.cpu_usage_usec,
                    memory_usage_bytes: usage.memory_usage_bytes,
                    memory_limit_bytes: usage.memory_limit_bytes,
                    pids_current: usage.pids_current,
                }
            })
            .collect())
    }

    pub fn list(&self) -> Vec<ContainerInfo> {
        let mut list: Vec<ContainerInfo> = lock(&self.containers)
            .values()
            .map(|c| {
                let pid = c.main.pid();
                let state = match pid {
                    None => ContainerState::Created,
                    Some(pid) if self.reaper.status(pid).is_none() => ContainerState::Running,
                    Some(_) => ContainerState::Stopped,
                };
                ContainerInfo {
                    container_id: c.id.clone(),
                    state: state as i32,
                    pid: pid.map_or(0, |p| p.as_raw() as u32),
                }
            })
            .collect();
        list.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        list
    }

    /// Applies new cgroup limits (those `req` sets) to a container.
    pub fn update(&self, req: &proto::UpdateContainer) -> Result<()> {
        let resources: LinuxResources = serde_json::from_slice(&req.resources_json)
            .map_err(|e| fail(ErrorCode::BadRequest, format!("bad resources: {e}")))?;
        let containers = lock(&self.containers);
        let container = containers.get(&req.container_id).ok_or_else(|| {
            fail(
                ErrorCode::NotFound,
                format!("no container {:?}", req.container_id),
            )
        })?;
        container
            .cgroup
            .apply(Some(&resources))
            .map_err(io_fail("updating the cgroup"))
    }

    /// Kills whatever still runs in the container, then removes it.
    pub fn remove(&self, id: &str) -> Result<()> {
        let container = lock(&self.containers)
            .remove(id)
            .ok_or_else(|| fail(ErrorCode::NotFound, format!("no container {id:?}")))?;
        let execs: Vec<Arc<Process>> = lock(&container.execs).drain().map(|(_, p)| p).collect();
        let processes: Vec<Arc<Process>> = std::iter::once(container.main.clone())
            .chain(execs)
            .collect();
        if let Err(e) = container.cgroup.kill_all() {
            eprintln!("crx-agent: {id}: cgroup.kill: {e}");
        }
        for process in &processes {
            if let Some(pid) = process.pid() {
                self.reaper.wait(pid);
                self.reaper.forget(pid);
            }
            process.close();
        }
        let _ = umount2(&container.rootfs(), MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&container.dir);
        container
            .cgroup
            .remove()
            .map_err(io_fail("removing the cgroup"))
    }
}

/// TIOCSWINSZ on a pty master.
pub fn set_window_size(master: &impl AsRawFd, rows: u32, cols: u32) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: rows.min(u16::MAX.into()) as u16,
        ws_col: cols.min(u16::MAX.into()) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer to a local struct.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Ids, exec ids and tags: 1–128 characters of `[A-Za-z0-9_.-]`, not `.` or `..`.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(fail(ErrorCode::BadRequest, format!("bad {what} {name:?}")))
    }
}

/// A path inside a share: relative (a leading `/` is dropped), no `..`, usable in overlay
/// options (no `,` `:` `\`).
fn relative_path(path: &str) -> Result<PathBuf> {
    let path = Path::new(path.trim_start_matches('/'));
    let clean = path.components().all(|c| matches!(c, Component::Normal(_)))
        && !path.to_string_lossy().contains([',', ':', '\\']);
    if clean {
        Ok(path.to_path_buf())
    } else {
        Err(fail(
            ErrorCode::BadRequest,
            format!("bad rootfs path {path:?}"),
        ))
    }
}

fn parse_env(env: &[String]) -> Result<Vec<(String, String)>> {
    env.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| fail(ErrorCode::BadRequest, format!("bad env entry {kv:?}")))
        })
        .collect()
}

fn plan_process(
    process: &oci_spec::runtime::Process,
    terminal: bool,
    seccomp: &Arc<Vec<BpfProgram>>,
) -> Result<ProcessPlan> {
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(fail(ErrorCode::BadRequest, "process.args is empty"));
    }
    let user = process.user();
    let caps = process.capabilities().as_ref();
    let set = |pick: fn(
        &oci_spec::runtime::LinuxCapabilities,
    ) -> &Option<oci_spec::runtime::Capabilities>|
     -> Result<caps::CapsHashSet> {
        caps.and_then(|c| pick(c).as_ref())
            .map(|set| set.iter().map(capability).collect())
            .unwrap_or_else(|| Ok(Default::default()))
    };
    let rlimits = process
        .rlimits()
        .iter()
        .flatten()
        .map(|r| Ok((rlimit_resource(r.typ())?, r.soft(), r.hard())))
        .collect::<Result<_>>()?;
    Ok(ProcessPlan {
        args,
        env: parse_env(process.env().as_deref().unwrap_or_default())?,
        cwd: process.cwd().clone(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        caps: CapsPlan {
            bounding: set(|c| c.bounding())?,
            effective: set(|c| c.effective())?,
            permitted: set(|c| c.permitted())?,
            inheritable: set(|c| c.inheritable())?,
            ambient: set(|c| c.ambient())?,
        },
        rlimits,
        no_new_privs: process.no_new_privileges().unwrap_or(false),
        seccomp: Arc::clone(seccomp),
        terminal,
    })
}

/// The OCI capability as the `caps` crate names it (both use the `CAP_…` names).
fn capability(cap: &oci_spec::runtime::Capability) -> Result<caps::Capability> {
    let name = serde_json::to_value(cap)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    spawn::capability(&name)
        .ok_or_else(|| fail(ErrorCode::BadRequest, format!("unknown capability {name}")))
}

fn rlimit_resource(typ: PosixRlimitType) -> Result<libc::__rlimit_resource_t> {
    use PosixRlimitType as T;
    Ok(match typ {
        T::RlimitCpu => libc::RLIMIT_CPU,
        T::RlimitFsize => libc::RLIMIT_FSIZE,
        T::RlimitData => libc::RLIMIT_DATA,
        T::RlimitStack => libc::RLIMIT_STACK,
        T::RlimitCore => libc::RLIMIT_CORE,
        T::RlimitRss => libc::RLIMIT_RSS,
        T::RlimitNproc => libc::RLIMIT_NPROC,
        T::RlimitNofile => libc::RLIMIT_NOFILE,
        T::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        T::RlimitAs => libc::RLIMIT_AS,
        T::RlimitLocks => libc::RLIMIT_LOCKS,
        T::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        T::RlimitNice => libc::RLIMIT_NICE,
        T::RlimitRtprio => libc::RLIMIT_RTPRIO,
        T::RlimitRttime => libc::RLIMIT_RTTIME,
        #[allow(unreachable_patterns)] // future rlimits
        _ => {
            return Err(fail(
                ErrorCode::BadRequest,
                format!("unsupported rlimit {typ}"),
            ))
        }
    })
}

/// The VM's resolver configuration, written by ConfigureSandbox from the pod's DNS.
const SANDBOX_RESOLV_CONF: &str = "/etc/resolv.conf";

/// The spec's mounts as the child performs them, targets under `rootfs`. File systems this
/// kernel lacks (e.g. `mqueue`) are skipped with a console note; `cgroup` means cgroup2 (the
/// guest has no v1). When the sandbox has a resolver configuration and the spec mounts none,
/// the container gets it bound at `/etc/resolv.conf` (as containerd gives every container its
/// sandbox's).
fn plan_mounts(spec: &Spec, rootfs: &Path) -> Result<Vec<MountPlan>> {
    let supported = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let supported: HashSet<&str> = supported
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    let mut plans = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let destination = m.destination().to_string_lossy();
        let target = rootfs.join(relative_path(&destination)?);
        let mut fstype = m.typ().clone().unwrap_or_else(|| "bind".into());
        if fstype == "cgroup" {
            fstype = "cgroup2".into();
        }
        let mut flags = MsFlags::empty();
        let mut data = Vec::new();
        for option in m.options().iter().flatten() {
            match option.as_str() {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "nodev" => flags |= MsFlags::MS_NODEV,
                "noexec" => flags |= MsFlags::MS_NOEXEC,
                "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
                "bind" => flags |= MsFlags::MS_BIND,
                "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
                "relatime" => flags |= MsFlags::MS_RELATIME,
                "strictatime" => flags |= MsFlags::MS_STRICTATIME,
                "noatime" => flags |= MsFlags::MS_NOATIME,
                "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
                "rw" | "suid" | "dev" | "exec" | "async" | "norelatime" | "private"
                | "rprivate" | "slave" | "rslave" | "shared" | "rshared" => {}
                other => data.push(other.to_string()),
            }
        }
        let bind = fstype == "bind" || flags.contains(MsFlags::MS_BIND);
        if bind {
            flags |= MsFlags::MS_BIND;
        } else if !supported.contains(fstype.as_str()) {
            eprintln!("crx-agent: skipping mount of {fstype} on {destination}: not in this kernel");
            continue;
        }
        let source = m.source().clone();
        plans.push(MountPlan {
            file: bind && source.as_deref().is_some_and(|s| !s.is_dir()),
            bind_readonly: bind && flags.contains(MsFlags::MS_RDONLY),
            dev: destination == "/dev" && fstype == "tmpfs",
            fstype: (!bind).then_some(fstype),
            source,
            target,
            flags,
            data: data.join(","),
        });
    }
    let resolv_conf_mounted = spec
        .mounts()
        .iter()
        .flatten()
        .any(|m| m.destination() == Path::new(SANDBOX_RESOLV_CONF));
    let target = rootfs.join(relative_path(SANDBOX_RESOLV_CONF)?);
    // An image's symlink there (e.g. to a systemd-resolved stub) stays as it is.
    let symlink = target.symlink_metadata().is_ok_and(|m| m.is_symlink());
    if !resolv_conf_mounted && !symlink && Path::new(SANDBOX_RESOLV_CONF).is_file() {
        plans.push(MountPlan {
            file: true,
            bind_readonly: false,
            dev: false,
            fstype: None,
            source: Some(SANDBOX_RESOLV_CONF.into()),
            target,
            flags: MsFlags::MS_BIND,
            data: String::new(),
        });
    }
    Ok(plans)
}
