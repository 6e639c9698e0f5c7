//! The decision record: what the mesh decided for one request, and why.
//!
//! A sidecar can only be asked "what happened" through its access log and
//! its span tags; an in-process mesh can say more. Every request through
//! [`ClientTelemetry`](super::ClientTelemetry) (and
//! [`ServerTelemetry`](super::ServerTelemetry)) carries a [`DecisionRecord`]
//! request extension that the layers below fill in as they decide: the
//! config version, listener and route, the cluster and its balancer, each
//! attempt with its endpoint and outcome, why it was retried, the timeout
//! and the remaining deadline, circuit breaker and outlier decisions, faults
//! injected, the peer's SPIFFE ID and the authorization decision. When the
//! response ends, the telemetry layer turns the record into span attributes
//! (gRFC A44 and Envoy's router put the same facts into Envoy's access log
//! and span tags: `upstream_cluster`, `response_flags`, `%UPSTREAM_HOST%`,
//! `x-envoy-attempt-count`), Istio metric labels and an access log line.
//!
//! Cost: the record is one allocation (an `Arc`) per request. Facts are
//! written lock-free (`OnceLock`s and atomics; names are `Arc<str>` clones,
//! no copies). Only a *sampled* request gets more: a child span per attempt
//! and span events for breaker and outlier decisions.
//!
//! The record itself is pure data and is compiled without the `telemetry`
//! feature too: the request engine (`mesh`, `server`) writes to it in both
//! builds, so it has one code path. The OpenTelemetry side (the span of a
//! sampled request, attempt spans, span events, `mesh.*` attributes) is in
//! `record/span.rs` and exists only with the feature; without it the span types
//! have no values, so every "if sampled" branch compiles to nothing. A
//! request carries a record only when a layer above the engine put one
//! there (the telemetry layers, or a layer of the application's own); the
//! engine's cost for a request without one is an extension lookup, in both
//! builds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use mesh_core::model::{LbPolicy, Name, RetryOn};
use mesh_core::rbac::DryRun;
use mesh_core::snapshot::Versions;

use super::flags::{BreakerLimit, ResponseFlags, RetryRefusal};
use crate::connection::Authorized;

#[cfg(feature = "telemetry")]
mod span;

/// Without the `telemetry` feature nothing makes spans: the span side of a
/// record is a pair of types with no values, so `Option<Box<Trace>>` and
/// `Option<AttemptSpan>` are always `None` and the code that would use a
/// span is unreachable (and removed by the compiler).
#[cfg(not(feature = "telemetry"))]
mod span {
    use std::net::SocketAddr;
    use std::time::Duration;

    use http::HeaderMap;
    use mesh_core::model::{Name, RetryOn};

    use super::super::flags::{BreakerLimit, RetryRefusal};
    use super::AttemptOutcome;

    /// A sampled request's span: never, without the feature.
    pub(crate) enum Trace {}

    /// A sampled attempt's span: never, without the feature.
    pub(super) enum AttemptSpan {}

    impl Trace {
        pub(super) fn attempt_span(
            &self,
            _endpoint: SocketAddr,
            _index: u32,
            _cluster: Option<&Name>,
        ) -> AttemptSpan {
            match *self {}
        }
        pub(super) fn retrying(&self, _reason: RetryOn, _backoff: Duration) {
            match *self {}
        }
        pub(super) fn retry_refused(&self, _why: RetryRefusal) {
            match *self {}
        }
        pub(super) fn breaker_overflow(&self, _limit: BreakerLimit) {
            match *self {}
        }
        pub(super) fn outlier_ejected(&self, _endpoint: SocketAddr) {
            match *self {}
        }
        pub(super) fn outlier(&self, _decision: &'static str, _endpoint: Option<SocketAddr>) {
            match *self {}
        }
    }

    impl AttemptSpan {
        pub(super) fn inject(&self, _headers: &mut HeaderMap) {
            match *self {}
        }
        pub(super) fn record_error(&mut self, _error: &dyn std::error::Error) {
            match *self {}
        }
        pub(super) fn end(self, _outcome: AttemptOutcome) {
            match self {}
        }
        pub(super) fn cancel(self) {
            match self {}
        }
    }
}
use self::span::AttemptSpan;
pub(crate) use self::span::Trace;

