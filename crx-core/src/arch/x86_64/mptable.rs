//! The Intel MultiProcessor Specification 1.4 table that tells a guest without ACPI how many
//! CPUs it has and how legacy IRQs reach the IOAPIC. Written at the start of the EBDA, where
//! Linux's `smp_scan_config` finds it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX, MAX_VCPUS};

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
/// CPU signature (family 6) and features (FPU, APIC) advertised per processor entry.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_FPU_APIC: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;
const FLOATING_POINTER_LEN: u64 = 16;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit the MP table (1..={MAX_VCPUS})")]
    VcpuCount(u8),
    #[error("the MP table does not fit below 640 KiB")]
    TooLarge,
    #[error("writing the MP table: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Little-endian byte assembly of MP structures.
#[derive(Default)]
struct Table(Vec<u8>);

impl Table {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

/// The MP floating pointer and configuration table for `vcpus` CPUs, as they sit at `base`.
fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus + 1;
    let mut entries = Table::default();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries
            .u8(ENTRY_PROCESSOR)
            .u8(cpu)
            .u8(APIC_VERSION)
            .u8(flags)
            .u32(CPU_STEPPING)
            .u32(CPU_FEATURE_FPU_APIC)
            .u32(0)
            .u32(0);
        count += 1;
    }
    entries.u8(ENTRY_BUS).u8(0).bytes(b"ISA   ");
    entries
        .u8(ENTRY_IOAPIC)
        .u8(ioapic_id)
        .u8(IOAPIC_VERSION)
        .u8(CPU_ENABLED)
        .u32(IOAPIC_START as u32);
    count += 2;
    for irq in 0..=IRQ_MAX {
        entries
            .u8(ENTRY_IO_INTERRUPT)
            .u8(IRQ_TYPE_INT)
            .u16(0)
            .u8(0)
            .u8(irq)
            .u8(ioapic_id)
            .u8(irq);
        count += 1;
    }
    for (kind, dest_apic, lint) in [(IRQ_TYPE_EXTINT, 0, 0), (IRQ_TYPE_NMI, 0xff, 1)] {
        entries
            .u8(ENTRY_LOCAL_INTERRUPT)
            .u8(kind)
            .u16(0)
            .u8(0)
            .u8(0)
            .u8(dest_apic)
            .u8(lint);
        count += 1;
    }

    const HEADER_LEN: usize = 44;
    let mut header = Table::default();
    header
        .bytes(b"PCMP")
        .u16((HEADER_LEN + entries.0.len()) as u16)
        .u8(SPEC_REV)
        .u8(0) // checksum, below
        .bytes(b"CRX     ")
        .bytes(b"microVM     ")
        .u32(0)
        .u16(0)
        .u16(count)
        .u32(APIC_START as u32)
        .u32(0);
    debug_assert_eq!(header.0.len(), HEADER_LEN);
    header.bytes(&entries.0);
    header.0[7] = checksum(&header.0);

    let mut table = Table::default();
    table
        .bytes(b"_MP_")
        .u32((base + FLOATING_POINTER_LEN) as u32)
        .u8(1) // length in 16-byte units
        .u8(SPEC_REV)
        .u8(0) // checksum, below
        .bytes(&[0; 5]);
    table.0[10] = checksum(&table.0);
    table.bytes(&header.0);
    Ok(table.0)
}

/// Writes the MP table for `vcpus` CPUs at the start of the EBDA.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let table = build(vcpus, EBDA_START)?;
    if EBDA_START + table.len() as u64 > 0xa_0000 {
        return Err(MptableError::TooLarge);
    }
    mem.write_slice(&table, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_checksums_hold_and_every_cpu_is_listed() {
        for vcpus in [1, 2, MAX_VCPUS] {
            let t = build(vcpus, EBDA_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            let config = &t[16..16 + len];
            assert_eq!(&config[0..4], b"PCMP");
            assert_eq!(config.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let processors = config[44..]
                .chunks(20)
                .take(vcpus as usize)
                .filter(|e| e[0] == ENTRY_PROCESSOR)
                .count();
            assert_eq!(processors, vcpus as usize);
            assert!(EBDA_START + t.len() as u64 <= 0xa_0000);
        }
    }

    #[test]
    fn refuses_impossible_cpu_counts() {
        assert!(matches!(
            build(0, EBDA_START),
            Err(MptableError::VcpuCount(0))
        ));
        assert!(build(MAX_VCPUS + 1, EBDA_START).is_err());
    }
}
