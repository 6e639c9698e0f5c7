//! The tower layers of the proxyless mesh.
//!
//! Client side: [`MeshClient`] routes every request by the name it is
//! addressed to (`http://catalog/items`), against the configuration the
//! control server pushes over xDS, and sends it over pooled hyper
//! connections to the chosen endpoint, keeping the original authority, with
//! the resilience Istio configures (retries with budgets, timeouts and
//! deadline propagation, circuit breaking, outlier detection, fault
//! injection, ring hash, locality failover: see [`mesh`]). The pieces are
//! public for custom stacks: [`MeshLayer`] (routing over any HTTP client)
//! and [`Pool`] (connections keyed by cluster and endpoint).
//!
//! Server side: [`ServerLayer`] (request context and incoming deadline for
//! the app; the place for mTLS, authorization and spans) and [`serve()`]
//! (register with the control server, serve HTTP/1.1 and HTTP/2, deregister
//! and drain on shutdown).
//!
//! Observability: [`telemetry`] — OpenTelemetry spans with the mesh's
//! decision record (`mesh.*` attributes, a child span per attempt), Istio's
//! standard metrics, access logs. `MeshClient::with_telemetry(t)` (or
//! `ClientTelemetryLayer`) on the client, `ServerLayer::telemetry(t)` on
//! the server. Debugging: [`admin`] — the config a workload runs, and CSDS.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_tower::BoxError> {
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use mesh_tower::{MeshClient, Registration, ServerLayer, serve};
//! use mesh_xds_client::{Bootstrap, XdsClient};
//! use tower::{Service, ServiceExt};
//!
//! let xds = XdsClient::start(Bootstrap::from_env()?);
//!
//! // Call a service by its mesh name; the mesh picks route and endpoint.
//! let mut client: MeshClient<Full<Bytes>> = MeshClient::new(xds.clone());
//! let request = http::Request::get("http://catalog/items").body(Full::default())?;
//! let response = client.ready().await?.call(request).await?;
//! let _items = response.into_body().collect().await?.to_bytes();
//!
//! // Serve a service: registered while up, drained on ctrl-c.
//! let app = axum::Router::new()
//!     .route("/items", axum::routing::get(|| async { "[]" }))
//!     .layer(ServerLayer::from_bootstrap(xds.bootstrap(), "catalog"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let registration = Registration::from_bootstrap(xds.bootstrap(), "catalog")?;
//! serve(listener, registration, app)
//!     .await?
//!     .shutdown_on(tokio::signal::ctrl_c())
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! Both are on by default; the `proxyless` facade turns them off and on
//! again through its own features of the same names, so that a service that
//! does not export telemetry does not compile OpenTelemetry and Prometheus.
//!
//! | feature | what it adds | what it brings |
//! |---|---|---|
//! | `telemetry` | the [`telemetry`] layers and exporters: `Telemetry`, `ClientTelemetryLayer`, `ServerTelemetryLayer`, `MetricsRegistry`, OTLP export, access logs, trace context propagation; `MeshClient::with_telemetry`, `ServerLayer::telemetry` | `opentelemetry`, `opentelemetry_sdk`, `opentelemetry-otlp`, `opentelemetry-http`, `prometheus-client` |
//! | `admin` | [`admin`]: `AdminEndpoints`, `serve_admin` (config dump, CSDS; `/metrics` too with `telemetry`) | `axum` |
//!
//! With neither, everything else is here and behaves the same: the client
//! stack (routing, balancing, retries, timeouts, deadlines, breakers,
//! outlier detection, faults), pools, mTLS, the server stack (deadlines,
//! authorization) and `serve`. The request engine reports its decisions
//! into a [`telemetry::DecisionRecord`] in both builds (that type is
//! always compiled; only its span side is not); a request carries one only
//! when a layer above put it there, so a build without the feature pays
//! nothing more per request, and one with it pays nothing more without a
//! telemetry layer.

#[cfg(feature = "admin")]
pub mod admin;
mod balance;
mod body;
mod client;
mod connection;
mod cors;
pub mod deadline;
mod error;
mod grpc;
pub mod local_reply;
pub mod mesh;
mod mirror;
#[cfg(any(feature = "admin", feature = "telemetry"))]
mod operator_port;
pub mod pool;
pub mod ratelimit;
pub mod serve;
pub mod server;
mod source;
mod stats;
pub mod telemetry;
pub mod tls;

pub use body::{DEFAULT_RETRY_BUFFER_LIMIT, MeshBody, ResponseBody};
pub use client::MeshClient;
pub use deadline::Deadline;
pub use error::{BoxError, Error, ErrorKind};
pub use grpc::grpc_status;
pub use mesh::{Mesh, MeshLayer, TargetEndpoint};
pub use pool::Pool;
pub use serve::{ConnectionInfo, Registration, Security, Serving, serve, serve_with};
pub use server::{
    Authorized, InboundConfig, InboundPolicy, ServerBody, ServerContext, ServerLayer,
};
pub use source::{ConfigSource, StaticSource};
pub use stats::MeshStats;
