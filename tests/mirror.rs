//! Request mirroring end to end over real sockets (issue 15, acceptance 3):
//! Istio YAML (`mirror` + `mirrorPercentage`) → embedded mesh-control → ADS →
//! `XdsClient` → `proxyless::Client` with an in-flight cap of [`CAP`] → the
//! route's backend and a mirror backend on 127.0.0.1.
//!
//! - 100% mirrored to a backend that stalls for 2 s: every caller's call
//!   returns long before the copies end, exactly [`CAP`] copies are in flight
//!   and the rest overflow, no caller fails, and the mirror receives the copies
//!   it accepted with the `-shadow` host and the route's header changes;
//! - a mirror whose endpoint refuses connections fails no caller either.
//!
//! The caller's latency with and without a mirror is a row of `benches/micro.rs`
//! (`client/mirror/*`), not an assertion here.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proxyless::layers::{MeshClient, Pool};
use proxyless::{Bootstrap, Client, MeshLayer, XdsClient};
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
const NAMESPACE: &str = "shop";
/// The in-flight cap on copies.
const CAP: usize = 4;
/// Sequential caller requests.
const CALLS: usize = 20;
/// How long the mirror backend stalls before answering.
const STALL: Duration = Duration::from_secs(2);

/// The requests a backend received: `Host`, path and headers.
type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

/// A backend answering `200 <name>` after `stall`, recording each request as it
/// arrives.
async fn backend(name: &'static str, stall: Duration) -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let state = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    state
                        .lock()
                        .expect("seen")
                        .push((path, req.headers().clone()));
                    tokio::time::sleep(stall).await;
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        name.as_bytes(),
                    ))))
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    (addr, seen)
}

/// An address where nothing listens (connections are refused).
async fn refusing() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("addr")
}

/// A ServiceEntry for `host` (port 80) with the endpoint `addr`.
fn service_entry(host: &str, addr: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {host}
  namespace: {NAMESPACE}
spec:
  hosts:
  - {host}
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: {ip}
    ports: {{http: {port}}}
",
        ip = addr.ip(),
        port = addr.port(),
    )
}

/// `catalog` (at `catalog`), mirrored in full to `catalog-mirror` (at
/// `mirror`), the route setting `x-tag: routed` on requests.
fn yaml(catalog: SocketAddr, mirror: SocketAddr) -> String {
    format!(
        "{}---
{}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: catalog
  namespace: {NAMESPACE}
spec:
  hosts:
  - catalog
  http:
  - route:
    - destination:
        host: catalog
    mirror:
      host: catalog-mirror
    mirrorPercentage:
      value: 100.0
    headers:
      request:
        set:
          x-tag: routed
",
        service_entry("catalog", catalog),
        service_entry("catalog-mirror", mirror),
    )
}

/// mesh-control on `yaml` (which must load without a problem), an xDS client
/// that has `catalog`'s listener, and a client copying at most [`CAP`] requests
/// at once.
async fn mesh(yaml: &str) -> (mesh_control::ServerHandle, Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start mesh-control");
    let status = server.status();
    assert_eq!(
        status["diagnostics"],
        serde_json::json!([]),
        "mesh-control rejects the test's YAML:\n{yaml}\nstatus: {status:#}"
    );
    let json = server.bootstrap_json("caller", NAMESPACE);
    let xds = XdsClient::start(Bootstrap::from_json(&json).expect("bootstrap"));
    tokio::time::timeout(DEADLINE, xds.wait_for_listener("catalog"))
        .await
        .expect("the listener of catalog within the deadline")
        .expect("the listener of catalog");
    let client = MeshClient::from_parts(MeshLayer::new(xds).mirror_in_flight(CAP), Pool::new());
    (server, client, dir)
}

