//! Seccomp for containers: a container's OCI seccomp profile (`linux.seccomp` of its runtime
//! spec) compiled into BPF programs with `seccompiler` ([`compile`], in the agent, before the
//! fork), and those programs installed on the forked child before it execs ([`install`]).
//!
//! # From a profile to filters
//!
//! A `seccompiler` filter has one action for the calls it matches and one for the rest, while
//! a profile has a default action and any number of rule actions. The kernel runs every filter
//! installed on a process and takes the most restrictive answer (KILL_PROCESS > KILL_THREAD >
//! TRAP > ERRNO > TRACE > LOG > ALLOW), so a profile becomes:
//!
//! - a base filter, unless the default action is ALLOW: the calls some rule matches are
//!   allowed, every other call gets the default action;
//! - one filter per distinct rule action other than ALLOW and the default (ERRNO with another
//!   errno counts as another action): the calls its rules match get that action, the others
//!   are allowed.
//!
//! A call that no rule matches thus gets the default action, and a call that rules of one
//! action match gets that action: both exact, which covers the usual shapes (a default of ALLOW
//! with deny rules, as in `critest`'s profiles and Kubernetes' RuntimeDefault; an allow list
//! under a default of ERRNO, with a few ERRNO rules on arguments, as in containerd's and
//! Docker's default profiles). A call that rules of *several* actions match gets the most
//! restrictive of them; libseccomp leaves that case to the order of its generated code. Two
//! different errnos (or two TRACE values) both matching: the filter installed last answers.
//!
//! Each filter installed checks the seccomp(2) calls installing the next ones, so the filter
//! that may refuse them (the base filter of an allow list without `seccomp`, or the filter of
//! a rule on `seccomp`) is installed last. Only a profile whose rules of two actions other than
//! ALLOW both match `seccomp` cannot be installed (the second install gets their error).
//!
//! Otherwise as runc does with libseccomp:
//!
//! - Syscall names this architecture does not know are skipped without error: profiles list
//!   the calls of several architectures and of newer kernels (containerd's default names
//!   `_llseek`, `chown32`, `arm_fadvise64_64`, …). Names are those of the `syscalls` crate's
//!   table for the native architecture (generated from the kernel's own tables; seccompiler's
//!   table is private to its JSON front end).
//! - Rules whose action equals the default one change nothing and are dropped.
//! - `SCMP_ACT_KILL` is KILL_THREAD; `errnoRet` (ERRNO and TRACE) and `defaultErrnoRet` default
//!   to EPERM.
//! - A rule's `args` must all hold, except when two of them name the same argument: then each
//!   one alone makes the rule match. Arguments compare as 64-bit unsigned values; `MASKED_EQ`
//!   tests `arg & value == valueTwo` (a `valueTwo` with bits outside the mask never matches).
//!
//! Not supported: `SCMP_ACT_NOTIFY` (refused: there is no seccomp agent to answer), `flags`
//! (ignored), and other ABIs than the native one: `architectures` is ignored, and each filter
//! kills a process making a call of another ABI. The guest kernel has neither IA32 emulation
//! nor x32, so a container has no other ABI to call with.

use std::collections::BTreeMap;
use std::io;
use std::str::FromStr;

use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompOperator, LinuxSyscall,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use syscalls::Sysno;

/// Why a profile cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp action {0} is not supported")]
    UnsupportedAction(LinuxSeccompAction),
    #[error("seccomp filters cannot be built for the {0} architecture")]
    UnsupportedArchitecture(&'static str),
    #[error("seccomp rule for {syscalls}: argument index {index} is out of range (0 to 5)")]
    BadArgument { syscalls: String, index: usize },
    #[error("cannot build the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
}

