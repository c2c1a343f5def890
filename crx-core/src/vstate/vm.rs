//! The KVM VM: required capabilities, memory slots, the in-kernel irqchip and PIT.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
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
        let fd = kvm.create_vm().map_err(vm_err("KVM_CREATE_VM"))?;
        Ok(Vm {
            fd,
            supported_cpuid,
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
}
