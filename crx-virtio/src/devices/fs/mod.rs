//! virtio-fs as a vhost-user frontend to virtiofsd: the device owns a virtiofsd child process
//! ([`virtiofsd`]), negotiates features with it when it is built, and at DRIVER_OK hands it the
//! guest RAM (the memfd regions), the rings, each queue's ioeventfd as the kick fd and the
//! device's irqfd as the call fd, so requests and replies never pass through the VMM. The VMM
//! only watches virtiofsd on the event loop: a pidfd tells when the child exited (logged with its
//! status), and the vhost-user socket's hang-up tells when the process serving the rings is gone;
//! then the device marks itself as needing a reset and answers every pending and later request
//! with ENOTCONN ([`orphaned`]). Dropping the device hangs up, reaps virtiofsd (killing it if it
//! does not exit by itself) and removes its socket.
//!
//! virtiofsd runs with `--cache=auto --thread-pool-size=0` and the sandbox [`FsConfig::sandbox`]
//! asks for. In CRX's test host (root in a Debian 6.1 L1 VM whose root is 9p under a tmpfs
//! overlay) the default `namespace` sandbox works, sharing a directory on the 9p /tmp or on a
//! tmpfs; virtiofsd warns there that the filesystem has no file handles and falls back to O_PATH
//! fds. The vhost-user socket cannot live on 9p (bind fails with ENXIO); its default directory,
//! `/run/crx` (or `$XDG_RUNTIME_DIR/crx`), is a local tmpfs, made 0700.

mod orphaned;
mod virtiofsd;

pub use virtiofsd::find_binary as find_virtiofsd;

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, EventSet, Events};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::base::Active;
use crate::device::{
    consume, read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice,
};
use crate::persist::{DeviceState, PersistError};
use virtiofsd::Virtiofsd;

/// The longest tag the configuration space holds.
pub const TAG_MAX_LEN: usize = 36;
const CONFIG_LEN: usize = TAG_MAX_LEN + 4;
/// What the event loop watches the vhost-user socket for (never its replies, which the vCPU
/// thread reads during activation).
const CONNECTION_HANG_UP: EventSet = EventSet::READ_HANG_UP.union(EventSet::HANG_UP);
/// The vhost-user feature bit that enables protocol feature negotiation.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// The queues a backend without the MQ protocol feature serves: high-priority plus one request.
const SINGLE_QUEUE_BACKEND: u64 = 2;
/// The virtio features this transport can pass through from virtiofsd to the guest.
const PASSED_THROUGH_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX;

/// How virtiofsd isolates itself (its `--sandbox`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FsSandbox {
    /// New mount, PID and network namespaces with the shared directory as root (needs root or a
    /// user namespace).
    #[default]
    Namespace,
    /// chroot(2) into the shared directory (needs root).
    Chroot,
    /// No isolation: for unprivileged use.
    None,
}

impl FsSandbox {
    fn as_arg(self) -> &'static str {
        match self {
            FsSandbox::Namespace => "namespace",
            FsSandbox::Chroot => "chroot",
            FsSandbox::None => "none",
        }
    }
}

/// A host directory shared with the guest under a mount tag.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsConfig {
    /// What the guest mounts (`mount -t virtiofs TAG /mnt`); at most 36 bytes.
    pub tag: String,
    pub shared_dir: PathBuf,
    /// Serve the directory read-only (virtiofsd `--readonly`): the guest cannot change it.
    pub read_only: bool,
    /// The virtiofsd binary; `None` looks for `virtiofsd` on PATH, then in ~/.cargo/bin.
    pub virtiofsd: Option<PathBuf>,
    /// Where the vhost-user socket is created (mode 0700); `None` is `$XDG_RUNTIME_DIR/crx` or
    /// `/run/crx`.
    pub socket_dir: Option<PathBuf>,
    pub sandbox: FsSandbox,
    pub num_request_queues: u16,
    /// The size of every queue (a power of two).
    pub queue_size: u16,
}

impl FsConfig {
    /// Read-write, one request queue of 256 entries, virtiofsd found on PATH, namespace sandbox.
    pub fn new(tag: impl Into<String>, shared_dir: impl Into<PathBuf>) -> Self {
        FsConfig {
            tag: tag.into(),
            shared_dir: shared_dir.into(),
            read_only: false,
            virtiofsd: None,
            socket_dir: None,
            sandbox: FsSandbox::default(),
            num_request_queues: 1,
            queue_size: 256,
        }
    }
}

