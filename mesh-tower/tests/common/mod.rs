//! Fixtures of mesh-tower's tests: axum backends on real sockets, the fake
//! mesh-control admin API, and the test PKI as mesh-tower's types. What other test
//! crates share (snapshot builders, polling helpers, the PKI itself) is in
//! mesh-testkit.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub mod admin;
pub mod pki;

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
