//! PID 1 of the L1: pins KVM's static keys and brings the other CPUs online (see
//! [`crate::static_keys`]), starts the serving agent as its child, reaps every orphan, and powers the L1 off when the serving agent exits (idle
//! timeout, shutdown request or crash).
//!
//! Keeping PID 1 apart from the server means the server can wait for its own commands while
//! PID 1's `waitpid(-1)` reaps whatever they leave behind.

use std::process::Command;

pub fn run() -> ! {
    // Held until power-off: PID 1 outlives every VM the tests make.
    let _pins = crate::static_keys::pin_kvm()
        .inspect_err(|e| tracing::warn!("cannot pin KVM's static keys: {e}"));
    if let Err(e) = crate::static_keys::online_all_cpus() {
        tracing::warn!("cannot bring every CPU online: {e}");
    }
    let server = match Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .spawn()
    {
        Ok(child) => child.id(),
        Err(e) => {
            tracing::error!("cannot start the serving agent: {e}");
            power_off();
        }
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) writes the status into a local i32 that outlives the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::error!("waitpid: {}", std::io::Error::last_os_error());
            power_off();
        }
        if u32::try_from(pid).is_ok_and(|pid| pid == server) {
            tracing::info!("the serving agent exited (wait status {status:#x}); powering off");
            power_off();
        }
    }
}

fn power_off() -> ! {
    // SAFETY: sync(2) and reboot(2) take no pointers; PID 1 may power the machine off.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot(2) returns only on failure. Then PID 1 exits: the kernel panics, which with panic=-1
    // and QEMU's -no-reboot ends the L1 all the same.
    tracing::error!("reboot(RB_POWER_OFF): {}", std::io::Error::last_os_error());
    std::process::exit(1);
}
