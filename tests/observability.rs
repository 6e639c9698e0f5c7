//! Observability end to end over real sockets (issue 6, acceptance criteria 1, 2, 3
//! and 6): Istio YAML → embedded mesh-control → three services on 127.0.0.1, each in
//! the mesh with `proxyless::Client`, `ServerLayer` and `serve`, each with its own
//! `Telemetry` (its own tracer provider and `service.name`), exporting to a real OTLP
//! receiver in the test (the collector's gRPC trace service and OTLP/HTTP).
//!
//! The shop: `frontend` (HTTP) calls `catalog` (HTTP), which calls `payment` (gRPC).
//! The payment VirtualService retries `unavailable` once, and payment fails the first
//! call of every order with UNAVAILABLE, so every checkout makes exactly one retry:
//! the trace shows two attempt spans under catalog's call, and `/metrics` counts the
//! retries.
//!
//! Criterion 6 runs the shop demo binary itself with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! pointing at the receiver.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_control::ServerHandle;
use mesh_testkit::otlp::{SpanKind, sdk_tracer_provider};
use mesh_testkit::prometheus::{
    ISTIO_STANDARD_LABELS, ISTIO_STANDARD_SAMPLES, Sample, parse, total,
};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{SpanKind as OtelSpanKind, TraceContextExt as _, Tracer as _};
use proxyless::telemetry::{
    ISTIO_LABELS, Identity, MetricsRegistry, MetricsServer, OtelConfig, OtlpProtocol, Telemetry,
    serve_metrics,
};
use proxyless::{
    Bootstrap, Client, Registration, ServerContext, ServerLayer, Serving, TracedClient, XdsClient,
};
use support::otlp::{Got, Receiver, find, one, receiver};
use support::shop::payment_client::PaymentClient;
use support::shop::payment_server::Payment;
use support::shop::{PayReply, PayRequest, StreamReply, StreamRequest};
use support::{eventually_async, eventually_named};
use tokio::net::TcpListener;
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
const NAMESPACE: &str = "shop";
const PAYMENT_CLUSTER: &str = "outbound|50051||payment.shop.svc.cluster.local";
const CATALOG_CLUSTER: &str = "outbound|80||catalog.shop.svc.cluster.local";
const FRONTEND_CLUSTER: &str = "outbound|80||frontend.shop.svc.cluster.local";

// ---------------------------------------------------------------------------------------
// The mesh config.
// ---------------------------------------------------------------------------------------

fn service_entry(name: &str, port: u16, protocol: &str, endpoint: Option<SocketAddr>) -> String {
    let endpoints = match endpoint {
        Some(addr) => format!(
            "  endpoints:\n  - address: {}\n    ports: {{{}: {}}}\n",
            addr.ip(),
            protocol.to_ascii_lowercase(),
            addr.port()
        ),
        None => String::new(),
    };
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  hosts: [{name}]
  ports: [{{number: {port}, name: {proto}, protocol: {protocol}}}]
  resolution: STATIC
{endpoints}---
",
        proto = protocol.to_ascii_lowercase()
    )
}

/// The shop's YAML; `legacy` declares a non-mesh service at that address (a
/// ServiceEntry with a static endpoint, as for any workload outside the mesh).
fn shop_yaml(legacy: Option<SocketAddr>) -> String {
    let mut yaml = String::new();
    yaml += &service_entry("frontend", 80, "HTTP", None);
    yaml += &service_entry("catalog", 80, "HTTP", None);
    yaml += &service_entry("payment", 50051, "GRPC", None);
    if let Some(addr) = legacy {
        yaml += &service_entry("legacy", 80, "HTTP", Some(addr));
    }
    yaml += &format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment, namespace: {NAMESPACE}}}
spec:
  host: payment
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment, namespace: {NAMESPACE}}}
spec:
  hosts: [payment]
  http:
  - name: pay
    retries: {{attempts: 1, retryOn: unavailable, backoff: 1ms}}
    route:
    - destination: {{host: payment}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: {NAMESPACE}}}
spec:
  hosts: [catalog]
  http:
  - name: browse
    route:
    - destination: {{host: catalog}}
"
    );
    yaml
}

// ---------------------------------------------------------------------------------------
// The services.
// ---------------------------------------------------------------------------------------

/// Payment: fails the first call of every order with UNAVAILABLE (a retry succeeds).
#[derive(Default)]
struct FirstCallFails {
    seen: Mutex<HashSet<String>>,
    calls: AtomicU64,
}

