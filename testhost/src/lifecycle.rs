//! Starting, checking, replacing and stopping the run's L1, under the run dir's lock.
//!
//! The run dir (`<target>/testhost/`) holds `state.json` (QEMU pid, forwarded port, agent token),
//! the `l1.conf` the L1's /init reads (both readable by this user only), the agent copy, `serial.log`, `qemu.log`, the monitor socket,
//! and `hang-*.txt` register dumps of L1s that stopped answering.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::assets::{self, Assets};
use crate::client::Endpoint;
use crate::error::Error;
use crate::protocol::{Status, AGENT_PORT, PROTOCOL_VERSION};
use crate::qemu::{self, Launch, Share, QEMU_LOG, SERIAL_LOG};
use crate::run_lock::RunLock;
use crate::settings::Settings;
use crate::{agent_binary, client};

/// How long a running L1's agent gets to answer a health check (at most the hang timeout).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(20);
/// Modules the L1 loads with modprobe once its root is up, if the kernel has them: tap devices,
/// vhost, vsock, CNI bridges and the tc pieces that join a pod's tap to its CNI interface
/// (ingress qdisc, u32 filter, mirred redirect) for the VMMs under test, and the pass action of
/// the filter /init keeps so the tc static keys stay enabled.
const EXTRA_MODULES: &str =
    "tun vhost_net vhost_vsock bridge veth br_netfilter loop sch_ingress cls_u32 act_mirred act_gact";

/// The running L1, as recorded in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub pid: u32,
    pub agent: Endpoint,
}

/// Returns a healthy L1: the recorded one if it answers, else a fresh one (a hung one is dumped
/// to `hang-*.txt` and killed first). The caller holds the lock.
pub fn ensure(settings: &Settings, _lock: &RunLock) -> Result<Instance, Error> {
    let run_dir = &settings.run_dir;
    if let Some(instance) = read_state(run_dir)? {
        if qemu::is_running(instance.pid, run_dir) {
            match client::ping(&instance.agent, false, health_timeout(settings)) {
                Ok(status) if status.protocol == PROTOCOL_VERSION => return Ok(instance),
                Ok(status) => {
                    tracing::info!(
                        "the running test host speaks protocol {} (this library: {PROTOCOL_VERSION}); replacing it",
                        status.protocol
                    );
                    stop_instance(&instance, settings);
                }
                Err(e) => kill_hung(&instance, run_dir, &format!("does not answer ({e})")),
            }
        }
    }
    start(settings)
}

/// Like [`ensure`], but the L1 `lost` (a command in it went silent past the hang timeout,
/// heartbeats included) is replaced even if it still answers pings: a wedged L1 can keep its
/// agent's ping alive while no command makes progress. An L1 already replaced by another
/// caller is not touched again. The caller holds the lock.
pub fn replace(settings: &Settings, lock: &RunLock, lost: &Instance) -> Result<Instance, Error> {
    let run_dir = &settings.run_dir;
    if let Some(instance) = read_state(run_dir)? {
        if instance == *lost && qemu::is_running(instance.pid, run_dir) {
            kill_hung(&instance, run_dir, "had a command go silent");
            return start(settings);
        }
    }
    ensure(settings, lock)
}

/// Dumps a hung L1's registers to `hang-*.txt` and kills it; `why` completes "the test host …".
fn kill_hung(instance: &Instance, run_dir: &Path, why: &str) {
    let dump = qemu::dump_hung(run_dir);
    tracing::warn!(
        pid = instance.pid,
        "the test host {why}; registers saved to {}; killing it",
        dump.display()
    );
    qemu::kill(instance.pid, run_dir);
}

/// What `cargo xtask testhost` shows about a running test host.
#[derive(Debug)]
pub struct RunningHost {
    pub qemu_pid: u32,
    pub port: u16,
    pub run_dir: PathBuf,
    /// The agent's answer (with a `/dev/kvm` probe), or why it did not answer.
    pub status: Result<Status, Error>,
}

/// The running L1, if any, with its status. Starts nothing.
pub fn running(settings: &Settings, _lock: &RunLock) -> Result<Option<RunningHost>, Error> {
    let Some(instance) = read_state(&settings.run_dir)? else {
        return Ok(None);
    };
    if !qemu::is_running(instance.pid, &settings.run_dir) {
        return Ok(None);
    }
    Ok(Some(RunningHost {
        qemu_pid: instance.pid,
        port: instance.agent.port,
        run_dir: settings.run_dir.clone(),
        // A display, not a health check: a busy L1 (its VM tests creating VMs under emulation)
        // can take longer than the health timeout to create the probe's VM.
        status: client::ping(&instance.agent, true, settings.hang_timeout),
    }))
}

