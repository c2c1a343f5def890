//! One remote command session (`v4.channel.k8s.io`) on an upgraded connection: waits for the
//! client's streams (error, and stdin, stdout, stderr, resize as the request asked), hands them
//! to the [`Handler`], then half-closes the output streams and writes the final status (a
//! `metav1.Status` in JSON: Success, or NonZeroExitCode with the code, or the failure) on the
//! error stream.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::dispatch::{self, Router};
use crate::spdy::{FrameWriter, RST_PROTOCOL_ERROR, RST_REFUSED_STREAM};
use crate::{lock, Handler, Request, SharedWriter, StreamingError};

/// The protocol this server speaks, named in `X-Stream-Protocol-Version`.
pub const PROTOCOL_V4: &str = "v4.channel.k8s.io";

/// How long the client has to open all its streams (kubelet's is 30 s too).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long, after the status, the client has to close the connection.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Resize messages buffered before the first complete one (they are a few dozen bytes).
const MAX_RESIZE_BUFFER: usize = 4096;

/// A terminal size message from the resize stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The client's streams, as the request asked for them.
pub struct Streams {
    pub stdin: Option<Stdin>,
    pub stdout: Option<OutputStream>,
    /// Absent with a terminal (stderr goes to it too).
    pub stderr: Option<OutputStream>,
    /// Terminal sizes, with a terminal.
    pub resize: Option<Resize>,
    /// Tells when the client has gone away.
    pub hangup: Hangup,
}

/// Terminal sizes the client sends.
pub struct Resize(Receiver<TerminalSize>);

impl Resize {
    /// The next size; `None` once the client closed the stream or went away.
    pub fn next_size(&self) -> Option<TerminalSize> {
        self.0.recv().ok()
    }
}

/// Set once the client's connection has ended.
#[derive(Clone, Default)]
pub struct Hangup(Arc<AtomicBool>);

impl Hangup {
    pub fn happened(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the client writes to stdin, chunk by chunk.
pub struct Stdin(Receiver<Vec<u8>>);

impl Stdin {
    /// The next chunk; `None` once the client closed stdin or went away.
    pub fn next_chunk(&self) -> Option<Vec<u8>> {
        self.0.recv().ok()
    }
}

/// stdout or stderr toward the client.
#[derive(Clone)]
pub struct OutputStream {
    writer: SharedWriter,
    stream_id: u32,
    closed: Arc<AtomicBool>,
}

impl OutputStream {
    pub fn write(&self, data: &[u8]) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"));
        }
        lock(&self.writer).data(self.stream_id, data, false)
    }

    /// Half-closes the stream: the client sees its end. Idempotent.
    pub fn close(&self) -> io::Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        lock(&self.writer).data(self.stream_id, &[], true)
    }
}

/// A stream the client opened, as the frame reader reports it to the session.
struct Opened {
    kind: String,
    stream_id: u32,
    stdin: Option<Receiver<Vec<u8>>>,
    resize: Option<Receiver<TerminalSize>>,
}

/// Where the reader sends a stream's data.
enum Route {
    Stdin(Sender<Vec<u8>>),
    Resize(Sender<TerminalSize>, Vec<u8>),
}

