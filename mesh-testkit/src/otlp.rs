//! A real OTLP trace receiver: the OpenTelemetry collector's `TraceService` over gRPC
//! (tonic, from opentelemetry-proto) and `POST /v1/traces` with protobuf bodies for
//! OTLP/HTTP, both on 127.0.0.1 with a free port.
//!
//! Trace tests export through the real exporters of the code under test to this
//! receiver instead of reading an in-memory exporter, so what is checked is what a
//! collector would get. Spans are flattened into [`Span`] (service name from the
//! resource, ids, parent, attributes as text, events, error status) so a test can
//! check the tree a request produced with plain comparisons.
//!
//! [`sdk_tracer_provider`] is the other side: a service outside the mesh,
//! instrumented with the plain OpenTelemetry SDK, exporting to the receiver, for
//! tests that a trace stays one tree across such a hop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// OTLP's `STATUS_CODE_ERROR`.
const STATUS_ERROR: i32 = 2;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    /// The resource's `service.name`.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// `SpanKind as i32` (see [`Span::is`]).
    pub kind: i32,
    /// The trace id (16 bytes).
    pub trace_id: Vec<u8>,
    /// The span id (8 bytes).
    pub span_id: Vec<u8>,
    /// The parent's span id; empty for a root span.
    pub parent: Vec<u8>,
    /// Every attribute, its value as text (`"200"`, `"unavailable"`, `"true"`).
    pub attributes: HashMap<String, String>,
    /// The names of the span's events.
    pub events: Vec<String>,
    /// Whether the span's status is Error.
    pub error: bool,
}

impl Span {
    /// Whether this is a span of `kind`.
    pub fn is(&self, kind: SpanKind) -> bool {
        self.kind == kind as i32
    }

    /// The attribute `key`; panics naming the span when it is missing.
    #[track_caller]
    pub fn attr(&self, key: &str) -> &str {
        match self.attributes.get(key) {
            Some(value) => value,
            None => panic!("span {self:#?} has no attribute {key}"),
        }
    }
}

/// The receiver: what arrived so far, and a notification on every export. Clones
/// share both.
#[derive(Clone, Default)]
pub struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    arrived: Arc<Notify>,
}

/// An attribute's value as text.
fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

impl Receiver {
    /// Starts a receiver: (it, its OTLP/gRPC address, its OTLP/HTTP address). Export
    /// to `http://<grpc>` over gRPC, or to `http://<http>/v1/traces` over HTTP.
    pub async fn start() -> (Receiver, SocketAddr, SocketAddr) {
        let receiver = Receiver::default();
        let grpc = bind().await;
        let grpc_addr = local_addr(&grpc);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
        );
        let http = bind().await;
        let http_addr = local_addr(&http);
        let app = Router::new()
            .route(
                "/v1/traces",
                post(|State(r): State<Receiver>, body: Bytes| async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(request) => {
                            r.take(request);
                            let ok = ExportTraceServiceResponse::default().encode_to_vec();
                            (
                                StatusCode::OK,
                                [("content-type", "application/x-protobuf")],
                                ok,
                            )
                        }
                        Err(_) => (
                            StatusCode::BAD_REQUEST,
                            [("content-type", "text/plain")],
                            Vec::new(),
                        ),
                    }
                }),
            )
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(http, app).await });
        (receiver, grpc_addr, http_addr)
    }

    fn take(&self, request: ExportTraceServiceRequest) {
        let mut got = Vec::new();
        for rs in request.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(text)
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Span {
                        service: service.clone(),
                        name: s.name,
                        kind: s.kind,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent: s.parent_span_id,
                        attributes: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(kv)))
                            .collect(),
                        events: s.events.into_iter().map(|e| e.name).collect(),
                        error: s.status.is_some_and(|st| st.code == STATUS_ERROR),
                    });
                }
            }
        }
        self.lock().extend(got);
        self.arrived.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Span>> {
        // A test that panicked while holding it has failed already.
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.lock().clone()
    }

    /// Calls `flush` (the exporters of the code under test: batches leave on a flush,
    /// not at once) until `done` holds for the received spans, and returns them;
    /// panics with what arrived after `deadline`. A process that exports on its own
    /// passes `async || {}`.
    ///
    /// ```ignore
    /// let spans = receiver
    ///     .wait_for(DEADLINE, async || flush(&telemetries).await, |s| s.len() == 3)
    ///     .await;
    /// ```
    pub async fn wait_for(
        &self,
        deadline: Duration,
        mut flush: impl AsyncFnMut(),
        done: impl Fn(&[Span]) -> bool,
    ) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + deadline;
        loop {
            // Registered before the flush, so an export during it is not missed.
            let arrived = self.arrived.notified();
            flush().await;
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!("the expected spans did not arrive; got {spans:#?}");
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn bind() -> TcpListener {
    match TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(e) => panic!("binding the OTLP receiver: {e}"),
    }
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => panic!("the OTLP receiver's address: {e}"),
    }
}

