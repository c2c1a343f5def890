//! The device event loop: one thread, off the vCPU threads, that waits (epoll, through
//! `event-manager`) on every device's queue notifications and backend fds and runs the device's
//! handler for each. Stopping it is a write to its stop eventfd; the thread is joined. Pausing it
//! (for a snapshot) is a write to its pause eventfd: the thread parks between two handlers, so no
//! device is in the middle of a request, until it is resumed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{consume, VirtioDevice};
use crate::mmio::lock;

/// The loop thread's stack: ample for the devices' handlers, and under 2 MiB so transparent huge
/// pages cannot make a whole 2 MiB of it resident at the first touch (as for the vCPU threads).
const EVENT_LOOP_STACK: usize = 512 << 10;

/// Why the event loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the device event loop: {0}")]
    Create(#[source] event_manager::Error),
    #[error("cannot create the event loop's stop or pause eventfd: {0}")]
    StopEvent(#[source] std::io::Error),
    #[error("cannot start the device event loop thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A device as an event-manager subscriber (the loop thread here, or a single-threaded harness).
pub struct DeviceSubscriber(pub Arc<Mutex<dyn VirtioDevice>>);

impl MutEventSubscriber for DeviceSubscriber {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        lock(&self.0).process_event(events, ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        lock(&self.0).init_events(ops);
    }
}

/// Whether the loop is asked to pause, and whether it has.
#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: bool,
}

/// Parks the loop thread while a pause is requested.
struct PauseSubscriber {
    event: EventFd,
    state: Arc<(Mutex<PauseState>, Condvar)>,
}

impl MutEventSubscriber for PauseSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        consume(&self.event);
        let (lock, changed) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        if state.requested {
            state.parked = true;
            changed.notify_all();
            while state.requested {
                state = changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            state.parked = false;
            changed.notify_all();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            tracing::error!("device event loop: cannot watch its pause event: {e}");
        }
    }
}

struct StopSubscriber {
    event: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        consume(&self.event);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            tracing::error!("device event loop: cannot watch its stop event: {e}");
        }
    }
}

/// The running event loop thread.
pub struct EventLoop {
    stop: EventFd,
    pause: EventFd,
    pause_state: Arc<(Mutex<PauseState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop serving `devices`.
    pub fn start(devices: Vec<Arc<Mutex<dyn VirtioDevice>>>) -> Result<EventLoop, EventLoopError> {
        let mut manager: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(EventLoopError::Create)?;
        let stop_event = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::StopEvent)?;
        let stop = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Box::new(StopSubscriber {
            event: stop_event.try_clone().map_err(EventLoopError::StopEvent)?,
            stop: stop.clone(),
        }));
        let pause_event = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::StopEvent)?;
        let pause_state = Arc::new((Mutex::new(PauseState::default()), Condvar::new()));
        manager.add_subscriber(Box::new(PauseSubscriber {
            event: pause_event.try_clone().map_err(EventLoopError::StopEvent)?,
            state: pause_state.clone(),
        }));
        for device in devices {
            manager.add_subscriber(Box::new(DeviceSubscriber(device)));
        }
        let thread = std::thread::Builder::new()
            .name("crx-devices".into())
            .stack_size(EVENT_LOOP_STACK)
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        tracing::error!("device event loop: {e}");
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Thread)?;
        Ok(EventLoop {
            stop: stop_event,
            pause: pause_event,
            pause_state,
            thread: Some(thread),
        })
    }

    /// Parks the loop thread between two handlers and returns once it is parked: until
    /// [`EventLoop::resume`], no device handler runs (queues, backends and guest memory stay as
    /// they are). Returns false if the loop is not running.
    pub fn pause(&self) -> bool {
        if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
            return false;
        }
        let (lock, changed) = &*self.pause_state;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        state.requested = true;
        if let Err(e) = self.pause.write(1) {
            tracing::error!("device event loop: cannot signal pause: {e}");
            state.requested = false;
            return false;
        }
        while !state.parked {
            let (next, timeout) = changed
                .wait_timeout(state, std::time::Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner());
            state = next;
            if timeout.timed_out() && self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                state.requested = false;
                return false;
            }
        }
        true
    }

    /// Lets a paused loop run again.
    pub fn resume(&self) {
        let (lock, changed) = &*self.pause_state;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        state.requested = false;
        changed.notify_all();
    }

    /// Stops the loop and joins its thread (the devices are dropped with it).
    pub fn stop(&mut self) {
        self.resume();
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!("device event loop: cannot signal stop: {e}");
                return;
            }
            if thread.join().is_err() {
                tracing::error!("device event loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_parks_the_loop_until_resumed_and_stop_works_while_paused() {
        let mut event_loop = EventLoop::start(Vec::new()).unwrap();
        assert!(event_loop.pause());
        event_loop.resume();
        assert!(event_loop.pause());
        event_loop.stop();
        assert!(!event_loop.pause(), "a stopped loop cannot pause");
    }
}
