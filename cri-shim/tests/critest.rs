//! critest (cri-tools v1.32, the CRI validation suite) against crx-cri: the image group
//! ("Image Manager") and the runtime info group, with every image critest pulls served by a
//! real `docker-registry` on loopback. The images are the stand-ins of
//! `../shared/cri-tools/bench.sh` (its `files` step writes `images/build-images.sh`, which
//! builds them reproducibly and pushes them under the paths critest asks for); crx-cri's
//! registry mirrors send registry.k8s.io and gcr.io to the local registry. The pushed registry
//! storage is cached in the target directory, keyed by bench.sh's digest. The pod and
//! container groups start VMs, so they run in the test host.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crx_test_support::cni::{BridgeNetwork, CNI_BIN};
use crx_test_support::Registry;
use support::{cri_tool, cri_tools, CriServer};

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
    // Both critest tests may build at once (one of them in the test host, on the same target
    // directory): each builds in its own directory and the first rename wins.
    if data.exists() {
        return data;
    }
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
        .env("BBDEB", busybox_deb())
        .current_dir(&base)
        .output()
        .expect("run build-images.sh");
    assert!(
        build.status.success(),
        "bench.sh's build-images.sh failed (it needs gcc, libc6-dev, python3 and skopeo):\n{}\n{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );
    drop(reg);
    if let Err(e) = std::fs::rename(work.path().join("reg/data"), &data) {
        assert!(
            data.exists(),
            "cannot keep the images in {}: {e}",
            data.display()
        );
    }
    data
}

/// Debian's dynamic busybox package, which setup.sh downloads (bench.sh's base layer is made
/// from it).
fn busybox_deb() -> PathBuf {
    let dir = Path::new("/var/cache/crx/debs");
    std::fs::read_dir(dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("busybox_") && name.ends_with(".deb")
        })
        .unwrap_or_else(|| {
            panic!(
                "no busybox_*.deb in {} (setup.sh downloads Debian's busybox package there)",
                dir.display()
            )
        })
}

/// One critest run against a fresh crx-cri (empty store, the stand-in registry behind its
/// mirrors, a CNI bridge network configured): each spec that ran, with its state and failure.
struct CritestRun {
    states: BTreeMap<String, String>,
    failures: BTreeMap<String, String>,
    log: String,
    cri_log: String,
}

/// A CNI bridge and its /24 prefix, one per critest run, so runs never share a network.
struct CritestNetwork {
    bridge: &'static str,
    prefix: &'static str,
}

fn run_critest(
    focus: &str,
    skip: Option<&str>,
    runtime_config: &str,
    network: &CritestNetwork,
) -> CritestRun {
    let critest = cri_tool("critest");
    let storage = standin_registry_storage();
    // On /run, not /tmp: in the test host /tmp is the host's over 9p, where copying the
    // registry's many small files took minutes.
    let tmp = tempfile::tempdir_in("/run").unwrap();
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
    // A CNI bridge network (NetworkReady; the pods of the runtime groups join it).
    let net_d = tmp.path().join("net.d");
    BridgeNetwork {
        name: "critest",
        bridge: network.bridge,
        prefix: network.prefix,
        dns: None,
    }
    .write(&net_d);
    // Short: the sandbox sockets under it must fit a Unix socket path.
    let sockets = tempfile::Builder::new()
        .prefix("cx")
        .tempdir_in("/run")
        .unwrap();
    let cri = CriServer::start(
        &sockets.path().join("cri"),
        &sockets.path().join("crx.sock"),
        &tmp.path().join("store"), // empty, as critest needs
        &format!(
            "{runtime_config}[network]\ncni_conf_dir = {net_d:?}\ncni_bin_dirs = [{CNI_BIN:?}]\n[image.mirrors]\n{mirrors}"
        ),
    );

    let report = tmp.path().join("report.json");
    let mut cmd = Command::new(&critest);
    cmd.arg("--runtime-endpoint")
        .arg(cri.endpoint())
        .arg("--image-endpoint")
        .arg(cri.endpoint())
        .arg(format!("--ginkgo.focus={focus}"))
        .arg("--ginkgo.no-color")
        .arg(format!("--ginkgo.json-report={}", report.display()));
    if let Some(skip) = skip {
        cmd.arg(format!("--ginkgo.skip={skip}"));
    }
    let out = cmd.output().expect("run critest");
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("critest wrote no report ({e}):\n{log}"));
    let suites: serde_json::Value = serde_json::from_str(&text).unwrap();

    let mut states: BTreeMap<String, String> = BTreeMap::new();
    let mut failures: BTreeMap<String, String> = BTreeMap::new();
    let specs: Vec<serde_json::Value> = suites
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["SpecReports"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["LeafNodeType"] == "It" && s["State"] != "skipped") // skipped: outside the focus
        .collect();
    let leaf = |spec: &serde_json::Value| spec["LeafNodeText"].as_str().unwrap().to_owned();
    for spec in &specs {
        let state = spec["State"].as_str().unwrap().to_owned();
        // A name several specs share (the Idempotence group's) is told apart by the context
        // around it: "StopContainer: should not return an error if not found".
        let mut name = leaf(spec);
        if specs.iter().filter(|s| leaf(s) == name).count() > 1 {
            let context = spec["ContainerHierarchyTexts"]
                .as_array()
                .and_then(|texts| texts.last())
                .and_then(|text| text.as_str())
                .unwrap_or_default();
            name = format!("{context}: {name}");
        }
        if let Some(message) = spec["Failure"]["Message"].as_str() {
            failures.insert(name.clone(), message.to_owned());
        }
        states.insert(name, state);
    }
    let count = |s: &str| states.values().filter(|v| *v == s).count();
    println!(
        "critest {focus}: {} passed, {} failed, {} ran",
        count("passed"),
        states.len() - count("passed"),
        states.len()
    );
    for (name, state) in &states {
        println!("  {state:8} {name}");
    }
    let cri_log = cri.log();
    let _ = Command::new("ip")
        .args(["link", "del", network.bridge])
        .output();
    CritestRun {
        states,
        failures,
        log,
        cri_log,
    }
}

