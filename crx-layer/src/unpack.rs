//! Applying one layer blob onto a root directory: decompression sniffing, DiffID hashing, and
//! the per-entry rules (whiteouts, files, dirs, links, devices, metadata).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    chmodat, chownat, linkat, makedev, mkdirat, mknodat, openat, symlinkat, utimensat, AtFlags,
    FileType, Gid, Mode, OFlags, Timespec, Uid, CWD,
};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::fsops::{self, apply_meta_fd, lookup_error, open_dir_beneath, remove_all_at, Meta};
use crate::path::{normalize, split};
use crate::LayerError;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const BUF_SIZE: usize = 256 * 1024;

/// How much the unpacker may do.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Set ownership, create device nodes and write non-`user.` xattrs. Defaults to whether the
    /// process runs as root; without it, directories also keep owner rwx so later entries fit.
    pub privileged: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            privileged: rustix::process::geteuid().is_root(),
        }
    }
}

/// What [`unpack_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// `sha256:<hex>` of the uncompressed tar stream (the OCI DiffID).
    pub diff_id: String,
    /// Tar entries applied (whiteouts included, skipped device nodes excluded).
    pub entries: u64,
}

/// Apply the layer blob read from `blob` (tar, gzip or zstd, detected from its first bytes)
/// onto the existing directory `root`.
///
/// Whiteouts remove what lower layers left in `root`; entries of this same layer are never
/// hidden by its own whiteouts. On error, `root` may hold part of the layer (callers unpack
/// into a scratch directory they discard), but nothing outside `root` has been touched.
pub fn unpack_layer(
    blob: impl Read,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<Unpacked, LayerError> {
    let root_fd = openat(
        CWD,
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::io("open root", root, e))?;
    let mut input = BufReader::with_capacity(BUF_SIZE, blob);
    let head = input.fill_buf().map_err(LayerError::Read)?;
    let decoded: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(input))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(input).map_err(LayerError::Read)?)
    } else {
        Box::new(input)
    };
    let mut tar_stream = HashingReader {
        inner: decoded,
        hasher: Sha256::new(),
    };
    let mut applier = Applier {
        root: root_fd,
        privileged: opts.privileged,
        created: HashSet::new(),
        dir_times: Vec::new(),
        entries: 0,
        buf: vec![0; BUF_SIZE],
    };
    {
        let mut archive = tar::Archive::new(&mut tar_stream);
        for entry in archive.entries().map_err(LayerError::Read)? {
            applier.apply(entry.map_err(LayerError::Read)?)?;
        }
    }
    // The DiffID covers the whole tar stream, including the end-of-archive padding.
    io::copy(&mut tar_stream, &mut io::sink()).map_err(LayerError::Read)?;
    applier.finish_dir_times()?;
    Ok(Unpacked {
        diff_id: format!("sha256:{:x}", tar_stream.hasher.finalize()),
        entries: applier.entries,
    })
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct Applier {
    root: OwnedFd,
    privileged: bool,
    /// Paths written by this layer: its own whiteouts must not remove them.
    created: HashSet<PathBuf>,
    /// Directory mtimes, set last because creating children changes them.
    dir_times: Vec<(PathBuf, Timespec)>,
    entries: u64,
    buf: Vec<u8>,
}