/// `allowed` / `denied`: a dry-run result, as Istio writes it.
#[cfg(feature = "telemetry")]
pub(crate) fn shadow_result(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

/// An endpoint's labels, as EDS carries them (`version: v1`).
pub type EndpointLabels = Arc<[(Name, Name)]>;

/// How many attempts a record keeps individually (the first try and three
/// retries); later attempts are counted, and still get their own span when
/// sampled.
pub const MAX_RECORDED_ATTEMPTS: usize = 4;

/// The mesh's decisions for one request: a request extension, cheap to
/// clone (an `Arc`), written by the layers that decide and read by the
/// telemetry layer when the response ends: as `mesh.*` span attributes,
/// Istio metric labels, the mesh's own counters and the access log.
///
/// Cost: one allocation (the `Arc`) per request, a second one only on the
/// first retry. Facts are written lock-free (`OnceLock`s and atomics; names
/// are `Arc<str>` clones). Only a sampled request gets more: a child span
/// per attempt and span events for breaker and outlier decisions.
///
/// Every method takes `&self` and is lock-free unless the request is
/// sampled; calling one twice keeps the first value for set-once facts
/// (route, cluster) and the latest for per-attempt ones.
#[derive(Clone)]
pub struct DecisionRecord {
    inner: Arc<Inner>,
}

struct Inner {
    /// Present when the request's span is sampled (boxed: only sampled
    /// requests pay for it).
    trace: Option<Box<Trace>>,
    /// Set-once facts are grouped by the call that sets them: each
    /// `OnceLock` set costs a `Once` run (about 100 instructions).
    routed: OnceLock<Routed>,
    cluster: OnceLock<(Name, LbPolicy)>,
    route_timeout: Nanos,
    per_try_timeout: Nanos,
    deadline: Nanos,
    fault_delay: Nanos,
    /// 0: none; an HTTP status; or `GRPC_ABORT | code`.
    fault_abort: AtomicU32,
    flags: AtomicU32,
    attempts: AtomicU32,
    retry_on: AtomicU32,
    /// Retries per retry condition (indexed by the condition's bit).
    retries: [AtomicU8; RETRY_CONDITIONS],
    /// Why retries were refused: bit 0 budget, bit 1 max_retries.
    refusals: AtomicU8,
    /// Which breaker limits overflowed (`BreakerLimit` bits).
    overflows: AtomicU8,
    /// Endpoints this request's responses got ejected.
    ejections: AtomicU8,
    request_bytes: AtomicU64,
    /// The first attempt (most requests have only one).
    first: OnceLock<Attempt>,
    /// Later attempts, allocated on the first retry.
    retried: OnceLock<Box<[OnceLock<Attempt>; MAX_RECORDED_ATTEMPTS - 1]>>,
    /// The peer's SPIFFE ID, when known as the record was made (the server
    /// side: no `OnceLock` to set per request).
    principal: Option<Name>,
    peer_principal: OnceLock<Name>,
    /// The first decision that allowed the request, and the first that
    /// denied it: a denial wins, so a layer that denies after an outer one
    /// allowed (two policies) is what the record says.
    authorization: OnceLock<Authorization>,
    denial: OnceLock<Authorization>,
    /// What the dry-run authorization policies would have decided.
    dry_run: OnceLock<DryRun>,
    /// A server request's trace headers, kept unparsed when its telemetry
    /// cannot record spans (see `incoming.rs`).
    #[cfg(feature = "telemetry")]
    incoming: Option<super::incoming::Incoming>,
    /// What the telemetry layer that made the record knows from the
    /// request's start (kept here: one allocation per request for both,
    /// and the exchange moved with the response stays a few words).
    #[cfg(feature = "telemetry")]
    start: Option<super::exchange::Start>,
}

const GRPC_ABORT: u32 = 1 << 31;

/// What the routing layer decided, set in one call.
struct Routed {
    /// Read by the span attributes only (feature `telemetry`).
    #[cfg_attr(not(feature = "telemetry"), allow(dead_code))]
    versions: Versions,
    listener: Name,
    route: Name,
    /// The cluster and its balancer when given with the route
    /// ([`DecisionRecord::routed`]: one set-once cell, one `Once` run of
    /// about 100 instructions, instead of two).
    cluster: Option<(Name, LbPolicy)>,
}

/// How many retry conditions [`RetryOn`] has.
const RETRY_CONDITIONS: usize = RetryOn::NAMES.len();

/// A duration stored as nanoseconds; `u64::MAX` means unset.
struct Nanos(AtomicU64);

impl Nanos {
    const fn unset() -> Self {
        Nanos(AtomicU64::new(u64::MAX))
    }

    fn set(&self, d: Duration) {
        let n = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 1);
        self.0.store(n, Ordering::Relaxed);
    }

    /// Read by the span attributes only.
    #[cfg(feature = "telemetry")]
    fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            u64::MAX => None,
            n => Some(Duration::from_nanos(n)),
        }
    }
}

/// One attempt as recorded: where it went and how it ended.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) endpoint: SocketAddr,
    pub(crate) labels: EndpointLabels,
    pub(crate) outcome: OutcomeCell,
    /// The server's verified SPIFFE ID on the connection the attempt was
    /// sent on (mTLS; set by the connection pool, a reference count).
    pub(crate) principal: OnceLock<Name>,
}

