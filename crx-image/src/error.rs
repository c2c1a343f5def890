//! The image service's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the image service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("invalid digest {0:?} (expected sha256:<64 hex digits>)")]
    InvalidDigest(String),
    #[error("registry {registry} refused access to {reference}: authentication required or credentials rejected (configure credentials for {registry})")]
    Unauthorized {
        registry: String,
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("{reference} not found at {registry}: {source}")]
    NotInRegistry {
        registry: String,
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("pulling {reference} from {registry}: {source}")]
    Registry {
        registry: String,
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("blob {digest} failed verification: expected {expected_size} bytes, got {actual_size} bytes with digest {actual_digest}; nothing stored")]
    BlobMismatch {
        digest: String,
        expected_size: u64,
        actual_size: u64,
        actual_digest: String,
    },
    #[error("layer {blob} unpacks to DiffID {actual}, but the image config says {expected}")]
    DiffIdMismatch {
        blob: String,
        expected: String,
        actual: String,
    },
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("malformed {what}: {reason}")]
    Malformed { what: String, reason: String },
    #[error("no image named {0}")]
    ImageNotFound(String),
    #[error("image {image} is in use by {holders:?}; release those leases first")]
    InUse { image: String, holders: Vec<String> },
    #[error("no lease {0}")]
    LeaseNotFound(String),
    #[error("unpacking layer {blob}: {source}")]
    Layer {
        blob: String,
        #[source]
        source: crx_layer::LayerError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("background task failed: {0}")]
    Task(String),
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }
}
