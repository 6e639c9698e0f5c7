//! Unit tests of the ADS state machine: no runtime, no sockets.

use std::net::SocketAddr;

use mesh_core::model::Locality;
use mesh_core::route::RequestView;
use mesh_testkit::snapshot::xds::{bad_listener, cluster, listener, response};
use prost::Message as _;

use super::*;

/// Route config `name`: one route `default` for any host, split evenly over
/// `clusters`.
fn route_config(name: &str, clusters: &[&str]) -> Any {
    let weighted: Vec<(&str, u32)> = clusters.iter().map(|c| (*c, 1)).collect();
    mesh_testkit::snapshot::xds::route_config(name, &["*"], "default", &weighted)
}

/// One endpoint on 127.0.0.1:`port`, no locality, no labels.
fn endpoints(name: &str, port: u16) -> Any {
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    mesh_testkit::snapshot::xds::endpoints(name, address, Locality::default(), &[])
}

fn node() -> Node {
    crate::Bootstrap::builder("127.0.0.1:1", "test-node")
        .build()
        .unwrap()
        .node()
}

fn names(req: &DiscoveryRequest) -> Vec<&str> {
    req.resource_names.iter().map(String::as_str).collect()
}

fn kind_of(req: &DiscoveryRequest) -> ResourceType {
    ResourceType::from_type_url(&req.type_url).unwrap()
}

/// Drives a full cascade for listener `a` → `rc-a` → `c1` → `c1` (EDS).
fn synced() -> AdsState {
    let mut s = AdsState::new(node()).keep_raw(true);
    s.subscribe("a");
    s.on_connected();
    s.on_response(response(
        ResourceType::Listener,
        "l1",
        "n1",
        vec![listener("a", "rc-a")],
    ));
    s.on_response(response(
        ResourceType::RouteConfig,
        "r1",
        "n2",
        vec![route_config("rc-a", &["c1"])],
    ));
    s.on_response(response(
        ResourceType::Cluster,
        "c1",
        "n3",
        vec![cluster("c1", "c1")],
    ));
    s.on_response(response(
        ResourceType::Endpoints,
        "e1",
        "n4",
        vec![endpoints("c1", 8080)],
    ));
    s
}

#[test]
fn nothing_is_sent_before_a_stream_and_initial_requests_have_no_nonce() {
    let mut s = AdsState::new(node());
    assert!(s.subscribe("a"));
    assert!(!s.subscribe("a"), "subscribing twice is a no-op");
    assert!(s.pending_requests().is_empty(), "no stream yet");
    let reqs = s.on_connected();
    assert_eq!(reqs.len(), 1, "only LDS has a subscription");
    let r = &reqs[0];
    assert_eq!(kind_of(r), ResourceType::Listener);
    assert_eq!(names(r), ["a"]);
    assert_eq!(r.response_nonce, "");
    assert_eq!(r.version_info, "");
    assert!(r.error_detail.is_none());
    let n = r
        .node
        .as_ref()
        .expect("the first request of a stream carries the node");
    assert_eq!(n.id, "test-node");
    assert_eq!(n.user_agent_name, "proxyless-rust");

    assert!(s.subscribe("b"));
    let reqs = s.pending_requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(names(&reqs[0]), ["a", "b"]);
    assert!(reqs[0].node.is_none(), "node only on the first request");
    assert!(s.pending_requests().is_empty(), "drained");
}

