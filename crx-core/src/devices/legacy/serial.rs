//! The 8250 UART at COM1 (`vm-superio`), the guest's console. Output goes to a sink (stdout, a
//! file, or nowhere) and into a bounded tail kept for diagnosis: the VMM reads a kernel panic
//! message from it.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;

/// How much console output the tail keeps.
const TAIL_BYTES: usize = 16 * 1024;

/// The last bytes the guest wrote to its console.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    fn push(&self, bytes: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tail.extend(bytes);
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
    }

    /// The tail as text (lossy).
    pub fn text(&self) -> String {
        let tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = tail.as_slices();
        let mut bytes = a.to_vec();
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The serial output: the configured sink plus the tail.
pub struct ConsoleWriter {
    sink: Box<dyn Write + Send>,
    tail: ConsoleTail,
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tail.push(buf);
        // A console sink that fails (a closed pipe) must not stop the guest.
        let _ = self.sink.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.sink.flush();
        Ok(())
    }
}

/// Raises the UART's interrupt through an irqfd.
pub struct IrqEvent(pub EventFd);

impl Trigger for IrqEvent {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 on the port I/O bus.
pub struct SerialConsole {
    uart: Serial<IrqEvent, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, sink: Box<dyn Write + Send>, tail: ConsoleTail) -> Self {
        SerialConsole {
            uart: Serial::new(IrqEvent(irq), ConsoleWriter { sink, tail }),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(b), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(offset, *b) {
                tracing::warn!("serial console: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_reach_the_tail_and_raise_the_irq() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let tail = ConsoleTail::default();
        let mut uart =
            SerialConsole::new(irq.try_clone().unwrap(), Box::new(io::sink()), tail.clone());
        uart.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"Kernel panic" {
            uart.write(0, &[*b]);
        }
        assert_eq!(tail.text(), "Kernel panic");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn tail_is_bounded() {
        let tail = ConsoleTail::default();
        tail.push(&vec![b'a'; TAIL_BYTES]);
        tail.push(b"end");
        let text = tail.text();
        assert_eq!(text.len(), TAIL_BYTES);
        assert!(text.ends_with("end"));
    }
}
