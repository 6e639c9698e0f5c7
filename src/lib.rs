#![doc = include_str!("../README.md")]
//!
//! # The API at a glance
//!
//! - Call services: [`Client`] (or [`MeshLayer`] over your own HTTP client).
//! - Serve: [`ServerLayer`] on your axum/tonic app, [`serve()`] to register,
//!   heartbeat and drain.
//! - Zero trust: [`WorkloadCertificates`] gets the workload's SPIFFE
//!   certificate (mesh-control's CA with a join token, or files written by
//!   SPIRE or cert-manager) and renews it; [`Client::with_certificates`]
//!   speaks mTLS to the clusters whose DestinationRule (or STRICT
//!   PeerAuthentication) asks for it; [`serve_with`] accepts under the
//!   PeerAuthentication mode mesh-control sends for the listening port
//!   ([`InboundPolicy`], gRFC A36), and [`ServerLayer::inbound`] enforces
//!   the AuthorizationPolicies (403 / `PERMISSION_DENIED`). The verified
//!   caller is the request's [`PeerIdentity`] extension.
//! - Run the control server: `mesh-control serve --config DIR`, or embed it
//!   ([`control::Server::builder`], feature `control`).
//! - Observe (feature `telemetry`): [`telemetry`] — an OpenTelemetry span
//!   per call and per request served, with the mesh's decision record
//!   (`mesh.route`, `mesh.cluster`, `mesh.endpoint`, `mesh.lb_policy`,
//!   config versions, retries, timeouts, breaker and outlier decisions,
//!   faults) and a child span per attempt; Istio's standard Prometheus
//!   metrics; access logs. Each service gets its own [`Telemetry`] (its
//!   own `service.name`, no global provider).
//! - Debug (feature `admin`): [`serve_admin`] serves the config the service
//!   runs (`/debug/mesh/config`), CSDS for `grpcdebug`, and `/metrics` when
//!   given a registry (which needs `telemetry`).
//!
//! The four crates are re-exported whole for custom stacks:
//! [`mesh_core`] (model, matching, balancing, xDS conversion; under its own
//! name so that `use proxyless::*` does not shadow Rust's `core`), [`xds`]
//! (the ADS client and bootstrap), [`layers`] (the tower layers) and
//! [`control`].
//!
//! # Features, with links to the API
//!
//! All on by default. A service that only calls and serves through the mesh
//! can depend on `proxyless = { version = "0.1", default-features = false }`
//! and turn on what it uses: each feature exists because it brings a
//! dependency tree of its own that a lean service need not compile.
//!
//! | feature | adds | brings | why optional |
//! |---|---|---|---|
//! | `control` | [`control`] (mesh-control: the xDS control server, embeddable) | saphyr, notify, clap, tracing-subscriber, prometheus-client | a workload talks to a control server, it does not run one (tests and demos embed it) |
//! | `telemetry` | [`telemetry`], [`Telemetry`], [`ClientTelemetryLayer`], [`ServerTelemetryLayer`], [`TracedClient`], `Client::with_telemetry`, `ServerLayer::telemetry`, `AdminEndpoints::metrics` | opentelemetry, opentelemetry_sdk, opentelemetry-otlp, opentelemetry-http, prometheus-client | the largest tree; a service that exports no spans or metrics does not need it |
//! | `admin` | [`AdminEndpoints`], [`AdminServer`], [`serve_admin`] | axum (which tonic's `router` feature brings today anyway) | an opt-in debug port, not every service wants it compiled in; does not imply `telemetry`: the config dump and CSDS need neither OpenTelemetry nor Prometheus (without `telemetry`, `/metrics` answers 404 naming the feature) |
//!
//! Always there, whatever the features: [`Client`] and [`MeshLayer`] (routing,
//! balancing, retries, timeouts, deadlines, circuit breaking, outlier
//! detection, fault injection), mTLS ([`WorkloadCertificates`],
//! [`Client::with_certificates`], [`serve_with`]), [`ServerLayer`]
//! (deadlines, authorization) and [`serve()`]. Leaving `telemetry` out costs
//! nothing per request: the request engine still writes its decision record
//! (`layers::telemetry::DecisionRecord`) when a layer above asks for one,
//! and without such a layer no request carries one, in either build.

#[cfg(feature = "control")]
pub use mesh_control as control;
pub use mesh_core;
pub use mesh_tower as layers;
pub use mesh_xds_client as xds;

#[cfg(feature = "admin")]
pub use mesh_tower::admin::{AdminEndpoints, AdminServer, serve_admin};
#[cfg(feature = "telemetry")]
pub use mesh_tower::telemetry;
#[cfg(feature = "telemetry")]
pub use mesh_tower::telemetry::{ClientTelemetryLayer, ServerTelemetryLayer, Telemetry};
pub use mesh_tower::tls::{CertStore, PeerIdentity, WorkloadCertificates};
pub use mesh_tower::{
    Authorized, ConfigSource, ConnectionInfo, Error, ErrorKind, InboundConfig, InboundPolicy,
    MeshLayer, Registration, ResponseBody, Security, ServerBody, ServerContext, ServerLayer,
    Serving, TargetEndpoint, grpc_status, serve, serve_with,
};
pub use mesh_tower::{Deadline, MeshStats};
pub use mesh_xds_client::{Bootstrap, XdsClient};

/// The mesh HTTP client: a `tower::Service<http::Request<B>>` that routes by
/// the name a request is addressed to (`http://catalog/items`), picks a
/// weighted destination and an endpoint, and sends over pooled HTTP/1.1 or
/// HTTP/2 connections. For tonic, use `Client<tonic::body::Body>` with
/// `SomeClient::with_origin(client, "http://payment".parse()?)`.
///
/// `Client::from_env()` reads the gRPC xDS bootstrap named by
/// `GRPC_XDS_BOOTSTRAP` (or inline in `GRPC_XDS_BOOTSTRAP_CONFIG`);
/// `Client::new(xds_client)` shares one xDS client between several clients.
pub type Client<B = http_body_util::Full<bytes::Bytes>> = mesh_tower::MeshClient<B>;

/// A [`Client`] under telemetry (`Client::new(xds).with_telemetry(t)`): a
/// CLIENT span per call carrying the mesh's decision record, a child span
/// per attempt, Istio's metrics with `reporter="source"`. Feature
/// `telemetry`.
#[cfg(feature = "telemetry")]
pub type TracedClient<B = http_body_util::Full<bytes::Bytes>> =
    mesh_tower::telemetry::ClientTelemetry<Client<B>>;
