//! Retry decisions: which failures a route retries, how long to back off,
//! and how many retries a cluster may have in flight.
//!
//! The conditions are Envoy's `x-envoy-retry-on` / `x-envoy-retry-grpc-on`
//! (router filter docs, "x-envoy-retry-on"; `RetryStateImpl` in
//! `source/common/router/retry_state_impl.cc`), which Istio's `retryOn`
//! names and gRPC clients read from xDS (gRFC A44, gRPC status conditions
//! only):
//!
//! - `5xx`: any 5xx response, or no response at all — a connect failure, a
//!   reset, a refused stream or a per-try timeout (Envoy counts every
//!   upstream reset as a 5xx, "since it will result in one").
//! - `gateway-error`: 502, 503, 504, and the same no-response cases as `5xx`
//!   (Envoy retries every reset under `RETRY_ON_5XX | RETRY_ON_GATEWAY_ERROR`).
//! - `reset`: no response (disconnect, reset, read timeout): every reset
//!   kind, a connect failure and a per-try timeout included.
//! - `connect-failure`: the connection could not be made.
//! - `refused-stream`: HTTP/2 `REFUSED_STREAM`.
//! - `retriable-4xx`: 409 only.
//! - `retriable-status-codes`: the policy's list.
//! - `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
//!   `unavailable`: the gRPC status (from headers, a Trailers-Only response,
//!   or trailers), never the HTTP status.
//!
//! A per-try timeout is a local reset in Envoy (`onPerTryTimeout` →
//! `maybeRetryReset(LocalReset)`), so it is retried under `5xx`,
//! `gateway-error` and `reset`, and not under `deadline-exceeded` (which
//! reads the status the server sent).
//!
//! Backoff is Envoy's `JitteredExponentialBackOffStrategy`: the n-th retry
//! waits a uniformly random time in `[0, min(max, base · 2^(n−1))]` ("full
//! jitter"; Envoy router docs, "x-envoy-max-retries" / retry back-off).
//!
//! The retry limit per cluster is Envoy's retry circuit breaker
//! (`circuit_breakers.thresholds.max_retries`, `retry_budget`): a retry is
//! only sent if the cluster has fewer retries in flight than the limit; a
//! refused retry is not sent and the attempt's result is returned as is
//! (Envoy's `upstream_rq_retry_overflow`). With a budget the limit is
//! `max(budget × (active + pending requests), min_retry_concurrency)`
//! (`RetryBudgetImpl::max` in `resource_manager_impl.h`, truncated to an
//! integer); this mesh also caps it with `max_retries` (Istio 1.27 sets
//! both; Envoy alone would ignore `max_retries` when a budget is set, and
//! with Istio's default of `u32::MAX` the two agree).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::model::{CircuitBreakers, RetryOn, RetryPolicy};

/// gRPC status codes this module reads (from `grpc-status`).
pub mod grpc_status {
    /// OK.
    pub const OK: u32 = 0;
    /// CANCELLED.
    pub const CANCELLED: u32 = 1;
    /// UNKNOWN.
    pub const UNKNOWN: u32 = 2;
    /// INVALID_ARGUMENT.
    pub const INVALID_ARGUMENT: u32 = 3;
    /// DEADLINE_EXCEEDED.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// NOT_FOUND.
    pub const NOT_FOUND: u32 = 5;
    /// ALREADY_EXISTS.
    pub const ALREADY_EXISTS: u32 = 6;
    /// PERMISSION_DENIED.
    pub const PERMISSION_DENIED: u32 = 7;
    /// RESOURCE_EXHAUSTED.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// FAILED_PRECONDITION.
    pub const FAILED_PRECONDITION: u32 = 9;
    /// ABORTED.
    pub const ABORTED: u32 = 10;
    /// OUT_OF_RANGE.
    pub const OUT_OF_RANGE: u32 = 11;
    /// UNIMPLEMENTED.
    pub const UNIMPLEMENTED: u32 = 12;
    /// INTERNAL.
    pub const INTERNAL: u32 = 13;
    /// UNAVAILABLE.
    pub const UNAVAILABLE: u32 = 14;
    /// DATA_LOSS.
    pub const DATA_LOSS: u32 = 15;
    /// UNAUTHENTICATED.
    pub const UNAUTHENTICATED: u32 = 16;
}

