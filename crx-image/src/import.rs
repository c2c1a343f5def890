//! Import of OCI image layouts — a directory or a tar archive such as
//! `skopeo copy … oci-archive:` writes — for hosts without registry access.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use oci_client::config::{Architecture, Os};
use oci_client::manifest::{OciImageIndex, OciManifest};

use crate::registry::{canonical_name, select_platform};
use crate::{Digest, Error, ImageRecord, Store};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Where an import reads blobs from.
enum Source {
    /// A layout directory: blobs are copied (verified) on demand.
    Dir(PathBuf),
    /// An archive, streamed once into the store: every blob is already there (verified).
    Stored,
}

impl Store {
    /// Import every linux/amd64 image of the OCI layout at `source` (directory or tar
    /// archive). Images are named by `name` (only with a single image) or by their
    /// `io.containerd.image.name` / `org.opencontainers.image.ref.name` annotation when it is a
    /// full reference (`repo:tag`, `registry/repo:tag`). Blocking.
    pub fn import(&self, source: &Path, name: Option<&str>) -> Result<Vec<ImageRecord>, Error> {
        let _shared = self.shared_lock()?;
        let (index_bytes, src) = if source.is_dir() {
            let path = source.join("index.json");
            (
                std::fs::read(&path).map_err(Error::io("read", path))?,
                Source::Dir(source.to_owned()),
            )
        } else {
            (self.stream_archive(source)?, Source::Stored)
        };
        let what = |w: &str| format!("{w} in {}", source.display());
        let index: OciImageIndex =
            serde_json::from_slice(&index_bytes).map_err(|e| Error::Malformed {
                what: what("index.json"),
                reason: e.to_string(),
            })?;
        let wanted: Vec<_> = index
            .manifests
            .iter()
            .filter(|e| {
                e.platform
                    .as_ref()
                    .is_none_or(|p| p.os == Os::Linux && p.architecture == Architecture::Amd64)
            })
            .collect();
        if name.is_some() && wanted.len() != 1 {
            return Err(Error::Unsupported(format!(
                "{} holds {} images; a name fits exactly one",
                source.display(),
                wanted.len()
            )));
        }
        let mut records = Vec::new();
        for entry in wanted {
            let annotation = |k: &str| entry.annotations.as_ref().and_then(|a| a.get(k)).cloned();
            let image_name = match name
                .map(str::to_owned)
                .or_else(|| annotation(CONTAINERD_NAME))
                .or_else(|| annotation(REF_NAME).filter(|n| n.contains([':', '/'])))
            {
                Some(n) => canonical_name(&n)?,
                None => {
                    return Err(Error::Malformed {
                        what: what(&format!("manifest {}", entry.digest)),
                        reason: "no image name annotation; pass a name".into(),
                    })
                }
            };
            let mut digest = Digest::parse(&entry.digest)?;
            let mut index_digest = None;
            let manifest = loop {
                self.import_blob(&src, &digest, u64::try_from(entry.size).unwrap_or(0), &what)?;
                let raw = self.blobs.read(&digest)?;
                match serde_json::from_slice(&raw).map_err(|e| Error::Malformed {
                    what: what(&format!("manifest {digest}")),
                    reason: e.to_string(),
                })? {
                    OciManifest::Image(m) => break m,
                    OciManifest::ImageIndex(_) if index_digest.is_some() => {
                        return Err(Error::Unsupported(what("nested index")))
                    }
                    OciManifest::ImageIndex(idx) => {
                        index_digest = Some(digest);
                        digest = select_platform(&idx, &image_name)?;
                    }
                }
            };
            self.import_blob(
                &src,
                &Digest::parse(&manifest.config.digest)?,
                manifest.config.size as u64,
                &what,
            )?;
            for layer in &manifest.layers {
                self.import_blob(
                    &src,
                    &Digest::parse(&layer.digest)?,
                    layer.size as u64,
                    &what,
                )?;
            }
            let record = self.record(image_name, &manifest, digest, index_digest)?;
            self.commit_unpacked(&record)?;
            tracing::info!(image = %record.name, source = %source.display(), "image imported");
            records.push(record);
        }
        Ok(records)
    }

    /// Make blob `d` present from the layout. Index entries of nested manifests carry sizes
    /// the store checks; `size` 0 (unknown) falls back to the file's length.
    fn import_blob(
        &self,
        src: &Source,
        d: &Digest,
        size: u64,
        what: &dyn Fn(&str) -> String,
    ) -> Result<(), Error> {
        match src {
            Source::Dir(dir) => {
                let path = dir.join("blobs/sha256").join(d.hex());
                let file = File::open(&path).map_err(Error::io("open", &path))?;
                let size = if size == 0 {
                    file.metadata().map_err(Error::io("stat", &path))?.len()
                } else {
                    size
                };
                self.blobs.put_reader(d, size, BufReader::new(file))
            }
            Source::Stored
                if self.blobs.contains(d, size) || (size == 0 && self.blobs.path(d).is_file()) =>
            {
                Ok(())
            }
            Source::Stored => Err(Error::Malformed {
                what: what("archive"),
                reason: format!("blob {d} missing or of the wrong size"),
            }),
        }
    }

    /// Store every `blobs/sha256/<hex>` entry of the archive (verified) and return index.json.
    fn stream_archive(&self, path: &Path) -> Result<Vec<u8>, Error> {
        let file = File::open(path).map_err(Error::io("open", path))?;
        let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
        let bad = |e: std::io::Error| Error::Io {
            op: "read archive",
            path: path.to_owned(),
            source: e,
        };
        let mut index = None;
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let entry_path = entry.path().map_err(bad)?.into_owned();
            let entry_path = entry_path
                .strip_prefix("./")
                .unwrap_or(&entry_path)
                .to_owned();
            if entry_path == Path::new("index.json") {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(bad)?;
                index = Some(bytes);
            } else if let Ok(hex) = entry_path.strip_prefix("blobs/sha256") {
                if let Ok(d) = Digest::parse(&format!("sha256:{}", hex.display())) {
                    let size = entry.size();
                    self.blobs.put_reader(&d, size, &mut entry)?;
                }
            }
        }
        index.ok_or_else(|| Error::Malformed {
            what: path.display().to_string(),
            reason: "no index.json: not an OCI archive".into(),
        })
    }
}
