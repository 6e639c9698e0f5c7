//! A service's own debug endpoint (issue 6: "every service serves its own
//! CSDS and a JSON config dump"): embedded mesh-control on the demo config →
//! an `XdsClient` synced to `catalog` → `proxyless::serve_admin` on one port,
//! queried the way an operator would: `curl /debug/mesh/config`, and a CSDS
//! client (what `grpcdebug <addr> xds status` sends) over gRPC to the same
//! port. What the service reports must agree with what mesh-control says it
//! sent and this client ACKed.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::admin::v3::ClientResourceStatus;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use envoy_types::pb::envoy::service::status::v3::{ClientConfig, ClientStatusRequest};
use envoy_types::pb::envoy::r#type::matcher::v3::{NodeMatcher, StringMatcher, string_matcher};
use mesh_control::ServerHandle;
use proxyless::layers::telemetry::MetricsRegistry;
use proxyless::mesh_core::xds::{self, ResourceType};
use proxyless::{AdminEndpoints, Bootstrap, XdsClient, serve_admin};
use serde_json::{Value, json};
use support::admin::admin_request;
use support::eventually_named;

const DEADLINE: Duration = Duration::from_secs(10);
const NODE: &str = "catalog-debug-1";
const CATALOG_V1: &str = "outbound|80|v1|catalog.shop.svc.cluster.local";
const CATALOG_V2: &str = "outbound|80|v2|catalog.shop.svc.cluster.local";
const CATALOG_ROUTES: &str = "catalog.shop.svc.cluster.local:80";

/// Starts mesh-control on a copy of the demo config (examples/mesh).
async fn start_mesh() -> (tempfile::TempDir, ServerHandle) {
    let dir = tempfile::tempdir().expect("tempdir");
    support::copy_demo_mesh(dir.path());
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start mesh-control");
    (dir, server)
}

/// Registers one catalog endpoint of `version` (nothing needs to listen:
/// the test only reads config).
async fn register(server: &ServerHandle, port: u16, version: &str) {
    let body = json!({
        "service": "catalog",
        "namespace": "shop",
        "address": "127.0.0.1",
        "port": port,
        "labels": { "version": version },
        "locality": "eu-west/eu-west-1a/",
        "ttl_seconds": 300,
    });
    let (code, reply) = admin_request(
        server.admin_addr(),
        "POST",
        "/v1/endpoints",
        &body.to_string(),
    )
    .await;
    assert_eq!(code, 201, "registration refused: {reply}");
}

/// mesh-control's `/status` entry for `NODE`, by type: (sent, acked) versions.
fn control_versions(server: &ServerHandle) -> BTreeMap<String, (String, String)> {
    let status = server.status();
    let Some(client) = status["clients"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["node_id"] == NODE))
    else {
        return BTreeMap::new();
    };
    let Some(types) = client["types"].as_object() else {
        return BTreeMap::new();
    };
    types
        .iter()
        .map(|(t, s)| {
            let v = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
            (t.clone(), (v("sent_version"), v("acked_version")))
        })
        .collect()
}

fn snapshot_versions(xds: &XdsClient) -> BTreeMap<String, String> {
    let s = xds.snapshot();
    let v = &s.versions;
    [
        ("LDS", &v.listeners),
        ("RDS", &v.route_configs),
        ("CDS", &v.clusters),
        ("EDS", &v.endpoints),
    ]
    .into_iter()
    .map(|(t, v)| (t.to_owned(), v.to_string()))
    .collect()
}

/// The generic configs of one CSDS client config: (type, name) → (version, status, raw).
fn generic(config: &ClientConfig) -> BTreeMap<(String, String), (String, i32, Vec<u8>)> {
    config
        .generic_xds_configs
        .iter()
        .map(|g| {
            let short = ResourceType::from_type_url(&g.type_url)
                .map_or("?", ResourceType::short_name)
                .to_owned();
            (
                (short, g.name.clone()),
                (
                    g.version_info.clone(),
                    g.client_status,
                    g.xds_config
                        .as_ref()
                        .map(|a| a.value.clone())
                        .unwrap_or_default(),
                ),
            )
        })
        .collect()
}

fn find<'a>(list: &'a Value, key: &str, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|v| v[key] == name))
        .unwrap_or_else(|| panic!("no {name:?} in {list:#}"))
}

