//! What an operator sees of the clients: CSDS, stale clients, NACK reasons,
//! what a gRPC client ignores, and the control server's own /metrics.

use std::time::Duration;

use envoy_types::pb::envoy::admin::v3::ClientResourceStatus;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use mesh_core::xds;
use mesh_testkit::ads::{AdsClient, node};
use mesh_testkit::http::get_text;
use mesh_testkit::wait::until;

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
"#;
const CLUSTER: &str = "outbound|80||catalog.shop.svc.cluster.local";

/// A raw ADS stream of the node `id` with `user_agent`.
async fn connect(addr: std::net::SocketAddr, id: &str, user_agent: &str) -> AdsClient {
    AdsClient::connect(addr, node(id).user_agent(user_agent).build()).await
}

/// Sends a CDS request for [`CLUSTER`] with `version`, `nonce` and, for a NACK, its
/// reason; a first request (no nonce) gets its response back.
async fn cds(
    ads: &mut AdsClient,
    version: &str,
    nonce: &str,
    nack: Option<&str>,
) -> Option<DiscoveryResponse> {
    ads.send(xds::CLUSTER_TYPE, &[CLUSTER], version, nonce, nack)
        .await;
    if nonce.is_empty() {
        Some(ads.recv().await)
    } else {
        None
    }
}

#[tokio::test]
async fn status_and_csds_show_acked_nacked_stale_and_ignored_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), CONFIG).unwrap();
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .stale_after(Duration::from_millis(200))
        .start()
        .await
        .unwrap();

    // A grpc-go client that ACKs, one that NACKs, one that never answers.
    let mut good = connect(server.xds_addr(), "good", "gRPC Go").await;
    let r = cds(&mut good, "", "", None).await.unwrap();
    cds(&mut good, &r.version_info, &r.nonce, None).await;
    let mut nacker = connect(server.xds_addr(), "nacker", "proxyless-rust").await;
    let r = cds(&mut nacker, "", "", None).await.unwrap();
    cds(
        &mut nacker,
        "",
        &r.nonce,
        Some("cluster: lb policy not supported"),
    )
    .await;
    let mut silent = connect(server.xds_addr(), "silent", "proxyless-rust").await;
    cds(&mut silent, "", "", None).await.unwrap();

    let client = |id: &str| {
        let status = server.status();
        status["clients"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["node_id"] == id).cloned())
            .unwrap_or_default()
    };
    until("three clients with their states", || {
        client("good")["types"]["CDS"]["acked"] == true
            && client("nacker")["types"]["CDS"]["last_nack"]["message"]
                == "cluster: lb policy not supported"
            && client("silent")["stale"] == true
    })
    .await;
    assert_eq!(client("good")["stale"], false);
    assert_eq!(client("nacker")["stale"], false, "a NACK is not staleness");
    assert_eq!(client("good")["kind"], "grpc");
    let ignored = client("good")["ignored"].to_string();
    assert!(ignored.contains("LEAST_REQUEST"), "{ignored}");
    assert_eq!(
        client("nacker")["ignored"].as_array().map(Vec::len),
        Some(0)
    );

    // CSDS returns each client's config and state.
    let mut csds =
        ClientStatusDiscoveryServiceClient::connect(format!("http://{}", server.xds_addr()))
            .await
            .unwrap();
    let resp = csds
        .fetch_client_status(ClientStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.config.len(), 3);
    let of = |id: &str| {
        resp.config
            .iter()
            .find(|c| c.node.as_ref().is_some_and(|n| n.id == id))
            .unwrap_or_else(|| panic!("{id} missing from CSDS"))
    };
    let good_cfg = &of("good").generic_xds_configs[0];
    assert_eq!(good_cfg.name, CLUSTER);
    assert_eq!(good_cfg.client_status, ClientResourceStatus::Acked as i32);
    assert!(good_cfg.xds_config.is_some(), "resource contents included");
    let nack_cfg = &of("nacker").generic_xds_configs[0];
    assert_eq!(nack_cfg.client_status, ClientResourceStatus::Nacked as i32);
    assert_eq!(
        nack_cfg.error_state.as_ref().map(|e| e.details.as_str()),
        Some("cluster: lb policy not supported")
    );
    assert_eq!(
        of("silent").generic_xds_configs[0].client_status,
        ClientResourceStatus::Requested as i32
    );

    // The control server's own metrics.
    let (_, metrics) = get_text(server.admin_addr(), "/metrics").await;
    for name in [
        "mesh_control_xds_clients 3",
        "mesh_control_xds_nacks_total 1",
        "mesh_control_xds_pushes_total",
        "mesh_control_xds_push_latency_seconds_bucket",
        "mesh_control_config_version",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
}
