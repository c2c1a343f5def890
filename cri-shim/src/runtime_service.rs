//! The CRI RuntimeService: Version, Status, the pod sandbox calls ([`crate::pods`]), the
//! container calls and ExecSync ([`crate::containers`]), the stats calls ([`crate::stats`]);
//! those block, so they run on the blocking pool. ListMetricDescriptors and
//! ListPodSandboxMetrics answer empty lists (no metrics beyond the stats), RuntimeConfig the
//! cgroupfs driver, UpdateRuntimeConfig keeps the pod CIDR. Exec and Attach answer a one-time
//! URL of the streaming server ([`crate::streams`]). The calls not built yet (PortForward,
//! checkpoints, events) answer Unimplemented, naming
//! themselves: each implemented call moves from the `not_built` list of [`runtime_service!`] to
//! its `implemented` block.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_cri::v1 as cri;
use tonic::{Request, Response, Status};

use crate::errors::join_status;
use crate::pods::Runtime;
use crx_cri::config::Config;
use crx_streaming::{Request as StreamRequest, RequestKind, StreamingServer};

/// The CRI API version this server speaks.
pub const RUNTIME_API_VERSION: &str = "v1";
/// The kubelet runtime API version answered in `VersionResponse.version` (fixed by the CRI).
const KUBELET_API_VERSION: &str = "0.1.0";
/// The runtime's name in `VersionResponse.runtime_name`.
pub const RUNTIME_NAME: &str = "crx";

/// The RuntimeService of one crx-cri instance.
pub struct RuntimeService {
    config: Config,
    runtime: Arc<Runtime>,
    /// The pod CIDR kubelet last gave in UpdateRuntimeConfig. Only kept and logged: the CNI
    /// plugins take their address ranges from their own configuration.
    pod_cidr: Mutex<String>,
    /// Where Exec and Attach sessions are served.
    streaming: Arc<StreamingServer>,
}

impl RuntimeService {
    pub fn new(runtime: Arc<Runtime>, streaming: Arc<StreamingServer>) -> Self {
        RuntimeService {
            config: runtime.config.clone(),
            runtime,
            pod_cidr: Mutex::default(),
            streaming,
        }
    }

    /// A one-time streaming URL for a session on container `id`, which must be running.
    fn stream_url(
        &self,
        id: &str,
        kind: RequestKind,
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
    ) -> Result<String, Status> {
        if !(stdin || stdout || stderr) {
            return Err(Status::invalid_argument(
                "one of stdin, stdout and stderr must be set",
            ));
        }
        if tty && stderr {
            return Err(Status::invalid_argument(
                "tty and stderr cannot both be set (a terminal carries both outputs)",
            ));
        }
        if let RequestKind::Exec { cmd } = &kind {
            if cmd.is_empty() {
                return Err(Status::invalid_argument("no command to run"));
            }
        }
        let record = self.runtime.running_container(id)?;
        self.streaming
            .url(StreamRequest {
                kind,
                target_id: record.id,
                tty,
                stdin,
                stdout,
                stderr,
            })
            .map_err(|e| Status::internal(e.to_string()))
    }

    /// Runs `f` on the runtime on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Arc<Runtime>) -> Result<T, Status> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || f(&runtime))
            .await
            .map_err(join_status)?
            .map(Response::new)
    }

    fn status_response(&self, verbose: bool) -> cri::StatusResponse {
        let condition =
            |kind: &str, status: bool, reason: &str, message: &str| cri::RuntimeCondition {
                r#type: kind.into(),
                status,
                reason: reason.into(),
                message: message.into(),
            };
        let mut info = HashMap::new();
        if verbose {
            info.insert(
                "config".to_owned(),
                serde_json::to_string(&self.config).expect("the configuration serializes"),
            );
        }
        // Recursive read-only volumes, made so on the host; user namespaces are not offered.
        let features = Some(cri::RuntimeHandlerFeatures {
            recursive_read_only_mounts: true,
            user_namespaces: false,
        });
        let network = match crx_runtime::network::cni::load(&self.config.network.cni_conf_dir, None)
        {
            Ok(_) => condition("NetworkReady", true, "", ""),
            Err(e) => condition(
                "NetworkReady",
                false,
                "NetworkPluginNotReady",
                &e.to_string(),
            ),
        };
        cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![condition("RuntimeReady", true, "", ""), network],
            }),
            info,
            // "" is the default handler (pods without a RuntimeClass); both are this runtime.
            runtime_handlers: vec![
                cri::RuntimeHandler {
                    name: String::new(),
                    features,
                },
                cri::RuntimeHandler {
                    name: self.config.runtime.handler.clone(),
                    features,
                },
            ],
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
        }
    }
}

