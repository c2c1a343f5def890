//! What every virtio device shares: the [`VirtioDevice`] trait the transport drives, the
//! [`Interrupt`] a device raises (interrupt status bits plus an irqfd), the [`Activation`] handed
//! over at DRIVER_OK, and [`drain_queue`], the one loop that pops descriptor chains, lets a device
//! serve each, returns them to the used ring and notifies the driver.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use event_manager::{EventOps, Events};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::persist::{DeviceState, PersistError};

/// A chain handed to a device: its descriptors read from guest memory on demand.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// A virtio device behind a transport. The transport calls the configuration methods from a vCPU
/// thread; after [`VirtioDevice::activate`] the device does its work on the event loop thread,
/// woken through the events it registered in [`VirtioDevice::init_events`].
pub trait VirtioDevice: Send {
    /// The virtio device ID (`virtio_ids`).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (read-only for most devices).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "virtio device {}: ignored config write at {offset:#x} ({} bytes)",
            self.device_type(),
            data.len()
        );
    }
    /// The eventfds the driver's queue notifications arrive on (ioeventfds), one per queue.
    fn queue_events(&self) -> &[EventFd];
    /// The driver set DRIVER_OK: the device takes its queues and starts serving them.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver wrote 0 to the status register: drop the queues and return to the
    /// pre-activation state. Returns false if the device cannot be reset.
    fn reset(&mut self) -> bool;
    /// True if the device's backend raises the interrupt itself (vhost-user): the transport
    /// then always reports a used-ring interrupt as pending.
    fn backend_signals_directly(&self) -> bool {
        false
    }
    /// Registers the device's fds with the event loop (called once, on the loop's thread).
    fn init_events(&mut self, ops: &mut EventOps);
    /// Serves one ready fd.
    fn process_event(&mut self, events: Events, ops: &mut EventOps);
    /// The queues the device took at activation, while it is active (a snapshot saves their
    /// ring positions). Called with the event loop paused.
    fn active_queues(&self) -> Option<&[Queue]> {
        None
    }
    /// The device's own part of a snapshot. A device that cannot be saved says why.
    fn save_state(&self) -> Result<DeviceState, PersistError> {
        Err(PersistError::NotSnapshottable {
            device_type: self.device_type(),
            why: "the device has no snapshot support",
        })
    }
    /// Takes its saved part back, on a freshly built device, before the transport re-activates it.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        let _ = state;
        Err(PersistError::NotSnapshottable {
            device_type: self.device_type(),
            why: "the device has no snapshot support",
        })
    }
}

/// Why a device could not start serving its queues.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver did not accept VIRTIO_F_VERSION_1")]
    LegacyDriver,
    #[error("queue {0} is not valid (size, alignment or addresses)")]
    InvalidQueue(usize),
    #[error("cannot wake the event loop: {0}")]
    Wake(#[source] std::io::Error),
    #[error("device backend: {0}")]
    Backend(String),
}

/// What the device gets at DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: std::sync::Arc<Interrupt>,
    pub acked_features: u64,
}

/// A device's interrupt line: the virtio-mmio interrupt status bits, an irqfd on the device's
/// IOAPIC pin, and the NEEDS_RESET flag a broken device raises.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// `irqfd` must already be registered with KVM on the device's GSI.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
            needs_reset: AtomicBool::new(false),
        }
    }

    /// The eventfd that raises the line (given to vhost-user backends as the call fd).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// The driver has new used buffers.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// The configuration space (or the device status) changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio interrupt: irqfd write failed: {e}");
        }
    }

    /// The device met a request it cannot serve (a malformed chain): per the spec it sets
    /// DEVICE_NEEDS_RESET and tells the driver with a configuration change interrupt.
    pub fn mark_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.signal_config_change();
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Takes a saved status back and raises the line again if anything was pending: an interrupt
    /// raised just before a snapshot may not have reached the saved interrupt controller yet (KVM
    /// injects irqfd writes asynchronously), and a spurious one is harmless.
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        if status != 0 {
            if let Err(e) = self.irqfd.write(1) {
                tracing::warn!("virtio interrupt: irqfd write failed: {e}");
            }
        }
    }

    /// Back to the state of a freshly reset device.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// A request the device cannot serve because the driver built it wrong.
#[derive(Debug, thiserror::Error)]
#[error("malformed request: {0}")]
pub struct Malformed(pub String);

impl Malformed {
    pub fn new(what: impl std::fmt::Display) -> Self {
        Malformed(what.to_string())
    }
}

/// How a device served one chain.
pub enum Served {
    /// Done: return the chain with this many bytes written into its device-writable part.
    Used(u32),
    /// The device cannot take it now (no host buffer space): leave it, and every chain after it,
    /// on the available ring for a later pass.
    Later,
}

/// Serves every available chain of `queue`. A malformed chain is returned unused and marks the
/// device as needing a reset; no further chains are served until the driver resets it.
/// Returns whether the queue was left with chains still pending (`Served::Later`).
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut serve: impl FnMut(Chain<'_>) -> Result<Served, Malformed>,
) -> bool {
    if interrupt.needs_reset() {
        return false;
    }
    let mut used_any = false;
    let mut pending = false;
    'refill: loop {
        if let Err(e) = queue.disable_notification(mem) {
            return broken(interrupt, used_any, format!("{e}"));
        }
        loop {
            let mut iter = match queue.iter(mem) {
                Ok(iter) => iter,
                Err(e) => return broken(interrupt, used_any, format!("available ring: {e}")),
            };
            let Some(chain) = iter.next() else { break };
            let head = chain.head_index();
            match serve(chain) {
                Ok(Served::Used(len)) => {
                    if let Err(e) = queue.add_used(mem, head, len) {
                        return broken(interrupt, used_any, format!("used ring: {e}"));
                    }
                    used_any = true;
                }
                Ok(Served::Later) => {
                    queue.go_to_previous_position();
                    pending = true;
                    break 'refill;
                }
                Err(e) => {
                    // The chain is returned with nothing written so the driver can reclaim it.
                    let _ = queue.add_used(mem, head, 0);
                    return broken(interrupt, true, e.0);
                }
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue 'refill,
            Ok(false) => break,
            Err(e) => return broken(interrupt, used_any, format!("{e}")),
        }
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
    pending
}

fn broken(interrupt: &Interrupt, used_any: bool, why: String) -> bool {
    tracing::warn!("virtio queue: {why}; device needs a reset");
    if used_any {
        interrupt.signal_used_queue();
    }
    interrupt.mark_needs_reset();
    false
}

/// Returns a used chain and notifies the driver if it wants to be (for devices that complete
/// chains one at a time, outside [`drain_queue`]).
pub fn complete_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    head: u16,
    len: u32,
) {
    match queue.add_used(mem, head, len) {
        Ok(()) => {
            if queue.needs_notification(mem).unwrap_or(true) {
                interrupt.signal_used_queue();
            }
        }
        Err(e) => {
            tracing::warn!("virtio queue: used ring: {e}; device needs a reset");
            interrupt.mark_needs_reset();
        }
    }
}

/// Reads an eventfd the loop woke on, so it does not wake again for the same event.
pub fn consume(event: &EventFd) {
    if let Err(e) = event.read() {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            tracing::warn!("virtio: eventfd read failed: {e}");
        }
    }
}

/// Copies the part of a configuration space a read covers; bytes past its end read as zero.
pub fn read_config_bytes(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = (offset as usize).min(space.len());
    let end = start.saturating_add(data.len()).min(space.len());
    data[..end - start].copy_from_slice(&space[start..end]);
}
