//! crx-core: CRX's virtual machine monitor on KVM.
//!
//! One [`VmConfig`] in, one running microVM out: [`builder::start_vm`] creates the KVM VM, its
//! memfd-backed guest memory, the in-kernel irqchip and PIT, loads the kernel (ELF vmlinux through
//! PVH or the 64-bit boot protocol, or bzImage) and initrd, writes the boot tables (e820, MP table,
//! command line), adds the legacy devices (8250 serial, i8042 reset, boot timer and exit register),
//! and starts one thread per vCPU. [`Vmm::wait`] returns how the guest ended as a [`VmExit`].
//! [`Vmm::pause`] and [`Vmm::snapshot`] save a running VM to files; [`builder::restore_vm`] starts
//! a VM from them ([`snapshot`]).
//!
//! The layout follows Firecracker's `src/vmm`: `builder` assembles, `vstate` owns KVM state
//! (memory, VM, vCPUs), `devices` owns the emulated devices, `arch` the x86_64 boot tables.

pub mod arch;
pub mod builder;
pub mod devices;
pub mod launch;
pub mod snapshot;
pub mod vmm;
pub mod vstate;

pub use arch::x86_64::cpuid::CpuTemplate;
pub use builder::{restore_vm, start_vm, ConsoleOutput, RestoreConfig, VmConfig};
pub use snapshot::{MemoryBacking, SnapshotError, SnapshotFiles};
pub use vmm::{BootTimes, VmExit, VmOutcome, Vmm};

use std::path::PathBuf;

/// The stack of every thread crx-core starts (vCPUs, the guest image loader): ample for what they
/// run, and under 2 MiB so that transparent huge pages cannot make a whole 2 MiB of it resident at
/// the first touch (Rust's default is exactly 2 MiB, which the kernel may back with one huge
/// page; glibc then keeps a finished thread's stack cached, resident).
pub(crate) const THREAD_STACK: usize = 512 << 10;

/// Everything that can go wrong while building, running or tearing down a microVM.
/// Each variant names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("this host's /dev/kvm is PVM (kvm_pvm): stock guest kernels crawl in its emulator and never reach init; run CRX on standard KVM, or inside the test host (`cargo xtask testhost -- crx …`)")]
    PvmHost,
    #[error("cannot probe /dev/kvm: {0}")]
    Probe(#[from] crx_kvm_probe::ProbeError),
    #[error("KVM lacks a required capability: {0}")]
    KvmCapability(&'static str),
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("guest memory: {0}")]
    Memory(#[from] vstate::memory::MemoryError),
    #[error("VM setup ({step}): {source}")]
    Vm {
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index} setup ({step}): {source}")]
    Vcpu {
        index: u8,
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot read kernel {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kernel {path} is neither an ELF vmlinux nor a bzImage (ELF: {elf}; bzImage: {bzimage})"
    )]
    KernelFormat {
        path: PathBuf,
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    InitrdOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("boot setup ({step}): {detail}")]
    Boot { step: &'static str, detail: String },
    #[error("console: {0}")]
    Console(#[source] std::io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start vCPU thread: {0}")]
    VcpuThread(#[source] std::io::Error),
    #[error("cannot start a launch helper thread (image loader, KVM setup): {0}")]
    HelperThread(#[source] std::io::Error),
    #[error("virtio device: {0}")]
    Device(#[from] crx_virtio::DeviceError),
    #[error(transparent)]
    DeviceLoop(#[from] crx_virtio::event_loop::EventLoopError),
    #[error("cannot register the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("snapshot: {0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("serial console: {0}")]
    SerialState(#[from] devices::legacy::serial::BadSerialState),
}
