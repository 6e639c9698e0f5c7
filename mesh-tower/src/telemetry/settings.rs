//! A service's telemetry: who it is, where its spans and metrics go.

use std::sync::Arc;

use http::HeaderValue;
use opentelemetry::InstrumentationScope;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use super::identity::{Identity, PeerRef, ServiceLabels};
use super::incoming::TraceMode;
use super::metrics::MetricsRegistry;
use super::otel::{self, OtelConfig, Sampling};
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
    /// What the tracer can do, decided once here (see `incoming.rs`).
    pub(crate) trace_mode: TraceMode,
    pub(crate) metrics: Option<MetricsRegistry>,
    pub(crate) access_log: bool,
}

/// Builds a [`Telemetry`].
#[derive(Debug)]
pub struct TelemetryBuilder {
    identity: Identity,
    provider: Option<SdkTracerProvider>,
    sampling: Option<Sampling>,
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
            sampling: None,
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
    /// [`Identity::resource`] as its resource). The layers assume it may
    /// sample any request unless told otherwise with
    /// [`TelemetryBuilder::sampling`].
    pub fn tracer_provider(mut self, provider: SdkTracerProvider) -> Self {
        self.provider = Some(provider);
        self.sampling = None;
        self
    }

    /// Tells the layers how the provider given to
    /// [`TelemetryBuilder::tracer_provider`] samples ([`otel`](Self::otel)
    /// and [`otel_env`](Self::otel_env) know it without this), so that they
    /// skip per request what that sampling rules out.
    ///
    /// With a sampling that never samples ([`Sampling::AlwaysOff`], or a
    /// ratio of 0) no span can be recorded, so the server side neither
    /// parses the caller's trace context nor starts an unsampled span per
    /// request: it keeps the trace headers as received and builds the
    /// context only when the request's handler makes a call under
    /// [`ClientTelemetry`](super::ClientTelemetry) (or asks for it with
    /// [`context_of`](super::context_of) or [`propagate`](super::propagate)),
    /// so the mesh still continues the trace. The request then carries no
    /// `opentelemetry::Context` extension and none is current while the
    /// handler runs: the application's own OpenTelemetry code reads the
    /// context with [`context_of`](super::context_of). The client side
    /// mints unsampled span contexts itself (random ids, the SDK's
    /// generator) instead of asking the sampler.
    ///
    /// The provider must sample as declared: declaring `AlwaysOff` for one
    /// that samples loses its server spans. Call it after
    /// `tracer_provider`, which forgets what was declared for a previous
    /// provider.
    pub fn sampling(mut self, sampling: Sampling) -> Self {
        self.sampling = Some(sampling);
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
            self.sampling = Some(config.sampling());
        }
        Ok(self)
    }

    /// Counts Istio's request metrics into `registry`.
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        self.metrics = Some(registry.clone());
        self
    }

    /// Logs one JSON line per request (target [`ACCESS_LOG_TARGET`](super::ACCESS_LOG_TARGET), level
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
        let trace_mode = match (&tracer, self.sampling) {
            (None, _) => TraceMode::PassThrough,
            (Some(_), Some(sampling)) if sampling.never_samples() => TraceMode::Forward,
            (Some(_), _) => TraceMode::Record,
        };
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
                trace_mode,
                metrics: self.metrics,
                access_log: self.access_log,
            }),
        }
    }
}
