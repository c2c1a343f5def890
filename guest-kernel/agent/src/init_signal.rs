//! Signals to a container's main process, which is PID 1 of its pid namespace: the kernel drops
//! every signal such an init has no handler for (SIGKILL aside). A stop's SIGTERM sent right
//! after start, before the program installed its handlers (a slow guest takes a while to get
//! there), would be lost and the stop would wait out its whole grace period; such a signal is
//! delivered again once a handler shows up (what runc's fast start makes unnecessary on a fast
//! host). A signal the process ignores, or one it never catches, is not retried.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a dropped signal waits for its handler (the CRI's SIGKILL comes after its grace).
const REDELIVERY_WINDOW: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

/// What `pid` does with `signal` now, from `/proc/<pid>/status`; `None` when it is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disposition {
    Default,
    Caught,
    Ignored,
}

/// Sends `signal` to the init `pid`; if the kernel is going to drop it (no handler yet), sends
/// it again, from a thread, once the process installs one.
pub fn send(pid: Pid, signal: Signal) -> nix::Result<()> {
    let dropped = !matches!(signal, Signal::SIGKILL | Signal::SIGSTOP)
        && disposition(pid, signal) == Some(Disposition::Default);
    kill(pid, signal)?;
    if dropped {
        if let Some(started) = start_time(pid) {
            std::thread::spawn(move || redeliver_once_caught(pid, started, signal));
        }
    }
    Ok(())
}

fn redeliver_once_caught(pid: Pid, started: u64, signal: Signal) {
    let deadline = Instant::now() + REDELIVERY_WINDOW;
    while Instant::now() < deadline {
        std::thread::sleep(POLL);
        if start_time(pid) != Some(started) {
            return; // exited (and maybe its pid reused)
        }
        match disposition(pid, signal) {
            Some(Disposition::Default) => continue,
            Some(Disposition::Caught) => {
                eprintln!("crx-agent: {signal} to {pid} again, now that it has a handler");
                let _ = kill(pid, signal);
                return;
            }
            Some(Disposition::Ignored) | None => return,
        }
    }
}

fn disposition(pid: Pid, signal: Signal) -> Option<Disposition> {
    let status = process(pid)?.status().ok()?;
    let bit = 1u64 << (signal as i32 - 1);
    Some(if status.sigign & bit != 0 {
        Disposition::Ignored
    } else if status.sigcgt & bit != 0 {
        Disposition::Caught
    } else {
        Disposition::Default
    })
}

/// The process's start time (clock ticks after boot, `/proc/<pid>/stat` field 22): tells it
/// apart from a later process given the same pid.
fn start_time(pid: Pid) -> Option<u64> {
    Some(process(pid)?.stat().ok()?.starttime)
}

fn process(pid: Pid) -> Option<procfs::process::Process> {
    procfs::process::Process::new(pid.as_raw()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_processs_own_dispositions_and_start_time_are_read() {
        let me = Pid::this();
        assert!(start_time(me).is_some());
        assert_eq!(
            disposition(me, Signal::SIGWINCH),
            Some(Disposition::Default)
        );
        assert_eq!(disposition(Pid::from_raw(i32::MAX), Signal::SIGTERM), None);
    }

    /// A pid namespace's init that installs its SIGTERM handler late still gets the SIGTERM
    /// sent before (needs root, as the agent has).
    #[test]
    fn a_sigterm_sent_before_the_inits_handler_is_delivered_once_it_has_one() {
        let mut unshare = std::process::Command::new("unshare")
            .args(["--fork", "--pid", "sh", "-c"])
            .arg("sleep 0.5; trap 'exit 7' TERM; while :; do sleep 0.05; done")
            .spawn()
            .expect("unshare(1)");
        let children = format!("/proc/{0}/task/{0}/children", unshare.id());
        let init = loop {
            let text = std::fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next() {
                break Pid::from_raw(pid.parse().unwrap());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(
            disposition(init, Signal::SIGTERM),
            Some(Disposition::Default)
        );
        send(init, Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = unshare.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = kill(init, Signal::SIGKILL);
                panic!("the init never got its SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(7), "the trap's exit status");
    }
}
