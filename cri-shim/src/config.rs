//! crx-cri's configuration: the TOML file (`/etc/crx/config.toml` unless `--config` names
//! another; [`EXAMPLE`] shows every key with its default), every key optional, command-line
//! flags over it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration file with every key, its meaning and its default (also in `--help`).
pub const EXAMPLE: &str = r#"Configuration file (TOML; every key optional, defaults shown):

  listen = "unix:///run/crx/crx.sock"  # the CRI socket (made 0600, its directory 0700)
  state_dir = "/run/crx"               # this instance's runtime state (sandboxes)
  log_level = "info"                   # tracing filter: "debug", "crx_cri=debug,info", ...
  streaming_address = "127.0.0.1:0"    # Exec/Attach sessions (one-time URLs); port 0: any free

  [runtime]
  handler = "crx"              # the RuntimeClass handler name this runtime answers to
  # vmm = "/usr/local/bin/crx-vmm"                  # default: crx-vmm beside crx-cri
  # kernel = "/usr/local/share/crx/guest/vmlinux"   # default: crx-vmm's (the installed guest)
  # initrd = "/usr/local/share/crx/guest/initrd.cpio"
  agent = "/bin/crx-agent"     # the pod VM's init, a path inside the initrd
  vcpus = 1                    # default pod VM size
  memory_mib = 128
  boot_timeout_secs = 60       # how long a pod VM may take to boot and answer
  templates = true             # restore pod VMs from a snapshot of one booted VM of their
                               # shape (made on first use); false boots every pod VM cold

  [network]
  cni_conf_dir = "/etc/cni/net.d"
  cni_bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]

  [image]
  root = "/var/lib/crx"        # the image store, shared with `crx`
  insecure_registries = []     # plain-HTTP registries, "host" or "host:port"; loopback always is
  # auth_file = "/etc/crx/auth.json"   # docker-style {"auths": {...}} for pulls without credentials
  [image.mirrors]              # fetch images named under a registry from another endpoint
  # "registry.k8s.io" = "127.0.0.1:5000"
"#;

/// Where the configuration file is read from unless `--config` says otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/crx/config.toml";
/// The default CRI endpoint.
pub const DEFAULT_LISTEN: &str = "unix:///run/crx/crx.sock";

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("in {path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("listen = {listen:?}: only unix:// endpoints are served, not {scheme}://")]
    NotUnix { listen: String, scheme: String },
    #[error("listen = {0:?}: the socket path must be absolute")]
    RelativeSocket(String),
    #[error("streaming_address = {0:?}: not an IP:PORT address")]
    StreamingAddress(String),
    #[error("runtime.handler must not be empty")]
    NoHandler,
    #[error("runtime.vcpus and runtime.memory_mib must be positive")]
    NoVmSize,
}

/// The whole configuration, as the file says it (and as `crictl info` shows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `unix:///path` (or a bare path) of the CRI socket.
    pub listen: String,
    /// This instance's runtime state (sandboxes); one per instance.
    pub state_dir: PathBuf,
    /// A `tracing` filter directive.
    pub log_level: String,
    /// `IP:PORT` of the streaming server for Exec and Attach (port 0: any free one).
    pub streaming_address: String,
    pub runtime: RuntimeConfig,
    pub network: NetworkConfig,
    pub image: ImageConfig,
}

/// How pod VMs are made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// The RuntimeClass handler name (`handler:` of a Kubernetes RuntimeClass).
    pub handler: String,
    /// The `crx-vmm` binary; `None`: beside `crx-cri`.
    pub vmm: Option<PathBuf>,
    /// Guest kernel; `None`: crx-vmm's default (the installed guest).
    pub kernel: Option<PathBuf>,
    /// Guest initrd; `None`: crx-vmm's default.
    pub initrd: Option<PathBuf>,
    /// The guest agent, the pod VM's init (a path inside the initrd).
    pub agent: PathBuf,
    /// Default vCPUs of a pod VM.
    pub vcpus: u8,
    /// Default memory of a pod VM.
    pub memory_mib: u32,
    /// How long a pod VM may take to boot and answer.
    pub boot_timeout_secs: u64,
    /// Restore pod VMs from pod templates ([`crx_runtime::template`]); false: boot each cold.
    pub templates: bool,
}

/// Where pod networking finds its CNI configuration and plugins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
}

