//! The store facade: pull, list, resolve, lease, remove and garbage-collect images.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use oci_client::manifest::OciImageManifest;
use serde::Deserialize;

use crate::blobs::Blobs;
use crate::index::JsonDir;
use crate::layers::{remove_tree, Layers};
use crate::lock::FileLock;
use crate::registry::{canonical_name, parse_reference, Remote};
use crate::{
    usage, Digest, Error, FsUsage, ImageRecord, LayerRecord, Lease, Progress, RegistryConfig,
};

/// Layer blobs downloaded at once by one pull.
const PARALLEL_DOWNLOADS: usize = 4;

/// The image store rooted at one directory. Cheap to open; any number of `Store`s, in any
/// number of processes, may share a root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    registry: RegistryConfig,
    pub(crate) blobs: Blobs,
    layers: Layers,
    images: JsonDir,
    leases: JsonDir,
}

/// What [`Store::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: Vec<Digest>,
    pub layers_removed: Vec<Digest>,
    /// Drop in the store's disk usage.
    pub bytes_freed: u64,
}

#[derive(Deserialize)]
struct ConfigDoc {
    rootfs: RootFs,
}

/// What an image's config says about running it (the OCI image config's `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    pub user: String,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
}

#[derive(Deserialize)]
struct RunConfigDoc {
    #[serde(default)]
    config: Option<RunConfigNullable>,
}

/// The image config as written: any field may be `null`.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "PascalCase")]
struct RunConfigNullable {
    user: Option<String>,
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<Digest>,
}

