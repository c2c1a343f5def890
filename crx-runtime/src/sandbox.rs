//! Pod sandboxes on the host: one `crx-vmm` process per sandbox, booted with the guest agent as
//! PID 1, a hybrid-vsock socket to reach it, virtio-fs shares for root filesystems, and the
//! state directory that lets any later `crx` process (or a restarted shim) find it again.
//!
//! Layout, all under `<run root>/sandboxes/<id>/` (mode 0700, root's alone): `state.json`,
//! `vsock` (the hybrid-vsock socket; guest ports are reached with `CONNECT <port>`),
//! `console.log` (the guest console), `vmm.log` (the VMM's own output) and virtiofsd's
//! vhost-user sockets, and for a sandbox of several containers the container share
//! (`containers/`, see [`crate::share`]). A sandbox owns nothing on the host outside that
//! directory and its processes (the VMM, and virtiofsd children that die with it,
//! `PR_SET_PDEATHSIG`), except its pod network when it has one: a network namespace and what
//! CNI made for it, recorded in the state and torn down when the network is released or the
//! sandbox removed (see [`crate::network`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crx_agent_proto::{ConfigureSandbox, Dns, Interface};

use crate::agent::{AgentClient, AgentError};
use crate::network::{self, NetworkError, NetworkState, PodNetwork};
use crate::share::{self, ShareError, CONTAINERS_TAG};
use crate::template;

/// Where sandboxes live unless configured otherwise.
pub const DEFAULT_RUN_ROOT: &str = "/run/crx";
/// The guest's vsock context ID (each VM has its own vsock device, so every guest can use 3).
pub const GUEST_CID: u32 = 3;
/// The agent binary in CRX's initrd, booted as PID 1.
pub const AGENT_INIT: &str = "/bin/crx-agent";
/// How long a VM restored from a template may take until its agent answers.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest Unix socket path (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Room kept for the names of sockets in a sandbox directory (`vsock_<port>`, virtiofsd's
/// `crx-virtiofs-<pid>-<n>.sock.pid`).
const SOCKET_NAME_ROOM: usize = 40;

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox id {0:?} is invalid: use 1 to 64 letters, digits, '_', '.', '-', not starting with '.' or '-'")]
    InvalidId(String),
    #[error("sandbox {0} already exists")]
    Exists(String),
    #[error("sandbox directory {0} is too long for the Unix sockets in it: use a shorter run root or id")]
    PathTooLong(PathBuf),
    #[error("no sandbox {0}")]
    NotFound(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the VMM {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sandbox state {path} is unreadable: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("the VMM of sandbox {id} exited before its agent answered; its log:\n{log}")]
    VmmExited { id: String, log: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("sandbox {id}: {source}")]
    Network {
        id: String,
        #[source]
        source: NetworkError,
    },
    #[error("the guest of sandbox {id} could not apply: {skipped}")]
    Configure { id: String, skipped: String },
    #[error("the container share of sandbox {id}: {source}")]
    Share {
        id: String,
        #[source]
        source: ShareError,
    },
}

impl SandboxError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SandboxError + 'a {
        move |source| SandboxError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// A host directory shared into the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub tag: String,
    pub dir: PathBuf,
    pub read_only: bool,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub id: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Guest kernel and initrd; `None` is the installed default guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub shares: Vec<Share>,
    /// The `crx-vmm` binary.
    pub vmm: PathBuf,
    /// Free-form facts kept with the sandbox (the image it runs, the command, …).
    pub labels: BTreeMap<String, String>,
    /// The pod network of the VM's one network interface; `None`: no network device.
    pub network: Option<PodNetwork>,
    /// Whether the VM gets the container share ([`crate::share`], tag
    /// [`CONTAINERS_TAG`]), into which containers' roots and volumes are mounted while it runs.
    pub container_share: bool,
    /// Restore the VM from a pod template when one fits (made on first use, see
    /// [`crate::template`]); false boots it cold.
    pub template: bool,
}

/// What the guest as a whole gets besides its network (see [`Sandbox::configure`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestSettings {
    pub hostname: String,
    /// `None`: the pod network's DNS, if CNI gave any.
    pub dns: Option<Dns>,
    pub sysctls: BTreeMap<String, String>,
}