/// How one attempt ended, as far as retries and outlier detection care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A response arrived. `grpc` is the `grpc-status` when the response
    /// carried one (in headers for a Trailers-Only response, or in
    /// trailers); `None` for plain HTTP, or when it is not known yet.
    Status {
        /// The HTTP status code.
        http: u16,
        /// The gRPC status code, if any.
        grpc: Option<u32>,
    },
    /// The connection could not be established (refused, unreachable,
    /// connect timeout, TLS handshake failure).
    ConnectFailure,
    /// The connection or stream was closed or reset before a complete
    /// response head arrived.
    Reset,
    /// HTTP/2 `REFUSED_STREAM`: the server did not process the request.
    RefusedStream,
    /// The attempt's per-try timeout fired before a response head.
    PerTryTimeout,
}

impl Outcome {
    /// A response with an HTTP status and no gRPC status.
    pub fn http(status: u16) -> Self {
        Outcome::Status {
            http: status,
            grpc: None,
        }
    }

    /// A gRPC response (HTTP 200) with this `grpc-status`.
    pub fn grpc(status: u32) -> Self {
        Outcome::Status {
            http: 200,
            grpc: Some(status),
        }
    }

    /// Whether a response arrived and says success: its gRPC status is OK
    /// when it has one, else its HTTP status is below 400.
    pub fn is_success(&self) -> bool {
        match *self {
            Outcome::Status {
                grpc: Some(code), ..
            } => code == grpc_status::OK,
            Outcome::Status { http, grpc: None } => http < 400,
            _ => false,
        }
    }

    /// Whether no response arrived (connect failure, reset, refused
    /// stream, per-try timeout).
    pub fn is_no_response(&self) -> bool {
        !matches!(self, Outcome::Status { .. })
    }
}

/// The condition of `policy.retry_on` that allows retrying `outcome`, or
/// `None` when it must not be retried (a success, or a failure no
/// condition covers). Conditions are checked in [`RetryOn::NAMES`] order,
/// so the reason is the first name that applies (for a reset under
/// `5xx,reset`, it is `5xx`). It does not look at the retry count, the
/// budget or the deadline: callers check those.
///
/// A response the mesh generated locally (a circuit-breaker overflow, a
/// fault abort) is not an upstream outcome and must not be passed here:
/// Envoy never retries an overflow.
pub fn retry_reason(policy: &RetryPolicy, outcome: &Outcome) -> Option<RetryOn> {
    let on = policy.retry_on;
    let has = |c: RetryOn| on.contains(c);
    match *outcome {
        Outcome::Status { http, grpc } => {
            if has(RetryOn::FIVE_XX) && (500..600).contains(&http) {
                return Some(RetryOn::FIVE_XX);
            }
            if has(RetryOn::GATEWAY_ERROR) && matches!(http, 502..=504) {
                return Some(RetryOn::GATEWAY_ERROR);
            }
            if has(RetryOn::RETRIABLE_4XX) && http == 409 {
                return Some(RetryOn::RETRIABLE_4XX);
            }
            if has(RetryOn::RETRIABLE_STATUS_CODES) && policy.retriable_status_codes.contains(&http)
            {
                return Some(RetryOn::RETRIABLE_STATUS_CODES);
            }
            let grpc_condition = match grpc? {
                grpc_status::CANCELLED => RetryOn::CANCELLED,
                grpc_status::DEADLINE_EXCEEDED => RetryOn::DEADLINE_EXCEEDED,
                grpc_status::INTERNAL => RetryOn::INTERNAL,
                grpc_status::RESOURCE_EXHAUSTED => RetryOn::RESOURCE_EXHAUSTED,
                grpc_status::UNAVAILABLE => RetryOn::UNAVAILABLE,
                _ => return None,
            };
            has(grpc_condition).then_some(grpc_condition)
        }
        Outcome::ConnectFailure => [
            RetryOn::FIVE_XX,
            RetryOn::GATEWAY_ERROR,
            RetryOn::RESET,
            RetryOn::CONNECT_FAILURE,
        ]
        .into_iter()
        .find(|c| has(*c)),
        Outcome::RefusedStream => [
            RetryOn::FIVE_XX,
            RetryOn::GATEWAY_ERROR,
            RetryOn::RESET,
            RetryOn::REFUSED_STREAM,
        ]
        .into_iter()
        .find(|c| has(*c)),
        Outcome::Reset | Outcome::PerTryTimeout => {
            [RetryOn::FIVE_XX, RetryOn::GATEWAY_ERROR, RetryOn::RESET]
                .into_iter()
                .find(|c| has(*c))
        }
    }
}

