//! The TCP forwarding channel (vsock port 1026), behind CRI PortForward: each connection names
//! a TCP port; the agent dials it on the VM's loopback, where the pod's containers listen (they
//! share the VM's network namespace), answers whether that worked, and then copies bytes both
//! ways. A direction that ends cleanly is passed on as a half-close; one that fails tears both
//! down, so neither copy waits on a peer that is gone.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crx_agent_proto::{read_frame, write_frame, Error, ErrorCode, ForwardReply, ForwardRequest};
use nix::sys::socket::Shutdown as VsockShutdown;

/// How long dialing a port in the VM may take (loopback: refused or accepted at once, unless
/// the listener's backlog is full).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one forwarding connection.
pub fn serve(mut conn: File) {
    let port = match read_frame::<_, ForwardRequest>(&mut conn) {
        Ok(Some(request)) => request.port,
        Ok(None) => return,
        Err(e) => return refuse(&mut conn, ErrorCode::BadRequest, e.to_string()),
    };
    let port = match u16::try_from(port) {
        Ok(port) if port != 0 => port,
        _ => {
            let message = format!("{port} is not a TCP port");
            return refuse(&mut conn, ErrorCode::BadRequest, message);
        }
    };
    let target = match dial(port) {
        Ok(target) => target,
        Err(e) => {
            let message = format!("cannot connect to port {port} in the pod VM: {e}");
            return refuse(&mut conn, ErrorCode::NotFound, message);
        }
    };
    if write_frame(&mut conn, &ForwardReply { error: None }).is_err() {
        return;
    }
    if let Err(e) = splice(conn, target) {
        eprintln!("crx-agent: forward to port {port}: {e}");
    }
}

fn refuse(conn: &mut File, code: ErrorCode, message: String) {
    let reply = ForwardReply {
        error: Some(Error::new(code, message)),
    };
    let _ = write_frame(conn, &reply);
}

/// 127.0.0.1, then ::1 (a server may listen on either).
fn dial(port: u16) -> io::Result<TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&v4, DIAL_TIMEOUT).or_else(|e| {
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        TcpStream::connect_timeout(&v6, DIAL_TIMEOUT).map_err(|_| e)
    })
}

/// Copies host → target on a thread of its own and target → host here, until both end.
fn splice(conn: File, target: TcpStream) -> io::Result<()> {
    let mut from_host = conn.try_clone()?;
    let mut to_target = target.try_clone()?;
    let upstream = std::thread::Builder::new()
        .name("forward".into())
        .spawn(move || {
            let copied = io::copy(&mut from_host, &mut to_target);
            let how = if copied.is_ok() {
                Shutdown::Write
            } else {
                Shutdown::Both
            };
            let _ = to_target.shutdown(how);
            if copied.is_err() {
                let _ = shutdown_vsock(&from_host, VsockShutdown::Both);
            }
        })?;
    let (mut from_target, mut to_host) = (target, conn);
    let copied = io::copy(&mut from_target, &mut to_host);
    match copied {
        Ok(_) => shutdown_vsock(&to_host, VsockShutdown::Write)?,
        Err(_) => {
            let _ = shutdown_vsock(&to_host, VsockShutdown::Both);
            let _ = from_target.shutdown(Shutdown::Both);
        }
    }
    let _ = upstream.join();
    copied.map(|_| ())
}

/// shutdown(2) on the vsock connection, which the agent holds as a `File`.
fn shutdown_vsock(conn: &File, how: VsockShutdown) -> io::Result<()> {
    nix::sys::socket::shutdown(conn.as_raw_fd(), how).map_err(io::Error::from)
}
