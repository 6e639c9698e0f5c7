//! [`TargetEndpoint`]: where a request goes, as the mesh layer decided and
//! the pool dials it.
//!
//! It lives with the pool, the lower of the two layers that share it, so
//! that imports run down the layering (docs/ARCHITECTURE.md,
//! "Conventions"): the mesh layer above sets it, the pool reads it.

use std::net::SocketAddr;

use mesh_core::model::{Name, Protocol};

use super::ClusterConnections;

/// Where the mesh decided a request goes: a request extension set by
/// [`Mesh`](crate::Mesh) for the services under it (the connection pool dials it;
/// telemetry can read it).
///
/// Two targets are equal when they name the same address, protocol and
/// cluster.
#[derive(Clone)]
pub struct TargetEndpoint {
    addr: SocketAddr,
    protocol: Protocol,
    cluster: Name,
    /// The cluster's connection limits and settings for the pool, carried
    /// here rather than in an extension of their own (one extension insert
    /// and lookup per request instead of two). `None` when built with
    /// [`TargetEndpoint::new`]: the pool's defaults, plaintext.
    connections: Option<ClusterConnections>,
}

impl TargetEndpoint {
    /// An endpoint `addr` of `cluster`, spoken to with `protocol`.
    pub fn new(addr: SocketAddr, protocol: Protocol, cluster: impl Into<Name>) -> Self {
        TargetEndpoint {
            addr,
            protocol,
            cluster: cluster.into(),
            connections: None,
        }
    }

    /// The target the mesh layer sets: with its cluster's connection
    /// settings for the pool.
    pub(crate) fn with_connections(
        addr: SocketAddr,
        protocol: Protocol,
        cluster: Name,
        connections: ClusterConnections,
    ) -> Self {
        TargetEndpoint {
            addr,
            protocol,
            cluster,
            connections: Some(connections),
        }
    }

    /// The cluster's connection limits and settings, when the mesh layer
    /// set them.
    pub(crate) fn connections(&self) -> Option<&ClusterConnections> {
        self.connections.as_ref()
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

    pub(crate) fn cluster_name(&self) -> &Name {
        &self.cluster
    }
}

impl PartialEq for TargetEndpoint {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr && self.protocol == other.protocol && self.cluster == other.cluster
    }
}

impl Eq for TargetEndpoint {}

impl std::fmt::Debug for TargetEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetEndpoint")
            .field("addr", &self.addr)
            .field("protocol", &self.protocol)
            .field("cluster", &self.cluster)
            .finish()
    }
}