#[tonic::async_trait]
impl Payment for FirstCallFails {
    async fn pay(
        &self,
        request: tonic::Request<PayRequest>,
    ) -> Result<tonic::Response<PayReply>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let order = request.into_inner().order_id;
        if self.seen.lock().expect("seen").insert(order.clone()) {
            return Err(tonic::Status::unavailable(format!(
                "first call for {order} fails"
            )));
        }
        Ok(tonic::Response::new(PayReply {
            served_by: "payment".into(),
            version: "v1".into(),
        }))
    }

    type StreamStream = tokio_stream::Empty<Result<StreamReply, tonic::Status>>;

    async fn stream(
        &self,
        _request: tonic::Request<StreamRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

#[derive(Clone)]
struct Frontend {
    client: TracedClient,
    /// The service it calls for items: `catalog`, or `legacy`.
    next: &'static str,
}

/// `GET /checkout`: items from the next service, through the mesh.
async fn checkout(State(fe): State<Frontend>) -> Result<String, (StatusCode, String)> {
    let bad = |e: &dyn std::fmt::Display| (StatusCode::BAD_GATEWAY, e.to_string());
    let req = Request::get(format!("http://{}/items", fe.next))
        .body(Full::default())
        .map_err(|e| bad(&e))?;
    let resp = fe.client.clone().oneshot(req).await.map_err(|e| bad(&e))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| bad(&e))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        return Err((StatusCode::BAD_GATEWAY, format!("{status}: {body}")));
    }
    Ok(format!("frontend > {body}"))
}

#[derive(Clone)]
struct Catalog {
    payment: PaymentClient<TracedClient<tonic::body::Body>>,
    orders: Arc<AtomicU64>,
}

/// `GET /items`: pays for a new order through the mesh (gRPC).
async fn items(State(c): State<Catalog>) -> Result<String, (StatusCode, String)> {
    let order = c.orders.fetch_add(1, Ordering::SeqCst);
    let reply = c
        .payment
        .clone()
        .pay(PayRequest {
            order_id: format!("order-{order}"),
            cents: 100,
        })
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?
        .into_inner();
    Ok(format!("catalog > {}", reply.served_by))
}