/// Runs one session on `conn` (already upgraded) for `request`.
pub fn serve(
    conn: TcpStream,
    request: Request,
    handler: &dyn Handler,
) -> Result<(), StreamingError> {
    let writer: SharedWriter = Arc::new(Mutex::new(FrameWriter::new(conn.try_clone()?)));
    let (opened_tx, opened_rx) = mpsc::channel();
    let hangup = Hangup::default();
    let reader = {
        let conn = conn.try_clone()?;
        let writer = Arc::clone(&writer);
        let hangup = hangup.clone();
        std::thread::Builder::new()
            .name("spdy-reader".into())
            .spawn(move || {
                let mut channels = Channels {
                    writer: &writer,
                    opened: &opened_tx,
                    routes: HashMap::new(),
                };
                dispatch::read_frames(conn, &writer, &mut channels, "streaming connection");
                // Dropping the routes closes stdin and the resize channel before the hangup shows.
                drop(channels);
                hangup.0.store(true, Ordering::SeqCst);
            })?
    };
    let (outcome, outputs, error_stream) = match streams_for(&request, &writer, &opened_rx, hangup)
    {
        Ok((streams, error_stream)) => {
            let outputs: Vec<OutputStream> = [&streams.stdout, &streams.stderr]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let outcome = handler.serve(request.clone(), streams);
            (outcome, outputs, Some(error_stream))
        }
        Err((message, error_stream)) => (Err(message), Vec::new(), error_stream),
    };
    for output in outputs {
        let _ = output.close();
    }
    if let Some(error_stream) = error_stream {
        let status = status_json(&outcome);
        lock(&writer).data(error_stream, status.as_bytes(), true)?;
    }
    if let Err(e) = &outcome {
        tracing::info!(container = %request.target_id, "{} failed: {e}", request.kind.name());
    }
    // The client closes the connection once it has read the status; then the reader ends.
    let deadline = Instant::now() + CLOSE_GRACE;
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = conn.shutdown(Shutdown::Both);
    let _ = reader.join();
    Ok(())
}

/// Waits for the streams `request` needs; returns them and the error stream. On failure,
/// returns why and the error stream, if it was opened, to report it on.
fn streams_for(
    request: &Request,
    writer: &SharedWriter,
    opened: &Receiver<Opened>,
    hangup: Hangup,
) -> Result<(Streams, u32), (String, Option<u32>)> {
    let mut wanted: Vec<&str> = vec!["error"];
    if request.stdin {
        wanted.push("stdin");
    }
    if request.stdout {
        wanted.push("stdout");
    }
    if request.stderr && !request.tty {
        wanted.push("stderr");
    }
    if request.tty {
        wanted.push("resize");
    }
    let mut streams = Streams {
        stdin: None,
        stdout: None,
        stderr: None,
        resize: None,
        hangup,
    };
    let mut error_stream = None;
    let deadline = Instant::now() + STREAM_CREATION_TIMEOUT;
    while !wanted.is_empty() {
        let stream = match opened.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(stream) => stream,
            Err(RecvTimeoutError::Timeout) => {
                let message = format!("timed out waiting for the client's streams {wanted:?}");
                return Err((message, error_stream));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(("the client went away".to_owned(), error_stream));
            }
        };
        wanted.retain(|kind| *kind != stream.kind);
        let output = || OutputStream {
            writer: Arc::clone(writer),
            stream_id: stream.stream_id,
            closed: Arc::new(AtomicBool::new(false)),
        };
        match stream.kind.as_str() {
            "error" => error_stream = Some(stream.stream_id),
            "stdin" => streams.stdin = stream.stdin.map(Stdin),
            "stdout" => streams.stdout = Some(output()),
            "stderr" => streams.stderr = Some(output()),
            "resize" => streams.resize = stream.resize.map(Resize),
            _ => {}
        }
    }
    let error_stream = error_stream.expect("the error stream was wanted");
    Ok((streams, error_stream))
}

/// The session's routing: answers stream openings, tells the session of each, and routes
/// stdin and resize data.
struct Channels<'a> {
    writer: &'a SharedWriter,
    opened: &'a Sender<Opened>,
    routes: HashMap<u32, Route>,
}

