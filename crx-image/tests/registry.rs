//! The image service against a real Debian `docker-registry` started per test on a free
//! loopback port, with images built here from busybox and pushed with skopeo.

use crx_test_support as support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crx_image::{Credential, Error, LogProgress, RegistryConfig, Store};
use support::layout::{digest, sha, Comp, Layer, Layout};
use support::{files_under, Registry};

fn store(root: &Path) -> Store {
    Store::open(root, RegistryConfig::default()).unwrap()
}

/// Three layers: busybox (gzip), a zstd layer, and a plain tar that whites out a file.
fn three_layers() -> Vec<Layer> {
    vec![
        Layer::busybox(),
        Layer::files(
            &[("etc/motd", b"hello from crx\n"), ("etc/old", b"gone soon")],
            Comp::Zstd,
        ),
        Layer::files(
            &[("etc/.wh.old", b""), ("usr/share/msg", b"top")],
            Comp::None,
        ),
    ]
}

fn rootfs_runs_busybox(store: &Store, rec: &crx_image::ImageRecord) {
    let rootfs = store.rootfs(rec).unwrap();
    let out = Command::new(rootfs.join("bin/busybox"))
        .args(["cat", rootfs.join("etc/motd").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from crx\n");
    assert!(!rootfs.join("etc/old").exists(), "whiteout applied");
    assert_eq!(std::fs::read(rootfs.join("usr/share/msg")).unwrap(), b"top");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_by_tag_and_by_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let m = layout.image(&three_layers(), "amd64");
    layout.tag(m, "v1");
    reg.push(&layout.dir, "v1", "crx/busybox", None);

    let store = store(&tmp.path().join("store"));
    let by_tag = store
        .pull(&format!("{}/crx/busybox:v1", reg.addr()), &LogProgress)
        .await
        .unwrap();
    let served = sha(&support::manifest_raw(&reg, "crx/busybox", "v1"));
    assert_eq!(by_tag.manifest.as_str(), served);
    assert_eq!(by_tag.layers.len(), 3);
    assert!(by_tag.index.is_none());
    rootfs_runs_busybox(&store, &by_tag);

    let by_digest = store
        .pull(
            &format!("{}/crx/busybox@{served}", reg.addr()),
            &LogProgress,
        )
        .await
        .unwrap();
    assert_eq!(by_digest.manifest, by_tag.manifest);
    assert_eq!(
        store.rootfs(&by_digest),
        store.rootfs(&by_tag),
        "same chain, unpacked once"
    );
    assert_eq!(store.images().unwrap().len(), 2);
    assert!(
        store.image(&by_tag.manifest.hex()[..12]).is_err(),
        "prefix shared by two names is ambiguous"
    );
    assert_eq!(
        store
            .image(&format!("{}/crx/busybox:v1", reg.addr()))
            .unwrap(),
        by_tag
    );
    assert!(files_under(&store.root().join("ingest")).is_empty());
    let usage = store.fs_usage().unwrap();
    assert!(
        usage.used_bytes > 1_000_000
            && usage.inodes_used > 10
            && usage.fs_total_bytes > usage.used_bytes,
        "{usage:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_index_resolves_to_linux_amd64() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let arm = layout.image(&[Layer::files(&[("arch", b"arm64")], Comp::Gzip)], "arm64");
    let amd = layout.image(&three_layers(), "amd64");
    let idx = layout.multi(vec![arm, amd]);
    layout.tag(idx, "multi");
    reg.push(&layout.dir, "multi", "crx/multi", None);
    let served = support::manifest_raw(&reg, "crx/multi", "multi");
    let served_idx: serde_json::Value = serde_json::from_slice(&served).unwrap();
    let amd_entry = served_idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "amd64")
        .unwrap();

    let store = store(&tmp.path().join("store"));
    let rec = store
        .pull(&format!("{}/crx/multi:multi", reg.addr()), &LogProgress)
        .await
        .unwrap();
    assert_eq!(rec.manifest.as_str(), digest(amd_entry));
    assert_eq!(
        rec.index.as_ref().map(|d| d.to_string()),
        Some(sha(&served))
    );
    rootfs_runs_busybox(&store, &rec);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_required_fails_clearly_then_succeeds_with_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), Some(("alice", "wonderland")));
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let m = layout.image(&[Layer::busybox()], "amd64");
    layout.tag(m, "v1");
    reg.push(
        &layout.dir,
        "v1",
        "private/img",
        Some(("alice", "wonderland")),
    );
    let reference = format!("{}/private/img:v1", reg.addr());

    let anon = store(&tmp.path().join("store"));
    let err = anon.pull(&reference, &LogProgress).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("authentication required"), "{err}");

    let mut wrong = RegistryConfig::default();
    wrong.credentials.insert(
        reg.addr(),
        Credential {
            username: "alice".into(),
            password: "nope".into(),
        },
    );
    let err = Store::open(tmp.path().join("store"), wrong)
        .unwrap()
        .pull(&reference, &LogProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");

    // Docker-style auth file.
    let auth = tmp.path().join("auth.json");
    let b64 = base64_encode("alice:wonderland");
    std::fs::write(
        &auth,
        format!(r#"{{"auths":{{"{}":{{"auth":"{b64}"}}}}}}"#, reg.addr()),
    )
    .unwrap();
    let cfg = RegistryConfig {
        auth_file: Some(auth),
        ..Default::default()
    };
    let rec = Store::open(tmp.path().join("store"), cfg)
        .unwrap()
        .pull(&reference, &LogProgress)
        .await
        .unwrap();
    assert_eq!(rec.layers.len(), 1);
}

fn base64_encode(s: &str) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    out.stdin.as_ref().unwrap().write_all(s.as_bytes()).unwrap();
    String::from_utf8(out.wait_with_output().unwrap().stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blob_is_rejected_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let layers = three_layers();
    let m = layout.image(&layers, "amd64");
    layout.tag(m, "v1");
    reg.push(&layout.dir, "v1", "crx/corrupt", None);
    // Flip bytes in the middle of the busybox layer as the registry stores it.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.dir.join("index.json")).unwrap()).unwrap();
    let mdigest = manifest["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let man: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.dir.join("blobs/sha256").join(&mdigest[7..])).unwrap(),
    )
    .unwrap();
    let bad = man["layers"][0]["digest"].as_str().unwrap().to_owned();
    let file = reg.blob_file(&bad);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    bytes[mid + 1] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();

    let store = store(&tmp.path().join("store"));
    let err = store
        .pull(&format!("{}/crx/corrupt:v1", reg.addr()), &LogProgress)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&bad) || format!("{err:?}").contains(&bad[7..]),
        "error names the bad blob: {err:?}"
    );
    assert!(
        !store.root().join("blobs/sha256").join(&bad[7..]).exists(),
        "corrupt blob committed"
    );
    assert!(
        files_under(&store.root().join("ingest")).is_empty(),
        "partial left: {:?}",
        files_under(&store.root().join("ingest"))
    );
    assert!(store.images().unwrap().is_empty());
    assert!(files_under(&store.root().join("layers"))
        .iter()
        .all(|p| !p.starts_with(store.root().join("layers").join(".tmp"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_killed_mid_pull_fails_cleanly_and_retry_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&tmp.path().join("reg"), None);
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let big = support::layout::random_bytes(24 << 20, 7);
    let m = layout.image(
        &[
            Layer::busybox(),
            Layer::files(&[("big.bin", &big)], Comp::None),
        ],
        "amd64",
    );
    layout.tag(m, "v1");
    reg.push(&layout.dir, "v1", "crx/big", None);
    // 8 MiB/s through the proxy: the 24 MiB layer takes ~3 s.
    let proxy = support::proxy::throttled(reg.addr(), 8 << 20).await;
    let store = Arc::new(store(&tmp.path().join("store")));
    let reference = format!("{proxy}/crx/big:v1");

    let pull = tokio::spawn({
        let (store, reference) = (store.clone(), reference.clone());
        async move { store.pull(&reference, &LogProgress).await }
    });
    let ingest = store.root().join("ingest");
    let started = std::time::Instant::now();
    loop {
        let partial: u64 = files_under(&ingest)
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        if partial > 4 << 20 {
            break;
        }
        if pull.is_finished() {
            panic!("pull ended before the kill: {:?}", pull.await.unwrap());
        }
        assert!(started.elapsed().as_secs() < 30, "pull never got going");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    reg.kill();
    let err = pull.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Registry { .. }), "{err:?}");
    assert!(
        files_under(&ingest).is_empty(),
        "partial files left: {:?}",
        files_under(&ingest)
    );
    assert!(store.images().unwrap().is_empty());

    reg.restart();
    let rec = store.pull(&reference, &LogProgress).await.unwrap();
    let rootfs = store.rootfs(&rec).unwrap();
    assert_eq!(std::fs::read(rootfs.join("big.bin")).unwrap(), big);
    assert!(files_under(&ingest).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_redirect_a_registry_host() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let m = layout.image(&[Layer::busybox()], "amd64");
    layout.tag(m, "3.9");
    reg.push(&layout.dir, "3.9", "pause", None);
    let mut cfg = RegistryConfig::default();
    cfg.mirrors.insert("registry.k8s.io".into(), reg.addr());
    let store = Store::open(tmp.path().join("store"), cfg).unwrap();
    let rec = store
        .pull("registry.k8s.io/pause:3.9", &LogProgress)
        .await
        .unwrap();
    assert_eq!(rec.name, "registry.k8s.io/pause:3.9");
    assert!(store.rootfs(&rec).unwrap().join("bin/busybox").is_file());
}
