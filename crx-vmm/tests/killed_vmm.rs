//! A VMM process killed outright (SIGKILL: no teardown runs) leaves no virtiofsd behind.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Pids of the processes whose parent is `parent` and whose name is `name`.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if comm.ends_with(&format!("({name}")) && ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < deadline, "{what} within {deadline:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn virtiofsd_dies_with_a_killed_vmm() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let shared = std::env::temp_dir().join(format!("crx-vmm-killed-{}", std::process::id()));
    std::fs::create_dir_all(&shared).unwrap();
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_crx-vmm"))
        .args(["--mem-mib", "128", "--fs"])
        .arg(format!("share={}", shared.display()))
        .args(["--", "/bin/sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("crx-vmm runs");
    let mut virtiofsd = Vec::new();
    wait_until("virtiofsd started", Duration::from_secs(60), || {
        virtiofsd = children_named(vmm.id(), "virtiofsd");
        !virtiofsd.is_empty()
    });
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    println!("crx-vm-boot: virtiofsd_dies_with_a_killed_vmm: VMM killed (SIGKILL)");
    let pid = virtiofsd[0];
    wait_until(
        "virtiofsd gone after its VMM was killed",
        Duration::from_secs(20),
        || !alive(pid),
    );
    let _ = std::fs::remove_dir_all(&shared);
}