/// The BPF programs enforcing `profile`, to [`install`] in this order; none when the profile
/// allows every call (default action ALLOW and no rule with another action on a known
/// syscall).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::UnsupportedArchitecture(std::env::consts::ARCH))?;
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut matched_by_any_rule = Matches::default();
    let mut matched_by_action: Vec<(SeccompAction, Matches)> = Vec::new();
    for rule in profile.syscalls().iter().flatten() {
        let rule_action = action(rule.action(), rule.errno_ret())?;
        if rule_action == default {
            continue;
        }
        let calls = calls_matched(rule)?;
        if matches!(&calls, Calls::AnyOf(rules) if rules.is_empty()) {
            continue; // its conditions cannot all hold
        }
        let numbers = rule
            .names()
            .iter()
            .filter_map(|name| Sysno::from_str(name).ok())
            .map(|sysno| i64::from(sysno.id()));
        for number in numbers {
            matched_by_any_rule.add(number, &calls);
            if rule_action == SeccompAction::Allow {
                continue;
            }
            let index = match matched_by_action
                .iter()
                .position(|(a, _)| *a == rule_action)
            {
                Some(index) => index,
                None => {
                    matched_by_action.push((rule_action.clone(), Matches::default()));
                    matched_by_action.len() - 1
                }
            };
            matched_by_action[index].1.add(number, &calls);
        }
    }

    // The kernel checks the seccomp(2) call installing a filter against those installed
    // before it, so a filter that may refuse that call goes last (of the filters made here,
    // one at most refuses a given call unless rules of several actions match it).
    let seccomp_call = i64::from(Sysno::seccomp.id());
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        let may_refuse_install =
            !matches!(matched_by_any_rule.0.get(&seccomp_call), Some(Calls::All));
        let filter = SeccompFilter::new(
            matched_by_any_rule.into_rules(),
            default,
            SeccompAction::Allow,
            arch,
        )?;
        filters.push((may_refuse_install, filter));
    }
    for (rule_action, matches) in matched_by_action {
        let may_refuse_install = matches.0.contains_key(&seccomp_call);
        let filter = SeccompFilter::new(
            matches.into_rules(),
            SeccompAction::Allow,
            rule_action,
            arch,
        )?;
        filters.push((may_refuse_install, filter));
    }
    filters.sort_by_key(|(may_refuse_install, _)| *may_refuse_install);
    let programs = filters
        .into_iter()
        .map(|(_, filter)| BpfProgram::try_from(filter))
        .collect::<Result<_, _>>()?;
    Ok(programs)
}

/// Installs `programs` (from [`compile`]) on the calling thread, for it and the processes it
/// will start, with plain seccomp(SECCOMP_SET_MODE_FILTER) calls: no allocation, so it can run
/// in a forked child before exec.
///
/// It does not set `no_new_privs` (unlike `seccompiler::apply_filter`), which stays the spec's
/// `process.noNewPrivileges`: the kernel takes a filter from a thread that has `no_new_privs`
/// set or holds CAP_SYS_ADMIN, so without `no_new_privs` install before dropping capabilities
/// (as runc does), and every call made after the install, up to and including `execve`, must
/// be one the profile allows. On an error the programs before the failing one stay installed.
pub fn install(programs: &[BpfProgram]) -> io::Result<()> {
    for program in programs {
        let len =
            u16::try_from(program.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let fprog = libc::sock_fprog {
            len,
            filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
        };
        // SAFETY: `fprog` points at `len` instructions of `program`, which outlives the call;
        // seccompiler's `sock_filter` is `#[repr(C)]` with the kernel's fields (checked by the
        // size assertion below), and the kernel only copies the program in.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

const _: () = assert!(size_of::<seccompiler::sock_filter>() == size_of::<libc::sock_filter>());

/// The `seccompiler` action for an OCI action and its `errnoRet`.
fn action(
    action: LinuxSeccompAction,
    errno_ret: Option<u32>,
) -> Result<SeccompAction, SeccompError> {
    let errno = errno_ret.unwrap_or(libc::EPERM as u32);
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno),
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::UnsupportedAction(action)),
    })
}

/// Which calls of one syscall some rules match.
#[derive(Clone)]
enum Calls {
    All,
    /// Those that any of these rules match (none if there is none).
    AnyOf(Vec<SeccompRule>),
}

/// Syscall number → the calls of it that some rules match.
#[derive(Default)]
struct Matches(BTreeMap<i64, Calls>);

impl Matches {
    fn add(&mut self, number: i64, calls: &Calls) {
        match (self.0.get_mut(&number), calls) {
            (None, calls) => {
                self.0.insert(number, calls.clone());
            }
            (Some(Calls::All), _) => {}
            (Some(matched), Calls::All) => *matched = Calls::All,
            (Some(Calls::AnyOf(matched)), Calls::AnyOf(rules)) => {
                matched.extend(rules.iter().cloned())
            }
        }
    }

