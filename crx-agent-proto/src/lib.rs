//! crx-agent-proto: the one definition of the protocol between the host (`crx-runtime`'s
//! `AgentClient`) and the guest agent (`crx-agent`, PID 1 of a pod VM). Both sides depend on
//! this crate and nothing else defines a message.
//!
//! # Transport
//! AF_VSOCK streams to the guest (the host reaches them through the VMM's hybrid-vsock Unix
//! socket: `CONNECT <port>\n` → `OK <hostport>\n`):
//! - [`REQUEST_PORT`] (1024): requests. Any number of connections, each served by its own agent
//!   thread, requests on one connection answered in order (so a blocking `WaitProcess` holds
//!   only its own connection). The first request on every connection must be `Hello` with
//!   [`PROTOCOL_VERSION`]; anything else before it is answered with `HANDSHAKE_REQUIRED`, a
//!   different version with `VERSION_MISMATCH`.
//! - [`STDIO_PORT`] (1025): one connection per process's stdio. The host's first frame is a
//!   [`StdioInput`] carrying `attach` (container id + exec id, empty = the container's main
//!   process); the agent answers `attached` as soon as the process exists (so the host attaches
//!   before `StartContainer`; a second attachment then gets `error`), or `error`, then streams
//!   `stdout`/`stderr` data, `stdout_eof`/`stderr_eof` once each, and finally `exit`, then
//!   closes. The host sends `stdin` data, `stdin_eof` and `resize` frames. A process has exactly
//!   one stdio attachment. With a terminal there is one output stream (`stdout`) and no stderr.
//!   Output written before the host attaches is not lost: the agent does not read a process's
//!   pipes (or pty) until it is attached, so early output waits in the kernel's pipe buffer
//!   (64 KiB; a process that writes more blocks until the host attaches).
//! - [`FORWARD_PORT`] (1026): one connection per forwarded TCP connection (CRI PortForward).
//!   The host's first frame is a [`ForwardRequest`] naming a TCP port; the agent dials it on the
//!   VM's loopback (127.0.0.1, then ::1), where the pod's containers listen, and answers a
//!   [`ForwardReply`] (no error: connected). From then on the connection carries the TCP
//!   stream's raw bytes both ways, unframed; a half-close on either side is passed on as one
//!   (both sides carry it with [`splice`]).
//!
//! # Framing
//! Every message in either direction is one frame: a 4-byte big-endian length, then that many
//! bytes of protobuf encoding. Frames longer than [`MAX_FRAME_LEN`] (4 MiB) are refused
//! ([`FrameError::TooLarge`]; the agent answers with an error and closes the connection, since
//! it cannot find the next frame); a body that is not a valid message is
//! [`FrameError::Decode`] (the agent answers with a `BAD_REQUEST` error with id 0 and goes on).
//!
//! # Wire schema (proto3 equivalent of the prost types below)
//! ```text
//! message Request  { uint64 id = 1; oneof kind { Hello hello = 2; ConfigureSandbox configure_sandbox = 3;
//!   CreateContainer create_container = 4; ContainerRef start_container = 5; ProcessRef wait_process = 6;
//!   SignalProcess signal_process = 7; ExecProcess exec_process = 8; ResizeTerminal resize_terminal = 9;
//!   StatsRequest stats = 10; ContainerRef remove_container = 11; Empty list_containers = 12; Empty shutdown = 13; } }
//! message Response { uint64 id = 1; oneof result { Error error = 2; Empty empty = 3; HelloReply hello = 4;
//!   Started started = 5; ExitStatus exit = 6; StatsReply stats = 7; ListReply list = 8; ConfigureReply configured = 9; } }
//! message Empty {}
//! message Error { ErrorCode code = 1; string message = 2; }
//! enum ErrorCode { UNKNOWN = 0; BAD_REQUEST = 1; NOT_FOUND = 2; ALREADY_EXISTS = 3; INVALID_STATE = 4;
//!   INTERNAL = 5; VERSION_MISMATCH = 6; HANDSHAKE_REQUIRED = 7; }
//! message Hello { uint32 protocol_version = 1; bytes entropy = 2; }
//! message HelloReply { uint32 protocol_version = 1; string agent_version = 2; uint64 boot_to_listen_us = 3; }
//! message ConfigureSandbox { string hostname = 1; Dns dns = 2; repeated Interface interfaces = 3;
//!   repeated Route routes = 4; map<string,string> sysctls = 5; }
//! message Dns { repeated string servers = 1; repeated string searches = 2; repeated string options = 3; }
//! message Interface { string name = 1; string mac = 2; repeated string addresses = 3 /* CIDR */; uint32 mtu = 4; }
//! message Route { string destination = 1 /* CIDR or "default" */; string gateway = 2; string device = 3; }
//! message ConfigureReply { repeated string skipped = 1; }
//! message CreateContainer { string container_id = 1; Rootfs rootfs = 2; bytes oci_spec_json = 3; bool terminal = 4;
//!   repeated Volume volumes = 5; }
//! message Volume { string fs_tag = 1; string path = 2; string destination = 3; /* 4: retired */ }
//! message Rootfs { string fs_tag = 1; string path = 2; }
//! message ContainerRef { string container_id = 1; }
//! message ProcessRef { string container_id = 1; string exec_id = 2; }
//! message SignalProcess { string container_id = 1; string exec_id = 2; int32 signal = 3; }
//! message ExecProcess { string container_id = 1; string exec_id = 2; repeated string args = 3;
//!   repeated string env = 4; string cwd = 5; User user = 6; bool terminal = 7; }
//! message User { uint32 uid = 1; uint32 gid = 2; repeated uint32 additional_gids = 3; }
//! message ResizeTerminal { string container_id = 1; string exec_id = 2; uint32 rows = 3; uint32 cols = 4; }
//! message Started { uint32 pid = 1; }
//! message ExitStatus { oneof status { int32 code = 1; int32 signal = 2; } bool oom_killed = 3; }
//! message StatsRequest { repeated string container_ids = 1; }
//! message ContainerStats { string container_id = 1; uint64 cpu_usage_usec = 2; uint64 memory_usage_bytes = 3;
//!   uint64 memory_limit_bytes = 4 /* 0 = no limit */; uint64 pids_current = 5; }
//! message StatsReply { repeated ContainerStats containers = 1; uint64 agent_rss_bytes = 2; }
//! message ContainerInfo { string container_id = 1; ContainerState state = 2; uint32 pid = 3; }
//! enum ContainerState { CREATED = 0; RUNNING = 1; STOPPED = 2; }
//! message ListReply { repeated ContainerInfo containers = 1; }
//! message StdioInput { oneof kind { ProcessRef attach = 1; bytes stdin = 2; Empty stdin_eof = 3; Resize resize = 4; } }
//! message Resize { uint32 rows = 1; uint32 cols = 2; }
//! message StdioOutput { oneof kind { Empty attached = 1; bytes stdout = 2; bytes stderr = 3; Empty stdout_eof = 4;
//!   Empty stderr_eof = 5; ExitStatus exit = 6; Error error = 7; } }
//! message ForwardRequest { uint32 port = 1; }
//! message ForwardReply { Error error = 1; /* absent: connected */ }
//! ```

