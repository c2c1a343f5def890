//! virtio-mmio windows on the MMIO bus: the transport itself lives in crx-virtio.

use crx_virtio::MmioTransport;

use crate::devices::BusDevice;

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}
