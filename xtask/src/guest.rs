//! `cargo xtask guest`: builds (or takes from the cache) the guest kernel and the default initrd
//! with `guest-kernel/build.sh` and `guest-kernel/build-initrd.sh`, then installs `vmlinux`,
//! `bzImage` and `initrd.cpio` into the guest directory (`--dest`, else `$CRX_GUEST_DIR`, else
//! `/usr/local/share/crx/guest`), where `crx boot` finds its default guest. When that changes
//! what is installed, this workspace's test host is stopped: its L1 caches the host's files
//! (9p, cache=loose) and would go on booting the old guest.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(clap::Args)]
pub struct GuestArgs {
    /// Install directory (default: $CRX_GUEST_DIR, else /usr/local/share/crx/guest).
    #[arg(long)]
    pub dest: Option<PathBuf>,
    /// Only build (or find in the cache) and print the cached artifacts' paths; install nothing.
    #[arg(long)]
    pub no_install: bool,
}

pub fn run(args: GuestArgs) -> Result<()> {
    let scripts = repo_root().join("guest-kernel");
    let kernel_dir = run_script(&scripts.join("build.sh"))?;
    let initrd_dir = run_script(&scripts.join("build-initrd.sh"))?;
    let artifacts = [
        kernel_dir.join("vmlinux"),
        kernel_dir.join("bzImage"),
        initrd_dir.join("initrd.cpio"),
    ];
    if args.no_install {
        for a in &artifacts {
            println!("{}", a.display());
        }
        return Ok(());
    }
    let dest = args
        .dest
        .unwrap_or_else(crx_core::builder::default_guest_dir);
    std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut changed = false;
    for src in &artifacts {
        let (installed, replaced) = install(src, &dest)?;
        changed |= replaced;
        println!("{}", installed.display());
    }
    if changed && crx_testhost::TestHost::stop().context("stopping the test host")? {
        eprintln!("xtask guest: stopped the test host, so VM tests boot the new guest");
    }
    Ok(())
}

/// The workspace root (xtask lives in `<root>/xtask`).
fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Runs a build script (progress on our stderr) and returns the cache directory it prints as
/// the last line of its stdout.
fn run_script(script: &Path) -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let stdout = String::from_utf8(out.stdout).context("script output is not UTF-8")?;
    let dir = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .with_context(|| format!("{} printed no output directory", script.display()))?;
    let dir = PathBuf::from(dir);
    if !dir.is_dir() {
        bail!(
            "{} printed {}, not a directory",
            script.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// Copies `src` into `dest_dir` under the same name, atomically (temp file + rename), so a
/// running `crx boot` never sees a half-written kernel. Returns the installed path and whether
/// it changed (an identical file is left alone).
fn install(src: &Path, dest_dir: &Path) -> Result<(PathBuf, bool)> {
    let name = src.file_name().context("artifact without a file name")?;
    let dest = dest_dir.join(name);
    let new = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    if std::fs::read(&dest).is_ok_and(|old| old == new) {
        return Ok((dest, false));
    }
    let tmp = dest_dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, &new).with_context(|| format!("writing {}", tmp.display()))?;
    let mode = std::fs::metadata(src)
        .with_context(|| format!("reading {}", src.display()))?
        .permissions();
    std::fs::set_permissions(&tmp, mode).with_context(|| format!("chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("installing {}", dest.display()))?;
    Ok((dest, true))
}
