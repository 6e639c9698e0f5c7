//! Per-node views end to end over real sockets (issue 15, acceptance 4 and 5):
//! Istio YAML → embedded mesh-control → ADS → `XdsClient` → `proxyless::Client`
//! → backends on 127.0.0.1 that answer with their own name.
//!
//! - `match.sourceLabels`: callers labelled `version: canary` (bootstrap
//!   `LABELS`) land on v2, the others on v1, every call;
//! - `match.sourceNamespace`: a caller in namespace `a` lands on v2, one in `b`
//!   on v1;
//! - `exportTo: ["."]` on a ServiceEntry: a client of another namespace gets
//!   NOT_FOUND for the service (the server's `resource_errors` entry says why),
//!   a client of its own namespace calls it;
//! - `/status` shows each client's view and the number of views cached.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use mesh_control::BootstrapSpec;
use mesh_testkit::http::named_backend;
use proxyless::{Bootstrap, Client, XdsClient};
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
const CALLS: usize = 20;
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// catalog in `shop` (port 80) with endpoints `v1` and `v2` (labelled so), a
/// DestinationRule with those subsets, then `rest` (more documents).
fn catalog(v1: SocketAddr, v2: SocketAddr, service_entry_extra: &str, rest: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
{service_entry_extra}  endpoints:
  - {{address: {ip1}, ports: {{http: {port1}}}, labels: {{version: v1}}}}
  - {{address: {ip2}, ports: {{http: {port2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
{rest}",
        ip1 = v1.ip(),
        port1 = v1.port(),
        ip2 = v2.ip(),
        port2 = v2.port(),
    )
}

/// A VirtualService for catalog whose first route (with `source`, a match
/// condition) goes to v2 and whose second goes to v1.
fn split_by(source: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - match: [{source}]
    route: [{{destination: {{host: catalog, subset: v2}}}}]
  - route: [{{destination: {{host: catalog, subset: v1}}}}]
"
    )
}

/// mesh-control on `yaml`, which must load without a problem.
async fn control(yaml: &str) -> (mesh_control::ServerHandle, tempfile::TempDir) {
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
    (server, dir)
}

/// A client of the workload `spec` describes.
fn client(server: &mesh_control::ServerHandle, spec: &BootstrapSpec) -> Client {
    let xds = XdsClient::start(Bootstrap::from_json(&server.bootstrap(spec)).expect("bootstrap"));
    Client::new(xds)
}

/// The body of `GET uri` through `client`.
async fn call(client: &Client, uri: &str) -> String {
    let req = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(DEADLINE, client.clone().oneshot(req))
        .await
        .unwrap_or_else(|_| panic!("GET {uri}: no answer within {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("GET {uri}: {e}"));
    assert!(resp.status().is_success(), "GET {uri}: {}", resp.status());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// Asserts that every one of `CALLS` calls of `client` to `uri` lands on `expected`.
async fn all_land_on(client: &Client, uri: &str, expected: &str, who: &str) {
    let mut landed = Vec::new();
    for _ in 0..CALLS {
        landed.push(call(client, uri).await);
    }
    assert!(
        landed.iter().all(|b| b == expected),
        "{who}: every call must land on {expected}, got {landed:?}"
    );
}

/// `/status`'s view of the client with node id `id`.
fn view_of(status: &serde_json::Value, id: &str) -> String {
    status["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .find(|c| c["node_id"] == id)
        .unwrap_or_else(|| panic!("client {id} in {status:#}"))["view"]
        .as_str()
        .expect("view")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_labels_send_canary_callers_to_v2_and_the_others_to_v1() {
    let (v1, v2) = (named_backend("v1").await, named_backend("v2").await);
    let yaml = catalog(v1, v2, "", &split_by("{sourceLabels: {version: canary}}"));
    let (server, _dir) = control(&yaml).await;
    let canary = client(
        &server,
        &BootstrapSpec::new("web-canary", "shop")
            .label("version", "canary")
            .label("app", "web"),
    );
    let stable = client(
        &server,
        &BootstrapSpec::new("web-stable", "shop")
            .label("version", "stable")
            .label("app", "web"),
    );
    let unlabelled = client(&server, &BootstrapSpec::new("web-plain", "shop"));
    all_land_on(&canary, "http://catalog/items", "v2", "the canary caller").await;
    all_land_on(&stable, "http://catalog/items", "v1", "the stable caller").await;
    all_land_on(
        &unlabelled,
        "http://catalog/items",
        "v1",
        "the unlabelled caller",
    )
    .await;

    let status = server.status();
    assert_eq!(view_of(&status, "web-canary"), "labels={version=canary}");
    // Labels (app) and values (stable) no selector names are not in the key:
    // the stable and the unlabelled caller share one view.
    assert_eq!(view_of(&status, "web-stable"), "labels={}");
    assert_eq!(view_of(&status, "web-plain"), "labels={}");
    assert_eq!(status["views"]["cached"], 2, "{:#}", status["views"]);
    assert_eq!(
        status["views"]["depends_on"],
        serde_json::json!({"namespace": false, "labels": {"version": ["canary"]}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_namespace_sends_callers_of_a_to_v2_and_of_b_to_v1() {
    let (v1, v2) = (named_backend("v1").await, named_backend("v2").await);
    let yaml = catalog(v1, v2, "", &split_by("{sourceNamespace: a}"));
    let (server, _dir) = control(&yaml).await;
    let in_a = client(&server, &BootstrapSpec::new("caller-a", "a"));
    let in_b = client(&server, &BootstrapSpec::new("caller-b", "b"));
    all_land_on(&in_a, "http://catalog.shop/items", "v2", "the caller in a").await;
    all_land_on(&in_b, "http://catalog.shop/items", "v1", "the caller in b").await;
    let status = server.status();
    assert_eq!(view_of(&status, "caller-a"), "namespace=a labels={}");
    assert_eq!(view_of(&status, "caller-b"), "namespace=b labels={}");
    assert_eq!(status["views"]["cached"], 2, "{:#}", status["views"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_without_views_serves_one_shared_translation() {
    let (v1, v2) = (named_backend("v1").await, named_backend("v2").await);
    let yaml = catalog(
        v1,
        v2,
        "  exportTo: ['*']\n",
        &split_by("{uri: {prefix: /v2}}"),
    );
    let (server, _dir) = control(&yaml).await;
    let in_a = client(&server, &BootstrapSpec::new("caller-a", "a"));
    let canary = client(
        &server,
        &BootstrapSpec::new("caller-canary", "shop").label("version", "canary"),
    );
    all_land_on(&in_a, "http://catalog.shop/items", "v1", "the caller in a").await;
    all_land_on(
        &canary,
        "http://catalog/v2/items",
        "v2",
        "the canary caller",
    )
    .await;
    let status = server.status();
    assert_eq!(view_of(&status, "caller-a"), "shared");
    assert_eq!(view_of(&status, "caller-canary"), "shared");
    assert_eq!(status["views"]["cached"], 0, "{:#}", status["views"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_entry_exported_to_its_namespace_is_not_found_from_another() {
    let (v1, v2) = (named_backend("v1").await, named_backend("v2").await);
    let yaml = catalog(v1, v2, "  exportTo: ['.']\n", "");
    let (server, _dir) = control(&yaml).await;

    // Its own namespace calls it.
    let own = client(&server, &BootstrapSpec::new("shop-caller", "shop"));
    let body = call(&own, "http://catalog/items").await;
    assert!(body == "v1" || body == "v2", "{body}");

    // Another namespace's client: NOT_FOUND, at once.
    let other = client(&server, &BootstrapSpec::new("web-caller", "web"));
    let req = Request::get("http://catalog.shop/items")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let err = tokio::time::timeout(DEADLINE, other.clone().oneshot(req))
        .await
        .expect("an answer well before the listener wait times out")
        .expect_err("catalog is not exported to web");
    assert_eq!(err.kind(), proxyless::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("catalog.shop"), "{err}");
    assert!(
        err.to_string()
            .contains("not exported to namespace \"web\" by ServiceEntry shop/catalog"),
        "the caller's error says why: {err}"
    );

    // The server says why, in the response's resource_errors (what gRPC
    // clients with A88 data error handling read).
    let node = mesh_testkit::ads::node("web-raw").namespace("web").build();
    let mut ads = mesh_testkit::ads::AdsClient::connect(server.xds_addr(), node).await;
    ads.subscribe(LDS, &["catalog.shop"]).await;
    let response = ads.recv().await;
    assert!(response.resources.is_empty(), "{response:?}");
    let why = response.resource_errors[0]
        .error_detail
        .as_ref()
        .expect("error detail");
    assert_eq!(why.code, 5, "NOT_FOUND");
    assert!(
        why.message
            .contains("not exported to namespace \"web\" by ServiceEntry shop/catalog at ")
            && why.message.contains("mesh.yaml:3")
            && why.message.contains("namespace shop"),
        "{}",
        why.message
    );

    let status = server.status();
    assert_eq!(view_of(&status, "shop-caller"), "namespace=shop labels={}");
    assert_eq!(view_of(&status, "web-caller"), "namespace=web labels={}");
}
