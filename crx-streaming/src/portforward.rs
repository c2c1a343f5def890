//! One port forwarding session (`portforward.k8s.io`) on an upgraded connection. For every TCP
//! connection it forwards, the client opens two streams with the same `requestID` and `port`
//! headers: `error` and `data`. Once both are open the session asks the [`Handler`] for a
//! connection to that port of the pod, and copies bytes: the data stream's frames to the pod,
//! the pod's bytes back as data frames. When the pod's side ends, the data stream is
//! half-closed and the error stream closed (carrying the reason if the forward failed), as
//! kubelet's server does; the client half-closing its data stream half-closes the pod's
//! connection, and a reset resets it. The session ends with the client's connection.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use crate::dispatch::{self, Router};
use crate::spdy::{FrameWriter, RST_REFUSED_STREAM};
use crate::{lock, Handler, PortConnection, SharedWriter, StreamingError};

/// The protocol this server speaks for port forwarding, named in `X-Stream-Protocol-Version`.
pub const PROTOCOL_PORT_FORWARD: &str = "portforward.k8s.io";

/// How much is read from the pod's side per data frame.
const CHUNK: usize = 32 * 1024;

/// What the client sent on a data stream.
enum Inbound {
    Data(Vec<u8>),
    /// The client reset the stream: the pod's connection is torn down.
    Reset,
}

/// One forwarded connection's streams, as they are opened.
#[derive(Default)]
struct Pair {
    port: Option<u16>,
    error_stream: Option<u32>,
    data_stream: Option<u32>,
}

/// Runs one session on `conn` (already upgraded) for pod sandbox `sandbox_id`; `ports`, when
/// not empty, are the only ports the client may ask for.
pub fn serve(
    conn: TcpStream,
    sandbox_id: &str,
    ports: &[u16],
    handler: &Arc<dyn Handler>,
) -> Result<(), StreamingError> {
    let writer: SharedWriter = Arc::new(std::sync::Mutex::new(FrameWriter::new(conn.try_clone()?)));
    let mut forwards = Forwards {
        writer: &writer,
        sandbox_id,
        ports,
        handler,
        pairs: HashMap::new(),
        routes: HashMap::new(),
    };
    let label = "port forwarding connection";
    dispatch::read_frames(conn.try_clone()?, &writer, &mut forwards, label);
    // The connection is gone: every forward still running sees its client reset.
    for (_, route) in forwards.routes.drain() {
        let _ = route.send(Inbound::Reset);
    }
    let _ = conn.shutdown(Shutdown::Both);
    Ok(())
}

/// The session's routing: pairs the streams by request, starts a forward per complete pair,
/// and routes each data stream's frames to its forward.
struct Forwards<'a> {
    writer: &'a SharedWriter,
    sandbox_id: &'a str,
    ports: &'a [u16],
    handler: &'a Arc<dyn Handler>,
    pairs: HashMap<String, Pair>,
    /// Each data stream's inbound bytes, for the thread forwarding it; dropping the sender is
    /// the client's half-close.
    routes: HashMap<u32, Sender<Inbound>>,
}

