//! CSDS and the config dump, driven through the sans-io state machine.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::status::v3::client_config::GenericXdsConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::NodeMatcher;
use mesh_core::model::Locality;
use mesh_core::xds::{Any, ResourceType};
use mesh_testkit::snapshot::xds::{bad_listener, cluster, listener, response, route_config};
use serde_json::json;

use super::*;
use crate::dump::{config_dump, rfc3339};
use crate::state::AdsState;
use crate::{Bootstrap, ClientOptions};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// One endpoint on 127.0.0.1:`port` in `eu`/`eu-1`, labelled `version: v1` (what
/// the dump shows of an endpoint).
fn endpoints(name: &str, port: u16) -> Any {
    let locality = Locality {
        region: "eu".into(),
        zone: "eu-1".into(),
        sub_zone: "".into(),
    };
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    mesh_testkit::snapshot::xds::endpoints(name, address, locality, &[("version", "v1")])
}

/// Route config `name`: one route `split` for any host over the weighted
/// `clusters`.
fn split(name: &str, clusters: &[(&str, u32)]) -> Any {
    route_config(name, &["*"], "split", clusters)
}

fn node() -> Node {
    Bootstrap::builder("127.0.0.1:1", "csds-node")
        .build()
        .unwrap()
        .node()
}

/// Listener `a` → `rc-a` → 90/10 over `c1`, `c2` → their endpoints, each
/// type accepted at second 100 + its position.
fn synced() -> AdsState {
    let mut s = AdsState::new(node()).keep_raw(true);
    s.subscribe("a");
    s.on_connected();
    s.on_response_at(
        response(
            ResourceType::Listener,
            "l1",
            "n1",
            vec![listener("a", "rc-a")],
        ),
        at(100),
    );
    s.on_response_at(
        response(
            ResourceType::RouteConfig,
            "r1",
            "n2",
            vec![split("rc-a", &[("c1", 90), ("c2", 10)])],
        ),
        at(101),
    );
    s.on_response_at(
        response(
            ResourceType::Cluster,
            "c1",
            "n3",
            vec![cluster("c1", "c1"), cluster("c2", "c2")],
        ),
        at(102),
    );
    s.on_response_at(
        response(
            ResourceType::Endpoints,
            "e1",
            "n4",
            vec![endpoints("c1", 8001), endpoints("c2", 8002)],
        ),
        at(103),
    );
    s
}

fn find<'a>(config: &'a ClientConfig, kind: ResourceType, name: &str) -> &'a GenericXdsConfig {
    config
        .generic_xds_configs
        .iter()
        .find(|g| g.type_url == kind.type_url() && g.name == name)
        .unwrap_or_else(|| panic!("no {kind} {name:?} in {config:#?}"))
}

fn status_of(g: &GenericXdsConfig) -> ClientResourceStatus {
    ClientResourceStatus::try_from(g.client_status).unwrap()
}

#[test]
fn accepted_resources_are_acked_with_their_raw_form_version_and_time() {
    let s = synced();
    let config = client_config(node(), &s.resource_report(), true);
    assert_eq!(config.node.as_ref().unwrap().id, "csds-node");
    assert_eq!(config.generic_xds_configs.len(), 6, "{config:#?}");

    let cases = [
        (
            ResourceType::Listener,
            "a",
            "l1",
            100,
            listener("a", "rc-a"),
        ),
        (
            ResourceType::RouteConfig,
            "rc-a",
            "r1",
            101,
            split("rc-a", &[("c1", 90), ("c2", 10)]),
        ),
        (ResourceType::Cluster, "c2", "c1", 102, cluster("c2", "c2")),
        (
            ResourceType::Endpoints,
            "c1",
            "e1",
            103,
            endpoints("c1", 8001),
        ),
    ];
    for (kind, name, version, secs, raw) in cases {
        let g = find(&config, kind, name);
        assert_eq!(status_of(g), ClientResourceStatus::Acked, "{g:?}");
        assert_eq!(g.version_info, version);
        assert_eq!(g.xds_config.as_ref(), Some(&raw), "{kind} {name}");
        assert_eq!(g.last_updated, Some(timestamp(at(secs))));
        assert!(g.error_state.is_none());
    }

    // exclude_resource_contents: statuses and versions, no resources.
    let bare = client_config(node(), &s.resource_report(), false);
    assert!(
        bare.generic_xds_configs
            .iter()
            .all(|g| g.xds_config.is_none())
    );
    assert_eq!(find(&bare, ResourceType::Listener, "a").version_info, "l1");
}

