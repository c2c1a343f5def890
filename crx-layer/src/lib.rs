//! crx-layer: apply OCI image layers onto a root directory, safely.
//!
//! One implementation shared by the host image store (`crx-image`) and, later, the guest
//! agent. It owns:
//! - [`unpack_layer`]: a layer blob (tar, gzip-tar or zstd-tar, sniffed by magic bytes) applied
//!   on top of a directory with OCI whiteout semantics (`.wh.<name>`, `.wh..wh..opq`), hard
//!   links, symlinks, device nodes (only when root), ownership, permissions, mtimes and xattrs
//!   as the caller's privileges allow. Returns the layer's DiffID (sha256 of the uncompressed
//!   tar) so callers can check it against the image config.
//! - [`clone_tree`]: a hard-link copy of an unpacked rootfs, so each layer of a chain can be
//!   applied on top of its parent without touching it.
//!
//! Security: every entry path must be relative and free of `..`; every directory lookup goes
//! through `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from the root, so a symlink that
//! points out of the root (absolute or `../`) can never be followed, and the final component
//! is always created with `O_EXCL|O_NOFOLLOW`-style calls relative to its parent directory fd.
//! A layer that tries to escape fails with [`LayerError::Escape`] and writes nothing outside the
//! root.

mod clone;
mod fsops;
mod path;
mod unpack;

pub use clone::clone_tree;
pub use unpack::{unpack_layer, UnpackOptions, Unpacked};

use std::io;

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// An entry tries to reach outside the root (absolute path, `..`, or through a symlink).
    #[error("layer entry {path:?} escapes the root directory: {reason}")]
    Escape { path: String, reason: &'static str },
    /// An entry that is malformed in a way that is not an escape attempt.
    #[error("invalid layer entry {path:?}: {reason}")]
    InvalidEntry { path: String, reason: String },
    /// The compressed or tar stream is unreadable.
    #[error("reading layer stream: {0}")]
    Read(#[source] io::Error),
    /// A filesystem operation failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl LayerError {
    pub(crate) fn io(
        op: &'static str,
        path: impl AsRef<std::path::Path>,
        source: impl Into<io::Error>,
    ) -> Self {
        LayerError::Io {
            op,
            path: path.as_ref().display().to_string(),
            source: source.into(),
        }
    }
}
