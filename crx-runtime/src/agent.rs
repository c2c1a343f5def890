//! The host side of the guest agent protocol (`crx-agent-proto`): [`AgentClient`] sends typed
//! requests over a hybrid-vsock connection to port 1024 and blocks for each reply;
//! [`StdioAttachment`] is one process's stdio over port 1025; [`forward_tcp`] one TCP connection
//! to a port in the VM over port 1026. All connect through the VMM's
//! vsock Unix socket (`CONNECT <port>\n` → `OK <hostport>\n`), retrying until a deadline while
//! the guest boots (the device closes the stream while nothing listens on the port).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crx_agent_proto::{
    read_frame, request::Kind, response, stdio_input, stdio_output, write_frame, ConfigureReply,
    ConfigureSandbox, ContainerInfo, ContainerRef, CreateContainer, Empty, ErrorCode, ExecProcess,
    ExitStatus, ForwardReply, ForwardRequest, FrameError, Hello, HelloReply, ProcessRef, Request,
    ResizeTerminal, Response, Rootfs, SignalProcess, StatsReply, StatsRequest, StdioInput,
    StdioOutput, UpdateContainer, Volume, FORWARD_PORT, PROTOCOL_VERSION, REQUEST_PORT,
    STDIO_CHUNK, STDIO_PORT,
};
use oci_spec::runtime::Spec;

/// How long to pause between connection attempts while the guest boots.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("vsock port {port} via {path}: nothing accepted before the deadline ({last})")]
    Unreachable {
        path: PathBuf,
        port: u32,
        last: String,
    },
    #[error("vsock handshake: unexpected reply {0:?}")]
    Handshake(String),
    #[error("i/o with the agent: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Frame(#[from] FrameError),
    #[error("the agent closed the connection")]
    Closed,
    #[error("the VMM exited before its agent answered")]
    VmmExited,
    #[error("the agent accepted the connection but did not answer Hello in {0:?}")]
    NoHelloReply(Duration),
    #[error("the agent refused ({code:?}): {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("unexpected reply from the agent: {0}")]
    Unexpected(String),
    #[error("cannot encode the OCI spec: {0}")]
    Spec(#[from] serde_json::Error),
}

