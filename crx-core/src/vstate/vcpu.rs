//! vCPUs: creation, boot-time configuration (CPUID, MSRs, LAPIC, registers) and the run loop
//! that serves port I/O and MMIO exits from the buses on the vCPU's own thread.

use std::sync::{Arc, Once};

use kvm_bindings::{
    kvm_sregs, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::x86_64::boot::LoadedKernel;
use crate::arch::x86_64::{cpuid, regs};
use crate::devices::Bus;
use crate::vmm::{BootClock, ExitLatch, VmExit};
use crate::{Error, THREAD_STACK};

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

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process: its only effect is that KVM_RUN returns
/// EINTR.
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
}

fn vcpu_err(index: u8, step: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Vcpu {
        index,
        step,
        source,
    }
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Vcpu, Error> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(vcpu_err(index, "KVM_CREATE_VCPU"))?;
        Ok(Vcpu { index, fd })
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
    ) -> Result<std::thread::JoinHandle<()>, Error> {
        std::thread::Builder::new()
            .name(format!("crx-vcpu-{}", self.index))
            .stack_size(THREAD_STACK)
            .spawn(move || self.run(&buses, &exit, &clock, &mem))
            .map_err(Error::VcpuThread)
    }

    fn run(mut self, buses: &Buses, exit: &ExitLatch, clock: &BootClock, mem: &GuestMemoryMmap) {
        // Whatever ends this thread (even a panic) ends the VM.
        struct EndsVm<'a>(&'a ExitLatch, u8);
        impl Drop for EndsVm<'_> {
            fn drop(&mut self) {
                self.0.request(VmExit::VcpuError {
                    vcpu: self.1,
                    detail: "vCPU thread ended unexpectedly".into(),
                });
            }
        }
        let _guard = EndsVm(exit, self.index);
        if self.index == 0 {
            clock.mark_first_instruction();
        }
        while !exit.is_requested() {
            if let Some(ending) = self.run_once(buses, mem) {
                exit.request(ending);
            }
        }
    }

    /// One KVM_RUN; returns how the VM ends if this exit ends it.
    fn run_once(&mut self, buses: &Buses, mem: &GuestMemoryMmap) -> Option<VmExit> {
        let index = self.index;
        match self.fd.run() {
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
            // A kick: the VMM is stopping the vCPU, or checking that it can still run.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.check_can_run(mem)
            }
            Err(e) => Some(VmExit::VcpuError {
                vcpu: index,
                detail: format!("KVM_RUN failed: {e}"),
            }),
        }
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
