//! The host side of the device as Unix sockets (Firecracker's "hybrid vsock"): a listener on
//! `uds_path` where a host process asks for a guest port with `CONNECT <port>\n` (and hears
//! `OK <host_port>\n` once the guest accepts), and, for a guest connecting to host port P, a
//! connection to the Unix socket `<uds_path>_P`. The muxer owns every connection, routes guest
//! packets to them, keeps the list of connections with something for the rx queue, and keeps
//! the event loop's registrations in step with what each socket must be watched for.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events};
use vm_memory::GuestMemoryMmap;

use super::connection::{ConnError, Connection, RxPacket};
use super::packet::{Header, Op, HEADER_LEN, HOST_CID, TYPE_STREAM};
use crate::device::Malformed;
use crate::iovec::Segments;

/// The most connections (and pending `CONNECT` handshakes) at once.
const MAX_CONNECTIONS: usize = 1024;
/// The most RST packets waiting for rx buffers; more are dropped (the guest times out instead).
const MAX_QUEUED_RESETS: usize = 4096;
/// The longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Host ports handed to host-initiated connections start here (the guest sees them as the
/// connection's source port).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A connection is named by its host port and its guest port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// A host process whose `CONNECT` line is read, held back from the guest (see
/// [`Muxer::hold_host_connections`]).
struct HeldConnect {
    stream: UnixStream,
    registered: bool,
    peer_port: u32,
}

/// A host process that connected to the listener and has not finished its `CONNECT` line.
struct Handshake {
    stream: UnixStream,
    registered: bool,
    /// The part of the `CONNECT` line read so far.
    line: Vec<u8>,
}

enum FdOwner {
    Handshake,
    Connection(ConnKey),
}

/// The Unix socket side of the device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    connections: HashMap<ConnKey, Connection>,
    handshakes: HashMap<RawFd, Handshake>,
    fd_owners: HashMap<RawFd, FdOwner>,
    /// Connections that may have a packet for the guest, in the order they are served.
    rx_list: VecDeque<ConnKey>,
    /// RSTs owed to the guest for connections that no longer exist (or never did).
    resets: VecDeque<Header>,
    /// Connections whose registration may be out of date.
    dirty: Vec<ConnKey>,
    /// Sockets to take out of the event loop before they are closed.
    retired: Vec<UnixStream>,
    /// Host connections are held back from the guest (while it has not yet processed a
    /// transport reset, which would kill them silently).
    hold: bool,
    held: Vec<HeldConnect>,
    next_local_port: u32,
}

