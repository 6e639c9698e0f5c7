//! One attempt of a request: what it holds while in flight, how its result
//! is classified, and what its response body releases when it ends.
//!
//! When a telemetry layer is above the mesh (the request carries a
//! [`DecisionRecord`]), an attempt also holds its entry in the record (an
//! [`AttemptGuard`]: the attempt's child span when sampled), finished with
//! the attempt's outcome: at once for an attempt that failed or is
//! retried, at the end of the response body for the one whose response
//! goes back to the caller (with the gRPC status of its trailers).

use http::{Response, StatusCode};
use mesh_core::breaker::RequestPermit;
use mesh_core::outlier::ResultClass;
use mesh_core::retry::{Outcome, RetryPermit};

use crate::balance::ActiveGuard;
use crate::error::{BoxError, Error, ErrorKind};
use crate::local_reply::is_grpc;
use crate::stats::MeshStats;
use crate::telemetry::{AttemptGuard, AttemptOutcome, DecisionRecord, ResponseFlags};

/// What an attempt holds while in flight: the endpoint's in-flight count,
/// the cluster's active-request slot (circuit breaker) and, for a retry,
/// the cluster's retry slot; under telemetry, the request's decision
/// record and this attempt's entry in it.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) active: ActiveGuard,
    /// Held for its drop: the breaker slot.
    pub(crate) _request: RequestPermit,
    /// Held for its drop: the retry slot.
    pub(crate) _retry: Option<RetryPermit>,
    /// The request's decision record (`None` without a telemetry layer).
    pub(crate) record: Option<DecisionRecord>,
    /// This attempt's entry in the record, until its outcome is known
    /// (three words: its span, boxed, exists only for sampled requests).
    pub(crate) guard: Option<AttemptGuard>,
}

impl Attempt {
    /// An attempt to `active`; under telemetry, records it as started and
    /// points the request's `traceparent` at its span.
    pub(crate) fn start(
        active: ActiveGuard,
        request: RequestPermit,
        retry: Option<RetryPermit>,
        record: Option<&DecisionRecord>,
        headers: &mut http::HeaderMap,
    ) -> Self {
        let guard = record.map(|r| {
            let guard = r.attempt_started(active.address(), active.labels());
            guard.inject(headers);
            guard
        });
        Attempt {
            active,
            _request: request,
            _retry: retry,
            record: record.cloned(),
            guard,
        }
    }

    /// Reports `outcome` to the cluster's outlier detection.
    pub(crate) fn report(&self, outcome: &Outcome, stats: &MeshStats) {
        report(
            &self.active,
            ResultClass::of(outcome),
            stats,
            self.record.as_ref(),
        );
    }

    /// The attempt is over with a response (a retried one, or a local
    /// answer in its place).
    pub(crate) fn answered(&mut self, status: StatusCode, grpc_status: Option<i32>) {
        if let Some(guard) = self.guard.take() {
            guard.finish(AttemptOutcome::Response {
                status,
                grpc_status,
            });
        }
    }

    /// The attempt is over without a response: `flags` say why.
    pub(crate) fn failed(&mut self, flags: ResponseFlags, error: Option<&BoxError>) {
        if let Some(guard) = self.guard.take() {
            match error {
                Some(e) => guard.fail(flags, &**e),
                None => guard.finish(AttemptOutcome::Failed(flags)),
            }
        }
    }
}

/// Reports an attempt's (or a mirrored copy's) result to its cluster's
/// outlier detection, counting an ejection it causes.
pub(crate) fn report(
    active: &ActiveGuard,
    class: ResultClass,
    stats: &MeshStats,
    record: Option<&DecisionRecord>,
) {
    if let Some(ejection) = active.cluster_state().report(active.index(), class) {
        stats.add_ejection();
        if let Some(record) = record {
            record.outlier_ejected(active.address());
        }
        tracing::info!(
            cluster = %active.cluster_state().name(),
            endpoint = %active.address(),
            reason = ?ejection.reason,
            duration = ?ejection.duration,
            "outlier detection ejected an endpoint"
        );
    }
}