mod frame;
mod messages;
mod splice;

pub use frame::{encode_frame, read_frame, write_frame, FrameError};
pub use messages::*;
pub use splice::{splice, HalfClose};

/// Checked in the `Hello` handshake; bump on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
/// vsock port of the request channel.
pub const REQUEST_PORT: u32 = 1024;
/// vsock port of the stdio channel.
pub const STDIO_PORT: u32 = 1025;
/// vsock port of the TCP forwarding channel.
pub const FORWARD_PORT: u32 = 1026;
/// The largest frame body either side accepts (4 MiB).
pub const MAX_FRAME_LEN: usize = 4 << 20;
/// The pod's shared pid namespace, as a `CreateContainer` spec names it: a `pid` entry of
/// `linux.namespaces` with this path puts the container in the pid namespace all such
/// containers of the VM share (the agent makes it, with its own PID 1, on first use). Without a
/// path the container gets a pid namespace of its own; with no `pid` entry it is in the VM's.
pub const POD_PID_NAMESPACE: &str = "/run/crx/pod/ns/pid";

/// The path that names container `id`'s pid namespace in a `CreateContainer` spec (Kubernetes'
/// TARGET mode: a debug container joining another's processes); the container must be running.
pub fn container_pid_namespace(id: &str) -> String {
    format!("{CONTAINER_NAMESPACES_DIR}/{id}/ns/pid")
}

/// Where [`container_pid_namespace`] paths start.
pub const CONTAINER_NAMESPACES_DIR: &str = "/run/crx/containers";

/// How much stdout/stderr/stdin data one frame carries at most.
pub const STDIO_CHUNK: usize = 64 << 10;
