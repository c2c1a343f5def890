//! The boot vCPU's initial state: general registers, segments and paging for the chosen entry
//! mode, FPU, boot MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{self, Descriptor};
use super::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode with an identity map of the first GiB,
    /// `%rsi` = the zero page.
    Linux64,
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// General registers at the kernel's entry point.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    regs
}

/// Writes the GDT, an empty IDT and (for 64-bit entry) the identity page tables into guest memory,
/// and fills the segment and control registers to match.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    sregs: &mut kvm_sregs,
) -> Result<(), vm_memory::GuestMemoryError> {
    let code: Descriptor = match mode {
        EntryMode::Pvh => gdt::CODE32,
        EntryMode::Linux64 => gdt::CODE64,
    };
    let table = gdt::table(code);
    for (i, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (8 * table.len() - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let code_seg = code.to_kvm_segment(0x08);
    let data_seg = gdt::DATA.to_kvm_segment(0x10);
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = gdt::TSS.to_kvm_segment(0x18);

    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages: PML4[0] → PDPT[0] → 512 PDEs.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_WRITABLE, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | PRESENT_WRITABLE, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PAGE_SIZE_2M | PRESENT_WRITABLE,
            GuestAddress(PDE_START + i * 8),
        )?;
    }
    Ok(())
}

/// The FPU as after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The TSC, and the local APIC's TSC-deadline timer compared with it.
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITEBACK: u64 = 6;

/// MSRs every vCPU starts with: syscall MSRs cleared, fast strings on, and write-back as the
/// default memory type (otherwise the guest runs uncached until it programs MTRRs).
pub fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITEBACK),
    ])
    .expect("the boot MSR list fits a FAM wrapper")
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Wires LINT0 to the legacy PIC (ExtINT) and LINT1 to NMI, as the MP table says.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let set = |lapic: &mut kvm_lapic_state, reg: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[reg + i] as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    };
    set(lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set(lapic, APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn long_mode_entry_maps_the_first_gib() {
        let mem = mem();
        let mut sregs = kvm_sregs::default();
        boot_sregs(&mem, EntryMode::Linux64, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cs.l, 1);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
        let gdt1: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt::CODE64.encode());
    }

    #[test]
    fn pvh_entry_is_flat_protected_mode() {
        let mem = mem();
        let mut sregs = kvm_sregs::default();
        boot_sregs(&mem, EntryMode::Pvh, &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!((sregs.cs.db, sregs.cs.l), (1, 0));
        assert_eq!(boot_regs(EntryMode::Pvh, 0x100_0000).rbx, PVH_INFO_START);
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        set_lint(&mut lapic);
        assert_eq!(lapic.regs[APIC_LVT0 + 1] as u8, 0x7);
        assert_eq!(lapic.regs[APIC_LVT1 + 1] as u8, 0x4);
    }
}
