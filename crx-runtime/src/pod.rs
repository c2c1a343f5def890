//! A pod with one container, as `crx run` makes it: the image leased in the store (so it cannot
//! be removed underneath), its root filesystem shared read-only into a new sandbox VM over
//! virtio-fs (the agent puts a writable overlay on top inside the guest), the container
//! created from the image's run config and the caller's overrides. Removing the pod stops the
//! VM, removes the sandbox directory and releases the lease.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crx_agent_proto::Rootfs;
use crx_image::{ImageRecord, Store};

use crate::agent::{AgentClient, AgentError};
use crate::sandbox::{Sandbox, SandboxConfig, SandboxError, Share};
use crate::spec::{container_spec, ProcessOverrides, SpecError};

/// The virtio-fs tag of the image root filesystem in a pod VM.
pub const ROOTFS_TAG: &str = "rootfs";
/// Label keys kept with the sandbox.
pub const IMAGE_LABEL: &str = "image";
pub const COMMAND_LABEL: &str = "command";

/// Why a pod could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Image(#[from] crx_image::Error),
    #[error("image {0} has no layers")]
    EmptyImage(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("the agent of pod {id}: {source}")]
    Agent {
        id: String,
        #[source]
        source: AgentError,
    },
}

/// What to make.
#[derive(Debug, Clone)]
pub struct PodRequest {
    /// Pod (sandbox) id; the container in it has the same id.
    pub id: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The `crx-vmm` binary.
    pub vmm: PathBuf,
    pub process: ProcessOverrides,
    /// How long the guest may take to boot and answer.
    pub boot_timeout: Duration,
}

/// A pod whose container is created, not yet started.
pub struct Pod {
    pub sandbox: Sandbox,
    pub agent: AgentClient,
}

impl Pod {
    pub fn id(&self) -> &str {
        self.sandbox.id()
    }
}

/// Leases `image`, boots the pod VM and creates its container. On failure nothing is left:
/// no VM, no sandbox directory, no lease.
pub fn create_pod(
    run_root: &Path,
    store: &Store,
    image: &ImageRecord,
    request: &PodRequest,
) -> Result<Pod, PodError> {
    crate::sandbox::check_id(&request.id)?;
    let rootfs = store
        .rootfs(image)
        .ok_or_else(|| PodError::EmptyImage(image.name.clone()))?;
    let spec = container_spec(&rootfs, &store.run_config(image)?, &request.process)?;
    store.lease(&image.name, &request.id)?;
    let mut sandbox = None;
    let made = (|| {
        let command = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .unwrap_or_default()
            .join(" ");
        let config = SandboxConfig {
            id: request.id.clone(),
            vcpus: request.vcpus,
            mem_mib: request.mem_mib,
            kernel: request.kernel.clone(),
            initrd: request.initrd.clone(),
            shares: vec![Share {
                tag: ROOTFS_TAG.into(),
                dir: rootfs.clone(),
                read_only: true,
            }],
            vmm: request.vmm.clone(),
            labels: BTreeMap::from([
                (IMAGE_LABEL.to_owned(), image.name.clone()),
                (COMMAND_LABEL.to_owned(), command),
            ]),
            network: None,
        };
        let started = sandbox.insert(Sandbox::start(run_root, &config)?);
        let mut agent = started.agent(Instant::now() + request.boot_timeout)?;
        let agent_error = |source| PodError::Agent {
            id: request.id.clone(),
            source,
        };
        agent
            .create_container(
                &request.id,
                Rootfs {
                    fs_tag: ROOTFS_TAG.into(),
                    path: String::new(),
                },
                &spec,
                request.process.terminal,
            )
            .map_err(agent_error)?;
        Ok(agent)
    })();
    match made {
        Ok(agent) => Ok(Pod {
            sandbox: sandbox.expect("the sandbox started"),
            agent,
        }),
        Err(e) => {
            if let Some(sandbox) = sandbox {
                let _ = sandbox.remove(Duration::ZERO);
            }
            let _ = store.release(&request.id);
            Err(e)
        }
    }
}

/// Stops pod `id`'s VM (after `grace`, killing it), removes its sandbox and releases its
/// image lease. A pod whose VMM already died is cleaned up the same way.
pub fn remove_pod(
    run_root: &Path,
    store: &Store,
    id: &str,
    grace: Duration,
) -> Result<(), PodError> {
    let removed = Sandbox::open(run_root, id).and_then(|s| s.remove(grace));
    let released = match store.release(id) {
        Err(crx_image::Error::LeaseNotFound(_)) => Ok(()),
        other => other,
    };
    removed?;
    released?;
    Ok(())
}
