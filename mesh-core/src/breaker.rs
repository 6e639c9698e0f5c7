//! Circuit breaking: the per-cluster limits of Istio's `connectionPool`
//! with Envoy's semantics per limit (Envoy arch overview "Circuit
//! breaking"; `circuit_breakers.thresholds`; gRFC A32 for gRPC clients,
//! which implement `max_requests` only).
//!
//! - `http.http2MaxRequests` (`max_requests`): requests in flight to the
//!   cluster, every attempt (retries included). One more fails at once:
//!   [`CircuitBreaker::try_request`] → [`Overflow`] (Envoy answers 503 with
//!   response flag `UO` and `x-envoy-overloaded: true`; gRPC clients see
//!   UNAVAILABLE).
//! - `tcp.maxConnections` (`max_connections`): connections open to the
//!   cluster. Beyond it a request does not fail: it waits as pending for a
//!   connection (an HTTP/2 stream or an idle HTTP/1 connection) to become
//!   free. The connection pool asks [`CircuitBreaker::try_connect`] before it
//!   dials.
//! - `http.http1MaxPendingRequests` (`max_pending_requests`): requests
//!   waiting for a connection. One more fails at once:
//!   [`CircuitBreaker::try_pend`] → [`Overflow`].
//! - `http.maxRetries` and `retryBudget`: see [`crate::retry::RetryLimiter`].
//!
//! Every check-and-take is one atomic step (a compare-and-swap loop), so
//! the counts never exceed a limit even under concurrency, and permits give
//! their slot back when dropped. Limits are passed on each call rather than
//! stored, so a CDS update takes effect for the next request while the
//! counts carry over (Envoy keeps its resource manager across cluster
//! updates of the same name too).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::model::CircuitBreakers;

/// A circuit-breaker limit of a cluster (Envoy `circuit_breakers.thresholds`).
///
/// Callers branch on the variant; [`Limit::as_str`] gives Istio's name (in
/// messages), [`Limit::name`] a metric label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `max_connections` (Istio `tcp.maxConnections`).
    MaxConnections,
    /// `max_pending_requests` (Istio `http.http1MaxPendingRequests`).
    MaxPendingRequests,
    /// `max_requests` (Istio `http.http2MaxRequests`).
    MaxRequests,
    /// `max_retries` (Istio `http.maxRetries`).
    MaxRetries,
}

impl Limit {
    /// Every limit, in the order of [`Limit::bit`].
    pub const ALL: [Limit; 4] = [
        Limit::MaxConnections,
        Limit::MaxPendingRequests,
        Limit::MaxRequests,
        Limit::MaxRetries,
    ];

    /// Istio's name of the limit (`http2MaxRequests`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Limit::MaxConnections => "maxConnections",
            Limit::MaxPendingRequests => "http1MaxPendingRequests",
            Limit::MaxRequests => "http2MaxRequests",
            Limit::MaxRetries => "maxRetries",
        }
    }

    /// The metric label value (`max_requests`, ...), Envoy's field name.
    pub const fn name(self) -> &'static str {
        match self {
            Limit::MaxConnections => "max_connections",
            Limit::MaxPendingRequests => "max_pending_requests",
            Limit::MaxRequests => "max_requests",
            Limit::MaxRetries => "max_retries",
        }
    }

    /// A distinct bit per limit, so a set of limits fits in a `u8`.
    pub const fn bit(self) -> u8 {
        match self {
            Limit::MaxConnections => 1,
            Limit::MaxPendingRequests => 2,
            Limit::MaxRequests => 4,
            Limit::MaxRetries => 8,
        }
    }
}

/// Istio's name ([`Limit::as_str`]).
impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A limit was reached: the request fails at once (Envoy's `UO` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    /// The limit: [`Limit::MaxRequests`] (from
    /// [`CircuitBreaker::try_request`]) or [`Limit::MaxPendingRequests`]
    /// (from [`CircuitBreaker::try_pend`]).
    pub limit: Limit,
    /// Its configured value.
    pub value: u32,
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "upstream overflow: circuit breaker {} limit of {} reached",
            self.limit, self.value
        )
    }
}