fn otlp(addr: SocketAddr, protocol: OtlpProtocol) -> OtelConfig {
    let endpoint = match protocol {
        OtlpProtocol::Grpc => format!("http://{addr}"),
        OtlpProtocol::HttpProtobuf => format!("http://{addr}/v1/traces"),
    };
    match OtelConfig::default()
        .with_protocol(protocol)
        .with_endpoint(endpoint)
    {
        Ok(config) => config,
        Err(e) => panic!("OTLP config: {e}"),
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"))
}

/// The running shop: mesh-control, the three services, the receiver, one metrics
/// registry shared by the services (one process), the shopper's mesh client.
struct Shop {
    control: ServerHandle,
    receiver: Receiver,
    frontend_t: Telemetry,
    catalog_t: Telemetry,
    payment_t: Telemetry,
    registry: MetricsRegistry,
    catalog_xds: XdsClient,
    shopper: Client,
    catalog_addr: SocketAddr,
    payment_addr: SocketAddr,
    payment: Arc<FirstCallFails>,
    serving: Vec<Serving>,
    _dir: tempfile::TempDir,
}

impl Shop {
    /// Starts the shop with `legacy` (a non-mesh service, already listening) as a
    /// declared service when given, and the frontend calling `next`.
    async fn start(next: &'static str, legacy: Option<SocketAddr>) -> Shop {
        Shop::start_with(next, legacy, None).await
    }

    async fn start_with(
        next: &'static str,
        legacy: Option<SocketAddr>,
        receiver: Option<(Receiver, SocketAddr, SocketAddr)>,
    ) -> Shop {
        let (receiver, grpc, http) = match receiver {
            Some(r) => r,
            None => support::otlp::receiver().await,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml = shop_yaml(legacy);
        std::fs::write(dir.path().join("shop.yaml"), &yaml).expect("write shop.yaml");
        let control = mesh_control::Server::builder()
            .config_dir(dir.path())
            .lease_check_interval(Duration::from_millis(20))
            .start()
            .await
            .expect("start mesh-control");
        assert_eq!(
            control.status()["diagnostics"],
            serde_json::json!([]),
            "mesh-control rejects the test's YAML:\n{yaml}"
        );
        let xds = |node: &str| {
            let json = control.bootstrap_json(node, NAMESPACE);
            XdsClient::start(Bootstrap::from_json(&json).expect("bootstrap"))
        };
        let registry = MetricsRegistry::new();
        let telemetry = |identity: Identity, config: &OtelConfig| {
            Telemetry::builder(identity)
                .otel(config)
                .unwrap_or_else(|e| panic!("tracer: {e}"))
                .metrics(&registry)
                .build()
        };
        let admin = control.admin_addr().to_string();
        let mut serving = Vec::new();

        // payment (gRPC), exporting over OTLP/gRPC.
        let payment_t = telemetry(
            Identity::new("payment", NAMESPACE)
                .with_label("app", "payment")
                .with_version("v1"),
            &otlp(grpc, OtlpProtocol::Grpc),
        );
        let payment = Arc::new(FirstCallFails::default());
        let listener = bind().await;
        let payment_addr = listener.local_addr().expect("addr");
        let app = tower::Layer::layer(
            &ServerLayer::new(ServerContext::new("payment", NAMESPACE, "payment-1"))
                .telemetry(payment_t.clone()),
            support::payment_routes_of_arc(Arc::clone(&payment)),
        );
        let registration = Registration::new(&admin, "payment")
            .namespace(NAMESPACE)
            .label("version", "v1");
        serving.push(
            proxyless::serve(listener, registration, app)
                .await
                .expect("serve payment"),
        );

        // catalog (HTTP) → payment, exporting over OTLP/HTTP.
        let catalog_xds = xds("catalog-1");
        let catalog_t = telemetry(
            Identity::from_bootstrap(catalog_xds.bootstrap(), "catalog")
                .with_label("app", "catalog")
                .with_version("v1"),
            &otlp(http, OtlpProtocol::HttpProtobuf),
        );
        let channel: TracedClient<tonic::body::Body> =
            Client::new(catalog_xds.clone()).with_telemetry(catalog_t.clone());
        let state = Catalog {
            payment: PaymentClient::with_origin(channel, "http://payment".parse().expect("uri")),
            orders: Arc::default(),
        };
        let app = Router::new()
            .route("/items", get(items))
            .with_state(state)
            .layer(
                ServerLayer::from_bootstrap(catalog_xds.bootstrap(), "catalog")
                    .telemetry(catalog_t.clone()),
            );
        let listener = bind().await;
        let catalog_addr = listener.local_addr().expect("addr");
        let registration = Registration::from_bootstrap(catalog_xds.bootstrap(), "catalog")
            .expect("registration")
            .label("version", "v1");
        serving.push(
            proxyless::serve(listener, registration, app)
                .await
                .expect("serve catalog"),
        );

        // frontend (HTTP) → catalog or legacy, exporting over OTLP/gRPC.
        let frontend_xds = xds("frontend-1");
        let frontend_t = telemetry(
            Identity::from_bootstrap(frontend_xds.bootstrap(), "frontend")
                .with_label("app", "frontend")
                .with_version("v1"),
            &otlp(grpc, OtlpProtocol::Grpc),
        );
        let state = Frontend {
            client: Client::new(frontend_xds.clone()).with_telemetry(frontend_t.clone()),
            next,
        };
        let app = Router::new()
            .route("/checkout", get(checkout))
            .with_state(state)
            .layer(
                ServerLayer::from_bootstrap(frontend_xds.bootstrap(), "frontend")
                    .telemetry(frontend_t.clone()),
            );
        let registration = Registration::from_bootstrap(frontend_xds.bootstrap(), "frontend")
            .expect("registration")
            .label("version", "v1");
        serving.push(
            proxyless::serve(bind().await, registration, app)
                .await
                .expect("serve frontend"),
        );

        // The shopper: a mesh client without telemetry (the frontend span is the root).
        let shopper_xds = xds("shopper-1");
        for (xds, service, cluster) in [
            (&shopper_xds, "frontend", FRONTEND_CLUSTER),
            (
                &frontend_xds,
                next,
                &*format!("outbound|80||{next}.shop.svc.cluster.local"),
            ),
            (&catalog_xds, "payment", PAYMENT_CLUSTER),
        ] {
            tokio::time::timeout(DEADLINE, xds.wait_for_listener(service))
                .await
                .unwrap_or_else(|_| panic!("listener {service} within {DEADLINE:?}"))
                .unwrap_or_else(|e| panic!("listener {service}: {e}"));
            eventually_named(&format!("an endpoint of {cluster}"), DEADLINE, || {
                xds.snapshot()
                    .endpoints
                    .get(cluster)
                    .is_some_and(|c| c.endpoint_count() == 1)
            })
            .await;
        }
        registry.watch_xds(&frontend_xds);
        Shop {
            control,
            receiver,
            frontend_t,
            catalog_t,
            payment_t,
            registry,
            catalog_xds,
            shopper: Client::new(shopper_xds),
            catalog_addr,
            payment_addr,
            payment,
            serving,
            _dir: dir,
        }
    }

    /// One checkout through the mesh: the frontend's answer.
    async fn checkout(&self) -> String {
        let (status, body) = self.get("http://frontend/checkout").await;
        assert_eq!(status, StatusCode::OK, "checkout failed: {body}");
        body
    }

    /// A GET through the shopper's mesh client.
    async fn get(&self, uri: &str) -> (StatusCode, String) {
        let req = Request::get(uri).body(Full::default()).expect("request");
        let resp = self
            .shopper
            .clone()
            .oneshot(req)
            .await
            .unwrap_or_else(|e| panic!("GET {uri}: {e}"));
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn telemetries(&self) -> [&Telemetry; 3] {
        [&self.frontend_t, &self.catalog_t, &self.payment_t]
    }

    async fn shutdown(self) {
        for s in self.serving {
            s.shutdown().await.expect("shutdown");
        }
        for t in [self.frontend_t, self.catalog_t, self.payment_t] {
            t.shutdown().await.expect("tracer shutdown");
        }
        drop(self.control);
    }
}

/// A plain HTTP/1.1 GET (no mesh, no trace context).
async fn plain_get(uri: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let client: HyperClient<HttpConnector, Full<Bytes>> =
        HyperClient::builder(TokioExecutor::new()).build_http();
    let mut req = Request::get(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::default()).expect("request"))
        .await
        .unwrap_or_else(|e| panic!("GET {uri}: {e}"));
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn attempts_of<'a>(spans: &'a [Got], service: &str) -> Vec<&'a Got> {
    let mut attempts: Vec<_> = find(spans, service, SpanKind::Client)
        .into_iter()
        .filter(|s| s.attributes.contains_key("mesh.attempt"))
        .collect();
    attempts.sort_by_key(|s| s.attr("mesh.attempt").parse::<u32>().unwrap_or(0));
    attempts
}

fn call_of<'a>(spans: &'a [Got], service: &str) -> &'a Got {
    let calls: Vec<_> = find(spans, service, SpanKind::Client)
        .into_iter()
        .filter(|s| !s.attributes.contains_key("mesh.attempt"))
        .collect();
    assert_eq!(calls.len(), 1, "{service} makes one call: {spans:#?}");
    calls[0]
}

