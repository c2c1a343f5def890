//! The library's error type.

use std::path::PathBuf;

/// Why the test host could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm is missing: this machine has no KVM at all, so VM tests cannot run here or in a test host (load kvm_intel/kvm_amd, or use a machine with KVM)")]
    NoKvm,
    #[error("cannot probe /dev/kvm: {0}")]
    Probe(#[from] crx_kvm_probe::ProbeError),
    #[error("{what} ({}): {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid setting {name}={value:?}: {reason}")]
    Setting {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot build the test host's boot assets: {0}")]
    Assets(String),
    #[error("cannot build the test host agent: {0}")]
    Agent(String),
    #[error("the test host did not start: {0}")]
    Start(String),
    #[error("the test host does not answer: {0}")]
    Unresponsive(String),
    #[error("the test host agent broke the protocol: {0}")]
    Protocol(String),
    #[error("the test host could not start {program:?}: {message}")]
    Spawn { program: String, message: String },
}

impl Error {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }
}
