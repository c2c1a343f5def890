//! The task service containerd talks to (ttrpc, `containerd.task.v2.Task`). The pod's first
//! task boots the pod VM (with the container share); every task is a container the guest agent
//! runs in it, its root filesystem (containerd's snapshot, mounted on the bundle's `rootfs`)
//! and its bind mounts carried in over virtio-fs. Execs are the agent's exec'd processes.
//! Deleting the pod's last task stops the VM and removes its sandbox. Pids reported to
//! containerd are the VMM's, as guest pids mean nothing on the host.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Context, ExitSignal, TtrpcContext, TtrpcResult};
use crx_agent_proto::{ExecProcess, User};
use crx_runtime::agent::{AgentClient, StdioAttachment};
use crx_runtime::network::PodNetwork;
use crx_runtime::pod::{self, ContainerRoot};
use crx_runtime::sandbox::{GuestSettings, Sandbox, SandboxConfig};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::guest_spec;
use crate::process::{ExitSink, Process, StdioPaths};
use crate::shim::{sandbox_id, Settings};

/// How long a VM gets to power off when its pod's last task is deleted.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The pod's interface in the network namespace containerd's CRI made.
const POD_IFNAME: &str = "eth0";
/// How long a stdio attachment may take.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// One container of the pod.
struct Task {
    bundle: PathBuf,
    /// The bundle's `rootfs`, when the shim mounted containerd's snapshot on it.
    mounted_rootfs: Option<PathBuf>,
    main: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    /// An exec added, not started: its process spec.
    pending: HashMap<String, oci_spec::runtime::Process>,
}

/// The pod VM.
struct PodVm {
    sandbox: Sandbox,
    agent: AgentClient,
}

#[derive(Default)]
struct State {
    vm: Option<PodVm>,
    tasks: HashMap<String, Task>,
}

impl State {
    /// The pod's running VM, or the error every request that needs one answers without it.
    fn running_vm(&mut self) -> TtrpcResult<&mut PodVm> {
        self.vm
            .as_mut()
            .ok_or_else(|| internal("the pod VM is gone"))
    }
}

pub struct Service {
    settings: Result<Settings, String>,
    namespace: String,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
    state: Mutex<State>,
}

/// Publishes task events to containerd.
struct Events {
    publisher: RemotePublisher,
    namespace: String,
}

impl Events {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
        {
            tracing::warn!(topic, "publishing an event: {e}");
        }
    }
}

impl ExitSink for Events {
    fn publish_exit(&self, event: TaskExit) {
        self.publish("/tasks/exit", Box::new(event));
    }
}

