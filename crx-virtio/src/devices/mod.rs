//! The devices: each owns its queues' work and its host backend.

pub mod block;
pub mod rng;
pub mod vsock;
