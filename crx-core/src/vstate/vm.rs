//! The KVM VM: required capabilities, memory slots, the in-kernel irqchip and PIT, and the
//! VM-wide state a snapshot holds ([`VmState`]: PIC, IOAPIC, PIT, kvmclock).

use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::{cpuid, KVM_TSS_ADDRESS};
use crate::Error;

/// Capabilities CRX cannot run without.
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// A KVM VM with its guest memory registered.
pub struct Vm {
    fd: VmFd,
    supported_cpuid: CpuId,
    /// KVM_GET_MSR_INDEX_LIST: the MSRs a snapshot tries to save for each vCPU.
    msr_index_list: Vec<u32>,
    /// KVM_CAP_XSAVE2: the bytes a vCPU's XSAVE state takes, when KVM reports it.
    xsave2_size: Option<usize>,
}

/// The VM-wide KVM state in a snapshot.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// kvmclock (the guest's nanoseconds) when the snapshot was taken.
    pub clock_ns: u64,
    /// The host's CLOCK_REALTIME (nanoseconds since the epoch) when `clock_ns` was read: a restore
    /// advances the guest's clocks by the time passed since.
    pub realtime_ns: u64,
}

/// The host's wall-clock time in nanoseconds since the epoch.
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn vm_err(step: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Vm { step, source }
}

impl Vm {
    /// Creates the VM after checking the capabilities CRX relies on.
    pub fn new(kvm: &Kvm) -> Result<Vm, Error> {
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmCapability(name));
            }
        }
        let mut supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(vm_err("KVM_GET_SUPPORTED_CPUID"))?;
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            cpuid::add_tsc_deadline_timer(&mut supported_cpuid);
        }
        let msr_index_list = kvm
            .get_msr_index_list()
            .map_err(vm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let fd = kvm.create_vm().map_err(vm_err("KVM_CREATE_VM"))?;
        let xsave2_size = usize::try_from(fd.check_extension_int(Cap::Xsave2))
            .ok()
            .filter(|&size| size > 0);
        Ok(Vm {
            fd,
            supported_cpuid,
            msr_index_list,
            xsave2_size,
        })
    }

    /// Registers each guest RAM region as a memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), Error> {
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Boot {
                    step: "find guest RAM's host mapping",
                    detail: e.to_string(),
                })?;
            let memory_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (the
            // Vmm drops the VM fd before the memory).
            unsafe { self.fd.set_user_memory_region(memory_region) }
                .map_err(vm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// The in-kernel IOAPIC, PIC and local APICs, and the PIT (its speaker port a dummy).
    pub fn create_irqchip_and_pit(&self) -> Result<(), Error> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(vm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(vm_err("KVM_CREATE_PIT2"))
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// What KVM_GET_SUPPORTED_CPUID returned, with what KVM emulates but leaves out of it.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// The MSRs KVM reports (KVM_GET_MSR_INDEX_LIST).
    pub fn msr_index_list(&self) -> &[u32] {
        &self.msr_index_list
    }

    /// The size of a vCPU's XSAVE state when KVM reports it (KVM_CAP_XSAVE2).
    pub fn xsave2_size(&self) -> Option<usize> {
        self.xsave2_size
    }

    fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip, Error> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(vm_err("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }

    /// Reads the interrupt controllers, the PIT and kvmclock (every vCPU must be paused).
    pub fn save_state(&self) -> Result<VmState, Error> {
        let pit = self.fd.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?;
        let pic_master = self.irqchip(KVM_IRQCHIP_PIC_MASTER)?;
        let pic_slave = self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?;
        let ioapic = self.irqchip(KVM_IRQCHIP_IOAPIC)?;
        let clock = self.fd.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?;
        Ok(VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock_ns: clock.clock,
            realtime_ns: realtime_ns(),
        })
    }

    /// Sets the interrupt controllers and the PIT (before any vCPU runs).
    pub fn restore_state(&self, state: &VmState) -> Result<(), Error> {
        for (chip, id) in [
            (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&state.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(Error::Boot {
                    step: "restore interrupt controllers",
                    detail: format!("saved chip {} where chip {id} belongs", chip.chip_id),
                });
            }
            self.fd
                .set_irqchip(chip)
                .map_err(vm_err("KVM_SET_IRQCHIP"))?;
        }
        self.fd.set_pit2(&state.pit).map_err(vm_err("KVM_SET_PIT2"))
    }

    /// Sets kvmclock to the saved time plus `elapsed_ns` (the vCPUs' TSCs move by as much).
    pub fn restore_clock(&self, state: &VmState, elapsed_ns: u64) -> Result<(), Error> {
        let clock = kvm_clock_data {
            clock: state.clock_ns.saturating_add(elapsed_ns),
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))
    }
}