impl Store {
    /// The root from `CRX_ROOT`, else [`crate::DEFAULT_ROOT`].
    pub fn default_root() -> PathBuf {
        std::env::var_os("CRX_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(crate::DEFAULT_ROOT))
    }

    /// Open (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>, registry: RegistryConfig) -> Result<Self, Error> {
        let root = root.into();
        for sub in [
            "blobs/sha256",
            "ingest",
            "images",
            "leases",
            "layers",
            "locks",
        ] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(Error::io("create", dir))?;
        }
        Ok(Store {
            blobs: Blobs::new(&root),
            layers: Layers::new(&root),
            images: JsonDir::new(root.join("images")),
            leases: JsonDir::new(root.join("leases")),
            root,
            registry,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn store_lock(&self, exclusive: bool) -> Result<FileLock, Error> {
        FileLock::acquire(&self.root.join("lock"), exclusive)
    }

    /// Pull `reference` (tag or digest) for linux/amd64, verify and store its blobs, unpack its
    /// layers, and record it under its canonical name.
    pub async fn pull(
        &self,
        reference: &str,
        progress: &dyn Progress,
    ) -> Result<ImageRecord, Error> {
        let name = parse_reference(reference)?;
        let _shared = FileLock::acquire_async(self.root.join("lock"), false).await?;
        let remote = Remote::new(&self.registry, &name)?;
        let resolved = remote.manifest().await?;
        self.blobs.put(&resolved.digest, &resolved.raw)?;
        if let Some((raw, digest)) = &resolved.index {
            self.blobs.put(digest, raw)?;
        }
        let cfg = &resolved.manifest.config;
        let cfg_digest = Digest::parse(&cfg.digest)?;
        self.blobs
            .fetch(&cfg_digest, descriptor_size(cfg.size)?, progress, || {
                remote.blob(&cfg_digest)
            })
            .await?;
        let record = self.record(
            name.whole(),
            &resolved.manifest,
            resolved.digest,
            resolved.index.map(|(_, d)| d),
        )?;

        {
            // Download up to PARALLEL_DOWNLOADS layers at once; unpack each, in order, as soon as it
            // and its parent are ready.
            let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
            // On a failure, transfers already running finish (or fail) on their own and queued ones
            // are skipped: nothing is cancelled mid-write, so no partial file outlives the pull.
            let slots = tokio::sync::Semaphore::new(PARALLEL_DOWNLOADS);
            let failed = AtomicBool::new(false);
            let mut downloads = FuturesUnordered::new();
            for (i, layer) in record.layers.iter().enumerate() {
                let (slots, failed, remote, ready_tx) =
                    (&slots, &failed, &remote, ready_tx.clone());
                downloads.push(async move {
                    let _slot = slots.acquire().await.expect("semaphore never closed");
                    if failed.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    self.blobs
                        .fetch(&layer.digest, layer.size, progress, || {
                            remote.blob(&layer.digest)
                        })
                        .await?;
                    let _ = ready_tx.send(i);
                    Ok::<_, Error>(())
                });
            }
            drop(ready_tx);
            let downloads = async {
                let mut first_error = None;
                while let Some(done) = downloads.next().await {
                    if let Err(e) = done {
                        failed.store(true, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                    }
                }
                first_error.map_or(Ok(()), Err)
            };
            let unpacks = async {
                let mut ready = vec![false; record.layers.len()];
                for i in 0..record.layers.len() {
                    while !ready[i] {
                        match ready_rx.recv().await {
                            Some(done) => ready[done] = true,
                            None => return Ok(()), // a download failed; its error is reported
                        }
                    }
                    let (blobs, layers, all) = (
                        self.blobs.clone(),
                        self.layers.clone(),
                        record.layers.clone(),
                    );
                    tokio::task::spawn_blocking(move || layers.ensure(&blobs, &all, i)).await??;
                }
                Ok::<_, Error>(())
            };
            let (downloaded, unpacked) = futures_util::future::join(downloads, unpacks).await;
            downloaded?;
            unpacked?;
        }
        self.images.put(&key(&record.name), &record)?;
        tracing::info!(image = %record.name, manifest = %record.manifest, layers = record.layers.len(), "image stored");
        Ok(record)
    }

    /// Build the record of an image whose manifest and config blob are in the store.
    pub(crate) fn record(
        &self,
        name: String,
        manifest: &OciImageManifest,
        digest: Digest,
        index: Option<Digest>,
    ) -> Result<ImageRecord, Error> {
        let config = Digest::parse(&manifest.config.digest)?;
        let doc: ConfigDoc =
            serde_json::from_slice(&self.blobs.read(&config)?).map_err(|e| Error::Malformed {
                what: format!("image config {config}"),
                reason: e.to_string(),
            })?;
        if doc.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(Error::Malformed {
                what: format!("image {name}"),
                reason: format!(
                    "{} layers but {} DiffIDs in the config",
                    manifest.layers.len(),
                    doc.rootfs.diff_ids.len()
                ),
            });
        }
        let mut chain: Option<Digest> = None;
        let mut layers = Vec::new();
        for (desc, diff_id) in manifest.layers.iter().zip(doc.rootfs.diff_ids) {
            if !is_tar_layer(&desc.media_type) {
                return Err(Error::Unsupported(format!(
                    "layer media type {} in {name}",
                    desc.media_type
                )));
            }
            let chain_id = Digest::chain(chain.as_ref(), &diff_id);
            chain = Some(chain_id.clone());
            layers.push(LayerRecord {
                digest: Digest::parse(&desc.digest)?,
                size: descriptor_size(desc.size)?,
                media_type: desc.media_type.clone(),
                diff_id,
                chain_id,
            });
        }
        let stored_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(ImageRecord {
            name,
            manifest: digest,
            index,
            config,
            layers,
            stored_at,
        })
    }

    /// Unpack every layer of `record` (blobs present) and record it. Blocking.
    pub(crate) fn commit_unpacked(&self, record: &ImageRecord) -> Result<(), Error> {
        for i in 0..record.layers.len() {
            self.layers.ensure(&self.blobs, &record.layers, i)?;
        }
        self.images.put(&key(&record.name), record)
    }

    pub(crate) fn shared_lock(&self) -> Result<FileLock, Error> {
        self.store_lock(false)
    }

    /// All images, sorted by name.
    pub fn images(&self) -> Result<Vec<ImageRecord>, Error> {
        let mut all: Vec<ImageRecord> = self.images.all()?;
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Find an image by name (as given or canonicalised: `busybox` → `docker.io/library/busybox:latest`)
    /// or by a unique prefix (≥ 12 hex digits) of its manifest digest.
    pub fn image(&self, name_or_digest: &str) -> Result<ImageRecord, Error> {
        if let Some(r) = self.images.get(&key(name_or_digest))? {
            return Ok(r);
        }
        if let Ok(canonical) = canonical_name(name_or_digest) {
            if let Some(r) = self.images.get(&key(&canonical))? {
                return Ok(r);
            }
        }
        let hex = name_or_digest
            .strip_prefix("sha256:")
            .unwrap_or(name_or_digest);
        if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut found = self
                .images()?
                .into_iter()
                .filter(|r| r.manifest.hex().starts_with(hex));
            if let (Some(r), None) = (found.next(), found.next()) {
                return Ok(r);
            }
        }
        Err(Error::ImageNotFound(name_or_digest.to_owned()))
    }

    /// The image config document of `image` (JSON), as stored (verified when it was stored).
    pub fn image_config(&self, image: &ImageRecord) -> Result<Vec<u8>, Error> {
        self.blobs.read(&image.config)
    }

    /// How `image` wants to be run: entrypoint, command, environment, working directory, user.
    pub fn run_config(&self, image: &ImageRecord) -> Result<RunConfig, Error> {
        let doc: RunConfigDoc =
            serde_json::from_slice(&self.image_config(image)?).map_err(|e| Error::Malformed {
                what: format!("image config {}", image.config),
                reason: e.to_string(),
            })?;
        let c = doc.config.unwrap_or_default();
        Ok(RunConfig {
            user: c.user.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
        })
    }

    /// The root filesystem of `image` (read-only by convention; shared by every user).
    pub fn rootfs(&self, image: &ImageRecord) -> Option<PathBuf> {
        image.top_chain().map(|c| self.layers.rootfs(c))
    }

    /// Remove the image record `name`; refused while a lease holds it. Content stays until
    /// [`Store::gc`].
    pub fn remove(&self, name: &str) -> Result<ImageRecord, Error> {
        let _excl = self.store_lock(true)?;
        let record = self.image(name)?;
        let holders: Vec<String> = self
            .leases()?
            .into_iter()
            .filter(|l| l.image == record.name)
            .map(|l| l.id)
            .collect();
        if !holders.is_empty() {
            return Err(Error::InUse {
                image: record.name,
                holders,
            });
        }
        self.images.remove(&key(&record.name))?;
        tracing::info!(image = %record.name, "image removed");
        Ok(record)
    }

    /// Take lease `id` (e.g. a container ID: letters, digits, `-_.`) on `image`.
    pub fn lease(&self, image: &str, id: &str) -> Result<Lease, Error> {
        let valid = !id.is_empty()
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid {
            return Err(Error::InvalidReference {
                reference: id.to_owned(),
                reason: "lease ids use letters, digits, `-`, `_`, `.`".into(),
            });
        }
        let _shared = self.store_lock(false)?;
        let record = self.image(image)?;
        let lease = Lease {
            id: id.to_owned(),
            image: record.name.clone(),
            manifest: record.manifest.clone(),
            chain_ids: record.layers.iter().map(|l| l.chain_id.clone()).collect(),
            blobs: record.blobs().cloned().collect(),
        };
        self.leases.put(id, &lease)?;
        Ok(lease)
    }

    /// Release lease `id`.
    pub fn release(&self, id: &str) -> Result<(), Error> {
        if self.leases.remove(id)? {
            Ok(())
        } else {
            Err(Error::LeaseNotFound(id.to_owned()))
        }
    }

    pub fn leases(&self) -> Result<Vec<Lease>, Error> {
        self.leases.all()
    }

    /// Reference count of every chain ID in use: images and leases that need it.
    pub fn layer_refs(&self) -> Result<BTreeMap<Digest, usize>, Error> {
        let mut refs = BTreeMap::new();
        let images = self.images()?;
        let leases = self.leases()?;
        let chains = images
            .iter()
            .flat_map(|i| i.layers.iter().map(|l| &l.chain_id))
            .chain(leases.iter().flat_map(|l| l.chain_ids.iter()));
        for c in chains {
            *refs.entry(c.clone()).or_insert(0) += 1;
        }
        Ok(refs)
    }

    /// Delete blobs and layer chains that no image or lease references, ingest leftovers and
    /// interrupted unpacks.
    pub fn gc(&self) -> Result<GcReport, Error> {
        let _excl = self.store_lock(true)?;
        let before = usage::measure(&self.root)?;
        let images = self.images()?;
        let leases = self.leases()?;
        let keep_blobs: BTreeSet<&Digest> = images
            .iter()
            .flat_map(|i| i.blobs())
            .chain(leases.iter().flat_map(|l| l.blobs.iter()))
            .collect();
        let refs = self.layer_refs()?;
        let mut report = GcReport::default();
        for d in self.blobs.list()? {
            if !keep_blobs.contains(&d) {
                let path = self.blobs.path(&d);
                fs::remove_file(&path).map_err(Error::io("remove", path))?;
                report.blobs_removed.push(d);
            }
        }
        for (chain, path) in self.layers.list()? {
            match chain {
                Some(c) if refs.contains_key(&c) => {}
                chain => {
                    remove_tree(&path)?;
                    report.layers_removed.extend(chain);
                }
            }
        }
        self.blobs.clean_ingest()?;
        // No pull holds a per-blob or per-chain lock while we hold the store lock exclusively.
        let locks = self.root.join("locks");
        for entry in fs::read_dir(&locks).map_err(Error::io("list", &locks))? {
            let path = entry.map_err(Error::io("list", &locks))?.path();
            fs::remove_file(&path).map_err(Error::io("remove", path))?;
        }
        report.bytes_freed = before
            .used_bytes
            .saturating_sub(usage::measure(&self.root)?.used_bytes);
        tracing::info!(
            blobs = report.blobs_removed.len(),
            layers = report.layers_removed.len(),
            bytes = report.bytes_freed,
            "garbage collected"
        );
        Ok(report)
    }

    /// Disk usage of the store and its filesystem.
    pub fn fs_usage(&self) -> Result<FsUsage, Error> {
        usage::measure(&self.root)
    }
}

/// Index key of an image name: hex of its sha256 (names hold `/` and `:`).
fn key(name: &str) -> String {
    Digest::of(name.as_bytes()).hex().to_owned()
}

fn descriptor_size(size: i64) -> Result<u64, Error> {
    u64::try_from(size).map_err(|_| Error::Malformed {
        what: "descriptor".into(),
        reason: format!("negative size {size}"),
    })
}

/// OCI and Docker tar layer media types (plain, gzip, zstd; distributable or not).
fn is_tar_layer(media_type: &str) -> bool {
    const BASES: &[&str] = &[
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
    ];
    BASES.iter().any(|b| {
        media_type
            .strip_prefix(b)
            .is_some_and(|rest| ["", "+gzip", "+zstd", ".gzip"].contains(&rest))
    })
}
