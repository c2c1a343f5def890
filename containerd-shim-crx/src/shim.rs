//! The shim's lifecycle as containerd drives it: `start` (spawn, or reuse, the one shim process
//! of the pod the task belongs to), `delete` (clean up after a shim that is gone) and the
//! settings every shim reads from CRX's configuration file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};
use crx_runtime::sandbox::Sandbox;
use oci_spec::runtime::Spec;

use crate::service::Service;

/// The runtime name containerd knows the shim by (`runtime_type`).
pub const RUNTIME_ID: &str = "io.containerd.crx.v2";
/// The annotation containerd's CRI puts on every container of a pod: the pod's id.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// Where the shims keep their pod VMs' sandbox directories.
pub const RUN_ROOT: &str = "/run/crx/containerd";
/// The environment variable naming CRX's configuration file (default
/// [`crx_cri::config::DEFAULT_CONFIG`]); containerd passes its environment on to shims.
pub const CONFIG_ENV: &str = "CRX_CONFIG";
/// Sandbox ids are cut to this length: a pod VM's sockets must fit in a Unix socket path.
const SANDBOX_ID_LEN: usize = 32;

/// How the shim makes pod VMs: `[runtime]` of CRX's configuration file.
#[derive(Debug, Clone)]
pub struct Settings {
    pub run_root: PathBuf,
    pub runtime: crx_cri::config::RuntimeConfig,
    pub vmm: PathBuf,
}

impl Settings {
    pub fn load() -> Result<Settings, containerd_shim::Error> {
        let (path, required) = match std::env::var_os(CONFIG_ENV) {
            Some(path) => (PathBuf::from(path), true),
            None => (PathBuf::from(crx_cri::config::DEFAULT_CONFIG), false),
        };
        let config = crx_cri::config::Config::load(&path, required)
            .map_err(|e| containerd_shim::Error::InvalidArgument(e.to_string()))?;
        let vmm = config
            .runtime
            .vmm_path()
            .map_err(|e| containerd_shim::Error::Other(format!("the crx-vmm binary: {e}")))?;
        Ok(Settings {
            run_root: RUN_ROOT.into(),
            runtime: config.runtime,
            vmm,
        })
    }
}

/// The id of the pod VM of the pod whose id (or, outside a pod, whose task's id) is `group`.
pub fn sandbox_id(group: &str) -> String {
    group.chars().take(SANDBOX_ID_LEN).collect()
}

/// The pod a task belongs to, from its bundle's spec: the CRI's sandbox id, else its own id.
fn grouping(bundle: &Path, id: &str) -> String {
    Spec::load(bundle.join("config.json"))
        .ok()
        .and_then(|spec| spec.annotations().clone())
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION).cloned())
        .unwrap_or_else(|| id.to_owned())
}

pub struct CrxShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
}

impl containerd_shim::Shim for CrxShim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        CrxShim {
            exit: Arc::default(),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
        }
    }

    /// Every task of a pod goes to the pod's one shim (and VM): the socket address is the
    /// pod's, and a shim already serving it is reused.
    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        let bundle = std::env::current_dir()
            .map_err(|e| containerd_shim::Error::Other(format!("the bundle directory: {e}")))?;
        let group = grouping(&bundle, &opts.id);
        let (_pid, address) = containerd_shim::spawn(opts, &group, Vec::new())?;
        Ok(address)
    }

    /// containerd's cleanup after a shim that died: the task's rootfs mount and, if the task
    /// was its pod VM's, the VM and its sandbox.
    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        if let Ok(bundle) = std::env::current_dir() {
            let _ = crate::rootfs::unmount(&bundle.join("rootfs"));
        }
        if let Ok(settings) = Settings::load() {
            if let Ok(sandbox) = Sandbox::open(&settings.run_root, &sandbox_id(&self.id)) {
                if let Err(e) = sandbox.remove(Duration::ZERO) {
                    tracing::warn!(id = %self.id, "removing the pod VM of a gone shim: {e}");
                }
            }
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(crate::process::now()).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        // Without settings the service answers every create with why.
        let settings = Settings::load().map_err(|e| e.to_string());
        Service::new(
            settings,
            self.namespace.clone(),
            publisher,
            self.exit.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_tasks_share_one_shim_and_vm() {
        let bundle = tempfile::tempdir().expect("a bundle");
        let write = |annotations: serde_json::Value| {
            let spec = serde_json::json!({"ociVersion": "1.0.2", "annotations": annotations});
            std::fs::write(bundle.path().join("config.json"), spec.to_string())
                .expect("config.json");
        };
        write(serde_json::json!({SANDBOX_ID_ANNOTATION: "pod-1"}));
        assert_eq!(grouping(bundle.path(), "container-1"), "pod-1");
        write(serde_json::json!({}));
        assert_eq!(grouping(bundle.path(), "container-1"), "container-1");
        assert_eq!(sandbox_id(&"a".repeat(64)).len(), SANDBOX_ID_LEN);
    }
}
