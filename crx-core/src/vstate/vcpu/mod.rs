//! vCPUs: creation, boot-time configuration (CPUID, MSRs, LAPIC, registers), the run loop that
//! serves port I/O and MMIO exits from the buses on the vCPU's own thread, and pausing.
//!
//! A kick (the real-time signal [`kick_signal`]) gets a vCPU thread out of KVM_RUN: its handler
//! sets `immediate_exit` in the thread's own `kvm_run`, so a kick that lands just before the
//! thread enters KVM_RUN is not lost either (KVM_RUN then returns EINTR at once). To pause, the
//! VMM raises the thread's pause flag and kicks it; the thread first completes an exit it was
//! serving (port I/O and MMIO finish only at the next KVM_RUN, which it enters once more with
//! `immediate_exit` set, so no guest instruction runs), then parks at that clean point, where it
//! saves its state on request ([`state`]) until it is resumed or stopped.

pub mod state;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_run, kvm_sregs, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::boot::LoadedKernel;
use crate::arch::x86_64::{cpuid, regs};
use crate::devices::Bus;
use crate::vmm::{BootClock, ExitLatch, VmExit};
use crate::vstate::vm::Vm;
use crate::{Error, THREAD_STACK};
use state::VcpuState;

/// KVM_INTERNAL_ERROR_EMULATION: KVM met an instruction it cannot emulate.
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// CR0.PG: paging is on.
const X86_CR0_PG: u64 = 1 << 31;
/// The page-table base address bits of CR3 (the rest are flags or a PCID).
const CR3_TABLES_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, for the kick handler (null elsewhere).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const-initialized thread-local without destructor, one byte written.
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's vCPU `kvm_run` mapping, published by the run loop
            // while the vCPU fd (and so the mapping) lives and withdrawn before it goes; the signal
            // interrupts this very thread, so no other write to the byte races with this one.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process: it makes the current or next KVM_RUN of the
/// kicked thread return EINTR.
pub fn install_kick_handler() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(Error::Signal);
    });
    result
}

/// The port I/O and MMIO buses every vCPU serves.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// One vCPU before its thread starts.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// The MSRs a snapshot tries to save (the VM's KVM_GET_MSR_INDEX_LIST).
    msr_index_list: Arc<[u32]>,
    xsave2_size: Option<usize>,
}

