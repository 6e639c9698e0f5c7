use http::HeaderValue;
use tower::Layer;

use super::{Server, ServerContext};

/// The server stack as a tower layer (see the [module docs](crate::server)).
#[derive(Debug, Clone)]
pub struct ServerLayer {
    context: ServerContext,
    served_by: Option<HeaderValue>,
}

impl ServerLayer {
    /// A layer giving requests `context`.
    pub fn new(context: ServerContext) -> Self {
        ServerLayer {
            context,
            served_by: None,
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

    /// The context given to requests.
    pub fn context(&self) -> &ServerContext {
        &self.context
    }
}

impl<S> Layer<S> for ServerLayer {
    type Service = Server<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Server::new(inner, self.context.clone(), self.served_by.clone())
    }
}
