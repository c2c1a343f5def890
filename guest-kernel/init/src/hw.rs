//! Hardware side of the protocol: the boot-timer/exit-register page at guest-physical
//! `0xc000_0000` (reached through `/dev/mem`), the 0x80 debug port, and powering off.

use std::ffi::CStr;
use std::ptr::NonNull;

/// Guest-physical address of Firecracker's boot-timer device, also CRX's exit register page.
pub const BOOT_TIMER_ADDR: u64 = 0xc000_0000;
/// Offset of the boot-timer byte in the page.
pub const BOOT_TIMER_OFFSET: usize = 0;
/// The magic value Firecracker's boot timer expects (a 1-byte write).
pub const BOOT_TIMER_VALUE: u8 = 123;
/// Offset of CRX's exit register (little-endian u32, the guest's exit status).
pub const EXIT_REGISTER_OFFSET: usize = 8;
/// Cloud Hypervisor's debug I/O port and the "userspace started" code it logs boot time for.
pub const DEBUG_PORT: u16 = 0x80;
pub const DEBUG_PORT_VALUE: u8 = 0x41;

const PAGE_SIZE: usize = 4096;

/// One page of guest-physical address space mapped uncached through `/dev/mem`.
pub struct PhysPage {
    base: NonNull<u8>,
}

impl PhysPage {
    /// Maps the page at `phys` (page-aligned); `None` if `/dev/mem` is missing or refuses.
    pub fn map(phys: u64) -> Option<PhysPage> {
        const DEV_MEM: &CStr = c"/dev/mem";
        // SAFETY: plain open(2) of a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                DEV_MEM.as_ptr(),
                libc::O_RDWR | libc::O_SYNC | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: a new shared mapping (no fixed address, so no existing memory is affected) of
        // one page of /dev/mem; the result is checked against MAP_FAILED.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                phys as libc::off_t,
            )
        };
        // SAFETY: fd is our own descriptor from open() above; the mapping outlives it.
        unsafe { libc::close(fd) };
        if addr == libc::MAP_FAILED {
            return None;
        }
        NonNull::new(addr.cast::<u8>()).map(|base| PhysPage { base })
    }

    /// One volatile byte write at `offset`.
    pub fn write_u8(&self, offset: usize, value: u8) {
        assert!(offset < PAGE_SIZE);
        // SAFETY: `base` maps PAGE_SIZE bytes for the lifetime of `self` and offset is in
        // bounds; volatile because it is device memory (the write is the side effect).
        unsafe { self.base.as_ptr().add(offset).write_volatile(value) };
    }

    /// One volatile, naturally aligned 4-byte little-endian write at `offset`.
    pub fn write_u32(&self, offset: usize, value: u32) {
        assert!(offset % 4 == 0 && offset + 4 <= PAGE_SIZE);
        // SAFETY: in bounds (checked above) of the PAGE_SIZE mapping, 4-byte aligned because
        // the page is page-aligned and offset is a multiple of 4; volatile for device memory.
        unsafe {
            self.base
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .write_volatile(value.to_le())
        };
    }
}

impl Drop for PhysPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it outlives self.
        unsafe { libc::munmap(self.base.as_ptr().cast(), PAGE_SIZE) };
    }
}

/// Writes `value` to the debug port 0x80; silently does nothing if ioperm() is refused
/// (kernel without X86_IOPL_IOPERM, or not running as root).
pub fn debug_port_write(value: u8) {
    // SAFETY: ioperm only changes this process's I/O permission bitmap; the result is checked.
    if unsafe { libc::ioperm(DEBUG_PORT.into(), 1, 1) } != 0 {
        return;
    }
    // SAFETY: ioperm() above granted access to exactly this port, so `out` cannot fault; port
    // 0x80 is the POST/debug port, writing it has no effect on memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") DEBUG_PORT, in("al") value,
            options(nomem, nostack, preserves_flags));
    }
    // SAFETY: drops the permission granted above.
    unsafe { libc::ioperm(DEBUG_PORT.into(), 1, 0) };
}

/// Flushes filesystems and resets the machine (`reboot=k` → i8042 reset → the VMM ends the
/// VM). Never returns: if reboot() fails or returns, waits forever.
pub fn power_off() -> ! {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) as PID 1 (CAP_SYS_BOOT); on success it does not return.
    let rc = unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    eprintln!(
        "crx-init: reboot failed ({}), halting here",
        if rc != 0 {
            std::io::Error::last_os_error().to_string()
        } else {
            "returned".into()
        }
    );
    loop {
        // SAFETY: pause(2) has no preconditions; it only waits for a signal.
        unsafe { libc::pause() };
    }
}