/// The image store and how registries are reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    /// The store root (shared with `crx`).
    pub root: PathBuf,
    /// Registries reached over plain HTTP, in addition to loopback: `host` or `host:port`.
    pub insecure_registries: Vec<String>,
    /// Registry host as images name it → endpoint to fetch from.
    pub mirrors: BTreeMap<String, String>,
    /// Docker-style auth file used when a pull request carries no credentials.
    pub auth_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.into(),
            state_dir: PathBuf::from(crx_runtime::sandbox::DEFAULT_RUN_ROOT),
            log_level: "info".into(),
            streaming_address: "127.0.0.1:0".into(),
            runtime: RuntimeConfig::default(),
            network: NetworkConfig::default(),
            image: ImageConfig::default(),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            handler: "crx".into(),
            vmm: None,
            kernel: None,
            initrd: None,
            agent: PathBuf::from(crx_runtime::sandbox::AGENT_INIT),
            vcpus: 1,
            memory_mib: 128,
            boot_timeout_secs: 60,
            templates: true,
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            root: PathBuf::from(crx_image::DEFAULT_ROOT),
            insecure_registries: Vec::new(),
            mirrors: BTreeMap::new(),
            auth_file: None,
        }
    }
}

impl RuntimeConfig {
    /// The `crx-vmm` binary: the configured one, else the one beside this program.
    pub fn vmm_path(&self) -> std::io::Result<PathBuf> {
        match &self.vmm {
            Some(vmm) => Ok(vmm.clone()),
            None => Ok(std::env::current_exe()?.with_file_name("crx-vmm")),
        }
    }
}

impl Config {
    /// Where the streaming server listens.
    pub fn streaming_address(&self) -> Result<std::net::SocketAddr, ConfigError> {
        self.streaming_address
            .parse()
            .map_err(|_| ConfigError::StreamingAddress(self.streaming_address.clone()))
    }

    /// Read `path`; with `required` false a missing file means the defaults.
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.check().map_err(|e| ConfigError::InFile {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        Ok(config)
    }

    /// Values that would only fail later.
    pub fn check(&self) -> Result<(), ConfigError> {
        socket_path(&self.listen)?;
        self.streaming_address()?;
        if self.runtime.handler.is_empty() {
            return Err(ConfigError::NoHandler);
        }
        if self.runtime.vcpus == 0 || self.runtime.memory_mib == 0 {
            return Err(ConfigError::NoVmSize);
        }
        Ok(())
    }

    /// The socket path of `listen`.
    pub fn socket(&self) -> PathBuf {
        socket_path(&self.listen).expect("checked when the configuration was made")
    }

    /// How the image store reaches registries: loopback and the configured insecure
    /// registries over HTTP, the mirrors, the auth file.
    pub fn registry(&self) -> crx_image::RegistryConfig {
        let mut registry = crx_image::RegistryConfig::default();
        registry
            .insecure
            .extend(self.image.insecure_registries.iter().cloned());
        registry.mirrors = self.image.mirrors.clone();
        registry.auth_file = self.image.auth_file.clone();
        registry
    }
}

/// `unix:///run/x.sock` or `/run/x.sock` → the path; anything else is refused.
fn socket_path(listen: &str) -> Result<PathBuf, ConfigError> {
    let path = match listen.split_once("://") {
        Some(("unix", path)) => path,
        Some((scheme, _)) => {
            return Err(ConfigError::NotUnix {
                listen: listen.to_owned(),
                scheme: scheme.to_owned(),
            })
        }
        None => listen,
    };
    if !path.starts_with('/') {
        return Err(ConfigError::RelativeSocket(listen.to_owned()));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_a_partial_file() {
        let c: Config = toml::from_str(
            "listen = \"unix:///run/a/b.sock\"\n[image]\nroot = \"/srv/img\"\n[image.mirrors]\n\"registry.k8s.io\" = \"127.0.0.1:5000\"\n",
        )
        .unwrap();
        c.check().unwrap();
        assert_eq!(c.socket(), PathBuf::from("/run/a/b.sock"));
        assert_eq!(c.image.root, PathBuf::from("/srv/img"));
        assert_eq!(c.runtime, RuntimeConfig::default());
        let r = c.registry();
        assert_eq!(r.endpoint("registry.k8s.io"), "127.0.0.1:5000");
        assert!(r.is_insecure("127.0.0.1:5000"));
        assert!(!r.is_insecure("registry.k8s.io"));
    }

    #[test]
    fn refuses_unknown_keys_and_bad_endpoints() {
        assert!(toml::from_str::<Config>("lsten = \"x\"").is_err());
        assert!(toml::from_str::<Config>("[runtime]\ncpus = 2").is_err());
        for bad in ["tcp://127.0.0.1:1", "unix://relative.sock", "x.sock"] {
            let c = Config {
                listen: bad.into(),
                ..Config::default()
            };
            assert!(c.check().is_err(), "{bad}");
        }
        let c = Config {
            listen: "/run/x.sock".into(),
            ..Config::default()
        };
        assert_eq!(c.socket(), PathBuf::from("/run/x.sock"));
    }

    #[test]
    fn the_example_is_the_defaults() {
        let toml = EXAMPLE.split_once("\n\n").unwrap().1;
        assert_eq!(toml::from_str::<Config>(toml).unwrap(), Config::default());
    }

    #[test]
    fn a_missing_default_file_means_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("config.toml");
        assert_eq!(Config::load(&missing, false).unwrap(), Config::default());
        assert!(Config::load(&missing, true).is_err());
    }
}
