//! The state file's bytes: a header that says what wrote the file and for which CPU, a SHA-256
//! that covers the header and the body, and the body, [`MicrovmState`] encoded with postcard.
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `CRXSNAP\0` |
//! | 4 | format version, little-endian (this code: [`FORMAT_VERSION`]) |
//! | 2 | length n of the CRX version, little-endian (at most 64) |
//! | n | the CRX version that wrote the file (UTF-8) |
//! | 1 | CPU template (0 host, 1 baseline) |
//! | 32 | CPU fingerprint ([`crate::arch::x86_64::cpuid::fingerprint`]) |
//! | 8 | body length, little-endian |
//! | 32 | SHA-256 of every byte above and of the body |
//! | … | body |
//!
//! Reading checks, in order, the magic, the format version, the CRX version (a file from another
//! version is refused before anything else in it is trusted), the lengths (truncation), the
//! checksum, then decodes the body; every failure is its own [`SnapshotError`]. The CPU is
//! checked against the host by the restore, which knows it.

use sha2::{Digest, Sha256};

use super::{MicrovmState, SnapshotError};
use crate::CpuTemplate;

pub const MAGIC: [u8; 8] = *b"CRXSNAP\0";
/// Raised whenever the header or [`MicrovmState`]'s encoding changes.
pub const FORMAT_VERSION: u32 = 1;
/// The CRX version written into state files; only files with this version are restored.
pub const CRX_VERSION: &str = env!("CARGO_PKG_VERSION");
const MAX_VERSION_LEN: usize = 64;

/// The CPU a snapshot's vCPU state was taken on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuIdentity {
    pub template: CpuTemplate,
    pub fingerprint: [u8; 32],
}

fn template_code(template: CpuTemplate) -> u8 {
    match template {
        CpuTemplate::Host => 0,
        CpuTemplate::Baseline => 1,
    }
}

/// The state file for `state`, taken on `cpu`.
pub fn encode(cpu: &CpuIdentity, state: &MicrovmState) -> Result<Vec<u8>, SnapshotError> {
    let body = postcard::to_stdvec(state).map_err(SnapshotError::Encode)?;
    let mut file = Vec::with_capacity(body.len() + 128);
    file.extend_from_slice(&MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(CRX_VERSION.len() as u16).to_le_bytes());
    file.extend_from_slice(CRX_VERSION.as_bytes());
    file.push(template_code(cpu.template));
    file.extend_from_slice(&cpu.fingerprint);
    file.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let checksum = Sha256::new()
        .chain_update(&file)
        .chain_update(&body)
        .finalize();
    file.extend_from_slice(&checksum);
    file.extend_from_slice(&body);
    Ok(file)
}

/// Reads fields off the front of the file, reporting truncation with the length needed.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self.at.saturating_add(n);
        let field = self
            .bytes
            .get(self.at..end)
            .ok_or(SnapshotError::Truncated {
                expected: end as u64,
                found: self.bytes.len() as u64,
            })?;
        self.at = end;
        Ok(field)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
}

/// The CPU identity and state in a state file, every check passed.
pub fn decode(bytes: &[u8]) -> Result<(CpuIdentity, MicrovmState), SnapshotError> {
    let mut r = Reader { bytes, at: 0 };
    if r.array::<8>()? != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let format_version = u32::from_le_bytes(r.array()?);
    if format_version != FORMAT_VERSION {
        return Err(SnapshotError::FormatVersion {
            found: format_version,
        });
    }
    let version_len = usize::from(u16::from_le_bytes(r.array()?));
    if version_len > MAX_VERSION_LEN {
        return Err(SnapshotError::Corrupt(format!(
            "a {version_len}-byte CRX version"
        )));
    }
    let crx_version = String::from_utf8_lossy(r.take(version_len)?).into_owned();
    if crx_version != CRX_VERSION {
        return Err(SnapshotError::CrxVersion { found: crx_version });
    }
    let template = r.array::<1>()?[0];
    let fingerprint = r.array::<32>()?;
    let body_len = u64::from_le_bytes(r.array()?);
    let covered = r.at;
    let checksum = r.array::<32>()?;
    let body_start = r.at;
    let expected = (body_start as u64).saturating_add(body_len);
    if (bytes.len() as u64) < expected {
        return Err(SnapshotError::Truncated {
            expected,
            found: bytes.len() as u64,
        });
    }
    if bytes.len() as u64 > expected {
        return Err(SnapshotError::Corrupt(format!(
            "{} bytes after the state",
            bytes.len() as u64 - expected
        )));
    }
    let body = &bytes[body_start..];
    let actual: [u8; 32] = Sha256::new()
        .chain_update(&bytes[..covered])
        .chain_update(body)
        .finalize()
        .into();
    if actual != checksum {
        return Err(SnapshotError::Checksum);
    }
    let template = match template {
        0 => CpuTemplate::Host,
        1 => CpuTemplate::Baseline,
        other => {
            return Err(SnapshotError::Corrupt(format!("CPU template code {other}")));
        }
    };
    let (state, rest) = postcard::take_from_bytes(body).map_err(SnapshotError::Decode)?;
    if !rest.is_empty() {
        return Err(SnapshotError::Corrupt(format!(
            "{} bytes after the encoded state",
            rest.len()
        )));
    }
    Ok((
        CpuIdentity {
            template,
            fingerprint,
        },
        state,
    ))
}
