//! A client-side local rate limit served to a real gRPC proxyless client
//! (Python grpcio, see [`support::python::GRPCIO_VERSION`]): the outbound
//! EnvoyFilter puts the `local_ratelimit` filter (`is_optional: true`) on
//! every client listener and the route's config, wrapped in
//! `FilterConfig { is_optional: true }` (gRFC A39), in its RouteConfiguration.
//! grpcio must ACK both (one NACK would cost it the whole listener or route
//! table) and ignore the limit (it has no such filter: every call reaches
//! the backend); this mesh's own client, on the same config, is limited.
//! (That `/status` and `check --for grpc` say gRPC ignores the limit is
//! checked in mesh-control's compat tests.)

mod support;

use std::time::Duration;

use proxyless::{Bootstrap, Client, XdsClient};
use support::python::{require_grpcio_python, run_grpc_xds_client};
use support::{PaymentServer, shop, spawn_payment_with};

const NODE_ID: &str = "grpc-python-rl";
const NAMESPACE: &str = "shop";
const CALLS: u32 = 40;

/// payment (gRPC) at `addr`, and every caller in the mesh limited to 10
/// calls per minute to it (root namespace, no selector).
fn mesh_yaml(addr: std::net::SocketAddr) -> String {
    let client = include_str!("../examples/istio-docs/local-ratelimit-client.yaml");
    let envoy_filter = client
        .split("\n---\n")
        .find(|d| d.contains("kind: EnvoyFilter"))
        .expect("the EnvoyFilter")
        .replace(
            "  workloadSelector:\n    labels:\n      app: productpage\n",
            "",
        )
        .replace(
            "reviews.default.svc.cluster.local:9080",
            "payment.shop.svc.cluster.local:50051",
        );
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: payment
  namespace: {NAMESPACE}
spec:
  hosts:
  - payment
  ports:
  - number: 50051
    name: grpc
    protocol: GRPC
  resolution: STATIC
  endpoints:
  - address: {ip}
    ports: {{grpc: {port}}}
---
{envoy_filter}
",
        ip = addr.ip(),
        port = addr.port()
    )
}

#[tokio::test]
async fn grpcio_acks_the_client_side_limit_and_ignores_it() {
    let python = require_grpcio_python().await;
    let (addr, backend) =
        spawn_payment_with(|addr| PaymentServer::new(addr.to_string(), "v1")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mesh");
    std::fs::create_dir_all(&config).expect("config dir");
    std::fs::write(config.join("mesh.yaml"), mesh_yaml(addr)).expect("write mesh.yaml");
    let server = mesh_control::Server::builder()
        .config_dir(&config)
        .start()
        .await
        .expect("start mesh-control");
    assert_eq!(
        server.status()["diagnostics"],
        serde_json::json!([]),
        "the mesh config has problems"
    );
    let bootstrap = dir.path().join("bootstrap.json");
    std::fs::write(&bootstrap, server.bootstrap_json(NODE_ID, NAMESPACE)).expect("bootstrap");

    let report = run_grpc_xds_client(
        &python,
        &bootstrap,
        "xds:///payment",
        CALLS,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|message| panic!("{message}"));
    assert!(report.ready, "{report:?}");
    assert_eq!(
        report.ok,
        u64::from(CALLS),
        "grpcio has no local_ratelimit filter: every call passes\n{report:?}"
    );
    assert_eq!(backend.stats.pays(), u64::from(CALLS));

    // grpcio has gone (its entry left /status with it); what it did
    // stays in the counters: nothing it was served was NACKed.
    let status = server.status();
    assert_eq!(
        status["counters"]["nacks"], 0,
        "grpcio NACKed the listener or the route table: {status:#}"
    );

    // This mesh's client on the same config is limited: 10 of them pass.
    let xds = XdsClient::start(
        Bootstrap::from_json(&server.bootstrap_json("rust-1", NAMESPACE)).expect("bootstrap"),
    );
    let channel: Client<tonic::body::Body> = Client::new(xds);
    let mut client = shop::payment_client::PaymentClient::with_origin(
        channel,
        "http://payment".parse().expect("uri"),
    );
    let mut passed = 0u64;
    for _ in 0..20 {
        match client.pay(shop::PayRequest::default()).await {
            Ok(_) => passed += 1,
            Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        }
    }
    // 10 tokens, 10 more per minute: at most one fill within this test.
    assert!(
        (10..=20).contains(&passed) && passed < 20,
        "{passed} passed"
    );
    assert_eq!(backend.stats.pays(), u64::from(CALLS) + passed);
    backend.shutdown().await;
    server.shutdown().await;
}
