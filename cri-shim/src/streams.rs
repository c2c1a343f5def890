//! Exec, Attach and PortForward over the streaming server ([`crx_streaming`]): the CRI call
//! gets a one-time URL, and the session it opens runs here. Exec starts a process in the
//! container (on a terminal if asked) through its pod's agent and copies its stdio to the
//! client's streams. Attach joins the container's own process through its [`AttachPoint`]: the
//! log pump shares the output with every attached client, and clients write to the container's
//! stdin. PortForward reaches a port on the pod VM's loopback through the agent's forwarding
//! channel, one vsock connection per TCP connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use crx_runtime::agent::{AgentClient, Output, StdioInputHalf, StdioOutputHalf};
use crx_runtime::pod::exit_code;
use crx_streaming::{
    Handler, OutputStream, PortConnection, Request, RequestKind, Resize, Stdin, Streams,
};

use crate::containers::Exec;
use crate::pods::Runtime;

/// How often a session with nothing to copy checks that its client is still there.
const HANGUP_CHECK: Duration = Duration::from_secs(1);

/// A running container's stdio, shared by its log pump and attached clients.
#[derive(Default)]
pub struct AttachPoint {
    /// The container's stdin, while it is open (CRI `stdin`).
    input: Mutex<Option<StdioInputHalf>>,
    /// Attached clients' event queues.
    listeners: Mutex<Vec<mpsc::Sender<Event>>>,
}

/// What an attached client's session is told.
enum Event {
    Output(Output),
    /// The client's stdin ended: the session ends.
    Detach,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl AttachPoint {
    /// The point of a container whose stdin stays open for attached clients (or `None`).
    pub fn new(input: Option<StdioInputHalf>) -> AttachPoint {
        AttachPoint {
            input: Mutex::new(input),
            listeners: Mutex::default(),
        }
    }

    /// Hands `output` to every attached client; a client gone is dropped.
    pub fn publish(&self, output: &Output) {
        lock(&self.listeners)
            .retain(|listener| listener.send(Event::Output(output.clone())).is_ok());
    }

    /// Ends every attachment (the container exited).
    pub fn close(&self) {
        lock(&self.listeners).clear();
        lock(&self.input).take();
    }

    /// A new client's events, and a sender for its own session to end it.
    fn listen(&self) -> (mpsc::Receiver<Event>, mpsc::Sender<Event>) {
        let (tx, rx) = mpsc::channel();
        lock(&self.listeners).push(tx.clone());
        (rx, tx)
    }
}

/// Serves streaming sessions for the runtime.
pub struct SessionHandler(pub Arc<Runtime>);

impl Handler for SessionHandler {
    fn serve(&self, request: Request, streams: Streams) -> Result<i32, String> {
        match &request.kind {
            RequestKind::Exec { cmd } => self.exec(&request, cmd.clone(), streams),
            RequestKind::Attach => self.attach(&request, streams),
            RequestKind::PortForward { .. } => Err("a port forward has no streams".to_owned()),
        }
    }

