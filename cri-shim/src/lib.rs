//! What `crx-cri` and its companion `crxctl` share: the configuration file, and how a CRI
//! pod's sandbox is labelled.

pub mod config;

/// The sandbox label holding a CRI pod's `namespace/name`.
pub const POD_LABEL: &str = "cri-pod";
