//! virtio-vsock (device ID 19) with the host side as Unix sockets (Firecracker's "hybrid
//! vsock"): the device owns the three queues (rx, tx, event) and the guest CID; the
//! [`muxer::Muxer`] owns the host sockets and the connections. The tx queue carries the guest's
//! packets to the muxer; the rx queue is filled whenever the muxer has packets (control packets,
//! or host data read straight into the rx buffers) and stops pulling from host sockets while the
//! guest gives no rx buffers. The event queue carries one event only: after a snapshot restore
//! the device starts without connections (the host ends of the old ones belong to another
//! process, or are gone), so, as Firecracker does, it sends the guest
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: Linux then resets every connected socket (its peers see
//! ECONNRESET), keeps its listeners, and re-reads the guest CID from the configuration space (a
//! restored VM may get another CID).

mod connection;
mod muxer;
mod packet;

use std::path::PathBuf;

use event_manager::{EventOps, Events};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::base::{from_base, DeviceBase, Wake};
use crate::device::{drain_queue, read_config_bytes, Malformed, Served, VirtioDevice};
use crate::iovec::ChainBuffers;
use crate::persist::{DeviceState, PersistError};
use muxer::Muxer;
use packet::{Header, HEADER_LEN};

/// virtio_ids.h: VIRTIO_ID_VSOCK.
const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
/// virtio_vsock.h: the only event, `struct virtio_vsock_event { le32 id; }`.
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Context IDs 0–2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
const FIRST_GUEST_CID: u32 = 3;

/// How to attach a vsock device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// A transport reset event is owed to the guest (set by a snapshot restore).
    reset_pending: bool,
    /// The reset event is sent, and the guest has not yet posted a new event buffer (which
    /// Linux does once it has handled it).
    reset_unacknowledged: bool,
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
            reset_pending: false,
            reset_unacknowledged: false,
        })
    }

    /// Puts the transport reset event in the guest's first event buffer, if a reset is owed and
    /// the guest has posted a buffer (it keeps several posted; otherwise its next event queue
    /// notification brings us back here).
    fn send_transport_reset(&mut self) {
        let Some(active) = self.base.active.as_mut() else {
            return;
        };
        if !self.reset_pending {
            return;
        }
        let mem = &active.mem;
        let mut sent = false;
        drain_queue(
            &mut active.queues[EVENT_QUEUE],
            mem,
            &active.interrupt,
            |chain| {
                if sent {
                    // Every other posted buffer goes back empty (Linux re-posts it unread), so
                    // the guest's refill after handling the reset notifies the device.
                    return Ok(Served::Used(0));
                }
                let buffers = ChainBuffers::from_chain(chain)?;
                let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
                if buffers.writable.write_from(mem, &event)? < event.len() {
                    return Err(Malformed::new("vsock event buffer shorter than an event"));
                }
                sent = true;
                Ok(Served::Used(event.len() as u32))
            },
        );
        if sent {
            tracing::debug!("vsock: transport reset sent to the guest");
            self.reset_pending = false;
            self.reset_unacknowledged = true;
        }
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
    from_base!(queue_max_sizes, queue_events, activate, active_queues);

    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn reset(&mut self) -> bool {
        self.base.active = None;
        self.muxer.reset_all();
        true
    }

    fn save_state(&self) -> Result<DeviceState, PersistError> {
        Ok(DeviceState::Vsock)
    }

    /// The restored device has no connections; the guest hears so at the first chance.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Vsock => {
                self.reset_pending = true;
                self.muxer.hold_host_connections(true);
                Ok(())
            }
            other => Err(PersistError::Mismatch(format!(
                "{other:?} for a vsock device"
            ))),
        }
    }

    fn init_events(&mut self, ops: &mut EventOps) {
        self.base.init_events(ops);
        self.muxer.init_events(ops);
    }

    fn process_event(&mut self, events: Events, ops: &mut EventOps) {
        match self.base.wake(&events) {
            Some(Wake::Activated) => {
                self.send_transport_reset();
                self.process_tx();
                self.process_rx();
            }
            Some(Wake::Queue(TX_QUEUE)) => {
                self.process_tx();
                self.process_rx();
            }
            Some(Wake::Queue(RX_QUEUE)) => self.process_rx(),
            Some(Wake::Queue(EVENT_QUEUE)) => {
                if self.reset_unacknowledged {
                    // The guest refilled its event queue: the reset is handled, and host
                    // connections can reach it.
                    self.reset_unacknowledged = false;
                    self.muxer.hold_host_connections(false);
                    self.process_rx();
                } else {
                    self.send_transport_reset();
                }
            }
            Some(Wake::Queue(_)) | None => {}
            Some(Wake::Other(fd)) => {
                self.muxer.handle_event(fd, events.event_set());
                self.process_rx();
            }
        }
        self.muxer.sync_events(ops);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;

    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::packet::{Op, HOST_CID, TYPE_STREAM};
    use super::*;
    use crate::device::{Activation, Interrupt};

    const GUEST_CID: u32 = 3;
    const GUEST_PORT: u32 = 1234;
    const HOST_PORT: u32 = 5000;

    /// A scratch directory for the device's sockets, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("crx-vsock-{test}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn readable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
    }

    fn writable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
    }

    /// A header as the guest sends it, from its GUEST_PORT to the host's HOST_PORT.
    fn from_guest(op: Op, len: u32) -> Header {
        let mut header = Header::to_guest(u64::from(GUEST_CID), 0, 0, op);
        header.src_cid = u64::from(GUEST_CID);
        header.dst_cid = HOST_CID;
        header.src_port = GUEST_PORT;
        header.dst_port = HOST_PORT;
        header.len = len;
        header.socket_type = TYPE_STREAM;
        header.buf_alloc = 64 * 1024;
        header
    }

    /// An active device on `mem` with queues at 0x0 (rx), 0x1000 (tx) and 0x2000 (event).
    fn active_device(scratch: &Scratch, mem: &GuestMemoryMmap) -> (Vsock, Arc<Interrupt>) {
        let mut device = Vsock::new(&VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: scratch.0.join("v.sock"),
        })
        .unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let queues: Vec<Queue> = [0x0, 0x1000, 0x2000]
            .map(|at| {
                MockSplitQueue::create(mem, GuestAddress(at), 16)
                    .create_queue()
                    .unwrap()
            })
            .into();
        device
            .activate(Activation {
                mem: mem.clone(),
                queues,
                interrupt: interrupt.clone(),
                acked_features: 1 << VIRTIO_F_VERSION_1,
            })
            .unwrap();
        (device, interrupt)
    }

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn a_guest_connection_reaches_the_host_socket_and_carries_single_descriptor_packets() {
        let scratch = Scratch::new("device-connect");
        let host = UnixListener::bind(scratch.0.join(format!("v.sock_{HOST_PORT}"))).unwrap();
        let mem = guest_memory();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x0), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let (mut device, interrupt) = active_device(&scratch, &mem);
        rx.add_desc_chains(&[writable(0x20000, 4096)], 0).unwrap();

        mem.write_slice(&from_guest(Op::Request, 0).encode(), GuestAddress(0x40000))
            .unwrap();
        tx.add_desc_chains(&[readable(0x40000, HEADER_LEN as u32)], 0)
            .unwrap();
        device.process_tx();
        device.process_rx();
        let (mut host_side, _) = host.accept().unwrap();
        assert_eq!(rx.used().idx().load(), 1);
        let mut raw = [0u8; HEADER_LEN];
        mem.read_slice(&mut raw, GuestAddress(0x20000)).unwrap();
        let response = Header::decode(&raw);
        assert_eq!(response.operation(), Some(Op::Response));
        assert_eq!(
            (response.src_port, response.dst_port),
            (HOST_PORT, GUEST_PORT)
        );
        assert_eq!(response.dst_cid, u64::from(GUEST_CID));

        // Header and payload in one descriptor, as Linux 6.3+ sends them.
        mem.write_slice(&from_guest(Op::Rw, 5).encode(), GuestAddress(0x41000))
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(0x41000 + HEADER_LEN as u64))
            .unwrap();
        tx.add_desc_chains(&[readable(0x41000, HEADER_LEN as u32 + 5)], 1)
            .unwrap();
        device.process_tx();
        let mut got = [0u8; 5];
        host_side.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(tx.used().idx().load(), 2);
        assert!(!interrupt.needs_reset());
    }

    #[test]
    fn a_length_beyond_the_chain_or_a_short_header_marks_the_device_broken() {
        let scratch = Scratch::new("device-malformed");
        let mem = guest_memory();
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let (mut device, interrupt) = active_device(&scratch, &mem);
        mem.write_slice(&from_guest(Op::Rw, 100).encode(), GuestAddress(0x40000))
            .unwrap();
        tx.add_desc_chains(&[readable(0x40000, HEADER_LEN as u32 + 10)], 0)
            .unwrap();
        device.process_tx();
        assert!(interrupt.needs_reset());
        assert_eq!(tx.used().idx().load(), 1, "the chain is returned");

        let scratch = Scratch::new("device-short");
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let (mut device, interrupt) = active_device(&scratch, &mem);
        tx.add_desc_chains(&[readable(0x40000, HEADER_LEN as u32 - 1)], 0)
            .unwrap();
        device.process_tx();
        assert!(interrupt.needs_reset());
    }

    #[test]
    fn a_restored_device_sends_one_transport_reset_once_the_guest_posts_an_event_buffer_and_holds_host_connections(
    ) {
        let scratch = Scratch::new("device-reset");
        let mem = guest_memory();
        let events = MockSplitQueue::create(&mem, GuestAddress(0x2000), 16);
        let (mut device, interrupt) = active_device(&scratch, &mem);
        device.restore_state(&DeviceState::Vsock).unwrap();
        device.send_transport_reset();
        assert_eq!(events.used().idx().load(), 0, "no buffer posted yet");
        mem.write_obj(u32::MAX, GuestAddress(0x30000)).unwrap();
        events
            .add_desc_chains(&[writable(0x30000, 4), writable(0x30010, 4)], 0)
            .unwrap();
        device.send_transport_reset();
        device.send_transport_reset();
        // One event; the other buffer goes back empty, so the guest's refill notifies.
        assert_eq!(events.used().idx().load(), 2);
        let lens: Vec<u32> = (0..2)
            .map(|i| events.used().ring().ref_at(i).unwrap().load().len())
            .collect();
        assert_eq!(lens, [4, 0]);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x30000)).unwrap(), 0);
        assert!(
            device.reset_unacknowledged,
            "host connections wait for the guest's refill"
        );
        assert!(!interrupt.needs_reset());
    }

    #[test]
    fn a_guest_connection_to_a_missing_host_socket_gets_rst() {
        let scratch = Scratch::new("device-missing");
        let mem = guest_memory();
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x0), 16);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let (mut device, interrupt) = active_device(&scratch, &mem);
        rx.add_desc_chains(&[writable(0x20000, 4096)], 0).unwrap();
        mem.write_slice(&from_guest(Op::Request, 0).encode(), GuestAddress(0x40000))
            .unwrap();
        tx.add_desc_chains(&[readable(0x40000, HEADER_LEN as u32)], 0)
            .unwrap();
        device.process_tx();
        device.process_rx();
        let mut raw = [0u8; HEADER_LEN];
        mem.read_slice(&mut raw, GuestAddress(0x20000)).unwrap();
        let reply = Header::decode(&raw);
        assert_eq!(reply.operation(), Some(Op::Rst));
        assert_eq!((reply.src_port, reply.dst_port), (HOST_PORT, GUEST_PORT));
        assert!(!interrupt.needs_reset());
    }
}
