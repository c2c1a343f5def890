//! The serving agent: accepts connections, answers pings and shutdowns, runs commands (one
//! thread per connection), and exits after the idle timeout passes with no command running.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crx_testhost::protocol::{Reply, Request, Status, PROTOCOL_VERSION};

use crate::command;
use crate::cpu_pin::CpuPins;

/// When the agent last had something to do, and how much it has now.
pub struct Activity {
    token: String,
    started: Instant,
    idle_limit: Duration,
    last_request: Mutex<Instant>,
    active_commands: AtomicUsize,
    /// Where commands are pinned; `None` runs them on every CPU.
    cpu_pins: Option<Arc<CpuPins>>,
}

impl Activity {
    fn touch(&self) {
        *self.last_request.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.active_commands.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(
            self.last_request
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed(),
        )
    }

    /// Counts a running command until the guard drops.
    pub fn command(self: &Arc<Self>) -> CommandGuard {
        self.active_commands.fetch_add(1, Ordering::SeqCst);
        CommandGuard(Arc::clone(self))
    }
}

pub struct CommandGuard(Arc<Activity>);

impl Drop for CommandGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active_commands.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn serve(
    listen: SocketAddr,
    idle_limit: Duration,
    token: String,
    pin_commands: bool,
) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    let activity = Arc::new(Activity {
        token,
        started: Instant::now(),
        idle_limit,
        last_request: Mutex::new(Instant::now()),
        active_commands: AtomicUsize::new(0),
        cpu_pins: pin_commands.then(CpuPins::for_this_host).flatten(),
    });
    tracing::info!(
        "agent serving on {listen}; powering off after {} s idle; commands {}",
        idle_limit.as_secs(),
        if activity.cpu_pins.is_some() {
            "pinned each to one CPU"
        } else {
            "on every CPU"
        }
    );
    {
        let activity = Arc::clone(&activity);
        std::thread::spawn(move || exit_when_idle(&activity));
    }
    for connection in listener.incoming() {
        match connection {
            Ok(stream) => {
                activity.touch();
                let activity = Arc::clone(&activity);
                std::thread::spawn(move || {
                    if let Err(e) = handle(stream, &activity) {
                        tracing::debug!("connection ended with an error: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
    Ok(())
}

fn exit_when_idle(activity: &Activity) {
    let check_every = activity
        .idle_limit
        .min(Duration::from_secs(5))
        .max(Duration::from_millis(100));
    loop {
        std::thread::sleep(check_every);
        if activity
            .idle_for()
            .is_some_and(|idle| idle >= activity.idle_limit)
        {
            tracing::info!("idle for {} s", activity.idle_limit.as_secs());
            std::process::exit(0);
        }
    }
}

fn handle(mut stream: TcpStream, activity: &Arc<Activity>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (token, request) = Request::read_from(&mut stream)?;
    stream.set_read_timeout(None)?;
    if token != activity.token {
        tracing::warn!("refused a request with a wrong token");
        return Reply::Failure("wrong token".into()).write_to(&mut stream);
    }
    match request {
        Request::Ping { probe_kvm } => {
            Reply::Pong(status(activity, probe_kvm)).write_to(&mut stream)
        }
        Request::Shutdown => {
            tracing::info!("shutdown requested");
            Reply::ShuttingDown.write_to(&mut stream)?;
            std::process::exit(0);
        }
        Request::Run(run) => {
            let _guard = activity.command();
            let pin = activity.cpu_pins.as_ref().map(|pins| pins.take());
            command::run(run, pin, stream)
        }
    }
}

fn status(activity: &Activity, probe_kvm: bool) -> Status {
    let kvm = probe_kvm.then(|| match crx_kvm_probe::probe() {
        Ok(kind) => format!("{kind:?}"),
        Err(e) => format!("error: {e}"),
    });
    Status {
        protocol: PROTOCOL_VERSION,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        uptime_secs: activity.started.elapsed().as_secs_f64(),
        active_commands: activity.active_commands.load(Ordering::SeqCst),
        idle_shutdown_secs: activity.idle_limit.as_secs(),
        kvm,
    }
}