/// Asserts catalog's call to payment: the decision record, two attempts (the first
/// UNAVAILABLE, the retry OK), each the parent of one payment SERVER span.
fn assert_payment_call(spans: &[Got], shop: &Shop, parent: &Got) {
    let call = call_of(spans, "catalog");
    assert_eq!(
        call.parent, parent.span_id,
        "catalog's call is a child of its server span"
    );
    assert_eq!(call.name, "shop.Payment/Pay");
    assert_eq!(call.attr("rpc.system"), "grpc");
    assert_eq!(call.attr("rpc.grpc.status_code"), "0");
    // The decision record.
    assert_eq!(call.attr("mesh.listener"), "payment");
    assert_eq!(call.attr("mesh.route"), "pay");
    assert_eq!(call.attr("mesh.cluster"), PAYMENT_CLUSTER);
    assert_eq!(call.attr("mesh.endpoint"), shop.payment_addr.to_string());
    assert_eq!(call.attr("mesh.lb_policy"), "ROUND_ROBIN");
    assert_eq!(call.attr("mesh.attempts"), "2");
    assert_eq!(call.attr("mesh.retry.reasons"), "unavailable");
    let versions = shop.catalog_xds.snapshot().versions.clone();
    for (key, version) in [
        ("mesh.config.version.lds", versions.listeners.to_string()),
        (
            "mesh.config.version.rds",
            versions.route_configs.to_string(),
        ),
        ("mesh.config.version.cds", versions.clusters.to_string()),
        ("mesh.config.version.eds", versions.endpoints.to_string()),
    ] {
        assert!(!version.is_empty(), "{key}");
        assert_eq!(call.attr(key), version, "{key}");
    }
    assert!(call.events.iter().any(|e| e == "retry"), "{call:#?}");
    assert!(!call.error, "the call succeeded after its retry");

    // One child span per attempt.
    let attempts = attempts_of(spans, "catalog");
    assert_eq!(attempts.len(), 2, "one child span per attempt: {spans:#?}");
    for (i, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt.parent, call.span_id);
        assert_eq!(attempt.attr("mesh.attempt"), (i + 1).to_string());
        assert_eq!(attempt.attr("mesh.cluster"), PAYMENT_CLUSTER);
        assert_eq!(
            attempt.attr("network.peer.port"),
            shop.payment_addr.port().to_string()
        );
    }
    assert_eq!(attempts[0].attr("rpc.grpc.status_code"), "14");
    assert!(attempts[0].error);
    assert_eq!(attempts[1].attr("http.request.resend_count"), "1");
    assert_eq!(attempts[1].attr("rpc.grpc.status_code"), "0");
    assert!(!attempts[1].error);

    // Each attempt reached payment: its SERVER span is the attempt's child.
    let servers = find(spans, "payment", SpanKind::Server);
    assert_eq!(servers.len(), 2, "{spans:#?}");
    for (attempt, code) in [(attempts[0], "14"), (attempts[1], "0")] {
        let server = servers
            .iter()
            .find(|s| s.parent == attempt.span_id)
            .unwrap_or_else(|| panic!("no payment span under attempt {attempt:#?}"));
        assert_eq!(server.attr("rpc.grpc.status_code"), code);
        assert_eq!(server.name, "shop.Payment/Pay");
    }
}

