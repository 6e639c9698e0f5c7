//! The server stack: what every request of a mesh service passes through
//! before the application.
//!
//! The order (docs/ARCHITECTURE.md) is TLS accept → peer identity →
//! telemetry span → deadline → CORS → local rate limit → authorization →
//! the app. CORS comes first of the policies, as Istio's inbound HTTP
//! filter chain puts the `cors` filter before `local_ratelimit` and RBAC:
//! a browser's preflight from an allowed origin (VirtualService
//! `corsPolicy`) is answered by the layer and reaches neither the limiter,
//! the authorization policies nor the app (see `crate::cors`). TLS and the peer
//! identity are [`serve_with`](crate::serve::serve_with)'s (a
//! [`PeerIdentity`](crate::tls::PeerIdentity) request extension on mTLS
//! connections); the telemetry span (feature `telemetry`) is
//! [`ServerTelemetryLayer`](crate::telemetry::ServerTelemetryLayer), put
//! outside this layer by [`ServerLayer::telemetry`], so that a request this
//! layer answers itself (an expired deadline, a denial) is traced, counted
//! and logged too. Without the feature the stack is the same minus the
//! span, at the same cost per request. This layer gives the
//! application its place in the mesh: a [`ServerContext`] request
//! extension (the service, namespace and node id, and the request's
//! authorization decision, [`ServerContext::authorized`];
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
//! [`ServerBody`] so the layer can answer itself (not in the client's
//! [`ResponseBody`](crate::ResponseBody), four times larger with what only
//! a client's response needs).
//!
//! Authorization: Istio's AuthorizationPolicy semantics
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
//! # Who authorizes: fail closed by construction
//!
//! [`serve_with`](crate::serve::serve_with) authorizes **every** request
//! itself, once, under its [`InboundPolicy`], before the app (whatever the
//! app is made of) sees it. A request it allows carries the decision as an
//! [`Authorized`] extension (which policy instance decided, the deciding
//! AuthorizationPolicy, why, and the dry-run result); a `ServerLayer`
//! records that decision on the request's record, span and metrics, and
//! never turns a check off. A `ServerLayer` with a policy of its own
//! ([`ServerLayer::inbound`]) uses the decision only when that same policy
//! made it for this very request; otherwise (no `serve_with`, a different
//! policy, a plain `serve`) it authorizes by itself. Either way it passes
//! the decision on inside the request's [`ServerContext`] (not as a second
//! extension: each costs an allocation and a map insert, and a fourth
//! makes the map grow); [`Authorized::of`] reads a request's decision
//! wherever it is. So a request reaches the app only if a check ran for
//! it:
//!
//! - routes merged after `.layer(...)`, nested routers, a second tonic
//!   service, a layer built but never applied: `serve_with` checked them;
//! - a `ServerLayer` served without `serve_with`: it checked them.
//!
//! Why not let one layer switch the other off (a "layered" flag on the
//! policy, as before)? Because whether a layer wraps a given route is a
//! property of how the app was assembled, not of the policy: a flag set by
//! one wrapped route (or by building a layer) turned authorization off for
//! every unwrapped one. A per-request decision answers the only question
//! that matters, "was *this* request checked?", and costs one extension
//! insert per request `serve_with` allows (none without policies), none
//! in a `ServerLayer` (it rides in the context); evaluating once also
//! keeps `InboundPolicy::denied` and the logs exact.
//!
//! A config whose policies read nothing of a request but its peer's
//! identity (principals, namespaces; no ip blocks, operations or request
//! conditions) and has no dry-run policy decides every request of one peer
//! alike, so it remembers its decisions per peer (set-once slots, a SPIFFE
//! ID comparison per request); any other config evaluates every request.
//! On top of that, each `ServerLayer` service and `serve_with`'s check (a
//! service, cloned per connection) keeps the last such decision it allowed:
//! the next request of that peer under that config gets it for two pointer
//! comparisons, without evaluating or looking for an earlier decision (it
//! is the one any check of this policy made under this config).
//!
//! Requests `serve_with` refuses never reach the app's
//! [`ServerTelemetryLayer`](crate::telemetry::ServerTelemetryLayer): give
//! `serve_with` the same telemetry (`Security::telemetry`, feature
//! `telemetry`) and they get the same span, metrics and access log line.
//! Each request is reported by exactly one of the two, so nothing is
//! counted twice and no marker is needed.
//!
//! # Dry-run policies
//!
//! An AuthorizationPolicy in dry-run (`istio.io/dry-run: "true"`,
//! [`AuthorizationPolicy::is_dry_run`](mesh_core::rbac::AuthorizationPolicy::is_dry_run))
//! is evaluated beside the enforced ones, as Envoy evaluates RBAC
//! `shadow_rules`, and never changes a response. What it would have
//! decided is reported: on the span with Istio's tags
//! `istio.authorization.dry_run.{allow,deny}_policy.{name,result}` (result
//! `allowed` / `denied`), in the counter `mesh_authz_dry_run_total{action,
//! result, policy}`, in the access log, and as a `tracing` INFO line when it
//! would have denied. A config without dry-run policies pays nothing for
//! this ([`InboundConfig::has_dry_run`] is computed once per config).
//!
//! [`serve`](crate::serve()) adds a [`ConnectionInfo`](crate::serve::ConnectionInfo)
//! extension (peer and local address) before this layer runs.

mod body;
mod future;
mod inbound;
mod layer;
mod service;

use std::fmt;
use std::sync::Arc;

use mesh_core::model::Name;

pub use self::body::ServerBody;
pub use self::future::ResponseFuture;
pub use self::inbound::{InboundConfig, InboundPolicy};
pub use self::layer::ServerLayer;
pub(crate) use self::service::Guard;
pub use self::service::Server;
pub use crate::connection::Authorized;

/// The response header naming the node that served a request, when
/// [`ServerLayer::served_by_header`] is on.
pub const SERVED_BY: &str = "x-proxyless-served-by";

/// Who is serving: a request extension set by [`ServerLayer`].
///
/// On a request it also carries the authorization decision the request
/// was let in with ([`ServerContext::authorized`]): the layer passes that
/// on inside this one extension rather than as a second one, since every
/// request extension costs an allocation, a map insert and a free, and a
/// fourth makes the map grow. Two contexts are equal when they name the
/// same service, namespace and node, whatever decision they carry.
#[derive(Clone)]
pub struct ServerContext {
    inner: Arc<ContextInner>,
    /// The decision the request was let in with (`None` outside a
    /// request, or when nothing was decided: no policy applies).
    authorized: Option<Authorized>,
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
            authorized: None,
        }
    }

    /// This context on a request let in with `authorized`.
    pub(crate) fn on_request(&self, authorized: Option<Authorized>) -> Self {
        ServerContext {
            inner: Arc::clone(&self.inner),
            authorized,
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

    /// The authorization decision the request was let in with, whoever
    /// made it ([`serve_with`](crate::serve::serve_with) or a
    /// [`ServerLayer`] with a policy); `None` when no policy decided it
    /// (none applies, or the context is not a request's). The same as
    /// [`Authorized::of`] on the request.
    pub fn authorized(&self) -> Option<&Authorized> {
        self.authorized.as_ref()
    }
}

impl PartialEq for ServerContext {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) || self.inner == other.inner
    }
}

impl Eq for ServerContext {}

impl fmt::Debug for ServerContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerContext")
            .field("service", &self.service())
            .field("namespace", &self.namespace())
            .field("node_id", &self.node_id())
            .finish()
    }
}
