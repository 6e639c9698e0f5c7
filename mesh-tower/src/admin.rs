//! A service's own debug/admin endpoint: the config it runs, its metrics,
//! and CSDS, on one opt-in port.
//!
//! Istio's answer to "which config does this workload run" is the sidecar's
//! admin port (`istioctl proxy-config`, Envoy's `/config_dump`); a proxyless
//! workload has no sidecar, so it answers itself, as gRFC A40
//! (<https://github.com/grpc/proposal/blob/master/A40-csds-support.md>) has
//! gRPC's xDS clients do:
//!
//! - `GET /debug/mesh/config`: the snapshot the service routes with, as JSON
//!   ([`XdsClient::config_dump_json`]): listeners, route configs, clusters,
//!   endpoints, per-type versions, missing and rejected resources.
//! - `GET /metrics`: the Prometheus / OpenMetrics text of a
//!   [`telemetry::MetricsRegistry`](crate::telemetry::MetricsRegistry),
//!   when one is given (feature `telemetry`).
//! - gRPC `envoy.service.status.v3.ClientStatusDiscoveryService` (CSDS,
//!   [`CsdsService`]) on the same port: `grpcdebug <addr> xds status` and
//!   `xds config` work against it (HTTP/2 cleartext, as grpcdebug dials).
//!
//! Nothing listens unless the application calls [`serve_admin`]. The
//! endpoint shows the full routing config: bind it to a loopback or
//! otherwise private address.
//!
//! Feature `admin` (it brings axum). It does not need the `telemetry`
//! feature: the config dump and CSDS answer "which config does this
//! workload run", the first debugging question, and need nothing from
//! OpenTelemetry or Prometheus. Without `telemetry` there is no registry
//! to render, so [`AdminEndpoints::metrics`] does not exist and
//! `/metrics` answers 404 naming the feature.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use mesh_xds_client::{CsdsService, XdsClient};
use tower::ServiceExt;

use crate::error::Error;
use crate::operator_port::{self, Running};
#[cfg(feature = "telemetry")]
use crate::telemetry::MetricsRegistry;

/// The path of the JSON config dump.
pub const CONFIG_PATH: &str = "/debug/mesh/config";
/// The path of the metrics text.
pub const METRICS_PATH: &str = "/metrics";

/// The content type of the OpenMetrics text format.
#[cfg(feature = "telemetry")]
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin endpoint serves. Built with [`AdminEndpoints::new`]
/// (the fields are private so that turning the `telemetry` feature on,
/// which adds the metrics registry, breaks no code).
#[derive(Debug, Clone)]
pub struct AdminEndpoints {
    /// The xDS client whose config `/debug/mesh/config` and CSDS report.
    xds: XdsClient,
    /// The registry `/metrics` renders; `None` answers `/metrics` with 404.
    #[cfg(feature = "telemetry")]
    metrics: Option<MetricsRegistry>,
}

impl AdminEndpoints {
    /// The config dump and CSDS of `xds`, no metrics.
    pub fn new(xds: XdsClient) -> Self {
        AdminEndpoints {
            xds,
            #[cfg(feature = "telemetry")]
            metrics: None,
        }
    }

    /// Also serves `/metrics` from `registry`. Feature `telemetry`.
    #[cfg(feature = "telemetry")]
    pub fn metrics(mut self, registry: MetricsRegistry) -> Self {
        self.metrics = Some(registry);
        self
    }

    /// The xDS client whose config the endpoint reports.
    pub fn xds(&self) -> &XdsClient {
        &self.xds
    }

    /// The endpoints as an axum router, for an application that serves them
    /// on a server of its own (the gRPC route needs HTTP/2).
    pub fn router(self) -> Router {
        let csds = tonic::service::Routes::new(CsdsService::new(self.xds.clone()).into_server())
            .into_axum_router();
        let xds = self.xds;
        #[cfg(feature = "telemetry")]
        let metrics = self.metrics;
        #[cfg(feature = "telemetry")]
        let metrics = move || render_metrics(metrics.clone());
        #[cfg(not(feature = "telemetry"))]
        let metrics = no_metrics;
        let http = Router::new()
            .route("/", get(index))
            .route(CONFIG_PATH, get(move || config(xds.clone())))
            .route(METRICS_PATH, get(metrics));
        // tonic's routes carry a fallback (gRPC UNIMPLEMENTED); ours replaces
        // it so a browser gets a 404 and a gRPC client still its status.
        csds.merge(http).fallback(fallback)
    }
}

async fn index() -> &'static str {
    "proxyless admin endpoint\n\
     GET /debug/mesh/config   the config this service runs (JSON)\n\
     GET /metrics             Prometheus metrics (when enabled)\n\
     gRPC envoy.service.status.v3.ClientStatusDiscoveryService   CSDS (grpcdebug <addr> xds status)\n"
}

async fn config(xds: XdsClient) -> Response {
    let dump = xds.config_dump_json();
    match serde_json::to_string_pretty(&dump) {
        Ok(mut text) => {
            text.push('\n');
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                text,
            )
                .into_response()
        }
        // Serializing a `Value` does not fail; answer something useful anyway.
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render the config dump: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(feature = "telemetry")]
async fn render_metrics(metrics: Option<MetricsRegistry>) -> Response {
    match metrics {
        Some(registry) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(METRICS_CONTENT_TYPE),
            )],
            registry.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not enabled on this admin endpoint (AdminEndpoints::metrics)\n",
        )
            .into_response(),
    }
}

#[cfg(not(feature = "telemetry"))]
async fn no_metrics() -> Response {
    (
        StatusCode::NOT_FOUND,
        "metrics need proxyless's (or mesh-tower's) `telemetry` feature, which this build leaves out\n",
    )
        .into_response()
}

async fn fallback(req: Request<Body>) -> Response {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        // gRPC UNIMPLEMENTED (12), as a trailers-only response.
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", "12")
            .header(
                "grpc-message",
                "only%20envoy.service.status.v3.ClientStatusDiscoveryService%20is%20served%20here",
            )
            .body(Body::empty())
            .unwrap_or_default();
    }
    (
        StatusCode::NOT_FOUND,
        format!(
            "no such admin page: {}; try {CONFIG_PATH} or {METRICS_PATH}\n",
            req.uri().path()
        ),
    )
        .into_response()
}

/// A running admin endpoint; stops when dropped or shut down.
#[derive(Debug)]
pub struct AdminServer(Running);

impl AdminServer {
    /// The address it listens on (the port chosen for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Stops accepting, lets open requests finish (a CSDS stream ends with
    /// its client), and waits for the server task to end.
    pub async fn shutdown(self) {
        self.0.shutdown().await;
    }
}

/// Serves `endpoints` on `addr` (HTTP/1.1 and HTTP/2 cleartext):
/// `/debug/mesh/config`, `/metrics` and CSDS. Use port 0 for any free port
/// and read it from [`AdminServer::local_addr`]. The port has limits:
/// 64 connections, 10 s for a request head (the `operator_port` module).
pub async fn serve_admin(
    addr: SocketAddr,
    endpoints: AdminEndpoints,
) -> Result<AdminServer, Error> {
    let app = endpoints.router();
    operator_port::serve(
        addr,
        "the admin endpoint",
        operator_port::HEADER_TIMEOUT,
        move |req: Request<Incoming>| app.clone().oneshot(req),
    )
    .await
    .map(AdminServer)
}
