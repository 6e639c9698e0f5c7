//! Resilience end to end over real sockets (issue 4, acceptance criteria 1–8): Istio
//! YAML written by each test → embedded mesh-control → ADS → `XdsClient` →
//! `proxyless::Client` → backends on 127.0.0.1 that fail, stall, count and die on
//! purpose.
//!
//! Every test asserts what a user of the mesh would notice — how many calls succeed,
//! what a failed call says, what a backend saw — and checks first that the config it
//! relies on reached the client (so a failure says "not delivered" or "not enforced").
//!
//! Settings are small and real (1 ms retry backoff with Istio's `retries.backoff`,
//! 200 ms ejection, 100 ms deadlines). Statistical checks use a binomial z-score at
//! z = 4.5; eventual conditions a 10 s deadline. Durations are
//! asserted only where the criterion is about one: the deadline values carried in
//! `grpc-timeout` (criterion 6) and the ejection window (criterion 4, whose lower
//! bound is exact and whose upper bound has scheduling slack, see that test).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_control::ServerHandle;
use proxyless::layers::Deadline;
use proxyless::{Bootstrap, Client, Registration, ServerLayer, Serving, XdsClient};
use support::shop::payment_client::PaymentClient;
use support::shop::payment_server::Payment;
use support::shop::{PayReply, PayRequest, StreamReply, StreamRequest};
use support::{Coin, assert_split, eventually_named};
use tokio::sync::watch;
use tower::ServiceExt;

/// Deadline of every eventual condition.
const DEADLINE: Duration = Duration::from_secs(10);
/// The namespace of every service here.
const NAMESPACE: &str = "shop";

// ---------------------------------------------------------------------------------------
// The mesh: mesh-control over a directory with one YAML file, and a client.
// ---------------------------------------------------------------------------------------

/// An embedded mesh-control serving the YAML a test wrote, and one xDS client in
/// namespace `shop` shared by the test's callers.
struct Mesh {
    server: ServerHandle,
    xds: XdsClient,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// Starts mesh-control on `yaml` (one file) and asserts it has no diagnostics: a field
    /// the YAML front end does not support fails here, at its line, not later as a
    /// confusing routing result.
    async fn start(node: &str, yaml: &str) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
        let server = mesh_control::Server::builder()
            .config_dir(dir.path())
            .lease_check_interval(Duration::from_millis(20))
            .start()
            .await
            .expect("start mesh-control");
        let status = server.status();
        assert_eq!(
            status["diagnostics"],
            serde_json::json!([]),
            "mesh-control rejects the test's YAML:\n{yaml}\nstatus: {status:#}"
        );
        let json = server.bootstrap_json(node, NAMESPACE);
        let xds = XdsClient::start(Bootstrap::from_json(&json).expect("bootstrap"));
        Mesh {
            server,
            xds,
            _dir: dir,
        }
    }

    fn admin(&self) -> String {
        self.server.admin_addr().to_string()
    }

    fn client(&self) -> Client {
        Client::new(self.xds.clone())
    }

    /// Waits until the client has `service`'s listener, route config and `endpoints`
    /// endpoints in its whole-service cluster (port `port`).
    async fn wait_for(&self, service: &str, port: u16, endpoints: usize) {
        tokio::time::timeout(DEADLINE, self.xds.wait_for_listener(service))
            .await
            .unwrap_or_else(|_| panic!("listener {service} within {DEADLINE:?}"))
            .unwrap_or_else(|e| panic!("listener {service}: {e}"));
        let cluster = cluster_name(service, port);
        eventually_named(
            &format!("{endpoints} endpoints of {cluster} at the client"),
            DEADLINE,
            || endpoint_count(&self.xds, &cluster) == endpoints,
        )
        .await;
    }

    /// The first route of `service`'s route config (port `port`), as the client has it.
    fn route(&self, service: &str, port: u16) -> proxyless::mesh_core::model::Route {
        let snapshot = self.xds.snapshot();
        let name = route_config_name(service, port);
        let rc = snapshot
            .route_configs
            .get(name.as_str())
            .unwrap_or_else(|| panic!("route config {name} at the client"));
        rc.virtual_hosts
            .first()
            .and_then(|vh| vh.routes.first())
            .cloned()
            .unwrap_or_else(|| panic!("route config {name} has no route"))
    }

    /// `service`'s whole-service cluster (port `port`), as the client has it.
    fn cluster(&self, service: &str, port: u16) -> proxyless::mesh_core::model::Cluster {
        let name = cluster_name(service, port);
        self.xds
            .snapshot()
            .clusters
            .get(name.as_str())
            .map(|c| (**c).clone())
            .unwrap_or_else(|| panic!("cluster {name} at the client"))
    }
}

fn fqdn(service: &str) -> String {
    format!("{service}.{NAMESPACE}.svc.cluster.local")
}

fn cluster_name(service: &str, port: u16) -> String {
    format!("outbound|{port}||{}", fqdn(service))
}

fn route_config_name(service: &str, port: u16) -> String {
    format!("{}:{port}", fqdn(service))
}

fn endpoint_count(xds: &XdsClient, cluster: &str) -> usize {
    xds.snapshot()
        .endpoints
        .get(cluster)
        .map_or(0, |c| c.endpoint_count())
}

/// Indents every line of `text` by `n` spaces.
fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|line| format!("{pad}{line}\n")).collect()
}

/// A service `name` in namespace `shop` on port `port` with `protocol` (ServiceEntry,
/// endpoints from registration), its DestinationRule with `traffic_policy` (YAML under
/// `trafficPolicy:`, none when empty) and a VirtualService with one route to it carrying
/// `route_fields` (YAML at the level of `route:`, e.g. `retries: ...`).
fn service_yaml(
    name: &str,
    port: u16,
    protocol: &str,
    traffic_policy: &str,
    route_fields: &str,
) -> String {
    let policy = if traffic_policy.trim().is_empty() {
        String::new()
    } else {
        format!("  trafficPolicy:\n{}", indent(traffic_policy, 4))
    };
    let fields = indent(route_fields, 4);
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  hosts:
  - {name}
  ports:
  - number: {port}
    name: {proto_name}
    protocol: {protocol}
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  host: {name}
{policy}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  hosts:
  - {name}
  http:
  - name: default
{fields}    route:
    - destination:
        host: {name}
",
        proto_name = protocol.to_ascii_lowercase(),
    )
}

/// [`service_yaml`] for an HTTP/1.1 service on port 80.
fn http_service(name: &str, traffic_policy: &str, route_fields: &str) -> String {
    service_yaml(name, 80, "HTTP", traffic_policy, route_fields)
}

