//! The KVM test host: runs CRX's VM tests where this machine's own KVM cannot run stock guests.
//!
//! This project's machines expose PVM behind `/dev/kvm`, where a stock guest kernel never
//! reaches init. The test host is an L1 Linux (a Debian kernel with `kvm_amd`) in QEMU's software
//! emulation of an AMD CPU with SVM and nested paging: it has a real, standard `/dev/kvm`.
//!
//! - **Built from Debian packages**, cached by hash of its inputs in
//!   `${CRX_CACHE_DIR:-$HOME/.cache/crx}/testhost/<hash>/` (`assets/build-l1.sh`).
//! - **Same filesystem, same paths**: the L1's root is this machine's root (9p, read-only, under a
//!   throw-away tmpfs overlay), with `/tmp`, the workspace, the target dir and the CRX cache
//!   mounted writable and shared (9p) at their own paths.
//! - **One L1 per test run**: the first [`TestHost::shared`] boots it (under a lock in the run dir
//!   `<target>/testhost/`), later ones — in any process — reuse it. Its agent runs one command per
//!   TCP connection (QEMU forwards a localhost port); the L1 powers off after
//!   `CRX_TESTHOST_IDLE_SECS` (600) without a request. A hung L1 is dumped, killed, restarted and
//!   the command retried once.
//! - **VM tests** call [`vm_test_here!`] (or [`run_vm_test_here`]) first: on standard KVM the body
//!   runs here, otherwise the same test runs in the test host, alone in its process, ended as
//!   hung after `CRX_VM_TEST_TIMEOUT_SECS` (900); a failure (not a hang) gets one retry, and a
//!   pass on it is printed as FLAKY. Each command runs in its own cgroup, and what
//!   it leaves running is killed (and named in its stderr) when it ends.
//!
//! Settings come from the environment: see [`settings`].
//!
//! A VM test:
//! ```no_run
//! #[test]
//! fn boots_1_vcpu() {
//!     // Runs the body here on standard KVM; elsewhere re-runs this test in the test host
//!     // (`<binary> <module path>::boots_1_vcpu --exact`) and returns false.
//!     if !crx_testhost::vm_test_here!() {
//!         return;
//!     }
//!     // … the test body, with a standard /dev/kvm …
//! }
//! ```
//! Any command: `cargo xtask testhost -- CMD…`, or
//! ```no_run
//! let host = crx_testhost::TestHost::shared()?;
//! let output = host.run(&crx_testhost::Invocation::new(["uname", "-r"]))?;
//! assert!(output.status.success());
//! # Ok::<(), crx_testhost::Error>(())
//! ```
//! On this project's machines the first start builds the boot assets (~30 s, once per Debian
//! kernel version) and the agent (cargo, once), then an L1 boots in ~13–17 s (loaded 2-core
//! machine); a command's round trip is ~0.1–0.2 s.

mod agent_binary;
mod assets;
mod client;
mod error;
mod host;
mod invocation;
mod lifecycle;
pub mod protocol;
mod qemu;
mod run_lock;
pub mod settings;
mod vm_test;

pub use client::Stream;
pub use error::Error;
pub use host::TestHost;
pub use invocation::Invocation;
pub use lifecycle::RunningHost;
pub use vm_test::{guests_run_here, run_vm_test_here, test_name_of_marker, IN_TESTHOST};