#[test]
fn critest_image_and_runtime_info_groups() {
    let run = run_critest(
        FOCUS,
        None,
        "",
        &CritestNetwork {
            bridge: "crxcritest0",
            prefix: "10.89.9",
        },
    );
    let states = &run.states;
    assert_eq!(
        states.len(),
        SPECS,
        "critest ran other specs than expected: {states:#?}\n{}",
        run.log
    );
    for (name, state) in states {
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
            run.failures
                .get(name)
                .map(String::as_str)
                .unwrap_or_default(),
            run.cri_log
        );
    }
}

/// critest groups that start pods (each a VM), run in the test host.
const POD_FOCUS: &str =
    r"\[k8s\.io\] (PodSandbox|Container|Networking|Multiple Containers|Streaming)";
/// What cannot pass in a pod VM, by design: a mount a container makes cannot reach the host's
/// mount table (`rshared`: propagation from container to host). AppArmor and SELinux are not in
/// the guest kernel.
const POD_SKIP: &str = r"(?i)(rshared|apparmor|selinux|benchmark)";
/// Specs of [`POD_FOCUS`] that pass: all 42 that run (critest v1.32 names). "stopping
/// container" needs a SIGTERM sent right after start (before `top` installs its handler, slow
/// in the test host) to reach the container's init once it has one; "DNS config" the pod's
/// resolv.conf in the container; the sysctl specs the pod's IPC namespace shared by its
/// containers.
const POD_MUST_PASS: &[&str] = &[
    "runtime should support running PodSandbox [Conformance]",
    "runtime should support stopping PodSandbox [Conformance]",
    "runtime should support removing PodSandbox [Conformance]",
    "runtime should support creating container [Conformance]",
    "runtime should support starting container [Conformance]",
    "runtime should support starting container with log [Conformance]",
    "runtime should support removing created container [Conformance]",
    "runtime should support removing running container [Conformance]",
    "runtime should support stopping container [Conformance]",
    "runtime should support removing stopped container [Conformance]",
    "runtime should support DNS config [Conformance]",
    "should support safe sysctls",
    "should support unsafe sysctls",
    "runtime should support reopening container log [Conformance]",
    "runtime should support set hostname [Conformance]",
    "should support container log",
    "should support network",
    "should terminate with exitCode 137 and reason OOMKilled",
    "runtime should support listing container stats [Conformance]",
    "runtime should support listing stats for containers filtered by labels [Conformance]",
    "runtime should support listing stats for started containers [Conformance]",
    "runtime should support listing stats for started containers when filter is nil [Conformance]",
    "runtime should support listing stats for three created containers when filter is nil. [Conformance]",
    "runtime should support exec with tty=false and stdin=false [Conformance]",
    "runtime should support exec with tty=true and stdin=true [Conformance]",
    "runtime should support attach [Conformance]",
    "runtime should support execSync [Conformance]",
    "runtime should support execSync with timeout [Conformance]",
    "should support container exec",
    "runtime should support portforward [Conformance]",
    "runtime should support portforward in host network",
    "runtime should support port mapping with only container port [Conformance]",
    "runtime should support port mapping with host port and container port [Conformance]",
    "runtime should support starting container with volume [Conformance]",
    "runtime should support starting container with volume when host path is a symlink [Conformance]",
    "mount with 'rprivate' should not support propagation",
    "mount with 'rslave' should support propagation from host to container",
    "should reject a recursive readonly mount with PROPAGATION_HOST_TO_CONTAINER",
    "should reject a recursive readonly mount with PROPAGATION_BIDIRECTIONAL",
    "should reject a recursive readonly mount with ReadOnly: false",
    "should support non-recursive readonly mounts",
    "should support recursive readonly mounts",
];

