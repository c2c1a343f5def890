//! CPU templates: the CPUID a guest sees, built from `KVM_GET_SUPPORTED_CPUID`.
//!
//! A template decides which supported features a guest may use; topology normalization then
//! makes every vCPU's CPUID agree with the MP table (APIC IDs 0..N, one thread per core, one
//! package). Both templates hide nested virtualization: pods never need it.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A named CPUID policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuTemplate {
    /// Every feature this host's KVM supports (fastest; ties a snapshot to this CPU model).
    #[default]
    Host,
    /// An x86-64-v2 feature set (no AVX, no XSAVE, no TSX, no AVX-512): the same guest view on any
    /// recent Intel or AMD host, for snapshots that move between hosts.
    Baseline,
}

impl CpuTemplate {
    pub const NAMES: [&'static str; 2] = ["host", "baseline"];
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Baseline => "baseline",
        })
    }
}

/// An unknown template name.
#[derive(Debug, thiserror::Error)]
#[error("unknown CPU template {0:?} (known: host, baseline)")]
pub struct UnknownTemplate(String);

impl FromStr for CpuTemplate {
    type Err = UnknownTemplate;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(CpuTemplate::Host),
            "baseline" => Ok(CpuTemplate::Baseline),
            other => Err(UnknownTemplate(other.to_string())),
        }
    }
}

