//! The proxyless demo: a small shop running on an in-process mesh.
//!
//! ```text
//! cargo run --example shop
//! ```
//!
//! It starts mesh-control on a copy of `examples/mesh/` (Istio YAML), then
//! five services on loopback, each registered with the control server by
//! `proxyless::serve`:
//!
//! - `catalog` v1 and v2 (HTTP/1.1, axum): a canary split 90/10, and beta
//!   users (`x-user: beta`) always on v2;
//! - `payment` v1 and v2 (gRPC, tonic): split 70/30; a second v1 instance is
//!   flaky (about 30 % of its calls fail with UNAVAILABLE) and the payment
//!   VirtualService retries `unavailable`, preferring another endpoint, so
//!   checkouts still succeed — the summary shows how many calls were retried;
//! - `frontend` (axum), which calls catalog over HTTP and payment over gRPC
//!   through `proxyless::Client`, by name, with no addresses anywhere.
//!
//! It sends a bounded number of checkouts through the frontend, prints the
//! split it observed, rewrites the YAML to 50/50, waits for the frontend to
//! apply it, and prints the new split. Exit code 0 when every call succeeded.
//!
//! Observability: every service has its own `Telemetry` (its own
//! `service.name`), built from the standard `OTEL_*` variables. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set (for example `http://localhost:4318`,
//! Jaeger's OTLP/HTTP port; `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` for 4317) each
//! checkout is one trace: frontend → catalog and frontend → payment, with
//! the mesh's decision record on the client spans and a child span per
//! attempt (the flaky payment instance's retries show up there). Without it
//! nothing is exported. Istio's standard metrics of all services are served
//! on an ephemeral port (printed at the end with a sample).

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proxyless::layers::MeshStats;
use proxyless::telemetry::{Identity, MetricsRegistry, Telemetry};
use proxyless::{Bootstrap, Client, Registration, ServerLayer, Serving, TracedClient, XdsClient};
use tower::{Layer, ServiceExt};

mod shop {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("shop");
}

