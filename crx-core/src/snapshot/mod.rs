//! Snapshots of a running microVM, and what a restore needs from them (the way Firecracker's
//! `persist` does it): [`crate::Vmm::pause`], [`crate::Vmm::snapshot`] and
//! [`crate::builder::restore_vm`].
//!
//! A snapshot is two files in one directory: the state file ([`STATE_FILE`], [`format`]:
//! versioned, checksummed, tied to a CPU) and guest RAM ([`MEMORY_FILE`], [`memory`]: raw and
//! sparse). The state ([`MicrovmState`]) covers, for a paused VM:
//! - every vCPU ([`VcpuState`]): registers, special registers, XSAVE, XCRs, debug registers,
//!   LAPIC, pending events, MP state, CPUID and every MSR of KVM_GET_MSR_INDEX_LIST the vCPU has;
//!   each saved on its own thread, parked at a clean point (no exit half-served);
//! - the VM ([`VmState`]): PIC master and slave, IOAPIC, PIT, kvmclock and the host's time;
//! - the legacy devices: the 8250's registers and FIFO; the i8042 and the guest status page (boot
//!   timer, exit register) have no state a guest can see;
//! - each virtio-mmio device ([`SavedDevice`]): its configuration (how to open its backend again)
//!   and `crx_virtio::persist` state (features, status, queue addresses and ring positions,
//!   interrupt status, and the device's own part: block checks its disk's size; vsock starts
//!   without connections and sends the guest a transport reset, as Firecracker does; net and rng
//!   have none). The device event loop is paused with the vCPUs, so no request is half-served.
//!
//! virtio-fs: only a device the guest has not mounted yet. From its first request on, its
//! state lives in virtiofsd (the inodes and open files the guest's FUSE session refers to),
//! which can neither save it nor take it back; before that, a new virtiofsd serving the rings
//! from their start is all a restored guest needs (a pod template is taken before any container
//! mounts its root). A privately mapped restore cannot share guest RAM with virtiofsd, so a VM
//! with virtio-fs is restored into a memfd ([`SnapshotError::VirtioFsNeedsMemfd`]), best one
//! filled lazily.
//!
//! Restoring ([`crate::builder::restore_vm`]) refuses a state file that is truncated, corrupt,
//! from another format or CRX version, or from a host whose CPU (as the snapshot's CPU template
//! presents it) differs: all before KVM is touched. Guest RAM is the memory file mapped
//! MAP_PRIVATE by default ([`MemoryBacking::Private`]): N VMs restored from one snapshot share its
//! clean pages in the page cache and copy only what each writes. That RAM is no memfd, so
//! virtio-fs's vhost-user backend could not map it; [`MemoryBacking::Memfd`] copies the file into
//! a fresh memfd instead (a full copy per VM, but shareable), and [`MemoryBacking::LazyMemfd`]
//! ([`lazy`]) fills a fresh memfd through userfaultfd as pages are first touched, so each VM
//! holds only what it used since the restore (an idle pod restored from a template: about a
//! quarter of a booted one). Per-VM settings may change where that is safe: each device's backend (the
//! vsock CID and socket path, the net tap and MAC, the block image, which must be the same size
//! and hold what the snapshot's did); vCPUs and memory are the snapshot's.
//!
//! Time: the restore moves kvmclock and every TSC forward by the wall-clock time since the
//! snapshot, so the guest's clocks read right (Firecracker sets kvmclock back to the saved value,
//! leaving the guest's clock behind by the time the snapshot waited), and flags the stop
//! (KVM_KVMCLOCK_CTRL) so the guest's watchdogs ignore it. Entropy: a restored guest's random
//! number generator starts from the snapshot's state, identical in every VM restored from it.
//! With a virtio-rng device the guest's hwrng thread mixes in fresh host entropy when its sleep
//! (at most a minute, over at once once the clock has jumped past it) ends, but nothing here
//! forces an immediate reseed: without ACPI the guest has no VM generation ID device, so that
//! is the guest agent's job after a restore (RNDADDENTROPY with host bytes, then RNDRESEEDCRNG).

pub mod format;
pub mod lazy;
pub mod memory;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crx_virtio::{
    BlockConfig, DeviceConfig, DeviceSnapshot, FsConfig, NetConfig, PersistError, VsockConfig,
};
use serde::{Deserialize, Serialize};

use crate::devices::legacy::SerialState;
pub use crate::vstate::vcpu::state::VcpuState;
pub use crate::vstate::vm::VmState;
pub use format::{CpuIdentity, CRX_VERSION, FORMAT_VERSION};
pub use memory::{MemoryBacking, RestoredMemory};

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "vmstate";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Everything a snapshot holds besides guest RAM.
#[derive(Clone, Serialize, Deserialize)]
pub struct MicrovmState {
    pub machine: MachineState,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    pub devices: Vec<SavedDevice>,
}