/// Why a virtio-fs device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    InvalidTag(String),
    #[error("virtio-fs needs 1 or more request queues and a power-of-two queue size")]
    InvalidQueues,
    #[error("virtio-fs shared directory {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot create the vhost-user socket directory {path}: {source}")]
    SocketDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("virtiofsd is neither on PATH nor in ~/.cargo/bin (cargo install virtiofsd --locked)")]
    VirtiofsdNotFound,
    #[error("cannot start virtiofsd {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch virtiofsd (pidfd_open): {0}")]
    Pidfd(#[source] std::io::Error),
    #[error("cannot wait for virtiofsd: {0}")]
    Wait(#[source] std::io::Error),
    #[error("virtiofsd exited at start: {0}")]
    ExitedAtStart(std::process::ExitStatus),
    #[error("virtiofsd did not create its socket {0} in time")]
    SocketTimeout(PathBuf),
    #[error(
        "virtio-fs needs {asked} queues (high-priority plus requests); virtiofsd serves {served}"
    )]
    TooManyQueues { asked: usize, served: u64 },
    #[error("vhost-user {step} with virtiofsd failed: {source}")]
    VhostUser {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("cannot create the device's eventfds: {0}")]
    EventFd(#[source] std::io::Error),
}

fn vhost_step(step: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
    move |source| FsError::VhostUser { step, source }
}

/// A virtio-fs device served by virtiofsd.
pub struct Fs {
    tag: String,
    config_space: [u8; CONFIG_LEN],
    queue_max_sizes: Vec<u16>,
    queue_events: Vec<EventFd>,
    /// What virtiofsd offers (virtio and vhost-user bits).
    backend_features: u64,
    /// Dropped before `virtiofsd`: the hang-up lets virtiofsd exit by itself.
    frontend: Frontend,
    virtiofsd: Virtiofsd,
    /// False once the vhost-user connection hung up: the device then answers requests itself.
    backend_alive: bool,
    active: Option<Active>,
}

impl Fs {
    /// Starts virtiofsd and negotiates the vhost-user session up to the point that needs the
    /// driver (features it acks, memory, rings).
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        if config.tag.is_empty() || config.tag.len() > TAG_MAX_LEN {
            return Err(FsError::InvalidTag(config.tag.clone()));
        }
        if config.num_request_queues == 0 || !config.queue_size.is_power_of_two() {
            return Err(FsError::InvalidQueues);
        }
        if !config.shared_dir.is_dir() {
            return Err(FsError::NotADirectory(config.shared_dir.clone()));
        }
        let num_queues = 1 + usize::from(config.num_request_queues);
        let queue_events = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(FsError::EventFd)?;
        let virtiofsd = Virtiofsd::start(config)?;
        let mut frontend = Frontend::connect(virtiofsd.socket_path(), num_queues as u64)
            .map_err(vhost_step("connect"))?;
        frontend.set_owner().map_err(vhost_step("SET_OWNER"))?;
        let backend_features = frontend
            .get_features()
            .map_err(vhost_step("GET_FEATURES"))?;
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(vhost_step("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            let acked = offered & wanted;
            frontend
                .set_protocol_features(acked)
                .map_err(vhost_step("SET_PROTOCOL_FEATURES"))?;
            let served = if acked.contains(VhostUserProtocolFeatures::MQ) {
                frontend
                    .get_queue_num()
                    .map_err(vhost_step("GET_QUEUE_NUM"))?
            } else {
                SINGLE_QUEUE_BACKEND
            };
            if served < num_queues as u64 {
                return Err(FsError::TooManyQueues {
                    asked: num_queues,
                    served,
                });
            }
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later request is acknowledged, so a failure shows at activation.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..config.tag.len()].copy_from_slice(config.tag.as_bytes());
        config_space[TAG_MAX_LEN..]
            .copy_from_slice(&u32::from(config.num_request_queues).to_le_bytes());
        tracing::debug!(
            "virtio-fs {}: virtiofsd pid {} offers features {backend_features:#x}",
            config.tag,
            virtiofsd.pid()
        );
        Ok(Fs {
            tag: config.tag.clone(),
            config_space,
            queue_max_sizes: vec![config.queue_size; num_queues],
            queue_events,
            backend_features,
            frontend,
            virtiofsd,
            backend_alive: true,
            active: None,
        })
    }

