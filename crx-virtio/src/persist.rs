//! Snapshot state of a virtio-mmio device: what the transport holds (negotiated features, status,
//! the queues' addresses, sizes and ring positions, the interrupt status) and what the device
//! adds ([`DeviceState`]). The VMM saves it with [`MmioTransport::save_state`] while the vCPUs and
//! the event loop are paused, and rebuilds a window from it with [`MmioTransport::restore`]; the
//! device itself is created anew from its configuration (its host backend opened again) first.
//!
//! Queue positions are enough because no device keeps a chain popped across event loop turns:
//! with the loop paused, every chain is either on the available ring (served after restore) or on
//! the used ring (in guest memory, saved with it).
//!
//! [`MmioTransport::save_state`]: crate::MmioTransport::save_state
//! [`MmioTransport::restore`]: crate::MmioTransport::restore

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use crate::device::ActivateError;

/// One queue as the driver set it up, and where the device stands on its rings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl QueueState {
    pub fn of(queue: &Queue) -> QueueState {
        QueueState {
            max_size: queue.max_size(),
            size: queue.size(),
            ready: queue.ready(),
            desc_table: queue.desc_table(),
            avail_ring: queue.avail_ring(),
            used_ring: queue.used_ring(),
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
            event_idx_enabled: queue.event_idx_enabled(),
        }
    }

    /// The queue again; sizes and alignments are checked, as when the driver writes them.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// The transport's registers and the queues (taken from the device while it is active).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub status: u32,
    pub config_generation: u32,
    pub active: bool,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub queues: Vec<QueueState>,
}

/// What a device adds to its transport's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// The disk's size: the image reopened at restore must have the same.
    Block {
        capacity_sectors: u64,
    },
    Net,
    Rng,
    /// Connections are not saved: the restored device starts with none and tells the guest with
    /// a transport reset event.
    Vsock,
    /// A virtio-fs device the guest has not used yet (see `Fs::save_state`), and its mount tag.
    Fs {
        tag: String,
    },
}

/// A device window in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    pub transport: TransportState,
    pub device: DeviceState,
}

/// Why a device cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("virtio device type {device_type} cannot be snapshotted: {why}")]
    NotSnapshottable { device_type: u32, why: &'static str },
    #[error("the saved state is for virtio device type {saved}, the device is type {device}")]
    DeviceType { saved: u32, device: u32 },
    #[error("the saved state does not fit the device: {0}")]
    Mismatch(String),
    #[error("saved queue {index}: {source}")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("saved queue {0} lies outside guest memory")]
    QueueOutsideMemory(usize),
    #[error("re-activating the device: {0}")]
    Activate(#[source] ActivateError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_round_trips_through_its_state_and_bad_sizes_are_refused() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(64);
        q.set_ready(true);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_next_avail(17);
        q.set_next_used(15);
        q.set_event_idx(true);
        let state = QueueState::of(&q);
        let back = state.to_queue().unwrap();
        assert_eq!(QueueState::of(&back), state);
        let bad = QueueState { size: 3, ..state };
        assert!(bad.to_queue().is_err());
    }
}