/// The VM's shape, fixed for every VM restored from the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    pub vcpus: u8,
    pub mem_mib: u32,
    /// The kernel command line the guest booted with (for information).
    pub cmdline: String,
}

/// A virtio device in a snapshot: how its backend was opened, and its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDevice {
    pub config: SavedDeviceConfig,
    pub state: DeviceSnapshot,
}

/// The configuration of a device that can be snapshotted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedDeviceConfig {
    Block(BlockConfig),
    Net(NetConfig),
    Rng,
    Vsock(VsockConfig),
    /// Only while the guest has not mounted it (see `crx_virtio::Fs`).
    Fs(FsConfig),
}

impl SavedDeviceConfig {
    /// The saved form of `config`.
    pub fn of(config: &DeviceConfig) -> SavedDeviceConfig {
        match config {
            DeviceConfig::Block(c) => SavedDeviceConfig::Block(c.clone()),
            DeviceConfig::Net(c) => SavedDeviceConfig::Net(c.clone()),
            DeviceConfig::Rng => SavedDeviceConfig::Rng,
            DeviceConfig::Vsock(c) => SavedDeviceConfig::Vsock(c.clone()),
            DeviceConfig::Fs(c) => SavedDeviceConfig::Fs(c.clone()),
        }
    }

    pub fn to_config(&self) -> DeviceConfig {
        match self {
            SavedDeviceConfig::Block(c) => DeviceConfig::Block(c.clone()),
            SavedDeviceConfig::Net(c) => DeviceConfig::Net(c.clone()),
            SavedDeviceConfig::Rng => DeviceConfig::Rng,
            SavedDeviceConfig::Vsock(c) => DeviceConfig::Vsock(c.clone()),
            SavedDeviceConfig::Fs(c) => DeviceConfig::Fs(c.clone()),
        }
    }

    /// The device kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            SavedDeviceConfig::Block(_) => "block",
            SavedDeviceConfig::Net(_) => "net",
            SavedDeviceConfig::Rng => "rng",
            SavedDeviceConfig::Vsock(_) => "vsock",
            SavedDeviceConfig::Fs(_) => "fs",
        }
    }
}

/// Where [`crate::Vmm::snapshot`] put a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFiles {
    pub state: PathBuf,
    pub memory: PathBuf,
    /// Bytes of guest RAM actually written (the rest of the memory file is holes).
    pub memory_bytes_written: u64,
}

