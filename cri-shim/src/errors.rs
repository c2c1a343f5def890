//! gRPC statuses for the errors of the libraries under the CRI server.

use crx_image::Error as ImageError;
use tonic::{Code, Status};

/// The status code and message of an image service error.
pub fn image_status(e: ImageError) -> Status {
    let code = match &e {
        ImageError::InvalidReference { .. } | ImageError::InvalidDigest(_) => Code::InvalidArgument,
        ImageError::Unauthorized { .. } => Code::Unauthenticated,
        ImageError::NotInRegistry { .. } | ImageError::ImageNotFound(_) => Code::NotFound,
        ImageError::LeaseNotFound(_) => Code::NotFound,
        ImageError::Registry { .. } => Code::Unavailable,
        ImageError::BlobMismatch { .. } | ImageError::DiffIdMismatch { .. } => Code::DataLoss,
        ImageError::Unsupported(_) | ImageError::InUse { .. } => Code::FailedPrecondition,
        ImageError::Malformed { .. }
        | ImageError::Layer { .. }
        | ImageError::Io { .. }
        | ImageError::Task(_) => Code::Internal,
    };
    Status::new(code, chain(&e))
}

/// A task of the server itself died (a panic in blocking work).
pub fn join_status(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("internal task failed: {e}"))
}

/// `e` and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
