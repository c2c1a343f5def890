//! Emulated devices and the buses that route port I/O and MMIO exits to them.

pub mod bus;
pub mod legacy;
pub mod pseudo;
pub mod virtio;

pub use bus::{Bus, BusDevice};
