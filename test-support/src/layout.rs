//! OCI image layouts written by hand: layers (tar, gzip or zstd) with busybox and test files,
//! configs, manifests, multi-platform indexes.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub fn sha(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

#[derive(Clone, Copy)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

/// A layer: its tar and how it is compressed.
pub struct Layer {
    pub tar: Vec<u8>,
    pub comp: Comp,
}

impl Layer {
    /// Regular files `(path, content)`; names starting with `.wh.` are whiteouts.
    pub fn files(files: &[(&str, &[u8])], comp: Comp) -> Layer {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, path, *data).unwrap();
        }
        Layer {
            tar: b.into_inner().unwrap(),
            comp,
        }
    }

    pub fn busybox() -> Layer {
        let bb = std::fs::read("/bin/busybox").unwrap();
        Layer::files(
            &[("bin/busybox", &bb), ("etc/hostname", b"crx\n")],
            Comp::Gzip,
        )
    }

    pub fn diff_id(&self) -> String {
        sha(&self.tar)
    }
}

/// An OCI layout directory being written.
pub struct Layout {
    pub dir: PathBuf,
    index: Vec<Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_owned(),
            index: Vec::new(),
        }
    }

    /// Store a blob, return its descriptor.
    pub fn blob(&self, bytes: &[u8], media_type: &str) -> Value {
        let d = sha(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
        json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
    }

    /// Write an image; return its manifest descriptor.
    pub fn image(&self, layers: &[Layer], arch: &str) -> Value {
        let mut descs = Vec::new();
        for l in layers {
            let (bytes, mt) = match l.comp {
                Comp::None => (l.tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
                Comp::Gzip => {
                    let mut e =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    e.write_all(&l.tar).unwrap();
                    (
                        e.finish().unwrap(),
                        "application/vnd.oci.image.layer.v1.tar+gzip",
                    )
                }
                Comp::Zstd => (
                    zstd::encode_all(&l.tar[..], 1).unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                ),
            };
            descs.push(self.blob(&bytes, mt));
        }
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/bin/busybox", "sh"]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(Layer::diff_id).collect::<Vec<_>>()},
        });
        let config = self.blob(
            config.to_string().as_bytes(),
            "application/vnd.oci.image.config.v1+json",
        );
        let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config, "layers": descs});
        let mut desc = self.blob(
            manifest.to_string().as_bytes(),
            "application/vnd.oci.image.manifest.v1+json",
        );
        desc["platform"] = json!({"architecture": arch, "os": "linux"});
        desc
    }

    /// Write an image index over `manifests`; return its descriptor.
    pub fn multi(&self, manifests: Vec<Value>) -> Value {
        let idx = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        self.blob(
            idx.to_string().as_bytes(),
            "application/vnd.oci.image.index.v1+json",
        )
    }

    /// Name `desc` as `tag` in index.json (rewritten on each call).
    pub fn tag(&mut self, mut desc: Value, tag: &str) {
        desc.as_object_mut().unwrap().remove("platform");
        desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        self.index.push(desc);
        let idx = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": self.index});
        std::fs::write(self.dir.join("index.json"), idx.to_string()).unwrap();
    }
}

/// `len` incompressible bytes (xorshift64 from `seed`).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Digest field of a descriptor.
pub fn digest(desc: &Value) -> String {
    desc["digest"].as_str().unwrap().to_owned()
}
