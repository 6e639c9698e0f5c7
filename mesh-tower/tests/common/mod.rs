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
    LocalityEndpoints, PathMatch, Protocol, Route, RouteConfig, RouteMatch, ValueMatch,
    VirtualHost, WeightedClusters,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub mod admin;

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