fn span_count(spans: &[Got], service: &str) -> usize {
    spans.iter().filter(|s| s.service == service).count()
}

// ---------------------------------------------------------------------------------------
// Criterion 1: one trace through three services, the decision record, attempt spans.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_is_one_trace_with_the_decision_record_and_a_span_per_attempt() {
    let shop = Shop::start("catalog", None).await;
    assert_eq!(shop.checkout().await, "frontend > catalog > payment");
    assert_eq!(shop.payment.calls.load(Ordering::SeqCst), 2, "one retry");

    // frontend: server + call + attempt; catalog: server + call + 2 attempts;
    // payment: a server span per attempt.
    let spans = shop
        .receiver
        .wait_for(&shop.telemetries(), DEADLINE, |s| {
            span_count(s, "frontend") == 3
                && span_count(s, "catalog") == 4
                && span_count(s, "payment") == 2
        })
        .await;
    let traces: BTreeSet<_> = spans.iter().map(|s| s.trace_id.clone()).collect();
    assert_eq!(traces.len(), 1, "one trace: {spans:#?}");
    let services: BTreeSet<_> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["catalog", "frontend", "payment"]),
        "each span carries its own service's name"
    );

    // frontend SERVER (root) → frontend call → its attempt → catalog SERVER.
    let f_server = one(&spans, "frontend", SpanKind::Server);
    assert!(f_server.parent.is_empty(), "the frontend span is the root");
    assert_eq!(f_server.attr("http.request.method"), "GET");
    assert_eq!(f_server.attr("url.path"), "/checkout");
    assert_eq!(f_server.attr("http.response.status_code"), "200");
    let f_call = call_of(&spans, "frontend");
    assert_eq!(f_call.parent, f_server.span_id);
    assert_eq!(f_call.attr("mesh.route"), "browse");
    assert_eq!(f_call.attr("mesh.cluster"), CATALOG_CLUSTER);
    assert_eq!(f_call.attr("mesh.endpoint"), shop.catalog_addr.to_string());
    assert_eq!(f_call.attr("mesh.attempts"), "1");
    assert_eq!(f_call.attr("server.address"), "catalog");
    assert_eq!(f_call.attr("http.response.status_code"), "200");
    let f_attempts = attempts_of(&spans, "frontend");
    assert_eq!(f_attempts.len(), 1);
    assert_eq!(f_attempts[0].parent, f_call.span_id);
    let c_server = one(&spans, "catalog", SpanKind::Server);
    assert_eq!(c_server.parent, f_attempts[0].span_id);
    assert_eq!(c_server.attr("url.path"), "/items");

    // catalog → payment, retried once.
    assert_payment_call(&spans, &shop, c_server);
    shop.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Criterion 2: a foreign OpenTelemetry hop in the middle keeps one tree.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_mesh_hop_with_the_opentelemetry_sdk_keeps_the_trace_one_tree() {
    let (receiver, grpc, http) = receiver().await;
    // legacy: not in the mesh (plain hyper, plain OpenTelemetry SDK, W3C propagation);
    // declared to the mesh by a ServiceEntry with its address. It calls catalog by
    // address, passing the trace context on.
    let legacy_provider = sdk_tracer_provider("legacy", grpc);
    let tracer = legacy_provider.tracer("legacy");
    let catalog_at: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let target = Arc::clone(&catalog_at);
    let legacy_app = Router::new().route(
        "/{*path}",
        get(move |req: axum::extract::Request| {
            let tracer = tracer.clone();
            let target = *target.lock().expect("target");
            async move {
                let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
                let parent =
                    propagator.extract(&opentelemetry_http::HeaderExtractor(req.headers()));
                let span = tracer
                    .span_builder("legacy items")
                    .with_kind(OtelSpanKind::Server)
                    .start_with_context(&tracer, &parent);
                let cx = parent.with_span(span);
                let Some(catalog) = target else {
                    return (StatusCode::SERVICE_UNAVAILABLE, "no catalog".to_owned());
                };
                let client: HyperClient<HttpConnector, Full<Bytes>> =
                    HyperClient::builder(TokioExecutor::new()).build_http();
                let mut out = Request::get(format!("http://{catalog}/items"))
                    .header(http::header::HOST, "catalog")
                    .body(Full::default())
                    .expect("request");
                propagator.inject_context(
                    &cx,
                    &mut opentelemetry_http::HeaderInjector(out.headers_mut()),
                );
                let (status, body) = match client.request(out).await {
                    Ok(resp) => {
                        let status = resp.status();
                        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                        (status, body.unwrap_or_default())
                    }
                    Err(e) => (StatusCode::BAD_GATEWAY, Bytes::from(e.to_string())),
                };
                cx.span().end();
                (
                    status,
                    format!("legacy > {}", String::from_utf8_lossy(&body)),
                )
            }
        }),
    );
    let listener = bind().await;
    let legacy = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, legacy_app).await });

    let shop = Shop::start_with("legacy", Some(legacy), Some((receiver, grpc, http))).await;
    *catalog_at.lock().expect("target") = Some(shop.catalog_addr);
    assert_eq!(
        shop.checkout().await,
        "frontend > legacy > catalog > payment"
    );
    let provider = legacy_provider.clone();
    tokio::task::spawn_blocking(move || provider.force_flush())
        .await
        .expect("flush task")
        .expect("flush legacy spans");
    let spans = shop
        .receiver
        .wait_for(&shop.telemetries(), DEADLINE, |s| {
            span_count(s, "frontend") == 3
                && span_count(s, "legacy") == 1
                && span_count(s, "catalog") == 4
                && span_count(s, "payment") == 2
        })
        .await;
    let traces: BTreeSet<_> = spans.iter().map(|s| s.trace_id.clone()).collect();
    assert_eq!(traces.len(), 1, "one trace: {spans:#?}");
    let f_attempts = attempts_of(&spans, "frontend");
    assert_eq!(f_attempts.len(), 1);
    assert_eq!(
        call_of(&spans, "frontend").attr("mesh.cluster"),
        "outbound|80||legacy.shop.svc.cluster.local"
    );
    let legacy_span = one(&spans, "legacy", SpanKind::Server);
    assert_eq!(
        legacy_span.parent, f_attempts[0].span_id,
        "the foreign service continues the mesh's traceparent"
    );
    let c_server = one(&spans, "catalog", SpanKind::Server);
    assert_eq!(
        c_server.parent, legacy_span.span_id,
        "the mesh continues the foreign traceparent"
    );
    assert_payment_call(&spans, &shop, c_server);
    // Every span but the root has its parent in the trace: one tree.
    let ids: HashSet<_> = spans.iter().map(|s| s.span_id.clone()).collect();
    let roots: Vec<_> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "{spans:#?}");
    assert!(
        spans
            .iter()
            .all(|s| s.parent.is_empty() || ids.contains(&s.parent))
    );
    shop.shutdown().await;
    let _ = legacy_provider.shutdown();
}

