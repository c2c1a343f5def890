//! `crx-vsock`: the guest side of CRX's vsock tests and a small ops tool (AF_VSOCK streams).
//!
//! ```text
//! crx-vsock echo-server PORT COUNT        accept COUNT connections (concurrently), echo each
//!                                         until EOF; prints echo-served=COUNT
//! crx-vsock send PORT BYTES SEED          connect to the host's PORT, send a 16-byte header
//!                                         (seed, length, little endian) and BYTES pseudo-random
//!                                         bytes, shut down writing, expect the payload's sha256
//!                                         (hex) back; prints sent-sha256=, reply=match, send-ms=
//! crx-vsock send-many PORT CONNS BYTES    CONNS concurrent `send`s (seeds 1..=CONNS);
//!                                         prints send-many-ok=CONNS
//! crx-vsock send-partial PORT BYTES SENT  announce BYTES, send only SENT of them, then close
//! crx-vsock connect-fails PORT            expect connecting to the host's PORT to fail;
//!                                         prints connect-error=<errno name> connect-ms=
//! crx-vsock send-zeros PORT BYTES         throughput probe: send BYTES zero bytes (no header,
//!                                         no hashing) to the host's PORT; prints zeros-ms=
//! crx-vsock sink PORT                     throughput probe: accept one connection on PORT, read
//!                                         to EOF; prints sink-bytes=, sink-zero=yes|no, sink-ms=
//! ```
//! The payload stream is xorshift64* from the seed, 8 little-endian bytes per step; the host
//! test generates the same stream to check every byte. Exit status 1 on any failure.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use sha2::{Digest, Sha256};

/// The host's context ID.
const HOST_CID: u32 = 2;
const CHUNK: usize = 64 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["echo-server", port, count] => echo_server(number(port), number(count)),
        ["send", port, bytes, seed] => send(number(port), number(bytes), number(seed)).map(|_| ()),
        ["send-many", port, conns, bytes] => send_many(number(port), number(conns), number(bytes)),
        ["send-partial", port, bytes, sent] => {
            send_partial(number(port), number(bytes), number(sent))
        }
        ["connect-fails", port] => connect_fails(number(port)),
        ["send-zeros", port, bytes] => send_zeros(number(port), number(bytes)),
        ["sink", port] => sink(number(port)),
        _ => {
            eprintln!("usage: crx-vsock echo-server PORT COUNT | send PORT BYTES SEED | send-many PORT CONNS BYTES | send-partial PORT BYTES SENT | connect-fails PORT | send-zeros PORT BYTES | sink PORT");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("crx-vsock: {e}");
        std::process::exit(1);
    }
}

fn number<T: std::str::FromStr>(word: &str) -> T {
    word.parse().unwrap_or_else(|_| {
        eprintln!("crx-vsock: {word:?} is not a number");
        std::process::exit(2)
    })
}

/// A connected AF_VSOCK stream socket.
struct VsockStream(OwnedFd);

impl VsockStream {
    fn connect(cid: u32, port: u32) -> io::Result<VsockStream> {
        let socket = vsock_socket()?;
        let addr = vsock_addr(cid, port);
        // SAFETY: addr is a valid sockaddr_vm of the given size; the socket is ours.
        let ret = unsafe {
            libc::connect(
                socket.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockStream(socket))
    }

    fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on our socket.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for reads of its length; MSG_NOSIGNAL keeps SIGPIPE away.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: an all-zero sockaddr_vm is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn echo_server(port: u32, count: usize) -> io::Result<()> {
    let listener = listen(port)?;
    println!("echo-listening={port}");
    let mut workers = Vec::with_capacity(count);
    for _ in 0..count {
        let stream = accept(&listener)?;
        workers.push(
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || echo(stream))?,
        );
    }
    for worker in workers {
        worker
            .join()
            .map_err(|_| io::Error::other("echo thread panicked"))??;
    }
    println!("echo-served={count}");
    Ok(())
}

/// A listening AF_VSOCK socket on `port` (any CID).
fn listen(port: u32) -> io::Result<OwnedFd> {
    let listener = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm; the socket is ours.
    let bound = unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen(2) on our bound socket.
    if bound != 0 || unsafe { libc::listen(listener.as_raw_fd(), 256) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

/// Accepts one connection on `listener`.
fn accept(listener: &OwnedFd) -> io::Result<VsockStream> {
    // SAFETY: accept(2) on our listening socket, peer address not wanted.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(VsockStream(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn echo(mut stream: VsockStream) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return stream.shutdown_write();
        }
        stream.write_all(&buf[..n])?;
    }
}

/// xorshift64*: the payload generator the host test mirrors.
struct Payload(u64);

impl Payload {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let value = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            word.copy_from_slice(&value[..word.len()]);
        }
    }
}

