//! VM tests: run the body here on standard KVM, else re-run the test inside the test host.

use std::ffi::OsString;

use crx_kvm_probe::KvmKind;

use crate::client::Stream;
use crate::error::Error;
use crate::host::TestHost;
use crate::invocation::Invocation;

/// Set (to `1`) in the environment of a test re-run inside the test host.
pub const IN_TESTHOST: &str = "CRX_IN_TESTHOST";

/// Is this host's `/dev/kvm` good for running guests directly (standard KVM, not PVM)?
/// `Err(Error::NoKvm)` when there is no `/dev/kvm` at all.
pub fn guests_run_here() -> Result<bool, Error> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err(Error::NoKvm);
    }
    Ok(crx_kvm_probe::probe()? == KvmKind::Standard)
}

/// For a VM test: returns true when guests run here, and the test body should run.
///
/// Otherwise re-runs this same test (`current_exe() <test_name> --exact --nocapture
/// --test-threads=1`) inside the shared test host with `CRX_IN_TESTHOST=1` and this process's
/// `RUST_*`, `CRX_*`, `CARGO_*` and `TMPDIR` variables, prints its output (through `print!`, so
/// libtest captures it like the test's own), runs it once more if it failed there (not if it
/// hung past `CRX_VM_TEST_TIMEOUT_SECS`; a pass on the retry is printed as FLAKY), panics if it
/// failed again, and returns false: the
/// caller then returns. `test_name` is the libtest name: the module path without the crate name
/// plus the function (`vstate::tests::boots_1_vcpu`; in an integration test just `boots`);
/// [`vm_test_here!`](crate::vm_test_here) works it out. Panics, never skips, when there is no
/// KVM or the test host cannot start, and when `test_name` matches no test.
pub fn run_vm_test_here(test_name: &str) -> bool {
    let in_testhost = std::env::var_os(IN_TESTHOST).is_some_and(|v| v == "1");
    match guests_run_here() {
        Ok(true) if in_testhost => {
            end_the_test_after_its_time_limit(test_name);
            return true;
        }
        Ok(true) => return true,
        Ok(false) if in_testhost => {
            panic!("VM test {test_name}: inside the test host, yet its /dev/kvm is PVM, not standard KVM")
        }
        Ok(false) => {}
        Err(e) => panic!("VM test {test_name} cannot run: {e}"),
    }
    let host = TestHost::shared().unwrap_or_else(|e| {
        panic!("VM test {test_name} needs the KVM test host (this machine's /dev/kvm is PVM, where stock guests do not boot), and it is unavailable: {e}")
    });
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("VM test {test_name}: cannot find the test binary: {e}"));
    let invocation = Invocation::new([
        exe.clone().into_os_string(),
        test_name.into(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ])
    .env(IN_TESTHOST, "1")
    .env(GUEST_KERNEL_ARGS_ENV, TESTHOST_GUEST_KERNEL_ARGS)
    .envs(forwarded_env());
    // The emulated test host is allowed one retry (issue "Boot a pod VM": QEMU TCG's nested SVM
    // has faults of its own), two when the guest showed that fault's signs, never for a hang:
    // every failure stays in the output.
    let mut attempts = 2;
    for attempt in 1.. {
        let mut printer = LinePrinter::default();
        let ran = host.run_with(&invocation, &mut |stream, bytes| {
            printer.push(stream, bytes)
        });
        printer.finish();
        let status = match ran {
            Ok(status) => status,
            // The L1 stopped answering (and was checked or restarted): the test gets its retry.
            Err(e) if attempt < attempts => {
                println!(
                    "VM test {test_name} could not run in the test host: {e}; running it once more"
                );
                continue;
            }
            Err(e) => panic!("VM test {test_name} could not run in the test host: {e}"),
        };
        if status.success() {
            if !printer.ran_one_test {
                panic!(
                    "VM test {test_name}: `{} {test_name} --exact` ran no test in the test host; the name must be the test's libtest path without the crate name (crx_testhost::vm_test_here!() works it out)",
                    exe.display()
                );
            }
            if attempt > 1 {
                println!("VM test {test_name}: FLAKY: failed in the test host, then passed on its retry (the failure is above)");
            }
            return false;
        }
        if printer.saw_emulator_fault {
            attempts = 3;
        }
        let hung = status.code() == Some(HUNG_EXIT_CODE);
        if attempt >= attempts || hung {
            panic!("VM test {test_name} failed in the test host ({status}); its output is above");
        }
        println!("VM test {test_name} failed in the test host ({status}); its output is above; running it once more");
    }
    unreachable!("the last attempt returns or panics")
}

/// Read by crx-core (`crx_core::builder::GUEST_KERNEL_ARGS_ENV`; the test host does not depend
/// on it): kernel parameters for every guest booted by a VM test.
const GUEST_KERNEL_ARGS_ENV: &str = "CRX_GUEST_KERNEL_ARGS";

