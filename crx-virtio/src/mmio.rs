//! The virtio-mmio transport, version 2 (modern): the register block a guest driver programs to
//! negotiate features, size and place the queues and drive the device status. Queue notifications
//! do not come through here (the VMM registers each queue's eventfd as a KVM ioeventfd on
//! [`QUEUE_NOTIFY`]), and interrupts go out through the device's irqfd.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::device::{Activation, Interrupt, VirtioDevice};
use crate::persist::{DeviceSnapshot, PersistError, QueueState, TransportState};

/// "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// Vendor ID: "CRX" in ASCII.
const VENDOR_ID: u32 = 0x0043_5258;

// Register offsets in the window (virtio 1.x, 4.2.2), public for drivers in tests and fuzzers.
pub const MAGIC_VALUE: u64 = 0x000;
pub const VERSION_REG: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
pub const VENDOR_ID_REG: u64 = 0x00c;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
/// The queue notify register: the VMM registers ioeventfds here, one per queue index.
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const INTERRUPT_STATUS: u64 = 0x060;
pub const INTERRUPT_ACK: u64 = 0x064;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC_LOW: u64 = 0x080;
pub const QUEUE_DESC_HIGH: u64 = 0x084;
pub const QUEUE_AVAIL_LOW: u64 = 0x090;
pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
pub const QUEUE_USED_LOW: u64 = 0x0a0;
pub const QUEUE_USED_HIGH: u64 = 0x0a4;
pub const CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;

/// The size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;

/// One virtio-mmio device window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue maximum sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers are writable only while the driver sets the device up.
    fn queue_setup_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    /// A register read by the guest.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            tracing::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        let value = match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => lock(&self.device).device_type(),
            VENDOR_ID_REG => VENDOR_ID,
            DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features() | (1 << VIRTIO_F_VERSION_1);
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            INTERRUPT_STATUS => {
                let mut status = self.interrupt.status();
                if self.active && lock(&self.device).backend_signals_directly() {
                    status |= VIRTIO_MMIO_INT_VRING;
                }
                status
            }
            STATUS => {
                let mut status = self.status;
                if self.interrupt.needs_reset() {
                    status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                }
                status
            }
            CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A register write by the guest.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        let setup = self.queue_setup_allowed();
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            QUEUE_READY if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_AVAIL_LOW | QUEUE_AVAIL_HIGH
            | QUEUE_USED_LOW | QUEUE_USED_HIGH
                if setup =>
            {
                if let Some(q) = self.selected_queue() {
                    set_queue_address(q, offset, value);
                }
            }
            INTERRUPT_ACK => self.interrupt.acknowledge(value),
            STATUS => self.write_status(value),
            _ => tracing::debug!("virtio-mmio: write {value:#x} to {offset:#x} ignored"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            || self.status & VIRTIO_CONFIG_S_DRIVER == 0
        {
            tracing::debug!("virtio-mmio: driver features written outside negotiation");
            return;
        }
        let offered = lock(&self.device).avail_features() | (1 << VIRTIO_F_VERSION_1);
        let (shift, mask) = match self.driver_features_sel {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000u64),
            _ => return,
        };
        // Features the device never offered are dropped, so FEATURES_OK reflects the truth.
        let value = (u64::from(value) << shift) & offered;
        self.acked_features = (self.acked_features & !mask) | value;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits, in the spec's order; anything else fails the device.
        let added = value & !self.status;
        if value & self.status != self.status {
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            // A legacy driver: FEATURES_OK is not accepted (it reads back clear).
            self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
            return;
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    /// The first ready queue that does not fit in guest memory.
    fn invalid_queue(&self) -> Option<usize> {
        self.queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
    }

    /// What the device gets at activation: the queues (the transport keeps copies of what the
    /// driver can read back), memory, interrupt and features.
    fn hand_over_queues(&mut self) -> Activation {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let placeholders = self
            .queues
            .iter()
            .map(|q| {
                let mut copy = Queue::new(q.max_size()).expect("valid max size");
                copy.set_size(q.size());
                copy.set_ready(q.ready());
                copy
            })
            .collect();
        let mut queues = std::mem::replace(&mut self.queues, placeholders);
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        }
    }

    fn activate(&mut self) {
        if let Some(index) = self.invalid_queue() {
            tracing::warn!("virtio-mmio: queue {index} set up invalid; device failed");
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        let activation = self.hand_over_queues();
        match lock(&self.device).activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::warn!(
                    "virtio-mmio: device {} failed to activate: {e}",
                    lock(&self.device).device_type()
                );
                self.status |= VIRTIO_CONFIG_S_FAILED;
            }
        }
    }

    fn reset(&mut self) {
        if self.active && !lock(&self.device).reset() {
            tracing::warn!("virtio-mmio: device cannot be reset; marked failed");
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        self.active = false;
        self.status = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.reset();
    }
}

