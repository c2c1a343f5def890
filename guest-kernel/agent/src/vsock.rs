//! AF_VSOCK listening sockets (any CID) and accepting connections as blocking `File`s.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crx_agent_proto::HalfClose;
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

pub struct Listener(OwnedFd);

impl Listener {
    pub fn bind(port: u32) -> io::Result<Listener> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(128)?)?;
        Ok(Listener(fd))
    }

    /// The next connection (close-on-exec, so container processes never inherit it).
    pub fn accept(&self) -> io::Result<File> {
        let fd = accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Accepts forever, serving each connection on its own thread.
    pub fn serve(&self, name: &str, handler: impl Fn(File) + Send + Sync + Clone + 'static) {
        loop {
            match self.accept() {
                Ok(conn) => {
                    let handler = handler.clone();
                    let spawned = std::thread::Builder::new()
                        .name(name.into())
                        .spawn(move || handler(conn));
                    if let Err(e) = spawned {
                        eprintln!("crx-agent: {name}: cannot start a thread: {e}");
                    }
                }
                Err(e) => {
                    eprintln!("crx-agent: {name}: accept: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }
}

/// An accepted connection as a stream that can be half-closed (for
/// [`crx_agent_proto::splice`]).
pub struct Connection(pub File);

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl HalfClose for Connection {
    fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Connection)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => nix::sys::socket::Shutdown::Read,
            Shutdown::Write => nix::sys::socket::Shutdown::Write,
            Shutdown::Both => nix::sys::socket::Shutdown::Both,
        };
        nix::sys::socket::shutdown(self.0.as_raw_fd(), how).map_err(io::Error::from)
    }
}
