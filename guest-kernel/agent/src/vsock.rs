//! AF_VSOCK listening sockets (any CID) and accepting connections as blocking `File`s.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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
