//! Guest RAM: one memfd, mapped as the regions around the 32-bit MMIO gap.
//!
//! A memfd (rather than anonymous memory) lets a vhost-user backend such as virtiofsd map the very
//! same pages, and a snapshot save them as a file. The mappings ask for transparent huge pages:
//! with shmem THP in `advise` mode (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`, which
//! setup sets) the guest's RAM faults in 2 MiB at a time, as anonymous memory does by default.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::{MMIO_GAP_END, MMIO_GAP_START};

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create for guest RAM failed: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("sizing guest RAM to {size} bytes failed: {source}")]
    Size {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping guest RAM failed: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

/// The guest-physical RAM ranges for `size` bytes: below the MMIO gap, then from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Creates `size` bytes of guest RAM backed by a sealed-size memfd.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"crx-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Size { size, source })?;
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let file = file
            .try_clone()
            .map_err(|source| MemoryError::Size { size, source })?;
        regions.push((start, len as usize, Some(FileOffset::new(file, offset))));
        offset += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(regions)?;
    for region in mem.iter() {
        advise_huge_pages(region.as_ptr(), region.len() as usize);
    }
    Ok(mem)
}

/// Asks for transparent huge pages on a guest RAM mapping; without THP the hint is moot.
fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: madvise only changes paging policy for [addr, addr+len), a mapping owned by the
    // guest memory object; MADV_HUGEPAGE never changes its contents.
    let ret = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        tracing::debug!(
            "MADV_HUGEPAGE on guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guests_get_one_region_large_ones_skip_the_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(
            big[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn memory_is_file_backed_and_usable() {
        let mem = create(16 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(region.file_offset().is_some());
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }
}
