//! Containers for the CRI, several per pod VM, on crx-runtime's pod functions: CreateContainer
//! (the image from the store, leased; its root mounted into the pod's container share; the
//! OCI spec from the image and the CRI config: command, args, env, working dir, user, memory
//! limit, terminal, security context), StartContainer (stdio attached, then one thread per container copies its
//! output into the CRI log file and records its exit: code, `Completed`/`Error`/`OOMKilled`),
//! StopContainer (SIGTERM, SIGKILL after the timeout), RemoveContainer, ContainerStatus,
//! ListContainers, ExecSync (a process in the container, its output and exit code, a timeout)
//! and ReopenContainerLog.

use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crx_agent_proto::{ExecProcess, ExitStatus};
use crx_runtime::agent::{AgentClient, Output, StdioAttachment};
use crx_runtime::pod::{add_container, exit_code, remove_container, stop_container};
use crx_runtime::sandbox::Sandbox;
use crx_runtime::seccomp;
use crx_runtime::share::{Propagation, Volume};
use crx_runtime::spec::{exec_env, PidNamespace, ProcessOverrides, Seccomp, SecurityContext};
use k8s_cri::v1 as cri;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResources, LinuxResourcesBuilder,
};
use tonic::Status;

use crate::cri_log::{ContainerLog, LineSplitter, Stream};
use crate::errors::{agent_status, pod_status, sandbox_status};
use crate::images::Catalog;
use crate::pods::{labels_match, Runtime};
use crate::records::{new_id, now_ns, ContainerRecord, ContainerState, MountRecord};
use crate::streams::AttachPoint;

/// How long to wait for a running pod's agent to answer.
pub(crate) const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest output ExecSync keeps per stream.
const MAX_EXEC_OUTPUT: usize = 8 << 20;

/// The CRI mounts of a container as volumes of its pod VM's share, checked the way containerd
/// checks them: the host path must be absolute; one that does not exist is made a directory;
/// symbolic links in it are resolved (the container sees what the link points at); host
/// mounts made below it later reach the container with host-to-container propagation. What
/// cannot cross into a VM is refused: mounts propagating back to the host, image volumes. A
/// recursive read-only mount must be read-only and private, as containerd requires.
fn volumes_of(mounts: &[cri::Mount]) -> Result<Vec<Volume>, Status> {
    let mut volumes = Vec::with_capacity(mounts.len());
    for mount in mounts {
        let invalid = |why: &str| {
            Status::invalid_argument(format!(
                "mount {:?} at {:?}: {why}",
                mount.host_path, mount.container_path
            ))
        };
        if !mount.container_path.starts_with('/') {
            return Err(invalid("the container path is not absolute"));
        }
        if mount.image.is_some() {
            return Err(invalid("image volumes are not supported"));
        }
        if mount.recursive_read_only && !mount.readonly {
            return Err(invalid("a recursive read-only mount must be read-only"));
        }
        if mount.recursive_read_only
            && mount.propagation() != cri::MountPropagation::PropagationPrivate
        {
            return Err(invalid(
                "a recursive read-only mount cannot take mounts from the host",
            ));
        }
        if mount.propagation() == cri::MountPropagation::PropagationBidirectional {
            return Err(invalid(
                "bidirectional propagation cannot reach the host from a pod VM",
            ));
        }
        let host_path = Path::new(&mount.host_path);
        if !host_path.is_absolute() {
            return Err(invalid("the host path is not absolute"));
        }
        if std::fs::symlink_metadata(host_path).is_err() {
            std::fs::create_dir_all(host_path)
                .map_err(|e| invalid(&format!("cannot create the host path: {e}")))?;
        }
        let host_path = std::fs::canonicalize(host_path)
            .map_err(|e| invalid(&format!("cannot resolve the host path: {e}")))?;
        let propagation = match mount.propagation() {
            cri::MountPropagation::PropagationHostToContainer => Propagation::HostToContainer,
            _ => Propagation::Private,
        };
        volumes.push(Volume {
            host_path,
            container_path: mount.container_path.clone(),
            read_only: mount.readonly,
            recursive_read_only: mount.recursive_read_only,
            propagation,
        });
    }
    Ok(volumes)
}

