//! The 8250 UART at COM1 (`vm-superio`), the guest's console. Output goes to a sink (stdout, a
//! file, or nowhere) and into a bounded tail kept for diagnosis: the VMM reads a kernel panic
//! message from it. Its registers and receive FIFO go into snapshots ([`SerialState`]).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState as UartState;
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

/// The UART's registers and receive FIFO in a snapshot (vm-superio's state, with serde).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// A saved serial state vm-superio refuses (a receive FIFO beyond its size).
#[derive(Debug, thiserror::Error)]
#[error("saved serial state: {0:?}")]
pub struct BadSerialState(vm_superio::serial::Error<io::Error>);

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

impl SerialConsole {
    pub fn state(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// The UART as saved; vm-superio raises an interrupt it had pending and enabled again (it
    /// may not have reached the saved interrupt controller before the snapshot).
    pub fn from_state(
        state: &SerialState,
        irq: EventFd,
        sink: Box<dyn Write + Send>,
        tail: ConsoleTail,
    ) -> Result<Self, BadSerialState> {
        let uart_state = UartState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(
            &uart_state,
            IrqEvent(irq),
            vm_superio::serial::NoEvents,
            ConsoleWriter { sink, tail },
        )
        .map_err(BadSerialState)?;
        Ok(SerialConsole { uart })
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
    fn state_round_trips_and_a_pending_interrupt_is_raised_again() {
        let tail = ConsoleTail::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart =
            SerialConsole::new(irq.try_clone().unwrap(), Box::new(io::sink()), tail.clone());
        uart.write(3, &[0x83]); // LCR: DLAB
        uart.write(0, &[0x0c]); // divisor low
        uart.write(3, &[0x03]); // 8N1
        uart.write(7, &[0x5a]); // scratch
        uart.write(1, &[0x02]); // IER: THR empty interrupt, raised at once
        let saved = uart.state();
        assert_eq!((saved.baud_divisor_low, saved.scratch), (0x0c, 0x5a));
        let _ = irq.read();
        let again = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let back = SerialConsole::from_state(
            &saved,
            again.try_clone().unwrap(),
            Box::new(io::sink()),
            tail,
        )
        .unwrap();
        assert_eq!(back.state(), saved);
        assert_eq!(again.read().unwrap(), 1);
        let mut full = saved;
        full.in_buffer = vec![0; 1 << 20];
        assert!(SerialConsole::from_state(
            &full,
            again,
            Box::new(io::sink()),
            ConsoleTail::default()
        )
        .is_err());
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
