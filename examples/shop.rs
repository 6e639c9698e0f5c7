//! The proxyless demo: a small shop running on an in-process, zero-trust mesh.
//!
//! ```text
//! cargo run --example shop
//! ```
//!
//! It starts mesh-control with its certificate authority (trust domain
//! `cluster.local`, a random join token per service account) on a copy of
//! `examples/mesh/` (traffic: Istio YAML) and `examples/mesh-security/`
//! (PeerAuthentication STRICT for the namespace, AuthorizationPolicy per
//! workload), then five services on loopback, each registered with the
//! control server by `proxyless::serve_with`:
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
//! Zero trust: every workload's bootstrap names its service account, its
//! labels (which AuthorizationPolicy selectors match) and its join token;
//! the workload generates a key, gets an X.509 SVID
//! (`spiffe://cluster.local/ns/shop/sa/<account>`) from mesh-control for its
//! CSR, renews it at half-life, and registers with the token. Servers only
//! accept mutual TLS (STRICT) and authorize each request by the caller's
//! SPIFFE ID: catalog and payment (`tier: backend`) answer only the
//! frontend, the frontend only the shopper (the demo's user client) on
//! `GET /checkout`. Clients switch to mTLS on their own (auto mTLS: the
//! namespace is STRICT) and check the server's identity. Each server counts
//! the peer identities it served; an `intruder` workload with a valid mesh
//! identity calls catalog (HTTP 403) and payment (gRPC PERMISSION_DENIED),
//! and a plaintext HTTP/1.1 request to catalog's port gets no HTTP answer.
//!
//! It sends a bounded number of checkouts through the frontend, prints the
//! split it observed, rewrites the YAML to 50/50, waits for the frontend to
//! apply it, prints the new split, then the zero-trust record: each
//! workload's identity and certificate, the peers each server saw, the
//! intruder's denials. Exit code 0 when every legitimate call succeeded and
//! every illegitimate one was refused.
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
//!
//! ```text
//! cargo run --example shop -- --serve      # or SHOP_SERVE=1
//! ```
//!
//! keeps the shop running for dashboards: after the services start it
//! prints one line for scrapers,
//!
//! ```text
//! SHOP-READY metrics=http://127.0.0.1:P/metrics control-metrics=https://127.0.0.1:Q/metrics control-ca=FILE control-token-file=FILE control-server-name=localhost
//! ```
//!
//! (mesh-control's `/metrics` is on its TLS admin port and needs a
//! credential: `--serve` gives its CA a read-only operator token, written
//! to `control-token-file`, to send as `Authorization: Bearer`), then sends
//! 20 checkouts a second (ordinary shoppers, so catalog v2 gets the
//! configured 10%; the flaky payment instance's retries come with them)
//! and, once a second, the intruder's denied calls and a few "chaos"
//! checkouts that the copy of the config
//! routes to fault injection, tight timeouts, a tightly limited subset with
//! outlier detection, or that arrive with their deadline passed, so every
//! panel of `docs/grafana/proxyless-mesh.json` has data. It stops cleanly
//! (exit 0) on SIGINT, SIGTERM or when stdin closes (so run it with stdin
//! open: not `< /dev/null`). tests/dashboards.rs runs Prometheus against it.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proxyless::control::BootstrapSpec;
use proxyless::control::ServerHandle;
use proxyless::control::ca::{CertificateAuthority, JoinTokens, OperatorTokens};
use proxyless::layers::MeshStats;
use proxyless::telemetry::{Identity, MetricsRegistry, Telemetry};
use proxyless::{
    Bootstrap, Client, InboundPolicy, PeerIdentity, Registration, Security, ServerLayer, Serving,
    TracedClient, WorkloadCertificates, XdsClient,
};
use tower::{Layer, ServiceExt};

use shop_proto as shop;

