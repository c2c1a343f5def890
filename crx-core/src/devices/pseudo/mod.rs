//! Devices with no hardware counterpart.

pub mod guest_status;

pub use guest_status::GuestStatus;
