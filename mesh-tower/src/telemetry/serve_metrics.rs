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
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::MetricsRegistry;
use crate::error::{Error, ErrorKind};

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running `/metrics` endpoint; stops when dropped or shut down.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// The address it listens on (the port chosen for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops listening and waits for the accept loop to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves `registry` at `http://<addr>/metrics` (HTTP/1.1 and HTTP/2).
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: MetricsRegistry,
) -> Result<MetricsServer, Error> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("cannot listen for /metrics on {addr}"),
        )
        .with_source(e)
    })?;
    let local_addr = listener.local_addr().map_err(|e| {
        Error::new(ErrorKind::Io, "cannot read the /metrics listener's address").with_source(e)
    })?;
    let (stop, mut stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics accept failed");
                        continue;
                    }
                },
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let registry = registry.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &registry)) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(MetricsServer {
        local_addr,
        stop: Some(stop),
        task: Some(task),
    })
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