impl Router for Channels<'_> {
    fn on_stream(&mut self, stream_id: u32, headers: &[(String, String)]) -> io::Result<()> {
        let kind = headers
            .iter()
            .find(|(name, _)| name == "streamtype")
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        if !["error", "stdin", "stdout", "stderr", "resize"].contains(&kind.as_str()) {
            return lock(self.writer).rst_stream(stream_id, RST_REFUSED_STREAM);
        }
        let mut stream = Opened {
            kind,
            stream_id,
            stdin: None,
            resize: None,
        };
        match stream.kind.as_str() {
            "stdin" => {
                let (tx, rx) = mpsc::channel();
                self.routes.insert(stream_id, Route::Stdin(tx));
                stream.stdin = Some(rx);
            }
            "resize" => {
                let (tx, rx) = mpsc::channel();
                self.routes.insert(stream_id, Route::Resize(tx, Vec::new()));
                stream.resize = Some(rx);
            }
            _ => {}
        }
        let replied = lock(self.writer).syn_reply(stream_id);
        let _ = self.opened.send(stream);
        replied
    }

    fn on_data(&mut self, stream_id: u32, data: Vec<u8>) -> io::Result<()> {
        let broken = match self.routes.get_mut(&stream_id) {
            Some(Route::Stdin(tx)) => {
                let _ = tx.send(data);
                false
            }
            Some(Route::Resize(tx, buffer)) => {
                buffer.extend_from_slice(&data);
                !forward_sizes(buffer, tx)
            }
            None => false,
        };
        if broken {
            self.routes.remove(&stream_id);
            return lock(self.writer).rst_stream(stream_id, RST_PROTOCOL_ERROR);
        }
        Ok(())
    }

    fn on_fin(&mut self, stream_id: u32) {
        self.routes.remove(&stream_id);
    }

    fn on_reset(&mut self, stream_id: u32) {
        self.routes.remove(&stream_id);
    }
}

/// Sends every complete size message in `buffer` and keeps the rest; false on garbage.
fn forward_sizes(buffer: &mut Vec<u8>, sizes: &Sender<TerminalSize>) -> bool {
    let mut messages = serde_json::Deserializer::from_slice(buffer).into_iter::<TerminalSize>();
    let mut consumed = 0;
    loop {
        match messages.next() {
            Some(Ok(size)) => {
                consumed = messages.byte_offset();
                let _ = sizes.send(size);
            }
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(_)) => return false,
            None => {
                consumed = buffer.len();
                break;
            }
        }
    }
    buffer.drain(..consumed);
    buffer.len() <= MAX_RESIZE_BUFFER
}

/// The final status, as kubelet writes it (a `metav1.Status`).
fn status_json(outcome: &Result<i32, String>) -> String {
    let status = match outcome {
        Ok(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Ok(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Err(message) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "code": 500,
        }),
    };
    status.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_read_across_data_frames_and_garbage_breaks_the_stream() {
        let (tx, rx) = mpsc::channel();
        let mut buffer = br#"{"Width":80,"Height":24}{"Width":1"#.to_vec();
        assert!(forward_sizes(&mut buffer, &tx));
        assert_eq!(
            rx.try_recv().unwrap(),
            TerminalSize {
                width: 80,
                height: 24
            }
        );
        assert!(rx.try_recv().is_err());
        buffer.extend_from_slice(br#"20,"Height":50}"#);
        assert!(forward_sizes(&mut buffer, &tx));
        assert_eq!(rx.try_recv().unwrap().width, 120);
        assert!(buffer.is_empty());
        let mut garbage = b"not json".to_vec();
        assert!(!forward_sizes(&mut garbage, &tx));
    }

    #[test]
    fn statuses_are_what_client_go_decodes() {
        let ok: serde_json::Value = serde_json::from_str(&status_json(&Ok(0))).unwrap();
        assert_eq!(ok["status"], "Success");
        let exit: serde_json::Value = serde_json::from_str(&status_json(&Ok(3))).unwrap();
        assert_eq!(exit["reason"], "NonZeroExitCode");
        assert_eq!(exit["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(exit["details"]["causes"][0]["message"], "3");
        let failed: serde_json::Value =
            serde_json::from_str(&status_json(&Err("no such container".into()))).unwrap();
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["message"], "no such container");
    }
}