impl MmioTransport {
    /// The window's state and the device's, for a snapshot. The event loop must be paused (the
    /// queues of an active device are read from the device).
    pub fn save_state(&self) -> Result<DeviceSnapshot, PersistError> {
        let device = lock(&self.device);
        let device_state = device.save_state()?;
        let queues = if self.active {
            device
                .active_queues()
                .ok_or(PersistError::NotSnapshottable {
                    device_type: device.device_type(),
                    why: "the device does not expose its active queues",
                })?
                .iter()
                .map(QueueState::of)
                .collect()
        } else {
            self.queues.iter().map(QueueState::of).collect()
        };
        Ok(DeviceSnapshot {
            transport: TransportState {
                device_type: device.device_type(),
                queue_sel: self.queue_sel,
                device_features_sel: self.device_features_sel,
                driver_features_sel: self.driver_features_sel,
                acked_features: self.acked_features,
                status: self.status,
                config_generation: self.config_generation,
                active: self.active,
                interrupt_status: self.interrupt.status(),
                needs_reset: self.interrupt.needs_reset(),
                queues,
            },
            device: device_state,
        })
    }

    /// A window over a freshly built `device` in the state `saved` describes; an active device is
    /// activated again with its queues where they were (it serves whatever the driver queued
    /// meanwhile once the event loop runs). Everything in `saved` is checked as if the driver had
    /// written it: queue sizes and alignment, and that active rings lie in guest memory.
    pub fn restore(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        saved: &DeviceSnapshot,
    ) -> Result<Self, PersistError> {
        let mut transport = MmioTransport::new(device, mem, interrupt);
        let state = &saved.transport;
        {
            let mut device = lock(&transport.device);
            if device.device_type() != state.device_type {
                return Err(PersistError::DeviceType {
                    saved: state.device_type,
                    device: device.device_type(),
                });
            }
            let max_sizes: Vec<u16> = transport.queues.iter().map(|q| q.max_size()).collect();
            let saved_sizes: Vec<u16> = state.queues.iter().map(|q| q.max_size).collect();
            if max_sizes != saved_sizes {
                return Err(PersistError::Mismatch(format!(
                    "queue maximum sizes {saved_sizes:?} saved, {max_sizes:?} offered"
                )));
            }
            device.restore_state(&saved.device)?;
        }
        transport.queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                q.to_queue()
                    .map_err(|source| PersistError::Queue { index, source })
            })
            .collect::<Result<_, _>>()?;
        transport.queue_sel = state.queue_sel;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.acked_features = state.acked_features;
        transport.status = state.status;
        transport.config_generation = state.config_generation;
        transport
            .interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if state.active {
            if let Some(index) = transport.invalid_queue() {
                return Err(PersistError::QueueOutsideMemory(index));
            }
            let activation = transport.hand_over_queues();
            lock(&transport.device)
                .activate(activation)
                .map_err(PersistError::Activate)?;
            transport.active = true;
        }
        Ok(transport)
    }
}

fn set_queue_address(q: &mut Queue, offset: u64, value: u32) {
    match offset {
        QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
        QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
        QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
        QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
        QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
        QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
        _ => {}
    }
}

