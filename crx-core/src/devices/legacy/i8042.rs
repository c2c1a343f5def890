//! The i8042 keyboard controller, reduced to what a guest without a keyboard needs: its status
//! register (always ready) and the CPU reset command (0xfe), which Linux's `reboot=k` sends.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::vmm::{ExitLatch, VmExit};

/// Command-port offset from the data port (0x64 - 0x60).
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 at ports 0x60..=0x64.
pub struct I8042 {
    exit: Arc<ExitLatch>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitLatch>) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty. Data: nothing to read.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm_and_nothing_else_does() {
        let exit = Arc::new(ExitLatch::default());
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xd1]);
        assert!(!exit.is_requested());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0], 0);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert!(matches!(exit.get(), Some(VmExit::Reset)));
    }
}
