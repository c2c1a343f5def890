//! crx-test-support: what CRX's tests and benches share (a dev-dependency only): a real Debian
//! `docker-registry` on a free loopback port (own config, storage and log), OCI layouts written
//! by hand ([`layout`]), the bundled busybox image built as an OCI layout, pushes with
//! `skopeo`, a throttling TCP proxy ([`proxy`]), CNI bridge networks ([`cni`]), Debian's
//! containerd ([`containerd`]), a real `crx-cri` ([`crx_cri`]) and daemons waited for until they
//! listen ([`spawn_listening`]).

pub mod cni;
pub mod containerd;
pub mod crx_cri;
pub mod layout;
pub mod proxy;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`spawn_listening`] waits for a daemon's socket (generous: in the KVM test host
/// every instruction is emulated).
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(120);

/// Fail (never skip) when a tool the tests need is missing.
pub fn require_tools() {
    for tool in ["docker-registry", "skopeo", "umoci"] {
        require_tool(tool);
    }
    assert!(
        Path::new("/bin/busybox").is_file(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
}

/// Panics unless `tool` is a file in a `PATH` directory, naming the list of packages setup.sh
/// installs.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    assert!(
        found,
        "`{tool}` is not installed (setup/apt-packages.txt lists its package; ./setup.sh installs it)"
    );
}

/// Builds the bundled busybox image (`images/build-busybox.sh`, as setup.sh does) as an OCI
/// layout at `dest`; panics with the script's stderr if it fails.
pub fn build_busybox_layout(dest: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build-busybox.sh");
    let built = Command::new(&script)
        .arg(dest)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        built.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&built.stderr)
    );
}

/// Starts daemon `cmd` (stdin null, stdout and stderr to `log`, truncated) and returns once
/// it accepts connections on Unix socket `socket`; panics, with the log, if it exits before
/// or does not listen within [`LISTEN_TIMEOUT`] (then it is killed).
pub fn spawn_listening(cmd: &mut Command, log: &Path, socket: &Path) -> Child {
    let out = std::fs::File::create(log)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot reopen {}: {e}", log.display()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    let what = Path::new(cmd.get_program()).display();
    let read_log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}):\n{}", read_log());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not listen on {}:\n{}",
                socket.display(),
                read_log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A registry under `dir` holding the bundled busybox as `busybox:latest` and a pause image
/// (the same layer, sleeping) as `pause:pause`, the sandbox image of a containerd under test.
pub fn registry_with_busybox_and_pause(dir: &Path) -> Registry {
    require_tools();
    let layout = dir.join("busybox");
    build_busybox_layout(&layout);
    let pause = Command::new("umoci")
        .args(["config", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .args([
            "--tag",
            "pause",
            "--config.entrypoint",
            "/bin/sleep",
            "--config.cmd",
            "2147483647",
        ])
        .output()
        .expect("run umoci");
    assert!(
        pause.status.success(),
        "umoci config: {}",
        String::from_utf8_lossy(&pause.stderr)
    );
    let registry = Registry::start(&dir.join("registry"), None);
    registry.push(&layout, "latest", "busybox", None);
    registry.push(&layout, "pause", "pause", None);
    registry
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `docker-registry`.
pub struct Registry {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Registry {
    /// Start a registry storing under `dir`; with `user`, htpasswd auth is required.
    pub fn start(dir: &Path, user: Option<(&str, &str)>) -> Registry {
        require_tools();
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        if let Some((u, p)) = user {
            let hash = bcrypt::hash_with_result(p, 5)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoA);
            std::fs::write(dir.join("htpasswd"), format!("{u}:{hash}\n")).unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: crx-test\n    path: {}\n",
                dir.join("htpasswd").display()
            );
        }
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let mut reg = Registry {
            port,
            dir: dir.to_owned(),
            child: None,
        };
        reg.restart();
        reg
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// (Re)start the process on the same port, storage and log (appended).
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        // Generous: in the KVM test host every instruction is emulated.
        let deadline = Instant::now() + Duration::from_secs(120);
        while http_status(&self.addr(), "/v2/").is_none() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not come up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL the registry.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// GET requests the registry answered for blob `digest` (any repository), from its access log.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} HTTP/1.1\"");
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&needle))
            .count()
    }

    /// The registry's own file for blob `digest`.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Push `oci:<layout>:<tag>` as `<repo>:<tag>` (all platforms) with skopeo.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str, creds: Option<(&str, &str)>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--all", "--quiet", "--dest-tls-verify=false"]);
        if let Some((u, p)) = creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.addr()));
        let out = cmd.output().expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Raw manifest of `repo` at `reference` (tag or digest), as the registry serves it.
pub fn manifest_raw(reg: &Registry, repo: &str, reference: &str) -> Vec<u8> {
    let sep = if reference.starts_with("sha256:") {
        "@"
    } else {
        ":"
    };
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/{repo}{sep}{reference}", reg.addr()))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Status code of a plain HTTP GET, `None` if nothing answers.
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).ok()?;
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

/// Everything below `dir` (recursively) that is not a directory, as paths under `dir`; symlinks
/// are listed, never followed.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
