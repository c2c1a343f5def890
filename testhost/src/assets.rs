//! The L1's boot assets (kernel, initramfs, module tree), built from Debian packages by
//! `assets/build-l1.sh` and cached in `<cache>/testhost/<hash of inputs>/`.
//!
//! The inputs are the two scripts (embedded in this library), the boot module list, the kernel
//! image package that `linux-image-amd64` depends on with its candidate version, and the installed
//! busybox-static version: a new Debian kernel or a changed script makes a new cache entry.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::Error;

const BUILD_SCRIPT: &str = include_str!("../assets/build-l1.sh");
const INIT_SCRIPT: &str = include_str!("../assets/init.sh");

/// Modules the initramfs loads before the root is mounted (their dependencies come along).
const BOOT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "overlay",
    "kvm_amd",
];

/// Marker written last into a complete asset directory.
const COMPLETE: &str = "complete";

/// A complete set of boot assets.
#[derive(Debug, Clone)]
pub struct Assets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The kernel's `lib/modules/<release>` tree, with `modules.dep`.
    pub modules: PathBuf,
}

impl Assets {
    fn in_dir(dir: PathBuf) -> Assets {
        Assets {
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
            modules: dir.join("modules"),
        }
    }
}

/// Returns the cached assets for the current inputs, building them first if needed.
pub fn ensure(cache: &Path) -> Result<Assets, Error> {
    let inputs = script(&["inputs"])?;
    let inputs = inputs.trim();
    let kernel_package = inputs
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let dir = cache.join(input_hash(inputs));
    if dir.join(COMPLETE).exists() {
        return Ok(Assets::in_dir(dir));
    }

    tracing::info!(dir = %dir.display(), %kernel_package, "building the test host's boot assets (once per kernel version)");
    std::fs::create_dir_all(cache).map_err(Error::io("cannot create the asset cache", cache))?;
    let staging = cache.join(format!(".staging-{}", std::process::id()));
    // A leftover from a crashed build of ours: start over.
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(Error::io("cannot create", &staging))?;
    let init = staging.join("init.sh");
    std::fs::write(&init, INIT_SCRIPT).map_err(Error::io("cannot write", &init))?;

    let mut args: Vec<&str> = vec![
        "build",
        path_str(&staging)?,
        &kernel_package,
        path_str(&init)?,
    ];
    args.extend(BOOT_MODULES);
    script(&args)?;
    std::fs::write(staging.join(COMPLETE), inputs)
        .map_err(Error::io("cannot write", staging.join(COMPLETE)))?;
    if let Err(e) = std::fs::rename(&staging, &dir) {
        // Someone else finished the same assets first: theirs are as good.
        let _ = std::fs::remove_dir_all(&staging);
        if !dir.join(COMPLETE).exists() {
            return Err(Error::io("cannot move the assets into place", &dir)(e));
        }
    }
    Ok(Assets::in_dir(dir))
}

fn input_hash(inputs: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [BUILD_SCRIPT, INIT_SCRIPT, &BOOT_MODULES.join(" "), inputs] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize()[..8]
        .iter()
        .fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// Runs build-l1.sh with `args`; returns its stdout.
fn script(args: &[&str]) -> Result<String, Error> {
    let output = Command::new("bash")
        .arg("-c")
        .arg(BUILD_SCRIPT)
        .arg("build-l1.sh")
        .args(args)
        .output()
        .map_err(|e| Error::Assets(format!("cannot run bash: {e}")))?;
    if !output.status.success() {
        return Err(Error::Assets(format!(
            "build-l1.sh {} failed ({}): {}",
            args.first().unwrap_or(&""),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    String::from_utf8(output.stdout)
        .map_err(|e| Error::Assets(format!("build-l1.sh printed non-UTF-8: {e}")))
}

fn path_str(path: &Path) -> Result<&str, Error> {
    path.to_str()
        .ok_or_else(|| Error::Assets(format!("the cache path {} is not UTF-8", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_changes_with_inputs() {
        let a = input_hash("linux-image-6.1.0-56-amd64 6.1.192-2 busybox-static 1");
        let b = input_hash("linux-image-6.1.0-57-amd64 6.1.193-1 busybox-static 1");
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }
}