#[test]
fn ack_carries_the_accepted_version_and_nonce_and_the_cascade_follows() {
    let mut s = AdsState::new(node());
    s.subscribe("a");
    s.on_connected();
    let reqs = s.on_response(response(
        ResourceType::Listener,
        "l1",
        "n1",
        vec![listener("a", "rc-a")],
    ));
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let ack = &reqs[0];
    assert_eq!(kind_of(ack), ResourceType::Listener);
    assert_eq!(ack.version_info, "l1");
    assert_eq!(ack.response_nonce, "n1");
    assert_eq!(names(ack), ["a"]);
    assert!(ack.error_detail.is_none());
    let rds = &reqs[1];
    assert_eq!(kind_of(rds), ResourceType::RouteConfig);
    assert_eq!(names(rds), ["rc-a"]);
    assert_eq!(rds.response_nonce, "", "first RDS request of the stream");
    assert_eq!(rds.version_info, "");

    let reqs = s.on_response(response(
        ResourceType::RouteConfig,
        "r1",
        "n2",
        vec![route_config("rc-a", &["c1", "c2"])],
    ));
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        (
            reqs[0].version_info.as_str(),
            reqs[0].response_nonce.as_str()
        ),
        ("r1", "n2")
    );
    assert_eq!(kind_of(&reqs[1]), ResourceType::Cluster);
    assert_eq!(names(&reqs[1]), ["c1", "c2"]);

    let reqs = s.on_response(response(
        ResourceType::Cluster,
        "c1",
        "n3",
        vec![cluster("c1", "eds-1"), cluster("c2", "eds-2")],
    ));
    assert_eq!(reqs.len(), 2);
    assert_eq!(kind_of(&reqs[1]), ResourceType::Endpoints);
    assert_eq!(names(&reqs[1]), ["eds-1", "eds-2"]);
    assert_eq!(readiness(s.snapshot(), s.status(), "a"), Readiness::Pending);

    let reqs = s.on_response(response(
        ResourceType::Endpoints,
        "e1",
        "n4",
        vec![endpoints("eds-1", 1)],
    ));
    assert_eq!(reqs.len(), 1, "an EDS ACK, no new subscription");
    assert_eq!(
        readiness(s.snapshot(), s.status(), "a"),
        Readiness::Pending,
        "eds-2 not yet"
    );
    let reqs = s.on_response(response(
        ResourceType::Endpoints,
        "e2",
        "n5",
        vec![endpoints("eds-2", 2)],
    ));
    assert_eq!(
        (
            reqs[0].version_info.as_str(),
            reqs[0].response_nonce.as_str()
        ),
        ("e2", "n5")
    );
    assert_eq!(readiness(s.snapshot(), s.status(), "a"), Readiness::Ready);
    assert!(
        s.snapshot().endpoints.contains_key("eds-1"),
        "EDS absence deletes nothing"
    );

    let (snap, _) = s.take_changes().expect("changes to publish");
    assert!(s.take_changes().is_none(), "published once");
    assert_eq!(&*snap.versions.listeners, "l1");
    assert_eq!(&*snap.versions.route_configs, "r1");
    assert_eq!(&*snap.versions.clusters, "c1");
    assert_eq!(&*snap.versions.endpoints, "e2");
    let ListenerLookup::Found(l) = snap.listener_for("a") else {
        panic!("listener a not found");
    };
    let (method, uri, headers) = (http_get(), "/x".parse().unwrap(), Default::default());
    let req = RequestView::new(&method, &uri, &headers, "a");
    let resolved = snap.resolve(l, &req, 0).unwrap();
    assert_eq!(&*resolved.cluster.name, "c1");
    assert_eq!(resolved.endpoints.endpoint_count(), 1);
}

fn http_get() -> http::Method {
    http::Method::GET
}

