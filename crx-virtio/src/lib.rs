//! crx-virtio: CRX's virtio devices behind the virtio-mmio transport, on `virtio-queue`.
//!
//! [`mmio::MmioTransport`] is the register window a guest driver programs; each device implements
//! [`device::VirtioDevice`] and does its work on the [`event_loop::EventLoop`] thread, woken by
//! ioeventfds, and raises its interrupt through an irqfd ([`device::Interrupt`]). Descriptor chains
//! are read generically ([`iovec`]): a device never assumes how a request is split into
//! descriptors, every guest address and length is checked, and a malformed chain fails its request
//! and marks the device as needing a reset. The VMM (crx-core) places the windows, registers the
//! eventfds with KVM, and starts the loop.

pub mod base;
pub mod device;
pub mod devices;
pub mod event_loop;
pub mod iovec;
pub mod mmio;
pub mod persist;

use std::sync::{Arc, Mutex};

pub use device::{Interrupt, VirtioDevice};
pub use devices::block::BlockConfig;
pub use devices::fs::{FsConfig, FsSandbox};
pub use devices::net::{NetConfig, TapSource};
pub use devices::vsock::VsockConfig;
pub use event_loop::EventLoop;
pub use mmio::MmioTransport;
pub use persist::{DeviceSnapshot, PersistError};

/// A device the VMM is asked to attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceConfig {
    Block(BlockConfig),
    Net(NetConfig),
    Rng,
    /// virtio-fs served by a virtiofsd child process (vhost-user).
    Fs(FsConfig),
    Vsock(VsockConfig),
}

/// Why a configured device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Block(#[from] devices::block::BlockError),
    #[error(transparent)]
    Net(#[from] devices::net::NetError),
    #[error(transparent)]
    Fs(#[from] devices::fs::FsError),
    #[error(transparent)]
    Vsock(#[from] devices::vsock::VsockError),
    #[error("cannot create a device's eventfds: {0}")]
    EventFd(#[source] std::io::Error),
}

impl DeviceConfig {
    /// Creates the device with its host backend opened.
    pub fn build(&self) -> Result<Arc<Mutex<dyn VirtioDevice>>, DeviceError> {
        Ok(match self {
            DeviceConfig::Block(config) => {
                Arc::new(Mutex::new(devices::block::Block::new(config)?))
            }
            DeviceConfig::Net(config) => Arc::new(Mutex::new(devices::net::Net::new(config)?)),
            DeviceConfig::Rng => Arc::new(Mutex::new(
                devices::rng::Rng::new().map_err(DeviceError::EventFd)?,
            )),
            DeviceConfig::Fs(config) => Arc::new(Mutex::new(devices::fs::Fs::new(config)?)),
            DeviceConfig::Vsock(config) => {
                Arc::new(Mutex::new(devices::vsock::Vsock::new(config)?))
            }
        })
    }
}