#[tokio::test]
async fn a_service_serves_its_config_dump_and_csds_on_one_port() {
    let (_dir, mesh) = start_mesh().await;
    register(&mesh, 41001, "v1").await;
    register(&mesh, 41002, "v2").await;

    let bootstrap = Bootstrap::from_json(&mesh.bootstrap_json(NODE, "shop")).expect("bootstrap");
    let xds = XdsClient::start(bootstrap);
    tokio::time::timeout(DEADLINE, xds.wait_for_listener("catalog"))
        .await
        .expect("catalog's config within 10 s")
        .expect("catalog exists");
    eventually_named("both catalog subsets have an endpoint", DEADLINE, || {
        let s = xds.snapshot();
        [CATALOG_V1, CATALOG_V2]
            .iter()
            .all(|c| s.endpoints.get(*c).is_some_and(|e| e.endpoint_count() == 1))
    })
    .await;
    // mesh-control has seen this client ACK every type at the version it runs.
    eventually_named("mesh-control records the ACKs", DEADLINE, || {
        let control = control_versions(&mesh);
        let ours = snapshot_versions(&xds);
        ours.iter().all(|(t, v)| {
            !v.is_empty()
                && control
                    .get(t)
                    .is_some_and(|(sent, acked)| sent == v && acked == v)
        })
    })
    .await;
    let versions = snapshot_versions(&xds);

    let admin = serve_admin(
        "127.0.0.1:0".parse().expect("addr"),
        AdminEndpoints::new(xds.clone()).metrics(MetricsRegistry::new()),
    )
    .await
    .expect("serve the admin endpoint");
    let addr = admin.local_addr();

    // --- /debug/mesh/config: what a person reads.
    let (code, dump) = admin_request(addr, "GET", "/debug/mesh/config", "").await;
    assert_eq!(code, 200, "{dump}");
    assert_eq!(dump["node"]["id"], NODE);
    assert_eq!(dump["node"]["namespace"], "shop");
    for (t, v) in &versions {
        assert_eq!(
            dump["versions"][t],
            json!(v),
            "{t} version in {:#}",
            dump["versions"]
        );
    }
    let listener = find(&dump["listeners"], "name", "catalog");
    assert_eq!(listener["route_config_name"], CATALOG_ROUTES);
    assert_eq!(listener["status"], "ACKED");
    assert_eq!(listener["version"], json!(versions["LDS"]));
    let routes = find(&dump["route_configs"], "name", CATALOG_ROUTES);
    let vhost = &routes["virtual_hosts"][0];
    assert!(
        vhost["domains"]
            .as_array()
            .is_some_and(|d| d.contains(&json!("catalog"))),
        "{vhost:#}"
    );
    let beta = find(&vhost["routes"], "name", "beta-users");
    assert_eq!(
        beta["match"]["headers"],
        json!([{ "name": "x-user", "value": { "exact": "beta" }, "invert": false }])
    );
    let split = find(&vhost["routes"], "name", "split");
    assert_eq!(
        split["clusters"],
        json!([
            { "name": CATALOG_V1, "weight": 90 },
            { "name": CATALOG_V2, "weight": 10 },
        ])
    );
    let v1 = find(&dump["clusters"], "name", CATALOG_V1);
    assert_eq!(v1["lb_policy"], "ROUND_ROBIN");
    assert_eq!(v1["protocol"], "HTTP");
    find(&dump["clusters"], "name", CATALOG_V2);
    let v1_endpoints = find(&dump["endpoints"], "cluster_name", CATALOG_V1);
    let locality = &v1_endpoints["localities"][0];
    assert_eq!(locality["locality"]["region"], "eu-west");
    assert_eq!(locality["locality"]["zone"], "eu-west-1a");
    assert_eq!(
        locality["endpoints"],
        json!([{ "address": "127.0.0.1:41001", "weight": 1, "labels": { "version": "v1" } }])
    );
    assert_eq!(dump["rejections"], json!([]));
    assert_eq!(dump["missing_listeners"], json!([]));

    // --- /metrics on the same port.
    let (code, _) = admin_request(addr, "GET", "/metrics", "").await;
    assert_eq!(code, 200);

    // --- CSDS over gRPC, same port: what grpcdebug asks.
    let mut csds = ClientStatusDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the admin port over gRPC");
    let response = csds
        .fetch_client_status(ClientStatusRequest::default())
        .await
        .expect("CSDS fetch")
        .into_inner();
    let [config] = response.config.as_slice() else {
        panic!("one client config expected: {response:#?}");
    };
    assert_eq!(config.node.as_ref().map(|n| n.id.as_str()), Some(NODE));
    let ours = generic(config);
    let control = control_versions(&mesh);
    for (t, name) in [
        ("LDS", "catalog"),
        ("RDS", CATALOG_ROUTES),
        ("CDS", CATALOG_V1),
        ("CDS", CATALOG_V2),
        ("EDS", CATALOG_V1),
        ("EDS", CATALOG_V2),
    ] {
        let Some((version, status, raw)) = ours.get(&(t.to_owned(), name.to_owned())) else {
            panic!("{t} {name} missing from CSDS: {:#?}", ours.keys());
        };
        assert_eq!(*status, ClientResourceStatus::Acked as i32, "{t} {name}");
        assert_eq!(
            Some(version),
            control.get(t).map(|(_, acked)| acked),
            "{t} {name}"
        );
        assert!(!raw.is_empty(), "{t} {name} has its resource");
    }
    assert!(
        ours.values()
            .all(|(_, status, _)| *status == ClientResourceStatus::Acked as i32),
        "{ours:#?}"
    );
    // The raw route config is the one that runs: 90/10.
    let rc = config
        .generic_xds_configs
        .iter()
        .find(|g| g.name == CATALOG_ROUTES)
        .and_then(|g| g.xds_config.as_ref())
        .map(|any| xds::decode_route_config(any).expect("a valid route config"))
        .expect("the route config");
    let weights: Vec<u32> = rc.virtual_hosts[0]
        .routes
        .iter()
        .find(|r| &*r.name == "split")
        .map(|r| r.action.clusters().iter().map(|c| c.weight).collect())
        .unwrap_or_default();
    assert_eq!(weights, [90, 10]);

    // The same tool asked mesh-control about this node: the same resources,
    // versions and bytes (what the service runs is what was sent).
    let mut control_csds =
        ClientStatusDiscoveryServiceClient::connect(format!("http://{}", mesh.xds_addr()))
            .await
            .expect("connect to mesh-control's CSDS");
    let request = ClientStatusRequest {
        node_matchers: vec![NodeMatcher {
            node_id: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(NODE.to_owned())),
                ..StringMatcher::default()
            }),
            ..NodeMatcher::default()
        }],
        ..ClientStatusRequest::default()
    };
    let from_control = control_csds
        .fetch_client_status(request)
        .await
        .expect("mesh-control CSDS fetch")
        .into_inner();
    let [control_config] = from_control.config.as_slice() else {
        panic!("mesh-control knows one {NODE}: {from_control:#?}");
    };
    let theirs: BTreeMap<_, _> = generic(control_config)
        .into_iter()
        .map(|(k, (version, _, raw))| (k, (version, raw)))
        .collect();
    let ours: BTreeMap<_, _> = ours
        .into_iter()
        .map(|(k, (version, _, raw))| (k, (version, raw)))
        .collect();
    assert_eq!(ours, theirs);

    // A streaming CSDS client gets an answer per request.
    let requests = tokio_stream::iter([
        ClientStatusRequest::default(),
        ClientStatusRequest::default(),
    ]);
    let mut stream = csds
        .stream_client_status(requests)
        .await
        .expect("CSDS stream")
        .into_inner();
    for _ in 0..2 {
        let r = stream
            .message()
            .await
            .expect("a stream response")
            .expect("not the end");
        assert_eq!(r.config.len(), 1);
        assert_eq!(
            r.config[0].node.as_ref().map(|n: &Node| n.id.as_str()),
            Some(NODE)
        );
    }

    admin.shutdown().await;
    mesh.shutdown().await;
}

