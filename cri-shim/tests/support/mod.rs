//! Test support: a real `crx-cri` process on a scratch socket and store, the real `crictl` and
//! `critest` (cri-tools v1.32 in `../shared/cri-tools/bin`) pointed at it, a gRPC client for
//! requests crictl cannot make, and CRX's bundled busybox layout built by
//! `images/build-busybox.sh`.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crx_test_support::crx_cri::CrxCri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// `../shared/cri-tools` beside the workspace (`CRX_CRI_TOOLS` overrides).
pub fn cri_tools() -> PathBuf {
    std::env::var_os("CRX_CRI_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/cri-tools"))
}

/// A cri-tools binary (`crictl`, `critest`); fails the test when it is missing.
pub fn cri_tool(name: &str) -> PathBuf {
    let path = cri_tools().join("bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: the CRI tests need cri-tools v1.32 (crictl, critest) in ../shared/cri-tools/bin (or $CRX_CRI_TOOLS/bin)",
        path.display()
    );
    path
}

/// A scratch directory for sockets: not on a 9p or overlay /tmp, where Unix sockets may not be
/// creatable.
pub fn socket_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("crx-cri-test-")
        .tempdir_in("/run")
        .expect("a scratch directory under /run")
}

/// A running `crx-cri`, stopped with SIGTERM on drop.
pub struct CriServer {
    pub socket: PathBuf,
    pub store: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl CriServer {
    /// Start `crx-cri` with `config` (TOML, after a debug `log_level`) written to
    /// `dir/config.toml`, listening on `socket`, its state in `dir/state`, its log in
    /// `dir/crx-cri.log`.
    pub fn start(dir: &Path, socket: &Path, store: &Path, config: &str) -> CriServer {
        let cri = CrxCri {
            binary: Path::new(env!("CARGO_BIN_EXE_crx-cri")),
            dir,
            socket,
            store,
            config: &format!("log_level = \"crx_cri=debug,crx_image=debug,info\"\n{config}"),
        };
        let child = cri.start();
        CriServer {
            socket: socket.to_owned(),
            store: store.to_owned(),
            log: cri.log(),
            child: Some(child),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, wait for the exit; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run `crictl` against this server.
    pub fn crictl(&self, args: &[&str]) -> Output {
        self.crictl_command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run crictl")
    }

    /// `crictl ARGS` against this server, not yet run.
    pub fn crictl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(cri_tool("crictl"));
        cmd.arg("--runtime-endpoint")
            .arg(self.endpoint())
            .arg("--image-endpoint")
            .arg(self.endpoint())
            .args(["--timeout", "300s"])
            .args(args);
        cmd
    }

    /// Run `crictl` with `input` on its stdin (then closed).
    pub fn crictl_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .crictl_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run crictl");
        let mut stdin = child.stdin.take().expect("piped stdin");
        std::io::Write::write_all(&mut stdin, input).expect("write crictl's stdin");
        drop(stdin);
        child.wait_with_output().expect("wait for crictl")
    }

    /// Run `crictl` and return its stdout; fails the test (with crictl's and crx-cri's output)
    /// unless it succeeds.
    pub fn crictl_ok(&self, args: &[&str]) -> String {
        let out = self.crictl(args);
        assert!(
            out.status.success(),
            "crictl {args:?} failed: {}\n{}\ncrx-cri log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `crictl -o json ARGS` parsed.
    pub fn crictl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.splice(0..0, args.iter().take(1).copied());
        all.extend(args.iter().skip(1));
        let text = self.crictl_ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("crictl {all:?}: {e}: {text}"))
    }

    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .expect("connect to crx-cri")
    }

    pub async fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
    }

    pub async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel().await)
    }
}

impl Drop for CriServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CRX's bundled busybox image (an OCI layout, tag `latest`) built into `out` by
/// `images/build-busybox.sh`.
pub fn build_busybox(out: &Path) -> PathBuf {
    let status = Command::new(workspace().join("images/build-busybox.sh"))
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .expect("run images/build-busybox.sh");
    assert!(status.success(), "images/build-busybox.sh failed");
    out.to_owned()
}