#[test]
fn a_partly_invalid_response_is_nacked_but_its_valid_resources_are_used() {
    let mut s = AdsState::new(node());
    s.subscribe("good");
    s.subscribe("bad");
    s.on_connected();
    let reqs = s.on_response(response(
        ResourceType::Listener,
        "l1",
        "n1",
        vec![listener("good", "rc"), bad_listener("bad")],
    ));
    let nack = &reqs[0];
    assert_eq!(kind_of(nack), ResourceType::Listener);
    assert_eq!(
        nack.version_info, "",
        "nothing accepted before: version stays empty"
    );
    assert_eq!(nack.response_nonce, "n1");
    let status = nack.error_detail.as_ref().expect("a NACK has error_detail");
    assert_eq!(status.code, 3, "INVALID_ARGUMENT");
    assert!(status.message.contains("\"bad\""), "{}", status.message);
    assert!(!status.message.contains("\"good\""), "{}", status.message);
    // A46: the good listener is used and its cascade starts.
    assert!(s.snapshot().listeners.contains_key("good"));
    assert_eq!(names(&reqs[1]), ["rc"]);
    // The bad one is neither present nor missing: it is rejected.
    assert!(!s.snapshot().missing_listeners.contains("bad"));
    let Readiness::Rejected(why) = readiness(s.snapshot(), s.status(), "bad") else {
        panic!("bad listener should be rejected");
    };
    assert!(why.contains("\"bad\""), "{why}");
    assert_eq!(&*s.snapshot().versions.listeners, "");

    // Later: both valid → ACK v2; then an invalid update of "good" keeps its old version.
    let reqs = s.on_response(response(
        ResourceType::Listener,
        "l2",
        "n2",
        vec![listener("good", "rc"), listener("bad", "rc")],
    ));
    assert!(reqs[0].error_detail.is_none());
    assert_eq!(reqs[0].version_info, "l2");
    assert!(
        s.status()
            .rejection(ResourceType::Listener, "bad")
            .is_none()
    );
    let reqs = s.on_response(response(
        ResourceType::Listener,
        "l3",
        "n3",
        vec![bad_listener("good"), listener("bad", "rc")],
    ));
    assert_eq!(
        reqs[0].version_info, "l2",
        "NACK carries the last accepted version"
    );
    assert_eq!(reqs[0].response_nonce, "n3");
    assert!(reqs[0].error_detail.is_some());
    assert_eq!(
        &*s.snapshot().listeners["good"].route_config_name,
        "rc",
        "old version kept"
    );
    assert!(
        !s.snapshot().missing_listeners.contains("good"),
        "invalid is not absent"
    );
    assert_eq!(&*s.snapshot().versions.listeners, "l2");
}

#[test]
fn an_undecodable_resource_is_named_by_position_and_blocks_deletion() {
    let mut s = synced();
    let garbage = Any {
        type_url: xds::LISTENER_TYPE.to_owned(),
        value: vec![0xff, 0xff, 0xff],
    };
    let reqs = s.on_response(response(ResourceType::Listener, "l2", "n9", vec![garbage]));
    let status = reqs[0].error_detail.as_ref().unwrap();
    assert!(
        status.message.contains("resources[0]"),
        "{}",
        status.message
    );
    assert!(
        s.snapshot().listeners.contains_key("a"),
        "absence proves nothing here"
    );
    assert_eq!(reqs[0].version_info, "l1");
}

#[test]
fn a_not_found_resource_error_says_why_the_listener_is_missing() {
    use envoy_types::pb::envoy::service::discovery::v3::{ResourceError, ResourceName};
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    let error = |name: &str, code: i32, message: &str| ResourceError {
        resource_name: Some(ResourceName {
            name: name.to_owned(),
            ..ResourceName::default()
        }),
        error_detail: Some(RpcStatus {
            code,
            message: message.to_owned(),
            ..RpcStatus::default()
        }),
    };
    let mut s = AdsState::new(node());
    s.subscribe("hidden");
    s.subscribe("other");
    s.on_connected();
    // A response with an unnamed bad resource proves nothing by absence,
    // but an explicit NOT_FOUND entry does; another code is not acted on.
    let garbage = Any {
        type_url: xds::LISTENER_TYPE.to_owned(),
        value: vec![0xff, 0xff, 0xff],
    };
    let mut resp = response(ResourceType::Listener, "l1", "n1", vec![garbage]);
    resp.resource_errors = vec![
        error("hidden", 5, "not exported to namespace \"web\""),
        error("other", 14, "try later"),
    ];
    s.on_response(resp);
    assert_eq!(
        readiness(s.snapshot(), s.status(), "hidden"),
        Readiness::Missing(Some("not exported to namespace \"web\"".to_owned()))
    );
    assert_eq!(
        readiness(s.snapshot(), s.status(), "other"),
        Readiness::Pending
    );
    // It appears: the reason goes with the absence.
    s.on_response(response(
        ResourceType::Listener,
        "l2",
        "n2",
        vec![listener("hidden", "rc")],
    ));
    assert_eq!(s.status().absence(ResourceType::Listener, "hidden"), None);
}

