//! The device event loop: one thread, off the vCPU threads, that waits (epoll, through
//! `event-manager`) on every device's queue notifications and backend fds and runs the device's
//! handler for each. Stopping it is a write to its stop eventfd; the thread is joined.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    #[error("cannot create the event loop's stop eventfd: {0}")]
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
            thread: Some(thread),
        })
    }

    /// Stops the loop and joins its thread (the devices are dropped with it).
    pub fn stop(&mut self) {
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
