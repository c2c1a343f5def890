//! Launch time across an exec: a front end (`crx`) records when the user's request started and
//! hands it to the VMM process it becomes, so boot times count from there.

use std::time::{Duration, Instant};

/// The variable carrying the launch time (CLOCK_MONOTONIC, nanoseconds).
pub const LAUNCH_ENV: &str = "CRX_LAUNCH_MONOTONIC_NS";

/// CLOCK_MONOTONIC now, in nanoseconds (the clock `Instant` uses on Linux).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The launch instant from [`LAUNCH_ENV`] when a front end set it, else now.
pub fn launch_instant() -> Instant {
    let now = Instant::now();
    std::env::var(LAUNCH_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|launch_ns| Duration::from_nanos(monotonic_ns().saturating_sub(launch_ns)))
        .and_then(|since| now.checked_sub(since))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_ns() >= a + 2_000_000);
    }
}
