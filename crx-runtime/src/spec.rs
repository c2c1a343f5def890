//! A container's OCI runtime spec: the image's run config (entrypoint, command, environment,
//! working directory, user), then what the caller overrides, with user and group names
//! resolved in the image's own `/etc/passwd` and `/etc/group`. Those files are opened with
//! `RESOLVE_IN_ROOT`, so an image whose `/etc/passwd` is a link out of its root cannot make
//! the host read its own. The security context (capabilities, privileged, read-only root,
//! masked and read-only paths, no_new_privs, seccomp, the pid namespace) has containerd's
//! defaults unless the caller says otherwise.

use std::io::Read;
use std::path::{Path, PathBuf};

use crx_image::RunConfig;
use oci_spec::runtime::{
    Capabilities, Capability, Linux, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxMemoryBuilder,
    LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, LinuxSeccomp,
    ProcessBuilder, RootBuilder, Spec, UserBuilder,
};
use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};

/// What the image leaves unset.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a spec could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("no command: the image has neither Entrypoint nor Cmd, and none was given")]
    NoCommand,
    #[error("environment entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown capability {0:?}")]
    UnknownCapability(String),
    #[error("invalid spec: {0}")]
    Build(#[from] oci_spec::OciSpecError),
}

/// The capabilities a container gets by default: containerd's (and Docker's) set.
const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Which processes a container's processes see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PidNamespace {
    /// Its own: its main process is PID 1 (Kubernetes' CONTAINER).
    #[default]
    Container,
    /// The one its pod's containers share, whose PID 1 is the agent's pause process (POD).
    Pod,
    /// The VM's, where the agent is PID 1 (NODE: a pod VM is the node its containers see).
    Vm,
    /// That of the running container with this id (TARGET).
    Target(String),
}

/// How a container is confined. The default is containerd's: its default capabilities, the
/// default masked and read-only paths, a writable root, no seccomp profile, its own pid
/// namespace.
#[derive(Debug, Clone, Default)]
pub struct SecurityContext {
    /// Every capability, no masked or read-only paths, writable `/sys` and cgroup file system,
    /// no seccomp profile; devices stay the default set (the VM's are not passed through).
    pub privileged: bool,
    /// Added to the default set: names with or without `CAP_`, or `ALL`.
    pub add_capabilities: Vec<String>,
    /// Dropped from the default set: names, or `ALL`.
    pub drop_capabilities: Vec<String>,
    pub readonly_rootfs: bool,
    /// Paths hidden from the container; `None` keeps the default list.
    pub masked_paths: Option<Vec<String>>,
    /// Paths the container sees read-only; `None` keeps the default list.
    pub readonly_paths: Option<Vec<String>>,
    pub no_new_privs: bool,
    /// Groups added to the process's supplementary groups.
    pub supplemental_groups: Vec<u32>,
    pub pid_namespace: PidNamespace,
    pub seccomp: Seccomp,
}

/// A container's seccomp profile (Kubernetes' choice of one).
#[derive(Debug, Clone, Default)]
pub enum Seccomp {
    /// None.
    #[default]
    Unconfined,
    /// [`crate::seccomp::runtime_default`] for the capabilities the container gets.
    RuntimeDefault,
    /// This one (a Localhost profile, as read from its file).
    Profile(LinuxSeccomp),
}

impl SecurityContext {
    /// The capability set the container's processes get.
    pub fn capabilities(&self) -> Result<Capabilities, SpecError> {
        let all = || -> Result<Capabilities, SpecError> {
            caps::all()
                .iter()
                .map(|c| parse_capability(&c.to_string()))
                .collect()
        };
        if self.privileged {
            return all();
        }
        let mut set: Capabilities = DEFAULT_CAPABILITIES.into_iter().collect();
        let is_all = |name: &String| name.eq_ignore_ascii_case("ALL");
        // containerd's order: ALL added, ALL dropped, then each named one added, then each
        // dropped (so `drop: [ALL], add: [NET_ADMIN]` leaves NET_ADMIN).
        if self.add_capabilities.iter().any(is_all) {
            set = all()?;
        }
        if self.drop_capabilities.iter().any(is_all) {
            set.clear();
        }
        for name in self.add_capabilities.iter().filter(|n| !is_all(n)) {
            set.insert(parse_capability(name)?);
        }
        for name in self.drop_capabilities.iter().filter(|n| !is_all(n)) {
            set.remove(&parse_capability(name)?);
        }
        Ok(set)
    }

