//! The state every queue-serving device keeps the same way: one ioeventfd per queue, an activate
//! event that wakes the event loop at DRIVER_OK, and the active queues, memory and interrupt.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{consume, ActivateError, Activation, Interrupt};

/// What a device serves once the driver set DRIVER_OK.
pub struct Active {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
    pub acked_features: u64,
}

/// Which of the device's own events fired.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// The device was just activated (handled once, on the loop thread).
    Activated,
    /// The driver notified queue `n`.
    Queue(usize),
    /// Some other fd (the device's backend).
    Other(i32),
}

/// Queue events, activation, and the active state.
pub struct DeviceBase {
    queue_max_sizes: Vec<u16>,
    queue_events: Vec<EventFd>,
    activate_event: EventFd,
    pub active: Option<Active>,
}

impl DeviceBase {
    pub fn new(queue_max_sizes: Vec<u16>) -> std::io::Result<Self> {
        let queue_events = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()?;
        Ok(DeviceBase {
            queue_max_sizes,
            queue_events,
            activate_event: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
        })
    }

    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Takes the activation (every queue must be ready) and wakes the loop.
    pub fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if activation.acked_features & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
            == 0
        {
            return Err(ActivateError::LegacyDriver);
        }
        use virtio_queue::QueueT;
        if let Some(index) = activation.queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::InvalidQueue(index));
        }
        self.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
            acked_features: activation.acked_features,
        });
        self.activate_event.write(1).map_err(ActivateError::Wake)
    }

    /// The queues of an active device.
    pub fn active_queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }

    /// Registers the queue events and the activate event.
    pub fn init_events(&self, ops: &mut EventOps) {
        for event in self.queue_events.iter().chain([&self.activate_event]) {
            if let Err(e) = ops.add(Events::new(event, EventSet::IN)) {
                tracing::error!("virtio device: cannot watch an event: {e}");
            }
        }
    }

    /// Tells which event fired, consuming it; queue events of an inactive device are dropped.
    pub fn wake(&self, events: &Events) -> Option<Wake> {
        let fd = events.fd();
        if fd == self.activate_event.as_raw_fd() {
            consume(&self.activate_event);
            return Some(Wake::Activated);
        }
        if let Some(n) = self.queue_events.iter().position(|e| e.as_raw_fd() == fd) {
            consume(&self.queue_events[n]);
            return self.active.is_some().then_some(Wake::Queue(n));
        }
        Some(Wake::Other(fd))
    }
}

/// Implements the named [`VirtioDevice`](crate::device::VirtioDevice) methods for a device whose
/// `base: DeviceBase` field does all of their work: any of `queue_max_sizes`, `queue_events`,
/// `activate`, `reset` (drops the active queues), `active_queues` and `init_events`.
macro_rules! from_base {
    ($($method:ident),+ $(,)?) => {
        $($crate::base::from_base!(@ $method);)+
    };
    (@ queue_max_sizes) => {
        fn queue_max_sizes(&self) -> &[u16] {
            self.base.queue_max_sizes()
        }
    };
    (@ queue_events) => {
        fn queue_events(&self) -> &[vmm_sys_util::eventfd::EventFd] {
            self.base.queue_events()
        }
    };
    (@ activate) => {
        fn activate(
            &mut self,
            activation: $crate::device::Activation,
        ) -> Result<(), $crate::device::ActivateError> {
            self.base.activate(activation)
        }
    };
    (@ reset) => {
        fn reset(&mut self) -> bool {
            self.base.active = None;
            true
        }
    };
    (@ active_queues) => {
        fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
            self.base.active_queues()
        }
    };
    (@ init_events) => {
        fn init_events(&mut self, ops: &mut event_manager::EventOps) {
            self.base.init_events(ops);
        }
    };
}
pub(crate) use from_base;