fn vcpu_err(index: u8, step: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Vcpu {
        index,
        step,
        source,
    }
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Vcpu, Error> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(vcpu_err(index, "KVM_CREATE_VCPU"))?;
        Ok(Vcpu {
            index,
            fd,
            msr_index_list: vm.msr_index_list().into(),
            xsave2_size: vm.xsave2_size(),
        })
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// CPUID (template already applied; topology fixed here), boot MSRs and LINT pins; and for the
    /// boot vCPU the registers that enter `kernel`.
    pub fn configure(
        &self,
        template_cpuid: &CpuId,
        vcpu_count: u8,
        mem: &GuestMemoryMmap,
        kernel: &LoadedKernel,
    ) -> Result<(), Error> {
        let err = |step| vcpu_err(self.index, step);
        let mut cpuid = template_cpuid.clone();
        cpuid::normalize_topology(&mut cpuid, self.index, vcpu_count);
        self.fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;

        let msrs = regs::boot_msrs();
        let written = self.fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        if written != msrs.as_slice().len() {
            let failed = msrs.as_slice()[written].index;
            return Err(Error::Boot {
                step: "set boot MSRs",
                detail: format!("KVM refused MSR {failed:#x}"),
            });
        }

        let mut lapic = self.fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;

        if self.index == 0 {
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(err("KVM_SET_FPU"))?;
            let mut sregs: kvm_sregs = self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
            regs::boot_sregs(mem, kernel.mode, &mut sregs).map_err(|e| Error::Boot {
                step: "write GDT and page tables",
                detail: e.to_string(),
            })?;
            self.fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&regs::boot_regs(kernel.mode, kernel.entry))
                .map_err(err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Starts the vCPU's thread, on a [`THREAD_STACK`] stack.
    pub fn start(
        self,
        buses: Arc<Buses>,
        exit: Arc<ExitLatch>,
        clock: Arc<BootClock>,
        mem: GuestMemoryMmap,
    ) -> Result<VcpuHandle, Error> {
        let control = Arc::new(VcpuControl::default());
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("crx-vcpu-{}", self.index))
            .stack_size(THREAD_STACK)
            .spawn(move || self.run(&buses, &exit, &clock, &mem, &thread_control))
            .map_err(Error::VcpuThread)?;
        Ok(VcpuHandle { thread, control })
    }

    fn run(
        mut self,
        buses: &Buses,
        exit: &ExitLatch,
        clock: &BootClock,
        mem: &GuestMemoryMmap,
        control: &VcpuControl,
    ) {
        // Whatever ends this thread (even a panic) ends the VM, and the VMM hears it ended.
        struct EndsVm<'a>(&'a ExitLatch, &'a VcpuControl, u8);
        impl Drop for EndsVm<'_> {
            fn drop(&mut self) {
                let _ = KVM_RUN.try_with(|run| run.set(std::ptr::null_mut()));
                self.0.request(VmExit::VcpuError {
                    vcpu: self.2,
                    detail: "vCPU thread ended unexpectedly".into(),
                });
                self.1.finished();
            }
        }
        let kvm_run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|run| run.set(kvm_run));
        let _guard = EndsVm(exit, control, self.index);
        if self.index == 0 {
            clock.mark_first_instruction();
        }
        // False while an I/O or MMIO exit is served but not yet completed by KVM.
        let mut settled = true;
        while !exit.is_requested() {
            if control.pausing.load(Ordering::SeqCst) {
                if settled {
                    if !control.park(|| self.save_state()) {
                        break;
                    }
                    continue;
                }
                // Completes the exit without running guest code, then returns EINTR.
                self.fd.set_kvm_immediate_exit(1);
            }
            let (ending, now_settled) = self.run_once(buses, mem);
            settled = now_settled;
            if let Some(ending) = ending {
                exit.request(ending);
            }
        }
    }

    /// One KVM_RUN; returns how the VM ends if this exit ends it, and whether the vCPU is at a
    /// clean point (KVM_RUN was interrupted, no exit is left half-served).
    fn run_once(&mut self, buses: &Buses, mem: &GuestMemoryMmap) -> (Option<VmExit>, bool) {
        let index = self.index;
        let ending = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                buses.pio.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                buses.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                buses.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                buses.mmio.write(addr, data);
                None
            }
            // A kick: the VMM is pausing or stopping the vCPU, or checking that it can still run.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return (self.check_can_run(mem), true);
            }
            Ok(VcpuExit::Hlt) => Some(VmExit::PowerOff),
            Ok(VcpuExit::Shutdown) => Some(VmExit::TripleFault {
                vcpu: index,
                rip: self.rip(),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                KVM_SYSTEM_EVENT_CRASH => VmExit::Panic {
                    message: "KVM reported a guest crash event".into(),
                },
                other => VmExit::VcpuError {
                    vcpu: index,
                    detail: format!("unknown system event {other}"),
                },
            }),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM filled the `internal` member of the exit union for this exit reason.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let rip = self.rip();
                Some(if suberror == INTERNAL_ERROR_EMULATION {
                    VmExit::EmulationFailure { vcpu: index, rip }
                } else {
                    VmExit::VcpuError {
                        vcpu: index,
                        detail: format!("KVM internal error {suberror} at RIP {rip:#x}"),
                    }
                })
            }
            Ok(VcpuExit::FailEntry(reason, _)) => Some(VmExit::FailedEntry {
                vcpu: index,
                reason,
            }),
            Ok(other) => Some(VmExit::VcpuError {
                vcpu: index,
                detail: format!("unhandled KVM exit {other:?}"),
            }),
            Err(e) => Some(VmExit::VcpuError {
                vcpu: index,
                detail: format!("KVM_RUN failed: {e}"),
            }),
        };
        (ending, false)
    }

    /// A vCPU with paging on and its page tables (CR3) outside guest memory can never run again:
    /// each instruction fetch faults walking tables nothing backs, and so does the fault's
    /// delivery, inside KVM, without an exit. No guest does this; QEMU's emulated SVM does it to
    /// a nested guest by resuming it with the host's own state (RIP in kvm_amd, CR3 a host page
    /// table). The VM is ended instead of spinning.
    fn check_can_run(&self, mem: &GuestMemoryMmap) -> Option<VmExit> {
        let sregs = self.fd.get_sregs().ok()?;
        let tables = GuestAddress(sregs.cr3 & CR3_TABLES_MASK);
        if sregs.cr0 & X86_CR0_PG == 0 || mem.address_in_range(tables) {
            return None;
        }
        Some(VmExit::VcpuError {
            vcpu: self.index,
            detail: format!(
                "cannot run: its page tables (CR3 {:#x}) are outside guest memory, RIP {:#x}",
                sregs.cr3,
                self.rip()
            ),
        })
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }
}

