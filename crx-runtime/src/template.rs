//! Pod templates: a sandbox VM booted once, up to the point where its agent answers, then
//! snapshotted (`crx-vmm --snapshot-on-sigusr1`); every later sandbox of the same shape is
//! restored from it (`crx-vmm --restore`) instead of booting a kernel.
//!
//! A template fits a sandbox when its [`TemplateKey`] is equal: the identity (path, size,
//! modification time, inode) of the `crx-vmm` binary, the guest kernel and initrd, the vCPU
//! count, memory size and virtio-fs shares by tag. Any input that changes makes a new key, so
//! a changed kernel or VMM gets a new template on first use. Templates live under
//! `<run root>/templates/<key hash>/` (`vmstate`, `memory`, `key.json`), made under a lock by
//! whichever process needs one first (or `crx template build`), in a `.building` directory
//! renamed into place only when complete.
//!
//! The template's virtio-fs shares are empty directories the guest never mounts (the agent
//! mounts a share when a container first needs it), which is what lets a snapshot hold them:
//! the restored VM gets new virtiofsd processes on the pod's own directories. Its vsock
//! connections are reset by the restore, and each `Hello` the host sends carries fresh
//! entropy that the agent reseeds the guest's CRNG with, so no two pods share random state.
//!
//! A sandbox with a pod network has a template with a network device: made on a throwaway tap
//! in a namespace of its own (it dies with the template VM), and restored onto the pod's tap.
//! The guest's interface stays down until the agent configures it, with the pod's MAC,
//! addresses and routes, so nothing of the template's network survives into a pod.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crx_virtio::devices::tap::{Tap, TapError};

use crate::agent::{AgentClient, AgentError};
use crate::network::{link::TAP_NAME, netns};
use crate::sandbox::{SandboxConfig, Share};

/// The template directory's key file.
const KEY_FILE: &str = "key.json";
/// The snapshot's state file (written last by `crx-vmm`, so its presence means complete).
const STATE_FILE: &str = "vmstate";
/// How long a template VM may take to boot to its agent, and to write its snapshot.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
/// The MAC of a template's network device (a locally administered one; every pod restored
/// from the template gets its own).
const TEMPLATE_MAC: &str = "02:00:00:00:00:01";