/// What is persisted about a sandbox (`state.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    pub id: String,
    pub vmm_pid: u32,
    /// The VMM's start time in clock ticks since boot (`/proc/<pid>/stat` field 22): tells the
    /// VMM apart from a later process that reuses its pid.
    pub vmm_start_ticks: u64,
    pub created_unix: u64,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub shares: Vec<Share>,
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkState>,
    /// The container share's host directory, when the sandbox has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_share: Option<PathBuf>,
    /// The pod template the VM was restored from; `None`: booted cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PathBuf>,
    /// Milliseconds from the VMM's start until its agent first answered (the pod VM's boot, or
    /// restore, as the runtime sees it); `None` until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
}

/// One sandbox: its directory, its state and, in the process that started it, the VMM child
/// and when it was started.
#[derive(Debug)]
pub struct Sandbox {
    dir: PathBuf,
    state: SandboxState,
    child: Option<Child>,
    spawned: Option<Instant>,
}

/// Checks a sandbox id: it names a directory, so nothing that could leave `sandboxes/`.
pub fn check_id(id: &str) -> Result<(), SandboxError> {
    let ok = (1..=64).contains(&id.len())
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::InvalidId(id.to_owned()))
    }
}

/// Whether the VMM's and virtiofsd's Unix sockets fit in `dir` (the sockets of a VM are made
/// in its directory).
pub(crate) fn sockets_fit_in(dir: &Path) -> bool {
    dir.as_os_str().len() + 1 + SOCKET_NAME_ROOM <= MAX_SOCKET_PATH
}

fn sandboxes_dir(run_root: &Path) -> PathBuf {
    run_root.join("sandboxes")
}

