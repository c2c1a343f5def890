//! `crxctl check`: whether this host can run pod VMs with this configuration. Each check
//! prints one line, `ok`, `warn` (pods run, something is off) or `FAIL` (pods cannot start),
//! with what was found or what to do.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crx_cri::config::Config;
use crx_kvm_probe::KvmKind;
use crx_runtime::network::cni;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, verdict: Verdict, what: &str, detail: impl std::fmt::Display) {
        let tag = match verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        self.failed |= verdict == Verdict::Fail;
        println!("{tag} {what}: {detail}");
    }

    /// An executable file at `path`.
    fn executable(&mut self, what: &str, path: &Path) {
        let executable = std::fs::metadata(path)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if executable {
            self.line(Verdict::Ok, what, path.display());
        } else {
            self.line(
                Verdict::Fail,
                what,
                format!("{} is not an executable file", path.display()),
            );
        }
    }
}

/// Runs every check; returns the exit code (1 if any failed).
pub fn run(config: &Config) -> i32 {
    let mut report = Report { failed: false };
    kvm(&mut report);
    guest(&mut report, config);
    match config.runtime.vmm_path() {
        Ok(vmm) => report.executable("crx-vmm", &vmm),
        Err(e) => report.line(
            Verdict::Fail,
            "crx-vmm",
            format!("cannot find crxctl's own path: {e}"),
        ),
    }
    match crx_virtio::devices::fs::find_virtiofsd() {
        Some(path) => report.line(Verdict::Ok, "virtiofsd", path.display()),
        None => report.line(
            Verdict::Fail,
            "virtiofsd",
            "neither on PATH nor in ~/.cargo/bin (cargo install virtiofsd --locked)",
        ),
    }
    network(&mut report, config);
    store_and_socket(&mut report, config);
    i32::from(report.failed)
}

fn kvm(report: &mut Report) {
    match crx_kvm_probe::probe() {
        Ok(KvmKind::Standard) => report.line(Verdict::Ok, "kvm", "/dev/kvm is standard KVM"),
        Ok(KvmKind::Pvm) => report.line(
            Verdict::Fail,
            "kvm",
            "/dev/kvm is PVM (kvm_pvm): stock guest kernels do not boot here; run pod VMs in \
             the KVM test host (cargo xtask testhost -- …) or on hardware KVM",
        ),
        Err(e) => report.line(Verdict::Fail, "kvm", e),
    }
}

/// The guest kernel, the initrd and the agent in it.
fn guest(report: &mut Report, config: &Config) {
    let default = crx_core::builder::default_guest_dir();
    let kernel = config
        .runtime
        .kernel
        .clone()
        .unwrap_or_else(|| default.join("vmlinux"));
    let initrd = config
        .runtime
        .initrd
        .clone()
        .unwrap_or_else(|| default.join("initrd.cpio"));
    for (what, path) in [("guest kernel", &kernel), ("guest initrd", &initrd)] {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() && m.len() > 0 => report.line(
                Verdict::Ok,
                what,
                format!("{} ({} KiB)", path.display(), m.len() >> 10),
            ),
            _ => report.line(
                Verdict::Fail,
                what,
                format!(
                    "{} is missing (setup/setup.sh builds the default guest)",
                    path.display()
                ),
            ),
        }
    }
    // A newc cpio archive names each file without its leading '/', NUL-terminated.
    let agent = config.runtime.agent.to_string_lossy();
    let mut name = agent.trim_start_matches('/').as_bytes().to_vec();
    name.push(0);
    match std::fs::read(&initrd) {
        Ok(bytes) if bytes.windows(name.len()).any(|w| w == name.as_slice()) => {
            report.line(Verdict::Ok, "guest agent", format!("{agent} in the initrd"))
        }
        Ok(_) => report.line(
            Verdict::Fail,
            "guest agent",
            format!(
                "{agent} is not in {} (an uncompressed cpio is expected)",
                initrd.display()
            ),
        ),
        Err(_) => {} // the initrd line said why
    }
}

/// The first CNI configuration (the one pods get) and its plugins.
fn network(report: &mut Report, config: &Config) {
    let dir = &config.network.cni_conf_dir;
    let list = match cni::load(dir, None) {
        Ok(list) => list,
        Err(e) => {
            report.line(
                Verdict::Warn,
                "cni",
                format!("{e}: pods with a network (all but host-network pods) cannot start"),
            );
            return;
        }
    };
    report.line(
        Verdict::Ok,
        "cni network",
        format!("{} in {}", list.name, dir.display()),
    );
    for plugin in &list.plugins {
        match cni::find_plugin(&plugin.r#type, &config.network.cni_bin_dirs) {
            Ok(path) => report.line(Verdict::Ok, "cni plugin", path.display()),
            Err(e) => report.line(Verdict::Fail, "cni plugin", e),
        }
    }
}

fn store_and_socket(report: &mut Report, config: &Config) {
    let root = &config.image.root;
    if root.is_dir() {
        report.line(Verdict::Ok, "image store", root.display());
    } else {
        report.line(
            Verdict::Warn,
            "image store",
            format!(
                "{} does not exist yet (the first pull or import makes it)",
                root.display()
            ),
        );
    }
    let socket: PathBuf = config.socket();
    let listening = std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket())
        && std::os::unix::net::UnixStream::connect(&socket).is_ok();
    if listening {
        report.line(
            Verdict::Ok,
            "crx-cri",
            format!("listening on {}", socket.display()),
        );
    } else {
        report.line(
            Verdict::Warn,
            "crx-cri",
            format!("nothing listens on {} (start crx-cri)", socket.display()),
        );
    }
}
