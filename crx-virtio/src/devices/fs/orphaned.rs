//! The queues of a virtio-fs device whose virtiofsd died: the device takes them back and answers
//! every request, those virtiofsd left unanswered and every later one, with a FUSE error
//! (ENOTCONN), so the guest's file operations fail instead of waiting forever (a FUSE request
//! the guest has sent can not even be killed).
//!
//! Which requests were in flight is exact because virtiofsd runs without a thread pool: it
//! answers each queue's requests in ring order, so the ones it took but never answered are the
//! available-ring entries from its last used index on.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::device::{Chain, Interrupt};
use crate::iovec::ChainBuffers;

/// `struct fuse_in_header`: len, opcode, unique, nodeid, uid, gid, pid, padding.
const IN_HEADER_LEN: usize = 40;
const IN_HEADER_UNIQUE: std::ops::Range<usize> = 8..16;
/// `struct fuse_out_header`: len, error, unique.
const OUT_HEADER_LEN: usize = 16;

/// Why a queue could not be taken over.
#[derive(Debug, thiserror::Error)]
#[error("virtio-fs queue {queue}: {source}")]
pub struct TakeOverError {
    queue: usize,
    #[source]
    source: virtio_queue::Error,
}

/// Resumes each queue where virtiofsd last returned a chain. Returns how many requests the
/// driver had made available that virtiofsd never answered.
pub fn take_over(queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<u32, TakeOverError> {
    let mut unanswered = 0;
    for (index, queue) in queues.iter_mut().enumerate() {
        let error = |source| TakeOverError {
            queue: index,
            source,
        };
        let used = queue.used_idx(mem, Ordering::Acquire).map_err(error)?;
        let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(error)?;
        unanswered += u32::from((avail - used).0);
        queue.set_next_avail(used.0);
        queue.set_next_used(used.0);
    }
    Ok(unanswered)
}

/// Answers every available request of `queue` with ENOTCONN. Returns false if the queue broke.
pub fn fail_requests(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) -> bool {
    let mut used_any = false;
    let result = (|| -> Result<(), virtio_queue::Error> {
        loop {
            queue.disable_notification(mem)?;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let written = answer_not_connected(mem, chain);
                queue.add_used(mem, head, written)?;
                used_any = true;
            }
            if !queue.enable_notification(mem)? {
                return Ok(());
            }
        }
    })();
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("virtio-fs: cannot fail the requests of an orphaned queue: {e}");
            false
        }
    }
}

/// Writes a FUSE reply header carrying -ENOTCONN; returns the bytes written. Requests without
/// room for a reply (FORGET on the high-priority queue) are returned with nothing written.
fn answer_not_connected(mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
    let buffers = match ChainBuffers::from_chain(chain) {
        Ok(buffers) => buffers,
        Err(e) => {
            tracing::debug!("virtio-fs: orphaned request: {e}");
            return 0;
        }
    };
    if buffers.writable.len() < OUT_HEADER_LEN as u64 {
        return 0;
    }
    let mut in_header = [0u8; IN_HEADER_LEN];
    if buffers.readable.len() >= IN_HEADER_LEN as u64 {
        let _ = buffers.readable.read_into(mem, &mut in_header);
    }
    let mut out_header = [0u8; OUT_HEADER_LEN];
    out_header[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    out_header[4..8].copy_from_slice(&(-libc::ENOTCONN).to_le_bytes());
    out_header[8..16].copy_from_slice(&in_header[IN_HEADER_UNIQUE]);
    match buffers.writable.write_from(mem, &out_header) {
        Ok(n) => n as u32,
        Err(e) => {
            tracing::debug!("virtio-fs: orphaned request: {e}");
            0
        }
    }
}