#[test]
fn a_listener_left_out_of_an_lds_response_is_missing_at_once() {
    let mut s = AdsState::new(node());
    s.subscribe("a");
    s.subscribe("nope");
    s.on_connected();
    s.on_response(response(
        ResourceType::Listener,
        "l1",
        "n1",
        vec![listener("a", "rc")],
    ));
    assert!(s.snapshot().missing_listeners.contains("nope"));
    assert_eq!(
        readiness(s.snapshot(), s.status(), "nope"),
        Readiness::Missing(None)
    );
    assert_eq!(readiness(s.snapshot(), s.status(), "a"), Readiness::Pending);
    // It appears later: no longer missing.
    s.on_response(response(
        ResourceType::Listener,
        "l2",
        "n2",
        vec![listener("a", "rc"), listener("nope", "rc")],
    ));
    assert!(!s.snapshot().missing_listeners.contains("nope"));
    // And is deleted again, with its route config when nothing else uses it.
    s.on_response(response(ResourceType::Listener, "l3", "n3", vec![]));
    assert!(s.snapshot().listeners.is_empty());
    assert!(s.snapshot().missing_listeners.contains("a"));
    assert!(s.subscription(ResourceType::RouteConfig).is_empty());
}

#[test]
fn a_name_subscribed_after_the_answered_request_is_not_declared_missing() {
    let mut s = AdsState::new(node());
    s.subscribe("a");
    s.on_connected();
    s.subscribe("b"); // sent before the server answered the first request
    assert_eq!(s.pending_requests().len(), 1);
    // The answer to the first request ({a}) lacks b: proves nothing about b.
    s.on_response(response(
        ResourceType::Listener,
        "l1",
        "n1",
        vec![listener("a", "rc")],
    ));
    assert!(!s.snapshot().missing_listeners.contains("b"));
    // The answer to the second request ({a, b}) lacks b: b does not exist.
    s.on_response(response(
        ResourceType::Listener,
        "l1",
        "n2",
        vec![listener("a", "rc")],
    ));
    assert!(s.snapshot().missing_listeners.contains("b"));
}

#[test]
fn a_response_naming_the_newer_subscription_answers_it() {
    let mut s = AdsState::new(node());
    s.subscribe("a");
    s.subscribe("c");
    s.on_connected();
    s.subscribe("b");
    // The server coalesced both requests: it names b, so it saw {a, b, c}.
    s.on_response(response(
        ResourceType::Listener,
        "l1",
        "n1",
        vec![listener("b", "rc")],
    ));
    assert!(s.snapshot().missing_listeners.contains("a"));
    assert!(s.snapshot().missing_listeners.contains("c"));
}

#[test]
fn a_cluster_left_out_of_a_cds_response_is_removed_and_settled() {
    let mut s = synced();
    let reqs = s.on_response(response(
        ResourceType::RouteConfig,
        "r2",
        "n5",
        vec![route_config("rc-a", &["c1", "c2"])],
    ));
    assert_eq!(names(&reqs[1]), ["c1", "c2"]);
    let reqs = s.on_response(response(
        ResourceType::Cluster,
        "c2",
        "n6",
        vec![cluster("c1", "c1")],
    ));
    assert!(reqs[0].error_detail.is_none());
    assert!(s.status().is_cluster_missing("c2"));
    assert_eq!(readiness(s.snapshot(), s.status(), "a"), Readiness::Ready);
    // c1 now left out too: removed, and its endpoints unsubscribed and dropped.
    let reqs = s.on_response(response(ResourceType::Cluster, "c3", "n7", vec![]));
    assert!(s.snapshot().clusters.is_empty());
    assert!(s.snapshot().endpoints.is_empty());
    let eds = reqs
        .iter()
        .find(|r| kind_of(r) == ResourceType::Endpoints)
        .unwrap();
    assert!(eds.resource_names.is_empty(), "unsubscribe all EDS");
}

#[test]
fn rds_absence_deletes_nothing() {
    let mut s = synced();
    s.on_response(response(ResourceType::RouteConfig, "r2", "n5", vec![]));
    assert!(s.snapshot().route_configs.contains_key("rc-a"));
    assert_eq!(readiness(s.snapshot(), s.status(), "a"), Readiness::Ready);
}

