//! virtio-net transmit and receive chains from arbitrary descriptors, on a real (link-down) tap:
//! frames the guest sends are written to it, receive buffers are parsed and wait for frames.
#![no_main]

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

use crx_virtio::devices::tap::Tap;
use crx_virtio::{DeviceConfig, NetConfig, TapSource};
use libfuzzer_sys::fuzz_target;

fn tap() -> &'static OwnedFd {
    static TAP: OnceLock<OwnedFd> = OnceLock::new();
    TAP.get_or_init(|| {
        Tap::open(&format!("crxfuzz{}", std::process::id() % 100_000))
            .expect("a tap (needs root and /dev/net/tun)")
            .into()
    })
}

fuzz_target!(|data: &[u8]| {
    let config = DeviceConfig::Net(NetConfig {
        tap: TapSource::Fd(tap().as_raw_fd()),
        mac: [2, 0, 0, 0, 0, 1],
    });
    crx_fuzz::run(config.build().expect("net device"), data);
});
