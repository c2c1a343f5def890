//! The L1's QEMU process: its command line, starting it detached, telling whether it still runs,
//! dumping its registers through the monitor socket, killing it.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::assets::Assets;
use crate::error::Error;
use crate::protocol::AGENT_PORT;

/// The L1's log files and sockets, all in the run dir.
pub const SERIAL_LOG: &str = "serial.log";
pub const QEMU_LOG: &str = "qemu.log";
const MONITOR_SOCKET: &str = "monitor.sock";

/// A writable 9p share: `path` on the host, mounted at `path` in the L1.
#[derive(Debug, Clone)]
pub struct Share {
    pub tag: String,
    pub path: PathBuf,
}

/// What one L1 is started with.
pub struct Launch<'a> {
    pub qemu: &'a Path,
    pub assets: &'a Assets,
    pub run_dir: &'a Path,
    pub host_port: u16,
    pub mem_mib: u32,
    pub cpus: u32,
    pub shares: &'a [Share],
}

impl Launch<'_> {
    fn args(&self) -> Vec<OsString> {
        let run = self.run_dir.display();
        let mut args: Vec<OsString> = [
            "-name".into(),
            "crx-testhost".into(),
            "-accel".into(),
            "tcg,thread=multi".into(),
            "-cpu".into(),
            "EPYC,+svm,+npt".into(),
            "-M".into(),
            "q35".into(),
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            self.mem_mib.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-append".into(),
            // tsc=reliable: an AMD CPU model without invariant TSC makes Linux distrust the TSC
            // of an SMP guest and read the emulated HPET (under QEMU's big lock) for every clock
            // read; TCG's TSC is the host's, the same on every vCPU. maxcpus=1: the agent brings
            // the other CPUs online itself (see its static_keys.rs).
            format!("console=ttyS0 panic=-1 loglevel=4 tsc=reliable maxcpus=1 crx.run={run}"),
            "-serial".into(),
            format!("file:{run}/{SERIAL_LOG}"),
            "-monitor".into(),
            format!("unix:{run}/{MONITOR_SOCKET},server=on,wait=off"),
            "-netdev".into(),
            format!(
                "user,id=net0,hostfwd=tcp:127.0.0.1:{}-:{AGENT_PORT}",
                self.host_port
            ),
            "-device".into(),
            // No option ROM: iPXE would only slow the firmware down.
            "virtio-net-pci,netdev=net0,romfile=".into(),
            "-fsdev".into(),
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap".into(),
            "-device".into(),
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot".into(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        args.extend([
            "-kernel".into(),
            self.assets.kernel.clone().into_os_string(),
        ]);
        args.extend([
            "-initrd".into(),
            self.assets.initramfs.clone().into_os_string(),
        ]);
        for share in self.shares {
            args.push("-fsdev".into());
            args.push(
                format!(
                    "local,id={tag},path={path},security_model=none,multidevs=remap",
                    tag = share.tag,
                    path = share.path.display()
                )
                .into(),
            );
            args.push("-device".into());
            args.push(format!("virtio-9p-pci,fsdev={tag},mount_tag={tag}", tag = share.tag).into());
        }
        args
    }

    /// Starts QEMU detached from this process (own process group, output to files) so the L1
    /// outlives the test process that started it.
    ///
    /// Until QEMU's exec has finished, its `/proc/<pid>/cmdline` is empty and [`is_running`]
    /// says no: the caller watches the returned child itself while the L1 boots.
    pub fn spawn(&self) -> Result<Child, Error> {
        let _ = std::fs::remove_file(self.run_dir.join(MONITOR_SOCKET));
        for log in [SERIAL_LOG, QEMU_LOG] {
            let _ = std::fs::remove_file(self.run_dir.join(log));
        }
        let log_path = self.run_dir.join(QEMU_LOG);
        let log = File::create(&log_path).map_err(Error::io("cannot create", &log_path))?;
        let log_err = log
            .try_clone()
            .map_err(Error::io("cannot duplicate", &log_path))?;
        Command::new(self.qemu)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                Error::Start(format!(
                    "cannot run {}: {e} (apt-get install qemu-system-x86)",
                    self.qemu.display()
                ))
            })
    }
}

/// Whether `pid` is a live (not zombie) QEMU of this run dir.
pub fn is_running(pid: u32, run_dir: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']));
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let marker = format!("crx.run={}", run_dir.display());
    !zombie
        && cmdline
            .split(|b| *b == 0)
            .any(|arg| arg.windows(marker.len()).any(|w| w == marker.as_bytes()))
}

/// Writes `info registers -a` and the serial log's tail to `hang-<unix time>.txt` in the run dir.
pub fn dump_hung(run_dir: &Path) -> PathBuf {
    let when = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = run_dir.join(format!("hang-{when}.txt"));
    let registers =
        monitor_command(run_dir, "info registers -a").unwrap_or_else(|e| format!("(monitor: {e})"));
    let serial = std::fs::read(run_dir.join(SERIAL_LOG)).unwrap_or_default();
    let tail = &serial[serial.len().saturating_sub(8192)..];
    let report = format!(
        "== info registers -a ==\n{registers}\n== serial log tail ==\n{}",
        String::from_utf8_lossy(tail)
    );
    if let Err(e) = std::fs::write(&path, report) {
        tracing::warn!("cannot write {}: {e}", path.display());
    }
    path
}

/// Runs one human monitor command; returns what QEMU printed up to its next prompt.
fn monitor_command(run_dir: &Path, command: &str) -> std::io::Result<String> {
    let mut monitor = UnixStream::connect(run_dir.join(MONITOR_SOCKET))?;
    // A monitor serves one client at a time: a held connection makes these reads time out.
    monitor.set_read_timeout(Some(Duration::from_secs(5)))?;
    read_to_prompt(&mut monitor)?;
    monitor.write_all(format!("{command}\n").as_bytes())?;
    let answer = read_to_prompt(&mut monitor)?;
    // Drop the first line: the monitor's echo of the command, full of cursor movements.
    Ok(answer
        .split_once('\n')
        .map_or(answer.clone(), |(_, rest)| rest.to_owned()))
}

fn read_to_prompt(monitor: &mut UnixStream) -> std::io::Result<String> {
    const PROMPT: &[u8] = b"(qemu) ";
    let mut text = Vec::new();
    let mut buf = [0u8; 8192];
    while !text.ends_with(PROMPT) {
        let n = monitor.read(&mut buf)?;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Kills QEMU and waits up to 10 s for it to go.
pub fn kill(pid: u32, run_dir: &Path) {
    if !is_running(pid, run_dir) {
        return;
    }
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes no pointers; `pid` was just checked to be this run dir's QEMU.
    unsafe { libc::kill(pid_t, libc::SIGKILL) };
    wait_gone(pid, run_dir, Duration::from_secs(10));
}

/// Waits until `pid` is no longer this run dir's running QEMU; false on timeout.
pub fn wait_gone(pid: u32, run_dir: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_running(pid, run_dir) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// The last `bytes` of a log in the run dir, for error messages.
pub fn log_tail(run_dir: &Path, log: &str, bytes: usize) -> String {
    let content = std::fs::read(run_dir.join(log)).unwrap_or_default();
    String::from_utf8_lossy(&content[content.len().saturating_sub(bytes)..])
        .trim()
        .to_owned()
}
