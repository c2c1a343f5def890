//! The streaming server of CRX's CRI: kubelet (or crictl) asks the runtime for Exec, Attach or
//! PortForward, gets a one-time URL to this server, and opens it with an HTTP upgrade to
//! SPDY/3.1, speaking Kubernetes' remote command protocol (`v4.channel.k8s.io`: one SPDY stream
//! each for the error/status channel, stdin, stdout, stderr and terminal resizes) or its port
//! forwarding protocol (`portforward.k8s.io`: an error and a data stream per TCP connection).
//!
//! - [`spdy`]: the framing and header compression.
//! - [`remotecommand`]: one exec or attach session's streams, and the status it ends with.
//! - [`portforward`]: one port forwarding session's connections.
//! - [`server`]: the listener, the one-time URLs and the upgrade.
//! - `dispatch`: the frame reader loop both sessions share, routing stream events to each.
//!
//! What runs the command, or reaches the port, is the caller's [`Handler`]; this crate knows
//! nothing of VMs.

mod dispatch;
pub mod portforward;
pub mod remotecommand;
pub mod server;
pub mod spdy;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

pub use remotecommand::{Hangup, OutputStream, Resize, Stdin, Streams, TerminalSize};
pub use server::StreamingServer;

/// What a one-time URL was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// The container (exec, attach) or the pod sandbox (port forward).
    pub target_id: String,
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
    /// TCP connections to the pod's ports; any port when `ports` is empty (as kubelet's
    /// SPDY server allows).
    PortForward { ports: Vec<u16> },
}

impl RequestKind {
    /// The URL path segment: `exec`, `attach` or `portforward`.
    pub fn name(&self) -> &'static str {
        match self {
            RequestKind::Exec { .. } => "exec",
            RequestKind::Attach => "attach",
            RequestKind::PortForward { .. } => "portforward",
        }
    }
}

/// Runs what a session asks for over its streams.
pub trait Handler: Send + Sync + 'static {
    /// Runs an exec or attach `request` with `streams`; returns the process's exit code, or
    /// why it could not run (sent to the client as a failure status).
    fn serve(&self, request: Request, streams: Streams) -> Result<i32, String>;

    /// A new TCP connection to `port` of pod sandbox `sandbox_id`, or why there is none (sent
    /// to the client on the forward's error stream).
    fn forward(&self, sandbox_id: &str, port: u16) -> Result<Box<dyn PortConnection>, String>;
}

/// A byte stream to a pod's port that can be read and written from two threads and
/// half-closed.
pub trait PortConnection: Read + Write + Send {
    fn try_clone_connection(&self) -> io::Result<Box<dyn PortConnection>>;
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

impl PortConnection for UnixStream {
    fn try_clone_connection(&self) -> io::Result<Box<dyn PortConnection>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

impl PortConnection for TcpStream {
    fn try_clone_connection(&self) -> io::Result<Box<dyn PortConnection>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

/// The frame writer of one connection, shared by the threads serving its streams.
type SharedWriter = Arc<Mutex<spdy::FrameWriter<TcpStream>>>;

/// Locks `mutex`, also after a thread holding it panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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
