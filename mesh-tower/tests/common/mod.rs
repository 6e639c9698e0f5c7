//! Shared fixtures: axum backends on real sockets and hand-built snapshots.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use mesh_core::Snapshot;
use mesh_core::model::{
    Cluster, ClusterLoadAssignment, Endpoint, HeaderMatch, LbPolicy, Listener, Locality,
    LocalityEndpoints, PathMatch, Protocol, Route, RouteConfig, RouteMatch, RoutePolicy,
    ValueMatch, VirtualHost, WeightedClusters,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub mod admin;
pub mod pki;

/// Waits for `f` at most 10 s: the deadline every test wait uses.
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(10), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// What a backend saw of a request.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Seen {
    pub backend: String,
    pub version: String,
    pub uri_authority: Option<String>,
    pub host: Option<String>,
    pub path: String,
}

#[derive(Clone)]
struct BackendState {
    name: &'static str,
    first_chunk: mpsc::UnboundedSender<()>,
}

/// A backend: an axum app on 127.0.0.1:0 speaking HTTP/1.1 and h2c.
pub struct Backend {
    pub addr: SocketAddr,
    /// One message per streamed request, when its first chunk arrives.
    pub first_chunk: mpsc::UnboundedReceiver<()>,
}

pub async fn backend(name: &'static str) -> Backend {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = BackendState {
        name,
        first_chunk: tx,
    };
    let app = Router::new()
        .route("/stream", post(stream))
        .route("/trailers", any(trailers))
        .fallback(echo)
        .with_state(state);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Backend {
        addr,
        first_chunk: rx,
    }
}

async fn echo(State(state): State<BackendState>, req: Request) -> axum::Json<Seen> {
    axum::Json(Seen {
        backend: state.name.to_owned(),
        version: format!("{:?}", req.version()),
        uri_authority: req.uri().authority().map(|a| a.to_string()),
        host: req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned),
        path: req.uri().path().to_owned(),
    })
}

/// Reads the body chunk by chunk; reports the first chunk at once.
async fn stream(State(state): State<BackendState>, req: Request) -> String {
    let mut body = req.into_body();
    let mut chunks = 0;
    let mut bytes = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return "error".into();
        };
        if let Ok(data) = frame.into_data() {
            if chunks == 0 {
                let _ = state.first_chunk.send(());
            }
            chunks += 1;
            bytes += data.len();
        }
    }
    format!("{bytes} bytes")
}

/// A gRPC-shaped answer: one data frame, then trailers.
async fn trailers() -> Response {
    let frames = vec![
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"payload"))),
        Ok(http_body::Frame::trailers({
            let mut t = HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            t.insert("grpc-message", "fine".parse().unwrap());
            t
        })),
    ];
    let body = Body::new(StreamBody::new(tokio_stream::iter(frames)));
    (StatusCode::OK, [("content-type", "application/grpc")], body).into_response()
}

fn cla(name: &str, addrs: &[SocketAddr]) -> Arc<ClusterLoadAssignment> {
    let mut unique = addrs.to_vec();
    unique.dedup();
    let endpoints = unique
        .iter()
        .map(|a| Endpoint {
            address: *a,
            weight: 1,
            labels: Arc::from([]),
        })
        .collect();
    Arc::new(
        ClusterLoadAssignment::new(
            name.into(),
            vec![LocalityEndpoints {
                locality: Locality::default(),
                weight: 1,
                priority: 0,
                endpoints,
            }],
        )
        .unwrap(),
    )
}

fn route(name: &str, matcher: RouteMatch, cluster: &str) -> Route {
    Route {
        name: name.into(),
        matcher,
        action: WeightedClusters::single(cluster),
        policy: Default::default(),
    }
}

/// Service `catalog` (listener `catalog`): header `x-version: v2` or path
/// `/b...` → backend b; `/both...` → round robin over a and b; anything
/// else → a. The control server said `nope` does not exist.
pub fn snapshot(a: SocketAddr, b: SocketAddr, protocol: Protocol) -> Snapshot {
    let mut s = Snapshot::default();
    add_service(&mut s, "catalog", a, b, protocol);
    s.missing_listeners.insert("nope".into());
    s
}