/// Sends `bytes` of seed's payload (after the header), stopping after `stop_after` bytes.
fn send_payload(
    stream: &mut VsockStream,
    bytes: u64,
    seed: u64,
    stop_after: u64,
) -> io::Result<String> {
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&seed.to_le_bytes());
    header[8..].copy_from_slice(&bytes.to_le_bytes());
    stream.write_all(&header)?;
    let mut payload = Payload(seed);
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes.min(stop_after);
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        payload.fill(&mut buf[..n]);
        sha.update(&buf[..n]);
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(hex(&sha.finalize()))
}

fn send(port: u32, bytes: u64, seed: u64) -> io::Result<String> {
    let start = Instant::now();
    let mut stream = VsockStream::connect(HOST_CID, port)?;
    let sent = send_payload(&mut stream, bytes, seed, u64::MAX)?;
    stream.shutdown_write()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if reply.trim() != sent {
        return Err(io::Error::other(format!(
            "seed {seed}: sent sha256 {sent}, the host got {:?}",
            reply.trim()
        )));
    }
    if seed == 1 || bytes >= 1 << 20 {
        println!("sent-sha256={sent}");
        println!("reply=match");
        println!("send-ms={}", start.elapsed().as_millis());
    }
    Ok(sent)
}

fn send_many(port: u32, conns: u64, bytes: u64) -> io::Result<()> {
    let senders: Vec<_> = (1..=conns)
        .map(|seed| {
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || send(port, bytes, seed))
        })
        .collect::<io::Result<_>>()?;
    let mut failed = 0;
    for sender in senders {
        match sender.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                eprintln!("crx-vsock: {e}");
                failed += 1;
            }
            Err(_) => failed += 1,
        }
    }
    if failed > 0 {
        return Err(io::Error::other(format!(
            "{failed} of {conns} sends failed"
        )));
    }
    println!("send-many-ok={conns}");
    Ok(())
}

fn send_partial(port: u32, bytes: u64, sent: u64) -> io::Result<()> {
    let mut stream = VsockStream::connect(HOST_CID, port)?;
    send_payload(&mut stream, bytes, 7, sent)?;
    println!("partial-sent={}", sent.min(bytes));
    // Closing without reading the reply: the host sees the stream end mid-payload.
    drop(stream);
    Ok(())
}

fn connect_fails(port: u32) -> io::Result<()> {
    let start = Instant::now();
    match VsockStream::connect(HOST_CID, port) {
        Ok(_) => Err(io::Error::other(format!(
            "connecting to host port {port} succeeded"
        ))),
        Err(e) => {
            let name = match e.raw_os_error() {
                Some(libc::ECONNRESET) => "ECONNRESET".to_owned(),
                Some(libc::ECONNREFUSED) => "ECONNREFUSED".to_owned(),
                Some(libc::ETIMEDOUT) => "ETIMEDOUT".to_owned(),
                _ => format!("{e}"),
            };
            println!("connect-error={name}");
            println!("connect-ms={}", start.elapsed().as_millis());
            Ok(())
        }
    }
}

fn send_zeros(port: u32, bytes: u64) -> io::Result<()> {
    let start = Instant::now();
    let mut stream = VsockStream::connect(HOST_CID, port)?;
    let zeros = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    stream.shutdown_write()?;
    // Wait for the host to close, so the time covers delivery.
    stream.read_to_end(&mut Vec::new())?;
    println!("zeros-ms={}", start.elapsed().as_millis());
    Ok(())
}

fn sink(port: u32) -> io::Result<()> {
    let listener = listen(port)?;
    println!("sink-listening={port}");
    let mut stream = accept(&listener)?;
    let start = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    let mut zero = true;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        zero &= buf[..n].iter().all(|&b| b == 0);
        bytes += n as u64;
    }
    println!("sink-bytes={bytes}");
    println!("sink-zero={}", if zero { "yes" } else { "no" });
    println!("sink-ms={}", start.elapsed().as_millis());
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
