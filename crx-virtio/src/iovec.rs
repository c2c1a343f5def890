//! A descriptor chain as two lists of guest memory segments, device-readable then device-writable,
//! with no assumption about how many descriptors a request uses or where its parts split. Devices
//! cut headers and trailers off by byte count and hand the rest to the kernel as iovecs that point
//! straight into guest memory, so payloads are never copied through a VMM buffer.

use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::device::{Chain, Malformed};

/// The most bytes one chain may describe (a guest cannot make the VMM walk more).
const MAX_CHAIN_BYTES: u64 = 1 << 32;

/// A run of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Guest memory segments in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments(Vec<Segment>);

impl Segments {
    pub fn len(&self) -> u64 {
        self.0.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns the first `n` bytes; None if there are fewer.
    pub fn split_front(&mut self, n: u64) -> Option<Segments> {
        if n > self.len() {
            return None;
        }
        let mut front = Vec::new();
        let mut left = n;
        while left > 0 {
            let seg = &mut self.0[0];
            let take = left.min(u64::from(seg.len)) as u32;
            front.push(Segment {
                addr: seg.addr,
                len: take,
            });
            seg.addr = seg.addr.unchecked_add(u64::from(take));
            seg.len -= take;
            if seg.len == 0 {
                self.0.remove(0);
            }
            left -= u64::from(take);
        }
        self.0.retain(|s| s.len > 0);
        Some(Segments(front))
    }

    /// Removes and returns the last `n` bytes; None if there are fewer.
    pub fn split_back(&mut self, n: u64) -> Option<Segments> {
        let total = self.len();
        let mut back = self.clone();
        let front = back.split_front(total.checked_sub(n)?)?;
        *self = front;
        Some(back)
    }

    /// Keeps at most the first `n` bytes.
    pub fn truncate(&mut self, n: u64) {
        if n < self.len() {
            *self = self.split_front(n).unwrap_or_default();
        }
    }

    /// The segments as host iovecs into `mem`, each checked to lie in guest RAM with the access
    /// the device needs.
    pub fn iovecs(
        &self,
        mem: &GuestMemoryMmap,
        write: bool,
    ) -> Result<Vec<libc::iovec>, Malformed> {
        let access = if write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut iovecs = Vec::with_capacity(self.0.len());
        for seg in &self.0 {
            let slices = mem
                .get_slices(seg.addr, seg.len as usize, access)
                .map_err(|e| {
                    Malformed::new(format!("buffer {:#x}+{:#x}: {e}", seg.addr.0, seg.len))
                })?;
            for slice in slices {
                let slice = slice.map_err(|e| {
                    Malformed::new(format!("buffer {:#x}+{:#x}: {e}", seg.addr.0, seg.len))
                })?;
                iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        Ok(iovecs)
    }

    /// Copies up to `buf.len()` bytes out of the segments; returns how many.
    pub fn read_into(&self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Result<usize, Malformed> {
        let mut done = 0;
        for iov in self.iovecs(mem, false)? {
            let n = iov.iov_len.min(buf.len() - done);
            // SAFETY: iov points into a live guest memory mapping of at least iov_len bytes
            // (checked by `iovecs`); the guest may change it concurrently, which a byte copy
            // tolerates.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    iov.iov_base.cast::<u8>(),
                    buf[done..].as_mut_ptr(),
                    n,
                )
            };
            done += n;
            if done == buf.len() {
                break;
            }
        }
        Ok(done)
    }

    /// Copies `data` into the segments from their start; returns how many bytes fit.
    pub fn write_from(&self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<usize, Malformed> {
        let mut done = 0;
        for iov in self.iovecs(mem, true)? {
            let n = iov.iov_len.min(data.len() - done);
            // SAFETY: as in `read_into`, with write access checked.
            unsafe {
                std::ptr::copy_nonoverlapping(data[done..].as_ptr(), iov.iov_base.cast::<u8>(), n)
            };
            done += n;
            if done == data.len() {
                break;
            }
        }
        Ok(done)
    }
}

impl FromIterator<Segment> for Segments {
    fn from_iter<I: IntoIterator<Item = Segment>>(iter: I) -> Self {
        Segments(iter.into_iter().collect())
    }
}

/// A chain's readable and writable parts.
#[derive(Debug, Default)]
pub struct ChainBuffers {
    pub readable: Segments,
    pub writable: Segments,
}

impl ChainBuffers {
    /// Walks the chain (virtio-queue bounds its length and follows indirect tables). A readable
    /// descriptor after a writable one, or more than 4 GiB in all, is malformed.
    pub fn from_chain(chain: Chain<'_>) -> Result<ChainBuffers, Malformed> {
        let mut buffers = ChainBuffers::default();
        let mut total = 0u64;
        for desc in chain {
            if desc.len() == 0 {
                continue;
            }
            total += u64::from(desc.len());
            if total > MAX_CHAIN_BYTES {
                return Err(Malformed::new("chain describes more than 4 GiB"));
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                buffers.writable.0.push(seg);
            } else if buffers.writable.0.is_empty() {
                buffers.readable.0.push(seg);
            } else {
                return Err(Malformed::new(
                    "device-readable descriptor after a writable one",
                ));
            }
        }
        Ok(buffers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(parts: &[(u64, u32)]) -> Segments {
        Segments(
            parts
                .iter()
                .map(|&(a, l)| Segment {
                    addr: GuestAddress(a),
                    len: l,
                })
                .collect(),
        )
    }

    #[test]
    fn splits_cross_segment_boundaries() {
        let mut s = segs(&[(0x1000, 10), (0x2000, 6), (0x3000, 4)]);
        let head = s.split_front(12).unwrap();
        assert_eq!(head, segs(&[(0x1000, 10), (0x2000, 2)]));
        assert_eq!(s, segs(&[(0x2002, 4), (0x3000, 4)]));
        let tail = s.split_back(5).unwrap();
        assert_eq!(tail, segs(&[(0x2005, 1), (0x3000, 4)]));
        assert_eq!(s, segs(&[(0x2002, 3)]));
        assert!(s.split_front(4).is_none());
        assert!(s.split_back(4).is_none());
        s.truncate(1);
        assert_eq!(s, segs(&[(0x2002, 1)]));
    }

    #[test]
    fn iovecs_refuse_memory_outside_guest_ram() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        assert!(segs(&[(0x100, 0x100)]).iovecs(&mem, true).is_ok());
        assert!(segs(&[(0xff00, 0x200)]).iovecs(&mem, true).is_err());
        assert!(segs(&[(u64::MAX - 4, 8)]).iovecs(&mem, false).is_err());
        let data = [7u8; 300];
        let s = segs(&[(0x100, 0x10), (0x400, 0x200)]);
        assert_eq!(s.write_from(&mem, &data).unwrap(), 300);
        let mut back = [0u8; 300];
        assert_eq!(s.read_into(&mem, &mut back).unwrap(), 300);
        assert_eq!(back, data);
    }
}
