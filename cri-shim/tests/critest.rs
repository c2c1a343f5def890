//! critest (cri-tools v1.32, the CRI validation suite) against crx-cri: the image group
//! ("Image Manager") and the runtime info group, with every image critest pulls served by a
//! real `docker-registry` on loopback. The images are the stand-ins of
//! `../shared/cri-tools/bench.sh` (its `files` step writes `images/build-images.sh`, which
//! builds them reproducibly and pushes them under the paths critest asks for); crx-cri's
//! registry mirrors send registry.k8s.io and gcr.io to the local registry. The pushed registry
//! storage is cached in the target directory, keyed by bench.sh's digest.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crx_test_support::Registry;
use support::{cri_tool, cri_tools, socket_dir, CriServer};

/// critest groups run here.
const FOCUS: &str = r"\[k8s\.io\] (Image Manager|Runtime info)";
/// Specs in those groups (critest v1.32): 8 image, 2 runtime info.
const SPECS: usize = 10;
/// Specs that cannot pass yet, and why.
const KNOWN_FAILURES: &[(&str, &str)] = &[
    (
        "public image with digest should be pulled and removed [Conformance]",
        "it pulls test-image-digest@sha256:9700f9…, an upstream manifest no offline stand-in can reproduce",
    ),
];

/// Registry storage holding every stand-in image, built once per bench.sh version.
fn standin_registry_storage() -> PathBuf {
    let bench = cri_tools().join("bench.sh");
    let script = std::fs::read(&bench).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (cri-tools' bench.sh builds critest's images)",
            bench.display()
        )
    });
    let key = crx_image::Digest::of(&script).hex()[..16].to_owned();
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("critest-images-{key}"));
    let data = cache.join("data");
    let done = cache.join("complete");
    if done.exists() {
        return data;
    }
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    let work = tempfile::tempdir_in(&cache).unwrap();
    let base = work.path().join("bench");
    let files = Command::new("bash")
        .arg(&bench)
        .arg("files")
        .env("BASE", &base)
        .output()
        .expect("run bench.sh");
    assert!(
        files.status.success(),
        "bench.sh files failed: {}",
        String::from_utf8_lossy(&files.stderr)
    );
    let reg = Registry::start(&work.path().join("reg"), None);
    let build = Command::new(base.join("images/build-images.sh"))
        .arg("push")
        .env("REG", reg.addr())
        .current_dir(&base)
        .output()
        .expect("run build-images.sh");
    assert!(
        build.status.success(),
        "bench.sh's build-images.sh failed (it needs gcc, libc6-dev, python3, skopeo and `apt-get download busybox`):\n{}\n{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );
    drop(reg);
    std::fs::rename(work.path().join("reg/data"), &data).unwrap();
    std::fs::write(&done, b"").unwrap();
    data
}

#[test]
fn critest_image_and_runtime_info_groups() {
    let critest = cri_tool("critest");
    let storage = standin_registry_storage();
    let tmp = tempfile::tempdir().unwrap();
    let reg_dir = tmp.path().join("reg");
    std::fs::create_dir_all(&reg_dir).unwrap();
    let copy = Command::new("cp")
        .arg("-a")
        .arg(&storage)
        .arg(reg_dir.join("data"))
        .status()
        .unwrap();
    assert!(copy.success());
    let reg = Registry::start(&reg_dir, None);
    let mirrors: String = ["registry.k8s.io", "gcr.io", "k8s.gcr.io"]
        .iter()
        .map(|host| format!("\"{host}\" = \"{}\"\n", reg.addr()))
        .collect();
    // A CNI network configured (NetworkReady); these groups start no pods.
    let net_d = tmp.path().join("net.d");
    std::fs::create_dir_all(&net_d).unwrap();
    std::fs::write(
        net_d.join("10-critest.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "critest", "plugins": [{"type": "bridge", "bridge": "crxcritest0", "ipam": {"type": "host-local", "subnet": "10.89.9.0/24"}}]}"#,
    )
    .unwrap();
    let sockets = socket_dir();
    let cri = CriServer::start(
        &tmp.path().join("cri"),
        &sockets.path().join("crx.sock"),
        &tmp.path().join("store"), // empty, as critest needs
        &format!("[network]\ncni_conf_dir = {net_d:?}\n[image.mirrors]\n{mirrors}"),
    );

    let report = tmp.path().join("report.json");
    let out = Command::new(&critest)
        .arg("--runtime-endpoint")
        .arg(cri.endpoint())
        .arg("--image-endpoint")
        .arg(cri.endpoint())
        .arg(format!("--ginkgo.focus={FOCUS}"))
        .arg("--ginkgo.no-color")
        .arg(format!("--ginkgo.json-report={}", report.display()))
        .output()
        .expect("run critest");
    let log = String::from_utf8_lossy(&out.stdout);
    let text = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("critest wrote no report ({e}):\n{log}"));
    let suites: serde_json::Value = serde_json::from_str(&text).unwrap();

    let mut states: BTreeMap<String, String> = BTreeMap::new();
    let mut failures: BTreeMap<String, String> = BTreeMap::new();
    for spec in suites
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["SpecReports"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["LeafNodeType"] == "It")
    {
        let state = spec["State"].as_str().unwrap().to_owned();
        if state == "skipped" {
            continue; // outside the focus
        }
        let name = spec["LeafNodeText"].as_str().unwrap().to_owned();
        if let Some(message) = spec["Failure"]["Message"].as_str() {
            failures.insert(name.clone(), message.to_owned());
        }
        states.insert(name, state);
    }
    let count = |s: &str| states.values().filter(|v| *v == s).count();
    println!(
        "critest {FOCUS}: {} passed, {} failed, {} ran",
        count("passed"),
        states.len() - count("passed"),
        states.len()
    );
    for (name, state) in &states {
        println!("  {state:8} {name}");
    }
    assert_eq!(
        states.len(),
        SPECS,
        "critest ran other specs than expected: {states:#?}\n{log}"
    );
    for (name, state) in &states {
        if let Some((_, why)) = KNOWN_FAILURES.iter().find(|(n, _)| n == name) {
            if state != "passed" {
                println!("  known failure: {name}: {why}");
            }
            continue;
        }
        assert_eq!(
            state,
            "passed",
            "{name}: {}\ncrx-cri log:\n{}",
            failures.get(name).map(String::as_str).unwrap_or_default(),
            cri.log()
        );
    }
}