/// Why a template could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the VMM {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the template VM's agent did not answer ({source}); its log:\n{log}")]
    Agent {
        #[source]
        source: AgentError,
        log: String,
    },
    #[error("the template VM did not write its snapshot ({status}); its log:\n{log}")]
    Snapshot { status: String, log: String },
    #[error(
        "template directory {0} is too long for the Unix sockets in it: use a shorter run root"
    )]
    PathTooLong(PathBuf),
    #[error("cannot make the template VM's throwaway tap: {0}")]
    Tap(#[from] TapError),
    #[error("cannot make a network namespace for the template VM's tap: {0}")]
    Netns(#[source] io::Error),
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A file as a template depends on it: replaced or rewritten, it no longer matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileIdentity {
    path: PathBuf,
    len: u64,
    modified_ns: i128,
    inode: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> Result<FileIdentity, TemplateError> {
        let meta = fs::metadata(path).map_err(io_error("cannot read", path))?;
        Ok(FileIdentity {
            path: path.to_owned(),
            len: meta.len(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
        })
    }
}

/// Everything a template's VM is made of: a sandbox fits it when its key is equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateKey {
    vmm: FileIdentity,
    kernel: FileIdentity,
    initrd: Option<FileIdentity>,
    vcpus: u8,
    mem_mib: u32,
    /// The shares' tags and read-only flags (their directories are each pod's own).
    shares: Vec<(String, bool)>,
    container_share: bool,
    /// Whether the VM has a network device (its tap and MAC are each pod's own).
    network: bool,
}

impl TemplateKey {
    /// The key of `config`'s VM.
    pub fn of(config: &SandboxConfig) -> Result<TemplateKey, TemplateError> {
        // What crx-vmm boots: the default guest's kernel and initrd unless given a kernel.
        let (kernel, initrd) = match &config.kernel {
            Some(kernel) => (kernel.clone(), config.initrd.clone()),
            None => {
                let guest = crx_core::builder::default_guest_dir();
                let initrd = config
                    .initrd
                    .clone()
                    .unwrap_or_else(|| guest.join("initrd.cpio"));
                (guest.join("vmlinux"), Some(initrd))
            }
        };
        Ok(TemplateKey {
            vmm: FileIdentity::of(&config.vmm)?,
            kernel: FileIdentity::of(&kernel)?,
            initrd: initrd.as_deref().map(FileIdentity::of).transpose()?,
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            shares: config
                .shares
                .iter()
                .map(|s| (s.tag.clone(), s.read_only))
                .collect(),
            container_share: config.container_share,
            network: config.network.is_some(),
        })
    }

    /// The template's name: a hash of the key.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).expect("a key serializes");
        let hash = Sha256::digest(&json);
        hash[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Where templates live under a run root.
pub fn templates_dir(run_root: &Path) -> PathBuf {
    run_root.join("templates")
}

/// The template directory for `key` (which may not exist yet).
pub fn template_dir(run_root: &Path, key: &TemplateKey) -> PathBuf {
    templates_dir(run_root).join(key.id())
}

/// The template `config`'s VM can be restored from, made now if there is none yet.
pub fn find_or_build(run_root: &Path, config: &SandboxConfig) -> Result<PathBuf, TemplateError> {
    let key = TemplateKey::of(config)?;
    let dir = template_dir(run_root, &key);
    if dir.join(STATE_FILE).exists() {
        return Ok(dir);
    }
    let parent = templates_dir(run_root);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .map_err(io_error("cannot create", &parent))?;
    // One builder at a time; whoever waited finds the template made.
    let lock_path = parent.join(".lock");
    let lock = fs::File::create(&lock_path).map_err(io_error("cannot create", &lock_path))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_error("cannot lock", &lock_path)(e.into()))?;
    if !dir.join(STATE_FILE).exists() {
        build(config, &key, &dir)?;
    }
    Ok(dir)
}

/// Removes a template that failed to restore, so the next sandbox makes it again.
pub fn discard(dir: &Path) {
    tracing::warn!(template = %dir.display(), "discarding the pod template");
    if let Err(e) = fs::remove_dir_all(dir) {
        tracing::warn!(template = %dir.display(), "cannot remove the pod template: {e}");
    }
}

/// Boots `config`'s VM on empty shares, waits for its agent, snapshots it into `dir`.
fn build(config: &SandboxConfig, key: &TemplateKey, dir: &Path) -> Result<(), TemplateError> {
    let started = Instant::now();
    // One build at a time (under the lock), in a short path: the VM's sockets are made in it.
    let work = dir.with_file_name(".new");
    if !crate::sandbox::sockets_fit_in(&work) {
        return Err(TemplateError::PathTooLong(work));
    }
    let _ = fs::remove_dir_all(&work);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .map_err(io_error("cannot create", &work))?;
    let result = build_in(config, key, &work).and_then(|snapshot| {
        fs::rename(&snapshot, dir).map_err(io_error("cannot move into place", dir))
    });
    let _ = fs::remove_dir_all(&work);
    result?;
    tracing::info!(
        template = %dir.display(),
        "pod template made in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build_in(
    config: &SandboxConfig,
    key: &TemplateKey,
    work: &Path,
) -> Result<PathBuf, TemplateError> {
    let empty = work.join("empty");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&empty)
        .map_err(io_error("cannot create", &empty))?;
    let shares: Vec<Share> = config
        .shares
        .iter()
        .map(|s| Share {
            dir: empty.clone(),
            ..s.clone()
        })
        .collect();
    let container_share = config.container_share.then_some(empty.as_path());
    let snapshot = work.join("snapshot");
    let log_path = work.join("vmm.log");
    let log = fs::File::create(&log_path).map_err(io_error("cannot create", &log_path))?;
    let log_err = log
        .try_clone()
        .map_err(io_error("cannot duplicate", &log_path))?;
    let mut cmd = crate::sandbox::vmm_command(
        config,
        crate::sandbox::VmmStart::Boot,
        work,
        &shares,
        container_share,
    );
    // Open until the VMM has it (and the VMM's copy dies with the template VM).
    let tap = key.network.then(throwaway_tap).transpose()?;
    if let Some(tap) = &tap {
        crate::sandbox::pass_tap(&mut cmd, tap.as_fd(), TEMPLATE_MAC);
    }
    cmd.arg("--snapshot-on-sigusr1")
        .arg(&snapshot)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0);
    let mut child = VmmChild(cmd.spawn().map_err(|source| TemplateError::Spawn {
        path: config.vmm.clone(),
        source,
    })?);
    drop(tap);
    let log_tail = || fs::read_to_string(&log_path).unwrap_or_default();
    // The agent answering is the point every pod starts from; the connection is closed again
    // (the snapshot resets vsock connections anyway).
    AgentClient::connect_while_running(&work.join("vsock"), Instant::now() + BUILD_TIMEOUT, || {
        matches!(child.0.try_wait(), Ok(None))
    })
    .map_err(|source| TemplateError::Agent {
        source,
        log: log_tail(),
    })?;
    // SAFETY: kill(2) on our own child, not yet waited for, so its pid is still ours.
    if unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGUSR1) } != 0 {
        return Err(io_error("cannot signal", &config.vmm)(
            io::Error::last_os_error(),
        ));
    }
    let status = child.wait(BUILD_TIMEOUT)?;
    if !status.is_some_and(|s| s.success()) || !snapshot.join(STATE_FILE).exists() {
        return Err(TemplateError::Snapshot {
            status: status.map_or("timed out".into(), |s| s.to_string()),
            log: log_tail(),
        });
    }
    let key_path = snapshot.join(KEY_FILE);
    let mut file = fs::File::create(&key_path).map_err(io_error("cannot create", &key_path))?;
    file.write_all(&serde_json::to_vec_pretty(key).expect("a key serializes"))
        .map_err(io_error("cannot write", &key_path))?;
    Ok(snapshot)
}

