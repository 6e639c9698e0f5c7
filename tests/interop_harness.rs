//! The interop harness itself, before any control server is involved: the grpcio venv
//! installs, the Python client reports failures as JSON instead of hanging, its
//! hand-encoded `shop` messages agree with the tonic server, and the shared test helpers
//! do what they say.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::python::{ClientReport, GRPCIO_VERSION, require_grpcio_python, run_grpc_xds_client};
use support::shop::payment_client::PaymentClient;
use support::shop::{PayRequest, StreamRequest};
use support::{assert_split, eventually, spawn_payment};

/// A bootstrap naming `server_uri` as the only xDS server, written into `dir`.
fn write_bootstrap(dir: &Path, server_uri: &str) -> PathBuf {
    let json = serde_json::json!({
        "xds_servers": [{
            "server_uri": server_uri,
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": "interop-harness",
            "cluster": "interop",
            "locality": {"zone": "z1"},
            "metadata": {"NAMESPACE": "default"},
        },
    });
    let path = dir.join("bootstrap.json");
    if let Err(error) = std::fs::write(&path, json.to_string()) {
        panic!("writing {}: {error}", path.display());
    }
    path
}

async fn run(
    python: &Path,
    bootstrap: &Path,
    target: &str,
    n: u32,
    timeout: Duration,
) -> ClientReport {
    match run_grpc_xds_client(python, bootstrap, target, n, timeout).await {
        Ok(report) => report,
        Err(message) => panic!("{message}"),
    }
}

fn temp_dir() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(error) => panic!("creating a temporary directory: {error}"),
    }
}

#[tokio::test]
async fn grpcio_client_reports_an_unreachable_control_server_as_an_error() {
    let python = require_grpcio_python().await;
    // A port nothing listens on: bind, note it, close it.
    let closed = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr,
        Err(error) => panic!("finding a free port: {error}"),
    };
    let dir = temp_dir();
    let bootstrap = write_bootstrap(dir.path(), &closed.to_string());

    let started = Instant::now();
    let report = run(
        &python,
        &bootstrap,
        "xds:///payment",
        1,
        Duration::from_secs(3),
    )
    .await;

    assert_eq!(
        report.grpcio_version.as_deref(),
        Some(GRPCIO_VERSION),
        "{report:?}"
    );
    assert!(!report.ready, "{report:?}");
    assert_eq!(report.ok, 0, "{report:?}");
    assert_eq!(report.error_count(), 1, "{report:?}");
    assert!(
        report
            .errors
            .keys()
            .all(|code| code.chars().all(|c| c.is_ascii_uppercase() || c == '_')),
        "{report:?}"
    );
    let first_error = report.first_error.as_deref().unwrap_or_default();
    assert!(
        first_error.starts_with("channel not ready after"),
        "{report:?}"
    );
    // It reported at its own deadline, not after the harness's kill timer.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn grpcio_client_and_tonic_server_agree_on_the_shop_messages() {
    let python = require_grpcio_python().await;
    let (addr, server) = spawn_payment("v1").await;
    let dir = temp_dir();
    // The bootstrap is required by the script but unused for a plain address target.
    let bootstrap = write_bootstrap(dir.path(), "127.0.0.1:1");

    let report = run(
        &python,
        &bootstrap,
        &format!("ipv4:{addr}"),
        5,
        Duration::from_secs(10),
    )
    .await;

    assert!(report.ready, "{report:?}");
    assert_eq!(report.ok, 5, "{report:?}");
    assert_eq!(report.error_count(), 0, "{report:?}");
    assert_eq!(report.version_count("v1"), 5, "{report:?}");
    assert_eq!(
        report.by_served_by.get(&addr.to_string()),
        Some(&5),
        "{report:?}"
    );
    assert_eq!(server.stats.pays(), 5);
    server.shutdown().await;
}

#[tokio::test]
async fn payment_server_names_itself_and_streams_count_messages() {
    let (addr, server) = spawn_payment("v2").await;
    let mut client = match PaymentClient::connect(format!("http://{addr}")).await {
        Ok(client) => client,
        Err(error) => panic!("connecting to {addr}: {error}"),
    };

    let reply = match client
        .pay(PayRequest {
            order_id: "o-1".into(),
            cents: 250,
        })
        .await
    {
        Ok(reply) => reply.into_inner(),
        Err(status) => panic!("Pay failed: {status}"),
    };
    assert_eq!(reply.served_by, addr.to_string());
    assert_eq!(reply.version, "v2");

    let mut stream = match client.stream(StreamRequest { count: 3 }).await {
        Ok(stream) => stream.into_inner(),
        Err(status) => panic!("Stream failed: {status}"),
    };
    let mut seqs = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                assert_eq!(message.served_by, addr.to_string());
                seqs.push(message.seq);
            }
            Ok(None) => break,
            Err(status) => panic!("stream broke: {status}"),
        }
    }
    assert_eq!(seqs, [1, 2, 3]);
    let stats = std::sync::Arc::clone(&server.stats);
    eventually(Duration::from_secs(5), || stats.streams_completed() == 1).await;
    assert_eq!(stats.stream_messages_sent(), 3);
    server.shutdown().await;
}

#[test]
fn assert_split_accepts_a_fair_split_and_rejects_a_wrong_weight() {
    assert_split(5_040, 10_000, 0.5);
    assert_split(0, 1_000, 0.0);
    assert_split(1_000, 1_000, 1.0);
    assert!(std::panic::catch_unwind(|| assert_split(5_600, 10_000, 0.5)).is_err());
    assert!(std::panic::catch_unwind(|| assert_split(1, 1_000, 0.0)).is_err());
}
