//! `localityLbSetting` with a real gRPC proxyless client (Python grpcio, pinned in
//! `support::python`): mesh-control computes the caller's EDS from its bootstrap's
//! `node.locality`, and grpc-core honors it — locality weights through `wrr_locality`
//! (gRFC A52) and priorities through its priority policy.
//!
//! - `distribute` from `r1/z1/*` to `{r1/z1/*: 70, r1/z2/*: 20, r2/*: 10}`: a grpcio
//!   caller in r1/z1 sends those shares (z >= 4.5 each over 2,000 calls);
//! - `failover` from r1 to r2: with r1's endpoints refusing connections, every call of a
//!   grpcio caller in r1/z1 lands in r2 (priority 2) and none in r3 (priority 3).
//!   (grpc-core moves to the next priority when a priority's endpoints are all
//!   unreachable; its outlier detection ignores consecutive 5xx, gRFC A50.)

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use support::python::{require_grpcio_python, run_grpc_xds_client};
use support::{PaymentHandle, PaymentServer, assert_split, spawn_payment_with};

const NODE_ID: &str = "grpc-python-locality";
const NAMESPACE: &str = "shop";
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

/// A payment backend whose replies carry `version` (here: its locality).
async fn payment(version: &str) -> PaymentHandle {
    let version = version.to_owned();
    let (_, handle) =
        spawn_payment_with(move |addr| PaymentServer::new(addr.to_string(), version)).await;
    handle
}

/// An address nothing listens on.
async fn dead() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("addr")
}

/// payment in shop (gRPC, port 50051) with one endpoint per (address, locality), and a
/// DestinationRule whose `trafficPolicy` is `policy`.
fn payment_yaml(endpoints: &[(SocketAddr, &str)], policy: &str) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(a, locality)| {
            format!(
                "  - {{address: {}, ports: {{grpc: {}}}, locality: {locality}}}\n",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment, namespace: {NAMESPACE}}}
spec:
  hosts: [payment]
  ports: [{{number: 50051, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment, namespace: {NAMESPACE}}}
spec:
  host: payment
  trafficPolicy:
{policy}"
    )
}

/// mesh-control on `yaml` and a grpcio bootstrap for a caller in `region`/`zone`.
async fn mesh(
    yaml: &str,
    region: &str,
    zone: &str,
) -> (mesh_control::ServerHandle, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mesh");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::write(config.join("mesh.yaml"), yaml).expect("write mesh.yaml");
    let server = mesh_control::Server::builder()
        .config_dir(&config)
        .start()
        .await
        .expect("start mesh-control");
    let status = server.status();
    assert_eq!(
        status["diagnostics"],
        serde_json::json!([]),
        "mesh-control rejects the test's YAML:\n{yaml}\nstatus: {status:#}"
    );
    let mut bootstrap: serde_json::Value =
        serde_json::from_str(&server.bootstrap_json(NODE_ID, NAMESPACE)).expect("json");
    bootstrap["node"]["locality"] = serde_json::json!({"region": region, "zone": zone});
    let path = dir.path().join("bootstrap.json");
    std::fs::write(&path, bootstrap.to_string()).expect("write bootstrap");
    (server, path, dir)
}

#[tokio::test]
async fn grpcio_sends_the_shares_distribute_gives_its_locality() {
    let python = require_grpcio_python().await;
    let z1 = payment("r1/z1").await;
    let z2 = payment("r1/z2").await;
    let r2 = payment("r2/z3").await;
    let yaml = payment_yaml(
        &[(z1.addr, "r1/z1"), (z2.addr, "r1/z2"), (r2.addr, "r2/z3")],
        "    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        distribute:
        - from: r1/z1/*
          to: {r1/z1/*: 70, r1/z2/*: 20, r2/*: 10}
",
    );
    let (server, bootstrap, _dir) = mesh(&yaml, "r1", "z1").await;
    let calls = 2_000;
    let report = run_grpc_xds_client(
        &python,
        &bootstrap,
        "xds:///payment",
        calls,
        CLIENT_DEADLINE,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "grpcio with distribute: by locality {:?}",
        report.by_version
    );
    assert!(
        report.ready && report.error_count() == 0,
        "{:?}\n{}",
        report.first_error,
        report.stderr
    );
    assert_eq!(report.ok, u64::from(calls), "{report:?}");
    for (locality, p) in [("r1/z1", 0.7), ("r1/z2", 0.2), ("r2/z3", 0.1)] {
        assert_split(report.version_count(locality), report.ok, p);
    }
    for backend in [z1, z2, r2] {
        backend.shutdown().await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn grpcio_fails_over_to_the_named_region() {
    let python = require_grpcio_python().await;
    let (z1, z2) = (dead().await, dead().await);
    let r2 = payment("r2").await;
    let r3 = payment("r3").await;
    let yaml = payment_yaml(
        &[
            (z1, "r1/z1"),
            (z2, "r1/z2"),
            (r2.addr, "r2/z3"),
            (r3.addr, "r3/z4"),
        ],
        "    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        failover: [{from: r1, to: r2}]
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 60s
      maxEjectionPercent: 100
",
    );
    let (server, bootstrap, _dir) = mesh(&yaml, "r1", "z1").await;
    let calls = 200;
    let report = run_grpc_xds_client(
        &python,
        &bootstrap,
        "xds:///payment",
        calls,
        CLIENT_DEADLINE,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "grpcio with failover: by locality {:?}, errors {:?}",
        report.by_version, report.errors
    );
    assert!(report.ready, "{:?}\n{}", report.first_error, report.stderr);
    assert_eq!(report.error_count(), 0, "{report:?}");
    assert_eq!(report.version_count("r2"), u64::from(calls), "{report:?}");
    assert_eq!(r3.stats.pays(), 0);
    r2.shutdown().await;
    r3.shutdown().await;
    server.shutdown().await;
}
