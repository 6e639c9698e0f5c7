//! DestinationRule connection settings and `portLevelSettings` end to end
//! over real sockets (issue 15): Istio YAML → embedded mesh-control → ADS →
//! `XdsClient` → `proxyless::Client` → backends on 127.0.0.1 that count the
//! connections they accept and the HTTP version of each request.
//!
//! - `tcp.maxConnectionDuration`: after it, a request goes over a new
//!   connection, and no request fails (HTTP/1.1 and HTTP/2);
//! - `http.maxConcurrentStreams: 2` with 6 concurrent slow requests on
//!   HTTP/2: the backend accepts at least 3 connections and never sees more
//!   than 2 requests at once on one;
//! - `tcp.tcpKeepalive`: the client's socket has `SO_KEEPALIVE`,
//!   `TCP_KEEPIDLE`, `TCP_KEEPINTVL` and `TCP_KEEPCNT` as configured (read
//!   back with getsockopt on a duplicate of the client's descriptor);
//! - `portLevelSettings`: `maxRequestsPerConnection: 1` on one port of a
//!   service opens a connection per request there only;
//! - `http.h2UpgradePolicy: UPGRADE`: a service declared HTTP receives
//!   HTTP/2 (prior knowledge, as Envoy's upgraded clusters speak it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use proxyless::layers::{MeshClient, Pool};
use proxyless::{Bootstrap, Client, MeshLayer, XdsClient};
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
const NAMESPACE: &str = "shop";

/// What a backend saw: connections accepted (with the client's address),
/// the HTTP version of each request, and the most requests in flight at
/// once on any one connection.
#[derive(Default)]
struct Seen {
    accepted: Mutex<Vec<SocketAddr>>,
    versions: Mutex<Vec<Version>>,
    peak_per_connection: AtomicUsize,
}

impl Seen {
    fn accepts(&self) -> usize {
        self.accepted.lock().expect("accepted").len()
    }
}

/// A backend speaking HTTP/1.1 and HTTP/2 (prior knowledge), answering
/// `200 ok` after `delay`.
async fn backend(delay: Duration) -> (SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            state.accepted.lock().expect("accepted").push(peer);
            let in_flight = Arc::new(AtomicUsize::new(0));
            let state = state.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                let in_flight = in_flight.clone();
                async move {
                    state.versions.lock().expect("versions").push(req.version());
                    let now = in_flight.fetch_add(1, Ordering::AcqRel) + 1;
                    state.peak_per_connection.fetch_max(now, Ordering::AcqRel);
                    tokio::time::sleep(delay).await;
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"ok",
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

/// A ServiceEntry for `catalog` with one port per `(number, protocol,
/// backend)`, the endpoint 127.0.0.1 serving each on its backend's port.
fn service_entry(ports: &[(u16, &str, SocketAddr)]) -> String {
    let mut decl = String::new();
    let mut map = String::new();
    for (number, protocol, addr) in ports {
        decl.push_str(&format!(
            "  - {{number: {number}, name: p{number}, protocol: {protocol}}}\n"
        ));
        map.push_str(&format!("p{number}: {}, ", addr.port()));
    }
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: {NAMESPACE}}}
spec:
  hosts: [catalog]
  ports:
{decl}  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{{map}}}
"
    )
}

/// A DestinationRule for `catalog` with `policy` as its trafficPolicy
/// (indented 4).
fn destination_rule(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: {NAMESPACE}}}
spec:
  host: catalog
  trafficPolicy:
{policy}"
    )
}

/// mesh-control on `yaml` (which must load without a problem), and a
/// client that has the listeners of `ports` of `catalog`.
async fn mesh(
    yaml: &str,
    ports: &[u16],
) -> (mesh_control::ServerHandle, Client, tempfile::TempDir) {
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
    for port in ports {
        let name = format!("catalog.{NAMESPACE}:{port}");
        tokio::time::timeout(DEADLINE, xds.wait_for_listener(&name))
            .await
            .unwrap_or_else(|_| panic!("the listener {name} within the deadline"))
            .unwrap_or_else(|e| panic!("the listener {name}: {e}"));
    }
    let client = MeshClient::from_parts(MeshLayer::new(xds), Pool::new());
    (server, client, dir)
}