/// Locks a device; a poisoned lock (a panicked handler) still serves.
pub(crate) fn lock(
    device: &Mutex<dyn VirtioDevice>,
) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::rng::Rng;
    use crate::persist::DeviceState;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    fn transport() -> MmioTransport {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        MmioTransport::new(Arc::new(Mutex::new(Rng::new().unwrap())), mem, interrupt)
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn identifies_itself_as_a_modern_device() {
        let mut t = transport();
        assert_eq!(r(&mut t, MAGIC_VALUE), MAGIC);
        assert_eq!(r(&mut t, VERSION_REG), 2);
        assert_eq!(r(&mut t, DEVICE_ID), 4);
        w(&mut t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, DEVICE_FEATURES), 1, "VERSION_1 is offered");
        let mut short = [0u8; 2];
        t.read(STATUS, &mut short);
        assert_eq!(short, [0, 0], "only 32-bit register reads");
    }

    #[test]
    fn negotiation_keeps_only_offered_features_and_refuses_legacy_drivers() {
        let mut t = transport();
        w(&mut t, STATUS, 3);
        w(&mut t, DRIVER_FEATURES_SEL, 0);
        w(&mut t, DRIVER_FEATURES, 0xffff_ffff);
        w(&mut t, STATUS, 0xb);
        assert_eq!(
            r(&mut t, STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "no VERSION_1: refused"
        );
        assert_eq!(t.acked_features, 0, "rng offers nothing in the low word");
        w(&mut t, DRIVER_FEATURES_SEL, 1);
        w(&mut t, DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features, 1 << VIRTIO_F_VERSION_1);
        w(&mut t, STATUS, 0xb);
        assert_ne!(r(&mut t, STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn queues_are_set_up_only_during_negotiation_and_reset_clears_them() {
        let mut t = transport();
        w(&mut t, QUEUE_NUM, 16);
        assert_eq!(t.queues[0].size(), 256, "ignored before FEATURES_OK");
        w(&mut t, STATUS, 3);
        w(&mut t, DRIVER_FEATURES_SEL, 1);
        w(&mut t, DRIVER_FEATURES, 1);
        w(&mut t, STATUS, 0xb);
        w(&mut t, QUEUE_SEL, 0);
        w(&mut t, QUEUE_NUM, 16);
        w(&mut t, QUEUE_DESC_LOW, 0x1000);
        w(&mut t, QUEUE_AVAIL_LOW, 0x2000);
        w(&mut t, QUEUE_USED_LOW, 0x3000);
        w(&mut t, QUEUE_READY, 1);
        assert_eq!(r(&mut t, QUEUE_READY), 1);
        w(&mut t, QUEUE_SEL, 7);
        assert_eq!(r(&mut t, QUEUE_NUM_MAX), 0, "no such queue");
        w(&mut t, STATUS, 0xf);
        assert!(t.active);
        w(&mut t, STATUS, 0x3);
        assert_ne!(
            r(&mut t, STATUS) & VIRTIO_CONFIG_S_FAILED,
            0,
            "clearing bits fails the device"
        );
        w(&mut t, STATUS, 0);
        assert_eq!(r(&mut t, STATUS), 0);
        assert!(!t.active);
        assert!(!t.queues[0].ready());
    }

    #[test]
    fn an_active_window_is_saved_and_restored_onto_a_new_device() {
        let mut t = transport();
        w(&mut t, STATUS, 3);
        w(&mut t, DRIVER_FEATURES_SEL, 1);
        w(&mut t, DRIVER_FEATURES, 1);
        w(&mut t, STATUS, 0xb);
        w(&mut t, QUEUE_NUM, 16);
        w(&mut t, QUEUE_DESC_LOW, 0x1000);
        w(&mut t, QUEUE_AVAIL_LOW, 0x2000);
        w(&mut t, QUEUE_USED_LOW, 0x3000);
        w(&mut t, QUEUE_READY, 1);
        w(&mut t, STATUS, 0xf);
        assert!(t.active);
        t.interrupt.signal_used_queue();
        let saved = t.save_state().unwrap();
        assert_eq!(saved.device, DeviceState::Rng);
        assert_eq!(saved.transport.queues[0].desc_table, 0x1000);

        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irqfd.try_clone().unwrap()));
        let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut back =
            MmioTransport::restore(device.clone(), t.mem.clone(), interrupt, &saved).unwrap();
        assert!(back.active);
        assert_eq!(r(&mut back, STATUS), 0xf);
        assert_eq!(r(&mut back, QUEUE_READY), 1);
        assert_eq!(r(&mut back, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(
            irqfd.read().unwrap(),
            1,
            "a pending interrupt is raised again"
        );
        let avail = lock(&device).active_queues().map(|q| q[0].avail_ring());
        assert_eq!(avail, Some(0x2000));
        assert_eq!(back.save_state().unwrap(), saved);

        let mut outside = saved.clone();
        outside.transport.queues[0].used_ring = 0xff_f000;
        let device = Arc::new(Mutex::new(Rng::new().unwrap()));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        assert!(matches!(
            MmioTransport::restore(device, t.mem.clone(), interrupt, &outside),
            Err(PersistError::QueueOutsideMemory(0))
        ));
    }

    #[test]
    fn queues_outside_guest_memory_fail_activation() {
        let mut t = transport();
        w(&mut t, STATUS, 3);
        w(&mut t, DRIVER_FEATURES_SEL, 1);
        w(&mut t, DRIVER_FEATURES, 1);
        w(&mut t, STATUS, 0xb);
        w(&mut t, QUEUE_NUM, 16);
        w(&mut t, QUEUE_DESC_LOW, 0xffff_0000);
        w(&mut t, QUEUE_READY, 1);
        w(&mut t, STATUS, 0xf);
        assert!(!t.active);
        assert_ne!(r(&mut t, STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
    }
}
