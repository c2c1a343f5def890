//! Containers' seccomp profiles, for their specs' `linux.seccomp` (the guest agent compiles
//! and installs them): Kubernetes' `RuntimeDefault` ([`runtime_default`]) and `Localhost`
//! profiles, JSON files on the host ([`load_profile`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompOperator, LinuxSyscall,
};
use serde::Deserialize;

/// System calls a container may not make (EPERM) unless it holds one of `unlocked_by`.
struct Denied {
    unlocked_by: &'static [Capability],
    syscalls: &'static [&'static str],
}

/// What [`runtime_default`] denies, after Docker's default profile. Names of other
/// architectures (`stime`, `vm86`, `umount`, …) are harmless: the agent skips them.
const DENIED: &[Denied] = &[
    // Kernel keyrings (not namespaced), obsolete or removed calls, userfaultfd (a tool for
    // kernel exploits; the host can still use it), kexec.
    Denied {
        unlocked_by: &[],
        syscalls: &[
            "add_key",
            "keyctl",
            "request_key",
            "create_module",
            "get_kernel_syms",
            "query_module",
            "nfsservctl",
            "uselib",
            "ustat",
            "sysfs",
            "_sysctl",
            "vm86",
            "vm86old",
            "userfaultfd",
            "kexec_load",
            "kexec_file_load",
        ],
    },
    Denied {
        unlocked_by: &[Capability::SysAdmin],
        syscalls: &[
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "setns",
            "unshare",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "lookup_dcookie",
            "quotactl",
            "quotactl_fd",
        ],
    },
    Denied {
        unlocked_by: &[Capability::SysTime],
        syscalls: &[
            "settimeofday",
            "stime",
            "clock_settime",
            "clock_settime64",
            "clock_adjtime",
            "clock_adjtime64",
        ],
    },
    Denied {
        unlocked_by: &[Capability::SysModule],
        syscalls: &["init_module", "finit_module", "delete_module"],
    },
    Denied {
        unlocked_by: &[Capability::SysPtrace],
        syscalls: &[
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
        ],
    },
    Denied {
        unlocked_by: &[Capability::SysBoot],
        syscalls: &["reboot"],
    },
    Denied {
        unlocked_by: &[Capability::SysRawio],
        syscalls: &["iopl", "ioperm"],
    },
    Denied {
        unlocked_by: &[Capability::SysPacct],
        syscalls: &["acct"],
    },
    Denied {
        unlocked_by: &[Capability::SysNice],
        syscalls: &[
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
            "get_mempolicy",
            "move_pages",
        ],
    },
    Denied {
        unlocked_by: &[Capability::DacReadSearch],
        syscalls: &["open_by_handle_at", "name_to_handle_at"],
    },
    Denied {
        unlocked_by: &[Capability::Syslog, Capability::SysAdmin],
        syscalls: &["syslog"],
    },
    Denied {
        unlocked_by: &[Capability::Bpf, Capability::SysAdmin],
        syscalls: &["bpf"],
    },
    Denied {
        unlocked_by: &[Capability::Perfmon, Capability::SysAdmin],
        syscalls: &["perf_event_open"],
    },
];

/// `clone` flags making namespaces, denied without CAP_SYS_ADMIN (`unshare` is denied too).
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// Kubernetes' `RuntimeDefault` profile for a container holding `capabilities` (its bounding
/// set, as Docker reads it): every call is allowed but those [`DENIED`] to it, which fail with
/// EPERM, as do `clone` calls making namespaces; `clone3`, whose flags a filter cannot read,
/// fails with ENOSYS, so that glibc falls back to `clone`. A capability that [`DENIED`] lists
/// lifts the denial, as in Docker.
///
/// Docker's default profile is an allow list (default ERRNO): calls it does not know, such as
/// those of newer kernels, are denied there and allowed here. Besides, this profile lets
/// `personality` take any argument, lets `chroot`, `vhangup`, `fanotify_init`, `sethostname`
/// and `setdomainname` through (the kernel checks their capability itself), and denies
/// `ptrace` (Docker allows it on kernels from 4.8 on) and `clock_adjtime` without
/// CAP_SYS_PTRACE and CAP_SYS_TIME.
pub fn runtime_default(capabilities: &[Capability]) -> LinuxSeccomp {
    let holds_any = |unlocking: &[Capability]| unlocking.iter().any(|c| capabilities.contains(c));
    let denied: Vec<String> = DENIED
        .iter()
        .filter(|group| !holds_any(group.unlocked_by))
        .flat_map(|group| group.syscalls.iter().map(|name| name.to_string()))
        .collect();
    let mut rules = vec![errno_rule(denied, libc::EPERM, None)];
    if !holds_any(&[Capability::SysAdmin]) {
        rules.push(errno_rule(vec!["clone3".into()], libc::ENOSYS, None));
        for &flag in NAMESPACE_FLAGS {
            let flag_set = LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(flag as u64)
                .value_two(flag as u64)
                .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                .build()
                .expect("every field is set");
            rules.push(errno_rule(
                vec!["clone".into()],
                libc::EPERM,
                Some(flag_set),
            ));
        }
    }
    let mut profile = LinuxSeccomp::default();
    profile
        .set_default_action(LinuxSeccompAction::ScmpActAllow)
        .set_syscalls(Some(rules));
    profile
}

