//! [`TargetEndpoint`]: where a request goes, as the mesh layer decided and
//! the pool dials it.
//!
//! It lives with the pool, the lower of the two layers that share it, so
//! that imports run down the layering (docs/ARCHITECTURE.md,
//! "Conventions"): the mesh layer above sets it, the pool reads it.

use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use mesh_core::model::{Name, Protocol};

use super::{ClusterConnections, ConnectionPolicy};

/// A request body that can carry its request's [`TargetEndpoint`].
///
/// Why the body: a target put in the request's extensions costs, on a
/// request without extensions (the usual client request), three
/// allocations (the map's box, its table, the value's box) and a hash
/// insert, about 700 instructions per request with the frees; a field of
/// the body the mesh builds anyway costs a move. [`TargetEndpoint::of`]
/// reads the body's target, else a `TargetEndpoint` extension, so both
/// ways of setting a target reach the [`Pool`](super::Pool).
///
/// The bodies of `http-body-util` and hyper's `Incoming` carry none (their
/// requests set a `TargetEndpoint` extension to go through the pool); a
/// body type of an application's own sent through the pool implements it
/// with the provided method: `impl CarriesTarget for MyBody {}`.
pub trait CarriesTarget {
    /// The target this body carries, if any.
    fn target(&self) -> Option<&TargetEndpoint> {
        None
    }
}

// Bodies that carry no target: their requests name it in an extension.
impl<D> CarriesTarget for http_body_util::Full<D> {}
impl<D> CarriesTarget for http_body_util::Empty<D> {}
impl<D, E> CarriesTarget for http_body_util::combinators::BoxBody<D, E> {}
impl<D, E> CarriesTarget for http_body_util::combinators::UnsyncBoxBody<D, E> {}
impl<S> CarriesTarget for http_body_util::StreamBody<S> {}
impl CarriesTarget for hyper::body::Incoming {}
impl CarriesTarget for String {}

/// Where the mesh decided a request goes: set by [`Mesh`](crate::Mesh) on
/// each request it sends to the service under it, in the
/// [`MeshBody`](crate::MeshBody), and found with [`TargetEndpoint::of`]
/// (the connection pool dials it). An application's own layer above the
/// pool sets one as a request extension.
///
/// Two targets are equal when they name the same address, protocol and
/// cluster.
#[derive(Clone)]
pub struct TargetEndpoint {
    addr: SocketAddr,
    /// The cluster's name, protocol and connection settings behind one
    /// pointer: the target rides in every request's
    /// [`MeshBody`](crate::MeshBody), and the mesh's future holds that body, so each
    /// byte here is copied each time the future moves (40 bytes, not the
    /// 64 of a name, a protocol and a second pointer held inline); the
    /// mesh layer sets it with one reference count, not two.
    cluster: ClusterConnections,
}

/// What a [`TargetEndpoint`] says of its cluster: shared by all the
/// targets the mesh layer sets for the cluster (built once per cluster
/// update), made for each target built with [`TargetEndpoint::new`].
#[derive(Debug)]
pub(crate) struct TargetCluster {
    pub(crate) name: Name,
    pub(crate) protocol: Protocol,
    /// The cluster's connection limits and settings for the pool. `None`
    /// when built with [`TargetEndpoint::new`]: the pool's defaults,
    /// plaintext.
    pub(crate) policy: Option<ConnectionPolicy>,
}

impl TargetEndpoint {
    /// Where `req` must go, as the mesh layer decided: the target its body
    /// carries, else its `TargetEndpoint` extension. The way for a service
    /// under [`MeshLayer`](crate::MeshLayer) to find the endpoint (the
    /// [`Pool`](super::Pool) reads it so); `None` for a request that did
    /// not come through the mesh layer.
    pub fn of<B: CarriesTarget>(req: &Request<B>) -> Option<&TargetEndpoint> {
        match req.body().target() {
            Some(target) => Some(target),
            None => req.extensions().get::<TargetEndpoint>(),
        }
    }

    /// An endpoint `addr` of `cluster`, spoken to with `protocol`.
    pub fn new(addr: SocketAddr, protocol: Protocol, cluster: impl Into<Name>) -> Self {
        TargetEndpoint {
            addr,
            cluster: ClusterConnections(Arc::new(TargetCluster {
                name: cluster.into(),
                protocol,
                policy: None,
            })),
        }
    }

    /// The target the mesh layer sets: an endpoint of the cluster whose
    /// name, protocol and connection settings `cluster` holds.
    pub(crate) fn with_connections(addr: SocketAddr, cluster: &ClusterConnections) -> Self {
        TargetEndpoint {
            addr,
            cluster: cluster.clone(),
        }
    }

    /// The cluster's connection limits and settings, when the mesh layer
    /// set them.
    pub(crate) fn connections(&self) -> Option<&ConnectionPolicy> {
        self.cluster.0.policy.as_ref()
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The protocol of the cluster.
    pub fn protocol(&self) -> Protocol {
        self.cluster.0.protocol
    }

    /// The cluster name (`outbound|8080|v1|catalog.shop.svc.cluster.local`).
    pub fn cluster(&self) -> &str {
        &self.cluster.0.name
    }

    pub(crate) fn cluster_name(&self) -> &Name {
        &self.cluster.0.name
    }
}

impl PartialEq for TargetEndpoint {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
            && self.protocol() == other.protocol()
            && self.cluster() == other.cluster()
    }
}

impl Eq for TargetEndpoint {}

impl std::fmt::Debug for TargetEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetEndpoint")
            .field("addr", &self.addr)
            .field("protocol", &self.protocol())
            .field("cluster", &self.cluster())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http::Request;
    use http_body_util::Full;
    use mesh_core::model::Protocol;

    use super::{CarriesTarget, TargetEndpoint};

    fn target(port: u16) -> TargetEndpoint {
        TargetEndpoint::new(
            SocketAddr::from(([10, 0, 0, 1], port)),
            Protocol::Http2,
            "c",
        )
    }

    /// A body that carries its target, as the mesh's own does.
    struct Carrying(TargetEndpoint);

    impl CarriesTarget for Carrying {
        fn target(&self) -> Option<&TargetEndpoint> {
            Some(&self.0)
        }
    }

    /// `of` reads the body's target first, else the extension; a request
    /// with neither has none.
    #[test]
    fn of_reads_the_body_then_the_extension() {
        let mut req = Request::new(Full::new(Bytes::new()));
        assert_eq!(TargetEndpoint::of(&req), None);
        req.extensions_mut().insert(target(1));
        assert_eq!(TargetEndpoint::of(&req), Some(&target(1)));
        let mut req = Request::new(Carrying(target(2)));
        assert_eq!(TargetEndpoint::of(&req), Some(&target(2)));
        req.extensions_mut().insert(target(1));
        assert_eq!(
            TargetEndpoint::of(&req),
            Some(&target(2)),
            "the body's target wins"
        );
    }
}