/// How long to wait before retry number `retry` (1-based: the first retry
/// is 1): uniformly random in `[0, min(backoff_max, backoff_base ·
/// 2^(retry−1))]`, Envoy's full-jitter exponential backoff. `random` is a
/// uniform `u64`. Never panics or overflows: large `retry` values saturate
/// at `backoff_max`; `retry == 0` is treated as 1.
pub fn backoff(policy: &RetryPolicy, retry: u32, random: u64) -> Duration {
    let ceiling = backoff_ceiling(policy, retry);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    // Uniform in [0, nanos]: nanos + 1 buckets.
    let span = u128::from(nanos) + 1;
    let point = (u128::from(random) * span) >> 64;
    Duration::from_nanos(u64::try_from(point).unwrap_or(nanos))
}

/// The upper bound of [`backoff`] for retry number `retry`:
/// `min(backoff_max, backoff_base · 2^(retry−1))`.
pub fn backoff_ceiling(policy: &RetryPolicy, retry: u32) -> Duration {
    // In nanoseconds, u128: `base · 2^(retry−1)` computed exactly as long as
    // it fits, so a zero base stays zero at any retry number (a shift that
    // overflows a u32 factor is not "as large as the maximum").
    let base = policy.backoff_base.as_nanos();
    let shift = retry.max(1) - 1;
    let scaled = if base == 0 {
        0
    } else if shift >= base.leading_zeros() {
        u128::MAX
    } else {
        base << shift
    };
    if scaled >= policy.backoff_max.as_nanos() {
        policy.backoff_max
    } else {
        // Below backoff_max, which is a Duration: fits in u64 nanoseconds
        // unless backoff_max is above 584 years.
        u64::try_from(scaled).map_or(policy.backoff_max, Duration::from_nanos)
    }
}

/// Which limit bounds a cluster's concurrent retries (and refused one).
///
/// Callers branch on the variant; [`RetryLimit::as_str`] gives Istio's
/// name (in messages), [`RetryLimit::name`] a metric label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryLimit {
    /// The cluster's retry budget (Istio `retryBudget`) had no room.
    Budget,
    /// The cluster's `max_retries` concurrent retries were in flight
    /// (Istio `http.maxRetries`).
    MaxRetries,
}

impl RetryLimit {
    /// Every retry limit, in the order of [`RetryLimit::bit`].
    pub const ALL: [RetryLimit; 2] = [RetryLimit::Budget, RetryLimit::MaxRetries];

    /// Istio's name: `retryBudget` or `maxRetries`.
    pub const fn as_str(self) -> &'static str {
        match self {
            RetryLimit::Budget => "retryBudget",
            RetryLimit::MaxRetries => "maxRetries",
        }
    }

    /// The metric label value: `retry_budget` or `max_retries`.
    pub const fn name(self) -> &'static str {
        match self {
            RetryLimit::Budget => "retry_budget",
            RetryLimit::MaxRetries => "max_retries",
        }
    }

    /// A distinct bit per limit, so a set of them fits in a `u8`.
    pub const fn bit(self) -> u8 {
        match self {
            RetryLimit::Budget => 1,
            RetryLimit::MaxRetries => 2,
        }
    }
}