/// A process started in a container by [`Runtime::start_exec`].
pub(crate) struct Exec {
    pub record: ContainerRecord,
    /// The agent client that started it (to signal it).
    pub agent: AgentClient,
    pub exec_id: String,
    pub attachment: StdioAttachment,
}

/// The confinement of a container from its CRI security context, with containerd's reading
/// of each field: masked and read-only path lists that are empty keep the defaults, a pid
/// namespace mode of NODE is the VM's (the pod VM is what its containers see as the node).
fn security_context(
    security: &cri::LinuxContainerSecurityContext,
) -> Result<SecurityContext, Status> {
    let capabilities = security.capabilities.clone().unwrap_or_default();
    let namespaces = security.namespace_options.clone().unwrap_or_default();
    let pid_namespace = match namespaces.pid() {
        cri::NamespaceMode::Pod => PidNamespace::Pod,
        cri::NamespaceMode::Container => PidNamespace::Container,
        cri::NamespaceMode::Node => PidNamespace::Vm,
        cri::NamespaceMode::Target if !namespaces.target_id.is_empty() => {
            PidNamespace::Target(namespaces.target_id.clone())
        }
        cri::NamespaceMode::Target => {
            return Err(Status::invalid_argument(
                "pid namespace mode TARGET needs a target_id",
            ))
        }
    };
    let groups = security
        .supplemental_groups
        .iter()
        .map(|&g| {
            u32::try_from(g).map_err(|_| {
                Status::invalid_argument(format!("supplemental group {g} is out of range"))
            })
        })
        .collect::<Result<_, _>>()?;
    let paths = |list: &Vec<String>| (!list.is_empty()).then(|| list.clone());
    Ok(SecurityContext {
        privileged: security.privileged,
        add_capabilities: capabilities.add_capabilities,
        drop_capabilities: capabilities.drop_capabilities,
        readonly_rootfs: security.readonly_rootfs,
        masked_paths: paths(&security.masked_paths),
        readonly_paths: paths(&security.readonly_paths),
        no_new_privs: security.no_new_privs,
        supplemental_groups: groups,
        pid_namespace,
        seccomp: seccomp_of(security)?,
    })
}

/// The `seccomp` field, or else the deprecated `seccomp_profile_path` (`runtime/default`,
/// `docker/default`, `unconfined`, `localhost/<absolute path>`); neither set is unconfined,
/// as with containerd. A Localhost profile is read from its file here.
fn seccomp_of(security: &cri::LinuxContainerSecurityContext) -> Result<Seccomp, Status> {
    let localhost = |path: &str| {
        seccomp::load_profile(Path::new(path))
            .map(Seccomp::Profile)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    };
    if let Some(profile) = &security.seccomp {
        return match profile.profile_type() {
            cri::security_profile::ProfileType::RuntimeDefault => Ok(Seccomp::RuntimeDefault),
            cri::security_profile::ProfileType::Unconfined => Ok(Seccomp::Unconfined),
            cri::security_profile::ProfileType::Localhost => localhost(&profile.localhost_ref),
        };
    }
    #[allow(deprecated)] // kubelets before 1.19's field
    let path = security.seccomp_profile_path.as_str();
    match path {
        "" | "unconfined" => Ok(Seccomp::Unconfined),
        "runtime/default" | "docker/default" => Ok(Seccomp::RuntimeDefault),
        _ => match path.strip_prefix("localhost/") {
            Some(file) => localhost(&format!("/{}", file.trim_start_matches('/'))),
            None => Err(Status::invalid_argument(format!(
                "unknown seccomp profile {path:?}"
            ))),
        },
    }
}

impl Runtime {
    /// The running sandbox of pod `pod` and a client of its agent.
    pub(crate) fn agent_of(&self, pod: &str) -> Result<(Sandbox, AgentClient), Status> {
        let mut sandbox = self.live_sandbox(pod).ok_or_else(|| {
            Status::failed_precondition(format!("pod sandbox {pod} is not running"))
        })?;
        let agent = sandbox
            .agent(Instant::now() + AGENT_TIMEOUT)
            .map_err(sandbox_status)?;
        Ok((sandbox, agent))
    }