// ---------------------------------------------------------------------------------------
// Backends: axum apps that answer, fail, hold requests and count what they saw.
// ---------------------------------------------------------------------------------------

/// What a backend does with each request.
#[derive(Debug, Clone, Copy)]
enum Behavior {
    /// 200 with its name.
    Answer,
    /// This status, every time.
    Fail(StatusCode),
    /// This status with probability `p`, independently per request; 200 otherwise.
    FailRandomly(StatusCode, f64),
}

/// Attempts per `x-request-id`, shared by the backends of one service: a request id
/// seen before is a retry. Tracks how many retries are in flight at once over all the
/// backends (what the retry budget bounds).
#[derive(Debug, Default)]
struct AttemptLog {
    attempts: Mutex<HashMap<String, u32>>,
    retries_in_flight: AtomicUsize,
    max_retries_in_flight: AtomicUsize,
    retries: AtomicU64,
}

impl AttemptLog {
    /// Attempts per request id so far.
    fn attempts(&self) -> HashMap<String, u32> {
        self.attempts.lock().expect("attempt log").clone()
    }
}

/// How a backend is built.
#[derive(Clone)]
struct Spec {
    name: String,
    behavior: Behavior,
    /// Simulated work before answering.
    hold: Duration,
    /// When set, requests wait until it reads `true` before answering.
    gate: Option<watch::Receiver<bool>>,
    /// Where attempts per request id are logged.
    attempts: Option<Arc<AttemptLog>>,
    labels: Vec<(String, String)>,
}

impl Spec {
    fn answer(name: impl Into<String>) -> Spec {
        Spec {
            name: name.into(),
            behavior: Behavior::Answer,
            hold: Duration::ZERO,
            gate: None,
            attempts: None,
            labels: Vec::new(),
        }
    }

    fn failing(name: impl Into<String>, status: StatusCode) -> Spec {
        Spec {
            behavior: Behavior::Fail(status),
            ..Spec::answer(name)
        }
    }

    fn failing_randomly(name: impl Into<String>, status: StatusCode, p: f64) -> Spec {
        Spec {
            behavior: Behavior::FailRandomly(status, p),
            ..Spec::answer(name)
        }
    }

    fn hold(mut self, hold: Duration) -> Spec {
        self.hold = hold;
        self
    }

    fn gate(mut self, gate: watch::Receiver<bool>) -> Spec {
        self.gate = Some(gate);
        self
    }

    fn log_attempts(mut self, log: Arc<AttemptLog>) -> Spec {
        self.attempts = Some(log);
        self
    }
}

/// What a backend has seen (shared with its handler).
struct BackendState {
    spec: Spec,
    coin: Coin,
    hits: AtomicU64,
    failures: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// When each request arrived.
    arrivals: Mutex<Vec<Instant>>,
}

impl BackendState {
    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().expect("arrivals").clone()
    }
}

/// Decrements the in-flight gauges when a request ends, answered or cancelled.
struct InFlight {
    state: Arc<BackendState>,
    retry: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.retry
            && let Some(log) = &self.state.spec.attempts
        {
            log.retries_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

async fn handle(
    State(state): State<Arc<BackendState>>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    state.hits.fetch_add(1, Ordering::SeqCst);
    state
        .arrivals
        .lock()
        .expect("arrivals")
        .push(Instant::now());
    let now_in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state
        .max_in_flight
        .fetch_max(now_in_flight, Ordering::SeqCst);
    let mut retry = false;
    if let Some(log) = &state.spec.attempts
        && let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok())
    {
        let attempt = {
            let mut attempts = log.attempts.lock().expect("attempt log");
            let n = attempts.entry(id.to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        if attempt > 1 {
            retry = true;
            log.retries.fetch_add(1, Ordering::SeqCst);
            let now = log.retries_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            log.max_retries_in_flight.fetch_max(now, Ordering::SeqCst);
        }
    }
    let _guard = InFlight {
        state: state.clone(),
        retry,
    };
    if !state.spec.hold.is_zero() {
        tokio::time::sleep(state.spec.hold).await;
    }
    if let Some(gate) = &state.spec.gate {
        let mut gate = gate.clone();
        let _ = gate.wait_for(|open| *open).await;
    }
    let fail = match state.spec.behavior {
        Behavior::Answer => None,
        Behavior::Fail(status) => Some(status),
        Behavior::FailRandomly(status, p) => state.coin.flip(p).then_some(status),
    };
    match fail {
        Some(status) => {
            state.failures.fetch_add(1, Ordering::SeqCst);
            (status, format!("{} fails on purpose", state.spec.name))
        }
        None => (StatusCode::OK, state.spec.name.clone()),
    }
}

/// A backend registered as an endpoint of a service.
struct Backend {
    addr: SocketAddr,
    state: Arc<BackendState>,
    /// Set for backends served by `proxyless::serve` (deregistered on drop).
    _serving: Option<Serving>,
    /// Set for killable backends (see [`Backend::killable`]).
    kill: Option<KillSwitch>,
}

impl std::ops::Deref for Backend {
    type Target = BackendState;
    fn deref(&self) -> &BackendState {
        &self.state
    }
}

fn backend_state(spec: Spec) -> Arc<BackendState> {
    Arc::new(BackendState {
        spec,
        coin: Coin::new(),
        hits: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        arrivals: Mutex::new(Vec::new()),
    })
}

impl Backend {
    /// Serves `spec` with `proxyless::serve` as an endpoint of `service` (registration,
    /// heartbeats, deregistration on drop), as a mesh workload does.
    async fn serve(mesh: &Mesh, service: &str, spec: Spec) -> Backend {
        let mut registration = Registration::new(mesh.admin(), service).namespace(NAMESPACE);
        for (k, v) in &spec.labels {
            registration = registration.label(k, v);
        }
        let state = backend_state(spec);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let serving = proxyless::serve(listener, registration, app)
            .await
            .unwrap_or_else(|e| panic!("serve {service}: {e}"));
        Backend {
            addr,
            state,
            _serving: Some(serving),
            kill: None,
        }
    }

    /// Serves `spec` with its own accept loop and registers it through the admin API with
    /// a 60 s lease (longer than any test), so that [`Backend::kill`] can end it the way
    /// a crashed process ends: listener and connections gone at once, no deregistration,
    /// lease still valid.
    async fn killable(mesh: &Mesh, service: &str, spec: Spec) -> Backend {
        let state = backend_state(spec);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let conns = connections.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let app = app.clone();
                let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
                let task = tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
                conns.lock().expect("connections").push(task.abort_handle());
            }
        });
        let body = serde_json::json!({
            "service": service,
            "namespace": NAMESPACE,
            "address": addr.ip().to_string(),
            "port": addr.port(),
            "labels": state.spec.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
            "ttl_seconds": 60,
        });
        let (code, reply) = support::admin::admin_request(
            mesh.server.admin_addr(),
            "POST",
            "/v1/endpoints",
            &body.to_string(),
        )
        .await;
        assert_eq!(code, 201, "registering {addr}: {reply}");
        Backend {
            addr,
            state,
            _serving: None,
            kill: Some(KillSwitch {
                accept: accept.abort_handle(),
                connections,
            }),
        }
    }

