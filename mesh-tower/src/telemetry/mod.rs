//! Observability: OpenTelemetry spans with a decision record, Istio's
//! standard metrics, access logs.
//!
//! **Feature `telemetry`** (on by default; the `proxyless` facade's
//! `telemetry` feature turns it on). Without it this module holds only the
//! decision record's vocabulary — [`DecisionRecord`], [`AttemptGuard`],
//! [`AttemptOutcome`], [`ResponseFlags`], [`BreakerLimit`],
//! [`RetryRefusal`], [`EndpointLabels`] — because the request engine
//! (`mesh`, `server`) reports its decisions in these terms in both builds;
//! a layer of the application's own can put a record on a request and read
//! it when the response ends. Everything that exports the record
//! (the layers, [`Telemetry`], OpenTelemetry spans and OTLP export, the
//! Prometheus metrics, access logs, trace context propagation) needs the
//! feature, which brings `opentelemetry`, `opentelemetry_sdk`,
//! `opentelemetry-otlp`, `opentelemetry-http` and `prometheus-client`.
//! The engine costs the same in both builds: a request with no record
//! (no telemetry layer above) records nothing.
//!
//! A sidecar mesh sees a request twice, as a proxy; this one sees it from
//! inside the process and can say *why* things happened. Two tower layers
//! do the work, and the mesh's own layers report their decisions to them
//! through a [`DecisionRecord`] request extension:
//!
//! - [`ClientTelemetryLayer`] wraps the client stack, outermost (Envoy's and
//!   gRPC's order: the span covers routing, retries and every attempt). Per
//!   request: a CLIENT span (OpenTelemetry HTTP and RPC semantic
//!   conventions) whose parent is the `opentelemetry::Context` in the
//!   request's extensions (see [`propagate`]) or else the current context;
//!   `traceparent` / `tracestate` / `baggage` headers; a fresh
//!   [`DecisionRecord`] for the layers below (a child span per attempt when
//!   sampled); and when the response body ends, the final status (gRPC
//!   status from trailers too), the decision record as `mesh.*` span
//!   attributes, Istio metrics with `reporter="source"`, and an access log
//!   line.
//! - [`ServerTelemetryLayer`] wraps the application: it continues the
//!   caller's trace (W3C, or B3 from Envoy/Zipkin peers), starts a SERVER
//!   span, gives the application the `opentelemetry::Context` as a request
//!   extension and as the current context while its future runs (so a
//!   client call made inside the handler is a child without any code), and
//!   reports Istio metrics with `reporter="destination"` and an access log
//!   line when the response body ends.
//!
//! What a request costs depends on what its [`Telemetry`] can record,
//! decided once when it is built: without a tracer, or with a sampler that
//! never samples ([`Sampling::AlwaysOff`]; see
//! [`TelemetryBuilder::sampling`]), no span can be recorded, so the server
//! side keeps the caller's trace headers unparsed and builds the context
//! only if the handler makes a call that continues it (or asks with
//! [`context_of`]); the request then carries no `opentelemetry::Context`
//! extension, and the client side mints unsampled span contexts without
//! the sampler. Trace context is still propagated: the mesh forwards it
//! with sampling off. Istio's label sets are built once per series and
//! reused (a bounded cache, see [`MetricsRegistry`]).
//!
//! There is no global state: a [`Telemetry`] (identity, optional tracer
//! provider, optional [`MetricsRegistry`], access log switch) is passed to
//! each layer, so three services in one process export three
//! `service.name`s and share one registry.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_tower::BoxError> {
//! use mesh_tower::telemetry::{self, ClientTelemetryLayer, Identity, MetricsRegistry,
//!     ServerTelemetryLayer, Telemetry};
//! use tower::Layer;
//!
//! let registry = MetricsRegistry::new();
//! let telemetry = Telemetry::builder(Identity::new("frontend", "shop").with_version("v1"))
//!     .otel_env()?                 // OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER, ...
//!     .metrics(&registry)
//!     .access_log(true)
//!     .build();
//! let client = ClientTelemetryLayer::new(telemetry.clone())
//!     .layer(mesh_tower::MeshClient::<http_body_util::Full<bytes::Bytes>>::from_env()?);
//! let app: axum::Router = axum::Router::new()
//!     .route("/", axum::routing::get(|| async { "hi" }))
//!     .layer(ServerTelemetryLayer::new(telemetry));
//! let _metrics = telemetry::serve_metrics("127.0.0.1:9090".parse()?, registry).await?;
//! # let _ = (client, app);
//! # Ok(())
//! # }
//! ```
//!
//! Standards followed: [W3C Trace Context](https://www.w3.org/TR/trace-context/),
//! [OpenTelemetry HTTP](https://opentelemetry.io/docs/specs/semconv/http/http-spans/)
//! and [RPC](https://opentelemetry.io/docs/specs/semconv/rpc/grpc/) span
//! conventions, [Istio standard metrics](https://istio.io/latest/docs/reference/config/metrics/),
//! [Envoy response flags](https://www.envoyproxy.io/docs/envoy/latest/configuration/observability/access_log/usage).

