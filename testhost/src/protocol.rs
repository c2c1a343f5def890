//! The wire protocol between this library (on the machine) and `crx-testhost-agent` (in the L1).
//!
//! One TCP connection per request. Every message is a frame: a tag byte, a big-endian `u32`
//! payload length, the payload. The client sends one [`Request`] frame with the L1's token (a
//! secret in the run dir, so other local users cannot use the forwarded port); the agent answers a ping
//! with one [`Reply::Pong`], a shutdown with [`Reply::ShuttingDown`], and a run with a stream of
//! [`Reply::Stdout`], [`Reply::Stderr`] and [`Reply::Heartbeat`] frames ended by one
//! [`Reply::Exit`] or [`Reply::Failure`]. A client that closes its connection early makes the agent
//! kill the command's process group.

use std::io::{self, Read, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bumped whenever frames or their payloads change; an agent of another version is replaced.
pub const PROTOCOL_VERSION: u32 = 2;
/// The port the agent listens on inside the L1 (QEMU forwards a host port to it).
pub const AGENT_PORT: u16 = 7070;
/// How often the agent sends [`Reply::Heartbeat`] while a command is quiet.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// Largest payload either side accepts.
const MAX_PAYLOAD: usize = 64 << 20;

/// What a client asks of the agent.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Report the agent's [`Status`]; with `probe_kvm` also probe `/dev/kvm` (creates a VM).
    Ping { probe_kvm: bool },
    /// Run a command.
    Run(RunRequest),
    /// Power the L1 off.
    Shutdown,
}

/// A command to run in the L1. Byte strings, as Unix paths and arguments need not be UTF-8.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    pub argv: Vec<Vec<u8>>,
    pub cwd: Vec<u8>,
    /// Set on top of the agent's own environment.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The agent's answer to a ping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub protocol: u32,
    /// The L1 kernel's release (`uname -r`).
    pub kernel: String,
    pub uptime_secs: f64,
    pub active_commands: usize,
    pub idle_shutdown_secs: u64,
    /// `Some("Standard")`, `Some("Pvm")` or `Some("error: …")` when the ping asked for a probe.
    pub kvm: Option<String>,
}

/// What the agent sends back.
#[derive(Debug)]
pub enum Reply {
    Pong(Status),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Heartbeat,
    /// The command ended; the raw wait status (as `ExitStatusExt::into_raw`).
    Exit(i32),
    /// The command could not be started, or the request was bad.
    Failure(String),
    ShuttingDown,
}

mod tag {
    pub const REQUEST: u8 = b'q';
    pub const PONG: u8 = b'p';
    pub const STDOUT: u8 = b'o';
    pub const STDERR: u8 = b'e';
    pub const HEARTBEAT: u8 = b'h';
    pub const EXIT: u8 = b'x';
    pub const FAILURE: u8 = b'f';
    pub const SHUTTING_DOWN: u8 = b's';
}

/// A request with the token that authorizes it.
#[derive(Serialize, Deserialize)]
struct RequestFrame {
    token: String,
    request: Request,
}

impl Request {
    pub fn write_to(self, token: &str, w: &mut impl Write) -> io::Result<()> {
        let frame = RequestFrame {
            token: token.to_owned(),
            request: self,
        };
        write_frame(w, tag::REQUEST, &serde_json::to_vec(&frame)?)
    }

    /// Reads a request; returns it with the token it came with.
    pub fn read_from(r: &mut impl Read) -> io::Result<(String, Request)> {
        match read_frame(r)? {
            Some((tag::REQUEST, payload)) => {
                let frame: RequestFrame = serde_json::from_slice(&payload)?;
                Ok((frame.token, frame.request))
            }
            Some((other, _)) => Err(invalid(format!(
                "expected a request frame, got tag {other}"
            ))),
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

impl Reply {
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        match self {
            Reply::Pong(status) => write_frame(w, tag::PONG, &serde_json::to_vec(status)?),
            Reply::Stdout(bytes) => write_frame(w, tag::STDOUT, bytes),
            Reply::Stderr(bytes) => write_frame(w, tag::STDERR, bytes),
            Reply::Heartbeat => write_frame(w, tag::HEARTBEAT, &[]),
            Reply::Exit(raw) => write_frame(w, tag::EXIT, &raw.to_be_bytes()),
            Reply::Failure(message) => write_frame(w, tag::FAILURE, message.as_bytes()),
            Reply::ShuttingDown => write_frame(w, tag::SHUTTING_DOWN, &[]),
        }
    }

    /// Reads the next reply; `None` when the agent closed the connection between frames.
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Reply>> {
        let Some((tag, payload)) = read_frame(r)? else {
            return Ok(None);
        };
        let reply = match tag {
            tag::PONG => Reply::Pong(serde_json::from_slice(&payload)?),
            tag::STDOUT => Reply::Stdout(payload),
            tag::STDERR => Reply::Stderr(payload),
            tag::HEARTBEAT => Reply::Heartbeat,
            tag::EXIT => {
                let raw: [u8; 4] = payload
                    .as_slice()
                    .try_into()
                    .map_err(|_| invalid("exit frame without a 4-byte status".into()))?;
                Reply::Exit(i32::from_be_bytes(raw))
            }
            tag::FAILURE => Reply::Failure(String::from_utf8_lossy(&payload).into_owned()),
            tag::SHUTTING_DOWN => Reply::ShuttingDown,
            other => return Err(invalid(format!("unknown reply tag {other}"))),
        };
        Ok(Some(reply))
    }
}

fn write_frame(w: &mut impl Write, tag: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| invalid("frame too large".into()))?;
    let mut header = [0u8; 5];
    header[0] = tag;
    header[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&header)?;
    w.write_all(payload)?;
    w.flush()
}

/// `None` on a clean end of stream before the first header byte.
fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut header = [0u8; 5];
    let mut filled = 0;
    while filled < header.len() {
        match r.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(invalid(format!("frame of {len} bytes is over the limit")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((header[0], payload)))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        let mut wire = Vec::new();
        Reply::Stdout(b"out".to_vec()).write_to(&mut wire).unwrap();
        Reply::Heartbeat.write_to(&mut wire).unwrap();
        Reply::Exit(7 << 8).write_to(&mut wire).unwrap();
        let mut r = wire.as_slice();
        assert!(matches!(Reply::read_from(&mut r).unwrap(), Some(Reply::Stdout(b)) if b == b"out"));
        assert!(matches!(
            Reply::read_from(&mut r).unwrap(),
            Some(Reply::Heartbeat)
        ));
        assert!(matches!(
            Reply::read_from(&mut r).unwrap(),
            Some(Reply::Exit(0x700))
        ));
        assert!(Reply::read_from(&mut r).unwrap().is_none());
    }

    #[test]
    fn request_round_trips_non_utf8_bytes() {
        let mut wire = Vec::new();
        let request = Request::Run(RunRequest {
            argv: vec![b"echo".to_vec(), vec![0xff, 0xfe]],
            cwd: b"/tmp".to_vec(),
            env: vec![(b"K".to_vec(), b"V".to_vec())],
        });
        request.write_to("secret", &mut wire).unwrap();
        let (token, Request::Run(run)) = Request::read_from(&mut wire.as_slice()).unwrap() else {
            panic!("not a run request");
        };
        assert_eq!(token, "secret");
        assert_eq!(run.argv[1], vec![0xff, 0xfe]);
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut wire = Vec::new();
        Reply::Stdout(b"abcdef".to_vec())
            .write_to(&mut wire)
            .unwrap();
        wire.truncate(7);
        assert!(Reply::read_from(&mut wire.as_slice()).is_err());
    }
}