// ---------------------------------------------------------------------------------------
// Criterion 3: /metrics after a known workload.
// ---------------------------------------------------------------------------------------

async fn scrape(metrics: &MetricsServer) -> String {
    let (status, body) = plain_get(&format!("http://{}/metrics", metrics.local_addr()), &[]).await;
    assert_eq!(status, StatusCode::OK);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_workload_exactly_with_istios_names_and_labels() {
    const CHECKOUTS: usize = 5;
    const MISSING: usize = 3;
    let shop = Shop::start("catalog", None).await;
    let metrics = serve_metrics("127.0.0.1:0".parse().expect("addr"), shop.registry.clone())
        .await
        .expect("serve /metrics");
    for _ in 0..CHECKOUTS {
        assert_eq!(shop.checkout().await, "frontend > catalog > payment");
    }
    for _ in 0..MISSING {
        let (status, _) = shop.get("http://frontend/no-such-page").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    // A request whose deadline has passed when it arrives: answered by catalog's
    // server stack (504), never reaching the app, and still counted (flag DT).
    let (status, _) = plain_get(
        &format!("http://{}/items", shop.catalog_addr),
        &[("x-envoy-expected-rq-timeout-ms", "0"), ("host", "catalog")],
    )
    .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        shop.payment.calls.load(Ordering::SeqCst),
        2 * CHECKOUTS as u64
    );

    let n = |k: usize| k as f64;
    let requests = "istio_requests_total";
    let expected: Vec<(Vec<(&str, &str)>, f64)> = vec![
        // The frontend as the destination of the shopper (no telemetry: unknown).
        (
            vec![
                ("reporter", "destination"),
                ("destination_workload", "frontend"),
                ("response_code", "200"),
            ],
            n(CHECKOUTS),
        ),
        (
            vec![
                ("reporter", "destination"),
                ("destination_workload", "frontend"),
                ("response_code", "404"),
            ],
            n(MISSING),
        ),
        // frontend → catalog, as both sides report it (plaintext: the client
        // verified no server identity).
        (
            vec![
                ("reporter", "source"),
                ("source_workload", "frontend"),
                ("destination_service_name", "catalog"),
                ("destination_principal", "unknown"),
                ("response_code", "200"),
            ],
            n(CHECKOUTS),
        ),
        (
            vec![
                ("reporter", "destination"),
                ("source_workload", "frontend"),
                ("destination_workload", "catalog"),
                ("response_code", "200"),
                ("request_protocol", "http"),
            ],
            n(CHECKOUTS),
        ),
        (
            vec![
                ("reporter", "destination"),
                ("destination_workload", "catalog"),
                ("response_code", "504"),
                ("response_flags", "DT"),
            ],
            1.0,
        ),
        // catalog → payment: one request per checkout at the source (retries are
        // inside it), two at the destination (each attempt).
        (
            vec![
                ("reporter", "source"),
                ("source_workload", "catalog"),
                ("destination_service", "payment.shop.svc.cluster.local"),
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", "0"),
            ],
            n(CHECKOUTS),
        ),
        (
            vec![
                ("reporter", "destination"),
                ("source_workload", "catalog"),
                ("destination_workload", "payment"),
                ("grpc_response_status", "14"),
            ],
            n(CHECKOUTS),
        ),
        (
            vec![
                ("reporter", "destination"),
                ("source_workload", "catalog"),
                ("destination_workload", "payment"),
                ("grpc_response_status", "0"),
            ],
            n(CHECKOUTS),
        ),
    ];
    let all_requests = n(CHECKOUTS + MISSING) + n(CHECKOUTS) * 2.0 + 1.0 + n(CHECKOUTS) * 3.0;
    // The last response may still be finishing on the server side: wait for the
    // counts (they only grow, so a match is final).
    let scraped = Arc::new(Mutex::new(String::new()));
    eventually_async("the workload counted in /metrics", DEADLINE, || {
        let metrics = &metrics;
        let scraped = Arc::clone(&scraped);
        async move {
            let text = scrape(metrics).await;
            let done = total(&parse(&text), requests, &[]) >= all_requests;
            *scraped.lock().expect("scraped") = text;
            done
        }
    })
    .await;
    let text = scraped.lock().expect("scraped").clone();
    let samples = parse(&text);
    for (filter, want) in &expected {
        assert_eq!(
            total(&samples, requests, filter),
            *want,
            "{requests} {filter:?} in\n{text}"
        );
    }
    assert_eq!(total(&samples, requests, &[]), all_requests, "{text}");

    // Names and label sets are Istio's.
    assert_eq!(ISTIO_LABELS, ISTIO_STANDARD_LABELS);
    let istio_labels: BTreeSet<&str> = ISTIO_STANDARD_LABELS.into_iter().collect();
    // The exposition is OpenMetrics (what prometheus-client writes and Prometheus
    // negotiates): the counter family `istio_requests` has the samples
    // `istio_requests_total`, the name Istio's dashboards query.
    for (family, kind) in [
        ("istio_requests", "counter"),
        ("istio_request_duration_milliseconds", "histogram"),
        ("istio_request_bytes", "histogram"),
        ("istio_response_bytes", "histogram"),
    ] {
        let declared = format!("# TYPE {family} {kind}");
        assert!(text.lines().any(|l| l == declared), "{declared} in\n{text}");
    }
    let istio: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name.starts_with("istio_"))
        .collect();
    assert!(!istio.is_empty());
    for s in &istio {
        let keys: BTreeSet<&str> = s
            .labels
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "le")
            .collect();
        assert_eq!(keys, istio_labels, "labels of {s:?}");
        assert!(
            ISTIO_STANDARD_SAMPLES.contains(&s.name.as_str()),
            "unexpected metric {}",
            s.name
        );
    }
    // Every request is in each histogram once, series by series.
    for s in istio.iter().filter(|s| s.name == requests) {
        for histogram in [
            "istio_request_duration_milliseconds",
            "istio_request_bytes",
            "istio_response_bytes",
        ] {
            let count = samples
                .iter()
                .find(|c| c.name == format!("{histogram}_count") && c.labels == s.labels)
                .unwrap_or_else(|| panic!("no {histogram}_count for {s:?}"));
            assert_eq!(count.value, s.value, "{histogram}_count of {:?}", s.labels);
            let mut inf = s.labels.clone();
            inf.insert("le".into(), "+Inf".into());
            let bucket = samples
                .iter()
                .find(|c| c.name == format!("{histogram}_bucket") && c.labels == inf)
                .unwrap_or_else(|| panic!("no {histogram}_bucket le=+Inf for {s:?}"));
            assert_eq!(bucket.value, s.value);
        }
    }

    // The mesh's own: one retry per checkout, for the reason that caused it.
    assert_eq!(
        total(
            &samples,
            "proxyless_retries_total",
            &[("cluster_name", PAYMENT_CLUSTER), ("reason", "unavailable")]
        ),
        n(CHECKOUTS),
        "{text}"
    );
    assert_eq!(
        total(&samples, "proxyless_retries_total", &[]),
        n(CHECKOUTS)
    );
    assert_eq!(
        total(
            &samples,
            "proxyless_deadline_drops_total",
            &[("direction", "inbound")]
        ),
        1.0
    );
    assert!(
        text.contains("proxyless_xds_connected"),
        "the frontend's xDS client is watched: {text}"
    );

    // The expired request is traced too: catalog's server span says why.
    let spans = shop
        .receiver
        .wait_for(&shop.telemetries(), DEADLINE, |s| {
            s.iter().any(|g| {
                g.service == "catalog"
                    && g.attributes
                        .get("http.response.status_code")
                        .map(String::as_str)
                        == Some("504")
            })
        })
        .await;
    let expired = spans
        .iter()
        .find(|g| {
            g.service == "catalog"
                && g.attributes
                    .get("http.response.status_code")
                    .map(String::as_str)
                    == Some("504")
        })
        .expect("the expired request's span");
    assert!(expired.is(SpanKind::Server));
    assert_eq!(expired.attr("mesh.response_flags"), "DT");
    assert!(expired.error);
    metrics.shutdown().await;
    shop.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Criterion 6: the shop demo exports to OTEL_EXPORTER_OTLP_ENDPOINT.
