//! `crx-testhost-agent`: the test host's command agent, exec'd by the L1's /init as PID 1.
//!
//! `crx-testhost-agent --listen ADDR --idle-secs N --token SECRET [--no-pin]`. As PID 1 it only
//! supervises (see [`supervisor`]); its child serves requests (see [`server`]) and exits after N
//! idle seconds, which powers the L1 off.

mod cgroup;
mod command;
mod cpu_pin;
mod server;
mod static_keys;
mod supervisor;

use std::net::SocketAddr;
use std::time::Duration;

/// The command line.
struct Args {
    listen: SocketAddr,
    idle: Duration,
    /// Requests without this token are refused.
    token: String,
    /// Pin each command to one CPU (see [`cpu_pin`]); `--no-pin` turns it off.
    pin_commands: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut idle = None;
    let mut token = None;
    let mut pin_commands = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--idle-secs" => {
                idle = Some(Duration::from_secs(
                    value()?.parse().map_err(|e| format!("--idle-secs: {e}"))?,
                ));
            }
            "--token" => token = Some(value()?),
            "--no-pin" => pin_commands = false,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        idle: idle.ok_or("--idle-secs is required")?,
        token: token.ok_or("--token is required")?,
        pin_commands,
    })
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CRX_TESTHOST_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            tracing::error!(
                "{e}; usage: crx-testhost-agent --listen ADDR --idle-secs N --token SECRET [--no-pin]"
            );
            std::process::exit(2);
        }
    };
    if std::process::id() == 1 {
        supervisor::run();
    }
    if let Err(e) = server::serve(args.listen, args.idle, args.token, args.pin_commands) {
        tracing::error!("cannot serve on {}: {e}", args.listen);
        std::process::exit(1);
    }
}
