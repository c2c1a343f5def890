//! virtio-rng requests from arbitrary descriptor chains.
#![no_main]

use crx_virtio::DeviceConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    crx_fuzz::run(DeviceConfig::Rng.build().expect("rng device"), data);
});
