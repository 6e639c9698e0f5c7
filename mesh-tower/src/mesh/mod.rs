//! The client stack: from the name an application dials to a response,
//! with Envoy's resilience semantics.
//!
//! Per request, in the order Envoy's filters and router apply them (the
//! client stack of docs/ARCHITECTURE.md; gRPC's xDS client reads the same
//! config, gRFC A27/A28/A31/A32/A33/A42/A44/A50):
//!
//! 1. **Route match.** The authority (the URI's, else the `Host` header)
//!    selects a listener of the current [`Snapshot`](mesh_core::Snapshot); a
//!    name never asked about is subscribed to and waited for (bounded by
//!    [`MeshLayer::listener_timeout`], 10 s by default), a name the control
//!    server said does not exist fails at once with
//!    [`ErrorKind::NotFound`](crate::ErrorKind::NotFound). The listener's
//!    route table picks the first matching route.
//! 2. **Weighted cluster**, picked once per request: retries stay in it.
//! 3. **Fault injection** (Istio `fault`, Envoy's fault filter): a delay
//!    (a `tokio` sleep), then possibly an abort, answered by the mesh
//!    itself; never retried.
//! 4. **Overall timeout / deadline**: the route `timeout`, the request's
//!    [`Deadline`](crate::Deadline) extension and, for gRPC, a
//!    `grpc-timeout` the app set: the earliest wins. It covers the retries
//!    and the response body (as Envoy's route timeout does). A deadline that
//!    has passed fails at once, without a network call. Each attempt tells
//!    the endpoint how long it has: `grpc-timeout` for gRPC requests,
//!    `x-envoy-expected-rq-timeout-ms` otherwise (see [`crate::deadline`]).
//! 5. **Retries** (Istio `retries`, gRFC A44): a failure named by `retryOn`
//!    (HTTP status; gRPC status in the response headers, that is a
//!    Trailers-Only response; connect failure; reset; HTTP/2
//!    `REFUSED_STREAM`; per-try timeout) is retried up to `attempts` times,
//!    after a full-jitter exponential backoff, on an endpoint not tried yet
//!    when there is one, if the cluster's retry budget and `maxRetries`
//!    allow (a refused retry is not sent: the last result is returned, and
//!    counted in [`MeshStats::retries_refused`](crate::MeshStats)). A gRPC
//!    status that arrives in trailers after a `200` is not retried (the
//!    response has begun), as in Envoy. Every attempt carries
//!    `x-envoy-attempt-count: <n>`, the first one included, as Envoy's
//!    router does with `include_request_attempt_count`, which Istio sets
//!    on every virtual host it generates (with or without retries).
//! 6. **Per-try timeout** (`perTryTimeout`), until the response head.
//! 7. **Circuit breaker** (Istio `connectionPool`): `http2MaxRequests`
//!    active requests per cluster (every attempt counts, until its response
//!    body ends); one more is answered at once with `503` and
//!    `x-envoy-overloaded: true` (gRPC: `UNAVAILABLE`), naming the limit.
//!    `maxConnections` and `http1MaxPendingRequests` are applied by the
//!    connection pool (see [`crate::pool`]).
//! 8. **Endpoint pick**: the cluster's balancer (round robin, random,
//!    least-request with two choices over requests in flight, ring hash on
//!    the route's hash policy), over the endpoints outlier detection has
//!    not ejected (all of them in panic mode, below `minHealthPercent`),
//!    localities ordered by closeness to the client when the cluster has
//!    locality failover. Every attempt's result is reported to outlier
//!    detection (Istio `outlierDetection`).
//! 9. **Connection**: the request goes to the inner service with a
//!    [`TargetEndpoint`] saying where it must go, found with
//!    [`TargetEndpoint::of`] (the [`Pool`](crate::Pool) dials it with the
//!    cluster's connection settings).
//!
//! Errors. Failures the mesh decides for a request that could be sent
//! (breaker overflow, fault abort, timeout) are **responses**, as a sidecar
//! would give them (see [`crate::local_reply`]): `503`/`UNAVAILABLE`,
//! the abort status, `504`/`DEADLINE_EXCEEDED`. A request that cannot be
//! routed (no such service, no route, no endpoint) returns `Err`, and so
//! does one whose last attempt failed without a response (connect failure,
//! reset): "no such service", "could not reach it" and "the service said
//! 503" stay distinct.
//!
//! Request bodies. A request that may be retried has its body kept (up to
//! [`MeshLayer::retry_buffer_limit`], 64 KiB by default) when the whole
//! body is available as it is sent; bigger bodies and bodies still being
//! produced (a client stream) are streamed once and **not retried** (see
//! [`MeshBody`](crate::MeshBody)). The inner service therefore receives
//! `Request<MeshBody<B>>`.
//!
//! Ring hash keys: headers, cookies and query parameters come from the
//! request; `useSourceIp` uses the peer address of a
//! [`ConnectionInfo`](crate::ConnectionInfo) extension when the request
//! carries one (a request built from an incoming one, extensions copied),
//! else the request has no key and lands at a random point of the ring.
//!
//! The engine. Steps 3 to 8 are decided by one sans-io state machine per
//! request, [`mesh_core::engine::Exchange`]; [`ResponseFuture`] is its one
//! driver, for every request, with or without a policy: it performs what
//! the engine asks (take a breaker slot, pick an endpoint, send an attempt,
//! ask the retry budget, answer) and hands back what happened. The first
//! attempt is sent inside `call` with the readied inner service; the future
//! then only waits, without a box or a task, and arms a timer only when
//! something can time out (a route timeout, a deadline, a per-try timeout,
//! a backoff, a fault delay). What a retry needs (a copy of the request
//! head, a clone of the inner service) is kept only when a retry is
//! possible: a route that retries, and a body that can be replayed.
//!
//! Telemetry. Under [`ClientTelemetry`](crate::telemetry::ClientTelemetry)
//! (feature `telemetry`), or below any layer of the application's own that
//! puts one there, a request carries a
//! [`DecisionRecord`](crate::telemetry::DecisionRecord), and every step above writes what it decided into it: the snapshot's
//! versions, the listener and route (1), the cluster and its balancer (2),
//! a delay or abort injected (3, flags `DI` / `FI`), the route and per-try
//! timeouts, what was left of the caller's deadline, a deadline already
//! passed (flag `DT`) or the timeout firing (flag `UT`) (4), each retry
//! with its condition and backoff, a retry refused by the budget or
//! `maxRetries`, retries used up (flag `URX`) (5), a per-try timeout (6),
//! a breaker overflow with its limit (flag `UO`) (7), each attempt with
//! its endpoint, labels and outcome, an ejection it caused, no endpoint
//! left (flag `UH`) (8). Each attempt points the request's `traceparent`
//! at its own child span when the request is sampled, so the endpoint's
//! server span is the attempt's child. The telemetry layer turns the
//! record into `mesh.*` span attributes, metric labels and the mesh's own
//! counters. A request without a record (no telemetry layer) records
//! nothing and pays nothing beyond one extension lookup, with or without
//! the feature: the record is the same type in both builds, and only its
//! span side is compiled out.
//!
//! Two ways to hand the request on, chosen with [`MeshLayer::rewrite_uri`]:
//!
//! - **rewrite** (the default of [`MeshLayer`]): the URI becomes
//!   `http://<endpoint>/<path?query>` and the original authority moves to the
//!   `Host` header, so any HTTP client (hyper-util's legacy `Client`, reqwest)
//!   works as the inner service. Over HTTP/2 such a client sends the
//!   endpoint address as `:authority` and the service name as `host`.
//! - **keep** (what [`MeshClient`](crate::MeshClient) uses): the URI is left
//!   as written and the inner service dials the [`TargetEndpoint::addr`]
//!   of [`TargetEndpoint::of`] the request; the
//!   endpoint sees the original `:authority` (HTTP/2) or `Host` (HTTP/1.1).

mod attempt;
mod future;
mod layer;
// The mirroring machinery has a folder of its own (a folder per
// middleware); the driver reaches it as `super::mirror`.
pub(crate) use crate::mirror;
mod service;
mod traffic;

pub(crate) use self::attempt::Finish;
pub(crate) use self::attempt::{outcome_of, outcome_of_error, report};
pub use self::future::ResponseFuture;
pub use self::layer::MeshLayer;
pub use self::service::Mesh;
// Defined with the pool, the layer below that dials it; re-exported here,
// where the mesh layer sets it.
pub use crate::pool::TargetEndpoint;

/// The header that numbers the attempts of a request (1 for the first),
/// as Envoy's `include_request_attempt_count` sends it.
pub const ATTEMPT_COUNT: &str = "x-envoy-attempt-count";

/// [`ATTEMPT_COUNT`] as a header name, built at compile time: inserting by
/// `&str` would parse and validate the name on every request.
pub(crate) const ATTEMPT_COUNT_NAME: http::HeaderName =
    http::HeaderName::from_static(ATTEMPT_COUNT);
