//! Guest RAM in and out of a snapshot's memory file: the regions one after another, as in the
//! guest's memfd (see [`crate::vstate::memory::ram_ranges`]), as a sparse file.
//!
//! Writing skips what the guest never touched (holes of the memfd, found with SEEK_DATA/SEEK_HOLE,
//! are never read, so they are not faulted in either) and every all-zero 4 KiB page; both stay
//! holes in the file. RAM that is itself a privately mapped memory file (a restored VM) is read
//! whole, pages never touched included. The file is written under a temporary name and renamed
//! into place, so VMs still mapping an older file of that name keep theirs intact. Restoring
//! either maps the file privately ([`MemoryBacking::Private`]), copies its data into a fresh
//! memfd ([`MemoryBacking::Memfd`]), or fills a fresh memfd page by page as the guest touches it
//! ([`MemoryBacking::LazyMemfd`], [`super::lazy`]).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::SnapshotError;
use crate::vstate::memory::{self, ram_ranges};

/// The unit of sparseness in the memory file.
const PAGE: usize = 4096;
/// How much guest memory is copied at a time.
const CHUNK: usize = 2 << 20;

/// How a restored guest's RAM is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryBacking {
    /// The memory file mapped copy-on-write (MAP_PRIVATE): the restore reads nothing up front,
    /// the guest faults pages in from the file's page cache, and VMs restored from the same file
    /// share every page none of them wrote. No other process can map this RAM, so a VM restored
    /// this way cannot serve a vhost-user device (virtio-fs).
    #[default]
    Private,
    /// A fresh memfd filled with the file's data: the restore reads the whole file and each VM
    /// holds its own copy, but the RAM is shareable again (vhost-user backends can map it).
    Memfd,
    /// A fresh memfd that a userfaultfd handler fills from the file as pages are first touched
    /// ([`super::lazy`]): shareable like [`MemoryBacking::Memfd`], and each VM holds only what it
    /// has used since the restore. Where no userfaultfd can be had, the file is copied as for
    /// [`MemoryBacking::Memfd`].
    LazyMemfd,
}

impl MemoryBacking {
    /// Whether the RAM is a memfd (vhost-user backends can map it).
    pub fn is_shareable(self) -> bool {
        self != MemoryBacking::Private
    }
}

/// Restored guest RAM, and the thread filling it when it is restored lazily (it must outlive
/// every access to the RAM).
pub struct RestoredMemory {
    pub memory: GuestMemoryMmap,
    pub loader: Option<super::lazy::PageLoader>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The data (non-hole) ranges of `file` within `start..end`; a file system without SEEK_DATA
/// reports everything as data.
fn data_ranges(file: &File, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut at = start;
    while at < end {
        // SAFETY: lseek on an fd `file` owns; the result is checked.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole up to the end of the file
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        ranges.push((data, hole));
        at = hole;
    }
    Ok(ranges)
}

/// The guest ranges to save: for RAM backed by its own memfd, what the memfd holds (the rest has
/// never been touched and reads as zeros); otherwise everything. Each is (guest address, file
/// offset, length).
fn saved_ranges(mem: &GuestMemoryMmap, memfd: bool) -> std::io::Result<Vec<(u64, u64, u64)>> {
    let mut ranges = Vec::new();
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let gpa = region.start_addr().0;
        let len = region.len();
        match region.file_offset().filter(|_| memfd) {
            Some(backing) => {
                let start = backing.start();
                for (data, hole) in data_ranges(backing.file(), start, start + len)? {
                    ranges.push((gpa + data - start, file_offset + data - start, hole - data));
                }
            }
            None => ranges.push((gpa, file_offset, len)),
        }
        file_offset += len;
    }
    Ok(ranges)
}

