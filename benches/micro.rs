//! `cargo bench --bench micro`: the per-request decisions and layers of the mesh, in
//! isolation, with criterion.
//!
//! - `route_lookup`: [`RouteConfig::find`] over 100 routes in 10 virtual hosts
//!   (exact-domain lookup, then first-match over prefix, header, regex conditions),
//!   and the whole [`Snapshot::resolve`] (listener → routes → weighted cluster →
//!   endpoints).
//! - `lb_pick_1000`: [`EndpointSet::pick`] over 1,000 endpoints in 10 localities for
//!   each policy, and building the set (once per EDS update).
//! - `client_stack` / `server_stack`: one call through [`MeshLayer`] (routing, LB,
//!   in-flight accounting, the response body wrapper) and through [`ServerLayer`],
//!   against the bare inner service, both over an instant in-process service and
//!   over a real hyper HTTP/2 connection on an in-memory transport
//!   (`tokio::io::duplex`). The difference of each pair is what the layer costs
//!   per call. `client_stack/instant/mirror/*`: the caller's latency on a route
//!   without a mirror and on one mirrored at 100% (Istio `mirror`): each call is
//!   timed alone, and the copies' tasks run between calls, off the clock (the
//!   caller never waits for them).
//! - `server_authorization`: one call through [`ServerLayer`] with a verified peer
//!   identity on the request (what `serve_with` puts there after an mTLS
//!   handshake): without an inbound policy, with `InboundPolicy::fixed(STRICT, one
//!   ALLOW principal policy)`, with 10 policies (5 DENY that do not match, 5 ALLOW,
//!   the matching one last) and a caller that policy denies (403). In process, no
//!   sockets, like `server_stack/instant`.
//! - `mtls_handshake`: a full mutual-TLS handshake, client and server over an
//!   in-memory pipe (`tokio::io::duplex`), with the mesh's configs
//!   (`MeshConnector` + `MeshAcceptor::strict` over `CertStore`s: SPIFFE ID checks,
//!   the peer identity extracted) and with plain rustls configs
//!   (`WebPkiServerVerifier` / `WebPkiClientVerifier`) and the same certificates,
//!   issued by the mesh CA's code (ECDSA P-256, TLS 1.3, ring, no resumption).
//! - `resilience_per_call`: the bookkeeping every call (or failed attempt) pays:
//!   admitting a request through the circuit breaker and releasing it, deciding a
//!   retry and taking it from the retry budget, reporting a result to outlier
//!   detection over 1,000 endpoints.
//!
//! `cargo test --benches` (CI) runs each benchmark once, as criterion does.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxyless::layers::{MeshBody, StaticSource};
use proxyless::mesh_core::Snapshot;
use proxyless::mesh_core::lb::EndpointSet;
use proxyless::mesh_core::model::{
    Cluster, ClusterLoadAssignment, Endpoint, HeaderMatch, LbPolicy, Listener, Locality,
    LocalityEndpoints, PathMatch, Pattern, Protocol, RetryPolicy, Route, RouteConfig, RouteMatch,
    RoutePolicy, ValueMatch, VirtualHost, WeightedCluster, WeightedClusters,
};
use proxyless::mesh_core::route::RequestView;
use proxyless::{MeshLayer, ServerContext, ServerLayer};
use tower::{Layer, Service, ServiceExt};

const VHOSTS: usize = 10;
const ROUTES_PER_VHOST: usize = 10;
const ENDPOINTS: usize = 1000;
const LOCALITIES: usize = 10;

/// xorshift64*: a fast, deterministic random source, so the benches measure the
/// pick and not the generator.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn names(items: &[String]) -> Arc<[Arc<str>]> {
    items.iter().map(|s| Arc::from(s.as_str())).collect()
}