    /// The record of the container named by `id` or a unique prefix of it.
    pub(crate) fn container(&self, id: &str) -> Result<ContainerRecord, Status> {
        let records = self.records();
        let id = records.container_id(id)?;
        Ok(records.containers[&id].clone())
    }

    /// CreateContainer.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: cri::ContainerConfig,
    ) -> Result<String, Status> {
        let (pod, _) = self.ready_pod(pod_id)?;
        let meta = config.metadata.clone().unwrap_or_default();
        if meta.name.is_empty() {
            return Err(Status::invalid_argument(
                "the container has no metadata.name",
            ));
        }
        if self
            .records()
            .containers_of(&pod.id)
            .any(|c| c.name == meta.name && c.attempt == meta.attempt)
        {
            return Err(Status::already_exists(format!(
                "container {} attempt {} exists in pod {}",
                meta.name, meta.attempt, pod.id
            )));
        }
        let reference = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let catalog = Catalog::load(&self.store).map_err(crate::errors::image_status)?;
        let image = catalog
            .find(&reference)
            .ok_or_else(|| Status::not_found(format!("image {reference:?} is not in the store")))?
            .clone();
        let record_of_image = image.record().clone();
        let log_path = match (pod.log_directory.is_empty(), config.log_path.is_empty()) {
            (false, false) => Some(Path::new(&pod.log_directory).join(relative(&config.log_path)?)),
            _ => None,
        };
        let linux = config.linux.clone().unwrap_or_default();
        let security = linux.security_context.clone().unwrap_or_default();
        if security.run_as_group.is_some()
            && security.run_as_user.is_none()
            && security.run_as_username.is_empty()
        {
            return Err(Status::invalid_argument(
                "run_as_group needs run_as_user or run_as_username",
            ));
        }
        let user = if !security.run_as_username.is_empty() {
            Some(security.run_as_username.clone())
        } else {
            security
                .run_as_user
                .as_ref()
                .map(|u| match &security.run_as_group {
                    Some(g) => format!("{}:{}", u.value, g.value),
                    None => u.value.to_string(),
                })
        };
        let memory_limit = linux
            .resources
            .as_ref()
            .map(|r| r.memory_limit_in_bytes)
            .filter(|m| *m > 0);
        let process = ProcessOverrides {
            entrypoint: (!config.command.is_empty()).then(|| config.command.clone()),
            args: config.args.clone(),
            env: config
                .envs
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect(),
            cwd: (!config.working_dir.is_empty()).then(|| config.working_dir.clone()),
            user,
            terminal: config.tty,
            hostname: Some(pod.hostname.clone()),
            memory_limit,
            security: security_context(&security)?,
        };
        let volumes = volumes_of(&config.mounts)?;
        let id = new_id();
        let record = ContainerRecord {
            id: id.clone(),
            pod_id: pod.id.clone(),
            name: meta.name,
            attempt: meta.attempt,
            image: reference,
            image_id: image.id.clone(),
            image_ref: image
                .repo_digests()
                .into_iter()
                .next()
                .unwrap_or_else(|| image.id.clone()),
            image_name: record_of_image.name.clone(),
            labels: config.labels.into_iter().collect(),
            annotations: config.annotations.into_iter().collect(),
            log_path,
            log_path_relative: config.log_path,
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            tty: config.tty,
            created_ns: now_ns(),
            started_ns: 0,
            finished_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            mounts: config
                .mounts
                .iter()
                .map(|m| MountRecord {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.clone(),
                    readonly: m.readonly,
                    propagation: m.propagation,
                })
                .collect(),
        };
        let (sandbox, mut agent) = self.agent_of(&pod.id)?;
        add_container(
            &sandbox,
            &mut agent,
            &self.store,
            &record_of_image,
            &id,
            &record.lease(),
            &process,
            &volumes,
        )
        .map_err(pod_status)?;
        if let Err(e) = self.records().save_container(record.clone()) {
            let _ = remove_container(
                &sandbox,
                Some(&mut agent),
                &self.store,
                &id,
                &record.lease(),
            );
            return Err(e);
        }
        Ok(id)
    }

    /// StartContainer: attaches the container's stdio (its output goes to the log), starts
    /// it, and watches for its exit.
    pub fn start_container(self: &Arc<Self>, id: &str) -> Result<(), Status> {
        let record = self.container(id)?;
        if record.state() != ContainerState::Created {
            return Err(Status::failed_precondition(format!(
                "container {} is {:?}, not created",
                record.id,
                record.state()
            )));
        }
        let log = match &record.log_path {
            Some(path) => Some(Arc::new(ContainerLog::open(path).map_err(|e| {
                Status::internal(format!("opening the log {}: {e}", path.display()))
            })?)),
            None => None,
        };
        let (sandbox, mut agent) = self.agent_of(&record.pod_id)?;
        let attachment = StdioAttachment::attach(
            &sandbox.vsock_path(),
            Instant::now() + AGENT_TIMEOUT,
            &record.id,
            "",
        )
        .map_err(agent_status)?;
        agent.start_container(&record.id).map_err(agent_status)?;
        {
            let mut records = self.records();
            if let Some(mut current) = records.containers.get(&record.id).cloned() {
                current.started_ns = now_ns();
                records.save_container(current)?;
            }
        }
        if let Some(log) = &log {
            self.logs_map().insert(record.id.clone(), log.clone());
        }
        let runtime = self.clone();
        let keep_stdin = record.stdin;
        let id = record.id.clone();
        std::thread::Builder::new()
            .name(format!("log-{}", &id[..12]))
            .spawn(move || runtime.pump(&id, attachment, log, keep_stdin))
            .map_err(|e| Status::internal(format!("starting the log thread: {e}")))?;
        tracing::info!(id = %record.id, "container started");
        Ok(())
    }

    fn logs_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ContainerLog>>> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attach_points_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AttachPoint>>> {
        self.attach_points.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stdio of running container `id`, if this process pumps it (not after a restart).
    pub(crate) fn attach_point(&self, id: &str) -> Option<Arc<AttachPoint>> {
        self.attach_points_map().get(id).cloned()
    }

    /// Copies the container's output into its log until it exits, then records the exit.
    fn pump(
        &self,
        id: &str,
        attachment: StdioAttachment,
        log: Option<Arc<ContainerLog>>,
        keep_stdin: bool,
    ) {
        let (mut input, mut output) = attachment.split();
        if !keep_stdin {
            let _ = input.close_stdin();
        }
        let point = Arc::new(AttachPoint::new(keep_stdin.then_some(input)));
        self.attach_points_map()
            .insert(id.to_owned(), Arc::clone(&point));
        let (mut out, mut err) = (LineSplitter::default(), LineSplitter::default());
        let ended = loop {
            let event = output.next_output();
            if let Ok(event) = &event {
                point.publish(event);
            }
            match event {
                Ok(Output::Stdout(data)) => {
                    if let Some(log) = &log {
                        out.push(log, Stream::Stdout, &data);
                    }
                }
                Ok(Output::Stderr(data)) => {
                    if let Some(log) = &log {
                        err.push(log, Stream::Stderr, &data);
                    }
                }
                Ok(Output::StdoutEof) => {
                    if let Some(log) = &log {
                        out.finish(log, Stream::Stdout);
                    }
                }
                Ok(Output::StderrEof) => {
                    if let Some(log) = &log {
                        err.finish(log, Stream::Stderr);
                    }
                }
                Ok(Output::Exit(status)) => break Ok(status),
                Err(e) => break Err(e),
            }
        };
        if let Some(log) = &log {
            out.finish(log, Stream::Stdout);
            err.finish(log, Stream::Stderr);
        }
        point.close();
        self.attach_points_map().remove(id);
        match ended {
            Ok(status) => self.record_exit(id, &status),
            Err(e) => {
                tracing::info!(id, "container output ended without an exit status: {e}");
                self.finish_container(id, 255, "Error", "the pod VM is gone");
            }
        }
        self.logs_map().remove(id);
    }

    /// Waits (on a thread) for the exit of a running container this process has no stdio
    /// attachment for (after a restart of crx-cri).
    pub fn watch_exit(self: &Arc<Self>, id: &str, pod: &str) {
        let runtime = self.clone();
        let (id, pod) = (id.to_owned(), pod.to_owned());
        let spawned = std::thread::Builder::new()
            .name(format!("wait-{}", &id[..12.min(id.len())]))
            .spawn(move || {
                let waited = runtime
                    .agent_of(&pod)
                    .map_err(|e| e.message().to_owned())
                    .and_then(|(_, mut agent)| {
                        agent.wait_process(&id, "").map_err(|e| e.to_string())
                    });
                match waited {
                    Ok(status) => runtime.record_exit(&id, &status),
                    Err(e) => {
                        tracing::info!(id, "waiting for the container: {e}");
                        runtime.finish_container(&id, 255, "Error", "the pod VM is gone");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a thread to wait for a container: {e}");
        }
    }

    fn record_exit(&self, id: &str, status: &ExitStatus) {
        let code = exit_code(status);
        let reason = if status.oom_killed {
            "OOMKilled"
        } else if code == 0 {
            "Completed"
        } else {
            "Error"
        };
        self.finish_container(id, code, reason, "");
    }

    /// Records the end of container `id` unless one is recorded already.
    pub fn finish_container(&self, id: &str, code: i32, reason: &str, message: &str) {
        let mut records = self.records();
        let Some(mut record) = records.containers.get(id).cloned() else {
            return;
        };
        if record.finish(code, reason, message) {
            tracing::info!(id, code, reason, "container exited");
            if let Err(e) = records.save_container(record) {
                tracing::warn!(id, "recording the exit: {}", e.message());
            }
        }
    }

    /// Waits up to `limit` for container `id` to be recorded as exited.
    pub fn await_exit(&self, id: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let exited = self
                .records()
                .containers
                .get(id)
                .is_none_or(|c| c.state() == ContainerState::Exited);
            if exited {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// StopContainer: SIGTERM, SIGKILL after `timeout`; stopping a stopped container, or one
    /// that is not there, is fine (as the CRI asks).
    pub fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), Status> {
        let record = match self.container(id) {
            Ok(record) => record,
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if record.state() != ContainerState::Running {
            return Ok(());
        }
        match self.agent_of(&record.pod_id) {
            Ok((_, mut agent)) => {
                stop_container(&mut agent, &record.id, timeout);
                if !self.await_exit(&record.id, Duration::from_secs(10)) {
                    self.finish_container(&record.id, 137, "Error", "killed");
                }
            }
            Err(_) => self.finish_container(&record.id, 255, "Error", "the pod VM is gone"),
        }
        Ok(())
    }

    /// RemoveContainer (a running one is killed first); removing what is not there is fine.
    pub fn remove_container(&self, id: &str) -> Result<(), Status> {
        let record = match self.container(id) {
            Ok(record) => record,
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if record.state() == ContainerState::Running {
            self.stop_container(&record.id, Duration::ZERO)?;
        }
        let sandbox = Sandbox::open(&self.run_root(), &record.pod_id);
        match (sandbox, self.agent_of(&record.pod_id)) {
            (_, Ok((sandbox, mut agent))) => remove_container(
                &sandbox,
                Some(&mut agent),
                &self.store,
                &record.id,
                &record.lease(),
            )
            .map_err(pod_status)?,
            (Ok(sandbox), Err(_)) => {
                remove_container(&sandbox, None, &self.store, &record.id, &record.lease())
                    .map_err(pod_status)?
            }
            (Err(_), Err(_)) => match self.store.release(&record.lease()) {
                Ok(()) | Err(crx_image::Error::LeaseNotFound(_)) => {}
                Err(e) => return Err(crate::errors::image_status(e)),
            },
        }
        self.logs_map().remove(&record.id);
        self.records().remove_container(&record.id)?;
        tracing::info!(id = %record.id, "container removed");
        Ok(())
    }

    /// ContainerStatus.
    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus, Status> {
        let record = self.container(id)?;
        Ok(cri::ContainerStatus {
            id: record.id.clone(),
            metadata: Some(container_metadata(&record)),
            state: container_state(&record) as i32,
            created_at: record.created_ns,
            started_at: record.started_ns,
            finished_at: record.finished_ns,
            exit_code: record.exit_code,
            image: Some(image_spec(&record)),
            image_ref: record.image_ref.clone(),
            reason: record.reason.clone(),
            message: record.message.clone(),
            labels: record.labels.clone().into_iter().collect(),
            annotations: record.annotations.clone().into_iter().collect(),
            mounts: record
                .mounts
                .iter()
                .map(|m| cri::Mount {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.clone(),
                    readonly: m.readonly,
                    propagation: m.propagation,
                    ..Default::default()
                })
                .collect(),
            log_path: record
                .log_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            resources: None,
            image_id: record.image_id.clone(),
            user: None,
        })
    }

    /// ListContainers, filtered by ID (or prefix), pod, state and labels.
    pub fn list_containers(&self, filter: Option<cri::ContainerFilter>) -> Vec<cri::Container> {
        let filter = filter.unwrap_or_default();
        let records = self.records();
        records
            .containers
            .values()
            .filter(|c| {
                container_matches(
                    c,
                    &filter.id,
                    &filter.pod_sandbox_id,
                    &filter.label_selector,
                )
            })
            .filter(|c| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == container_state(c) as i32)
            })
            .map(|c| cri::Container {
                id: c.id.clone(),
                pod_sandbox_id: c.pod_id.clone(),
                metadata: Some(container_metadata(c)),
                image: Some(image_spec(c)),
                image_ref: c.image_ref.clone(),
                state: container_state(c) as i32,
                created_at: c.created_ns,
                labels: c.labels.clone().into_iter().collect(),
                annotations: c.annotations.clone().into_iter().collect(),
                image_id: c.image_id.clone(),
            })
            .collect()
    }

    /// UpdateContainerResources: new cgroup limits (memory, CPU quota, period and shares) for
    /// a created or running container, applied by the agent in its pod VM. The VM's own size
    /// stays what it booted with.
    pub fn update_resources(
        &self,
        id: &str,
        resources: Option<&cri::LinuxContainerResources>,
    ) -> Result<(), Status> {
        let record = self.container(id)?;
        if record.state() == ContainerState::Exited {
            return Err(Status::failed_precondition(format!(
                "container {} has exited",
                record.id
            )));
        }
        let Some(resources) = resources else {
            return Ok(());
        };
        let resources = oci_resources(resources)
            .map_err(|e| Status::invalid_argument(format!("resources: {e}")))?;
        let (_, mut agent) = self.agent_of(&record.pod_id)?;
        agent
            .update_container(&record.id, &resources)
            .map_err(agent_status)?;
        tracing::info!(id = %record.id, ?resources, "container resources updated");
        Ok(())
    }

    /// Starts `cmd` in running container `id` (on a terminal if `tty`) with its stdio
    /// attached; for ExecSync and the streaming Exec.
    pub(crate) fn start_exec(&self, id: &str, cmd: Vec<String>, tty: bool) -> Result<Exec, Status> {
        if cmd.is_empty() {
            return Err(Status::invalid_argument("no command to run"));
        }
        let record = self.running_container(id)?;
        let (sandbox, mut agent) = self.agent_of(&record.pod_id)?;
        let exec_id = new_id()[..16].to_owned();
        agent
            .exec_process(ExecProcess {
                container_id: record.id.clone(),
                exec_id: exec_id.clone(),
                args: cmd,
                env: exec_env(Vec::new()),
                cwd: String::new(),
                user: None,
                terminal: tty,
            })
            .map_err(agent_status)?;
        let attachment = StdioAttachment::attach(
            &sandbox.vsock_path(),
            Instant::now() + AGENT_TIMEOUT,
            &record.id,
            &exec_id,
        )
        .map_err(agent_status)?;
        Ok(Exec {
            record,
            agent,
            exec_id,
            attachment,
        })
    }

    /// The record of container `id`, which must be running.
    pub(crate) fn running_container(&self, id: &str) -> Result<ContainerRecord, Status> {
        let record = self.container(id)?;
        if record.state() != ContainerState::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                record.id
            )));
        }
        Ok(record)
    }

    /// ExecSync: runs `cmd` in the container and returns its output and exit code; after
    /// `timeout` (zero: none) the process is killed and the call fails.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<cri::ExecSyncResponse, Status> {
        let Exec {
            record,
            mut agent,
            exec_id,
            attachment,
        } = self.start_exec(id, cmd, false)?;
        let (mut input, output) = attachment.split();
        let _ = input.close_stdin();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = Capped::default();
            let mut stderr = Capped::default();
            let status = output.collect(&mut stdout, &mut stderr);
            let _ = done_tx.send((status, stdout.0, stderr.0));
        });
        let received = if timeout.is_zero() {
            done_rx
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            done_rx.recv_timeout(timeout)
        };
        match received {
            Ok((Ok(status), stdout, stderr)) => Ok(cri::ExecSyncResponse {
                stdout,
                stderr,
                exit_code: exit_code(&status),
            }),
            Ok((Err(e), _, _)) => Err(agent_status(e)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = agent.signal_process(&record.id, &exec_id, libc::SIGKILL);
                Err(Status::deadline_exceeded(format!(
                    "command timed out after {timeout:?} in container {}",
                    record.id
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(Status::internal("the exec output thread died"))
            }
        }
    }

    /// ReopenContainerLog.
    pub fn reopen_log(&self, id: &str) -> Result<(), Status> {
        let record = self.running_container(id)?;
        let log = self.logs_map().get(&record.id).cloned();
        match log {
            Some(log) => log
                .reopen()
                .map_err(|e| Status::internal(format!("reopening the log: {e}"))),
            None => Err(Status::failed_precondition(format!(
                "container {} has no open log",
                record.id
            ))),
        }
    }
}

/// A log path relative to the pod's log directory, never leaving it.
fn relative(path: &str) -> Result<&Path, Status> {
    let p = Path::new(path);
    if p.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(p)
    } else {
        Err(Status::invalid_argument(format!(
            "log path {path:?} must be relative to the pod's log directory, without `..`"
        )))
    }
}

