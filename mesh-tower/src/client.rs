//! The mesh client: routing plus pooled connections, in one service.
//!
//! [`MeshClient`] is [`Mesh`] over [`Pool`] with URIs kept as written, so
//! endpoints see the original `:authority` / `Host` (Envoy and gRPC keep
//! it, and servers route virtual hosts by it). It is a
//! `tower::Service<http::Request<B>>` for any streaming body `B`, so it is
//! also a tonic channel:
//!
//! ```no_run
//! # use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient as CatalogClient;
//! # async fn demo(xds_client: mesh_xds_client::XdsClient) -> Result<(), mesh_tower::BoxError> {
//! let channel: mesh_tower::MeshClient<tonic::body::Body> = mesh_tower::MeshClient::new(xds_client);
//! // tonic writes each request's URI from the client's origin: name the
//! // service there (`CatalogClient::new(channel)` sends no name and fails
//! // with `ErrorKind::InvalidRequest`).
//! let mut catalog = CatalogClient::with_origin(channel, "http://catalog".parse()?);
//! # let _ = &mut catalog;
//! # Ok(())
//! # }
//! ```
//!
//! Errors reach tonic as the service error, which tonic reports as a
//! `Status` with code `Unknown` and this crate's message; gRPC statuses from
//! the server (headers or trailers) pass through untouched, and so do the
//! mesh's own answers (breaker overflow `UNAVAILABLE`, deadline
//! `DEADLINE_EXCEEDED`, fault aborts), which are Trailers-Only responses.
//!
//! Resilience (retries, timeouts, deadlines, circuit breaking, outlier
//! detection, fault injection, ring hash, locality failover) is the mesh
//! layer's: see [`crate::mesh`]. [`MeshClient::stats`] counts what it did.

use std::fmt;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tower::{Layer, Service};

use crate::body::{MeshBody, ResponseBody};
use crate::error::{BoxError, Error};
use crate::mesh::{self, Mesh, MeshLayer};
use crate::pool::Pool;
use crate::source::ConfigSource;
use crate::stats::MeshStats;
#[cfg(feature = "telemetry")]
use crate::telemetry::{ClientTelemetry, ClientTelemetryLayer, Telemetry};

/// Sends requests through the mesh: `client.call(Request::get("http://catalog/items")...)`.
///
/// - Routing, balancing and the original authority: see [`crate::mesh`].
/// - Connections: see [`crate::pool`].
/// - A request that cannot be routed fails with [`Error`] (kind `NotFound`,
///   `NoRoute`, `NoEndpoints`, `Timeout`, ...), never with a made-up status.
/// - Bodies stream both ways; response trailers pass through. A request
///   body is kept for retries only when it is whole and small when sent
///   (see [`MeshBody`]).
///
/// Cheap to clone; clones share the configuration, the cluster state
/// (balancing, breakers, outlier detection), the stats and the
/// connections. One client sends one request body type `B`
/// (`tonic::body::Body` for tonic, [`Full<Bytes>`] by default).
pub struct MeshClient<B = Full<Bytes>, Src = mesh_xds_client::XdsClient> {
    inner: Mesh<Pool<MeshBody<B>>, Src>,
}

impl<B, Src: ConfigSource> MeshClient<B, Src> {
    /// A client routing with `source`'s configuration, with default
    /// settings (10 s listener wait, 10 s connect timeout).
    pub fn new(source: Src) -> Self {
        Self::from_parts(MeshLayer::new(source), Pool::new())
    }

    /// A client from a configured layer and pool. The layer's URI rewriting
    /// is turned off: the pool dials the chosen endpoint itself.
    pub fn from_parts(layer: MeshLayer<Src>, pool: Pool<MeshBody<B>>) -> Self {
        MeshClient {
            inner: layer.rewrite_uri(false).layer(pool),
        }
    }