/// How an attempt ended, set once: an [`AttemptOutcome`] packed into one
/// atomic word (a store instead of a `OnceLock` run, about 100
/// instructions, on every request under telemetry).
#[derive(Debug, Default)]
pub(crate) struct OutcomeCell {
    bits: AtomicU64,
    /// What [`OutcomeCell::get`] hands out by reference (tests only).
    #[cfg(test)]
    seen: OnceLock<AttemptOutcome>,
}

/// Tags of a packed outcome (bits 56..58); 0 means not set yet.
const OUTCOME_RESPONSE: u64 = 1 << 56;
const OUTCOME_FAILED: u64 = 2 << 56;
const OUTCOME_TAG: u64 = 3 << 56;
/// A `Response` with a gRPC status (its code in bits 0..32).
const OUTCOME_GRPC: u64 = 1 << 48;

impl OutcomeCell {
    fn pack(outcome: AttemptOutcome) -> u64 {
        match outcome {
            AttemptOutcome::Response {
                status,
                grpc_status,
            } => {
                let grpc = grpc_status.map_or(0, |c| OUTCOME_GRPC | u64::from(c as u32));
                OUTCOME_RESPONSE | (u64::from(status.as_u16()) << 32) | grpc
            }
            AttemptOutcome::Failed(flags) => OUTCOME_FAILED | u64::from(flags.bits()),
        }
    }

    fn unpack(bits: u64) -> Option<AttemptOutcome> {
        match bits & OUTCOME_TAG {
            OUTCOME_RESPONSE => Some(AttemptOutcome::Response {
                status: StatusCode::from_u16((bits >> 32) as u16).ok()?,
                grpc_status: (bits & OUTCOME_GRPC != 0).then_some(bits as u32 as i32),
            }),
            OUTCOME_FAILED => Some(AttemptOutcome::Failed(ResponseFlags::from_bits(
                bits as u32,
            ))),
            _ => None,
        }
    }