/// Virtual host `v` of the route table: domains in every form an app dials, 10
/// routes: prefix + header matches, one regex path, a catch-all last.
fn virtual_host(v: usize) -> VirtualHost {
    let fqdn = format!("svc-{v}.bench.svc.cluster.local");
    let domains = [
        fqdn.clone(),
        format!("{fqdn}:80"),
        format!("svc-{v}.bench"),
        format!("svc-{v}.bench:80"),
        format!("svc-{v}"),
        format!("svc-{v}:80"),
    ];
    let routes: Vec<Route> = (0..ROUTES_PER_VHOST)
        .map(|r| {
            let matcher = if r + 1 == ROUTES_PER_VHOST {
                RouteMatch::any()
            } else if r == ROUTES_PER_VHOST / 2 {
                RouteMatch {
                    path: PathMatch::Regex(
                        Pattern::new(&format!("/api/v{r}/[0-9]+")).expect("a valid regex"),
                    ),
                    headers: Arc::from([]),
                    query_params: Arc::from([]),
                    ignore_case: false,
                }
            } else {
                RouteMatch {
                    path: PathMatch::Prefix(Arc::from(format!("/api/v{r}/").as_str())),
                    headers: Arc::from([HeaderMatch {
                        name: Arc::from("x-user"),
                        value: ValueMatch::Exact(Arc::from(format!("user-{r}").as_str())),
                        invert: false,
                    }]),
                    query_params: Arc::from([]),
                    ignore_case: false,
                }
            };
            Route {
                name: Arc::from(format!("r{r}").as_str()),
                matcher,
                action: WeightedClusters::new(vec![
                    WeightedCluster {
                        name: Arc::from(format!("outbound|80|v1|{fqdn}").as_str()),
                        weight: 90,
                    },
                    WeightedCluster {
                        name: Arc::from(format!("outbound|80|v2|{fqdn}").as_str()),
                        weight: 10,
                    },
                ])
                .expect("valid weights"),
                policy: Default::default(),
            }
        })
        .collect();
    VirtualHost {
        name: Arc::from(format!("{fqdn}:80").as_str()),
        domains: names(&domains),
        routes: routes.into(),
    }
}

fn route_config() -> RouteConfig {
    RouteConfig {
        name: Arc::from("bench"),
        virtual_hosts: (0..VHOSTS).map(virtual_host).collect(),
    }
}

fn cla(name: &str, n: usize, localities: usize) -> ClusterLoadAssignment {
    let per = n / localities.max(1);
    let localities = (0..localities)
        .map(|l| LocalityEndpoints {
            locality: Locality {
                region: Arc::from("region"),
                zone: Arc::from(format!("zone-{l}").as_str()),
                sub_zone: Arc::from(""),
            },
            weight: per as u32,
            priority: 0,
            endpoints: (0..per)
                .map(|e| Endpoint {
                    address: SocketAddr::from((
                        [10, l as u8, (e / 250) as u8, (e % 250) as u8],
                        8080,
                    )),
                    weight: 1,
                    labels: Arc::from([]),
                })
                .collect(),
        })
        .collect();
    ClusterLoadAssignment::new(Arc::from(name), localities).expect("a valid assignment")
}