#[test]
fn ignore_resource_deletion_keeps_received_listeners() {
    let mut s = AdsState::new(node()).ignore_resource_deletion(true);
    s.subscribe("a");
    s.subscribe("never");
    s.on_connected();
    s.on_response(response(
        ResourceType::Listener,
        "l1",
        "n1",
        vec![listener("a", "rc")],
    ));
    s.on_response(response(ResourceType::Listener, "l2", "n2", vec![]));
    assert!(s.snapshot().listeners.contains_key("a"));
    assert!(
        s.snapshot().missing_listeners.contains("never"),
        "never received: missing"
    );
}

#[test]
fn reconnect_resends_every_subscription_with_its_version_and_no_nonce() {
    let mut s = synced();
    s.on_disconnected();
    assert!(!s.subscribe("a"));
    s.subscribe("z");
    assert!(s.pending_requests().is_empty(), "no stream");
    let reqs = s.on_connected();
    let got: Vec<(ResourceType, Vec<&str>, &str, &str)> = reqs
        .iter()
        .map(|r| {
            (
                kind_of(r),
                names(r),
                r.version_info.as_str(),
                r.response_nonce.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (ResourceType::Listener, vec!["a", "z"], "l1", ""),
            (ResourceType::RouteConfig, vec!["rc-a"], "r1", ""),
            (ResourceType::Cluster, vec!["c1"], "c1", ""),
            (ResourceType::Endpoints, vec!["c1"], "e1", ""),
        ]
    );
    assert!(reqs[0].node.is_some());
    assert!(reqs[1..].iter().all(|r| r.node.is_none()));
    // The old config is still served while reconnecting.
    assert_eq!(readiness(s.snapshot(), s.status(), "a"), Readiness::Ready);
}

#[test]
fn resources_no_longer_referenced_are_unsubscribed_and_dropped() {
    let mut s = synced();
    let reqs = s.on_response(response(
        ResourceType::Listener,
        "l2",
        "n5",
        vec![listener("a", "rc-b")],
    ));
    let rds = &reqs[1];
    assert_eq!(kind_of(rds), ResourceType::RouteConfig);
    assert_eq!(names(rds), ["rc-b"]);
    assert_eq!(
        rds.version_info, "r1",
        "a subscription change carries the current version"
    );
    assert_eq!(rds.response_nonce, "n2", "and the latest nonce of its type");
    assert!(s.snapshot().route_configs.is_empty(), "rc-a dropped");
    // Its clusters and endpoints go with it.
    let kinds: Vec<ResourceType> = reqs.iter().map(kind_of).collect();
    assert_eq!(
        kinds,
        [
            ResourceType::Listener,
            ResourceType::RouteConfig,
            ResourceType::Cluster,
            ResourceType::Endpoints
        ]
    );
    assert!(reqs[2].resource_names.is_empty() && reqs[3].resource_names.is_empty());
    assert!(s.snapshot().clusters.is_empty() && s.snapshot().endpoints.is_empty());
    // Resources of names not subscribed are ignored.
    s.on_response(response(
        ResourceType::RouteConfig,
        "r2",
        "n6",
        vec![route_config("rc-b", &["c9"]), route_config("rc-a", &["c1"])],
    ));
    assert!(s.snapshot().route_configs.contains_key("rc-b"));
    assert!(!s.snapshot().route_configs.contains_key("rc-a"));
}

#[test]
fn unknown_types_and_unasked_responses_are_ignored() {
    let mut s = AdsState::new(node());
    s.subscribe("a");
    s.on_connected();
    let mut r = response(ResourceType::Listener, "x", "n", vec![]);
    r.type_url = "type.googleapis.com/envoy.Nope".into();
    assert!(s.on_response(r).is_empty());
    assert!(
        s.on_response(response(ResourceType::Cluster, "x", "n", vec![]))
            .is_empty()
    );
    assert!(!s.has_received());
}

#[test]
fn a_resource_of_the_wrong_type_is_nacked() {
    let mut s = AdsState::new(node());
    s.subscribe("a");
    s.on_connected();
    let reqs = s.on_response(response(
        ResourceType::Listener,
        "l1",
        "n1",
        vec![cluster("a", "a")],
    ));
    let msg = &reqs[0].error_detail.as_ref().unwrap().message;
    assert!(msg.contains("envoy.config.cluster.v3.Cluster"), "{msg}");
}

/// An EDS resource named `name` that decoding rejects (a locality without
/// a weight).
fn bad_endpoints(name: &str) -> Any {
    use envoy_types::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, LocalityLbEndpoints,
    };
    let cla = ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(Default::default()),
            ..Default::default()
        }],
        ..Default::default()
    };
    Any {
        type_url: xds::ENDPOINT_TYPE.into(),
        value: cla.encode_to_vec(),
    }
}