    fn forward(&self, sandbox_id: &str, port: u16) -> Result<Box<dyn PortConnection>, String> {
        let conn = self
            .0
            .forward_tcp(sandbox_id, port)
            .map_err(|e| e.message().to_owned())?;
        tracing::debug!(pod = sandbox_id, port, "port forward");
        Ok(Box::new(conn))
    }
}

impl SessionHandler {
    fn exec(
        &self,
        request: &Request,
        cmd: Vec<String>,
        mut streams: Streams,
    ) -> Result<i32, String> {
        let Exec {
            record,
            agent,
            exec_id,
            attachment,
        } = self
            .0
            .start_exec(&request.target_id, cmd, request.tty)
            .map_err(|e| e.message().to_owned())?;
        tracing::info!(container = %record.id, exec_id, tty = request.tty, "exec session");
        let (input, output) = attachment.split();
        let input = Arc::new(Mutex::new(input));
        forward_input(streams.stdin.take(), streams.resize.take(), &input);
        // The process must not outlive its session: a client that goes away while the process
        // is quiet is noticed by the watch, one that goes away while it writes by the copy
        // failing.
        let killer = Arc::new(Killer {
            agent: Mutex::new(Some(agent)),
            container: record.id.clone(),
            exec_id,
        });
        let done = Arc::new(AtomicBool::new(false));
        {
            let (killer, done, hangup) = (
                Arc::clone(&killer),
                Arc::clone(&done),
                streams.hangup.clone(),
            );
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(HANGUP_CHECK);
                    if hangup.happened() && !done.load(Ordering::SeqCst) {
                        killer.kill();
                    }
                }
            });
        }
        let result = copy_output(output, &streams);
        done.store(true, Ordering::SeqCst);
        if result.is_err() {
            killer.kill();
        }
        result
    }

    fn attach(&self, request: &Request, mut streams: Streams) -> Result<i32, String> {
        let record = self
            .0
            .running_container(&request.target_id)
            .map_err(|e| e.message().to_owned())?;
        let point = self
            .0
            .attach_point(&record.id)
            .ok_or_else(|| format!("container {} has no stdio to attach to", record.id))?;
        tracing::info!(container = %record.id, "attach session");
        let (events, detach) = point.listen();
        if let Some(stdin) = streams.stdin.take() {
            let point = Arc::clone(&point);
            // At this client's EOF, as containerd does: a `stdin_once` container without a
            // terminal has its stdin closed; otherwise the session ends and the container's
            // stdin stays open for the next client.
            let close_stdin = record.stdin_once && !record.tty;
            std::thread::spawn(move || {
                while let Some(chunk) = stdin.next_chunk() {
                    if let Some(input) = lock(&point.input).as_mut() {
                        if input.write_stdin(&chunk).is_err() {
                            return;
                        }
                    }
                }
                if close_stdin {
                    let taken = lock(&point.input).take();
                    if let Some(mut input) = taken {
                        let _ = input.close_stdin();
                    }
                } else {
                    let _ = detach.send(Event::Detach);
                }
            });
        }
        if let Some(resize) = streams.resize.take() {
            let point = Arc::clone(&point);
            std::thread::spawn(move || {
                while let Some(size) = resize.next_size() {
                    if let Some(input) = lock(&point.input).as_mut() {
                        let _ = input.resize(u32::from(size.height), u32::from(size.width));
                    }
                }
            });
        }
        loop {
            let event = match events.recv_timeout(HANGUP_CHECK) {
                Ok(Event::Output(event)) => event,
                Ok(Event::Detach) => return Ok(0),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if streams.hangup.happened() {
                        return Err("the client went away".into());
                    }
                    continue;
                }
                // The container exited and its pump closed the point.
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(0),
            };
            // The session ends with the container; its exit code is its status's, not the
            // session's.
            if copy_event(event, &streams)?.is_some() {
                return Ok(0);
            }
        }
    }
}

/// Kills an exec'd process once, through the agent connection that started it.
struct Killer {
    agent: Mutex<Option<AgentClient>>,
    container: String,
    exec_id: String,
}

impl Killer {
    fn kill(&self) {
        if let Some(mut agent) = lock(&self.agent).take() {
            tracing::info!(container = %self.container, exec_id = %self.exec_id, "the exec session's client went away: killing its process");
            let _ = agent.signal_process(&self.container, &self.exec_id, libc::SIGKILL);
        }
    }
}

/// Copies stdin chunks and terminal sizes from the client into the process, on threads of
/// their own; closes the process's stdin at the client's stdin EOF (or at once without stdin).
fn forward_input(stdin: Option<Stdin>, resize: Option<Resize>, input: &Arc<Mutex<StdioInputHalf>>) {
    match stdin {
        Some(stdin) => {
            let input = Arc::clone(input);
            std::thread::spawn(move || {
                while let Some(chunk) = stdin.next_chunk() {
                    if lock(&input).write_stdin(&chunk).is_err() {
                        return;
                    }
                }
                let _ = lock(&input).close_stdin();
            });
        }
        None => {
            let _ = lock(input).close_stdin();
        }
    }
    if let Some(resize) = resize {
        let input = Arc::clone(input);
        std::thread::spawn(move || {
            while let Some(size) = resize.next_size() {
                if lock(&input)
                    .resize(u32::from(size.height), u32::from(size.width))
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

/// Copies the process's output to the client until it exits; returns its exit code.
fn copy_output(mut output: StdioOutputHalf, streams: &Streams) -> Result<i32, String> {
    loop {
        let event = output
            .next_output()
            .map_err(|e| format!("the process's output ended: {e}"))?;
        if let Some(code) = copy_event(event, streams)? {
            return Ok(code);
        }
    }
}

/// Copies one output event; `Some(exit code)` at the exit. Output for a stream the client did
/// not ask for is dropped.
fn copy_event(event: Output, streams: &Streams) -> Result<Option<i32>, String> {
    let write = |stream: &Option<OutputStream>, data: &[u8]| match stream {
        Some(stream) => stream
            .write(data)
            .map_err(|e| format!("writing to the client: {e}")),
        None => Ok(()),
    };
    match event {
        Output::Stdout(data) => write(&streams.stdout, &data)?,
        Output::Stderr(data) => write(&streams.stderr, &data)?,
        Output::StdoutEof | Output::StderrEof => {}
        Output::Exit(status) => return Ok(Some(exit_code(&status))),
    }
    Ok(None)
}
