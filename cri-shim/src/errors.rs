//! gRPC statuses for the errors of the libraries under the CRI server (images, sandboxes,
//! pods, the guest agent).

use crx_image::Error as ImageError;
use crx_runtime::agent::AgentError;
use crx_runtime::pod::PodError;
use crx_runtime::sandbox::SandboxError;
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

/// The status of a sandbox error.
pub fn sandbox_status(e: SandboxError) -> Status {
    let code = match &e {
        SandboxError::InvalidId(_) => Code::InvalidArgument,
        SandboxError::Exists(_) => Code::AlreadyExists,
        SandboxError::NotFound(_) => Code::NotFound,
        SandboxError::VmmExited { .. } | SandboxError::Agent(_) => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, chain(&e))
}

/// The status of a pod or container error.
pub fn pod_status(e: PodError) -> Status {
    match e {
        PodError::Image(e) => image_status(e),
        PodError::Sandbox(e) => sandbox_status(e),
        PodError::Spec(e) => Status::invalid_argument(chain(&e)),
        PodError::Agent { .. } => Status::new(
            match &e {
                PodError::Agent { source, .. }
                    if source.code() == Some(crx_agent_proto::ErrorCode::BadRequest) =>
                {
                    Code::InvalidArgument
                }
                _ => Code::Unavailable,
            },
            chain(&e),
        ),
        e => Status::internal(chain(&e)),
    }
}

/// The status of an agent error.
pub fn agent_status(e: AgentError) -> Status {
    let code = match e.code() {
        Some(crx_agent_proto::ErrorCode::NotFound) => Code::NotFound,
        Some(crx_agent_proto::ErrorCode::BadRequest) => Code::InvalidArgument,
        Some(crx_agent_proto::ErrorCode::InvalidState) => Code::FailedPrecondition,
        _ => Code::Unavailable,
    };
    Status::new(code, format!("the pod's agent: {}", chain(&e)))
}
