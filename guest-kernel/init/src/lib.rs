//! The parts of `crx-init` that the guest agent (`crx-agent`, also a PID 1) shares: the
//! boot-timer/exit-register page and power-off ([`hw`]), and the early environment ([`setup`]).

pub mod hw;
pub mod setup;
