//! crx-image: CRX's image service.
//!
//! Pulls OCI images from distribution registries (`oci-client`) or imports OCI layouts and
//! archives into one content-addressed store shared by every pod, unpacks each layer once per
//! chain ID (with `crx-layer`), tracks images, leases and filesystem usage, and collects
//! garbage. Layout under the store root (default `/var/lib/crx`, `CRX_ROOT` overrides):
//!
//! ```text
//! blobs/sha256/<hex>         verified blobs (manifests, configs, layers), committed by rename
//! ingest/<hex>.partial       downloads in progress (never trusted; removed on error and by GC)
//! images/<hex(name)>.json    one record per image name (atomic temp + rename)
//! leases/<id>.json           images in use by containers; survive restarts
//! layers/<chain-hex>/        {rootfs/, meta.json}: the flattened rootfs up to that layer
//! locks/                     per-blob and per-chain lock files (cross-process, flock)
//! lock                       store lock: shared by pulls/imports, exclusive for rmi and GC
//! ```

mod blobs;
mod config;
mod digest;
mod error;
mod import;
mod index;
mod layers;
mod lock;
mod progress;
mod registry;
mod store;
mod usage;

pub use config::{Credential, RegistryConfig, DEFAULT_ROOT};
pub use digest::Digest;
pub use error::Error;
pub use index::{ImageRecord, LayerRecord, Lease};
/// An image reference (`registry/repository[:tag][@digest]`), as [`parse_reference`] makes it.
pub use oci_client::Reference;
pub use progress::{LogProgress, Progress};
pub use registry::parse_reference;
pub use store::{GcReport, RunConfig, Store};
pub use usage::FsUsage;
