//! The test host's settings: where things live and how big the L1 is, from the environment.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `CRX_CACHE_DIR` | `$HOME/.cache/crx` | boot assets go to `<it>/testhost/<hash>/` |
//! | `CARGO_TARGET_DIR` | `<workspace>/target` | the run dir is `<it>/testhost/`; relative: to the workspace |
//! | `CRX_TESTHOST_RUN_DIR` | `<target>/testhost` | the run dir: one L1 per run dir |
//! | `CRX_TESTHOST_MEM_MIB` | 6144 | L1 RAM |
//! | `CRX_TESTHOST_CPUS` | 2 | L1 vCPUs |
//! | `CRX_TESTHOST_IDLE_SECS` | 600 | the L1 powers off after this long without a request |
//! | `CRX_TESTHOST_BOOT_SECS` | 120 | give up on an L1 whose agent does not answer by then |
//! | `CRX_TESTHOST_HANG_SECS` | 180 | a command whose L1 sends nothing (not even a heartbeat) this long means a hung L1 |
//! | `CRX_TESTHOST_PIN` | 1 | 0: commands run on every L1 CPU, not only on CPUs 1..n (see the agent's `cpu_pin`) |
//! | `CRX_TESTHOST_RW` | – | extra writable shares, `:`-separated absolute paths |
//! | `CRX_TESTHOST_QEMU` | `qemu-system-x86_64` | the QEMU binary |
//! | `CRX_TESTHOST_AGENT` | built with cargo | a prebuilt `crx-testhost-agent` to use |

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;

/// Everything configurable about the test host, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub workspace_root: PathBuf,
    pub target_dir: PathBuf,
    /// `<target>/testhost`: lock, state, monitor socket, logs of the running L1.
    pub run_dir: PathBuf,
    /// `<cache>/testhost`: boot assets by hash of their inputs.
    pub assets_cache: PathBuf,
    pub mem_mib: u32,
    pub cpus: u32,
    pub idle_shutdown: Duration,
    pub boot_timeout: Duration,
    pub hang_timeout: Duration,
    /// Commands run pinned off the L1's CPU 0 (QEMU's emulated SVM faults less so).
    pub pin_commands: bool,
    /// Host directories the L1 mounts writable at the same paths.
    pub writable_paths: Vec<PathBuf>,
    pub qemu: PathBuf,
    pub prebuilt_agent: Option<PathBuf>,
}

impl Settings {
    pub fn from_env() -> Result<Settings, Error> {
        // This crate lives at <workspace>/testhost.
        let workspace_root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the crate has a parent directory")
            .to_path_buf();
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => workspace_root.join(dir),
            None => workspace_root.join("target"),
        };
        let cache_dir = match std::env::var_os("CRX_CACHE_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let home = std::env::var_os("HOME").ok_or_else(|| Error::Setting {
                    name: "HOME",
                    value: String::new(),
                    reason: "unset, and CRX_CACHE_DIR is unset too".into(),
                })?;
                Path::new(&home).join(".cache/crx")
            }
        };
        let mut writable_paths = vec![
            PathBuf::from("/tmp"),
            workspace_root.clone(),
            target_dir.clone(),
            cache_dir.clone(),
        ];
        if let Some(extra) = std::env::var_os("CRX_TESTHOST_RW") {
            writable_paths
                .extend(std::env::split_paths(&extra).filter(|p| !p.as_os_str().is_empty()));
        }
        let settings = Settings {
            run_dir: std::env::var_os("CRX_TESTHOST_RUN_DIR")
                .map_or_else(|| target_dir.join("testhost"), PathBuf::from),
            assets_cache: cache_dir.join("testhost"),
            workspace_root,
            target_dir,
            mem_mib: number("CRX_TESTHOST_MEM_MIB", 6144)?,
            cpus: number("CRX_TESTHOST_CPUS", 2)?,
            idle_shutdown: Duration::from_secs(number("CRX_TESTHOST_IDLE_SECS", 600)?),
            boot_timeout: Duration::from_secs(number("CRX_TESTHOST_BOOT_SECS", 120)?),
            hang_timeout: Duration::from_secs(number("CRX_TESTHOST_HANG_SECS", 180)?),
            pin_commands: number::<u8>("CRX_TESTHOST_PIN", 1)? != 0,
            writable_paths,
            qemu: std::env::var_os("CRX_TESTHOST_QEMU")
                .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from),
            prebuilt_agent: std::env::var_os("CRX_TESTHOST_AGENT").map(PathBuf::from),
        };
        for path in &settings.writable_paths {
            check_share_path("CRX_TESTHOST_RW", path)?;
        }
        check_share_path("CRX_TESTHOST_RUN_DIR", &settings.run_dir)?;
        check_share_path("CRX_CACHE_DIR", &settings.assets_cache)?;
        Ok(settings)
    }
}

fn number<T: std::str::FromStr>(name: &'static str, default: T) -> Result<T, Error>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) => value.parse().map_err(|e: T::Err| Error::Setting {
            name,
            value,
            reason: e.to_string(),
        }),
        Err(_) => Ok(default),
    }
}

/// The L1's /init reads paths from a shell-sourced file and a kernel command line: keep them plain.
fn check_share_path(name: &'static str, path: &Path) -> Result<(), Error> {
    let text = path.to_str().unwrap_or("");
    let plain = path.is_absolute()
        && !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_graphic() && !"\"'`$\\;&|<>()*?[]{}=".contains(c));
    if plain {
        Ok(())
    } else {
        Err(Error::Setting {
            name,
            value: path.display().to_string(),
            reason: "the test host needs absolute paths without spaces, quotes or shell characters"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_paths_must_be_plain_and_absolute() {
        assert!(check_share_path("X", Path::new("/work/main/target")).is_ok());
        assert!(check_share_path("X", Path::new("relative")).is_err());
        assert!(check_share_path("X", Path::new("/a b")).is_err());
        assert!(check_share_path("X", Path::new("/a=b")).is_err());
    }
}
