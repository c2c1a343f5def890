//! A container's main process or an exec'd one as containerd sees it: the stdio FIFOs
//! containerd gave, whether it started, its exit. Once started, a thread copies the process's
//! output from the guest agent into the stdout/stderr FIFOs (and one the stdin FIFO into the
//! agent) until the exit, which it records and publishes as a `TaskExit` event.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::types::task::Status;
use crx_runtime::agent::{Output, StdioAttachment, StdioInputHalf, StdioOutputHalf};

/// The status of a process whose end was not seen (its VM or agent went away).
const LOST_EXIT_STATUS: u32 = 255;

/// The FIFOs containerd opened for a process (empty: none).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// How a process ended.
#[derive(Debug, Clone)]
pub struct Exit {
    pub status: u32,
    pub at: Timestamp,
}

/// One process of a task.
pub struct Process {
    /// The container; and the exec id (empty: the container's main process).
    pub container_id: String,
    pub exec_id: String,
    pub stdio: StdioPaths,
    state: Mutex<ProcessState>,
    exited: Condvar,
    input: Mutex<Option<StdioInputHalf>>,
}

#[derive(Default)]
struct ProcessState {
    started: bool,
    exit: Option<Exit>,
}

/// Where exits are announced.
pub trait ExitSink: Send + Sync {
    fn publish_exit(&self, event: TaskExit);
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, stdio: StdioPaths) -> Arc<Process> {
        Arc::new(Process {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            state: Mutex::default(),
            exited: Condvar::new(),
            input: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, ProcessState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> Status {
        let state = self.state();
        match (&state.exit, state.started) {
            (Some(_), _) => Status::STOPPED,
            (None, true) => Status::RUNNING,
            (None, false) => Status::CREATED,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        self.state().exit.clone()
    }

    pub fn is_running(&self) -> bool {
        self.status() == Status::RUNNING
    }

    /// Blocks until the process has exited.
    pub fn wait(&self) -> Exit {
        let mut state = self.state();
        loop {
            if let Some(exit) = &state.exit {
                return exit.clone();
            }
            state = self.exited.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Records the exit (the first one counts) and announces it as the `pid`'s.
    pub fn set_exited(&self, status: u32, pid: u32, sink: &dyn ExitSink) {
        let exit = {
            let mut state = self.state();
            if state.exit.is_some() {
                return;
            }
            let exit = Exit { status, at: now() };
            state.exit = Some(exit.clone());
            exit
        };
        self.exited.notify_all();
        tracing::info!(container = %self.container_id, exec = %self.exec_id, status, "process exited");
        sink.publish_exit(TaskExit {
            container_id: self.container_id.clone(),
            id: if self.exec_id.is_empty() {
                self.container_id.clone()
            } else {
                self.exec_id.clone()
            },
            pid,
            exit_status: status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        });
    }

    /// Marks the process started and runs its stdio: the agent's output into the FIFOs until
    /// the exit (recorded for `pid` and announced through `sink`), the stdin FIFO into the agent.
    pub fn run_stdio(
        self: &Arc<Self>,
        attachment: StdioAttachment,
        pid: u32,
        sink: Arc<dyn ExitSink>,
    ) -> std::io::Result<()> {
        self.state().started = true;
        let (input, output) = attachment.split();
        *self.input.lock().unwrap_or_else(|e| e.into_inner()) = Some(input);
        if !self.stdio.stdin.is_empty() {
            let process = self.clone();
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || process.copy_stdin())?;
        }
        let process = self.clone();
        std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || {
                let status = process.copy_output(output);
                process.set_exited(status, pid, sink.as_ref());
            })?;
        Ok(())
    }

    fn with_input<T>(
        &self,
        f: impl FnOnce(&mut StdioInputHalf) -> Result<T, crx_runtime::agent::AgentError>,
    ) -> Option<Result<T, crx_runtime::agent::AgentError>> {
        self.input
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(f)
    }

    /// Closes the process's stdin (containerd's CloseIO).
    pub fn close_stdin(&self) {
        if let Some(Err(e)) = self.with_input(|input| input.close_stdin()) {
            tracing::debug!(container = %self.container_id, "closing stdin: {e}");
        }
    }

    /// Resizes the process's terminal.
    pub fn resize(&self, rows: u32, cols: u32) {
        if let Some(Err(e)) = self.with_input(|input| input.resize(rows, cols)) {
            tracing::debug!(container = %self.container_id, "resizing the terminal: {e}");
        }
    }

    fn copy_stdin(&self) {
        let mut fifo = match File::open(&self.stdio.stdin) {
            Ok(fifo) => fifo,
            Err(e) => {
                tracing::warn!(container = %self.container_id, "opening stdin {}: {e}", self.stdio.stdin);
                return;
            }
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match fifo.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !matches!(self.with_input(|i| i.write_stdin(&buf[..n])), Some(Ok(()))) {
                        return;
                    }
                }
            }
        }
        self.close_stdin();
    }

    /// Copies output until the exit; returns the exit status. The FIFOs are written by
    /// threads of their own, so a FIFO nobody reads never holds up the exit.
    fn copy_output(&self, mut output: StdioOutputHalf) -> u32 {
        let mut stdout = FifoWriter::start(&self.stdio.stdout);
        let mut stderr = if self.stdio.terminal {
            None
        } else {
            FifoWriter::start(&self.stdio.stderr)
        };
        let status = loop {
            match output.next_output() {
                Ok(Output::Stdout(data)) => FifoWriter::send(&stdout, data),
                Ok(Output::Stderr(data)) => FifoWriter::send(&stderr, data),
                Ok(Output::StdoutEof) => FifoWriter::finish(stdout.take()),
                Ok(Output::StderrEof) => FifoWriter::finish(stderr.take()),
                Ok(Output::Exit(exit)) => break crx_runtime::pod::exit_code(&exit) as u32,
                Err(e) => {
                    tracing::warn!(container = %self.container_id, exec = %self.exec_id, "lost the process's stdio: {e}");
                    break LOST_EXIT_STATUS;
                }
            }
        };
        FifoWriter::finish(stdout);
        FifoWriter::finish(stderr);
        status
    }
}

/// Chunks of output a FIFO's writer holds while its reader is slow (or absent); more are
/// dropped.
const FIFO_BACKLOG: usize = 256;
/// How long the end of a process waits for its output to reach the FIFOs.
const FIFO_FLUSH: Duration = Duration::from_secs(2);

/// A thread writing output into one of containerd's FIFOs.
struct FifoWriter {
    chunks: SyncSender<Vec<u8>>,
    done: Receiver<()>,
}

impl FifoWriter {
    /// The writer of FIFO `path` (none when the path is empty).
    fn start(path: &str) -> Option<FifoWriter> {
        if path.is_empty() {
            return None;
        }
        let (chunks, queue) = mpsc::sync_channel::<Vec<u8>>(FIFO_BACKLOG);
        let (finished, done) = mpsc::channel();
        let path = path.to_owned();
        let spawned = std::thread::Builder::new()
            .name("fifo".into())
            .spawn(move || {
                // Opening blocks until containerd (or ctr) reads.
                match OpenOptions::new().write(true).open(&path) {
                    Ok(mut fifo) => {
                        for chunk in queue {
                            if fifo.write_all(&chunk).is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => tracing::warn!("opening {path}: {e}"),
                }
                let _ = finished.send(());
            });
        if let Err(e) = spawned {
            tracing::warn!("a thread for a FIFO: {e}");
            return None;
        }
        Some(FifoWriter { chunks, done })
    }

    fn send(writer: &Option<FifoWriter>, data: Vec<u8>) {
        if let Some(writer) = writer {
            if let Err(TrySendError::Full(_)) = writer.chunks.try_send(data) {
                tracing::debug!("a FIFO's reader is behind; output dropped");
            }
        }
    }

    /// Closes the FIFO once what was sent is written (or [`FIFO_FLUSH`] has passed).
    fn finish(writer: Option<FifoWriter>) {
        if let Some(FifoWriter { chunks, done }) = writer {
            drop(chunks);
            let _ = done.recv_timeout(FIFO_FLUSH);
        }
    }
}

/// The time now as a protobuf timestamp (the crate's, which fails only for a clock before 1970).
pub fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}
