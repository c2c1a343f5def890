//! crx-cri driven by the real `crictl` (cri-tools v1.32): version, info, pull (anonymous and
//! with credentials) from a real `docker-registry`, images, inspecti, imagefsinfo, rmi; the
//! bundled busybox known as `busybox`; malformed requests, idempotent removal, unimplemented
//! calls and the socket's life, through a gRPC client.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use base64::Engine as _;
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
    let cri = CriServer::start(
        &tmp.path().join("cri"),
        &sockets.path().join("crx.sock"),
        &tmp.path().join("store"),
        "",
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
    assert_eq!(condition("NetworkReady")["reason"], "NetworkNotImplemented");
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
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(err.message().contains("RunPodSandbox"), "{err}");
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
