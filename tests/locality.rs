//! Istio's `localityLbSetting` end to end over real sockets (issue 15):
//! Istio YAML → embedded mesh-control → ADS (the caller's `node.locality`)
//! → per-node EDS → `XdsClient` → `proxyless::Client` → backends on
//! 127.0.0.1 answering with their locality.
//!
//! - `distribute` from `r1/z1/*` to `{r1/z1/*: 70, r1/z2/*: 20, r2/*: 10}`:
//!   a caller in r1/z1 sends those shares (z >= 4.5 each over 3,000 calls);
//!   a caller elsewhere is not affected (its shares follow endpoint counts);
//! - `failover` from r1 to r2 with outlier detection: with r1's endpoints
//!   refusing connections, every call of a caller in r1/z1 succeeds (Istio's
//!   default retries) and lands in r2, never in r3, which is further down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use mesh_control::BootstrapSpec;
use mesh_testkit::http::named_backend;
use proxyless::{Bootstrap, Client, XdsClient};
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);

/// An address nothing listens on (connections are refused).
async fn dead() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("addr")
}

/// catalog in `shop` with one endpoint per (address, locality), and a
/// DestinationRule whose `trafficPolicy` is `policy`.
fn catalog(endpoints: &[(SocketAddr, &str)], policy: &str) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(a, locality)| {
            format!(
                "  - {{address: {}, ports: {{http: {}}}, locality: {locality}}}\n",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
  trafficPolicy:
{policy}"
    )
}

/// mesh-control on `yaml`, which must load without a problem.
async fn control(yaml: &str) -> (mesh_control::ServerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start mesh-control");
    let status = server.status();
    assert_eq!(
        status["diagnostics"],
        serde_json::json!([]),
        "mesh-control rejects the test's YAML:\n{yaml}\nstatus: {status:#}"
    );
    (server, dir)
}

/// A client of a workload `id` in shop whose bootstrap says it runs in
/// `region`/`zone`.
fn client(server: &mesh_control::ServerHandle, id: &str, region: &str, zone: &str) -> Client {
    let json = server.bootstrap(&BootstrapSpec::new(id, "shop"));
    let mut bootstrap: serde_json::Value = serde_json::from_str(&json).expect("bootstrap json");
    bootstrap["node"]["locality"] = serde_json::json!({"region": region, "zone": zone});
    let xds = XdsClient::start(Bootstrap::from_json(&bootstrap.to_string()).expect("bootstrap"));
    Client::new(xds)
}

/// The body of `GET uri` through `client`, or the error.
async fn call(client: &Client, uri: &str) -> Result<String, String> {
    let req = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(DEADLINE, client.clone().oneshot(req))
        .await
        .map_err(|_| format!("GET {uri}: no answer within {DEADLINE:?}"))?
        .map_err(|e| format!("GET {uri}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {uri}: {}", resp.status()));
    }
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Where `n` calls land, by backend name.
async fn tally(client: &Client, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let landed = call(client, "http://catalog/items")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        *out.entry(landed).or_insert(0) += 1;
    }
    out
}

