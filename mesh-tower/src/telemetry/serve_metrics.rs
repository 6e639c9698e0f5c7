//! The opt-in `/metrics` endpoint.
//!
//! Prometheus scrapes `GET /metrics` on an address of the operator's
//! choosing (Istio's sidecars use port 15020/15090; a proxyless service has
//! no such convention, so nothing listens unless asked). The text is the
//! OpenMetrics format prometheus-client writes, which Prometheus reads.
//! Applications with their own HTTP server can instead serve
//! [`MetricsRegistry::render`] at a route of theirs.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use super::MetricsRegistry;
use crate::error::Error;
use crate::operator_port::{self, Running};

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running `/metrics` endpoint; stops when dropped or shut down.
#[derive(Debug)]
pub struct MetricsServer(Running);

impl MetricsServer {
    /// The address it listens on (the port chosen for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Stops listening and waits for the open connections to end.
    pub async fn shutdown(self) {
        self.0.shutdown().await;
    }
}

/// Serves `registry` at `http://<addr>/metrics` (HTTP/1.1 and HTTP/2), with
/// the operator ports' limits (64 connections, 10 s for a request head).
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: MetricsRegistry,
) -> Result<MetricsServer, Error> {
    operator_port::serve(
        addr,
        "/metrics",
        operator_port::HEADER_TIMEOUT,
        move |req: Request<Incoming>| {
            let response = answer(&req, &registry);
            async move { Ok::<_, Infallible>(response) }
        },
    )
    .await
    .map(MetricsServer)
}

fn answer<B>(req: &Request<B>, registry: &MetricsRegistry) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    if req.uri().path() != "/metrics" {
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return response;
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    if req.method() == Method::GET {
        *response.body_mut() = Full::new(Bytes::from(registry.render()));
    }
    response
}
