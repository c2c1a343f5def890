//! The boot GDT: segment descriptors for the two entry modes, and their KVM segment form.

use kvm_bindings::kvm_segment;

/// Access and flag bits of one descriptor, as the 16 bits `G D/B L AVL 0000 P DPL S TYPE` hold them.
#[derive(Clone, Copy, Debug)]
pub struct Descriptor {
    pub flags: u16,
    pub base: u32,
    pub limit: u32,
}

impl Descriptor {
    pub const fn new(flags: u16, base: u32, limit: u32) -> Self {
        Descriptor { flags, base, limit }
    }

    /// The 8-byte descriptor the CPU reads from the GDT.
    pub fn encode(&self) -> u64 {
        let base = u64::from(self.base);
        let limit = u64::from(self.limit);
        let flags = u64::from(self.flags);
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | ((flags & 0xff) << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((flags >> 12) & 0xf) << 52)
            | (((base >> 24) & 0xff) << 56)
    }

    /// The same segment as KVM_SET_SREGS wants it, loaded through `selector`.
    pub fn to_kvm_segment(&self, selector: u16) -> kvm_segment {
        let g = ((self.flags >> 15) & 1) as u8;
        let limit = if g == 1 {
            (self.limit << 12) | 0xfff
        } else {
            self.limit
        };
        kvm_segment {
            base: u64::from(self.base),
            limit,
            selector,
            type_: (self.flags & 0xf) as u8,
            present: ((self.flags >> 7) & 1) as u8,
            dpl: ((self.flags >> 5) & 3) as u8,
            db: ((self.flags >> 14) & 1) as u8,
            s: ((self.flags >> 4) & 1) as u8,
            l: ((self.flags >> 13) & 1) as u8,
            g,
            avl: ((self.flags >> 12) & 1) as u8,
            unusable: 0,
            padding: 0,
        }
    }
}

/// GDT index 1: 64-bit code (long mode boot protocol).
pub const CODE64: Descriptor = Descriptor::new(0xa09b, 0, 0xfffff);
/// GDT index 1: 32-bit flat code (PVH entry).
pub const CODE32: Descriptor = Descriptor::new(0xc09b, 0, 0xfffff);
/// GDT index 2: flat data.
pub const DATA: Descriptor = Descriptor::new(0xc093, 0, 0xfffff);
/// GDT index 3: a busy 32/64-bit TSS, which VMX insists on for a valid TR.
pub const TSS: Descriptor = Descriptor::new(0x008b, 0, 0xfffff);

/// The four-entry boot GDT for a code segment.
pub fn table(code: Descriptor) -> [u64; 4] {
    [0, code.encode(), DATA.encode(), TSS.encode()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_architectural_descriptors() {
        // Known encodings of flat segments (Intel SDM vol. 3, 3.4.5).
        assert_eq!(CODE64.encode(), 0x00af_9b00_0000_ffff);
        assert_eq!(CODE32.encode(), 0x00cf_9b00_0000_ffff);
        assert_eq!(DATA.encode(), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn kvm_segment_scales_a_paged_limit() {
        let seg = CODE64.to_kvm_segment(0x8);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(
            (seg.l, seg.db, seg.g, seg.present, seg.type_),
            (1, 0, 1, 1, 0xb)
        );
        let tss = TSS.to_kvm_segment(0x18);
        assert_eq!((tss.g, tss.s, tss.limit), (0, 0, 0xfffff));
    }
}
