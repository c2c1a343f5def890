//! The TCP forwarding channel (vsock port 1026), behind CRI PortForward: each connection names
//! a TCP port; the agent dials it on the VM's loopback, where the pod's containers listen (they
//! share the VM's network namespace), answers whether that worked, and then copies bytes both
//! ways. A direction that ends cleanly is passed on as a half-close; one that fails tears both
//! down, so neither copy waits on a peer that is gone.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crx_agent_proto::{
    read_frame, splice, write_frame, Error, ErrorCode, ForwardReply, ForwardRequest,
};

use crate::vsock;

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
    if let Err(e) = splice(vsock::Connection(conn), target, "forward") {
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