/// Writes guest RAM to `path` (0600; a file there is replaced, not overwritten) as a sparse
/// file. `memfd` says the RAM is CRX's own memfd, whose holes need no reading. The vCPUs and
/// devices must be paused. Returns the bytes written (the rest of the file is holes).
pub fn write(mem: &GuestMemoryMmap, memfd: bool, path: &Path) -> Result<u64, SnapshotError> {
    let err = io_err(path);
    let temporary = super::temporary_name(path);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(&err)?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(&err)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for (gpa, file_offset, len) in saved_ranges(mem, memfd).map_err(&err)? {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(gpa + done))
                .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
            for (page_index, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    let at = file_offset + done + (page_index * PAGE) as u64;
                    file.write_all_at(page, at).map_err(&err)?;
                    written += page.len() as u64;
                }
            }
            done += n as u64;
        }
    }
    file.sync_all().map_err(&err)?;
    std::fs::rename(&temporary, path).map_err(&err)?;
    Ok(written)
}

/// Opens the memory file, checking it holds `size` bytes of guest RAM.
fn open_sized(path: &Path, size: u64) -> Result<File, SnapshotError> {
    let err = io_err(path);
    let file = File::open(path).map_err(&err)?;
    let found = file.metadata().map_err(&err)?.len();
    if found != size {
        return Err(SnapshotError::MemoryFileSize {
            path: path.to_path_buf(),
            expected: size,
            found,
        });
    }
    Ok(file)
}

/// `size` bytes of guest RAM from the memory file at `path`, backed as `backing` says.
pub fn restore(
    path: &Path,
    size: u64,
    backing: MemoryBacking,
) -> Result<RestoredMemory, crate::Error> {
    let file = open_sized(path, size)?;
    let memory = match backing {
        MemoryBacking::Private => map_private(path, file, size)?,
        MemoryBacking::Memfd => {
            let mem = memory::create(size)?;
            fill(&mem, path, &file, size)?;
            mem
        }
        MemoryBacking::LazyMemfd => {
            let mem = memory::create(size)?;
            let data = data_ranges(&file, 0, size).map_err(io_err(path))?;
            let reader = file.try_clone().map_err(io_err(path))?;
            match super::lazy::start(&mem, reader, path, data) {
                Ok(loader) => {
                    return Ok(RestoredMemory {
                        memory: mem,
                        loader: Some(loader),
                    })
                }
                Err(e) => {
                    tracing::warn!("restoring guest RAM by copying it instead: {e}");
                    // A failed registration may have left part of it registered.
                    drop(mem);
                    let mem = memory::create(size)?;
                    fill(&mem, path, &file, size)?;
                    mem
                }
            }
        }
    };
    Ok(RestoredMemory {
        memory,
        loader: None,
    })
}

/// Maps each RAM range of the (read-only) file MAP_PRIVATE: writes land in the process's own
/// copies of the pages, never in the file.
fn map_private(path: &Path, file: File, size: u64) -> Result<GuestMemoryMmap, SnapshotError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (gpa, len) in ram_ranges(size) {
        let backing = file.try_clone().map_err(io_err(path))?;
        let mapping = MmapRegionBuilder::<()>::new(len as usize)
            .with_file_offset(FileOffset::new(backing, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, gpa).ok_or_else(|| {
            SnapshotError::GuestMemory(format!("region at {:#x} overflows", gpa.0))
        })?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::GuestMemory(e.to_string()))
}

