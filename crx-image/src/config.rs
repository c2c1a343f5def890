//! Store and registry configuration: store root, insecure (plain HTTP) registries, mirrors,
//! and credentials from docker-style auth files, explicit entries or the environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Default store root.
pub const DEFAULT_ROOT: &str = "/var/lib/crx";

/// A username/password pair for one registry host.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.username)
    }
}

/// How to reach registries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryConfig {
    /// Registries reached over plain HTTP: `host` (any port) or `host:port`.
    pub insecure: Vec<String>,
    /// Registry host (as written in references, e.g. `registry.k8s.io`) → endpoint to fetch
    /// from instead (`127.0.0.1:5000`). Images keep their original names.
    pub mirrors: BTreeMap<String, String>,
    /// Docker-style `config.json` / `auth.json` (`{"auths": {"host": {"auth": base64}}}`).
    pub auth_file: Option<PathBuf>,
    /// Credentials by registry host (`host:port` as in the reference); win over `auth_file`.
    pub credentials: BTreeMap<String, Credential>,
    /// Bearer registry tokens by registry host; win over `credentials` and `auth_file`.
    pub tokens: BTreeMap<String, String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure: vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()],
            mirrors: BTreeMap::new(),
            auth_file: None,
            credentials: BTreeMap::new(),
            tokens: BTreeMap::new(),
        }
    }
}

impl RegistryConfig {
    /// Defaults plus the environment: `CRX_REGISTRY_AUTH_FILE` (or `REGISTRY_AUTH_FILE`) names
    /// an auth file; `CRX_INSECURE_REGISTRIES` and `CRX_REGISTRY_MIRRORS` (`host=endpoint`)
    /// are comma-separated additions.
    pub fn from_env() -> Self {
        let auth_file = std::env::var_os("CRX_REGISTRY_AUTH_FILE")
            .or_else(|| std::env::var_os("REGISTRY_AUTH_FILE"))
            .map(PathBuf::from);
        let mut cfg = RegistryConfig {
            auth_file,
            ..Default::default()
        };
        let list = |var| {
            std::env::var(var)
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        };
        cfg.insecure.extend(list("CRX_INSECURE_REGISTRIES"));
        for m in list("CRX_REGISTRY_MIRRORS") {
            if let Some((host, endpoint)) = m.split_once('=') {
                cfg.mirrors.insert(host.to_owned(), endpoint.to_owned());
            }
        }
        cfg
    }

    /// Whether `registry` (`host` or `host:port`) is reached over plain HTTP.
    pub fn is_insecure(&self, registry: &str) -> bool {
        let host = host_of(registry);
        self.insecure
            .iter()
            .any(|i| i == registry || (!has_port(i) && i == host))
    }

    /// Where to fetch images named under `registry`.
    pub fn endpoint<'a>(&'a self, registry: &'a str) -> &'a str {
        self.mirrors
            .get(registry)
            .map(String::as_str)
            .unwrap_or(registry)
    }

    /// Credentials for `registry`: explicit tokens, then explicit credentials, then the auth
    /// file.
    pub fn auth_for(&self, registry: &str) -> Result<RegistryAuth, Error> {
        if let Some(t) = self.tokens.get(registry) {
            return Ok(RegistryAuth::Bearer(t.clone()));
        }
        if let Some(c) = self.credentials.get(registry) {
            return Ok(RegistryAuth::Basic(c.username.clone(), c.password.clone()));
        }
        match &self.auth_file {
            Some(path) => auth_from_file(path, registry),
            None => Ok(RegistryAuth::Anonymous),
        }
    }
}

fn has_port(s: &str) -> bool {
    host_of(s) != s
}

/// `host` of `host:port`, keeping bracketed IPv6 literals whole.
fn host_of(registry: &str) -> &str {
    match registry.rfind(':') {
        Some(i) if !registry[i..].contains(']') => &registry[..i],
        _ => registry,
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    registrytoken: Option<String>,
}

fn auth_from_file(path: &Path, registry: &str) -> Result<RegistryAuth, Error> {
    let bad = |reason: String| Error::Malformed {
        what: format!("auth file {}", path.display()),
        reason,
    };
    let text = std::fs::read(path).map_err(Error::io("read auth file", path))?;
    let file: AuthFile = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    // Docker writes keys as `host`, `https://host` or `https://host/v1/`.
    let entry = file.auths.iter().find(|(k, _)| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.split('/').next() == Some(registry)
    });
    let Some((_, e)) = entry else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = &e.registrytoken {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    if let Some(auth) = &e.auth {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| bad(e.to_string()))?;
        let raw = String::from_utf8(raw).map_err(|e| bad(e.to_string()))?;
        let (u, p) = raw
            .split_once(':')
            .ok_or_else(|| bad(format!("auth for {registry} is not user:password")))?;
        return Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned()));
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_hosts_match_any_port_unless_pinned() {
        let mut cfg = RegistryConfig::default();
        cfg.insecure.push("reg.internal:5000".into());
        assert!(cfg.is_insecure("localhost:5000"));
        assert!(cfg.is_insecure("127.0.0.1"));
        assert!(cfg.is_insecure("[::1]:443"));
        assert!(cfg.is_insecure("reg.internal:5000"));
        assert!(!cfg.is_insecure("reg.internal:5001"));
        assert!(!cfg.is_insecure("docker.io"));
    }

    #[test]
    fn reads_docker_auth_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(&path, format!(r#"{{"auths":{{"https://reg.example:5000/v1/":{{"auth":"{b64}"}},"tok.example":{{"registrytoken":"T"}}}}}}"#)).unwrap();
        let cfg = RegistryConfig {
            auth_file: Some(path),
            ..Default::default()
        };
        assert!(
            matches!(cfg.auth_for("reg.example:5000").unwrap(), RegistryAuth::Basic(u, p) if u == "alice" && p == "s3cret")
        );
        assert!(
            matches!(cfg.auth_for("tok.example").unwrap(), RegistryAuth::Bearer(t) if t == "T")
        );
        assert!(matches!(
            cfg.auth_for("other").unwrap(),
            RegistryAuth::Anonymous
        ));
    }
}
