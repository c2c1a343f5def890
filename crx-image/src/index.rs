//! The image index (`images/<hex(name)>.json`, one record per image name) and leases
//! (`leases/<id>.json`), all written atomically (temp file, fsync, rename).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Digest, Error};

/// One layer of an image, in order from the base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the (possibly compressed) blob.
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Chain ID: names the unpacked rootfs up to and including this layer.
    pub chain_id: Digest,
}

/// A named image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Full reference it was pulled or imported as (`registry/repo:tag` or `…@sha256:…`).
    pub name: String,
    /// Digest of the linux/amd64 image manifest.
    pub manifest: Digest,
    /// Digest of the index it was selected from, when the reference named an index.
    pub index: Option<Digest>,
    pub config: Digest,
    pub layers: Vec<LayerRecord>,
    /// Unix seconds of the pull/import.
    pub stored_at: u64,
}

impl ImageRecord {
    /// Sum of the compressed layer sizes.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// Chain ID of the top layer: `layers/<hex>/rootfs` is the image's root filesystem.
    pub fn top_chain(&self) -> Option<&Digest> {
        self.layers.last().map(|l| &l.chain_id)
    }

    /// Every blob the image needs.
    pub(crate) fn blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.manifest, &self.config]
            .into_iter()
            .chain(self.index.iter())
            .chain(self.layers.iter().map(|l| &l.digest))
    }
}

/// A container's claim on an image: while it exists, the image cannot be removed and its
/// content is kept by GC. Persisted; release it explicitly with [`crate::Store::release`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    /// The image name as recorded in the index.
    pub image: String,
    pub manifest: Digest,
    pub chain_ids: Vec<Digest>,
    pub blobs: Vec<Digest>,
}

/// A directory of JSON documents keyed by file stem.
#[derive(Debug, Clone)]
pub(crate) struct JsonDir {
    dir: PathBuf,
}

impl JsonDir {
    pub(crate) fn new(dir: PathBuf) -> Self {
        JsonDir { dir }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    pub(crate) fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        let path = self.path(key);
        match fs::read(&path) {
            Ok(bytes) => parse(&path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io {
                op: "read",
                path,
                source: e,
            }),
        }
    }

    pub(crate) fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), Error> {
        let path = self.path(key);
        // Unique per writer: concurrent writers of one key, in this process or another, each
        // rename their own complete file into place; the last one wins.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".{key}.{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let bytes = serde_json::to_vec_pretty(value).expect("records serialize");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::Io {
                op: "write",
                path,
                source: e,
            }
        })
    }

    /// Remove `key`; whether it existed.
    pub(crate) fn remove(&self, key: &str) -> Result<bool, Error> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::Io {
                op: "remove",
                path,
                source: e,
            }),
        }
    }

    pub(crate) fn all<T: DeserializeOwned>(&self) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(Error::io("list", &self.dir))? {
            let path = entry.map_err(Error::io("list", &self.dir))?.path();
            let is_doc = path.extension().is_some_and(|e| e == "json")
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if is_doc {
                let bytes = fs::read(&path).map_err(Error::io("read", &path))?;
                out.push(parse(&path, &bytes)?);
            }
        }
        Ok(out)
    }
}

fn parse<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
        what: path.display().to_string(),
        reason: e.to_string(),
    })
}
