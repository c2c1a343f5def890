//! Fresh host entropy for the guest's random number generator, from `Hello.entropy`. A pod
//! restored from a template starts with the template's CRNG state, the same in every copy (no
//! VM generation ID device tells the kernel); the host's bytes, credited and followed by an
//! immediate reseed, give each copy its own random numbers before any container runs.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// The most bytes taken from one Hello (more adds nothing to a 256-bit CRNG key).
pub const MAX_BYTES: usize = 64;

nix::ioctl_write_ptr!(add_entropy, b'R', 0x03, [libc::c_int; 2]);
nix::ioctl_none!(reseed_crng, b'R', 0x07);

/// `struct rand_pool_info` with room for [`MAX_BYTES`].
#[repr(C)]
struct PoolInfo {
    entropy_bits: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_BYTES],
}

/// Mixes `bytes` (at most [`MAX_BYTES`] are used) into the input pool, credited in full, and
/// reseeds the CRNG from it at once.
pub fn add_and_reseed(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let bytes = &bytes[..bytes.len().min(MAX_BYTES)];
    let mut info = PoolInfo {
        entropy_bits: (bytes.len() * 8) as libc::c_int,
        buf_size: bytes.len() as libc::c_int,
        buf: [0; MAX_BYTES],
    };
    info.buf[..bytes.len()].copy_from_slice(bytes);
    let random = OpenOptions::new().write(true).open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info: two ints, then `buf_size` bytes, all inside
    // `info`, which outlives the call.
    unsafe { add_entropy(random.as_raw_fd(), std::ptr::addr_of!(info).cast()) }?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    unsafe { reseed_crng(random.as_raw_fd()) }?;
    Ok(())
}