/// Output kept up to [`MAX_EXEC_OUTPUT`]; the rest is dropped.
#[derive(Default)]
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = MAX_EXEC_OUTPUT.saturating_sub(self.0.len());
        self.0.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn container_state(record: &ContainerRecord) -> cri::ContainerState {
    match record.state() {
        ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running => cri::ContainerState::ContainerRunning,
        ContainerState::Exited => cri::ContainerState::ContainerExited,
    }
}

/// Whether container `record` passes a CRI filter: its ID and pod ID start with `id` and
/// `pod` (empty: any), its labels include `labels`.
pub(crate) fn container_matches(
    record: &ContainerRecord,
    id: &str,
    pod: &str,
    labels: &HashMap<String, String>,
) -> bool {
    record.id.starts_with(id)
        && record.pod_id.starts_with(pod)
        && labels_match(&record.labels, labels)
}

pub(crate) fn container_metadata(record: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: record.name.clone(),
        attempt: record.attempt,
    }
}

fn image_spec(record: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: record.image.clone(),
        ..Default::default()
    }
}

/// The limits of CRI resources that a container's cgroup in the VM takes (zero or empty in
/// the CRI means unset): memory, CPU quota, period and shares. CPU and memory sets are left
/// out: the pod VM's vCPUs and memory are its own.
fn oci_resources(
    r: &cri::LinuxContainerResources,
) -> Result<LinuxResources, oci_spec::OciSpecError> {
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_period > 0 {
        cpu = cpu.period(r.cpu_period as u64);
    }
    if r.cpu_quota != 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if r.cpu_shares > 0 {
        cpu = cpu.shares(r.cpu_shares as u64);
    }
    let mut resources = LinuxResourcesBuilder::default().cpu(cpu.build()?);
    if r.memory_limit_in_bytes > 0 {
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(r.memory_limit_in_bytes)
                .build()?,
        );
    }
    resources.build()
}