    /// Sets the outcome unless one was set (the first one is kept).
    fn set(&self, outcome: AttemptOutcome) {
        let _ = self.bits.compare_exchange(
            0,
            Self::pack(outcome),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The outcome, once set.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn load(&self) -> Option<AttemptOutcome> {
        Self::unpack(self.bits.load(Ordering::Relaxed))
    }

    /// The outcome by reference, once set (as `OnceLock::get` reads it).
    #[cfg(test)]
    pub(crate) fn get(&self) -> Option<&AttemptOutcome> {
        let outcome = self.load()?;
        Some(self.seen.get_or_init(|| outcome))
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The endpoint answered with this status (and, for gRPC, this status
    /// code when it came in the response headers).
    Response {
        /// The HTTP status.
        status: StatusCode,
        /// The `grpc-status` of a Trailers-Only response.
        grpc_status: Option<i32>,
    },
    /// No response: the flag says why (`UF` connect failure, `UC`/`UR`
    /// reset, `UT` per-try timeout, `UO` overflow, `LR` local reset).
    Failed(ResponseFlags),
}

/// An authorization decision (RBAC, gRFC A41).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authorization {
    pub(crate) allowed: bool,
    pub(crate) policy: Option<Name>,
}

impl DecisionRecord {
    /// A record for a request that is not sampled: facts only, no spans.
    pub fn new() -> Self {
        DecisionRecord::with_trace(None)
    }

    pub(crate) fn with_trace(trace: Option<Trace>) -> Self {
        DecisionRecord::build(
            trace,
            None,
            #[cfg(feature = "telemetry")]
            None,
            #[cfg(feature = "telemetry")]
            None,
        )
    }

    /// A client request's record: its span when sampled, and what the
    /// telemetry layer knows from the start.
    #[cfg(feature = "telemetry")]
    pub(crate) fn client(trace: Option<Trace>, start: super::exchange::Start) -> Self {
        DecisionRecord::build(trace, None, None, Some(start))
    }

    /// A server request's record: its span when sampled, the peer's
    /// verified SPIFFE ID, its trace headers when kept unparsed, and what
    /// the telemetry layer knows from the start.
    #[cfg(feature = "telemetry")]
    pub(crate) fn server(
        trace: Option<Trace>,
        principal: Option<&Name>,
        incoming: Option<super::incoming::Incoming>,
        start: super::exchange::Start,
    ) -> Self {
        DecisionRecord::build(trace, principal.cloned(), incoming, Some(start))
    }

    fn build(
        trace: Option<Trace>,
        principal: Option<Name>,
        #[cfg(feature = "telemetry")] incoming: Option<super::incoming::Incoming>,
        #[cfg(feature = "telemetry")] start: Option<super::exchange::Start>,
    ) -> Self {
        DecisionRecord {
            inner: Arc::new(Inner {
                trace: trace.map(Box::new),
                routed: OnceLock::new(),
                cluster: OnceLock::new(),
                route_timeout: Nanos::unset(),
                per_try_timeout: Nanos::unset(),
                deadline: Nanos::unset(),
                fault_delay: Nanos::unset(),
                fault_abort: AtomicU32::new(0),
                flags: AtomicU32::new(0),
                attempts: AtomicU32::new(0),
                retry_on: AtomicU32::new(0),
                retries: [const { AtomicU8::new(0) }; RETRY_CONDITIONS],
                refusals: AtomicU8::new(0),
                overflows: AtomicU8::new(0),
                ejections: AtomicU8::new(0),
                request_bytes: AtomicU64::new(0),
                first: OnceLock::new(),
                retried: OnceLock::new(),
                principal,
                peer_principal: OnceLock::new(),
                authorization: OnceLock::new(),
                denial: OnceLock::new(),
                dry_run: OnceLock::new(),
                #[cfg(feature = "telemetry")]
                incoming,
                #[cfg(feature = "telemetry")]
                start,
            }),
        }
    }

    /// The record a request carries, if a telemetry layer put one there.
    pub fn of<B>(request: &http::Request<B>) -> Option<&DecisionRecord> {
        request.extensions().get::<DecisionRecord>()
    }

    /// Whether the request's span is sampled (attempt spans and events are
    /// recorded only then).
    pub fn is_sampled(&self) -> bool {
        self.inner.trace.is_some()
    }

    pub(crate) fn trace(&self) -> Option<&Trace> {
        self.inner.trace.as_deref()
    }

    /// The trace headers of a server request, kept unparsed.
    #[cfg(feature = "telemetry")]
    pub(crate) fn incoming(&self) -> Option<&super::incoming::Incoming> {
        self.inner.incoming.as_ref()
    }

    /// What the telemetry layer that made the record knew from the start.
    #[cfg(feature = "telemetry")]
    pub(crate) fn start(&self) -> Option<&super::exchange::Start> {
        self.inner.start.as_ref()
    }

    // ----- what the routing layer decided -----

    /// The route was chosen: the snapshot's versions, the listener (the
    /// name dialed) and the matched route's name.
    pub fn route(&self, versions: &Versions, listener: &Name, route: &Name) {
        if self.inner.routed.get().is_none() {
            let _ = self
                .inner
                .routed
                .set(self.routed_value(versions, listener, route, None));
        }
    }

    /// [`route`](Self::route) and [`cluster`](Self::cluster) in one call,
    /// as the routing layer decides them: one set-once cell written instead
    /// of two (a `Once` run, about 100 instructions, less per request).
    /// The first value of each fact is kept, as with the separate calls.
    pub fn routed(
        &self,
        versions: &Versions,
        listener: &Name,
        route: &Name,
        cluster: &Name,
        lb_policy: LbPolicy,
    ) {
        if self.inner.routed.get().is_none() && self.inner.cluster.get().is_none() {
            let value = self.routed_value(versions, listener, route, Some((cluster, lb_policy)));
            if self.inner.routed.set(value).is_ok() {
                return;
            }
        }
        // A route or a cluster was already recorded (separate calls came
        // first): each keeps its first value.
        self.route(versions, listener, route);
        self.cluster(cluster, lb_policy);
    }

    /// What `route` / `routed` record (inlined: it only gathers clones).
    #[inline]
    fn routed_value(
        &self,
        versions: &Versions,
        listener: &Name,
        route: &Name,
        cluster: Option<(&Name, LbPolicy)>,
    ) -> Routed {
        Routed {
            versions: versions.clone(),
            listener: listener.clone(),
            route: route.clone(),
            cluster: cluster.map(|(name, policy)| (name.clone(), policy)),
        }
    }

    /// The cluster was picked (once per request: retries stay in it), with
    /// the balancer that picks its endpoints.
    pub fn cluster(&self, cluster: &Name, lb_policy: LbPolicy) {
        if self.picked().is_none() {
            let _ = self.inner.cluster.set((cluster.clone(), lb_policy));
        }
    }

    /// The cluster and its balancer, from whichever call recorded it
    /// (a separate [`cluster`](Self::cluster) call can only have come
    /// first when both cells hold one: it is checked first).
    fn picked(&self) -> Option<&(Name, LbPolicy)> {
        self.inner
            .cluster
            .get()
            .or_else(|| self.inner.routed.get()?.cluster.as_ref())
    }

    /// The route timeout and per-try timeout in force (`None`: none).
    pub fn timeouts(&self, route: Option<Duration>, per_try: Option<Duration>) {
        if let Some(d) = route {
            self.inner.route_timeout.set(d);
        }
        if let Some(d) = per_try {
            self.inner.per_try_timeout.set(d);
        }
    }

    /// What was left of the request's deadline when it was sent.
    pub fn deadline_remaining(&self, remaining: Duration) {
        self.inner.deadline.set(remaining);
    }

    /// Fault injection delayed the request (response flag `DI`).
    pub fn fault_delay(&self, delay: Duration) {
        self.inner.fault_delay.set(delay);
        self.flag(ResponseFlags::DELAY_INJECTED);
    }

    /// Fault injection aborted the request with an HTTP status (response
    /// flag `FI`).
    pub fn fault_abort_http(&self, status: StatusCode) {
        self.inner
            .fault_abort
            .store(u32::from(status.as_u16()), Ordering::Relaxed);
        self.flag(ResponseFlags::FAULT_INJECTED);
    }

    /// Fault injection aborted the request with a gRPC status code
    /// (response flag `FI`).
    pub fn fault_abort_grpc(&self, code: u32) {
        self.inner
            .fault_abort
            .store(GRPC_ABORT | (code & 0xffff), Ordering::Relaxed);
        self.flag(ResponseFlags::FAULT_INJECTED);
    }

    /// Adds Envoy response flags (`UO`, `URX`, `UT`, `UH`, ...).
    pub fn flag(&self, flags: ResponseFlags) {
        self.inner.flags.fetch_or(flags.bits(), Ordering::Relaxed);
    }

    /// Counts request body bytes sent upstream (the body wrapper calls
    /// this per frame; without it the body's exact size hint is used).
    pub fn add_request_bytes(&self, n: u64) {
        self.inner.request_bytes.fetch_add(n, Ordering::Relaxed);
    }

    // ----- attempts -----

    /// An attempt starts, to `endpoint` (its address and labels, as in
    /// the EDS `Endpoint`). Returns a guard to report the outcome with;
    /// when the request is sampled the guard holds the attempt's child
    /// span (OpenTelemetry: one span per physical HTTP request, with
    /// `http.request.resend_count` on retries).
    pub fn attempt_started(&self, endpoint: SocketAddr, labels: &EndpointLabels) -> AttemptGuard {
        let index = self.inner.attempts.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.slot_for_write(index as usize) {
            let _ = slot.set(Attempt {
                endpoint,
                labels: labels.clone(),
                outcome: OutcomeCell::default(),
                principal: OnceLock::new(),
            });
        }
        let span = self
            .trace()
            .map(|trace| Box::new(trace.attempt_span(endpoint, index, self.cluster_name())));
        AttemptGuard {
            record: self.clone(),
            index,
            span,
            finished: false,
        }
    }

    /// The server's verified SPIFFE ID (mTLS) on the connection the attempt
    /// under way (the latest started) is sent on: the client side's
    /// `destination_principal`. The connection pool calls it with the
    /// identity it verified once per connection (a reference count per
    /// request, no parse); the first call per attempt wins.
    pub fn upstream_principal(&self, spiffe_id: Name) {
        if let Some(attempt) = self.last_attempt() {
            let _ = attempt.principal.set(spiffe_id);
        }
    }

    /// The request will be retried because of `reason` (one condition of
    /// the route's `retry_on`), after `backoff`.
    pub fn retrying(&self, reason: RetryOn, backoff: Duration) {
        self.inner
            .retry_on
            .fetch_or(reason.bits(), Ordering::Relaxed);
        for (i, (_, condition)) in RetryOn::NAMES.iter().enumerate() {
            if reason.contains(*condition)
                && let Some(count) = self.inner.retries.get(i)
            {
                let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_add(1))
                });
            }
        }
        if let Some(trace) = self.trace() {
            trace.retrying(reason, backoff);
        }
    }