// The decision record: always compiled (the request engine writes it).
mod flags;
mod record;

// What exports it: feature `telemetry`.
#[cfg(feature = "telemetry")]
mod access_log;
#[cfg(feature = "telemetry")]
mod client;
#[cfg(feature = "telemetry")]
mod exchange;
#[cfg(feature = "telemetry")]
mod graph_push;
#[cfg(feature = "telemetry")]
mod histogram;
#[cfg(feature = "telemetry")]
mod identity;
#[cfg(feature = "telemetry")]
mod incoming;
#[cfg(feature = "telemetry")]
mod metrics;
#[cfg(feature = "telemetry")]
mod otel;
#[cfg(feature = "telemetry")]
mod propagation;
#[cfg(feature = "telemetry")]
mod serve_metrics;
#[cfg(feature = "telemetry")]
mod server;
#[cfg(feature = "telemetry")]
mod settings;

pub use self::flags::{BreakerLimit, ResponseFlags, RetryRefusal};
pub use self::record::{
    AttemptGuard, AttemptOutcome, DecisionRecord, EndpointLabels, MAX_RECORDED_ATTEMPTS,
};

#[cfg(feature = "telemetry")]
pub use self::access_log::ACCESS_LOG_TARGET;
#[cfg(feature = "telemetry")]
pub use self::client::{ClientResponseFuture, ClientTelemetry, ClientTelemetryLayer};
#[cfg(feature = "telemetry")]
pub use self::exchange::TelemetryBody;
#[cfg(feature = "telemetry")]
pub use self::graph_push::{GraphPush, GraphSource};
#[cfg(feature = "telemetry")]
pub use self::identity::{Identity, PEER_HEADER};
#[cfg(feature = "telemetry")]
pub use self::metrics::{DURATION_BUCKETS_MS, ISTIO_LABELS, MetricsRegistry, SIZE_BUCKETS_BYTES};
#[cfg(feature = "telemetry")]
pub use self::otel::{OtelConfig, OtlpProtocol, Sampling};
#[cfg(feature = "telemetry")]
pub use self::propagation::{
    BAGGAGE, HasExtensions, TRACEPARENT, TRACESTATE, context_of, extract, extract_b3, propagate,
};
#[cfg(feature = "telemetry")]
pub use self::serve_metrics::{MetricsServer, serve_metrics};
#[cfg(feature = "telemetry")]
pub(crate) use self::server::local_reply;
#[cfg(feature = "telemetry")]
pub use self::server::{ServerResponseFuture, ServerTelemetry, ServerTelemetryLayer};
#[cfg(feature = "telemetry")]
pub use self::settings::{Telemetry, TelemetryBuilder};