/// Why a snapshot cannot be taken, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state file is truncated: {found} bytes where at least {expected} are needed")]
    Truncated { expected: u64, found: u64 },
    #[error("not a CRX snapshot state file (wrong magic)")]
    BadMagic,
    #[error("snapshot state format version {found}; this CRX reads only version {FORMAT_VERSION}")]
    FormatVersion { found: u32 },
    #[error("snapshot taken by CRX {found}; this is CRX {CRX_VERSION}, which restores only its own snapshots")]
    CrxVersion { found: String },
    #[error("the state file's checksum does not match: the file is corrupt")]
    Checksum,
    #[error("the state file is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot decode the saved state: {0}")]
    Decode(#[source] postcard::Error),
    #[error("cannot encode the state: {0}")]
    Encode(#[source] postcard::Error),
    #[error("the snapshot was taken on another CPU: its CPUID under the {template} template has fingerprint {saved}, this host's {here}; restoring it here could crash the guest")]
    CpuMismatch {
        template: crate::CpuTemplate,
        saved: String,
        here: String,
    },
    #[error("the guest's TSC ran at {saved} kHz, this host's runs at {here} kHz, and KVM cannot scale it: {source}")]
    TscFrequency {
        saved: u32,
        here: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the saved XSAVE state ({saved} extra words) does not fit this host's ({here})")]
    XsaveSize { saved: usize, here: usize },
    #[error("memory file {path} holds {found} bytes; the snapshot's guest has {expected}")]
    MemoryFileSize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("guest memory: {0}")]
    GuestMemory(String),
    #[error("the saved state does not fit: {0}")]
    Inconsistent(String),
    #[error("the VM is not paused (pause it before taking a snapshot)")]
    NotPaused,
    #[error("the VM has ended")]
    VmEnded,
    #[error("virtio-fs device {index} needs guest memory virtiofsd can map: restore it into a memfd copy, not the privately mapped memory file")]
    VirtioFsNeedsMemfd { index: usize },
    #[error("userfaultfd: {0}")]
    Userfaultfd(String),
    #[error("virtio device {index}: {source}")]
    Device {
        index: usize,
        #[source]
        source: PersistError,
    },
    #[error("device {index}: the snapshot has a {saved} device there, the restore gives a {given} device")]
    DeviceKind {
        index: usize,
        saved: &'static str,
        given: &'static str,
    },
    #[error("the snapshot has {saved} virtio devices, the restore gives {given}")]
    DeviceCount { saved: usize, given: usize },
    #[error("net device {index} was attached by file descriptor; give it its tap anew to restore")]
    TapByFd { index: usize },
}

/// A short hex form of a fingerprint, for messages.
pub(crate) fn short_hex(digest: &[u8; 32]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` with `.tmp` appended: where a snapshot file is written before it is renamed into place.
pub(crate) fn temporary_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Writes a state file (0600) under a temporary name and renames it into place once synced.
pub(crate) fn write_state_file(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let temporary = temporary_name(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}

/// Reads and checks a state file (see [`format::decode`]).
pub fn read_state_file(path: &Path) -> Result<(CpuIdentity, MicrovmState), SnapshotError> {
    let bytes = std::fs::read(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    format::decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuTemplate;
    use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};

    fn sample() -> MicrovmState {
        MicrovmState {
            machine: MachineState {
                vcpus: 1,
                mem_mib: 128,
                cmdline: "console=ttyS0".into(),
            },
            vm: VmState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip::default(),
                ioapic: kvm_irqchip {
                    chip_id: KVM_IRQCHIP_IOAPIC,
                    ..Default::default()
                },
                pit: Default::default(),
                clock_ns: 123_456_789,
                realtime_ns: 1,
            },
            vcpus: Vec::new(),
            serial: SerialState {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 2,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0x5a,
                in_buffer: b"typed".to_vec(),
            },
            devices: vec![SavedDevice {
                config: SavedDeviceConfig::Rng,
                state: DeviceSnapshot {
                    transport: crx_virtio::persist::TransportState {
                        device_type: 4,
                        queue_sel: 0,
                        device_features_sel: 1,
                        driver_features_sel: 1,
                        acked_features: 1 << 32,
                        status: 0xf,
                        config_generation: 0,
                        active: true,
                        interrupt_status: 1,
                        needs_reset: false,
                        queues: Vec::new(),
                    },
                    device: crx_virtio::persist::DeviceState::Rng,
                },
            }],
        }
    }

    fn cpu() -> CpuIdentity {
        CpuIdentity {
            template: CpuTemplate::Baseline,
            fingerprint: [0xab; 32],
        }
    }

    #[test]
    fn a_state_file_round_trips() {
        let bytes = format::encode(&cpu(), &sample()).unwrap();
        let (identity, state) = format::decode(&bytes).unwrap();
        assert_eq!(identity, cpu());
        assert_eq!(state.machine, sample().machine);
        assert_eq!(state.serial, sample().serial);
        assert_eq!(state.devices, sample().devices);
        assert_eq!(state.vm.clock_ns, 123_456_789);
        assert_eq!(state.vm.ioapic.chip_id, KVM_IRQCHIP_IOAPIC);
    }

    #[test]
    fn truncated_files_are_refused_at_every_length() {
        let bytes = format::encode(&cpu(), &sample()).unwrap();
        for len in 0..bytes.len() {
            assert!(
                matches!(
                    format::decode(&bytes[..len]),
                    Err(SnapshotError::Truncated { .. })
                ),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = format::encode(&cpu(), &sample()).unwrap();
        for at in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x40;
            let err = format::decode(&corrupt).err();
            assert!(
                matches!(
                    err,
                    Some(
                        SnapshotError::BadMagic
                            | SnapshotError::FormatVersion { .. }
                            | SnapshotError::CrxVersion { .. }
                            | SnapshotError::Corrupt(_)
                            | SnapshotError::Truncated { .. }
                            | SnapshotError::Checksum
                    )
                ),
                "byte {at}: {err:?}"
            );
        }
        let mut body = bytes.clone();
        *body.last_mut().unwrap() ^= 1;
        assert!(matches!(
            format::decode(&body),
            Err(SnapshotError::Checksum)
        ));
        let mut longer = bytes;
        longer.push(0);
        assert!(matches!(
            format::decode(&longer),
            Err(SnapshotError::Corrupt(_))
        ));
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        let bytes = format::encode(&cpu(), &sample()).unwrap();
        let mut format = bytes.clone();
        format[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(matches!(
            format::decode(&format),
            Err(SnapshotError::FormatVersion { found }) if found == FORMAT_VERSION + 1
        ));
        let mut version = bytes.clone();
        let at = 14 + CRX_VERSION.len() - 1;
        version[at] = if version[at] == b'9' { b'8' } else { b'9' };
        assert!(matches!(
            format::decode(&version),
            Err(SnapshotError::CrxVersion { .. })
        ));
        let mut magic = bytes;
        magic[0] = b'X';
        assert!(matches!(
            format::decode(&magic),
            Err(SnapshotError::BadMagic)
        ));
    }
}