fn error(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

fn internal(message: impl ToString) -> ttrpc::Error {
    error(Code::INTERNAL, message)
}

fn not_found(what: &str, id: &str) -> ttrpc::Error {
    error(Code::NOT_FOUND, format!("{what} {id} not found"))
}

/// The network namespace a bundle's spec joins, if it names one.
fn pod_netns(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

impl Service {
    pub fn new(
        settings: Result<Settings, String>,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        Service {
            settings,
            events: Arc::new(Events {
                publisher,
                namespace: namespace.clone(),
            }),
            namespace,
            exit,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn settings(&self) -> TtrpcResult<&Settings> {
        self.settings
            .as_ref()
            .map_err(|e| error(Code::FAILED_PRECONDITION, format!("CRX configuration: {e}")))
    }

    /// Boots the pod VM for the pod whose first task is `group` with bundle spec `spec`: in
    /// the network namespace the spec names (containerd's CRI made it and ran CNI in it),
    /// with the spec's hostname and sysctls; without a network device when it names none.
    fn boot(&self, group: &str, spec: &Spec) -> TtrpcResult<PodVm> {
        let settings = self.settings()?;
        let runtime = &settings.runtime;
        let config = SandboxConfig {
            id: sandbox_id(group),
            vcpus: runtime.vcpus,
            mem_mib: runtime.memory_mib,
            kernel: runtime.kernel.clone(),
            initrd: runtime.initrd.clone(),
            shares: Vec::new(),
            vmm: settings.vmm.clone(),
            labels: [
                ("containerd.namespace".to_owned(), self.namespace.clone()),
                ("containerd.task".to_owned(), group.to_owned()),
            ]
            .into(),
            network: pod_netns(spec).map(|netns| PodNetwork::Join {
                netns,
                ifname: POD_IFNAME.to_owned(),
            }),
            container_share: true,
            template: runtime.templates,
        };
        // What a shim killed with its VM left behind (containerd's cleanup never ran).
        if let Ok(mut stale) = Sandbox::open(&settings.run_root, &config.id) {
            if !stale.is_running() {
                tracing::warn!(id = %config.id, "removing the stale sandbox of a VM that is gone");
                let _ = stale.remove(Duration::ZERO);
            }
        }
        let mut sandbox = Sandbox::start(&settings.run_root, &config)
            .map_err(|e| internal(format!("starting the pod VM: {e}")))?;
        sandbox.reap_in_background();
        let deadline = Instant::now() + Duration::from_secs(runtime.boot_timeout_secs);
        let settings = GuestSettings {
            hostname: spec.hostname().clone().unwrap_or_default(),
            dns: None,
            sysctls: spec
                .linux()
                .as_ref()
                .and_then(|l| l.sysctl().clone())
                .unwrap_or_default()
                .into_iter()
                .collect(),
        };
        let ready = sandbox.agent(deadline).and_then(|mut agent| {
            if config.network.is_some() {
                sandbox.configure(&mut agent, &settings)?;
            }
            Ok(agent)
        });
        match ready {
            Ok(agent) => {
                tracing::info!(id = %config.id, pid = sandbox.state().vmm_pid, "pod VM up");
                Ok(PodVm { sandbox, agent })
            }
            Err(e) => {
                let tail = sandbox.log_tail();
                let _ = sandbox.remove(Duration::ZERO);
                Err(internal(format!("the pod VM: {e}\n{tail}")))
            }
        }
    }

    fn vmm_pid(state: &State) -> u32 {
        state.vm.as_ref().map_or(0, |vm| vm.sandbox.state().vmm_pid)
    }

    fn process(state: &State, id: &str, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        let task = state.tasks.get(id).ok_or_else(|| not_found("task", id))?;
        if exec_id.is_empty() {
            return Ok(task.main.clone());
        }
        task.execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found("exec", exec_id))
    }

    fn attach(vm: &PodVm, id: &str, exec_id: &str) -> TtrpcResult<StdioAttachment> {
        StdioAttachment::attach(
            &vm.sandbox.vsock_path(),
            Instant::now() + ATTACH_TIMEOUT,
            id,
            exec_id,
        )
        .map_err(|e| internal(format!("attaching to {id}'s stdio: {e}")))
    }

    fn start_main(&self, state: &mut State, id: &str) -> TtrpcResult<u32> {
        let pid = Self::vmm_pid(state);
        let process = Self::process(state, id, "")?;
        if process.status() != api::Status::CREATED {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("task {id} was started already"),
            ));
        }
        let vm = state.running_vm()?;
        let attachment = Self::attach(vm, id, "")?;
        vm.agent
            .start_container(id)
            .map_err(|e| internal(format!("starting {id}: {e}")))?;
        process
            .run_stdio(attachment, pid, self.events.clone())
            .map_err(internal)?;
        self.events.publish(
            "/tasks/start",
            Box::new(TaskStart {
                container_id: id.to_owned(),
                pid,
                ..Default::default()
            }),
        );
        Ok(pid)
    }

    fn start_exec(&self, state: &mut State, id: &str, exec_id: &str) -> TtrpcResult<u32> {
        let pid = Self::vmm_pid(state);
        let task = state
            .tasks
            .get_mut(id)
            .ok_or_else(|| not_found("task", id))?;
        let process = task
            .execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found("exec", exec_id))?;
        let spec = task.pending.remove(exec_id).ok_or_else(|| {
            error(
                Code::FAILED_PRECONDITION,
                format!("exec {exec_id} was started already"),
            )
        })?;
        let vm = state.running_vm()?;
        let user = spec.user();
        vm.agent
            .exec_process(ExecProcess {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                args: spec.args().clone().unwrap_or_default(),
                env: spec.env().clone().unwrap_or_default(),
                cwd: spec.cwd().to_string_lossy().into_owned(),
                user: Some(User {
                    uid: user.uid(),
                    gid: user.gid(),
                    additional_gids: user.additional_gids().clone().unwrap_or_default(),
                }),
                terminal: process.stdio.terminal,
            })
            .map_err(|e| {
                error(
                    Code::FAILED_PRECONDITION,
                    format!("exec {exec_id} in {id}: {e}"),
                )
            })?;
        let attachment = Self::attach(vm, id, exec_id)?;
        process
            .run_stdio(attachment, pid, self.events.clone())
            .map_err(internal)?;
        self.events.publish(
            "/tasks/exec-started",
            Box::new(TaskExecStarted {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid,
                ..Default::default()
            }),
        );
        Ok(pid)
    }

    /// Removes task `id`: its container in the VM, its files in the share, its rootfs mount;
    /// the VM too when it was the pod's last task.
    fn remove_task(&self, state: &mut State, id: &str) -> TtrpcResult<()> {
        let task = state
            .tasks
            .remove(id)
            .ok_or_else(|| not_found("task", id))?;
        if let Some(vm) = state.vm.as_mut() {
            let running = vm.sandbox.is_running();
            let agent = running.then_some(&mut vm.agent);
            if let Err(e) = pod::remove_container_from_share(&vm.sandbox, agent, id) {
                tracing::warn!(id, "removing the container from the pod VM: {e}");
            }
        }
        if let Some(rootfs) = &task.mounted_rootfs {
            if let Err(e) = crate::rootfs::unmount(rootfs) {
                tracing::warn!(id, "unmounting {}: {e}", rootfs.display());
            }
        }
        if state.tasks.is_empty() {
            if let Some(vm) = state.vm.take() {
                let id = vm.sandbox.id().to_owned();
                if let Err(e) = vm.sandbox.remove(STOP_GRACE) {
                    tracing::warn!(id, "removing the pod VM: {e}");
                }
            }
        }
        Ok(())
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.as_str();
        tracing::info!(id, bundle = %req.bundle, "create");
        crx_runtime::sandbox::check_id(id).map_err(|e| error(Code::INVALID_ARGUMENT, e))?;
        if !req.checkpoint.is_empty() {
            return Err(error(
                Code::UNIMPLEMENTED,
                "restoring a task from a checkpoint",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            error(
                Code::INVALID_ARGUMENT,
                format!("the bundle's config.json: {e}"),
            )
        })?;
        let rootfs = bundle.join(
            spec.root()
                .as_ref()
                .map(|r| r.path().clone())
                .unwrap_or_else(|| "rootfs".into()),
        );
        let (spec, volumes) =
            guest_spec::for_guest(spec).map_err(|e| error(Code::INVALID_ARGUMENT, e))?;

        let mut state = self.state();
        if state.tasks.contains_key(id) {
            return Err(error(Code::ALREADY_EXISTS, format!("task {id} exists")));
        }
        let mounted_rootfs = if req.rootfs.is_empty() {
            None
        } else {
            crate::rootfs::mount(&req.rootfs, &rootfs).map_err(internal)?;
            Some(rootfs.clone())
        };
        let added = (|| {
            if state.vm.is_none() {
                state.vm = Some(self.boot(id, &spec)?);
            }
            let vm = state.vm.as_mut().expect("booted");
            let container = ContainerRoot {
                id,
                rootfs: &rootfs,
                volumes: &volumes,
            };
            pod::add_container_with_spec(
                &vm.sandbox,
                &mut vm.agent,
                &container,
                &spec,
                req.terminal,
            )
            .map_err(|e| internal(format!("creating {id} in the pod VM: {e}")))
        })();
        if let Err(e) = added {
            if mounted_rootfs.is_some() {
                let _ = crate::rootfs::unmount(&rootfs);
            }
            if state.tasks.is_empty() {
                if let Some(vm) = state.vm.take() {
                    let _ = vm.sandbox.remove(Duration::ZERO);
                }
            }
            return Err(e);
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        state.tasks.insert(
            id.to_owned(),
            Task {
                bundle,
                mounted_rootfs,
                main: Process::new(id, "", stdio),
                execs: HashMap::new(),
                pending: HashMap::new(),
            },
        );
        let pid = Self::vmm_pid(&state);
        drop(state);
        tracing::info!(id, volumes = volumes.len(), "task created");
        self.events.publish(
            "/tasks/create",
            Box::new(TaskCreate {
                container_id: id.to_owned(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let mut state = self.state();
        let pid = if req.exec_id.is_empty() {
            self.start_main(&mut state, &req.id)?
        } else {
            self.start_exec(&mut state, &req.id, &req.exec_id)?
        };
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let process = Self::process(&self.state(), &req.id, &req.exec_id)?;
        let exit = process.wait();
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let mut state = self.state();
        let pid = Self::vmm_pid(&state);
        let process = Self::process(&state, &req.id, &req.exec_id)?;
        let signal = i32::try_from(req.signal)
            .map_err(|_| error(Code::INVALID_ARGUMENT, format!("signal {}", req.signal)))?;
        match process.status() {
            api::Status::STOPPED => {
                return Err(error(Code::NOT_FOUND, "process already finished"));
            }
            // Never started: it ends here, as if the signal had killed it.
            api::Status::CREATED => {
                process.set_exited(128 + req.signal, pid, self.events.as_ref());
                return Ok(api::Empty::default());
            }
            _ => {}
        }
        let vm = state.running_vm()?;
        vm.agent
            .signal_process(&req.id, &req.exec_id, signal)
            .map_err(|e| internal(format!("signalling {}: {e}", req.id)))?;
        Ok(api::Empty::default())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut state = self.state();
        let pid = Self::vmm_pid(&state);
        let process = Self::process(&state, &req.id, &req.exec_id)?;
        if process.is_running() {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("{} is running; kill it first", req.id),
            ));
        }
        if req.exec_id.is_empty() {
            self.remove_task(&mut state, &req.id)?;
        } else if let Some(task) = state.tasks.get_mut(&req.id) {
            task.execs.remove(&req.exec_id);
            task.pending.remove(&req.exec_id);
        }
        drop(state);
        let exit = process.exit();
        let (exit_status, exited_at) = match exit {
            Some(exit) => (exit.status, exit.at),
            None => (0, crate::process::now()),
        };
        if req.exec_id.is_empty() {
            self.events.publish(
                "/tasks/delete",
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    pid,
                    exit_status,
                    exited_at: Some(exited_at.clone()).into(),
                    ..Default::default()
                }),
            );
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status,
            exited_at: Some(exited_at).into(),
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        crx_runtime::sandbox::check_id(&req.exec_id)
            .map_err(|e| error(Code::INVALID_ARGUMENT, e))?;
        let spec: oci_spec::runtime::Process =
            serde_json::from_slice(&req.spec.value).map_err(|e| {
                error(
                    Code::INVALID_ARGUMENT,
                    format!("the exec's process spec: {e}"),
                )
            })?;
        if spec.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(error(Code::INVALID_ARGUMENT, "the exec has no command"));
        }
        let mut state = self.state();
        let task = state
            .tasks
            .get_mut(&req.id)
            .ok_or_else(|| not_found("task", &req.id))?;
        if !task.main.is_running() {
            return Err(error(
                Code::FAILED_PRECONDITION,
                format!("task {} is not running", req.id),
            ));
        }
        if task.execs.contains_key(&req.exec_id) {
            return Err(error(
                Code::ALREADY_EXISTS,
                format!("exec {} exists", req.exec_id),
            ));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        task.execs.insert(
            req.exec_id.clone(),
            Process::new(&req.id, &req.exec_id, stdio),
        );
        task.pending.insert(req.exec_id.clone(), spec);
        drop(state);
        self.events.publish(
            "/tasks/exec-added",
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let state = self.state();
        let process = Self::process(&state, &req.id, &req.exec_id)?;
        let bundle = state
            .tasks
            .get(&req.id)
            .map(|t| t.bundle.to_string_lossy().into_owned())
            .unwrap_or_default();
        let exit = process.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle,
            pid: Self::vmm_pid(&state),
            status: process.status().into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.as_ref().map_or(0, |e| e.status),
            exited_at: exit.map(|e| e.at).into(),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let state = self.state();
        Self::process(&state, &req.id, "")?;
        Ok(api::PidsResponse {
            processes: vec![ProcessInfo {
                pid: Self::vmm_pid(&state),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    /// The container's cgroup in the VM as cgroup v2 metrics (CPU time, memory use and limit,
    /// process count), what `ctr task metrics` and containerd's CRI stats read.
    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let mut state = self.state();
        Self::process(&state, &req.id, "")?;
        let vm = state.running_vm()?;
        let reply = vm
            .agent
            .stats(&[req.id.as_str()])
            .map_err(|e| internal(format!("stats of {}: {e}", req.id)))?;
        let stats = reply
            .containers
            .into_iter()
            .find(|c| c.container_id == req.id)
            .ok_or_else(|| internal(format!("the agent has no stats of {}", req.id)))?;
        let mut metrics = Metrics::new();
        let mut cpu = CPUStat::new();
        cpu.usage_usec = stats.cpu_usage_usec;
        metrics.cpu = MessageField::some(cpu);
        let mut memory = MemoryStat::new();
        memory.usage = stats.memory_usage_bytes;
        memory.usage_limit = stats.memory_limit_bytes;
        metrics.memory = MessageField::some(memory);
        let mut pids = PidsStat::new();
        pids.current = stats.pids_current;
        metrics.pids = MessageField::some(pids);
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| internal(format!("encoding the metrics: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let process = Self::process(&self.state(), &req.id, &req.exec_id)?;
        process.resize(req.height, req.width);
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let process = Self::process(&self.state(), &req.id, &req.exec_id)?;
        if req.stdin {
            process.close_stdin();
        }
        Ok(api::Empty::default())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(&req.resources.value)
                .map_err(|e| error(Code::INVALID_ARGUMENT, format!("the resources: {e}")))?;
        let mut state = self.state();
        Self::process(&state, &req.id, "")?;
        let vm = state.running_vm()?;
        vm.agent
            .update_container(&req.id, &resources)
            .map_err(|e| internal(format!("updating {}: {e}", req.id)))?;
        Ok(api::Empty::default())
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: Self::vmm_pid(&self.state()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.state().tasks.is_empty() {
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(namespaces: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": namespaces},
        }))
        .expect("spec")
    }

    #[test]
    fn the_pod_network_is_the_network_namespace_the_spec_names() {
        let cri = spec(serde_json::json!([
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
        ]));
        assert_eq!(
            pod_netns(&cri),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        // `ctr run`: a new namespace, which a VM's containers get as the VM's own.
        let new = spec(serde_json::json!([{"type": "network"}]));
        assert_eq!(pod_netns(&new), None);
    }
}