/// The security context and idempotence groups, also run in the test host.
const SECURITY_FOCUS: &str = r"\[k8s\.io\] (Security Context|Idempotence)";
/// What cannot pass in a pod VM, by design: the node's IPC objects and network sockets
/// (`HostIpc is true`, `HostNetwork is true`: critest makes them on the machine it runs on and
/// looks for them inside the container) are outside the VM. critest skips by itself the
/// SupplementalGroupsPolicy and user namespace specs (crx-cri does not offer those features:
/// the policy's image is not among the stand-ins, and a pod's user namespace needs idmapped
/// mounts of virtio-fs roots in the guest).
const SECURITY_SKIP: &str = r"(?i)(HostIpc is true|HostNetwork is true|apparmor|selinux)";
/// Specs of [`SECURITY_FOCUS`] that pass: every one that runs.
const SECURITY_MUST_PASS: &[&str] = &[
    "runtime should support HostPID",
    "runtime should support HostIpc is false",
    "runtime should support PodPID",
    "runtime should support ContainerPID",
    "runtime should support HostNetwork is false",
    "runtime should support SupplementalGroups",
    "runtime should support RunAsUser",
    "runtime should support RunAsUserName",
    "runtime should support RunAsGroup",
    "runtime should return error if RunAsGroup is set without RunAsUser",
    "runtime should support that ReadOnlyRootfs is false",
    "runtime should support that ReadOnlyRootfs is true",
    "runtime should support Privileged is true",
    "runtime should support Privileged is false",
    "runtime should support adding capability",
    "runtime should support dropping capability",
    "runtime should support adding ALL capabilities",
    "runtime should support dropping ALL capabilities",
    "runtime should support MaskedPaths",
    "runtime should support ReadonlyPaths",
    "should support seccomp unconfined on the container",
    "should support seccomp localhost profile on the container",
    "should support seccomp default on the container",
    "should support nil profile, which is unconfined",
    "runtime should not block setting host name with unconfined seccomp and SYS_ADMIN",
    "runtime should support an seccomp profile that blocks setting hostname with SYS_ADMIN",
    "runtime should ignore a seccomp profile that blocks setting hostname when privileged",
    "should not allow privilege escalation when true",
    "should allow privilege escalation when false",
    "StopPodSandbox: should not return an error if not found",
    "StopPodSandbox: should not return an error if already stopped",
    "RemovePodSandbox: should not return an error if not found",
    "StopContainer: should not return an error if not found",
    "StopContainer: should not return an error if already stopped",
    "RemoveContainer: should not return an error if not found",
    "RemoveImage: should not return an error if not found",
];

/// The critest runs that start pods, one at a time: each boots tens of VMs in the one test
/// host (the test harness would run them at once).
static POD_RUNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the pod-starting groups `focus` (less `skip`) in the test host; every spec of
/// `must_pass` passed.
fn run_pod_groups(
    what: &str,
    focus: &str,
    skip: &str,
    network: &CritestNetwork,
    must_pass: &[&str],
) {
    let run = run_critest(
        focus,
        Some(skip),
        "[runtime]\nboot_timeout_secs = 300\n",
        network,
    );

    let started = |restored: bool| {
        let field = format!("restored={restored}");
        run.cri_log
            .lines()
            .filter(|l| l.contains("sandbox VMM started") && l.contains(&field))
            .count()
    };
    println!(
        "crx-vm-boot: critest {what} (one VM per pod: {} restored from pod templates, {} \
         booted cold)",
        started(true),
        started(false)
    );
    for (name, state) in &run.states {
        if state != "passed" {
            let why = run
                .failures
                .get(name)
                .map(String::as_str)
                .unwrap_or_default();
            println!("  {name}: {}", why.lines().next().unwrap_or_default());
        }
    }
    for name in must_pass {
        assert_eq!(
            run.states.get(*name).map(String::as_str),
            Some("passed"),
            "{name}: {}\ncritest:\n{}\ncrx-cri log:\n{}",
            run.failures
                .get(*name)
                .map(String::as_str)
                .unwrap_or_default(),
            run.log,
            run.cri_log
        );
    }
}

#[test]
fn critest_pod_and_container_groups() {
    let _one_at_a_time = POD_RUNS.lock().unwrap_or_else(|e| e.into_inner());
    if !crx_testhost::vm_test_here!() {
        return;
    }
    run_pod_groups(
        "pod and container groups",
        POD_FOCUS,
        POD_SKIP,
        &CritestNetwork {
            bridge: "crxcritest1",
            prefix: "10.89.10",
        },
        POD_MUST_PASS,
    );
}

#[test]
fn critest_security_context_and_idempotence_groups() {
    let _one_at_a_time = POD_RUNS.lock().unwrap_or_else(|e| e.into_inner());
    if !crx_testhost::vm_test_here!() {
        return;
    }
    run_pod_groups(
        "security context and idempotence groups",
        SECURITY_FOCUS,
        SECURITY_SKIP,
        &CritestNetwork {
            bridge: "crxcritest2",
            prefix: "10.89.11",
        },
        SECURITY_MUST_PASS,
    );
}