/// A rule making the calls `names` fail with `errno`, when `arg` holds if there is one.
fn errno_rule(
    names: Vec<String>,
    errno: libc::c_int,
    arg: Option<LinuxSeccompArg>,
) -> LinuxSyscall {
    let mut rule = LinuxSyscall::default();
    rule.set_names(names)
        .set_action(LinuxSeccompAction::ScmpActErrno)
        .set_errno_ret(Some(errno as u32))
        .set_args(arg.map(|arg| vec![arg]));
    rule
}

/// Largest profile file read (Docker's default profile is about 20 KiB).
const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// Why a profile file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SeccompProfileError {
    #[error("seccomp profile path {0} is not absolute")]
    RelativePath(PathBuf),
    #[error("cannot read seccomp profile {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp profile {0} is larger than 1 MiB")]
    TooLarge(PathBuf),
    #[error("seccomp profile {path} is not an OCI seccomp profile: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "seccomp profile {path}: the rule for {syscalls} has Docker's includes/excludes \
         conditions, which are not supported"
    )]
    Conditional { path: PathBuf, syscalls: String },
}

/// A `Localhost` profile: the OCI seccomp profile (Docker's JSON format without per-rule
/// conditions) in the host file `path`, which must be absolute (Kubernetes'
/// `localhostProfile`, resolved by the caller) and at most 1 MiB.
///
/// Docker-only fields are ignored (`archMap`, `comment`), except rule conditions: a rule
/// whose `includes` or `excludes` is not empty (Docker's default profile has such rules)
/// is refused, since reading it unconditionally would turn a rule meant for some containers
/// into one for all. Docker's older rules with `name` instead of `names` do not parse.
pub fn load_profile(path: &Path) -> Result<LinuxSeccomp, SeccompProfileError> {
    if !path.is_absolute() {
        return Err(SeccompProfileError::RelativePath(path.to_owned()));
    }
    let read_error = |source| SeccompProfileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut json = Vec::new();
    std::fs::File::open(path)
        .map_err(read_error)?
        .take(MAX_PROFILE_BYTES + 1)
        .read_to_end(&mut json)
        .map_err(read_error)?;
    if json.len() as u64 > MAX_PROFILE_BYTES {
        return Err(SeccompProfileError::TooLarge(path.to_owned()));
    }
    let parse_error = |source| SeccompProfileError::Parse {
        path: path.to_owned(),
        source,
    };
    let profile: LinuxSeccomp = serde_json::from_slice(&json).map_err(parse_error)?;
    let docker: DockerProfile = serde_json::from_slice(&json).map_err(parse_error)?;
    if let Some(rule) = docker
        .syscalls
        .iter()
        .flatten()
        .find(|rule| is_set(&rule.includes) || is_set(&rule.excludes))
    {
        return Err(SeccompProfileError::Conditional {
            path: path.to_owned(),
            syscalls: rule.names.join(","),
        });
    }
    Ok(profile)
}

/// The rule conditions of Docker's profile format, which OCI's has not.
#[derive(Deserialize)]
struct DockerProfile {
    syscalls: Option<Vec<DockerRule>>,
}

#[derive(Deserialize)]
struct DockerRule {
    names: Vec<String>,
    #[serde(default)]
    includes: serde_json::Value,
    #[serde(default)]
    excludes: serde_json::Value,
}

