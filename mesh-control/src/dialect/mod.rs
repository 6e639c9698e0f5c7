//! What each kind of xDS client is sent: one config, several dialects.
//!
//! The shared resources (`Served::resources`, through a client's view) are
//! encoded once in the shape gRPC proxyless clients and this mesh's client
//! read (see `mesh_core::xds`). Envoy reads xDS its own way: it rejects
//! `wrr_locality` around round robin, needs listeners with an address and
//! filter chains (it has no API listener), and loads certificates through
//! SDS, not certificate provider instances. gRPC clients accept only EDS,
//! LOGICAL_DNS and aggregate clusters (gRFC A37). Each module here turns
//! the shared resources into one client kind's dialect; `crate::compat`
//! says what each kind ignores of what it is sent.
//!
//! - [`envoy`]: Envoy as a sidecar (an outbound listener), clusters with
//!   `lb_policy` and locality weighting, TLS through SDS.
//! - [`gateway`]: Envoy as an ingress gateway (Istio `Gateway`).
//! - [`grpc`]: gRPC proxyless clients.

pub(crate) mod envoy;
pub(crate) mod gateway;
pub(crate) mod grpc;

/// The SDS secret with a workload's own certificate and key (Istio's name).
pub(crate) const SDS_WORKLOAD_CERT: &str = "default";
/// The SDS secret with the mesh trust bundle (Istio's name).
pub(crate) const SDS_ROOT_CA: &str = "ROOTCA";
/// The SDS type URL (`envoy.extensions.transport_sockets.tls.v3.Secret`).
pub(crate) const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