    /// Hands the driver's queues to virtiofsd.
    fn start_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        interrupt: &Interrupt,
        acked_features: u64,
    ) -> Result<(), FsError> {
        let protocol = self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES;
        self.frontend
            .set_features(acked_features & self.backend_features | protocol)
            .map_err(vhost_step("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(vhost_step("guest memory regions"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(vhost_step("SET_MEM_TABLE"))?;
        for (index, queue) in queues.iter().enumerate() {
            let host = |addr: u64| {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| FsError::VhostUser {
                        step: "ring address",
                        source: vhost::Error::InvalidGuestMemory,
                    })
            };
            let ring = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(queue.desc_table())?,
                used_ring_addr: host(queue.used_ring())?,
                avail_ring_addr: host(queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, queue.size())
                .map_err(vhost_step("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &ring)
                .map_err(vhost_step("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(vhost_step("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, interrupt.irqfd())
                .map_err(vhost_step("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &self.queue_events[index])
                .map_err(vhost_step("SET_VRING_KICK"))?;
            if protocol != 0 {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(vhost_step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// virtiofsd's pidfd became readable: reap it and report how it ended.
    fn virtiofsd_exited(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.remove(Events::new(&self.virtiofsd.exit_event(), EventSet::IN)) {
            tracing::warn!("virtio-fs {}: cannot unwatch virtiofsd: {e}", self.tag);
        }
        let status = match self.virtiofsd.reap() {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        tracing::error!(
            "virtiofsd for tag {} (pid {}) exited: status {status}",
            self.tag,
            self.virtiofsd.pid(),
        );
    }

    /// The vhost-user connection hung up: the process serving the rings is gone (with the
    /// namespace sandbox that is virtiofsd's grandchild, which outlives its parent by a moment),
    /// so no one else touches them now. The device takes the queues over.
    fn connection_closed(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.remove(Events::new(&self.frontend, CONNECTION_HANG_UP)) {
            tracing::warn!("virtio-fs {}: cannot unwatch the connection: {e}", self.tag);
        }
        tracing::error!(
            "virtio-fs {}: virtiofsd closed its vhost-user connection; the guest's requests on {} now fail with ENOTCONN",
            self.tag,
            self.tag,
        );
        self.backend_alive = false;
        for event in &self.queue_events {
            if let Err(e) = ops.add(Events::new(event, EventSet::IN)) {
                tracing::error!("virtio-fs {}: cannot watch a queue: {e}", self.tag);
            }
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        active.interrupt.mark_needs_reset();
        // virtiofsd may have died between publishing a reply in the used ring and signalling
        // the call fd; a used-buffer interrupt makes the driver look (a spare one is harmless).
        active.interrupt.signal_used_queue();
        match orphaned::take_over(&mut active.queues, &active.mem) {
            Ok(unanswered) => tracing::warn!(
                "virtio-fs {}: failing {unanswered} requests virtiofsd left unanswered",
                self.tag
            ),
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        }
        for queue in &mut active.queues {
            orphaned::fail_requests(queue, &active.mem, &active.interrupt);
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        self.backend_features & PASSED_THROUGH_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if activation.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(ActivateError::LegacyDriver);
        }
        if let Some(index) = activation.queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::InvalidQueue(index));
        }
        if !self.backend_alive {
            return Err(ActivateError::Backend(format!(
                "virtiofsd for tag {} has exited",
                self.tag
            )));
        }
        self.start_backend(
            &activation.mem,
            &activation.queues,
            &activation.interrupt,
            activation.acked_features,
        )
        .map_err(|e| ActivateError::Backend(e.to_string()))?;
        self.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
            acked_features: activation.acked_features,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if self.active.take().is_some() && self.backend_alive {
            // GET_VRING_BASE stops a ring; a later activation sets everything up again.
            for index in 0..self.queue_events.len() {
                if let Err(e) = self.frontend.get_vring_base(index) {
                    tracing::warn!("virtio-fs {}: stopping ring {index}: {e}", self.tag);
                    return false;
                }
            }
        }
        true
    }

    fn backend_signals_directly(&self) -> bool {
        self.backend_alive
    }

    fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }

    /// Only a device the guest has sent no request yet can be saved: from the first request on
    /// (FUSE_INIT, at mount) virtiofsd holds the guest's FUSE session (its inodes and open
    /// files), which it can neither save nor take back. Until then a new virtiofsd serving the
    /// same rings from their start is all a restored guest needs.
    fn save_state(&self) -> Result<DeviceState, PersistError> {
        if let Some(active) = &self.active {
            for queue in &active.queues {
                let posted = queue
                    .avail_idx(&active.mem, Ordering::Acquire)
                    .map_err(|e| PersistError::Mismatch(format!("reading a ring: {e}")))?;
                if posted.0 != 0 {
                    return Err(PersistError::NotSnapshottable {
                        device_type: VIRTIO_ID_FS,
                        why: "the guest has mounted it: virtiofsd's FUSE session cannot be saved",
                    });
                }
            }
        }
        Ok(DeviceState::Fs {
            tag: self.tag.clone(),
        })
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Fs { tag } if *tag == self.tag => Ok(()),
            DeviceState::Fs { tag } => Err(PersistError::Mismatch(format!(
                "virtio-fs tag {tag:?} saved, {:?} given (the guest knows the saved one)",
                self.tag
            ))),
            other => Err(PersistError::Mismatch(format!(
                "{other:?} is not a virtio-fs state"
            ))),
        }
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        // The queue events are virtiofsd's kick fds: the loop watches them only once it is gone.
        if let Err(e) = ops.add(Events::new(&self.virtiofsd.exit_event(), EventSet::IN)) {
            tracing::error!("virtio-fs {}: cannot watch virtiofsd: {e}", self.tag);
        }
        if let Err(e) = ops.add(Events::new(&self.frontend, CONNECTION_HANG_UP)) {
            tracing::error!("virtio-fs {}: cannot watch the connection: {e}", self.tag);
        }
    }

    fn process_event(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        let fd = events.fd();
        if fd == self.virtiofsd.exit_event().as_raw_fd() {
            self.virtiofsd_exited(ops);
            return;
        }
        if fd == self.frontend.as_raw_fd() {
            self.connection_closed(ops);
            return;
        }
        let Some(index) = self.queue_events.iter().position(|e| e.as_raw_fd() == fd) else {
            return;
        };
        consume(&self.queue_events[index]);
        if let Some(active) = self.active.as_mut() {
            orphaned::fail_requests(&mut active.queues[index], &active.mem, &active.interrupt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> FsConfig {
        FsConfig::new("share", std::env::temp_dir())
    }

    fn error(config: &FsConfig) -> FsError {
        Fs::new(config)
            .err()
            .expect("the device must not be created")
    }

    #[test]
    fn a_tag_must_fit_the_config_space() {
        for tag in [String::new(), "t".repeat(TAG_MAX_LEN + 1)] {
            let config = FsConfig { tag, ..valid() };
            assert!(matches!(error(&config), FsError::InvalidTag(_)));
        }
    }

    #[test]
    fn queues_need_a_request_queue_and_a_power_of_two_size() {
        let config = FsConfig {
            num_request_queues: 0,
            ..valid()
        };
        assert!(matches!(error(&config), FsError::InvalidQueues));
        let config = FsConfig {
            queue_size: 100,
            ..valid()
        };
        assert!(matches!(error(&config), FsError::InvalidQueues));
    }

    #[test]
    fn the_shared_directory_must_exist() {
        let config = FsConfig::new("share", "/nonexistent/crx-share");
        assert!(matches!(error(&config), FsError::NotADirectory(_)));
    }

    #[test]
    fn a_virtiofsd_that_cannot_start_or_exits_at_once_is_an_error() {
        let config = FsConfig {
            virtiofsd: Some("/nonexistent/virtiofsd".into()),
            ..valid()
        };
        assert!(matches!(error(&config), FsError::Spawn { .. }));
        let config = FsConfig {
            virtiofsd: Some("/bin/false".into()),
            ..valid()
        };
        assert!(matches!(error(&config), FsError::ExitedAtStart(_)));
    }

    /// Needs virtiofsd (setup.sh installs it); it serves one request queue.
    #[test]
    fn more_request_queues_than_virtiofsd_serves_is_an_error() {
        let shared = std::env::temp_dir().join(format!("crx-fs-mq-{}", std::process::id()));
        std::fs::create_dir_all(&shared).unwrap();
        let config = FsConfig {
            num_request_queues: 2,
            sandbox: FsSandbox::None,
            ..FsConfig::new("share", &shared)
        };
        let result = Fs::new(&config).err();
        std::fs::remove_dir(&shared).unwrap();
        assert!(
            matches!(
                result,
                Some(FsError::TooManyQueues {
                    asked: 3,
                    served: 2
                })
            ),
            "{result:?}"
        );
    }
}