impl Muxer {
    /// Listens on `uds_path` (a stale socket there is replaced; any other file is left alone
    /// and makes the bind fail).
    pub fn new(guest_cid: u64, uds_path: &Path) -> io::Result<Muxer> {
        match std::fs::symlink_metadata(uds_path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(uds_path)?,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            connections: HashMap::new(),
            handshakes: HashMap::new(),
            fd_owners: HashMap::new(),
            rx_list: VecDeque::new(),
            resets: VecDeque::new(),
            dirty: Vec::new(),
            retired: Vec::new(),
            hold: false,
            held: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// Whether a packet may be waiting for the rx queue.
    pub fn has_rx_work(&self) -> bool {
        !self.resets.is_empty() || !self.rx_list.is_empty()
    }

    /// Acts on one packet the guest sent (the payload is still in guest memory).
    pub fn handle_guest_packet(
        &mut self,
        mem: &GuestMemoryMmap,
        header: &Header,
        payload: &Segments,
    ) -> Result<(), Malformed> {
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            tracing::debug!(
                "vsock: dropped a packet from CID {} to CID {}",
                header.src_cid,
                header.dst_cid
            );
            return Ok(());
        }
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        let op = header.operation();
        if header.socket_type != TYPE_STREAM || op.is_none() {
            if op != Some(Op::Rst) {
                self.queue_reset(key);
            }
            return Ok(());
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            match op {
                Some(Op::Request) => self.connect_to_host(header),
                Some(Op::Rst) => {}
                _ => self.queue_reset(key),
            }
            return Ok(());
        };
        conn.update_peer_credit(header);
        let result = match op {
            Some(Op::Request) => Err(ConnError::Unexpected(Op::Request, conn.state())),
            Some(Op::Response) => conn.on_response(),
            Some(Op::Rw) => conn.send_to_host(mem, payload),
            Some(Op::CreditRequest) => {
                conn.on_credit_request();
                Ok(())
            }
            Some(Op::Shutdown) => {
                tracing::debug!(
                    "vsock: the guest shut down connection {}:{} (flags {:#x}, {} bytes held)",
                    key.local_port,
                    key.peer_port,
                    header.flags,
                    conn.undelivered()
                );
                conn.on_guest_shutdown(header.flags);
                Ok(())
            }
            Some(Op::Rst) => {
                tracing::debug!(
                    "vsock: the guest reset connection {}:{} ({:?})",
                    key.local_port,
                    key.peer_port,
                    conn.state()
                );
                if conn.undelivered() > 0 {
                    tracing::warn!(
                        "vsock: the guest reset connection {}:{} with {} of its bytes not yet \
                         taken by the host socket; they are dropped",
                        key.local_port,
                        key.peer_port,
                        conn.undelivered()
                    );
                }
                self.close(key);
                return Ok(());
            }
            Some(Op::CreditUpdate) | None => Ok(()),
        };
        self.settle(key, result)
    }

    /// After anything happened to a connection: resets it on error, ends it when the guest is
    /// done with it, passes a guest shutdown on to the host, and reschedules it.
    fn settle(&mut self, key: ConnKey, result: Result<(), ConnError>) -> Result<(), Malformed> {
        let Some(conn) = self.connections.get_mut(&key) else {
            return Ok(());
        };
        match result.and_then(|()| conn.propagate_guest_shutdown()) {
            Err(ConnError::Malformed(m)) => {
                self.reset(key);
                return Err(m);
            }
            Err(e) => {
                // Worth seeing (a lost stream shows up here), and at most once per connection.
                tracing::warn!(
                    "vsock: connection {}:{} reset: {e}",
                    key.local_port,
                    key.peer_port
                );
                self.reset(key);
                return Ok(());
            }
            Ok(()) if conn.guest_finished() => {
                self.reset(key);
                return Ok(());
            }
            Ok(()) => {}
        }
        if conn.has_rx_work() && !conn.in_rx_list {
            conn.in_rx_list = true;
            self.rx_list.push_back(key);
        }
        self.dirty.push(key);
        Ok(())
    }

    /// A guest REQUEST for host port P: connect to `<uds_path>_P`; RST if that fails.
    fn connect_to_host(&mut self, request: &Header) {
        let key = ConnKey {
            local_port: request.dst_port,
            peer_port: request.src_port,
        };
        if self.connections.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing another");
            self.queue_reset(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", request.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                self.fd_owners
                    .insert(stream.as_raw_fd(), FdOwner::Connection(key));
                self.connections
                    .insert(key, Connection::guest_initiated(stream, request));
                // Settling a fresh connection cannot fail.
                let _ = self.settle(key, Ok(()));
            }
            Err(e) => {
                tracing::debug!(
                    "vsock: guest port {} cannot reach {}: {e}",
                    request.src_port,
                    Path::new(&path).display()
                );
                self.queue_reset(key);
            }
        }
    }

    /// Ends a connection and owes the guest an RST for it.
    fn reset(&mut self, key: ConnKey) {
        self.close(key);
        self.queue_reset(key);
    }

    /// Forgets a connection; its socket is closed once it is out of the event loop.
    fn close(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.remove(&key) {
            self.fd_owners.remove(&conn.stream.as_raw_fd());
            if conn.registered.is_empty() {
                drop(conn);
            } else {
                self.retired.push(conn.stream);
            }
        }
    }

    fn queue_reset(&mut self, key: ConnKey) {
        if self.resets.len() >= MAX_QUEUED_RESETS {
            tracing::warn!("vsock: too many RSTs waiting for rx buffers; dropping one");
            return;
        }
        self.resets.push_back(Header::to_guest(
            self.guest_cid,
            key.local_port,
            key.peer_port,
            Op::Rst,
        ));
    }