    /// The rule map of a `SeccompFilter`, where no rules means every call.
    fn into_rules(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
            .into_iter()
            .map(|(number, calls)| match calls {
                Calls::All => (number, Vec::new()),
                Calls::AnyOf(rules) => (number, rules),
            })
            .collect()
    }
}

/// The calls of its syscalls that an OCI rule matches: all its `args` conditions hold, or, when
/// two conditions name the same argument, any one of them does (runc's reading).
fn calls_matched(rule: &LinuxSyscall) -> Result<Calls, SeccompError> {
    let args = rule.args().as_deref().unwrap_or_default();
    if args.is_empty() {
        return Ok(Calls::All);
    }
    let conditions = args
        .iter()
        .map(|arg| condition(arg, rule))
        .collect::<Result<Vec<_>, _>>()?;
    let repeats_an_argument =
        (1..args.len()).any(|i| args[..i].iter().any(|a| a.index() == args[i].index()));
    let rules = if repeats_an_argument {
        conditions
            .into_iter()
            .flatten()
            .map(|condition| SeccompRule::new(vec![condition]))
            .collect::<Result<_, _>>()?
    } else {
        match conditions.into_iter().collect::<Option<Vec<_>>>() {
            Some(all) => vec![SeccompRule::new(all)?],
            None => Vec::new(),
        }
    };
    Ok(Calls::AnyOf(rules))
}