    fn apply(&self, spec: &mut Spec) -> Result<(), SpecError> {
        let caps = self.capabilities()?;
        let seccomp = match &self.seccomp {
            _ if self.privileged => None,
            Seccomp::Unconfined => None,
            Seccomp::RuntimeDefault => Some(crate::seccomp::runtime_default(
                &caps.iter().copied().collect::<Vec<_>>(),
            )),
            Seccomp::Profile(profile) => Some(profile.clone()),
        };
        if let Some(process) = spec.process_mut() {
            process.set_capabilities(Some(
                LinuxCapabilitiesBuilder::default()
                    .bounding(caps.clone())
                    .effective(caps.clone())
                    .permitted(caps)
                    .inheritable(Capabilities::new())
                    .ambient(Capabilities::new())
                    .build()?,
            ));
            process.set_no_new_privileges(Some(self.no_new_privs && !self.privileged));
            let user = process.user_mut();
            let mut groups = user.additional_gids().clone().unwrap_or_default();
            for gid in &self.supplemental_groups {
                if !groups.contains(gid) && *gid != user.gid() {
                    groups.push(*gid);
                }
            }
            user.set_additional_gids(Some(groups));
        }
        if let Some(root) = spec.root_mut() {
            root.set_readonly(Some(self.readonly_rootfs));
        }
        if self.privileged {
            for mount in spec.mounts_mut().iter_mut().flatten() {
                if ["/sys", "/sys/fs/cgroup"].contains(&mount.destination().to_str().unwrap_or(""))
                {
                    let options = mount.options().clone().unwrap_or_default();
                    mount.set_options(Some(options.into_iter().filter(|o| o != "ro").collect()));
                }
            }
        }
        let mut linux = spec
            .linux()
            .clone()
            .unwrap_or(LinuxBuilder::default().build()?);
        if self.privileged {
            linux.set_masked_paths(Some(Vec::new()));
            linux.set_readonly_paths(Some(Vec::new()));
        } else {
            if let Some(paths) = &self.masked_paths {
                linux.set_masked_paths(Some(paths.clone()));
            }
            if let Some(paths) = &self.readonly_paths {
                linux.set_readonly_paths(Some(paths.clone()));
            }
        }
        linux.set_seccomp(seccomp);
        set_pid_namespace(&mut linux, &self.pid_namespace)?;
        spec.set_linux(Some(linux));
        Ok(())
    }
}

/// Puts the processes of a container with settings `linux` in `namespace`: a `pid` entry
/// without a path (its own), with the agent's path for the pod's or a container's, or none (the
/// VM's).
pub fn set_pid_namespace(linux: &mut Linux, namespace: &PidNamespace) -> Result<(), SpecError> {
    let mut namespaces: Vec<LinuxNamespace> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|ns| ns.typ() != LinuxNamespaceType::Pid)
        .collect();
    let path = match namespace {
        PidNamespace::Container => Some(None),
        PidNamespace::Pod => Some(Some(crx_agent_proto::POD_PID_NAMESPACE.to_owned())),
        PidNamespace::Target(id) => Some(Some(crx_agent_proto::container_pid_namespace(id))),
        PidNamespace::Vm => None,
    };
    if let Some(path) = path {
        let mut pid = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Pid);
        if let Some(path) = path {
            pid = pid.path(path);
        }
        namespaces.push(pid.build()?);
    }
    linux.set_namespaces(Some(namespaces));
    Ok(())
}

/// A capability by name, with or without `CAP_`, any case.
fn parse_capability(name: &str) -> Result<Capability, SpecError> {
    serde_json::from_value(serde_json::Value::String(name.to_owned()))
        .map_err(|_| SpecError::UnknownCapability(name.to_owned()))
}

