//! `crx-cri`: CRX's Kubernetes CRI v1 server. Serves the ImageService on the crx-image store and
//! the RuntimeService (pods as microVMs) over gRPC on a Unix socket; kubelet, crictl and critest
//! talk to it. Reads its configuration file, applies the flags over it, serves until SIGTERM or
//! SIGINT and then removes its socket.

mod containers;
mod cri_log;
mod deadline;
mod errors;
mod host_ports;
mod image_service;
mod images;
mod pods;
mod records;
mod runtime_service;
mod server;
mod stats;
mod streams;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use crx_cri::config::{self, Config, DEFAULT_CONFIG};

#[derive(Parser, Debug)]
#[command(
    name = "crx-cri",
    version,
    about = "CRX's Kubernetes CRI server: every pod in its own microVM",
    long_about = "CRX's Kubernetes CRI v1 server (gRPC on a Unix socket). The ImageService works on \
the crx-image store; the RuntimeService runs every pod sandbox in its own microVM (several \
containers each), with CNI networking, CRI logs and ExecSync. Settings \
come from the configuration file; flags override it. Several instances run side by side with \
their own --listen and --state-dir.",
    after_long_help = config::EXAMPLE
)]
struct Cli {
    /// Configuration file [default: /etc/crx/config.toml, if present].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// CRI endpoint to serve: unix:///PATH or /PATH [default: unix:///run/crx/crx.sock].
    #[arg(long, value_name = "ENDPOINT")]
    listen: Option<String>,
    /// Runtime state of this instance (sandboxes) [default: /run/crx].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Image store root, shared with `crx` [default: /var/lib/crx].
    #[arg(long, value_name = "DIR")]
    image_root: Option<PathBuf>,
    /// Log filter (tracing directives: error, warn, info, debug, trace, or per module)
    /// [default: info].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

impl Cli {
    /// The file's configuration with the flags applied.
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path, true)?,
            None => Config::load(std::path::Path::new(DEFAULT_CONFIG), false)?,
        };
        if let Some(listen) = &self.listen {
            config.listen = listen.clone();
        }
        if let Some(dir) = &self.state_dir {
            config.state_dir = dir.clone();
        }
        if let Some(root) = &self.image_root {
            config.image.root = root.clone();
        }
        if let Some(level) = &self.log_level {
            config.log_level = level.clone();
        }
        config.check()?;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let config = Cli::parse().config()?;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .with_context(|| format!("log level {:?}", config.log_level))?;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Escape codes only on a terminal: the log is usually a file or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(server::serve(config))
}
