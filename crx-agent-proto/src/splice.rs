//! Carrying a forwarded TCP stream ([`crate::FORWARD_PORT`]) both ways, as the host and the
//! agent both do: bytes are copied in each direction until it ends; a direction that ends
//! cleanly is passed on as a half-close (`shutdown(Write)`), one that fails (or whose
//! half-close fails) shuts both connections down, so neither copy waits on a peer that is gone.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;

/// A connected byte stream that can be read and written from two threads and half-closed.
pub trait HalfClose: Read + Write + Send + Sized + 'static {
    /// Another handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;

    /// shutdown(2) on the connection.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

impl HalfClose for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

impl HalfClose for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

/// Copies `a` → `b` on a thread named `thread_name` and `b` → `a` on the calling thread, and
/// returns when both have ended, with how `b` → `a` ended (`a` → `b`'s outcome is only
/// passed on to the connections).
pub fn splice<A: HalfClose, B: HalfClose>(a: A, b: B, thread_name: &str) -> io::Result<()> {
    let (from_a, to_b) = (a.try_clone()?, b.try_clone()?);
    let upstream = std::thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || copy_one_way(from_a, to_b))?;
    let copied = copy_one_way(b, a);
    let _ = upstream.join();
    copied
}

/// Copies `from` → `to` until `from` ends, then half-closes `to`; on a failure shuts both down.
fn copy_one_way<R: HalfClose, W: HalfClose>(mut from: R, mut to: W) -> io::Result<()> {
    let copied = io::copy(&mut from, &mut to).and_then(|_| to.shutdown(Shutdown::Write));
    if copied.is_err() {
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A half-close travels through the splice and the answer comes back after it.
    #[test]
    fn a_half_close_is_passed_on_both_ways() -> io::Result<()> {
        let (mut client, near) = UnixStream::pair()?;
        let (far, mut server) = UnixStream::pair()?;
        let spliced = std::thread::spawn(move || splice(near, far, "splice-test"));
        client.write_all(b"ping")?;
        client.shutdown(Shutdown::Write)?;
        let mut request = Vec::new();
        server.read_to_end(&mut request)?;
        assert_eq!(request, b"ping");
        server.write_all(b"pong")?;
        server.shutdown(Shutdown::Write)?;
        let mut reply = Vec::new();
        client.read_to_end(&mut reply)?;
        assert_eq!(reply, b"pong");
        spliced
            .join()
            .map_err(|_| io::Error::other("the splice panicked"))?
    }
}
