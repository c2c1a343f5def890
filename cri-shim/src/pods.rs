//! Pod sandboxes for the CRI, on crx-runtime: RunPodSandbox boots a sandbox VM (its network
//! namespace, CNI ADD and tap when the pod has a pod network, the container share, vCPUs and
//! memory from the pod's resources) and configures the guest (hostname, DNS, sysctls,
//! interfaces); StopPodSandbox kills the containers, powers the VM off and releases the
//! network; RemovePodSandbox removes the containers and everything the sandbox had on the host.
//! A pod is READY while it was not stopped and its VMM runs: a VMM that died makes it NOTREADY.
//! [`Runtime::new`] reloads the records of an earlier crx-cri and reattaches to the containers
//! still running in live VMs. The calls block (VM boots take seconds); the gRPC layer runs
//! them on the blocking pool.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crx_image::Store;
use crx_runtime::network::{NetworkConfig, PodNetwork};
use crx_runtime::sandbox::{GuestSettings, Sandbox, SandboxConfig, SandboxError};
use k8s_cri::v1 as cri;
use tonic::Status;

use crate::cri_log::ContainerLog;
use crate::errors::{agent_status, sandbox_status};
use crate::host_ports::{host_ports_of, PublishedPorts};
use crate::records::{new_id, now_ns, ContainerState, HostPort, PodRecord, Records};
use crate::stats::CpuSamples;
use crate::streams::AttachPoint;
use crx_cri::config::Config;
use crx_cri::POD_LABEL;

/// Memory a pod VM needs besides its containers' limits (kernel, agent, page cache).
const VM_OVERHEAD_MIB: u32 = 64;
/// How long a stopping VM may take to power off before its VMM is killed.
const POWER_OFF_GRACE: Duration = Duration::from_secs(10);

/// The pods and containers of one crx-cri instance.
pub struct Runtime {
    pub config: Config,
    pub store: Store,
    records: Mutex<Records>,
    /// Open log files of running containers, by container ID.
    pub logs: Mutex<HashMap<String, Arc<ContainerLog>>>,
    /// The previous CPU sample of each container and pod, for the stats' CPU rate.
    pub cpu_samples: CpuSamples,
    /// The stdio of running containers this process pumps, by container ID, for Attach.
    pub attach_points: Mutex<HashMap<String, Arc<AttachPoint>>>,
    /// The listeners of pods' host ports, by pod ID.
    pub host_ports: PublishedPorts,
}

impl Runtime {
    /// Loads the records of `config.state_dir` and reattaches to what still runs.
    pub fn new(config: Config, store: Store) -> std::io::Result<Arc<Runtime>> {
        let records = Records::load(&config.state_dir)?;
        let runtime = Arc::new(Runtime {
            config,
            store,
            records: Mutex::new(records),
            logs: Mutex::default(),
            cpu_samples: CpuSamples::default(),
            attach_points: Mutex::default(),
            host_ports: Mutex::default(),
        });
        runtime.recover();
        Ok(runtime)
    }

