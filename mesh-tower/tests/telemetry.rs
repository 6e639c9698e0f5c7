//! Telemetry over real sockets: traces through three services into a real
//! OTLP receiver (gRPC and HTTP/protobuf), a foreign OpenTelemetry hop, B3
//! input, Istio metrics scraped from `/metrics`, gRPC statuses from
//! trailers, and the access log.
//!
//! The services use plain hyper clients under `ClientTelemetryLayer`, with
//! a small stand-in for the mesh's routing (`TestMesh`) that fills the
//! decision record and retries a dead endpoint as the engine does.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::any;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_core::model::{LbPolicy, Name, RetryOn};
use mesh_core::snapshot::Versions;
use mesh_testkit::logs::Lines;
use mesh_testkit::otlp::{Receiver, SpanKind, find, one, sdk_tracer_provider};
use mesh_testkit::prometheus::{ISTIO_STANDARD_LABELS, ISTIO_STANDARD_SAMPLES, parse, total};
use mesh_testkit::wait::until;
use mesh_tower::BoxError;
use mesh_tower::telemetry::{
    self, AttemptOutcome, ClientTelemetry, ClientTelemetryLayer, DecisionRecord, Identity,
    MetricsRegistry, OtelConfig, OtlpProtocol, ResponseFlags, Sampling, ServerTelemetryLayer,
    Telemetry,
};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{
    SpanKind as OtelSpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------------------
// The OTLP receiver (mesh_testkit::otlp) and its configs.

const DEADLINE: Duration = Duration::from_secs(10);

/// Flushes the span batches of `telemetries` to their exporters.
async fn flush(telemetries: &[&Telemetry]) {
    for t in telemetries {
        t.flush().await.unwrap();
    }
}

fn otlp(addr: SocketAddr, protocol: OtlpProtocol) -> OtelConfig {
    let endpoint = match protocol {
        OtlpProtocol::Grpc => format!("http://{addr}"),
        OtlpProtocol::HttpProtobuf => format!("http://{addr}/v1/traces"),
    };
    OtelConfig::default()
        .with_protocol(protocol)
        .with_endpoint(endpoint)
        .unwrap()
}

// ---------------------------------------------------------------------------
// A stand-in for the mesh's routing: host → endpoints tried in order.

type HyperClient = Client<HttpConnector, Full<Bytes>>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

#[derive(Clone)]
struct TestMesh {
    routes: Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>,
    client: HyperClient,
}

impl TestMesh {
    fn new() -> Self {
        TestMesh {
            routes: Arc::default(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    fn route(&self, host: &str, endpoints: Vec<SocketAddr>) {
        self.routes
            .lock()
            .unwrap()
            .insert(host.to_owned(), endpoints);
    }
}

impl Service<Request<Full<Bytes>>> for TestMesh {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Incoming>, BoxError>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = req.uri().host().unwrap_or_default().to_owned();
            let endpoints = this
                .routes
                .lock()
                .unwrap()
                .get(&host)
                .cloned()
                .ok_or("no route")?;
            let record = DecisionRecord::of(&req).cloned();
            let cluster: Name = format!("outbound|80||{host}.shop.svc.cluster.local").into();
            if let Some(r) = &record {
                let versions = Versions {
                    listeners: "7".into(),
                    route_configs: "7".into(),
                    clusters: "7".into(),
                    endpoints: "7".into(),
                };
                r.route(&versions, &host.as_str().into(), &"default".into());
                r.cluster(&cluster, LbPolicy::RoundRobin);
                r.timeouts(Some(Duration::from_secs(5)), None);
            }
            let labels: Arc<[(Name, Name)]> = Arc::from([
                (Name::from("app"), Name::from(host.as_str())),
                ("version".into(), "v1".into()),
            ]);
            let mut last_error: BoxError = "no endpoints".into();
            let (parts, body) = req.into_parts();
            for addr in endpoints {
                let attempt = record.as_ref().map(|r| r.attempt_started(addr, &labels));
                let mut parts = parts.clone();
                parts.uri = format!(
                    "http://{addr}{}",
                    parts.uri.path_and_query().map_or("/", |p| p.as_str())
                )
                .parse()?;
                parts.headers.insert(http::header::HOST, host.parse()?);
                if let Some(a) = &attempt {
                    a.inject(&mut parts.headers);
                }
                match this
                    .client
                    .request(Request::from_parts(parts, body.clone()))
                    .await
                {
                    Ok(response) => {
                        if let Some(a) = attempt {
                            a.finish(AttemptOutcome::Response {
                                status: response.status(),
                                grpc_status: None,
                            });
                        }
                        return Ok(response);
                    }
                    Err(e) => {
                        if let Some(a) = attempt {
                            a.fail(ResponseFlags::UPSTREAM_CONNECTION_FAILURE, &e);
                        }
                        if let Some(r) = &record {
                            r.retrying(RetryOn::CONNECT_FAILURE, Duration::ZERO);
                        }
                        last_error = Box::new(e);
                    }
                }
            }
            Err(last_error)
        })
    }
}

type MeshClient = ClientTelemetry<TestMesh>;

// ---------------------------------------------------------------------------
// Services: each relays to `next` (if any) and answers with its status.

#[derive(Clone)]
struct Hop {
    name: &'static str,
    client: MeshClient,
    next: Option<&'static str>,
    /// Copy the context with `telemetry::propagate` (else rely on the
    /// current context).
    explicit: bool,
}

async fn relay(State(hop): State<Hop>, req: axum::extract::Request) -> Response<axum::body::Body> {
    let status = if req.uri().path() == "/fail" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let Some(next) = hop.next else {
        return Response::builder()
            .status(status)
            .body(axum::body::Body::from(hop.name))
            .unwrap();
    };
    let mut outgoing = Request::get(format!("http://{next}{}", req.uri().path()))
        .body(Full::new(Bytes::from_static(b"order")))
        .unwrap();
    if hop.explicit {
        telemetry::propagate(&req, &mut outgoing);
    }
    let response = hop.client.clone().oneshot(outgoing).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Response::builder()
        .status(status)
        .body(axum::body::Body::from(format!(
            "{} > {}",
            hop.name,
            String::from_utf8_lossy(&body)
        )))
        .unwrap()
}

async fn serve_hop(hop: Hop, telemetry: Telemetry) -> SocketAddr {
    let app = Router::new()
        .route("/{*path}", any(relay))
        .with_state(hop)
        .layer(ServerTelemetryLayer::new(telemetry));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn dead_endpoint() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A plain GET (no trace context), returning status and body.
async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let client: HyperClient = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = client
        .request(req.body(Full::default()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn identity(name: &str) -> Identity {
    Identity::new(name, "shop")
        .with_label("app", name)
        .with_version("v1")
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_through_three_services_with_attempt_spans_and_decisions() {
    let (receiver, grpc, http) = Receiver::start().await;
    let mk = |name: &'static str, protocol, addr| {
        let config = otlp(addr, protocol);
        Telemetry::builder(identity(name))
            .otel(&config)
            .unwrap()
            .build()
    };
    let frontend_t = mk("frontend", OtlpProtocol::Grpc, grpc);
    let catalog_t = mk("catalog", OtlpProtocol::HttpProtobuf, http);
    let payment_t = mk("payment", OtlpProtocol::Grpc, grpc);
    let mesh = TestMesh::new();
    let client = |t: &Telemetry| ClientTelemetryLayer::new(t.clone()).layer(mesh.clone());
    let payment = serve_hop(
        Hop {
            name: "payment",
            client: client(&payment_t),
            next: None,
            explicit: false,
        },
        payment_t.clone(),
    )
    .await;
    let catalog = serve_hop(
        Hop {
            name: "catalog",
            client: client(&catalog_t),
            next: Some("payment"),
            explicit: true,
        },
        catalog_t.clone(),
    )
    .await;
    let frontend = serve_hop(
        Hop {
            name: "frontend",
            client: client(&frontend_t),
            next: Some("catalog"),
            explicit: false,
        },
        frontend_t.clone(),
    )
    .await;
    mesh.route("catalog", vec![catalog]);
    // The first payment endpoint is down: the call is retried.
    mesh.route("payment", vec![dead_endpoint().await, payment]);

    let (status, body) = get(frontend, "/checkout", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "frontend > catalog > payment")
    );

    let all = [&frontend_t, &catalog_t, &payment_t];
    let spans = receiver
        .wait_for(
            DEADLINE,
            async || flush(&all).await,
            |s| {
                s.iter()
                    .filter(|g| g.kind == SpanKind::Server as i32)
                    .count()
                    == 3
                    && s.iter()
                        .filter(|g| g.kind == SpanKind::Client as i32)
                        .count()
                        == 5
            },
        )
        .await;
    // One trace.
    let traces: BTreeSet<_> = spans.iter().map(|s| s.trace_id.clone()).collect();
    assert_eq!(traces.len(), 1, "{spans:#?}");

    // frontend SERVER (root) → frontend CLIENT → its attempt → catalog SERVER
    let f_server = one(&spans, "frontend", SpanKind::Server);
    assert!(f_server.parent.is_empty(), "the frontend span is the root");
    assert_eq!(f_server.attributes["http.request.method"], "GET");
    assert_eq!(f_server.attributes["http.response.status_code"], "200");
    let f_clients = find(&spans, "frontend", SpanKind::Client);
    let f_call = f_clients
        .iter()
        .find(|s| !s.attributes.contains_key("mesh.attempt"))
        .unwrap();
    let f_attempt = f_clients
        .iter()
        .find(|s| s.attributes.contains_key("mesh.attempt"))
        .unwrap();
    assert_eq!(f_call.parent, f_server.span_id);
    assert_eq!(f_attempt.parent, f_call.span_id);
    let c_server = one(&spans, "catalog", SpanKind::Server);
    assert_eq!(c_server.parent, f_attempt.span_id);

    // catalog CLIENT with two attempts: the first failed, the second was sent.
    let c_clients = find(&spans, "catalog", SpanKind::Client);
    let c_call = c_clients
        .iter()
        .find(|s| !s.attributes.contains_key("mesh.attempt"))
        .unwrap();
    assert_eq!(c_call.parent, c_server.span_id);
    let mut attempts: Vec<_> = c_clients
        .iter()
        .filter(|s| s.attributes.contains_key("mesh.attempt"))
        .collect();
    attempts.sort_by_key(|s| s.attributes["mesh.attempt"].clone());
    assert_eq!(attempts.len(), 2, "one child span per attempt");
    assert!(attempts.iter().all(|a| a.parent == c_call.span_id));
    assert!(attempts[0].error);
    assert_eq!(attempts[0].attributes["mesh.response_flags"], "UF");
    assert_eq!(attempts[1].attributes["http.request.resend_count"], "1");
    assert_eq!(attempts[1].attributes["http.response.status_code"], "200");
    let p_server = one(&spans, "payment", SpanKind::Server);
    assert_eq!(p_server.parent, attempts[1].span_id);

    // The decision record on the client span.
    let a = &c_call.attributes;
    assert_eq!(
        a["mesh.cluster"],
        "outbound|80||payment.shop.svc.cluster.local"
    );
    assert_eq!(a["mesh.route"], "default");
    assert_eq!(a["mesh.listener"], "payment");
    assert_eq!(a["mesh.config.version.eds"], "7");
    assert_eq!(a["mesh.lb_policy"], "ROUND_ROBIN");
    assert_eq!(a["mesh.attempts"], "2");
    assert_eq!(a["mesh.retry.reasons"], "connect-failure");
    assert_eq!(a["mesh.timeout_ms"], "5000");
    assert_eq!(a["mesh.endpoint"], payment.to_string());
    assert_eq!(a["server.address"], "payment");
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(c_call.name, "GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_opentelemetry_hop_keeps_the_trace_one_tree() {
    let (receiver, grpc, _) = Receiver::start().await;
    let frontend_t = Telemetry::builder(identity("frontend"))
        .otel(&otlp(grpc, OtlpProtocol::Grpc))
        .unwrap()
        .build();
    let payment_t = Telemetry::builder(identity("payment"))
        .otel(&otlp(grpc, OtlpProtocol::Grpc))
        .unwrap()
        .build();
    let mesh = TestMesh::new();
    let payment = serve_hop(
        Hop {
            name: "payment",
            client: ClientTelemetryLayer::new(payment_t.clone()).layer(mesh.clone()),
            next: None,
            explicit: false,
        },
        payment_t.clone(),
    )
    .await;

    // The foreign service: the plain OpenTelemetry SDK, W3C propagation.
    let legacy_provider = sdk_tracer_provider("legacy", grpc);
    let tracer = legacy_provider.tracer("legacy");
    let plain: HyperClient = Client::builder(TokioExecutor::new()).build_http();
    let legacy_app = Router::new().route(
        "/{*path}",
        any(move |req: axum::extract::Request| {
            let tracer = tracer.clone();
            let plain = plain.clone();
            async move {
                let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
                let parent =
                    propagator.extract(&opentelemetry_http::HeaderExtractor(req.headers()));
                let span = tracer
                    .span_builder("legacy handler")
                    .with_kind(OtelSpanKind::Server)
                    .start_with_context(&tracer, &parent);
                let cx = parent.with_span(span);
                let mut out = Request::get(format!("http://{payment}/pay"))
                    .body(Full::<Bytes>::default())
                    .unwrap();
                propagator.inject_context(
                    &cx,
                    &mut opentelemetry_http::HeaderInjector(out.headers_mut()),
                );
                let response = plain.request(out).await.unwrap();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                cx.span().end();
                format!("legacy > {}", String::from_utf8_lossy(&body))
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let legacy = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, legacy_app).await });

    let frontend = serve_hop(
        Hop {
            name: "frontend",
            client: ClientTelemetryLayer::new(frontend_t.clone()).layer(mesh.clone()),
            next: Some("legacy"),
            explicit: false,
        },
        frontend_t.clone(),
    )
    .await;
    mesh.route("legacy", vec![legacy]);
    let (status, body) = get(frontend, "/order", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "frontend > legacy > payment")
    );

    let provider = legacy_provider.clone();
    tokio::task::spawn_blocking(move || provider.force_flush())
        .await
        .unwrap()
        .unwrap();
    let spans = receiver
        .wait_for(
            DEADLINE,
            async || flush(&[&frontend_t, &payment_t]).await,
            |s| {
                s.iter().any(|g| g.service == "payment")
                    && s.iter().any(|g| g.service == "legacy")
                    && s.iter().filter(|g| g.service == "frontend").count() == 3
            },
        )
        .await;
    let traces: BTreeSet<_> = spans.iter().map(|s| s.trace_id.clone()).collect();
    assert_eq!(traces.len(), 1, "{spans:#?}");
    let legacy_span = one(&spans, "legacy", SpanKind::Server);
    let f_attempt = find(&spans, "frontend", SpanKind::Client)
        .into_iter()
        .find(|s| s.attributes.contains_key("mesh.attempt"))
        .unwrap();
    assert_eq!(legacy_span.parent, f_attempt.span_id);
    let p_server = one(&spans, "payment", SpanKind::Server);
    assert_eq!(
        p_server.parent, legacy_span.span_id,
        "the mesh continues the foreign traceparent"
    );
    let _ = legacy_provider.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_input_is_continued_and_w3c_is_sent_on() {
    let (receiver, grpc, _) = Receiver::start().await;
    let payment_t = Telemetry::builder(identity("payment"))
        .otel(&otlp(grpc, OtlpProtocol::Grpc))
        .unwrap()
        .build();
    let mesh = TestMesh::new();
    let payment = serve_hop(
        Hop {
            name: "payment",
            client: ClientTelemetryLayer::new(payment_t.clone()).layer(mesh.clone()),
            next: None,
            explicit: false,
        },
        payment_t.clone(),
    )
    .await;
    get(
        payment,
        "/single",
        &[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")],
    )
    .await;
    get(
        payment,
        "/multi",
        &[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let spans = receiver
        .wait_for(
            DEADLINE,
            async || flush(&[&payment_t]).await,
            |s| s.len() == 2,
        )
        .await;
    let by_path = |p: &str| {
        spans
            .iter()
            .find(|s| s.attributes["url.path"] == p)
            .unwrap()
    };
    let single = by_path("/single");
    assert_eq!(hex(&single.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(hex(&single.parent), "e457b5a2e4d86bd1");
    let multi = by_path("/multi");
    assert_eq!(hex(&multi.trace_id), "463ac35c9f6413ad48485a3953bb6124");
    assert_eq!(hex(&multi.parent), "a2fb4a1d1a96d312");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_requests_still_propagate_and_export_nothing() {
    let (receiver, grpc, _) = Receiver::start().await;
    let t = Telemetry::builder(identity("frontend"))
        .otel(&otlp(grpc, OtlpProtocol::Grpc).with_sampling(Sampling::AlwaysOff))
        .unwrap()
        .build();
    // An echo of the trace headers and the record's state.
    let echo = Router::new().route(
        "/",
        any(|req: axum::extract::Request| async move {
            req.headers()
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, echo).await });
    let mesh = TestMesh::new();
    mesh.route("echo", vec![addr]);
    let client = ClientTelemetryLayer::new(t.clone()).layer(mesh);
    let response = client
        .oneshot(Request::get("http://echo/").body(Full::default()).unwrap())
        .await
        .unwrap();
    let traceparent = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert_eq!(traceparent.len(), 55, "{traceparent}");
    assert!(traceparent.ends_with("-00"), "not sampled: {traceparent}");
    t.flush().await.unwrap();
    assert!(receiver.spans().is_empty());
}

// ---------------------------------------------------------------------------
// Metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload_exactly_with_istios_names_and_labels() {
    let registry = MetricsRegistry::new();
    let mk = |name: &str| {
        Telemetry::builder(identity(name))
            .metrics(&registry)
            .build()
    };
    let (frontend_t, catalog_t) = (mk("frontend"), mk("catalog"));
    let mesh = TestMesh::new();
    let catalog = serve_hop(
        Hop {
            name: "catalog",
            client: ClientTelemetryLayer::new(catalog_t.clone()).layer(mesh.clone()),
            next: None,
            explicit: false,
        },
        catalog_t.clone(),
    )
    .await;
    mesh.route("catalog", vec![catalog]);
    let client = ClientTelemetryLayer::new(frontend_t.clone()).layer(mesh.clone());
    for path in ["/a", "/b", "/c", "/d", "/e", "/fail", "/fail"] {
        let response = client
            .clone()
            .oneshot(
                Request::get(format!("http://catalog{path}"))
                    .body(Full::from("12345"))
                    .unwrap(),
            )
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
    }
    let server = telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), registry.clone())
        .await
        .unwrap();
    // The server side ends when its response body has been written; the
    // count is eventually 7 on both sides.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let (status, text) = get(server.local_addr(), "/metrics", &[]).await;
        assert_eq!(status, StatusCode::OK);
        let samples = parse(&text);
        let done = total(
            &samples,
            "istio_requests_total",
            &[("reporter", "destination")],
        ) == 7.0;
        if done {
            assert!(text.contains("# TYPE istio_requests counter"), "{text}");
            assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram"));
            assert!(text.contains("# TYPE istio_request_bytes histogram"));
            assert!(text.contains("# TYPE istio_response_bytes histogram"));
            break samples;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server-side counts: {text}"
        );
        tokio::task::yield_now().await;
    };
    for reporter in ["source", "destination"] {
        let by = |code: &str| {
            total(
                &samples,
                "istio_requests_total",
                &[("reporter", reporter), ("response_code", code)],
            )
        };
        assert_eq!((by("200"), by("503")), (5.0, 2.0), "{reporter}");
        for histogram in [
            "istio_request_duration_milliseconds",
            "istio_request_bytes",
            "istio_response_bytes",
        ] {
            let count = |code: &str| {
                total(
                    &samples,
                    &format!("{histogram}_count"),
                    &[("reporter", reporter), ("response_code", code)],
                )
            };
            assert_eq!(
                (count("200"), count("503")),
                (5.0, 2.0),
                "{histogram} {reporter}"
            );
            let inf = total(
                &samples,
                &format!("{histogram}_bucket"),
                &[("reporter", reporter), ("le", "+Inf")],
            );
            assert_eq!(inf, 7.0, "{histogram} {reporter}");
        }
        // Request bodies were 5 bytes each.
        let sum = total(
            &samples,
            "istio_request_bytes_sum",
            &[("reporter", reporter)],
        );
        assert_eq!(sum, 35.0, "{reporter}");
    }
    // Every istio_* series has exactly Istio's labels (histogram buckets add `le`).
    let istio: BTreeSet<&str> = ISTIO_STANDARD_LABELS.into_iter().collect();
    for s in samples.iter().filter(|s| s.name.starts_with("istio_")) {
        let keys: BTreeSet<&str> = s
            .labels
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "le")
            .collect();
        assert_eq!(keys, istio, "{}", s.name);
    }
    let names: BTreeSet<&str> = samples
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| n.starts_with("istio_"))
        .collect();
    let expected: BTreeSet<&str> = ISTIO_STANDARD_SAMPLES.into_iter().collect();
    assert_eq!(names, expected);
    // Both sides name both workloads (the peer metadata exchange).
    let ok = samples
        .iter()
        .find(|s| {
            s.name == "istio_requests_total"
                && s.label("reporter") == "destination"
                && s.label("response_code") == "200"
        })
        .unwrap();
    for (k, v) in [
        ("source_workload", "frontend"),
        ("source_workload_namespace", "shop"),
        ("source_app", "frontend"),
        ("source_version", "v1"),
        ("source_canonical_service", "frontend"),
        ("source_canonical_revision", "v1"),
        ("destination_workload", "catalog"),
        ("destination_service", "catalog.shop.svc.cluster.local"),
        ("destination_service_name", "catalog"),
        ("destination_service_namespace", "shop"),
        ("request_protocol", "http"),
        ("grpc_response_status", ""),
        ("response_flags", "-"),
        ("connection_security_policy", "none"),
        ("source_principal", "unknown"),
    ] {
        assert_eq!(ok.label(k), v, "{k}");
    }
    let src = samples
        .iter()
        .find(|s| {
            s.name == "istio_requests_total"
                && s.label("reporter") == "source"
                && s.label("response_code") == "200"
        })
        .unwrap();
    assert_eq!(src.label("destination_workload"), "catalog");
    assert_eq!(src.label("destination_version"), "v1");
    assert_eq!(
        src.label("destination_service"),
        "catalog.shop.svc.cluster.local"
    );
    assert_eq!(src.label("connection_security_policy"), "unknown");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_statuses_are_counted_on_both_sides() {
    let registry = MetricsRegistry::new();
    let payment_t = Telemetry::builder(identity("payment"))
        .metrics(&registry)
        .build();
    let frontend_t = Telemetry::builder(identity("frontend"))
        .metrics(&registry)
        .build();

    /// A collector that refuses everything with UNAVAILABLE.
    #[derive(Clone)]
    struct Refuse;
    #[tonic::async_trait]
    impl TraceService for Refuse {
        async fn export(
            &self,
            _: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            Err(tonic::Status::unavailable("busy"))
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(ServerTelemetryLayer::new(payment_t.clone()))
            .add_service(TraceServiceServer::new(Refuse))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        TraceServiceClient::new(ClientTelemetryLayer::new(frontend_t.clone()).layer(channel));
    let status = client
        .export(ExportTraceServiceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let samples = parse(&registry.render());
        if total(&samples, "istio_requests_total", &[]) == 2.0 {
            break samples;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    };
    for reporter in ["source", "destination"] {
        let grpc = total(
            &samples,
            "istio_requests_total",
            &[
                ("reporter", reporter),
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", "14"),
            ],
        );
        assert_eq!(grpc, 1.0, "{reporter}");
    }
}

#[test]
fn the_access_log_is_one_json_line_per_request() {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("proxyless::access=info"))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // One thread: the subscriber above sees every task.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let t = |name: &str| Telemetry::builder(identity(name)).access_log(true).build();
        let (frontend_t, catalog_t) = (t("frontend"), t("catalog"));
        let mesh = TestMesh::new();
        let catalog = serve_hop(
            Hop {
                name: "catalog",
                client: ClientTelemetryLayer::new(catalog_t.clone()).layer(mesh.clone()),
                next: None,
                explicit: false,
            },
            catalog_t,
        )
        .await;
        mesh.route("catalog", vec![dead_endpoint().await, catalog]);
        let client = ClientTelemetryLayer::new(frontend_t).layer(mesh);
        let response = client
            .oneshot(
                Request::post("http://catalog/items?page=2")
                    .header("x-request-id", "req-1")
                    .body(Full::from("abc"))
                    .unwrap(),
            )
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        // The inbound line is written when catalog's body ends.
        until("two access log lines", || {
            lines.text().matches('\n').count() >= 2
        })
        .await;
    });
    let text = lines.text();
    let parsed: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l.trim()).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(parsed.len(), 2, "{text}");
    let outbound = parsed
        .iter()
        .find(|v| v["direction"] == "outbound")
        .unwrap();
    let inbound = parsed.iter().find(|v| v["direction"] == "inbound").unwrap();
    for v in [outbound, inbound] {
        assert_eq!(v["method"], "POST");
        assert_eq!(v["response_code"], 200);
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(v["bytes_received"], 3);
        assert_eq!(v["bytes_sent"], 7);
        assert!(v["start_time"].as_str().unwrap().ends_with('Z'));
        assert!(v["duration"].is_u64());
    }
    assert_eq!(outbound["path"], "/items?page=2");
    assert_eq!(
        outbound["upstream_cluster"],
        "outbound|80||catalog.shop.svc.cluster.local"
    );
    assert_eq!(outbound["route_name"], "default");
    assert_eq!(outbound["attempts"], 2);
    assert_eq!(outbound["response_flags"], "-");
    assert!(
        outbound["upstream_host"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}