fn route_lookup(c: &mut Criterion) {
    let rc = route_config();
    let mut group = c.benchmark_group("route_lookup");
    let headers_for = |user: &str| {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_str(user).expect("header"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        h
    };
    let cases = [
        (
            "first_vhost_first_route",
            "svc-0",
            "/api/v0/items",
            "user-0",
        ),
        (
            "middle_regex_route",
            "svc-4.bench:80",
            "/api/v5/12345",
            "nobody",
        ),
        (
            "last_vhost_catch_all",
            "svc-9.bench.svc.cluster.local",
            "/other",
            "nobody",
        ),
    ];
    for (name, host, path, user) in cases {
        let uri: Uri = format!("http://{host}{path}").parse().expect("uri");
        let headers = headers_for(user);
        let method = Method::GET;
        let view = RequestView::new(&method, &uri, &headers, host);
        assert!(rc.find(host, &view).is_some(), "{name} must match a route");
        group.bench_function(name, |b| {
            b.iter(|| black_box(rc.find(black_box(host), black_box(&view))))
        });
    }

    // The whole decision a request makes against a snapshot.
    let mut snapshot = Snapshot::default();
    let listener = Arc::new(Listener {
        name: Arc::from("svc-9"),
        route_config_name: Arc::from("bench"),
    });
    snapshot
        .listeners
        .insert(Arc::from("svc-9"), listener.clone());
    snapshot
        .route_configs
        .insert(Arc::from("bench"), Arc::new(rc.clone()));
    for v in ["v1", "v2"] {
        let name = format!("outbound|80|{v}|svc-9.bench.svc.cluster.local");
        snapshot.clusters.insert(
            Arc::from(name.as_str()),
            Arc::new(Cluster::new(name.as_str(), Protocol::Http1)),
        );
        snapshot
            .endpoints
            .insert(Arc::from(name.as_str()), Arc::new(cla(&name, 100, 1)));
    }
    let uri: Uri = "http://svc-9/other".parse().expect("uri");
    let headers = headers_for("nobody");
    let method = Method::GET;
    let view = RequestView::new(&method, &uri, &headers, "svc-9");
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    assert!(snapshot.resolve(&listener, &view, 1).is_ok());
    group.bench_function("snapshot_resolve_last_vhost", |b| {
        b.iter(|| {
            black_box(
                snapshot
                    .resolve(&listener, black_box(&view), rng.next())
                    .is_ok(),
            )
        })
    });
    group.finish();
}

fn lb_pick(c: &mut Criterion) {
    let set = EndpointSet::new(&cla("c", ENDPOINTS, LOCALITIES));
    assert_eq!(set.len(), ENDPOINTS);
    let active: Vec<u32> = (0..ENDPOINTS).map(|i| (i % 7) as u32).collect();
    let mut group = c.benchmark_group("lb_pick_1000");
    let policies = [
        ("round_robin", LbPolicy::RoundRobin),
        ("least_request_p2c", LbPolicy::LeastRequest),
        ("random", LbPolicy::Random),
        (
            "ring_hash_without_key",
            LbPolicy::RingHash {
                minimum_ring_size: 1024,
            },
        ),
    ];
    for (name, policy) in policies {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let mut counter = 0u64;
        group.bench_function(BenchmarkId::new("pick", name), |b| {
            b.iter(|| {
                counter = counter.wrapping_add(1);
                black_box(set.pick(policy, &mut || rng.next(), counter, |i| {
                    active.get(i).copied().unwrap_or(0)
                }))
            })
        });
    }
    let assignment = cla("c", ENDPOINTS, LOCALITIES);
    group.bench_function("build_endpoint_set", |b| {
        b.iter(|| black_box(EndpointSet::new(black_box(&assignment))))
    });
    group.finish();
}

fn resilience(c: &mut Criterion) {
    use proxyless::mesh_core::breaker::CircuitBreaker;
    use proxyless::mesh_core::model::{
        CircuitBreakers, OutlierDetection, RetryBudget, RetryPolicy,
    };
    use proxyless::mesh_core::outlier::{OutlierDetector, ResultClass};
    use proxyless::mesh_core::retry::{Outcome, RetryLimiter, retry_reason};

    let mut group = c.benchmark_group("resilience_per_call");
    let limits = CircuitBreakers {
        max_requests: 1024,
        max_pending_requests: 1024,
        max_retries: 3,
        retry_budget: Some(RetryBudget {
            budget: proxyless::mesh_core::model::Fraction::from_per_million(200_000),
            min_retry_concurrency: 3,
        }),
        ..CircuitBreakers::default()
    };
    // Admitting a request and releasing it when it ends: every call pays this.
    let breaker = CircuitBreaker::new();
    group.bench_function("breaker_admit_release", |b| {
        b.iter(|| black_box(breaker.try_request(black_box(&limits)).is_ok()))
    });
    // A failed attempt: is it retriable, and may a retry be taken from the budget?
    let policy = RetryPolicy::istio_default();
    let limiter = RetryLimiter::new();
    let outcome = Outcome::http(503);
    group.bench_function("retry_decision_and_budget", |b| {
        b.iter(|| {
            let reason = retry_reason(black_box(&policy), black_box(&outcome));
            let permit = limiter.try_acquire(&limits, black_box(10));
            black_box((reason, permit.is_ok()))
        })
    });
    // Reporting an attempt's result to outlier detection over 1,000 endpoints.
    let addresses: Vec<SocketAddr> = (0..ENDPOINTS)
        .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 8080)))
        .collect();
    let config = OutlierDetection {
        consecutive_5xx: Some(5),
        consecutive_gateway_errors: Some(5),
        interval: Duration::from_secs(10),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_percent: 10,
        min_health_percent: 0,
    };
    let detector = OutlierDetector::new(&config, &addresses, Instant::now());
    let now = Instant::now();
    let mut i = 0usize;
    group.bench_function("outlier_on_result_success_1000", |b| {
        b.iter(|| {
            i = (i + 1) % ENDPOINTS;
            black_box(detector.on_result(i, ResultClass::Success, now))
        })
    });
    group.finish();
}

