//! virtio-rng (entropy device): fills each buffer the driver offers from the host's getrandom(2).

use event_manager::{EventOps, Events};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use crate::base::{from_base, DeviceBase, Wake};
use crate::device::{drain_queue, Malformed, Served, VirtioDevice};
use crate::iovec::ChainBuffers;
use crate::persist::{DeviceState, PersistError};

const QUEUE_SIZE: u16 = 256;
/// The most entropy one request gets; the driver asks again for more.
const MAX_REQUEST: u64 = 64 * 1024;

/// The entropy device.
pub struct Rng {
    base: DeviceBase,
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Rng {
            base: DeviceBase::new(vec![QUEUE_SIZE])?,
        })
    }

    fn serve(&mut self) {
        let Some(active) = self.base.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        drain_queue(&mut active.queues[0], mem, &active.interrupt, |chain| {
            let mut buffers = ChainBuffers::from_chain(chain)?;
            buffers.writable.truncate(MAX_REQUEST);
            let mut filled = 0u32;
            for iov in buffers.writable.iovecs(mem, true)? {
                // SAFETY: iov points into guest RAM checked writable for iov_len bytes.
                let n = unsafe { libc::getrandom(iov.iov_base, iov.iov_len, 0) };
                if n < 0 {
                    return Err(Malformed::new(format!(
                        "getrandom: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                filled += n as u32;
                if (n as usize) < iov.iov_len {
                    break;
                }
            }
            Ok(Served::Used(filled))
        });
    }
}

impl VirtioDevice for Rng {
    from_base!(
        queue_max_sizes,
        queue_events,
        activate,
        reset,
        active_queues,
        init_events
    );

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn save_state(&self) -> Result<DeviceState, PersistError> {
        Ok(DeviceState::Rng)
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Rng => Ok(()),
            other => Err(PersistError::Mismatch(format!(
                "{other:?} for an rng device"
            ))),
        }
    }

    fn process_event(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(Wake::Activated | Wake::Queue(_)) = self.base.wake(&events) {
            self.serve()
        }
    }
}