    /// Fills one rx buffer (`writable`, the chain's device-writable part) with the next packet
    /// for the guest. Returns the bytes written, or None if there was nothing to send.
    pub fn fill_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        mut writable: Segments,
    ) -> Result<Option<u32>, Malformed> {
        let header_space = writable
            .split_front(HEADER_LEN as u64)
            .ok_or_else(|| Malformed::new("vsock rx buffer shorter than the packet header"))?;
        if let Some(reset) = self.resets.pop_front() {
            header_space.write_from(mem, &reset.encode())?;
            return Ok(Some(HEADER_LEN as u32));
        }
        // Each listed connection gets one chance; one that cannot use this buffer is relisted.
        for _ in 0..self.rx_list.len() {
            let Some(key) = self.rx_list.pop_front() else {
                break;
            };
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            conn.in_rx_list = false;
            let packet = conn.next_rx_packet(self.guest_cid, mem, writable.clone());
            let header = match packet {
                Ok(Some(RxPacket::Sent(header))) => {
                    self.settle(key, Ok(()))?;
                    header
                }
                Ok(Some(RxPacket::Closed(header))) => {
                    self.reset(key);
                    header
                }
                Ok(None) => {
                    self.settle(key, Ok(()))?;
                    continue;
                }
                Err(e) => {
                    self.settle(key, Err(e))?;
                    continue;
                }
            };
            header_space.write_from(mem, &header.encode())?;
            return Ok(Some(HEADER_LEN as u32 + header.len));
        }
        Ok(None)
    }

    /// Serves a ready fd: the listener, a handshake, or a connection's socket.
    pub fn handle_event(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept();
            return;
        }
        match self.fd_owners.get(&fd) {
            Some(FdOwner::Handshake) => self.read_connect_line(fd),
            Some(FdOwner::Connection(key)) => {
                let key = *key;
                if let Some(conn) = self.connections.get_mut(&key) {
                    let result = conn.on_host_event(events);
                    // Only guest memory errors are Malformed, and no guest memory is involved.
                    let _ = self.settle(key, result);
                }
            }
            None => tracing::debug!("vsock: event on unknown fd {fd}"),
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.connections.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                        tracing::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("vsock: cannot make a host connection non-blocking: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.fd_owners.insert(fd, FdOwner::Handshake);
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            registered: false,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line a byte at a time, so no data after it is consumed;
    /// once complete, the host process's socket becomes a connection and the guest is sent a
    /// REQUEST.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match handshake.stream.read(&mut byte) {
                Ok(0) => return self.drop_handshake(fd, "closed before its CONNECT line"),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if handshake.line.len() == MAX_CONNECT_LINE => {
                    return self.drop_handshake(fd, "no CONNECT line")
                }
                Ok(_) => handshake.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.drop_handshake(fd, &format!("{e}")),
            }
        }
        let line = std::mem::take(&mut handshake.line);
        let Some(peer_port) = parse_connect_line(&line) else {
            let shown = String::from_utf8_lossy(&line).trim_end().to_owned();
            return self.drop_handshake(fd, &format!("bad request {shown:?}"));
        };
        let Some(handshake) = self.handshakes.remove(&fd) else {
            return;
        };
        if self.hold {
            self.fd_owners.remove(&fd);
            self.held.push(HeldConnect {
                stream: handshake.stream,
                registered: handshake.registered,
                peer_port,
            });
            return;
        }
        self.open_host_connection(handshake.stream, handshake.registered, peer_port);
    }

    /// Holds host connections back from the guest (their `CONNECT` lines are read, the guest
    /// is sent nothing) until released with `false`, when each gets its REQUEST. A restored
    /// device holds them until the guest has processed its transport reset: Linux resets every
    /// connected socket then without telling the peer, so a connection the guest accepted just
    /// before would hang on the host side for good.
    pub fn hold_host_connections(&mut self, hold: bool) {
        self.hold = hold;
        if hold {
            return;
        }
        for held in std::mem::take(&mut self.held) {
            self.open_host_connection(held.stream, held.registered, held.peer_port);
        }
    }

    /// The host process's socket becomes a connection, and the guest is sent a REQUEST.
    fn open_host_connection(&mut self, stream: UnixStream, registered: bool, peer_port: u32) {
        let fd = stream.as_raw_fd();
        let local_port = self.free_local_port(peer_port);
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let mut conn = Connection::host_initiated(stream, local_port, peer_port);
        conn.registered = if registered {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        self.fd_owners.insert(fd, FdOwner::Connection(key));
        self.connections.insert(key, conn);
        let _ = self.settle(key, Ok(()));
    }

    fn drop_handshake(&mut self, fd: RawFd, why: &str) {
        tracing::debug!("vsock: host connection dropped: {why}");
        self.fd_owners.remove(&fd);
        if let Some(handshake) = self.handshakes.remove(&fd) {
            if handshake.registered {
                self.retired.push(handshake.stream);
            }
        }
    }

    fn free_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.connections.contains_key(&key) {
                return port;
            }
        }
    }

    /// Registers the listener (called once, from the device's `init_events`).
    pub fn init_events(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!(
                "vsock: cannot watch the listener {}: {e}",
                self.uds_path.display()
            );
        }
    }

    /// Brings the event loop's registrations in line with what each socket must be watched for,
    /// and closes the sockets of ended connections.
    pub fn sync_events(&mut self, ops: &mut EventOps) {
        for stream in self.retired.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&stream)) {
                tracing::warn!("vsock: cannot unwatch a closed connection: {e}");
            }
        }
        // Nothing is read from a held socket (a hang-up would wake the loop again and again).
        for held in self.held.iter_mut().filter(|h| h.registered) {
            match ops.remove(Events::empty(&held.stream)) {
                Ok(()) => held.registered = false,
                Err(e) => tracing::warn!("vsock: cannot unwatch a held host connection: {e}"),
            }
        }
        for handshake in self.handshakes.values_mut().filter(|h| !h.registered) {
            match ops.add(Events::new(&handshake.stream, EventSet::IN)) {
                Ok(()) => handshake.registered = true,
                Err(e) => tracing::warn!("vsock: cannot watch a host connection: {e}"),
            }
        }
        for key in self.dirty.drain(..) {
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            let wanted = conn.interest();
            if wanted == conn.registered {
                continue;
            }
            let events = Events::new(&conn.stream, wanted);
            let result = if conn.registered.is_empty() {
                ops.add(events)
            } else if wanted.is_empty() {
                ops.remove(events)
            } else {
                ops.modify(events)
            };
            match result {
                Ok(()) => conn.registered = wanted,
                Err(e) => tracing::warn!(
                    "vsock: cannot watch connection {}:{}: {e}",
                    key.local_port,
                    key.peer_port
                ),
            }
        }
    }

    /// The device was reset: every connection and handshake ends (their sockets close at the
    /// next [`Muxer::sync_events`]); the listener stays.
    pub fn reset_all(&mut self) {
        let keys: Vec<ConnKey> = self.connections.keys().copied().collect();
        for key in keys {
            self.close(key);
        }
        let fds: Vec<RawFd> = self.handshakes.keys().copied().collect();
        for fd in fds {
            self.drop_handshake(fd, "device reset");
        }
        self.rx_list.clear();
        self.resets.clear();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// `CONNECT <port>` (the line without its newline) → the port.
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

/// Connects a non-blocking Unix stream socket to `path`. A listener with a full backlog fails
/// at once (EAGAIN) instead of stalling the event loop.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un of the given size.
    let ret = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect_line(b"CONNECT 5000"), Some(5000));
        assert_eq!(parse_connect_line(b"CONNECT 5000\r"), Some(5000));
        assert_eq!(parse_connect_line(b"CONNECT"), None);
        assert_eq!(parse_connect_line(b"connect 5000"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT 99999999999"), None);
    }

    #[test]
    fn a_missing_or_refusing_host_socket_fails_the_connect_at_once() {
        let dir = std::env::temp_dir().join(format!("crx-vsock-muxer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("missing");
        assert!(connect_nonblocking(&path).is_err());
        let listener = UnixListener::bind(&path).unwrap();
        assert!(connect_nonblocking(&path).is_ok());
        drop(listener);
        assert!(connect_nonblocking(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