/// An inner service that answers at once with 1 KiB: what remains of a call when
/// the network is taken away.
#[derive(Clone)]
struct Instant1k;

static BODY: [u8; 1024] = [b'x'; 1024];

impl<B> Service<Request<B>> for Instant1k {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(&BODY)))))
    }
}

/// One service named `svc` (HTTP/2, one endpoint) as a client's snapshot.
fn stack_snapshot() -> Snapshot {
    stack_snapshot_with(Default::default())
}

/// [`stack_snapshot`] with Istio's default retry policy on the route (what
/// mesh-control gives every route without `retries`): the full request
/// flow instead of the fast path.
fn stack_snapshot_default_retries() -> Snapshot {
    stack_snapshot_with(RoutePolicy {
        retry: Some(RetryPolicy::istio_default()),
        ..Default::default()
    })
}

fn stack_snapshot_with(policy: RoutePolicy) -> Snapshot {
    let mut s = Snapshot::default();
    s.listeners.insert(
        Arc::from("svc"),
        Arc::new(Listener {
            name: Arc::from("svc"),
            route_config_name: Arc::from("svc:80"),
        }),
    );
    s.route_configs.insert(
        Arc::from("svc:80"),
        Arc::new(RouteConfig {
            name: Arc::from("svc:80"),
            virtual_hosts: Arc::from([VirtualHost {
                name: Arc::from("svc:80"),
                domains: names(&["svc".into(), "svc:80".into()]),
                routes: Arc::from([Route {
                    name: Arc::from("all"),
                    matcher: RouteMatch::any(),
                    action: WeightedClusters::single("c"),
                    policy,
                }]),
            }]),
        }),
    );
    s.clusters
        .insert(Arc::from("c"), Arc::new(Cluster::new("c", Protocol::Http2)));
    s.endpoints.insert(Arc::from("c"), Arc::new(cla("c", 1, 1)));
    s
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn request(uri: &Uri) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::default());
    *req.uri_mut() = uri.clone();
    req
}

/// Times `iters` sequential calls of `svc` inside one runtime, reading each
/// response body to the end.
fn time_calls<S, RB>(rt: &tokio::runtime::Runtime, svc: &mut S, uri: &Uri, iters: u64) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>>,
    S::Error: std::fmt::Debug,
    RB: hyper::body::Body,
    RB::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let ready = svc.ready().await.expect("ready");
            let response = ready.call(request(uri)).await.expect("a response");
            let body = response.into_body().collect().await.expect("a body");
            black_box(body);
        }
        start.elapsed()
    })
}

/// A hyper HTTP/2 client connection (request bodies `B`) to a hyper server
/// running `app`, over an in-memory pipe.
async fn h2_over_duplex<B, App, RB>(app: App) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    App: Service<Request<hyper::body::Incoming>, Response = Response<RB>> + Clone + Send + 'static,
    App::Future: Send + 'static,
    App::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    RB: hyper::body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let service = hyper_util::service::TowerToHyperService::new(app);
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(server_io), service)
            .await;
    });
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(client_io))
        .await
        .expect("an HTTP/2 handshake over the pipe");
    tokio::spawn(conn);
    sender
}

/// The sender as a tower service (what a pool hands the mesh layer).
fn h2_service<B>(
    sender: hyper::client::conn::http2::SendRequest<B>,
) -> impl Service<
    Request<B>,
    Response = Response<hyper::body::Incoming>,
    Error = hyper::Error,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static
where
    B: hyper::body::Body + Send + 'static,
{
    tower::service_fn(move |req: Request<B>| {
        let mut sender = sender.clone();
        async move { sender.send_request(req).await }
    })
}

