//! Replicas (issue 12): two embedded mesh-control replicas sharing one real
//! etcd (Debian's `etcd-server`, installed when missing), the YAML applied
//! through `mesh_control::replica::apply`, two servers registered with
//! `proxyless::serve` whose bootstrap's `PROXYLESS_ADMIN` lists both
//! replicas' admin addresses, and a `proxyless::Client` whose bootstrap
//! lists both replicas in `xds_servers`. Under load, the replica everyone
//! is connected to is shut down:
//!
//! - no call fails;
//! - the servers' heartbeats go on through the other replica: their
//!   endpoints stay in the client's EDS for several TTLs;
//! - a routing change applied after the shutdown reaches the client (its
//!   stream moved to the other replica).
//!
//! Run: `cargo test --test replica_failover`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_control::config::MeshOptions;
use mesh_control::etcd::Etcd;
use mesh_testkit::etcd::EtcdProcess;
use mesh_testkit::wait::eventually;
use proxyless::{Bootstrap, Client, Registration, XdsClient};
use tower::ServiceExt;

/// Every eventual condition's deadline.
const DEADLINE: Duration = Duration::from_secs(20);
/// The servers' registration TTL: the endpoints must outlive several.
const TTL: Duration = Duration::from_secs(2);
/// The subset clusters the client subscribes to (through the routes).
const CLUSTERS: [&str; 2] = [
    "outbound|80|v1|echo.shop.svc.cluster.local",
    "outbound|80|v2|echo.shop.svc.cluster.local",
];

const MESH: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: shop}
spec:
  hosts: [echo]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: shop}
spec:
  host: echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

/// echo's VirtualService: `v1` percent of the requests to v1, the rest to v2.
fn routed(v1: u32) -> String {
    let v2 = 100 - v1;
    format!(
        "{MESH}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo]
  http:
  - route:
    - destination: {{host: echo, subset: v1}}
      weight: {v1}
    - destination: {{host: echo, subset: v2}}
      weight: {v2}
"
    )
}

/// Writes `yaml` as the only file of `dir` and applies it to the replicas.
async fn apply(etcd: &Etcd, dir: &std::path::Path, yaml: &str) {
    std::fs::write(dir.join("mesh.yaml"), yaml).expect("write mesh.yaml");
    mesh_control::replica::apply(
        etcd,
        mesh_control::replica::DEFAULT_PREFIX,
        &[dir.to_path_buf()],
        &MeshOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("apply:\n{e}"));
}

async fn replica(etcd: &EtcdProcess) -> mesh_control::ServerHandle {
    let client = Etcd::connect(&[etcd.endpoint()], None)
        .await
        .unwrap_or_else(|e| panic!("connecting to etcd: {e}"));
    mesh_control::Server::builder()
        .etcd(client)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting a replica: {e}"))
}

/// One `GET http://echo/`: the body (the version that answered), or why not.
async fn get(client: &Client) -> Result<String, String> {
    let req = http::Request::get("http://echo/")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = client
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// The endpoints of echo's subsets at the client.
fn endpoints(xds: &XdsClient) -> usize {
    let snapshot = xds.snapshot();
    CLUSTERS
        .iter()
        .map(|name| {
            snapshot
                .endpoints
                .get(*name)
                .map_or(0, |c| c.endpoint_count())
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_servers_move_to_the_other_replica() {
    let etcd = EtcdProcess::start().await;
    let etcd_client = Etcd::connect(&[etcd.endpoint()], None)
        .await
        .unwrap_or_else(|e| panic!("connecting to etcd: {e}"));
    let yaml_dir = tempfile::tempdir().expect("tempdir");
    apply(&etcd_client, yaml_dir.path(), &routed(50)).await;

    let first = replica(&etcd).await;
    let second = replica(&etcd).await;
    let admin_list = format!("{},{}", first.admin_addr(), second.admin_addr());

    // Two servers, v1 and v2, registering through the first replica that answers.
    let mut servings = Vec::new();
    for version in ["v1", "v2"] {
        let bootstrap = Bootstrap::builder(first.xds_addr().to_string(), format!("echo-{version}"))
            .server(second.xds_addr().to_string())
            .namespace("shop")
            .admin_address(&admin_list)
            .label("version", version)
            .build()
            .expect("server bootstrap");
        let registration = Registration::from_bootstrap(&bootstrap, "echo")
            .expect("registration")
            .ttl(TTL);
        let app = axum::Router::new().fallback(move || async move { version });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        servings.push(
            proxyless::serve(listener, registration, app)
                .await
                .unwrap_or_else(|e| panic!("serve {version}: {e}")),
        );
    }

    let bootstrap = Bootstrap::builder(first.xds_addr().to_string(), "caller-1")
        .server(second.xds_addr().to_string())
        .namespace("shop")
        .build()
        .expect("client bootstrap");
    let xds = XdsClient::start(bootstrap);
    let client = Client::new(xds.clone());
    tokio::time::timeout(DEADLINE, xds.wait_for_listener("echo"))
        .await
        .expect("echo's listener in time")
        .expect("echo's listener");
    let start = Instant::now();
    while endpoints(&xds) != 2 {
        assert!(
            start.elapsed() < DEADLINE,
            "both endpoints of echo at the client within {DEADLINE:?}; clusters: {:?}",
            xds.snapshot()
                .endpoints
                .iter()
                .map(|(k, c)| (k.to_string(), c.endpoint_count()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_uri = first.xds_addr().to_string();
    assert_eq!(
        xds.connected_server().as_deref(),
        Some(first_uri.as_str()),
        "the client starts on the first replica"
    );
    let answer = get(&client).await;
    assert!(matches!(answer.as_deref(), Ok("v1" | "v2")), "{answer:?}");

    // Load, while the first replica goes away.
    let load = {
        let client = client.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut answered_by = std::collections::BTreeSet::new();
            let end = Instant::now() + TTL * 4;
            while Instant::now() < end {
                match get(&client).await {
                    Ok(version) => {
                        ok += 1;
                        answered_by.insert(version);
                    }
                    Err(e) => failed.push(e),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (ok, failed, answered_by)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.shutdown().await;

    let second_uri = second.xds_addr().to_string();
    eventually(
        "the client's stream on the second replica",
        DEADLINE,
        || xds.connected_server().as_deref() == Some(second_uri.as_str()),
    )
    .await;

    // Past several TTLs, both registrations are alive: heartbeats reach the
    // second replica.
    let (ok, failed, answered_by) = load.await.expect("load task");
    assert!(
        failed.is_empty(),
        "{} of {} calls failed across the replica's shutdown, first: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        failed.first()
    );
    assert!(ok > 100, "only {ok} calls: the load proves little");
    assert_eq!(
        answered_by.into_iter().collect::<Vec<_>>(),
        ["v1", "v2"],
        "both servers answered under load"
    );
    assert_eq!(
        endpoints(&xds),
        2,
        "an endpoint left EDS {:?} after the shutdown: its heartbeats did not reach the \
         other replica",
        TTL * 4
    );

    // A change applied now reaches the client through the second replica:
    // every request to v2.
    apply(&etcd_client, yaml_dir.path(), &routed(0)).await;
    let start = Instant::now();
    let mut v2_in_a_row = 0;
    while v2_in_a_row < 50 {
        match get(&client).await {
            Ok(v) if v == "v2" => v2_in_a_row += 1,
            Ok(_) => v2_in_a_row = 0,
            Err(e) => panic!("a call failed after the change: {e}"),
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the route to v2 only did not reach the client within {DEADLINE:?}"
        );
    }

    drop(servings);
    second.shutdown().await;
}
