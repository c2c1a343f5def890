//! Helpers for the tests that need an L1 of their own (they stop, pause or idle it out).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Points this process's test host at a private run dir (one L1 per run dir) with a small L1,
/// after stopping whatever a previous run left there. Call first, from the binary's only test.
pub fn use_private_run_dir(name: &str) -> PathBuf {
    let run_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/testhost-tests")
        .join(name);
    // This binary has a single test: no other thread reads the environment meanwhile.
    std::env::set_var("CRX_TESTHOST_RUN_DIR", &run_dir);
    std::env::set_var("CRX_TESTHOST_MEM_MIB", "1024");
    crx_testhost::TestHost::stop().expect("stop a leftover test host");
    if let Ok(entries) = std::fs::read_dir(&run_dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("hang-") {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
    }
    run_dir
}

/// Whether `pid` is a live process (a zombie child of ours counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// Waits up to `timeout` for `pid` to be gone.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    true
}