impl std::error::Error for Overflow {}

/// How many times each limit refused, since the breaker was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overflows {
    /// Requests refused by `max_requests` (Envoy `upstream_rq_pending_overflow`
    /// counts both; here they are apart).
    pub requests: u64,
    /// Requests refused by `max_pending_requests`.
    pub pending: u64,
    /// Connection attempts deferred by `max_connections` (Envoy
    /// `upstream_cx_overflow`); those requests waited, they did not fail.
    pub connections: u64,
}

/// The circuit-breaker counts of one cluster (Envoy's resource manager).
///
/// Cheap to clone (an `Arc` inside): clones share the counts. Keep one per
/// cluster name.
#[derive(Debug, Clone, Default)]
pub struct CircuitBreaker {
    inner: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    requests: AtomicU32,
    pending: AtomicU32,
    connections: AtomicU32,
    requests_overflow: AtomicU64,
    pending_overflow: AtomicU64,
    connections_overflow: AtomicU64,
}

/// Which count a permit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Pending,
    Connection,
}

impl Counts {
    fn counter(&self, kind: Kind) -> &AtomicU32 {
        match kind {
            Kind::Request => &self.requests,
            Kind::Pending => &self.pending,
            Kind::Connection => &self.connections,
        }
    }
}

/// Takes one slot of `counter` if it is below `max`, atomically.
fn take(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

macro_rules! permit {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        #[must_use = "the slot is released when the permit is dropped"]
        pub struct $name {
            counts: Arc<Counts>,
            kind: Kind,
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.counts.counter(self.kind).fetch_sub(1, Ordering::AcqRel);
            }
        }
    };
}

permit!(
    /// One request in flight to the cluster (one attempt); dropping it
    /// ends the count. Hold it until the attempt's response (or its body,
    /// for streams) ends.
    RequestPermit
);
permit!(
    /// One request waiting for a connection; drop it once the request has
    /// a connection (or gave up).
    PendingPermit
);
permit!(
    /// One open connection to the cluster; drop it when the connection
    /// closes.
    ConnectionPermit
);

impl CircuitBreaker {
    /// A breaker with nothing in flight.
    pub fn new() -> Self {
        CircuitBreaker::default()
    }

    /// Counts one more request in flight, or fails at once with
    /// [`Limit::MaxRequests`] when `limits.max_requests` are already in flight.
    pub fn try_request(&self, limits: &CircuitBreakers) -> Result<RequestPermit, Overflow> {
        if take(&self.inner.requests, limits.max_requests) {
            Ok(RequestPermit {
                counts: self.inner.clone(),
                kind: Kind::Request,
            })
        } else {
            self.inner.requests_overflow.fetch_add(1, Ordering::Relaxed);
            Err(Overflow {
                limit: Limit::MaxRequests,
                value: limits.max_requests,
            })
        }
    }

    /// Counts one more request waiting for a connection, or fails at once
    /// with [`Limit::MaxPendingRequests`] when `limits.max_pending_requests`
    /// already wait.
    pub fn try_pend(&self, limits: &CircuitBreakers) -> Result<PendingPermit, Overflow> {
        if take(&self.inner.pending, limits.max_pending_requests) {
            Ok(PendingPermit {
                counts: self.inner.clone(),
                kind: Kind::Pending,
            })
        } else {
            self.inner.pending_overflow.fetch_add(1, Ordering::Relaxed);
            Err(Overflow {
                limit: Limit::MaxPendingRequests,
                value: limits.max_pending_requests,
            })
        }
    }

