//! The server stack: what every request of a mesh service passes through
//! before the application.
//!
//! The order (docs/ARCHITECTURE.md) is TLS accept → peer identity →
//! telemetry span → deadline → authorization → the app. TLS and the peer
//! identity are [`serve_with`](crate::serve::serve_with)'s (a
//! [`PeerIdentity`](crate::tls::PeerIdentity) request extension on mTLS
//! connections); the telemetry span (feature `telemetry`) is
//! [`ServerTelemetryLayer`](crate::telemetry::ServerTelemetryLayer), put
//! outside this layer by [`ServerLayer::telemetry`], so that a request this
//! layer answers itself (an expired deadline, a denial) is traced, counted
//! and logged too. Without the feature the stack is the same minus the
//! span, at the same cost per request. This layer gives the
//! application its place in the mesh: a [`ServerContext`] request
//! extension (the service, namespace and node id,
//! readable with axum's `Extension<ServerContext>` or tonic's
//! `request.extensions()`), the request's [`Deadline`](crate::Deadline)
//! (from `grpc-timeout`, else `x-envoy-expected-rq-timeout-ms`; see
//! [`crate::deadline`]) as an extension for the app to propagate, and
//! optionally an `x-proxyless-served-by` response header naming the node,
//! which makes balancing visible from a client (`curl -i`) without
//! tracing, much as Envoy's `x-envoy-upstream-service-time` makes the proxy
//! visible.
//!
//! A request whose deadline had already passed when it arrived is answered
//! by the layer (`504`, or `DEADLINE_EXCEEDED` for gRPC) without calling
//! the app (under telemetry, with response flag `DT` on the server span,
//! the metrics and the access log). The deadline is not enforced on a
//! running app: the app reads it and passes it on (a gRPC server built with tonic's own transport
//! enforces `grpc-timeout` itself). Responses are wrapped in
//! [`ResponseBody`](crate::ResponseBody) so the layer can answer itself.
//!
//! Authorization ([`ServerLayer::inbound`], or the [`InboundPolicy`] that
//! `serve_with` passes along): Istio's AuthorizationPolicy semantics
//! ([`mesh_core::rbac`]) on the peer's SPIFFE ID, source address, host,
//! port, method, path and headers, as Envoy's RBAC filter (gRFC A41). A
//! denied request gets `403` with a body `RBAC: access denied (policy
//! <ns>/<name>)`, or for gRPC a Trailers-Only `PERMISSION_DENIED` naming the
//! policy; the app is not called. Under STRICT mTLS a request without a
//! verified peer identity is denied whatever the policies say, so an app
//! served without TLS by mistake fails closed. The decision goes on the
//! request's [`DecisionRecord`](crate::telemetry::DecisionRecord)
//! (`mesh.authz.*` span attributes, the access log's
//! `response_code_details`), the 403 into Istio's metrics, and a `tracing`
//! INFO line names the policy.
//!
//! [`serve`](crate::serve()) adds a [`ConnectionInfo`](crate::serve::ConnectionInfo)
//! extension (peer and local address) before this layer runs.

mod future;
mod inbound;
mod layer;
mod service;

use std::fmt;
use std::sync::Arc;

use mesh_core::model::Name;

pub use self::future::ResponseFuture;
pub use self::inbound::{InboundConfig, InboundPolicy};
pub use self::layer::ServerLayer;
pub(crate) use self::service::Guard;
pub use self::service::Server;

/// The response header naming the node that served a request, when
/// [`ServerLayer::served_by_header`] is on.
pub const SERVED_BY: &str = "x-proxyless-served-by";

/// Who is serving: a request extension set by [`ServerLayer`].
#[derive(Clone, PartialEq, Eq)]
pub struct ServerContext {
    inner: Arc<ContextInner>,
}

#[derive(PartialEq, Eq)]
struct ContextInner {
    service: Name,
    namespace: Name,
    node_id: Name,
}

impl ServerContext {
    /// The context of `node_id`, serving `service` in `namespace`.
    pub fn new(
        service: impl Into<Name>,
        namespace: impl Into<Name>,
        node_id: impl Into<Name>,
    ) -> Self {
        ServerContext {
            inner: Arc::new(ContextInner {
                service: service.into(),
                namespace: namespace.into(),
                node_id: node_id.into(),
            }),
        }
    }

    /// The mesh service this process serves (`catalog`).
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// Its namespace (`shop`; `default` when unset).
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// This process's xDS node id.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }
}

impl fmt::Debug for ServerContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerContext")
            .field("service", &self.service())
            .field("namespace", &self.namespace())
            .field("node_id", &self.node_id())
            .finish()
    }
}