/// One request to `catalog:port`: its status (a failure panics, naming it).
async fn call(client: &Client, port: u16, what: &str) -> StatusCode {
    let req = Request::get(format!("http://catalog:{port}/items"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(DEADLINE, client.clone().oneshot(req))
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within the deadline"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = resp.status();
    let _ = resp.into_body().collect().await.expect("body");
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_max_duration_is_replaced_without_failing_a_request() {
    for protocol in ["HTTP", "HTTP2"] {
        let (addr, seen) = backend(Duration::ZERO).await;
        let yaml = format!(
            "{}---\n{}",
            service_entry(&[(80, protocol, addr)]),
            destination_rule(
                "    connectionPool:
      tcp: {maxConnectionDuration: 300ms}
"
            )
        );
        let (_server, client, _dir) = mesh(&yaml, &[80]).await;
        assert_eq!(call(&client, 80, "first").await, StatusCode::OK);
        assert_eq!(seen.accepts(), 1, "{protocol}");
        // Still young: the same connection (the pause lets an HTTP/1.1
        // connection whose response was read go back to the pool).
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(call(&client, 80, "second").await, StatusCode::OK);
        assert_eq!(seen.accepts(), 1, "{protocol}: reused while young");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(call(&client, 80, "after").await, StatusCode::OK);
        assert_eq!(seen.accepts(), 2, "{protocol}: a new connection past 300ms");
        // A steady stream across several ages: every request succeeds, and
        // connections keep being replaced.
        for i in 0..12 {
            assert_eq!(
                call(&client, 80, &format!("{protocol} stream {i}")).await,
                StatusCode::OK
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            seen.accepts() >= 5,
            "{protocol}: 1.2 s of requests over 300 ms connections took {} connections",
            seen.accepts()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_concurrent_streams_than_the_cap_open_more_http2_connections() {
    let (addr, seen) = backend(Duration::from_millis(500)).await;
    let yaml = format!(
        "{}---\n{}",
        service_entry(&[(80, "HTTP2", addr)]),
        destination_rule(
            "    connectionPool:
      http: {maxConcurrentStreams: 2}
"
        )
    );
    let (_server, client, _dir) = mesh(&yaml, &[80]).await;
    let calls = (0..6).map(|i| {
        let client = client.clone();
        tokio::spawn(async move { call(&client, 80, &format!("concurrent {i}")).await })
    });
    for status in futures_util::future::join_all(calls).await {
        assert_eq!(status.expect("join"), StatusCode::OK);
    }
    assert!(
        seen.accepts() >= 3,
        "6 concurrent requests at 2 streams per connection over {} connections",
        seen.accepts()
    );
    assert!(
        seen.peak_per_connection.load(Ordering::Acquire) <= 2,
        "a connection carried {} requests at once",
        seen.peak_per_connection.load(Ordering::Acquire)
    );
    assert!(
        seen.versions
            .lock()
            .expect("versions")
            .iter()
            .all(|v| *v == Version::HTTP_2)
    );

    // Without the cap: one connection carries all six.
    let (addr, seen) = backend(Duration::from_millis(200)).await;
    let yaml = service_entry(&[(80, "HTTP2", addr)]);
    let (_server, client, _dir) = mesh(&yaml, &[80]).await;
    let calls = (0..6).map(|i| {
        let client = client.clone();
        tokio::spawn(async move { call(&client, 80, &format!("uncapped {i}")).await })
    });
    for status in futures_util::future::join_all(calls).await {
        assert_eq!(status.expect("join"), StatusCode::OK);
    }
    assert_eq!(seen.accepts(), 1);
}

/// The keepalive options of this process's socket whose local address is
/// `local` (a duplicate of its descriptor, taken with pidfd_getfd):
/// `(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT)`.
fn keepalive_of(local: SocketAddr) -> (bool, Duration, Duration, u32) {
    use rustix::net::sockopt;
    let me = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .expect("pidfd_open");
    for fd in 0..4096 {
        let Ok(dup) =
            rustix::process::pidfd_getfd(&me, fd, rustix::process::PidfdGetfdFlags::empty())
        else {
            continue;
        };
        let Ok(Some(addr)) =
            rustix::net::getsockname(&dup).map(|a| std::net::SocketAddr::try_from(a).ok())
        else {
            continue;
        };
        if addr != local {
            continue;
        }
        return (
            sockopt::socket_keepalive(&dup).expect("SO_KEEPALIVE"),
            sockopt::tcp_keepidle(&dup).expect("TCP_KEEPIDLE"),
            sockopt::tcp_keepintvl(&dup).expect("TCP_KEEPINTVL"),
            sockopt::tcp_keepcnt(&dup).expect("TCP_KEEPCNT"),
        );
    }
    panic!("no socket of this process is bound to {local}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_keepalive_is_set_on_the_client_socket() {
    let (with, seen_with) = backend(Duration::ZERO).await;
    let (without, seen_without) = backend(Duration::ZERO).await;
    let yaml = format!(
        "{}---\n{}",
        service_entry(&[(80, "HTTP", with), (81, "HTTP", without)]),
        destination_rule(
            "    portLevelSettings:
    - port: {number: 80}
      connectionPool:
        tcp:
          tcpKeepalive: {probes: 4, time: 11s, interval: 7s}
"
        )
    );
    let (_server, client, _dir) = mesh(&yaml, &[80, 81]).await;
    assert_eq!(call(&client, 80, "keepalive").await, StatusCode::OK);
    assert_eq!(call(&client, 81, "plain").await, StatusCode::OK);
    let peer = seen_with.accepted.lock().expect("accepted")[0];
    assert_eq!(
        keepalive_of(peer),
        (true, Duration::from_secs(11), Duration::from_secs(7), 4),
        "the configured keepalive"
    );
    let peer = seen_without.accepted.lock().expect("accepted")[0];
    assert!(
        !keepalive_of(peer).0,
        "no keepalive where none is configured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_level_settings_apply_to_their_port_only() {
    let (main, seen_main) = backend(Duration::ZERO).await;
    let (alt, seen_alt) = backend(Duration::ZERO).await;
    let yaml = format!(
        "{}---\n{}",
        service_entry(&[(80, "HTTP", main), (8080, "HTTP", alt)]),
        destination_rule(
            "    connectionPool:
      http: {maxRequestsPerConnection: 100}
    portLevelSettings:
    - port: {number: 8080}
      connectionPool:
        http: {maxRequestsPerConnection: 1}
"
        )
    );
    let (_server, client, _dir) = mesh(&yaml, &[80, 8080]).await;
    for i in 0..5 {
        assert_eq!(call(&client, 80, &format!("80 #{i}")).await, StatusCode::OK);
        assert_eq!(
            call(&client, 8080, &format!("8080 #{i}")).await,
            StatusCode::OK
        );
    }
    assert_eq!(seen_main.accepts(), 1, "port 80 reuses its connection");
    assert_eq!(
        seen_alt.accepts(),
        5,
        "port 8080: one connection per request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upgrade_speaks_http2_to_a_service_declared_http() {
    let (upgraded, seen_upgraded) = backend(Duration::ZERO).await;
    let (plain, seen_plain) = backend(Duration::ZERO).await;
    let yaml = format!(
        "{}---\n{}",
        service_entry(&[(80, "HTTP", upgraded), (81, "HTTP", plain)]),
        destination_rule(
            "    portLevelSettings:
    - port: {number: 80}
      connectionPool:
        http: {h2UpgradePolicy: UPGRADE}
"
        )
    );
    let (_server, client, _dir) = mesh(&yaml, &[80, 81]).await;
    for i in 0..3 {
        assert_eq!(
            call(&client, 80, &format!("upgraded {i}")).await,
            StatusCode::OK
        );
        assert_eq!(
            call(&client, 81, &format!("plain {i}")).await,
            StatusCode::OK
        );
    }
    assert_eq!(
        *seen_upgraded.versions.lock().expect("versions"),
        vec![Version::HTTP_2; 3]
    );
    assert_eq!(seen_upgraded.accepts(), 1, "one multiplexed connection");
    assert_eq!(
        *seen_plain.versions.lock().expect("versions"),
        vec![Version::HTTP_11; 3]
    );
}