/// The CPU vendor, from leaf 0's signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// Reads the vendor from a CPUID leaf list.
pub fn vendor(cpuid: &CpuId) -> Vendor {
    let Some(leaf0) = cpuid.as_slice().iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    sig[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &sig {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

mod bits {
    pub const L1_ECX_VMX: u32 = 1 << 5;
    pub const L1_ECX_TSC_DEADLINE: u32 = 1 << 24;
    pub const L1_ECX_HYPERVISOR: u32 = 1 << 31;
    pub const L1_EDX_HTT: u32 = 1 << 28;
    /// Leaf 1 ECX features beyond x86-64-v2: MONITOR, VMX, SMX, EIST, TM2, FMA, DCA, XSAVE,
    /// OSXSAVE, AVX, F16C.
    pub const L1_ECX_BEYOND_V2: u32 = (1 << 3)
        | (1 << 5)
        | (1 << 6)
        | (1 << 7)
        | (1 << 8)
        | (1 << 12)
        | (1 << 18)
        | (1 << 26)
        | (1 << 27)
        | (1 << 28)
        | (1 << 29);
    /// Leaf 7 EBX kept by the baseline: FSGSBASE, SMEP, ERMS, SMAP.
    pub const L7_EBX_BASELINE: u32 = (1 << 0) | (1 << 7) | (1 << 9) | (1 << 20);
    /// Leaf 7 EDX kept by the baseline: speculation-control bits the guest needs for mitigations.
    pub const L7_EDX_BASELINE: u32 = (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 31);
    pub const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
    pub const EXT1_ECX_SVM: u32 = 1 << 2;
    /// Leaf 0x8000_0001 ECX kept by the baseline: LAHF/SAHF, CMP_LEGACY, PREFETCHW.
    pub const EXT1_ECX_BASELINE: u32 = (1 << 0) | (1 << 1) | (1 << 8);
}

/// Applies `template` to the host's supported CPUID, in place (all vCPUs share this part).
pub fn apply_template(cpuid: &mut CpuId, template: CpuTemplate) {
    let mut kept: Vec<kvm_cpuid_entry2> = Vec::with_capacity(cpuid.as_slice().len());
    for entry in cpuid.as_slice() {
        let mut e = *entry;
        match e.function {
            0x1 => {
                e.ecx &= !bits::L1_ECX_VMX;
                e.ecx |= bits::L1_ECX_HYPERVISOR;
                if template == CpuTemplate::Baseline {
                    e.ecx &= !bits::L1_ECX_BEYOND_V2;
                }
            }
            0x7 if template == CpuTemplate::Baseline => {
                if e.index == 0 {
                    e.ebx &= bits::L7_EBX_BASELINE;
                    e.ecx = 0;
                    e.edx &= bits::L7_EDX_BASELINE;
                } else {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
            }
            // XSAVE state enumeration goes with XSAVE.
            0xd if template == CpuTemplate::Baseline => continue,
            0x8000_0001 => {
                e.ecx &= !bits::EXT1_ECX_SVM;
                if template == CpuTemplate::Baseline {
                    e.ecx &= bits::EXT1_ECX_BASELINE;
                }
            }
            // SVM feature leaf: nested virtualization is hidden.
            0x8000_000a => continue,
            _ => {}
        }
        kept.push(e);
    }
    *cpuid = CpuId::from_entries(&kept).expect("a filtered CPUID list still fits");
}

/// Announces the TSC-deadline LAPIC timer mode, which KVM's in-kernel LAPIC emulates whatever
/// the host CPU has but KVM_GET_SUPPORTED_CPUID leaves out (KVM_CAP_TSC_DEADLINE_TIMER says it
/// instead). With it the guest skips calibrating the LAPIC timer against the PIT, which costs
/// hundreds of milliseconds where exits are slow and, when the calibration fails, leaves the guest
/// ticking on the PIT.
pub fn add_tsc_deadline_timer(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == 0x1 {
            e.ecx |= bits::L1_ECX_TSC_DEADLINE;
        }
    }
}

/// A digest of the CPU a guest of `vcpu_count` vCPUs sees: every leaf of the template-applied
/// CPUID, in KVM's order, with the topology of vCPU 0 (KVM_GET_SUPPORTED_CPUID reports the APIC
/// IDs of whichever host CPU ran the call; topology normalization replaces them). Two hosts with
/// the same digest offer a guest the same CPU model and features, which is what a snapshot's
/// vCPU state (XSAVE layout, MSRs, CPUID) depends on.
pub fn fingerprint(template_cpuid: &CpuId, vcpu_count: u8) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut cpuid = template_cpuid.clone();
    normalize_topology(&mut cpuid, 0, vcpu_count);
    let mut digest = Sha256::new();
    for e in cpuid.as_slice() {
        for word in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
            digest.update(word.to_le_bytes());
        }
    }
    digest.finalize().into()
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Makes CPUID describe vCPU `index` of `count`: APIC ID = index, one package of `count` cores,
/// one thread each.
pub fn normalize_topology(cpuid: &mut CpuId, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(count);
    let vendor = vendor(cpuid);
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (apic_id << 24) | (count << 16) | (e.ebx & 0xffff);
                if count > 1 {
                    e.edx |= bits::L1_EDX_HTT;
                } else {
                    e.edx &= !bits::L1_EDX_HTT;
                }
            }
            0x4 if vendor == Vendor::Intel => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            0xb | 0x1f => {
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    level => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = level;
                    }
                }
                e.edx = apic_id;
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                if count > 1 {
                    e.ecx |= bits::EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !bits::EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn amd() -> CpuId {
        let sig = b"AuthenticAMD";
        let w = |i: usize| u32::from_le_bytes(sig[i..i + 4].try_into().unwrap());
        CpuId::from_entries(&[
            leaf(0, 0, 0xd, w(0), w(8), w(4)),
            leaf(1, 0, 0x830f10, 0x0800, u32::MAX, u32::MAX),
            leaf(7, 0, 0, u32::MAX, u32::MAX, u32::MAX),
            leaf(0xd, 0, 7, 0x340, 0x340, 0),
            leaf(0x8000_0001, 0, 0, 0, u32::MAX, u32::MAX),
            leaf(0x8000_0008, 0, 0x3030, 0, 0xffff, 0),
            leaf(0x8000_000a, 0, 1, 0x8000, 0, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32) -> Option<kvm_cpuid_entry2> {
        c.as_slice()
            .iter()
            .copied()
            .find(|e| e.function == function)
    }

    #[test]
    fn names_round_trip() {
        for name in CpuTemplate::NAMES {
            assert_eq!(name.parse::<CpuTemplate>().unwrap().to_string(), name);
        }
        assert!("t2s".parse::<CpuTemplate>().is_err());
    }

    #[test]
    fn every_template_hides_nested_virtualization_and_flags_a_hypervisor() {
        for t in [CpuTemplate::Host, CpuTemplate::Baseline] {
            let mut c = amd();
            apply_template(&mut c, t);
            assert_eq!(find(&c, 1).unwrap().ecx & bits::L1_ECX_VMX, 0);
            assert_ne!(find(&c, 1).unwrap().ecx & bits::L1_ECX_HYPERVISOR, 0);
            assert_eq!(find(&c, 0x8000_0001).unwrap().ecx & bits::EXT1_ECX_SVM, 0);
            assert!(find(&c, 0x8000_000a).is_none());
        }
    }

    #[test]
    fn tsc_deadline_timer_is_announced_in_leaf_1() {
        let mut c = amd();
        c.as_mut_slice()[1].ecx = 0;
        add_tsc_deadline_timer(&mut c);
        assert_eq!(find(&c, 1).unwrap().ecx, bits::L1_ECX_TSC_DEADLINE);
    }

    #[test]
    fn baseline_drops_avx_and_xsave() {
        let mut c = amd();
        apply_template(&mut c, CpuTemplate::Baseline);
        assert_eq!(find(&c, 1).unwrap().ecx & (1 << 28 | 1 << 26), 0);
        assert_eq!(find(&c, 7).unwrap().ebx & (1 << 5), 0);
        assert!(find(&c, 0xd).is_none());
        let mut h = amd();
        apply_template(&mut h, CpuTemplate::Host);
        assert!(find(&h, 0xd).is_some());
    }

    #[test]
    fn the_fingerprint_tells_templates_and_cpus_apart() {
        let mut host = amd();
        apply_template(&mut host, CpuTemplate::Host);
        let mut baseline = amd();
        apply_template(&mut baseline, CpuTemplate::Baseline);
        assert_ne!(fingerprint(&host, 1), fingerprint(&baseline, 1));
        let mut other_model = host.clone();
        other_model.as_mut_slice()[1].eax ^= 0x10;
        assert_ne!(fingerprint(&host, 1), fingerprint(&other_model, 1));
        let mut other_host_cpu = host.clone();
        other_host_cpu.as_mut_slice()[1].ebx ^= 3 << 24;
        assert_eq!(
            fingerprint(&host, 2),
            fingerprint(&other_host_cpu, 2),
            "the APIC ID of the CPU KVM ran on does not count"
        );
    }

    #[test]
    fn topology_numbers_apic_ids_and_cores() {
        let mut c = amd();
        normalize_topology(&mut c, 3, 4);
        let l1 = find(&c, 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & bits::L1_EDX_HTT, 0);
        assert_eq!(find(&c, 0x8000_0008).unwrap().ecx & 0xff, 3);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