use shop::payment_client::PaymentClient;
use shop::payment_server::{Payment, PaymentServer};
use shop::{PayReply, PayRequest, StreamReply, StreamRequest};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CHECKOUTS: usize = 1000;
/// Share of calls the flaky payment instance fails, in percent.
const FLAKY_PERCENT: u64 = 30;
const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("shop demo failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), BoxError> {
    // 1. The control server, on a copy of the demo config we can edit.
    let config = tempfile::tempdir()?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mesh");
    for entry in std::fs::read_dir(&examples)? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, config.path().join(name))?;
        }
    }
    let control = proxyless::control::Server::builder()
        .config_dir(config.path())
        .start()
        .await?;
    println!(
        "mesh-control: xDS on {}, admin on {} (config: {})",
        control.xds_addr(),
        control.admin_addr(),
        examples.display()
    );
    let bootstrap = |node: &str| Bootstrap::from_json(&control.bootstrap_json(node, "shop"));
    match std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
    {
        Ok(endpoint) => println!(
            "traces: OTLP to {endpoint} (service.name frontend, catalog, payment; one trace per checkout)"
        ),
        Err(_) => println!(
            "traces: not exported (set OTEL_EXPORTER_OTLP_ENDPOINT, e.g. http://localhost:4318 for Jaeger)"
        ),
    }

    // 2. The services. Each registers itself; nobody knows an address. Each
    // has its own telemetry (service.name, OTEL_* settings); they count
    // Istio's metrics into one registry, as one process.
    let registry = MetricsRegistry::new();
    let mut services = Services {
        serving: Vec::new(),
        telemetry: Vec::new(),
        registry: registry.clone(),
    };
    for version in ["v1", "v2"] {
        let name = format!("catalog-{version}");
        catalog(&mut services, bootstrap(&name)?, version).await?;
        let name = format!("payment-{version}");
        payment(&mut services, bootstrap(&name)?, version, None).await?;
    }
    // A second payment v1 that fails some calls: the VirtualService's retries hide it.
    let flaky = Arc::new(Flaky::new(FLAKY_PERCENT));
    payment(
        &mut services,
        bootstrap("payment-v1-flaky")?,
        "v1",
        Some(Arc::clone(&flaky)),
    )
    .await?;
    // The frontend pre-warms the names it calls, so its first request does
    // not wait for discovery.
    let frontend_xds = XdsClient::start_with(
        bootstrap("frontend")?,
        proxyless::xds::ClientOptions::default().listeners(["catalog", "payment"]),
    );
    let payment_stats = frontend(&mut services, frontend_xds.clone()).await?;
    registry.watch_xds(&frontend_xds);
    let metrics =
        proxyless::telemetry::serve_metrics("127.0.0.1:0".parse()?, registry.clone()).await?;

    // 3. A user's client, also in the mesh, calls the frontend by name.
    let user_xds = XdsClient::start(bootstrap("shopper")?);
    let shopper: Client = Client::new(user_xds.clone());
    wait_until("the mesh is ready", || {
        endpoints(
            &frontend_xds,
            "outbound|80|v1|catalog.shop.svc.cluster.local",
        ) == 1
            && endpoints(
                &frontend_xds,
                "outbound|80|v2|catalog.shop.svc.cluster.local",
            ) == 1
            && endpoints(
                &frontend_xds,
                "outbound|50051|v1|payment.shop.svc.cluster.local",
            ) == 2
            && endpoints(
                &frontend_xds,
                "outbound|50051|v2|payment.shop.svc.cluster.local",
            ) == 1
    })
    .await?;
    // The frontend subscribes on first use; warm it with one call.
    checkout(&shopper, None).await?;

    println!("\n== canary: catalog 90/10, payment 70/30 ({CHECKOUTS} checkouts)");
    let before = (flaky.failures(), payment_stats.retries());
    let first = tally(&shopper, CHECKOUTS, None).await?;
    first.print();
    let first_failed = flaky.failures() - before.0;
    let first_retried = payment_stats.retries() - before.1;
    flaky.print(first_failed, first_retried);
    let beta = tally(&shopper, 50, Some("beta")).await?;
    println!(
        "   beta users (x-user: beta, 50 checkouts): catalog {:?}",
        beta.catalog
    );

    // 4. Promote the canary: rewrite the YAML; mesh-control pushes it.
    println!("\n== rewriting examples/mesh (copy) to catalog 50/50, payment 50/50");
    let shop_yaml = config.path().join("shop.yaml");
    let yaml = std::fs::read_to_string(&shop_yaml)?
        .replace("weight: 90", "weight: 50")
        .replace("weight: 10", "weight: 50")
        .replace("weight: 70", "weight: 50")
        .replace("weight: 30", "weight: 50");
    let tmp = config.path().join(".shop.yaml.tmp");
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, &shop_yaml)?;
    let changed = Instant::now();
    wait_until("the frontend applies 50/50", || {
        split_weights(&frontend_xds, "catalog.shop.svc.cluster.local:80") == [50, 50]
            && split_weights(&frontend_xds, "payment.shop.svc.cluster.local:50051") == [50, 50]
    })
    .await?;
    println!(
        "   applied by the frontend {:.1} ms after the file was written (10 ms debounce included)",
        changed.elapsed().as_secs_f64() * 1e3
    );
    let before = (flaky.failures(), payment_stats.retries());
    let second = tally(&shopper, CHECKOUTS, None).await?;
    second.print();
    flaky.print(
        flaky.failures() - before.0,
        payment_stats.retries() - before.1,
    );

    // 5. What the control server knows about its clients.
    let status = control.status();
    let clients = status["clients"].as_array().map_or(0, Vec::len);
    let acked = status["clients"].as_array().map_or(0, |cs| {
        cs.iter()
            .filter(|c| {
                c["types"]
                    .as_object()
                    .is_some_and(|ts| ts.values().all(|t| t["acked"] == true))
            })
            .count()
    });
    println!(
        "\n== mesh-control: config version {}, {clients} xDS clients, {acked} with every resource type ACKed, {} NACKs",
        status["version"], status["counters"]["nacks"]
    );

    // 6. Istio's standard metrics, as Prometheus scrapes them.
    print_metrics(metrics.local_addr(), &registry.render());

    let ok = first.errors == 0
        && second.errors == 0
        && beta.catalog.get("v2").copied() == Some(50)
        && share(&first.catalog, "v1") > 0.8
        && (0.35..0.65).contains(&share(&second.catalog, "v1"))
        && first_failed > 0
        && first_retried >= first_failed;
    for s in services.serving {
        s.shutdown().await?;
    }
    metrics.shutdown().await;
    // Export the spans still buffered (a no-op when nothing is exported).
    let flushes = services.telemetry.iter().map(Telemetry::shutdown);
    for result in futures_util::future::join_all(flushes).await {
        if let Err(e) = result {
            eprintln!("   exporting spans failed: {e}");
        }
    }
    if ok {
        println!(
            "\nsummary: all checkouts succeeded; the canary split and its promotion were observed; \
             {} payment calls failed at the flaky instance, and the frontend retried {}",
            flaky.failures(),
            payment_stats.retries()
        );
        Ok(())
    } else {
        Err("the observed splits or retries do not match the configuration (see above)".into())
    }
}