#[tokio::test]
async fn an_admin_endpoint_without_metrics_says_so_and_unknown_pages_are_404() {
    let bootstrap = Bootstrap::builder("127.0.0.1:1", "lonely")
        .build()
        .expect("bootstrap");
    let xds = XdsClient::start(bootstrap);
    xds.subscribe("catalog");
    let admin = serve_admin(
        "127.0.0.1:0".parse().expect("addr"),
        AdminEndpoints::new(xds.clone()),
    )
    .await
    .expect("serve the admin endpoint");
    let addr = admin.local_addr();

    let (code, _) = admin_request(addr, "GET", "/metrics", "").await;
    assert_eq!(code, 404);
    let (code, _) = admin_request(addr, "GET", "/nope", "").await;
    assert_eq!(code, 404);
    // No control server answered: the dump says what is wanted and why not.
    eventually_named("the dump shows the requested listener", DEADLINE, || {
        xds.config_dump_json()["requested"] == json!([{ "type": "LDS", "name": "catalog" }])
    })
    .await;
    let (code, dump) = admin_request(addr, "GET", "/debug/mesh/config", "").await;
    assert_eq!(code, 200);
    assert_eq!(
        dump["requested"],
        json!([{ "type": "LDS", "name": "catalog" }])
    );
    assert_eq!(dump["listeners"], json!([]));
    assert_eq!(dump["control_server"]["servers"], json!(["127.0.0.1:1"]));
    // A gRPC service other than CSDS is UNIMPLEMENTED, as gRPC says.
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect over gRPC");
    let err = ads
        .stream_aggregated_resources(tokio_stream::empty())
        .await
        .expect_err("no ADS here");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
    admin.shutdown().await;
}