/// What the VMM wants a vCPU thread to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Want {
    #[default]
    Run,
    Pause,
    Exit,
}

#[derive(Default)]
struct ControlState {
    want: Want,
    parked: bool,
    finished: bool,
    save_requested: bool,
    saved: Option<Result<VcpuState, Error>>,
}

/// Shared between the VMM and one vCPU thread: requests one way, the thread's progress the other.
#[derive(Default)]
struct VcpuControl {
    /// `want != Run`, for the run loop's check between two KVM_RUNs.
    pausing: AtomicBool,
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, ControlState>) -> MutexGuard<'a, ControlState> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    fn set_want(&self, want: Want) {
        let mut state = self.lock();
        state.want = want;
        self.pausing.store(want != Want::Run, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// On the vCPU thread: parks until resumed (true) or stopped (false), saving the vCPU's
    /// state whenever asked meanwhile.
    fn park(&self, save: impl Fn() -> Result<VcpuState, Error>) -> bool {
        let mut state = self.lock();
        state.parked = true;
        self.changed.notify_all();
        let resume = loop {
            if state.save_requested {
                state.save_requested = false;
                state.saved = Some(save());
                self.changed.notify_all();
                continue;
            }
            match state.want {
                Want::Pause => state = self.wait(state),
                Want::Run => break true,
                Want::Exit => break false,
            }
        };
        state.parked = false;
        resume
    }

    fn finished(&self) {
        let mut state = self.lock();
        state.finished = true;
        state.parked = false;
        self.changed.notify_all();
    }
}

/// A running vCPU thread, as the VMM holds it.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
    control: Arc<VcpuControl>,
}

impl VcpuHandle {
    /// The thread, for a kick from a thread that cannot hold this handle.
    pub fn pthread(&self) -> libc::pthread_t {
        std::os::unix::thread::JoinHandleExt::as_pthread_t(&self.thread)
    }

    fn kick(&self) {
        if let Err(e) = self.thread.kill(kick_signal()) {
            tracing::warn!("kicking a vCPU thread: {e}");
        }
    }

    /// Asks the thread to park at its next clean point (see [`VcpuHandle::wait_parked`]).
    pub fn request_pause(&self) {
        self.control.set_want(Want::Pause);
        self.kick();
    }

    /// Waits until the thread has parked; false if it ended instead (the VM is over).
    pub fn wait_parked(&self) -> bool {
        let mut state = self.control.lock();
        loop {
            if state.parked {
                return true;
            }
            if state.finished {
                return false;
            }
            state = self.control.wait(state);
        }
    }

    /// Has the parked thread save its vCPU's state; [`VcpuHandle::saved_state`] collects it.
    pub fn request_save(&self) {
        let mut state = self.control.lock();
        state.save_requested = true;
        state.saved = None;
        self.control.changed.notify_all();
    }

    /// The state the thread saved on request; `None` if it ended first.
    pub fn saved_state(&self) -> Option<Result<VcpuState, Error>> {
        let mut state = self.control.lock();
        loop {
            if let Some(saved) = state.saved.take() {
                return Some(saved);
            }
            if state.finished {
                return None;
            }
            state = self.control.wait(state);
        }
    }

    /// Lets a parked thread run its vCPU again.
    pub fn resume(&self) {
        self.control.set_want(Want::Run);
    }

    /// Stops the thread (the VM's exit must be requested) and joins it.
    pub fn stop(self) {
        self.control.set_want(Want::Exit);
        while !self.thread.is_finished() {
            self.kick();
            std::thread::sleep(Duration::from_micros(200));
        }
        if self.thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
