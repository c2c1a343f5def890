//! virtio-blk requests (header, data, status; read, write, flush, discard, get-id) from
//! arbitrary descriptor chains, against a 1 MiB in-memory disk.
#![no_main]

use std::sync::OnceLock;

use crx_virtio::{BlockConfig, DeviceConfig};
use libfuzzer_sys::fuzz_target;

/// A memfd disk, opened afresh by each device through /proc/self/fd.
fn disk_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is kept for the process.
        let fd = unsafe { libc::memfd_create(c"crx-fuzz-disk".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a valid memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, 1 << 20) }, 0);
        format!("/proc/self/fd/{fd}")
    })
}

fuzz_target!(|data: &[u8]| {
    let read_only = data.first().is_some_and(|b| b & 0x80 != 0);
    let config = DeviceConfig::Block(BlockConfig {
        path: disk_path().into(),
        read_only,
        serial: Some("fuzz".into()),
    });
    let device = config.build().expect("block device");
    crx_fuzz::run(device, data);
});
