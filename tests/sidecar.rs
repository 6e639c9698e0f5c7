//! Istio `Sidecar` end to end over real sockets (issue 16, acceptance 4):
//! Istio YAML → embedded mesh-control → ADS → `XdsClient` →
//! `proxyless::Client` → backends on 127.0.0.1 that answer with their name.
//!
//! - a workload its Sidecar scopes to two hosts is sent only those in CDS
//!   (read off the wire with a raw ADS client subscribing to every cluster);
//! - its call to a hidden host fails at once with NOT_FOUND naming the
//!   Sidecar (namespace/name and file:line);
//! - a workload without the selector's labels still sees everything;
//! - a live edit widening the Sidecar makes the host reachable;
//! - a gRPC client that held a cluster the Sidecar now hides is flagged in
//!   `/status` (`deleted_but_kept`, with the Sidecar that hides it).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use mesh_control::BootstrapSpec;
use mesh_core::xds;
use mesh_testkit::ads::{AdsClient, node};
use mesh_testkit::http::named_backend;
use mesh_testkit::wait::{DEADLINE, eventually_ok, eventually_ok_async};
use proxyless::{Bootstrap, Client, XdsClient};
use serde_json::Value;
use tower::ServiceExt;

/// A ServiceEntry `name` in `namespace` for `host` on port 80, served by `at`.
fn service(namespace: &str, name: &str, host: &str, at: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [{host}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {ip}, ports: {{http: {port}}}}}]
---
",
        ip = at.ip(),
        port = at.port()
    )
}

/// The Sidecar of the workloads labelled `app: web` in `shop`.
fn web_sidecar(hosts: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: web, namespace: shop}}
spec:
  workloadSelector:
    labels: {{app: web}}
  egress:
  - hosts: [{hosts}]
"
    )
}

const SCOPED: &str = "'./catalog.shop.svc.cluster.local', 'billing/*'";
const WIDENED: &str =
    "'./catalog.shop.svc.cluster.local', 'billing/*', './ledger.shop.svc.cluster.local'";

const CATALOG: &str = "outbound|80||catalog.shop.svc.cluster.local";
const PAYMENTS: &str = "outbound|80||payments.billing.svc.cluster.local";
const LEDGER: &str = "outbound|80||ledger.shop.svc.cluster.local";
const API: &str = "outbound|80||api.example.com";

/// Four services (catalog and ledger in shop, payments in billing,
/// api.example.com in ext) and the `web` Sidecar admitting `hosts`.
struct Mesh {
    server: mesh_control::ServerHandle,
    file: std::path::PathBuf,
    services: String,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start(hosts: &str) -> Mesh {
        let services = [
            service("shop", "catalog", "catalog", named_backend("catalog").await),
            service("shop", "ledger", "ledger", named_backend("ledger").await),
            service(
                "billing",
                "payments",
                "payments",
                named_backend("payments").await,
            ),
            service("ext", "api", "api.example.com", named_backend("api").await),
        ]
        .concat();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("mesh.yaml");
        std::fs::write(&file, format!("{services}{}", web_sidecar(hosts))).expect("write");
        let server = mesh_control::Server::builder()
            .config_dir(dir.path())
            .debounce(Duration::from_secs(3600))
            .start()
            .await
            .expect("start mesh-control");
        let status = server.status();
        assert_eq!(
            status["diagnostics"],
            serde_json::json!([]),
            "mesh-control rejects the test's YAML: {status:#}"
        );
        Mesh {
            server,
            file,
            services,
            _dir: dir,
        }
    }

    /// The line of the Sidecar's `metadata` in mesh.yaml.
    fn sidecar_line(&self) -> usize {
        self.services.lines().count() + 3
    }

    fn edit(&self, hosts: &str) {
        std::fs::write(
            &self.file,
            format!("{}{}", self.services, web_sidecar(hosts)),
        )
        .expect("write");
        self.server.reload();
    }

    fn client(&self, id: &str, labels: &[(&str, &str)]) -> Client {
        let mut spec = BootstrapSpec::new(id, "shop");
        for (k, v) in labels {
            spec = spec.label(*k, *v);
        }
        let xds = XdsClient::start(
            Bootstrap::from_json(&self.server.bootstrap(&spec)).expect("bootstrap"),
        );
        Client::new(xds)
    }

    /// Every cluster a raw ADS client of `shop` with `labels` is sent when
    /// it subscribes to all (wildcard CDS).
    async fn clusters_sent(&self, id: &str, labels: &[(&str, &str)]) -> Vec<String> {
        let node = node(id).namespace("shop").labels(labels).build();
        let mut ads = AdsClient::connect(self.server.xds_addr(), node).await;
        ads.subscribe(xds::CLUSTER_TYPE, &[]).await;
        let cds = ads.recv().await;
        assert_eq!(cds.type_url, xds::CLUSTER_TYPE);
        let mut names: Vec<String> = cds
            .resources
            .iter()
            .filter_map(xds::resource_name)
            .collect();
        names.sort();
        names
    }
}