    /// Ends a [`Backend::killable`] backend abruptly: the listener closes (new connections
    /// are refused) and every open connection is dropped mid-request (clients see a reset
    /// or a closed connection). Its registration stays.
    fn kill(&self) {
        let kill = self.kill.as_ref().expect("a killable backend");
        kill.accept.abort();
        for connection in kill.connections.lock().expect("connections").drain(..) {
            connection.abort();
        }
    }
}

struct KillSwitch {
    accept: tokio::task::AbortHandle,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

// ---------------------------------------------------------------------------------------
// Calls.
// ---------------------------------------------------------------------------------------

/// What a caller got back.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

/// `GET http://{service}/` with `headers`, through the mesh client. `Err` is the
/// mesh's own error (no route, no endpoint): responses, including the mesh's local
/// replies (overflow, fault abort, timeout), are `Ok`.
async fn get(client: &Client, service: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let mut req = http::Request::get(format!("http://{service}/"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).expect("request");
    let resp = client
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends `n` GETs to `service` from `concurrency` tasks; request `i` gets
/// `x-request-id: {i}`. Returns the results in request order.
async fn load(
    client: &Client,
    service: &str,
    n: usize,
    concurrency: usize,
) -> Vec<Result<Reply, String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let service = service.to_owned();
        let next = next.clone();
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return out;
                }
                let id = i.to_string();
                out.push((i, get(&client, &service, &[("x-request-id", &id)]).await));
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("load task"));
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

fn successes(results: &[Result<Reply, String>]) -> u64 {
    results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == StatusCode::OK))
        .count() as u64
}

/// The first few failures, for assertion messages.
fn first_failures(results: &[Result<Reply, String>]) -> Vec<String> {
    results
        .iter()
        .filter_map(|r| match r {
            Ok(r) if r.status == StatusCode::OK => None,
            Ok(r) => Some(format!("{} {}", r.status, r.body)),
            Err(e) => Some(e.clone()),
        })
        .take(5)
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. Retries.
// ---------------------------------------------------------------------------------------

/// Criterion 1a: `retries: {attempts: 3, retryOn: 5xx}` with one of three endpoints
/// failing every request with 503: ≥ 99.9 % of 2,000 requests succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_an_endpoint_that_always_fails() {
    let yaml = http_service(
        "echo",
        "loadBalancer:\n  simple: ROUND_ROBIN\n",
        "retries:\n  attempts: 3\n  retryOn: 5xx\n  backoff: 1ms\n",
    );
    let mesh = Mesh::start("retry-always", &yaml).await;
    let good1 = Backend::serve(&mesh, "echo", Spec::answer("good1")).await;
    let good2 = Backend::serve(&mesh, "echo", Spec::answer("good2")).await;
    let bad = Backend::serve(
        &mesh,
        "echo",
        Spec::failing("bad", StatusCode::SERVICE_UNAVAILABLE),
    )
    .await;
    mesh.wait_for("echo", 80, 3).await;
    let retry = mesh
        .route("echo", 80)
        .policy
        .retry
        .expect("a retry policy on the route");
    assert_eq!(retry.num_retries, 3, "{retry:?}");
    assert!(
        retry
            .retry_on
            .contains(proxyless::mesh_core::model::RetryOn::FIVE_XX),
        "{retry:?}"
    );

    let client = mesh.client();
    let total = 2000;
    let results = load(&client, "echo", total, 8).await;
    let ok = successes(&results);
    assert!(
        ok * 1000 >= 999 * total as u64,
        "{ok} of {total} succeeded (want ≥ 99.9 %); first failures: {:?}",
        first_failures(&results)
    );
    assert!(
        bad.hits() > 0,
        "the failing endpoint was never tried: the test proves nothing"
    );
    // Every success is exactly one request to a good endpoint: retries happen only
    // after a failure, never in addition to a success.
    assert_eq!(
        good1.hits() + good2.hits(),
        ok,
        "good endpoints' hits vs successes"
    );
}

