//! Runs one requested command: streams its stdout and stderr back as they come, sends
//! heartbeats while it is quiet, and ends with its wait status. A client that goes away gets the
//! command's process group killed; whatever the command leaves running is killed with its cgroup
//! before the wait status is sent.

use std::ffi::OsString;
use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crx_testhost::protocol::{Reply, RunRequest, HEARTBEAT_INTERVAL};

use crate::cgroup::CommandCgroup;
use crate::cpu_pin::CpuPin;

/// After the command exits, how long to wait for the rest of its output (a background process
/// it left may hold the pipes open for good).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// One of the two pipes reached its end.
    Closed,
    Exited(io::Result<ExitStatus>),
}

/// Runs `request` (on `pin`'s CPU, if given) and answers on `stream`.
pub fn run(request: RunRequest, pin: Option<CpuPin>, mut stream: TcpStream) -> io::Result<()> {
    let argv: Vec<OsString> = request.argv.into_iter().map(OsString::from_vec).collect();
    let Some((program, args)) = argv.split_first() else {
        return Reply::Failure("empty command".into()).write_to(&mut stream);
    };
    let cwd = OsString::from_vec(request.cwd);
    let cgroup = CommandCgroup::create()
        .map_err(|e| tracing::warn!("no cgroup of its own for the command: {e}"))
        .ok()
        .map(Arc::new);
    let mut command = Command::new(program);
    if let Some(cgroup) = &cgroup {
        let cgroup = Arc::clone(cgroup);
        // SAFETY: the hook only calls write(2), which is async-signal-safe.
        unsafe { command.pre_exec(move || cgroup.enter_from_child()) };
    }
    if let Some(pin) = &pin {
        let cpu = pin.cpu;
        // The threads this one starts below, which carry the command's output, inherit it.
        if let Err(e) = CpuPin::restrict_current_thread(cpu) {
            tracing::warn!("cannot pin the command's output threads to CPU {cpu}: {e}");
        }
        // SAFETY: the hook only calls sched_setaffinity(2), which is async-signal-safe.
        unsafe { command.pre_exec(move || CpuPin::restrict_current_thread(cpu)) };
    }
    let spawned = command
        .args(args)
        .current_dir(&cwd)
        .envs(
            request
                .env
                .into_iter()
                .map(|(k, v)| (OsString::from_vec(k), OsString::from_vec(v))),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let message = format!(
                "cannot run {} in {}: {e}",
                program.to_string_lossy(),
                cwd.to_string_lossy()
            );
            return Reply::Failure(message).write_to(&mut stream);
        }
    };
    let process_group = child.id();
    tracing::debug!(pid = process_group, "running {}", program.to_string_lossy());

    let (events, received) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    pump(stdout, events.clone(), Event::Stdout);
    pump(stderr, events.clone(), Event::Stderr);
    std::thread::spawn(move || {
        let _ = events.send(Event::Exited(child.wait()));
    });
    let finished = Arc::new(AtomicBool::new(false));
    kill_when_client_leaves(&stream, process_group, Arc::clone(&finished))?;

    let result = forward(&received, &mut stream);
    finished.store(true, Ordering::SeqCst);
    if result.is_err() {
        kill_group(process_group);
    }
    let left = cgroup.map(|c| c.kill_all()).unwrap_or_default();
    let result = result.and_then(|status| {
        if !left.is_empty() {
            let note = format!(
                "crx-testhost: killed what the command left running: {}\n",
                left.join(", ")
            );
            Reply::Stderr(note.into_bytes()).write_to(&mut stream)?;
        }
        Reply::Exit(status.into_raw()).write_to(&mut stream)
    });
    let _ = stream.shutdown(Shutdown::Both);
    result
}

/// Sends output and heartbeats until the command has exited and its output is drained; returns
/// its wait status.
fn forward(received: &mpsc::Receiver<Event>, stream: &mut TcpStream) -> io::Result<ExitStatus> {
    let mut open_pipes = 2;
    let mut exit: Option<(ExitStatus, Instant)> = None;
    loop {
        if let Some((status, exited_at)) = exit {
            if open_pipes == 0 || exited_at.elapsed() >= OUTPUT_GRACE {
                return Ok(status);
            }
        }
        let wait = match exit {
            Some((_, exited_at)) => OUTPUT_GRACE.saturating_sub(exited_at.elapsed()),
            None => HEARTBEAT_INTERVAL,
        };
        match received.recv_timeout(wait) {
            Ok(Event::Stdout(bytes)) => Reply::Stdout(bytes).write_to(stream)?,
            Ok(Event::Stderr(bytes)) => Reply::Stderr(bytes).write_to(stream)?,
            Ok(Event::Closed) => open_pipes -= 1,
            Ok(Event::Exited(status)) => exit = Some((status?, Instant::now())),
            Err(RecvTimeoutError::Timeout) if exit.is_none() => {
                Reply::Heartbeat.write_to(stream)?
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(io::Error::other("the command's threads are gone"));
            }
        }
    }
}

/// Reads `pipe` on a thread, sending chunks as `wrap` events, then `Closed`.
fn pump(
    mut pipe: impl Read + Send + 'static,
    events: mpsc::Sender<Event>,
    wrap: fn(Vec<u8>) -> Event,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if events.send(wrap(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = events.send(Event::Closed);
    });
}

/// Kills the command's process group if the client closes the connection before it finished.
fn kill_when_client_leaves(
    stream: &TcpStream,
    process_group: u32,
    finished: Arc<AtomicBool>,
) -> io::Result<()> {
    let mut watch = stream.try_clone()?;
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        // The client sends nothing after its request: any return means it left (or we shut down).
        let _ = watch.read(&mut byte);
        if !finished.load(Ordering::SeqCst) {
            tracing::info!(pid = process_group, "client left; killing the command");
            kill_group(process_group);
        }
    });
    Ok(())
}

fn kill_group(process_group: u32) {
    let Ok(pgid) = libc::pid_t::try_from(process_group) else {
        return;
    };
    // SAFETY: kill(2) takes no pointers; the negative pid names the command's own process group.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}
