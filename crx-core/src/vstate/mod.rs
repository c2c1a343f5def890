//! KVM-side state of a microVM: guest memory, the VM fd, the vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
