//! An idle L1 powers itself off; `TestHost::stop` stops a running one.

mod common;

use std::time::Duration;

use crx_testhost::{Invocation, TestHost};

#[test]
fn an_idle_test_host_powers_off_and_stop_stops_a_busy_one() {
    common::use_private_run_dir("idle");
    // Long enough for a loaded machine to connect once the agent serves (it counts from then).
    std::env::set_var("CRX_TESTHOST_IDLE_SECS", "10");
    let host = TestHost::shared().expect("start a test host");
    let idle_pid = host.qemu_pid();
    assert!(host
        .run(&Invocation::new(["true"]))
        .expect("run")
        .status
        .success());
    assert!(
        common::wait_gone(idle_pid, Duration::from_secs(60)),
        "the L1 (QEMU pid {idle_pid}) did not power off after 10 idle seconds"
    );
    assert!(TestHost::running().expect("status").is_none());

    std::env::set_var("CRX_TESTHOST_IDLE_SECS", "600");
    let host = TestHost::shared().expect("start a second test host");
    let pid = host.qemu_pid();
    assert_ne!(pid, idle_pid);
    assert!(
        TestHost::stop().expect("stop"),
        "stop found no running test host"
    );
    assert!(
        common::wait_gone(pid, Duration::from_secs(5)),
        "QEMU pid {pid} still runs after stop"
    );
    assert!(
        !TestHost::stop().expect("stop again"),
        "a second stop found a test host"
    );
}
