//! The fuzz harness: plays a guest driver against one device through the real virtio-mmio
//! transport (feature negotiation, queue setup, DRIVER_OK), with guest memory (descriptor tables,
//! rings and buffers alike) filled from the fuzz input, then kicks every queue and runs the
//! device's event handlers on this thread. Whatever the input, the device must not panic.

use std::sync::{Arc, Mutex};

use crx_virtio::event_loop::DeviceSubscriber;
use crx_virtio::mmio::*;
use crx_virtio::{Interrupt, MmioTransport, VirtioDevice};
use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM the input fills: small, so that fuzzed addresses often land inside it.
pub const MEM_SIZE: usize = 0x10000;
/// Each queue's descriptor table, available and used ring sit in their own 2 KiB block.
const QUEUE_BLOCK: u64 = 0x800;
/// How often each queue is kicked (the device may leave chains for a later pass).
const KICKS: usize = 3;

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// Runs one input against `device`. Input byte 0 picks driver choices (bit 0: decline
/// EVENT_IDX, bits 1–3: log2 of the queue size, bit 4: fold descriptor addresses and lengths
/// into guest RAM, so that most chains are well formed and the device's parsing, not only its
/// bounds checks, is reached); the rest is guest memory from address 0.
pub fn run(device: Arc<Mutex<dyn VirtioDevice>>, data: &[u8]) {
    let Some((&choices, image)) = data.split_first() else {
        return;
    };
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    mem.write_slice(&image[..image.len().min(MEM_SIZE)], GuestAddress(0))
        .expect("image fits");
    let queue_count = device.lock().unwrap().queue_max_sizes().len();
    let size = 1u32 << ((choices >> 1) & 7).min(4);
    if choices & 0x10 != 0 {
        fold_descriptors(&mem, queue_count, size);
    }
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let interrupt = Arc::new(Interrupt::new(irqfd));
    let mut transport = MmioTransport::new(device.clone(), mem, interrupt.clone());

    write(&mut transport, STATUS, 1);
    write(&mut transport, STATUS, 3);
    for sel in 0..2u32 {
        write(&mut transport, DEVICE_FEATURES_SEL, sel);
        let mut offered = read(&mut transport, DEVICE_FEATURES);
        if sel == 0 && choices & 1 != 0 {
            offered &= !(1 << 29); // VIRTIO_RING_F_EVENT_IDX
        }
        write(&mut transport, DRIVER_FEATURES_SEL, sel);
        write(&mut transport, DRIVER_FEATURES, offered);
    }
    write(&mut transport, STATUS, 0xb);
    for q in 0..queue_count as u32 {
        let base = u64::from(q) * QUEUE_BLOCK;
        write(&mut transport, QUEUE_SEL, q);
        write(&mut transport, QUEUE_NUM, size);
        write(&mut transport, QUEUE_DESC_LOW, base as u32);
        write(&mut transport, QUEUE_AVAIL_LOW, (base + 0x100) as u32);
        write(&mut transport, QUEUE_USED_LOW, (base + 0x200) as u32);
        write(&mut transport, QUEUE_READY, 1);
    }
    write(&mut transport, STATUS, 0xf);

    let mut events: EventManager<DeviceSubscriber> = EventManager::new().expect("epoll");
    events.add_subscriber(DeviceSubscriber(device.clone()));
    let _ = events.run_with_timeout(0);
    for _ in 0..KICKS {
        for q in 0..queue_count {
            let _ = device.lock().unwrap().queue_events()[q].write(1);
        }
        let _ = events.run_with_timeout(0);
    }
    // Whatever the device did, the driver can still read its state and reset it.
    let _ = read(&mut transport, STATUS);
    let _ = read(&mut transport, INTERRUPT_STATUS);
    write(&mut transport, STATUS, 0);
}

/// Rewrites each queue's descriptors to point inside guest RAM with modest lengths and in-range
/// `next` indexes, and its available ring's entries to valid heads (flags and the ring index are
/// left as the input made them).
fn fold_descriptors(mem: &GuestMemoryMmap, queue_count: usize, size: u32) {
    for q in 0..queue_count as u64 {
        let base = q * QUEUE_BLOCK;
        for d in 0..u64::from(size) {
            let at = GuestAddress(base + d * 16);
            let addr: u64 = mem.read_obj(at).unwrap_or(0);
            let len: u32 = mem.read_obj(GuestAddress(at.0 + 8)).unwrap_or(0);
            let next: u16 = mem.read_obj(GuestAddress(at.0 + 14)).unwrap_or(0);
            let _ = mem.write_obj(addr % MEM_SIZE as u64, at);
            let _ = mem.write_obj(len % 0x1000, GuestAddress(at.0 + 8));
            let _ = mem.write_obj(next % size as u16, GuestAddress(at.0 + 14));
        }
        for slot in 0..u64::from(size) {
            let at = GuestAddress(base + 0x100 + 4 + slot * 2);
            let head: u16 = mem.read_obj(at).unwrap_or(0);
            let _ = mem.write_obj(head % size as u16, at);
        }
    }
}
