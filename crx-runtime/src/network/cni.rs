//! The runtime side of the CNI protocol (spec 0.3.0 – 1.1.0): network configuration lists
//! loaded from a configuration directory, and plugin chains executed as the spec says — each
//! plugin a process found in the plugin directories, told the operation through `CNI_*`
//! environment variables, given its configuration (with the list's `name` and `cniVersion`, and
//! the previous plugin's result as `prevResult`) on stdin, answering on stdout. ADD runs the
//! chain in order and returns the last result; DEL runs it in reverse with the cached ADD
//! result. The specification's types come from `rscni-types`; what goes between plugins stays
//! raw JSON, so nothing a plugin returned is lost on the way to the next.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rscni_types::error::Error as SpecError;
use rscni_types::types::{CNIResultWithVersion, ErrorResult, NetConf, NetConfList};
use rscni_types::version::SpecVersion;
use serde_json::Value;

/// Why a CNI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("cannot read CNI configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI configuration {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("no CNI network configuration (*.conflist, *.conf, *.json) in {0}")]
    NoConfig(PathBuf),
    #[error("no CNI network named {name:?} in {dir}")]
    NoNetwork { name: String, dir: PathBuf },
    #[error("CNI plugin {plugin:?} is in none of {dirs}")]
    PluginNotFound { plugin: String, dirs: String },
    #[error("cannot run CNI plugin {path}: {source}")]
    Exec {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI {command} of plugin {plugin} failed: {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
    #[error("CNI {command} of plugin {plugin} printed an unreadable result: {reason}")]
    BadResult {
        plugin: String,
        command: &'static str,
        reason: String,
    },
}

/// Who a CNI operation is for: the `CNI_*` environment of every plugin in the chain.
#[derive(Debug, Clone)]
pub struct Attachment<'a> {
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    /// `CNI_ARGS`, as `KEY=VALUE` pairs.
    pub args: &'a [(String, String)],
    /// `CNI_PATH`: where plugins are looked up.
    pub bin_dirs: &'a [PathBuf],
}

