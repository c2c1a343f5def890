//! Running the command as PID 1: spawning it, reaping every child until it exits, and turning
//! its wait status into the exit status CRX reports.

use std::ffi::OsString;
use std::process::Command;

/// Exit status when the command cannot be executed (as in shells).
pub const STATUS_EXEC_FAILED: u32 = 127;
/// Exit status when waiting for the command fails (should not happen).
pub const STATUS_INTERNAL_ERROR: u32 = 126;

/// The command line init was asked to run: `argv[1..]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: OsString,
    pub args: Vec<OsString>,
}

impl Invocation {
    /// `args` are init's arguments without argv[0]; `None` if there are none (or the first is
    /// empty), i.e. there is no command to run.
    pub fn from_args(args: impl IntoIterator<Item = OsString>) -> Option<Invocation> {
        let mut args = args.into_iter();
        let program = args.next().filter(|p| !p.is_empty())?;
        Some(Invocation {
            program,
            args: args.collect(),
        })
    }
}

/// The exit status of a child from its raw wait status: the exit code, or 128 + the signal
/// number if a signal killed it (as shells report it).
pub fn status_from_wait(wstatus: libc::c_int) -> u32 {
    if libc::WIFEXITED(wstatus) {
        libc::WEXITSTATUS(wstatus) as u32
    } else if libc::WIFSIGNALED(wstatus) {
        128 + libc::WTERMSIG(wstatus) as u32
    } else {
        STATUS_INTERNAL_ERROR
    }
}

/// Runs `inv` (stdio inherited: the console), reaps every child that exits meanwhile (init
/// adopts orphans), and returns the command's status.
pub fn run(inv: &Invocation) -> u32 {
    let child = match Command::new(&inv.program).args(&inv.args).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("crx-init: cannot execute {:?}: {e}", inv.program);
            return STATUS_EXEC_FAILED;
        }
    };
    let pid = child.id() as libc::pid_t;
    // `child` is never waited on through std: its status is collected by waitpid(-1) below,
    // and dropping a std Child neither kills nor waits.
    drop(child);
    loop {
        let mut wstatus: libc::c_int = 0;
        // SAFETY: waitpid(2) with a valid pointer to a local c_int.
        let reaped = unsafe { libc::waitpid(-1, &mut wstatus, 0) };
        if reaped == pid {
            return status_from_wait(wstatus);
        }
        if reaped < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("crx-init: waitpid: {err}");
            return STATUS_INTERNAL_ERROR;
        }
        // some other (orphaned) process: reaped, keep waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn no_arguments_means_no_command() {
        assert_eq!(Invocation::from_args(os(&[])), None);
        assert_eq!(Invocation::from_args(os(&[""])), None);
    }

    #[test]
    fn first_argument_is_the_program() {
        let inv = Invocation::from_args(os(&["/bin/sh", "-c", "echo hi; exit 3"])).unwrap();
        assert_eq!(inv.program, "/bin/sh");
        assert_eq!(inv.args, os(&["-c", "echo hi; exit 3"]));
        let inv = Invocation::from_args(os(&["true"])).unwrap();
        assert!(inv.args.is_empty());
    }

    #[test]
    fn exit_codes_pass_through() {
        // wait status layout on Linux: exit code in bits 8..16, low 7 bits 0
        assert_eq!(status_from_wait(0), 0);
        assert_eq!(status_from_wait(3 << 8), 3);
        assert_eq!(status_from_wait(255 << 8), 255);
    }

    #[test]
    fn signals_become_128_plus_signal() {
        assert_eq!(status_from_wait(libc::SIGKILL), 137);
        assert_eq!(status_from_wait(libc::SIGTERM), 143);
        // SIGSEGV with the core-dump bit
        assert_eq!(status_from_wait(libc::SIGSEGV | 0x80), 139);
    }

    // Real processes on the host, through the same code as in the guest. One test only:
    // run() reaps with waitpid(-1), which would steal children of tests in parallel threads.
    #[test]
    fn runs_commands_and_reports_status() {
        let run_sh =
            |script: &str| run(&Invocation::from_args(os(&["/bin/sh", "-c", script])).unwrap());
        assert_eq!(run_sh("exit 0"), 0);
        assert_eq!(run_sh("exit 3"), 3);
        assert_eq!(run_sh("kill -9 $$"), 137);
        // an orphan-ish extra child exits first and is reaped on the way
        assert_eq!(run_sh("(exit 5) & sleep 0.1; exit 7"), 7);
        let missing = Invocation::from_args(os(&["/nonexistent/crx-init-test"])).unwrap();
        assert_eq!(run(&missing), STATUS_EXEC_FAILED);
    }
}
