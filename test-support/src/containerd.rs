//! Debian's containerd for tests and benches: its own root, state, socket, log and CNI
//! configuration under one directory, its CRI plugin pulling from a local registry over plain
//! HTTP, optionally with more runtimes (containerd's RuntimeClass handlers) beside runc, and
//! `ctr` against it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::cni::{BridgeNetwork, CNI_BIN};
use crate::spawn_listening;

/// How long one `ctr` command may take (it then exits 124).
pub const CTR_TIMEOUT: Duration = Duration::from_secs(180);

/// A runtime containerd's CRI plugin offers besides runc.
pub struct ExtraRuntime<'a> {
    /// The RuntimeClass handler name.
    pub handler: &'a str,
    /// containerd's `runtime_type`, e.g. `io.containerd.crx.v2`.
    pub runtime_type: &'a str,
}

/// What to start containerd with.
pub struct ContainerdConfig<'a> {
    /// The registry (`host:port`) reached over plain HTTP; the pause image is its `pause:pause`.
    pub registry: &'a str,
    /// The CRI pod network.
    pub network: BridgeNetwork<'a>,
    pub runtimes: &'a [ExtraRuntime<'a>],
    /// Directories put first on containerd's `PATH` (where it finds shims).
    pub path: &'a [PathBuf],
    /// More environment for containerd and so its shims.
    pub env: &'a [(&'a str, &'a Path)],
}

/// A running containerd, killed when dropped.
pub struct Containerd {
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Child,
}

impl Containerd {
    /// Starts containerd with everything under `dir`; waits until it listens.
    pub fn start(dir: &Path, config: &ContainerdConfig<'_>) -> Containerd {
        for tool in ["containerd", "containerd-shim-runc-v2", "runc", "ctr"] {
            crate::require_tool(tool);
        }
        std::fs::create_dir_all(dir).expect("containerd's dir");
        let net = dir.join("net.d");
        config.network.write(&net);
        let socket = dir.join("containerd.sock");
        let mut toml = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{registry}/pause:pause"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{net}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            registry = config.registry,
            net = net.display(),
        );
        if !config.runtimes.is_empty() {
            // Naming any runtime replaces the default set, runc included.
            toml.push_str(
                "  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n    runtime_type = \"io.containerd.runc.v2\"\n",
            );
        }
        for runtime in config.runtimes {
            toml.push_str(&format!(
                "  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{}]\n    runtime_type = \"{}\"\n",
                runtime.handler, runtime.runtime_type
            ));
        }
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, toml).expect("containerd's config");
        let log = dir.join("containerd.log");
        let path = std::env::join_paths(config.path.iter().cloned().chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )))
        .expect("a PATH");
        let child = spawn_listening(
            Command::new("containerd")
                .arg("--config")
                .arg(&config_path)
                .env("PATH", path)
                .envs(config.env.iter().map(|(k, v)| (k, v))),
            &log,
            &socket,
        );
        Containerd { socket, log, child }
    }

    /// The CRI endpoint, for crictl.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctr` in containerd namespace `namespace`, killed after [`CTR_TIMEOUT`].
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg(CTR_TIMEOUT.as_secs().to_string())
            .arg("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