use shop::payment_client::PaymentClient;
use shop::payment_server::{Payment, PaymentServer};
use shop::{PayReply, PayRequest, StreamReply, StreamRequest};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CHECKOUTS: usize = 1000;
/// Share of calls the flaky payment instance fails, in percent.
const FLAKY_PERCENT: u64 = 30;
const DEADLINE: Duration = Duration::from_secs(10);
const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "shop";
/// The demo's service accounts, each with a random join token: one per
/// service, the user's client (`shopper`) and a workload no policy allows.
const ACCOUNTS: [&str; 5] = ["frontend", "catalog", "payment", "shopper", "intruder"];

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("shop demo failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), BoxError> {
    // 1. The control server with its CA, on a copy of the demo config we can
    // edit: traffic (examples/mesh) and security (examples/mesh-security).
    let config = tempfile::tempdir()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for dir in ["mesh", "mesh-security"] {
        for entry in std::fs::read_dir(root.join(dir))? {
            let path = entry?.path();
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, config.path().join(name))?;
            }
        }
    }
    let serve = serve_mode();
    if serve {
        add_chaos_routes(&config.path().join("shop.yaml"))?;
    }
    let mut join = JoinTokens::new();
    let mut tokens = BTreeMap::new();
    for account in ACCOUNTS {
        let token = random_token(account);
        join.insert(token.clone(), NAMESPACE, account)?;
        tokens.insert(account, token);
    }
    let mut ca = CertificateAuthority::builder(TRUST_DOMAIN).join_tokens(join);
    // --serve: a read-only operator token, so that a Prometheus outside the
    // mesh can scrape mesh-control's /metrics (TLS; reads need credentials).
    let operator = if serve {
        let dir = tempfile::tempdir()?;
        let token = random_token("operator");
        let file = dir.path().join("operator-token");
        std::fs::write(&file, format!("{token}\n"))?;
        ca = ca.operator_tokens(OperatorTokens::from_text(&token)?);
        Some((dir, file))
    } else {
        None
    };
    let ca = ca.build()?;
    let mut control = proxyless::control::Server::builder()
        .config_dir(config.path())
        .ca(ca);
    // `--prometheus URL`: the graph page reads a Prometheus that scrapes
    // the shop instead of the pushed summaries (tests/ui_prometheus.rs).
    if let Some(url) = prometheus_arg()? {
        control = control.prometheus(url);
    }
    let control = control.start().await?;
    println!(
        "mesh-control: xDS on {}, admin on {} (TLS; config: {} + {})",
        control.xds_addr(),
        control.admin_addr(),
        root.join("mesh").display(),
        root.join("mesh-security").display()
    );
    println!(
        "   CA: trust domain {TRUST_DOMAIN}, join tokens for {}, trust bundle {}",
        ACCOUNTS.join(", "),
        control
            .trust_bundle_file()
            .map_or_else(|| "-".to_owned(), |f| f.display().to_string())
    );
    if let Some(problems) = control.status()["diagnostics"].as_array()
        && !problems.is_empty()
    {
        for problem in problems {
            println!("   config problem: {problem}");
        }
    }
    let mesh = Mesh { control, tokens };
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

    // 2. The services. Each gets its certificate and registers itself;
    // nobody knows an address. Each has its own telemetry (service.name,
    // OTEL_* settings); they count Istio's metrics into one registry, as one
    // process.
    let registry = MetricsRegistry::new();
    let mut services = Services {
        serving: Vec::new(),
        telemetry: Vec::new(),
        registry: registry.clone(),
        workloads: Vec::new(),
        inbound: Vec::new(),
        peers: Arc::new(Peers::default()),
        graph: Vec::new(),
    };
    let mut catalog_addr = None;
    for version in ["v1", "v2"] {
        let name = format!("catalog-{version}");
        let addr = catalog(
            &mut services,
            mesh.workload(&name, "catalog").await?,
            version,
        )
        .await?;
        catalog_addr.get_or_insert(addr);
        let name = format!("payment-{version}");
        let workload = mesh.workload(&name, "payment").await?;
        payment(&mut services, workload, version, None).await?;
    }
    let catalog_addr = catalog_addr.ok_or("no catalog instance")?;
    // A second payment v1 that fails some calls: the VirtualService's retries hide it.
    let flaky = Arc::new(Flaky::new(FLAKY_PERCENT));
    payment(
        &mut services,
        mesh.workload("payment-v1-flaky", "payment").await?,
        "v1",
        Some(Arc::clone(&flaky)),
    )
    .await?;
    // The frontend pre-warms the names it calls, so its first request does
    // not wait for discovery.
    let frontend_workload = mesh
        .workload_with("frontend", "frontend", ["catalog", "payment"])
        .await?;
    let frontend_xds = frontend_workload.xds.clone();
    let payment_stats = frontend(&mut services, frontend_workload).await?;
    registry.watch_xds(&frontend_xds);
    let metrics =
        proxyless::telemetry::serve_metrics("127.0.0.1:0".parse()?, registry.clone()).await?;

    // 3. A user's client, also in the mesh (the frontend only answers its
    // identity), calls the frontend by name.
    let user = mesh.workload("shopper", "shopper").await?;
    let shopper: Client = user.client();
    services.workloads.push(("shopper".into(), user));
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
    if let Some((_dir, token_file)) = &operator {
        return serve_until_stopped(mesh, services, metrics, shopper, token_file).await;
    }

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
        "   applied by the frontend {:.1} ms after the file was written (read when the save finished)",
        changed.elapsed().as_secs_f64() * 1e3
    );
    let before = (flaky.failures(), payment_stats.retries());
    let second = tally(&shopper, CHECKOUTS, None).await?;
    second.print();
    flaky.print(
        flaky.failures() - before.0,
        payment_stats.retries() - before.1,
    );

    // 5. Zero trust: who is who, who called whom, who was turned away.
    let intruder = mesh.workload("intruder", "intruder").await?;
    let denials = Denials::attempt(&intruder).await?;
    services.workloads.push(("intruder".into(), intruder));
    let plaintext = plaintext_probe(catalog_addr).await?;
    let trust = services.print_zero_trust(&denials, &plaintext);

    // 6. What the control server knows about its clients.
    let status = mesh.control.status();
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

    // 7. Istio's standard metrics, as Prometheus scrapes them.
    print_metrics(metrics.local_addr(), &registry.render());

    let traffic_ok = first.errors == 0
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
    match (traffic_ok, trust) {
        (true, Ok(())) => {
            println!(
                "\nsummary: all checkouts succeeded over mTLS; the canary split and its promotion were observed; \
                 {} payment calls failed at the flaky instance, and the frontend retried {}; \
                 every server saw only the identities its policy allows, the intruder was denied \
                 and plaintext was refused",
                flaky.failures(),
                payment_stats.retries()
            );
            Ok(())
        }
        (false, _) => {
            Err("the observed splits or retries do not match the configuration (see above)".into())
        }
        (true, Err(e)) => Err(format!("zero trust: {e} (see above)").into()),
    }
}