/// Istio's name ([`RetryLimit::as_str`]).
impl fmt::Display for RetryLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a retry was not allowed by the cluster's retry limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryRefusal {
    /// The limit that refused it.
    pub limit: RetryLimit,
    /// The value of the limit when it refused.
    pub value: u32,
}

impl fmt::Display for RetryRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "retry not sent: the cluster's {} limit of {} concurrent retries is reached",
            self.limit, self.value
        )
    }
}

impl std::error::Error for RetryRefusal {}

/// The retries in flight of one cluster, and how many were refused:
/// Envoy's retry circuit breaker (`max_retries`, `retry_budget`).
///
/// Cheap to clone (an `Arc` inside): clones share the counts. Keep one per
/// cluster for the life of the process (or of the cluster).
#[derive(Debug, Clone, Default)]
pub struct RetryLimiter {
    inner: Arc<LimiterInner>,
}

#[derive(Debug, Default)]
struct LimiterInner {
    active: AtomicU32,
    refused: AtomicU64,
    granted: AtomicU64,
}

/// One retry in flight; dropping it releases the slot.
///
/// Hold it from the decision to retry (through the backoff wait) until the
/// retried attempt's outcome is known, as Envoy does (the retry resource is
/// taken in `shouldRetry` and released when the next decision is made).
#[derive(Debug)]
#[must_use = "the retry slot is released when the permit is dropped"]
pub struct RetryPermit {
    inner: Arc<LimiterInner>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.inner.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RetryLimiter {
    /// A limiter with no retry in flight.
    pub fn new() -> Self {
        RetryLimiter::default()
    }

    /// The current limit on concurrent retries for `limits` when the
    /// cluster has `active_requests` requests in flight or pending:
    /// `max_retries`, or with a budget `min(max_retries, max(⌊budget ×
    /// active_requests⌋, min_retry_concurrency))`.
    pub fn limit(limits: &CircuitBreakers, active_requests: u32) -> (u32, RetryLimit) {
        match &limits.retry_budget {
            None => (limits.max_retries, RetryLimit::MaxRetries),
            Some(budget) => {
                let share =
                    u64::from(budget.budget.per_million()) * u64::from(active_requests) / 1_000_000;
                let by_budget = u32::try_from(share)
                    .unwrap_or(u32::MAX)
                    .max(budget.min_retry_concurrency);
                if limits.max_retries < by_budget {
                    (limits.max_retries, RetryLimit::MaxRetries)
                } else {
                    (by_budget, RetryLimit::Budget)
                }
            }
        }
    }

    /// Takes a retry slot if the cluster has fewer retries in flight than
    /// [`RetryLimiter::limit`]; otherwise counts a refusal and says which
    /// limit refused. `active_requests` is the cluster's requests in flight
    /// plus pending (Envoy's `requests + pending_requests`; retries in
    /// flight are requests too). The check and the increment are one
    /// atomic step, so concurrent callers never exceed the limit.
    pub fn try_acquire(
        &self,
        limits: &CircuitBreakers,
        active_requests: u32,
    ) -> Result<RetryPermit, RetryRefusal> {
        let (value, limit) = Self::limit(limits, active_requests);
        let taken = self
            .inner
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < value).then_some(n + 1)
            });
        match taken {
            Ok(_) => {
                self.inner.granted.fetch_add(1, Ordering::Relaxed);
                Ok(RetryPermit {
                    inner: self.inner.clone(),
                })
            }
            Err(_) => {
                self.inner.refused.fetch_add(1, Ordering::Relaxed);
                Err(RetryRefusal { limit, value })
            }
        }
    }

    /// Retries in flight now.
    pub fn active_retries(&self) -> u32 {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Retries refused so far (Envoy's `upstream_rq_retry_overflow`).
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Retries allowed so far (Envoy's `upstream_rq_retry`).
    pub fn granted(&self) -> u64 {
        self.inner.granted.load(Ordering::Relaxed)
    }
}

/// Envoy's mapping of a gRPC status to the HTTP status it is counted as
/// (`Grpc::Utility::grpcToHttpStatus`), used for outlier detection and
/// for HTTP callers of a gRPC failure.
pub fn grpc_to_http_status(grpc: u32) -> u16 {
    use grpc_status::*;
    match grpc {
        OK => 200,
        CANCELLED => 499,
        UNKNOWN => 500,
        INVALID_ARGUMENT => 400,
        DEADLINE_EXCEEDED => 504,
        NOT_FOUND => 404,
        ALREADY_EXISTS => 409,
        PERMISSION_DENIED => 403,
        RESOURCE_EXHAUSTED => 429,
        FAILED_PRECONDITION => 400,
        ABORTED => 409,
        OUT_OF_RANGE => 400,
        UNIMPLEMENTED => 501,
        INTERNAL => 500,
        UNAVAILABLE => 503,
        DATA_LOSS => 500,
        UNAUTHENTICATED => 401,
        _ => 500,
    }
}

/// The gRPC status for an HTTP status that is not a gRPC response (gRPC's
/// "HTTP to gRPC status code mapping" doc, which Envoy's
/// `Grpc::Utility::httpToGrpcStatus` follows): 400 INTERNAL, 401
/// UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 UNIMPLEMENTED, 429, 502,
/// 503, 504 UNAVAILABLE, anything else UNKNOWN.
pub fn http_to_grpc_status(http: u16) -> u32 {
    use grpc_status::*;
    match http {
        400 => INTERNAL,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::sync::{Arc, Barrier};

    use proptest::prelude::*;

    use super::*;
    use crate::model::{Fraction, RetryBudget};

    fn policy(on: &str) -> RetryPolicy {
        let mut p = RetryPolicy::istio_default();
        p.retry_on = RetryOn::empty();
        for name in on.split(',').filter(|n| !n.is_empty()) {
            p.retry_on |= RetryOn::from_name(name).unwrap();
        }
        p.retriable_status_codes = Arc::from([418u16]);
        p
    }

    const NO_RESPONSE: [Outcome; 4] = [
        Outcome::ConnectFailure,
        Outcome::Reset,
        Outcome::RefusedStream,
        Outcome::PerTryTimeout,
    ];

    #[test]
    fn five_xx_covers_every_5xx_and_every_missing_response() {
        let p = policy("5xx");
        for s in [500, 501, 502, 503, 504, 599] {
            assert_eq!(
                retry_reason(&p, &Outcome::http(s)),
                Some(RetryOn::FIVE_XX),
                "{s}"
            );
        }
        for o in NO_RESPONSE {
            assert_eq!(retry_reason(&p, &o), Some(RetryOn::FIVE_XX), "{o:?}");
        }
        for s in [200, 404, 409, 418, 429] {
            assert_eq!(retry_reason(&p, &Outcome::http(s)), None, "{s}");
        }
        // A gRPC UNAVAILABLE rides on HTTP 200: not a 5xx.
        assert_eq!(
            retry_reason(&p, &Outcome::grpc(grpc_status::UNAVAILABLE)),
            None
        );
    }

    #[test]
    fn gateway_error_is_502_503_504_and_missing_responses() {
        let p = policy("gateway-error");
        for s in [502, 503, 504] {
            assert_eq!(
                retry_reason(&p, &Outcome::http(s)),
                Some(RetryOn::GATEWAY_ERROR)
            );
        }
        for s in [500, 501, 505] {
            assert_eq!(retry_reason(&p, &Outcome::http(s)), None, "{s}");
        }
        for o in NO_RESPONSE {
            assert_eq!(retry_reason(&p, &o), Some(RetryOn::GATEWAY_ERROR), "{o:?}");
        }
    }

    #[test]
    fn reset_covers_missing_responses_only() {
        let p = policy("reset");
        for o in NO_RESPONSE {
            assert_eq!(retry_reason(&p, &o), Some(RetryOn::RESET), "{o:?}");
        }
        assert_eq!(retry_reason(&p, &Outcome::http(503)), None);
    }

    #[test]
    fn connect_failure_and_refused_stream_are_their_own() {
        let p = policy("connect-failure");
        assert_eq!(
            retry_reason(&p, &Outcome::ConnectFailure),
            Some(RetryOn::CONNECT_FAILURE)
        );
        for o in [
            Outcome::Reset,
            Outcome::RefusedStream,
            Outcome::PerTryTimeout,
        ] {
            assert_eq!(retry_reason(&p, &o), None, "{o:?}");
        }
        let p = policy("refused-stream");
        assert_eq!(
            retry_reason(&p, &Outcome::RefusedStream),
            Some(RetryOn::REFUSED_STREAM)
        );
        for o in [
            Outcome::Reset,
            Outcome::ConnectFailure,
            Outcome::PerTryTimeout,
        ] {
            assert_eq!(retry_reason(&p, &o), None, "{o:?}");
        }
    }

    #[test]
    fn a_per_try_timeout_is_not_a_grpc_deadline_exceeded() {
        let p = policy("deadline-exceeded,connect-failure,refused-stream");
        assert_eq!(retry_reason(&p, &Outcome::PerTryTimeout), None);
        assert_eq!(
            retry_reason(&p, &Outcome::grpc(grpc_status::DEADLINE_EXCEEDED)),
            Some(RetryOn::DEADLINE_EXCEEDED)
        );
    }

    #[test]
    fn retriable_4xx_is_409_and_status_codes_are_the_list() {
        let p = policy("retriable-4xx");
        assert_eq!(
            retry_reason(&p, &Outcome::http(409)),
            Some(RetryOn::RETRIABLE_4XX)
        );
        assert_eq!(retry_reason(&p, &Outcome::http(400)), None);
        let p = policy("retriable-status-codes");
        assert_eq!(
            retry_reason(&p, &Outcome::http(418)),
            Some(RetryOn::RETRIABLE_STATUS_CODES)
        );
        assert_eq!(retry_reason(&p, &Outcome::http(503)), None);
    }

    #[test]
    fn grpc_conditions_read_the_grpc_status_only() {
        let cases = [
            ("cancelled", grpc_status::CANCELLED, RetryOn::CANCELLED),
            (
                "deadline-exceeded",
                grpc_status::DEADLINE_EXCEEDED,
                RetryOn::DEADLINE_EXCEEDED,
            ),
            ("internal", grpc_status::INTERNAL, RetryOn::INTERNAL),
            (
                "resource-exhausted",
                grpc_status::RESOURCE_EXHAUSTED,
                RetryOn::RESOURCE_EXHAUSTED,
            ),
            (
                "unavailable",
                grpc_status::UNAVAILABLE,
                RetryOn::UNAVAILABLE,
            ),
        ];
        for (name, code, cond) in cases {
            let p = policy(name);
            assert_eq!(retry_reason(&p, &Outcome::grpc(code)), Some(cond), "{name}");
            // Another gRPC status, or an HTTP failure without one, is not retried.
            assert_eq!(retry_reason(&p, &Outcome::grpc(grpc_status::UNKNOWN)), None);
            assert_eq!(retry_reason(&p, &Outcome::http(503)), None, "{name}");
            assert_eq!(retry_reason(&p, &Outcome::Reset), None, "{name}");
        }
    }

    #[test]
    fn istio_default_retries_503_unavailable_and_connect_failures() {
        let p = RetryPolicy::istio_default();
        assert!(retry_reason(&p, &Outcome::http(503)).is_some());
        assert!(retry_reason(&p, &Outcome::grpc(grpc_status::UNAVAILABLE)).is_some());
        assert!(retry_reason(&p, &Outcome::grpc(grpc_status::CANCELLED)).is_some());
        assert!(retry_reason(&p, &Outcome::ConnectFailure).is_some());
        assert!(retry_reason(&p, &Outcome::RefusedStream).is_some());
        assert!(retry_reason(&p, &Outcome::http(500)).is_none());
        assert!(retry_reason(&p, &Outcome::Reset).is_none());
        assert!(retry_reason(&p, &Outcome::http(200)).is_none());
    }

    #[test]
    fn success_is_never_retried() {
        let all = RetryOn::NAMES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(",");
        let p = policy(&all);
        for o in [
            Outcome::http(200),
            Outcome::http(204),
            Outcome::grpc(grpc_status::OK),
        ] {
            assert!(o.is_success());
            assert_eq!(retry_reason(&p, &o), None, "{o:?}");
        }
        assert!(!Outcome::http(404).is_success());
        assert!(!Outcome::grpc(grpc_status::NOT_FOUND).is_success());
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_the_max() {
        let mut p = RetryPolicy::istio_default();
        p.backoff_base = Duration::from_millis(25);
        p.backoff_max = Duration::from_millis(250);
        let ms = |n| backoff_ceiling(&p, n).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(3), ms(4), ms(5)],
            [25, 25, 50, 100, 200, 250]
        );
        assert_eq!(ms(u32::MAX), 250);
        assert_eq!(backoff(&p, 3, 0), Duration::ZERO);
        assert_eq!(backoff(&p, 3, u64::MAX), Duration::from_millis(100));
    }

    #[test]
    fn backoff_is_uniform_over_the_window() {
        // Mean of full jitter is ceiling / 2; z = 4.5 on 20,000 samples.
        let p = RetryPolicy::istio_default();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let n = 20_000u32;
        let ceiling = backoff_ceiling(&p, 2).as_secs_f64();
        let mut sum = 0.0;
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            sum += backoff(&p, 2, x).as_secs_f64();
        }
        let mean = sum / f64::from(n);
        let sd = ceiling / 12f64.sqrt() / f64::from(n).sqrt();
        assert!(
            (mean - ceiling / 2.0).abs() < 4.5 * sd,
            "mean {mean}, ceiling {ceiling}"
        );
    }

    proptest! {
        /// 0 ≤ backoff ≤ min(max, base · 2^(n−1)) for every retry number.
        #[test]
        fn backoff_stays_within_bounds(
            base_ms in 0u64..10_000,
            max_ms in 0u64..100_000,
            retry in 1u32..200,
            random in any::<u64>(),
        ) {
            let mut p = RetryPolicy::istio_default();
            p.backoff_base = Duration::from_millis(base_ms);
            p.backoff_max = Duration::from_millis(max_ms);
            let wait = backoff(&p, retry, random);
            let exp = if retry > 64 { u128::MAX } else { 1u128 << (retry - 1) };
            let bound = u128::from(base_ms).saturating_mul(exp).min(u128::from(max_ms));
            prop_assert!(wait.as_nanos() <= bound * 1_000_000, "{wait:?} > {bound} ms");
            prop_assert_eq!(backoff_ceiling(&p, retry).as_nanos(), bound * 1_000_000);
        }
    }

    fn limits(max_retries: u32, budget: Option<(u32, u32)>) -> CircuitBreakers {
        CircuitBreakers {
            max_retries,
            retry_budget: budget.map(|(percent, min)| RetryBudget {
                budget: Fraction::from_per_million(percent * 10_000),
                min_retry_concurrency: min,
            }),
            ..CircuitBreakers::default()
        }
    }

    #[test]
    fn the_budget_is_a_share_of_active_requests_with_a_floor() {
        let l = limits(u32::MAX, Some((20, 3)));
        assert_eq!(RetryLimiter::limit(&l, 50), (10, RetryLimit::Budget));
        assert_eq!(
            RetryLimiter::limit(&l, 54),
            (10, RetryLimit::Budget),
            "truncated"
        );
        assert_eq!(RetryLimiter::limit(&l, 5), (3, RetryLimit::Budget), "floor");
        assert_eq!(RetryLimiter::limit(&l, 0), (3, RetryLimit::Budget));
        // maxRetries still caps it.
        let l = limits(4, Some((20, 3)));
        assert_eq!(RetryLimiter::limit(&l, 50), (4, RetryLimit::MaxRetries));
        assert_eq!(
            RetryLimiter::limit(&limits(7, None), 1000),
            (7, RetryLimit::MaxRetries)
        );
    }

    #[test]
    fn a_refused_retry_is_counted_and_a_dropped_permit_frees_its_slot() {
        let limiter = RetryLimiter::new();
        let l = limits(2, None);
        let a = limiter.try_acquire(&l, 0).unwrap();
        let _b = limiter.try_acquire(&l, 0).unwrap();
        let refusal = limiter.try_acquire(&l, 0).unwrap_err();
        assert_eq!(
            refusal,
            RetryRefusal {
                limit: RetryLimit::MaxRetries,
                value: 2
            }
        );
        assert!(
            refusal.to_string().contains("maxRetries limit of 2"),
            "{refusal}"
        );
        assert_eq!(
            (
                limiter.active_retries(),
                limiter.refused(),
                limiter.granted()
            ),
            (2, 1, 2)
        );
        drop(a);
        assert_eq!(limiter.active_retries(), 1);
        let _c = limiter.clone().try_acquire(&l, 0).unwrap();
        assert_eq!(limiter.active_retries(), 2, "clones share the counts");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Concurrent acquire/release never exceeds the limit, and every
        /// attempt is either granted or counted as refused.
        #[test]
        fn concurrent_retries_never_exceed_the_limit(
            percent in 0u32..=100,
            min_retry in 0u32..8,
            active in 0u32..200,
            max_retries in 1u32..64,
            threads in 2usize..8,
        ) {
            let l = limits(max_retries, Some((percent, min_retry)));
            let (limit, _) = RetryLimiter::limit(&l, active);
            let limiter = RetryLimiter::new();
            let in_flight = Arc::new(AtomicU32::new(0));
            let peak = Arc::new(AtomicU32::new(0));
            let start = Arc::new(Barrier::new(threads));
            const ROUNDS: u64 = 300;
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (limiter, l) = (limiter.clone(), l.clone());
                    let (in_flight, peak, start) = (in_flight.clone(), peak.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let mut held = Vec::new();
                        for round in 0..ROUNDS {
                            if let Ok(permit) = limiter.try_acquire(&l, active) {
                                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                                peak.fetch_max(now, Ordering::SeqCst);
                                held.push(permit);
                            }
                            if round % 3 == 2 || held.len() > 2 {
                                for p in held.drain(..) {
                                    in_flight.fetch_sub(1, Ordering::SeqCst);
                                    drop(p);
                                }
                            }
                        }
                        for p in held.drain(..) {
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            drop(p);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            prop_assert!(peak.load(Ordering::SeqCst) <= limit);
            prop_assert_eq!(limiter.active_retries(), 0);
            prop_assert_eq!(limiter.granted() + limiter.refused(), threads as u64 * ROUNDS);
            if limit == 0 {
                prop_assert_eq!(limiter.granted(), 0);
            }
        }
    }

    #[test]
    fn grpc_and_http_status_mappings_match_envoy() {
        assert_eq!(grpc_to_http_status(grpc_status::UNAVAILABLE), 503);
        assert_eq!(grpc_to_http_status(grpc_status::DEADLINE_EXCEEDED), 504);
        assert_eq!(grpc_to_http_status(grpc_status::INTERNAL), 500);
        assert_eq!(grpc_to_http_status(grpc_status::NOT_FOUND), 404);
        assert_eq!(grpc_to_http_status(99), 500);
        assert_eq!(http_to_grpc_status(503), grpc_status::UNAVAILABLE);
        assert_eq!(http_to_grpc_status(504), grpc_status::UNAVAILABLE);
        assert_eq!(http_to_grpc_status(404), grpc_status::UNIMPLEMENTED);
        assert_eq!(http_to_grpc_status(500), grpc_status::UNKNOWN);
    }
}