/// The network configuration list named `name` in `dir` or, with no name, the first file in
/// name order (the convention of libcni and the CRI runtimes). A `.conf` or `.json` file holds
/// one plugin's configuration and becomes a list of one. A file that does not parse is an
/// error, not skipped.
pub fn load(dir: &Path, name: Option<&str>) -> Result<NetConfList, CniError> {
    let entries = fs::read_dir(dir).map_err(|source| CniError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    for path in &files {
        let list = load_file(path)?;
        if name.is_none_or(|name| name == list.name) {
            return Ok(list);
        }
    }
    Err(match name {
        Some(name) => CniError::NoNetwork {
            name: name.to_owned(),
            dir: dir.to_owned(),
        },
        None => CniError::NoConfig(dir.to_owned()),
    })
}

fn load_file(path: &Path) -> Result<NetConfList, CniError> {
    let bytes = fs::read(path).map_err(|source| CniError::Read {
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: String| CniError::Config {
        path: path.to_owned(),
        reason,
    };
    let list = if path.extension().is_some_and(|e| e == "conflist") {
        serde_json::from_slice::<NetConfList>(&bytes).map_err(|e| bad(e.to_string()))?
    } else {
        let conf: NetConf = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        NetConfList {
            cni_version: conf.cni_version.clone(),
            cni_versions: Vec::new(),
            name: conf.name.clone(),
            disable_check: false,
            disable_gc: false,
            load_only_inlined_plugins: false,
            plugins: vec![conf],
        }
    };
    check(&list).map_err(bad)?;
    Ok(list)
}

/// What the runtime relies on: a valid name, a supported version, plugins that name plain
/// executables.
fn check(list: &NetConfList) -> Result<(), String> {
    let valid_name = list
        .name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && list
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid_name {
        return Err(format!("invalid network name {:?}", list.name));
    }
    let version = list.version().map_err(|e| e.to_string())?;
    if !version.is_supported() {
        return Err(format!(
            "cniVersion {version} is older than 0.3.0, which CRX does not speak"
        ));
    }
    if list.plugins.is_empty() {
        return Err("no plugins".into());
    }
    for plugin in &list.plugins {
        let t = &plugin.r#type;
        if t.is_empty() || t.contains('/') || t == "." || t == ".." {
            return Err(format!("invalid plugin type {t:?}"));
        }
    }
    Ok(())
}

/// Runs ADD through the chain; returns the last plugin's result, as it printed it.
pub fn add(list: &NetConfList, at: &Attachment<'_>) -> Result<Value, CniError> {
    let version = list_version(list);
    let mut prev: Option<Value> = None;
    for plugin in &list.plugins {
        let stdin = plugin_config(list, plugin, version, prev.as_ref());
        let out = exec(plugin, "ADD", at, &stdin)?;
        let bad = |reason: String| CniError::BadResult {
            plugin: plugin.r#type.clone(),
            command: "ADD",
            reason,
        };
        let result: Value = serde_json::from_slice(&out).map_err(|e| bad(e.to_string()))?;
        serde_json::from_value::<CNIResultWithVersion>(result.clone())
            .map_err(|e| bad(e.to_string()))?;
        prev = Some(result);
    }
    Ok(prev.expect("a checked list has plugins"))
}

/// Runs DEL through the chain in reverse, each plugin given the cached ADD result (from spec
/// 0.4.0 on). Plugins succeed on what is already gone, so DEL may be repeated. Unlike ADD, a
/// failing plugin does not stop the others (what they hold is released all the same); the
/// first failure is returned.
pub fn del(
    list: &NetConfList,
    at: &Attachment<'_>,
    cached: Option<&Value>,
) -> Result<(), CniError> {
    let version = list_version(list);
    let prev = cached.filter(|_| version >= SpecVersion::new(0, 4, 0));
    let mut first_error = None;
    for plugin in list.plugins.iter().rev() {
        let stdin = plugin_config(list, plugin, version, prev);
        if let Err(e) = exec(plugin, "DEL", at, &stdin) {
            tracing::warn!(container = at.container_id, "{e}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn list_version(list: &NetConfList) -> SpecVersion {
    list.version().expect("checked when loaded")
}

/// One plugin's stdin: its configuration with the list's name and version, and `prevResult`.
fn plugin_config(
    list: &NetConfList,
    plugin: &NetConf,
    version: SpecVersion,
    prev: Option<&Value>,
) -> Vec<u8> {
    let mut conf = serde_json::to_value(plugin).expect("a NetConf serializes");
    let object = conf.as_object_mut().expect("a NetConf is an object");
    object.insert("name".into(), Value::String(list.name.clone()));
    object.insert("cniVersion".into(), Value::String(version.to_string()));
    object.remove("prevResult");
    if let Some(prev) = prev {
        object.insert("prevResult".into(), prev.clone());
    }
    serde_json::to_vec(&conf).expect("JSON serializes")
}

/// The plugin `name` (a configuration's `type`) in the first of `bin_dirs` that has it.
pub fn find_plugin(name: &str, bin_dirs: &[PathBuf]) -> Result<PathBuf, CniError> {
    bin_dirs
        .iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| CniError::PluginNotFound {
            plugin: name.to_owned(),
            dirs: join_paths(bin_dirs),
        })
}

/// Finds the plugin, runs `command` with `stdin`, and returns its stdout on success.
fn exec(
    plugin: &NetConf,
    command: &'static str,
    at: &Attachment<'_>,
    stdin: &[u8],
) -> Result<Vec<u8>, CniError> {
    let path = find_plugin(&plugin.r#type, at.bin_dirs)?;
    let args: Vec<String> = at.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut cmd = Command::new(&path);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", at.container_id)
        .env("CNI_NETNS", at.netns)
        .env("CNI_IFNAME", at.ifname)
        .env("CNI_PATH", join_paths(at.bin_dirs))
        .env("CNI_ARGS", args.join(";"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tracing::debug!(plugin = %path.display(), command, container = at.container_id, "CNI");
    let spawn_error = |source| CniError::Exec {
        path: path.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_error)?;
    let mut input = child.stdin.take().expect("piped");
    let stdin = stdin.to_vec();
    // Written from a thread: a plugin may print before it has read all of its input. A failed
    // write (a plugin that exits early) shows in the plugin's own status and output.
    let writer = std::thread::spawn(move || input.write_all(&stdin));
    let output = child.wait_with_output().map_err(spawn_error)?;
    let _ = writer.join();
    if output.status.success() {
        return Ok(output.stdout);
    }
    let message = match serde_json::from_slice::<ErrorResult>(&output.stdout) {
        Ok(result) => SpecError::from(result).to_string(),
        Err(_) => [
            output.status.to_string(),
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ]
        .into_iter()
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("; "),
    };
    Err(CniError::Plugin {
        plugin: plugin.r#type.clone(),
        command,
        message,
    })
}

fn join_paths(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn the_first_file_by_name_or_the_named_network_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "20-b.conflist",
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge","bridge":"br1"}]}"#,
        );
        write(
            dir.path(),
            "10-a.conf",
            r#"{"cniVersion":"0.4.0","name":"a","type":"ptp","ipMasq":true}"#,
        );
        write(dir.path(), "README", "not a config");
        let first = load(dir.path(), None).unwrap();
        assert_eq!((first.name.as_str(), first.plugins.len()), ("a", 1));
        assert_eq!(first.plugins[0].r#type, "ptp");
        let b = load(dir.path(), Some("b")).unwrap();
        assert_eq!(b.plugins[0].custom["bridge"], "br1");
        assert!(matches!(
            load(dir.path(), Some("c")),
            Err(CniError::NoNetwork { .. })
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(empty.path(), None),
            Err(CniError::NoConfig(_))
        ));
    }

    #[test]
    fn bad_configurations_are_refused() {
        for (text, why) in [
            (
                r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"../bin/sh"}]}"#,
                "plugin type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
                "no plugins",
            ),
            (
                r#"{"cniVersion":"0.2.0","name":"x","plugins":[{"type":"bridge"}]}"#,
                "older",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"-x","plugins":[{"type":"bridge"}]}"#,
                "network name",
            ),
            (r#"{"name":"x","plugins":"#, "EOF"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "a.conflist", text);
            let err = load(dir.path(), None).unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn plugin_config_carries_the_list_name_version_and_previous_result() {
        let list: NetConfList = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[
                {"type":"bridge","bridge":"br0","ipam":{"type":"host-local","ranges":[[{"subnet":"10.1.0.0/24"}]]}},
                {"type":"loopback"}]}"#,
        )
        .unwrap();
        let prev =
            serde_json::json!({"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"}],"extra":1});
        let conf: Value = serde_json::from_slice(&plugin_config(
            &list,
            &list.plugins[0],
            SpecVersion::new(1, 0, 0),
            Some(&prev),
        ))
        .unwrap();
        assert_eq!(conf["name"], "net");
        assert_eq!(conf["cniVersion"], "1.0.0");
        assert_eq!(conf["bridge"], "br0");
        assert_eq!(conf["ipam"]["ranges"][0][0]["subnet"], "10.1.0.0/24");
        assert_eq!(conf["prevResult"], prev);
        let first: Value = serde_json::from_slice(&plugin_config(
            &list,
            &list.plugins[1],
            SpecVersion::new(1, 0, 0),
            None,
        ))
        .unwrap();
        assert!(first.get("prevResult").is_none());
    }

    /// A real plugin (Debian's host-local) refusing its configuration: its error result comes
    /// back as the error. It stops at the configuration, so nothing on the host changes.
    #[test]
    fn a_plugin_error_result_is_reported() {
        let bin = Path::new("/usr/lib/cni");
        assert!(
            bin.join("host-local").exists(),
            "/usr/lib/cni/host-local is missing (Debian package containernetworking-plugins)"
        );
        let list: NetConfList = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"host-local"}]}"#,
        )
        .unwrap();
        let at = Attachment {
            container_id: "c",
            netns: Path::new("/run/netns/none"),
            ifname: "eth0",
            args: &[("IgnoreUnknown".into(), "1".into())],
            bin_dirs: &[bin.to_owned()],
        };
        let err = add(&list, &at).unwrap_err();
        match &err {
            CniError::Plugin {
                plugin,
                command: "ADD",
                message,
            } => {
                assert_eq!(plugin, "host-local");
                assert!(message.contains("ipam"), "{message}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_missing_plugin_is_named() {
        let list: NetConfList = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"no-such-plugin"}]}"#,
        )
        .unwrap();
        let bin = tempfile::tempdir().unwrap();
        let at = Attachment {
            container_id: "c",
            netns: Path::new("/run/netns/none"),
            ifname: "eth0",
            args: &[],
            bin_dirs: &[bin.path().to_owned()],
        };
        let err = add(&list, &at).unwrap_err();
        assert!(
            matches!(&err, CniError::PluginNotFound { plugin, .. } if plugin == "no-such-plugin"),
            "{err}"
        );
    }
}
