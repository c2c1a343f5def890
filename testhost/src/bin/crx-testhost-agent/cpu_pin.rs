//! Commands run pinned off the L1's boot CPU: each on one of CPUs 1..n, the least loaded.
//!
//! QEMU's emulated SVM (TCG) sometimes resumes an L2 vCPU with the L1's own state (RIP in
//! kvm_amd's `__svm_vcpu_run`, CR3 an L1 page table), and the L2 then triple-faults or wedges.
//! Measured with the 100 MB `crx run` stream (stdout and stderr) in a 2-CPU L1:
//! - unpinned, alone: 3 of 8 runs failed;
//! - pinned to CPU 0, alone: 0 of 8;
//! - two streams at once, one pinned to each CPU: CPU 0's failed 10 of 15 runs, CPU 1's 0 of
//!   15 (also with every device interrupt moved to CPU 1, and with each whole pipeline pinned);
//! - two streams at once, both pinned to CPU 1: 0 of 10.
//!
//! So L2 vCPUs run on CPU 0 only at a cost, and CPU 0 keeps what is not a command: the agent,
//! device interrupts, the L1's housekeeping. A command's processes (its VMMs, vCPU and device
//! threads inherit the affinity) and the agent threads that carry its output run on its CPU.

use std::sync::{Arc, Mutex};

/// How many commands run on each of CPUs 1..n (index 0 is CPU 1).
pub struct CpuPins {
    loads: Mutex<Vec<usize>>,
}

/// One command's CPU, released when dropped.
pub struct CpuPin {
    pins: Arc<CpuPins>,
    pub cpu: usize,
}

impl CpuPins {
    /// CPUs 1..n of this host; `None` with one CPU (nothing to keep CPU 0 free for).
    pub fn for_this_host() -> Option<Arc<CpuPins>> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        (cpus > 1).then(|| Arc::new(CpuPins::new(cpus - 1)))
    }

    fn new(command_cpus: usize) -> CpuPins {
        CpuPins {
            loads: Mutex::new(vec![0; command_cpus]),
        }
    }

    /// Takes the least loaded command CPU (the lowest of equals) for one command.
    pub fn take(self: &Arc<Self>) -> CpuPin {
        let mut loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (0..loads.len())
            .min_by_key(|&slot| loads[slot])
            .expect("at least one command CPU");
        loads[slot] += 1;
        CpuPin {
            pins: Arc::clone(self),
            cpu: slot + 1,
        }
    }
}

impl CpuPin {
    /// Restricts the calling thread, and the threads and processes it starts later, to `cpu`.
    /// Only calls sched_setaffinity(2), so a forked child may call it before exec.
    pub fn restrict_current_thread(cpu: usize) -> std::io::Result<()> {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below the CPU count, far below CPU_SETSIZE; `set` is a live local.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
        let result =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if result == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        let mut loads = self.pins.loads.lock().unwrap_or_else(|e| e.into_inner());
        loads[self.cpu - 1] -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_go_to_the_least_loaded_cpu_but_cpu_0_and_leave_it_when_done() {
        let pins = Arc::new(CpuPins::new(2));
        let a = pins.take();
        let b = pins.take();
        assert_eq!((a.cpu, b.cpu), (1, 2));
        let c = pins.take();
        assert_eq!(c.cpu, 1);
        drop(b);
        assert_eq!(pins.take().cpu, 2);
        drop(a);
        drop(c);
        assert_eq!(pins.take().cpu, 1);
    }
}