/// Checkouts observed per version.
#[derive(Default)]
struct Tally {
    catalog: BTreeMap<String, usize>,
    payment: BTreeMap<String, usize>,
    errors: usize,
    elapsed: Duration,
}

impl Tally {
    fn print(&self) {
        let n = self.catalog.values().sum::<usize>().max(1);
        let pct = |m: &BTreeMap<String, usize>, v: &str| {
            100.0 * *m.get(v).unwrap_or(&0) as f64 / n as f64
        };
        println!(
            "   catalog: v1 {:5.1}%  v2 {:5.1}%   payment: v1 {:5.1}%  v2 {:5.1}%   errors: {}   ({:.0} checkouts/s, each = 3 mesh calls)",
            pct(&self.catalog, "v1"),
            pct(&self.catalog, "v2"),
            pct(&self.payment, "v1"),
            pct(&self.payment, "v2"),
            self.errors,
            n as f64 / self.elapsed.as_secs_f64()
        );
    }
}

fn share(m: &BTreeMap<String, usize>, v: &str) -> f64 {
    let n = m.values().sum::<usize>().max(1);
    *m.get(v).unwrap_or(&0) as f64 / n as f64
}

async fn tally(shopper: &Client, n: usize, user: Option<&str>) -> Result<Tally, BoxError> {
    let mut t = Tally::default();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let shopper = shopper.clone();
        let user = user.map(str::to_owned);
        tasks.spawn(async move {
            let mut results = Vec::new();
            for _ in (worker..n).step_by(8) {
                results.push(checkout(&shopper, user.as_deref()).await);
            }
            results
        });
    }
    while let Some(results) = tasks.join_next().await {
        for r in results? {
            match r {
                Ok((c, p)) => {
                    *t.catalog.entry(c).or_default() += 1;
                    *t.payment.entry(p).or_default() += 1;
                }
                Err(e) => {
                    if t.errors == 0 {
                        eprintln!("   first error: {e}");
                    }
                    t.errors += 1;
                }
            }
        }
    }
    t.elapsed = start.elapsed();
    Ok(t)
}

/// One checkout through the frontend: returns (catalog version, payment version).
async fn checkout(shopper: &Client, user: Option<&str>) -> Result<(String, String), BoxError> {
    let mut req = http::Request::get("http://frontend/checkout");
    if let Some(user) = user {
        req = req.header("x-user", user);
    }
    let resp = shopper
        .clone()
        .oneshot(req.body(Full::new(Bytes::new()))?)
        .await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    if !status.is_success() {
        return Err(format!("frontend answered {status}: {text}").into());
    }
    let mut parts = text.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(c), Some(p)) => Ok((c.to_owned(), p.to_owned())),
        _ => Err(format!("unexpected frontend answer {text:?}").into()),
    }
}

async fn listen() -> Result<tokio::net::TcpListener, BoxError> {
    Ok(tokio::net::TcpListener::bind("127.0.0.1:0").await?)
}

/// What the demo runs: the services, their telemetry, the shared metrics registry.
struct Services {
    serving: Vec<Serving>,
    telemetry: Vec<Telemetry>,
    registry: MetricsRegistry,
}

impl Services {
    /// The telemetry of `service` (version `version`) on the node of
    /// `bootstrap`: tracing as the `OTEL_*` variables say, Istio's metrics
    /// into the shared registry.
    fn telemetry(
        &mut self,
        bootstrap: &Bootstrap,
        service: &str,
        version: &str,
    ) -> Result<Telemetry, BoxError> {
        let identity = Identity::from_bootstrap(bootstrap, service)
            .with_workload(format!("{service}-{version}"))
            .with_label("app", service)
            .with_version(version);
        let telemetry = Telemetry::builder(identity)
            .otel_env()?
            .metrics(&self.registry)
            .build();
        self.telemetry.push(telemetry.clone());
        Ok(telemetry)
    }
}