/// Copies the file's data ranges into `mem` (a fresh memfd: its holes already read as zeros).
fn fill(mem: &GuestMemoryMmap, path: &Path, file: &File, size: u64) -> Result<(), SnapshotError> {
    let err = io_err(path);
    let mut buf = vec![0u8; CHUNK];
    let mut region_offset = 0u64;
    for (gpa, len) in ram_ranges(size) {
        for (data, hole) in data_ranges(file, region_offset, region_offset + len).map_err(&err)? {
            let mut at = data;
            while at < hole {
                let n = (hole - at).min(CHUNK as u64) as usize;
                file.read_exact_at(&mut buf[..n], at).map_err(&err)?;
                mem.write_slice(&buf[..n], GuestAddress(gpa.0 + at - region_offset))
                    .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
                at += n as u64;
            }
        }
        region_offset += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("crx-snapshot-memory-{name}-{}", std::process::id()))
    }

    #[test]
    fn memory_round_trips_sparsely_through_every_backing() {
        let size = 16 << 20;
        let mem = memory::create(size).unwrap();
        mem.write_obj(0xfeed_u64, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(9 << 20))
            .unwrap();
        // A touched page of zeros stays a hole too.
        mem.write_obj(0u64, GuestAddress(5 << 20)).unwrap();
        let path = scratch("round-trip");
        let written = write(&mem, true, &path).unwrap();
        assert_eq!(written, 4 * PAGE as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

        for backing in [
            MemoryBacking::Private,
            MemoryBacking::Memfd,
            MemoryBacking::LazyMemfd,
        ] {
            let restored = restore(&path, size, backing).unwrap();
            let back = &restored.memory;
            assert_eq!(back.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xfeed);
            assert_eq!(
                back.read_obj::<u8>(GuestAddress((9 << 20) + 100)).unwrap(),
                7
            );
            assert_eq!(back.read_obj::<u64>(GuestAddress(12 << 20)).unwrap(), 0);
            back.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        }
        let again = restore(&path, size, MemoryBacking::Private).unwrap().memory;
        assert_eq!(
            again.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0xfeed,
            "a private mapping never writes the file"
        );
        // A snapshot of a restored VM, into the file its RAM maps: the VM keeps its pages.
        again.write_obj(0xbeef_u64, GuestAddress(0x2000)).unwrap();
        write(&again, false, &path).unwrap();
        assert_eq!(
            again.read_obj::<u8>(GuestAddress((9 << 20) + 100)).unwrap(),
            7
        );
        let third = restore(&path, size, MemoryBacking::Private).unwrap().memory;
        assert_eq!(third.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0xbeef);
        assert_eq!(third.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xfeed);
        assert!(matches!(
            restore(&path, size * 2, MemoryBacking::Private),
            Err(crate::Error::Snapshot(SnapshotError::MemoryFileSize { .. }))
        ));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_lazy_restore_loads_pages_on_first_touch_and_keeps_pages_another_mapping_wrote() {
        let size = 16 << 20;
        let run = 1u64 << 20;
        let mem = memory::create(size).unwrap();
        mem.write_slice(&[7u8; 32 * PAGE], GuestAddress(run))
            .unwrap();
        let path = scratch("lazy");
        write(&mem, true, &path).unwrap();
        let back = restore(&path, size, MemoryBacking::LazyMemfd).unwrap();
        assert!(back.loader.is_some(), "no userfaultfd: run as root");
        let region = back.memory.iter().next().unwrap();
        assert_eq!(region.start_addr(), GuestAddress(0));
        let memfd = region.file_offset().unwrap().file();
        let resident = || -> Vec<(u64, u64)> { data_ranges(memfd, 0, size).unwrap() };
        assert_eq!(resident(), vec![], "nothing is loaded before it is touched");

        // Another process (virtiofsd) writes page 3 of the run through its own mapping first.
        memfd
            .write_all_at(&[9u8; PAGE], run + 3 * PAGE as u64)
            .unwrap();
        // The guest touches page 0: its 64 KiB block loads, all but the page present already.
        assert_eq!(back.memory.read_obj::<u8>(GuestAddress(run)).unwrap(), 7);
        assert_eq!(
            resident(),
            vec![(run, run + super::super::lazy::BLOCK as u64)]
        );
        assert_eq!(
            back.memory
                .read_obj::<u8>(GuestAddress(run + 3 * PAGE as u64 + 5))
                .unwrap(),
            9
        );
        assert_eq!(
            back.memory
                .read_obj::<u8>(GuestAddress(run + 5 * PAGE as u64))
                .unwrap(),
            7
        );
        // A page the file has no data for reads as zeros, and loads alone.
        assert_eq!(
            back.memory.read_obj::<u64>(GuestAddress(12 << 20)).unwrap(),
            0
        );
        let pages: u64 = resident().iter().map(|(a, b)| b - a).sum();
        assert_eq!(pages, super::super::lazy::BLOCK as u64 + PAGE as u64);
        // Past the block, the rest of the run loads when touched.
        assert_eq!(
            back.memory
                .read_obj::<u8>(GuestAddress(run + 31 * PAGE as u64))
                .unwrap(),
            7
        );
        drop(back);
        std::fs::remove_file(&path).unwrap();
    }
}
