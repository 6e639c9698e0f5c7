//! `/status` flags the gRPC clients that keep a listener or cluster the
//! server deleted (gRFC A53 `ignore_resource_deletion`, gRFC A88): a name
//! the client accepted, still subscribes to, and that a state-of-the-world
//! response has since left out. Only gRPC user agents are flagged: this
//! mesh's own client (and Envoy) drop a deleted resource, as SotW says.

use std::time::Duration;

use mesh_core::xds;
use mesh_testkit::ads::{AdsClient, node};
use mesh_testkit::wait::{DEADLINE, eventually_ok};
use serde_json::{Value, json};

const CATALOG: &str = r#"
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

/// The mesh without catalog: another service only.
const LEDGER: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ledger, namespace: shop}
spec:
  hosts: [ledger]
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  endpoints:
  - address: 127.0.0.1
    ports: {http: 9002}
"#;

const CLUSTER: &str = "outbound|80||catalog.shop.svc.cluster.local";
const OTHER: &str = "outbound|80||ledger.shop.svc.cluster.local";

/// Subscribes to `names` of CDS, receives the answer and ACKs it.
async fn subscribe_and_ack(ads: &mut AdsClient, names: &[&str]) -> usize {
    ads.subscribe(xds::CLUSTER_TYPE, names).await;
    recv_and_ack(ads, names).await
}

/// Receives the next CDS response and ACKs it; returns how many clusters
/// it held.
async fn recv_and_ack(ads: &mut AdsClient, names: &[&str]) -> usize {
    let cds = ads.recv().await;
    assert_eq!(cds.type_url, xds::CLUSTER_TYPE);
    ads.send(
        xds::CLUSTER_TYPE,
        names,
        &cds.version_info,
        &cds.nonce,
        None,
    )
    .await;
    cds.resources.len()
}

/// The `/status` entry of node `id` once `check` holds for it.
async fn client_where(
    server: &mesh_control::ServerHandle,
    id: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    eventually_ok(what, DEADLINE, || {
        let status = server.status();
        status["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["node_id"] == id && check(c))
            .cloned()
            .ok_or(status)
    })
    .await
}

fn acked(c: &Value) -> bool {
    c["types"]["CDS"]["acked"] == true
}

#[tokio::test]
async fn a_grpc_client_holding_a_deleted_cluster_is_flagged_until_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, CATALOG).unwrap();
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .debounce(Duration::from_secs(3600))
        .start()
        .await
        .expect("start control server");
    let connect = |id: &str, user_agent: &str| {
        AdsClient::connect(
            server.xds_addr(),
            node(id).namespace("shop").user_agent(user_agent).build(),
        )
    };
    let mut grpc = connect("grpc-1", "gRPC Go").await;
    let mut ours = connect("rust-1", "proxyless-rust").await;
    assert_eq!(subscribe_and_ack(&mut grpc, &[CLUSTER]).await, 1);
    assert_eq!(subscribe_and_ack(&mut ours, &[CLUSTER]).await, 1);
    let before = client_where(&server, "grpc-1", "grpc-1 ACKed CDS", acked).await;
    assert_eq!(before["deleted_but_kept"], json!([]));
    assert_eq!(before["deleted_but_kept_note"], Value::Null);

    // The config drops catalog: both are sent a CDS response without it.
    std::fs::write(&file, LEDGER).unwrap();
    server.reload();
    assert_eq!(recv_and_ack(&mut grpc, &[CLUSTER]).await, 0);
    assert_eq!(recv_and_ack(&mut ours, &[CLUSTER]).await, 0);
    let version = server.version().to_string();
    let flagged = client_where(&server, "grpc-1", "the deleted cluster flagged", |c| {
        c["deleted_but_kept"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
    })
    .await;
    assert_eq!(
        flagged["deleted_but_kept"],
        json!([{"type": "CDS", "name": CLUSTER, "deleted_at_version": version}]),
        "{flagged:#}"
    );
    let note = flagged["deleted_but_kept_note"].as_str().unwrap();
    assert!(note.contains("ignore_resource_deletion"), "{note}");
    assert!(note.contains("A88"), "{note}");
    // This mesh's client drops a deleted cluster: not flagged.
    let rust = client_where(&server, "rust-1", "rust-1 ACKed the deletion", acked).await;
    assert_eq!(rust["kind"], "proxyless");
    assert_eq!(rust["deleted_but_kept"], json!([]), "{rust:#}");

    // catalog comes back: the flag clears.
    std::fs::write(&file, CATALOG).unwrap();
    server.reload();
    assert_eq!(recv_and_ack(&mut grpc, &[CLUSTER]).await, 1);
    assert_eq!(recv_and_ack(&mut ours, &[CLUSTER]).await, 1);
    let cleared = client_where(&server, "grpc-1", "the flag cleared", |c| {
        c["deleted_but_kept"] == json!([])
    })
    .await;
    assert_eq!(cleared["deleted_but_kept_note"], Value::Null);
}

#[tokio::test]
async fn unsubscribing_from_a_deleted_cluster_clears_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, format!("{CATALOG}---{LEDGER}")).unwrap();
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .debounce(Duration::from_secs(3600))
        .start()
        .await
        .expect("start control server");
    let mut grpc = AdsClient::connect(
        server.xds_addr(),
        node("grpc-2")
            .namespace("shop")
            .user_agent("gRPC C-core linux Python")
            .build(),
    )
    .await;
    assert_eq!(subscribe_and_ack(&mut grpc, &[CLUSTER]).await, 1);
    client_where(&server, "grpc-2", "grpc-2 ACKed CDS", acked).await;

    std::fs::write(&file, LEDGER).unwrap();
    server.reload();
    assert_eq!(recv_and_ack(&mut grpc, &[CLUSTER]).await, 0);
    client_where(&server, "grpc-2", "the deleted cluster flagged", |c| {
        c["deleted_but_kept"][0]["name"] == CLUSTER
    })
    .await;

    // It moves to ledger: it no longer holds catalog.
    assert_eq!(subscribe_and_ack(&mut grpc, &[OTHER]).await, 1);
    client_where(&server, "grpc-2", "the flag cleared", |c| {
        acked(c) && c["deleted_but_kept"] == json!([])
    })
    .await;
}