    /// A retry was wanted but the retry budget or `max_retries` refused
    /// it: response flag `URX`.
    pub fn retry_refused(&self, why: RetryRefusal) {
        self.flag(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
        self.inner.refusals.fetch_or(why.bit(), Ordering::Relaxed);
        if let Some(trace) = self.trace() {
            trace.retry_refused(why);
        }
    }

    /// The route's retries were all used and the last attempt failed:
    /// response flag `URX`.
    pub fn retries_exhausted(&self) {
        self.flag(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
    }

    /// A circuit breaker limit refused the request: response flag `UO`.
    pub fn breaker_overflow(&self, limit: BreakerLimit) {
        self.flag(ResponseFlags::UPSTREAM_OVERFLOW);
        self.inner
            .overflows
            .fetch_or(limit.bit(), Ordering::Relaxed);
        if let Some(trace) = self.trace() {
            trace.breaker_overflow(limit);
        }
    }

    /// A response to this request made outlier detection eject `endpoint`.
    pub fn outlier_ejected(&self, endpoint: SocketAddr) {
        let _ = self
            .inner
            .ejections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            });
        if let Some(trace) = self.trace() {
            trace.outlier_ejected(endpoint);
        }
    }

    /// Outlier detection affected the pick: `decision` says how
    /// (`"skipped ejected endpoint"`, `"all endpoints ejected"`, ...).
    pub fn outlier(&self, decision: &'static str, endpoint: Option<SocketAddr>) {
        if let Some(trace) = self.trace() {
            trace.outlier(decision, endpoint);
        }
    }