/// Criterion 1b: one endpoint failing 50 % at random, concurrency 1: the success rate
/// matches 1 − 0.5⁴ (the first attempt and 3 retries all have to fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_a_flaky_endpoint_succeed_one_minus_half_to_the_fourth() {
    let yaml = http_service(
        "flaky",
        "",
        "retries:\n  attempts: 3\n  retryOn: 5xx\n  backoff: 1ms\n",
    );
    let mesh = Mesh::start("retry-flaky", &yaml).await;
    let flaky = Backend::serve(
        &mesh,
        "flaky",
        Spec::failing_randomly("flaky", StatusCode::SERVICE_UNAVAILABLE, 0.5),
    )
    .await;
    mesh.wait_for("flaky", 80, 1).await;
    let retry = mesh
        .route("flaky", 80)
        .policy
        .retry
        .expect("a retry policy on the route");
    assert_eq!(retry.num_retries, 3, "{retry:?}");
    assert_eq!(retry.backoff_base, Duration::from_millis(1), "{retry:?}");
    assert!(
        retry
            .retry_on
            .contains(proxyless::mesh_core::model::RetryOn::FIVE_XX),
        "{retry:?}"
    );

    let client = mesh.client();
    let total = 2000u64;
    let results = load(&client, "flaky", total as usize, 1).await;
    let ok = successes(&results);
    let failed = total - ok;
    for r in &results {
        match r {
            Ok(r) => assert!(
                r.status == StatusCode::OK || r.status == StatusCode::SERVICE_UNAVAILABLE,
                "unexpected answer {} {}",
                r.status,
                r.body
            ),
            Err(e) => panic!("a mesh error instead of the backend's answer: {e}"),
        }
    }
    assert_split(ok, total, 1.0 - 0.5f64.powi(4));
    // Exactly one retry per failed attempt that was not a request's last.
    assert_eq!(
        flaky.hits(),
        total + flaky.failures() - failed,
        "attempts at the backend = requests + retries (each 503 but the last is retried)"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Retry budget and maxRetries.
// ---------------------------------------------------------------------------------------

/// Runs 50 concurrent callers against two always-failing backends (503 after 20 ms)
/// of a service with `traffic_policy`; returns the attempt log and the results.
async fn retry_storm(
    node: &str,
    service: &str,
    traffic_policy: &str,
) -> (Arc<AttemptLog>, Vec<Result<Reply, String>>, Mesh, Client) {
    let yaml = http_service(
        service,
        traffic_policy,
        "retries:\n  attempts: 3\n  retryOn: 5xx\n  backoff: 1ms\n",
    );
    let mesh = Mesh::start(node, &yaml).await;
    let log = Arc::new(AttemptLog::default());
    let spec = |name: &str| {
        Spec::failing(name, StatusCode::SERVICE_UNAVAILABLE)
            .hold(Duration::from_millis(20))
            .log_attempts(log.clone())
    };
    let b1 = Backend::serve(&mesh, service, spec("b1")).await;
    let b2 = Backend::serve(&mesh, service, spec("b2")).await;
    mesh.wait_for(service, 80, 2).await;
    let client = mesh.client();
    let results = load(&client, service, 500, 50).await;
    drop((b1, b2));
    (log, results, mesh, client)
}

/// Criterion 2: a retry budget at concurrency 50 with every endpoint failing: the
/// retries in flight never exceed max(percent × active, minRetryConcurrency), and the
/// refused retries are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_bounds_concurrent_retries_and_counts_refusals() {
    let (log, results, mesh, client) = retry_storm(
        "retry-budget",
        "budget",
        "retryBudget:\n  percent:\n    value: 20\n  minRetryConcurrency: 3\n",
    )
    .await;
    let budget = mesh
        .cluster("budget", 80)
        .circuit_breakers
        .retry_budget
        .expect("the retry budget reaches the client");
    assert_eq!(budget.min_retry_concurrency, 3, "{budget:?}");
    assert_eq!(budget.budget.per_million(), 200_000, "{budget:?}");

    for r in &results {
        let r = r.as_ref().unwrap_or_else(|e| panic!("a mesh error: {e}"));
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    }
    // At most 50 requests are active (one per caller), so at most
    // max(20 % × 50, 3) = 10 retries may be in flight; the backends see a subset of
    // the client's retry lifetime, so what they see is a lower bound of it.
    let limit = 10;
    let max = log.max_retries_in_flight.load(Ordering::SeqCst);
    assert!(max > 0, "no retry was ever sent");
    assert!(
        max <= limit,
        "{max} retries in flight at once (limit {limit})"
    );
    // A refused retry ends its request early: fewer than 4 attempts reached a backend.
    let attempts = log.attempts();
    assert_eq!(
        attempts.len(),
        results.len(),
        "every request reached a backend"
    );
    let refused = attempts.values().filter(|&&n| n < 4).count() as u64;
    assert!(
        refused > 0,
        "50 callers and room for 10 retries, yet none was refused"
    );
    assert!(
        attempts.values().all(|&n| n <= 4),
        "more than 3 retries: {attempts:?}"
    );
    // The client counts what it did: every retry the backends saw, every one it refused.
    let stats = client.stats();
    eprintln!(
        "retry budget: at most {max} retries in flight, {} sent, {refused} refused; client {stats:?}",
        log.retries.load(Ordering::SeqCst)
    );
    assert_eq!(
        stats.retries(),
        log.retries.load(Ordering::SeqCst),
        "retries sent (client's count vs the backends')"
    );
    assert_eq!(
        stats.retries_refused(),
        refused,
        "refused retries (client's count vs requests with fewer than 4 attempts)"
    );
}

/// `connectionPool.http.maxRetries` caps concurrent retries too (Envoy `max_retries`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_caps_concurrent_retries() {
    let (log, results, mesh, client) = retry_storm(
        "retry-max",
        "maxretries",
        "connectionPool:\n  http:\n    maxRetries: 2\n",
    )
    .await;
    assert_eq!(
        mesh.cluster("maxretries", 80).circuit_breakers.max_retries,
        2
    );
    for r in &results {
        let r = r.as_ref().unwrap_or_else(|e| panic!("a mesh error: {e}"));
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    }
    let max = log.max_retries_in_flight.load(Ordering::SeqCst);
    assert!(max > 0, "no retry was ever sent");
    assert!(max <= 2, "{max} retries in flight at once (maxRetries 2)");
    let refused = log.attempts().values().filter(|&&n| n < 4).count() as u64;
    assert!(
        refused > 0,
        "50 callers and room for 2 retries, yet none was skipped"
    );
    assert_eq!(
        client.stats().retries_refused(),
        refused,
        "skipped retries counted"
    );
}

// ---------------------------------------------------------------------------------------
// 3. An endpoint dies mid-load.
// ---------------------------------------------------------------------------------------