impl Sandbox {
    /// Creates the sandbox directory, starts its VMM with the agent as init, and records it.
    /// The VMM runs in its own process group, so a terminal's ^C reaches `crx`, not the VM.
    pub fn start(run_root: &Path, config: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        check_id(&config.id)?;
        let parent = sandboxes_dir(run_root);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(SandboxError::io("cannot create", &parent))?;
        let dir = parent.join(&config.id);
        if !sockets_fit_in(&dir) {
            return Err(SandboxError::PathTooLong(dir));
        }
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists(config.id.clone()))
            }
            Err(e) => return Err(SandboxError::io("cannot create", &dir)(e)),
        }
        let network_error = |source| SandboxError::Network {
            id: config.id.clone(),
            source,
        };
        let share_error = |source| SandboxError::Share {
            id: config.id.clone(),
            source,
        };
        let container_share = if config.container_share {
            match share::create(&dir) {
                Ok(path) => Some(path),
                Err(e) => {
                    let _ = fs::remove_dir_all(&dir);
                    return Err(share_error(e));
                }
            }
        } else {
            None
        };
        // Undoes the share; the directory is only deleted once nothing is mounted in it.
        let undo_share = || match &container_share {
            Some(path) => match share::remove(path) {
                Ok(()) => {
                    let _ = fs::remove_dir_all(&dir);
                }
                Err(e) => tracing::warn!(id = %config.id, "{}", share_error(e)),
            },
            None => {
                let _ = fs::remove_dir_all(&dir);
            }
        };
        let attached = config.network.as_ref().map(|net| match net {
            PodNetwork::Cni(cni) => network::setup(cni, &config.id),
            PodNetwork::Join { netns, ifname } => network::join(netns, ifname, &config.id),
        });
        let network = match attached.transpose() {
            Ok(network) => network,
            Err(e) => {
                undo_share();
                return Err(network_error(e));
            }
        };
        let network_state = network.as_ref().map(|(state, _)| state.clone());
        match Self::spawn_from_template(run_root, &dir, config, network, container_share.clone()) {
            Ok(sandbox) => Ok(sandbox),
            Err(e) => {
                if let Some(state) = network_state {
                    if let Err(undo) = network::teardown(&state) {
                        tracing::warn!(id = %config.id, "{}", network_error(undo));
                    }
                }
                undo_share();
                Err(e)
            }
        }
    }

    /// Starts the VMM restored from the pod template that fits (made now if there is none
    /// yet), and checks its agent answers; boots it cold when templates are off, none fits, or
    /// the template fails (which is then discarded, to be made again).
    fn spawn_from_template(
        run_root: &Path,
        dir: &Path,
        config: &SandboxConfig,
        network: Option<(NetworkState, OwnedFd)>,
        container_share: Option<PathBuf>,
    ) -> Result<Sandbox, SandboxError> {
        let template = if config.template {
            template::find_or_build(run_root, config)
                .inspect_err(
                    |e| tracing::warn!(id = %config.id, "no pod template, booting cold: {e}"),
                )
                .ok()
        } else {
            None
        };
        let Some(template) = template else {
            return Self::spawn(dir, config, None, network.as_ref(), container_share);
        };
        // The tap stays open here until the restored guest answers: a cold boot after a failed
        // restore needs it again (it would die with the failed VMM's descriptor otherwise).
        let mut sandbox = Self::spawn(
            dir,
            config,
            Some(&template),
            network.as_ref(),
            container_share.clone(),
        )?;
        match sandbox.agent(Instant::now() + RESTORE_TIMEOUT) {
            Ok(_) => Ok(sandbox),
            Err(e) => {
                tracing::warn!(id = %config.id, "restoring the pod template failed, booting cold: {e}");
                sandbox.kill();
                template::discard(&template);
                let _ = fs::remove_file(sandbox.vsock_path());
                // Kept beside the cold boot's, for diagnosis.
                for log in ["vmm.log", "console.log"] {
                    let _ = fs::rename(dir.join(log), dir.join(format!("restore-failed.{log}")));
                }
                Self::spawn(dir, config, None, network.as_ref(), container_share)
            }
        }
    }

    /// Starts the VMM (restoring `template` if given); with a network, it inherits the tap's
    /// descriptor, and the guest's interface gets the pod's MAC.
    fn spawn(
        dir: &Path,
        config: &SandboxConfig,
        template: Option<&Path>,
        network: Option<&(NetworkState, OwnedFd)>,
        container_share: Option<PathBuf>,
    ) -> Result<Sandbox, SandboxError> {
        let log_path = dir.join("vmm.log");
        let log =
            fs::File::create(&log_path).map_err(SandboxError::io("cannot create", &log_path))?;
        let log_err = log
            .try_clone()
            .map_err(SandboxError::io("cannot duplicate", &log_path))?;
        let start = template.map_or(VmmStart::Boot, VmmStart::Restore);
        let mut cmd = vmm_command(
            config,
            start,
            dir,
            &config.shares,
            container_share.as_deref(),
        );
        if let Some((state, tap)) = network {
            pass_tap(&mut cmd, tap.as_fd(), &state.guest.mac);
        }
        // The VMM, and the virtiofsd it starts, see the share's mounts in its namespace.
        if let Some(share) = &container_share {
            share::spawn_inside(&mut cmd, share).map_err(|source| SandboxError::Share {
                id: config.id.clone(),
                source,
            })?;
        }
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let spawned = Instant::now();
        let child = cmd.spawn().map_err(|source| SandboxError::Spawn {
            path: config.vmm.clone(),
            source,
        })?;
        let pid = child.id();
        let state = SandboxState {
            id: config.id.clone(),
            vmm_pid: pid,
            vmm_start_ticks: start_ticks(pid).unwrap_or(0),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            shares: config.shares.clone(),
            labels: config.labels.clone(),
            network: network.map(|(state, _)| state.clone()),
            container_share,
            template: template.map(Path::to_owned),
            ready_ms: None,
        };
        let mut sandbox = Sandbox {
            dir: dir.to_owned(),
            state,
            child: Some(child),
            spawned: Some(spawned),
        };
        if let Err(e) = sandbox.save() {
            sandbox.kill();
            return Err(e);
        }
        tracing::info!(id = %config.id, pid, restored = template.is_some(), "sandbox VMM started");
        Ok(sandbox)
    }

    fn save(&self) -> Result<(), SandboxError> {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join(".state.json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.state).expect("state serializes");
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(SandboxError::io("cannot write", &path))
    }

    /// The sandbox `id`, as recorded by whichever process started it.
    pub fn open(run_root: &Path, id: &str) -> Result<Sandbox, SandboxError> {
        check_id(id)?;
        let dir = sandboxes_dir(run_root).join(id);
        let path = dir.join("state.json");
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SandboxError::NotFound(id.to_owned()))
            }
            Err(e) => return Err(SandboxError::io("cannot read", &path)(e)),
        };
        let state: SandboxState =
            serde_json::from_slice(&bytes).map_err(|e| SandboxError::State {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if state.id != id {
            return Err(SandboxError::State {
                path,
                reason: format!("it names sandbox {:?}", state.id),
            });
        }
        Ok(Sandbox {
            dir,
            state,
            child: None,
            spawned: None,
        })
    }

    /// Every sandbox under `run_root`, by id. A directory whose state cannot be read is listed
    /// as an error, not skipped, so it can be removed.
    pub fn list(run_root: &Path) -> Result<Vec<Result<Sandbox, SandboxError>>, SandboxError> {
        let parent = sandboxes_dir(run_root);
        let entries = match fs::read_dir(&parent) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SandboxError::io("cannot list", &parent)(e)),
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| check_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids.iter().map(|id| Sandbox::open(run_root, id)).collect())
    }

    pub fn id(&self) -> &str {
        &self.state.id
    }

    pub fn state(&self) -> &SandboxState {
        &self.state
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hybrid-vsock socket of the VM.
    pub fn vsock_path(&self) -> PathBuf {
        self.dir.join("vsock")
    }

    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Hands the VMM child (in the process that started it) to a thread that waits for it, so
    /// a long-lived caller such as the CRI server leaves no zombie when the VM ends; the
    /// sandbox then follows the VMM by its recorded pid like any later process does.
    pub fn reap_in_background(&mut self) {
        if let Some(mut child) = self.child.take() {
            let id = self.state.id.clone();
            let spawned = std::thread::Builder::new()
                .name("vmm-reaper".into())
                .spawn(move || match child.wait() {
                    Ok(status) => tracing::info!(id, %status, "sandbox VMM exited"),
                    Err(e) => tracing::warn!(id, "waiting for the sandbox VMM: {e}"),
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a thread to reap a VMM: {e}");
            }
        }
    }

    /// Whether the VMM process still runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => {
                let pid = self.state.vmm_pid;
                start_ticks(pid).is_some_and(|t| t == self.state.vmm_start_ticks) && !is_zombie(pid)
            }
        }
    }

    /// Connects to the agent, retrying while the guest boots, until `deadline`; fails early
    /// with the VMM's log when the VMM has exited. The first answer in the process that started
    /// the VMM records how long the VM took to be ready.
    pub fn agent(&mut self, deadline: Instant) -> Result<AgentClient, SandboxError> {
        let vsock = self.vsock_path();
        let agent = AgentClient::connect_while_running(&vsock, deadline, || self.is_running())
            .map_err(|e| match e {
                AgentError::VmmExited => SandboxError::VmmExited {
                    id: self.state.id.clone(),
                    log: self.log_tail(),
                },
                e => e.into(),
            })?;
        if let (Some(spawned), None) = (self.spawned, self.state.ready_ms) {
            self.state.ready_ms = Some(spawned.elapsed().as_millis() as u64);
            self.save()?;
        }
        Ok(agent)
    }

    /// The VMM and every process under it (its virtiofsd children), by pid; empty when the VMM
    /// no longer runs.
    pub fn processes(&mut self) -> Vec<i32> {
        if !self.is_running() {
            return Vec::new();
        }
        let parents: Vec<(i32, i32)> = procfs::process::all_processes()
            .map(|all| {
                all.flatten()
                    .filter_map(|p| Some((p.pid, p.stat().ok()?.ppid)))
                    .collect()
            })
            .unwrap_or_default();
        let mut tree = vec![self.state.vmm_pid as i32];
        let mut next = 0;
        while next < tree.len() {
            let parent = tree[next];
            tree.extend(
                parents
                    .iter()
                    .filter(|(_, pp)| *pp == parent)
                    .map(|(p, _)| *p),
            );
            next += 1;
        }
        tree
    }

    /// Whether the VMM still runs, or how it ended if this process started it, for error
    /// reports. A VMM on its way out gets up to `grace` to end first: a guest connection that
    /// broke off is often the first sign of a VM that failed, and the VMM writes why to its log
    /// as it exits.
    pub fn vmm_condition(&mut self, grace: Duration) -> String {
        self.wait_exit(grace);
        let pid = self.state.vmm_pid;
        match self.child.as_mut().map(|child| child.try_wait()) {
            Some(Ok(Some(status))) => format!("VMM (pid {pid}) ended: {status}"),
            _ if self.is_running() => format!("VMM (pid {pid}) running"),
            _ => format!("VMM (pid {pid}) gone"),
        }
    }

    /// The last lines of the VMM's log and the guest console, for error reports.
    pub fn log_tail(&self) -> String {
        let tail = |name: &str| {
            let text = fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        format!(
            "{}\n--- guest console ---\n{}",
            tail("vmm.log"),
            tail("console.log")
        )
    }

    /// Configures the guest through its agent: `settings`, the loopback interface up and, with
    /// a pod network, the interface's MAC, MTU, addresses and routes and the network's DNS
    /// (unless `settings` has its own). Anything the guest could not apply is an error.
    pub fn configure(
        &self,
        agent: &mut AgentClient,
        settings: &GuestSettings,
    ) -> Result<(), SandboxError> {
        let mut request = ConfigureSandbox {
            hostname: settings.hostname.clone(),
            dns: settings.dns.clone(),
            interfaces: vec![Interface {
                name: "lo".into(),
                ..Interface::default()
            }],
            routes: Vec::new(),
            sysctls: settings.sysctls.clone(),
        };
        if let Some(network) = &self.state.network {
            network.apply_to(&mut request);
        }
        let reply = agent.configure_sandbox(request)?;
        if !reply.skipped.is_empty() {
            return Err(SandboxError::Configure {
                id: self.state.id.clone(),
                skipped: reply.skipped.join("; "),
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` for the VMM to exit; true when it has.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the VM: has the agent flush the guest's filesystems, then ends the VMM with
    /// SIGTERM (it tears its devices and virtiofsd down and exits) rather than waiting for the
    /// guest kernel to power off; kills it when it has not exited after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        let deadline = Instant::now() + grace.min(Duration::from_secs(2));
        if let Ok(mut agent) = AgentClient::connect(&self.vsock_path(), deadline) {
            let _ = agent.shutdown();
        }
        self.signal(libc::SIGTERM);
        if !self.wait_exit(grace) {
            tracing::warn!(id = %self.state.id, "the VMM did not stop in {grace:?}; killing it");
            self.kill();
        }
    }

    /// Kills the VMM at once (its virtiofsd children die with it).
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        match &mut self.child {
            Some(child) => {
                let _ = child.wait();
            }
            None => {
                self.wait_exit(Duration::from_secs(5));
            }
        }
    }

    /// Sends `signal` to the VMM, if it still runs.
    fn signal(&mut self, signal: libc::c_int) {
        if self.is_running() {
            // SAFETY: kill(2) on the VMM's pid: this process's unreaped child, or the recorded
            // pid checked just above to still be the VMM by its start time.
            unsafe { libc::kill(self.state.vmm_pid as libc::pid_t, signal) };
        }
    }

    /// Tears down the pod network of a stopped sandbox (CNI DEL, the namespace) and records
    /// that it has none any more. Nothing to tear down is fine.
    pub fn release_network(&mut self) -> Result<(), SandboxError> {
        if let Some(state) = &self.state.network {
            network::teardown(state).map_err(|source| SandboxError::Network {
                id: self.state.id.clone(),
                source,
            })?;
            self.state.network = None;
            self.save()?;
        }
        Ok(())
    }

    /// Stops the VM (killing it after `grace`) and removes everything the sandbox had on the
    /// host: its pod network first (when that fails the state stays, so removal can be
    /// retried), then the container share's mounts, then its directory.
    pub fn remove(mut self, grace: Duration) -> Result<(), SandboxError> {
        self.stop(grace);
        self.release_network()?;
        if let Some(path) = &self.state.container_share {
            share::remove(path).map_err(|source| SandboxError::Share {
                id: self.state.id.clone(),
                source,
            })?;
        }
        fs::remove_dir_all(&self.dir).map_err(SandboxError::io("cannot remove", &self.dir))?;
        tracing::info!(id = %self.state.id, "sandbox removed");
        Ok(())
    }
}

/// How a `crx-vmm` starts its VM.
#[derive(Debug, Clone, Copy)]
pub(crate) enum VmmStart<'a> {
    Boot,
    /// From the pod template in this directory.
    Restore(&'a Path),
}

/// The `crx-vmm` command line of `config`'s VM, its sockets and logs in `dir`, with `shares`
/// (and the container share, if any) over virtio-fs, its agent as PID 1. A restore attaches the
/// same devices in the same order as the boot the template was made with.
pub(crate) fn vmm_command(
    config: &SandboxConfig,
    start: VmmStart,
    dir: &Path,
    shares: &[Share],
    container_share: Option<&Path>,
) -> Command {
    let mut cmd = Command::new(&config.vmm);
    match start {
        VmmStart::Boot => {
            if let Some(kernel) = &config.kernel {
                cmd.arg("--kernel").arg(kernel);
            }
            if let Some(initrd) = &config.initrd {
                cmd.arg("--initrd").arg(initrd);
            }
            cmd.args(["--init", AGENT_INIT])
                .arg("--vcpus")
                .arg(config.vcpus.to_string())
                .arg("--mem-mib")
                .arg(config.mem_mib.to_string());
        }
        VmmStart::Restore(template) => {
            cmd.arg("--restore").arg(template);
        }
    }
    cmd.arg("--console")
        .arg(dir.join("console.log"))
        .arg("--runtime-dir")
        .arg(dir)
        .arg("--vsock")
        .arg(format!("{GUEST_CID},{}", dir.join("vsock").display()));
    for share in shares {
        let ro = if share.read_only { ",ro" } else { "" };
        cmd.arg("--fs")
            .arg(format!("{}={}{ro}", share.tag, share.dir.display()));
    }
    // Writable for virtiofsd: the share's own mounts say what the guest may write.
    if let Some(share) = container_share {
        cmd.arg("--fs")
            .arg(format!("{CONTAINERS_TAG}={}", share.display()));
    }
    cmd
}

/// Gives the VMM `cmd` starts a virtio-net device on `tap` (inherited) with `mac`.
pub(crate) fn pass_tap(cmd: &mut Command, tap: BorrowedFd<'_>, mac: &str) {
    let fd = tap.as_raw_fd();
    cmd.arg("--net").arg(format!("fd={fd},mac={mac}"));
    // SAFETY: runs in the child between fork and exec; fcntl is async-signal-safe and only
    // clears close-on-exec on the tap's descriptor in the child's own table (the caller keeps
    // the descriptor open until the child is spawned).
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
fn start_ticks(pid: u32) -> Option<u64> {
    Some(proc_stat(pid)?.starttime)
}

fn is_zombie(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|stat| stat.state == 'Z')
}

fn proc_stat(pid: u32) -> Option<procfs::process::Stat> {
    procfs::process::Process::new(i32::try_from(pid).ok()?)
        .ok()?
        .stat()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_leave_the_sandboxes_directory() {
        for bad in [
            "",
            "..",
            ".",
            "../x",
            "a/b",
            "-rf",
            ".hidden",
            &"x".repeat(65),
            "a b",
        ] {
            assert!(check_id(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "pod-1", "web_2.v3", &"x".repeat(64)] {
            check_id(good).unwrap();
        }
    }

    #[test]
    fn start_ticks_tell_a_live_process() {
        let me = std::process::id();
        assert!(start_ticks(me).is_some());
        assert!(!is_zombie(me));
        assert_eq!(start_ticks(u32::MAX), None);
    }

    #[test]
    fn a_missing_vmm_binary_fails_cleanly_and_leaves_no_directory() {
        let root = tempfile::tempdir().unwrap();
        let config = SandboxConfig {
            id: "p1".into(),
            vcpus: 1,
            mem_mib: 128,
            kernel: None,
            initrd: None,
            shares: Vec::new(),
            vmm: root.path().join("no-such-vmm"),
            labels: BTreeMap::new(),
            network: None,
            container_share: false,
            template: false,
        };
        let err = Sandbox::start(root.path(), &config).unwrap_err();
        assert!(matches!(err, SandboxError::Spawn { .. }), "{err}");
        assert!(!root.path().join("sandboxes/p1").exists());
        assert!(matches!(
            Sandbox::open(root.path(), "p1"),
            Err(SandboxError::NotFound(_))
        ));
        assert!(Sandbox::list(root.path()).unwrap().is_empty());
    }
}
