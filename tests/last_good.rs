//! Last good config, end to end over real sockets: a client of `payment` at
//! 100/0 (v1/v2) keeps sending every call to v1 through each way an edit can
//! go wrong — a subset that does not exist, broken YAML, a DestinationRule
//! dropping the subset in use, a second VirtualService in a new file sorting
//! first, and a restart of mesh-control (with a data directory) with a broken
//! edit still on disk — and moves to v2 on the first valid edit.
//!
//! "Keeps 100/0" is checked over a batch of calls once mesh-control has
//! processed the change (its `/status` lists the rejection) and published
//! nothing (its version did not move): had it published the change, the
//! client would route by it.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proxyless::control::ServerHandle;
use proxyless::xds::ClientOptions;
use proxyless::{Bootstrap, Client, Registration, Serving, XdsClient};
use serde_json::Value;
use support::eventually_named;
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
const ROUTES: &str = "payment.shop.svc.cluster.local:80";
const V1: &str = "outbound|80|v1|payment.shop.svc.cluster.local";
const V2: &str = "outbound|80|v2|payment.shop.svc.cluster.local";
/// Calls per batch: with 100/0, every one must reach v1.
const BATCH: usize = 100;

const SE: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  ports: [{number: 80, name: http, protocol: HTTP}]
";

const DR: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment, namespace: shop}
spec:
  host: payment
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
";

/// payment's VirtualService (named `name`): `w1` to subset `a`, `w2` to `b`.
fn vs(name: &str, a: &str, w1: u32, b: &str, w2: u32) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [payment]
  http:
  - name: split
    route:
    - destination: {{host: payment, subset: {a}}}
      weight: {w1}
    - destination: {{host: payment, subset: {b}}}
      weight: {w2}
"
    )
}

/// The VirtualService in force at the start: 100/0.
fn good_vs() -> String {
    vs("payment", "v1", 100, "v2", 0)
}

/// Replaces a config file the way editors do: write aside, then rename.
fn write(dir: &Path, file: &str, yaml: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).expect("write config");
    std::fs::rename(&tmp, dir.join(file)).expect("rename config");
}

async fn start(
    config: &Path,
    data: &Path,
    addrs: Option<(SocketAddr, SocketAddr)>,
) -> ServerHandle {
    let mut builder = proxyless::control::Server::builder()
        .config_dir(config)
        .data_dir(data)
        .lease_check_interval(Duration::from_millis(20));
    if let Some((xds, admin)) = addrs {
        builder = builder.xds_addr(xds).admin_addr(admin);
    }
    builder.start().await.expect("start mesh-control")
}

/// A payment backend answering with its version, registered with mesh-control.
async fn backend(admin: SocketAddr, version: &'static str) -> Serving {
    let app = axum::Router::new().fallback(move || async move { version });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let registration = Registration::new(admin.to_string(), "payment")
        .namespace("shop")
        .label("version", version);
    proxyless::serve(listener, registration, app)
        .await
        .expect("serve payment")
}

/// The weights of payment's route as the client has it.
fn weights(xds: &XdsClient) -> Vec<(String, u32)> {
    let snapshot = xds.snapshot();
    let Some(rc) = snapshot.route_configs.get(ROUTES) else {
        return Vec::new();
    };
    rc.virtual_hosts
        .iter()
        .flat_map(|vh| vh.routes.iter())
        .next()
        .map(|r| {
            r.action
                .clusters()
                .iter()
                .map(|c| (c.name.to_string(), c.weight))
                .collect()
        })
        .unwrap_or_default()
}

fn split(v1: u32, v2: u32) -> Vec<(String, u32)> {
    vec![(V1.to_string(), v1), (V2.to_string(), v2)]
}

/// Sends a batch of calls to payment; returns how many v1 and v2 answered.
async fn batch(client: &Client) -> (usize, usize) {
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..BATCH {
        let request = http::Request::get("http://payment/pay")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = client
            .clone()
            .oneshot(request)
            .await
            .unwrap_or_else(|e| panic!("a call to payment failed: {e}"));
        assert_eq!(response.status(), 200);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        match &body[..] {
            b"v1" => v1 += 1,
            b"v2" => v2 += 1,
            other => panic!("unexpected answer {:?}", String::from_utf8_lossy(other)),
        }
    }
    (v1, v2)
}