fn client_stack(c: &mut Criterion) {
    let rt = runtime();
    let uri: Uri = "http://svc/items".parse().expect("uri");
    let layer = || MeshLayer::new(StaticSource::new(stack_snapshot())).rewrite_uri(false);
    let mut group = c.benchmark_group("client_stack");

    let mut bare = Instant1k;
    group.bench_function("instant/bare", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut bare, &uri, iters))
    });
    let mut meshed = layer().layer(Instant1k);
    group.bench_function("instant/mesh_layer", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut meshed, &uri, iters))
    });
    let mut retrying = MeshLayer::new(StaticSource::new(stack_snapshot_default_retries()))
        .rewrite_uri(false)
        .layer(Instant1k);
    group.bench_function("instant/mesh_layer_default_retries", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut retrying, &uri, iters))
    });

    let sender = rt.block_on(h2_over_duplex::<Full<Bytes>, _, _>(Instant1k));
    let mut bare = h2_service(sender);
    group.bench_function("h2_in_memory/bare", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut bare, &uri, iters))
    });
    // The mesh layer hands its inner service replayable bodies (retries).
    let sender = rt.block_on(h2_over_duplex::<MeshBody<Full<Bytes>>, _, _>(Instant1k));
    let mut meshed = layer().layer(h2_service(sender));
    group.bench_function("h2_in_memory/mesh_layer", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut meshed, &uri, iters))
    });
    // The caller's latency with and without a mirror (same timing for both).
    let mut plain = layer().layer(Instant1k);
    group.bench_function("instant/mirror/none", |b| {
        b.iter_custom(|iters| time_calls_apart(&rt, &mut plain, &uri, iters))
    });
    let mut mirrored = MeshLayer::new(StaticSource::new(stack_snapshot_mirrored()))
        .rewrite_uri(false)
        .layer(Instant1k);
    group.bench_function("instant/mirror/100pct", |b| {
        b.iter_custom(|iters| time_calls_apart(&rt, &mut mirrored, &uri, iters))
    });
    let stats = mirrored.stats();
    assert!(
        stats.mirrors_sent() > 0 && stats.mirrors_overflowed() == 0,
        "the copies were sent: {stats:?}"
    );
    group.finish();
}

/// [`stack_snapshot`] with the route mirrored in full to cluster `m` (one
/// endpoint): what Istio `mirror` + `mirrorPercentage: 100` gives.
fn stack_snapshot_mirrored() -> Snapshot {
    use proxyless::mesh_core::model::Fraction;
    use proxyless::mesh_core::traffic::{Mirror, Traffic};
    let traffic = Traffic {
        mirrors: Arc::from([Mirror {
            cluster: Arc::from("m"),
            fraction: Fraction::ALL,
        }]),
        ..Traffic::default()
    };
    let mut s = stack_snapshot_with(RoutePolicy {
        traffic: Some(Arc::new(traffic)),
        ..Default::default()
    });
    s.clusters
        .insert(Arc::from("m"), Arc::new(Cluster::new("m", Protocol::Http2)));
    s.endpoints.insert(Arc::from("m"), Arc::new(cla("m", 1, 1)));
    s
}

/// Times `iters` sequential calls of `svc`, each alone (request to response
/// body end); between calls, untimed, the runtime runs the tasks the calls
/// spawned (mirrored copies).
fn time_calls_apart<S, RB>(
    rt: &tokio::runtime::Runtime,
    svc: &mut S,
    uri: &Uri,
    iters: u64,
) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>>,
    S::Error: std::fmt::Debug,
    RB: hyper::body::Body,
    RB::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let start = Instant::now();
            let ready = svc.ready().await.expect("ready");
            let response = ready.call(request(uri)).await.expect("a response");
            let body = response.into_body().collect().await.expect("a body");
            black_box(body);
            total += start.elapsed();
            tokio::task::yield_now().await;
        }
        total
    })
}

/// Inserts the verified peer identity `serve_with` would, then calls `inner`.
#[derive(Clone)]
struct WithPeer<S> {
    peer: proxyless::PeerIdentity,
    inner: S,
}

impl<S, B> Service<Request<B>> for WithPeer<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.peer.clone());
        self.inner.call(req)
    }
}