async fn catalog(
    services: &mut Services,
    bootstrap: Bootstrap,
    version: &'static str,
) -> Result<(), BoxError> {
    let telemetry = services.telemetry(&bootstrap, "catalog", version)?;
    let app = axum::Router::new()
        .route("/items", axum::routing::get(move || async move { version }))
        .layer(ServerLayer::from_bootstrap(&bootstrap, "catalog").telemetry(telemetry));
    let registration =
        Registration::from_bootstrap(&bootstrap, "catalog")?.label("version", version);
    services
        .serving
        .push(proxyless::serve(listen().await?, registration, app).await?);
    Ok(())
}

struct PaymentService {
    version: &'static str,
    /// Set on the flaky instance.
    flaky: Option<Arc<Flaky>>,
}

/// A payment instance that fails a share of its calls with UNAVAILABLE, at random
/// (a process with a bad dependency, say).
struct Flaky {
    percent: u64,
    calls: AtomicU64,
    failures: AtomicU64,
    random: RandomState,
}

impl Flaky {
    fn new(percent: u64) -> Flaky {
        Flaky {
            percent,
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            random: RandomState::new(),
        }
    }

    /// Whether this call fails (`percent` % of them, at random).
    fn fails(&self) -> bool {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let fails = self.random.hash_one(n) % 100 < self.percent;
        if fails {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        fails
    }

    fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The retries line of a tally: the calls the flaky instance failed, and the
    /// retries the frontend's payment client sent (its `MeshStats`).
    fn print(&self, failed: u64, retried: u64) {
        println!(
            "   payment retries: the flaky v1 instance failed {failed} calls with UNAVAILABLE \
             ({}% of its calls); the frontend's mesh client retried {retried}",
            self.percent
        );
    }
}

#[tonic::async_trait]
impl Payment for PaymentService {
    async fn pay(
        &self,
        request: tonic::Request<PayRequest>,
    ) -> Result<tonic::Response<PayReply>, tonic::Status> {
        if let Some(flaky) = &self.flaky
            && flaky.fails()
        {
            return Err(tonic::Status::unavailable(format!(
                "payment-{}-flaky: simulated outage",
                self.version
            )));
        }
        let req = request.into_inner();
        if req.cents <= 0 {
            return Err(tonic::Status::invalid_argument("cents must be positive"));
        }
        Ok(tonic::Response::new(PayReply {
            served_by: format!("payment-{}", self.version),
            version: self.version.into(),
        }))
    }

    type StreamStream = tokio_stream::Iter<std::vec::IntoIter<Result<StreamReply, tonic::Status>>>;