    /// Counts one more open connection if fewer than
    /// `limits.max_connections` are open; `None` means "do not dial: wait
    /// (as pending) for a connection to free up or close". A `None` is
    /// counted in [`Overflows::connections`].
    pub fn try_connect(&self, limits: &CircuitBreakers) -> Option<ConnectionPermit> {
        if take(&self.inner.connections, limits.max_connections) {
            Some(ConnectionPermit {
                counts: self.inner.clone(),
                kind: Kind::Connection,
            })
        } else {
            self.inner
                .connections_overflow
                .fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Requests in flight now.
    pub fn active_requests(&self) -> u32 {
        self.inner.requests.load(Ordering::Acquire)
    }

    /// Requests waiting for a connection now.
    pub fn pending_requests(&self) -> u32 {
        self.inner.pending.load(Ordering::Acquire)
    }

    /// Connections open now.
    pub fn connections(&self) -> u32 {
        self.inner.connections.load(Ordering::Acquire)
    }

    /// What the retry budget is a share of: requests in flight plus
    /// pending (Envoy's `RetryBudgetImpl`), saturating.
    pub fn budget_base(&self) -> u32 {
        self.active_requests()
            .saturating_add(self.pending_requests())
    }

    /// How many times each limit refused so far.
    pub fn overflows(&self) -> Overflows {
        Overflows {
            requests: self.inner.requests_overflow.load(Ordering::Relaxed),
            pending: self.inner.pending_overflow.load(Ordering::Relaxed),
            connections: self.inner.connections_overflow.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use super::*;

    fn limits(max_requests: u32, max_pending: u32, max_connections: u32) -> CircuitBreakers {
        CircuitBreakers {
            max_requests,
            max_pending_requests: max_pending,
            max_connections,
            ..CircuitBreakers::default()
        }
    }

    #[test]
    fn requests_over_the_limit_fail_at_once_naming_it_and_the_breaker_recovers() {
        let b = CircuitBreaker::new();
        let l = limits(2, 1, 1);
        let p1 = b.try_request(&l).unwrap();
        let _p2 = b.try_request(&l).unwrap();
        let overflow = b.try_request(&l).unwrap_err();
        assert_eq!(
            overflow,
            Overflow {
                limit: Limit::MaxRequests,
                value: 2
            }
        );
        assert_eq!(
            overflow.to_string(),
            "upstream overflow: circuit breaker http2MaxRequests limit of 2 reached"
        );
        assert_eq!(b.active_requests(), 2);
        drop(p1);
        assert_eq!(b.active_requests(), 1);
        let _p3 = b.try_request(&l).expect("a freed slot is usable again");
        assert_eq!(b.overflows().requests, 1);
    }

    #[test]
    fn pending_overflow_fails_and_connections_defer() {
        let b = CircuitBreaker::new();
        let l = limits(10, 1, 1);
        let c = b.try_connect(&l).unwrap();
        assert!(
            b.try_connect(&l).is_none(),
            "over maxConnections: wait, do not dial"
        );
        let pending = b.try_pend(&l).unwrap();
        let overflow = b.try_pend(&l).unwrap_err();
        assert_eq!(overflow.limit, Limit::MaxPendingRequests);
        assert_eq!(b.budget_base(), 1);
        drop(pending);
        drop(c);
        assert!(b.try_connect(&l).is_some());
        assert_eq!(
            b.overflows(),
            Overflows {
                requests: 0,
                pending: 1,
                connections: 1
            }
        );
        assert_eq!((b.pending_requests(), b.connections()), (0, 0));
    }

    #[test]
    fn unlimited_by_default() {
        let b = CircuitBreaker::new();
        let l = CircuitBreakers::default();
        let permits: Vec<_> = (0..1000).map(|_| b.try_request(&l).unwrap()).collect();
        assert_eq!(b.active_requests(), 1000);
        drop(permits);
        assert_eq!(b.active_requests(), 0);
    }

    #[test]
    fn concurrent_callers_never_exceed_max_requests() {
        let b = CircuitBreaker::new();
        let l = limits(10, 0, 0);
        let peak = AtomicU32::new(0);
        let in_flight = AtomicU32::new(0);
        let start = Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    for _ in 0..2_000 {
                        if let Ok(p) = b.try_request(&l) {
                            let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(n, Ordering::SeqCst);
                            std::hint::spin_loop();
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            drop(p);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 10);
        assert_eq!(b.active_requests(), 0);
    }
}
