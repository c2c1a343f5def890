//! The test host through the library API: exit codes, output streams, working directory, shared
//! files, standard KVM inside, concurrency, reuse, VM tests re-run inside, and leftovers killed.
//!
//! Every test uses the run's shared test host (started on first use): on a machine without KVM,
//! or where the test host cannot start, they fail with the reason.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Instant;

use crx_testhost::{guests_run_here, Error, Invocation, TestHost};

fn host() -> TestHost {
    TestHost::shared().unwrap_or_else(|e| panic!("the test host is unavailable: {e}"))
}

fn sh(script: &str) -> Invocation {
    Invocation::new(["sh", "-c", script])
}

#[test]
fn exit_codes_and_signals_pass_through() {
    let host = host();
    let code = |cmd: Invocation| host.run(&cmd).expect("run").status;
    assert_eq!(code(Invocation::new(["true"])).code(), Some(0));
    assert_eq!(code(Invocation::new(["false"])).code(), Some(1));
    assert_eq!(code(sh("exit 7")).code(), Some(7));
    let killed = code(sh("kill -9 $$"));
    assert_eq!((killed.code(), killed.signal()), (None, Some(9)));
}

#[test]
fn stdout_and_stderr_are_kept_apart() {
    let output = host()
        .run(&sh("echo to-out; echo to-err >&2; printf 'no newline'"))
        .expect("run");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "to-out\nno newline"
    );
    assert_eq!(String::from_utf8_lossy(&output.stderr), "to-err\n");
}

#[test]
fn large_output_arrives_whole() {
    let output = host()
        .run(&sh("head -c 3000000 /dev/zero; echo end >&2"))
        .expect("run");
    assert_eq!(output.stdout.len(), 3_000_000);
    assert!(output.stdout.iter().all(|b| *b == 0));
    assert_eq!(output.stderr, b"end\n");
}

#[test]
fn cwd_and_env_are_the_callers() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let output = host()
        .run(
            &sh("pwd; echo \"$CRX_TEST_VALUE\"")
                .cwd(dir)
                .env("CRX_TEST_VALUE", "a b"),
        )
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{dir}\na b\n")
    );
    let default_cwd = host().run(&Invocation::new(["pwd"])).expect("run");
    let here = std::env::current_dir().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&default_cwd.stdout).trim_end(),
        here.to_str().unwrap()
    );
}

#[test]
fn files_written_inside_are_visible_outside() {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/testhost-api-test");
    std::fs::create_dir_all(&target).unwrap();
    let in_target = target.join(format!("written-{}", std::process::id()));
    let in_tmp = std::env::temp_dir().join(format!("crx-testhost-written-{}", std::process::id()));
    let script = format!(
        "echo inside > {} && echo inside > {}",
        in_target.display(),
        in_tmp.display()
    );
    assert!(host().run(&sh(&script)).expect("run").status.success());
    for file in [&in_target, &in_tmp] {
        assert_eq!(
            std::fs::read_to_string(file).unwrap(),
            "inside\n",
            "{}",
            file.display()
        );
        std::fs::remove_file(file).unwrap();
    }
    // And the other way round.
    std::fs::write(&in_target, "outside").unwrap();
    let output = host()
        .run(&Invocation::new(["cat".as_ref(), in_target.as_os_str()]))
        .expect("run");
    assert_eq!(output.stdout, b"outside");
    std::fs::remove_file(&in_target).unwrap();
}

#[test]
fn the_test_host_has_standard_kvm() {
    let status = host().status().expect("status");
    assert_eq!(status.kvm.as_deref(), Some("Standard"), "{status:?}");
    let output = host()
        .run(&sh("cat /sys/module/kvm_amd/parameters/npt /sys/module/kvm_amd/parameters/nested; test -c /dev/kvm"))
        .expect("run");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "Y\n1\n");
}

#[test]
fn commands_run_concurrently() {
    let host = host();
    let started = Instant::now();
    let outputs: Vec<_> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..2)
            .map(|i| {
                let host = &host;
                scope.spawn(move || host.run(&sh(&format!("sleep 3; echo {i}"))).expect("run"))
            })
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();
    for (i, output) in outputs.iter().enumerate() {
        assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{i}\n"));
    }
    assert!(
        elapsed.as_secs_f64() < 5.5,
        "two 3 s sleeps took {elapsed:?}: not concurrent"
    );
}

#[test]
fn handles_share_one_l1() {
    let first = host();
    let second = host();
    assert_eq!(first.qemu_pid(), second.qemu_pid());
    assert!(Path::new(&format!("/proc/{}", first.qemu_pid())).exists());
}

#[test]
fn a_missing_program_is_an_error() {
    match host().run(&Invocation::new(["/nonexistent/program"])) {
        Err(Error::Spawn { program, message }) => {
            assert_eq!(program, "/nonexistent/program");
            assert!(message.contains("No such file"), "{message}");
        }
        other => panic!("expected a spawn error, got {other:?}"),
    }
}

#[test]
fn per_command_overhead() {
    let host = host();
    let runs = 10;
    let started = Instant::now();
    for _ in 0..runs {
        assert!(host
            .run(&Invocation::new(["true"]))
            .expect("run")
            .status
            .success());
    }
    let each = started.elapsed() / runs;
    eprintln!("per-command round trip of `true` in the test host: {each:?}");
    assert!(each.as_secs() < 5, "a `true` took {each:?}");
}

#[test]
fn vm_test_runs_where_kvm_is_standard() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    assert!(
        guests_run_here().expect("probe"),
        "the body must only run on standard KVM"
    );
}

#[test]
fn a_vm_test_name_matching_no_test_fails_loudly() {
    if guests_run_here().expect("probe") {
        // Standard KVM: every VM test runs here, whatever its name.
        assert!(crx_testhost::run_vm_test_here("no::such::test"));
        return;
    }
    let panic = std::panic::catch_unwind(|| crx_testhost::run_vm_test_here("no::such::test"))
        .expect_err("an unknown test name must panic");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("ran no test"), "{message}");
}

#[test]
fn what_a_command_leaves_running_is_killed_and_named() {
    let host = host();
    // A daemon in a session of its own, beyond the command's process group.
    let output = host
        .run(&sh(
            "setsid sleep 31337 </dev/null >/dev/null 2>&1 & sleep 0.2",
        ))
        .expect("run");
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("killed what the command left running") && stderr.contains("(sleep)"),
        "{stderr}"
    );
    let left = host.run(&sh("pgrep -f 'slee[p] 31337'")).expect("run");
    assert_eq!(
        left.status.code(),
        Some(1),
        "still running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
