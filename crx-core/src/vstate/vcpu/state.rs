//! A vCPU's KVM state in a snapshot ([`VcpuState`]): registers, special registers, XSAVE and XCRs,
//! debug registers, the local APIC, pending events, the MP state, every MSR KVM reports that this
//! vCPU has, and its CPUID; read on the paused vCPU's own thread, written before a restored vCPU's
//! thread starts.
//!
//! Orders follow KVM's documented constraints (as Firecracker's do): MP state is read first
//! (reading it may deliver pending APIC events) and events last; on restore SET_REGS precedes
//! SET_VCPU_EVENTS (which restores a pending exception SET_REGS would clear), SET_SREGS precedes
//! SET_LAPIC (the APIC base), SET_LAPIC precedes the MSRs, and the TSC deadline comes after the
//! TSC it is compared with.
//!
//! Time moves on while a snapshot waits: a restore advances each vCPU's TSC (and, in
//! [`crate::vstate::vm`], kvmclock) by the wall-clock time since the snapshot, so the guest's
//! clocks read the right time again; a TSC deadline that passed meanwhile fires at once, and a
//! disarmed one is set to fire at once, so a timer interrupt that was pending inside KVM (not yet
//! in the saved APIC) is not lost. KVM_KVMCLOCK_CTRL then tells the guest it was stopped, so its
//! lockup detectors do not count the gap.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use serde::{Deserialize, Serialize};

use super::{vcpu_err, Vcpu};
use crate::arch::x86_64::regs::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use crate::snapshot::SnapshotError;
use crate::Error;

/// A TSC frequency within this many parts per million of the saved one needs no scaling (hosts
/// calibrate their TSC slightly differently at boot).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// One vCPU's KVM state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE state in 32-bit words: the legacy 4 KiB region, then what KVM_GET_XSAVE2
    /// returns beyond it.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST this vCPU lets KVM_GET_MSRS read, in KVM's order.
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// Words in the legacy XSAVE region (`struct kvm_xsave`).
const XSAVE_REGION_WORDS: usize = 1024;
const _: () = assert!(std::mem::size_of::<kvm_xsave>() == XSAVE_REGION_WORDS * 4);

/// Words in the XSAVE buffer beyond the legacy region for a KVM_CAP_XSAVE2 size in bytes.
fn xsave_extra_words(xsave2_size: usize) -> usize {
    xsave2_size
        .saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(std::mem::size_of::<u32>())
}

