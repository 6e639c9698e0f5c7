//! One attempt of a request: what it holds while in flight, how its result
//! is classified, and what its response body releases when it ends.

use http::Response;
use mesh_core::breaker::RequestPermit;
use mesh_core::outlier::ResultClass;
use mesh_core::retry::{Outcome, RetryPermit};

use crate::balance::ActiveGuard;
use crate::error::{BoxError, Error, ErrorKind};
use crate::local_reply::is_grpc;
use crate::stats::MeshStats;

/// What an attempt holds while in flight: the endpoint's in-flight count,
/// the cluster's active-request slot (circuit breaker) and, for a retry,
/// the cluster's retry slot.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) active: ActiveGuard,
    /// Held for its drop: the breaker slot.
    pub(crate) _request: RequestPermit,
    /// Held for its drop: the retry slot.
    pub(crate) _retry: Option<RetryPermit>,
}

impl Attempt {
    /// Reports `outcome` to the cluster's outlier detection.
    pub(crate) fn report(&self, outcome: &Outcome, stats: &MeshStats) {
        report(&self.active, ResultClass::of(outcome), stats);
    }
}

fn report(active: &ActiveGuard, class: ResultClass, stats: &MeshStats) {
    if let Some(ejection) = active.cluster_state().report(active.index(), class) {
        stats.add_ejection();
        tracing::info!(
            cluster = %active.cluster_state().name(),
            endpoint = %active.address(),
            reason = ?ejection.reason,
            duration = ?ejection.duration,
            "outlier detection ejected an endpoint"
        );
    }
}

/// What a response body releases when the response ends: the attempt's
/// slots, and for a gRPC response whose status comes in trailers, the
/// outlier report.
#[derive(Debug)]
pub(crate) struct Finish {
    attempt: Attempt,
    /// A gRPC response that began with `200` and no status: its status is
    /// in the trailers.
    grpc_pending: bool,
    stats: MeshStats,
}

impl Finish {
    pub(crate) fn new(attempt: Attempt, grpc_pending: bool, stats: MeshStats) -> Self {
        Finish {
            attempt,
            grpc_pending,
            stats,
        }
    }

    /// Trailers arrived: a gRPC status there is the attempt's result.
    pub(crate) fn trailers(&mut self, trailers: &http::HeaderMap) {
        if !self.grpc_pending {
            return;
        }
        if let Some(code) = grpc_code(trailers) {
            self.grpc_pending = false;
            self.attempt.report(&Outcome::grpc(code), &self.stats);
        }
    }

    /// The body failed: the stream was reset after the response began.
    pub(crate) fn failed(&mut self) {
        if self.grpc_pending {
            self.grpc_pending = false;
            self.attempt.report(&Outcome::Reset, &self.stats);
        }
    }

    /// The response is over; dropping releases the slots.
    pub(crate) fn end(self) {}
}

/// The `grpc-status` of a header map, as an unsigned code.
pub(crate) fn grpc_code(headers: &http::HeaderMap) -> Option<u32> {
    crate::grpc::grpc_status(headers).and_then(|c| u32::try_from(c).ok())
}

/// The outcome of a response head: its HTTP status and, for a
/// Trailers-Only gRPC response, its gRPC status.
pub(crate) fn outcome_of<B>(response: &Response<B>) -> Outcome {
    Outcome::Status {
        http: response.status().as_u16(),
        grpc: grpc_code(response.headers()),
    }
}

/// Whether a response is a gRPC response whose status will come in
/// trailers (a `200` without `grpc-status`, body still open).
pub(crate) fn status_in_trailers<B: http_body::Body>(response: &Response<B>) -> bool {
    response.status() == http::StatusCode::OK
        && is_grpc(response.headers())
        && grpc_code(response.headers()).is_none()
        && !response.body().is_end_stream()
}

/// How a failed attempt failed, from the error chain: a connect failure, an
/// HTTP/2 `REFUSED_STREAM`, or any other reset.
pub(crate) fn outcome_of_error(e: &(dyn std::error::Error + 'static)) -> Outcome {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(mesh) = e.downcast_ref::<Error>() {
            if mesh.kind() == ErrorKind::Connect {
                return Outcome::ConnectFailure;
            }
        } else if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Outcome::RefusedStream;
            }
        } else if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return Outcome::ConnectFailure;
        }
        next = e.source();
    }
    Outcome::Reset
}

/// The message of an inner service's error that is a circuit-breaker
/// overflow (from the pool: `http1MaxPendingRequests`).
pub(crate) fn overflow_message(e: &BoxError) -> Option<String> {
    e.downcast_ref::<Error>()
        .filter(|e| e.kind() == ErrorKind::Overflow)
        .map(|e| e.message().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_their_chain() {
        let connect = Error::new(ErrorKind::Connect, "cannot connect");
        assert_eq!(outcome_of_error(&connect), Outcome::ConnectFailure);
        let refused = Error::new(ErrorKind::Upstream, "request failed")
            .with_source(h2::Error::from(h2::Reason::REFUSED_STREAM));
        assert_eq!(outcome_of_error(&refused), Outcome::RefusedStream);
        let reset = Error::new(ErrorKind::Upstream, "request failed")
            .with_source(h2::Error::from(h2::Reason::INTERNAL_ERROR));
        assert_eq!(outcome_of_error(&reset), Outcome::Reset);
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(outcome_of_error(&io), Outcome::ConnectFailure);
    }

    #[test]
    fn trailers_only_responses_carry_their_status_in_headers() {
        let response = Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        assert_eq!(outcome_of(&response), Outcome::grpc(14));
        assert!(!status_in_trailers(&response));
        let streaming = Response::builder()
            .header("content-type", "application/grpc")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))
            .unwrap();
        assert!(status_in_trailers(&streaming));
    }
}