/// The embedded control server and the join token of every service account.
struct Mesh {
    control: ServerHandle,
    tokens: BTreeMap<&'static str, String>,
}

/// One workload of the shop: its bootstrap (service account, labels, join
/// token, TLS to mesh-control), its xDS client and its certificates.
struct Workload {
    bootstrap: Bootstrap,
    xds: XdsClient,
    certificates: WorkloadCertificates,
}

impl Mesh {
    /// The workload `node` running as `account`.
    async fn workload(&self, node: &str, account: &'static str) -> Result<Workload, BoxError> {
        self.workload_with(node, account, std::iter::empty::<&str>())
            .await
    }

    /// The workload `node` running as `account`, its xDS client subscribing
    /// to `listeners` at once. Its node labels are what AuthorizationPolicy
    /// selectors match: `app: <account>`, and `tier: backend` for catalog and
    /// payment.
    async fn workload_with(
        &self,
        node: &str,
        account: &'static str,
        listeners: impl IntoIterator<Item = &str>,
    ) -> Result<Workload, BoxError> {
        let token = self
            .tokens
            .get(account)
            .ok_or_else(|| format!("no join token for service account {account}"))?;
        let mut spec = BootstrapSpec::new(node, NAMESPACE)
            .service_account(account)
            .label("app", account)
            .join_token(token.clone());
        if matches!(account, "catalog" | "payment") {
            spec = spec.label("tier", "backend");
        }
        let bootstrap = Bootstrap::from_json(&self.control.bootstrap(&spec))?;
        let certificates = WorkloadCertificates::from_bootstrap(&bootstrap)
            .await?
            .ok_or_else(|| format!("the bootstrap of {node} names no certificate provider"))?;
        let xds = XdsClient::start_with(
            bootstrap.clone(),
            proxyless::xds::ClientOptions::default().listeners(listeners),
        );
        Ok(Workload {
            bootstrap,
            xds,
            certificates,
        })
    }
}

impl Workload {
    /// A mesh client presenting this workload's certificate.
    fn client<B>(&self) -> Client<B> {
        Client::new(self.xds.clone()).with_certificates(self.certificates.store().clone())
    }

    /// The serve options of a server of this workload: the mode and
    /// policies of `inbound`, this workload's certificate.
    fn security(&self, inbound: InboundPolicy) -> Security {
        Security::new(inbound).certificates(self.certificates.store().clone())
    }
}

/// A join token for `account`: long and random (the CA refuses short ones).
/// Good enough for a demo that lives for seconds; a deployment generates its
/// tokens with a real secret generator and gives each workload its own.
fn random_token(account: &str) -> String {
    let random = RandomState::new();
    format!(
        "{account}-{:016x}{:016x}",
        random.hash_one((account, 1u8)),
        random.hash_one((Instant::now(), 2u8))
    )
}

