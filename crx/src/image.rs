//! `crx pull`, `crx images`, `crx rmi`, `crx image import|gc|fsinfo`: the image service
//! (`crx-image`) on the command line, with per-layer progress bars on a terminal and
//! `tracing` events otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use crx_image::{ImageRecord, LogProgress, Progress, RegistryConfig, Store};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Where the store is and how registries are reached (every image subcommand takes these).
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Store root [default: $CRX_ROOT or /var/lib/crx].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Docker-style auth file (`{"auths": {...}}`) [default: $CRX_REGISTRY_AUTH_FILE].
    #[arg(long, value_name = "FILE")]
    auth_file: Option<PathBuf>,
    /// Reach this registry (`host` or `host:port`) over plain HTTP; repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure: Vec<String>,
    /// Fetch images named under HOST from ENDPOINT instead; repeatable.
    #[arg(long = "mirror", value_name = "HOST=ENDPOINT")]
    mirrors: Vec<String>,
}

impl StoreArgs {
    pub fn open(&self) -> anyhow::Result<Store> {
        let mut cfg = RegistryConfig::from_env();
        if let Some(f) = &self.auth_file {
            cfg.auth_file = Some(f.clone());
        }
        cfg.insecure.extend(self.insecure.iter().cloned());
        for m in &self.mirrors {
            let (host, endpoint) = m
                .split_once('=')
                .with_context(|| format!("--mirror {m:?}: expected HOST=ENDPOINT"))?;
            cfg.mirrors.insert(host.to_owned(), endpoint.to_owned());
        }
        let root = self.root.clone().unwrap_or_else(Store::default_root);
        Store::open(&root, cfg).with_context(|| format!("opening image store {}", root.display()))
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Pull an image (by tag or digest) into the store and unpack its layers.
    Pull {
        /// e.g. `busybox`, `registry.k8s.io/pause:3.9`, `127.0.0.1:5000/app@sha256:…`.
        reference: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List images.
    Images {
        /// Print full manifest digests.
        #[arg(long)]
        digests: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove images (refused while a container holds a lease), then collect garbage.
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
        /// Keep unreferenced blobs and layers (run `crx image gc` later).
        #[arg(long)]
        no_prune: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Image store maintenance.
    Image {
        #[command(subcommand)]
        command: ImageAdmin,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum ImageAdmin {
    /// Import an OCI image layout directory or archive (`skopeo copy … oci-archive:`).
    Import {
        path: PathBuf,
        /// Name for the image (needed when the layout has no full reference annotation).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete blobs and layers no image or lease uses.
    Gc {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Disk usage of the image store.
    Fsinfo {
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Pull { reference, store } => {
            let record = pull(&store.open()?, &reference)?;
            println!("{} {}", record.name, record.manifest);
        }
        ImageCommand::Images { digests, store } => {
            let store = store.open()?;
            println!(
                "{:<60} {:<19} {:>6} {:>10}",
                "IMAGE", "DIGEST", "LAYERS", "SIZE"
            );
            for i in store.images()? {
                let digest = if digests {
                    i.manifest.to_string()
                } else {
                    i.manifest.hex()[..12].to_owned()
                };
                println!(
                    "{:<60} {:<19} {:>6} {:>10}",
                    i.name,
                    digest,
                    i.layers.len(),
                    human(i.size())
                );
            }
        }
        ImageCommand::Rmi {
            images,
            no_prune,
            store,
        } => {
            let store = store.open()?;
            for name in &images {
                let removed = store
                    .remove(name)
                    .with_context(|| format!("removing {name}"))?;
                println!("Untagged: {} ({})", removed.name, removed.manifest);
            }
            if !no_prune {
                print_gc(&store.gc()?);
            }
        }
        ImageCommand::Image {
            command: ImageAdmin::Import { path, name, store },
        } => {
            for r in store
                .open()?
                .import(&path, name.as_deref())
                .with_context(|| format!("importing {}", path.display()))?
            {
                println!("{} {}", r.name, r.manifest);
            }
        }
        ImageCommand::Image {
            command: ImageAdmin::Gc { store },
        } => {
            print_gc(&store.open()?.gc()?);
        }
        ImageCommand::Image {
            command: ImageAdmin::Fsinfo { store },
        } => {
            let store = store.open()?;
            let u = store.fs_usage()?;
            println!("root:       {}", store.root().display());
            println!(
                "used:       {} ({} bytes)",
                human(u.used_bytes),
                u.used_bytes
            );
            println!("inodes:     {}", u.inodes_used);
            println!(
                "filesystem: {} total, {} available",
                human(u.fs_total_bytes),
                human(u.fs_available_bytes)
            );
        }
    }
    Ok(())
}

/// Pulls `reference` into `store`, with progress bars on a terminal, log events otherwise.
pub fn pull(store: &Store, reference: &str) -> anyhow::Result<ImageRecord> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if std::io::stderr().is_terminal() {
        runtime.block_on(store.pull(reference, &Bars::default()))
    } else {
        runtime.block_on(store.pull(reference, &LogProgress))
    }
    .with_context(|| format!("pulling {reference}"))
}

/// One line about what a garbage collection freed.
fn print_gc(report: &crx_image::GcReport) {
    println!(
        "Deleted {} blobs, {} layers, freed {}",
        report.blobs_removed.len(),
        report.layers_removed.len(),
        human(report.bytes_freed)
    );
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// One progress bar per blob on the terminal.
#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Progress for Bars {
    fn start(&self, digest: &str, size: u64) {
        let bar = self.multi.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(digest.get(7..19).unwrap_or(digest).to_owned());
        self.bars
            .lock()
            .expect("not poisoned")
            .insert(digest.to_owned(), bar);
    }
    fn advance(&self, digest: &str, bytes: u64) {
        if let Some(bar) = self.bars.lock().expect("not poisoned").get(digest) {
            bar.inc(bytes);
        }
    }
    fn finish(&self, digest: &str, downloaded: bool) {
        match self.bars.lock().expect("not poisoned").remove(digest) {
            Some(bar) => bar.finish(),
            None if !downloaded => {
                let _ = self.multi.println(format!(
                    "{} already present",
                    digest.get(7..19).unwrap_or(digest)
                ));
            }
            None => {}
        }
    }
}
