//! Local rate limiting end to end over real sockets (issue 15): Istio's
//! EnvoyFilters for `envoy.filters.http.local_ratelimit`, loaded unchanged
//! from `examples/istio-docs/`, reach a served workload's `ServerLayer` as
//! its gRFC A36 server listener, and the server answers as Envoy does: 429
//! with the config's `x-local-rate-limit: true` for HTTP, UNAVAILABLE (or
//! RESOURCE_EXHAUSTED) for gRPC.
//!
//! The client side: the `SIDECAR_OUTBOUND` shape
//! (`examples/istio-docs/local-ratelimit-client.yaml`) limits the calls the
//! selected caller makes to one host; its `proxyless::Client` answers the
//! calls over the limit itself (429 / UNAVAILABLE, flag `RL`) and the
//! backend never sees them. Both sides count refusals in
//! `proxyless_rate_limited_total{direction}`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proxyless::control::BootstrapSpec;
use proxyless::telemetry::{Identity, MetricsRegistry};
use proxyless::{Bootstrap, Client, InboundPolicy, ServerLayer, Telemetry, XdsClient};
use support::shop;
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);

/// Istio's first shape: 4 requests per 60 s for `app: productpage`.
const FILTER: &str = include_str!("../examples/istio-docs/local-ratelimit.yaml");
/// Istio's second shape: the bucket per route of `inbound|http|9080`, and a
/// descriptor for `/cart-api` (10 per 60 s; 100 per 60 s for the rest).
const ROUTE: &str = include_str!("../examples/istio-docs/local-ratelimit-route.yaml");
/// The client side: productpage's calls to reviews, 10 per 60 s.
const CLIENT: &str = include_str!("../examples/istio-docs/local-ratelimit-client.yaml");

