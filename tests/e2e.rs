//! End to end over real sockets: Istio YAML on disk → embedded mesh-control →
//! ADS → `XdsClient` → `proxyless::Client` → services served and registered
//! with `proxyless::serve`.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_control::ServerHandle;
use prost::Message;
use proxyless::mesh_core::xds;
use proxyless::{Bootstrap, Client, Registration, Serving, XdsClient};
use support::shop::payment_client::PaymentClient;
use support::shop::{PayRequest, StreamRequest};
use support::{PaymentServer, assert_split, eventually_named, payment_routes};
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
const CATALOG_V1: &str = "outbound|80|v1|catalog.shop.svc.cluster.local";
const CATALOG_V2: &str = "outbound|80|v2|catalog.shop.svc.cluster.local";
const CATALOG_ROUTES: &str = "catalog.shop.svc.cluster.local:80";

/// An embedded control server over a config directory.
struct Mesh {
    dir: tempfile::TempDir,
    server: ServerHandle,
}

impl Mesh {
    /// Starts mesh-control on the demo config (examples/mesh).
    async fn start() -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        support::copy_demo_mesh(dir.path());
        let server = mesh_control::Server::builder()
            .config_dir(dir.path())
            .lease_check_interval(Duration::from_millis(20))
            .start()
            .await
            .expect("start mesh-control");
        Mesh { dir, server }
    }

    fn admin(&self) -> String {
        self.server.admin_addr().to_string()
    }

    /// Replaces a config file the way editors do: write aside, then rename.
    fn write(&self, file: &str, yaml: &str) {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, self.dir.path().join(file)).expect("rename config");
    }

    fn shop_yaml(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("shop.yaml")).expect("shop.yaml")
    }

    fn xds(&self, node: &str) -> XdsClient {
        let json = self.server.bootstrap_json(node, "shop");
        XdsClient::start(Bootstrap::from_json(&json).expect("bootstrap"))
    }
}

/// A catalog backend that answers with its version and counts its requests.
struct Backend {
    serving: Serving,
    hits: Arc<AtomicU64>,
    addr: SocketAddr,
}

async fn catalog(mesh: &Mesh, version: &'static str) -> Backend {
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::Relaxed);
            version
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let registration = Registration::new(mesh.admin(), "catalog")
        .namespace("shop")
        .label("version", version);
    let serving = proxyless::serve(listener, registration, app)
        .await
        .expect("serve catalog");
    Backend {
        serving,
        hits,
        addr,
    }
}