#[test]
fn a_resource_sent_again_unchanged_keeps_its_model_and_takes_the_new_version() {
    let mut s = synced();
    let held = s.snapshot().endpoints["c1"].clone();
    let entry = |s: &AdsState| {
        s.resource_report()
            .get(ResourceType::Endpoints, "c1")
            .unwrap()
            .clone()
    };
    assert_eq!(entry(&s).accepted.unwrap().version, "e1");
    s.take_changes();

    // The same bytes in a new version: the model held stays (the same
    // allocation), the version moves on, and the response is ACKed.
    let reqs = s.on_response(response(
        ResourceType::Endpoints,
        "e2",
        "n5",
        vec![endpoints("c1", 8080)],
    ));
    assert!(reqs[0].error_detail.is_none());
    assert_eq!(reqs[0].version_info, "e2");
    assert!(Arc::ptr_eq(&s.snapshot().endpoints["c1"], &held));
    assert_eq!(entry(&s).accepted.unwrap().version, "e2");
    let (snapshot, _) = s.take_changes().expect("the version changed");
    assert_eq!(&*snapshot.versions.endpoints, "e2");

    // Again in the same version: nothing to publish.
    s.on_response(response(
        ResourceType::Endpoints,
        "e2",
        "n6",
        vec![endpoints("c1", 8080)],
    ));
    assert!(s.take_changes().is_none());

    // A rejected update keeps the model held; the accepted bytes sent
    // again clear the rejection.
    let reqs = s.on_response(response(
        ResourceType::Endpoints,
        "e3",
        "n7",
        vec![bad_endpoints("c1")],
    ));
    assert!(reqs[0].error_detail.is_some());
    assert_eq!(entry(&s).status, ResourceStatus::Nacked);
    assert!(
        s.status()
            .rejection(ResourceType::Endpoints, "c1")
            .is_some()
    );
    assert!(Arc::ptr_eq(&s.snapshot().endpoints["c1"], &held));
    let reqs = s.on_response(response(
        ResourceType::Endpoints,
        "e4",
        "n8",
        vec![endpoints("c1", 8080)],
    ));
    assert!(reqs[0].error_detail.is_none());
    assert_eq!(entry(&s).status, ResourceStatus::Acked);
    assert!(
        s.status()
            .rejection(ResourceType::Endpoints, "c1")
            .is_none()
    );
    assert!(Arc::ptr_eq(&s.snapshot().endpoints["c1"], &held));

    // Changed bytes: a new model.
    s.on_response(response(
        ResourceType::Endpoints,
        "e5",
        "n9",
        vec![endpoints("c1", 9090)],
    ));
    let now = &s.snapshot().endpoints["c1"];
    assert!(!Arc::ptr_eq(now, &held));
    assert_eq!(now.localities[0].endpoints[0].address.port(), 9090);
}

#[test]
fn a_held_resource_listed_twice_is_still_nacked() {
    let mut s = synced();
    let reqs = s.on_response(response(
        ResourceType::Endpoints,
        "e2",
        "n5",
        vec![endpoints("c1", 8080), endpoints("c1", 8080)],
    ));
    let nack = reqs[0].error_detail.as_ref().expect("a NACK");
    assert!(nack.message.contains("listed twice"), "{}", nack.message);
}

/// What the cache file holds: the responses, each length-delimited.
fn length_delimited(responses: &[DiscoveryResponse]) -> Vec<u8> {
    responses
        .iter()
        .flat_map(|r| r.encode_length_delimited_to_vec())
        .collect()
}

