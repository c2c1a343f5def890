//! crx-cri driven by the real `crictl` (cri-tools v1.32): version, info, pull (anonymous and
//! with credentials) from a real `docker-registry`, images, inspecti, imagefsinfo, rmi; the
//! bundled busybox known as `busybox`; malformed requests, idempotent removal, unimplemented
//! calls and the socket's life, through a gRPC client. In VMs (the test host): pods and
//! containers end to end (runp, create, start, exec -s, logs, inspect, ps, pods, stop, rm,
//! stopp, rmp, nothing left behind), exec and attach sessions, port-forward to a server in the
//! pod and its host port, volumes (host directories and files, read-only or not), exit codes and reasons, a restarted crx-cri and a dead VMM, stats of containers and pod
//! VMs (stats, statsp, runtime-config, update-runtime-config).

mod support;

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};

use base64::Engine as _;
use crx_test_support::cni::{BridgeNetwork, CNI_BIN};
use crx_test_support::Registry;
use k8s_cri::v1 as cri;
use support::{build_busybox, socket_dir, CriServer};

/// A registry holding the bundled busybox as `crx/busybox:latest`, and a crx-cri whose store
/// is empty.
struct Bench {
    reg: Registry,
    cri: CriServer,
    _sockets: tempfile::TempDir,
    _tmp: tempfile::TempDir,
}

fn bench(user: Option<(&str, &str)>) -> Bench {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), user);
    let layout = build_busybox(&tmp.path().join("busybox"));
    reg.push(&layout, "latest", "crx/busybox", user);
    let sockets = socket_dir();
    // A CNI configuration directory with nothing in it: the network is not ready.
    let cri = CriServer::start(
        &tmp.path().join("cri"),
        &sockets.path().join("crx.sock"),
        &tmp.path().join("store"),
        &format!(
            "[network]\ncni_conf_dir = {:?}\n",
            tmp.path().join("empty-net.d")
        ),
    );
    Bench {
        reg,
        cri,
        _sockets: sockets,
        _tmp: tmp,
    }
}

