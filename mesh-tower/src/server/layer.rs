use http::HeaderValue;
use tower::Layer;
#[cfg(feature = "telemetry")]
use tower::layer::util::Stack;

use super::{InboundPolicy, Server, ServerContext};
#[cfg(feature = "telemetry")]
use crate::telemetry::{ServerTelemetryLayer, Telemetry};

/// The server stack as a tower layer (see the [module docs](crate::server)).
#[derive(Debug, Clone)]
pub struct ServerLayer {
    context: ServerContext,
    served_by: Option<HeaderValue>,
    inbound: Option<InboundPolicy>,
}

impl ServerLayer {
    /// A layer giving requests `context`.
    pub fn new(context: ServerContext) -> Self {
        ServerLayer {
            context,
            served_by: None,
            inbound: None,
        }
    }

    /// A layer for the node described by `bootstrap`, serving `service`.
    pub fn from_bootstrap(bootstrap: &mesh_xds_client::Bootstrap, service: &str) -> Self {
        ServerLayer::new(ServerContext::new(
            service,
            bootstrap.namespace(),
            bootstrap.node_id(),
        ))
    }

    /// Adds an `x-proxyless-served-by: <node id>` header to every response
    /// (off by default). Node ids that are not valid header values are
    /// left out.
    pub fn served_by_header(mut self, on: bool) -> Self {
        self.served_by = if on {
            HeaderValue::from_str(self.context.node_id()).ok()
        } else {
            None
        };
        self
    }

    /// Authorizes every request under `policy` (see the
    /// [module docs](crate::server)): under STRICT a request without a
    /// verified [`PeerIdentity`](crate::tls::PeerIdentity) is denied, and
    /// the policy's AuthorizationPolicies decide the rest; denied requests
    /// get 403 / `PERMISSION_DENIED` naming the policy and never reach the
    /// app. A request that [`serve_with`](crate::serve::serve_with) already
    /// authorized under this same policy is not evaluated again (its
    /// [`Authorized`](crate::Authorized) decision is recorded); any other
    /// request is authorized here. Without this the layer checks nothing
    /// itself and records the decision `serve_with` made, if any.
    pub fn inbound(mut self, policy: InboundPolicy) -> Self {
        self.inbound = Some(policy);
        self
    }

    /// The context given to requests.
    pub fn context(&self) -> &ServerContext {
        &self.context
    }

    /// This layer under a [`ServerTelemetryLayer`] reporting as
    /// `telemetry`'s service: the stack becomes telemetry span → deadline
    /// → (authorization) → the app, the order of docs/ARCHITECTURE.md, so a
    /// request the server stack answers itself (an expired deadline:
    /// response flag `DT`; a denied one) is still traced, counted and
    /// logged. Feature `telemetry`.
    ///
    /// ```no_run
    /// # fn demo(bootstrap: &mesh_xds_client::Bootstrap, t: mesh_tower::telemetry::Telemetry) {
    /// use mesh_tower::ServerLayer;
    /// let app: axum::Router = axum::Router::new()
    ///     .route("/items", axum::routing::get(|| async { "[]" }))
    ///     .layer(ServerLayer::from_bootstrap(bootstrap, "catalog").telemetry(t));
    /// # }
    /// ```
    ///
    /// The same as `.layer(ServerLayer::..).layer(ServerTelemetryLayer::new(t))`
    /// (with axum and tower's `ServiceBuilder`, a later layer is an outer one).
    #[cfg(feature = "telemetry")]
    pub fn telemetry(self, telemetry: Telemetry) -> Stack<ServerLayer, ServerTelemetryLayer> {
        Stack::new(self, ServerTelemetryLayer::new(telemetry))
    }
}

impl<S> Layer<S> for ServerLayer {
    type Service = Server<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Server::new(
            inner,
            self.context.clone(),
            self.served_by.clone(),
            self.inbound.clone(),
        )
    }
}
