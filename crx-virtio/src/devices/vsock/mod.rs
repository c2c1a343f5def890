//! virtio-vsock (device ID 19) with the host side as Unix sockets (Firecracker's "hybrid
//! vsock"): the device owns the three queues (rx, tx, event) and the guest CID; the
//! [`muxer::Muxer`] owns the host sockets and the connections. The tx queue carries the guest's
//! packets to the muxer; the rx queue is filled whenever the muxer has packets (control packets,
//! or host data read straight into the rx buffers) and stops pulling from host sockets while the
//! guest gives no rx buffers. The event queue is never used (no transport resets are sent).

mod connection;
mod muxer;
mod packet;

use std::path::PathBuf;

use event_manager::{EventOps, Events};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::EventFd;

use crate::base::{DeviceBase, Wake};
use crate::device::{
    drain_queue, read_config_bytes, ActivateError, Activation, Malformed, Served, VirtioDevice,
};
use crate::iovec::ChainBuffers;
use muxer::Muxer;
use packet::{Header, HEADER_LEN};

/// virtio_ids.h: VIRTIO_ID_VSOCK.
const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Context IDs 0–2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
const FIRST_GUEST_CID: u32 = 3;

/// How to attach a vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u32,
    /// Host processes connect here (`CONNECT <port>\n`); a guest connecting to host port P
    /// reaches the Unix socket `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (use 3 or more)")]
    ReservedCid(u32),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the device's eventfds: {0}")]
    EventFd(#[source] std::io::Error),
}

/// The vsock device.
pub struct Vsock {
    base: DeviceBase,
    guest_cid: u64,
    muxer: Muxer,
}

impl Vsock {
    /// Creates the device, listening on the configured socket at once.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid < FIRST_GUEST_CID || config.guest_cid == u32::MAX {
            return Err(VsockError::ReservedCid(config.guest_cid));
        }
        let guest_cid = u64::from(config.guest_cid);
        let muxer =
            Muxer::new(guest_cid, &config.uds_path).map_err(|source| VsockError::Listen {
                path: config.uds_path.clone(),
                source,
            })?;
        Ok(Vsock {
            base: DeviceBase::new(vec![QUEUE_SIZE; 3]).map_err(VsockError::EventFd)?,
            guest_cid,
            muxer,
        })
    }

    /// Passes every packet the guest sent to the muxer.
    fn process_tx(&mut self) {
        let Some(active) = self.base.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let muxer = &mut self.muxer;
        drain_queue(
            &mut active.queues[TX_QUEUE],
            mem,
            &active.interrupt,
            |chain| {
                let mut buffers = ChainBuffers::from_chain(chain)?;
                let header_bytes = buffers
                    .readable
                    .split_front(HEADER_LEN as u64)
                    .ok_or_else(|| Malformed::new("vsock packet shorter than its header"))?;
                let mut raw = [0u8; HEADER_LEN];
                header_bytes.read_into(mem, &mut raw)?;
                let header = Header::decode(&raw);
                header
                    .check_len(buffers.readable.len())
                    .map_err(|e| Malformed::new(format!("vsock packet: {e}")))?;
                let mut payload = buffers.readable;
                payload.truncate(u64::from(header.len));
                muxer.handle_guest_packet(mem, &header, &payload)?;
                Ok(Served::Used(0))
            },
        );
    }

    /// Fills rx buffers while the muxer has packets for the guest.
    fn process_rx(&mut self) {
        let Some(active) = self.base.active.as_mut() else {
            return;
        };
        if !self.muxer.has_rx_work() {
            return;
        }
        let mem = &active.mem;
        let muxer = &mut self.muxer;
        drain_queue(
            &mut active.queues[RX_QUEUE],
            mem,
            &active.interrupt,
            |chain| {
                let buffers = ChainBuffers::from_chain(chain)?;
                Ok(match muxer.fill_rx(mem, buffers.writable)? {
                    Some(len) => Served::Used(len),
                    None => Served::Later,
                })
            },
        );
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.base.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn queue_events(&self) -> &[EventFd] {
        self.base.queue_events()
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.base.activate(activation)
    }

    fn reset(&mut self) -> bool {
        self.base.active = None;
        self.muxer.reset_all();
        true
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        self.base.init_events(ops);
        self.muxer.init_events(ops);
    }

    fn process_event(&mut self, events: Events, ops: &mut EventOps) {
        match self.base.wake(&events) {
            Some(Wake::Activated | Wake::Queue(TX_QUEUE)) => {
                self.process_tx();
                self.process_rx();
            }
            Some(Wake::Queue(RX_QUEUE)) => self.process_rx(),
            Some(Wake::Queue(_)) | None => {}
            Some(Wake::Other(fd)) => {
                self.muxer.handle_event(fd, events.event_set());
                self.process_rx();
            }
        }
        self.muxer.sync_events(ops);
    }
}
