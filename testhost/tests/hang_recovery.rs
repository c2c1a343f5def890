//! A hung L1 (here: paused through the QEMU monitor) is dumped, killed and replaced, and the
//! command runs again in the new one.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crx_testhost::{Invocation, TestHost};

#[test]
fn a_hung_test_host_is_replaced_and_the_command_retried() {
    let run_dir = common::use_private_run_dir("hang");
    std::env::set_var("CRX_TESTHOST_HANG_SECS", "5");
    let host = TestHost::shared().expect("start a test host");
    let hung_pid = host.qemu_pid();

    pause(&run_dir);

    let output = host
        .run(&Invocation::new(["sh", "-c", "echo after-recovery"]))
        .expect("the command runs in a replacement test host");
    assert_eq!(output.stdout, b"after-recovery\n");
    assert_ne!(
        host.qemu_pid(),
        hung_pid,
        "the handle still points at the hung L1"
    );
    assert!(
        common::wait_gone(hung_pid, Duration::from_secs(5)),
        "the hung QEMU (pid {hung_pid}) was not killed"
    );

    let dumps: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("hang-"))
        .collect();
    assert_eq!(
        dumps.len(),
        1,
        "expected one hang-*.txt in {}",
        run_dir.display()
    );
    let dump = std::fs::read_to_string(dumps[0].path()).unwrap();
    assert!(dump.contains("RIP="), "no registers in the dump:\n{dump}");

    assert!(TestHost::stop().expect("stop"));
}

/// Pauses the L1's vCPUs with the monitor's `stop`, and lets go of the monitor (it serves one
/// client at a time, and the recovery needs it for its register dump).
fn pause(run_dir: &Path) {
    let mut monitor =
        UnixStream::connect(run_dir.join("monitor.sock")).expect("QEMU monitor socket");
    monitor
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut prompts = 0;
    monitor.write_all(b"stop\n").expect("pause the L1");
    // The banner's prompt, then the one after `stop`.
    while prompts < 2 {
        let n = monitor.read(&mut buf).expect("monitor answers");
        assert!(
            n > 0,
            "the monitor closed: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
        prompts = seen.windows(7).filter(|w| w == b"(qemu) ").count();
    }
}
