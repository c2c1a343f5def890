//! The devices: each owns its queues' work and its host backend.

pub mod block;
pub mod fs;
pub mod rng;
