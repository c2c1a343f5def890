//! PC legacy devices a direct-booted Linux guest uses: the 8250 console and the i8042 reset line.

pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::{ConsoleTail, SerialConsole, SerialState};