#[test]
fn crictl_drives_the_image_service() {
    let b = bench(None);
    let c = &b.cri;

    let version = c.crictl_ok(&["version"]);
    assert!(version.contains("RuntimeName:  crx"), "{version}");
    assert!(version.contains("RuntimeApiVersion:  v1"), "{version}");

    let info = c.crictl_json(&["info"]);
    let conditions = info["status"]["conditions"].as_array().unwrap();
    let condition = |kind: &str| {
        conditions
            .iter()
            .find(|x| x["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in {info}"))
    };
    assert_eq!(condition("RuntimeReady")["status"], true);
    assert_eq!(condition("NetworkReady")["status"], false);
    assert_eq!(condition("NetworkReady")["reason"], "NetworkPluginNotReady");
    assert_eq!(info["config"]["runtime"]["handler"], "crx");
    assert_eq!(
        info["config"]["image"]["root"],
        c.store.display().to_string()
    );
    assert!(info["runtimeHandlers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["name"] == "crx"));

    let name = format!("{}/crx/busybox:latest", b.reg.addr());
    let pulled = c.crictl_ok(&["pull", &name]);
    let id = pulled
        .trim()
        .strip_prefix("Image is up to date for ")
        .unwrap_or_else(|| panic!("crictl pull printed {pulled:?}"))
        .to_owned();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");

    let listed = c.crictl_ok(&["images"]);
    assert!(
        listed.contains(&format!("{}/crx/busybox", b.reg.addr())) && listed.contains("latest"),
        "{listed}"
    );
    let images = c.crictl_json(&["images"]);
    let images = images["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{images:?}");
    let image = &images[0];
    assert_eq!(image["id"], id.as_str());
    assert_eq!(image["repoTags"], serde_json::json!([name]));
    let digests = image["repoDigests"].as_array().unwrap();
    assert_eq!(digests.len(), 1);
    let repo_digest = digests[0].as_str().unwrap().to_owned();
    assert!(
        repo_digest.starts_with(&format!("{}/crx/busybox@sha256:", b.reg.addr())),
        "{repo_digest}"
    );
    let size: u64 = image["size"].as_str().unwrap().parse().unwrap();
    assert!(size > 500_000, "busybox layer size {size}");
    // The bundled image runs as root: uid 0 ("User" is unset), no username.
    assert!(image["uid"].is_null(), "{image}");

    // inspecti by tag, digest reference, ID and ID prefix: one image; verbose info from the store.
    for reference in [
        name.as_str(),
        repo_digest.as_str(),
        id.as_str(),
        &id["sha256:".len()..][..12],
    ] {
        let status = c.crictl_json(&["inspecti", reference]);
        assert_eq!(status["status"]["id"], id.as_str(), "{reference}: {status}");
        let info = &status["info"]; // crictl shows the "info" entry of the verbose info
        assert_eq!(
            info["imageSpec"]["config"]["Cmd"],
            serde_json::json!(["sh"])
        );
        let rootfs = info["rootfs"].as_str().unwrap();
        assert!(
            std::path::Path::new(rootfs).join("bin/busybox").is_file(),
            "{rootfs}"
        );
    }
    // crictl images REPOSITORY filters by repository.
    let filtered = c.crictl_json(&["images", &format!("{}/crx/busybox", b.reg.addr())]);
    assert_eq!(filtered["images"].as_array().unwrap().len(), 1);
    let filtered = c.crictl_json(&["images", "nothing/here"]);
    assert!(filtered["images"].as_array().unwrap().is_empty());

    let fs = c.crictl_json(&["imagefsinfo"]);
    let image_fs = &fs["status"]["imageFilesystems"][0];
    assert_eq!(
        image_fs["fsId"]["mountpoint"],
        c.store.display().to_string()
    );
    let used: u64 = image_fs["usedBytes"]["value"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(used > size, "store uses {used} bytes, image {size}");

    let removed = c.crictl_ok(&["rmi", &name]);
    assert!(removed.contains(&format!("Deleted: {name}")), "{removed}");
    assert!(c.crictl_json(&["images"])["images"]
        .as_array()
        .unwrap()
        .is_empty());
    // Removal collected the content.
    let fs = c.crictl_json(&["imagefsinfo"]);
    let after: u64 = fs["status"]["imageFilesystems"][0]["usedBytes"]["value"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after < used - size, "store uses {after} bytes after rmi");
    let out = c.crictl(&["inspecti", &name]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such image"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pulls_with_the_credentials_of_the_request() {
    let (user, password) = ("alice", "wonderland");
    let b = bench(Some((user, password)));
    let c = &b.cri;
    let name = format!("{}/crx/busybox:latest", b.reg.addr());

    let out = c.crictl(&["pull", &name]);
    assert!(!out.status.success(), "pulled without credentials");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("code = Unauthenticated") && err.contains("refused access"),
        "{err}"
    );
    let out = c.crictl(&["pull", "--creds", &format!("{user}:nope"), &name]);
    assert!(!out.status.success(), "pulled with a wrong password");

    c.crictl_ok(&["pull", "--creds", &format!("{user}:{password}"), &name]);
    c.crictl_ok(&["rmi", &name]);
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    c.crictl_ok(&["pull", "--auth", &auth, &name]);
    c.crictl_ok(&["inspecti", &name]);
    // Credentials of one request are not kept for the next.
    c.crictl_ok(&["rmi", &name]);
    assert!(!c.crictl(&["pull", &name]).status.success());
}

#[test]
fn the_bundled_image_is_busybox() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = build_busybox(&tmp.path().join("busybox"));
    // As setup.sh does (`crx image import`): into the store, offline.
    let store_root = tmp.path().join("store");
    let store = crx_image::Store::open(&store_root, crx_image::RegistryConfig::default()).unwrap();
    let imported = store.import(&layout, None).unwrap();
    assert_eq!(imported[0].name, "docker.io/library/busybox:latest");
    let sockets = socket_dir();
    let c = CriServer::start(
        &tmp.path().join("cri"),
        &sockets.path().join("crx.sock"),
        &store_root,
        "",
    );
    for reference in [
        "busybox",
        "busybox:latest",
        "library/busybox",
        "docker.io/library/busybox:latest",
    ] {
        let status = c.crictl_json(&["inspecti", reference]);
        assert_eq!(
            status["status"]["repoTags"],
            serde_json::json!(["docker.io/library/busybox:latest"]),
            "{reference}"
        );
    }
    let listed = c.crictl_json(&["images", "busybox"]);
    assert_eq!(listed["images"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn malformed_and_unimplemented_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let sockets = socket_dir();
    let socket = sockets.path().join("sub/crx.sock");
    let mut server = CriServer::start(
        &tmp.path().join("cri"),
        &socket,
        &tmp.path().join("store"),
        "",
    );
    let mut images = server.images().await;
    let spec = |image: &str| {
        Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        })
    };

    for (what, code) in [
        (
            "empty pull",
            images
                .pull_image(cri::PullImageRequest::default())
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "malformed reference",
            images
                .pull_image(cri::PullImageRequest {
                    image: spec("Bad//Name::x"),
                    ..Default::default()
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "malformed auth",
            images
                .pull_image(cri::PullImageRequest {
                    image: spec("127.0.0.1:1/x:latest"),
                    auth: Some(cri::AuthConfig {
                        auth: "%%%".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "empty status",
            images
                .image_status(cri::ImageStatusRequest::default())
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "empty remove",
            images
                .remove_image(cri::RemoveImageRequest::default())
                .await
                .unwrap_err()
                .code(),
        ),
    ] {
        assert_eq!(code, tonic::Code::InvalidArgument, "{what}");
    }
    // A missing image: no status, and removing it is fine (idempotent).
    let status = images
        .image_status(cri::ImageStatusRequest {
            image: spec("127.0.0.1:1/missing:latest"),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.image.is_none() && status.info.is_empty());
    images
        .remove_image(cri::RemoveImageRequest {
            image: spec("127.0.0.1:1/missing:latest"),
        })
        .await
        .unwrap();
    // An unreachable registry is Unavailable.
    let err = images
        .pull_image(cri::PullImageRequest {
            image: spec("127.0.0.1:1/x:latest"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");

    let mut runtime = server.runtime().await;
    let err = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // Pods and containers that are not there: NotFound, except where the CRI asks for
    // idempotence (stop and remove succeed).
    let err = runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: "0123456789ab".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let err = runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: "0123456789ab".into(),
            config: Some(cri::ContainerConfig::default()),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: "0123456789ab".into(),
        })
        .await
        .unwrap();
    runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: "0123456789ab".into(),
        })
        .await
        .unwrap();
    runtime
        .stop_container(cri::StopContainerRequest {
            container_id: "0123456789ab".into(),
            timeout: 0,
        })
        .await
        .unwrap();
    runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: "0123456789ab".into(),
        })
        .await
        .unwrap();
    // Streaming requests are checked before a URL is handed out.
    let err = runtime.exec(cri::ExecRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let err = runtime
        .attach(cri::AttachRequest {
            container_id: "0123456789ab".into(),
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    for (port, code) in [
        (8080, tonic::Code::NotFound),
        (70000, tonic::Code::InvalidArgument),
    ] {
        let request = cri::PortForwardRequest {
            pod_sandbox_id: "0123456789ab".into(),
            port: vec![port],
        };
        let err = runtime.port_forward(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{err}");
    }
    // Still serving.
    let version = runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            version.runtime_name.as_str(),
            version.runtime_api_version.as_str()
        ),
        ("crx", "v1")
    );

    // The socket is root's alone, in a private directory.
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    let dir = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);

    // A second instance refuses the live socket; one with its own socket and state runs beside.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_crx-cri"))
        .arg("--listen")
        .arg(&socket)
        .arg("--state-dir")
        .arg(tmp.path().join("state2"))
        .arg("--image-root")
        .arg(tmp.path().join("store"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another server is listening"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let beside = CriServer::start(
        &tmp.path().join("cri2"),
        &sockets.path().join("crx2.sock"),
        &tmp.path().join("store"),
        "",
    );
    assert!(beside.crictl_ok(&["version"]).contains("crx"));

    // SIGTERM: a clean exit that removes the socket.
    drop(images);
    drop(runtime);
    assert!(
        server.stop(),
        "crx-cri did not exit cleanly:\n{}",
        server.log()
    );
    assert!(!socket.exists(), "socket left behind");
    assert!(server.log().contains("SIGTERM: stopping"));
}

// CNI plugins: Debian's containernetworking-plugins.

/// A crx-cri whose store holds the bundled busybox and whose pods join a CNI bridge network of
/// the test's own (bridge `bridge`, addresses from `<prefix>.0/24`), everything under one
/// scratch directory in /run (sockets cannot live on the test host's 9p /tmp). Whatever an
/// earlier failed run left in the test host is removed first.
struct PodBench {
    cri: CriServer,
    dir: tempfile::TempDir,
    network: String,
    bridge: String,
}

impl PodBench {
    fn new(network: &str, bridge: &str, prefix: &str) -> PodBench {
        // Short: the sandbox sockets under it must fit a Unix socket path.
        let dir = tempfile::Builder::new()
            .prefix("cx")
            .tempdir_in("/run")
            .unwrap();
        let layout = build_busybox(&dir.path().join("busybox"));
        let store_root = dir.path().join("store");
        let store =
            crx_image::Store::open(&store_root, crx_image::RegistryConfig::default()).unwrap();
        store.import(&layout, None).unwrap();
        let conf_dir = dir.path().join("net.d");
        BridgeNetwork {
            name: network,
            bridge,
            prefix,
            dns: None,
        }
        .write(&conf_dir);
        let vmm = std::path::Path::new(env!("CARGO_BIN_EXE_crx-cri")).with_file_name("crx-vmm");
        assert!(
            vmm.exists(),
            "{} is missing: build it (`cargo build -p crx-vmm`)",
            vmm.display()
        );
        let config = format!(
            "[runtime]\nvmm = {vmm:?}\nboot_timeout_secs = 300\n[network]\ncni_conf_dir = {conf_dir:?}\ncni_bin_dirs = [{CNI_BIN:?}]\n"
        );
        let cri = CriServer::start(
            &dir.path().join("cri"),
            &dir.path().join("crx.sock"),
            &store_root,
            &config,
        );
        PodBench {
            cri,
            dir,
            network: network.into(),
            bridge: bridge.into(),
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `value` as `name` (JSON) in the scratch directory; returns its path.
    fn json(&self, name: &str, value: serde_json::Value) -> String {
        let path = self.path(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
        path.display().to_string()
    }

    /// A pod config: its own name, logs under `logs/`, labels.
    fn pod_config(&self, name: &str) -> String {
        self.json(
            &format!("pod-{name}.json"),
            serde_json::json!({
                "metadata": {"name": name, "namespace": "crx-test", "uid": format!("uid-{name}"), "attempt": 1},
                "hostname": format!("{name}-host"),
                "log_directory": self.path("logs").join(name),
                "labels": {"app": name},
                "annotations": {"note": "crx"},
                "linux": {}
            }),
        )
    }

    /// A busybox container config running `sh -c script`.
    fn container_config(&self, name: &str, script: &str) -> String {
        self.json(
            &format!("container-{name}.json"),
            serde_json::json!({
                "metadata": {"name": name},
                "image": {"image": "busybox"},
                "command": ["sh", "-c", script],
                "log_path": format!("{name}/0.log"),
                "labels": {"container": name},
                "annotations": {"kind": "test"},
                "linux": {}
            }),
        )
    }

    /// Polls `crictl inspect` of `id` until its state is `state`.
    /// Creates container `config` (written as `<name>.json`) in `pod` and starts it; its ID
    /// once it runs.
    fn start_container(
        &self,
        pod: &str,
        pod_config: &str,
        name: &str,
        config: serde_json::Value,
    ) -> String {
        let config = self.json(&format!("{name}.json"), config);
        let id = self
            .cri
            .crictl_ok(&["create", "--no-pull", pod, &config, pod_config])
            .trim()
            .to_owned();
        self.cri.crictl_ok(&["start", &id]);
        self.wait_state(&id, "CONTAINER_RUNNING");
        id
    }

    fn wait_state(&self, id: &str, state: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let status = self.cri.crictl_json(&["inspect", id]);
            if status["status"]["state"] == state {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "container {id} never became {state}: {status}\n{}",
                self.cri.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Nothing of pod `id` is left on the host: no VMM or virtiofsd, no mounts under the
    /// scratch directory, no network namespace, no veth on the bridge, no address, no
    /// sandbox directory.
    fn assert_clean(&self, id: &str) {
        let processes = std::process::Command::new("pgrep")
            .args(["-a", "-f", id])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&processes.stdout).trim().is_empty(),
            "processes of pod {id} left: {}",
            String::from_utf8_lossy(&processes.stdout)
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let scratch = self.dir.path().display().to_string();
        let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&scratch)).collect();
        assert!(left.is_empty(), "mounts left: {left:#?}");
        assert!(
            !std::path::Path::new("/run/netns")
                .join(format!("crx-{id}"))
                .exists(),
            "network namespace of {id} left"
        );
        let ports = std::fs::read_dir(format!("/sys/class/net/{}/brif", self.bridge))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(ports, 0, "veths left on {}", self.bridge);
        let addresses =
            std::fs::read_dir(std::path::Path::new("/var/lib/cni/networks").join(&self.network))
                .map(|d| {
                    d.flatten()
                        .filter(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .parse::<std::net::Ipv4Addr>()
                                .is_ok()
                        })
                        .count()
                })
                .unwrap_or(0);
        assert_eq!(
            addresses, 0,
            "addresses of {} still allocated",
            self.network
        );
        assert!(
            !self.path("cri/state/sandboxes").join(id).exists(),
            "sandbox directory of {id} left"
        );
    }
}

impl Drop for PodBench {
    fn drop(&mut self) {
        // Whatever a failed test left running: pods first (their VMs and networks), then the
        // bridge.
        let pods = self.cri.crictl(&["pods", "-q"]);
        for id in String::from_utf8_lossy(&pods.stdout).split_whitespace() {
            let _ = self.cri.crictl(&["rmp", "-f", id]);
        }
        self.cri.stop();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// `crxctl` on the running pod: `check` passes (KVM, guest, crx-vmm, virtiofsd, CNI), `ps`
/// lists the pod VM as running and restored with its size, ready time, VMM and memory,
/// `inspect` shows its processes (the VMM and virtiofsd), `console` prints its console.
fn crxctl_sees_the_pod_vm(b: &PodBench, pod: &str) {
    let state_dir = b.path("cri").join("state");
    let config = b.path("cri").join("config.toml");
    let crxctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_crxctl"))
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(args)
            .output()
            .unwrap();
        println!(
            "crxctl {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            out.status.success(),
            "crxctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let check = crxctl(&["check"]);
    for line in [
        "ok   kvm: /dev/kvm is standard KVM",
        "ok   guest agent: /bin/crx-agent in the initrd",
        "ok   cni network: crx-cri-e2e",
    ] {
        assert!(check.contains(line), "{line:?} missing:\n{check}");
    }

    let ps = crxctl(&["ps"]);
    let line = ps
        .lines()
        .find(|l| l.starts_with(pod))
        .unwrap_or_else(|| panic!("pod {pod} not listed:\n{ps}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    let [_, name, state, started, vcpus, mem_mib, ready_ms, vmm_pid, rss_mib] = columns[..] else {
        panic!("9 columns expected: {line}")
    };
    assert_eq!(
        (name, state, started),
        ("crx-test/web", "running", "restored")
    );
    assert!(ready_ms.parse::<u64>().unwrap() > 0, "{line}");
    assert!(rss_mib.parse::<f64>().unwrap() > 1.0, "{line}");

    let inspect: serde_json::Value = serde_json::from_str(&crxctl(&["inspect", pod])).unwrap();
    assert_eq!(inspect["running"], true, "{inspect}");
    assert_eq!(inspect["state"]["vcpus"].to_string(), vcpus);
    assert_eq!(inspect["state"]["mem_mib"].to_string(), mem_mib);
    let processes = inspect["processes"].as_array().unwrap();
    assert_eq!(processes[0]["pid"].to_string(), vmm_pid, "{inspect}");
    assert_eq!(
        processes[0]["seccomp"], "filter",
        "the VMM is not confined: {inspect}"
    );
    assert!(
        processes.iter().any(|p| p["command"][0]
            .as_str()
            .unwrap_or_default()
            .ends_with("virtiofsd")),
        "no virtiofsd under the VMM: {inspect}"
    );

    let console_file = std::fs::read(inspect["console"].as_str().unwrap()).unwrap();
    let console = crxctl(&["console", pod]);
    assert!(
        console.as_bytes().starts_with(&console_file),
        "crxctl console printed something else than the console file"
    );
}

/// Exec and Attach through crx-cri's streaming server (SPDY/3.1, `v4.channel.k8s.io`, as
/// kubelet's clients speak it): both output streams, stdin to its EOF, the exit code, a
/// terminal, and attaching to a container's own process.
fn streaming_exec_and_attach_work(b: &PodBench, pod: &str, pod_config: &str, main: &str) {
    let c = &b.cri;
    let out = c.crictl(&["exec", main, "sh", "-c", "echo streamed; echo to-err >&2"]);
    assert!(out.status.success(), "{out:?}\ncrx-cri log:\n{}", c.log());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "streamed\n",
        "{out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("to-err"),
        "{out:?}"
    );
    // The exit code comes back in the session's final status.
    let out = c.crictl(&["exec", main, "sh", "-c", "exit 4"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exit code 4"),
        "{out:?}"
    );
    // stdin reaches the process, and its end ends the process's input.
    let out = c.crictl_with_input(&["exec", "-i", main, "tr", "a-z", "A-Z"], b"hello stdin\n");
    assert!(out.status.success(), "{out:?}\ncrx-cri log:\n{}", c.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO STDIN\n");
    // A terminal: crictl wants one of its own, which script(1) gives it.
    let crictl = c.crictl_command(&["exec", "-it", main, "tty"]);
    let line = std::iter::once(crictl.get_program())
        .chain(crictl.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script(1) (util-linux) runs");
    // Its stdin stays open until it is done: an EOF would end the terminal session early.
    let _stdin = script.stdin.take();
    let stdout = script.stdout.take().unwrap();
    let printed = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let status = script.wait().unwrap();
    let printed = printed.join().unwrap();
    assert!(
        status.success() && printed.contains("/dev/pts/"),
        "crictl exec -it tty: {status}: {printed:?}\ncrx-cri log:\n{}",
        c.log()
    );

    // A client that goes away while its process is quiet: the process goes too.
    let mut quiet = c
        .crictl_command(&["exec", main, "sleep", "7777"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run crictl exec");
    let sleeping = || {
        c.crictl_ok(&["exec", "-s", main, "ps"])
            .contains("sleep 7777")
    };
    let until = |want: bool| {
        (0..60).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(500));
            sleeping() == want
        })
    };
    assert!(until(true), "the exec'd sleep never ran");
    quiet.kill().unwrap();
    quiet.wait().unwrap();
    assert!(
        until(false),
        "the exec'd process outlived its session\ncrx-cri log:\n{}",
        c.log()
    );

    // Attach: the container's own process, reading its stdin until the first client's EOF.
    let reader = b.start_container(
        pod,
        pod_config,
        "container-reader",
        serde_json::json!({
            "metadata": {"name": "reader"},
            "image": {"image": "busybox"},
            "command": ["sh", "-c", "cat; echo done"],
            "stdin": true,
            "stdin_once": true,
            "log_path": "reader/0.log",
            "linux": {}
        }),
    );
    let out = c.crictl_with_input(&["attach", "-i", &reader], b"ping\n");
    assert!(out.status.success(), "{out:?}\ncrx-cri log:\n{}", c.log());
    // The client's EOF closed the container's stdin (stdin_once): cat ended.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ping\ndone\n",
        "{out:?}"
    );
    let exited = b.wait_state(&reader, "CONTAINER_EXITED");
    assert_eq!(exited["status"]["exitCode"], 0, "{exited}");
    c.crictl_ok(&["rm", &reader]);
    // A stream URL for a container that is not running is refused up front.
    let gone = c.crictl(&["exec", &reader, "true"]);
    assert!(!gone.status.success(), "{gone:?}");

    port_forward_reaches_a_server_in_the_pod(b, pod, pod_config);
    volumes_carry_host_files_both_ways(b, pod, pod_config);
}

/// CRI mounts: a writable host directory (reached through a symbolic link), a read-only host
/// file, and a host path that does not exist yet (made a directory, as containerd does).
fn volumes_carry_host_files_both_ways(b: &PodBench, pod: &str, pod_config: &str) {
    let c = &b.cri;
    let data = b.path("volume-data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("from-host"), "host wrote this\n").unwrap();
    let link = b.path("volume-link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&data, &link).unwrap();
    let setting = b.path("volume-setting");
    std::fs::write(&setting, "setting=1\n").unwrap();
    let fresh = b.path("volume-fresh");
    let _ = std::fs::remove_dir_all(&fresh);
    let id = b.start_container(
        pod,
        pod_config,
        "container-volumes",
        serde_json::json!({
            "metadata": {"name": "volumes"},
            "image": {"image": "busybox"},
            "command": ["sh", "-c", "cat /data/from-host /etc/setting; echo guest wrote this > /data/from-guest; mkdir /fresh/made; sleep 1000"],
            "mounts": [
                {"container_path": "/data", "host_path": link},
                {"container_path": "/etc/setting", "host_path": setting, "readonly": true},
                {"container_path": "/fresh", "host_path": fresh}
            ],
            "log_path": "volumes/0.log",
            "linux": {}
        }),
    );
    let status = c.crictl_json(&["inspect", &id]);
    let mounts = status["status"]["mounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(mounts.len(), 3, "{status}");
    assert_eq!(mounts[1]["containerPath"], "/etc/setting", "{status}");
    assert_eq!(mounts[1]["readonly"], true, "{status}");
    // What the container wrote is on the host, in the directory the link points at.
    let wrote = (0..100).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::fs::read_to_string(data.join("from-guest")).ok()
    });
    assert_eq!(wrote.as_deref(), Some("guest wrote this\n"), "{}", c.log());
    assert!(fresh.join("made").is_dir(), "{}", c.log());
    // The host's files reached the container.
    let logs = c.crictl_ok(&["logs", &id]);
    assert_eq!(logs, "host wrote this\nsetting=1\n");
    // A host change shows in the container; the read-only file stays so.
    std::fs::write(data.join("later"), "later\n").unwrap();
    assert_eq!(
        c.crictl_ok(&["exec", "-s", &id, "cat", "/data/later"])
            .trim(),
        "later"
    );
    let write = c.crictl(&["exec", "-s", &id, "sh", "-c", "echo x > /etc/setting"]);
    assert!(!write.status.success(), "{write:?}");
    assert_eq!(std::fs::read_to_string(&setting).unwrap(), "setting=1\n");
    // The container's volumes go with it; the host's files stay.
    c.crictl_ok(&["rm", "-f", &id]);
    assert_eq!(
        std::fs::read_to_string(data.join("from-host")).unwrap(),
        "host wrote this\n"
    );
    // A mount that would reach back into the host is refused.
    let config = b.json(
        "container-bidirectional.json",
        serde_json::json!({
            "metadata": {"name": "bidirectional"},
            "image": {"image": "busybox"},
            "command": ["true"],
            "mounts": [{"container_path": "/data", "host_path": data, "propagation": 2}],
            "linux": {}
        }),
    );
    let refused = c.crictl(&["create", "--no-pull", pod, &config, pod_config]);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("bidirectional"),
        "{refused:?}"
    );
}

/// `crictl port-forward` to busybox httpd in a container of the pod: two requests over two
/// forwarded connections, and a port where nothing listens; then the pod's host port to it.
fn port_forward_reaches_a_server_in_the_pod(b: &PodBench, pod: &str, pod_config: &str) {
    let c = &b.cri;
    let web = b.start_container(
        pod,
        pod_config,
        "container-web",
        serde_json::json!({
            "metadata": {"name": "web"},
            "image": {"image": "busybox"},
            "command": ["sh", "-c", "mkdir -p /tmp/www && echo served-by-the-pod > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"],
            "log_path": "web/0.log",
            "linux": {}
        }),
    );
    // httpd listens once it runs; wait for it from inside the pod.
    let listening = c.crictl(&[
        "exec",
        "-s",
        &web,
        "sh",
        "-c",
        "for i in $(seq 100); do netstat -ltn | grep -q :8080 && exit 0; sleep 0.1; done; exit 1",
    ]);
    assert!(
        listening.status.success(),
        "httpd never listened: {listening:?}"
    );

    let mut forward = c
        .crictl_command(&["port-forward", pod, "0:8080", "0:8081"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run crictl port-forward");
    // "Forwarding from 127.0.0.1:LOCAL -> REMOTE", once per port.
    let mut lines = std::io::BufReader::new(forward.stdout.take().unwrap()).lines();
    let mut local = std::collections::HashMap::new();
    while local.len() < 2 {
        let line = lines
            .next()
            .expect("crictl port-forward ended early")
            .unwrap();
        if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
            let (from, to) = rest.split_once(" -> ").unwrap();
            local.insert(to.trim().to_owned(), from.parse::<u16>().unwrap());
        }
    }
    let get = |port: u16| -> String {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
        let mut response = String::new();
        let _ = conn.read_to_string(&mut response);
        response
    };
    for _ in 0..2 {
        let response = get(local["8080"]);
        assert!(
            response.starts_with("HTTP/1.") && response.ends_with("served-by-the-pod\n"),
            "through the forward: {response:?}\ncrx-cri log:\n{}",
            c.log()
        );
    }
    // The pod's host port reaches the same server, without crictl.
    let pod_spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pod_config).unwrap()).unwrap();
    let host_port = pod_spec["port_mappings"][0]["host_port"].as_u64().unwrap() as u16;
    let response = get(host_port);
    assert!(
        response.ends_with("served-by-the-pod\n"),
        "through the host port: {response:?}\ncrx-cri log:\n{}",
        c.log()
    );
    // Nothing listens on 8081 in the pod: the connection ends with nothing, and crictl is told.
    assert_eq!(get(local["8081"]), "");
    let _ = forward.kill();
    let _ = forward.wait();
    let mut stderr = String::new();
    forward
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    // (client-go then drops the whole session, as kubectl does with any runtime.)
    assert!(
        stderr.contains("8081") && stderr.to_lowercase().contains("connection refused"),
        "crictl's stderr: {stderr}"
    );
    c.crictl_ok(&["rm", "-f", &web]);
}

#[test]
fn crictl_runs_a_pod_vm_with_containers_end_to_end() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let b = PodBench::new("crx-cri-e2e", "crxcri0", "10.89.7");
    let c = &b.cri;
    let info = c.crictl_json(&["info"]);
    let network_ready = info["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["type"] == "NetworkReady")
        .unwrap()
        .clone();
    assert_eq!(network_ready["status"], true, "{info}");

    let pod_config = b.pod_config("web");
    // A host port: the node's port 8080 of the test's choosing reaches the pod's 8080.
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&pod_config).unwrap()).unwrap();
    let host_port = crx_test_support::free_port();
    config["port_mappings"] = serde_json::json!([{"container_port": 8080, "host_port": host_port}]);
    std::fs::write(&pod_config, config.to_string()).unwrap();
    let pod = c.crictl_ok(&["runp", &pod_config]).trim().to_owned();
    println!("crx-vm-boot: crictl runp (pod {pod})");
    assert_eq!(pod.len(), 32, "{pod}");

    let status = c.crictl_json(&["inspectp", &pod]);
    assert_eq!(status["status"]["state"], "SANDBOX_READY", "{status}");
    assert_eq!(status["status"]["metadata"]["name"], "web");
    assert_eq!(status["status"]["labels"]["app"], "web");
    assert_eq!(status["status"]["annotations"]["note"], "crx");
    let ip = status["status"]["network"]["ip"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(ip.starts_with("10.89.7."), "pod IP {ip:?}: {status}");
    // The pod VM was restored from a pod template (made by this first pod), onto its own tap.
    assert!(
        status["info"]["template"].is_string(),
        "not restored from a template: {status}"
    );
    // crictl shows times as RFC 3339 (UTC, fixed width): they compare as strings.
    let time = |status: &serde_json::Value, key: &str| -> String {
        let t = status["status"][key]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(t.len() > 10 && !t.starts_with("1970"), "{key}: {status}");
        t
    };
    time(&status, "createdAt");

    let pods = c.crictl_json(&["pods"]);
    assert_eq!(pods["items"].as_array().unwrap().len(), 1, "{pods}");
    assert_eq!(pods["items"][0]["state"], "SANDBOX_READY");
    // Filters: by label, by state, by ID prefix.
    for (args, count) in [
        (vec!["pods", "--label", "app=web"], 1),
        (vec!["pods", "--label", "app=db"], 0),
        (vec!["pods", "--state", "ready"], 1),
        (vec!["pods", "--state", "notready"], 0),
        (vec!["pods", "--id", &pod[..12]], 1),
    ] {
        let listed = c.crictl_json(&args);
        assert_eq!(
            listed["items"].as_array().map_or(0, |a| a.len()),
            count,
            "{args:?}: {listed}"
        );
    }

    // Two containers in the one VM: a long-running one and one that exits non-zero.
    let main_config = b.container_config(
        "main",
        "echo hello from main; echo to stderr >&2; trap 'exit 0' TERM; while true; do sleep 1; done",
    );
    let main = c
        .crictl_ok(&["create", "--no-pull", &pod, &main_config, &pod_config])
        .trim()
        .to_owned();
    let created = c.crictl_json(&["inspect", &main]);
    assert_eq!(created["status"]["state"], "CONTAINER_CREATED", "{created}");
    c.crictl_ok(&["start", &main]);
    let running = b.wait_state(&main, "CONTAINER_RUNNING");
    assert!(
        time(&running, "startedAt") >= time(&running, "createdAt"),
        "{running}"
    );
    assert_eq!(running["status"]["labels"]["container"], "main");
    assert_eq!(running["status"]["annotations"]["kind"], "test");
    assert_eq!(running["status"]["image"]["image"], "busybox");

    let fail_config = b.container_config("fail", "echo bye; exit 7");
    let fail = c
        .crictl_ok(&["create", "--no-pull", &pod, &fail_config, &pod_config])
        .trim()
        .to_owned();
    c.crictl_ok(&["start", &fail]);
    let exited = b.wait_state(&fail, "CONTAINER_EXITED");
    assert_eq!(exited["status"]["exitCode"], 7, "{exited}");
    assert_eq!(exited["status"]["reason"], "Error", "{exited}");

    // ps: both, with their states; filters by state, pod and label.
    let ps = c.crictl_json(&["ps", "-a"]);
    assert_eq!(ps["containers"].as_array().unwrap().len(), 2, "{ps}");
    let running = c.crictl_json(&["ps", "--state", "running"]);
    assert_eq!(
        running["containers"].as_array().unwrap().len(),
        1,
        "{running}"
    );
    assert_eq!(running["containers"][0]["id"], main.as_str());
    let by_label = c.crictl_json(&["ps", "-a", "--label", "container=fail"]);
    assert_eq!(by_label["containers"][0]["id"], fail.as_str(), "{by_label}");
    let by_pod = c.crictl_json(&["ps", "-a", "--pod", &pod]);
    assert_eq!(by_pod["containers"].as_array().unwrap().len(), 2);

    crxctl_sees_the_pod_vm(&b, &pod);

    // exec -s (ExecSync): output, exit code, the pod's hostname and network inside.
    let out = c.crictl(&["exec", "-s", &main, "sh", "-c", "echo out; echo err >&2"]);
    // (crictl prints both streams of ExecSync on its stdout.)
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.starts_with("out\n") && printed.contains("err"),
        "{printed:?}"
    );
    // crictl reports a non-zero exit code as a failure naming it, with the stderr.
    let out = c.crictl(&["exec", "-s", &main, "sh", "-c", "echo bad >&2; exit 3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("exited with 3: bad"), "{err}");
    assert_eq!(
        c.crictl_ok(&["exec", "-s", &main, "hostname"]).trim(),
        "web-host"
    );
    // UpdateContainerResources: new limits reach the container's cgroup in the VM.
    c.crictl_ok(&[
        "update",
        "--memory",
        "67108864",
        "--cpu-quota",
        "50000",
        "--cpu-period",
        "100000",
        "--cpu-share",
        "512",
        &main,
    ]);
    let limits = c.crictl_ok(&[
        "exec",
        "-s",
        &main,
        "sh",
        "-c",
        "g=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); cat $g/memory.max $g/cpu.max $g/cpu.weight",
    ]);
    // (crictl ends ExecSync's output with the empty stderr's newlines.)
    assert_eq!(
        limits.trim_end(),
        "67108864\n50000 100000\n20",
        "cgroup limits after update"
    );
    let bad = c.crictl(&["update", "--memory", "1", "no-such-container"]);
    assert!(!bad.status.success());
    let addresses = c.crictl_ok(&["exec", "-s", &main, "ip", "-4", "addr", "show", "eth0"]);
    assert!(addresses.contains(&format!("inet {ip}/24")), "{addresses}");
    let routes = c.crictl_ok(&["exec", "-s", &main, "ip", "route"]);
    assert!(routes.contains("default via 10.89.7.1"), "{routes}");
    // A timeout kills the command and fails the call.
    let slow = c.crictl(&["exec", "-s", "--timeout", "2", &main, "sleep", "60"]);
    assert!(!slow.status.success(), "{slow:?}");
    streaming_exec_and_attach_work(&b, &pod, &pod_config, &main);

    // Logs: crictl reads the CRI log files; the raw files are in the CRI format.
    let logs = c.crictl(&["logs", &main]);
    assert!(logs.status.success(), "{logs:?}");
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "hello from main\n");
    // (crictl's own warnings go to stderr too.)
    let stderr: String = String::from_utf8_lossy(&logs.stderr)
        .lines()
        .filter(|l| !l.contains("level=warning"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(stderr, "to stderr\n");
    let raw = std::fs::read_to_string(b.path("logs/web/main/0.log")).unwrap();
    let first = raw.lines().next().unwrap();
    let fields: Vec<&str> = first.splitn(4, ' ').collect();
    assert!(
        fields[0].ends_with('Z') && fields[0].contains('T'),
        "{first}"
    );
    assert_eq!(&fields[1..], ["stdout", "F", "hello from main"], "{raw}");
    assert_eq!(
        String::from_utf8_lossy(&c.crictl(&["logs", &fail]).stdout),
        "bye\n"
    );
    // ReopenContainerLog: after a rotation the output goes to the new file.
    std::fs::rename(
        b.path("logs/web/main/0.log"),
        b.path("logs/web/main/0.log.1"),
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(async {
            c.runtime()
                .await
                .reopen_container_log(cri::ReopenContainerLogRequest {
                    container_id: main.clone(),
                })
                .await
        })
        .unwrap();
    assert!(b.path("logs/web/main/0.log").exists());

    // stop (SIGTERM handled: exit 0, Completed), rm.
    c.crictl_ok(&["stop", "--timeout", "20", &main]);
    let stopped = b.wait_state(&main, "CONTAINER_EXITED");
    assert_eq!(stopped["status"]["exitCode"], 0, "{stopped}");
    assert_eq!(stopped["status"]["reason"], "Completed", "{stopped}");
    assert!(
        time(&stopped, "finishedAt") >= time(&stopped, "startedAt"),
        "{stopped}"
    );
    c.crictl_ok(&["rm", &main, &fail]);
    assert!(c.crictl_json(&["ps", "-a"])["containers"]
        .as_array()
        .is_none_or(|a| a.is_empty()));

    c.crictl_ok(&["stopp", &pod]);
    let status = c.crictl_json(&["inspectp", &pod]);
    assert_eq!(status["status"]["state"], "SANDBOX_NOTREADY", "{status}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", host_port)).is_err(),
        "the host port outlived its pod"
    );
    c.crictl_ok(&["stopp", &pod]); // again: fine
    c.crictl_ok(&["rmp", &pod]);
    assert!(c.crictl_json(&["pods"])["items"]
        .as_array()
        .is_none_or(|a| a.is_empty()));
    b.assert_clean(&pod);
}

#[test]
fn a_restarted_crx_cri_finds_its_pods_and_a_dead_vmm_is_notready() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let mut b = PodBench::new("crx-cri-restart", "crxcri1", "10.89.8");
    let pod_config = b.pod_config("db");
    // A host port, which the restarted crx-cri publishes again.
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&pod_config).unwrap()).unwrap();
    let host_port = crx_test_support::free_port();
    config["port_mappings"] = serde_json::json!([{"container_port": 5432, "host_port": host_port}]);
    std::fs::write(&pod_config, config.to_string()).unwrap();
    let pod = b.cri.crictl_ok(&["runp", &pod_config]).trim().to_owned();
    println!("crx-vm-boot: crictl runp (pod {pod}, crx-cri then restarted)");
    let config = b.container_config("sleeper", "sleep 3600");
    let sleeper = b
        .cri
        .crictl_ok(&["create", "--no-pull", &pod, &config, &pod_config])
        .trim()
        .to_owned();
    b.cri.crictl_ok(&["start", &sleeper]);
    b.wait_state(&sleeper, "CONTAINER_RUNNING");

    // crx-cri restarts with the same state directory: the pod, its container, exec.
    assert!(
        b.cri.stop(),
        "crx-cri did not exit cleanly:\n{}",
        b.cri.log()
    );
    let socket = b.cri.socket.clone();
    let store = b.cri.store.clone();
    let config_text = std::fs::read_to_string(b.path("cri/config.toml")).unwrap();
    let config_text = config_text.split_once('\n').unwrap().1.to_owned();
    assert!(std::net::TcpStream::connect(("127.0.0.1", host_port)).is_err());
    b.cri = CriServer::start(&b.path("cri"), &socket, &store, &config_text);
    let status = b.cri.crictl_json(&["inspectp", &pod]);
    assert_eq!(status["status"]["state"], "SANDBOX_READY", "{status}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", host_port)).is_ok(),
        "the host port was not published again:\n{}",
        b.cri.log()
    );
    b.wait_state(&sleeper, "CONTAINER_RUNNING");
    assert_eq!(
        b.cri
            .crictl_ok(&["exec", "-s", &sleeper, "echo", "still here"])
            .trim(),
        "still here"
    );

    // The VMM dies: the pod is NOTREADY, its container exited; removal still cleans up.
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(b.path("cri/state/sandboxes").join(&pod).join("state.json")).unwrap(),
    )
    .unwrap();
    let vmm = rustix::process::Pid::from_raw(state["vmm_pid"].as_i64().unwrap() as i32).unwrap();
    rustix::process::kill_process(vmm, rustix::process::Signal::KILL).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = b.cri.crictl_json(&["inspectp", &pod]);
        if status["status"]["state"] == "SANDBOX_NOTREADY" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    b.wait_state(&sleeper, "CONTAINER_EXITED");
    b.cri.crictl_ok(&["stopp", &pod]);
    assert!(std::net::TcpStream::connect(("127.0.0.1", host_port)).is_err());
    b.cri.crictl_ok(&["rmp", &pod]);
    b.assert_clean(&pod);
}

/// The number at `path` (`/`-separated keys) in `v`: crictl prints the CRI's uint64 as strings.
fn number(v: &serde_json::Value, path: &str) -> u64 {
    let at = path.split('/').fold(v, |at, key| &at[key]);
    match at {
        serde_json::Value::String(s) => s.parse().unwrap_or_else(|e| panic!("{path}: {e}: {v}")),
        serde_json::Value::Number(n) => n.as_u64().unwrap(),
        _ => panic!("no number at {path} in {v}"),
    }
}

#[test]
fn crictl_stats_show_containers_and_pod_vms() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let b = PodBench::new("crx-cri-stats", "crxcri2", "10.89.10");
    let c = &b.cri;

    // RuntimeConfig: cgroupfs (the agent's cgroups in the VM); UpdateRuntimeConfig: the pod
    // CIDR is taken (and logged).
    let config = c.crictl_ok(&["runtime-config"]);
    assert!(config.contains("CGROUPFS"), "{config}");
    c.crictl_ok(&["update-runtime-config", "--pod-cidr", "10.89.10.0/24"]);
    assert!(c.log().contains("10.89.10.0/24"), "{}", c.log());

    let pod_config = b.pod_config("stats");
    let pod = c.crictl_ok(&["runp", &pod_config]).trim().to_owned();
    println!("crx-vm-boot: crictl runp (pod {pod}, stats)");
    let create = |name: &str, script: &str| {
        let config = b.container_config(name, script);
        c.crictl_ok(&["create", "--no-pull", &pod, &config, &pod_config])
            .trim()
            .to_owned()
    };
    // One container holds 20 MB (dd's block, stuck writing into a pipe nobody reads) and
    // burns CPU; one exits at once; one is only created.
    let burn = create(
        "burn",
        "dd if=/dev/zero bs=20000000 count=1 | sleep 100000 & while :; do :; done",
    );
    c.crictl_ok(&["start", &burn]);
    let done = create("done", "exit 0");
    c.crictl_ok(&["start", &done]);
    let idle = create("idle", "sleep 1000");
    b.wait_state(&burn, "CONTAINER_RUNNING");
    b.wait_state(&done, "CONTAINER_EXITED");

    let stats = |args: &[&str]| -> Vec<serde_json::Value> {
        let all: Vec<&str> = ["stats"].iter().chain(args).copied().collect();
        c.crictl_json(&all)["stats"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let ids = |listed: &[serde_json::Value]| -> Vec<String> {
        listed
            .iter()
            .map(|s| s["attributes"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    // Only the running container is listed; its memory shows the 20 MB once dd has them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let first = loop {
        let listed = stats(&["-a"]);
        assert_eq!(ids(&listed), [burn.as_str()], "{listed:?}");
        if number(&listed[0], "memory/workingSetBytes/value") > 10 << 20 {
            break listed[0].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the container never used 10 MiB: {listed:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    println!("container stats: {first}");
    assert_eq!(first["attributes"]["metadata"]["name"], "burn");
    assert_eq!(first["attributes"]["labels"]["container"], "burn");
    assert_eq!(first["attributes"]["annotations"]["kind"], "test");
    assert!(number(&first, "cpu/timestamp") > 0, "{first}");
    assert_eq!(
        number(&first, "memory/usageBytes/value"),
        number(&first, "memory/workingSetBytes/value")
    );
    let cpu = number(&first, "cpu/usageCoreNanoSeconds/value");
    assert!(cpu > 0, "{first}");
    // CPU time grows, and there is a rate against the earlier sample.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let second = stats(&[&burn]);
    assert_eq!(ids(&second), [burn.as_str()], "{second:?}");
    let later = number(&second[0], "cpu/usageCoreNanoSeconds/value");
    assert!(later > cpu, "CPU time {cpu} then {later}");
    assert!(
        number(&second[0], "cpu/usageNanoCores/value") > 0,
        "{second:?}"
    );

    // Filters: pod, label, ID prefix.
    let other_pod = format!(
        "{}{}",
        if pod.starts_with('0') { "1" } else { "0" },
        &pod[1..]
    );
    for (args, listed) in [
        (vec!["--pod", pod.as_str()], 1),
        (vec!["--pod", other_pod.as_str()], 0),
        (vec!["--label", "container=burn"], 1),
        (vec!["--label", "container=done"], 0),
        (vec!["--id", &burn[..12]], 1),
        (vec!["-a", "--id", done.as_str()], 0),
        (vec!["-a", "--id", idle.as_str()], 0),
    ] {
        assert_eq!(stats(&args).len(), listed, "{args:?}");
    }

    // Pod stats: the VM's CPU time and resident memory, its running container.
    let statsp = |args: &[&str]| -> Vec<serde_json::Value> {
        let all: Vec<&str> = ["statsp"].iter().chain(args).copied().collect();
        c.crictl_json(&all)["stats"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let pods = statsp(&[]);
    assert_eq!(pods.len(), 1, "{pods:?}");
    let p = &pods[0];
    println!("pod stats: {p}");
    assert_eq!(p["attributes"]["id"], pod.as_str());
    assert_eq!(p["attributes"]["metadata"]["name"], "stats");
    assert_eq!(p["attributes"]["labels"]["app"], "stats");
    assert_eq!(
        ids(p["linux"]["containers"].as_array().unwrap()),
        [burn.as_str()]
    );
    assert!(number(p, "linux/cpu/usageCoreNanoSeconds/value") > 0, "{p}");
    let container_memory = number(&p["linux"]["containers"][0], "memory/workingSetBytes/value");
    let vm_memory = number(p, "linux/memory/workingSetBytes/value");
    assert!(
        vm_memory > container_memory && container_memory > 10 << 20,
        "VM {vm_memory}, container {container_memory}"
    );
    // sh, dd and sleep at least.
    assert!(number(p, "linux/process/processCount/value") >= 3, "{p}");
    for (args, listed) in [
        (vec!["--id", &pod[..12]], 1),
        (vec!["--id", other_pod.as_str()], 0),
        (vec!["--label", "app=stats"], 1),
        (vec!["--label", "app=none"], 0),
    ] {
        assert_eq!(statsp(&args).len(), listed, "{args:?}");
    }

    // The single calls (crictl uses the lists), and the metrics calls: nothing beyond stats.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (running, created, exited, pod_stats, descriptors, metrics) = runtime.block_on(async {
        let mut client = c.runtime().await;
        let container = |id: &str| {
            let request = cri::ContainerStatsRequest {
                container_id: id.to_owned(),
            };
            let mut client = client.clone();
            async move { client.container_stats(request).await }
        };
        let running = container(&burn).await;
        let created = container(&idle).await;
        let exited = container(&done).await;
        let pod_stats = client
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await;
        let descriptors = client
            .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
            .await;
        let metrics = client
            .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
            .await;
        (running, created, exited, pod_stats, descriptors, metrics)
    });
    let running = running.unwrap().into_inner().stats.unwrap();
    assert_eq!(running.attributes.unwrap().id, burn);
    assert!(running.cpu.unwrap().usage_core_nano_seconds.unwrap().value > later);
    let created = created.unwrap().into_inner().stats.unwrap();
    assert_eq!(created.attributes.unwrap().id, idle);
    assert_eq!(
        created.cpu.unwrap().usage_core_nano_seconds.unwrap().value,
        0
    );
    assert_eq!(exited.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let pod_stats = pod_stats.unwrap().into_inner().stats.unwrap();
    assert_eq!(pod_stats.linux.unwrap().containers.len(), 1);
    assert!(descriptors.unwrap().into_inner().descriptors.is_empty());
    assert!(metrics.unwrap().into_inner().pod_metrics.is_empty());

    // A stopped container is not listed; a stopped pod neither.
    c.crictl_ok(&["stop", "--timeout", "0", &burn]);
    b.wait_state(&burn, "CONTAINER_EXITED");
    assert!(stats(&["-a"]).is_empty());
    let pods = statsp(&[]);
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert!(
        pods[0]["linux"]["containers"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{pods:?}"
    );
    c.crictl_ok(&["stopp", &pod]);
    assert!(statsp(&[]).is_empty());
    c.crictl_ok(&["rmp", &pod]);
    b.assert_clean(&pod);
}
