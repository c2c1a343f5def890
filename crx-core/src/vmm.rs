//! A running microVM and how it ends: the exit latch the vCPUs and devices report to, the boot
//! clock, [`Vmm::wait`], which stops every vCPU thread, joins it and closes every fd, and
//! [`Vmm::pause`], [`Vmm::resume`] and [`Vmm::snapshot`] (see [`crate::snapshot`]).

use std::fmt;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crx_virtio::{DeviceConfig, MmioTransport};
use vm_memory::GuestMemoryMmap;

use crate::devices::legacy::{ConsoleTail, SerialConsole};
use crate::snapshot::{
    self, format, memory, CpuIdentity, MachineState, MicrovmState, SavedDevice, SavedDeviceConfig,
    SnapshotError, SnapshotFiles, MEMORY_FILE, STATE_FILE,
};
use crate::vstate::vcpu::{kick_signal, VcpuHandle};
use crate::vstate::vm::Vm;
use crate::Error;

/// How a microVM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest's init reported its command's exit status through the exit register.
    Exited(u32),
    /// The guest reset the machine (`reboot`: the i8042 reset line, or KVM's reset event).
    Reset,
    /// The guest powered the machine off (KVM's shutdown event, or a halted vCPU).
    PowerOff,
    /// The guest kernel panicked; the message is the console's panic line.
    Panic { message: String },
    /// A vCPU hit a triple fault (KVM_EXIT_SHUTDOWN). The RIP is the faulting one on Intel; AMD
    /// resets the vCPU on the shutdown intercept, so there it reads as the reset vector.
    TripleFault { vcpu: u8, rip: u64 },
    /// KVM could not emulate an instruction.
    EmulationFailure { vcpu: u8, rip: u64 },
    /// KVM refused to enter the guest.
    FailedEntry { vcpu: u8, reason: u64 },
    /// A vCPU met an exit CRX does not handle, or KVM_RUN failed.
    VcpuError { vcpu: u8, detail: String },
    /// The host stopped the VM (a timeout or an explicit stop).
    StoppedByHost,
}

impl VmExit {
    /// The exit code a command-line tool reports for this ending.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Exited(status) => (*status).min(255) as i32,
            VmExit::Reset | VmExit::PowerOff => 0,
            _ => 1,
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Exited(status) => write!(f, "guest command exited with status {status}"),
            VmExit::Reset => f.write_str("guest reset"),
            VmExit::PowerOff => f.write_str("guest powered off"),
            VmExit::Panic { message } => write!(f, "guest kernel panic: {message}"),
            VmExit::TripleFault { vcpu, rip } => {
                write!(f, "triple fault on vCPU {vcpu} at RIP {rip:#x}")
            }
            VmExit::EmulationFailure { vcpu, rip } => {
                write!(f, "KVM emulation failure on vCPU {vcpu} at RIP {rip:#x}")
            }
            VmExit::FailedEntry { vcpu, reason } => {
                write!(
                    f,
                    "KVM could not enter vCPU {vcpu} (hardware reason {reason:#x})"
                )
            }
            VmExit::VcpuError { vcpu, detail } => write!(f, "vCPU {vcpu}: {detail}"),
            VmExit::StoppedByHost => f.write_str("stopped by the host"),
        }
    }
}

/// The first ending reported wins; later ones are ignored.
#[derive(Default)]
pub struct ExitLatch {
    exit: Mutex<Option<VmExit>>,
    changed: Condvar,
    requested: AtomicBool,
}

