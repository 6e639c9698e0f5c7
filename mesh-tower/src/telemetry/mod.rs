//! Observability: OpenTelemetry spans with a decision record, Istio's
//! standard metrics, access logs.
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

mod access_log;
mod client;
mod exchange;
mod flags;
mod identity;
mod metrics;
mod otel;
mod propagation;
mod record;
mod serve_metrics;
mod server;

use std::sync::Arc;

use http::{Extensions, HeaderValue, Request};
use opentelemetry::Context;
use opentelemetry::InstrumentationScope;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

pub use self::access_log::ACCESS_LOG_TARGET;
pub use self::client::{ClientResponseFuture, ClientTelemetry, ClientTelemetryLayer};
pub use self::exchange::TelemetryBody;
pub use self::flags::ResponseFlags;
pub use self::identity::{Identity, PEER_HEADER};
pub use self::metrics::{
    BreakerLimit, DURATION_BUCKETS_MS, ISTIO_LABELS, MetricsRegistry, RetryRefusal,
    SIZE_BUCKETS_BYTES,
};
pub use self::otel::{OtelConfig, OtlpProtocol, Sampling};
pub use self::propagation::{BAGGAGE, TRACEPARENT, TRACESTATE, extract, extract_b3};
pub use self::record::{
    AttemptGuard, AttemptOutcome, DecisionRecord, EndpointLabels, MAX_RECORDED_ATTEMPTS,
};
pub use self::serve_metrics::{MetricsServer, serve_metrics};
pub use self::server::{ServerResponseFuture, ServerTelemetry, ServerTelemetryLayer};

use self::identity::{PeerRef, ServiceLabels};
use crate::error::Error;

/// A service's telemetry settings, shared by its client and server layers:
/// who it is, where its spans go, where its metrics are counted, whether it
/// logs requests. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) identity: Identity,
    pub(crate) peer: PeerRef,
    pub(crate) service: Arc<ServiceLabels>,
    pub(crate) peer_header: Option<HeaderValue>,
    pub(crate) provider: Option<SdkTracerProvider>,
    pub(crate) tracer: Option<SdkTracer>,
    pub(crate) metrics: Option<MetricsRegistry>,
    pub(crate) access_log: bool,
}

/// Builds a [`Telemetry`].
#[derive(Debug)]
pub struct TelemetryBuilder {
    identity: Identity,
    provider: Option<SdkTracerProvider>,
    metrics: Option<MetricsRegistry>,
    access_log: bool,
    peer_metadata: bool,
}

impl Telemetry {
    /// Starts a builder for the service `identity`. Without more, the
    /// telemetry only propagates trace context.
    pub fn builder(identity: Identity) -> TelemetryBuilder {
        TelemetryBuilder {
            identity,
            provider: None,
            metrics: None,
            access_log: false,
            peer_metadata: true,
        }
    }

    /// Tracing configured by the `OTEL_*` variables (see [`OtelConfig`]);
    /// no metrics, no access log. Needs a tokio runtime when an endpoint is
    /// set.
    pub fn from_env(identity: Identity) -> Result<Telemetry, Error> {
        Ok(Telemetry::builder(identity).otel_env()?.build())
    }

    /// The service's identity.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The tracer provider, when tracing is on.
    pub fn tracer_provider(&self) -> Option<&SdkTracerProvider> {
        self.inner.provider.as_ref()
    }

    /// The metrics registry, when metrics are on.
    pub fn metrics(&self) -> Option<&MetricsRegistry> {
        self.inner.metrics.as_ref()
    }

    /// Exports every span ended so far (blocks a blocking-pool thread, not
    /// the runtime). Call before a process exits.
    pub async fn flush(&self) -> Result<(), Error> {
        let Some(provider) = self.inner.provider.clone() else {
            return Ok(());
        };
        let flushed = tokio::task::spawn_blocking(move || provider.force_flush())
            .await
            .map_err(|e| otel::config_error("the span flush task failed").with_source(e))?;
        flushed.map_err(|e| otel::config_error("exporting spans failed").with_source(e))
    }

