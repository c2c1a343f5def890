//! The layer store: `layers/<chain-hex>/rootfs` is the flattened filesystem of a layer chain,
//! built once per chain ID by hard-link cloning the parent chain and applying the layer blob
//! with `crx-layer`; `meta.json` is written last and the directory renamed into place, so a
//! chain directory that exists is complete.

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::blobs::Blobs;
use crate::lock::FileLock;
use crate::{Digest, Error, LayerRecord};

#[derive(Debug, Serialize, Deserialize)]
struct ChainMeta {
    chain_id: Digest,
    parent: Option<Digest>,
    diff_id: Digest,
    blob: Digest,
}

#[derive(Debug, Clone)]
pub(crate) struct Layers {
    dir: PathBuf,
    locks: PathBuf,
}

impl Layers {
    pub(crate) fn new(root: &Path) -> Self {
        Layers {
            dir: root.join("layers"),
            locks: root.join("locks"),
        }
    }

    pub(crate) fn chain_dir(&self, chain: &Digest) -> PathBuf {
        self.dir.join(chain.hex())
    }

    pub(crate) fn rootfs(&self, chain: &Digest) -> PathBuf {
        self.chain_dir(chain).join("rootfs")
    }

    fn is_complete(&self, chain: &Digest) -> bool {
        self.chain_dir(chain).join("meta.json").is_file()
    }

    /// Make `layers[index]`'s chain present; its parent chain must already be. Blocking.
    pub(crate) fn ensure(
        &self,
        blobs: &Blobs,
        layers: &[LayerRecord],
        index: usize,
    ) -> Result<(), Error> {
        let layer = &layers[index];
        let chain = &layer.chain_id;
        if self.is_complete(chain) {
            return Ok(());
        }
        let _lock = FileLock::acquire(
            &self.locks.join(format!("layer-{}.lock", chain.hex())),
            true,
        )?;
        if self.is_complete(chain) {
            return Ok(());
        }
        let parent = index.checked_sub(1).map(|i| &layers[i].chain_id);
        let tmp = self.dir.join(format!(".tmp-{}", chain.hex()));
        remove_tree(&tmp)?; // a crashed earlier attempt; we hold the chain's lock
        let result = self.build(blobs, layer, parent, &tmp);
        if result.is_err() {
            remove_tree(&tmp)?;
        }
        result
    }

    fn build(
        &self,
        blobs: &Blobs,
        layer: &LayerRecord,
        parent: Option<&Digest>,
        tmp: &Path,
    ) -> Result<(), Error> {
        let started = std::time::Instant::now();
        fs::create_dir(tmp).map_err(Error::io("mkdir", tmp))?;
        let rootfs = tmp.join("rootfs");
        let layer_err = |source| Error::Layer {
            blob: layer.digest.to_string(),
            source,
        };
        match parent {
            Some(p) => crx_layer::clone_tree(&self.rootfs(p), &rootfs).map_err(layer_err)?,
            None => fs::create_dir(&rootfs).map_err(Error::io("mkdir", &rootfs))?,
        }
        let blob_path = blobs.path(&layer.digest);
        let blob = File::open(&blob_path).map_err(Error::io("open blob", &blob_path))?;
        let unpacked = crx_layer::unpack_layer(BufReader::new(blob), &rootfs, &Default::default())
            .map_err(layer_err)?;
        if unpacked.diff_id != layer.diff_id.as_str() {
            return Err(Error::DiffIdMismatch {
                blob: layer.digest.to_string(),
                expected: layer.diff_id.to_string(),
                actual: unpacked.diff_id,
            });
        }
        let meta = ChainMeta {
            chain_id: layer.chain_id.clone(),
            parent: parent.cloned(),
            diff_id: layer.diff_id.clone(),
            blob: layer.digest.clone(),
        };
        let meta_path = tmp.join("meta.json");
        fs::write(
            &meta_path,
            serde_json::to_vec_pretty(&meta).expect("meta serializes"),
        )
        .map_err(Error::io("write", &meta_path))?;
        let dest = self.chain_dir(&layer.chain_id);
        fs::rename(tmp, &dest).map_err(Error::io("commit layer", &dest))?;
        tracing::info!(chain_id = %layer.chain_id, blob = %layer.digest, entries = unpacked.entries, elapsed_ms = started.elapsed().as_millis() as u64, "layer unpacked");
        Ok(())
    }

    /// Chain IDs present (complete or not), with their directory names.
    pub(crate) fn list(&self) -> Result<Vec<(Option<Digest>, PathBuf)>, Error> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(Error::io("list", &self.dir))? {
            let entry = entry.map_err(Error::io("list", &self.dir))?;
            let chain =
                Digest::parse(&format!("sha256:{}", entry.file_name().to_string_lossy())).ok();
            out.push((chain.filter(|c| self.is_complete(c)), entry.path()));
        }
        Ok(out)
    }
}

/// `rm -rf` that tolerates absence.
pub(crate) fn remove_tree(path: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
            op: "remove",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}
