//! The VMM's seccomp filter: once its VM is built (guest memory, vCPUs, devices, virtiofsd
//! children started), a `crx-vmm` process only needs a short list of system calls, and it
//! keeps only those, for every thread it has and will have (`SECCOMP_FILTER_FLAG_TSYNC`).
//!
//! What it gives up: executing programs (`execve`), forking (`clone` is allowed only for
//! threads; `clone3`, whose flags a filter cannot see, answers ENOSYS so glibc falls back to
//! `clone`), sockets other than Unix ones (vsock's host side), and everything else a VMM has no
//! use for (mounts, namespaces, ptrace, module loading, keyrings, BPF, …). A call outside the
//! list raises SIGSYS, whose handler writes the call's number to stderr (the VMM's log) and ends
//! the process with status 159 (128 + SIGSYS), so a missing entry is found at once.
//! `--no-seccomp` leaves the filter out, for debugging.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// System calls allowed with any arguments.
const ALLOWED: &[libc::c_long] = &[
    // I/O on descriptors the VM already has: guest RAM and snapshot files, tap, disks,
    // eventfds, epoll, the console, logs.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_ioctl, // KVM, tun, userfaultfd
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_pipe2,
    libc::SYS_pipe,
    libc::SYS_dup2,
    libc::SYS_epoll_pwait2,
    // Files a snapshot writes (`--snapshot-on-sigusr1`), and reads of /proc and the like.
    libc::SYS_openat,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    // (and their older x86_64 forms, which libc still uses for some)
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_mkdir,
    libc::SYS_unlink,
    libc::SYS_readlink,
    libc::SYS_access,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Threads, time, signals (vCPU kicks are signals to vCPU threads).
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_kill, // virtiofsd children, at the end
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_prctl, // thread names
    libc::SYS_prlimit64,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Unix sockets: hybrid vsock connections both ways, virtiofsd's vhost-user socket.
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_clone3, // answered ENOSYS by the first filter, see `install`
];

/// The filter's rules: [`ALLOWED`], `clone` for threads only, `socket` for Unix sockets only.
fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&call| (call, Vec::new())).collect();
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )?])?],
    );
    Ok(rules)
}

/// Installs the SIGSYS handler and the filters on every thread of the process.
pub fn install() -> Result<(), SeccompError> {
    let arch = TargetArch::x86_64;
    // A filter of its own makes clone3 fail with ENOSYS (the kernel takes the strictest answer
    // of all filters: this ERRNO over the allow list's ALLOW).
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    let allow_list = SeccompFilter::new(rules()?, SeccompAction::Trap, SeccompAction::Allow, arch)?;
    let no_clone3: BpfProgram = no_clone3.try_into()?;
    let allow_list: BpfProgram = allow_list.try_into()?;
    install_sigsys_handler()?;
    seccompiler::apply_filter_all_threads(&no_clone3)?;
    seccompiler::apply_filter_all_threads(&allow_list)?;
    Ok(())
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler only calls async-signal-safe functions
    // (write, _exit) on a stack buffer.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Byte offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64 (after si_signo, si_errno,
/// si_code, padding, and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for SIGSYS its
    // union holds `_sigsys`, whose `_syscall` int sits at SI_SYSCALL_OFFSET.
    let call = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let mut message = *b"crx-vmm: seccomp: system call           is not allowed; exiting\n";
    let mut digits = [b' '; 10];
    let mut n = call.unsigned_abs();
    for slot in digits.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let at = "crx-vmm: seccomp: system call ".len();
    message[at..at + digits.len()].copy_from_slice(&digits);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer lives on this stack.
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(128 + libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile() {
        let rules = rules().unwrap();
        assert!(rules.contains_key(&libc::SYS_ioctl));
        assert!(!rules.contains_key(&libc::SYS_execve));
        assert!(!rules.contains_key(&libc::SYS_mount));
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap();
        let program: BpfProgram = filter.try_into().unwrap();
        assert!(!program.is_empty());
    }

    /// In a child process (the filter cannot be taken off again): a filtered process keeps
    /// running on allowed calls and starts threads, gets ENOSYS from clone3, and is stopped
    /// with 159 and a message when it tries a call off the list (unshare).
    #[test]
    fn a_forbidden_call_ends_the_process_with_a_message() {
        let exe = std::env::current_exe().unwrap();
        if std::env::var_os("CRX_SECCOMP_CHILD").is_some() {
            install().unwrap();
            // SAFETY: clone3 with a null argument: under the filter it fails (ENOSYS) before
            // the kernel reads anything.
            let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            eprintln!("clone3: {r} {errno:?}");
            std::thread::spawn(|| eprintln!("a thread runs"))
                .join()
                .unwrap();
            // SAFETY: unshare(2) with a flag; under the filter it never runs.
            unsafe { libc::unshare(libc::CLONE_NEWNET) };
            eprintln!("still here after unshare");
            std::process::exit(0);
        }
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::a_forbidden_call_ends_the_process_with_a_message",
                "--nocapture",
            ])
            .env("CRX_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(159), "{stderr}");
        assert!(
            stderr.contains(&format!("clone3: -1 Some({})", libc::ENOSYS)),
            "{stderr}"
        );
        assert!(stderr.contains("a thread runs"), "{stderr}");
        assert!(stderr.contains("seccomp: system call"), "{stderr}");
        assert!(!stderr.contains("still here"), "{stderr}");
    }
}