/// The AuthorizationPolicies of the `server_authorization` rows: `one` ALLOW for
/// the client's principal, or ten (five DENY that do not match the bench request,
/// then five ALLOW of which only the last matches).
fn authorization_policies(ten: bool) -> Vec<proxyless::mesh_core::rbac::AuthorizationPolicy> {
    use proxyless::mesh_core::rbac::{
        Action, AuthorizationPolicy, Condition, Operation, Rule, Source, StringMatch,
    };
    let s = |v: &str| StringMatch::parse(v).expect("string match");
    let p = |v: &str| StringMatch::parse_path(v).expect("path match");
    let from = |principals: &[&str]| Source {
        principals: principals.iter().map(|v| s(v)).collect::<Vec<_>>().into(),
        ..Source::default()
    };
    let policy = |name: &str, action: Action, rule: Rule| {
        AuthorizationPolicy::new("bench", name, action, vec![rule]).expect("policy")
    };
    let allow_client = policy(
        "allow-client",
        Action::Allow,
        Rule {
            from: vec![from(&["cluster.local/ns/bench/sa/bench-client"])].into(),
            ..Rule::default()
        },
    );
    if !ten {
        return vec![allow_client];
    }
    vec![
        policy(
            "deny-admin-paths",
            Action::Deny,
            Rule {
                to: vec![Operation {
                    paths: vec![p("/admin/*"), p("/debug/*")].into(),
                    ..Operation::default()
                }]
                .into(),
                ..Rule::default()
            },
        ),
        policy(
            "deny-other-namespaces",
            Action::Deny,
            Rule {
                from: vec![Source {
                    not_namespaces: vec![s("bench"), s("istio-system")].into(),
                    ..Source::default()
                }]
                .into(),
                ..Rule::default()
            },
        ),
        policy(
            "deny-intruder",
            Action::Deny,
            Rule {
                from: vec![from(&["cluster.local/ns/bench/sa/intruder", "*/sa/legacy"])].into(),
                ..Rule::default()
            },
        ),
        policy(
            "deny-debug-header",
            Action::Deny,
            Rule {
                when: vec![
                    Condition::parse("request.headers[x-debug]", &["1", "true"], &[])
                        .expect("condition"),
                ]
                .into(),
                ..Rule::default()
            },
        ),
        policy(
            "deny-delete",
            Action::Deny,
            Rule {
                to: vec![Operation {
                    methods: vec![s("DELETE"), s("PATCH")].into(),
                    ..Operation::default()
                }]
                .into(),
                ..Rule::default()
            },
        ),
        policy(
            "allow-frontend",
            Action::Allow,
            Rule {
                from: vec![from(&["cluster.local/ns/shop/sa/frontend"])].into(),
                ..Rule::default()
            },
        ),
        policy(
            "allow-monitoring",
            Action::Allow,
            Rule {
                from: vec![Source {
                    namespaces: vec![s("monitoring")].into(),
                    ..Source::default()
                }]
                .into(),
                to: vec![Operation {
                    paths: vec![p("/metrics")].into(),
                    ..Operation::default()
                }]
                .into(),
                ..Rule::default()
            },
        ),
        policy(
            "allow-health",
            Action::Allow,
            Rule {
                to: vec![Operation {
                    paths: vec![p("/healthz"), p("/ready")].into(),
                    methods: vec![s("GET")].into(),
                    ..Operation::default()
                }]
                .into(),
                ..Rule::default()
            },
        ),
        policy(
            "allow-admin-sa",
            Action::Allow,
            Rule {
                from: vec![from(&["*/sa/admin"])].into(),
                to: vec![Operation {
                    paths: vec![p("/admin/*")].into(),
                    ..Operation::default()
                }]
                .into(),
                ..Rule::default()
            },
        ),
        allow_client,
    ]
}

fn server_authorization(c: &mut Criterion) {
    use proxyless::InboundPolicy;
    use proxyless::mesh_core::model::MtlsMode;
    use proxyless::mesh_core::spiffe::SpiffeId;
    let rt = runtime();
    let uri: Uri = "http://svc/items".parse().expect("uri");
    let peer = |sa: &str| {
        proxyless::PeerIdentity::new(
            SpiffeId::new("cluster.local", "bench", sa).expect("spiffe id"),
        )
    };
    let layer = || ServerLayer::new(ServerContext::new("svc", "bench", "bench-node"));
    let stack = |layer: ServerLayer, sa: &str| WithPeer {
        peer: peer(sa),
        inner: layer.layer(Instant1k),
    };
    let one = InboundPolicy::fixed(MtlsMode::Strict, authorization_policies(false));
    let mut allowed = stack(layer().inbound(one.clone()), "bench-client");
    let ten = InboundPolicy::fixed(MtlsMode::Strict, authorization_policies(true));
    let mut ten_allowed = stack(layer().inbound(ten.clone()), "bench-client");
    let mut ten_denied = stack(layer().inbound(ten.clone()), "stranger");
    // The rows measure what they say (checked up front: a filter may skip rows).
    time_calls(&rt, &mut allowed, &uri, 1);
    time_calls(&rt, &mut ten_allowed, &uri, 1);
    assert_eq!(one.denied() + ten.denied(), 0, "an allowed row was denied");
    time_calls(&rt, &mut ten_denied, &uri, 1);
    assert_eq!(ten.denied(), 1, "the denied row was not denied");
    let mut group = c.benchmark_group("server_authorization");
    let mut none = stack(layer(), "bench-client");
    group.bench_function("no_policy", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut none, &uri, iters))
    });
    group.bench_function("strict_1_allow_policy", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut allowed, &uri, iters))
    });
    group.bench_function("strict_10_policies_deny_allow", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut ten_allowed, &uri, iters))
    });
    group.bench_function("strict_10_policies_denied_403", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut ten_denied, &uri, iters))
    });
    group.finish();
}