#[test]
fn the_raw_config_encodes_to_the_bytes_of_the_cached_responses() {
    let s = synced();
    let raw = s.raw_config();
    let mut bytes = Vec::new();
    raw.encode_length_delimited(&mut bytes);
    assert_eq!(bytes, length_delimited(&s.cached_responses()));
    assert_eq!(bytes.len(), raw.encoded_len());

    // Versions are not taken over from a cache: empty strings are left out,
    // as prost leaves them out.
    let mut fresh = AdsState::new(node()).keep_raw(true);
    fresh.load_cached(s.cached_responses());
    let cached = fresh.cached_responses();
    assert!(cached.iter().all(|r| r.version_info.is_empty()));
    let mut bytes = Vec::new();
    fresh.raw_config().encode_length_delimited(&mut bytes);
    assert_eq!(bytes, length_delimited(&cached));

    let nothing = AdsState::new(node()).keep_raw(true).raw_config();
    assert!(nothing.is_empty());
    assert_eq!(nothing.encoded_len(), 0);
}

#[test]
fn the_cache_round_trips_accepted_resources() {
    let s = synced();
    let cached = s.cached_responses();
    assert_eq!(cached.len(), 4);
    let mut fresh = AdsState::new(node());
    assert_eq!(fresh.load_cached(cached), 4);
    assert_eq!(
        readiness(fresh.snapshot(), fresh.status(), "a"),
        Readiness::Ready
    );
    assert_eq!(
        fresh
            .listener_names()
            .iter()
            .map(|n| &**n)
            .collect::<Vec<_>>(),
        ["a"]
    );
    let reqs = fresh.on_connected();
    assert_eq!(reqs.len(), 4);
    assert!(
        reqs.iter().all(|r| r.version_info.is_empty()),
        "the server sends everything"
    );
    assert!(fresh.take_changes().is_some());
}

// ---------------------------------------------------------------------------
// Server listeners (gRFC A36).

const SERVER: &str = "grpc/server?xds.resource.listening_address=10.0.0.7:8080";

