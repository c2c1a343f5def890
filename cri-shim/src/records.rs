//! What crx-cri keeps about its pods and containers beyond what crx-runtime's sandbox state
//! says: the CRI metadata, labels and annotations, log paths, timestamps and exit statuses.
//! One JSON file per pod and per container under `<state dir>/cri/{pods,containers}/`,
//! written by rename, read back when crx-cri starts, so a restarted server knows every pod it
//! made. IDs are 32 hex digits (128 random bits; not the 64 of containerd, so that the Unix
//! sockets in `<state dir>/sandboxes/<id>/` stay within their path limit); a unique prefix
//! names one too.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tonic::Status;

/// A pod sandbox as the CRI made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub hostname: String,
    pub log_directory: String,
    pub runtime_handler: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created_ns: i64,
    /// The pod's IP address from CNI; empty without a pod network.
    pub ip: String,
    /// StopPodSandbox ran: the VM is gone and the network released.
    pub stopped: bool,
    /// The node's ports crx-cri publishes for the pod while it runs.
    #[serde(default)]
    pub host_ports: Vec<HostPort>,
}

/// A node port whose connections go to a port on the pod VM's loopback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPort {
    /// The address to listen on; empty: every address.
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
}

/// The CRI state of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
}

/// A container as the CRI made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    pub name: String,
    pub attempt: u32,
    /// The image as the request named it.
    pub image: String,
    /// The image ID (config digest).
    pub image_id: String,
    /// The digested reference of the image (`repo@sha256:…`), or its ID.
    pub image_ref: String,
    /// The store record the container's image lease holds.
    pub image_name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The log file (the pod's log directory joined with the container's log path).
    pub log_path: Option<PathBuf>,
    /// The CRI's `log_path` as given (relative to the pod's log directory).
    pub log_path_relative: String,
    pub stdin: bool,
    /// Stdin closes when the first attached client that wrote to it detaches.
    #[serde(default)]
    pub stdin_once: bool,
    pub tty: bool,
    pub created_ns: i64,
    pub started_ns: i64,
    pub finished_ns: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// The CRI mounts, as the container's status reports them.
    #[serde(default)]
    pub mounts: Vec<MountRecord>,
}

/// One CRI mount of a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MountRecord {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    /// The CRI's `MountPropagation` value.
    pub propagation: i32,
}

impl ContainerRecord {
    pub fn state(&self) -> ContainerState {
        if self.finished_ns > 0 {
            ContainerState::Exited
        } else if self.started_ns > 0 {
            ContainerState::Running
        } else {
            ContainerState::Created
        }
    }

    /// The image lease of this container in the store (shared with `crx`'s leases).
    pub fn lease(&self) -> String {
        lease_of(&self.id)
    }

    /// Records the end of the container's main process, unless one is recorded already.
    pub fn finish(&mut self, exit_code: i32, reason: &str, message: &str) -> bool {
        if self.finished_ns > 0 {
            return false;
        }
        if self.started_ns == 0 {
            self.started_ns = now_ns();
        }
        self.finished_ns = now_ns();
        self.exit_code = exit_code;
        self.reason = reason.into();
        self.message = message.into();
        true
    }
}