#[test]
fn a_rejected_update_is_nacked_with_the_reason_and_the_previous_version_stays() {
    let mut s = synced();
    s.subscribe("b");
    // v2 of `a` is invalid; `b` was never valid.
    s.on_response_at(
        response(
            ResourceType::Listener,
            "l2",
            "n5",
            vec![bad_listener("a"), bad_listener("b")],
        ),
        at(200),
    );
    let report = s.resource_report();
    let config = client_config(node(), &report, true);

    let a = find(&config, ResourceType::Listener, "a");
    assert_eq!(status_of(a), ClientResourceStatus::Nacked);
    // The accepted version is what still runs.
    assert_eq!(a.xds_config.as_ref(), Some(&listener("a", "rc-a")));
    assert_eq!(a.version_info, "l1");
    let err = a.error_state.as_ref().expect("error_state");
    assert_eq!(err.version_info, "l2");
    assert_eq!(err.last_update_attempt, Some(timestamp(at(200))));
    assert!(
        err.details.contains("LDS resource \"a\"") && err.details.contains("api_listener"),
        "{}",
        err.details
    );
    assert_eq!(err.failed_configuration.as_ref(), Some(&bad_listener("a")));

    let b = find(&config, ResourceType::Listener, "b");
    assert_eq!(status_of(b), ClientResourceStatus::Nacked);
    assert!(b.xds_config.is_none());
    assert_eq!(b.version_info, "");
    assert!(b.error_state.as_ref().unwrap().details.contains("\"b\""));

    // The dump says the same, for people.
    let dump = config_dump(s.snapshot(), &report);
    assert_eq!(dump["versions"]["LDS"], "l1");
    let rejections = dump["rejections"].as_array().unwrap();
    assert_eq!(rejections.len(), 2, "{dump:#}");
    assert_eq!(rejections[0]["name"], "a");
    assert_eq!(rejections[0]["version"], "l2");
    assert_eq!(rejections[0]["previous_version_in_use"], true);
    assert_eq!(rejections[0]["at"], rfc3339(at(200)));
    assert!(
        dump["type_rejections"]["LDS"]["details"]
            .as_str()
            .unwrap()
            .starts_with("LDS rejected (version \"l2\")"),
        "{dump:#}"
    );
    assert_eq!(dump["listeners"][0]["status"], "NACKED");

    // A valid update clears the rejection and the type's NACK.
    s.on_response_at(
        response(
            ResourceType::Listener,
            "l3",
            "n6",
            vec![listener("a", "rc-a"), listener("b", "rc-a")],
        ),
        at(300),
    );
    let report = s.resource_report();
    let config = client_config(node(), &report, true);
    for name in ["a", "b"] {
        let g = find(&config, ResourceType::Listener, name);
        assert_eq!(status_of(g), ClientResourceStatus::Acked);
        assert_eq!(g.version_info, "l3");
        assert!(g.error_state.is_none());
        assert_eq!(g.last_updated, Some(timestamp(at(300))));
    }
    assert!(report.type_rejection(ResourceType::Listener).is_none());
    let dump = config_dump(s.snapshot(), &report);
    assert_eq!(dump["rejections"], json!([]));
    assert_eq!(dump["type_rejections"], json!({}));
}

#[test]
fn missing_names_do_not_exist_and_unanswered_ones_are_requested() {
    let mut s = AdsState::new(node()).keep_raw(true);
    s.subscribe("a");
    s.subscribe("gone");
    s.on_connected();
    s.on_response_at(
        response(
            ResourceType::Listener,
            "l1",
            "n1",
            vec![listener("a", "rc-a")],
        ),
        at(100),
    );
    let config = client_config(node(), &s.resource_report(), true);
    let gone = find(&config, ResourceType::Listener, "gone");
    assert_eq!(status_of(gone), ClientResourceStatus::DoesNotExist);
    assert!(gone.xds_config.is_none());
    // RDS was asked for and not answered yet.
    let rc = find(&config, ResourceType::RouteConfig, "rc-a");
    assert_eq!(status_of(rc), ClientResourceStatus::Requested);
    assert_eq!(rc.version_info, "");
    assert!(rc.last_updated.is_none());

    // A cluster left out of a CDS response does not exist either.
    s.on_response_at(
        response(
            ResourceType::RouteConfig,
            "r1",
            "n2",
            vec![split("rc-a", &[("c1", 90), ("c2", 10)])],
        ),
        at(101),
    );
    s.on_response_at(
        response(ResourceType::Cluster, "c1", "n3", vec![cluster("c1", "c1")]),
        at(102),
    );
    let report = s.resource_report();
    let config = client_config(node(), &report, true);
    assert_eq!(
        status_of(find(&config, ResourceType::Cluster, "c2")),
        ClientResourceStatus::DoesNotExist
    );
    assert_eq!(
        status_of(find(&config, ResourceType::Cluster, "c1")),
        ClientResourceStatus::Acked
    );
    assert_eq!(
        status_of(find(&config, ResourceType::Endpoints, "c1")),
        ClientResourceStatus::Requested
    );

    let dump = config_dump(s.snapshot(), &report);
    assert_eq!(dump["missing_listeners"], json!(["gone"]));
    assert_eq!(dump["missing_clusters"], json!(["c2"]));
    assert_eq!(dump["requested"], json!([{ "type": "EDS", "name": "c1" }]));
}

