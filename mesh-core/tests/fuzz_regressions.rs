//! Inputs the fuzz targets in `fuzz/` found to crash, kept as tests so the
//! fix stays. Each test replays the minimized input through the same public
//! API the target called and checks what a user would see instead of the
//! panic.

use std::sync::Arc;

use http::HeaderMap;
use mesh_core::model::{Route, RouteConfig, RouteMatch, VirtualHost, WeightedClusters};
use mesh_core::route::RequestView;

fn config(domains: &[&str]) -> RouteConfig {
    RouteConfig {
        name: "rc".into(),
        virtual_hosts: Arc::from([VirtualHost {
            name: "vh".into(),
            domains: domains.iter().map(|d| Arc::from(*d)).collect(),
            routes: Arc::from([Route {
                name: "default".into(),
                matcher: RouteMatch::any(),
                action: WeightedClusters::single("c"),
                policy: Default::default(),
            }]),
        }]),
    }
}

/// fuzz target `route_match`: a `*suffix` domain against a host whose
/// suffix of that byte length starts inside a multi-byte character sliced
/// the host off a character boundary and panicked. Such a host matches no
/// ASCII suffix; the lookup goes on to the other domains.
#[test]
fn suffix_domain_against_a_non_ascii_host_does_not_panic() {
    let headers = HeaderMap::new();
    let host = "\u{e9}"; // 'é', two bytes
    let req = RequestView {
        method: "GET",
        authority: host,
        scheme: "http",
        path: "/",
        query: None,
        headers: &headers,
    };
    assert!(config(&["*a"]).find(host, &req).is_none());
    let fallback = config(&["*a", "*"]);
    let found = fallback.virtual_host(host).map(|vh| &*vh.name);
    assert_eq!(found, Some("vh"));
    // A suffix that does match a non-ASCII host still wins.
    let req = RequestView {
        authority: "caf\u{e9}.example",
        ..req
    };
    assert!(
        config(&["*\u{e9}.example"])
            .find("caf\u{e9}.example", &req)
            .is_some()
    );
}

/// fuzz target `xds_route_config`: a route whose `retry_policy` says
/// `num_retries: 0` decoded to a policy of zero retries, which the encoder
/// writes as no policy, so the control server would serve something other
/// than what the client validated (a decoded route differed from its own
/// re-encoding). Zero retries now decode as no retry policy, on a route and
/// on a virtual host; a route's still overrides its virtual host's.
#[test]
fn zero_retries_decode_as_no_retry_policy_and_round_trip() {
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::config::route::v3::route::Action;
    use envoy_types::pb::google::protobuf::UInt32Value;
    use mesh_core::model::RetryPolicy;
    use mesh_core::xds::{decode_route_config, encode_route_config};
    use prost::Message;

    let mut rc = config(&["*"]);
    let mut vh = rc.virtual_hosts[0].clone();
    let mut route = vh.routes[0].clone();
    route.policy.retry = Some(RetryPolicy::istio_default());
    vh.routes = Arc::from([route]);
    rc.virtual_hosts = Arc::from([vh]);
    let mut proto = RouteConfiguration::decode(encode_route_config(&rc).value.as_slice()).unwrap();
    let vh_proto = &mut proto.virtual_hosts[0];
    let Some(Action::Route(action)) = vh_proto.routes[0].action.as_mut() else {
        panic!("a route action");
    };
    let retry = action.retry_policy.as_mut().expect("a retry policy");
    retry.num_retries = Some(UInt32Value { value: 0 });
    // The virtual host retries, the route says zero: the route wins.
    let mut vh_retry = retry.clone();
    vh_retry.num_retries = Some(UInt32Value { value: 3 });
    vh_proto.retry_policy = Some(vh_retry);
    let any = mesh_core::xds::Any {
        type_url: mesh_core::xds::ROUTE_CONFIG_TYPE.to_string(),
        value: proto.encode_to_vec(),
    };
    let decoded = decode_route_config(&any).unwrap();
    assert_eq!(decoded.virtual_hosts[0].routes[0].policy.retry, None);
    let again = decode_route_config(&encode_route_config(&decoded)).unwrap();
    assert_eq!(again, decoded);
}