/// Stops the running L1, if any; returns whether there was one.
pub fn stop(settings: &Settings, _lock: &RunLock) -> Result<bool, Error> {
    let run_dir = &settings.run_dir;
    let Some(instance) = read_state(run_dir)? else {
        return Ok(false);
    };
    let was_running = qemu::is_running(instance.pid, run_dir);
    if was_running {
        stop_instance(&instance, settings);
    }
    let state = run_dir.join(STATE);
    std::fs::remove_file(&state).map_err(Error::io("cannot remove", &state))?;
    Ok(was_running)
}

/// Asks the agent to power off; kills QEMU if that does not work within 30 s.
fn stop_instance(instance: &Instance, settings: &Settings) {
    let run_dir = &settings.run_dir;
    match client::shutdown(&instance.agent, health_timeout(settings)) {
        Ok(()) if qemu::wait_gone(instance.pid, run_dir, Duration::from_secs(30)) => {}
        Ok(()) => {
            tracing::warn!(
                pid = instance.pid,
                "the test host did not power off in 30 s; killing it"
            );
            qemu::kill(instance.pid, run_dir);
        }
        Err(e) => {
            tracing::warn!(
                pid = instance.pid,
                "cannot ask the test host to power off ({e}); killing it"
            );
            qemu::kill(instance.pid, run_dir);
        }
    }
}

fn health_timeout(settings: &Settings) -> Duration {
    HEALTH_TIMEOUT.min(settings.hang_timeout)
}

/// Builds what is missing and boots an L1; a boot that fails or times out is retried once.
fn start(settings: &Settings) -> Result<Instance, Error> {
    let run_dir = &settings.run_dir;
    let assets = assets::ensure(&settings.assets_cache)?;
    let agent = agent_binary::install(&agent_binary::locate(settings)?, run_dir)?;
    let shares = shares(&settings.writable_paths)?;
    let token = new_token()?;
    write_l1_conf(settings, &agent, &token, &assets.modules, &shares)?;

    let first = match boot(settings, &assets, &shares, &token) {
        Ok(instance) => return Ok(instance),
        Err(e) => e,
    };
    tracing::warn!("the test host did not come up ({first}); trying once more");
    boot(settings, &assets, &shares, &token)
        .map_err(|second| Error::Start(format!("{second}\n(the first attempt: {first})")))
}

