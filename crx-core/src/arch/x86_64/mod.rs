//! x86_64 guest physical layout and boot-time CPU state.
//!
//! The layout matches Firecracker's, so the same guest kernels and command lines work under both:
//! boot tables in the first MiB, the kernel at 1 MiB, RAM up to the 32-bit MMIO gap at 3 GiB, the
//! rest of RAM above 4 GiB.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod regs;

/// The GDT's guest address.
pub const GDT_START: u64 = 0x500;
/// The (empty) IDT's guest address.
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, or the Linux zero page (`boot_params`); one boot protocol is used at a time.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// The Linux zero page (`boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit boot protocol: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes (639 KiB).
pub const EBDA_START: u64 = 0x9fc00;
/// First address above the legacy BIOS area.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (devices live here).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The boot timer and exit register page (Firecracker's boot-timer address).
pub const GUEST_STATUS_START: u64 = MMIO_GAP_START;
/// The size of one MMIO device page.
pub const MMIO_PAGE_SIZE: u64 = 0x1000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's three-page TSS area (must not overlap RAM or devices).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The first virtio-mmio device window; one 4 KiB window per device follows another.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// The IOAPIC pin of the first virtio device; each further device takes the next pin.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins: legacy IRQs 0..=23.
pub const IRQ_MAX: u8 = 23;
/// The 8250 serial port (COM1) and its IRQ.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 controller's data and command/status ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The most vCPUs a guest gets (the MP table must fit the 1 KiB EBDA).
pub const MAX_VCPUS: u8 = 32;