impl Vcpu {
    /// Reads the vCPU's state; it must be out of KVM_RUN at a clean point, every other vCPU too.
    pub fn save_state(&self) -> Result<VcpuState, Error> {
        let err = |step| vcpu_err(self.index, step);
        let mp_state = self.fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(err("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let xsave = self.get_xsave()?;
        let xcrs = self.fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?;
        let debug_regs = self.fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let lapic = self.fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = self.get_msrs()?;
        let vcpu_events = self
            .fd
            .get_vcpu_events()
            .map_err(err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            index: self.index,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    fn get_xsave(&self) -> Result<Vec<u32>, Error> {
        let Some(size) = self.xsave2_size else {
            let xsave = self
                .fd
                .get_xsave()
                .map_err(vcpu_err(self.index, "KVM_GET_XSAVE"))?;
            return Ok(xsave.region.to_vec());
        };
        let mut xsave = Xsave::new(xsave_extra_words(size)).map_err(|e| Error::Boot {
            step: "allocate the XSAVE buffer",
            detail: e.to_string(),
        })?;
        // SAFETY: the buffer holds the KVM_CAP_XSAVE2 size KVM reported for this VM, which is
        // what KVM_GET_XSAVE2 writes.
        unsafe { self.fd.get_xsave2(&mut xsave) }
            .map_err(vcpu_err(self.index, "KVM_GET_XSAVE2"))?;
        let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(xsave.as_slice());
        Ok(words)
    }

    /// Reads every listed MSR this vCPU has: KVM_GET_MSRS stops at the first it refuses (PMU
    /// counters without a PMU, VMX capabilities with nested virtualization hidden, Hyper-V MSRs
    /// while Hyper-V is off); that one is left out and reading goes on after it.
    fn get_msrs(&self) -> Result<Vec<kvm_msr_entry>, Error> {
        let mut pending: &[u32] = &self.msr_index_list;
        let mut saved = Vec::with_capacity(pending.len());
        let mut refused = Vec::new();
        while !pending.is_empty() {
            let chunk: Vec<kvm_msr_entry> = pending
                .iter()
                .take(KVM_MAX_MSR_ENTRIES)
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&chunk).expect("a chunk fits KVM_MAX_MSR_ENTRIES");
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(vcpu_err(self.index, "KVM_GET_MSRS"))?;
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            if read < chunk.len() {
                refused.push(chunk[read].index);
                pending = &pending[read + 1..];
            } else {
                pending = &pending[read..];
            }
        }
        tracing::debug!(
            "vCPU {}: saved {} MSRs; not readable here: {refused:x?}",
            self.index,
            saved.len()
        );
        Ok(saved)
    }

    /// Writes `state` into this (new, never run) vCPU, its TSC advanced by `elapsed_ns`.
    pub fn restore_state(&self, state: &VcpuState, elapsed_ns: u64) -> Result<(), Error> {
        let err = |step| vcpu_err(self.index, step);
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| Error::Boot {
            step: "restore CPUID",
            detail: e.to_string(),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        let tsc_khz = self.match_tsc_khz(state.tsc_khz)?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        self.fd.set_regs(&state.regs).map_err(err("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(err("KVM_SET_SREGS"))?;
        self.set_xsave(state)?;
        self.fd.set_xcrs(&state.xcrs).map_err(err("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&state.debug_regs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(err("KVM_SET_LAPIC"))?;
        for chunk in msrs_for_restore(&state.msrs, tsc_khz, elapsed_ns).chunks(KVM_MAX_MSR_ENTRIES)
        {
            let msrs = Msrs::from_entries(chunk).expect("a chunk fits KVM_MAX_MSR_ENTRIES");
            let written = self.fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
            if written < chunk.len() {
                return Err(Error::Boot {
                    step: "restore MSRs",
                    detail: format!(
                        "vCPU {}: KVM refused MSR {:#x}",
                        self.index, chunk[written].index
                    ),
                });
            }
        }
        self.fd
            .set_vcpu_events(&state.vcpu_events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        // EINVAL when the guest never enabled kvmclock: nothing to tell it then.
        if let Err(e) = self.fd.kvmclock_ctrl() {
            tracing::debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.index);
        }
        Ok(())
    }

    /// Makes the guest's TSC tick at the saved rate (scaling it if this host's differs beyond
    /// calibration noise); returns the rate to advance the TSC by.
    fn match_tsc_khz(&self, saved: Option<u32>) -> Result<Option<u32>, Error> {
        let here = self.fd.get_tsc_khz().ok();
        let (Some(saved), Some(here)) = (saved, here) else {
            return Ok(saved.or(here));
        };
        let diff = u64::from(saved.abs_diff(here));
        if diff * 1_000_000 > u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
            self.fd
                .set_tsc_khz(saved)
                .map_err(|source| SnapshotError::TscFrequency {
                    saved,
                    here,
                    source,
                })?;
        }
        Ok(Some(saved))
    }

    fn set_xsave(&self, state: &VcpuState) -> Result<(), Error> {
        let extra_words = self.xsave2_size.map_or(0, xsave_extra_words);
        let (region, extra) = state
            .xsave
            .split_at_checked(XSAVE_REGION_WORDS)
            .filter(|(_, extra)| extra.len() <= extra_words)
            .ok_or(SnapshotError::XsaveSize {
                saved: state.xsave.len(),
                here: XSAVE_REGION_WORDS + extra_words,
            })?;
        let mut legacy = kvm_xsave::default();
        legacy.region.copy_from_slice(region);
        if self.xsave2_size.is_none() {
            // SAFETY: a whole kvm_xsave, the size KVM_SET_XSAVE reads without KVM_CAP_XSAVE2.
            return unsafe { self.fd.set_xsave(&legacy) }
                .map_err(vcpu_err(self.index, "KVM_SET_XSAVE"));
        }
        let mut xsave = Xsave::new(extra_words).map_err(|e| Error::Boot {
            step: "allocate the XSAVE buffer",
            detail: e.to_string(),
        })?;
        // SAFETY: only the plain-data region is replaced; the wrapper's length stays as allocated.
        unsafe { xsave.as_mut_fam_struct() }.xsave.region = legacy.region;
        xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
        // SAFETY: the buffer holds the KVM_CAP_XSAVE2 size KVM reported for this VM, all of which
        // KVM_SET_XSAVE may read.
        unsafe { self.fd.set_xsave2(&xsave) }.map_err(vcpu_err(self.index, "KVM_SET_XSAVE"))
    }
}

/// The MSRs to write back, in order: the TSC advanced by `elapsed_ns` at `tsc_khz`, a zero TSC
/// deadline replaced by that TSC (an immediate timer interrupt), and the deadline moved last.
fn msrs_for_restore(
    saved: &[kvm_msr_entry],
    tsc_khz: Option<u32>,
    elapsed_ns: u64,
) -> Vec<kvm_msr_entry> {
    let advance = tsc_khz.map_or(0, |khz| {
        (u128::from(elapsed_ns) * u128::from(khz) / 1_000_000).min(u128::from(u64::MAX)) as u64
    });
    let mut msrs: Vec<kvm_msr_entry> = saved
        .iter()
        .filter(|m| m.index != MSR_IA32_TSC_DEADLINE)
        .map(|m| {
            let mut m = *m;
            if m.index == MSR_IA32_TSC {
                m.data = m.data.wrapping_add(advance);
            }
            m
        })
        .collect();
    let tsc = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data);
    if let Some(deadline) = saved.iter().find(|m| m.index == MSR_IA32_TSC_DEADLINE) {
        let mut deadline = *deadline;
        if deadline.data == 0 {
            deadline.data = tsc.unwrap_or(0);
        }
        msrs.push(deadline);
    }
    msrs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn the_tsc_advances_and_the_deadline_follows_it() {
        let saved = [
            msr(MSR_IA32_TSC_DEADLINE, 5_000),
            msr(MSR_IA32_TSC, 1_000),
            msr(0x174, 7),
        ];
        // 2 s at 1 GHz.
        let out = msrs_for_restore(&saved, Some(1_000_000), 2_000_000_000);
        assert_eq!(out[0].index, MSR_IA32_TSC);
        assert_eq!(out[0].data, 2_000_001_000);
        assert_eq!(out[1].data, 7);
        assert_eq!(out.last().unwrap().index, MSR_IA32_TSC_DEADLINE);
        assert_eq!(
            out.last().unwrap().data,
            5_000,
            "a passed deadline fires at once"
        );

        let disarmed = [msr(MSR_IA32_TSC, 1_000), msr(MSR_IA32_TSC_DEADLINE, 0)];
        let out = msrs_for_restore(&disarmed, None, 2_000_000_000);
        assert_eq!(out[0].data, 1_000, "no frequency, no advance");
        assert_eq!(out[1].data, 1_000, "a zero deadline is set to fire at once");
    }

    #[test]
    fn xsave2_sizes_become_extra_words() {
        assert_eq!(xsave_extra_words(4096), 0);
        assert_eq!(xsave_extra_words(4096 + 8192), 2048);
        assert_eq!(xsave_extra_words(4097), 1);
    }
}