/// Criterion 3: an endpoint killed abruptly (no deregistration, lease still valid)
/// during a 10 s load over 3 endpoints with retryOn reset and connect-failure: < 1 % of
/// requests fail.
///
/// "Killed" in-process: the backend's accept loop and every connection task are aborted
/// at a moment it has a request in flight, which closes its listener (new connections
/// are refused: connect-failure) and drops its sockets mid-request (reset), while its
/// 60 s lease keeps it in EDS for the whole test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_mid_load_costs_under_one_percent() {
    let yaml = http_service(
        "orders",
        "loadBalancer:\n  simple: ROUND_ROBIN\n",
        "retries:\n  attempts: 3\n  retryOn: 5xx,reset,connect-failure\n  backoff: 1ms\n",
    );
    let mesh = Mesh::start("kill", &yaml).await;
    let hold = Duration::from_millis(2);
    let a = Backend::killable(&mesh, "orders", Spec::answer("a").hold(hold)).await;
    let b = Backend::killable(&mesh, "orders", Spec::answer("b").hold(hold)).await;
    let victim = Backend::killable(&mesh, "orders", Spec::answer("victim").hold(hold)).await;
    mesh.wait_for("orders", 80, 3).await;

    let client = mesh.client();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let client = client.clone();
        let stop = stop.clone();
        workers.spawn(async move {
            let (mut ok, mut failed, mut first) = (0u64, 0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match get(&client, "orders", &[]).await {
                    Ok(r) if r.status == StatusCode::OK => ok += 1,
                    other => {
                        failed += 1;
                        if first.len() < 5 {
                            first.push(format!("{other:?}"));
                        }
                    }
                }
                // Pace the load: cheap on 2 cores, still thousands of requests.
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (ok, failed, first)
        });
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    eventually_named("a request in flight at the victim", DEADLINE, || {
        victim.in_flight() > 0
    })
    .await;
    victim.kill();
    let victim_hits = victim.hits();
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(start.elapsed())).await;
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut failed, mut first) = (0, 0, Vec::new());
    while let Some(done) = workers.join_next().await {
        let (o, f, mut fst) = done.expect("worker");
        ok += o;
        failed += f;
        first.append(&mut fst);
    }
    let total = ok + failed;
    eprintln!(
        "10 s load: {total} requests, {failed} failed; the victim ({}) served {victim_hits} before \
         the kill, a {} and b {}",
        victim.addr,
        a.hits(),
        b.hits()
    );
    assert!(
        victim_hits > 0,
        "the victim never served: the test proves nothing"
    );
    assert_eq!(
        endpoint_count(&mesh.xds, &cluster_name("orders", 80)),
        3,
        "the dead endpoint is still registered (its lease is valid)"
    );
    assert!(total > 500, "only {total} requests in 10 s");
    assert!(
        failed * 100 < total,
        "{failed} of {total} requests failed (want < 1 %); first: {first:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Outlier detection.
// ---------------------------------------------------------------------------------------

/// Criterion 4a: an endpoint failing every request is ejected after 3 consecutive 5xx
/// and returns within [base × n, base × n + interval] (n = its number of ejections).
///
/// Measured at the failing backend: from the arrival of the request that completed its
/// n-th streak of 3 failures to the next arrival. The lower bound is exact (the client
/// cannot have picked it before it returned). The upper bound has 250 ms of slack for
/// the client noticing the return on a loaded 2-core machine (the next round-robin pick
/// after the return, a few ms when idle): it still catches an endpoint that stays out
/// for another base time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_returns_after_base_times_n() {
    let base = Duration::from_millis(200);
    let interval = Duration::from_millis(100);
    let slack = Duration::from_millis(250);
    let yaml = http_service(
        "ledger",
        "loadBalancer:\n  simple: ROUND_ROBIN\noutlierDetection:\n  consecutive5xxErrors: 3\n  \
         interval: 100ms\n  baseEjectionTime: 200ms\n  maxEjectionPercent: 100\n",
        "retries:\n  attempts: 0\n",
    );
    let mesh = Mesh::start("outlier", &yaml).await;
    let _a = Backend::serve(&mesh, "ledger", Spec::answer("a")).await;
    let _b = Backend::serve(&mesh, "ledger", Spec::answer("b")).await;
    let bad = Backend::serve(
        &mesh,
        "ledger",
        Spec::failing("bad", StatusCode::SERVICE_UNAVAILABLE),
    )
    .await;
    mesh.wait_for("ledger", 80, 3).await;
    let od = mesh
        .cluster("ledger", 80)
        .outlier_detection
        .expect("outlier detection reaches the client");
    assert_eq!(
        (od.consecutive_5xx, od.base_ejection_time, od.interval),
        (Some(3), base, interval)
    );
    assert!(
        mesh.route("ledger", 80)
            .policy
            .retry
            .is_none_or(|r| r.num_retries == 0)
    );

    let client = mesh.client();
    // Two ejections: arrivals 1-3 fail → out for base; 4-6 fail → out for 2 × base; 7.
    let start = Instant::now();
    while bad.arrivals().len() < 7 {
        assert!(
            start.elapsed() < DEADLINE,
            "the bad endpoint got {} requests",
            bad.hits()
        );
        let r = get(&client, "ledger", &[]).await.expect("an answer");
        assert!(r.status == StatusCode::OK || r.status == StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let arrivals = bad.arrivals();
    assert!(
        client.stats().ejections() >= 2,
        "ejections counted: {:?}",
        client.stats()
    );
    for (n, (last_failure, back)) in [(1u32, (2usize, 3usize)), (2, (5, 6))] {
        let out = arrivals[back].duration_since(arrivals[last_failure]);
        let min = base * n;
        assert!(
            out >= min,
            "ejection {n} lasted {out:?}, less than base × {n} = {min:?}"
        );
        assert!(
            out <= min + interval + slack,
            "ejection {n} lasted {out:?}: not back within base × {n} + interval = {:?} \
             (+{slack:?} slack)",
            min + interval
        );
    }
}

/// Criterion 4b: maxEjectionPercent is respected: with 4 endpoints all failing and
/// maxEjectionPercent 50, exactly 2 are ejected and the other 2 keep receiving traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_keeps_half_the_endpoints_in() {
    let yaml = http_service(
        "audit",
        "loadBalancer:\n  simple: ROUND_ROBIN\noutlierDetection:\n  consecutive5xxErrors: 2\n  \
         interval: 10s\n  baseEjectionTime: 30s\n  maxEjectionPercent: 50\n  minHealthPercent: 0\n",
        "retries:\n  attempts: 0\n",
    );
    let mesh = Mesh::start("outlier-max", &yaml).await;
    let mut backends = Vec::new();
    for i in 0..4 {
        backends.push(
            Backend::serve(
                &mesh,
                "audit",
                Spec::failing(format!("bad{i}"), StatusCode::SERVICE_UNAVAILABLE),
            )
            .await,
        );
    }
    mesh.wait_for("audit", 80, 4).await;
    let od = mesh
        .cluster("audit", 80)
        .outlier_detection
        .expect("outlier detection reaches the client");
    assert_eq!(od.max_ejection_percent, 50, "{od:?}");

    let client = mesh.client();
    for _ in 0..40 {
        get(&client, "audit", &[]).await.expect("an answer");
    }
    let before: Vec<u64> = backends.iter().map(|b| b.hits()).collect();
    for _ in 0..100 {
        let r = get(&client, "audit", &[]).await.expect("an answer");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    }
    let still_in = backends
        .iter()
        .zip(&before)
        .filter(|(b, before)| b.hits() > **before)
        .count();
    assert_eq!(
        still_in,
        2,
        "endpoints still receiving traffic (hits before {before:?}, after {:?})",
        backends.iter().map(|b| b.hits()).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------
// 5. Circuit breaking.
// ---------------------------------------------------------------------------------------

/// Criterion 5: http2MaxRequests 10 and 50 concurrent callers: the overflow fails fast
/// with the limit named, the backend never sees more than 10 at once, and the breaker
/// recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_overflow_fails_fast_and_recovers() {
    let yaml = http_service(
        "stock",
        "connectionPool:\n  http:\n    http2MaxRequests: 10\n",
        "retries:\n  attempts: 0\n",
    );
    let mesh = Mesh::start("breaker", &yaml).await;
    let (open, gate) = watch::channel(false);
    let backend = Backend::serve(&mesh, "stock", Spec::answer("stock").gate(gate)).await;
    mesh.wait_for("stock", 80, 1).await;
    assert_eq!(mesh.cluster("stock", 80).circuit_breakers.max_requests, 10);

    let client = mesh.client();
    let finished = Arc::new(AtomicUsize::new(0));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let client = client.clone();
        let finished = finished.clone();
        callers.spawn(async move {
            let r = get(&client, "stock", &[]).await;
            finished.fetch_add(1, Ordering::SeqCst);
            r
        });
    }
    // "Fast": the 40 overflowing calls end while the 10 admitted ones are still held
    // by the backend — they did not queue behind them.
    eventually_named(
        "10 calls held by the backend, 40 answered",
        DEADLINE,
        || backend.in_flight() == 10 && finished.load(Ordering::SeqCst) == 40,
    )
    .await;
    assert_eq!(
        backend.max_in_flight(),
        10,
        "the backend saw more than 10 at once"
    );
    let mut overflowed = Vec::new();
    while overflowed.len() < 40 {
        let r = callers
            .join_next()
            .await
            .expect("a caller")
            .expect("caller task");
        overflowed.push(r.expect("an overflow is a response, not a mesh error"));
    }
    for r in &overflowed {
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
        assert_eq!(
            r.headers.get("x-envoy-overloaded").map(|v| v.as_bytes()),
            Some(&b"true"[..]),
            "{:?}",
            r.headers
        );
        let body = r.body.to_ascii_lowercase();
        assert!(
            body.contains("max_requests") || body.contains("http2maxrequests"),
            "the overflow does not name the limit: {:?}",
            r.body
        );
    }
    open.send_replace(true);
    while let Some(r) = callers.join_next().await {
        let r = r.expect("caller task").expect("an answer");
        assert_eq!(r.status, StatusCode::OK, "an admitted call: {}", r.body);
    }
    assert_eq!(backend.hits(), 10);
    assert_eq!(client.stats().overflows(), 40, "overflows counted");
    // Recovered: the next 50, 10 at a time, all pass.
    for _ in 0..5 {
        let results = load(&client, "stock", 10, 10).await;
        assert_eq!(successes(&results), 10, "{:?}", first_failures(&results));
    }
    assert!(backend.max_in_flight() <= 10);
}

// ---------------------------------------------------------------------------------------
// 6. Deadlines across hops.
// ---------------------------------------------------------------------------------------

/// What the hops saw: per hop, the calls and the remaining deadline on arrival; and
/// what hop 3 answered.
#[derive(Default)]
struct HopLog {
    calls: [AtomicU64; 5],
    remaining: Mutex<[Option<Duration>; 5]>,
    hop3_answer: Mutex<Option<tonic::Code>>,
}

/// A hop of the chain hop1 → hop2 → hop3 → hop4, a gRPC Payment service: it records the
/// deadline it received and calls the next hop with it (hop 3 first works until its
/// deadline has passed).
#[derive(Clone)]
struct Hop {
    index: usize,
    next: Option<PaymentClient<Client<tonic::body::Body>>>,
    log: Arc<HopLog>,
}

#[tonic::async_trait]
impl Payment for Hop {
    async fn pay(
        &self,
        request: tonic::Request<PayRequest>,
    ) -> Result<tonic::Response<PayReply>, tonic::Status> {
        let hop = self.clone();
        // In a task of its own, so that hop 3 finishes and reports even when its caller
        // gives up (its caller's deadline is the same instant) and drops the call.
        let work = tokio::spawn(async move { hop.work(request).await });
        work.await
            .map_err(|e| tonic::Status::internal(format!("hop task: {e}")))?
    }

    type StreamStream = tokio_stream::Iter<std::vec::IntoIter<Result<StreamReply, tonic::Status>>>;

    async fn stream(
        &self,
        _request: tonic::Request<StreamRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("hops only pay"))
    }
}