/// Asserts `count` of `n` is `p` of them at z < 4.5.
#[track_caller]
fn share(count: usize, n: usize, p: f64, what: &str, all: &BTreeMap<String, usize>) {
    let (count, n) = (count as f64, n as f64);
    let sd = (n * p * (1.0 - p)).sqrt();
    let z = (count - n * p).abs() / sd;
    assert!(
        z < 4.5,
        "{what}: {count} of {n} calls, expected {:.0} (z = {z:.1}): {all:?}",
        n * p
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribute_sends_a_callers_share_to_each_locality() {
    let z1 = named_backend("r1/z1").await;
    let z2 = named_backend("r1/z2").await;
    let r2 = named_backend("r2/z3").await;
    let yaml = catalog(
        &[(z1, "r1/z1"), (z2, "r1/z2"), (r2, "r2/z3")],
        "    loadBalancer:
      localityLbSetting:
        distribute:
        - from: r1/z1/*
          to: {r1/z1/*: 70, r1/z2/*: 20, r2/*: 10}
",
    );
    let (server, _dir) = control(&yaml).await;
    let n = 3_000;
    let local = client(&server, "web-z1", "r1", "z1");
    let got = tally(&local, n).await;
    for (zone, p) in [("r1/z1", 0.7), ("r1/z2", 0.2), ("r2/z3", 0.1)] {
        share(
            got.get(zone).copied().unwrap_or(0),
            n,
            p,
            &format!("r1/z1 caller to {zone}"),
            &got,
        );
    }
    // A caller in r2 is not from r1/z1: one endpoint per locality, even shares.
    let n = 1_500;
    let remote = client(&server, "web-r2", "r2", "z3");
    let got = tally(&remote, n).await;
    for zone in ["r1/z1", "r1/z2", "r2/z3"] {
        share(
            got.get(zone).copied().unwrap_or(0),
            n,
            1.0 / 3.0,
            &format!("r2 caller to {zone}"),
            &got,
        );
    }
    // Each caller has its own view, keyed by its locality.
    let status = server.status();
    let keys = status["views"]["keys"].to_string();
    assert!(
        keys.contains("locality=r1/z1/") && keys.contains("locality=r2/z3/"),
        "{:#}",
        status["views"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_goes_to_the_named_region_when_the_local_one_is_down() {
    let (z1, z2) = (dead().await, dead().await);
    let r2 = named_backend("r2").await;
    let r3 = named_backend("r3").await;
    let yaml = catalog(
        &[(z1, "r1/z1"), (z2, "r1/z2"), (r2, "r2/z3"), (r3, "r3/z4")],
        "    loadBalancer:
      localityLbSetting:
        failover: [{from: r1, to: r2}]
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 60s
      maxEjectionPercent: 100
",
    );
    let (server, _dir) = control(&yaml).await;
    let caller = client(&server, "web-z1", "r1", "z1");
    let n = 200;
    let got = tally(&caller, n).await;
    assert_eq!(
        got,
        BTreeMap::from([("r2".to_string(), n)]),
        "every call succeeds and lands in r2 (r3 is after it)"
    );
    // A caller in r3 has its own region first.
    let other = client(&server, "web-r3", "r3", "z4");
    let got = tally(&other, 50).await;
    assert_eq!(got, BTreeMap::from([("r3".to_string(), 50)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_endpoint_warms_up_over_warmup_duration() {
    let old = named_backend("old").await;
    let new = named_backend("new").await;
    // 600 s: for its first 60 s the new endpoint weighs Envoy's minimum,
    // 10% of the old one's, so it gets 1/11 of the calls meanwhile.
    let policy = "    loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 600s}\n";
    let (server, dir) = control(&catalog(&[(old, "r1/z1")], policy)).await;
    let json = server.bootstrap(&BootstrapSpec::new("web", "shop"));
    let xds = XdsClient::start(Bootstrap::from_json(&json).expect("bootstrap"));
    let caller = Client::new(xds.clone());
    assert_eq!(
        tally(&caller, 20).await,
        BTreeMap::from([("old".into(), 20)])
    );

    std::fs::write(
        dir.path().join("mesh.yaml"),
        catalog(&[(old, "r1/z1"), (new, "r1/z1")], policy),
    )
    .expect("write mesh.yaml");
    server.reload();
    let cluster = "outbound|80||catalog.shop.svc.cluster.local";
    let both = async {
        loop {
            let endpoints = xds.snapshot().endpoints.get(cluster).map_or(0, |cla| {
                cla.localities.iter().map(|l| l.endpoints.len()).sum()
            });
            if endpoints == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, both)
        .await
        .expect("the client gets the new endpoint");
    let n = 2_000;
    let got = tally(&caller, n).await;
    share(
        got.get("new").copied().unwrap_or(0),
        n,
        1.0 / 11.0,
        "the warming endpoint",
        &got,
    );
    // A client that first sees both endpoints together ramps neither.
    let fresh = client(&server, "web-2", "r1", "z1");
    let n = 1_000;
    let got = tally(&fresh, n).await;
    share(
        got.get("new").copied().unwrap_or(0),
        n,
        0.5,
        "a new client's share of the new endpoint",
        &got,
    );
}
