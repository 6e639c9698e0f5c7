//! The routing middleware: from the name an application dials to one
//! endpoint of one cluster.
//!
//! Per request, as gRPC's xDS client does it (gRFC A27/A28) and in the order
//! Envoy's router applies it:
//!
//! 1. the authority (the URI's, else the `Host` header) selects a listener
//!    of the current [`Snapshot`](mesh_core::Snapshot); a name never asked
//!    about is subscribed to and waited for (bounded by
//!    [`MeshLayer::listener_timeout`], 10 s by default), a name the control
//!    server said does not exist fails at once with
//!    [`ErrorKind::NotFound`](crate::ErrorKind::NotFound);
//! 2. the listener's route table picks the first matching route and one of
//!    its weighted clusters;
//! 3. the cluster's balancer picks an endpoint (round robin, random, or
//!    power-of-two-choices least-request over requests in flight, counted
//!    until the response body ends);
//! 4. the request goes to the inner service with a [`TargetEndpoint`]
//!    extension saying where it must go.
//!
//! A request that cannot be routed returns `Err` (never a made-up `503`), so
//! "no such service" and "the service said 503" stay distinct.
//!
//! Two ways to hand the request on, chosen with [`MeshLayer::rewrite_uri`]:
//!
//! - **rewrite** (the default of [`MeshLayer`]): the URI becomes
//!   `http://<endpoint>/<path?query>` and the original authority moves to the
//!   `Host` header, so any HTTP client (hyper-util's legacy `Client`, reqwest)
//!   works as the inner service. Over HTTP/2 such a client sends the
//!   endpoint address as `:authority` and the service name as `host`.
//! - **keep** (what [`MeshClient`](crate::MeshClient) uses): the URI is left
//!   as written and the inner service dials [`TargetEndpoint::addr`]; the
//!   endpoint sees the original `:authority` (HTTP/2) or `Host` (HTTP/1.1).

mod future;
mod layer;
mod service;

use std::net::SocketAddr;

use mesh_core::model::{Name, Protocol};

pub use self::future::ResponseFuture;
pub use self::layer::MeshLayer;
pub use self::service::Mesh;
pub(crate) use self::service::ensure_authority_in_uri;

/// Where the mesh decided a request goes: a request extension set by
/// [`Mesh`] for the services under it (the connection pool dials it;
/// telemetry can read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetEndpoint {
    addr: SocketAddr,
    protocol: Protocol,
    cluster: Name,
}

impl TargetEndpoint {
    /// An endpoint `addr` of `cluster`, spoken to with `protocol`.
    pub fn new(addr: SocketAddr, protocol: Protocol, cluster: impl Into<Name>) -> Self {
        TargetEndpoint {
            addr,
            protocol,
            cluster: cluster.into(),
        }
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The protocol of the cluster.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The cluster name (`outbound|8080|v1|catalog.shop.svc.cluster.local`).
    pub fn cluster(&self) -> &str {
        &self.cluster
    }
}