    /// This client with the workload's certificates: clusters that require
    /// mTLS (DestinationRule `tls.mode: ISTIO_MUTUAL`, CDS `tls`) are
    /// reached over mTLS presenting `store`'s certificate (rotations apply
    /// to new connections), the server's SPIFFE ID checked against the
    /// cluster's identities. Without it such clusters are answered `503`
    /// naming the fix. Plaintext clusters are unaffected. Get the store
    /// from [`WorkloadCertificates`](crate::tls::WorkloadCertificates).
    pub fn with_certificates(mut self, store: crate::tls::CertStore) -> Self {
        self.inner.set_certificates(store);
        self
    }

    /// The configuration source.
    pub fn source(&self) -> &Src {
        self.inner.source()
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool<MeshBody<B>> {
        self.inner.get_ref()
    }

    /// What the client did to requests (retries, overflows, ejections,
    /// timeouts, faults), shared by its clones.
    pub fn stats(&self) -> &MeshStats {
        self.inner.stats()
    }

    /// This client under [`ClientTelemetry`] reporting as `telemetry`'s
    /// service (the same as `ClientTelemetryLayer::new(telemetry).layer(client)`):
    /// a CLIENT span per call with the mesh's decision record as `mesh.*`
    /// attributes and a child span per attempt, `traceparent` sent on,
    /// Istio's metrics with `reporter="source"`, an access log line; see
    /// [`crate::telemetry`]. Feature `telemetry`.
    ///
    /// ```no_run
    /// # async fn demo(xds: mesh_xds_client::XdsClient) -> Result<(), mesh_tower::BoxError> {
    /// use mesh_tower::MeshClient;
    /// use mesh_tower::telemetry::{Identity, Telemetry};
    ///
    /// let telemetry = Telemetry::from_env(Identity::from_bootstrap(xds.bootstrap(), "frontend"))?;
    /// let client = MeshClient::<http_body_util::Full<bytes::Bytes>>::new(xds).with_telemetry(telemetry);
    /// # let _ = client;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "telemetry")]
    pub fn with_telemetry(self, telemetry: Telemetry) -> ClientTelemetry<Self> {
        ClientTelemetryLayer::new(telemetry).layer(self)
    }
}

impl<B> MeshClient<B, mesh_xds_client::XdsClient> {
    /// A client for the mesh described by the gRPC xDS bootstrap in the
    /// environment (`GRPC_XDS_BOOTSTRAP` / `GRPC_XDS_BOOTSTRAP_CONFIG`):
    /// starts the xDS client (needs a tokio runtime).
    pub fn from_env() -> Result<Self, Error> {
        let bootstrap = mesh_xds_client::Bootstrap::from_env().map_err(|e| {
            Error::new(crate::ErrorKind::Discovery, "cannot read the xDS bootstrap").with_source(e)
        })?;
        Ok(Self::from_bootstrap(bootstrap))
    }

    /// A client for the mesh described by `bootstrap` (built in code, or
    /// read with [`mesh_xds_client::Bootstrap::from_json`]): starts the xDS
    /// client (needs a tokio runtime). Several clients of one process should
    /// share one [`mesh_xds_client::XdsClient`] through [`MeshClient::new`].
    pub fn from_bootstrap(bootstrap: mesh_xds_client::Bootstrap) -> Self {
        Self::new(mesh_xds_client::XdsClient::start(bootstrap))
    }
}

impl<B, Src: Clone> Clone for MeshClient<B, Src> {
    fn clone(&self) -> Self {
        MeshClient {
            inner: self.inner.clone(),
        }
    }
}

impl<B, Src> fmt::Debug for MeshClient<B, Src> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClient")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<B, Src> Service<Request<B>> for MeshClient<B, Src>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    Src: ConfigSource,
{
    type Response = Response<ResponseBody<Incoming>>;
    type Error = Error;
    type Future = mesh::ResponseFuture<Pool<MeshBody<B>>, B, Incoming>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.inner.call(req)
    }
}
