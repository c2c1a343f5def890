//! The CRI RuntimeService: Version and Status now; the pod and container calls answer
//! Unimplemented, naming themselves, until the runtime behind them (pod VMs through
//! crx-runtime) is built. Each implemented call moves from the `not_built` list of
//! [`runtime_service!`] to its `implemented` block.

use std::collections::HashMap;

use k8s_cri::v1 as cri;
use tonic::{Request, Response, Status};

use crate::config::Config;

/// The CRI API version this server speaks.
pub const RUNTIME_API_VERSION: &str = "v1";
/// The kubelet runtime API version answered in `VersionResponse.version` (fixed by the CRI).
const KUBELET_API_VERSION: &str = "0.1.0";
/// The runtime's name in `VersionResponse.runtime_name`.
pub const RUNTIME_NAME: &str = "crx";

/// The RuntimeService of one crx-cri instance.
pub struct RuntimeService {
    config: Config,
}

impl RuntimeService {
    pub fn new(config: Config) -> Self {
        RuntimeService { config }
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
        // Neither recursive read-only mounts nor user namespaces are offered yet.
        let features = Some(cri::RuntimeHandlerFeatures {
            recursive_read_only_mounts: false,
            user_namespaces: false,
        });
        cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![
                    condition("RuntimeReady", true, "", ""),
                    condition(
                        "NetworkReady",
                        false,
                        "NetworkNotImplemented",
                        "crx-cri does not set up pod networking yet",
                    ),
                ],
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
        "crx-cri does not implement RuntimeService/{method} yet (pods and containers come next)"
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

        type GetContainerEventsStream = tonic::codegen::BoxStream<cri::ContainerEventResponse>;

        async fn get_container_events(
            &self,
            _: Request<cri::GetEventsRequest>,
        ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
            Err(not_built("GetContainerEvents"))
        }
    }
    not_built {
        run_pod_sandbox: RunPodSandboxRequest -> RunPodSandboxResponse,
        stop_pod_sandbox: StopPodSandboxRequest -> StopPodSandboxResponse,
        remove_pod_sandbox: RemovePodSandboxRequest -> RemovePodSandboxResponse,
        pod_sandbox_status: PodSandboxStatusRequest -> PodSandboxStatusResponse,
        list_pod_sandbox: ListPodSandboxRequest -> ListPodSandboxResponse,
        create_container: CreateContainerRequest -> CreateContainerResponse,
        start_container: StartContainerRequest -> StartContainerResponse,
        stop_container: StopContainerRequest -> StopContainerResponse,
        remove_container: RemoveContainerRequest -> RemoveContainerResponse,
        list_containers: ListContainersRequest -> ListContainersResponse,
        container_status: ContainerStatusRequest -> ContainerStatusResponse,
        update_container_resources: UpdateContainerResourcesRequest -> UpdateContainerResourcesResponse,
        reopen_container_log: ReopenContainerLogRequest -> ReopenContainerLogResponse,
        exec_sync: ExecSyncRequest -> ExecSyncResponse,
        exec: ExecRequest -> ExecResponse,
        attach: AttachRequest -> AttachResponse,
        port_forward: PortForwardRequest -> PortForwardResponse,
        container_stats: ContainerStatsRequest -> ContainerStatsResponse,
        list_container_stats: ListContainerStatsRequest -> ListContainerStatsResponse,
        pod_sandbox_stats: PodSandboxStatsRequest -> PodSandboxStatsResponse,
        list_pod_sandbox_stats: ListPodSandboxStatsRequest -> ListPodSandboxStatsResponse,
        update_runtime_config: UpdateRuntimeConfigRequest -> UpdateRuntimeConfigResponse,
        checkpoint_container: CheckpointContainerRequest -> CheckpointContainerResponse,
        list_metric_descriptors: ListMetricDescriptorsRequest -> ListMetricDescriptorsResponse,
        list_pod_sandbox_metrics: ListPodSandboxMetricsRequest -> ListPodSandboxMetricsResponse,
        runtime_config: RuntimeConfigRequest -> RuntimeConfigResponse,
    }
}
