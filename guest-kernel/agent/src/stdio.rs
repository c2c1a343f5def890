//! The stdio channel (vsock port 1025): one connection per process. After the `attach` frame
//! the agent starts reading the process's pipes (or pty master), so output produced before the
//! attachment waited in the kernel's buffer; it sends `stdout`/`stderr` frames, one EOF per
//! stream, then `exit` once the process has exited, and closes. Host frames write stdin, close
//! it (`stdin_eof`; on a terminal, a ^D) or resize the terminal.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use nix::sys::socket::Shutdown;
use std::sync::{Arc, Mutex};

use crx_agent_proto::{
    read_frame, stdio_input, stdio_output, write_frame, Empty, ErrorCode, StdioInput, StdioOutput,
    STDIO_CHUNK,
};

use crate::container::{set_window_size, Agent};
use crate::spawn::ProcessIo;
use crate::{fail, lock};

type Sink = Arc<Mutex<File>>;

fn send(sink: &Sink, kind: stdio_output::Kind) -> bool {
    match write_frame(&mut *lock(sink), &StdioOutput::of(kind)) {
        Ok(()) => true,
        Err(e) => {
            // On the console, which the host shows when a stream ends without its exit status.
            eprintln!("crx-agent: stdio: cannot write to the host: {e}");
            false
        }
    }
}

/// Serves one stdio connection.
pub fn serve(agent: &Agent, conn: File) {
    let Ok(writer) = conn.try_clone() else {
        return;
    };
    let sink: Sink = Arc::new(Mutex::new(writer));
    let mut reader = conn;
    let attach = match read_frame::<_, StdioInput>(&mut reader) {
        Ok(Some(StdioInput {
            kind: Some(stdio_input::Kind::Attach(target)),
        })) => target,
        Ok(None) => return,
        Ok(Some(_)) => {
            let e = fail(
                ErrorCode::BadRequest,
                "the first stdio frame must be attach",
            );
            send(&sink, stdio_output::Kind::Error(e));
            return;
        }
        Err(e) => {
            send(
                &sink,
                stdio_output::Kind::Error(fail(ErrorCode::BadRequest, e.to_string())),
            );
            return;
        }
    };
    // Attached as soon as the process exists, so the host can attach before StartContainer;
    // its stdio is taken once it has started.
    let (container, process) = match agent.process(&attach) {
        Ok(found) => found,
        Err(e) => {
            send(&sink, stdio_output::Kind::Error(e));
            return;
        }
    };
    if !send(&sink, stdio_output::Kind::Attached(Empty {})) {
        return;
    }
    if crate::verbose() {
        eprintln!("crx-agent: stdio attached to {attach:?}");
    }
    let (pid, io) = match process.take_io() {
        Ok(taken) => taken,
        Err(e) => {
            send(&sink, stdio_output::Kind::Error(e));
            return;
        }
    };
    let (stdin, outputs) = match io {
        ProcessIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => (
            Some(File::from(stdin)),
            vec![
                (File::from(stdout), Stream::Stdout),
                (File::from(stderr), Stream::Stderr),
            ],
        ),
        ProcessIo::Pty { master } => {
            let master = File::from(master);
            (master.try_clone().ok(), vec![(master, Stream::Terminal)])
        }
    };
    let terminal = matches!(outputs.first(), Some((_, Stream::Terminal)));
    std::thread::scope(|scope| {
        let pumps: Vec<_> = outputs
            .into_iter()
            .map(|(source, stream)| {
                let sink = &sink;
                scope.spawn(move || pump(source, stream, sink))
            })
            .collect();
        scope.spawn(|| {
            for pump in pumps {
                let _ = pump.join();
            }
            send(
                &sink,
                stdio_output::Kind::Exit(agent.exit_status(&container, pid)),
            );
            // Ends the input loop below too.
            let _ = nix::sys::socket::shutdown(lock(&sink).as_raw_fd(), Shutdown::Both);
        });
        input(&mut reader, stdin, terminal);
    });
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
    /// A pty master: stdout only; EIO when the last slave closes is its end.
    Terminal,
}

fn pump(mut source: File, stream: Stream, sink: &Sink) {
    let mut buf = vec![0u8; STDIO_CHUNK];
    loop {
        match source.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let data = buf[..n].to_vec();
                let kind = match stream {
                    Stream::Stderr => stdio_output::Kind::Stderr(data),
                    _ => stdio_output::Kind::Stdout(data),
                };
                if !send(sink, kind) {
                    break;
                }
            }
        }
    }
    let eof = match stream {
        Stream::Stderr => stdio_output::Kind::StderrEof(Empty {}),
        _ => stdio_output::Kind::StdoutEof(Empty {}),
    };
    send(sink, eof);
}

/// Host frames until the connection ends.
fn input(reader: &mut File, mut stdin: Option<File>, terminal: bool) {
    while let Ok(Some(frame)) = read_frame::<_, StdioInput>(reader) {
        match frame.kind {
            Some(stdio_input::Kind::Stdin(data)) => {
                if let Some(pipe) = &mut stdin {
                    if pipe.write_all(&data).is_err() {
                        stdin = None;
                    }
                }
            }
            Some(stdio_input::Kind::StdinEof(_)) => {
                if terminal {
                    if let Some(master) = &mut stdin {
                        let _ = master.write_all(&[4]); // VEOF
                    }
                }
                stdin = None;
            }
            Some(stdio_input::Kind::Resize(size)) => {
                if let (true, Some(master)) = (terminal, &stdin) {
                    let _ = set_window_size(master, size.rows, size.cols);
                }
            }
            Some(stdio_input::Kind::Attach(_)) | None => {}
        }
    }
}