async fn get(client: &Client, path: &str, user: Option<&str>) -> String {
    let mut req = http::Request::get(format!("http://catalog{path}"));
    if let Some(user) = user {
        req = req.header("x-user", user);
    }
    let resp = client
        .clone()
        .oneshot(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

fn endpoint_count(xds: &XdsClient, cluster: &str) -> usize {
    xds.snapshot()
        .endpoints
        .get(cluster)
        .map_or(0, |c| c.endpoint_count())
}

/// Waits until `xds` sees catalog's listener and both subsets' endpoints.
async fn wait_for_catalog(xds: &XdsClient) {
    tokio::time::timeout(DEADLINE, xds.wait_for_listener("catalog"))
        .await
        .expect("listener within 10 s")
        .expect("catalog exists");
    eventually_named("both catalog subsets have endpoints", DEADLINE, || {
        endpoint_count(xds, CATALOG_V1) == 1 && endpoint_count(xds, CATALOG_V2) == 1
    })
    .await;
}

/// Sends `n` requests from `concurrency` tasks; returns how many v1 answered.
async fn count_v1(client: &Client, n: usize, concurrency: usize) -> u64 {
    let v1 = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let v1 = v1.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / concurrency {
                match get(&client, "/items", None).await.as_str() {
                    "v1" => {
                        v1.fetch_add(1, Ordering::Relaxed);
                    }
                    "v2" => {}
                    other => panic!("unexpected answer {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("request task");
    }
    v1.load(Ordering::Relaxed)
}

/// The weights of catalog's "split" route as a client sees them.
fn split_weights(xds: &XdsClient) -> Vec<u32> {
    let snapshot = xds.snapshot();
    let Some(rc) = snapshot.route_configs.get(CATALOG_ROUTES) else {
        return vec![];
    };
    rc.virtual_hosts
        .iter()
        .flat_map(|vh| vh.routes.iter())
        .find(|r| r.action.clusters().len() == 2)
        .map(|r| r.action.clusters().iter().map(|c| c.weight).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_90_10_over_10000_requests() {
    let mesh = Mesh::start().await;
    let _v1 = catalog(&mesh, "v1").await;
    let _v2 = catalog(&mesh, "v2").await;
    let xds = mesh.xds("frontend-split");
    wait_for_catalog(&xds).await;
    let client = Client::new(xds.clone());

    let total = 10_000;
    let v1 = count_v1(&client, total, 16).await;
    assert_split(v1, total as u64, 0.9);
}

#[tokio::test]
async fn header_and_path_matches_first_match_wins() {
    let mesh = Mesh::start().await;
    let _v1 = catalog(&mesh, "v1").await;
    let _v2 = catalog(&mesh, "v2").await;
    // beta users → v2; /api → v1; /api/v2 → v2 is shadowed by /api
    // (first match wins, as in Istio); everything else → v2.
    let yaml = mesh.shop_yaml().replace(
        "  - name: split\n",
        "  - name: api
    match:
    - uri:
        prefix: /api
    route:
    - destination:
        host: catalog
        subset: v1
  - name: api-v2-shadowed
    match:
    - uri:
        prefix: /api/v2
    route:
    - destination:
        host: catalog
        subset: v2
  - name: split
",
    );
    let yaml = yaml
        .replace("      weight: 90\n", "      weight: 0\n")
        .replace("      weight: 10\n", "      weight: 1\n");
    mesh.write("shop.yaml", &yaml);
    let xds = mesh.xds("frontend-match");
    wait_for_catalog(&xds).await;
    eventually_named("the new routes reach the client", DEADLINE, || {
        split_weights(&xds) == vec![0, 1]
    })
    .await;
    let client = Client::new(xds.clone());
    for _ in 0..20 {
        assert_eq!(
            get(&client, "/api/items", Some("beta")).await,
            "v2",
            "header route first"
        );
        assert_eq!(
            get(&client, "/api/items", Some("alpha")).await,
            "v1",
            "path prefix"
        );
        assert_eq!(
            get(&client, "/api/v2/items", None).await,
            "v1",
            "shadowed by /api"
        );
        assert_eq!(
            get(&client, "/other", None).await,
            "v2",
            "weight 0 never chosen"
        );
    }
}

#[tokio::test]
async fn a_weight_change_on_disk_reaches_ten_clients() {
    let mesh = Mesh::start().await;
    let clients: Vec<XdsClient> = (0..10)
        .map(|i| mesh.xds(&format!("frontend-{i}")))
        .collect();
    for xds in &clients {
        tokio::time::timeout(DEADLINE, xds.wait_for_listener("catalog"))
            .await
            .expect("listener within 10 s")
            .expect("catalog exists");
        assert_eq!(split_weights(xds), vec![90, 10]);
    }
    let before = mesh.server.version();
    let yaml = mesh
        .shop_yaml()
        .replace("      weight: 90\n", "      weight: 50\n")
        .replace("      weight: 10\n", "      weight: 50\n");
    mesh.write("shop.yaml", &yaml);
    for (i, xds) in clients.iter().enumerate() {
        eventually_named(&format!("client {i} applies 50/50"), DEADLINE, || {
            split_weights(xds) == vec![50, 50]
        })
        .await;
    }
    let version = mesh.server.version();
    assert!(version > before);
    // Every client acknowledged the new route config version.
    eventually_named("10 clients ACK the new RDS version", DEADLINE, || {
        let status = mesh.server.status();
        let acked = status["clients"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .filter(|c| {
                        c["types"]["RDS"]["acked_version"].as_str() == Some(&version.to_string())
                    })
                    .count()
            })
            .unwrap_or(0);
        acked == 10
    })
    .await;
}

#[tokio::test]
async fn registered_endpoints_get_traffic_until_their_lease_expires() {
    let mesh = Mesh::start().await;
    // A healthy v1 that heartbeats, and a v1 whose registration is not
    // renewed (a workload that hung): its lease expires after 1 s.
    let healthy = catalog(&mesh, "v1").await;
    let _v2 = catalog(&mesh, "v2").await;
    let stale = {
        let hits = Arc::new(AtomicU64::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                "v1"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let body = format!(
            r#"{{"service":"catalog","namespace":"shop","address":"127.0.0.1","port":{},"labels":{{"version":"v1"}},"ttl_seconds":1}}"#,
            addr.port()
        );
        let (code, lease) =
            support::admin::admin_request(mesh.server.admin_addr(), "POST", "/v1/endpoints", &body)
                .await;
        assert_eq!(code, 201, "{lease}");
        (hits, addr)
    };
    let xds = mesh.xds("frontend-lease");
    tokio::time::timeout(DEADLINE, xds.wait_for_listener("catalog"))
        .await
        .expect("listener within 10 s")
        .expect("catalog exists");
    let client = Client::new(xds.clone());
    // Both v1 endpoints receive traffic while registered (round robin).
    let mut saw_stale = false;
    for _ in 0..400 {
        get(&client, "/items", None).await;
        if stale.0.load(Ordering::Relaxed) > 0 && healthy.hits.load(Ordering::Relaxed) > 0 {
            saw_stale = true;
            break;
        }
    }
    // The lease may already have expired on a slow machine; then the stale
    // endpoint must at least have been seen in EDS.
    assert!(
        saw_stale || endpoint_count(&xds, CATALOG_V1) == 1,
        "registered endpoint {} never received traffic",
        stale.1
    );
    eventually_named(
        "the expired endpoint leaves the client's EDS",
        DEADLINE,
        || {
            let snapshot = xds.snapshot();
            snapshot.endpoints.get(CATALOG_V1).is_some_and(|c| {
                c.localities
                    .iter()
                    .flat_map(|l| l.endpoints.iter())
                    .all(|e| e.address != stale.1)
            })
        },
    )
    .await;
    let stale_hits = stale.0.load(Ordering::Relaxed);
    for _ in 0..300 {
        get(&client, "/items", None).await;
    }
    assert_eq!(
        stale.0.load(Ordering::Relaxed),
        stale_hits,
        "no request may reach an endpoint after its removal was applied"
    );
    assert!(healthy.hits.load(Ordering::Relaxed) > 0);
    assert_eq!(endpoint_count(&xds, CATALOG_V1), 1);
    // Deregistration on shutdown removes an endpoint at once, too.
    let addr = healthy.addr;
    healthy.serving.shutdown().await.expect("shutdown");
    eventually_named("a deregistered endpoint leaves EDS", DEADLINE, || {
        endpoint_count(&xds, CATALOG_V1) == 0
    })
    .await;
    let _ = addr;
}

#[tokio::test]
async fn an_invalid_resource_is_nacked_and_the_last_good_routing_stays() {
    let mesh = Mesh::start().await;
    let _v1 = catalog(&mesh, "v1").await;
    let _v2 = catalog(&mesh, "v2").await;
    let xds = mesh.xds("frontend-nack");
    wait_for_catalog(&xds).await;
    let client = Client::new(xds.clone());
    assert_eq!(get(&client, "/items", Some("beta")).await, "v2");

    // Serve a route config whose first route has an invalid regex.
    let good = xds
        .snapshot()
        .route_configs
        .get(CATALOG_ROUTES)
        .cloned()
        .expect("route config");
    let mut proto = xds::route_config_to_proto(&good);
    let route = &mut proto.virtual_hosts[0].routes[0];
    let path = route.r#match.as_mut().expect("match");
    path.path_specifier = Some(
        envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier::SafeRegex(
            envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                regex: "/items/(unclosed".into(),
                ..Default::default()
            },
        ),
    );
    let raw = xds::Any {
        type_url: xds::ROUTE_CONFIG_TYPE.into(),
        value: proto.encode_to_vec(),
    };
    mesh.server
        .serve_raw_resource(CATALOG_ROUTES, raw)
        .expect("serve raw resource");

    eventually_named("the NACK and its reason show in /status", DEADLINE, || {
        let status = mesh.server.status();
        status["clients"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["node_id"] == "frontend-nack"
                    && c["types"]["RDS"]["last_nack"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("regex") && m.contains(CATALOG_ROUTES))
                    && c["types"]["RDS"]["acked"] == false
            })
        })
    })
    .await;
    // The previous routing keeps working.
    assert_eq!(
        xds.snapshot().route_configs.get(CATALOG_ROUTES),
        Some(&good)
    );
    for _ in 0..20 {
        assert_eq!(get(&client, "/items", Some("beta")).await, "v2");
    }
    let v1 = count_v1(&client, 200, 4).await;
    assert!(v1 > 100, "the 90/10 split still applies: {v1}/200 v1");
}

async fn payment(mesh: &Mesh, server: PaymentServer) -> (Serving, Arc<support::PaymentStats>) {
    let stats = server.stats.clone();
    let version = server.version.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let registration = Registration::new(mesh.admin(), "payment")
        .namespace("shop")
        .label("version", version);
    let serving = proxyless::serve(listener, registration, payment_routes(server))
        .await
        .expect("serve payment");
    (serving, stats)
}

fn grpc_client(xds: &XdsClient) -> PaymentClient<Client<tonic::body::Body>> {
    let channel: Client<tonic::body::Body> = Client::new(xds.clone());
    PaymentClient::with_origin(channel, "http://payment".parse().expect("origin"))
}

#[tokio::test]
async fn grpc_calls_follow_the_70_30_split() {
    let mesh = Mesh::start().await;
    let _v1 = payment(&mesh, PaymentServer::new("p1", "v1")).await;
    let _v2 = payment(&mesh, PaymentServer::new("p2", "v2")).await;
    let xds = mesh.xds("frontend-grpc");
    tokio::time::timeout(DEADLINE, xds.wait_for_listener("payment"))
        .await
        .expect("listener within 10 s")
        .expect("payment exists");
    eventually_named("both payment subsets have endpoints", DEADLINE, || {
        endpoint_count(&xds, "outbound|50051|v1|payment.shop.svc.cluster.local") == 1
            && endpoint_count(&xds, "outbound|50051|v2|payment.shop.svc.cluster.local") == 1
    })
    .await;
    let mut client = grpc_client(&xds);
    let total = 2000u64;
    let mut v1 = 0;
    for i in 0..total {
        let reply = client
            .pay(PayRequest {
                order_id: format!("o-{i}"),
                cents: 100,
            })
            .await
            .expect("pay")
            .into_inner();
        if reply.version == "v1" {
            v1 += 1;
        }
    }
    assert_split(v1, total, 0.7);
}

#[tokio::test]
async fn a_server_stream_of_1000_messages_is_not_buffered() {
    let mesh = Mesh::start().await;
    let server = PaymentServer::new("p1", "v1").with_stream_interval(Duration::from_millis(1));
    let (_serving, stats) = payment(&mesh, server).await;
    // Route all payment traffic to v1 (the only one registered).
    let yaml = mesh
        .shop_yaml()
        .replace("      weight: 70\n", "      weight: 1\n")
        .replace("      weight: 30\n", "      weight: 0\n");
    mesh.write("shop.yaml", &yaml);
    let xds = mesh.xds("frontend-stream");
    tokio::time::timeout(DEADLINE, xds.wait_for_listener("payment"))
        .await
        .expect("listener within 10 s")
        .expect("payment exists");
    eventually_named("v1 is the only destination", DEADLINE, || {
        let snapshot = xds.snapshot();
        snapshot
            .route_configs
            .get("payment.shop.svc.cluster.local:50051")
            .is_some_and(|rc| {
                rc.virtual_hosts[0].routes.iter().all(|r| {
                    r.action
                        .clusters()
                        .iter()
                        .all(|c| c.weight == 0 || c.name.contains("|v1|"))
                })
            })
            && endpoint_count(&xds, "outbound|50051|v1|payment.shop.svc.cluster.local") == 1
    })
    .await;
    let mut client = grpc_client(&xds);
    let mut stream = client
        .stream(StreamRequest { count: 1000 })
        .await
        .expect("start stream")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("first message")
        .expect("some");
    assert_eq!(first.seq, 1);
    let sent_when_first_arrived = stats.stream_messages_sent();
    assert!(
        sent_when_first_arrived < 1000,
        "the first message must arrive before the last is sent (sent: {sent_when_first_arrived})"
    );
    let mut received = 1;
    while let Some(msg) = stream.message().await.expect("message") {
        received += 1;
        assert_eq!(msg.seq, received);
    }
    assert_eq!(received, 1000);
}

#[tokio::test]
async fn an_unknown_service_fails_fast_naming_it() {
    let mesh = Mesh::start().await;
    let xds = mesh.xds("frontend-unknown");
    let client = Client::new(xds.clone());
    let req = http::Request::get("http://nope/items")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let err = tokio::time::timeout(DEADLINE, client.oneshot(req))
        .await
        .expect("an answer well before the listener wait times out")
        .expect_err("no such service");
    assert_eq!(err.kind(), proxyless::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
}
