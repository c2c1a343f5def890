//! Lazy restore ([`super::MemoryBacking::LazyMemfd`]): guest RAM starts as an empty memfd,
//! registered with a userfaultfd; a loader thread fills each page from the memory file the first
//! time the guest, KVM or the VMM touches it. A restored VM then holds only the pages it has used
//! since the restore, and its RAM is still a memfd that vhost-user backends can map.
//!
//! A fault on a page the file holds data for is served with the data around it (up to
//! [`BLOCK`], within the same run of data pages), one on a hole with a zeroed page. Pages
//! already present (another mapping of the memfd wrote them first: virtiofsd writing a reply
//! into a buffer the guest never touched since the restore, which is no page the snapshot had
//! data in that anyone reads again) are left as they are. The loader reads the file with
//! `pread`, so holes in a tmpfs file stay holes. The RAM gets no transparent huge pages:
//! khugepaged's collapse of a shmem range fills its holes with zeros without a fault.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::SnapshotError;

const PAGE: usize = 4096;
/// The most a fault on a data page loads at once: fewer faults (each a VM exit), at the cost of
/// loading some pages the guest may not use.
pub(crate) const BLOCK: usize = 64 << 10;

/// The loader thread of one lazily restored VM; dropping it stops the thread. Drop it only after
/// the guest memory is unmapped, or when nothing touches it any more.
pub struct PageLoader {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for PageLoader {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            tracing::error!("cannot stop the page loader: {e}");
            return;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One guest RAM region as the loader sees it.
#[derive(Clone, Copy)]
struct Region {
    host: usize,
    len: usize,
    /// Where the region starts in the memory file.
    file_offset: u64,
}

/// What the loader thread owns.
struct Loader {
    uffd: Uffd,
    file: File,
    path: PathBuf,
    regions: Vec<Region>,
    /// The file's data ranges (offsets, sorted); the rest reads as zeros.
    data: Vec<(u64, u64)>,
    buf: Vec<u8>,
}

/// Registers `mem` (an empty memfd mapping) with a new userfaultfd and starts the thread that
/// fills it from `file` (the snapshot's memory file, laid out as [`super::memory`] writes it).
pub(super) fn start(
    mem: &GuestMemoryMmap,
    file: File,
    path: &Path,
    data: Vec<(u64, u64)>,
) -> Result<PageLoader, SnapshotError> {
    let uffd_err = |e: userfaultfd::Error| SnapshotError::Userfaultfd(e.to_string());
    // Not user-mode only: KVM's own accesses to guest pages (the vCPUs' faults) must be served.
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map_err(uffd_err)?;
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let host = region.as_ptr() as usize;
        let len = region.len() as usize;
        // khugepaged would collapse the memfd's pages into huge pages, filling the holes (pages
        // not loaded yet) with zeros behind the userfaultfd's back: seen in the test host as
        // guest kernel text reading as zeros. No huge pages for lazily loaded RAM.
        // SAFETY: madvise on the region's own mapping; MADV_NOHUGEPAGE changes no contents.
        if unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) } != 0 {
            return Err(SnapshotError::Userfaultfd(format!(
                "MADV_NOHUGEPAGE: {}",
                std::io::Error::last_os_error()
            )));
        }
        uffd.register(host as *mut libc::c_void, len)
            .map_err(uffd_err)?;
        regions.push(Region {
            host,
            len,
            file_offset,
        });
        file_offset += len as u64;
    }
    let stop = EventFd::new(libc::EFD_CLOEXEC).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let stop_for_thread = stop.try_clone().map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut loader = Loader {
        uffd,
        file,
        path: path.to_path_buf(),
        regions,
        data,
        buf: vec![0u8; BLOCK],
    };
    let thread = std::thread::Builder::new()
        .name("page-loader".into())
        .stack_size(256 << 10)
        .spawn(move || loader.run(&stop_for_thread))
        .map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(PageLoader {
        stop,
        thread: Some(thread),
    })
}

impl Loader {
    /// Serves faults until `stop` is written.
    fn run(&mut self, stop: &EventFd) {
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: two valid pollfds that live across the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("page loader: poll: {e}");
                    return;
                }
                continue;
            }
            if fds[1].revents != 0 {
                return;
            }
            loop {
                match self.uffd.read_event() {
                    Ok(Some(Event::Pagefault { addr, .. })) => self.serve(addr as usize),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!("page loader: reading a fault: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// Fills the page at `addr` (and, for data, the data pages around it), waking the faulting
    /// thread.
    fn serve(&mut self, addr: usize) {
        let page = addr & !(PAGE - 1);
        let Some(region) = self
            .regions
            .iter()
            .copied()
            .find(|r| (r.host..r.host + r.len).contains(&page))
        else {
            tracing::error!("page loader: a fault at {addr:#x}, outside guest memory");
            return;
        };
        let offset = region.file_offset + (page - region.host) as u64;
        let filled = match self.data_run(offset) {
            Some((run_start, run_end)) => {
                // The block around the page, inside the region and the run of data.
                let block = (page & !(BLOCK - 1)).max(region.host);
                let start = block.max(page.saturating_sub((offset - run_start) as usize));
                let region_end = region.host + region.len;
                let end = (block + BLOCK)
                    .min(region_end)
                    .min(page + (run_end - offset) as usize);
                self.copy(region, start, end)
            }
            // SAFETY: `page` is a page of a registered region of guest memory.
            None => unsafe { self.uffd.zeropage(page as *mut libc::c_void, PAGE, false) }
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = filled {
            // Most likely present already (another mapping of the memfd wrote it).
            tracing::debug!("page loader: {page:#x}: {e}");
        }
        // Woken once the whole block is in, whether this thread or another mapping filled it.
        if let Err(e) = self.uffd.wake(page as *mut libc::c_void, PAGE) {
            tracing::error!("page loader: cannot wake the fault at {page:#x}: {e}");
        }
    }

    /// Copies the file's bytes for guest pages `start..end` into place in one go, else page by
    /// page (some are present already), skipping present ones. Wakes no one.
    fn copy(&mut self, region: Region, start: usize, end: usize) -> Result<(), String> {
        let offset = region.file_offset + (start - region.host) as u64;
        let len = end - start;
        self.file
            .read_exact_at(&mut self.buf[..len], offset)
            .map_err(|e| format!("reading {}: {e}", self.path.display()))?;
        // SAFETY: `start..end` lies in a registered region of guest memory and the source is our
        // buffer of at least `len` bytes.
        let whole = unsafe {
            self.uffd.copy(
                self.buf.as_ptr().cast(),
                start as *mut libc::c_void,
                len,
                false,
            )
        };
        if matches!(whole, Ok(n) if n == len) {
            return Ok(());
        }
        for at in (start..end).step_by(PAGE) {
            let from = at - start;
            // SAFETY: as above, one page of each. A page present already fails with EEXIST.
            let _ = unsafe {
                self.uffd.copy(
                    self.buf[from..].as_ptr().cast(),
                    at as *mut libc::c_void,
                    PAGE,
                    false,
                )
            };
        }
        Err(format!("{start:#x}..{end:#x} in one go: {whole:?}"))
    }

    /// The data range of the file holding `offset`, if any.
    fn data_run(&self, offset: u64) -> Option<(u64, u64)> {
        let i = self.data.partition_point(|&(_, end)| end <= offset);
        self.data
            .get(i)
            .copied()
            .filter(|&(start, _)| start <= offset)
    }
}