#[test]
fn the_dump_renders_routes_weights_clusters_and_endpoints() {
    let s = synced();
    let dump = config_dump(s.snapshot(), &s.resource_report());
    assert_eq!(
        dump["versions"],
        json!({ "LDS": "l1", "RDS": "r1", "CDS": "c1", "EDS": "e1" })
    );
    assert_eq!(dump["listeners"][0]["name"], "a");
    assert_eq!(dump["listeners"][0]["route_config_name"], "rc-a");
    assert_eq!(dump["listeners"][0]["version"], "l1");
    assert_eq!(dump["listeners"][0]["status"], "ACKED");
    assert_eq!(dump["listeners"][0]["last_updated"], rfc3339(at(100)));
    let route = &dump["route_configs"][0]["virtual_hosts"][0]["routes"][0];
    assert_eq!(route["name"], "split");
    assert_eq!(route["match"]["path"], json!({ "prefix": "/" }));
    assert_eq!(
        route["clusters"],
        json!([{ "name": "c1", "weight": 90 }, { "name": "c2", "weight": 10 }])
    );
    assert_eq!(route["total_weight"], 100);
    assert_eq!(route["policy"]["timeout"], json!(null));
    let c1 = &dump["clusters"][0];
    assert_eq!(c1["name"], "c1");
    assert_eq!(c1["lb_policy"], "ROUND_ROBIN");
    assert_eq!(c1["protocol"], "HTTP");
    assert_eq!(c1["circuit_breakers"]["max_requests"], u32::MAX);
    assert_eq!(c1["outlier_detection"], json!(null));
    let e1 = &dump["endpoints"][0];
    assert_eq!(e1["cluster_name"], "c1");
    assert_eq!(e1["version"], "e1");
    assert_eq!(e1["last_updated"], rfc3339(at(103)));
    assert_eq!(dump["clusters"][1]["last_updated"], rfc3339(at(102)));
    assert_eq!(
        e1["localities"][0],
        json!({
            "locality": { "region": "eu", "zone": "eu-1", "sub_zone": "" },
            "weight": 1,
            "priority": 0,
            "endpoints": [{
                "address": "127.0.0.1:8001",
                "weight": 1,
                "labels": { "version": "v1" },
            }],
        })
    );
}

#[tokio::test]
async fn the_service_reports_this_node_and_refuses_node_matchers() {
    let bootstrap = Bootstrap::builder("127.0.0.1:1", "svc-1")
        .namespace("shop")
        .build()
        .unwrap();
    let xds = XdsClient::start_with(bootstrap, ClientOptions::default().listeners(["catalog"]));
    let service = CsdsService::new(xds.clone());

    let response = service
        .fetch_client_status(Request::new(ClientStatusRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response, xds.client_status());
    let [config] = response.config.as_slice() else {
        panic!("one config expected: {response:#?}");
    };
    assert_eq!(config.node.as_ref().unwrap().id, "svc-1");
    let g = find(config, ResourceType::Listener, "catalog");
    assert_eq!(status_of(g), ClientResourceStatus::Requested);

    let err = service
        .fetch_client_status(Request::new(ClientStatusRequest {
            node_matchers: vec![NodeMatcher::default()],
            ..ClientStatusRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("node_matchers"), "{}", err.message());

    let dump = xds.config_dump_json();
    assert_eq!(dump["node"]["id"], "svc-1");
    assert_eq!(dump["node"]["namespace"], "shop");
    assert_eq!(
        dump["requested"],
        json!([{ "type": "LDS", "name": "catalog" }])
    );
    assert_eq!(dump["control_server"]["servers"], json!(["127.0.0.1:1"]));
}
