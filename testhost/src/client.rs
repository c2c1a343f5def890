//! Talking to the agent over the forwarded TCP port: ping, shutdown, run a command.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::protocol::{Reply, Request, RunRequest, Status};

/// Where an L1's agent answers: the forwarded localhost port and the token it wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub port: u16,
    pub token: String,
}

/// Which of the command's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

fn connect(port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn unresponsive(what: &str, port: u16) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| Error::Unresponsive(format!("{what} via 127.0.0.1:{port}: {e}"))
}

/// Asks the agent for its status within `timeout`.
pub fn ping(agent: &Endpoint, probe_kvm: bool, timeout: Duration) -> Result<Status, Error> {
    let port = agent.port;
    let mut stream = connect(port, timeout).map_err(unresponsive("ping", port))?;
    Request::Ping { probe_kvm }
        .write_to(&agent.token, &mut stream)
        .map_err(unresponsive("ping", port))?;
    match Reply::read_from(&mut stream).map_err(unresponsive("ping", port))? {
        Some(Reply::Pong(status)) => Ok(status),
        Some(Reply::Failure(message)) => Err(Error::Protocol(message)),
        Some(other) => Err(Error::Protocol(format!("answered a ping with {other:?}"))),
        None => Err(Error::Unresponsive(format!(
            "ping via 127.0.0.1:{port}: connection closed"
        ))),
    }
}

/// Asks the agent to power the L1 off.
pub fn shutdown(agent: &Endpoint, timeout: Duration) -> Result<(), Error> {
    let port = agent.port;
    let mut stream = connect(port, timeout).map_err(unresponsive("shutdown", port))?;
    Request::Shutdown
        .write_to(&agent.token, &mut stream)
        .map_err(unresponsive("shutdown", port))?;
    match Reply::read_from(&mut stream).map_err(unresponsive("shutdown", port))? {
        Some(Reply::ShuttingDown) => Ok(()),
        Some(Reply::Failure(message)) => Err(Error::Protocol(message)),
        Some(other) => Err(Error::Protocol(format!(
            "answered a shutdown with {other:?}"
        ))),
        None => Err(Error::Unresponsive(format!(
            "shutdown via 127.0.0.1:{port}: connection closed"
        ))),
    }
}

/// How a run ended when it did not end with an exit status.
pub enum RunError {
    /// Nothing came from the L1 for the hang timeout, or the connection broke: the L1 may be hung
    /// or gone. `started` says whether the command had begun (sent output or a heartbeat).
    Lost { error: Error, started: bool },
    /// The agent answered but could not run the command, or broke the protocol.
    Failed(Error),
}

/// Runs `request`, handing output chunks to `sink` as they come; returns the exit status.
pub fn run(
    agent: &Endpoint,
    request: RunRequest,
    hang_timeout: Duration,
    sink: &mut dyn FnMut(Stream, &[u8]),
) -> Result<ExitStatus, RunError> {
    let program =
        String::from_utf8_lossy(request.argv.first().map_or(&[][..], Vec::as_slice)).into_owned();
    let port = agent.port;
    let lost = |started: bool| {
        move |e: io::Error| RunError::Lost {
            error: unresponsive("run", port)(e),
            started,
        }
    };
    let mut stream = connect(port, hang_timeout).map_err(lost(false))?;
    Request::Run(request)
        .write_to(&agent.token, &mut stream)
        .map_err(lost(false))?;
    let mut started = false;
    loop {
        match Reply::read_from(&mut stream).map_err(lost(started))? {
            Some(Reply::Stdout(bytes)) => sink(Stream::Stdout, &bytes),
            Some(Reply::Stderr(bytes)) => sink(Stream::Stderr, &bytes),
            Some(Reply::Heartbeat) => {}
            Some(Reply::Exit(raw)) => return Ok(ExitStatus::from_raw(raw)),
            Some(Reply::Failure(message)) => {
                return Err(RunError::Failed(Error::Spawn { program, message }))
            }
            Some(other) => {
                return Err(RunError::Failed(Error::Protocol(format!(
                    "answered a run with {other:?}"
                ))));
            }
            None => {
                return Err(RunError::Lost {
                    error: Error::Unresponsive(format!(
                        "run via 127.0.0.1:{port}: connection closed before the exit status"
                    )),
                    started,
                });
            }
        }
        started = true;
    }
}
