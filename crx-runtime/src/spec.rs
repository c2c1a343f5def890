//! A container's OCI runtime spec: the image's run config (entrypoint, command, environment,
//! working directory, user), then what the caller overrides, with user and group names
//! resolved in the image's own `/etc/passwd` and `/etc/group`. Those files are opened with
//! `RESOLVE_IN_ROOT`, so an image whose `/etc/passwd` is a link out of its root cannot make
//! the host read its own.

use std::io::Read;
use std::path::{Path, PathBuf};

use crx_image::RunConfig;
use oci_spec::runtime::{
    LinuxBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, ProcessBuilder, RootBuilder, Spec,
    UserBuilder,
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
    #[error("invalid spec: {0}")]
    Build(#[from] oci_spec::OciSpecError),
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
        .no_new_privileges(true)
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
