//! The streaming server of CRX's CRI: kubelet (or crictl) asks the runtime for Exec or Attach,
//! gets a one-time URL to this server, and opens it with an HTTP upgrade to SPDY/3.1, speaking
//! Kubernetes' remote command protocol (`v4.channel.k8s.io`): one SPDY stream each for the
//! error/status channel, stdin, stdout, stderr and terminal resizes.
//!
//! - [`spdy`]: the framing and header compression.
//! - [`remotecommand`]: one session's streams, and the status it ends with.
//! - [`server`]: the listener, the one-time URLs and the upgrade.
//!
//! What runs the command is the caller's [`Handler`]; this crate knows nothing of VMs.

pub mod remotecommand;
pub mod server;
pub mod spdy;

pub use remotecommand::{Hangup, OutputStream, Resize, Stdin, Streams, TerminalSize};
pub use server::StreamingServer;

/// What a one-time URL was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub container_id: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// A new process in the container.
    Exec { cmd: Vec<String> },
    /// The container's own process.
    Attach,
}

impl RequestKind {
    /// The URL path segment: `exec` or `attach`.
    pub fn name(&self) -> &'static str {
        match self {
            RequestKind::Exec { .. } => "exec",
            RequestKind::Attach => "attach",
        }
    }
}

/// Runs what a session asks for over its streams.
pub trait Handler: Send + Sync + 'static {
    /// Runs `request` with `streams`; returns the process's exit code, or why it could not run
    /// (sent to the client as a failure status).
    fn serve(&self, request: Request, streams: Streams) -> Result<i32, String>;
}

#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("cannot get random bytes for a URL token: {0}")]
    Random(String),
}