/// `GET uri` through `client`: the body, or the error.
async fn call(client: &Client, uri: &str) -> Result<String, proxyless::Error> {
    let req = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(DEADLINE, client.clone().oneshot(req))
        .await
        .unwrap_or_else(|_| panic!("GET {uri}: no answer within {DEADLINE:?}"))?;
    assert!(resp.status().is_success(), "GET {uri}: {}", resp.status());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_workload_is_sent_only_its_hosts() {
    let mesh = Mesh::start(SCOPED).await;
    assert_eq!(
        mesh.clusters_sent("web-raw", &[("app", "web")]).await,
        [CATALOG, PAYMENTS],
        "the Sidecar admits catalog (./) and billing/*"
    );
    // Without the selector's labels: everything.
    assert_eq!(
        mesh.clusters_sent("db-raw", &[("app", "db")]).await,
        [API, CATALOG, LEDGER, PAYMENTS]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_hidden_host_fails_naming_the_sidecar_and_others_still_call_it() {
    let mesh = Mesh::start(SCOPED).await;
    let web = mesh.client("web-1", &[("app", "web")]);
    assert_eq!(call(&web, "http://catalog/items").await.unwrap(), "catalog");
    assert_eq!(
        call(&web, "http://payments.billing/pay").await.unwrap(),
        "payments"
    );

    let err = call(&web, "http://ledger/entries")
        .await
        .expect_err("ledger is hidden from app=web");
    assert_eq!(err.kind(), proxyless::ErrorKind::NotFound, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("hidden by Sidecar shop/web at ")
            && text.contains(&format!("mesh.yaml:{}", mesh.sidecar_line()))
            && text.contains("shop/ledger.shop.svc.cluster.local"),
        "the caller's error names the Sidecar and its line: {text}"
    );

    // A workload the selector does not select calls it.
    let db = mesh.client("db-1", &[("app", "db")]);
    assert_eq!(call(&db, "http://ledger/entries").await.unwrap(), "ledger");
    assert_eq!(call(&db, "http://api.example.com/").await.unwrap(), "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_edit_widening_the_sidecar_makes_the_host_reachable() {
    let mesh = Mesh::start(SCOPED).await;
    let web = mesh.client("web-1", &[("app", "web")]);
    let err = call(&web, "http://ledger/entries")
        .await
        .expect_err("ledger is hidden");
    assert_eq!(err.kind(), proxyless::ErrorKind::NotFound, "{err}");

    mesh.edit(WIDENED);
    let body = eventually_ok_async("ledger reachable after the edit", DEADLINE, || async {
        call(&web, "http://ledger/entries").await
    })
    .await;
    assert_eq!(body, "ledger");
    assert_eq!(
        mesh.clusters_sent("web-raw", &[("app", "web")]).await,
        [CATALOG, LEDGER, PAYMENTS]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_keeping_what_a_sidecar_narrowed_is_flagged() {
    let mesh = Mesh::start(WIDENED).await;
    let node = node("grpc-web")
        .namespace("shop")
        .labels(&[("app", "web")])
        .user_agent("gRPC Go")
        .build();
    let mut grpc = AdsClient::connect(mesh.server.xds_addr(), node).await;
    grpc.subscribe(xds::CLUSTER_TYPE, &[LEDGER]).await;
    let cds = grpc.recv().await;
    assert_eq!(cds.resources.len(), 1, "{cds:?}");
    grpc.send(
        xds::CLUSTER_TYPE,
        &[LEDGER],
        &cds.version_info,
        &cds.nonce,
        None,
    )
    .await;

    // The Sidecar narrows: ledger is no longer sent to app=web.
    mesh.edit(SCOPED);
    let cds = grpc.recv().await;
    assert!(cds.resources.is_empty(), "{cds:?}");
    grpc.send(
        xds::CLUSTER_TYPE,
        &[LEDGER],
        &cds.version_info,
        &cds.nonce,
        None,
    )
    .await;
    let entry = eventually_ok("the narrowed cluster flagged", DEADLINE, || {
        let status = mesh.server.status();
        status["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .find(|c| {
                c["node_id"] == "grpc-web"
                    && c["deleted_but_kept"]
                        .as_array()
                        .is_some_and(|d| !d.is_empty())
            })
            .cloned()
            .ok_or(status)
    })
    .await;
    let kept: &Value = &entry["deleted_but_kept"][0];
    assert_eq!(kept["name"], LEDGER, "{entry:#}");
    let why = kept["hidden_by"].as_str().unwrap_or_default();
    assert!(why.contains("hidden by Sidecar shop/web at "), "{entry:#}");
    let note = entry["deleted_but_kept_note"].as_str().unwrap_or_default();
    assert!(note.contains("ignore_resource_deletion"), "{note}");
}