/// A tracer provider of the plain OpenTelemetry SDK for `service` (its resource's
/// `service.name`), exporting batches over OTLP/gRPC to `grpc` (a [`Receiver`]'s
/// gRPC address): a foreign hop. `force_flush` sends what it has.
pub fn sdk_tracer_provider(
    service: &str,
    grpc: SocketAddr,
) -> opentelemetry_sdk::trace::SdkTracerProvider {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(format!("http://{grpc}"))
        .build();
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(e) => panic!("an OTLP exporter to {grpc}: {e}"),
    };
    opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(service.to_owned())
                .build(),
        )
        .with_batch_exporter(exporter)
        .build()
}

/// The spans of `service` of `kind`.
pub fn find<'a>(spans: &'a [Span], service: &str, kind: SpanKind) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.service == service && s.is(kind))
        .collect()
}

/// The one span of `service` of `kind`; panics with every span when there are more
/// or none.
#[track_caller]
pub fn one<'a>(spans: &'a [Span], service: &str, kind: SpanKind) -> &'a Span {
    let found = find(spans, service, kind);
    assert_eq!(found.len(), 1, "{service} {kind:?}: {spans:#?}");
    found[0]
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::common::v1::AnyValue as ProtoAnyValue;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status};

    use super::*;

    fn kv(key: &str, value: AnyValue) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(ProtoAnyValue { value: Some(value) }),
            ..KeyValue::default()
        }
    }

    /// One export of one server span of `service`.
    fn export(service: &str) -> ExportTraceServiceRequest {
        let span = opentelemetry_proto::tonic::trace::v1::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "GET /items".into(),
            kind: SpanKind::Server as i32,
            attributes: vec![
                kv("http.response.status_code", AnyValue::IntValue(503)),
                kv("retry", AnyValue::BoolValue(true)),
            ],
            status: Some(Status {
                code: STATUS_ERROR,
                ..Status::default()
            }),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", AnyValue::StringValue(service.into()))],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    #[tokio::test]
    async fn spans_exported_over_grpc_and_http_are_flattened() {
        let (receiver, grpc, http) = Receiver::start().await;
        let mut client = TraceServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        client.export(export("catalog")).await.unwrap();

        let body = export("payment").encode_to_vec();
        let stream = tokio::net::TcpStream::connect(http).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = http::Request::post("/v1/traces")
            .header("host", http.to_string())
            .header("content-type", "application/x-protobuf")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap();
        assert_eq!(sender.send_request(request).await.unwrap().status(), 200);

        let spans = receiver
            .wait_for(Duration::from_secs(10), async || {}, |s| s.len() == 2)
            .await;
        let catalog = one(&spans, "catalog", SpanKind::Server);
        assert_eq!(catalog.name, "GET /items");
        assert_eq!(catalog.attr("http.response.status_code"), "503");
        assert_eq!(catalog.attr("retry"), "true");
        assert!(catalog.error && catalog.parent.is_empty());
        assert_eq!(find(&spans, "payment", SpanKind::Server).len(), 1);
        assert!(find(&spans, "payment", SpanKind::Client).is_empty());
    }
}