/// The rejections in `/status` whose resource is `resource`.
fn rejections(server: &ServerHandle, resource: &str) -> Vec<Value> {
    server.status()["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["resource"] == resource)
        .cloned()
        .collect()
}

/// Waits until mesh-control has rejected a change to `resource` with a
/// problem containing `needle`; returns that rejection.
async fn rejected(server: &ServerHandle, resource: &str, needle: &str) -> Value {
    let mut found = None;
    eventually_named(
        &format!("mesh-control to reject the change to {resource} ({needle})"),
        DEADLINE,
        || {
            found = rejections(server, resource).into_iter().find(|r| {
                r["problems"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p.as_str().is_some_and(|p| p.contains(needle)))
            });
            found.is_some()
        },
    )
    .await;
    found.unwrap_or_default()
}

/// Waits until nothing is rejected any more (the edit was undone).
async fn clean(server: &ServerHandle) {
    eventually_named("no rejected change left", DEADLINE, || {
        server.status()["rejected"]
            .as_array()
            .is_some_and(|r| r.is_empty())
    })
    .await;
}

/// After an edit mesh-control rejected: nothing was published, the client
/// still has 100/0, and a batch of calls all reach v1.
async fn keeps_100_0(server: &ServerHandle, version: u64, xds: &XdsClient, client: &Client) {
    assert_eq!(
        server.version(),
        version,
        "a rejected edit publishes nothing"
    );
    assert_eq!(weights(xds), split(100, 0));
    assert_eq!(batch(client).await, (BATCH, 0), "every call to v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_at_100_0_stays_there_through_every_broken_edit() {
    let config = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let dir = config.path();
    write(dir, "payment-se.yaml", SE);
    write(dir, "payment-dr.yaml", DR);
    write(dir, "payment-vs.yaml", &good_vs());
    let server = start(dir, data.path(), None).await;
    let addrs = (server.xds_addr(), server.admin_addr());

    let _v1 = backend(server.admin_addr(), "v1").await;
    let _v2 = backend(server.admin_addr(), "v2").await;
    let bootstrap =
        Bootstrap::from_json(&server.bootstrap_json("frontend", "shop")).expect("bootstrap");
    let options = ClientOptions::default()
        .no_cache()
        .backoff(Duration::from_millis(10), Duration::from_millis(100));
    let xds = XdsClient::start_with(bootstrap, options);
    let client = Client::new(xds.clone());
    tokio::time::timeout(DEADLINE, xds.wait_for_listener("payment"))
        .await
        .expect("payment's listener within 10 s")
        .expect("payment exists");
    eventually_named(
        "both subsets' endpoints and the 100/0 split",
        DEADLINE,
        || {
            let snapshot = xds.snapshot();
            let count = |c: &str| snapshot.endpoints.get(c).map_or(0, |e| e.endpoint_count());
            count(V1) == 1 && count(V2) == 1 && weights(&xds) == split(100, 0)
        },
    )
    .await;
    assert_eq!(batch(&client).await, (BATCH, 0));
    let version = server.version();

    // 1. The weights flipped, with a typo in the subset name.
    let typo = vs("payment", "v1", 0, "v9", 100);
    write(dir, "payment-vs.yaml", &typo);
    let r = rejected(
        &server,
        "VirtualService shop/payment",
        "subset 'v9' is not defined",
    )
    .await;
    let typo_line = typo.lines().position(|l| l.contains("v9")).map(|i| i + 1);
    assert!(
        r["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains(&format!("payment-vs.yaml:{}:", typo_line.unwrap_or(0)))),
        "at the subset's line: {r}"
    );
    assert!(
        r["kept"]["at"]
            .as_str()
            .is_some_and(|a| a.ends_with("payment-vs.yaml:3")),
        "{r}"
    );
    keeps_100_0(&server, version, &xds, &client).await;
    write(dir, "payment-vs.yaml", &good_vs());
    clean(&server).await;

    // 2. Broken YAML.
    write(
        dir,
        "payment-vs.yaml",
        &good_vs().replace("weight: 0", "weight: [0"),
    );
    rejected(&server, "VirtualService shop/payment", "YAML syntax error").await;
    keeps_100_0(&server, version, &xds, &client).await;
    write(dir, "payment-vs.yaml", &good_vs());
    clean(&server).await;

    // 3. The DestinationRule drops the subset the route uses: rejected at
    //    the rule's line and at the route's.
    write(
        dir,
        "payment-dr.yaml",
        &DR.replace("  - name: v1\n    labels: {version: v1}\n", ""),
    );
    let r = rejected(
        &server,
        "DestinationRule shop/payment",
        "would make VirtualService shop/payment invalid",
    )
    .await;
    assert!(
        r["problems"][1].as_str().is_some_and(
            |p| p.contains("payment-vs.yaml:") && p.contains("subset 'v1' is not defined")
        ),
        "{r}"
    );
    keeps_100_0(&server, version, &xds, &client).await;
    write(dir, "payment-dr.yaml", DR);
    clean(&server).await;

    // 4. A new file sorting first with a second VirtualService for payment.
    write(
        dir,
        "00-canary.yaml",
        &vs("payment-canary", "v1", 0, "v2", 100),
    );
    rejected(
        &server,
        "VirtualService shop/payment-canary",
        "already routed by VirtualService shop/payment",
    )
    .await;
    keeps_100_0(&server, version, &xds, &client).await;
    std::fs::remove_file(dir.join("00-canary.yaml")).expect("remove the canary");
    clean(&server).await;

    // 5. The typo on disk again, and mesh-control restarted on its data
    //    directory: it serves the last good split, not the edit.
    write(dir, "payment-vs.yaml", &typo);
    rejected(
        &server,
        "VirtualService shop/payment",
        "subset 'v9' is not defined",
    )
    .await;
    server.shutdown().await;
    let server = start(dir, data.path(), Some(addrs)).await;
    assert!(
        !rejections(&server, "VirtualService shop/payment").is_empty(),
        "rejected again at the start"
    );
    eventually_named(
        "the client to reconnect and accept the restarted server's routes",
        DEADLINE,
        || {
            server.status()["clients"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["node_id"] == "frontend" && c["types"]["RDS"]["acked"] == true)
        },
    )
    .await;
    let version = server.version();
    keeps_100_0(&server, version, &xds, &client).await;

    // A valid edit moves it to 0/100.
    write(dir, "payment-vs.yaml", &vs("payment", "v1", 0, "v2", 100));
    eventually_named("the client to get the 0/100 split", DEADLINE, || {
        weights(&xds) == split(0, 100)
    })
    .await;
    assert!(
        server.status()["rejected"]
            .as_array()
            .is_some_and(|r| r.is_empty())
    );
    assert_eq!(batch(&client).await, (0, BATCH), "every call to v2");
}
