//! The guest status page at MMIO 0xc0000000: Firecracker's boot timer (a byte 123 written at
//! offset 0 when init starts; the VMM records the time since launch) and CRX's exit register (a
//! little-endian u32 at offset 8: the init's exit status; the VM ends at once with it).

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::vmm::{BootClock, ExitLatch, VmExit};

const BOOT_TIMER_OFFSET: u64 = 0;
const BOOT_TIMER_MAGIC: u8 = 123;
const EXIT_STATUS_OFFSET: u64 = 8;

/// The boot timer and exit register.
pub struct GuestStatus {
    clock: Arc<BootClock>,
    exit: Arc<ExitLatch>,
}

impl GuestStatus {
    pub fn new(clock: Arc<BootClock>, exit: Arc<ExitLatch>) -> Self {
        GuestStatus { clock, exit }
    }
}

impl BusDevice for GuestStatus {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (BOOT_TIMER_OFFSET, [BOOT_TIMER_MAGIC, ..]) => {
                if let Some(elapsed) = self.clock.mark_guest_init() {
                    tracing::info!(
                        "Guest-boot-time = {} us {} ms",
                        elapsed.as_micros(),
                        elapsed.as_millis()
                    );
                }
            }
            (EXIT_STATUS_OFFSET, [a, b, c, d]) => {
                self.exit
                    .request(VmExit::Exited(u32::from_le_bytes([*a, *b, *c, *d])));
            }
            _ => tracing::debug!("guest status: ignored write at {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn boot_timer_records_once_and_exit_register_ends_the_vm() {
        let clock = Arc::new(BootClock::new(Instant::now()));
        let exit = Arc::new(ExitLatch::default());
        let mut dev = GuestStatus::new(clock.clone(), exit.clone());
        dev.write(0, &[7]);
        assert!(clock.times().guest_init.is_none());
        dev.write(0, &[BOOT_TIMER_MAGIC]);
        let first = clock.times().guest_init.unwrap();
        dev.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(clock.times().guest_init.unwrap(), first);
        dev.write(EXIT_STATUS_OFFSET, &[1, 2]);
        assert!(!exit.is_requested());
        dev.write(EXIT_STATUS_OFFSET, &42u32.to_le_bytes());
        assert!(matches!(exit.get(), Some(VmExit::Exited(42))));
    }
}