impl Router for Forwards<'_> {
    fn on_stream(&mut self, stream_id: u32, headers: &[(String, String)]) -> io::Result<()> {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let kind = header("streamtype").unwrap_or_default();
        if kind != "error" && kind != "data" {
            return lock(self.writer).rst_stream(stream_id, RST_REFUSED_STREAM);
        }
        // Clients older than the requestID header open error then data streams with
        // consecutive odd ids (kubelet pairs them the same way).
        let request_id = header("requestid").unwrap_or_else(|| {
            let id = if kind == "data" {
                stream_id.saturating_sub(2)
            } else {
                stream_id
            };
            id.to_string()
        });
        let pair = self.pairs.entry(request_id.clone()).or_default();
        pair.port = header("port").and_then(|p| p.parse().ok());
        if kind == "error" {
            pair.error_stream = Some(stream_id);
        } else {
            pair.data_stream = Some(stream_id);
        }
        let replied = lock(self.writer).syn_reply(stream_id);
        if let (Some(error_stream), Some(data_stream)) = (pair.error_stream, pair.data_stream) {
            let port = pair.port;
            self.pairs.remove(&request_id);
            let (tx, rx) = mpsc::channel();
            self.routes.insert(data_stream, tx);
            let forward = Forward {
                writer: Arc::clone(self.writer),
                error_stream,
                data_stream,
            };
            let port = check_port(port, self.ports);
            let (sandbox_id, handler) = (self.sandbox_id.to_owned(), Arc::clone(self.handler));
            let spawned = std::thread::Builder::new()
                .name("port-forward".into())
                .spawn(move || forward.run(&*handler, &sandbox_id, port, rx));
            if let Err(e) = spawned {
                tracing::warn!("cannot start a port forwarding thread: {e}");
                self.routes.remove(&data_stream);
            }
        }
        replied
    }

    fn on_data(&mut self, stream_id: u32, data: Vec<u8>) -> io::Result<()> {
        if let Some(route) = self.routes.get(&stream_id) {
            if !data.is_empty() {
                let _ = route.send(Inbound::Data(data));
            }
        }
        Ok(())
    }

    fn on_fin(&mut self, stream_id: u32) {
        self.routes.remove(&stream_id);
    }

    fn on_reset(&mut self, stream_id: u32) {
        if let Some(route) = self.routes.remove(&stream_id) {
            let _ = route.send(Inbound::Reset);
        }
    }
}

/// The port a pair asked for, if it may have it.
fn check_port(port: Option<u16>, allowed: &[u16]) -> Result<u16, String> {
    match port {
        None | Some(0) => Err("the streams carry no valid port header".to_owned()),
        Some(port) if !allowed.is_empty() && !allowed.contains(&port) => Err(format!(
            "port {port} was not among the ports this URL was issued for ({allowed:?})"
        )),
        Some(port) => Ok(port),
    }
}

/// One forwarded connection.
struct Forward {
    writer: SharedWriter,
    error_stream: u32,
    data_stream: u32,
}

impl Forward {
    fn run(
        self,
        handler: &dyn Handler,
        sandbox_id: &str,
        port: Result<u16, String>,
        inbound: Receiver<Inbound>,
    ) {
        let outcome = port.and_then(|port| {
            let target = handler.forward(sandbox_id, port)?;
            self.copy(target, inbound).map_err(|e| e.to_string())
        });
        let mut writer = lock(&self.writer);
        // After a clean end the data stream is half-closed already; after a failure it is not.
        if let Err(message) = &outcome {
            let message = format!("error forwarding to pod sandbox {sandbox_id}: {message}");
            tracing::info!("{message}");
            let _ = writer.data(self.data_stream, &[], true);
            let _ = writer.data(self.error_stream, message.as_bytes(), true);
        } else {
            let _ = writer.data(self.error_stream, &[], true);
        }
    }

    /// Client → pod on a thread of its own, pod → client here; returns when the pod's side
    /// has ended (the data stream is then half-closed).
    fn copy(&self, target: Box<dyn PortConnection>, inbound: Receiver<Inbound>) -> io::Result<()> {
        let mut upstream_target = target.try_clone_connection()?;
        std::thread::Builder::new()
            .name("port-forward-in".into())
            .spawn(move || {
                let how = loop {
                    match inbound.recv() {
                        Ok(Inbound::Data(data)) => {
                            if upstream_target.write_all(&data).is_err() {
                                break Shutdown::Both;
                            }
                        }
                        Ok(Inbound::Reset) => break Shutdown::Both,
                        Err(_) => break Shutdown::Write,
                    }
                };
                let _ = upstream_target.shutdown(how);
            })?;
        let mut target = target;
        let mut buffer = vec![0u8; CHUNK];
        loop {
            let n = match target.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = target.shutdown(Shutdown::Both);
                    return Err(e);
                }
            };
            if let Err(e) = lock(&self.writer).data(self.data_stream, &buffer[..n], false) {
                let _ = target.shutdown(Shutdown::Both);
                return Err(e);
            }
        }
        lock(&self.writer).data(self.data_stream, &[], true)
    }
}
