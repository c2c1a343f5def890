//! Sharing, leases, removal, GC and import against a real `docker-registry`: concurrent pulls
//! across tasks and processes fetch each blob once; rmi is refused while leased; GC frees
//! exactly the unused layers; skopeo-written OCI archives and layouts import.

use crx_test_support as support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crx_image::{Error, LogProgress, RegistryConfig, Store};
use support::layout::{random_bytes, Comp, Layer, Layout};
use support::Registry;

fn store(root: &Path) -> Store {
    Store::open(root, RegistryConfig::default()).unwrap()
}

/// Images `a` and `b` sharing two base layers, each with one layer of its own.
fn push_sharing_images(tmp: &Path, reg: &Registry) {
    let mut layout = Layout::new(&tmp.join("layout"));
    let shared = || {
        vec![
            Layer::busybox(),
            Layer::files(
                &[("data/shared.bin", &random_bytes(2 << 20, 1))],
                Comp::Gzip,
            ),
        ]
    };
    let mut a = shared();
    a.push(Layer::files(&[("only-a", b"a")], Comp::Zstd));
    let mut b = shared();
    b.push(Layer::files(&[("only-b", b"b")], Comp::Gzip));
    let (ma, mb) = (layout.image(&a, "amd64"), layout.image(&b, "amd64"));
    layout.tag(ma, "a");
    layout.tag(mb, "b");
    reg.push(&layout.dir, "a", "crx/a", None);
    reg.push(&layout.dir, "b", "crx/b", None);
}