    // ----- the server side -----

    /// The peer's verified SPIFFE ID (mTLS).
    pub fn peer_principal(&self, spiffe_id: &Name) {
        if self.inner.principal.is_none() && self.inner.peer_principal.get().is_none() {
            let _ = self.inner.peer_principal.set(spiffe_id.clone());
        }
    }

    /// The authorization decision and the policy that made it. The first
    /// denial wins over any allow (a request checked by two policies is
    /// denied if either denies it); otherwise the first allow is kept.
    pub fn authorization(&self, allowed: bool, policy: Option<&Name>) {
        let slot = if allowed {
            &self.inner.authorization
        } else {
            &self.inner.denial
        };
        let _ = slot.set(Authorization {
            allowed,
            policy: policy.cloned(),
        });
    }

    /// A decision made before this record's layer saw the request (an
    /// [`Authorized`] extension): allowed, by its policy, with its dry-run
    /// result.
    pub(crate) fn authorized(&self, decided: &Authorized) {
        self.authorization(true, decided.policy());
        if !decided.dry_run().is_empty() {
            self.dry_run(decided.dry_run());
        }
    }

    /// What the dry-run authorization policies (`istio.io/dry-run`) would
    /// have decided; the first result is kept. Never changes the request's
    /// fate: it is reported (span attributes
    /// `istio.authorization.dry_run.*`, the `mesh_authz_dry_run_total`
    /// metric, the access log).
    pub fn dry_run(&self, result: &DryRun) {
        if self.inner.dry_run.get().is_none() {
            let _ = self.inner.dry_run.set(result.clone());
        }
    }

    // ----- reading -----

    /// The response flags so far.
    pub fn flags(&self) -> ResponseFlags {
        ResponseFlags::from_bits(self.inner.flags.load(Ordering::Relaxed))
    }

    /// How many attempts started.
    pub fn attempts(&self) -> u32 {
        self.inner.attempts.load(Ordering::Relaxed)
    }

    /// The retry conditions that caused retries.
    pub fn retry_reasons(&self) -> RetryOn {
        let bits = self.inner.retry_on.load(Ordering::Relaxed);
        RetryOn::NAMES
            .iter()
            .filter(|(_, v)| v.bits() & bits != 0)
            .fold(RetryOn::empty(), |acc, (_, v)| acc | *v)
    }