    /// Flushes and stops the tracer provider (later spans are dropped).
    pub async fn shutdown(&self) -> Result<(), Error> {
        let Some(provider) = self.inner.provider.clone() else {
            return Ok(());
        };
        let stopped = tokio::task::spawn_blocking(move || provider.shutdown())
            .await
            .map_err(|e| otel::config_error("the tracer shutdown task failed").with_source(e))?;
        stopped.map_err(|e| otel::config_error("shutting the tracer down failed").with_source(e))
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("identity", &self.inner.identity)
            .field("tracing", &self.inner.tracer.is_some())
            .field("metrics", &self.inner.metrics.is_some())
            .field("access_log", &self.inner.access_log)
            .finish()
    }
}

impl TelemetryBuilder {
    /// Exports spans through `provider` (build it with
    /// [`Identity::resource`] as its resource).
    pub fn tracer_provider(mut self, provider: SdkTracerProvider) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Exports spans as the `OTEL_*` variables say, if they name an
    /// endpoint (see [`OtelConfig`]).
    pub fn otel_env(self) -> Result<Self, Error> {
        let config = OtelConfig::from_env()?;
        self.otel(&config)
    }

    /// Exports spans as `config` says, if it names an endpoint.
    pub fn otel(mut self, config: &OtelConfig) -> Result<Self, Error> {
        if let Some(provider) = config.tracer_provider(&self.identity)? {
            self.provider = Some(provider);
        }
        Ok(self)
    }

    /// Counts Istio's request metrics into `registry`.
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        self.metrics = Some(registry.clone());
        self
    }

    /// Logs one JSON line per request (target [`ACCESS_LOG_TARGET`], level
    /// INFO).
    pub fn access_log(mut self, on: bool) -> Self {
        self.access_log = on;
        self
    }

    /// Whether to announce this workload to its peers in the
    /// `x-proxyless-peer` header (default on), so their metrics can name
    /// it. Turn off for a client that talks to services outside the mesh.
    pub fn peer_metadata(mut self, on: bool) -> Self {
        self.peer_metadata = on;
        self
    }

    /// The telemetry.
    pub fn build(self) -> Telemetry {
        let tracer = self.provider.as_ref().map(|p| {
            p.tracer_with_scope(
                InstrumentationScope::builder("proxyless")
                    .with_version(env!("CARGO_PKG_VERSION"))
                    .build(),
            )
        });
        let peer = self.identity.peer();
        let peer_header = self.peer_metadata.then(|| peer.to_header());
        Telemetry {
            inner: Arc::new(Inner {
                service: Arc::new(self.identity.service_labels()),
                peer: Arc::new(peer),
                peer_header,
                identity: self.identity,
                provider: self.provider,
                tracer,
                metrics: self.metrics,
                access_log: self.access_log,
            }),
        }
    }
}

/// What carries request extensions: an `http::Request`, its `Parts`, or
/// the `Extensions` themselves.
pub trait HasExtensions {
    /// The extensions.
    fn extensions(&self) -> &Extensions;
}

impl HasExtensions for Extensions {
    fn extensions(&self) -> &Extensions {
        self
    }
}

impl HasExtensions for http::request::Parts {
    fn extensions(&self) -> &Extensions {
        &self.extensions
    }
}

impl<B> HasExtensions for Request<B> {
    fn extensions(&self) -> &Extensions {
        Request::extensions(self)
    }
}

/// Carries what an incoming request's context means for the calls made
/// while serving it onto `outgoing`: the trace context that
/// [`ServerTelemetry`] stored (so the outgoing call's span is a child of
/// the server span) and the request's [`Deadline`](crate::Deadline) (so
/// the outgoing call gets what is left of it).
///
/// Inside a handler served through [`ServerTelemetryLayer`] this is only
/// needed when the call is made outside the handler's future (a spawned
/// task): there the context is not current.
pub fn propagate<B>(incoming: &impl HasExtensions, outgoing: &mut Request<B>) {
    let extensions = incoming.extensions();
    if let Some(cx) = extensions.get::<Context>() {
        outgoing.extensions_mut().insert(cx.clone());
    }
    if let Some(deadline) = extensions.get::<crate::Deadline>() {
        outgoing.extensions_mut().insert(*deadline);
    }
}

/// The trace context of an incoming request (set by [`ServerTelemetry`]),
/// or an empty context.
pub fn context_of(incoming: &impl HasExtensions) -> Context {
    incoming
        .extensions()
        .get::<Context>()
        .cloned()
        .unwrap_or_default()
}