/// The condition an OCI argument comparison makes; `None` if no value can meet it.
fn condition(
    arg: &LinuxSeccompArg,
    rule: &LinuxSyscall,
) -> Result<Option<SeccompCondition>, SeccompError> {
    let index = u8::try_from(arg.index())
        .ok()
        .filter(|&index| index <= 5)
        .ok_or_else(|| SeccompError::BadArgument {
            syscalls: rule.names().join(","),
            index: arg.index(),
        })?;
    let (operator, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let (mask, expected) = (arg.value(), arg.value_two().unwrap_or(0));
            if expected & !mask != 0 {
                return Ok(None);
            }
            (SeccompCmpOp::MaskedEq(mask), expected)
        }
    };
    Ok(Some(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Qword,
        operator,
        value,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;

    /// critest's profiles (docker/OCI JSON).
    const NO_SETHOSTNAME: &str = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}]}"#;
    const NO_CHMOD: &str = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}"#;

    /// The shape of containerd's default profile: an allow list with names of other
    /// architectures, argument rules (one with a repeated argument), clone3 answered ENOSYS.
    const ALLOW_LIST: &str = r#"{
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["read", "write", "openat", "close", "exit_group", "_llseek", "chown32",
                       "arm_fadvise64_64", "s390_pci_mmio_read", "execve", "mmap"],
             "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 4294967295, "op": "SCMP_CMP_EQ"}]},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
             "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_EQ"},
                      {"index": 2, "value": 9, "op": "SCMP_CMP_EQ"}]}
        ]
    }"#;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    fn errno() -> i32 {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// Forks a child that sets `no_new_privs` and a UTS namespace of its own (so that a
    /// filter that let sethostname through would not rename the test host), installs
    /// `programs` and exits with what `body` returns (0: as expected). Returns the child's
    /// wait status. The child makes only system calls: no allocation after the fork.
    fn wait_status(programs: &[BpfProgram], body: impl Fn() -> i32) -> i32 {
        // SAFETY: the child runs only raw system calls and `_exit`, async-signal-safe, so the
        // test harness's other threads cannot leave it stuck on a lock.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: setrlimit, prctl and unshare change only this (child) process (no core
            // file for a child that a filter kills); _exit never returns.
            unsafe {
                let code = if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
                    99
                } else if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    100
                } else if libc::unshare(libc::CLONE_NEWUTS) != 0 {
                    101
                } else if install(programs).is_err() {
                    102
                } else {
                    body()
                };
                libc::_exit(code)
            }
        }
        let mut status = 0;
        // SAFETY: waits for our own child, writing its status to a local.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid, "waitpid: {}", io::Error::last_os_error());
        status
    }

    fn exit_code(status: i32) -> Option<i32> {
        libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
    }

    /// sethostname (raw) fails with `expected` errno; 0 if so.
    fn sethostname_fails_with(expected: i32) -> i32 {
        let name = b"crx-seccomp-test";
        // SAFETY: sethostname reads `name.len()` bytes of `name`.
        let rc = unsafe { libc::syscall(libc::SYS_sethostname, name.as_ptr(), name.len()) };
        if rc != -1 || errno() != expected {
            return 1;
        }
        0
    }

    fn getpid_works() -> bool {
        // SAFETY: getpid has no arguments.
        unsafe { libc::syscall(libc::SYS_getpid) > 0 }
    }

    #[test]
    fn critest_profiles_deserialize_and_compile_to_one_filter() {
        let no_sethostname = profile(NO_SETHOSTNAME);
        assert_eq!(
            no_sethostname.default_action(),
            LinuxSeccompAction::ScmpActAllow
        );
        let rules = no_sethostname.syscalls().as_ref().unwrap();
        assert_eq!(rules[0].names(), &["sethostname"]);
        assert_eq!(rules[0].action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(compile(&no_sethostname).unwrap().len(), 1);
        assert_eq!(compile(&profile(NO_CHMOD)).unwrap().len(), 1);
    }

    #[test]
    fn an_allow_list_compiles_to_a_base_filter_and_one_per_errno() {
        let programs = compile(&profile(ALLOW_LIST)).unwrap();
        // The base filter (default EPERM) and clone3's ENOSYS; socket's EPERM equals the
        // default, so that rule is dropped.
        assert_eq!(programs.len(), 2);
        assert!(programs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn an_allow_list_of_every_syscall_fits_in_a_filter() {
        let names: Vec<&str> = Sysno::iter().map(|sysno| sysno.name()).collect();
        let json = serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}],
        });
        let programs = compile(&serde_json::from_value(json).unwrap()).unwrap();
        assert_eq!(programs.len(), 1);
        assert!(
            programs[0].len() < 4096,
            "{} instructions",
            programs[0].len()
        );
    }

    #[test]
    fn a_profile_that_allows_everything_has_no_filter() {
        let allow_all = r#"{"defaultAction": "SCMP_ACT_ALLOW"}"#;
        assert!(compile(&profile(allow_all)).unwrap().is_empty());
        let only_allow_rules = r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}"#;
        assert!(compile(&profile(only_allow_rules)).unwrap().is_empty());
    }

    #[test]
    fn unknown_syscall_names_are_skipped() {
        let json = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["no_such_syscall", "chown32", "_newselect"], "action": "SCMP_ACT_ERRNO"}]}"#;
        assert!(compile(&profile(json)).unwrap().is_empty());
        let mixed = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["no_such_syscall", "sethostname"], "action": "SCMP_ACT_ERRNO"}]}"#;
        assert_eq!(compile(&profile(mixed)).unwrap().len(), 1);
    }

    #[test]
    fn a_masked_eq_that_cannot_match_drops_its_rule() {
        let json = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["getpid"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 1, "valueTwo": 2, "op": "SCMP_CMP_MASKED_EQ"}]}]}"#;
        assert!(compile(&profile(json)).unwrap().is_empty());
    }

    #[test]
    fn notify_is_refused() {
        let as_default = r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#;
        let as_rule = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["no_such_syscall"], "action": "SCMP_ACT_NOTIFY"}]}"#;
        for json in [as_default, as_rule] {
            let error = compile(&profile(json)).unwrap_err();
            assert!(
                matches!(
                    error,
                    SeccompError::UnsupportedAction(LinuxSeccompAction::ScmpActNotify)
                ),
                "{error}"
            );
            assert_eq!(
                error.to_string(),
                "seccomp action SCMP_ACT_NOTIFY is not supported"
            );
        }
    }

    #[test]
    fn an_argument_index_past_5_is_refused() {
        let json = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mmap"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]}"#;
        let error = compile(&profile(json)).unwrap_err();
        assert!(
            matches!(error, SeccompError::BadArgument { index: 6, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("mmap"), "{error}");
    }

    #[test]
    fn an_unknown_operator_or_action_fails_deserialization() {
        let operator = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mmap"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_SOMETIMES"}]}]}"#;
        let action = r#"{"defaultAction": "SCMP_ACT_MAYBE"}"#;
        for json in [operator, action] {
            assert!(serde_json::from_str::<LinuxSeccomp>(json).is_err());
        }
    }

    #[test]
    fn the_sethostname_profile_denies_sethostname_and_allows_getpid() {
        let programs = compile(&profile(NO_SETHOSTNAME)).unwrap();
        let status = wait_status(&programs, || {
            if !getpid_works() {
                return 2;
            }
            sethostname_fails_with(libc::EPERM)
        });
        assert_eq!(exit_code(status), Some(0), "wait status {status:#x}");
    }

    #[test]
    fn the_chmod_profile_denies_chmod_and_fchmodat_but_not_fchmod() {
        let programs = compile(&profile(NO_CHMOD)).unwrap();
        let path = std::env::temp_dir().join(format!("crx-seccomp-chmod-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
        let status = wait_status(&programs, || {
            // SAFETY: raw calls on a NUL-terminated path; the descriptor is the child's own.
            unsafe {
                if libc::syscall(libc::SYS_chmod, c_path.as_ptr(), 0o644) != -1
                    || errno() != libc::EPERM
                {
                    return 1;
                }
                let rc = libc::syscall(
                    libc::SYS_fchmodat,
                    libc::AT_FDCWD,
                    c_path.as_ptr(),
                    0o644,
                    0,
                );
                if rc != -1 || errno() != libc::EPERM {
                    return 2;
                }
                let fd = libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c_path.as_ptr(), 0);
                if fd < 0 || libc::syscall(libc::SYS_fchmod, fd, 0o640) != 0 {
                    return 3;
                }
            }
            if !getpid_works() {
                return 4;
            }
            0
        });
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        std::fs::remove_file(&path).unwrap();
        assert_eq!(exit_code(status), Some(0), "wait status {status:#x}");
        assert_eq!(mode, 0o640, "only fchmod got through");
    }

    /// A default of ERRNO (with its own errno), an allow list with unknown names, and an
    /// ERRNO rule on an argument of an allowed call: three answers from two filters.
    #[test]
    fn an_allow_list_allows_only_its_calls() {
        let json = r#"{
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 95,
            "syscalls": [
                {"names": ["getpid", "umask", "exit", "exit_group", "_llseek", "no_such_syscall"],
                 "action": "SCMP_ACT_ALLOW"},
                {"names": ["umask"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                 "args": [{"index": 0, "value": 63, "op": "SCMP_CMP_EQ"}]}
            ]
        }"#;
        let programs = compile(&profile(json)).unwrap();
        assert_eq!(programs.len(), 2);
        let status = wait_status(&programs, || {
            if !getpid_works() {
                return 1;
            }
            // SAFETY: getppid and umask take no pointers.
            unsafe {
                if libc::syscall(libc::SYS_getppid) != -1 || errno() != libc::EOPNOTSUPP {
                    return 2;
                }
                if libc::syscall(libc::SYS_umask, 0o022) < 0 {
                    return 3;
                }
                if libc::syscall(libc::SYS_umask, 0o077) != -1 || errno() != libc::EACCES {
                    return 4;
                }
            }
            0
        });
        assert_eq!(exit_code(status), Some(0), "wait status {status:#x}");
    }

    /// TRAP wins over ERRNO and ALLOW: the child dies of SIGSYS at getppid, after its
    /// sethostname got EPERM. The ERRNO rule also names seccomp, so its filter must be
    /// installed after the TRAP one.
    #[test]
    fn a_trap_rule_ends_the_process_with_sigsys() {
        let json = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["sethostname", "seccomp"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["getppid"], "action": "SCMP_ACT_TRAP"}]}"#;
        let programs = compile(&profile(json)).unwrap();
        assert_eq!(programs.len(), 2);
        let status = wait_status(&programs, || {
            if sethostname_fails_with(libc::EPERM) != 0 {
                return 1;
            }
            // SAFETY: getppid takes no arguments.
            unsafe { libc::syscall(libc::SYS_getppid) };
            2
        });
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "wait status {status:#x}"
        );
    }
}