    /// Retries per retry condition: the condition's name (as in the
    /// route's `retry_on`) and how many retries it caused (saturating at
    /// 255), for the conditions that caused any.
    pub fn retries_by_reason(&self) -> impl Iterator<Item = (&'static str, u8)> + '_ {
        RetryOn::NAMES
            .iter()
            .zip(self.inner.retries.iter())
            .map(|((name, _), n)| (*name, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
    }

    /// Why retries were refused, each reason once.
    pub fn refusals(&self) -> impl Iterator<Item = RetryRefusal> {
        let bits = self.inner.refusals.load(Ordering::Relaxed);
        RetryRefusal::ALL
            .into_iter()
            .filter(move |r| bits & r.bit() != 0)
    }

    /// The circuit breaker limits that overflowed, each once.
    pub fn overflows(&self) -> impl Iterator<Item = BreakerLimit> {
        let bits = self.inner.overflows.load(Ordering::Relaxed);
        BreakerLimit::ALL
            .into_iter()
            .filter(move |l| bits & l.bit() != 0)
    }

    /// How many outlier ejections this request's responses caused
    /// (saturating at 255).
    pub fn ejections(&self) -> u8 {
        self.inner.ejections.load(Ordering::Relaxed)
    }

    /// Whether anything beyond one plain attempt happened (retries,
    /// refusals, overflows, ejections, flags): the mesh's own metrics are
    /// counted only then.
    #[cfg(feature = "telemetry")]
    pub(crate) fn is_eventful(&self) -> bool {
        self.attempts() > 1
            || self.inner.flags.load(Ordering::Relaxed) != 0
            || self.inner.ejections.load(Ordering::Relaxed) != 0
    }

    /// The cluster picked, if any.
    pub fn cluster_name(&self) -> Option<&Name> {
        self.picked().map(|(name, _)| name)
    }

    /// The matched route's name, if any.
    pub fn route_name(&self) -> Option<&Name> {
        self.inner.routed.get().map(|r| &r.route)
    }

    /// The listener (the name dialed), if routed.
    pub fn listener_name(&self) -> Option<&Name> {
        self.inner.routed.get().map(|r| &r.listener)
    }

    /// The peer's SPIFFE ID, if verified.
    pub fn peer_principal_id(&self) -> Option<&Name> {
        self.inner
            .principal
            .as_ref()
            .or_else(|| self.inner.peer_principal.get())
    }

    /// The server's verified SPIFFE ID on the latest attempt's connection
    /// (see [`upstream_principal`](Self::upstream_principal)); `None`
    /// without an attempt, or over plaintext.
    pub fn upstream_principal_id(&self) -> Option<&Name> {
        self.last_attempt()?.principal.get()
    }

    /// The authorization decision, if one was made: whether the request
    /// was allowed, and the deciding policy (`<namespace>/<name>`; `None`
    /// when no policy matched, or STRICT mTLS refused a request without a
    /// verified peer).
    pub fn authorization_decision(&self) -> Option<(bool, Option<&Name>)> {
        self.inner
            .denial
            .get()
            .or_else(|| self.inner.authorization.get())
            .map(|a| (a.allowed, a.policy.as_ref()))
    }

    /// If the request was denied by authorization: the deciding policy
    /// (`None` for default deny, or STRICT mTLS without a verified peer).
    /// One atomic load when it was not. Read by the metrics only.
    #[cfg(feature = "telemetry")]
    pub(crate) fn denied_by(&self) -> Option<Option<&Name>> {
        self.inner.denial.get().map(|d| d.policy.as_ref())
    }

    /// What the dry-run authorization policies would have decided, if the
    /// request was evaluated under any.
    pub fn dry_run_result(&self) -> Option<&DryRun> {
        self.inner.dry_run.get()
    }

    /// The endpoint of the latest recorded attempt, with its labels.
    pub fn endpoint(&self) -> Option<(SocketAddr, &EndpointLabels)> {
        self.last_attempt().map(|a| (a.endpoint, &a.labels))
    }

    /// Attempt `i`'s slot, if it exists.
    fn slot(&self, i: usize) -> Option<&OnceLock<Attempt>> {
        match i {
            0 => Some(&self.inner.first),
            _ => self.inner.retried.get()?.get(i - 1),
        }
    }

    /// Attempt `i`'s slot, allocating the retry slots on the first retry.
    fn slot_for_write(&self, i: usize) -> Option<&OnceLock<Attempt>> {
        match i {
            0 => Some(&self.inner.first),
            _ => self
                .inner
                .retried
                .get_or_init(|| Box::new([const { OnceLock::new() }; MAX_RECORDED_ATTEMPTS - 1]))
                .get(i - 1),
        }
    }

    pub(crate) fn last_attempt(&self) -> Option<&Attempt> {
        let n = (self.attempts() as usize).min(MAX_RECORDED_ATTEMPTS);
        (0..n).rev().find_map(|i| self.slot(i)?.get())
    }

    #[cfg(test)]
    pub(crate) fn recorded_attempts(&self) -> impl Iterator<Item = &Attempt> {
        (0..MAX_RECORDED_ATTEMPTS).map_while(|i| self.slot(i)?.get())
    }

    /// The request body bytes counted with
    /// [`add_request_bytes`](Self::add_request_bytes).
    pub fn request_bytes(&self) -> u64 {
        self.inner.request_bytes.load(Ordering::Relaxed)
    }
}

impl Default for DecisionRecord {
    fn default() -> Self {
        DecisionRecord::new()
    }
}

impl std::fmt::Debug for DecisionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionRecord")
            .field("sampled", &self.is_sampled())
            .field("route", &self.route_name())
            .field("cluster", &self.cluster_name())
            .field("attempts", &self.attempts())
            .field("flags", &self.flags())
            .finish_non_exhaustive()
    }
}

/// One attempt in flight: report how it ended with
/// [`AttemptGuard::finish`]. Dropping it unfinished records the attempt as
/// cancelled (its span ends with an error status).
pub struct AttemptGuard {
    record: DecisionRecord,
    index: u32,
    /// The attempt's span, when the request is sampled (boxed: the guard
    /// of an unsampled request stays three words, cheap to move with the
    /// attempt).
    span: Option<Box<AttemptSpan>>,
    finished: bool,
}

impl AttemptGuard {
    /// Points the request's `traceparent` at this attempt's span, so the
    /// endpoint's server span is its child (a no-op unless sampled).
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Some(span) = &self.span {
            span.inject(headers);
        }
    }

    /// Which attempt this is: 1 for the first try.
    pub fn number(&self) -> u32 {
        self.index + 1
    }

    /// Records how the attempt ended and ends its span.
    pub fn finish(mut self, outcome: AttemptOutcome) {
        self.finished = true;
        if let Some(slot) = self.record.slot(self.index as usize)
            && let Some(attempt) = slot.get()
        {
            attempt.outcome.set(outcome);
        }
        if let Some(span) = self.span.take() {
            span.end(outcome);
        }
    }

