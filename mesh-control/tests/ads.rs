//! The ADS server as a raw xDS client sees it: SotW answers for every
//! subscription, short-name resolution by namespace, ACK/NACK bookkeeping in
//! `/status`, and EDS pushes driven by registrations and lease expiry.

use std::time::Duration;

use mesh_core::xds;
use mesh_testkit::ads::{AdsClient, node};
use mesh_testkit::http::json_request as admin;
use mesh_testkit::wait::{DEADLINE, eventually_ok, eventually_ok_async};

const CONFIG: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  endpoints:
  - address: 127.0.0.1
    ports: {http: 9001}
    labels: {version: v1}
"#;

/// A raw ADS stream of the node `id` in `namespace`.
async fn connect(server: &mesh_control::ServerHandle, id: &str, namespace: &str) -> AdsClient {
    AdsClient::connect(server.xds_addr(), node(id).namespace(namespace).build()).await
}

async fn start(config: &str) -> (tempfile::TempDir, mesh_control::ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), config).unwrap();
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .lease_check_interval(Duration::from_millis(20))
        .start()
        .await
        .expect("start control server");
    (dir, server)
}

#[tokio::test]
async fn every_subscription_is_answered_and_short_names_follow_the_namespace() {
    let (_dir, server) = start(CONFIG).await;
    let mut ads = connect(&server, "t-1", "shop").await;
    ads.send(
        xds::LISTENER_TYPE,
        &["catalog", "nope", "catalog.shop.svc.cluster.local:80"],
        "",
        "",
        None,
    )
    .await;
    let lds = ads.recv().await;
    let names: Vec<String> = lds
        .resources
        .iter()
        .filter_map(xds::resource_name)
        .collect();
    assert_eq!(
        names.len(),
        2,
        "the missing name is absent, so it does not exist: {names:?}"
    );
    assert!(names.contains(&"catalog".to_string()));
    let short = lds
        .resources
        .iter()
        .map(|a| xds::decode_listener(a).unwrap())
        .find(|l| &*l.name == "catalog")
        .unwrap();
    assert_eq!(
        &*short.route_config_name,
        "catalog.shop.svc.cluster.local:80"
    );

    // A client in another namespace does not see `catalog` by its short name.
    let mut other = connect(&server, "t-2", "default").await;
    other
        .send(xds::LISTENER_TYPE, &["catalog"], "", "", None)
        .await;
    assert!(other.recv().await.resources.is_empty());

    // ACK, then the status shows it.
    ads.send(
        xds::LISTENER_TYPE,
        &["catalog", "nope", "catalog.shop.svc.cluster.local:80"],
        &lds.version_info,
        &lds.nonce,
        None,
    )
    .await;
    let client = eventually_ok("the ACK of t-1 in /status", DEADLINE, || {
        let status = server.status();
        status["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["node_id"] == "t-1" && c["types"]["LDS"]["acked"] == true)
            .cloned()
            .ok_or(status)
    })
    .await;
    assert_eq!(client["namespace"], "shop");
}

#[tokio::test]
async fn a_nack_is_recorded_with_its_reason() {
    let (_dir, server) = start(CONFIG).await;
    let mut ads = connect(&server, "nacker", "shop").await;
    ads.send(
        xds::CLUSTER_TYPE,
        &["outbound|80||catalog.shop.svc.cluster.local"],
        "",
        "",
        None,
    )
    .await;
    let cds = ads.recv().await;
    assert_eq!(cds.resources.len(), 1);
    ads.send(
        xds::CLUSTER_TYPE,
        &["outbound|80||catalog.shop.svc.cluster.local"],
        "",
        &cds.nonce,
        Some("cluster x: lb policy not supported"),
    )
    .await;
    let status = eventually_ok_async("the NACK in /status", DEADLINE, || async {
        let (code, status) = admin(server.admin_addr(), "GET", "/status", "").await;
        assert_eq!(code, 200);
        let nack = &status["clients"][0]["types"]["CDS"]["last_nack"]["message"];
        if nack == "cluster x: lb policy not supported" {
            Ok(status)
        } else {
            Err(status)
        }
    })
    .await;
    assert_eq!(status["clients"][0]["types"]["CDS"]["acked"], false);
}

#[tokio::test]
async fn registrations_and_expired_leases_drive_eds() {
    let (_dir, server) = start(CONFIG).await;
    let cluster = "outbound|80||catalog.shop.svc.cluster.local";
    let mut ads = connect(&server, "eds", "shop").await;
    ads.send(xds::ENDPOINT_TYPE, &[cluster], "", "", None).await;
    let first = ads.recv().await;
    let cla = xds::decode_endpoints(&first.resources[0]).unwrap();
    assert_eq!(
        cla.endpoint_count(),
        1,
        "the ServiceEntry's static endpoint"
    );
    ads.send(
        xds::ENDPOINT_TYPE,
        &[cluster],
        &first.version_info,
        &first.nonce,
        None,
    )
    .await;

    let (code, lease) = admin(
        server.admin_addr(),
        "POST",
        "/v1/endpoints",
        r#"{"service":"catalog","namespace":"shop","address":"127.0.0.2","port":9002,"labels":{"version":"v2"},"ttl_seconds":1}"#,
    )
    .await;
    assert_eq!(code, 201, "{lease}");
    let pushed = ads.recv().await;
    assert_eq!(
        xds::decode_endpoints(&pushed.resources[0])
            .unwrap()
            .endpoint_count(),
        2
    );
    ads.send(
        xds::ENDPOINT_TYPE,
        &[cluster],
        &pushed.version_info,
        &pushed.nonce,
        None,
    )
    .await;

    // Not renewed: the lease expires after 1 s and EDS drops the endpoint.
    let expired = ads.recv().await;
    assert_eq!(
        xds::decode_endpoints(&expired.resources[0])
            .unwrap()
            .endpoint_count(),
        1
    );
    let id = lease["lease_id"].as_str().unwrap();
    let (code, body) = admin(
        server.admin_addr(),
        "PUT",
        &format!("/v1/endpoints/{id}"),
        "",
    )
    .await;
    assert_eq!(code, 404, "an expired lease cannot be renewed: {body}");

    // Malformed registrations get a 4xx with the reason.
    let (code, body) = admin(
        server.admin_addr(),
        "POST",
        "/v1/endpoints",
        r#"{"service":"catalog"}"#,
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        body["error"].as_str().unwrap().contains("address"),
        "{body}"
    );
    let (code, body) = admin(
        server.admin_addr(),
        "POST",
        "/v1/endpoints",
        r#"{"service":"catalog","address":"not-an-ip","port":1,"ttl_seconds":5}"#,
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        body["error"].as_str().unwrap().contains("not an IP"),
        "{body}"
    );

    // /v1/services lists the service and its dial names.
    let (code, services) = admin(server.admin_addr(), "GET", "/v1/services", "").await;
    assert_eq!(code, 200);
    let catalog = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == "catalog.shop.svc.cluster.local")
        .cloned()
        .unwrap_or_else(|| panic!("catalog not listed: {services}"));
    let names: Vec<&str> = catalog["dial_names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(names.contains(&"catalog.shop"), "{names:?}");
}

#[tokio::test]
async fn an_invalid_file_change_keeps_the_last_good_config() {
    let (dir, server) = start(CONFIG).await;
    let good = server.version();
    let mut ads = connect(&server, "w", "shop").await;
    ads.send(xds::LISTENER_TYPE, &["catalog.shop"], "", "", None)
        .await;
    let lds = ads.recv().await;
    assert_eq!(lds.resources.len(), 1);
    std::fs::write(
        dir.path().join("mesh.yaml"),
        CONFIG.replace("hosts: [catalog]", "hosts: [catalog]\n  bogus: 1"),
    )
    .unwrap();
    let diags = eventually_ok("the invalid change in /status", DEADLINE, || {
        let status = server.status();
        let diags = status["diagnostics"].as_array().unwrap().clone();
        if diags
            .iter()
            .any(|d| d.as_str().unwrap_or("").contains("bogus"))
        {
            Ok(diags)
        } else {
            Err(status)
        }
    })
    .await;
    assert!(
        diags[0].as_str().unwrap().contains("mesh.yaml:"),
        "{diags:?}"
    );
    assert_eq!(server.version(), good, "nothing a client sees changed");
}

/// catalog over plaintext HTTP, and `api.example.com` reached with TLS
/// from certificate files (DestinationRule SIMPLE).
const FILE_TLS_CONFIG: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  resolution: STATIC
  ports:
  - {number: 443, name: http, protocol: HTTP}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: shop}
