//! [`TestHost`]: a handle on the run's shared L1 that runs commands in it.

use std::io::Write;
use std::process::{ExitStatus, Output};
use std::sync::Mutex;

use crate::client::{self, RunError, Stream};
use crate::error::Error;
use crate::invocation::Invocation;
use crate::lifecycle::{self, Instance, RunningHost};
use crate::protocol::Status;
use crate::run_lock::RunLock;
use crate::settings::Settings;

/// The run's test host: one L1 shared by every process of a test run (see the crate docs).
pub struct TestHost {
    settings: Settings,
    /// Replaced when a hung L1 is restarted.
    instance: Mutex<Instance>,
}

impl TestHost {
    /// Connects to the run's test host, starting it if needed (building its boot assets and
    /// agent first if those are missing).
    pub fn shared() -> Result<TestHost, Error> {
        let settings = Settings::from_env()?;
        let instance = {
            let lock = lock_run_dir(&settings)?;
            lifecycle::ensure(&settings, &lock)?
        };
        Ok(TestHost {
            settings,
            instance: Mutex::new(instance),
        })
    }

    /// The running test host of this run, if any; starts nothing.
    pub fn running() -> Result<Option<RunningHost>, Error> {
        let settings = Settings::from_env()?;
        let lock = lock_run_dir(&settings)?;
        lifecycle::running(&settings, &lock)
    }

    /// Powers off the run's test host if one runs; returns whether one did.
    pub fn stop() -> Result<bool, Error> {
        let settings = Settings::from_env()?;
        let lock = lock_run_dir(&settings)?;
        lifecycle::stop(&settings, &lock)
    }

    /// The pid of the L1's QEMU (the same for every handle on the same L1).
    pub fn qemu_pid(&self) -> u32 {
        self.current().pid
    }

    /// The agent's status, with a `/dev/kvm` probe in the L1.
    pub fn status(&self) -> Result<Status, Error> {
        client::ping(&self.current().agent, true, self.settings.hang_timeout)
    }

    /// Runs `cmd` in the test host; its output is captured.
    pub fn run(&self, cmd: &Invocation) -> Result<Output, Error> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = self.run_with(cmd, &mut |stream, bytes| match stream {
            Stream::Stdout => stdout.extend_from_slice(bytes),
            Stream::Stderr => stderr.extend_from_slice(bytes),
        })?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Runs `cmd` in the test host, writing its output to this process's stdout and stderr as it
    /// comes.
    pub fn run_streaming(&self, cmd: &Invocation) -> Result<ExitStatus, Error> {
        self.run_with(cmd, &mut |stream, bytes| {
            // Like a child process writing to our terminal: a closed stdout is not our error.
            let _ = match stream {
                Stream::Stdout => write_flush(&mut std::io::stdout().lock(), bytes),
                Stream::Stderr => write_flush(&mut std::io::stderr().lock(), bytes),
            };
        })
    }

    /// Runs `cmd` in the test host, handing each output chunk to `sink` as it comes.
    ///
    /// If the L1 stops answering (no output or heartbeat for `CRX_TESTHOST_HANG_SECS`), its
    /// registers are dumped into the run dir, it is replaced by a fresh one and `cmd` runs once
    /// more there.
    pub fn run_with(
        &self,
        cmd: &Invocation,
        sink: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, Error> {
        let request = cmd.to_request()?;
        let instance = self.current();
        let lost = match client::run(
            &instance.agent,
            request.clone(),
            self.settings.hang_timeout,
            sink,
        ) {
            Ok(status) => return Ok(status),
            Err(RunError::Failed(e)) => return Err(e),
            Err(RunError::Lost { error, started }) => {
                tracing::warn!(
                    "lost the test host while running {}: {error}",
                    cmd.program()
                );
                if started {
                    sink(
                        Stream::Stderr,
                        b"crx-testhost: the test host stopped answering; running the command again in a checked or restarted one\n",
                    );
                }
                error
            }
        };
        let fresh = {
            let lock = lock_run_dir(&self.settings)?;
            lifecycle::replace(&self.settings, &lock, &instance)?
        };
        *self.instance.lock().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        client::run(&fresh.agent, request, self.settings.hang_timeout, sink).map_err(|e| match e {
            RunError::Failed(e) => e,
            RunError::Lost { error, .. } => {
                Error::Unresponsive(format!("{error} (after a retry; first: {lost})"))
            }
        })
    }

    fn current(&self) -> Instance {
        self.instance
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn lock_run_dir(settings: &Settings) -> Result<RunLock, Error> {
    std::fs::create_dir_all(&settings.run_dir)
        .map_err(Error::io("cannot create the run dir", &settings.run_dir))?;
    RunLock::acquire(&settings.run_dir)
}

fn write_flush(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(bytes)?;
    out.flush()
}