/// Certificates for the handshake rows: a server (SPIFFE ID + DNS `localhost`, so
/// plain rustls can verify it by name) and a client, from the mesh CA's code.
struct HandshakeCerts {
    root: String,
    server: (String, String),
    client: (String, String),
}

fn handshake_certs() -> HandshakeCerts {
    use proxyless::control::ca::CertificateAuthority;
    use proxyless::mesh_core::spiffe::SpiffeId;
    let ca = CertificateAuthority::builder("cluster.local")
        .build()
        .expect("CA");
    let issue = |sa: &str, dns: &[String]| {
        let id = SpiffeId::new("cluster.local", "bench", sa).expect("spiffe id");
        let (issued, key) = ca
            .issue_serving_certificate(&id, dns, &[], None)
            .expect("certificate");
        (issued.chain_pem, key)
    };
    HandshakeCerts {
        root: ca.trust_bundle_pem(),
        server: issue("bench-server", &["localhost".to_owned()]),
        client: issue("bench-client", &[]),
    }
}

fn mtls_handshake(c: &mut Criterion) {
    use proxyless::layers::tls::{
        ALPN_H2_HTTP11, CertStore, Credentials, MeshAcceptor, MeshConnector, ServerIdentities,
    };
    use proxyless::mesh_core::spiffe::SpiffeId;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let certs = handshake_certs();
    let store = |(chain, key): &(String, String)| {
        CertStore::new(
            Credentials::from_pem(chain.as_bytes(), key.as_bytes(), certs.root.as_bytes())
                .expect("credentials"),
        )
        .expect("store")
    };
    let (server_store, client_store) = (store(&certs.server), store(&certs.client));
    let server_id = SpiffeId::new("cluster.local", "bench", "bench-server").expect("id");
    let connector = MeshConnector::new(
        &client_store,
        ServerIdentities::new([server_id]),
        ALPN_H2_HTTP11,
    )
    .expect("connector");
    let acceptor = MeshAcceptor::strict(&server_store, ALPN_H2_HTTP11).expect("acceptor");

    let der = |pem: &str| {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificates")
    };
    let key = |pem: &str| PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("key");
    let mut roots = rustls::RootCertStore::empty();
    for root in der(&certs.root) {
        roots.add(root).expect("root");
    }
    let roots = Arc::new(roots);
    let alpn: Vec<Vec<u8>> = ALPN_H2_HTTP11.iter().map(|p| p.to_vec()).collect();
    let mut server_config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder(roots.clone())
                .build()
                .expect("client verifier"),
        )
        .with_single_cert(der(&certs.server.0), key(&certs.server.1))
        .expect("server config");
    server_config.alpn_protocols = alpn.clone();
    server_config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server_config.send_tls13_tickets = 0;
    let mut client_config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(der(&certs.client.0), key(&certs.client.1))
        .expect("client config");
    client_config.alpn_protocols = alpn;
    client_config.resumption = rustls::client::Resumption::disabled();
    let plain_acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let plain_connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));

    let mut group = c.benchmark_group("mtls_handshake");
    group.bench_function("mesh_certstore_configs", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
                    let (client, server) = tokio::join!(
                        connector.connect("localhost", client_io),
                        acceptor.accept(server_io)
                    );
                    let (_stream, peer) = client.expect("client handshake");
                    let server = server.expect("server handshake");
                    black_box((peer, server.peer_identity().is_some()));
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("plain_rustls_configs", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
                    let name = ServerName::try_from("localhost").expect("name");
                    let (client, server) = tokio::join!(
                        plain_connector.connect(name, client_io),
                        plain_acceptor.accept(server_io)
                    );
                    let client = client.expect("client handshake");
                    let server = server.expect("server handshake");
                    black_box((
                        client.get_ref().1.alpn_protocol().is_some(),
                        server.get_ref().1.peer_certificates().is_some(),
                    ));
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

fn server_stack(c: &mut Criterion) {
    let rt = runtime();
    let uri: Uri = "http://svc/items".parse().expect("uri");
    let layer = ServerLayer::new(ServerContext::new("svc", "bench", "bench-node"));
    let mut group = c.benchmark_group("server_stack");

    let mut bare = Instant1k;
    group.bench_function("instant/bare", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut bare, &uri, iters))
    });
    let mut layered = layer.layer(Instant1k);
    group.bench_function("instant/server_layer", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut layered, &uri, iters))
    });

    let mut bare = h2_service(rt.block_on(h2_over_duplex::<Full<Bytes>, _, _>(Instant1k)));
    group.bench_function("h2_in_memory/bare", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut bare, &uri, iters))
    });
    let mut layered =
        h2_service(rt.block_on(h2_over_duplex::<Full<Bytes>, _, _>(layer.layer(Instant1k))));
    group.bench_function("h2_in_memory/server_layer", |b| {
        b.iter_custom(|iters| time_calls(&rt, &mut layered, &uri, iters))
    });
    group.finish();
}

