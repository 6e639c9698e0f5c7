//! DestinationRule connection settings served to a real gRPC proxyless
//! client (Python grpcio, see [`support::python::GRPCIO_VERSION`]): a
//! cluster carrying TCP keepalive (`upstream_connection_options`), a
//! maximum connection duration and an idle timeout (the upstream
//! `HttpProtocolOptions`' common options) and `max_concurrent_streams`
//! (its HTTP/2 options), set at port level, must be ACKed (one NACK would
//! cost grpcio the whole CDS update) and every call must succeed; grpcio
//! ignores the settings, which `/status` says for the cluster.

mod support;

use std::time::Duration;

use support::python::{require_grpcio_python, run_grpc_xds_client};
use support::{PaymentServer, spawn_payment_with};

const NODE_ID: &str = "grpc-python-conn";
const NAMESPACE: &str = "shop";
const CALLS: u32 = 20;

/// payment (gRPC) at `addr`, with every connection setting of issue 15 on
/// its port.
fn mesh_yaml(addr: std::net::SocketAddr) -> String {
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
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: payment
  namespace: {NAMESPACE}
spec:
  host: payment
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 50051}}
      connectionPool:
        tcp:
          tcpKeepalive: {{probes: 3, time: 60s, interval: 10s}}
          maxConnectionDuration: 10m
          idleTimeout: 5m
        http:
          maxConcurrentStreams: 100
          h2UpgradePolicy: UPGRADE
",
        ip = addr.ip(),
        port = addr.port()
    )
}

#[tokio::test]
async fn grpcio_acks_clusters_with_connection_settings() {
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
    assert_eq!(report.ok, u64::from(CALLS), "{report:?}");
    assert_eq!(backend.stats.pays(), u64::from(CALLS));

    // grpcio has gone; what it did stays in the counters: nothing it was
    // served was NACKed.
    let status = server.status();
    assert_eq!(
        status["counters"]["nacks"], 0,
        "grpcio NACKed the cluster: {status:#}"
    );
    backend.shutdown().await;
    server.shutdown().await;
}
