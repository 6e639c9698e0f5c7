//! # proxyless — a service mesh that lives in your process
//!
//! Istio's routing (canary splits, header and path matches, subsets, load
//! balancing) for Rust services, without a sidecar: a tower client stack
//! routes every call in-process, configured over Envoy v3 xDS by a small
//! control server that reads the Istio YAML you already know. gRPC's
//! proxyless clients (`xds:///` targets in grpc-go, grpc-java, grpcio) read
//! the same config from the same control server.
//!
//! - Call services: [`Client`] (or [`MeshLayer`] over your own HTTP client).
//! - Serve: [`ServerLayer`] on your axum/tonic app, [`serve`] to register,
//!   heartbeat and drain.
//! - Run the control server: `mesh-control serve --config DIR`, or embed it
//!   ([`control::Server::builder`]).
//!
//! The four crates are re-exported whole for custom stacks:
//! [`core`] (model, matching, balancing, xDS conversion), [`xds`] (the ADS
//! client and bootstrap), [`layers`] (the tower layers) and [`control`].

pub use mesh_control as control;
pub use mesh_core as core;
pub use mesh_tower as layers;
pub use mesh_xds_client as xds;

pub use mesh_tower::{
    ConfigSource, Error, ErrorKind, MeshLayer, Registration, ResponseBody, ServerContext,
    ServerLayer, Serving, TargetEndpoint, grpc_status, serve,
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
