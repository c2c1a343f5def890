//! The devices: each owns its queues' work and its host backend.

pub mod block;
pub mod fs;
pub mod net;
pub mod rng;
pub mod tap;
pub mod vsock;
