//! virtio-blk on a raw image file: read, write, flush (fdatasync), discard (punched holes),
//! GET_ID (the serial), and a read-only mode the guest sees as VIRTIO_BLK_F_RO. Data moves with
//! preadv/pwritev straight between the file and guest memory.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use event_manager::{EventOps, Events};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryMmap;

use crate::base::{from_base, DeviceBase, Wake};
use crate::device::{drain_queue, read_config_bytes, Malformed, Served, VirtioDevice};
use crate::iovec::{ChainBuffers, Segments};
use crate::persist::{DeviceState, PersistError};

const QUEUE_SIZE: u16 = 256;
const SECTOR: u64 = 512;
/// The most data segments one request may carry (advertised as seg_max).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The serial GET_ID returns is at most this long.
const ID_BYTES: usize = 20;
/// The most ranges one discard request may list.
const MAX_DISCARD_SEGMENTS: u32 = 32;

/// How to attach an image file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// The disk's serial (GET_ID, `/sys/block/vdX/serial`); at most 20 bytes are used.
    pub serial: Option<String>,
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a whole number of 512-byte sectors")]
    Unaligned { path: PathBuf, size: u64 },
    #[error("cannot create the device's eventfds: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A virtio block device.
pub struct Block {
    base: DeviceBase,
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
}

impl Block {
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?
            .len();
        if size % SECTOR != 0 {
            return Err(BlockError::Unaligned {
                path: config.path.clone(),
                size,
            });
        }
        let mut id = [0u8; ID_BYTES];
        if let Some(serial) = &config.serial {
            let n = serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        }
        Ok(Block {
            base: DeviceBase::new(vec![QUEUE_SIZE]).map_err(BlockError::EventFd)?,
            file,
            read_only: config.read_only,
            capacity_sectors: size / SECTOR,
            id,
        })
    }

    fn config_space(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        c[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c
    }

    fn serve(&mut self) {
        let Some(active) = self.base.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let disk = Disk {
            file: &self.file,
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
            id: &self.id,
        };
        drain_queue(&mut active.queues[0], mem, &active.interrupt, |chain| {
            let buffers = ChainBuffers::from_chain(chain)?;
            disk.serve(mem, buffers).map(Served::Used)
        });
    }
}

/// What a request needs of the device (borrowed apart from its queues).
struct Disk<'a> {
    file: &'a File,
    read_only: bool,
    capacity_sectors: u64,
    id: &'a [u8; ID_BYTES],
}