    async fn stream(
        &self,
        request: tonic::Request<StreamRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let count = request.into_inner().count.min(10_000);
        let replies: Vec<_> = (1..=count)
            .map(|seq| {
                Ok(StreamReply {
                    seq,
                    served_by: format!("payment-{}", self.version),
                })
            })
            .collect();
        Ok(tonic::Response::new(tokio_stream::iter(replies)))
    }
}

async fn payment(
    services: &mut Services,
    bootstrap: Bootstrap,
    version: &'static str,
    flaky: Option<Arc<Flaky>>,
) -> Result<(), BoxError> {
    let telemetry = services.telemetry(&bootstrap, "payment", version)?;
    let routes = tonic::service::Routes::new(PaymentServer::new(PaymentService { version, flaky }));
    let app = ServerLayer::from_bootstrap(&bootstrap, "payment")
        .telemetry(telemetry)
        .layer(routes);
    let registration =
        Registration::from_bootstrap(&bootstrap, "payment")?.label("version", version);
    services
        .serving
        .push(proxyless::serve(listen().await?, registration, app).await?);
    Ok(())
}

#[derive(Clone)]
struct Frontend {
    http: TracedClient,
    grpc: PaymentClient<TracedClient<tonic::body::Body>>,
}

/// The frontend service; returns the counters of its payment client
/// (retries, ...).
async fn frontend(services: &mut Services, xds: XdsClient) -> Result<MeshStats, BoxError> {
    let telemetry = services.telemetry(xds.bootstrap(), "frontend", "v1")?;
    let payment_channel: Client<tonic::body::Body> = Client::new(xds.clone());
    let payment_stats = payment_channel.stats().clone();
    // Client telemetry around the mesh clients: a span per call (children of
    // the frontend's server span), a child span per attempt.
    let state = Frontend {
        http: Client::new(xds.clone()).with_telemetry(telemetry.clone()),
        grpc: PaymentClient::with_origin(
            payment_channel.with_telemetry(telemetry.clone()),
            "http://payment".parse()?,
        ),
    };
    let app = axum::Router::new()
        .route("/checkout", axum::routing::get(checkout_handler))
        .with_state(state)
        .layer(ServerLayer::from_bootstrap(xds.bootstrap(), "frontend").telemetry(telemetry));
    let registration = Registration::from_bootstrap(xds.bootstrap(), "frontend")?;
    services
        .serving
        .push(proxyless::serve(listen().await?, registration, app).await?);
    Ok(payment_stats)
}

/// Prints where the metrics are served and a few `istio_requests_total`
/// series (the frontend's calls as it reports them), abridged to the labels
/// that tell them apart (every series has Istio's 25 labels).
fn print_metrics(addr: std::net::SocketAddr, text: &str) {
    println!("\n== metrics: http://{addr}/metrics (Istio's standard metrics, Prometheus format)");
    const SHOWN: [&str; 6] = [
        "reporter",
        "source_workload",
        "destination_workload",
        "response_code",
        "grpc_response_status",
        "response_flags",
    ];
    let mut series: Vec<(u64, String)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("istio_requests_total{")?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let labels: BTreeMap<&str, &str> = labels
                .split("\",")
                .filter_map(|pair| {
                    let (k, v) = pair.split_once("=\"")?;
                    Some((k, v.trim_end_matches('"')))
                })
                .collect();
            if labels.get("reporter") != Some(&"source")
                || labels.get("source_workload") != Some(&"frontend-v1")
            {
                return None;
            }
            let shown: Vec<String> = SHOWN
                .iter()
                .filter_map(|k| Some(format!("{k}=\"{}\"", labels.get(k)?)))
                .collect();
            Some((value.parse().ok()?, shown.join(",")))
        })
        .collect();
    series.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    for (value, labels) in series.iter().take(4) {
        println!("   istio_requests_total{{{labels},...}} {value}");
    }
    let retries: u64 = text
        .lines()
        .filter(|l| l.starts_with("proxyless_retries_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    println!("   proxyless_retries_total (all clusters) {retries}");
}

async fn checkout_handler(
    State(mut fe): State<Frontend>,
    headers: HeaderMap,
) -> Result<String, (http::StatusCode, String)> {
    let bad_gateway = |what: &str, e: &dyn std::fmt::Display| {
        (http::StatusCode::BAD_GATEWAY, format!("{what}: {e}"))
    };
    // Catalog over HTTP; the user header travels on, so beta routing applies.
    let mut req = http::Request::get("http://catalog/items");
    if let Some(user) = headers.get("x-user") {
        req = req.header("x-user", user);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| bad_gateway("request", &e))?;
    let resp = fe
        .http
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| bad_gateway("catalog", &e))?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| bad_gateway("catalog body", &e))?
        .to_bytes();
    let catalog_version = String::from_utf8_lossy(&body).into_owned();
    // Payment over gRPC.
    let reply = fe
        .grpc
        .pay(PayRequest {
            order_id: "o-1".into(),
            cents: 1299,
        })
        .await
        .map_err(|e| bad_gateway("payment", &e))?
        .into_inner();
    Ok(format!("{catalog_version} {}", reply.version))
}

fn endpoints(xds: &XdsClient, cluster: &str) -> usize {
    xds.snapshot()
        .endpoints
        .get(cluster)
        .map_or(0, |c| c.endpoint_count())
}

fn split_weights(xds: &XdsClient, route_config: &str) -> Vec<u32> {
    let snapshot = xds.snapshot();
    snapshot
        .route_configs
        .get(route_config)
        .and_then(|rc| {
            rc.virtual_hosts
                .iter()
                .flat_map(|vh| vh.routes.iter())
                .find(|r| r.action.clusters().len() == 2)
                .map(|r| r.action.clusters().iter().map(|c| c.weight).collect())
        })
        .unwrap_or_default()
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) -> Result<(), BoxError> {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}