impl ExitLatch {
    /// Records how the VM ends, unless an ending is already recorded.
    pub fn request(&self, exit: VmExit) {
        let mut slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::debug!("VM exit requested: {exit}");
            *slot = Some(exit);
            self.requested.store(true, Ordering::SeqCst);
            self.changed.notify_all();
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    pub fn get(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Blocks until an ending is recorded or `timeout` passes; true if one is recorded.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        while slot.is_none() {
            match deadline {
                None => slot = self.changed.wait(slot).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    slot = self
                        .changed
                        .wait_timeout(slot, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        true
    }
}

/// Times since the VMM's launch instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootTimes {
    /// Launch → the boot vCPU's first KVM_RUN (the VMM's own setup cost).
    pub first_instruction: Option<Duration>,
    /// Launch → the guest's init wrote the boot timer.
    pub guest_init: Option<Duration>,
}

/// Records boot milestones against the launch instant.
pub struct BootClock {
    launch: Instant,
    first_instruction: OnceLock<Duration>,
    guest_init: OnceLock<Duration>,
}

impl BootClock {
    pub fn new(launch: Instant) -> Self {
        BootClock {
            launch,
            first_instruction: OnceLock::new(),
            guest_init: OnceLock::new(),
        }
    }

    pub fn mark_first_instruction(&self) {
        let _ = self.first_instruction.set(self.launch.elapsed());
    }

    /// Records the guest init's signal; returns the time if this was the first.
    pub fn mark_guest_init(&self) -> Option<Duration> {
        let elapsed = self.launch.elapsed();
        self.guest_init.set(elapsed).ok().map(|_| elapsed)
    }

    pub fn times(&self) -> BootTimes {
        BootTimes {
            first_instruction: self.first_instruction.get().copied(),
            guest_init: self.guest_init.get().copied(),
        }
    }
}

/// What [`Vmm::wait`] reports.
#[derive(Clone, Debug)]
pub struct VmOutcome {
    pub exit: VmExit,
    pub times: BootTimes,
    /// The last console output (up to 16 KiB).
    pub console_tail: String,
}

/// The console line a Linux panic starts with.
const PANIC_MARKER: &str = "Kernel panic - not syncing";

/// How often the vCPUs are kicked to check that they can still run (one exit each: nothing
/// next to a guest's own exits).
const VCPU_CHECK_PERIOD: Duration = Duration::from_secs(5);

/// A virtio device as attached: its configuration and its register window.
pub(crate) struct AttachedVirtio {
    pub config: DeviceConfig,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The devices whose state a snapshot saves.
pub(crate) struct AttachedDevices {
    pub serial: Arc<Mutex<SerialConsole>>,
    pub virtio: Vec<AttachedVirtio>,
}

/// A running microVM. Dropping it without [`Vmm::wait`] stops it too.
pub struct Vmm {
    pub(crate) vcpus: Vec<VcpuHandle>,
    /// Kicks the vCPUs out of KVM_RUN now and then, so each checks it can still run.
    pub(crate) vcpu_checks: Option<JoinHandle<()>>,
    pub(crate) exit: Arc<ExitLatch>,
    pub(crate) clock: Arc<BootClock>,
    pub(crate) console_tail: ConsoleTail,
    /// The virtio devices' event loop (stopped after the vCPUs, before the VM goes).
    pub(crate) device_loop: Option<crx_virtio::EventLoop>,
    pub(crate) devices: AttachedDevices,
    pub(crate) machine: MachineState,
    pub(crate) cpu: CpuIdentity,
    /// Whether the vCPUs and the event loop are parked ([`Vmm::pause`]).
    pub(crate) paused: Mutex<bool>,
    /// Guest RAM is CRX's own memfd (not a snapshot's file mapped privately).
    pub(crate) memory_is_memfd: bool,
    // Field order is drop order: the VM fd goes before the memory it maps.
    pub(crate) vm: Vm,
    pub(crate) guest_memory: GuestMemoryMmap,
    /// Fills lazily restored RAM: stopped last, once nothing touches the RAM any more.
    pub(crate) _page_loader: Option<crate::snapshot::lazy::PageLoader>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vmm {
    /// Waits for the guest to end, then tears the VM down.
    pub fn wait(self) -> VmOutcome {
        self.exit.wait(None);
        self.finish()
    }

    /// Like [`Vmm::wait`], but stops the VM after `timeout` (reported as `StoppedByHost`).
    pub fn wait_timeout(self, timeout: Duration) -> VmOutcome {
        if !self.exit.wait(Some(timeout)) {
            self.exit.request(VmExit::StoppedByHost);
        }
        self.finish()
    }

    /// Asks the VM to stop; [`Vmm::wait`] then returns `StoppedByHost` unless the guest ended first.
    pub fn stop(&self) {
        self.exit.request(VmExit::StoppedByHost);
    }

    /// How the VM ends, shared: a watcher on another thread learns at once when anything (a
    /// vCPU, a device, the guest) ended it, without waiting for [`Vmm::wait`].
    pub fn exit_latch(&self) -> Arc<ExitLatch> {
        Arc::clone(&self.exit)
    }

    /// The guest's RAM (for devices and snapshots).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.guest_memory
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The last console output (up to 16 KiB) so far.
    pub fn console_tail(&self) -> String {
        self.console_tail.text()
    }

    /// Stops the guest at a clean point: every vCPU thread leaves KVM_RUN (completing the exit
    /// it was serving, if any) and parks, then the device event loop parks between two
    /// requests. Nothing the guest can see changes until [`Vmm::resume`]. Fails if the VM ends
    /// meanwhile.
    pub fn pause(&self) -> Result<(), Error> {
        let mut paused = lock(&self.paused);
        if *paused {
            return Ok(());
        }
        for vcpu in &self.vcpus {
            vcpu.request_pause();
        }
        for vcpu in &self.vcpus {
            if !vcpu.wait_parked() {
                return Err(SnapshotError::VmEnded.into());
            }
        }
        if let Some(device_loop) = &self.device_loop {
            if !device_loop.pause() {
                return Err(SnapshotError::VmEnded.into());
            }
        }
        *paused = true;
        tracing::debug!("VM paused");
        Ok(())
    }

    /// Lets a paused guest run on.
    pub fn resume(&self) {
        let mut paused = lock(&self.paused);
        if !*paused {
            return;
        }
        if let Some(device_loop) = &self.device_loop {
            device_loop.resume();
        }
        for vcpu in &self.vcpus {
            vcpu.resume();
        }
        *paused = false;
        tracing::debug!("VM resumed");
    }

    /// Saves the paused VM into `dir` (created 0700 if missing): the memory file first, then
    /// the state file (written whole under a temporary name, then renamed), so a state file in
    /// `dir` always belongs to a complete snapshot. The VM stays paused; resume it, or end it.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotFiles, Error> {
        let paused = lock(&self.paused);
        if !*paused {
            return Err(SnapshotError::NotPaused.into());
        }
        let configs = self
            .devices
            .virtio
            .iter()
            .map(|d| SavedDeviceConfig::of(&d.config))
            .collect::<Vec<_>>();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| SnapshotError::Io {
                path: dir.to_path_buf(),
                source,
            })?;

        for vcpu in &self.vcpus {
            vcpu.request_save();
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(|vcpu| vcpu.saved_state().ok_or(SnapshotError::VmEnded)?)
            .collect::<Result<Vec<_>, Error>>()?;
        let vm = self.vm.save_state()?;
        let serial = lock(&self.devices.serial).state();
        let devices = self
            .devices
            .virtio
            .iter()
            .zip(configs)
            .enumerate()
            .map(|(index, (device, config))| {
                let state = lock(&device.transport)
                    .save_state()
                    .map_err(|source| SnapshotError::Device { index, source })?;
                Ok(SavedDevice { config, state })
            })
            .collect::<Result<Vec<_>, SnapshotError>>()?;

        let memory_path = dir.join(MEMORY_FILE);
        let memory_bytes_written =
            memory::write(&self.guest_memory, self.memory_is_memfd, &memory_path)?;
        let state = MicrovmState {
            machine: self.machine.clone(),
            vm,
            vcpus,
            serial,
            devices,
        };
        let state_path = dir.join(STATE_FILE);
        snapshot::write_state_file(&state_path, &format::encode(&self.cpu, &state)?)?;
        tracing::debug!(
            "snapshot in {}: {memory_bytes_written} bytes of guest RAM",
            dir.display()
        );
        Ok(SnapshotFiles {
            state: state_path,
            memory: memory_path,
            memory_bytes_written,
        })
    }

    fn finish(mut self) -> VmOutcome {
        self.stop_vcpus();
        let tail = self.console_tail.text();
        let mut exit = self.exit.get().unwrap_or(VmExit::StoppedByHost);
        if exit == VmExit::Reset {
            if let Some(line) = tail.lines().find(|l| l.contains(PANIC_MARKER)) {
                let message = line[line.find(PANIC_MARKER).unwrap_or(0)..]
                    .trim()
                    .to_string();
                exit = VmExit::Panic { message };
            }
        }
        VmOutcome {
            exit,
            times: self.clock.times(),
            console_tail: tail,
        }
    }

    /// Starts the thread that kicks every vCPU each [`VCPU_CHECK_PERIOD`] until the VM ends (a
    /// vCPU wedged inside KVM never exits by itself; kicked, it checks its state).
    pub(crate) fn start_vcpu_checks(&mut self) -> Result<(), crate::Error> {
        let threads: Vec<libc::pthread_t> = self.vcpus.iter().map(VcpuHandle::pthread).collect();
        let exit = Arc::clone(&self.exit);
        let checks = std::thread::Builder::new()
            .name("crx-vcpu-checks".into())
            .spawn(move || {
                while !exit.wait(Some(VCPU_CHECK_PERIOD)) {
                    for &thread in &threads {
                        // SAFETY: the vCPU threads are joined only after this thread (see
                        // `stop_vcpus`), so each pthread_t still names a thread (maybe ended,
                        // which pthread_kill reports without harm).
                        unsafe { libc::pthread_kill(thread, kick_signal()) };
                    }
                }
            })
            .map_err(crate::Error::VcpuThread)?;
        self.vcpu_checks = Some(checks);
        Ok(())
    }

    /// Stops and joins every vCPU thread (paused ones too), then stops the device event loop.
    fn stop_vcpus(&mut self) {
        self.exit.request(VmExit::StoppedByHost);
        if let Some(checks) = self.vcpu_checks.take() {
            if checks.join().is_err() {
                tracing::error!("the vCPU check thread panicked");
            }
        }
        for vcpu in self.vcpus.drain(..) {
            vcpu.stop();
        }
        if let Some(mut device_loop) = self.device_loop.take() {
            device_loop.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_wins() {
        let latch = ExitLatch::default();
        assert!(!latch.wait(Some(Duration::from_millis(1))));
        latch.request(VmExit::Exited(3));
        latch.request(VmExit::Reset);
        assert_eq!(latch.get(), Some(VmExit::Exited(3)));
        assert!(latch.wait(None));
    }

    #[test]
    fn exit_codes_for_the_command_line() {
        assert_eq!(VmExit::Exited(7).exit_code(), 7);
        assert_eq!(VmExit::Exited(300).exit_code(), 255);
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::TripleFault { vcpu: 0, rip: 0 }.exit_code(), 1);
    }
}