/// The caller's side of a container: empty fields keep what the image says.
#[derive(Debug, Clone, Default)]
pub struct ProcessOverrides {
    /// Replaces the image's Entrypoint; the image's Cmd then goes too (Kubernetes' `command`).
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's Cmd (its Entrypoint stays, as with `docker run IMAGE ARGS`).
    pub args: Vec<String>,
    /// `KEY=VALUE`, added to (or replacing keys of) the image's environment.
    pub env: Vec<String>,
    pub cwd: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
    pub terminal: bool,
    pub hostname: Option<String>,
    /// memory.max of the container's cgroup, bytes.
    pub memory_limit: Option<i64>,
    pub security: SecurityContext,
}

/// The environment of an exec'd process: `env`, with the default `PATH` first unless `env`
/// has its own.
pub fn exec_env(mut env: Vec<String>) -> Vec<String> {
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.into());
    }
    env
}

/// The spec for a container of the image with run config `image` whose root filesystem is the
/// host directory `rootfs`.
pub fn container_spec(
    rootfs: &Path,
    image: &RunConfig,
    overrides: &ProcessOverrides,
) -> Result<Spec, SpecError> {
    let mut args = overrides
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.entrypoint.clone());
    if !overrides.args.is_empty() {
        args.extend(overrides.args.iter().cloned());
    } else if overrides.entrypoint.is_none() {
        args.extend(image.cmd.iter().cloned());
    }
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }

    let mut env: Vec<String> = Vec::new();
    let mut set = |entry: &str| -> Result<(), SpecError> {
        let (key, _) = entry
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| SpecError::BadEnv(entry.to_owned()))?;
        env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(key));
        env.push(entry.to_owned());
        Ok(())
    };
    set(DEFAULT_PATH)?;
    if overrides.terminal {
        set("TERM=xterm")?;
    }
    for entry in image.env.iter().chain(&overrides.env) {
        set(entry)?;
    }

    let cwd = overrides
        .cwd
        .clone()
        .or_else(|| Some(image.working_dir.clone()).filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/".into());
    let user = overrides.user.as_deref().unwrap_or(&image.user);
    let (uid, gid, additional) = resolve_user(rootfs, user)?;

    let process = ProcessBuilder::default()
        .terminal(overrides.terminal)
        .args(args)
        .env(env)
        .cwd(cwd)
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .additional_gids(additional)
                .build()?,
        )
        .build()?;
    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()?,
    ));
    spec.set_hostname(overrides.hostname.clone());
    if let Some(limit) = overrides.memory_limit {
        let mut linux = spec
            .linux()
            .clone()
            .unwrap_or(LinuxBuilder::default().build()?);
        linux.set_resources(Some(
            LinuxResourcesBuilder::default()
                .memory(LinuxMemoryBuilder::default().limit(limit).build()?)
                .build()?,
        ));
        spec.set_linux(Some(linux));
    }
    overrides.security.apply(&mut spec)?;
    Ok(spec)
}

/// `user[:group]` → uid, gid and the user's supplementary groups. Numeric ids need no entry
/// in the image's files; an empty user is root.
fn resolve_user(rootfs: &Path, spec: &str) -> Result<(u32, u32, Vec<u32>), SpecError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let passwd = read_in_root(rootfs, "etc/passwd")?;
    // name:password:uid:gid:gecos:home:shell
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && (f[0] == user || (user.parse::<u32>().is_ok() && f[2] == user)));
    let (uid, primary_gid, name) = match (&entry, user.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse()
                .map_err(|_| SpecError::UnknownUser(user.into()))?,
            f[3].parse()
                .map_err(|_| SpecError::UnknownUser(user.into()))?,
            Some(f[0].to_owned()),
        ),
        (None, Ok(uid)) => (uid, uid, None),
        (None, Err(_)) => return Err(SpecError::UnknownUser(user.into())),
    };
    let groups = read_in_root(rootfs, "etc/group")?;
    // name:password:gid:member,member
    let group_entries: Vec<Vec<&str>> = groups
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let gid = match group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| SpecError::UnknownGroup(g.into()))?,
        },
    };
    let additional = match &name {
        Some(name) => group_entries
            .iter()
            .filter(|f| f[3].split(',').any(|m| m == name))
            .filter_map(|f| f[2].parse().ok())
            .filter(|g| *g != gid)
            .collect(),
        None => Vec::new(),
    };
    Ok((uid, gid, additional))
}