/// A productpage workload served behind a `ServerLayer` whose inbound
/// policy comes from an embedded mesh-control.
struct Served {
    addr: SocketAddr,
    inbound: InboundPolicy,
    /// When mesh-control started: the buckets are younger than this.
    started: Instant,
    /// The server's metrics.
    registry: MetricsRegistry,
    _control: mesh_control::ServerHandle,
    _xds: XdsClient,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Served {
    /// Serves `app` as productpage under the config `yaml`; the workload is
    /// known to mesh-control as listening on port `port` (Istio's inbound
    /// virtual hosts are named by it), whatever local port it gets.
    async fn start(yaml: &str, app: axum::Router, port: u16) -> Served {
        let started = Instant::now();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
        let control = mesh_control::Server::builder()
            .config_dir(dir.path())
            .start()
            .await
            .expect("start mesh-control");
        assert_eq!(
            control.status()["diagnostics"],
            serde_json::json!([]),
            "mesh-control rejects the YAML"
        );
        let spec = BootstrapSpec::new("productpage-1", "default").label("app", "productpage");
        let bootstrap = Bootstrap::from_json(&control.bootstrap(&spec)).expect("bootstrap");
        let xds = XdsClient::start(bootstrap.clone());
        let inbound =
            InboundPolicy::from_xds(&xds, SocketAddr::from(([0, 0, 0, 0], port))).expect("policy");
        inbound
            .ready(DEADLINE)
            .await
            .expect("the server listener arrives");
        let registry = MetricsRegistry::new();
        let telemetry = Telemetry::builder(Identity::new("productpage", "default"))
            .metrics(&registry)
            .build();
        let app = app.layer(
            ServerLayer::from_bootstrap(&bootstrap, "productpage")
                .inbound(inbound.clone())
                .telemetry(telemetry),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Served {
            addr,
            inbound,
            started,
            registry,
            _control: control,
            _xds: xds,
            _dir: dir,
            task,
        }
    }

    /// The refusals counted by the server's limiter.
    fn refused(&self) -> u64 {
        self.inbound
            .current()
            .rate_limit()
            .map_or(0, |l| l.refused())
    }
}

fn http_app() -> axum::Router {
    axum::Router::new().fallback(|| async { "productpage" })
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn http_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// GET `path`: the status, the `x-local-rate-limit` header and the body.
async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> (u16, Option<String>, String) {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let header = resp
        .headers()
        .get("x-local-rate-limit")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, header, String::from_utf8_lossy(&body).into_owned())
}

/// Envoy's bound on what a bucket lets through in `elapsed`, plus one for
/// a fill landing during the run.
fn bound(max: u64, per_fill: u64, interval: Duration, elapsed: Duration) -> u64 {
    max + per_fill * (elapsed.as_nanos() / interval.as_nanos()) as u64 + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_s_filter_limits_http_requests_with_envoy_s_answer() {
    let served = Served::start(FILTER, http_app(), 9080).await;
    let client = http_client();
    let (mut passed, mut refused) = (0u64, 0u64);
    let run = Instant::now();
    while run.elapsed() < Duration::from_secs(1) {
        match get(&client, served.addr, "/productpage").await {
            (200, None, body) => {
                assert_eq!(body, "productpage");
                passed += 1;
            }
            (429, Some(h), body) => {
                assert_eq!(h, "true", "the config's response_headers_to_add");
                assert_eq!(body.trim(), "local_rate_limited", "Envoy's body");
                refused += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let elapsed = served.started.elapsed();
    let most = bound(4, 4, Duration::from_secs(60), elapsed);
    assert!(
        (4..=most).contains(&passed),
        "{passed} passed in {elapsed:?}: between max_tokens (4) and {most}"
    );
    assert!(refused > 0, "the rest were refused");
    assert_eq!(served.refused(), refused, "every refusal is counted");
    assert_eq!(
        rate_limited(&served.registry, "inbound"),
        refused,
        "and exported to Prometheus"
    );
}

/// `proxyless_rate_limited_total{direction}` in `registry`'s exposition.
fn rate_limited(registry: &MetricsRegistry, direction: &str) -> u64 {
    let series = format!("proxyless_rate_limited_total{{direction=\"{direction}\"}} ");
    registry
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0, |v| v.trim().parse().expect("a count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refusals_are_unavailable_or_resource_exhausted() {
    for (yaml, code) in [
        (FILTER.to_owned(), tonic::Code::Unavailable),
        (
            FILTER.replace(
                "              stat_prefix: http_local_rate_limiter\n",
                "              stat_prefix: http_local_rate_limiter\n              \
                 rate_limited_as_resource_exhausted: true\n",
            ),
            tonic::Code::ResourceExhausted,
        ),
    ] {
        let app = support::payment_routes(support::PaymentServer::new("productpage", "v1"))
            .into_axum_router();
        let served = Served::start(&yaml, app, 9080).await;
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", served.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut client = shop::payment_client::PaymentClient::new(channel);
        let mut passed = 0u64;
        let mut refused = 0u64;
        for _ in 0..12 {
            match client.pay(shop::PayRequest::default()).await {
                Ok(_) => passed += 1,
                Err(status) => {
                    assert_eq!(status.code(), code, "{status:?}");
                    assert_eq!(status.message(), "local_rate_limited");
                    refused += 1;
                }
            }
        }
        let most = bound(4, 4, Duration::from_secs(60), served.started.elapsed());
        assert!((4..=most).contains(&passed), "{passed} passed");
        assert_eq!(passed + refused, 12);
        assert_eq!(served.refused(), refused);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_s_route_shape_limits_cart_api_by_its_descriptor() {
    let served = Served::start(ROUTE, http_app(), 9080).await;
    let client = http_client();
    let mut cart = 0u64;
    for _ in 0..15 {
        match get(&client, served.addr, "/cart-api/items").await {
            (200, _, _) => cart += 1,
            (429, Some(h), _) => assert_eq!(h, "true"),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let most = bound(10, 10, Duration::from_secs(60), served.started.elapsed());
    assert!((10..=most).contains(&cart), "{cart} cart requests passed");
    // Other paths take the default bucket (100), which the cart requests
    // that passed also took from (always_consume_default_token_bucket).
    for _ in 0..20 {
        let (status, _, _) = get(&client, served.addr, "/productpage").await;
        assert_eq!(
            status, 200,
            "other paths are not limited by the cart bucket"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_shape_limits_only_its_port() {
    // Known as listening on 8080: the patch for inbound|http|9080 does not
    // apply, and the filter alone (no bucket, 0% enabled) limits nothing.
    let served = Served::start(ROUTE, http_app(), 8080).await;
    assert!(served.inbound.current().rate_limit().is_none());
    let client = http_client();
    for _ in 0..15 {
        let (status, _, _) = get(&client, served.addr, "/cart-api/items").await;
        assert_eq!(status, 200);
    }
}

/// A backend on 127.0.0.1 answering `200 reviews` (HTTP) and counting the
/// requests it received.
async fn counting_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let seen = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&seen);
    let app = axum::Router::new().fallback(move || {
        count.fetch_add(1, Ordering::SeqCst);
        async { "reviews" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

/// The client-side example with reviews' endpoint at `addr`, and a second
/// service, ratings, at the same address that nothing limits.
fn client_yaml(addr: SocketAddr) -> String {
    let envoy_filter = CLIENT
        .split("\n---\n")
        .find(|d| d.contains("kind: EnvoyFilter"))
        .expect("the EnvoyFilter");
    let service = |name: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: default
spec:
  hosts:
  - {name}.default.svc.cluster.local
  ports:
  - number: 9080
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: {ip}
    ports: {{http: {port}}}
",
            ip = addr.ip(),
            port = addr.port()
        )
    };
    format!(
        "{}---\n{}---\n{envoy_filter}\n",
        service("reviews"),
        service("ratings")
    )
}

/// mesh-control on `yaml` and the xDS client of a caller with `labels` in
/// namespace `default`.
async fn caller(
    yaml: &str,
    labels: &[(&str, &str)],
) -> (mesh_control::ServerHandle, XdsClient, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
    let control = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start mesh-control");
    assert_eq!(
        control.status()["diagnostics"],
        serde_json::json!([]),
        "mesh-control rejects the YAML"
    );
    let mut spec = BootstrapSpec::new("caller-1", "default");
    for (k, v) in labels {
        spec = spec.label(*k, *v);
    }
    let bootstrap = Bootstrap::from_json(&control.bootstrap(&spec)).expect("bootstrap");
    let xds = XdsClient::start(bootstrap);
    (control, xds, dir)
}

/// GET `uri` through `client`: the status, `x-local-rate-limit`, the body.
async fn call<S, B>(client: &S, uri: &str) -> (u16, Option<String>, String)
where
    S: tower::Service<http::Request<Full<Bytes>>, Response = http::Response<B>> + Clone + Send,
    S::Error: std::fmt::Display,
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let req = http::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = client
        .clone()
        .oneshot(req)
        .await
        .unwrap_or_else(|e| panic!("GET {uri}: {e}"));
    let status = resp.status().as_u16();
    let header = resp
        .headers()
        .get("x-local-rate-limit")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, header, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_shape_limits_the_callers_calls_in_its_own_client() {
    let (addr, backend) = counting_backend().await;
    let started = Instant::now();
    let (_control, xds, _dir) = caller(&client_yaml(addr), &[("app", "productpage")]).await;
    let registry = MetricsRegistry::new();
    let telemetry = Telemetry::builder(Identity::new("productpage", "default"))
        .metrics(&registry)
        .build();
    let client = Client::new(xds).with_telemetry(telemetry);
    let reviews = "http://reviews.default.svc.cluster.local:9080/reviews/1";
    let (mut passed, mut refused) = (0u64, 0u64);
    for _ in 0..30 {
        match call(&client, reviews).await {
            (200, None, body) => {
                assert_eq!(body, "reviews");
                passed += 1;
            }
            (429, Some(h), body) => {
                assert_eq!(h, "true", "the config's response_headers_to_add");
                assert_eq!(body.trim(), "local_rate_limited", "Envoy's body");
                refused += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let most = bound(10, 10, Duration::from_secs(60), started.elapsed());
    assert!(
        (10..=most).contains(&passed),
        "{passed} passed: between max_tokens (10) and {most}"
    );
    assert_eq!(passed + refused, 30);
    let seen = backend.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(seen, passed, "refused calls never reach the backend");
    assert_eq!(
        rate_limited(&registry, "outbound"),
        refused,
        "every refusal is counted, flag RL"
    );
    // The caller's calls to another host are not limited.
    for _ in 0..15 {
        let (status, _, _) = call(&client, "http://ratings.default.svc.cluster.local:9080/").await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        backend.load(std::sync::atomic::Ordering::SeqCst),
        passed + 15
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_the_selector_does_not_name_is_not_limited() {
    let (addr, backend) = counting_backend().await;
    let (_control, xds, _dir) = caller(&client_yaml(addr), &[("app", "details")]).await;
    let client: Client = Client::new(xds);
    for _ in 0..25 {
        let (status, _, _) = call(
            &client,
            "http://reviews.default.svc.cluster.local:9080/reviews/1",
        )
        .await;
        assert_eq!(status, 200, "details' calls are not limited");
    }
    assert_eq!(backend.load(std::sync::atomic::Ordering::SeqCst), 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_grpc_refusals_are_unavailable_or_resource_exhausted() {
    for (exhausted, code) in [
        (false, tonic::Code::Unavailable),
        (true, tonic::Code::ResourceExhausted),
    ] {
        let server = support::PaymentServer::new("reviews", "v1");
        let stats = std::sync::Arc::clone(&server.stats);
        let app = support::payment_routes(server).into_axum_router();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let mut yaml = client_yaml(addr).replace("protocol: HTTP", "protocol: GRPC");
        if exhausted {
            yaml = yaml.replace(
                "                stat_prefix: http_local_rate_limiter\n                token_bucket:",
                "                stat_prefix: http_local_rate_limiter\n                \
                 rate_limited_as_resource_exhausted: true\n                token_bucket:",
            );
        }
        let started = Instant::now();
        let (_control, xds, _dir) = caller(&yaml, &[("app", "productpage")]).await;
        let channel: Client<tonic::body::Body> = Client::new(xds);
        let mut client = shop::payment_client::PaymentClient::with_origin(
            channel,
            "http://reviews.default.svc.cluster.local:9080"
                .parse()
                .expect("uri"),
        );
        let (mut passed, mut refused) = (0u64, 0u64);
        for _ in 0..20 {
            match client.pay(shop::PayRequest::default()).await {
                Ok(_) => passed += 1,
                Err(status) => {
                    assert_eq!(status.code(), code, "{status:?}");
                    assert_eq!(status.message(), "local_rate_limited");
                    refused += 1;
                }
            }
        }
        let most = bound(10, 10, Duration::from_secs(60), started.elapsed());
        assert!((10..=most).contains(&passed), "{passed} passed");
        assert_eq!(passed + refused, 20);
        assert_eq!(stats.pays(), passed, "refused calls never reach the server");
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_push_that_keeps_the_limit_keeps_its_buckets() {
    let (addr, backend) = counting_backend().await;
    let yaml = client_yaml(addr);
    let started = Instant::now();
    let (_control, xds, dir) = caller(&yaml, &[("app", "productpage")]).await;
    let client: Client = Client::new(xds.clone());
    let reviews = "http://reviews.default.svc.cluster.local:9080/reviews/1";
    let mut passed = 0u64;
    for _ in 0..15 {
        if call(&client, reviews).await.0 == 200 {
            passed += 1;
        }
    }
    // A push that changes reviews' routes (a VirtualService with a
    // timeout) but not the limit the EnvoyFilter gives them.
    let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: default
spec:
  hosts:
  - reviews.default.svc.cluster.local
  http:
  - timeout: 5s
    route:
    - destination:
        host: reviews.default.svc.cluster.local
";
    std::fs::write(dir.path().join("mesh.yaml"), format!("{yaml}---\n{vs}"))
        .expect("rewrite mesh.yaml");
    let rc = "reviews.default.svc.cluster.local:9080";
    let pushed = tokio::time::timeout(DEADLINE, async {
        loop {
            let timeout = xds
                .snapshot()
                .route_configs
                .get(rc)
                .and_then(|r| r.virtual_hosts[0].routes[0].policy.timeout);
            if timeout == Some(Duration::from_secs(5)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(pushed.is_ok(), "the new route config arrives");
    for _ in 0..15 {
        if call(&client, reviews).await.0 == 200 {
            passed += 1;
        }
    }
    // One bucket over the whole run: a new one would have let 10 more pass.
    let most = bound(10, 10, Duration::from_secs(60), started.elapsed());
    assert!(
        (10..=most).contains(&passed),
        "{passed} of 30 passed across the push (at most {most})"
    );
    assert_eq!(backend.load(std::sync::atomic::Ordering::SeqCst), passed);
}