pub fn add_service(s: &mut Snapshot, name: &str, a: SocketAddr, b: SocketAddr, protocol: Protocol) {
    let rc_name = format!("{name}:80");
    s.listeners.insert(
        name.into(),
        Arc::new(Listener {
            name: name.into(),
            route_config_name: rc_name.as_str().into(),
        }),
    );
    let v2 = RouteMatch {
        headers: vec![HeaderMatch {
            name: "x-version".into(),
            value: ValueMatch::Exact("v2".into()),
            invert: false,
        }]
        .into(),
        ..RouteMatch::any()
    };
    let prefix = |p: &str| RouteMatch {
        path: PathMatch::Prefix(p.into()),
        ..RouteMatch::any()
    };
    let ca = format!("outbound|80|a|{name}");
    let cb = format!("outbound|80|b|{name}");
    let cboth = format!("outbound|80||{name}");
    s.route_configs.insert(
        rc_name.as_str().into(),
        Arc::new(RouteConfig {
            name: rc_name.as_str().into(),
            virtual_hosts: vec![VirtualHost {
                name: rc_name.as_str().into(),
                domains: vec![name.into(), rc_name.as_str().into()].into(),
                routes: vec![
                    route("v2", v2, &cb),
                    route("both", prefix("/both"), &cboth),
                    route("b", prefix("/b"), &cb),
                    route("stream", prefix("/stream"), &ca),
                    route("default", RouteMatch::any(), &ca),
                ]
                .into(),
            }]
            .into(),
        }),
    );
    for (cluster, addrs) in [(&ca, vec![a]), (&cb, vec![b]), (&cboth, vec![a, b])] {
        s.clusters.insert(
            cluster.as_str().into(),
            Arc::new(Cluster {
                lb_policy: LbPolicy::RoundRobin,
                ..Cluster::new(cluster.as_str(), protocol)
            }),
        );
        s.endpoints
            .insert(cluster.as_str().into(), cla(cluster, &addrs));
    }
}

/// An address nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A backend answering every request with `handler`, on 127.0.0.1:0
/// (HTTP/1.1 and h2c). The handler sees the peer address in a
/// `ConnectInfo<SocketAddr>` extension.
pub async fn serve_fn<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let app = Router::new().fallback(move |req: Request| {
        let handler = handler.clone();
        async move { handler(req).await }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// A snapshot with one service `name` (listener `name`), one route with
/// `policy` to one cluster (`cluster`, renamed `outbound|80||<name>`) whose
/// endpoints are `endpoints` (each with its locality, weight 1).
pub fn one_service(
    name: &str,
    cluster: Cluster,
    policy: RoutePolicy,
    endpoints: &[(SocketAddr, Locality)],
) -> Snapshot {
    let mut s = Snapshot::default();
    add_one_service(&mut s, name, cluster, policy, endpoints);
    s
}

/// Adds what [`one_service`] builds to `s`.
pub fn add_one_service(
    s: &mut Snapshot,
    name: &str,
    cluster: Cluster,
    policy: RoutePolicy,
    endpoints: &[(SocketAddr, Locality)],
) {
    let rc_name = format!("{name}:80");
    let cluster_name = format!("outbound|80||{name}");
    s.listeners.insert(
        name.into(),
        Arc::new(Listener {
            name: name.into(),
            route_config_name: rc_name.as_str().into(),
        }),
    );
    s.route_configs.insert(
        rc_name.as_str().into(),
        Arc::new(RouteConfig {
            name: rc_name.as_str().into(),
            virtual_hosts: vec![VirtualHost {
                name: rc_name.as_str().into(),
                domains: vec![name.into(), rc_name.as_str().into()].into(),
                routes: vec![Route {
                    name: "all".into(),
                    matcher: RouteMatch::any(),
                    action: WeightedClusters::single(cluster_name.as_str()),
                    policy,
                }]
                .into(),
            }]
            .into(),
        }),
    );
    s.clusters.insert(
        cluster_name.as_str().into(),
        Arc::new(Cluster {
            name: cluster_name.as_str().into(),
            eds_service_name: cluster_name.as_str().into(),
            ..cluster
        }),
    );
    let mut localities: Vec<LocalityEndpoints> = Vec::new();
    for (addr, locality) in endpoints {
        let endpoint = Endpoint {
            address: *addr,
            weight: 1,
            labels: Arc::from([]),
        };
        match localities.iter_mut().find(|l| &l.locality == locality) {
            Some(l) => {
                let mut all = l.endpoints.to_vec();
                all.push(endpoint);
                l.endpoints = all.into();
                l.weight += 1;
            }
            None => localities.push(LocalityEndpoints {
                locality: locality.clone(),
                weight: 1,
                priority: 0,
                endpoints: vec![endpoint].into(),
            }),
        }
    }
    s.endpoints.insert(
        cluster_name.as_str().into(),
        Arc::new(ClusterLoadAssignment::new(cluster_name.as_str().into(), localities).unwrap()),
    );
}

/// Counts requests in flight and remembers the most seen at once.
#[derive(Debug, Default)]
pub struct Gauge {
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

impl Gauge {
    /// One more in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> GaugeGuard {
        use std::sync::atomic::Ordering;
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        GaugeGuard(self.clone())
    }

    pub fn max(&self) -> usize {
        self.max.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn now(&self) -> usize {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub struct GaugeGuard(Arc<Gauge>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits (at most 10 s) until `condition` holds, checking every millisecond.
pub async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

/// The attempt number Envoy-style clients put on a request.
pub fn attempt_of(req: &Request) -> u32 {
    req.headers()
        .get("x-envoy-attempt-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A plain response with `status` and `body`.
pub fn reply(status: u16, body: impl Into<String>) -> Response {
    (StatusCode::from_u16(status).unwrap(), body.into()).into_response()
}

/// The whole error chain, ` / ` between the sources: what tests assert on
/// when the reason is a source of the error they get.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(" / ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
