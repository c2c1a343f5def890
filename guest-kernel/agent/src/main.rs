//! `crx-agent`: the guest agent, PID 1 of a pod VM (booted with `rdinit=/bin/crx-agent`; the
//! default `/init`, crx-init, is unchanged). It signals the boot timer first, mounts the basics
//! (devtmpfs, proc, sysfs, cgroup2 with the cpu/memory/pids controllers for
//! `/sys/fs/cgroup/crx`, tmpfs on /run and /tmp, devpts, /dev/shm), then listens on vsock ports
//! 1024 (requests), 1025 (stdio) and 1026 (TCP forwarding) — see `crx-agent-proto` — and prints
//! the time from its start to listening. It never exits: bad requests get error replies, handler panics end only their
//! thread, and the reaper thread collects every child. `Shutdown` powers the VM off with exit
//! status 0.
//!
//! Containers are built with `nix` and `caps` rather than youki's `libcontainer`. Measured here
//! (2026-11-23, libcontainer 0.5.7, `default-features = false, features = ["v2"]`, static glibc
//! release build): it does build statically, but the binary is 4.8 MB stripped (97 crates, ~4
//! min to build) against 1.3 MB for crx-init, and its model (a state directory, an intermediate
//! process and a re-exec'd init per container, console sockets) duplicates what PID 1 already
//! has; its container start time was not measured within the time box.

mod cgroup;
mod container;
mod entropy;
mod forward;
mod init_signal;
mod reaper;
mod sandbox;
mod seccomp;
mod server;
mod spawn;
mod stdio;
mod vsock;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crx_agent_proto::{Error, ErrorCode, FORWARD_PORT, REQUEST_PORT, STDIO_PORT};
use crx_init::{hw, setup};

use container::Agent;

/// Handlers' result: the error is the protocol's.
pub type Result<T> = std::result::Result<T, Error>;

pub fn fail(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::new(code, message)
}

/// Maps an I/O error to an `INTERNAL` error reply saying what was being done.
pub fn io_fail(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| fail(ErrorCode::Internal, format!("{what}: {e}"))
}

/// Locks, ignoring poisoning (a panicked handler must not take the agent down).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Environment variable (a `name=value` word on the kernel command line) that makes the agent
/// log every request and reply on the console.
const VERBOSE_ENV: &str = "crx_agent_verbose";

pub fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os(VERBOSE_ENV).is_some_and(|v| v == "1"))
}

/// Writes exit status 0 and powers the VM off.
pub fn shut_down() -> ! {
    if let Some(page) = hw::PhysPage::map(hw::BOOT_TIMER_ADDR) {
        page.write_u32(hw::EXIT_REGISTER_OFFSET, 0);
    }
    hw::power_off()
}

fn main() {
    // Boot timer first, as crx-init does.
    setup::ensure_devtmpfs();
    if let Some(page) = hw::PhysPage::map(hw::BOOT_TIMER_ADDR) {
        page.write_u8(hw::BOOT_TIMER_OFFSET, hw::BOOT_TIMER_VALUE);
    }
    hw::debug_port_write(hw::DEBUG_PORT_VALUE);
    let start = Instant::now();

    setup::ensure_console_fds();
    setup::mount_filesystems();
    setup::mount_agent_filesystems();
    setup::set_path();
    verbose(); // read before any thread starts
    if let Err(e) = cgroup::init() {
        eprintln!("crx-agent: cgroup controllers: {e}");
    }
    let listen = |port| {
        vsock::Listener::bind(port).unwrap_or_else(|e| {
            eprintln!("crx-agent: cannot listen on vsock port {port}: {e}");
            shut_down()
        })
    };
    let requests = listen(REQUEST_PORT);
    let stdio = listen(STDIO_PORT);
    let forwards = listen(FORWARD_PORT);
    let listen_us = start.elapsed().as_micros() as u64;
    eprintln!(
        "crx-agent: listening on vsock ports {REQUEST_PORT}, {STDIO_PORT} and {FORWARD_PORT}, {listen_us} us after start{}",
        if verbose() { " (verbose)" } else { "" }
    );

    let agent = Arc::new(Agent::default());
    let reaper = agent.clone();
    std::thread::spawn(move || reaper.reaper.run());
    let stdio_agent = agent.clone();
    std::thread::spawn(move || stdio.serve("stdio", move |conn| stdio::serve(&stdio_agent, conn)));
    std::thread::spawn(move || forwards.serve("forward", forward::serve));
    requests.serve("request", move |conn| {
        server::serve(&agent, conn, listen_us)
    });
}