impl Applier {
    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), LayerError> {
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let Some(rel) = normalize(&raw)? else {
            return Ok(());
        };
        let (parent, name) = split(&rel);
        let name = name.to_owned();

        if name.as_bytes().starts_with(WHITEOUT_PREFIX) {
            self.entries += 1;
            return self.whiteout(&rel, parent, &name);
        }

        let meta = self.meta(&mut entry, &rel)?;
        let parent_fd = self.ensure_parent(&rel, parent)?;
        let dir = parent_fd.as_fd();
        let io_err = |op, e: io::Error| LayerError::io(op, &rel, e);
        match kind {
            EntryType::Directory => {
                match fsops::lstat_at(dir, &name).map_err(|e| io_err("stat", e))? {
                    Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    existing => {
                        if existing.is_some() {
                            remove_all_at(dir, &name).map_err(|e| io_err("replace", e))?;
                        }
                        mkdirat(dir, &name, Mode::from_raw_mode(0o700))
                            .map_err(|e| io_err("mkdir", e.into()))?;
                    }
                }
                let fd = openat(
                    dir,
                    &name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err("open dir", e.into()))?;
                let mut meta = meta;
                if !self.privileged {
                    meta.mode |= 0o700;
                }
                apply_meta_fd(fd.as_fd(), &meta, self.privileged, true)
                    .map_err(|e| io_err("set metadata", e))?;
                self.dir_times.push((rel.clone(), meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous => {
                remove_all_at(dir, &name).map_err(|e| io_err("replace", e))?;
                let fd = openat(
                    dir,
                    &name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io_err("create", e.into()))?;
                let mut file = File::from(fd);
                loop {
                    let n = entry.read(&mut self.buf).map_err(LayerError::Read)?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&self.buf[..n])
                        .map_err(|e| io_err("write", e))?;
                }
                apply_meta_fd(file.as_fd(), &meta, self.privileged, false)
                    .map_err(|e| io_err("set metadata", e))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| LayerError::InvalidEntry {
                        path: rel.display().to_string(),
                        reason: "symlink without target".into(),
                    })?
                    .into_owned();
                remove_all_at(dir, &name).map_err(|e| io_err("replace", e))?;
                symlinkat(OsStr::from_bytes(&target), dir, &name)
                    .map_err(|e| io_err("symlink", e.into()))?;
                self.finish_node(dir, &name, &meta, &rel, false)?;
            }
            EntryType::Link => {
                let raw_target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = normalize(&raw_target)?.ok_or_else(|| LayerError::InvalidEntry {
                    path: rel.display().to_string(),
                    reason: "hard link to the root directory".into(),
                })?;
                if target != rel {
                    let (tparent, tname) = split(&target);
                    let tdir = open_dir_beneath(self.root.as_fd(), tparent, OFlags::PATH)
                        .map_err(|e| lookup_error(&target, e))?;
                    remove_all_at(dir, &name).map_err(|e| io_err("replace", e))?;
                    // Flags 0: a symlink target is linked itself, never followed.
                    linkat(tdir.as_fd(), tname, dir, &name, AtFlags::empty())
                        .map_err(|e| io_err("hard link", e.into()))?;
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let file_type = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                if file_type != FileType::Fifo && !self.privileged {
                    tracing::debug!(path = %rel.display(), "not root: skipping device node");
                    return Ok(());
                }
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                remove_all_at(dir, &name).map_err(|e| io_err("replace", e))?;
                mknodat(
                    dir,
                    &name,
                    file_type,
                    Mode::from_raw_mode(0o600),
                    makedev(major, minor),
                )
                .map_err(|e| io_err("mknod", e.into()))?;
                self.finish_node(dir, &name, &meta, &rel, true)?;
            }
            other => {
                tracing::warn!(path = %rel.display(), kind = ?other, "unsupported tar entry type, skipping");
                return Ok(());
            }
        }
        self.entries += 1;
        self.created.insert(rel);
        Ok(())
    }

    /// Owner, mode (not for symlinks) and times of a node that cannot be opened safely
    /// (symlink, device, fifo), by name relative to its parent without following it.
    fn finish_node(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        meta: &Meta,
        rel: &Path,
        chmod: bool,
    ) -> Result<(), LayerError> {
        let err = |op, e: Errno| LayerError::io(op, rel, e);
        if self.privileged {
            chownat(
                dir,
                name,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| err("chown", e))?;
        }
        if chmod {
            chmodat(
                dir,
                name,
                Mode::from_raw_mode(meta.mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(|e| err("chmod", e))?;
        }
        utimensat(dir, name, &meta.timestamps(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| err("set times", e))
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, rel: &Path) -> Result<Meta, LayerError> {
        let header = entry.header();
        let bad = |what: &str, e: io::Error| LayerError::InvalidEntry {
            path: rel.display().to_string(),
            reason: format!("{what}: {e}"),
        };
        let mut meta = Meta {
            mode: header.mode().map_err(|e| bad("mode", e))?,
            uid: header.uid().map_err(|e| bad("uid", e))? as u32,
            gid: header.gid().map_err(|e| bad("gid", e))? as u32,
            mtime: Timespec {
                tv_sec: header.mtime().map_err(|e| bad("mtime", e))? as i64,
                tv_nsec: 0,
            },
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry.pax_extensions().map_err(LayerError::Read)? {
            for ext in exts {
                let ext = ext.map_err(LayerError::Read)?;
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    meta.xattrs
                        .push((name.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
        Ok(meta)
    }

    /// The parent directory of an entry, creating missing ones (0755, root-owned) as tar
    /// archives may omit directory entries. Never follows a symlink out of the root.
    fn ensure_parent(&self, rel: &Path, parent: &Path) -> Result<OwnedFd, LayerError> {
        match open_dir_beneath(self.root.as_fd(), parent, OFlags::PATH) {
            Err(Errno::NOENT) => {}
            other => return other.map_err(|e| lookup_error(rel, e)),
        }
        let mut prefix = PathBuf::new();
        let mut dir = open_dir_beneath(self.root.as_fd(), &prefix, OFlags::PATH)
            .map_err(|e| lookup_error(rel, e))?;
        for comp in parent.iter() {
            match mkdirat(dir.as_fd(), comp, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(LayerError::io("mkdir", prefix.join(comp), e)),
            }
            prefix.push(comp);
            dir = open_dir_beneath(self.root.as_fd(), &prefix, OFlags::PATH)
                .map_err(|e| lookup_error(rel, e))?;
        }
        Ok(dir)
    }

    fn whiteout(&mut self, rel: &Path, parent: &Path, name: &OsStr) -> Result<(), LayerError> {
        let dir = match open_dir_beneath(self.root.as_fd(), parent, OFlags::RDONLY) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(lookup_error(rel, e)),
        };
        let io_err = |e: io::Error| LayerError::io("whiteout", rel, e);
        if name.as_bytes() == OPAQUE_MARKER {
            return self.prune_lower(dir.as_fd(), parent).map_err(io_err);
        }
        let target = &name.as_bytes()[WHITEOUT_PREFIX.len()..];
        if target.starts_with(WHITEOUT_PREFIX) {
            // Other AUFS metadata (`.wh..wh.plnk`, ...) has no meaning for OCI layers.
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(LayerError::InvalidEntry {
                path: rel.display().to_string(),
                reason: "whiteout without a target name".into(),
            });
        }
        let target = OsStr::from_bytes(target);
        if !self.created.contains(&parent.join(target)) {
            remove_all_at(dir.as_fd(), target).map_err(io_err)?;
        }
        Ok(())
    }

    /// Opaque directory: remove everything below `dir` (at `rel`) that this layer did not write,
    /// descending into this layer's own directories, which may have kept lower-layer content.
    fn prune_lower(&self, dir: BorrowedFd<'_>, rel: &Path) -> io::Result<()> {
        for child in fsops::dir_entries(dir)? {
            let child_rel = rel.join(&child);
            if !self.created.contains(&child_rel) {
                remove_all_at(dir, &child)?;
            } else if fsops::lstat_at(dir, &child)?
                .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
            {
                let sub = openat(
                    dir,
                    &child,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                self.prune_lower(sub.as_fd(), &child_rel)?;
            }
        }
        Ok(())
    }

    fn finish_dir_times(&self) -> Result<(), LayerError> {
        for (rel, mtime) in self.dir_times.iter().rev() {
            let fd =
                match open_dir_beneath(self.root.as_fd(), rel, OFlags::RDONLY | OFlags::NOFOLLOW) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => continue, // replaced later in the layer
                    Err(e) => return Err(LayerError::io("open dir", rel, e)),
                };
            let times = rustix::fs::Timestamps {
                last_access: *mtime,
                last_modification: *mtime,
            };
            rustix::fs::futimens(&fd, &times).map_err(|e| LayerError::io("set times", rel, e))?;
        }
        Ok(())
    }
}
