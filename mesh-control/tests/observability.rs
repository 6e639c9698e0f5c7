//! What an operator sees of the clients: CSDS, stale clients, NACK reasons,
//! what a gRPC client ignores, and the control server's own /metrics.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::admin::v3::ClientResourceStatus;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use mesh_core::xds;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

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

struct Raw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
    node: Node,
}

impl Raw {
    async fn connect(addr: SocketAddr, id: &str, user_agent: &str) -> Raw {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(8);
        let stream = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        Raw {
            tx,
            rx: stream,
            node: Node {
                id: id.into(),
                user_agent_name: user_agent.into(),
                ..Node::default()
            },
        }
    }

    async fn cds(
        &mut self,
        version: &str,
        nonce: &str,
        nack: Option<&str>,
    ) -> Option<DiscoveryResponse> {
        self.tx
            .send(DiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: xds::CLUSTER_TYPE.into(),
                resource_names: vec![CLUSTER.into()],
                version_info: version.into(),
                response_nonce: nonce.into(),
                error_detail: nack.map(|m| RpcStatus {
                    code: 3,
                    message: m.into(),
                    details: vec![],
                }),
                ..DiscoveryRequest::default()
            })
            .await
            .expect("send");
        if !nonce.is_empty() {
            return None;
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), self.rx.next())
            .await
            .expect("response within 10 s")
            .expect("open")
            .expect("ok");
        Some(resp)
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
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
    let mut good = Raw::connect(server.xds_addr(), "good", "gRPC Go").await;
    let r = good.cds("", "", None).await.unwrap();
    good.cds(&r.version_info, &r.nonce, None).await;
    let mut nacker = Raw::connect(server.xds_addr(), "nacker", "proxyless-rust").await;
    let r = nacker.cds("", "", None).await.unwrap();
    nacker
        .cds("", &r.nonce, Some("cluster: lb policy not supported"))
        .await;
    let mut silent = Raw::connect(server.xds_addr(), "silent", "proxyless-rust").await;
    silent.cds("", "", None).await.unwrap();

    let client = |id: &str| {
        let status = server.status();
        status["clients"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["node_id"] == id).cloned())
            .unwrap_or_default()
    };
    eventually("three clients with their states", || {
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
    let metrics = admin_get(server.admin_addr(), "/metrics").await;
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

async fn admin_get(addr: SocketAddr, path: &str) -> String {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "admin")
        .body(Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}
