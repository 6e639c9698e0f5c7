//! Istio ServiceEntry `resolution: DNS` with a real gRPC proxyless client
//! (Python grpcio, pinned in `support::python`). gRPC accepts no STRICT_DNS
//! cluster (gRFC A37: the whole CDS response would be NACKed), so
//! mesh-control resolves the name itself, through a local DNS server
//! (`mesh_testkit::dns`, TTL 1 s), and serves grpcio an EDS cluster with the
//! answer as its endpoints, re-resolved on the TTL and pushed when it
//! changes (`mesh-control/src/dns.rs`, `dialect/grpc.rs`).
//!
//! One grpcio client calls `xds:///payment.example.com` for a while:
//! - while the name resolves to 127.0.0.1 and 127.0.0.2 (a Payment server
//!   on each, same port), its calls land >= 30% on each;
//! - the record changes to 127.0.0.2 only: within a few seconds no call
//!   lands on 127.0.0.1 any more, the calls go on, and none fails.

mod support;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_testkit::dns::DnsServer;
use support::python::{require_grpcio_python, run_grpc_xds_client};
use support::{PaymentServer, PaymentStats, shop};
use tokio_stream::wrappers::TcpListenerStream;

const HOST: &str = "payment.example.com";
const NODE_ID: &str = "grpc-python-egress-dns";
const NAMESPACE: &str = "shop";
/// How long the grpcio client calls (it stops at this deadline).
const CLIENT_DEADLINE: Duration = Duration::from_secs(15);
const WAIT: Duration = Duration::from_secs(10);

/// A Payment server on `listener` whose replies carry its IP as `version`.
fn payment(listener: tokio::net::TcpListener) -> (IpAddr, Arc<PaymentStats>) {
    let addr = listener.local_addr().expect("addr");
    let server = PaymentServer::new(addr.to_string(), addr.ip().to_string());
    let stats = server.stats.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(shop::payment_server::PaymentServer::new(server))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr.ip(), stats)
}

/// Payment servers on 127.0.0.1:P and 127.0.0.2:P.
async fn payment_pair() -> (
    (IpAddr, Arc<PaymentStats>),
    (IpAddr, Arc<PaymentStats>),
    u16,
) {
    for _ in 0..50 {
        let first = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let port = first.local_addr().expect("addr").port();
        if let Ok(second) = tokio::net::TcpListener::bind(("127.0.0.2", port)).await {
            return (payment(first), payment(second), port);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2 after 50 tries");
}

/// mesh-control resolving through `dns` on the ServiceEntry for HOST, and a
/// grpcio bootstrap.
async fn mesh(
    port: u16,
    dns: std::net::SocketAddr,
) -> (mesh_control::ServerHandle, PathBuf, tempfile::TempDir) {
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment-external, namespace: {NAMESPACE}}}
spec:
  hosts: [{HOST}]
  location: MESH_EXTERNAL
  ports: [{{number: 50051, name: grpc, protocol: GRPC, targetPort: {port}}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment-external, namespace: {NAMESPACE}}}
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mesh");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::write(config.join("mesh.yaml"), &yaml).expect("write mesh.yaml");
    let server = mesh_control::Server::builder()
        .config_dir(&config)
        .dns_server(dns)
        .start()
        .await
        .expect("start mesh-control");
    let status = server.status();
    assert_eq!(
        status["diagnostics"],
        serde_json::json!([]),
        "mesh-control rejects the test's YAML:\n{yaml}\nstatus: {status:#}"
    );
    let path = dir.path().join("bootstrap.json");
    std::fs::write(&path, server.bootstrap_json(NODE_ID, NAMESPACE)).expect("write bootstrap");
    (server, path, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_gets_the_resolved_addresses_as_eds_and_follows_the_record() {
    let python = require_grpcio_python().await;
    let ((ip1, one), (ip2, two), port) = payment_pair().await;
    let dns = DnsServer::start(1).await;
    dns.set(HOST, &[ip1, ip2]);
    let (server, bootstrap, _dir) = mesh(port, dns.addr()).await;

    let client = tokio::spawn(async move {
        run_grpc_xds_client(
            &python,
            &bootstrap,
            &format!("xds:///{HOST}"),
            1_000_000,
            CLIENT_DEADLINE,
        )
        .await
    });

    // Both addresses are endpoints: the first 400 calls share them.
    let start = Instant::now();
    while one.pays() + two.pays() < 400 {
        assert!(
            start.elapsed() < CLIENT_DEADLINE,
            "grpcio made {} calls in {CLIENT_DEADLINE:?}",
            one.pays() + two.pays()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a, b) = (one.pays(), two.pays());
    eprintln!("grpcio calls while {HOST} is 127.0.0.1 and 127.0.0.2: {a} and {b}");
    for (ip, got) in [("127.0.0.1", a), ("127.0.0.2", b)] {
        assert!(
            got * 100 >= (a + b) * 30,
            "{ip} got {got} of {} calls, expected >= 30%",
            a + b
        );
    }

    // 127.0.0.2 only: mesh-control re-resolves on the TTL and pushes.
    dns.set(HOST, &[ip2]);
    let changed = Instant::now();
    let mut last = (one.pays(), Instant::now());
    let followed = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = one.pays();
        if now != last.0 {
            last = (now, Instant::now());
        }
        let calls_go_on = two.pays();
        if last.1.elapsed() > Duration::from_millis(500) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(two.pays() > calls_go_on, "grpcio stopped calling");
            break last.1.duration_since(changed);
        }
        assert!(
            changed.elapsed() < WAIT,
            "127.0.0.1 still gets grpcio's calls {WAIT:?} after the record dropped it"
        );
    };
    eprintln!("grpcio stopped calling 127.0.0.1 {followed:?} after the record changed");
    assert!(
        followed < Duration::from_secs(5),
        "took {followed:?} to follow a record whose TTL is 1 s"
    );
    let after = one.pays();

    let report = client
        .await
        .expect("client task")
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "grpcio: {} calls, by version {:?}",
        report.ok, report.by_version
    );
    // The client calls until its own deadline: the call under way then is
    // cut short (DEADLINE_EXCEEDED); every other call succeeded.
    let cut_short = report.errors.get("DEADLINE_EXCEEDED").copied().unwrap_or(0);
    assert!(
        report.ready && cut_short <= 1 && report.error_count() == cut_short,
        "{:?} {:?}\n{}",
        report.errors,
        report.first_error,
        report.stderr
    );
    assert_eq!(
        one.pays(),
        after,
        "127.0.0.1 got calls after it left the record"
    );
    assert!(two.pays() > after, "{report:?}");
    server.shutdown().await;
}