/// Envoy's response flag for an attempt that got no response.
pub(crate) fn outcome_flags(outcome: &Outcome) -> ResponseFlags {
    match outcome {
        Outcome::Status { .. } => ResponseFlags::empty(),
        Outcome::ConnectFailure => ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
        Outcome::RefusedStream => ResponseFlags::UPSTREAM_REMOTE_RESET,
        Outcome::Reset => ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
        Outcome::PerTryTimeout => ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
    }
}

/// What a response body releases when the response ends: the attempt's
/// slots, and for a gRPC response whose status comes in trailers, the
/// outlier report; under telemetry, the attempt's entry in the decision
/// record is finished then (its span covers the response body).
#[derive(Debug)]
pub(crate) struct Finish {
    attempt: Attempt,
    /// A gRPC response that began with `200` and no status: its status is
    /// in the trailers.
    grpc_pending: bool,
    stats: MeshStats,
    /// The response's status, for the attempt's record.
    status: StatusCode,
    /// Its gRPC status, from the headers or, later, the trailers
    /// ([`NO_GRPC_STATUS`] for none: an `Option<i32>` would take twice
    /// the room in every response body).
    grpc_status: i32,
}

/// [`Finish::grpc_status`] when there is none: a value no gRPC status
/// takes (codes are 0 to 16).
const NO_GRPC_STATUS: i32 = i32::MIN;

impl Finish {
    pub(crate) fn new<B>(
        attempt: Attempt,
        response: &Response<B>,
        grpc_pending: bool,
        stats: MeshStats,
    ) -> Self {
        let grpc_status = if attempt.guard.is_some() {
            crate::grpc::grpc_status(response.headers()).unwrap_or(NO_GRPC_STATUS)
        } else {
            NO_GRPC_STATUS
        };
        Finish {
            attempt,
            grpc_pending,
            stats,
            status: response.status(),
            grpc_status,
        }
    }

    /// Trailers arrived: a gRPC status there is the attempt's result.
    pub(crate) fn trailers(&mut self, trailers: &http::HeaderMap) {
        if self.attempt.guard.is_some()
            && let Some(code) = crate::grpc::grpc_status(trailers)
        {
            self.grpc_status = code;
        }
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
        self.attempt
            .failed(ResponseFlags::UPSTREAM_REMOTE_RESET, None);
    }

    /// The route timeout expired while the body streamed (response flag
    /// `UT`).
    pub(crate) fn timed_out(&mut self) {
        if let Some(record) = &self.attempt.record {
            record.flag(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
        }
        self.attempt
            .failed(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, None);
    }

    /// The response is over; dropping releases the slots.
    pub(crate) fn end(mut self) {
        let grpc_status = (self.grpc_status != NO_GRPC_STATUS).then_some(self.grpc_status);
        self.attempt.answered(self.status, grpc_status);
    }
}

/// The `grpc-status` of a header map, as an unsigned code.
pub(crate) fn grpc_code(headers: &http::HeaderMap) -> Option<u32> {
    crate::grpc::grpc_status(headers).and_then(|c| u32::try_from(c).ok())
}

/// The outcome of a response head: its HTTP status and, for a
/// Trailers-Only gRPC response, its gRPC status.
pub(crate) fn outcome_of<B>(response: &Response<B>) -> Outcome {
    outcome_of_request(response, true)
}

/// [`outcome_of`] for a request known to be gRPC (`grpc`) or not: the
/// `grpc-status` of a non-gRPC request's response is not looked up (a
/// header-map lookup, ≈ 53 instructions, on every response). The gRPC
/// retry conditions and outlier detection's gRPC mapping are about gRPC
/// calls; a plain HTTP request's outcome is its HTTP status.
pub(crate) fn outcome_of_request<B>(response: &Response<B>, grpc: bool) -> Outcome {
    Outcome::Status {
        http: response.status().as_u16(),
        grpc: if grpc {
            grpc_code(response.headers())
        } else {
            None
        },
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

    #[test]
    fn only_a_grpc_request_reads_the_grpc_status_of_its_response() {
        let response = Response::builder()
            .header("grpc-status", "14")
            .body(())
            .unwrap();
        assert_eq!(outcome_of_request(&response, true), Outcome::grpc(14));
        assert_eq!(
            outcome_of_request(&response, false),
            Outcome::Status {
                http: 200,
                grpc: None
            }
        );
    }
}
