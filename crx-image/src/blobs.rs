//! The content-addressed blob store: `blobs/sha256/<hex>`, filled only through [`Ingest`],
//! which verifies size and digest before an atomic rename, and deduplicated across tasks and
//! processes by a per-digest lock.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};

use crate::lock::FileLock;
use crate::{Digest, Error, Progress};

const WRITE_BUF: usize = 1 << 20;

/// Whether [`Blobs::fetch`] transferred the blob or found it in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fetched {
    Downloaded,
    Present,
}

#[derive(Debug, Clone)]
pub(crate) struct Blobs {
    dir: PathBuf,
    ingest: PathBuf,
    locks: PathBuf,
}

impl Blobs {
    pub(crate) fn new(root: &Path) -> Self {
        Blobs {
            dir: root.join("blobs/sha256"),
            ingest: root.join("ingest"),
            locks: root.join("locks"),
        }
    }

    pub(crate) fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    /// The blob is committed with the expected size (its digest was verified on commit).
    pub(crate) fn contains(&self, d: &Digest, size: u64) -> bool {
        fs::metadata(self.path(d)).is_ok_and(|m| m.len() == size)
    }

    pub(crate) fn read(&self, d: &Digest) -> Result<Vec<u8>, Error> {
        let path = self.path(d);
        fs::read(&path).map_err(Error::io("read blob", path))
    }

    fn lock(&self, d: &Digest) -> PathBuf {
        self.locks.join(format!("blob-{}.lock", d.hex()))
    }

    /// Make blob `d` of `size` bytes present, downloading it with `open` unless it already is.
    /// Concurrent callers (any process) for one digest wait for the first; only it downloads.
    pub(crate) async fn fetch<S, F, Fut>(
        &self,
        d: &Digest,
        size: u64,
        progress: &dyn Progress,
        open: F,
    ) -> Result<Fetched, Error>
    where
        S: Stream<Item = Result<Bytes, Error>> + Unpin,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<S, Error>>,
    {
        if self.contains(d, size) {
            progress.finish(d.as_str(), false);
            return Ok(Fetched::Present);
        }
        let lock = FileLock::acquire_async(self.lock(d), true).await?;
        if self.contains(d, size) {
            progress.finish(d.as_str(), false);
            return Ok(Fetched::Present);
        }
        progress.start(d.as_str(), size);
        // Writing and hashing run on a blocking thread fed through a bounded channel. That
        // thread owns the lock and the partial file: if this future is dropped mid-transfer,
        // it still deletes the partial file before releasing the lock.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let ingest = Ingest::create(self, d, size)?;
        let writer = tokio::task::spawn_blocking(move || -> Result<(Ingest, FileLock), Error> {
            let mut ingest = ingest;
            while let Some(chunk) = rx.blocking_recv() {
                ingest.write(&chunk)?;
            }
            Ok((ingest, lock))
        });
        let transfer = async {
            let mut stream = open().await?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                progress.advance(d.as_str(), chunk.len() as u64);
                if tx.send(chunk).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Ok::<_, Error>(())
        };
        let transferred = transfer.await;
        drop(tx);
        let (ingest, lock) = writer.await??;
        transferred?; // dropping `ingest` on this path removes the partial file
        tokio::task::spawn_blocking(move || {
            let _lock = lock;
            ingest.commit()
        })
        .await??;
        progress.finish(d.as_str(), true);
        Ok(Fetched::Downloaded)
    }

    /// Store `bytes` as blob `d` (small blobs: manifests, configs).
    pub(crate) fn put(&self, d: &Digest, bytes: &[u8]) -> Result<(), Error> {
        self.put_reader(d, bytes.len() as u64, bytes)
    }

    /// Store the blob read from `reader`, verified against `d` and `size`.
    pub(crate) fn put_reader(
        &self,
        d: &Digest,
        size: u64,
        mut reader: impl Read,
    ) -> Result<(), Error> {
        if self.contains(d, size) {
            return Ok(());
        }
        let _lock = FileLock::acquire(&self.lock(d), true)?;
        if self.contains(d, size) {
            return Ok(());
        }
        let mut ingest = Ingest::create(self, d, size)?;
        let mut buf = vec![0; WRITE_BUF];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(Error::io("read", ingest.tmp.clone()))?;
            if n == 0 {
                break;
            }
            ingest.write(&buf[..n])?;
        }
        ingest.commit()
    }

    /// Remove ingest leftovers of killed processes. Callers hold the store lock exclusively.
    pub(crate) fn clean_ingest(&self) -> Result<(), Error> {
        for entry in fs::read_dir(&self.ingest).map_err(Error::io("list", &self.ingest))? {
            let path = entry.map_err(Error::io("list", &self.ingest))?.path();
            fs::remove_file(&path).map_err(Error::io("remove", path))?;
        }
        Ok(())
    }

    /// Every committed blob digest.
    pub(crate) fn list(&self) -> Result<Vec<Digest>, Error> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(Error::io("list", &self.dir))? {
            let name = entry.map_err(Error::io("list", &self.dir))?.file_name();
            if let Ok(d) = Digest::parse(&format!("sha256:{}", name.to_string_lossy())) {
                out.push(d);
            }
        }
        Ok(out)
    }
}

/// One blob being written to `ingest/<hex>.partial` while the per-digest lock is held.
/// Dropped without [`Ingest::commit`] (error, cancellation), it deletes the partial file.
pub(crate) struct Ingest {
    digest: Digest,
    size: u64,
    written: u64,
    hasher: Sha256,
    file: Option<BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl Ingest {
    fn create(blobs: &Blobs, digest: &Digest, size: u64) -> Result<Self, Error> {
        let tmp = blobs.ingest.join(format!("{}.partial", digest.hex()));
        let file = File::create(&tmp).map_err(Error::io("create", &tmp))?;
        Ok(Ingest {
            digest: digest.clone(),
            size,
            written: 0,
            hasher: Sha256::new(),
            file: Some(BufWriter::with_capacity(WRITE_BUF, file)),
            tmp,
            dest: blobs.path(digest),
        })
    }

    fn mismatch(&self, actual_digest: String) -> Error {
        Error::BlobMismatch {
            digest: self.digest.to_string(),
            expected_size: self.size,
            actual_size: self.written,
            actual_digest,
        }
    }

    fn write(&mut self, chunk: &[u8]) -> Result<(), Error> {
        self.written += chunk.len() as u64;
        if self.written > self.size {
            return Err(self.mismatch("(longer than announced)".into()));
        }
        self.hasher.update(chunk);
        let file = self.file.as_mut().expect("open until commit");
        file.write_all(chunk).map_err(Error::io("write", &self.tmp))
    }

    fn commit(mut self) -> Result<(), Error> {
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if actual != self.digest || self.written != self.size {
            return Err(self.mismatch(actual.to_string()));
        }
        let file = self.file.take().expect("open until commit");
        let file = file.into_inner().map_err(|e| Error::Io {
            op: "flush",
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(Error::io("sync", &self.tmp))?;
        fs::rename(&self.tmp, &self.dest).map_err(Error::io("commit", &self.dest))?;
        let dir = self.dest.parent().expect("blob paths have a parent");
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io("sync", dir))?;
        Ok(())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // After a commit the file was renamed away: NotFound is the normal case then.
        if let Err(e) = fs::remove_file(&self.tmp) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.tmp.display(), error = %e, "cannot remove partial blob");
            }
        }
    }
}