/// Whether a Docker condition (`{"caps": [...], "arches": [...], "minKernel": "..."}`) says
/// anything: null, `{}` and empty members say nothing.
fn is_set(condition: &serde_json::Value) -> bool {
    match condition {
        serde_json::Value::Null => false,
        serde_json::Value::String(s) => !s.is_empty(),
        serde_json::Value::Array(items) => !items.is_empty(),
        serde_json::Value::Object(members) => members.values().any(is_set),
        serde_json::Value::Bool(_) | serde_json::Value::Number(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errno a profile's rules give `name` when called with no argument rule matching
    /// (`None`: allowed).
    fn errno_of(profile: &LinuxSeccomp, name: &str) -> Option<u32> {
        profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|rule| rule.args().is_none())
            .find(|rule| rule.names().iter().any(|n| n == name))
            .map(|rule| rule.errno_ret().unwrap())
    }

    fn clone_rules(profile: &LinuxSeccomp) -> usize {
        profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|rule| rule.names() == &["clone"])
            .count()
    }

    const EPERM: Option<u32> = Some(libc::EPERM as u32);

    #[test]
    fn runtime_default_denies_privileged_calls_to_an_unprivileged_container() {
        let profile = runtime_default(&[Capability::Chown, Capability::NetBindService]);
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActAllow);
        for name in [
            "mount", "unshare", "setns", "ptrace", "bpf", "keyctl", "reboot",
        ] {
            assert_eq!(errno_of(&profile, name), EPERM, "{name}");
        }
        assert_eq!(errno_of(&profile, "clone3"), Some(libc::ENOSYS as u32));
        assert_eq!(errno_of(&profile, "read"), None);
        assert_eq!(errno_of(&profile, "clone"), None);
        assert_eq!(clone_rules(&profile), NAMESPACE_FLAGS.len());
    }

    #[test]
    fn cap_sys_admin_unlocks_mounts_and_namespaces() {
        let profile = runtime_default(&[Capability::SysAdmin]);
        for name in [
            "mount",
            "umount2",
            "setns",
            "unshare",
            "pivot_root",
            "bpf",
            "syslog",
        ] {
            assert_eq!(errno_of(&profile, name), None, "{name}");
        }
        assert_eq!(errno_of(&profile, "clone3"), None);
        assert_eq!(clone_rules(&profile), 0);
        for name in ["ptrace", "reboot", "keyctl", "clock_settime", "init_module"] {
            assert_eq!(errno_of(&profile, name), EPERM, "{name}");
        }
    }

    #[test]
    fn other_capabilities_unlock_their_calls() {
        let profile = runtime_default(&[Capability::SysTime, Capability::SysPtrace]);
        for name in [
            "clock_settime",
            "settimeofday",
            "ptrace",
            "process_vm_readv",
        ] {
            assert_eq!(errno_of(&profile, name), None, "{name}");
        }
        assert_eq!(errno_of(&profile, "mount"), EPERM);
        assert_eq!(errno_of(&profile, "bpf"), EPERM);
        let bpf = runtime_default(&[Capability::Bpf]);
        assert_eq!(errno_of(&bpf, "bpf"), None);
        assert_eq!(errno_of(&bpf, "perf_event_open"), EPERM);
    }

    #[test]
    fn runtime_default_survives_json() {
        let profile = runtime_default(&[]);
        let json = serde_json::to_string(&profile).unwrap();
        assert!(
            json.contains(r#""defaultAction":"SCMP_ACT_ALLOW""#),
            "{json}"
        );
        assert!(json.contains(r#""op":"SCMP_CMP_MASKED_EQ""#), "{json}");
        let back: LinuxSeccomp = serde_json::from_str(&json).unwrap();
        assert_eq!(back, profile);
    }

    fn profile_file(contents: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), contents).unwrap();
        file
    }

    #[test]
    fn a_critest_profile_loads() {
        let file = profile_file(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}"#,
        );
        let profile = load_profile(file.path()).unwrap();
        let rules = profile.syscalls().as_ref().unwrap();
        assert_eq!(rules[0].names(), &["chmod", "fchmodat"]);
        assert_eq!(rules[0].action(), LinuxSeccompAction::ScmpActErrno);
    }

    #[test]
    fn a_relative_path_is_refused() {
        let error = load_profile(Path::new("profiles/no-chmod.json")).unwrap_err();
        assert!(
            matches!(error, SeccompProfileError::RelativePath(_)),
            "{error}"
        );
        assert!(
            error.to_string().contains("profiles/no-chmod.json"),
            "{error}"
        );
    }

    #[test]
    fn a_file_that_does_not_parse_is_named() {
        let file = profile_file(r#"{"defaultAction": "SCMP_ACT_SOMETIMES"}"#);
        let error = load_profile(file.path()).unwrap_err();
        assert!(
            matches!(error, SeccompProfileError::Parse { .. }),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains(&file.path().display().to_string()),
            "{error}"
        );
        let not_json = profile_file("defaultAction: SCMP_ACT_ALLOW\n");
        let error = load_profile(not_json.path()).unwrap_err();
        assert!(
            matches!(error, SeccompProfileError::Parse { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_missing_or_oversized_file_is_named() {
        let error = load_profile(Path::new("/nonexistent/seccomp.json")).unwrap_err();
        assert!(matches!(error, SeccompProfileError::Read { .. }), "{error}");
        assert!(
            error.to_string().contains("/nonexistent/seccomp.json"),
            "{error}"
        );
        let big = profile_file(&" ".repeat(MAX_PROFILE_BYTES as usize + 1));
        let error = load_profile(big.path()).unwrap_err();
        assert!(matches!(error, SeccompProfileError::TooLarge(_)), "{error}");
    }

    #[test]
    fn docker_conditions_are_refused_unless_empty() {
        let unconditional = profile_file(
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "archMap": [], "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ALLOW", "comment": "",
                 "includes": {}, "excludes": {"caps": []}}]}"#,
        );
        assert!(load_profile(unconditional.path()).is_ok());
        let conditional = profile_file(
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
                {"names": ["mount", "umount2"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"caps": ["CAP_SYS_ADMIN"]}, "excludes": {}}]}"#,
        );
        let error = load_profile(conditional.path()).unwrap_err();
        assert!(
            matches!(&error, SeccompProfileError::Conditional { syscalls, .. } if syscalls == "mount,umount2"),
            "{error}"
        );
    }
}