impl Hop {
    async fn work(
        self,
        request: tonic::Request<PayRequest>,
    ) -> Result<tonic::Response<PayReply>, tonic::Status> {
        self.log.calls[self.index].fetch_add(1, Ordering::SeqCst);
        // Set by `ServerLayer` from the incoming `grpc-timeout`; tonic hands the HTTP
        // request's extensions to the service.
        let deadline = request.extensions().get::<Deadline>().copied();
        self.log.remaining.lock().expect("hop log")[self.index] =
            deadline.as_ref().map(|d| d.remaining());
        let Some(mut next) = self.next.clone() else {
            return Ok(tonic::Response::new(PayReply {
                served_by: format!("hop{}", self.index),
                version: String::new(),
            }));
        };
        if self.index == 3 {
            // Slow work that outlasts the deadline: the call to hop 4 must fail at once.
            let left = deadline.as_ref().map_or(Duration::ZERO, |d| d.remaining());
            tokio::time::sleep(left + Duration::from_millis(5)).await;
        }
        let mut call = tonic::Request::new(request.into_inner());
        if let Some(deadline) = deadline {
            // What `Deadline::propagate` does for `http::Request`s.
            call.extensions_mut().insert(deadline);
        }
        let result = next.pay(call).await;
        if self.index == 3 {
            *self.log.hop3_answer.lock().expect("hop log") = Some(
                result
                    .as_ref()
                    .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
            );
        }
        result
    }
}

