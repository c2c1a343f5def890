//! The protocol's messages as prost types (schema in the crate docs), and small helpers both
//! sides use to build them.

use prost::{Enumeration, Message, Oneof};

#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    Unknown = 0,
    BadRequest = 1,
    NotFound = 2,
    AlreadyExists = 3,
    InvalidState = 4,
    Internal = 5,
    VersionMismatch = 6,
    HandshakeRequired = 7,
}

#[derive(Clone, PartialEq, Message)]
pub struct Error {
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error {
            code: code as i32,
            message: message.into(),
        }
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct Hello {
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    /// Fresh random bytes from the host (up to 64 are used): the agent credits them to the
    /// guest's entropy pool and reseeds its CRNG, so pods restored from one template differ.
    #[prost(bytes = "vec", tag = "2")]
    pub entropy: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct HelloReply {
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    #[prost(string, tag = "2")]
    pub agent_version: String,
    /// Microseconds from the agent's start to its listening sockets.
    #[prost(uint64, tag = "3")]
    pub boot_to_listen_us: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Dns {
    #[prost(string, repeated, tag = "1")]
    pub servers: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub searches: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    pub options: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Interface {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub mac: String,
    /// CIDR, e.g. `10.0.0.2/24`.
    #[prost(string, repeated, tag = "3")]
    pub addresses: Vec<String>,
    #[prost(uint32, tag = "4")]
    pub mtu: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct Route {
    /// CIDR or `default`.
    #[prost(string, tag = "1")]
    pub destination: String,
    #[prost(string, tag = "2")]
    pub gateway: String,
    #[prost(string, tag = "3")]
    pub device: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ConfigureSandbox {
    #[prost(string, tag = "1")]
    pub hostname: String,
    #[prost(message, optional, tag = "2")]
    pub dns: Option<Dns>,
    #[prost(message, repeated, tag = "3")]
    pub interfaces: Vec<Interface>,
    #[prost(message, repeated, tag = "4")]
    pub routes: Vec<Route>,
    #[prost(btree_map = "string, string", tag = "5")]
    pub sysctls: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ConfigureReply {
    /// What could not be applied (e.g. an interface that does not exist), one line each.
    #[prost(string, repeated, tag = "1")]
    pub skipped: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Rootfs {
    /// The virtio-fs tag holding the read-only image rootfs.
    #[prost(string, tag = "1")]
    pub fs_tag: String,
    /// The rootfs directory inside that share (relative).
    #[prost(string, tag = "2")]
    pub path: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct CreateContainer {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(message, optional, tag = "2")]
    pub rootfs: Option<Rootfs>,
    /// The OCI runtime spec (`config.json`) as JSON.
    #[prost(bytes = "vec", tag = "3")]
    pub oci_spec_json: Vec<u8>,
    /// Give the main process a terminal (also when the spec's `process.terminal` is true).
    #[prost(bool, tag = "4")]
    pub terminal: bool,
    /// Paths of virtio-fs shares bound into the container, after the spec's own mounts.
    #[prost(message, repeated, tag = "5")]
    pub volumes: Vec<Volume>,
}

/// A file or directory of a virtio-fs share, bound at `destination` in a container. Whether
/// the container may write to it is the host's to enforce, in the share (a read-only bind
/// there, of every mount below too when recursive): the guest's bind is writable, so mounts
/// below a volume keep the flags they have on the host. (Tag 4, a guest-side read-only flag,
/// is retired.)
#[derive(Clone, PartialEq, Message)]
pub struct Volume {
    #[prost(string, tag = "1")]
    pub fs_tag: String,
    /// Relative to the share's root.
    #[prost(string, tag = "2")]
    pub path: String,
    /// Absolute, in the container.
    #[prost(string, tag = "3")]
    pub destination: String,
}

/// New cgroup limits for a running container (what can change while it runs: memory, CPU
/// quota, period and shares, pids).
#[derive(Clone, PartialEq, Message)]
pub struct UpdateContainer {
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// The OCI runtime spec's `linux.resources` as JSON.
    #[prost(bytes = "vec", tag = "2")]
    pub resources_json: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ContainerRef {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

/// A process: a container's main process (`exec_id` empty) or one of its exec processes.
#[derive(Clone, PartialEq, Eq, Hash, Message)]
pub struct ProcessRef {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, tag = "2")]
    pub exec_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct SignalProcess {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, tag = "2")]
    pub exec_id: String,
    #[prost(int32, tag = "3")]
    pub signal: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct User {
    #[prost(uint32, tag = "1")]
    pub uid: u32,
    #[prost(uint32, tag = "2")]
    pub gid: u32,
    #[prost(uint32, repeated, tag = "3")]
    pub additional_gids: Vec<u32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ExecProcess {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, tag = "2")]
    pub exec_id: String,
    #[prost(string, repeated, tag = "3")]
    pub args: Vec<String>,
    /// `NAME=value` entries; the whole environment.
    #[prost(string, repeated, tag = "4")]
    pub env: Vec<String>,
    /// Empty: `/`.
    #[prost(string, tag = "5")]
    pub cwd: String,
    #[prost(message, optional, tag = "6")]
    pub user: Option<User>,
    #[prost(bool, tag = "7")]
    pub terminal: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct ResizeTerminal {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, tag = "2")]
    pub exec_id: String,
    #[prost(uint32, tag = "3")]
    pub rows: u32,
    #[prost(uint32, tag = "4")]
    pub cols: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct Started {
    /// The process's pid in the agent's (the VM's) pid namespace.
    #[prost(uint32, tag = "1")]
    pub pid: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Oneof)]
pub enum ExitKind {
    #[prost(int32, tag = "1")]
    Code(i32),
    #[prost(int32, tag = "2")]
    Signal(i32),
}

#[derive(Clone, PartialEq, Message)]
pub struct ExitStatus {
    #[prost(oneof = "ExitKind", tags = "1, 2")]
    pub status: Option<ExitKind>,
    /// The container's cgroup saw an OOM kill while the process ran.
    #[prost(bool, tag = "3")]
    pub oom_killed: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct StatsRequest {
    /// Empty: every container.
    #[prost(string, repeated, tag = "1")]
    pub container_ids: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ContainerStats {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(uint64, tag = "2")]
    pub cpu_usage_usec: u64,
    #[prost(uint64, tag = "3")]
    pub memory_usage_bytes: u64,
    /// 0: no limit.
    #[prost(uint64, tag = "4")]
    pub memory_limit_bytes: u64,
    #[prost(uint64, tag = "5")]
    pub pids_current: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct StatsReply {
    #[prost(message, repeated, tag = "1")]
    pub containers: Vec<ContainerStats>,
    /// The agent's own resident memory (VmRSS), bytes: the pod VM's fixed overhead in the guest.
    #[prost(uint64, tag = "2")]
    pub agent_rss_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Enumeration)]
#[repr(i32)]
pub enum ContainerState {
    Created = 0,
    Running = 1,
    Stopped = 2,
}

#[derive(Clone, PartialEq, Message)]
pub struct ContainerInfo {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(enumeration = "ContainerState", tag = "2")]
    pub state: i32,
    #[prost(uint32, tag = "3")]
    pub pid: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ListReply {
    #[prost(message, repeated, tag = "1")]
    pub containers: Vec<ContainerInfo>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Request {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(
        oneof = "request::Kind",
        tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14"
    )]
    pub kind: Option<request::Kind>,
}

pub mod request {
    use super::*;

    #[derive(Clone, PartialEq, Oneof)]
    pub enum Kind {
        #[prost(message, tag = "2")]
        Hello(Hello),
        #[prost(message, tag = "3")]
        ConfigureSandbox(ConfigureSandbox),
        #[prost(message, tag = "4")]
        CreateContainer(CreateContainer),
        #[prost(message, tag = "5")]
        StartContainer(ContainerRef),
        #[prost(message, tag = "6")]
        WaitProcess(ProcessRef),
        #[prost(message, tag = "7")]
        SignalProcess(SignalProcess),
        #[prost(message, tag = "8")]
        ExecProcess(ExecProcess),
        #[prost(message, tag = "9")]
        ResizeTerminal(ResizeTerminal),
        #[prost(message, tag = "10")]
        Stats(StatsRequest),
        #[prost(message, tag = "11")]
        RemoveContainer(ContainerRef),
        #[prost(message, tag = "12")]
        ListContainers(Empty),
        #[prost(message, tag = "13")]
        Shutdown(Empty),
        #[prost(message, tag = "14")]
        UpdateContainer(UpdateContainer),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct Response {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(oneof = "response::Result", tags = "2, 3, 4, 5, 6, 7, 8, 9")]
    pub result: Option<response::Result>,
}

pub mod response {
    use super::*;

    #[derive(Clone, PartialEq, Oneof)]
    pub enum Result {
        #[prost(message, tag = "2")]
        Error(Error),
        #[prost(message, tag = "3")]
        Empty(Empty),
        #[prost(message, tag = "4")]
        Hello(HelloReply),
        #[prost(message, tag = "5")]
        Started(Started),
        #[prost(message, tag = "6")]
        Exit(ExitStatus),
        #[prost(message, tag = "7")]
        Stats(StatsReply),
        #[prost(message, tag = "8")]
        List(ListReply),
        #[prost(message, tag = "9")]
        Configured(ConfigureReply),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct Resize {
    #[prost(uint32, tag = "1")]
    pub rows: u32,
    #[prost(uint32, tag = "2")]
    pub cols: u32,
}

/// Host → agent on the stdio channel.
#[derive(Clone, PartialEq, Message)]
pub struct StdioInput {
    #[prost(oneof = "stdio_input::Kind", tags = "1, 2, 3, 4")]
    pub kind: Option<stdio_input::Kind>,
}

pub mod stdio_input {
    use super::*;

    #[derive(Clone, PartialEq, Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Attach(ProcessRef),
        #[prost(bytes = "vec", tag = "2")]
        Stdin(Vec<u8>),
        #[prost(message, tag = "3")]
        StdinEof(Empty),
        #[prost(message, tag = "4")]
        Resize(Resize),
    }
}

/// Agent → host on the stdio channel.
#[derive(Clone, PartialEq, Message)]
pub struct StdioOutput {
    #[prost(oneof = "stdio_output::Kind", tags = "1, 2, 3, 4, 5, 6, 7")]
    pub kind: Option<stdio_output::Kind>,
}

pub mod stdio_output {
    use super::*;

    #[derive(Clone, PartialEq, Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Attached(Empty),
        #[prost(bytes = "vec", tag = "2")]
        Stdout(Vec<u8>),
        #[prost(bytes = "vec", tag = "3")]
        Stderr(Vec<u8>),
        #[prost(message, tag = "4")]
        StdoutEof(Empty),
        #[prost(message, tag = "5")]
        StderrEof(Empty),
        #[prost(message, tag = "6")]
        Exit(ExitStatus),
        #[prost(message, tag = "7")]
        Error(Error),
    }
}

/// Host → agent, first on a forwarding connection: the guest TCP port to dial.
#[derive(Clone, PartialEq, Message)]
pub struct ForwardRequest {
    #[prost(uint32, tag = "1")]
    pub port: u32,
}

/// Agent → host, the answer to [`ForwardRequest`]; raw bytes follow it when `error` is absent.
#[derive(Clone, PartialEq, Message)]
pub struct ForwardReply {
    #[prost(message, optional, tag = "1")]
    pub error: Option<Error>,
}

impl StdioOutput {
    pub fn of(kind: stdio_output::Kind) -> StdioOutput {
        StdioOutput { kind: Some(kind) }
    }
}

impl StdioInput {
    pub fn of(kind: stdio_input::Kind) -> StdioInput {
        StdioInput { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oneofs_and_enums_round_trip() {
        let response = Response {
            id: 42,
            result: Some(response::Result::Exit(ExitStatus {
                status: Some(ExitKind::Signal(9)),
                oom_killed: true,
            })),
        };
        let decoded = Response::decode(response.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, response);
        let err = Error::new(ErrorCode::NotFound, "no such container");
        assert_eq!(err.code(), ErrorCode::NotFound);
        let unknown = Error {
            code: 99,
            message: String::new(),
        };
        assert_eq!(unknown.code(), ErrorCode::Unknown);
    }

    #[test]
    fn unknown_request_kind_decodes_as_none() {
        // field 15 (a future request kind, length-delimited: key 15 << 3 | 2) is skipped by
        // an older decoder
        let bytes = [0x08, 0x05, 0x7a, 0x00];
        let request = Request::decode(bytes.as_slice()).unwrap();
        assert_eq!(request.id, 5);
        assert!(request.kind.is_none());
    }
}