/// A tap for a template VM's network device, in a network namespace of its own that nothing
/// else joins, so the template's guest is connected to nothing (its interface stays down).
fn throwaway_tap() -> Result<OwnedFd, TemplateError> {
    let tap = netns::run_in_new(|| Tap::open(TAP_NAME)).map_err(TemplateError::Netns)??;
    Ok(OwnedFd::from(tap))
}

/// The template VM's process: killed if dropped while it runs.
struct VmmChild(Child);

impl VmmChild {
    /// Its exit status, or `None` if it did not exit within `timeout`.
    fn wait(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<std::process::ExitStatus>, TemplateError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) => return Ok(Some(status)),
                Ok(None) if Instant::now() >= deadline => return Ok(None),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(io_error("cannot wait for", Path::new("crx-vmm"))(e)),
            }
        }
    }
}

impl Drop for VmmChild {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn config(dir: &Path) -> SandboxConfig {
        for name in ["vmm", "vmlinux", "initrd"] {
            fs::write(dir.join(name), name).unwrap();
        }
        SandboxConfig {
            id: "p".into(),
            vcpus: 1,
            mem_mib: 128,
            kernel: Some(dir.join("vmlinux")),
            initrd: Some(dir.join("initrd")),
            shares: vec![Share {
                tag: "rootfs".into(),
                dir: dir.join("a"),
                read_only: true,
            }],
            vmm: dir.join("vmm"),
            labels: BTreeMap::new(),
            network: None,
            container_share: false,
            template: true,
        }
    }

    #[test]
    fn a_key_changes_with_any_input_but_not_with_the_share_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let base = config(tmp.path());
        let id = TemplateKey::of(&base).unwrap().id();
        let mut other_dir = base.clone();
        other_dir.shares[0].dir = tmp.path().join("b");
        assert_eq!(TemplateKey::of(&other_dir).unwrap().id(), id);

        let mut more_memory = base.clone();
        more_memory.mem_mib = 256;
        assert_ne!(TemplateKey::of(&more_memory).unwrap().id(), id);
        let mut writable = base.clone();
        writable.shares[0].read_only = false;
        assert_ne!(TemplateKey::of(&writable).unwrap().id(), id);

        // A new kernel (another file in its place) is another template.
        let replacement = tmp.path().join("vmlinux.new");
        fs::write(&replacement, "a rebuilt kernel").unwrap();
        fs::rename(&replacement, tmp.path().join("vmlinux")).unwrap();
        assert_ne!(TemplateKey::of(&base).unwrap().id(), id);
    }

    #[test]
    fn a_missing_kernel_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let mut missing = config(tmp.path());
        missing.kernel = Some(tmp.path().join("no-such-kernel"));
        assert!(matches!(
            TemplateKey::of(&missing),
            Err(TemplateError::Io { .. })
        ));
    }
}