/// The peer identities each server served: server → caller SPIFFE ID →
/// requests. Filled by the apps from the `PeerIdentity` request extension
/// (the verified client certificate), so it counts only requests the
/// authorization let through.
#[derive(Default)]
struct Peers(Mutex<BTreeMap<&'static str, BTreeMap<String, u64>>>);

/// What a request without a verified peer is counted as (never expected
/// under STRICT).
const NO_PEER: &str = "(no verified peer)";

impl Peers {
    fn record(&self, server: &'static str, peer: Option<&PeerIdentity>) {
        let id = peer.map_or(NO_PEER, |p| p.spiffe_id().as_str());
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let by_peer = seen.entry(server).or_default();
        match by_peer.get_mut(id) {
            Some(n) => *n += 1,
            None => {
                by_peer.insert(id.to_owned(), 1);
            }
        }
    }

    fn snapshot(&self) -> BTreeMap<&'static str, BTreeMap<String, u64>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The SPIFFE ID of `account` in the shop's namespace.
fn spiffe(account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{account}")
}

/// What the intruder got: a valid mesh identity that no policy allows.
struct Denials {
    /// catalog over HTTP: status and body.
    catalog: (u16, String),
    /// payment over gRPC: the status code and message (or the reply).
    payment: (tonic::Code, String),
}

impl Denials {
    /// The intruder calls catalog (`GET /items`) and payment (`Pay`), by
    /// name and over mTLS like any workload.
    async fn attempt(intruder: &Workload) -> Result<Denials, BoxError> {
        let http: Client = intruder.client();
        let request = http::Request::get("http://catalog/items").body(Full::new(Bytes::new()))?;
        let response = http.oneshot(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        let catalog = (status, String::from_utf8_lossy(&body).into_owned());
        let mut grpc = PaymentClient::with_origin(
            intruder.client::<tonic::body::Body>(),
            "http://payment".parse()?,
        );
        let payment = match grpc
            .pay(PayRequest {
                order_id: "o-intruder".into(),
                cents: 1,
            })
            .await
        {
            Ok(reply) => (
                tonic::Code::Ok,
                format!("paid by {}", reply.into_inner().served_by),
            ),
            Err(status) => (status.code(), status.message().to_owned()),
        };
        Ok(Denials { catalog, payment })
    }
}

/// What a plaintext HTTP/1.1 request to a STRICT port got back.
struct Plaintext {
    addr: SocketAddr,
    reply: Vec<u8>,
    /// How the connection ended: "closed", "reset", or "still open".
    end: &'static str,
}

impl Plaintext {
    /// Refused: whatever came back, it was not an HTTP answer.
    fn refused(&self) -> bool {
        !self.reply.starts_with(b"HTTP/")
    }

    fn describe(&self) -> String {
        let what = match self.reply.first() {
            None => "no bytes".to_owned(),
            // A TLS record of type alert (21): the handshake failed.
            Some(21) => format!("a TLS alert ({} bytes)", self.reply.len()),
            Some(_) if !self.refused() => {
                let text = String::from_utf8_lossy(&self.reply);
                format!("an HTTP answer: {:?}", text.lines().next().unwrap_or(""))
            }
            Some(_) => format!("{} bytes that are not HTTP", self.reply.len()),
        };
        format!("{what}, connection {}", self.end)
    }
}

/// Sends `GET /items` in plaintext HTTP/1.1 straight to `addr`'s socket.
async fn plaintext_probe(addr: SocketAddr) -> Result<Plaintext, BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /items HTTP/1.1\r\nhost: catalog\r\n\r\n")
        .await?;
    let mut reply = Vec::new();
    let end =
        match tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut reply)).await {
            Ok(Ok(_)) => "closed",
            Ok(Err(_)) => "reset",
            Err(_) => "still open after 2 s",
        };
    Ok(Plaintext { addr, reply, end })
}

/// `t` as a UTC date and time (`2025-01-31 23:59:59 UTC`).
fn utc(t: SystemTime) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from(t)
        .format(FORMAT)
        .unwrap_or_default()
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

/// What the demo runs: the services, their telemetry, the shared metrics
/// registry, and for the zero-trust record every workload (its identity),
/// every server's inbound policy (its denials) and the peers they saw.
struct Services {
    serving: Vec<Serving>,
    telemetry: Vec<Telemetry>,
    registry: MetricsRegistry,
    /// Every workload by node name; kept so certificates keep renewing.
    workloads: Vec<(String, Workload)>,
    /// Every server's inbound policy, by service.
    inbound: Vec<(&'static str, InboundPolicy)>,
    peers: Arc<Peers>,
    /// Each server's push of its outbound edges to mesh-control's service
    /// graph (`/v1/graph`, shown at `/ui`), with its registration's
    /// credentials; dropping one stops it.
    /// One push per workload name, with the name it pushes (two instances
    /// of one workload, payment v1 and its flaky twin, share their series
    /// in the registry: one push sends them).
    graph: Vec<(String, proxyless::telemetry::GraphPush)>,
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
            .with_version(version)
            // Istio's source_principal / destination_principal of its own side.
            .with_principal(spiffe(service));
        let telemetry = Telemetry::builder(identity)
            .otel_env()?
            .metrics(&self.registry)
            .build();
        self.telemetry.push(telemetry.clone());
        Ok(telemetry)
    }