/// QEMU's emulated SVM (7.2 and 10.0 alike) sometimes resumes an L2 vCPU with the L1's own
/// state (RIP in kvm_amd's `__svm_vcpu_run`, CR3 an L1 page table): the vCPU then faults
/// forever inside L1 KVM (a guest RCU stall) or triple-faults. A guest that panics on an RCU
/// stall (and reboots at once: `panic=-1`) turns that wedge into an ended VM that the test's
/// retry can take, instead of a test hung until its time limit.
const TESTHOST_GUEST_KERNEL_ARGS: &str = "sysctl.kernel.panic_on_rcu_stall=1";

/// The exit status of a VM test ended by its time limit (not retried).
const HUNG_EXIT_CODE: i32 = 124;

/// How long one VM test may take in the test host before it is ended as hung
/// (`CRX_VM_TEST_TIMEOUT_SECS`, default 900, about twice the slowest test seen on a loaded
/// machine): a hang then fails that test, with its name, rather than the whole run's budget.
const TEST_TIME_LIMIT_SECS: u64 = 900;

/// In the test host each VM test runs alone in its own process (see [`run_vm_test_here`]), so a
/// watchdog thread can end that process when the limit passes.
fn end_the_test_after_its_time_limit(test_name: &str) {
    let limit = std::env::var("CRX_VM_TEST_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(TEST_TIME_LIMIT_SECS);
    let test_name = test_name.to_owned();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(limit));
        eprintln!(
            "VM test {test_name} still running after {limit} s (CRX_VM_TEST_TIMEOUT_SECS): ended as hung"
        );
        std::process::exit(HUNG_EXIT_CODE);
    });
}

/// The libtest name of the test function around a `vm_test_here!()` marker function, from the
/// marker's type name `crate::module::test_fn::marker`: `module::test_fn`.
#[doc(hidden)]
pub fn test_name_of_marker(marker_type_name: &str) -> String {
    let path = marker_type_name
        .strip_suffix("::marker")
        .unwrap_or(marker_type_name);
    path.split_once("::")
        .map_or(path, |(_crate, rest)| rest)
        .to_owned()
}

/// [`run_vm_test_here`] for the test function this is written in:
/// `if !crx_testhost::vm_test_here!() { return; }`. Works in plain `#[test]` functions (not in
/// closures or async blocks, whose type names differ).
#[macro_export]
macro_rules! vm_test_here {
    () => {{
        fn marker() {}
        $crate::run_vm_test_here(&$crate::test_name_of_marker(::std::any::type_name_of_val(
            &marker,
        )))
    }};
}

fn forwarded_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(key, _)| {
            let key = key.to_string_lossy();
            key != IN_TESTHOST
                && (key.starts_with("RUST_")
                    || key.starts_with("CRX_")
                    || key.starts_with("CARGO_")
                    || key == "TMPDIR")
        })
        .collect()
}

/// Prints the re-run test's output line by line through `print!`/`eprint!` (captured by libtest
/// unless `--nocapture`), and notes whether libtest reported running exactly one test.
#[derive(Default)]
struct LinePrinter {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    ran_one_test: bool,
    /// A line showed a guest ended or stalled the way the emulated SVM's fault leaves it.
    saw_emulator_fault: bool,
}

/// What a guest hit by the test host's nested-SVM fault prints (see
/// [`TESTHOST_GUEST_KERNEL_ARGS`]): a triple fault or a vCPU whose page tables left guest memory,
/// as the VMM reports them, or the guest's RCU stall.
const EMULATOR_FAULT_SIGNS: &[&str] = &[
    "triple fault",
    "are outside guest memory",
    "detected stalls on CPUs",
];

impl LinePrinter {
    fn push(&mut self, stream: Stream, bytes: &[u8]) {
        let buffer = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        buffer.extend_from_slice(bytes);
        let Some(end) = buffer.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let lines: Vec<u8> = buffer.drain(..=end).collect();
        self.print(stream, &lines);
    }

    fn finish(&mut self) {
        let stdout = std::mem::take(&mut self.stdout);
        let stderr = std::mem::take(&mut self.stderr);
        self.print(Stream::Stdout, &stdout);
        self.print(Stream::Stderr, &stderr);
    }

    fn print(&mut self, stream: Stream, text: &[u8]) {
        let text = String::from_utf8_lossy(text);
        self.saw_emulator_fault |= EMULATOR_FAULT_SIGNS.iter().any(|sign| text.contains(sign));
        match stream {
            Stream::Stdout => {
                self.ran_one_test |= text.lines().any(|line| line == "running 1 test");
                print!("{text}");
            }
            Stream::Stderr => eprint!("{text}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_names_become_libtest_names() {
        assert_eq!(
            test_name_of_marker("crx_core::vstate::tests::boots::marker"),
            "vstate::tests::boots"
        );
        assert_eq!(test_name_of_marker("api::boots::marker"), "boots");
    }

    #[test]
    fn macro_names_this_test() {
        fn marker() {}
        let name = test_name_of_marker(std::any::type_name_of_val(&marker));
        assert_eq!(name, "vm_test::tests::macro_names_this_test");
    }

    #[test]
    fn printer_sees_the_libtest_header_across_chunks() {
        let mut printer = LinePrinter::default();
        printer.push(Stream::Stdout, b"\nrunning 1 te");
        assert!(!printer.ran_one_test);
        printer.push(Stream::Stdout, b"st\ntest x ... ok\n");
        assert!(printer.ran_one_test);
    }
}