    /// [`AttemptGuard::finish`] with a failure and the error that caused it
    /// (its message goes into the span).
    pub fn fail(mut self, flags: ResponseFlags, error: &dyn std::error::Error) {
        if let Some(span) = &mut self.span {
            span.record_error(error);
        }
        self.finish(AttemptOutcome::Failed(flags));
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        if !self.finished
            && let Some(span) = self.span.take()
        {
            span.cancel();
        }
    }
}

impl std::fmt::Debug for AttemptGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptGuard")
            .field("attempt", &self.number())
            .field("sampled", &self.span.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_kept_and_attempts_counted_without_a_span() {
        let record = DecisionRecord::new();
        assert!(!record.is_sampled());
        let cluster: Name = "outbound|80|v1|catalog.shop.svc.cluster.local".into();
        record.cluster(&cluster, LbPolicy::LeastRequest);
        record.cluster(&"other".into(), LbPolicy::Random);
        assert_eq!(record.cluster_name(), Some(&cluster));
        let labels: Arc<[(Name, Name)]> = Arc::from([("version".into(), "v1".into())]);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        record
            .attempt_started(a, &labels)
            .finish(AttemptOutcome::Failed(
                ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            ));
        record.retrying(RetryOn::CONNECT_FAILURE, Duration::from_millis(25));
        let guard = record.attempt_started(b, &labels);
        assert_eq!(guard.number(), 2);
        guard.finish(AttemptOutcome::Response {
            status: StatusCode::OK,
            grpc_status: None,
        });
        assert_eq!(record.attempts(), 2);
        assert_eq!(record.endpoint().map(|(addr, _)| addr), Some(b));
        assert_eq!(record.retry_reasons(), RetryOn::CONNECT_FAILURE);
        let outcomes: Vec<_> = record
            .recorded_attempts()
            .map(|a| *a.outcome.get().unwrap())
            .collect();
        assert_eq!(
            outcomes[0],
            AttemptOutcome::Failed(ResponseFlags::UPSTREAM_CONNECTION_FAILURE)
        );
        record.breaker_overflow(BreakerLimit::MaxRequests);
        record.retry_refused(RetryRefusal::Budget);
        assert_eq!(record.flags().to_string(), "UO,URX");
        assert_eq!(
            record.retries_by_reason().collect::<Vec<_>>(),
            [("connect-failure", 1)]
        );
        assert_eq!(
            record.overflows().collect::<Vec<_>>(),
            [BreakerLimit::MaxRequests]
        );
        assert_eq!(
            record.refusals().collect::<Vec<_>>(),
            [RetryRefusal::Budget]
        );
        #[cfg(feature = "telemetry")]
        assert!(record.is_eventful());
    }

    /// `routed` records what `route` and `cluster` record, and keeps the
    /// first value of each fact whichever call came first.
    #[test]
    fn route_and_cluster_in_one_call_keep_the_first_values() {
        let versions = Versions::default();
        let (listener, route): (Name, Name) = ("catalog:80".into(), "default".into());
        let (a, b): (Name, Name) = ("outbound|80||a".into(), "outbound|80||b".into());

        let record = DecisionRecord::new();
        record.routed(&versions, &listener, &route, &a, LbPolicy::RoundRobin);
        record.routed(
            &versions,
            &"other".into(),
            &"other".into(),
            &b,
            LbPolicy::Random,
        );
        record.cluster(&b, LbPolicy::Random);
        assert_eq!(record.route_name(), Some(&route));
        assert_eq!(record.listener_name(), Some(&listener));
        assert_eq!(record.cluster_name(), Some(&a));
        assert_eq!(record.picked().map(|(_, p)| *p), Some(LbPolicy::RoundRobin));

        // A separate call first: its value stays, the other fact is added.
        let record = DecisionRecord::new();
        record.cluster(&b, LbPolicy::Random);
        record.routed(&versions, &listener, &route, &a, LbPolicy::RoundRobin);
        assert_eq!(record.cluster_name(), Some(&b));
        assert_eq!(record.route_name(), Some(&route));
        let record = DecisionRecord::new();
        record.route(&versions, &listener, &"first".into());
        record.routed(&versions, &listener, &route, &a, LbPolicy::RoundRobin);
        assert_eq!(record.route_name().map(|r| &**r), Some("first"));
        assert_eq!(record.cluster_name(), Some(&a));
    }

    #[test]
    fn attempts_beyond_the_slots_are_counted_and_the_last_recorded_one_is_kept() {
        let record = DecisionRecord::new();
        let labels: Arc<[(Name, Name)]> = Arc::from([]);
        for port in 1..=6u16 {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            drop(record.attempt_started(addr, &labels));
        }
        assert_eq!(record.attempts(), 6);
        assert_eq!(
            record.endpoint().map(|(a, _)| a.port()),
            Some(MAX_RECORDED_ATTEMPTS as u16)
        );
    }
}