/// Boots one L1 and waits for it; a failed one is dumped and killed.
fn boot(
    settings: &Settings,
    assets: &Assets,
    shares: &[Share],
    token: &str,
) -> Result<Instance, Error> {
    let run_dir = &settings.run_dir;
    let started = Instant::now();
    let port = free_port()?;
    let launch = Launch {
        qemu: &settings.qemu,
        assets,
        run_dir,
        host_port: port,
        mem_mib: settings.mem_mib,
        cpus: settings.cpus,
        shares,
    };
    let mut qemu = launch.spawn()?;
    let instance = Instance {
        pid: qemu.id(),
        agent: Endpoint {
            port,
            token: token.to_owned(),
        },
    };
    write_state(run_dir, &instance)?;
    match wait_ready(&mut qemu, &instance, settings) {
        Ok(status) => {
            tracing::info!(
                pid = instance.pid,
                port,
                kernel = %status.kernel,
                "test host up in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(instance)
        }
        Err(e) => {
            if matches!(qemu.try_wait(), Ok(None)) {
                let dump = qemu::dump_hung(run_dir);
                tracing::warn!(
                    "registers of the test host that did not come up saved to {}",
                    dump.display()
                );
                let _ = qemu.kill();
                let _ = qemu.wait();
            }
            Err(e)
        }
    }
}

/// Waits for the agent to answer and checks that the L1 has standard KVM.
fn wait_ready(qemu: &mut Child, instance: &Instance, settings: &Settings) -> Result<Status, Error> {
    let run_dir = &settings.run_dir;
    let deadline = Instant::now() + settings.boot_timeout;
    loop {
        if let Ok(Some(exit)) = qemu.try_wait() {
            return Err(Error::Start(format!(
                "QEMU exited during boot ({exit}).\n--- {QEMU_LOG} ---\n{}\n--- {SERIAL_LOG} ---\n{}",
                qemu::log_tail(run_dir, QEMU_LOG, 2000),
                qemu::log_tail(run_dir, SERIAL_LOG, 4000)
            )));
        }
        match client::ping(&instance.agent, true, Duration::from_secs(10)) {
            Ok(status) if status.kvm.as_deref() == Some("Standard") => return Ok(status),
            Ok(status) => {
                return Err(Error::Start(format!(
                    "the L1 booted but its /dev/kvm is not standard KVM ({:?}); see {}",
                    status.kvm,
                    run_dir.join(SERIAL_LOG).display()
                )));
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Start(format!(
                    "no answer from the L1's agent within {} s ({e}).\n--- {SERIAL_LOG} ---\n{}",
                    settings.boot_timeout.as_secs(),
                    qemu::log_tail(run_dir, SERIAL_LOG, 4000)
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The writable shares: each existing path once, none inside another.
fn shares(paths: &[PathBuf]) -> Result<Vec<Share>, Error> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for path in paths {
        std::fs::create_dir_all(path)
            .map_err(Error::io("cannot create the writable share", path))?;
        roots.push(
            path.canonicalize()
                .map_err(Error::io("cannot resolve the writable share", path))?,
        );
    }
    roots.sort();
    roots.dedup();
    let mut kept: Vec<PathBuf> = Vec::new();
    for root in roots {
        if !kept.iter().any(|outer| root.starts_with(outer)) {
            kept.push(root);
        }
    }
    Ok(kept
        .into_iter()
        .enumerate()
        .map(|(i, path)| Share {
            tag: format!("rw{i}"),
            path,
        })
        .collect())
}

const L1_CONF: &str = "l1.conf";
const STATE: &str = "state.json";

/// Writes the file the L1's /init sources (see assets/init.sh).
fn write_l1_conf(
    settings: &Settings,
    agent: &Path,
    token: &str,
    modules: &Path,
    shares: &[Share],
) -> Result<(), Error> {
    let rw_shares: Vec<String> = shares
        .iter()
        .map(|s| format!("{}={}", s.tag, s.path.display()))
        .collect();
    let conf = format!(
        "AGENT={agent}\nAGENT_ARGS=\"--listen 0.0.0.0:{AGENT_PORT} --idle-secs {idle} --token {token}{pin}\"\nRW_SHARES=\"{shares}\"\nMODULES_DIR={modules}\nEXTRA_MODULES=\"{EXTRA_MODULES}\"\n",
        agent = agent.display(),
        idle = settings.idle_shutdown.as_secs(),
        pin = if settings.pin_commands { "" } else { " --no-pin" },
        shares = rw_shares.join(" "),
        modules = modules.display(),
    );
    write_private(&settings.run_dir.join(L1_CONF), conf.as_bytes())
}

fn read_state(run_dir: &Path) -> Result<Option<Instance>, Error> {
    let path = run_dir.join(STATE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("cannot read", path)(e)),
    }
}

fn write_state(run_dir: &Path, instance: &Instance) -> Result<(), Error> {
    let json = serde_json::to_vec(instance).expect("numbers and strings serialize");
    write_private(&run_dir.join(STATE), &json)
}

/// Replaces `path` with `bytes`, readable and writable by this user only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(Error::io("cannot create", &partial))?;
    file.write_all(bytes)
        .map_err(Error::io("cannot write", &partial))?;
    std::fs::rename(&partial, path).map_err(Error::io("cannot write", path))
}

/// A fresh secret for the agent: 128 random bits, hex.
fn new_token() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(Error::io("cannot read", "/dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A localhost port nobody listens on now (QEMU binds it a moment later).
fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(Error::io("cannot find a free port", "127.0.0.1:0"))?;
    let port = listener
        .local_addr()
        .map_err(Error::io("cannot find a free port", "127.0.0.1:0"))?
        .port();
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_shares_are_dropped() {
        let base = std::env::temp_dir().join(format!("crx-testhost-shares-{}", std::process::id()));
        let inner = base.join("target");
        let other = std::env::temp_dir().join(format!("crx-testhost-other-{}", std::process::id()));
        let shares = shares(&[inner.clone(), base.clone(), other.clone(), base.clone()]).unwrap();
        let paths: Vec<_> = shares.iter().map(|s| s.path.clone()).collect();
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert!(paths.contains(&base.canonicalize().unwrap()));
        assert!(paths.contains(&other.canonicalize().unwrap()));
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&other);
    }
}