/// Criterion 6: a deadline of 100 ms set at hop 1 (the route timeout of hop 2, as Istio
/// users set deadlines) reaches hop 3 as less than 100 ms — it shrinks across hops,
/// hop 3's own 10 s route timeout does not reset it — and hop 3, past it, gets
/// DEADLINE_EXCEEDED for its call to hop 4 without hop 4 being called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_shrinks_across_hops_and_fails_fast_when_spent() {
    let yaml = [
        service_yaml("hop1", 50051, "GRPC", "", ""),
        service_yaml("hop2", 50051, "GRPC", "", "timeout: 100ms\n"),
        service_yaml("hop3", 50051, "GRPC", "", "timeout: 10s\n"),
        service_yaml("hop4", 50051, "GRPC", "", "timeout: 10s\n"),
    ]
    .join("---\n");
    let mesh = Mesh::start("hops", &yaml).await;
    let log = Arc::new(HopLog::default());
    let mut serving = Vec::new();
    for index in 1..=4 {
        let next = (index < 4).then(|| {
            PaymentClient::with_origin(
                Client::<tonic::body::Body>::new(mesh.xds.clone()),
                format!("http://hop{}", index + 1).parse().expect("origin"),
            )
        });
        let hop = Hop {
            index,
            next,
            log: log.clone(),
        };
        let service = format!("hop{index}");
        let app = support::payment_routes_of(hop)
            .into_axum_router()
            .layer(ServerLayer::from_bootstrap(mesh.xds.bootstrap(), &service));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let registration = Registration::new(mesh.admin(), service.as_str()).namespace(NAMESPACE);
        serving.push(
            proxyless::serve(listener, registration, app)
                .await
                .expect("serve hop"),
        );
    }
    for index in 1..=4 {
        mesh.wait_for(&format!("hop{index}"), 50051, 1).await;
    }
    assert_eq!(
        mesh.route("hop2", 50051).policy.timeout,
        Some(Duration::from_millis(100))
    );

    let mut user = PaymentClient::with_origin(
        Client::<tonic::body::Body>::new(mesh.xds.clone()),
        "http://hop1".parse().expect("origin"),
    );
    let status = user
        .pay(PayRequest {
            order_id: "o-1".into(),
            cents: 100,
        })
        .await
        .expect_err("the chain cannot finish within 100 ms");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");

    eventually_named("hop 3 has answered", DEADLINE, || {
        log.hop3_answer.lock().expect("hop log").is_some()
    })
    .await;
    let remaining = *log.remaining.lock().expect("hop log");
    let hop2 = remaining[2].expect("hop 2 received a deadline");
    let hop3 = remaining[3].expect("hop 3 received a deadline");
    assert!(
        hop2 <= Duration::from_millis(100),
        "hop 2 received {hop2:?}"
    );
    assert!(
        hop3 < Duration::from_millis(100),
        "hop 3 received {hop3:?}, not less than 100 ms"
    );
    // The header carries the remaining time rounded up to its unit (1 µs here).
    assert!(
        hop3 <= hop2 + Duration::from_millis(1),
        "the deadline grew from hop 2 ({hop2:?}) to hop 3 ({hop3:?})"
    );
    assert_eq!(
        *log.hop3_answer.lock().expect("hop log"),
        Some(tonic::Code::DeadlineExceeded),
        "hop 3's call to hop 4"
    );
    assert_eq!(log.calls[4].load(Ordering::SeqCst), 0, "hop 4 was called");
    assert_eq!(log.calls[3].load(Ordering::SeqCst), 1);
    drop(serving);
}

/// An HTTP hop of the chain web1 → web2 → web3 → web4 (axum), the HTTP twin of [`Hop`]:
/// it propagates its deadline with [`Deadline::propagate`], as an app's handler does.
#[derive(Clone)]
struct WebHop {
    index: usize,
    client: Client,
    log: Arc<HopLog>,
    /// What web 3 answered (the status of its call to web 4).
    web3_status: Arc<Mutex<Option<StatusCode>>>,
}

async fn web_hop(
    State(hop): State<WebHop>,
    incoming: axum::extract::Request,
) -> (StatusCode, String) {
    // In a task of its own, as for the gRPC hops: web 3 must finish its work and report
    // even when its caller, whose deadline is the same instant, gives up first.
    let work = tokio::spawn(async move {
        hop.log.calls[hop.index].fetch_add(1, Ordering::SeqCst);
        let deadline = Deadline::from_request(&incoming);
        hop.log.remaining.lock().expect("hop log")[hop.index] = deadline.map(|d| d.remaining());
        if hop.index == 4 {
            return (StatusCode::OK, "web4".to_owned());
        }
        if hop.index == 3 {
            // Slow work that outlasts the deadline: the call to web 4 must fail at once.
            let left = deadline.map_or(Duration::ZERO, |d| d.remaining());
            tokio::time::sleep(left + Duration::from_millis(5)).await;
        }
        let mut outgoing = http::Request::get(format!("http://web{}/", hop.index + 1))
            .body(Full::new(Bytes::new()))
            .expect("request");
        Deadline::propagate(&incoming, &mut outgoing);
        let answer = match hop.client.clone().oneshot(outgoing).await {
            Ok(response) => (response.status(), String::new()),
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
        };
        if hop.index == 3 {
            *hop.web3_status.lock().expect("web3 status") = Some(answer.0);
        }
        answer
    });
    work.await
        .unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Criterion 6 over HTTP (`x-envoy-expected-rq-timeout-ms`, the header Envoy sidecars
/// use): the same chain with axum apps propagating with `Deadline::propagate`; web 3,
/// past its deadline, gets a 504 from the mesh without web 4 being called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_deadline_shrinks_across_hops_and_fails_fast_when_spent() {
    let yaml = [
        http_service("web1", "", ""),
        http_service("web2", "", "timeout: 100ms\n"),
        http_service("web3", "", "timeout: 10s\n"),
        http_service("web4", "", "timeout: 10s\n"),
    ]
    .join("---\n");
    let mesh = Mesh::start("web-hops", &yaml).await;
    let log = Arc::new(HopLog::default());
    let web3_status = Arc::new(Mutex::new(None));
    let mut serving = Vec::new();
    for index in 1..=4 {
        let service = format!("web{index}");
        let hop = WebHop {
            index,
            client: mesh.client(),
            log: log.clone(),
            web3_status: web3_status.clone(),
        };
        let app = axum::Router::new()
            .fallback(web_hop)
            .with_state(hop)
            .layer(ServerLayer::from_bootstrap(mesh.xds.bootstrap(), &service));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let registration = Registration::new(mesh.admin(), service.as_str()).namespace(NAMESPACE);
        serving.push(
            proxyless::serve(listener, registration, app)
                .await
                .expect("serve web hop"),
        );
    }
    for index in 1..=4 {
        mesh.wait_for(&format!("web{index}"), 80, 1).await;
    }
    assert_eq!(
        mesh.route("web2", 80).policy.timeout,
        Some(Duration::from_millis(100))
    );

    let reply = get(&mesh.client(), "web1", &[])
        .await
        .expect("web1 answers");
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.body);

    eventually_named("web 3 has answered", DEADLINE, || {
        web3_status.lock().expect("web3 status").is_some()
    })
    .await;
    let remaining = *log.remaining.lock().expect("hop log");
    let web2 = remaining[2].expect("web 2 received a deadline");
    let web3 = remaining[3].expect("web 3 received a deadline");
    assert!(
        web2 <= Duration::from_millis(100),
        "web 2 received {web2:?}"
    );
    assert!(
        web3 < Duration::from_millis(100),
        "web 3 received {web3:?}, not less than 100 ms"
    );
    // The header counts whole milliseconds, rounded up.
    assert!(
        web3 <= web2 + Duration::from_millis(1),
        "the deadline grew from web 2 ({web2:?}) to web 3 ({web3:?})"
    );
    assert_eq!(
        *web3_status.lock().expect("web3 status"),
        Some(StatusCode::GATEWAY_TIMEOUT),
        "web 3's call to web 4"
    );
    assert_eq!(log.calls[4].load(Ordering::SeqCst), 0, "web 4 was called");
    drop(serving);
}

