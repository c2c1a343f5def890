//! [`Invocation`]: a command to run in the test host (argv, working directory, environment).

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::error::Error;
use crate::protocol::RunRequest;

/// A command for [`crate::TestHost::run`]: argv, working directory (default: this process's),
/// and variables set on top of the test host's base environment (`PATH`, `HOME=/root`).
/// Stdin is `/dev/null`.
#[derive(Debug, Clone)]
pub struct Invocation {
    argv: Vec<OsString>,
    cwd: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl Invocation {
    pub fn new<I, S>(argv: I) -> Invocation
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Invocation {
            argv: argv.into_iter().map(Into::into).collect(),
            cwd: None,
            env: Vec::new(),
        }
    }

    /// Runs in `dir` (the same path exists in the test host) instead of the current directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Invocation {
        self.cwd = Some(dir.into());
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Invocation {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn envs<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Invocation
    where
        K: Into<OsString>,
        V: Into<OsString>,
    {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// The program, for messages.
    pub fn program(&self) -> String {
        self.argv
            .first()
            .map_or_else(String::new, |p| p.to_string_lossy().into_owned())
    }

    pub(crate) fn to_request(&self) -> Result<RunRequest, Error> {
        if self.argv.is_empty() {
            return Err(Error::Spawn {
                program: String::new(),
                message: "empty command".into(),
            });
        }
        let cwd = match &self.cwd {
            Some(dir) => dir.clone(),
            None => std::env::current_dir()
                .map_err(Error::io("cannot read the current directory", "."))?,
        };
        let bytes = |s: &OsString| s.as_bytes().to_vec();
        Ok(RunRequest {
            argv: self.argv.iter().map(bytes).collect(),
            cwd: cwd.as_os_str().as_bytes().to_vec(),
            env: self.env.iter().map(|(k, v)| (bytes(k), bytes(v))).collect(),
        })
    }
}