/// Issue 6, acceptance 5: the span and metric work with sampling off.
/// Compare "client"/"server" with "no telemetry" (the difference is the cost).
fn telemetry_sampling_off(c: &mut Criterion) {
    use futures_util::FutureExt as _;
    use http_body_util::Empty;
    use proxyless::telemetry::{
        ClientTelemetryLayer, Identity, MetricsRegistry, OtelConfig, OtlpProtocol, Sampling,
        ServerTelemetryLayer, Telemetry,
    };
    use tower::service_fn;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let registry = MetricsRegistry::new();
    // A real OTLP tracer provider whose sampler drops every trace (nothing
    // is ever exported, so the endpoint is never dialed).
    let otel = OtelConfig::default()
        .with_protocol(OtlpProtocol::Grpc)
        .with_endpoint("http://127.0.0.1:9")
        .unwrap()
        .with_sampling(Sampling::AlwaysOff);
    let telemetry = Telemetry::builder(Identity::new("frontend", "shop").with_version("v1"))
        .otel(&otel)
        .unwrap()
        .metrics(&registry)
        .build();
    let app = service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    });
    let request = || {
        Request::get("http://catalog/items")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap()
    };
    let traced = || {
        let mut r = request();
        r.headers_mut().insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        r
    };
    let mut group = c.benchmark_group("telemetry, sampling off");
    let mut plain = app;
    group.bench_function("no telemetry", |b| {
        b.iter(|| {
            let response = plain.call(traced()).now_or_never().unwrap().unwrap();
            let _ = response.into_body().collect().now_or_never();
        })
    });
    let mut client = ClientTelemetryLayer::new(telemetry.clone()).layer(app);
    group.bench_function("client span + Istio metrics", |b| {
        b.iter(|| {
            let response = client.call(request()).now_or_never().unwrap().unwrap();
            let _ = response.into_body().collect().now_or_never();
        })
    });
    let mut server = ServerTelemetryLayer::new(telemetry).layer(app);
    group.bench_function("server span + Istio metrics", |b| {
        b.iter(|| {
            let response = server.call(traced()).now_or_never().unwrap().unwrap();
            let _ = response.into_body().collect().now_or_never();
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}

/// criterion's generated entry points (undocumented `pub fn`s).
mod harness {
    #![allow(missing_docs, unreachable_pub)]
    use super::*;

    criterion_group! {
        name = benches;
        config = config();
        targets = route_lookup, lb_pick, resilience, client_stack, server_stack, server_authorization, mtls_handshake, telemetry_sampling_off
    }
}

criterion_main!(harness::benches);
