//! An address bus: maps non-overlapping ranges (I/O ports or guest-physical MMIO) to devices.
//! Accesses that hit no device read as all ones and are otherwise ignored, as on real hardware.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device range overlaps one already on the bus.
#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of device ranges, looked up by address.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    /// Adds `device` at `base..base+len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if len == 0 || before.is_some_and(|(b, r)| b + r.len > base) {
            return Err(Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Range)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((addr - base, range))
    }

    /// Reads from the device at `addr`; returns false (data all ones) if there is none.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, range)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false if there is none.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, range)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device; a device whose lock was poisoned by a panicking vCPU thread is still served.
fn lock<'a>(
    device: &'a Mutex<dyn BusDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlaps() {
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(0x10))))
            .unwrap();
        assert!(bus.insert(0x3fc, 8, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0x3f0, 9, Arc::new(Mutex::new(Echo(0)))).is_err());
        bus.insert(0x400, 1, Arc::new(Mutex::new(Echo(0)))).unwrap();
        let mut b = [0u8];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 0x12);
        assert!(bus.write(0x3f8, &[0x20]));
        assert!(bus.read(0x3ff, &mut b));
        assert_eq!(b[0], 0x27);
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.write(0x401, &[1]));
    }
}
