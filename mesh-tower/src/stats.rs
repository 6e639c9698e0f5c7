//! Counters of what the client stack did to requests beyond sending them.
//!
//! Envoy counts these per cluster (`upstream_rq_retry`,
//! `upstream_rq_retry_overflow`, `upstream_rq_pending_overflow`,
//! `outlier_detection.ejections_enforced_total`, `upstream_rq_timeout`,
//! fault filter `delays_injected` / `aborts_injected`). Here they are plain
//! atomic counters shared by a [`MeshLayer`](crate::MeshLayer) or
//! [`MeshClient`](crate::MeshClient) and every clone of it, readable at any
//! time; exporting them (Prometheus, OpenTelemetry) is the telemetry
//! layer's job.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the client stack did to requests, counted since it was built.
/// Cheap to clone; clones read the same counters.
#[derive(Clone, Default)]
pub struct MeshStats {
    inner: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    retries: AtomicU64,
    retries_refused: AtomicU64,
    overflows: AtomicU64,
    ejections: AtomicU64,
    timeouts: AtomicU64,
    faults_delayed: AtomicU64,
    faults_aborted: AtomicU64,
    mirrors_sent: AtomicU64,
    mirrors_overflowed: AtomicU64,
    mirrors_skipped: AtomicU64,
    mirrors_failed: AtomicU64,
}

macro_rules! counters {
    ($($field:ident, $add:ident, $doc:literal;)*) => {
        impl MeshStats {
            $(
                #[doc = $doc]
                pub fn $field(&self) -> u64 {
                    self.inner.$field.load(Ordering::Relaxed)
                }

                pub(crate) fn $add(&self) {
                    self.inner.$field.fetch_add(1, Ordering::Relaxed);
                }
            )*
        }

        impl fmt::Debug for MeshStats {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("MeshStats")
                    $(.field(stringify!($field), &self.$field()))*
                    .finish()
            }
        }
    };
}

counters! {
    retries, add_retry,
        "Retries sent (Envoy `upstream_rq_retry`).";
    retries_refused, add_retry_refused,
        "Retries not sent because the cluster's retry budget or `maxRetries` was used up \
         (Envoy `upstream_rq_retry_overflow`).";
    overflows, add_overflow,
        "Requests refused by a circuit breaker (`http2MaxRequests`, `http1MaxPendingRequests`; \
         Envoy response flag UO).";
    ejections, add_ejection,
        "Endpoints ejected by outlier detection (Envoy `ejections_enforced_total`).";
    timeouts, add_timeout,
        "Requests ended by their route timeout or deadline, or not sent because the deadline \
         had passed (Envoy `upstream_rq_timeout`).";
    faults_delayed, add_fault_delay,
        "Requests delayed by fault injection.";
    faults_aborted, add_fault_abort,
        "Requests aborted by fault injection.";
    mirrors_sent, add_mirror_sent,
        "Copies of requests sent to a mirror cluster (Istio `mirror` / `mirrors`; Envoy's \
         shadowing): their responses are discarded.";
    mirrors_overflowed, add_mirror_overflow,
        "Copies not sent because as many copies as allowed were already in flight \
         ([`MeshLayer::mirror_in_flight`](crate::MeshLayer::mirror_in_flight)).";
    mirrors_skipped, add_mirror_skipped,
        "Copies not sent because the request's body was bigger than \
         [`MeshLayer::mirror_body_limit`](crate::MeshLayer::mirror_body_limit) or still being \
         produced when the request was sent.";
    mirrors_failed, add_mirror_failed,
        "Copies that got no response (no endpoint in the mirror cluster, its circuit breaker \
         full, connection failure, reset, timeout); the caller never sees these.";
}
