//! A containerd bundle's OCI spec made fit for the guest. Its bind mounts name host paths
//! (the CRI's `/etc/hosts`, `/etc/resolv.conf`, volumes, …): they become volumes of the
//! container share, carried into the VM over virtio-fs, and leave the spec; the pod's
//! `/dev/shm`, a host tmpfs, becomes a tmpfs of the guest. A pid namespace the spec joins by
//! host path (containerd's CRI joins a pod's containers to its sandbox's) becomes the guest's
//! pod pid namespace.

use std::path::PathBuf;

use crx_runtime::share::{Propagation, Volume};
use oci_spec::runtime::{LinuxNamespaceType, Mount, MountBuilder, Spec};

/// Why a spec cannot run in the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestSpecError {
    #[error("bind mount on {0} has no source")]
    NoSource(String),
    #[error("bind mount source {0:?} is not an absolute host path")]
    RelativeSource(PathBuf),
    #[error("invalid mount: {0}")]
    Mount(#[from] oci_spec::OciSpecError),
}

const SHM: &str = "/dev/shm";

fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// `spec` without its host bind mounts, and those as volumes.
pub fn for_guest(mut spec: Spec) -> Result<(Spec, Vec<Volume>), GuestSpecError> {
    let mut mounts = Vec::new();
    let mut volumes = Vec::new();
    for mount in spec.mounts().clone().unwrap_or_default() {
        if !is_bind(&mount) {
            mounts.push(mount);
            continue;
        }
        let destination = mount.destination().to_string_lossy().into_owned();
        if destination == SHM {
            mounts.push(
                MountBuilder::default()
                    .destination(SHM)
                    .typ("tmpfs")
                    .source("shm")
                    .options(
                        ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"].map(String::from),
                    )
                    .build()?,
            );
            continue;
        }
        let source = mount
            .source()
            .clone()
            .ok_or_else(|| GuestSpecError::NoSource(destination.clone()))?;
        if !source.is_absolute() {
            return Err(GuestSpecError::RelativeSource(source));
        }
        let options = mount.options().clone().unwrap_or_default();
        let propagation = if options.iter().any(|o| o == "rslave" || o == "slave") {
            Propagation::HostToContainer
        } else {
            Propagation::Private
        };
        volumes.push(Volume {
            host_path: source,
            container_path: destination,
            read_only: options.iter().any(|o| o == "ro" || o == "rro"),
            recursive_read_only: options.iter().any(|o| o == "rro"),
            propagation,
        });
    }
    spec.set_mounts(Some(mounts));
    if let Some(linux) = spec.linux_mut() {
        if let Some(namespaces) = linux.namespaces_mut() {
            for ns in namespaces.iter_mut() {
                if ns.typ() == LinuxNamespaceType::Pid && ns.path().is_some() {
                    ns.set_path(Some(crx_agent_proto::POD_PID_NAMESPACE.into()));
                }
            }
        }
    }
    Ok((spec, volumes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mounts: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": mounts,
        }))
        .expect("spec")
    }

    #[test]
    fn a_pid_namespace_joined_by_host_path_becomes_the_pods() {
        let mut shared = spec(serde_json::json!([]));
        let linux = serde_json::from_value(serde_json::json!({"namespaces": [
            {"type": "pid", "path": "/proc/4242/ns/pid"}, {"type": "mount"}
        ]}))
        .unwrap();
        shared.set_linux(Some(linux));
        let (spec, _) = for_guest(shared).expect("converts");
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert_eq!(
            namespaces[0].path().as_deref(),
            Some(std::path::Path::new(crx_agent_proto::POD_PID_NAMESPACE))
        );
        assert_eq!(namespaces[1].path(), &None);
    }

    #[test]
    fn host_binds_become_volumes_and_shm_a_guest_tmpfs() {
        let (spec, volumes) = for_guest(spec(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/c/hosts", "options": ["rbind", "rprivate", "ro"]},
            {"destination": "/data", "source": "/srv/data", "options": ["rbind", "rslave"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/c/shm", "options": ["rbind"]},
        ])))
        .expect("converts");
        let kept: Vec<_> = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| {
                (
                    m.destination().to_string_lossy().into_owned(),
                    m.typ().clone(),
                )
            })
            .collect();
        assert_eq!(
            kept,
            [
                ("/proc".to_owned(), Some("proc".to_owned())),
                ("/dev/shm".to_owned(), Some("tmpfs".to_owned()))
            ]
        );
        assert_eq!(
            volumes,
            [
                Volume {
                    host_path: "/var/lib/c/hosts".into(),
                    container_path: "/etc/hosts".into(),
                    read_only: true,
                    recursive_read_only: false,
                    propagation: Propagation::Private,
                },
                Volume {
                    host_path: "/srv/data".into(),
                    container_path: "/data".into(),
                    read_only: false,
                    recursive_read_only: false,
                    propagation: Propagation::HostToContainer,
                },
            ]
        );
    }

    #[test]
    fn a_relative_or_missing_bind_source_is_refused() {
        let relative =
            spec(serde_json::json!([{"destination": "/x", "type": "bind", "source": "x"}]));
        assert!(matches!(
            for_guest(relative),
            Err(GuestSpecError::RelativeSource(_))
        ));
        let missing = spec(serde_json::json!([{"destination": "/x", "type": "bind"}]));
        assert!(matches!(
            for_guest(missing),
            Err(GuestSpecError::NoSource(_))
        ));
    }
}
