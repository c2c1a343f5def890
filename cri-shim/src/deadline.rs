//! Client deadlines (the `grpc-timeout` header) answered with DEADLINE_EXCEEDED, as gRPC
//! specifies and kubelet and critest expect. tonic's own deadline handling, which sits outside
//! the services, answers CANCELLED; this layer sits inside it and fires a millisecond earlier
//! (tokio's timer granularity), so it always answers first. Work a handler spawned on its own
//! (a pull) goes on; the handler's future is dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;

/// Adds [`Deadlines`] to a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower_layer::Layer<S> for DeadlineLayer {
    type Service = Deadlines<S>;

    fn layer(&self, inner: S) -> Deadlines<S> {
        Deadlines(inner)
    }
}

/// A service whose calls end with DEADLINE_EXCEEDED when the client's deadline passes.
#[derive(Debug, Clone)]
pub struct Deadlines<S>(S);

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Deadlines<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let timeout = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_timeout);
        let call = self.0.call(request);
        match timeout {
            None => Box::pin(call),
            Some(timeout) => Box::pin(async move {
                let early = timeout.saturating_sub(Duration::from_millis(1));
                match tokio::time::timeout(early, call).await {
                    Ok(done) => done,
                    Err(_) => Ok(Status::deadline_exceeded(format!(
                        "the client's deadline ({timeout:?}) passed"
                    ))
                    .into_http()),
                }
            }),
        }
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_timeout(value: &str) -> Option<Duration> {
    if !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse_timeout("995m"), Some(Duration::from_millis(995)));
        assert_eq!(
            parse_timeout("999872u"),
            Some(Duration::from_micros(999_872))
        );
        assert_eq!(parse_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", "1é"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }
}