/// The file `relative` inside `rootfs`, every link resolved as if `rootfs` were `/`; a missing
/// file reads as empty.
fn read_in_root(rootfs: &Path, relative: &str) -> Result<String, SpecError> {
    let failed = |source: std::io::Error| SpecError::Read {
        path: rootfs.join(relative),
        source,
    };
    let root = rustix::fs::openat(
        CWD,
        rootfs,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| failed(e.into()))?;
    let file = match rustix::fs::openat2(
        &root,
        relative,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(String::new()),
        Err(e) => return Err(failed(e.into())),
    };
    let mut text = String::new();
    std::fs::File::from(file)
        .take(1 << 20)
        .read_to_string(&mut text)
        .map_err(failed)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nwheel:x:10:app\naudio:x:29:app,root\n",
        )
        .unwrap();
        dir
    }

    fn image() -> RunConfig {
        RunConfig {
            entrypoint: vec!["/bin/tini".into()],
            cmd: vec!["serve".into()],
            env: vec!["PATH=/app/bin".into(), "MODE=prod".into()],
            working_dir: "/app".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn image_settings_apply_and_overrides_win() {
        let root = rootfs();
        let spec = container_spec(root.path(), &image(), &ProcessOverrides::default()).unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_ref().unwrap(), &["/bin/tini", "serve"]);
        assert_eq!(process.cwd(), Path::new("/app"));
        assert_eq!(process.user().uid(), 1000);
        assert_eq!(process.user().gid(), 1000);
        let mut groups = process.user().additional_gids().clone().unwrap();
        groups.sort();
        assert_eq!(groups, [10, 29]);
        let env = process.env().as_ref().unwrap();
        assert!(env.contains(&"PATH=/app/bin".to_string()) && env.contains(&"MODE=prod".into()));
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);

        let overrides = ProcessOverrides {
            entrypoint: None,
            args: vec!["debug".into()],
            env: vec!["MODE=dev".into()],
            cwd: Some("/tmp".into()),
            user: Some("0:wheel".into()),
            terminal: true,
            hostname: Some("pod".into()),
            memory_limit: Some(64 << 20),
            security: SecurityContext::default(),
        };
        let spec = container_spec(root.path(), &image(), &overrides).unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_ref().unwrap(), &["/bin/tini", "debug"]);
        assert_eq!((process.user().uid(), process.user().gid()), (0, 10));
        assert!(process.terminal().unwrap());
        let env = process.env().as_ref().unwrap();
        assert!(env.contains(&"MODE=dev".to_string()) && !env.contains(&"MODE=prod".into()));
        assert!(env.contains(&"TERM=xterm".to_string()));
        assert_eq!(spec.hostname().as_deref(), Some("pod"));
        let limit = spec.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert_eq!(limit.memory().as_ref().unwrap().limit(), Some(64 << 20));

        // Kubernetes' command replaces the entrypoint and drops the image's Cmd; its args
        // follow.
        let command = |entrypoint: &[&str], args: &[&str]| {
            let overrides = ProcessOverrides {
                entrypoint: Some(entrypoint.iter().map(|s| s.to_string()).collect()),
                args: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            };
            let spec = container_spec(root.path(), &image(), &overrides).unwrap();
            spec.process().as_ref().unwrap().args().clone().unwrap()
        };
        assert_eq!(command(&["sh"], &[]), ["sh"]);
        assert_eq!(command(&["sh"], &["-c", "x"]), ["sh", "-c", "x"]);
        assert_eq!(
            exec_env(vec!["A=1".into()]),
            [DEFAULT_PATH.to_string(), "A=1".into()]
        );
        assert_eq!(exec_env(vec!["PATH=/x".into()]), ["PATH=/x"]);
    }

    fn caps_of(security: SecurityContext) -> Vec<String> {
        let mut names: Vec<String> = security
            .capabilities()
            .unwrap()
            .iter()
            .map(|c| c.to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn capabilities_follow_containerds_rules() {
        let default = caps_of(SecurityContext::default());
        assert_eq!(default.len(), DEFAULT_CAPABILITIES.len());
        assert!(default.contains(&"CHOWN".to_string()) && !default.contains(&"NET_ADMIN".into()));
        let added = caps_of(SecurityContext {
            add_capabilities: vec!["NET_ADMIN".into(), "CAP_SYS_TIME".into()],
            drop_capabilities: vec!["net_raw".into()],
            ..Default::default()
        });
        assert!(added.contains(&"NET_ADMIN".to_string()) && added.contains(&"SYS_TIME".into()));
        assert!(!added.contains(&"NET_RAW".to_string()));
        let all = caps_of(SecurityContext {
            add_capabilities: vec!["ALL".into()],
            drop_capabilities: vec!["CHOWN".into()],
            ..Default::default()
        });
        assert!(all.len() > 35 && !all.contains(&"CHOWN".to_string()));
        // Dropping ALL comes before adding the named ones.
        let only = caps_of(SecurityContext {
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: vec!["all".into()],
            ..Default::default()
        });
        assert_eq!(only, ["NET_ADMIN"]);
        let privileged = caps_of(SecurityContext {
            privileged: true,
            drop_capabilities: vec!["ALL".into()],
            ..Default::default()
        });
        assert_eq!(privileged.len(), all.len() + 1);
        let unknown = SecurityContext {
            add_capabilities: vec!["FLY".into()],
            ..Default::default()
        };
        assert!(matches!(
            unknown.capabilities(),
            Err(SpecError::UnknownCapability(name)) if name == "FLY"
        ));
    }

    #[test]
    fn the_security_context_reaches_the_spec() {
        let root = rootfs();
        let spec_with = |security: SecurityContext| {
            let overrides = ProcessOverrides {
                security,
                ..Default::default()
            };
            container_spec(root.path(), &image(), &overrides).unwrap()
        };
        let pid_path = |spec: &Spec| {
            spec.linux()
                .as_ref()
                .unwrap()
                .namespaces()
                .iter()
                .flatten()
                .find(|ns| ns.typ() == LinuxNamespaceType::Pid)
                .map(|ns| ns.path().clone())
        };

        let default = spec_with(SecurityContext::default());
        let process = default.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(false));
        let bounding = process.capabilities().as_ref().unwrap().bounding();
        assert_eq!(bounding.as_ref().unwrap().len(), DEFAULT_CAPABILITIES.len());
        let linux = default.linux().as_ref().unwrap();
        assert!(linux
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".into()));
        assert!(linux
            .readonly_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/sys".into()));
        assert!(linux.seccomp().is_none());
        assert_eq!(pid_path(&default), Some(None));
        assert_eq!(default.root().as_ref().unwrap().readonly(), Some(false));

        let confined = spec_with(SecurityContext {
            readonly_rootfs: true,
            masked_paths: Some(vec!["/bin/ls".into()]),
            readonly_paths: Some(vec!["/tmp".into()]),
            no_new_privs: true,
            supplemental_groups: vec![1234, 10, 1000],
            pid_namespace: PidNamespace::Pod,
            seccomp: Seccomp::Profile(LinuxSeccomp::default()),
            ..Default::default()
        });
        let linux = confined.linux().as_ref().unwrap();
        assert_eq!(
            linux.masked_paths().as_deref(),
            Some(&["/bin/ls".to_string()][..])
        );
        assert_eq!(
            linux.readonly_paths().as_deref(),
            Some(&["/tmp".to_string()][..])
        );
        assert!(linux.seccomp().is_some());
        assert_eq!(confined.root().as_ref().unwrap().readonly(), Some(true));
        let process = confined.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(true));
        // The image's groups (10, 29), then the new one; the primary group is not repeated.
        let mut groups = process.user().additional_gids().clone().unwrap();
        groups.sort();
        assert_eq!(groups, [10, 29, 1234]);
        assert_eq!(
            pid_path(&confined),
            Some(Some(crx_agent_proto::POD_PID_NAMESPACE.into()))
        );
        // RuntimeDefault is the profile for the capabilities the container gets.
        let sys_admin = SecurityContext {
            add_capabilities: vec!["SYS_ADMIN".into()],
            seccomp: Seccomp::RuntimeDefault,
            ..Default::default()
        };
        let expected = crate::seccomp::runtime_default(
            &sys_admin
                .capabilities()
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
        );
        let defaulted = spec_with(sys_admin);
        assert_eq!(
            defaulted.linux().as_ref().unwrap().seccomp().as_ref(),
            Some(&expected)
        );
        let vm = spec_with(SecurityContext {
            pid_namespace: PidNamespace::Vm,
            ..Default::default()
        });
        assert_eq!(pid_path(&vm), None);
        let target = spec_with(SecurityContext {
            pid_namespace: PidNamespace::Target("c1".into()),
            ..Default::default()
        });
        assert_eq!(
            pid_path(&target),
            Some(Some(crx_agent_proto::container_pid_namespace("c1").into()))
        );

        let privileged = spec_with(SecurityContext {
            privileged: true,
            no_new_privs: true,
            masked_paths: Some(vec!["/bin/ls".into()]),
            seccomp: Seccomp::Profile(LinuxSeccomp::default()),
            ..Default::default()
        });
        let linux = privileged.linux().as_ref().unwrap();
        assert_eq!(linux.masked_paths().as_deref(), Some(&[][..]));
        assert_eq!(linux.readonly_paths().as_deref(), Some(&[][..]));
        assert!(linux.seccomp().is_none());
        assert_eq!(
            privileged.process().as_ref().unwrap().no_new_privileges(),
            Some(false)
        );
        let sys = privileged
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new("/sys"))
            .unwrap();
        assert!(!sys.options().iter().flatten().any(|o| o == "ro"));
    }

    #[test]
    fn bad_input_is_refused_clearly() {
        let root = rootfs();
        let empty = RunConfig::default();
        let err = container_spec(root.path(), &empty, &ProcessOverrides::default());
        assert!(matches!(err, Err(SpecError::NoCommand)));
        let run = |o: ProcessOverrides| container_spec(root.path(), &image(), &o);
        let bad_env = ProcessOverrides {
            env: vec!["NOEQUALS".into()],
            ..Default::default()
        };
        assert!(matches!(run(bad_env), Err(SpecError::BadEnv(_))));
        let nobody = ProcessOverrides {
            user: Some("nobody".into()),
            ..Default::default()
        };
        assert!(matches!(run(nobody), Err(SpecError::UnknownUser(_))));
        let numeric = ProcessOverrides {
            user: Some("4242:4343".into()),
            ..Default::default()
        };
        let spec = run(numeric).unwrap();
        let user = spec.process().as_ref().unwrap().user().clone();
        assert_eq!((user.uid(), user.gid()), (4242, 4343));
    }

    #[test]
    fn a_passwd_link_out_of_the_root_is_resolved_inside_it() {
        let root = rootfs();
        let passwd = root.path().join("etc/passwd");
        std::fs::remove_file(&passwd).unwrap();
        // Absolute and ../ links to a file the host has and the image has not: both resolve
        // inside the image's root, where there is nothing.
        assert!(Path::new("/etc/hostname").exists());
        std::os::unix::fs::symlink("/etc/hostname", &passwd).unwrap();
        assert_eq!(read_in_root(root.path(), "etc/passwd").unwrap(), "");
        std::fs::remove_file(&passwd).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc/hostname", &passwd).unwrap();
        assert_eq!(read_in_root(root.path(), "etc/passwd").unwrap(), "");
        // With no passwd entries, a user name is unknown.
        let spec = container_spec(
            root.path(),
            &RunConfig {
                cmd: vec!["true".into()],
                user: "root".into(),
                ..RunConfig::default()
            },
            &ProcessOverrides::default(),
        );
        assert!(matches!(spec, Err(SpecError::UnknownUser(_))));
    }
}