    pub fn records(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where sandboxes live: this instance's state directory.
    pub fn run_root(&self) -> PathBuf {
        self.config.state_dir.clone()
    }

    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.config.runtime.boot_timeout_secs)
    }

    /// The sandbox of pod `id`, if its VM still runs.
    pub fn live_sandbox(&self, id: &str) -> Option<Sandbox> {
        let mut sandbox = Sandbox::open(&self.run_root(), id).ok()?;
        sandbox.is_running().then_some(sandbox)
    }

    /// Containers that were running when an earlier crx-cri stopped: in a live VM their exit
    /// is waited for again; in a dead one they are exited.
    fn recover(self: &Arc<Self>) {
        let ready: Vec<(String, Vec<HostPort>)> = self
            .records()
            .pods
            .values()
            .filter(|p| !p.stopped && !p.host_ports.is_empty())
            .map(|p| (p.id.clone(), p.host_ports.clone()))
            .collect();
        for (pod, ports) in ready {
            if self.live_sandbox(&pod).is_some() {
                if let Err(e) = self.publish_ports(&pod, &ports) {
                    tracing::warn!(pod, "{}", e.message());
                }
            }
        }
        let running: Vec<(String, String)> = self
            .records()
            .containers
            .values()
            .filter(|c| c.state() == ContainerState::Running)
            .map(|c| (c.id.clone(), c.pod_id.clone()))
            .collect();
        for (id, pod) in running {
            if self.live_sandbox(&pod).is_some() {
                tracing::info!(id, pod, "reattaching to a running container");
                self.watch_exit(&id, &pod);
            } else {
                self.finish_container(&id, 255, "Error", "the pod VM is gone");
            }
        }
    }

    /// The `crx-vmm` binary: configured, or beside crx-cri.
    fn vmm(&self) -> Result<PathBuf, Status> {
        self.config
            .runtime
            .vmm_path()
            .map_err(|e| Status::internal(format!("cannot find crx-cri's own path: {e}")))
    }

    /// vCPUs and memory of a pod's VM: the pod's resources (the sum of its containers'
    /// limits, as kubelet gives them) plus overhead, at least the configured default.
    fn vm_size(&self, config: &cri::PodSandboxConfig) -> (u8, u32) {
        let default = (self.config.runtime.vcpus, self.config.runtime.memory_mib);
        let Some(res) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) else {
            return default;
        };
        let vcpus = if res.cpu_quota > 0 && res.cpu_period > 0 {
            let cores = (res.cpu_quota + res.cpu_period - 1) / res.cpu_period;
            let host = std::thread::available_parallelism().map_or(1, |n| n.get() as i64);
            cores.clamp(1, host.min(255)) as u8
        } else {
            default.0
        };
        let memory = if res.memory_limit_in_bytes > 0 {
            let mib = (res.memory_limit_in_bytes + (1 << 20) - 1) >> 20;
            (mib.min(i64::from(u32::MAX - VM_OVERHEAD_MIB)) as u32 + VM_OVERHEAD_MIB).max(default.1)
        } else {
            default.1
        };
        (vcpus, memory)
    }

    /// RunPodSandbox.
    pub fn run_pod(
        self: &Arc<Self>,
        config: cri::PodSandboxConfig,
        handler: String,
    ) -> Result<String, Status> {
        if !handler.is_empty() && handler != self.config.runtime.handler {
            return Err(Status::invalid_argument(format!(
                "unknown runtime handler {handler:?} (this runtime is {:?})",
                self.config.runtime.handler
            )));
        }
        let meta = config.metadata.clone().unwrap_or_default();
        if meta.name.is_empty() {
            return Err(Status::invalid_argument("the pod has no metadata.name"));
        }
        {
            let records = self.records();
            if let Some(pod) = records.pods.values().find(|p| {
                (&p.name, &p.namespace, &p.uid, p.attempt)
                    == (&meta.name, &meta.namespace, &meta.uid, meta.attempt)
            }) {
                return Err(Status::already_exists(format!(
                    "pod {}/{} attempt {} exists as {}",
                    meta.namespace, meta.name, meta.attempt, pod.id
                )));
            }
        }
        let id = new_id();
        let linux = config.linux.clone().unwrap_or_default();
        let namespaces = linux
            .security_context
            .as_ref()
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default();
        let host_network = namespaces.network() == cri::NamespaceMode::Node;
        let host_ports = host_ports_of(&config.port_mappings, host_network)?;
        let network = (!host_network).then(|| NetworkConfig {
            conf_dir: self.config.network.cni_conf_dir.clone(),
            bin_dirs: self.config.network.cni_bin_dirs.clone(),
            args: [
                ("IgnoreUnknown", "1"),
                ("K8S_POD_NAMESPACE", meta.namespace.as_str()),
                ("K8S_POD_NAME", meta.name.as_str()),
                ("K8S_POD_INFRA_CONTAINER_ID", id.as_str()),
                ("K8S_POD_UID", meta.uid.as_str()),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..NetworkConfig::default()
        });
        let (vcpus, mem_mib) = self.vm_size(&config);
        let sandbox_config = SandboxConfig {
            id: id.clone(),
            vcpus,
            mem_mib,
            kernel: self.config.runtime.kernel.clone(),
            initrd: self.config.runtime.initrd.clone(),
            shares: Vec::new(),
            vmm: self.vmm()?,
            labels: BTreeMap::from([(
                POD_LABEL.to_owned(),
                format!("{}/{}", meta.namespace, meta.name),
            )]),
            network: network.map(PodNetwork::Cni),
            container_share: true,
            template: self.config.runtime.templates,
        };
        let mut sandbox =
            Sandbox::start(&self.run_root(), &sandbox_config).map_err(sandbox_status)?;
        sandbox.reap_in_background();
        let hostname = if config.hostname.is_empty() {
            meta.name.chars().take(63).collect()
        } else {
            config.hostname.clone()
        };
        let settings = GuestSettings {
            hostname: hostname.clone(),
            dns: config.dns_config.as_ref().map(|d| crx_agent_proto::Dns {
                servers: d.servers.clone(),
                searches: d.searches.clone(),
                options: d.options.clone(),
            }),
            sysctls: linux.sysctls.clone().into_iter().collect(),
        };
        let configured = sandbox
            .agent(Instant::now() + self.boot_timeout())
            .and_then(|mut agent| sandbox.configure(&mut agent, &settings));
        if let Err(e) = configured {
            let e = match e {
                SandboxError::Agent(_) if !sandbox.is_running() => SandboxError::VmmExited {
                    id: id.clone(),
                    log: format!("{e}\n{}", sandbox.log_tail()),
                },
                SandboxError::Agent(e) => {
                    tracing::warn!(
                        id,
                        "the pod VM's agent failed while it was configured, its VMM running: \
                         {e}\n{}",
                        sandbox.log_tail()
                    );
                    SandboxError::Agent(e)
                }
                e => e,
            };
            if let Err(undo) = sandbox.remove(Duration::ZERO) {
                tracing::warn!(id, "removing the failed sandbox: {undo}");
            }
            return Err(sandbox_status(e));
        }
        let ip = sandbox
            .state()
            .network
            .as_ref()
            .and_then(|n| n.guest.addresses.first())
            .map(|a| a.split('/').next().unwrap_or_default().to_owned())
            .unwrap_or_default();
        let record = PodRecord {
            id: id.clone(),
            name: meta.name,
            uid: meta.uid,
            namespace: meta.namespace,
            attempt: meta.attempt,
            hostname,
            log_directory: config.log_directory,
            runtime_handler: handler,
            labels: config.labels.into_iter().collect(),
            annotations: config.annotations.into_iter().collect(),
            created_ns: now_ns(),
            ip,
            stopped: false,
            host_ports: host_ports.clone(),
        };
        if let Err(e) = self.publish_ports(&id, &host_ports) {
            let _ = sandbox.remove(Duration::ZERO);
            return Err(e);
        }
        if let Err(e) = self.records().save_pod(record) {
            self.unpublish_ports(&id);
            let _ = sandbox.remove(Duration::ZERO);
            return Err(e);
        }
        tracing::info!(id, vcpus, mem_mib, "pod sandbox ready");
        Ok(id)
    }

    /// The record of pod `id` (or a unique prefix of it) and its live sandbox, if the pod is
    /// READY (see [`Runtime::pod_ready`]); otherwise FailedPrecondition.
    pub(crate) fn ready_pod(&self, id: &str) -> Result<(PodRecord, Sandbox), Status> {
        let records = self.records();
        let id = records.pod_id(id)?;
        let pod = records.pods.get(&id).cloned().expect("pod_id found it");
        drop(records);
        match self.ready_sandbox(&pod) {
            Some(sandbox) => Ok((pod, sandbox)),
            None => Err(Status::failed_precondition(format!(
                "pod sandbox {id} is not ready"
            ))),
        }
    }

    /// A TCP connection to `port` on the loopback of pod `id`'s VM, where its containers
    /// listen (PortForward), through the pod's agent.
    pub(crate) fn forward_tcp(&self, id: &str, port: u16) -> Result<UnixStream, Status> {
        let (_, sandbox) = self.ready_pod(id)?;
        let deadline = Instant::now() + crate::containers::AGENT_TIMEOUT;
        crx_runtime::agent::forward_tcp(&sandbox.vsock_path(), port, deadline).map_err(agent_status)
    }

    /// StopPodSandbox: the containers are killed, the VM powered off, the network released.
    /// Stopping a stopped pod, or one that is not there, is fine (as the CRI asks).
    pub fn stop_pod(&self, id: &str) -> Result<(), Status> {
        let id = match self.records().pod_id(id) {
            Ok(id) => id,
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.unpublish_ports(&id);
        let running: Vec<String> = self
            .records()
            .containers_of(&id)
            .filter(|c| c.state() == ContainerState::Running)
            .map(|c| c.id.clone())
            .collect();
        if let Some(mut sandbox) = self.live_sandbox(&id) {
            if let Ok(mut agent) = sandbox.agent(Instant::now() + Duration::from_secs(10)) {
                for container in &running {
                    crx_runtime::pod::stop_container(&mut agent, container, Duration::ZERO);
                }
            }
            for container in &running {
                self.await_exit(container, Duration::from_secs(5));
            }
            sandbox.stop(POWER_OFF_GRACE);
        }
        for container in &running {
            self.finish_container(container, 137, "Error", "the pod was stopped");
        }
        match Sandbox::open(&self.run_root(), &id) {
            Ok(mut sandbox) => sandbox.release_network().map_err(sandbox_status)?,
            Err(SandboxError::NotFound(_)) => {}
            Err(e) => return Err(sandbox_status(e)),
        }
        let mut records = self.records();
        if let Some(mut pod) = records.pods.get(&id).cloned() {
            pod.stopped = true;
            records.save_pod(pod)?;
        }
        tracing::info!(id, "pod sandbox stopped");
        Ok(())
    }

    /// RemovePodSandbox: its containers, the VM (killed if still running) and everything the
    /// sandbox had on the host. Removing a pod that is not there is fine.
    pub fn remove_pod(&self, id: &str) -> Result<(), Status> {
        let id = match self.records().pod_id(id) {
            Ok(id) => id,
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.unpublish_ports(&id);
        let containers: Vec<String> = self
            .records()
            .containers_of(&id)
            .map(|c| c.id.clone())
            .collect();
        if let Some(mut sandbox) = self.live_sandbox(&id) {
            sandbox.kill();
        }
        for container in &containers {
            self.remove_container(container)?;
        }
        match Sandbox::open(&self.run_root(), &id) {
            Ok(sandbox) => sandbox.remove(Duration::ZERO).map_err(sandbox_status)?,
            Err(SandboxError::NotFound(_)) => {}
            Err(e) => return Err(sandbox_status(e)),
        }
        self.records().remove_pod(&id)?;
        tracing::info!(id, "pod sandbox removed");
        Ok(())
    }

    /// Whether pod `record` is READY: not stopped, its VMM alive.
    pub fn pod_ready(&self, record: &PodRecord) -> bool {
        self.ready_sandbox(record).is_some()
    }

    /// The live sandbox of pod `record` if it is READY (its state is not read for a stopped
    /// pod).
    fn ready_sandbox(&self, record: &PodRecord) -> Option<Sandbox> {
        if record.stopped {
            return None;
        }
        self.live_sandbox(&record.id)
    }

    /// PodSandboxStatus.
    pub fn pod_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<cri::PodSandboxStatusResponse, Status> {
        let record = {
            let records = self.records();
            let id = records.pod_id(id)?;
            records.pods[&id].clone()
        };
        let ready = self.pod_ready(&record);
        let mut info = HashMap::new();
        if verbose {
            if let Ok(sandbox) = Sandbox::open(&self.run_root(), &record.id) {
                let state = sandbox.state();
                info.insert(
                    "info".to_owned(),
                    serde_json::json!({
                        "vmmPid": state.vmm_pid,
                        "vcpus": state.vcpus,
                        "memoryMiB": state.mem_mib,
                        "sandboxDir": sandbox.dir(),
                        "netns": state.network.as_ref().map(|n| n.netns.clone()),
                        "template": state.template,
                    })
                    .to_string(),
                );
            }
        }
        let status = cri::PodSandboxStatus {
            id: record.id.clone(),
            metadata: Some(pod_metadata(&record)),
            state: pod_state(ready) as i32,
            created_at: record.created_ns,
            network: Some(cri::PodSandboxNetworkStatus {
                ip: if record.stopped {
                    String::new()
                } else {
                    record.ip.clone()
                },
                additional_ips: Vec::new(),
            }),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace {
                    options: Some(cri::NamespaceOption {
                        network: if record.ip.is_empty() {
                            cri::NamespaceMode::Node
                        } else {
                            cri::NamespaceMode::Pod
                        } as i32,
                        ..Default::default()
                    }),
                }),
            }),
            labels: record.labels.clone().into_iter().collect(),
            annotations: record.annotations.clone().into_iter().collect(),
            runtime_handler: record.runtime_handler.clone(),
        };
        Ok(cri::PodSandboxStatusResponse {
            status: Some(status),
            info,
            containers_statuses: Vec::new(),
            timestamp: now_ns(),
        })
    }

    /// ListPodSandbox, filtered by ID (or prefix), state and labels.
    pub fn list_pods(&self, filter: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
        let filter = filter.unwrap_or_default();
        let pods: Vec<PodRecord> = self.records().pods.values().cloned().collect();
        pods.into_iter()
            .filter(|p| pod_matches(p, &filter.id, &filter.label_selector))
            .filter_map(|p| {
                let state = pod_state(self.pod_ready(&p));
                if let Some(want) = &filter.state {
                    if want.state != state as i32 {
                        return None;
                    }
                }
                Some(cri::PodSandbox {
                    id: p.id.clone(),
                    metadata: Some(pod_metadata(&p)),
                    state: state as i32,
                    created_at: p.created_ns,
                    labels: p.labels.into_iter().collect(),
                    annotations: p.annotations.into_iter().collect(),
                    runtime_handler: p.runtime_handler,
                })
            })
            .collect()
    }
}

fn pod_state(ready: bool) -> cri::PodSandboxState {
    if ready {
        cri::PodSandboxState::SandboxReady
    } else {
        cri::PodSandboxState::SandboxNotready
    }
}

pub(crate) fn pod_metadata(record: &PodRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: record.name.clone(),
        uid: record.uid.clone(),
        namespace: record.namespace.clone(),
        attempt: record.attempt,
    }
}

/// Whether pod `record` passes a CRI filter: its ID starts with `id` (empty: any), its labels
/// include `labels`.
pub(crate) fn pod_matches(record: &PodRecord, id: &str, labels: &HashMap<String, String>) -> bool {
    record.id.starts_with(id) && labels_match(&record.labels, labels)
}

/// Whether `labels` has every key and value of `selector`.
pub fn labels_match(labels: &BTreeMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
