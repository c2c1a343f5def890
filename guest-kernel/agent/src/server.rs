//! The request channel (vsock port 1024): per connection, the `Hello` handshake, then one
//! response per request, in order. Every failure is an error reply; an undecodable frame gets
//! a `BAD_REQUEST` reply with id 0 and the connection goes on; an oversized frame gets one and
//! the connection is closed (the next frame boundary is lost).

use std::fs::File;

use crx_agent_proto::{
    read_frame, request::Kind, response, write_frame, Empty, ErrorCode, FrameError, HelloReply,
    ListReply, Request, Response, Started, StatsReply, PROTOCOL_VERSION,
};

use crate::container::Agent;
use crate::{fail, sandbox, Result};

/// Serves one request connection until it closes. `listen_us`: boot → listening.
pub fn serve(agent: &Agent, mut conn: File, listen_us: u64) {
    let mut greeted = false;
    loop {
        let request: Request = match read_frame(&mut conn) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e @ FrameError::Decode(_)) => {
                if reply(
                    &mut conn,
                    0,
                    Err(fail(ErrorCode::BadRequest, e.to_string())),
                ) {
                    continue;
                }
                return;
            }
            Err(e @ FrameError::TooLarge { .. }) => {
                reply(
                    &mut conn,
                    0,
                    Err(fail(ErrorCode::BadRequest, e.to_string())),
                );
                return;
            }
            Err(_) => return,
        };
        if crate::verbose() {
            let shown = format!("{:?}", request.kind);
            eprintln!("crx-agent: request {}: {}", request.id, clip(&shown));
        }
        let result = match request.kind {
            Some(Kind::Hello(hello)) if hello.protocol_version == PROTOCOL_VERSION => {
                greeted = true;
                if let Err(e) = crate::entropy::add_and_reseed(&hello.entropy) {
                    eprintln!("crx-agent: cannot add the host's entropy: {e}");
                }
                Ok(response::Result::Hello(HelloReply {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                    boot_to_listen_us: listen_us,
                }))
            }
            Some(Kind::Hello(hello)) => Err(fail(
                ErrorCode::VersionMismatch,
                format!(
                    "protocol version {} requested, the agent speaks {PROTOCOL_VERSION}",
                    hello.protocol_version
                ),
            )),
            _ if !greeted => Err(fail(
                ErrorCode::HandshakeRequired,
                "the first request must be Hello",
            )),
            Some(Kind::Shutdown(_)) => {
                // Flushed before the reply: a host that ends the VMM on the reply loses nothing
                // the guest wrote.
                // SAFETY: sync(2) has no preconditions.
                unsafe { libc::sync() };
                reply(&mut conn, request.id, Ok(response::Result::Empty(Empty {})));
                crate::shut_down();
            }
            Some(kind) => handle(agent, kind),
            None => Err(fail(ErrorCode::BadRequest, "empty or unknown request")),
        };
        if !reply(&mut conn, request.id, result) {
            return;
        }
    }
}

fn reply(conn: &mut File, id: u64, result: Result<response::Result>) -> bool {
    let result = result.unwrap_or_else(response::Result::Error);
    if crate::verbose() {
        eprintln!("crx-agent: reply {id}: {}", clip(&format!("{result:?}")));
    }
    write_frame(
        conn,
        &Response {
            id,
            result: Some(result),
        },
    )
    .is_ok()
}

fn handle(agent: &Agent, kind: Kind) -> Result<response::Result> {
    let empty = |()| response::Result::Empty(Empty {});
    let started = |pid| response::Result::Started(Started { pid });
    match kind {
        Kind::ConfigureSandbox(req) => {
            sandbox::configure(&agent.reaper, &req).map(response::Result::Configured)
        }
        Kind::CreateContainer(req) => agent.create(req).map(empty),
        Kind::StartContainer(req) => agent.start(&req.container_id).map(started),
        Kind::ExecProcess(req) => agent.exec(req).map(started),
        Kind::WaitProcess(req) => agent.wait(&req).map(response::Result::Exit),
        Kind::SignalProcess(req) => agent.signal(&req).map(empty),
        Kind::ResizeTerminal(req) => agent.resize(&req).map(empty),
        Kind::Stats(req) => agent.stats(&req.container_ids).map(|containers| {
            response::Result::Stats(StatsReply {
                containers,
                agent_rss_bytes: own_rss_bytes(),
            })
        }),
        Kind::UpdateContainer(req) => agent.update(&req).map(empty),
        Kind::RemoveContainer(req) => agent.remove(&req.container_id).map(empty),
        Kind::ListContainers(_) => Ok(response::Result::List(ListReply {
            containers: agent.list(),
        })),
        Kind::Hello(_) | Kind::Shutdown(_) => unreachable!("handled by serve"),
    }
}

/// The agent's VmRSS (`/proc/self/status`), bytes; 0 if unreadable.
fn own_rss_bytes() -> u64 {
    procfs::process::Process::myself()
        .ok()
        .and_then(|me| me.status().ok()?.vmrss)
        .map_or(0, |kib| kib * 1024)
}

/// A logged request or reply cut to a console line: an OCI spec as a byte list runs to
/// kilobytes, and every console byte is a VM exit.
fn clip(shown: &str) -> &str {
    const MAX: usize = 200;
    match shown.char_indices().nth(MAX) {
        Some((at, _)) => &shown[..at],
        None => shown,
    }
}