/// One caller request: its status, body, and how long the call took.
async fn call(client: &Client, i: usize) -> (StatusCode, String, Duration) {
    let started = Instant::now();
    let req = Request::get(format!("http://catalog/items/{i}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = client
        .clone()
        .oneshot(req)
        .await
        .unwrap_or_else(|e| panic!("call {i}: {e}"));
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_to_a_stalled_mirror_never_hold_callers_and_overflow_past_the_cap() {
    let (catalog, seen) = backend("catalog", Duration::ZERO).await;
    let (mirror, copies) = backend("mirror", STALL).await;
    let (_server, client, _dir) = mesh(&yaml(catalog, mirror)).await;

    let started = Instant::now();
    for i in 0..CALLS {
        let (status, body, took) = call(&client, i).await;
        assert_eq!(status, StatusCode::OK, "call {i}: {body}");
        assert_eq!(body, "catalog");
        assert!(
            took < STALL / 4,
            "call {i} took {took:?}: it waited for its copy"
        );
    }
    let all_calls = started.elapsed();
    assert!(
        all_calls < STALL,
        "{CALLS} calls took {all_calls:?}: callers waited for the copies"
    );
    let stats = client.stats().clone();
    assert_eq!(
        stats.mirrors_sent(),
        CAP as u64,
        "exactly the cap is in flight: {stats:?}"
    );
    assert_eq!(
        stats.mirrors_overflowed(),
        (CALLS - CAP) as u64,
        "the rest overflow: {stats:?}"
    );
    assert_eq!(stats.mirrors_skipped(), 0, "{stats:?}");
    assert_eq!(seen.lock().expect("seen").len(), CALLS);

    // The copies are still pending at the mirror (it stalls), then end.
    let arrived = tokio::time::timeout(DEADLINE, async {
        loop {
            if copies.lock().expect("copies").len() >= CAP {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        arrived.is_ok(),
        "the mirror received {:?}",
        copies.lock().expect("copies").len()
    );
    let copies = copies.lock().expect("copies").clone();
    assert_eq!(
        copies.len(),
        CAP,
        "the mirror receives the copies it accepted"
    );
    for (path, headers) in &copies {
        assert!(path.starts_with("/items/"), "{path}");
        assert_eq!(
            headers.get("host").and_then(|h| h.to_str().ok()),
            Some("catalog-shadow"),
            "Envoy's shadow host"
        );
        assert_eq!(
            headers.get("x-tag").and_then(|h| h.to_str().ok()),
            Some("routed"),
            "the route's header changes"
        );
    }
    // The copies were the first CAP calls (sequential: each took its place).
    let mut paths: Vec<&str> = copies.iter().map(|(p, _)| p.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/items/0", "/items/1", "/items/2", "/items/3"]);

    // Once the stalled copies answer, their places are free again.
    tokio::time::sleep(STALL).await;
    let deadline = Instant::now() + DEADLINE;
    let mut sent = stats.mirrors_sent();
    while sent == CAP as u64 && Instant::now() < deadline {
        let (status, _, _) = call(&client, CALLS).await;
        assert_eq!(status, StatusCode::OK);
        sent = stats.mirrors_sent();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sent > CAP as u64,
        "copies are sent again once the stalled ones end: {stats:?}"
    );
    assert_eq!(stats.mirrors_failed(), 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_refuses_connections_fails_no_caller() {
    let (catalog, seen) = backend("catalog", Duration::ZERO).await;
    let mirror = refusing().await;
    let (_server, client, _dir) = mesh(&yaml(catalog, mirror)).await;

    for i in 0..CALLS {
        let (status, body, _) = call(&client, i).await;
        assert_eq!(status, StatusCode::OK, "call {i}: {body}");
        assert_eq!(body, "catalog");
    }
    assert_eq!(seen.lock().expect("seen").len(), CALLS);
    let stats = client.stats().clone();
    // Every copy that was sent fails, counted; none reaches a caller.
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            let s = &stats;
            if s.mirrors_failed() == s.mirrors_sent() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(ended.is_ok(), "{stats:?}");
    assert!(stats.mirrors_sent() > 0, "{stats:?}");
    assert_eq!(
        stats.mirrors_sent() + stats.mirrors_overflowed(),
        CALLS as u64,
        "{stats:?}"
    );
}