impl Disk<'_> {
    /// Serves one request; returns the bytes written to the guest (data plus status byte).
    fn serve(&self, mem: &GuestMemoryMmap, mut buffers: ChainBuffers) -> Result<u32, Malformed> {
        let header = buffers
            .readable
            .split_front(16)
            .ok_or_else(|| Malformed::new("block request shorter than its 16-byte header"))?;
        let mut raw = [0u8; 16];
        header.read_into(mem, &mut raw)?;
        let kind = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
        let status_seg = buffers
            .writable
            .split_back(1)
            .ok_or_else(|| Malformed::new("block request without a status byte"))?;
        let (status, written) = match self.execute(mem, kind, sector, &buffers) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(RequestFailed::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
            Err(RequestFailed::Io(e)) => {
                tracing::warn!("virtio-blk: request type {kind} at sector {sector}: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(RequestFailed::Malformed(m)) => return Err(m),
        };
        status_seg.write_from(mem, &[status as u8])?;
        Ok(written + 1)
    }

    fn execute(
        &self,
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        buffers: &ChainBuffers,
    ) -> Result<u32, RequestFailed> {
        match kind {
            VIRTIO_BLK_T_IN => {
                let data = &buffers.writable;
                self.check_range(sector, data.len())?;
                transfer(self.file, mem, data, sector * SECTOR, true)?;
                Ok(data.len() as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestFailed::Io(std::io::Error::from_raw_os_error(
                        libc::EROFS,
                    )));
                }
                let data = &buffers.readable;
                self.check_range(sector, data.len())?;
                transfer(self.file, mem, data, sector * SECTOR, false)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(RequestFailed::Io)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = buffers.writable.write_from(mem, self.id)?;
                Ok(n as u32)
            }
            VIRTIO_BLK_T_DISCARD if !self.read_only => {
                self.discard(mem, &buffers.readable)?;
                Ok(0)
            }
            _ => Err(RequestFailed::Unsupported),
        }
    }

    fn check_range(&self, sector: u64, len: u64) -> Result<(), RequestFailed> {
        if len % SECTOR != 0 {
            return Err(RequestFailed::Malformed(Malformed::new(format!(
                "data length {len} is not a multiple of 512"
            ))));
        }
        let end = sector.checked_add(len / SECTOR);
        if end.is_none_or(|end| end > self.capacity_sectors) {
            // Out of range is the driver's I/O error, not a broken device.
            return Err(RequestFailed::Io(std::io::Error::other(format!(
                "sectors {sector}+{} beyond the disk's {}",
                len / SECTOR,
                self.capacity_sectors
            ))));
        }
        Ok(())
    }

    fn discard(&self, mem: &GuestMemoryMmap, ranges: &Segments) -> Result<(), RequestFailed> {
        let len = ranges.len();
        if len % 16 != 0 || len / 16 > u64::from(MAX_DISCARD_SEGMENTS) {
            return Err(RequestFailed::Malformed(Malformed::new(format!(
                "discard payload of {len} bytes"
            ))));
        }
        let mut raw = vec![0u8; len as usize];
        ranges.read_into(mem, &mut raw)?;
        for range in raw.chunks_exact(16) {
            let sector = u64::from_le_bytes(range[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(range[8..12].try_into().expect("4 bytes"));
            self.check_range(sector, u64::from(sectors) * SECTOR)?;
            // SAFETY: fallocate on an fd this device owns; offsets are checked against the size.
            let ret = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (sector * SECTOR) as libc::off_t,
                    (u64::from(sectors) * SECTOR) as libc::off_t,
                )
            };
            if ret != 0 {
                return Err(RequestFailed::Io(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

enum RequestFailed {
    Unsupported,
    Io(std::io::Error),
    Malformed(Malformed),
}

impl From<Malformed> for RequestFailed {
    fn from(m: Malformed) -> Self {
        RequestFailed::Malformed(m)
    }
}

/// Moves `data` between guest memory and the file at `offset`, resuming after short transfers.
fn transfer(
    file: &File,
    mem: &GuestMemoryMmap,
    data: &Segments,
    mut offset: u64,
    read_from_file: bool,
) -> Result<(), RequestFailed> {
    let mut remaining = data.clone();
    while !remaining.is_empty() {
        let iovecs = remaining.iovecs(mem, read_from_file)?;
        let count = iovecs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the iovecs point into guest RAM checked for the needed access; the file
        // descriptor is owned by the device.
        let n = unsafe {
            if read_from_file {
                libc::preadv(
                    file.as_raw_fd(),
                    iovecs.as_ptr(),
                    count,
                    offset as libc::off_t,
                )
            } else {
                libc::pwritev(
                    file.as_raw_fd(),
                    iovecs.as_ptr(),
                    count,
                    offset as libc::off_t,
                )
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RequestFailed::Io(e));
        }
        if n == 0 {
            return Err(RequestFailed::Io(std::io::Error::from(
                std::io::ErrorKind::UnexpectedEof,
            )));
        }
        remaining.split_front(n as u64);
        offset += n as u64;
    }
    Ok(())
}

impl VirtioDevice for Block {
    from_base!(
        queue_max_sizes,
        queue_events,
        activate,
        reset,
        active_queues,
        init_events
    );

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut features = 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn save_state(&self) -> Result<DeviceState, PersistError> {
        Ok(DeviceState::Block {
            capacity_sectors: self.capacity_sectors,
        })
    }

    /// The image reopened must be as large as the one saved (the guest has its size, and its
    /// page cache may hold its blocks).
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Block { capacity_sectors }
                if *capacity_sectors == self.capacity_sectors =>
            {
                Ok(())
            }
            DeviceState::Block { capacity_sectors } => Err(PersistError::Mismatch(format!(
                "the disk image has {} sectors, the snapshot's had {capacity_sectors}",
                self.capacity_sectors
            ))),
            other => Err(PersistError::Mismatch(format!(
                "{other:?} for a block device"
            ))),
        }
    }

    fn process_event(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(Wake::Activated | Wake::Queue(_)) = self.base.wake(&events) {
            self.serve()
        }
    }
}