    /// Serves `app` as `service` of `workload` under the inbound policy
    /// mesh-control gives its listener (STRICT mTLS, the authorization
    /// policies), then keeps the workload. Returns the address served.
    async fn serve<S, RB>(
        &mut self,
        service: &'static str,
        workload: Workload,
        listener: tokio::net::TcpListener,
        inbound: InboundPolicy,
        registration: Registration,
        app: S,
    ) -> Result<SocketAddr, BoxError>
    where
        S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<RB>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        RB: hyper::body::Body + Send + 'static,
        RB::Data: Send,
        RB::Error: Into<BoxError>,
    {
        let security = workload.security(inbound.clone());
        // The service's telemetry (made just before serving): requests that
        // serve_with refuses itself are traced and counted like the rest.
        let security = match self.telemetry.last() {
            Some(telemetry) => security.telemetry(telemetry.clone()),
            None => security,
        };
        // Its calls out (frontend's to catalog and payment) and its denials
        // feed the graph. The registry is shared by every workload of the
        // demo, so each pushes only the series of its own workload name.
        let name = match self.telemetry.last() {
            Some(telemetry) => telemetry.identity().workload().to_owned(),
            None => service.to_owned(),
        };
        if !self.graph.iter().any(|(pushing, _)| *pushing == name) {
            let source =
                proxyless::telemetry::GraphSource::new(NAMESPACE, service).workload(name.clone());
            let push = self.registry.push_graph(&registration, source)?;
            self.graph.push((name, push));
        }
        let serving = proxyless::serve_with(listener, registration, app, security).await?;
        let addr = serving.local_addr();
        self.serving.push(serving);
        self.inbound.push((service, inbound));
        let node = workload.bootstrap.node_id().to_owned();
        self.workloads.push((node, workload));
        Ok(addr)
    }

