//! Tells what kind of KVM this host offers.
//!
//! CRX targets standard KVM (VMX/SVM hardware, or a nested hypervisor that exposes it). Some hosts
//! expose a PVM hypervisor (`kvm_pvm`) behind the same `/dev/kvm` API instead: a stock guest kernel's
//! supervisor code is emulated there and never reaches init. A VMM detects PVM the way its guests do:
//! MSR `0x4b564d11` (the PVM signature) reads `0x4d5650` ("PVM"); standard KVM rejects that MSR.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

/// The PVM signature MSR.
pub const MSR_PVM_SIGNATURE: u32 = 0x4b56_4d11;
/// What [`MSR_PVM_SIGNATURE`] reads on a PVM host ("PVM").
pub const PVM_SIGNATURE: u64 = 0x004d_5650;

/// The kind of KVM behind `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Ordinary KVM (hardware virtualization, possibly nested): guests run at full speed.
    Standard,
    /// A PVM hypervisor: only a cooperating paravirtual guest kernel runs natively.
    Pvm,
}

/// Why the probe could not tell.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    #[error("cannot create a probe VM or vCPU on /dev/kvm: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
}

/// Probes `/dev/kvm` by reading the PVM signature MSR of a throw-away vCPU.
pub fn probe() -> Result<KvmKind, ProbeError> {
    let kvm = Kvm::new().map_err(ProbeError::Open)?;
    let vm = kvm.create_vm().map_err(ProbeError::CreateVm)?;
    let vcpu = vm.create_vcpu(0).map_err(ProbeError::CreateVm)?;
    Ok(if vcpu_is_pvm(&vcpu) {
        KvmKind::Pvm
    } else {
        KvmKind::Standard
    })
}

/// Reads the PVM signature MSR through an existing vCPU (cheap: a VMM checks its own vCPU 0).
pub fn vcpu_is_pvm(vcpu: &VcpuFd) -> bool {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_PVM_SIGNATURE,
        ..Default::default()
    }])
    .expect("one MSR entry fits a FAM wrapper");
    // Standard KVM refuses an unknown MSR: the call succeeds with 0 entries read, or fails.
    let read = vcpu.get_msrs(&mut msrs).unwrap_or(0);
    read == 1 && msrs.as_slice()[0].data == PVM_SIGNATURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_when_kvm_is_present() {
        if !std::path::Path::new("/dev/kvm").exists() {
            panic!("/dev/kvm is missing: this test needs KVM (standard or PVM)");
        }
        let kind = probe().expect("probe /dev/kvm");
        eprintln!("this host's /dev/kvm is {kind:?}");
    }
}
