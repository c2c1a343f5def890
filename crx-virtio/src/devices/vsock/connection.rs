//! One vsock stream between a guest port and a host Unix socket: its state (waiting for the
//! guest to accept, or established), both directions' credit accounting, the guest data still
//! owed to the host socket, which control packets the guest is owed, and the socket I/O that
//! moves payloads straight between guest memory and the host socket.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;
use vm_memory::GuestMemoryMmap;

use super::packet::{Header, Op, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::device::Malformed;
use crate::iovec::Segments;

/// How many bytes of guest data each connection may hold for a slow host socket: the buffer
/// space (`buf_alloc`) advertised to the guest.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// The guest is told about freed buffer space once this much was forwarded since it last heard.
const CREDIT_UPDATE_STEP: u32 = 64 * 1024;

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A host process asked for it; the guest has not answered the REQUEST yet.
    HostConnecting,
    /// Both ends accepted: data flows.
    Established,
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Malformed(#[from] Malformed),
    #[error("host socket: {0}")]
    Host(#[source] io::Error),
    #[error("the guest sent {sent} bytes with only {room} bytes of credit left")]
    Overrun { sent: u64, room: u64 },
    #[error("{0:?} is not valid in state {1:?}")]
    Unexpected(Op, State),
}

/// Control packets the guest is owed, sent ahead of or between data.
#[derive(Debug, Default)]
struct Owed {
    request: bool,
    response: bool,
    shutdown_flags: u32,
    credit_update: bool,
}

/// What the connection put into one rx buffer.
pub enum RxPacket {
    /// A packet (its payload, if any, already in the buffer).
    Sent(Header),
    /// The host closed its socket entirely: this SHUTDOWN is the last packet; the guest gets RST
    /// next and the connection is dropped.
    Closed(Header),
}

/// A stream between `peer_port` in the guest and `local_port` on the host.
pub struct Connection {
    pub stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    state: State,
    /// The events the stream is registered for in the event loop (empty: not registered).
    pub registered: EventSet,
    /// Queued in the muxer's list of connections with something for the rx queue.
    pub in_rx_list: bool,

    /// Guest bytes written to the host socket (what the guest knows as our `fwd_cnt`).
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard.
    fwd_cnt_told: u32,
    /// Bytes owed to the host socket, in order; the first `reply_bytes` are the `OK` line of a
    /// host-initiated connection, not guest data.
    to_host: VecDeque<u8>,
    reply_bytes: usize,

    /// The guest's receive buffer and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    tx_cnt: u32,

    owed: Owed,
    /// The host socket may have data (or EOF) to read.
    host_readable: bool,
    /// The host socket reached EOF.
    host_eof: bool,
    /// The write side of the host socket was shut down after the guest's SHUTDOWN(SEND).
    host_write_shut: bool,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Connection {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            registered: EventSet::empty(),
            in_rx_list: false,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            to_host: VecDeque::new(),
            reply_bytes: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            owed: Owed::default(),
            host_readable: false,
            host_eof: false,
            host_write_shut: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
        }
    }

    /// The guest asked for this connection (REQUEST) and the host socket accepted: the guest is
    /// owed a RESPONSE.
    pub fn guest_initiated(stream: UnixStream, request: &Header) -> Connection {
        let mut conn = Connection::new(
            stream,
            request.dst_port,
            request.src_port,
            State::Established,
        );
        conn.update_peer_credit(request);
        conn.owed.response = true;
        conn.host_readable = true;
        conn
    }

    /// A host process asked for the guest's `peer_port`: the guest is owed a REQUEST.
    pub fn host_initiated(stream: UnixStream, local_port: u32, peer_port: u32) -> Connection {
        let mut conn = Connection::new(stream, local_port, peer_port, State::HostConnecting);
        conn.owed.request = true;
        conn
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Every packet from the guest carries its current receive buffer state.
    pub fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// How many more payload bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The guest accepted a host-initiated connection: the host process gets `OK <port>\n`.
    pub fn on_response(&mut self) -> Result<(), ConnError> {
        if self.state != State::HostConnecting {
            return Err(ConnError::Unexpected(Op::Response, self.state));
        }
        self.state = State::Established;
        let reply = format!("OK {}\n", self.local_port);
        self.reply_bytes = reply.len();
        self.to_host.extend(reply.as_bytes());
        self.host_readable = true;
        Ok(())
    }

    /// Guest bytes held for the host socket, not yet written to it.
    pub fn undelivered(&self) -> usize {
        self.to_host.len() - self.reply_bytes
    }

    /// The guest asked for our buffer state.
    pub fn on_credit_request(&mut self) {
        self.owed.credit_update = true;
    }

    /// The guest shut down one or both directions.
    pub fn on_guest_shutdown(&mut self, flags: u32) {
        self.guest_shut_send |= flags & SHUTDOWN_SEND != 0;
        self.guest_shut_rcv |= flags & SHUTDOWN_RCV != 0;
    }

    /// The guest will neither send nor receive and all it sent reached the host: the connection
    /// is over (the guest is owed RST).
    pub fn guest_finished(&self) -> bool {
        self.guest_shut_send && self.guest_shut_rcv && self.to_host.is_empty()
    }

    /// Passes the guest's SHUTDOWN(SEND) on to the host socket once all guest data reached it.
    pub fn propagate_guest_shutdown(&mut self) -> Result<(), ConnError> {
        if self.guest_shut_send && self.to_host.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            match self.stream.shutdown(std::net::Shutdown::Write) {
                Ok(()) => {}
                // The host process is already gone; reading will tell.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(ConnError::Host(e)),
            }
        }
        Ok(())
    }

    /// An RW packet: writes `payload` to the host socket straight from guest memory; what the
    /// socket does not take now is kept (the guest may only send as much as its credit allows).
    pub fn send_to_host(
        &mut self,
        mem: &GuestMemoryMmap,
        payload: &Segments,
    ) -> Result<(), ConnError> {
        if self.state != State::Established {
            return Err(ConnError::Unexpected(Op::Rw, self.state));
        }
        let len = payload.len();
        let held = self.undelivered() as u64;
        let room = u64::from(CONN_BUF_ALLOC).saturating_sub(held);
        if len > room {
            return Err(ConnError::Overrun { sent: len, room });
        }
        let mut written = 0;
        if self.to_host.is_empty() && len > 0 {
            let iovecs = payload.iovecs(mem, false)?;
            written = match send_iovecs(&self.stream, &iovecs) {
                Ok(n) => n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(ConnError::Host(e)),
            };
            self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        }
        if written < len {
            let mut rest = payload.clone();
            rest.split_front(written);
            let mut copy = vec![0u8; rest.len() as usize];
            rest.read_into(mem, &mut copy)?;
            self.to_host.extend(copy);
        }
        Ok(())
    }

    /// Writes what is held for the host socket, as far as it takes it.
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        while !self.to_host.is_empty() {
            let (front, back) = self.to_host.as_slices();
            let iovecs = [front, back].map(|part| libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            });
            let n = match send_iovecs(&self.stream, &iovecs) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(ConnError::Host(e)),
            };
            self.to_host.drain(..n);
            let reply = n.min(self.reply_bytes);
            self.reply_bytes -= reply;
            self.fwd_cnt = self.fwd_cnt.wrapping_add((n - reply) as u32);
        }
        Ok(())
    }

    /// The event loop saw the host socket ready (`IN`, `OUT`, hang-up or error).
    pub fn on_host_event(&mut self, events: EventSet) -> Result<(), ConnError> {
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
            && self.state == State::Established
        {
            self.host_readable = true;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.flush_to_host()?;
        }
        Ok(())
    }

    /// The events the host socket must be watched for now. Reading waits while the connection is
    /// known readable (it is in the rx list until a read finds the socket empty), so a socket
    /// the guest cannot take data from (no rx buffers, no credit) does not wake the loop.
    pub fn interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.state == State::Established
            && !self.host_readable
            && !self.host_eof
            && !self.guest_shut_rcv
        {
            events |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
    }

    fn owes_credit_update(&self) -> bool {
        self.owed.credit_update
            || self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= CREDIT_UPDATE_STEP
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_rx_work(&self) -> bool {
        self.owed.request
            || self.owed.response
            || self.owed.shutdown_flags != 0
            || self.owes_credit_update()
            || self.can_send_data()
    }

    /// A header from this connection with our current buffer state.
    fn header(&mut self, guest_cid: u64, op: Op) -> Header {
        let mut header = Header::to_guest(guest_cid, self.local_port, self.peer_port, op);
        header.buf_alloc = CONN_BUF_ALLOC;
        header.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_told = self.fwd_cnt;
        self.owed.credit_update = false;
        header
    }

    /// Produces the next packet for the guest into `payload_space` (the rx buffer after the
    /// header): a control packet, or data read from the host socket straight into guest memory.
    /// None if there is nothing to send after all (the socket had no data).
    pub fn next_rx_packet(
        &mut self,
        guest_cid: u64,
        mem: &GuestMemoryMmap,
        mut payload_space: Segments,
    ) -> Result<Option<RxPacket>, ConnError> {
        if self.owed.request {
            self.owed.request = false;
            return Ok(Some(RxPacket::Sent(self.header(guest_cid, Op::Request))));
        }
        if self.owed.response {
            self.owed.response = false;
            return Ok(Some(RxPacket::Sent(self.header(guest_cid, Op::Response))));
        }
        if self.can_send_data() {
            let max = u64::from(self.peer_credit().min(super::packet::MAX_PAYLOAD));
            payload_space.truncate(max);
            let wanted = payload_space.len();
            if wanted > 0 {
                let iovecs = payload_space.iovecs(mem, true)?;
                match read_iovecs(&self.stream, &iovecs) {
                    Ok(0) => {
                        tracing::debug!(
                            "vsock: host EOF on {}:{} (asked for {wanted} bytes)",
                            self.local_port,
                            self.peer_port
                        );
                        self.host_eof = true;
                        self.host_readable = false;
                        if peer_closed_entirely(&self.stream) {
                            let mut header = self.header(guest_cid, Op::Shutdown);
                            header.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                            return Ok(Some(RxPacket::Closed(header)));
                        }
                        self.owed.shutdown_flags |= SHUTDOWN_SEND;
                    }
                    Ok(n) => {
                        if (n as u64) < wanted {
                            self.host_readable = false;
                        }
                        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                        let mut header = self.header(guest_cid, Op::Rw);
                        header.len = n as u32;
                        return Ok(Some(RxPacket::Sent(header)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_readable = false,
                    Err(e) => return Err(ConnError::Host(e)),
                }
            }
        }
        if self.owed.shutdown_flags != 0 {
            let mut header = self.header(guest_cid, Op::Shutdown);
            header.flags = std::mem::take(&mut self.owed.shutdown_flags);
            return Ok(Some(RxPacket::Sent(header)));
        }
        if self.owes_credit_update() {
            return Ok(Some(RxPacket::Sent(
                self.header(guest_cid, Op::CreditUpdate),
            )));
        }
        Ok(None)
    }
}

/// sendmsg(2) of `iovecs` without blocking and without SIGPIPE if the peer is gone.
fn send_iovecs(stream: &UnixStream, iovecs: &[libc::iovec]) -> io::Result<usize> {
    let count = iovecs.len().min(libc::UIO_MAXIOV as usize);
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iovecs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = count;
    loop {
        // SAFETY: the iovecs point to `count` buffers that stay valid for the call (guest memory
        // checked by `Segments::iovecs`, or our own buffer); the socket is ours.
        let n = unsafe {
            libc::sendmsg(
                stream.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// readv(2) into `iovecs`.
fn read_iovecs(stream: &UnixStream, iovecs: &[libc::iovec]) -> io::Result<usize> {
    let count = iovecs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    loop {
        // SAFETY: the iovecs point into guest memory checked writable for their lengths; the
        // socket is ours and non-blocking.
        let n = unsafe { libc::readv(stream.as_raw_fd(), iovecs.as_ptr(), count) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// After EOF: did the host process close the socket (or shut both directions), rather than only
/// shut down its write side? (A Unix socket then reports POLLHUP.)
fn peer_closed_entirely(stream: &UnixStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut poll, 1, 0) };
    n == 1 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vm_memory::{Bytes, GuestAddress};

    use crate::iovec::Segment;

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn segments(addr: u64, len: u32) -> Segments {
        [Segment {
            addr: GuestAddress(addr),
            len,
        }]
        .into_iter()
        .collect()
    }

    fn request(buf_alloc: u32) -> Header {
        let mut h = Header::to_guest(3, 1234, 5000, Op::Request);
        // As the guest sends it: from the guest's port 1234 to host port 5000.
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port) = (3, 2, 1234, 5000);
        h.buf_alloc = buf_alloc;
        h
    }

    fn next(conn: &mut Connection, mem: &GuestMemoryMmap) -> Header {
        match conn.next_rx_packet(3, mem, segments(0x8000, 4096)).unwrap() {
            Some(RxPacket::Sent(h)) | Some(RxPacket::Closed(h)) => h,
            None => panic!("no packet"),
        }
    }

    #[test]
    fn guest_request_is_answered_then_host_data_respects_the_guests_credit() {
        let mem = guest_memory();
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = Connection::guest_initiated(ours, &request(100));
        let response = next(&mut conn, &mem);
        assert_eq!(response.operation(), Some(Op::Response));
        assert_eq!((response.src_port, response.dst_port), (5000, 1234));
        assert_eq!(response.buf_alloc, CONN_BUF_ALLOC);

        std::io::Write::write_all(&mut host, &[9u8; 300]).unwrap();
        let data = next(&mut conn, &mem);
        assert_eq!(data.operation(), Some(Op::Rw));
        assert_eq!(data.len, 100, "only as much as the guest's buf_alloc");
        assert_eq!(conn.peer_credit(), 0);
        assert!(!conn.has_rx_work(), "no credit, nothing else owed");
        let mut update = request(100);
        update.fwd_cnt = 100;
        conn.update_peer_credit(&update);
        assert!(conn.has_rx_work());
        assert_eq!(next(&mut conn, &mem).len, 100);
    }

    #[test]
    fn host_half_close_is_shutdown_send_and_full_close_ends_the_connection() {
        let mem = guest_memory();
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = Connection::guest_initiated(ours, &request(4096));
        next(&mut conn, &mem);
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let shutdown = next(&mut conn, &mem);
        assert_eq!(shutdown.operation(), Some(Op::Shutdown));
        assert_eq!(shutdown.flags, SHUTDOWN_SEND);

        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = Connection::guest_initiated(ours, &request(4096));
        next(&mut conn, &mem);
        drop(host);
        match conn.next_rx_packet(3, &mem, segments(0x8000, 4096)) {
            Ok(Some(RxPacket::Closed(h))) => assert_eq!(h.flags, SHUTDOWN_RCV | SHUTDOWN_SEND),
            _ => panic!("expected the closing SHUTDOWN"),
        }
    }

    #[test]
    fn guest_data_the_host_cannot_take_is_held_within_the_credit_and_counted_when_forwarded() {
        let mem = guest_memory();
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = Connection::host_initiated(ours, 1 << 30, 5000);
        assert_eq!(next(&mut conn, &mem).operation(), Some(Op::Request));
        let early = conn.send_to_host(&mem, &segments(0, 10));
        assert!(matches!(early, Err(ConnError::Unexpected(Op::Rw, _))));
        conn.on_response().unwrap();
        conn.flush_to_host().unwrap();
        let mut ok = [0u8; 14];
        host.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, format!("OK {}\n", 1u32 << 30).as_bytes());

        // Fill the host socket until it would block, then the rest is held.
        mem.write_slice(&[5u8; 65536], GuestAddress(0)).unwrap();
        let mut sent = 0u64;
        while conn.to_host.is_empty() {
            conn.send_to_host(&mem, &segments(0, 65536)).unwrap();
            sent += 65536;
        }
        let held = conn.to_host.len() as u64;
        assert_eq!(u64::from(conn.fwd_cnt), sent - held);
        let overrun = conn.send_to_host(&mem, &segments(0, CONN_BUF_ALLOC));
        assert!(matches!(overrun, Err(ConnError::Overrun { .. })));
        assert!(conn.interest().contains(EventSet::OUT));

        let mut drained = vec![0u8; sent as usize];
        let reader = std::thread::spawn(move || {
            host.read_exact(&mut drained).unwrap();
            drained
        });
        while !conn.to_host.is_empty() {
            conn.flush_to_host().unwrap();
        }
        assert!(reader.join().unwrap().iter().all(|&b| b == 5));
        assert_eq!(u64::from(conn.fwd_cnt), sent);
        assert!(conn.owes_credit_update());
        let update = next(&mut conn, &mem);
        assert_eq!(update.operation(), Some(Op::CreditUpdate));
        assert_eq!(u64::from(update.fwd_cnt), sent);
    }
}