// ---------------------------------------------------------------------------------------
// 7. Fault injection.
// ---------------------------------------------------------------------------------------

/// Criterion 7: fault injection abort 20 % / delay 10 % over 5,000 requests match
/// within tolerance (z = 4.5). The abort status is 503, which the route's default
/// retry policy retries: an injected abort must not be (Envoy's fault filter runs
/// before the router), so a share of 20 % also shows that. A delayed request is one
/// that took at least the 400 ms fixed delay (it cannot take less; an undelayed one
/// takes a few ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_aborts_20_and_delays_10_percent() {
    let delay = Duration::from_millis(400);
    let yaml = http_service(
        "reviews",
        "",
        "fault:\n  abort:\n    percentage:\n      value: 20\n    httpStatus: 503\n  delay:\n    \
         percentage:\n      value: 10\n    fixedDelay: 400ms\n",
    );
    let mesh = Mesh::start("fault", &yaml).await;
    let backend = Backend::serve(&mesh, "reviews", Spec::answer("reviews")).await;
    mesh.wait_for("reviews", 80, 1).await;
    let fault = mesh
        .route("reviews", 80)
        .policy
        .fault
        .expect("a fault policy on the route");
    assert!(fault.abort.is_some() && fault.delay.is_some(), "{fault:?}");

    let client = mesh.client();
    let total = 5000usize;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let client = client.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < total {
                let start = Instant::now();
                let r = get(&client, "reviews", &[]).await;
                out.push((r, start.elapsed()));
            }
            out
        });
    }
    let (mut aborted, mut delayed, mut ok) = (0u64, 0u64, 0u64);
    while let Some(done) = tasks.join_next().await {
        for (r, took) in done.expect("task") {
            let r = r.unwrap_or_else(|e| panic!("a mesh error: {e}"));
            match r.status {
                StatusCode::OK => ok += 1,
                StatusCode::SERVICE_UNAVAILABLE => aborted += 1,
                other => panic!("unexpected {other}: {}", r.body),
            }
            if took >= delay {
                delayed += 1;
            }
        }
    }
    let total = total as u64;
    eprintln!("fault injection: {aborted} aborted, {delayed} delayed of {total}");
    assert_split(aborted, total, 0.2);
    assert_split(delayed, total, 0.1);
    let stats = client.stats();
    assert_eq!(stats.faults_aborted(), aborted, "aborts counted");
    // Every request the client delayed took at least the delay.
    assert!(
        stats.faults_delayed() <= delayed,
        "delays counted: {stats:?}"
    );
    assert_split(stats.faults_delayed(), total, 0.1);
    assert_eq!(
        backend.hits(),
        ok,
        "an aborted request reached the backend, or one was retried"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Consistent hashing.
// ---------------------------------------------------------------------------------------

/// Criterion 8: consistent hash on a header, 10,000 keys over 10 endpoints: a key stays
/// on its endpoint; adding an 11th moves ≤ 20 % of the keys (Envoy's ring moves ~16 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_keys_and_moves_few_when_an_endpoint_joins() {
    let yaml = http_service(
        "sessions",
        "loadBalancer:\n  consistentHash:\n    httpHeaderName: x-key\n    minimumRingSize: 1024\n",
        "",
    );
    let mesh = Mesh::start("ring", &yaml).await;
    let mut backends = Vec::new();
    for i in 0..10 {
        backends.push(Backend::serve(&mesh, "sessions", Spec::answer(format!("e{i}"))).await);
    }
    mesh.wait_for("sessions", 80, 10).await;
    assert!(
        matches!(
            mesh.cluster("sessions", 80).lb_policy,
            proxyless::mesh_core::model::LbPolicy::RingHash { .. }
        ),
        "the cluster is not ring hash"
    );
    let client = mesh.client();
    let keys = 10_000;
    let first = owners(&client, keys, 16).await;
    let mut per_endpoint: BTreeMap<&str, usize> = BTreeMap::new();
    for owner in &first {
        *per_endpoint.entry(owner.as_str()).or_default() += 1;
    }
    assert_eq!(
        per_endpoint.len(),
        10,
        "keys per endpoint: {per_endpoint:?}"
    );

    // The same key, the same endpoint (every 5th key asked again).
    let again = owners_of(&client, (0..keys).step_by(5), 16).await;
    for (key, owner) in again {
        assert_eq!(owner, first[key], "key {key} moved without any change");
    }

    backends.push(Backend::serve(&mesh, "sessions", Spec::answer("e10")).await);
    mesh.wait_for("sessions", 80, 11).await;
    let second = owners(&client, keys, 16).await;
    let moved = first.iter().zip(&second).filter(|(a, b)| a != b).count();
    let to_new = second.iter().filter(|o| *o == "e10").count();
    eprintln!("ring hash: {moved} of {keys} keys moved, {to_new} to the new endpoint");
    assert!(to_new > 0, "the new endpoint got no key");
    assert!(
        moved * 5 <= keys,
        "{moved} of {keys} keys moved (want ≤ 20 %)"
    );
}

/// The endpoint answering each key `0..n` (header `x-key: k{i}`).
async fn owners(client: &Client, n: usize, concurrency: usize) -> Vec<String> {
    owners_of(client, 0..n, concurrency)
        .await
        .into_iter()
        .map(|(_, owner)| owner)
        .collect()
}

async fn owners_of(
    client: &Client,
    keys: impl Iterator<Item = usize>,
    concurrency: usize,
) -> Vec<(usize, String)> {
    let keys: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(
        keys.collect::<Vec<_>>().into_iter().rev().collect(),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let keys = keys.clone();
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let Some(key) = keys.lock().expect("keys").pop() else {
                    return out;
                };
                let r = get(&client, "sessions", &[("x-key", &format!("k{key}"))])
                    .await
                    .unwrap_or_else(|e| panic!("key {key}: {e}"));
                assert_eq!(r.status, StatusCode::OK, "key {key}: {}", r.body);
                out.push((key, r.body));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("owner task"));
    }
    all.sort_by_key(|(k, _)| *k);
    all
}
