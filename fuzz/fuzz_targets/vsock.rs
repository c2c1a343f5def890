//! virtio-vsock packets (header and payload in any split of descriptors) from arbitrary
//! chains on the transmit queue, receive buffers on the receive queue, against a hybrid-vsock
//! muxer whose host side has one listening socket (host port 1024), so guest connection
//! requests to that port really connect and carry data.
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use crx_virtio::{DeviceConfig, VsockConfig};
use libfuzzer_sys::fuzz_target;

/// The device's socket path, and the listener at `<path>_1024` for the guest's connections.
fn host() -> &'static (PathBuf, UnixListener) {
    static SETUP: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("crx-fuzz-vsock-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("scratch directory");
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(dir.join("v.sock_1024")).expect("host listener");
        listener.set_nonblocking(true).expect("nonblocking listener");
        (uds, listener)
        })
}

fuzz_target!(|data: &[u8]| {
    let (uds_path, listener) = host();
    // Connections of earlier inputs are accepted and dropped so the backlog never fills.
    while listener.accept().is_ok() {}
    let config = DeviceConfig::Vsock(VsockConfig {
        guest_cid: 3,
        uds_path: uds_path.clone(),
    });
    crx_fuzz::run(config.build().expect("vsock device"), data);
});
