//! Traffic management beyond routing, end to end over real sockets (issue 15,
//! acceptance 1 and 2): Istio YAML → embedded mesh-control → ADS → `XdsClient` →
//! `proxyless::Client` → a backend on 127.0.0.1 that records what it received and
//! counts the connections it accepted.
//!
//! - header `set` / `add` / `remove` at route and destination level, `rewrite.uri`,
//!   `rewrite.uriRegexRewrite` and `rewrite.authority` are seen exactly by the
//!   backend, and response header changes by the caller;
//! - `redirect` and `directResponse` are answered by the client stack: the backend
//!   never sees a connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proxyless::{Bootstrap, Client, XdsClient};
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
const NAMESPACE: &str = "shop";

/// What the backend received: each request's path and query, and headers.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    requests: Mutex<Vec<(String, HeaderMap)>>,
}

/// A backend with its own accept loop (so that accepted connections are counted),
/// answering `200 backend` with `x-backend-secret: s` and `x-keep: k`.
async fn backend() -> (SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            state.accepted.fetch_add(1, Ordering::SeqCst);
            let state = state.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move {
                    let target = req
                        .uri()
                        .path_and_query()
                        .map_or_else(String::new, |p| p.to_string());
                    state
                        .requests
                        .lock()
                        .expect("requests")
                        .push((target, req.headers().clone()));
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("x-backend-secret", "s")
                            .header("x-keep", "k")
                            .body(Full::new(Bytes::from_static(b"backend")))
                            .expect("response"),
                    )
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

/// mesh-control on `yaml` (which must load without a problem) and a client.
async fn mesh(yaml: &str) -> (mesh_control::ServerHandle, XdsClient, tempfile::TempDir) {
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
    (server, xds, dir)
}

/// The ServiceEntry of `catalog` (port 80, endpoint `addr`) and a VirtualService
/// whose `http:` list is `http` (YAML, indented by 2).
fn catalog(addr: SocketAddr, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: catalog
  namespace: {NAMESPACE}
spec:
  hosts:
  - catalog
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: {ip}
    ports: {{http: {port}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: catalog
  namespace: {NAMESPACE}
spec:
  hosts:
  - catalog
  http:
{http}",
        ip = addr.ip(),
        port = addr.port(),
    )
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn call(client: &Client, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .clone()
        .oneshot(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .unwrap_or_else(|e| panic!("GET {uri}: {e}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn all(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_sees_exactly_the_header_changes_and_rewrites() {
    let (addr, seen) = backend().await;
    let yaml = catalog(
        addr,
        "  - match:
    - uri:
        prefix: /v1/
    rewrite:
      uri: /v2/
      authority: catalog.internal:8080
    headers:
      request:
        set:
          x-set: route
          x-both: route
        add:
          x-add: route
        remove:
        - x-remove
      response:
        set:
          x-resp: route
        remove:
        - x-backend-secret
    route:
    - destination:
        host: catalog
      headers:
        request:
          set:
            x-both: destination
            x-dest: destination
        response:
          add:
            x-dest-resp: destination
  - match:
    - uri:
        prefix: /regex/
    rewrite:
      uriRegexRewrite:
        match: ^/regex/([^/]+)/(.*)$
        rewrite: /\\2/by/\\1
    route:
    - destination:
        host: catalog
",
    );
    let (_server, xds, _dir) = mesh(&yaml).await;
    let client = Client::new(xds);

    let reply = call(
        &client,
        "http://catalog/v1/items?page=2",
        &[
            ("x-remove", "gone"),
            ("x-add", "caller"),
            ("x-set", "caller"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "body: {}", reply.body);
    assert_eq!(reply.body, "backend");
    // Response changes: the route's set and remove, the destination's add.
    assert_eq!(all(&reply.headers, "x-resp"), ["route"]);
    assert_eq!(all(&reply.headers, "x-dest-resp"), ["destination"]);
    assert!(reply.headers.get("x-backend-secret").is_none());
    assert_eq!(all(&reply.headers, "x-keep"), ["k"]);

    let regex = call(&client, "http://catalog/regex/shoes/red?x=1", &[]).await;
    assert_eq!(regex.status, StatusCode::OK, "body: {}", regex.body);

    let requests = seen.requests.lock().expect("requests");
    let (target, headers) = &requests[0];
    assert_eq!(
        target, "/v2/items?page=2",
        "the prefix is rewritten, the query kept"
    );
    assert_eq!(
        headers.get("host").and_then(|h| h.to_str().ok()),
        Some("catalog.internal:8080"),
        "the authority is rewritten"
    );
    assert_eq!(
        all(headers, "x-set"),
        ["route"],
        "set overwrites the caller's value"
    );
    assert_eq!(all(headers, "x-add"), ["caller", "route"], "add appends");
    assert!(headers.get("x-remove").is_none(), "remove removes");
    assert_eq!(
        all(headers, "x-both"),
        ["route"],
        "the route's set is applied after the destination's (Envoy's order)"
    );
    assert_eq!(all(headers, "x-dest"), ["destination"]);
    let (target, _) = &requests[1];
    assert_eq!(target, "/red/by/shoes?x=1", "regex rewrite with groups");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_direct_responses_never_reach_the_backend() {
    let (addr, seen) = backend().await;
    let yaml = catalog(
        addr,
        "  - match:
    - uri:
        prefix: /old
    redirect:
      uri: /new
      authority: shop.example
      scheme: https
      redirectCode: 308
    headers:
      response:
        set:
          x-moved: \"yes\"
  - match:
    - uri:
        exact: /maintenance
    directResponse:
      status: 503
      body:
        string: down for maintenance
  - route:
    - destination:
        host: catalog
",
    );
    let (_server, xds, dir) = mesh(&yaml).await;
    let client = Client::new(xds);

    let moved = call(&client, "http://catalog/old/page?x=1", &[]).await;
    assert_eq!(moved.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        all(&moved.headers, "location"),
        ["https://shop.example/new?x=1"]
    );
    assert_eq!(all(&moved.headers, "x-moved"), ["yes"]);

    let down = call(&client, "http://catalog/maintenance", &[]).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(down.body, "down for maintenance");
    assert_eq!(
        all(&down.headers, "content-type"),
        ["text/plain"],
        "a direct response's body is text/plain, as Envoy sends it"
    );
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        0,
        "no connection for local answers"
    );

    // The catch-all route still reaches the backend (the test can fail).
    let routed = call(&client, "http://catalog/other", &[]).await;
    assert_eq!(routed.body, "backend");
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);

    // What gRPC clients would do with this route table is said, not hidden: at the
    // YAML's lines (`check --for grpc`) and for what is served (`/status`).
    let options = mesh_control::config::MeshOptions::default();
    let report = mesh_control::grpc_report(&[dir.path()], &options);
    let lines: Vec<String> = report.written.iter().map(|d| d.to_string()).collect();
    for (field, key) in [
        ("http[0].redirect", "    redirect:"),
        ("http[1].directResponse", "    directResponse:"),
    ] {
        // The key's line, or its value's (the first line of the mapping).
        let at = 1 + yaml.lines().position(|l| l == key).expect("the key");
        assert!(
            report
                .written
                .iter()
                .any(|d| (d.line == at || d.line == at + 1)
                    && d.message.contains(field)
                    && d.message.contains("fail every RPC this route matches")),
            "check --for grpc reports {field} at line {at}: {lines:#?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("http[0].headers") && l.contains("ignored by gRPC")),
        "{lines:#?}"
    );
    let served = mesh_control::grpc_compatibility(dir.path(), &options);
    assert!(
        served
            .iter()
            .any(|f| f.contains("redirect") && f.contains("UNAVAILABLE")),
        "the served-config findings (/status) name the redirect: {served:#?}"
    );
}