/// Child-process half of `concurrent_pulls_fetch_each_blob_once`.
#[test]
#[ignore = "helper run in child processes by concurrent_pulls_fetch_each_blob_once"]
fn child_pull() {
    let root =
        std::env::var("CRX_TEST_CHILD_ROOT").expect("run by concurrent_pulls_fetch_each_blob_once");
    let reference = std::env::var("CRX_TEST_CHILD_REF").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(store(Path::new(&root)).pull(&reference, &LogProgress))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_fetch_each_blob_once() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    push_sharing_images(tmp.path(), &reg);
    let root = tmp.path().join("store");
    let refs = [
        format!("{}/crx/a:a", reg.addr()),
        format!("{}/crx/b:b", reg.addr()),
    ];

    // 4 pulls in this process (separate Store handles) and 4 in child processes.
    let children: Vec<_> = (0..4)
        .map(|i| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "child_pull", "--ignored", "--quiet"])
                .env("CRX_TEST_CHILD_ROOT", &root)
                .env("CRX_TEST_CHILD_REF", &refs[i % 2])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (root, reference) = (root.clone(), refs[i % 2].clone());
            tokio::spawn(async move { store(&root).pull(&reference, &LogProgress).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for mut c in children {
        assert!(c.wait().unwrap().success(), "child pull failed");
    }

    let s = store(&root);
    let images = s.images().unwrap();
    assert_eq!(images.len(), 2);
    let blobs: BTreeSet<String> = images
        .iter()
        .flat_map(|i| {
            i.layers
                .iter()
                .map(|l| l.digest.to_string())
                .chain([i.config.to_string()])
        })
        .collect();
    assert_eq!(blobs.len(), 4 + 2, "3 + 1 distinct layers, 2 configs");
    for b in &blobs {
        assert_eq!(
            reg.blob_gets(b),
            1,
            "blob {b} fetched {} times; registry log:\n{}",
            reg.blob_gets(b),
            reg.log()
        );
    }
    // 4 distinct chains: two shared, one per image.
    assert_eq!(std::fs::read_dir(root.join("layers")).unwrap().count(), 4);
    assert_eq!(
        s.layer_refs()
            .unwrap()
            .values()
            .copied()
            .collect::<Vec<_>>()
            .iter()
            .sum::<usize>(),
        6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmi_is_refused_while_leased_and_gc_frees_exactly_unused_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    push_sharing_images(tmp.path(), &reg);
    let root = tmp.path().join("store");
    let s = store(&root);
    let a = s
        .pull(&format!("{}/crx/a:a", reg.addr()), &LogProgress)
        .await
        .unwrap();
    let b = s
        .pull(&format!("{}/crx/b:b", reg.addr()), &LogProgress)
        .await
        .unwrap();

    s.lease(&a.name, "container-1").unwrap();
    // A fresh handle (as after a restart) sees the lease.
    let err = store(&root).remove(&a.name).unwrap_err();
    assert!(
        matches!(&err, Error::InUse { holders, .. } if holders == &["container-1".to_owned()]),
        "{err:?}"
    );
    assert!(s.image(&a.name).is_ok());
    assert!(
        s.gc().unwrap().layers_removed.is_empty(),
        "GC keeps everything in use"
    );

    s.release("container-1").unwrap();
    assert!(matches!(
        s.release("container-1"),
        Err(Error::LeaseNotFound(_))
    ));
    s.remove(&a.name).unwrap();
    assert!(matches!(s.image(&a.name), Err(Error::ImageNotFound(_))));

    let report = s.gc().unwrap();
    let only_a = a.layers.last().unwrap();
    assert_eq!(report.layers_removed, vec![only_a.chain_id.clone()]);
    let mut removed: Vec<String> = report.blobs_removed.iter().map(|d| d.to_string()).collect();
    removed.sort();
    let mut expected = vec![
        a.manifest.to_string(),
        a.config.to_string(),
        only_a.digest.to_string(),
    ];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(report.bytes_freed > 0);
    // b is whole and still usable; a second GC has nothing to do.
    assert!(s.rootfs(&b).unwrap().join("bin/busybox").is_file());
    assert!(s.rootfs(&b).unwrap().join("only-b").is_file());
    for l in &b.layers {
        assert!(root
            .join("layers")
            .join(l.chain_id.hex())
            .join("rootfs")
            .is_dir());
        assert!(root.join("blobs/sha256").join(l.digest.hex()).is_file());
    }
    assert_eq!(s.gc().unwrap().layers_removed.len(), 0);
    s.remove(&b.name).unwrap();
    let report = s.gc().unwrap();
    assert_eq!(report.layers_removed.len(), 3);
    assert!(std::fs::read_dir(root.join("blobs/sha256"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn imports_oci_archive_and_layout_written_by_skopeo() {
    support::require_tools();
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let m = layout.image(
        &[
            Layer::busybox(),
            Layer::files(&[("etc/motd", b"imported\n")], Comp::Zstd),
        ],
        "amd64",
    );
    layout.tag(m, "v1");
    let archive = tmp.path().join("img.tar");
    let copied = tmp.path().join("copied");
    for dest in [
        format!(
            "oci-archive:{}:example.com/air/gapped:v1",
            archive.display()
        ),
        format!("oci:{}:v1", copied.display()),
    ] {
        let out = Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci:{}:v1", layout.dir.display()))
            .arg(&dest)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy to {dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let s = store(&tmp.path().join("store"));
    let recs = s.import(&archive, None).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].name, "example.com/air/gapped:v1");
    assert_eq!(
        std::fs::read(s.rootfs(&recs[0]).unwrap().join("etc/motd")).unwrap(),
        b"imported\n"
    );

    let run = s.run_config(&recs[0]).unwrap();
    assert_eq!(run.cmd, ["/bin/busybox", "sh"]);
    assert!(run.entrypoint.is_empty() && run.env.is_empty() && run.user.is_empty());

    let err = s.import(&copied, None).unwrap_err();
    assert!(err.to_string().contains("pass a name"), "{err}");
    let recs2 = s.import(&copied, Some("local/copied:v1")).unwrap();
    assert_eq!(recs2[0].name, "docker.io/local/copied:v1");
    assert_eq!(recs2[0].manifest, recs[0].manifest);
    assert_eq!(s.rootfs(&recs2[0]), s.rootfs(&recs[0]));
}
