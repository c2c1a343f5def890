//! The listener: issues one-time URLs (`http://ADDR/exec/TOKEN`, valid for a minute, as
//! kubelet's are), and serves each connection: the HTTP upgrade to SPDY/3.1 with the
//! `v4.channel.k8s.io` protocol (exec, attach) or `portforward.k8s.io`, then the session on its
//! own thread.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::portforward::{self, PROTOCOL_PORT_FORWARD};
use crate::remotecommand::{self, PROTOCOL_V4};
use crate::{Handler, Request, RequestKind, StreamingError};

/// How long a URL stays valid.
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// The largest HTTP request head accepted.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// How long a client has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The streaming server; cheap to share.
pub struct StreamingServer {
    address: SocketAddr,
    pending: Mutex<HashMap<String, (Request, Instant)>>,
    handler: Arc<dyn Handler>,
}

impl StreamingServer {
    /// Listens on `address` (port 0: any free one) and serves on a thread of its own.
    pub fn start(
        address: SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> Result<Arc<StreamingServer>, StreamingError> {
        let listener = TcpListener::bind(address)?;
        let server = Arc::new(StreamingServer {
            address: listener.local_addr()?,
            pending: Mutex::new(HashMap::new()),
            handler,
        });
        let serving = Arc::clone(&server);
        std::thread::Builder::new()
            .name("streaming".into())
            .spawn(move || serving.accept(listener))?;
        tracing::info!(address = %server.address, "streaming server listening");
        Ok(server)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A one-time URL for `request`.
    pub fn url(&self, request: Request) -> Result<String, StreamingError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| StreamingError::Random(e.to_string()))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let url = format!("http://{}/{}/{token}", self.address, request.kind.name());
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, (_, issued)| issued.elapsed() < TOKEN_TTL);
        pending.insert(token, (request, Instant::now()));
        Ok(url)
    }

    /// Takes the request a path's token was issued for, once.
    fn redeem(&self, path: &str) -> Option<Request> {
        let (kind, token) = path.trim_start_matches('/').split_once('/')?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (request, issued) = pending.remove(token)?;
        (issued.elapsed() < TOKEN_TTL && request.kind.name() == kind).then_some(request)
    }

    fn accept(self: Arc<Self>, listener: TcpListener) {
        for conn in listener.incoming() {
            match conn {
                Ok(conn) => {
                    let server = Arc::clone(&self);
                    let spawned = std::thread::Builder::new()
                        .name("streaming-session".into())
                        .spawn(move || {
                            if let Err(e) = server.serve(conn) {
                                tracing::info!("streaming session: {e}");
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!("cannot start a streaming session thread: {e}");
                    }
                }
                Err(e) => tracing::warn!("streaming server: accept: {e}"),
            }
        }
    }

    fn serve(&self, mut conn: TcpStream) -> Result<(), StreamingError> {
        conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        let head = read_request_head(&mut conn)?;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        let path = match parsed.parse(&head) {
            Ok(httparse::Status::Complete(_)) => parsed.path.unwrap_or("/").to_owned(),
            _ => return respond(&mut conn, "400 Bad Request", "malformed request"),
        };
        let header = |name: &str| -> Vec<String> {
            parsed
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .flat_map(|h| {
                    String::from_utf8_lossy(h.value)
                        .split(',')
                        .map(|v| v.trim().to_owned())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let Some(request) = self.redeem(&path) else {
            return respond(
                &mut conn,
                "404 Not Found",
                "no such stream URL, or it expired",
            );
        };
        if !header("upgrade")
            .iter()
            .any(|u| u.eq_ignore_ascii_case("SPDY/3.1"))
        {
            return respond(
                &mut conn,
                "400 Bad Request",
                "this server upgrades to SPDY/3.1 only",
            );
        }
        let protocol = match request.kind {
            RequestKind::PortForward { .. } => PROTOCOL_PORT_FORWARD,
            RequestKind::Exec { .. } | RequestKind::Attach => PROTOCOL_V4,
        };
        if !header("x-stream-protocol-version")
            .iter()
            .any(|p| p == protocol)
        {
            return respond(
                &mut conn,
                "403 Forbidden",
                &format!("this URL speaks the {protocol} protocol only"),
            );
        }
        conn.write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n"
            )
            .as_bytes(),
        )?;
        conn.set_read_timeout(None)?;
        conn.set_nodelay(true)?;
        tracing::debug!(target = %request.target_id, "{} session", request.kind.name());
        match &request.kind {
            RequestKind::PortForward { ports } => {
                portforward::serve(conn, &request.target_id, ports, &self.handler)
            }
            RequestKind::Exec { .. } | RequestKind::Attach => {
                remotecommand::serve(conn, request, self.handler.as_ref())
            }
        }
    }
}

/// Reads up to the blank line ending the request head, byte by byte (nothing after it may be
/// consumed: SPDY frames follow on the same connection).
fn read_request_head(conn: &mut TcpStream) -> Result<Vec<u8>, StreamingError> {
    let mut head = Vec::with_capacity(1024);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_HEAD {
            return Err(StreamingError::Protocol(
                "the request head is larger than 16 KiB".to_owned(),
            ));
        }
        if conn.read(&mut byte)? == 0 {
            return Err(StreamingError::Protocol(
                "the client closed before its request head ended".to_owned(),
            ));
        }
        head.push(byte[0]);
    }
    Ok(head)
}

fn respond(conn: &mut TcpStream, status: &str, body: &str) -> Result<(), StreamingError> {
    conn.write_all(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
            body.len() + 1
        )
        .as_bytes(),
    )?;
    Err(StreamingError::Protocol(format!(
        "refused a request: {status}: {body}"
    )))
}