/// The image lease name of container `id`.
pub fn lease_of(id: &str) -> String {
    format!("cri-{id}")
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// A new ID: 16 random bytes in hex.
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every record, in memory and on disk.
pub struct Records {
    dir: PathBuf,
    pub pods: BTreeMap<String, PodRecord>,
    pub containers: BTreeMap<String, ContainerRecord>,
}

impl Records {
    /// Loads the records under `<state_dir>/cri`; unreadable files are logged and skipped.
    pub fn load(state_dir: &Path) -> io::Result<Records> {
        let dir = state_dir.join("cri");
        for sub in ["pods", "containers"] {
            fs::DirBuilder::new()
                .recursive(true)
                .create(dir.join(sub))?;
        }
        Ok(Records {
            pods: load_all(&dir.join("pods"))?,
            containers: load_all(&dir.join("containers"))?,
            dir,
        })
    }

    pub fn save_pod(&mut self, pod: PodRecord) -> Result<(), Status> {
        write_json(&self.dir.join("pods").join(&pod.id), &pod)?;
        self.pods.insert(pod.id.clone(), pod);
        Ok(())
    }

    pub fn save_container(&mut self, container: ContainerRecord) -> Result<(), Status> {
        write_json(&self.dir.join("containers").join(&container.id), &container)?;
        self.containers.insert(container.id.clone(), container);
        Ok(())
    }

    pub fn remove_pod(&mut self, id: &str) -> Result<(), Status> {
        remove_json(&self.dir.join("pods").join(id))?;
        self.pods.remove(id);
        Ok(())
    }

    pub fn remove_container(&mut self, id: &str) -> Result<(), Status> {
        remove_json(&self.dir.join("containers").join(id))?;
        self.containers.remove(id);
        Ok(())
    }

    /// The full ID of the pod named by `id` or a unique prefix of it.
    pub fn pod_id(&self, id: &str) -> Result<String, Status> {
        resolve(self.pods.keys(), id, "pod sandbox")
    }

    /// The full ID of the container named by `id` or a unique prefix of it.
    pub fn container_id(&self, id: &str) -> Result<String, Status> {
        resolve(self.containers.keys(), id, "container")
    }

    pub fn containers_of<'a>(&'a self, pod: &'a str) -> impl Iterator<Item = &'a ContainerRecord> {
        self.containers.values().filter(move |c| c.pod_id == pod)
    }
}

fn resolve<'a>(
    ids: impl Iterator<Item = &'a String>,
    id: &str,
    what: &str,
) -> Result<String, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(format!("no {what} ID given")));
    }
    let found: Vec<&String> = ids.filter(|k| k.starts_with(id)).collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Status::not_found(format!("{what} {id:?} not found"))),
        _ => Err(Status::invalid_argument(format!(
            "{what} ID prefix {id:?} is ambiguous"
        ))),
    }
}

fn load_all<T: for<'de> Deserialize<'de>>(dir: &Path) -> io::Result<BTreeMap<String, T>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir)?.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        match fs::read(entry.path()).map(|b| serde_json::from_slice::<T>(&b)) {
            Ok(Ok(record)) => {
                out.insert(id.to_owned(), record);
            }
            Ok(Err(e)) => tracing::warn!(path = %entry.path().display(), "unreadable record: {e}"),
            Err(e) => tracing::warn!(path = %entry.path().display(), "unreadable record: {e}"),
        }
    }
    Ok(out)
}

fn write_json<T: Serialize>(base: &Path, value: &T) -> Result<(), Status> {
    let path = base.with_extension("json");
    let tmp = base.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).expect("records serialize");
    let written = (|| -> io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    })();
    written.map_err(|e| Status::internal(format!("writing {}: {e}", path.display())))
}

fn remove_json(base: &Path) -> Result<(), Status> {
    let path = base.with_extension("json");
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Status::internal(format!(
            "removing {}: {e}",
            path.display()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_resolve_by_unique_prefix() {
        let ids = ["abc1".to_string(), "abd2".to_string()];
        assert_eq!(resolve(ids.iter(), "abc", "pod").unwrap(), "abc1");
        assert_eq!(
            resolve(ids.iter(), "ab", "pod").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            resolve(ids.iter(), "x", "pod").unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(new_id().len(), 32);
    }

    #[test]
    fn records_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut records = Records::load(dir.path()).unwrap();
        let pod = PodRecord {
            id: "p1".into(),
            name: "web".into(),
            uid: "u".into(),
            namespace: "default".into(),
            attempt: 1,
            hostname: "web".into(),
            log_directory: String::new(),
            runtime_handler: String::new(),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            annotations: BTreeMap::new(),
            created_ns: now_ns(),
            ip: "10.0.0.2".into(),
            stopped: false,
            host_ports: vec![HostPort {
                host_ip: String::new(),
                host_port: 8080,
                container_port: 80,
            }],
        };
        records.save_pod(pod.clone()).unwrap();
        let again = Records::load(dir.path()).unwrap();
        assert_eq!(again.pods.get("p1"), Some(&pod));
        records.remove_pod("p1").unwrap();
        records.remove_pod("p1").unwrap();
        assert!(Records::load(dir.path()).unwrap().pods.is_empty());
    }
}
