//! virtio-net on a tap device. Frames move between the tap and guest memory with one readv or
//! writev each, the virtio-net header included (the tap speaks it), so the VMM copies nothing.
//! Checksum and TSO offloads are offered both ways and passed to the tap as the guest accepts
//! them. Receive buffers are not merged (no MRG_RXBUF): each frame lands in one chain, the guest
//! posting large chains when it accepts TSO.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use event_manager::{EventOps, EventSet, Events};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::base::{from_base, DeviceBase, Wake};
use crate::device::{
    drain_queue, read_config_bytes, ActivateError, Activation, Malformed, Served, VirtioDevice,
};
use crate::devices::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use crate::iovec::ChainBuffers;
use crate::persist::{DeviceState, PersistError};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// Where the device's tap comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TapSource {
    /// A tap interface by name (created if missing).
    Name(String),
    /// An open tap fd (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR); the device uses a duplicate.
    Fd(RawFd),
}

/// How to attach a network interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub tap: TapSource,
    pub mac: [u8; 6],
}

/// Why a network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot duplicate tap fd {fd}: {source}")]
    DupFd {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the device's eventfds: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A virtio network device.
pub struct Net {
    base: DeviceBase,
    tap: Tap,
    mac: [u8; 6],
    /// Whether the tap's fd is in the event loop (it leaves while the guest has no rx buffers).
    tap_polled: bool,
}

impl Net {
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let tap = match &config.tap {
            TapSource::Name(name) => Tap::open(name)?,
            TapSource::Fd(fd) => {
                // SAFETY: the caller vouches that `fd` is open for as long as this call; only a
                // duplicate is kept.
                let borrowed = unsafe { BorrowedFd::borrow_raw(*fd) };
                let owned = borrowed
                    .try_clone_to_owned()
                    .map_err(|source| NetError::DupFd { fd: *fd, source })?;
                Tap::from_fd(owned)?
            }
        };
        Ok(Net {
            base: DeviceBase::new(vec![QUEUE_SIZE, QUEUE_SIZE]).map_err(NetError::EventFd)?,
            tap,
            mac: config.mac,
            tap_polled: false,
        })
    }

    /// Sends every frame the guest queued.
    fn transmit(&mut self) {
        let Some(active) = self.base.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let tap = &self.tap;
        drain_queue(&mut active.queues[TX], mem, &active.interrupt, |chain| {
            let buffers = ChainBuffers::from_chain(chain)?;
            if buffers.readable.len() < VNET_HDR_LEN as u64 {
                return Err(Malformed::new(
                    "tx frame shorter than the virtio-net header",
                ));
            }
            let iovecs = buffers.readable.iovecs(mem, false)?;
            if let Err(e) = tap.writev(&iovecs) {
                // A frame the host cannot take is dropped, as a NIC would.
                tracing::debug!("virtio-net: tap write: {e}");
            }
            Ok(Served::Used(0))
        });
    }

    /// Fills the guest's receive buffers from the tap until one of them runs out.
    fn receive(&mut self, ops: &mut EventOps) {
        let Some(active) = self.base.active.as_mut() else {
            // Reset by the driver: frames wait in the tap until the device is active again.
            if self.tap_polled {
                self.set_tap_polled(ops, false);
            }
            return;
        };
        let mem = &active.mem;
        let tap = &self.tap;
        let tap_drained = drain_queue(&mut active.queues[RX], mem, &active.interrupt, |chain| {
            let buffers = ChainBuffers::from_chain(chain)?;
            if buffers.writable.len() < VNET_HDR_LEN as u64 {
                return Err(Malformed::new(
                    "rx buffer shorter than the virtio-net header",
                ));
            }
            let iovecs = buffers.writable.iovecs(mem, true)?;
            match tap.readv(&iovecs) {
                Ok(len) => {
                    // num_buffers (the header's last field) is 1 without merged buffers.
                    let mut header = buffers.writable.clone();
                    header.split_front(VNET_HDR_LEN as u64 - 2);
                    header.truncate(2);
                    header.write_from(mem, &1u16.to_le_bytes())?;
                    Ok(Served::Used(len as u32))
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Served::Later),
                Err(e) => {
                    tracing::debug!("virtio-net: tap read: {e}");
                    Ok(Served::Later)
                }
            }
        });
        // Out of receive buffers with frames possibly waiting: stop watching the tap until the
        // guest posts more (its rx notification), so the loop does not spin.
        if !tap_drained && self.tap_polled {
            self.set_tap_polled(ops, false);
        }
    }

    fn set_tap_polled(&mut self, ops: &mut EventOps, polled: bool) {
        let events = Events::new_raw(self.tap.as_raw_fd(), EventSet::IN);
        let result = if polled {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.tap_polled = polled,
            Err(e) => tracing::error!("virtio-net: cannot change tap polling: {e}"),
        }
    }
}

impl VirtioDevice for Net {
    from_base!(
        queue_max_sizes,
        queue_events,
        reset,
        active_queues,
        init_events
    );

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let acked = activation.acked_features;
        let mut offload = 0;
        for (feature, flag) in [
            (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
            (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
        ] {
            if acked & (1 << feature) != 0 {
                offload |= flag;
            }
        }
        self.tap
            .set_offload(offload)
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        self.base.activate(activation)
    }

    fn save_state(&self) -> Result<DeviceState, PersistError> {
        Ok(DeviceState::Net)
    }

    /// The tap is the one this device was built with (possibly another than the snapshot's); the
    /// guest keeps the MAC address it read at probe time, whatever the configuration says now.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Net => Ok(()),
            other => Err(PersistError::Mismatch(format!(
                "{other:?} for a net device"
            ))),
        }
    }

    fn process_event(&mut self, events: Events, ops: &mut EventOps) {
        match self.base.wake(&events) {
            Some(Wake::Activated) => {
                if !self.tap_polled {
                    self.set_tap_polled(ops, true);
                }
                self.transmit();
                self.receive(ops);
            }
            Some(Wake::Queue(RX)) => {
                if !self.tap_polled {
                    self.set_tap_polled(ops, true);
                }
                self.receive(ops);
            }
            Some(Wake::Queue(_)) => self.transmit(),
            Some(Wake::Other(fd)) if fd == self.tap.as_raw_fd() => self.receive(ops),
            _ => {}
        }
    }
}
