//! A real OTLP trace receiver for tests: the OpenTelemetry collector's
//! `TraceService` over gRPC (tonic, from opentelemetry-proto) and `POST /v1/traces`
//! with protobuf bodies for OTLP/HTTP, both on 127.0.0.1 with a free port. Spans are
//! flattened into [`Got`] (service name from the resource, ids, parent, attributes as
//! text, error status) so a test can check the tree a request produced.
//!
//! Copied in its minimal form from mesh-tower's own telemetry tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
use opentelemetry_proto::tonic::common::v1::KeyValue as ProtoKeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use proxyless::telemetry::Telemetry;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub(crate) struct Got {
    /// The resource's `service.name`.
    pub(crate) service: String,
    pub(crate) name: String,
    /// `SpanKind as i32`.
    pub(crate) kind: i32,
    pub(crate) trace_id: Vec<u8>,
    pub(crate) span_id: Vec<u8>,
    /// Empty for a root span.
    pub(crate) parent: Vec<u8>,
    /// Every attribute, its value as text (`"200"`, `"unavailable"`).
    pub(crate) attributes: HashMap<String, String>,
    /// Span events by name.
    pub(crate) events: Vec<String>,
    /// Whether the span's status is Error.
    pub(crate) error: bool,
}

impl Got {
    /// Whether this is a span of `kind`.
    pub(crate) fn is(&self, kind: SpanKind) -> bool {
        self.kind == kind as i32
    }

    /// The attribute `key` (panics naming the span when it is missing).
    #[track_caller]
    pub(crate) fn attr(&self, key: &str) -> &str {
        match self.attributes.get(key) {
            Some(value) => value,
            None => panic!("span {self:#?} has no attribute {key}"),
        }
    }
}

/// The receiver: what arrived so far, and a notification on every export.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
    arrived: Arc<Notify>,
}

fn text(kv: &ProtoKeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

impl Receiver {
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
                    got.push(Got {
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
                        error: s.status.is_some_and(|st| st.code == 2),
                    });
                }
            }
        }
        self.spans.lock().expect("spans").extend(got);
        self.arrived.notify_waiters();
    }

    /// Every span received so far.
    pub(crate) fn spans(&self) -> Vec<Got> {
        self.spans.lock().expect("spans").clone()
    }

    /// Flushes `telemetries` until `done` holds for the received spans; panics with
    /// what arrived after `deadline`.
    pub(crate) async fn wait_for(
        &self,
        telemetries: &[&Telemetry],
        deadline: Duration,
        done: impl Fn(&[Got]) -> bool,
    ) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + deadline;
        loop {
            let arrived = self.arrived.notified();
            for t in telemetries {
                if let Err(e) = t.flush().await {
                    panic!("flushing spans of {:?}: {e}", t.identity().service());
                }
            }
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

/// Starts a receiver: (it, its OTLP/gRPC address, its OTLP/HTTP address).
pub(crate) async fn receiver() -> (Receiver, SocketAddr, SocketAddr) {
    let receiver = Receiver::default();
    let bind = || async {
        match TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(e) => panic!("binding the OTLP receiver: {e}"),
        }
    };
    let grpc = bind().await;
    let grpc_addr = grpc.local_addr().expect("receiver address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    let http = bind().await;
    let http_addr = http.local_addr().expect("receiver address");
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

/// The spans of `service` of `kind`.
pub(crate) fn find<'a>(spans: &'a [Got], service: &str, kind: SpanKind) -> Vec<&'a Got> {
    spans
        .iter()
        .filter(|s| s.service == service && s.is(kind))
        .collect()
}

/// The one span of `service` of `kind` (panics when there are more or none).
#[track_caller]
pub(crate) fn one<'a>(spans: &'a [Got], service: &str, kind: SpanKind) -> &'a Got {
    let found = find(spans, service, kind);
    assert_eq!(found.len(), 1, "{service} {kind:?}: {spans:#?}");
    found[0]
}
