//! Pods and their containers. A pod with one container, as `crx run` makes it: the image
//! leased in the store (so it cannot be removed underneath), its root filesystem shared
//! read-only into a new sandbox VM over virtio-fs (the agent puts a writable overlay on top
//! inside the guest), the container created from the image's run config and the caller's
//! overrides; removing the pod stops the VM, removes the sandbox directory and releases the
//! lease. A pod of several containers, as the CRI makes it: a sandbox with the container share
//! ([`crate::share`]), each container added while the VM runs ([`add_container`]: its image
//! leased, its root mounted into the share, the container created by the agent) and removed
//! the same way back ([`remove_container`]). Stopping a container (SIGTERM, SIGKILL after a
//! grace period) and exit codes are shared by both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crx_agent_proto::{ContainerState, ExitKind, ExitStatus, Rootfs};
use crx_image::{ImageRecord, Store};
use oci_spec::runtime::Spec;

use crate::agent::{AgentClient, AgentError};
use crate::network::{NetworkConfig, PodNetwork};
use crate::sandbox::{GuestSettings, Sandbox, SandboxConfig, SandboxError, Share};
use crate::share::{self, ShareError, Volume, CONTAINERS_TAG};
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
    #[error("pod {0} has no container share")]
    NoShare(String),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error("pod template: {0}")]
    Template(#[from] crate::template::TemplateError),
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
    /// Restore the VM from a pod template when one fits (see [`crate::template`]).
    pub template: bool,
    /// A pod network (CNI) for the VM; `None`: no network device.
    pub network: Option<NetworkConfig>,
    /// Host paths bound into the container. With any, the pod has a container share (which
    /// carries the image's root and the volumes, see [`crate::share`]) instead of the image's
    /// root shared as [`ROOTFS_TAG`].
    pub volumes: Vec<Volume>,
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

/// The sandbox of a one-container pod: its image root shared read-only as [`ROOTFS_TAG`] (or,
/// with volumes, a container share), and the request's pod network, if any.
fn sandbox_config(request: &PodRequest, rootfs: PathBuf) -> SandboxConfig {
    let container_share = !request.volumes.is_empty();
    let shares = match container_share {
        true => Vec::new(),
        false => vec![Share {
            tag: ROOTFS_TAG.into(),
            dir: rootfs,
            read_only: true,
        }],
    };
    SandboxConfig {
        id: request.id.clone(),
        vcpus: request.vcpus,
        mem_mib: request.mem_mib,
        kernel: request.kernel.clone(),
        initrd: request.initrd.clone(),
        shares,
        vmm: request.vmm.clone(),
        labels: BTreeMap::new(),
        network: request.network.clone().map(PodNetwork::Cni),
        container_share,
        template: request.template,
    }
}

/// Makes the pod template `request`'s pods are restored from, if there is none yet; returns its
/// directory.
pub fn build_template(run_root: &Path, request: &PodRequest) -> Result<PathBuf, PodError> {
    let config = sandbox_config(request, PathBuf::new());
    Ok(crate::template::find_or_build(run_root, &config)?)
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
    let (rootfs, spec) = image_spec(store, image, &request.process)?;
    store.lease(&image.name, &request.id)?;
    let mut sandbox = None;
    let made = (|| {
        let command = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .unwrap_or_default()
            .join(" ");
        let mut config = sandbox_config(request, rootfs.clone());
        config.labels = BTreeMap::from([
            (IMAGE_LABEL.to_owned(), image.name.clone()),
            (COMMAND_LABEL.to_owned(), command),
        ]);
        let started = sandbox.insert(Sandbox::start(run_root, &config)?);
        let mut agent = started.agent(Instant::now() + request.boot_timeout)?;
        if request.network.is_some() {
            // The guest's interface: the pod's MAC, addresses and routes (and its hostname;
            // without a network the container's own UTS namespace is all that needs one).
            let settings = GuestSettings {
                hostname: request.process.hostname.clone().unwrap_or_default(),
                ..GuestSettings::default()
            };
            started.configure(&mut agent, &settings)?;
        }
        let agent_error = |source| PodError::Agent {
            id: request.id.clone(),
            source,
        };
        if request.volumes.is_empty() {
            agent
                .create_container(
                    &request.id,
                    Rootfs {
                        fs_tag: ROOTFS_TAG.into(),
                        path: String::new(),
                    },
                    &spec,
                    request.process.terminal,
                    Vec::new(),
                )
                .map_err(agent_error)?;
        } else {
            let container = ContainerRoot {
                id: &request.id,
                rootfs: &rootfs,
                volumes: &request.volumes,
            };
            add_container_with_spec(
                started,
                &mut agent,
                &container,
                &spec,
                request.process.terminal,
            )?;
        }
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

/// The unpacked root filesystem of `image` and the spec of a container of it.
fn image_spec(
    store: &Store,
    image: &ImageRecord,
    process: &ProcessOverrides,
) -> Result<(PathBuf, Spec), PodError> {
    let rootfs = store
        .rootfs(image)
        .ok_or_else(|| PodError::EmptyImage(image.name.clone()))?;
    let spec = container_spec(&rootfs, &store.run_config(image)?, process)?;
    Ok((rootfs, spec))
}

/// Adds container `id` of `image` to a running sandbox that has the container share: leases
/// the image as `lease`, mounts its root and `volumes` into the share and has the agent create
/// the container (not started) with the volumes bound at their container paths. On failure
/// nothing of it is left.
#[allow(clippy::too_many_arguments)]
pub fn add_container(
    sandbox: &Sandbox,
    agent: &mut AgentClient,
    store: &Store,
    image: &ImageRecord,
    id: &str,
    lease: &str,
    process: &ProcessOverrides,
    volumes: &[Volume],
) -> Result<(), PodError> {
    crate::sandbox::check_id(id)?;
    let (rootfs, spec) = image_spec(store, image, process)?;
    store.lease(&image.name, lease)?;
    let container = ContainerRoot {
        id,
        rootfs: &rootfs,
        volumes,
    };
    if let Err(e) = add_container_with_spec(sandbox, agent, &container, &spec, process.terminal) {
        let _ = store.release(lease);
        return Err(e);
    }
    tracing::info!(pod = %sandbox.id(), id, image = %image.name, volumes = volumes.len(), "container created");
    Ok(())
}

/// Where a container's files come from on the host: its root filesystem and its volumes.
#[derive(Debug, Clone, Copy)]
pub struct ContainerRoot<'a> {
    pub id: &'a str,
    pub rootfs: &'a Path,
    pub volumes: &'a [Volume],
}

/// Adds a container with a ready-made `spec` to a running sandbox that has the container
/// share: mounts its root and volumes into the share and has the agent create the container
/// (not started) with the volumes bound at their container paths. On failure nothing of it is
/// left.
pub fn add_container_with_spec(
    sandbox: &Sandbox,
    agent: &mut AgentClient,
    container: &ContainerRoot<'_>,
    spec: &Spec,
    terminal: bool,
) -> Result<(), PodError> {
    let id = container.id;
    crate::sandbox::check_id(id)?;
    let share = sandbox
        .state()
        .container_share
        .clone()
        .ok_or_else(|| PodError::NoShare(sandbox.id().to_owned()))?;
    let made = share::attach(&share, id, container.rootfs, container.volumes)
        .map_err(PodError::from)
        .and_then(|()| {
            let rootfs = Rootfs {
                fs_tag: CONTAINERS_TAG.into(),
                path: share::rootfs_path(id),
            };
            let volumes = container
                .volumes
                .iter()
                .enumerate()
                .map(|(index, volume)| crx_agent_proto::Volume {
                    fs_tag: CONTAINERS_TAG.into(),
                    path: share::volume_path(id, index),
                    destination: volume.container_path.clone(),
                })
                .collect();
            agent
                .create_container(id, rootfs, spec, terminal, volumes)
                .map_err(|source| PodError::Agent {
                    id: sandbox.id().to_owned(),
                    source,
                })
        });
    if let Err(e) = made {
        let _ = share::detach(&share, id);
        return Err(e);
    }
    Ok(())
}

/// Removes container `id` from its sandbox: the agent's container (when the VM still runs,
/// `agent` is its client), its root in the share, its image lease `lease`. Repeatable.
pub fn remove_container(
    sandbox: &Sandbox,
    agent: Option<&mut AgentClient>,
    store: &Store,
    id: &str,
    lease: &str,
) -> Result<(), PodError> {
    remove_container_from_share(sandbox, agent, id)?;
    match store.release(lease) {
        Err(crx_image::Error::LeaseNotFound(_)) | Ok(()) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes container `id` from its sandbox: the agent's container (when the VM still runs,
/// `agent` is its client) and its root and volumes in the share. Repeatable.
pub fn remove_container_from_share(
    sandbox: &Sandbox,
    agent: Option<&mut AgentClient>,
    id: &str,
) -> Result<(), PodError> {
    if let Some(agent) = agent {
        match agent.remove_container(id) {
            Err(e) if e.code() != Some(crx_agent_proto::ErrorCode::NotFound) => {
                return Err(PodError::Agent {
                    id: sandbox.id().to_owned(),
                    source: e,
                })
            }
            _ => {}
        }
    }
    if let Some(share) = &sandbox.state().container_share {
        share::detach(share, id)?;
    }
    Ok(())
}

/// Stops the main process of container `id`: SIGTERM, then SIGKILL once `grace` has passed.
/// Returns once it no longer runs (or the agent stopped answering).
pub fn stop_container(agent: &mut AgentClient, id: &str, grace: Duration) {
    let running = |agent: &mut AgentClient| {
        agent
            .list_containers()
            .map(|list| {
                list.iter()
                    .any(|c| c.container_id == id && c.state() == ContainerState::Running)
            })
            .unwrap_or(false)
    };
    let wait = |agent: &mut AgentClient, limit: Duration| {
        let deadline = Instant::now() + limit;
        loop {
            if !running(agent) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    if !grace.is_zero() {
        let _ = agent.signal_process(id, "", libc::SIGTERM);
        if wait(agent, grace) {
            return;
        }
    }
    let _ = agent.signal_process(id, "", libc::SIGKILL);
    wait(agent, Duration::from_secs(30));
}

/// The shell's view of an exit status: the code, or 128 + the signal; 255 when unknown.
pub fn exit_code(status: &ExitStatus) -> i32 {
    match status.status {
        Some(ExitKind::Code(code)) => code,
        Some(ExitKind::Signal(signal)) => 128 + signal,
        None => 255,
    }
}
