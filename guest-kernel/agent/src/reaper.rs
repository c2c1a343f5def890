//! PID 1's reaper: one thread collects every child that exits (containers' processes, orphans
//! re-parented to the agent, tools it runs) and keeps the exit status of the processes the agent
//! spawned until they are forgotten.
//!
//! Race-free with `std::process::Command::spawn` (which itself reaps a child whose exec fails):
//! spawns happen under the table lock, and the reaper only learns *that* a child exited
//! (`waitid(WNOWAIT)`), then takes the lock and reaps it with `waitpid(pid, WNOHANG)`. So a
//! spawn's failed child is reaped by std first, and a quickly exiting child is already in the
//! table when its status is recorded.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::lock;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Default)]
pub struct Reaper {
    /// Spawned processes: `None` while running.
    table: Mutex<HashMap<Pid, Option<Exit>>>,
    changed: Condvar,
}

impl Reaper {
    /// Runs `spawn` (which forks exactly one child and returns its pid) and tracks the child.
    pub fn spawn<E>(&self, spawn: impl FnOnce() -> Result<Pid, E>) -> Result<Pid, E> {
        let mut table = lock(&self.table);
        let pid = spawn()?;
        table.insert(pid, None);
        self.changed.notify_all();
        Ok(pid)
    }

    /// Blocks until `pid` (spawned through [`Reaper::spawn`]) has exited.
    pub fn wait(&self, pid: Pid) -> Exit {
        let mut table = lock(&self.table);
        loop {
            if let Some(Some(exit)) = table.get(&pid) {
                return *exit;
            }
            table = self.changed.wait(table).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The exit of `pid` if it has exited.
    pub fn status(&self, pid: Pid) -> Option<Exit> {
        lock(&self.table).get(&pid).copied().flatten()
    }

    /// Stops keeping `pid`'s status.
    pub fn forget(&self, pid: Pid) {
        lock(&self.table).remove(&pid);
    }

    /// The reaper thread's loop; never returns.
    pub fn run(&self) -> ! {
        loop {
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(status) => {
                    if let Some(pid) = status.pid() {
                        self.reap(lock(&self.table), pid);
                    }
                }
                Err(Errno::ECHILD) => {
                    // No children: sleep until a spawn (or a second, for tools' children).
                    let table = lock(&self.table);
                    let _ = self.changed.wait_timeout(table, Duration::from_secs(1));
                }
                Err(_) => {}
            }
        }
    }

    fn reap(&self, mut table: MutexGuard<'_, HashMap<Pid, Option<Exit>>>, pid: Pid) {
        let exit = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Exit::Code(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => Exit::Signal(signal as i32),
            _ => return, // reaped by std's spawn meanwhile, or not exited after all
        };
        if let Some(slot) = table.get_mut(&pid) {
            *slot = Some(exit);
            self.changed.notify_all();
        }
    }
}