spec:
  host: api.example.com
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: /etc/certs/api-ca.pem
"#;

#[tokio::test]
async fn grpc_clients_are_not_sent_clusters_with_file_tls_but_others_are() {
    const CATALOG: &str = "outbound|80||catalog.shop.svc.cluster.local";
    const API: &str = "outbound|443||api.example.com";
    let (_dir, server) = start(FILE_TLS_CONFIG).await;
    // A gRPC client would NACK the whole response for the one file-TLS
    // cluster (gRFC A29), so it gets the other cluster and a NOT_FOUND naming
    // why for that one.
    let grpc_node = node("grpc-1")
        .namespace("shop")
        .user_agent("gRPC C-core linux Python");
    let mut grpc = AdsClient::connect(server.xds_addr(), grpc_node.build()).await;
    grpc.send(xds::CLUSTER_TYPE, &[CATALOG, API], "", "", None)
        .await;
    let cds = grpc.recv().await;
    let names: Vec<String> = cds
        .resources
        .iter()
        .filter_map(xds::resource_name)
        .collect();
    assert_eq!(names, vec![CATALOG.to_string()]);
    let error = cds
        .resource_errors
        .iter()
        .find(|e| e.resource_name.as_ref().is_some_and(|n| n.name == API))
        .expect("a resource error for the file-TLS cluster");
    let message = &error.error_detail.as_ref().expect("detail").message;
    assert!(message.contains("certificate files"), "{message}");
    // This mesh's own client gets both.
    let rust_node = node("rust-1").namespace("shop").user_agent("proxyless");
    let mut rust = AdsClient::connect(server.xds_addr(), rust_node.build()).await;
    rust.send(xds::CLUSTER_TYPE, &[CATALOG, API], "", "", None)
        .await;
    let cds = rust.recv().await;
    let mut names: Vec<String> = cds
        .resources
        .iter()
        .filter_map(xds::resource_name)
        .collect();
    names.sort();
    assert_eq!(names, vec![API.to_string(), CATALOG.to_string()]);
}