fn server_model(mtls: mesh_core::model::MtlsMode) -> ServerListener {
    use mesh_core::rbac::{Action, AuthorizationPolicy, Operation, Rule};
    let deny = AuthorizationPolicy::new(
        "shop",
        "deny-admin",
        Action::Deny,
        vec![Rule {
            to: vec![Operation {
                paths: vec![mesh_core::rbac::StringMatch::parse("/admin*").unwrap()].into(),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        }],
    )
    .unwrap();
    ServerListener {
        name: SERVER.into(),
        address: "10.0.0.7:8080".parse().unwrap(),
        mtls,
        policies: vec![deny].into(),
        rate_limit: None,
        cors: Default::default(),
    }
}

fn server_listener(mtls: mesh_core::model::MtlsMode) -> Any {
    xds::encode_server_listener(&server_model(mtls))
}

#[test]
fn server_listeners_are_held_apart_and_reference_nothing() {
    use mesh_core::model::MtlsMode;
    let mut s = AdsState::new(node()).keep_raw(true);
    s.subscribe("a");
    s.subscribe(SERVER);
    let reqs = s.on_connected();
    assert_eq!(names(&reqs[0]), ["a", SERVER]);
    let reqs = s.on_response(response(
        ResourceType::Listener,
        "l1",
        "n1",
        vec![listener("a", "rc-a"), server_listener(MtlsMode::Strict)],
    ));
    // ACK, and RDS only for the client listener's route config.
    assert!(reqs[0].error_detail.is_none(), "{reqs:?}");
    assert_eq!(s.subscription(ResourceType::RouteConfig).len(), 1);
    assert!(s.subscription(ResourceType::RouteConfig).contains("rc-a"));
    let snap = s.snapshot();
    assert_eq!(
        snap.server_listeners.get(SERVER).map(|l| (**l).clone()),
        Some(server_model(MtlsMode::Strict))
    );
    assert!(!snap.listeners.contains_key(SERVER));
    assert!(snap.listeners.contains_key("a"));
    assert_eq!(readiness(snap, s.status(), SERVER), Readiness::Ready);
    assert!(s.take_changes().is_some());

    // The report (CSDS, dump) has it, ACKED, in raw form.
    let report = s.resource_report();
    let entry = report.get(ResourceType::Listener, SERVER).unwrap();
    assert_eq!(entry.status, ResourceStatus::Acked);
    assert_eq!(
        entry.accepted.as_ref().unwrap().any,
        server_listener(MtlsMode::Strict)
    );
    let dump = crate::dump::config_dump(s.snapshot(), &report);
    assert_eq!(dump["server_listeners"][0]["mtls"], "STRICT");
    assert_eq!(dump["server_listeners"][0]["address"], "10.0.0.7:8080");
    assert_eq!(
        dump["server_listeners"][0]["policies"][0]["id"],
        "shop/deny-admin"
    );
    assert_eq!(dump["server_listeners"][0]["status"], "ACKED");

    // An update changes the mode; the same content is no change.
    s.on_response(response(
        ResourceType::Listener,
        "l2",
        "n2",
        vec![listener("a", "rc-a"), server_listener(MtlsMode::Permissive)],
    ));
    assert_eq!(
        s.snapshot().server_listeners[SERVER].mtls,
        MtlsMode::Permissive
    );
    assert!(s.take_changes().is_some());
    s.on_response(response(
        ResourceType::Listener,
        "l2",
        "n3",
        vec![listener("a", "rc-a"), server_listener(MtlsMode::Permissive)],
    ));
    assert!(s.take_changes().is_none());

    // The cache round trips it.
    let mut fresh = AdsState::new(node());
    fresh.load_cached(s.cached_responses());
    assert_eq!(
        fresh.snapshot().server_listeners[SERVER].mtls,
        MtlsMode::Permissive
    );
    assert!(fresh.listener_names().contains(SERVER));
}

#[test]
fn a_server_listener_left_out_is_missing_and_a_bad_one_is_nacked() {
    use mesh_core::model::MtlsMode;
    let mut s = AdsState::new(node());
    s.subscribe(SERVER);
    s.on_connected();
    // Not there: does not exist.
    s.on_response(response(ResourceType::Listener, "l1", "n1", vec![]));
    assert!(s.snapshot().missing_listeners.contains(SERVER));
    assert_eq!(
        readiness(s.snapshot(), s.status(), SERVER),
        Readiness::Missing(None)
    );
    assert_eq!(
        s.resource_report()
            .get(ResourceType::Listener, SERVER)
            .unwrap()
            .status,
        ResourceStatus::DoesNotExist
    );
    // Arrives.
    s.on_response(response(
        ResourceType::Listener,
        "l2",
        "n2",
        vec![server_listener(MtlsMode::Disable)],
    ));
    assert!(!s.snapshot().missing_listeners.contains(SERVER));
    assert_eq!(
        s.snapshot().server_listeners[SERVER].mtls,
        MtlsMode::Disable
    );
    // An update it cannot honor: NACKed naming the field; the last good
    // version stays in use.
    let mut bad = xds::server_listener_to_proto(&server_model(MtlsMode::Strict));
    bad.filter_chains[0]
        .filter_chain_match
        .get_or_insert_with(Default::default)
        .server_names = vec!["x".into()];
    let reqs = s.on_response(response(
        ResourceType::Listener,
        "l3",
        "n3",
        vec![Any {
            type_url: xds::LISTENER_TYPE.into(),
            value: bad.encode_to_vec(),
        }],
    ));
    let nack = reqs[0].error_detail.as_ref().expect("a NACK");
    assert_eq!(reqs[0].version_info, "l2");
    assert!(
        nack.message.contains(&format!(
            "LDS resource {SERVER:?}: Listener {SERVER:?}: filter_chains[0].filter_chain_match.server_names"
        )),
        "{}",
        nack.message
    );
    assert_eq!(
        s.snapshot().server_listeners[SERVER].mtls,
        MtlsMode::Disable
    );
    assert_eq!(
        s.resource_report()
            .get(ResourceType::Listener, SERVER)
            .unwrap()
            .status,
        ResourceStatus::Nacked
    );
    // Deleted: gone and missing.
    s.on_response(response(ResourceType::Listener, "l4", "n4", vec![]));
    assert!(s.snapshot().server_listeners.is_empty());
    assert!(s.snapshot().missing_listeners.contains(SERVER));
}
