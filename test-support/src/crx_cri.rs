//! A real `crx-cri` process for tests and benches: its configuration written to a scratch
//! directory, started on a Unix socket of the caller's and waited for until it listens. How it
//! is stopped stays with the caller.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::spawn_listening;

/// Where and how to run one `crx-cri`.
pub struct CrxCri<'a> {
    /// The `crx-cri` binary.
    pub binary: &'a Path,
    /// Holds `config.toml`, the state (`state/`) and the log ([`CrxCri::log`]).
    pub dir: &'a Path,
    /// The socket it listens on.
    pub socket: &'a Path,
    /// Its image store (`--image-root`).
    pub store: &'a Path,
    /// The text of its configuration file.
    pub config: &'a str,
}

impl CrxCri<'_> {
    /// Its stdout and stderr: `dir/crx-cri.log`.
    pub fn log(&self) -> PathBuf {
        self.dir.join("crx-cri.log")
    }

    /// Starts it and returns once it accepts connections on `socket`; panics, with its log, if
    /// it exits before or does not listen in time.
    pub fn start(&self) -> Child {
        std::fs::create_dir_all(self.dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", self.dir.display()));
        let config = self.dir.join("config.toml");
        std::fs::write(&config, self.config)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        spawn_listening(
            Command::new(self.binary)
                .arg("--config")
                .arg(&config)
                .arg("--listen")
                .arg(format!("unix://{}", self.socket.display()))
                .arg("--state-dir")
                .arg(self.dir.join("state"))
                .arg("--image-root")
                .arg(self.store),
            &self.log(),
            self.socket,
        )
    }
}
