//! Snapshot restore, CRX against Firecracker: the default guest (1 vCPU, 128 MiB, no devices)
//! boots into a loop printing `tick` on its console, and is saved there: CRX's with crx-core in
//! this process (the code `crx-vmm` runs), Firecracker's through its API (pause, then a full
//! snapshot). Each sample then starts a fresh VMM process that restores the snapshot
//! (`crx-vmm --restore DIR`; Firecracker's `PUT /snapshot/load` with `resume_vm`) and times, from
//! just before the process is spawned, until the restored guest's next `tick` reaches the bench
//! through the VMM's stdout: the same external clock for both (Firecracker does not restore its
//! boot timer device, so neither VMM's own report is used). Both map the memory file privately;
//! the files sit on tmpfs, so the page cache holds them after the first restore, as it would
//! for a pod template.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crx_core::{ConsoleOutput, VmConfig};

use crate::{cmdline, Bench, BenchError, Devices, Vmm, BOOT_DEADLINE, MEM_MIB};

/// The guest's init: print forever (no sleep, whose timer would run on one VMM's restored
/// clock and not the other's).
const LOOP: &str = "while true; do echo tick; done";
const TICK: &str = "tick";

/// A saved guest, ready to be restored by one VMM.
pub struct SavedGuest {
    vmm: Vmm,
    dir: PathBuf,
}

impl Drop for SavedGuest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A VMM process killed (and reaped) when dropped.
struct Running(Child);

impl Running {
    fn spawn(vmm: Vmm, cmd: &mut Command) -> Result<Running, BenchError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if vmm == Vmm::Crx {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .map(Running)
            .map_err(|source| BenchError::Spawn {
                vmm: vmm.name(),
                source,
            })
    }

    /// The guest console (the VMM's stdout), read on a thread that drains it to the end.
    fn console(&mut self, vmm: Vmm) -> Console {
        let stdout: ChildStdout = self.0.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(TICK) {
                    // Once told, keep draining: a VMM must never block on its console.
                    let _ = tx.send(());
                }
            }
        });
        Console { vmm, ticks: rx }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Tells when the guest has printed a tick.
struct Console {
    vmm: Vmm,
    ticks: std::sync::mpsc::Receiver<()>,
}

impl Console {
    fn wait_for_tick(&self) -> Result<(), BenchError> {
        self.ticks
            .recv_timeout(BOOT_DEADLINE)
            .map_err(|_| BenchError::Boot {
                vmm: self.vmm.name(),
                detail: "the guest never ticked".into(),
            })
    }
}

/// One request to Firecracker's API on `socket` (retried while the socket is not up yet);
/// fails unless it answers 2xx.
fn firecracker_api(socket: &Path, method: &str, path: &str, body: &str) -> Result<(), BenchError> {
    let failed = |detail: String| BenchError::Boot {
        vmm: Vmm::Firecracker.name(),
        detail,
    };
    let started = Instant::now();
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(e) if started.elapsed() > BOOT_DEADLINE => {
                return Err(failed(format!("API socket {}: {e}", socket.display())))
            }
            Err(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    };
    stream.set_read_timeout(Some(BOOT_DEADLINE))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        if header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut answer = vec![0u8; length];
    reader.read_exact(&mut answer)?;
    if status
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .starts_with('2')
    {
        Ok(())
    } else {
        Err(failed(format!(
            "{method} {path}: {} {}",
            status.trim(),
            String::from_utf8_lossy(&answer)
        )))
    }
}

impl Bench {
    /// Boots the ticking guest under `vmm` and saves it in a fresh directory on tmpfs.
    pub fn save_ticking_guest(&self, vmm: Vmm) -> Result<SavedGuest, BenchError> {
        let dir = PathBuf::from("/dev/shm").join(format!(
            "crx-bench-snapshot-{}-{}",
            vmm.name(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let saved = SavedGuest {
            vmm,
            dir: dir.clone(),
        };
        let failed = |detail: String| BenchError::Boot {
            vmm: vmm.name(),
            detail,
        };
        match vmm {
            Vmm::Crx => {
                let mut config = VmConfig::new(&self.kernel);
                config.initrd = Some(self.initrd.clone());
                config.mem_mib = MEM_MIB;
                config.console = ConsoleOutput::Discard;
                let config = config.with_init_args(&["/bin/sh", "-c", LOOP]);
                let vm = crx_core::start_vm(&config).map_err(|e| failed(e.to_string()))?;
                let started = Instant::now();
                while !vm.console_tail().contains(TICK) {
                    if started.elapsed() > BOOT_DEADLINE {
                        return Err(failed("the guest never ticked".into()));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                vm.pause().map_err(|e| failed(e.to_string()))?;
                vm.snapshot(&dir).map_err(|e| failed(e.to_string()))?;
            }
            Vmm::Firecracker => {
                let socket = dir.join("api.sock");
                let config = self.firecracker_config(
                    &cmdline(&format!("/bin/sh -c \"{LOOP}\"")),
                    &Devices::default(),
                )?;
                let mut child = Running::spawn(
                    vmm,
                    Command::new(self.peer("firecracker")?)
                        .args(["--no-seccomp", "--api-sock"])
                        .arg(&socket)
                        .arg("--config-file")
                        .arg(config)
                        .current_dir(self.scratch.path()),
                )?;
                child.console(vmm).wait_for_tick()?;
                firecracker_api(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#)?;
                let body = format!(
                    r#"{{"snapshot_type": "Full", "snapshot_path": {:?}, "mem_file_path": {:?}}}"#,
                    dir.join("vmstate"),
                    dir.join("memory")
                );
                firecracker_api(&socket, "PUT", "/snapshot/create", &body)?;
            }
            Vmm::CloudHypervisor => {
                return Err(failed("not part of the snapshot bench".into()));
            }
        }
        Ok(saved)
    }

    /// Restores `saved` in a new VMM process; returns the time from just before its spawn to the
    /// restored guest's first tick on the VMM's stdout.
    pub fn restore_once(&self, saved: &SavedGuest) -> Result<Duration, BenchError> {
        let vmm = saved.vmm;
        match vmm {
            Vmm::Crx => {
                let started = Instant::now();
                let mut child = Running::spawn(
                    vmm,
                    Command::new(&self.crx).arg("--restore").arg(&saved.dir),
                )?;
                child.console(vmm).wait_for_tick()?;
                Ok(started.elapsed())
            }
            _ => {
                let socket = saved.dir.join("restore.sock");
                let _ = std::fs::remove_file(&socket);
                let body = format!(
                    r#"{{"snapshot_path": {:?}, "mem_backend": {{"backend_type": "File", "backend_path": {:?}}}, "resume_vm": true}}"#,
                    saved.dir.join("vmstate"),
                    saved.dir.join("memory")
                );
                let started = Instant::now();
                let mut child = Running::spawn(
                    vmm,
                    Command::new(self.peer("firecracker")?)
                        .args(["--no-seccomp", "--api-sock"])
                        .arg(&socket)
                        .current_dir(&saved.dir),
                )?;
                let console = child.console(vmm);
                firecracker_api(&socket, "PUT", "/snapshot/load", &body)?;
                console.wait_for_tick()?;
                Ok(started.elapsed())
            }
        }
    }
}
