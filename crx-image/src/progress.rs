//! Pull progress reporting: a trait the CLI implements with progress bars, and a default that
//! emits structured `tracing` events.

/// Observer of blob transfers during a pull. Called from async tasks; keep it cheap.
pub trait Progress: Send + Sync {
    /// A blob download starts (`size` bytes expected).
    fn start(&self, digest: &str, size: u64);
    /// `bytes` more bytes of `digest` arrived.
    fn advance(&self, digest: &str, bytes: u64);
    /// The blob is in the store; `downloaded` is false when it already was (or another pull
    /// fetched it).
    fn finish(&self, digest: &str, downloaded: bool);
}

/// [`Progress`] as `tracing` events: one at start, one at the end of each blob.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogProgress;

impl Progress for LogProgress {
    fn start(&self, digest: &str, size: u64) {
        tracing::info!(digest, size, "blob download started");
    }
    fn advance(&self, _digest: &str, _bytes: u64) {}
    fn finish(&self, digest: &str, downloaded: bool) {
        tracing::info!(digest, downloaded, "blob ready");
    }
}
