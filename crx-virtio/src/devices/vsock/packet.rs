//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, 44 bytes, little endian): its
//! fields, the operations and flags the stream protocol uses, and the checks a header read from
//! the guest must pass before the device acts on it.

/// The size of the header in front of every packet.
pub const HEADER_LEN: usize = 44;
/// The largest payload one packet may carry (the Linux driver's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// The host's context ID.
pub const HOST_CID: u64 = 2;

/// `type`: a connection-oriented byte stream, the only socket type this device serves.
pub const TYPE_STREAM: u16 = 1;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// What a packet asks for (`op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    fn from_wire(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    fn to_wire(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }
}

/// A decoded header. `op` is kept raw so an unknown operation can still be answered with RST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub socket_type: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a header from the guest cannot be acted on as a request of the stream protocol.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("payload length {len} exceeds the {MAX_PAYLOAD}-byte maximum")]
    TooLong { len: u32 },
    #[error("payload length {len} exceeds the {available} bytes the chain carries")]
    Truncated { len: u32, available: u64 },
}

impl Header {
    /// A header the host sends: its source is the host (`local_port`), its destination the guest.
    pub fn to_guest(guest_cid: u64, local_port: u32, peer_port: u32, op: Op) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            len: 0,
            socket_type: TYPE_STREAM,
            op: op.to_wire(),
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// Decodes the wire format.
    pub fn decode(raw: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
        let u16_at = |at: usize| u16::from_le_bytes(raw[at..at + 2].try_into().expect("2 bytes"));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            socket_type: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire format.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut raw = [0u8; HEADER_LEN];
        raw[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        raw[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        raw[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        raw[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        raw[24..28].copy_from_slice(&self.len.to_le_bytes());
        raw[28..30].copy_from_slice(&self.socket_type.to_le_bytes());
        raw[30..32].copy_from_slice(&self.op.to_le_bytes());
        raw[32..36].copy_from_slice(&self.flags.to_le_bytes());
        raw[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        raw[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        raw
    }

    /// The operation, if it is one the protocol defines.
    pub fn operation(&self) -> Option<Op> {
        Op::from_wire(self.op)
    }

    /// Checks the payload length against the protocol maximum and against the `available` bytes
    /// the chain carries after the header.
    pub fn check_len(&self, available: u64) -> Result<(), HeaderError> {
        if self.len > MAX_PAYLOAD {
            return Err(HeaderError::TooLong { len: self.len });
        }
        if u64::from(self.len) > available {
            return Err(HeaderError::Truncated {
                len: self.len,
                available,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes_every_field_at_its_offset() {
        let header = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 5000,
            len: 100,
            socket_type: TYPE_STREAM,
            op: Op::Rw.to_wire(),
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0xdead_beef,
        };
        let raw = header.encode();
        assert_eq!(raw[0], 3);
        assert_eq!(raw[8], 2);
        assert_eq!(&raw[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&raw[24..28], &100u32.to_le_bytes());
        assert_eq!(&raw[30..32], &5u16.to_le_bytes());
        assert_eq!(&raw[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(Header::decode(&raw), header);
        assert_eq!(header.operation(), Some(Op::Rw));
    }

    #[test]
    fn unknown_operations_decode_as_none() {
        let mut header = Header::to_guest(3, 1, 2, Op::Rst);
        assert_eq!(header.operation(), Some(Op::Rst));
        header.op = 0;
        assert_eq!(header.operation(), None);
        header.op = 8;
        assert_eq!(header.operation(), None);
    }

    #[test]
    fn payload_lengths_are_checked_against_the_maximum_and_the_chain() {
        let mut header = Header::to_guest(3, 1, 2, Op::Rw);
        header.len = 4096;
        assert_eq!(header.check_len(4096), Ok(()));
        assert_eq!(
            header.check_len(4095),
            Err(HeaderError::Truncated {
                len: 4096,
                available: 4095
            })
        );
        header.len = MAX_PAYLOAD + 1;
        assert_eq!(
            header.check_len(u64::from(u32::MAX)),
            Err(HeaderError::TooLong {
                len: MAX_PAYLOAD + 1
            })
        );
    }
}
