//! Keeps the L1 kernel from rewriting its own code once both its CPUs run: holds KVM's static keys
//! enabled for the L1's whole life, then brings the other CPUs online.
//!
//! KVM counts VMs and vCPUs in static keys: `preempt_notifier_key` (one per VM, its sites in the
//! scheduler's context switch), `apic_sw_disabled` (one per in-kernel LAPIC not yet enabled) and
//! `kvm_has_noapic_vcpu` (one per vCPU without an in-kernel LAPIC). Each 0↔1 transition patches
//! every site with `text_poke_bp` (int3, then the final bytes) while the other CPU runs them.
//! Under QEMU's multi-threaded TCG that cross-modifying code leaves a CPU trapping on an int3 no
//! longer in memory: both L1 CPUs spin in `finish_task_switch` and the int3 handler, soft lockups,
//! the test host silent (seen at VM creation, in `hang-*.txt` reports, several times a day).
//!
//! So the L1 boots with one CPU online (`maxcpus=1` in its command line); its /init pins the tc
//! ingress keys the pods' tc redirects use; PID 1 here creates two VMs that never run, one without
//! an irqchip holding a vCPU (no LAPIC) and one with an irqchip holding a vCPU whose LAPIC its guest
//! never enables, which keeps each KVM count at ≥ 1; only then are the other CPUs brought online.

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// The VMs and vCPUs that keep KVM's keys enabled; dropping it releases them.
pub struct KvmStaticKeyPins {
    _vms: [VmFd; 2],
    _vcpus: [VcpuFd; 2],
}

/// Creates the pinning VMs.
pub fn pin_kvm() -> Result<KvmStaticKeyPins, kvm_ioctls::Error> {
    let kvm = Kvm::new()?;
    let without_irqchip = kvm.create_vm()?;
    let no_lapic_vcpu = without_irqchip.create_vcpu(0)?;
    let with_irqchip = kvm.create_vm()?;
    with_irqchip.create_irq_chip()?;
    let disabled_lapic_vcpu = with_irqchip.create_vcpu(0)?;
    Ok(KvmStaticKeyPins {
        _vms: [without_irqchip, with_irqchip],
        _vcpus: [no_lapic_vcpu, disabled_lapic_vcpu],
    })
}

/// Brings every offline CPU online (those `maxcpus=1` left out at boot).
pub fn online_all_cpus() -> std::io::Result<()> {
    for entry in std::fs::read_dir("/sys/devices/system/cpu")? {
        let online = entry?.path().join("online");
        // cpu0 has no `online` file; `cpufreq`, `kernel_max` and the like are not CPUs.
        let offline = std::fs::read_to_string(&online).is_ok_and(|state| state.trim() == "0");
        if offline {
            std::fs::write(&online, "1")
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", online.display())))?;
        }
    }
    Ok(())
}
