//! A Linux tap device opened for virtio-net: by name through /dev/net/tun, or adopted from an fd
//! a caller opened (a CNI plugin's, say). Either way it carries the 12-byte virtio-net header
//! (IFF_VNET_HDR with TUNSETVNETHDRSZ), so frames go between the tap and guest memory unchanged.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// Offloads the tap may hand the guest (TUNSETOFFLOAD bits).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// The virtio-net header the tap reads and writes (virtio_net_hdr_v1).
pub const VNET_HDR_LEN: usize = 12;

/// Why a tap device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    #[error("cannot attach tap {name}: {source}")]
    Attach {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fd {fd} is not a tap with IFF_VNET_HDR and IFF_NO_PI (flags {flags:#x})")]
    NotVnetTap { fd: RawFd, flags: libc::c_short },
    #[error("tap ioctl {what}: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open, non-blocking tap carrying virtio-net headers.
pub struct Tap {
    file: File,
}

impl Tap {
    /// Opens (creating if needed) the tap named `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::Name(name.to_string()));
        }
        // SAFETY: open takes a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::OpenTun(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just opened and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads an ifreq, which `req` is, on the tun fd.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Tap::finish(file)
    }

    /// Adopts a tap fd opened by someone else (it must have IFF_VNET_HDR and IFF_NO_PI).
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let file = File::from(fd);
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes an ifreq into `req`.
        if unsafe { libc::ioctl(raw, TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::Ioctl {
                what: "TUNGETIFF",
                source: std::io::Error::last_os_error(),
            });
        }
        let wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & wanted != wanted {
            return Err(TapError::NotVnetTap {
                fd: raw,
                flags: req.flags,
            });
        }
        // SAFETY: F_GETFL/F_SETFL on an owned fd.
        unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Tap::finish(file)
    }

    fn finish(file: File) -> Result<Tap, TapError> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(TapError::Ioctl {
                what: "TUNSETVNETHDRSZ",
                source: std::io::Error::last_os_error(),
            });
        }
        let tap = Tap { file };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Tells the tap which offloads the guest accepts (TUN_F_* bits).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(TapError::Ioctl {
                what: "TUNSETOFFLOAD",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (header first) into `iovecs`.
    pub fn readv(&self, iovecs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller's iovecs point at writable memory of their stated lengths.
        byte_count(unsafe {
            libc::readv(
                self.file.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        })
    }

    /// Writes one frame (header first) from `iovecs`.
    pub fn writev(&self, iovecs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller's iovecs point at readable memory of their stated lengths.
        byte_count(unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        })
    }
}

/// A readv/writev return value: the byte count, or the error errno names.
fn byte_count(n: isize) -> std::io::Result<usize> {
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

impl From<Tap> for OwnedFd {
    fn from(tap: Tap) -> OwnedFd {
        tap.file.into()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