impl AgentError {
    /// The agent's error code, if the agent refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Connects to the guest's vsock `port` through the hybrid-vsock socket `uds`, retrying until
/// `deadline`.
pub fn connect_vsock(uds: &Path, port: u32, deadline: Instant) -> Result<UnixStream, AgentError> {
    loop {
        let last = match try_connect(uds, port) {
            Ok(Some(stream)) => return Ok(stream),
            Ok(None) => "the guest is not listening".to_string(),
            Err(AgentError::Io(e)) => e.to_string(),
            Err(e) => return Err(e),
        };
        tracing::trace!(port, %last, "agent not reachable yet, retrying");
        if Instant::now() >= deadline {
            return Err(AgentError::Unreachable {
                path: uds.to_path_buf(),
                port,
                last,
            });
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

/// One attempt: `Ok(None)` when the device closed the stream (nobody listens yet).
fn try_connect(uds: &Path, port: u32) -> Result<Option<UnixStream>, AgentError> {
    let mut stream = UnixStream::connect(uds)?;
    // The device answers at once, unless it holds the connection (a restored VM whose guest
    // has not yet handled its transport reset) or the VMM is wedged.
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
        if line.len() > 64 {
            break;
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if line.is_empty() {
        Ok(None)
    } else if line.starts_with("OK ") {
        stream.set_read_timeout(None)?;
        Ok(Some(stream))
    } else {
        Err(AgentError::Handshake(line))
    }
}

/// A TCP connection to `port` on the VM's loopback (where its pod's containers listen): once
/// this returns, the stream carries that connection's bytes both ways, and a half-close
/// (`shutdown(Write)`) reaches the guest's peer as one.
pub fn forward_tcp(uds: &Path, port: u16, deadline: Instant) -> Result<UnixStream, AgentError> {
    let mut conn = connect_vsock(uds, FORWARD_PORT, deadline)?;
    write_frame(&mut conn, &ForwardRequest { port: port.into() })?;
    let reply: ForwardReply = read_frame(&mut conn)?.ok_or(AgentError::Closed)?;
    match reply.error {
        None => Ok(conn),
        Some(e) => Err(AgentError::Remote {
            code: e.code(),
            message: e.message,
        }),
    }
}

/// The least time the agent gets to answer Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of fresh host entropy each Hello carries (a 256-bit CRNG key's worth).
const HELLO_ENTROPY_BYTES: usize = 32;

/// Fresh random bytes for the guest (see `Hello.entropy`).
fn host_entropy() -> io::Result<Vec<u8>> {
    let mut bytes = vec![0; HELLO_ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// A request connection to the agent (handshake done).
pub struct AgentClient {
    conn: UnixStream,
    next_id: u64,
    hello: HelloReply,
}

impl AgentClient {
    /// Connects to the agent behind `uds` (retrying until `deadline`) and says Hello.
    pub fn connect(uds: &Path, deadline: Instant) -> Result<AgentClient, AgentError> {
        let conn = connect_vsock(uds, REQUEST_PORT, deadline)?;
        let mut client = AgentClient {
            conn,
            next_id: 1,
            hello: HelloReply::default(),
        };
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            entropy: host_entropy()?,
        };
        // A guest that accepts but never answers must not hold the caller forever.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(HELLO_TIMEOUT);
        client.conn.set_read_timeout(Some(wait))?;
        match client.call(Kind::Hello(hello)) {
            Ok(response::Result::Hello(reply)) => client.hello = reply,
            Ok(other) => return Err(unexpected(other)),
            Err(AgentError::Frame(FrameError::Io(e)))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(AgentError::NoHelloReply(wait))
            }
            Err(e) => return Err(e),
        }
        client.conn.set_read_timeout(None)?;
        Ok(client)
    }

    /// Like [`AgentClient::connect`], retrying in short steps until `deadline`, but gives up
    /// with [`AgentError::VmmExited`] as soon as `vmm_running` says the guest's VMM is gone.
    pub fn connect_while_running(
        uds: &Path,
        deadline: Instant,
        mut vmm_running: impl FnMut() -> bool,
    ) -> Result<AgentClient, AgentError> {
        loop {
            let step = (Instant::now() + Duration::from_millis(500)).min(deadline);
            match AgentClient::connect(uds, step) {
                Ok(client) => return Ok(client),
                Err(_) if !vmm_running() => return Err(AgentError::VmmExited),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {}
            }
        }
    }

    /// The agent's answer to the handshake (its version, its boot → listening time).
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// Sends one request and returns its result (an error reply becomes `AgentError::Remote`).
    pub fn call(&mut self, kind: Kind) -> Result<response::Result, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(
            &mut self.conn,
            &Request {
                id,
                kind: Some(kind),
            },
        )?;
        let response: Response = read_frame(&mut self.conn)?.ok_or(AgentError::Closed)?;
        if response.id != id {
            return Err(AgentError::Unexpected(format!(
                "reply to request {} while waiting for {id}",
                response.id
            )));
        }
        match response.result {
            Some(response::Result::Error(e)) => Err(AgentError::Remote {
                code: e.code(),
                message: e.message,
            }),
            Some(result) => Ok(result),
            None => Err(AgentError::Unexpected("empty reply".into())),
        }
    }

    fn call_empty(&mut self, kind: Kind) -> Result<(), AgentError> {
        match self.call(kind)? {
            response::Result::Empty(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    fn call_started(&mut self, kind: Kind) -> Result<u32, AgentError> {
        match self.call(kind)? {
            response::Result::Started(started) => Ok(started.pid),
            other => Err(unexpected(other)),
        }
    }

    pub fn configure_sandbox(
        &mut self,
        config: ConfigureSandbox,
    ) -> Result<ConfigureReply, AgentError> {
        match self.call(Kind::ConfigureSandbox(config))? {
            response::Result::Configured(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    /// Creates container `id` from `spec` on `rootfs` (nothing runs until `start_container`).
    pub fn create_container(
        &mut self,
        id: &str,
        rootfs: Rootfs,
        spec: &Spec,
        terminal: bool,
        volumes: Vec<Volume>,
    ) -> Result<(), AgentError> {
        self.call_empty(Kind::CreateContainer(CreateContainer {
            container_id: id.into(),
            rootfs: Some(rootfs),
            oci_spec_json: serde_json::to_vec(spec)?,
            terminal,
            volumes,
        }))
    }

    /// Starts the container's main process; returns its pid in the VM.
    pub fn start_container(&mut self, id: &str) -> Result<u32, AgentError> {
        self.call_started(Kind::StartContainer(ContainerRef {
            container_id: id.into(),
        }))
    }

    /// Starts an extra process in a running container; returns its pid in the VM.
    pub fn exec_process(&mut self, exec: ExecProcess) -> Result<u32, AgentError> {
        self.call_started(Kind::ExecProcess(exec))
    }

    /// Blocks until the process (`exec_id` empty: the main one) exits.
    pub fn wait_process(&mut self, id: &str, exec_id: &str) -> Result<ExitStatus, AgentError> {
        match self.call(Kind::WaitProcess(process_ref(id, exec_id)))? {
            response::Result::Exit(exit) => Ok(exit),
            other => Err(unexpected(other)),
        }
    }

    pub fn signal_process(
        &mut self,
        id: &str,
        exec_id: &str,
        signal: i32,
    ) -> Result<(), AgentError> {
        self.call_empty(Kind::SignalProcess(SignalProcess {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal,
        }))
    }

    pub fn resize_terminal(
        &mut self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        self.call_empty(Kind::ResizeTerminal(ResizeTerminal {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows,
            cols,
        }))
    }

    /// Resource usage of the given containers (none given: all), and the agent's own memory.
    pub fn stats(&mut self, ids: &[&str]) -> Result<StatsReply, AgentError> {
        let request = StatsRequest {
            container_ids: ids.iter().map(|s| s.to_string()).collect(),
        };
        match self.call(Kind::Stats(request))? {
            response::Result::Stats(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    /// Kills what still runs in the container and removes it.
    /// Changes the cgroup limits of container `id` to `resources` (those it sets).
    pub fn update_container(
        &mut self,
        id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<(), AgentError> {
        self.call_empty(Kind::UpdateContainer(UpdateContainer {
            container_id: id.into(),
            resources_json: serde_json::to_vec(resources).expect("resources serialize"),
        }))
    }

    pub fn remove_container(&mut self, id: &str) -> Result<(), AgentError> {
        self.call_empty(Kind::RemoveContainer(ContainerRef {
            container_id: id.into(),
        }))
    }

    pub fn list_containers(&mut self) -> Result<Vec<ContainerInfo>, AgentError> {
        match self.call(Kind::ListContainers(Empty {}))? {
            response::Result::List(reply) => Ok(reply.containers),
            other => Err(unexpected(other)),
        }
    }

    /// Flushes the guest's filesystems, then powers the VM off (exit status 0): once this
    /// returns, the VMM may be ended without losing anything the guest wrote.
    pub fn shutdown(&mut self) -> Result<(), AgentError> {
        self.call_empty(Kind::Shutdown(Empty {}))
    }
}

fn process_ref(id: &str, exec_id: &str) -> ProcessRef {
    ProcessRef {
        container_id: id.into(),
        exec_id: exec_id.into(),
    }
}

fn unexpected(result: response::Result) -> AgentError {
    AgentError::Unexpected(format!("{result:?}"))
}

/// One output event of an attached process.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    StdoutEof,
    StderrEof,
    /// The process exited; nothing follows.
    Exit(ExitStatus),
}

/// One process's stdio (port 1025). Use [`StdioAttachment::split`] to write stdin from one
/// thread while another reads the output.
pub struct StdioAttachment {
    input: StdioInputHalf,
    output: StdioOutputHalf,
}

/// The writing half: stdin, stdin EOF, terminal resize.
pub struct StdioInputHalf(UnixStream);

/// The reading half: stdout, stderr, exit.
pub struct StdioOutputHalf(UnixStream);

impl StdioAttachment {
    /// Attaches to the process (`exec_id` empty: the main one). Output the process wrote
    /// before this is delivered too.
    pub fn attach(
        uds: &Path,
        deadline: Instant,
        id: &str,
        exec_id: &str,
    ) -> Result<StdioAttachment, AgentError> {
        let mut conn = connect_vsock(uds, STDIO_PORT, deadline)?;
        let attach = stdio_input::Kind::Attach(process_ref(id, exec_id));
        write_frame(&mut conn, &StdioInput::of(attach))?;
        let reply: StdioOutput = read_frame(&mut conn)?.ok_or(AgentError::Closed)?;
        match reply.kind {
            Some(stdio_output::Kind::Attached(_)) => {}
            Some(stdio_output::Kind::Error(e)) => {
                return Err(AgentError::Remote {
                    code: e.code(),
                    message: e.message,
                })
            }
            other => return Err(AgentError::Unexpected(format!("{other:?}"))),
        }
        Ok(StdioAttachment {
            input: StdioInputHalf(conn.try_clone()?),
            output: StdioOutputHalf(conn),
        })
    }

    pub fn split(self) -> (StdioInputHalf, StdioOutputHalf) {
        (self.input, self.output)
    }

    pub fn write_stdin(&mut self, data: &[u8]) -> Result<(), AgentError> {
        self.input.write_stdin(data)
    }

    pub fn close_stdin(&mut self) -> Result<(), AgentError> {
        self.input.close_stdin()
    }

    pub fn resize(&mut self, rows: u32, cols: u32) -> Result<(), AgentError> {
        self.input.resize(rows, cols)
    }

    pub fn next_output(&mut self) -> Result<Output, AgentError> {
        self.output.next_output()
    }

    /// Reads everything up to the exit into `stdout` and `stderr`.
    pub fn collect(
        self,
        stdout: &mut impl Write,
        stderr: &mut impl Write,
    ) -> Result<ExitStatus, AgentError> {
        self.output.collect(stdout, stderr)
    }
}

impl StdioInputHalf {
    fn send(&mut self, kind: stdio_input::Kind) -> Result<(), AgentError> {
        Ok(write_frame(&mut self.0, &StdioInput::of(kind))?)
    }

    pub fn write_stdin(&mut self, data: &[u8]) -> Result<(), AgentError> {
        for chunk in data.chunks(STDIO_CHUNK) {
            self.send(stdio_input::Kind::Stdin(chunk.to_vec()))?;
        }
        Ok(())
    }

    pub fn close_stdin(&mut self) -> Result<(), AgentError> {
        self.send(stdio_input::Kind::StdinEof(Empty {}))
    }

    pub fn resize(&mut self, rows: u32, cols: u32) -> Result<(), AgentError> {
        self.send(stdio_input::Kind::Resize(crx_agent_proto::Resize {
            rows,
            cols,
        }))
    }
}

impl StdioOutputHalf {
    /// The next output event.
    pub fn next_output(&mut self) -> Result<Output, AgentError> {
        let frame: StdioOutput = read_frame(&mut self.0)?.ok_or(AgentError::Closed)?;
        Ok(match frame.kind {
            Some(stdio_output::Kind::Stdout(data)) => Output::Stdout(data),
            Some(stdio_output::Kind::Stderr(data)) => Output::Stderr(data),
            Some(stdio_output::Kind::StdoutEof(_)) => Output::StdoutEof,
            Some(stdio_output::Kind::StderrEof(_)) => Output::StderrEof,
            Some(stdio_output::Kind::Exit(exit)) => Output::Exit(exit),
            Some(stdio_output::Kind::Error(e)) => {
                return Err(AgentError::Remote {
                    code: e.code(),
                    message: e.message,
                })
            }
            other => return Err(AgentError::Unexpected(format!("{other:?}"))),
        })
    }

    /// Reads everything up to the exit into `stdout` and `stderr`.
    pub fn collect(
        mut self,
        stdout: &mut impl Write,
        stderr: &mut impl Write,
    ) -> Result<ExitStatus, AgentError> {
        loop {
            match self.next_output()? {
                Output::Stdout(data) => stdout.write_all(&data)?,
                Output::Stderr(data) => stderr.write_all(&data)?,
                Output::StdoutEof | Output::StderrEof => {}
                Output::Exit(exit) => return Ok(exit),
            }
        }
    }
}
