//! The gRPC server: the CRI socket (its directory 0700, the socket 0600, put in place by rename
//! so it is never reachable with looser permissions), both CRI services on it, and a graceful
//! stop on SIGTERM or SIGINT that removes the socket.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;

use crate::deadline::DeadlineLayer;
use crate::image_service::ImageService;
use crate::pods::Runtime;
use crate::runtime_service::RuntimeService;
use crate::streams::SessionHandler;
use crx_cri::config::Config;
use crx_streaming::StreamingServer;

/// How long requests still running at a stop signal may take to finish.
const DRAIN: Duration = Duration::from_secs(10);
/// Largest message accepted or sent (ListImages of a big store, verbose statuses).
const MAX_MESSAGE: usize = 16 << 20;

/// Serve `config.listen` until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    private_dir(&config.state_dir)?;
    let registry = config.registry();
    let store = crx_image::Store::open(&config.image.root, registry.clone())
        .with_context(|| format!("opening the image store {}", config.image.root.display()))?;
    let images = ImageService::new(store.clone(), registry);
    let pods = Runtime::new(config.clone(), store)
        .with_context(|| format!("loading the pod records in {}", config.state_dir.display()))?;
    let streaming = StreamingServer::start(
        config.streaming_address()?,
        Arc::new(SessionHandler(pods.clone())),
    )
    .context("starting the streaming server")?;
    let runtime = RuntimeService::new(pods, streaming);

    let socket = config.socket();
    let listener = bind(&socket)?;
    let _remove = RemoveOnDrop(socket.clone());
    tracing::info!(socket = %socket.display(), state_dir = %config.state_dir.display(), image_root = %config.image.root.display(), handler = %config.runtime.handler, "crx-cri serving CRI v1");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .layer(DeadlineLayer)
        .add_service(
            ImageServiceServer::new(images)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            RuntimeServiceServer::new(runtime)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    let mut server = std::pin::pin!(server);
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        done = &mut server => return done.context("serving CRI"),
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(DRAIN, server).await {
        Ok(done) => done.context("serving CRI")?,
        Err(_) => tracing::warn!("requests still running after {DRAIN:?}; stopping without them"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Listen on `path`: its directory made 0700 if missing, a stale socket (nothing answering)
/// replaced, a live one refused. The socket is bound under a temporary name, made 0600, then
/// renamed into place.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path
        .parent()
        .with_context(|| format!("socket {} has no directory", path.display()))?;
    if !dir.exists() {
        private_dir(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another server is listening on {}", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("placing socket {}", path.display()));
    }
    Ok(listener)
}

/// Create `dir` (and missing parents) with mode 0700.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Removes the socket when serving ends, however it ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(socket = %self.0.display(), "removing the socket: {e}");
        }
    }
}