// ---------------------------------------------------------------------------------------

/// The shop demo binary (`target/<profile>/examples/shop`), built by cargo first (a
/// no-op after `cargo test`, which builds the examples).
fn shop_demo_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/observability-<hash>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .to_path_buf();
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args(["build", "--example", "shop", "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // Cargo gives a test process variables of its own (`CARGO_MANIFEST_DIR`, ...);
    // some build scripts rerun when those change (ring's does), so the inner build
    // gets the environment a `cargo build` from a shell would have.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo_test = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
            "OUT_DIR",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix));
        if set_by_cargo_test {
            build.env_remove(key);
        }
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let out = build.output().expect("run cargo build --example shop");
    assert!(
        out.status.success(),
        "cargo build --example shop failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let binary = profile_dir
        .join("examples")
        .join(format!("shop{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.exists(), "{} was not built", binary.display());
    binary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_demo_exports_its_traces_to_the_otlp_endpoint_in_the_environment() {
    let (receiver, _grpc, http) = receiver().await;
    let binary = tokio::task::spawn_blocking(shop_demo_binary)
        .await
        .expect("build task");
    let mut demo = tokio::process::Command::new(&binary);
    for (key, _) in std::env::vars() {
        if key.starts_with("OTEL_") {
            demo.env_remove(key);
        }
    }
    // The specification's default protocol, http/protobuf: `/v1/traces` is appended.
    demo.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{http}"))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), demo.output())
        .await
        .expect("the demo finishes within 2 minutes")
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("istio_requests_total{"), "{stdout}");
    assert!(stdout.contains("/metrics"), "{stdout}");

    // The demo flushes its tracer providers before it exits: the spans are here.
    let spans = receiver.spans();
    for service in ["frontend", "catalog", "payment"] {
        assert!(
            spans
                .iter()
                .any(|s| s.service == service && s.is(SpanKind::Server)),
            "no {service} server span arrived (got {} spans)",
            spans.len()
        );
    }
    // The flaky payment instance's failures are retried: such a call has the retry
    // reason in its decision record and a child span per attempt.
    let retried = spans
        .iter()
        .find(|s| {
            s.service == "frontend"
                && s.name == "shop.Payment/Pay"
                && s.attributes.get("mesh.retry.reasons").map(String::as_str) == Some("unavailable")
        })
        .expect("a retried payment call among the demo's spans");
    let attempts = spans
        .iter()
        .filter(|s| s.parent == retried.span_id && s.attributes.contains_key("mesh.attempt"))
        .count();
    assert!(attempts >= 2, "{retried:#?} has {attempts} attempt spans");
    // A checkout is one trace across the three services.
    let mut services_by_trace: BTreeMap<&[u8], BTreeSet<&str>> = BTreeMap::new();
    for s in &spans {
        services_by_trace
            .entry(&s.trace_id)
            .or_default()
            .insert(s.service.as_str());
    }
    assert!(
        services_by_trace
            .values()
            .any(|s| ["frontend", "catalog", "payment"]
                .iter()
                .all(|n| s.contains(n))),
        "no trace spans frontend, catalog and payment"
    );
}