    /// Prints the zero-trust record; an error names what did not hold.
    fn print_zero_trust(&self, denials: &Denials, plaintext: &Plaintext) -> Result<(), String> {
        println!(
            "\n== zero trust: PeerAuthentication STRICT in namespace {NAMESPACE} (clients use mTLS on their own), \
             identities from mesh-control's CA"
        );
        println!(
            "   workload certificates (X.509 SVIDs; keys generated in the workload, renewed at half-life):"
        );
        let now = SystemTime::now();
        for (node, workload) in &self.workloads {
            let store = workload.certificates.store();
            let left = store
                .not_after()
                .duration_since(now)
                .map_or(0.0, |d| d.as_secs_f64() / 3600.0);
            println!(
                "     {node:<17} {:<44} serial {}  expires {} (in {left:.1} h)",
                workload.certificates.spiffe_id().as_str(),
                store.serial(),
                utc(store.not_after()),
            );
        }
        let mut problems = Vec::new();
        println!(
            "   peer identities each server saw (verified client certificates; requests that reached the app, retries included):"
        );
        let seen = self.peers.snapshot();
        let allowed = [
            ("catalog", "frontend"),
            ("frontend", "shopper"),
            ("payment", "frontend"),
        ];
        for (server, caller) in allowed {
            let peers = seen.get(server).cloned().unwrap_or_default();
            if peers.is_empty() {
                println!("     {server:<8} ← (nobody)");
            }
            for (peer, n) in &peers {
                println!("     {server:<8} ← {peer} × {n}");
            }
            let expected = spiffe(caller);
            if peers.keys().any(|p| *p != expected) || !peers.contains_key(&expected) {
                problems.push(format!("{server} should have served {expected} only"));
            }
        }
        println!(
            "   intruder ({}, a valid mesh identity no policy allows):",
            spiffe("intruder")
        );
        let (status, body) = &denials.catalog;
        println!("     → catalog, HTTP GET /items: {status} {}", body.trim());
        if *status != 403 {
            problems.push(format!("the intruder got {status} from catalog, not 403"));
        }
        let (code, message) = &denials.payment;
        println!(
            "     → payment, gRPC shop.Payment/Pay: {} {message}",
            grpc_code_name(*code)
        );
        if *code != tonic::Code::PermissionDenied {
            problems.push(format!(
                "the intruder got {code:?} from payment, not PERMISSION_DENIED"
            ));
        }
        let mut denied: BTreeMap<&str, u64> = BTreeMap::new();
        for (service, inbound) in &self.inbound {
            *denied.entry(service).or_default() += inbound.denied();
        }
        let denied: Vec<String> = denied.iter().map(|(s, n)| format!("{s} {n}")).collect();
        println!(
            "   requests denied by the servers' authorization: {}",
            denied.join(", ")
        );
        println!(
            "   plaintext HTTP/1.1 GET /items straight to catalog's port {}: {} — {}",
            plaintext.addr,
            if plaintext.refused() {
                "no HTTP answer"
            } else {
                "SERVED"
            },
            plaintext.describe()
        );
        if !plaintext.refused() {
            problems.push("catalog answered plaintext".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// gRPC's name of `code` (`PERMISSION_DENIED`), as grpc-status tools print it.
fn grpc_code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

async fn catalog(
    services: &mut Services,
    workload: Workload,
    version: &'static str,
) -> Result<SocketAddr, BoxError> {
    let telemetry = services.telemetry(&workload.bootstrap, "catalog", version)?;
    let listener = listen().await?;
    let inbound = InboundPolicy::from_xds(&workload.xds, listener.local_addr()?)?;
    let peers = Arc::clone(&services.peers);
    let items = move |peer: Option<Extension<PeerIdentity>>, headers: HeaderMap| async move {
        peers.record("catalog", peer.as_ref().map(|Extension(p)| p));
        // --serve's slow shoppers: slower than their route's per-try timeout.
        if headers.get("x-user").is_some_and(|u| u == "chaos-slow") {
            tokio::time::sleep(CHAOS_SLOW).await;
        }
        version
    };
    let app = axum::Router::new()
        .route("/items", axum::routing::get(items))
        .layer(
            ServerLayer::from_bootstrap(&workload.bootstrap, "catalog")
                .inbound(inbound.clone())
                .telemetry(telemetry),
        );
    let registration =
        Registration::from_bootstrap(&workload.bootstrap, "catalog")?.label("version", version);
    services
        .serve("catalog", workload, listener, inbound, registration, app)
        .await
}
struct PaymentService {
    version: &'static str,
    /// Set on the flaky instance.
    flaky: Option<Arc<Flaky>>,
    peers: Arc<Peers>,
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
        // tonic keeps the HTTP request's extensions: the caller's identity.
        self.peers
            .record("payment", request.extensions().get::<PeerIdentity>());
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
    workload: Workload,
    version: &'static str,
    flaky: Option<Arc<Flaky>>,
) -> Result<SocketAddr, BoxError> {
    let telemetry = services.telemetry(&workload.bootstrap, "payment", version)?;
    let listener = listen().await?;
    let inbound = InboundPolicy::from_xds(&workload.xds, listener.local_addr()?)?;
    let routes = tonic::service::Routes::new(PaymentServer::new(PaymentService {
        version,
        flaky,
        peers: Arc::clone(&services.peers),
    }));
    let app = ServerLayer::from_bootstrap(&workload.bootstrap, "payment")
        .inbound(inbound.clone())
        .telemetry(telemetry)
        .layer(routes);
    let registration =
        Registration::from_bootstrap(&workload.bootstrap, "payment")?.label("version", version);
    services
        .serve("payment", workload, listener, inbound, registration, app)
        .await
}

#[derive(Clone)]
struct Frontend {
    http: TracedClient,
    grpc: PaymentClient<TracedClient<tonic::body::Body>>,
    peers: Arc<Peers>,
}

/// The frontend service; returns the counters of its payment client
/// (retries, ...). Its clients present its certificate: catalog and
/// payment only answer its identity.
async fn frontend(services: &mut Services, workload: Workload) -> Result<MeshStats, BoxError> {
    let telemetry = services.telemetry(&workload.bootstrap, "frontend", "v1")?;
    let payment_channel: Client<tonic::body::Body> = workload.client();
    let payment_stats = payment_channel.stats().clone();
    // Client telemetry around the mesh clients: a span per call (children of
    // the frontend's server span), a child span per attempt.
    let state = Frontend {
        http: workload.client().with_telemetry(telemetry.clone()),
        grpc: PaymentClient::with_origin(
            payment_channel.with_telemetry(telemetry.clone()),
            "http://payment".parse()?,
        ),
        peers: Arc::clone(&services.peers),
    };
    let listener = listen().await?;
    let inbound = InboundPolicy::from_xds(&workload.xds, listener.local_addr()?)?;
    let app = axum::Router::new()
        .route("/checkout", axum::routing::get(checkout_handler))
        .with_state(state)
        .layer(
            ServerLayer::from_bootstrap(&workload.bootstrap, "frontend")
                .inbound(inbound.clone())
                .telemetry(telemetry),
        );
    let registration = Registration::from_bootstrap(&workload.bootstrap, "frontend")?;
    services
        .serve("frontend", workload, listener, inbound, registration, app)
        .await?;
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
    peer: Option<Extension<PeerIdentity>>,
    headers: HeaderMap,
) -> Result<String, (http::StatusCode, String)> {
    fe.peers
        .record("frontend", peer.as_ref().map(|Extension(p)| p));
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

/// `--prometheus URL` (or `--prometheus=URL`): the Prometheus mesh-control
/// reads the service graph from; `None` without it.
fn prometheus_arg() -> Result<Option<String>, BoxError> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if let Some(url) = arg.strip_prefix("--prometheus=") {
            return Ok(Some(url.to_owned()));
        }
        if arg == "--prometheus" {
            return match args.next() {
                Some(url) if !url.starts_with("--") => Ok(Some(url)),
                _ => Err("--prometheus needs a URL: --prometheus http://127.0.0.1:9090".into()),
            };
        }
    }
    Ok(None)
}

/// Whether the shop keeps running (`--serve` or `SHOP_SERVE=1`).
fn serve_mode() -> bool {
    std::env::args().skip(1).any(|a| a == "--serve")
        || std::env::var("SHOP_SERVE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Checkouts per second in `--serve` mode, all as ordinary shoppers (no
/// beta users): the frontend's calls to catalog then follow the default
/// route's 90/10 split alone, so the page's observed share of v2 is the
/// configured 10% (tests/ui_browser.rs asserts it). Besides them, once a
/// second, `CHAOS_BURST` + 3 chaos checkouts (see `add_chaos_routes`).
const SERVE_RATE: u64 = 20;

/// `--serve`: prints one `SHOP-READY` line naming every endpoint to scrape,
/// then keeps a steady load (`SERVE_RATE` checkouts a second, the flaky
/// payment instance's retries included, and an intruder's denied calls
/// and the chaos checkouts once a second) so that every dashboard panel
/// has data, until SIGINT, SIGTERM or the end of stdin; then stops
/// cleanly. Failed checkouts are counted and reported, not fatal: a
/// dashboard should show them.
///
/// No beta users here: they always go to catalog v2 and would skew v2's
/// share away from the configured 10% the page shows beside it (the
/// demo's non-serve run proves beta routing).
async fn serve_until_stopped(
    mesh: Mesh,
    mut services: Services,
    metrics: proxyless::telemetry::MetricsServer,
    shopper: Client,
    token_file: &Path,
) -> Result<(), BoxError> {
    let intruder = mesh.workload("intruder", "intruder").await?;
    let bundle = mesh
        .control
        .trust_bundle_file()
        .ok_or("mesh-control runs without its CA")?;
    // One line, `key=value` pairs, for tests and scripts to parse.
    println!(
        "SHOP-READY metrics=http://{}/metrics control-metrics=https://{}/metrics \
         control-ca={} control-token-file={} control-server-name=localhost",
        metrics.local_addr(),
        mesh.control.admin_addr(),
        bundle.display(),
        token_file.display()
    );
    println!(
        "serving: {SERVE_RATE} checkouts/s; once a second an \
         intruder's calls and {} chaos checkouts (faults, timeouts, overflows, a passed \
         deadline); until SIGINT, SIGTERM or the end of stdin",
        CHAOS_BURST + 3
    );
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let chaos = Arc::new(AtomicU64::new(0));
    let mut load = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / SERVE_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = std::pin::pin!(stopped());
    let mut n: u64 = 0;
    let reason = loop {
        tokio::select! {
            reason = &mut stop => break reason,
            _ = tick.tick() => {}
        }
        n += 1;
        let client = shopper.clone();
        let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
        load.spawn(async move {
            match checkout(&client, None).await {
                Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("   first failed checkout: {e}");
                    }
                    0
                }
            };
        });
        if n.is_multiple_of(SERVE_RATE) {
            // What the mesh's own panels count (faults, timeouts, retries
            // refused, breaker overflows, deadline drops): see
            // `add_chaos_routes`. These checkouts fail by design.
            for user in std::iter::repeat_n("chaos-slow", CHAOS_BURST).chain([
                "chaos-fault",
                "chaos-fault",
                "chaos-deadline",
            ]) {
                let shopper = shopper.clone();
                let chaos = Arc::clone(&chaos);
                load.spawn(async move {
                    if chaos_checkout(&shopper, user).await {
                        chaos.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            // The intruder's denied calls: 403 and PERMISSION_DENIED on the dashboards.
            if let Err(e) = Denials::attempt(&intruder).await {
                eprintln!("   intruder's calls failed to run: {e}");
            }
        }
        // Reap finished checkouts so the set stays small.
        while load.try_join_next().is_some() {}
    };
    println!("{reason}: stopping");
    while load.join_next().await.is_some() {}
    println!(
        "served {} checkouts, {} failed; {} chaos checkouts failed as configured",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        chaos.load(Ordering::Relaxed)
    );
    services.workloads.push(("intruder".into(), intruder));
    for s in services.serving.drain(..) {
        s.shutdown().await?;
    }
    metrics.shutdown().await;
    let flushes = services.telemetry.iter().map(Telemetry::shutdown);
    for result in futures_util::future::join_all(flushes).await {
        if let Err(e) = result {
            eprintln!("   exporting spans failed: {e}");
        }
    }
    mesh.control.shutdown().await;
    Ok(())
}

/// Resolves when the process is told to stop: SIGINT, SIGTERM, or stdin
/// at its end (a test or a script that holds the pipe closes it); returns
/// which.
async fn stopped() -> &'static str {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A plain thread: a blocking read on stdin must not hold up the
    // runtime's shutdown.
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate => "SIGTERM",
        _ = rx => "stdin closed",
    }
}

/// How long catalog takes to answer a `chaos-slow` shopper: longer than
/// that route's per-try timeout.
const CHAOS_SLOW: Duration = Duration::from_millis(30);
/// `chaos-slow` checkouts sent at once each second: more than the `chaos`
/// subset's `http2MaxRequests` and `maxRetries`.
const CHAOS_BURST: usize = 6;

/// `--serve` only: routes for shoppers named `chaos-*` in catalog's
/// VirtualService (before the beta users' route), and a `chaos` subset
/// with tight circuit breakers, so that every panel of the mesh's own
/// dashboard (docs/grafana/proxyless-mesh.json) has data:
///
/// - `chaos-fault`: half aborted (503, flag FI), half delayed 1 ms (DI);
/// - `chaos-slow` (catalog sleeps [`CHAOS_SLOW`] for them): a 10 ms
///   per-try timeout, 2 retries, a 60 ms route timeout (UT); sent in bursts
///   to the `chaos` subset (`http2MaxRequests: 2`, `maxRetries: 1`):
///   breaker overflows (UO) and retries refused (`max_retries`); two
///   failures in a row eject the subset's endpoint for a second (outlier
///   detection).
///
/// `chaos-deadline` needs no route: its checkout arrives with a deadline
/// already passed (flag DT, inbound).
fn add_chaos_routes(shop_yaml: &Path) -> Result<(), BoxError> {
    const ROUTES: &str = "  http:
  - name: chaos-fault
    match:
    - headers:
        x-user:
          exact: chaos-fault
    fault:
      abort:
        percentage:
          value: 50
        httpStatus: 503
      delay:
        percentage:
          value: 50
        fixedDelay: 1ms
    route:
    - destination:
        host: catalog
        subset: v1
  - name: chaos-slow
    match:
    - headers:
        x-user:
          exact: chaos-slow
    timeout: 60ms
    retries:
      attempts: 2
      perTryTimeout: 10ms
      retryOn: 5xx
    route:
    - destination:
        host: catalog
        subset: chaos
  - name: beta-users
";
    const SUBSET: &str = "  - name: v2
    labels:
      version: v2
  - name: chaos
    labels:
      version: v1
    trafficPolicy:
      connectionPool:
        http:
          http2MaxRequests: 2
          maxRetries: 1
      outlierDetection:
        consecutive5xxErrors: 2
        interval: 1s
        baseEjectionTime: 1s
        maxEjectionPercent: 100
";
    let yaml = std::fs::read_to_string(shop_yaml)?;
    // The first subset list and the first `http:` route list are catalog's.
    let (Some(routes), Some(subset)) = (
        yaml.find("  http:\n  - name: beta-users\n"),
        yaml.find("  - name: v2\n    labels:\n      version: v2\n"),
    ) else {
        return Err(format!("{}: catalog's routes or subsets moved", shop_yaml.display()).into());
    };
    let routes_end = routes + "  http:\n  - name: beta-users\n".len();
    let subset_end = subset + "  - name: v2\n    labels:\n      version: v2\n".len();
    let mut out = String::with_capacity(yaml.len() + ROUTES.len() + SUBSET.len());
    out.push_str(&yaml[..subset]);
    out.push_str(SUBSET);
    out.push_str(&yaml[subset_end..routes]);
    out.push_str(ROUTES);
    out.push_str(&yaml[routes_end..]);
    std::fs::write(shop_yaml, out)?;
    Ok(())
}

/// One checkout of a `chaos-*` shopper (`chaos-deadline`: with a deadline
/// already passed); whether it failed.
async fn chaos_checkout(shopper: &Client, user: &str) -> bool {
    let mut req = http::Request::get("http://frontend/checkout").header("x-user", user);
    if user == "chaos-deadline" {
        req = req.header("x-envoy-expected-rq-timeout-ms", "0");
    }
    let Ok(req) = req.body(Full::new(Bytes::new())) else {
        return true;
    };
    match shopper.clone().oneshot(req).await {
        Ok(resp) => !resp.status().is_success(),
        Err(_) => true,
    }
}