/// The status of a RuntimeService call whose implementation does not exist yet.
fn not_built(method: &str) -> Status {
    Status::unimplemented(format!(
        "crx-cri does not implement RuntimeService/{method} yet"
    ))
}

/// The service impl: the `implemented` methods as written, one Unimplemented answer per
/// `not_built` entry (a macro, so `#[tonic::async_trait]` sees the expanded methods).
macro_rules! runtime_service {
    (implemented { $($implemented:tt)* } not_built { $($method:ident: $req:ident -> $resp:ident,)* }) => {
        #[tonic::async_trait]
        impl cri::runtime_service_server::RuntimeService for RuntimeService {
            $($implemented)*
            $(
                async fn $method(
                    &self,
                    _: Request<cri::$req>,
                ) -> Result<Response<cri::$resp>, Status> {
                    Err(not_built(stringify!($resp).trim_end_matches("Response")))
                }
            )*
        }
    };
}

runtime_service! {
    implemented {
        async fn version(
            &self,
            _: Request<cri::VersionRequest>,
        ) -> Result<Response<cri::VersionResponse>, Status> {
            Ok(Response::new(cri::VersionResponse {
                version: KUBELET_API_VERSION.into(),
                runtime_name: RUNTIME_NAME.into(),
                runtime_version: env!("CARGO_PKG_VERSION").into(),
                runtime_api_version: RUNTIME_API_VERSION.into(),
            }))
        }

        async fn status(
            &self,
            request: Request<cri::StatusRequest>,
        ) -> Result<Response<cri::StatusResponse>, Status> {
            Ok(Response::new(self.status_response(request.into_inner().verbose)))
        }

        async fn run_pod_sandbox(
            &self,
            request: Request<cri::RunPodSandboxRequest>,
        ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
            let request = request.into_inner();
            let config = request
                .config
                .ok_or_else(|| Status::invalid_argument("no pod sandbox config"))?;
            let handler = request.runtime_handler;
            self.blocking(move |r| {
                r.run_pod(config, handler)
                    .map(|pod_sandbox_id| cri::RunPodSandboxResponse { pod_sandbox_id })
            })
            .await
        }

        async fn stop_pod_sandbox(
            &self,
            request: Request<cri::StopPodSandboxRequest>,
        ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
            let id = request.into_inner().pod_sandbox_id;
            self.blocking(move |r| r.stop_pod(&id).map(|()| cri::StopPodSandboxResponse {}))
                .await
        }

        async fn remove_pod_sandbox(
            &self,
            request: Request<cri::RemovePodSandboxRequest>,
        ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
            let id = request.into_inner().pod_sandbox_id;
            self.blocking(move |r| r.remove_pod(&id).map(|()| cri::RemovePodSandboxResponse {}))
                .await
        }

        async fn pod_sandbox_status(
            &self,
            request: Request<cri::PodSandboxStatusRequest>,
        ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
            let request = request.into_inner();
            self.blocking(move |r| r.pod_status(&request.pod_sandbox_id, request.verbose))
                .await
        }

        async fn list_pod_sandbox(
            &self,
            request: Request<cri::ListPodSandboxRequest>,
        ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
            let filter = request.into_inner().filter;
            self.blocking(move |r| Ok(cri::ListPodSandboxResponse { items: r.list_pods(filter) }))
                .await
        }

        async fn create_container(
            &self,
            request: Request<cri::CreateContainerRequest>,
        ) -> Result<Response<cri::CreateContainerResponse>, Status> {
            let request = request.into_inner();
            let config = request
                .config
                .ok_or_else(|| Status::invalid_argument("no container config"))?;
            let pod = request.pod_sandbox_id;
            self.blocking(move |r| {
                r.create_container(&pod, config)
                    .map(|container_id| cri::CreateContainerResponse { container_id })
            })
            .await
        }

        async fn start_container(
            &self,
            request: Request<cri::StartContainerRequest>,
        ) -> Result<Response<cri::StartContainerResponse>, Status> {
            let id = request.into_inner().container_id;
            self.blocking(move |r| r.start_container(&id).map(|()| cri::StartContainerResponse {}))
                .await
        }

        async fn stop_container(
            &self,
            request: Request<cri::StopContainerRequest>,
        ) -> Result<Response<cri::StopContainerResponse>, Status> {
            let request = request.into_inner();
            let timeout = Duration::from_secs(request.timeout.max(0) as u64);
            self.blocking(move |r| {
                r.stop_container(&request.container_id, timeout)
                    .map(|()| cri::StopContainerResponse {})
            })
            .await
        }

        async fn remove_container(
            &self,
            request: Request<cri::RemoveContainerRequest>,
        ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
            let id = request.into_inner().container_id;
            self.blocking(move |r| {
                r.remove_container(&id).map(|()| cri::RemoveContainerResponse {})
            })
            .await
        }

        async fn list_containers(
            &self,
            request: Request<cri::ListContainersRequest>,
        ) -> Result<Response<cri::ListContainersResponse>, Status> {
            let filter = request.into_inner().filter;
            self.blocking(move |r| {
                Ok(cri::ListContainersResponse { containers: r.list_containers(filter) })
            })
            .await
        }

        async fn container_status(
            &self,
            request: Request<cri::ContainerStatusRequest>,
        ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
            let id = request.into_inner().container_id;
            self.blocking(move |r| {
                r.container_status(&id).map(|status| cri::ContainerStatusResponse {
                    status: Some(status),
                    info: HashMap::new(),
                })
            })
            .await
        }

        async fn exec(
            &self,
            request: Request<cri::ExecRequest>,
        ) -> Result<Response<cri::ExecResponse>, Status> {
            let r = request.into_inner();
            let url = self.stream_url(
                &r.container_id,
                RequestKind::Exec { cmd: r.cmd },
                r.tty,
                r.stdin,
                r.stdout,
                r.stderr,
            )?;
            Ok(Response::new(cri::ExecResponse { url }))
        }

        async fn attach(
            &self,
            request: Request<cri::AttachRequest>,
        ) -> Result<Response<cri::AttachResponse>, Status> {
            let r = request.into_inner();
            let url = self.stream_url(
                &r.container_id,
                RequestKind::Attach,
                r.tty,
                r.stdin,
                r.stdout,
                r.stderr,
            )?;
            Ok(Response::new(cri::AttachResponse { url }))
        }

        async fn port_forward(
            &self,
            request: Request<cri::PortForwardRequest>,
        ) -> Result<Response<cri::PortForwardResponse>, Status> {
            let r = request.into_inner();
            let ports = r
                .port
                .iter()
                .map(|&port| {
                    u16::try_from(port).ok().filter(|&p| p != 0).ok_or_else(|| {
                        Status::invalid_argument(format!("{port} is not a TCP port"))
                    })
                })
                .collect::<Result<Vec<u16>, Status>>()?;
            let (pod, _) = self.runtime.ready_pod(&r.pod_sandbox_id)?;
            let url = self
                .streaming
                .url(StreamRequest {
                    kind: RequestKind::PortForward { ports },
                    target_id: pod.id,
                    tty: false,
                    stdin: false,
                    stdout: false,
                    stderr: false,
                })
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(Response::new(cri::PortForwardResponse { url }))
        }

        async fn exec_sync(
            &self,
            request: Request<cri::ExecSyncRequest>,
        ) -> Result<Response<cri::ExecSyncResponse>, Status> {
            let request = request.into_inner();
            let timeout = Duration::from_secs(request.timeout.max(0) as u64);
            self.blocking(move |r| r.exec_sync(&request.container_id, request.cmd, timeout))
                .await
        }

        async fn update_container_resources(
            &self,
            request: Request<cri::UpdateContainerResourcesRequest>,
        ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
            let request = request.into_inner();
            self.blocking(move |r| {
                r.update_resources(&request.container_id, request.linux.as_ref())
                    .map(|()| cri::UpdateContainerResourcesResponse {})
            })
            .await
        }

        async fn reopen_container_log(
            &self,
            request: Request<cri::ReopenContainerLogRequest>,
        ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
            let id = request.into_inner().container_id;
            self.blocking(move |r| r.reopen_log(&id).map(|()| cri::ReopenContainerLogResponse {}))
                .await
        }

        async fn container_stats(
            &self,
            request: Request<cri::ContainerStatsRequest>,
        ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
            let id = request.into_inner().container_id;
            self.blocking(move |r| {
                r.container_stats(&id)
                    .map(|stats| cri::ContainerStatsResponse { stats: Some(stats) })
            })
            .await
        }

        async fn list_container_stats(
            &self,
            request: Request<cri::ListContainerStatsRequest>,
        ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
            let filter = request.into_inner().filter;
            self.blocking(move |r| {
                Ok(cri::ListContainerStatsResponse { stats: r.list_container_stats(filter) })
            })
            .await
        }

        async fn pod_sandbox_stats(
            &self,
            request: Request<cri::PodSandboxStatsRequest>,
        ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
            let id = request.into_inner().pod_sandbox_id;
            self.blocking(move |r| {
                r.pod_sandbox_stats(&id)
                    .map(|stats| cri::PodSandboxStatsResponse { stats: Some(stats) })
            })
            .await
        }

        async fn list_pod_sandbox_stats(
            &self,
            request: Request<cri::ListPodSandboxStatsRequest>,
        ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
            let filter = request.into_inner().filter;
            self.blocking(move |r| {
                Ok(cri::ListPodSandboxStatsResponse { stats: r.list_pod_sandbox_stats(filter) })
            })
            .await
        }

        async fn list_metric_descriptors(
            &self,
            _: Request<cri::ListMetricDescriptorsRequest>,
        ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
            Ok(Response::new(cri::ListMetricDescriptorsResponse { descriptors: Vec::new() }))
        }

        async fn list_pod_sandbox_metrics(
            &self,
            _: Request<cri::ListPodSandboxMetricsRequest>,
        ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
            Ok(Response::new(cri::ListPodSandboxMetricsResponse { pod_metrics: Vec::new() }))
        }

        async fn update_runtime_config(
            &self,
            request: Request<cri::UpdateRuntimeConfigRequest>,
        ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
            let cidr = request
                .into_inner()
                .runtime_config
                .and_then(|c| c.network_config)
                .map(|n| n.pod_cidr)
                .unwrap_or_default();
            // An empty CIDR leaves the one kept (as the CRI asks).
            if !cidr.is_empty() {
                let mut kept = self.pod_cidr.lock().unwrap_or_else(|e| e.into_inner());
                if *kept != cidr {
                    tracing::info!(
                        pod_cidr = %cidr,
                        "pod CIDR updated (the CNI configuration decides the pod addresses)"
                    );
                    *kept = cidr;
                }
            }
            Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
        }

        async fn runtime_config(
            &self,
            _: Request<cri::RuntimeConfigRequest>,
        ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
            // The containers' cgroups are the agent's, in the pod VM, on cgroupfs.
            Ok(Response::new(cri::RuntimeConfigResponse {
                linux: Some(cri::LinuxRuntimeConfiguration {
                    cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
                }),
            }))
        }

        type GetContainerEventsStream = tonic::codegen::BoxStream<cri::ContainerEventResponse>;

        async fn get_container_events(
            &self,
            _: Request<cri::GetEventsRequest>,
        ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
            Err(not_built("GetContainerEvents"))
        }
    }
    not_built {
        checkpoint_container: CheckpointContainerRequest -> CheckpointContainerResponse,
    }
}
