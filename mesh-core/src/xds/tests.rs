//! Round trips (property tests) and the errors a NACK would carry.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster as ClusterProto, LoadBalancingPolicy, cluster::LbPolicy as LbEnum,
    load_balancing_policy::Policy,
};
use envoy_types::pb::envoy::config::core::v3::{HealthStatus, TypedExtensionConfig};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment as ClaProto;
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, RouteConfiguration, header_matcher::HeaderMatchSpecifier, route::Action,
    route_match::PathSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier, http_filter::ConfigType,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::RingHash;
use envoy_types::pb::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::ErrorKind;
use crate::model::{
    Endpoint, HeaderMatch, LbPolicy, Locality, LocalityEndpoints, Name, PathMatch, Pattern,
    Protocol, QueryParamMatch, Route, RouteMatch, ValueMatch, VirtualHost, WeightedCluster,
    WeightedClusters,
};

// ---------------------------------------------------------------------------
// Strategies

const REGEXES: &[&str] = &[
    "/api/.*",
    "[a-z]+",
    "v[0-9]+",
    "(foo|bar)/baz",
    ".*",
    "/items/[0-9]{1,6}",
];

fn name() -> impl Strategy<Value = Name> {
    "[a-z][a-z0-9.:-]{0,15}".prop_map(Name::from)
}

fn cluster_name() -> impl Strategy<Value = Name> {
    ("[0-9]{1,5}", "[a-z0-9]{0,3}", "[a-z][a-z0-9.]{0,20}")
        .prop_map(|(port, subset, host)| Name::from(format!("outbound|{port}|{subset}|{host}")))
}

fn text() -> impl Strategy<Value = Name> {
    "\\PC{0,12}".prop_map(Name::from)
}

fn pattern() -> impl Strategy<Value = Pattern> {
    proptest::sample::select(REGEXES).prop_map(|r| Pattern::new(r).unwrap())
}

fn value_match() -> impl Strategy<Value = ValueMatch> {
    prop_oneof![
        text().prop_map(ValueMatch::Exact),
        text().prop_map(ValueMatch::Prefix),
        pattern().prop_map(ValueMatch::Regex),
        any::<bool>().prop_map(ValueMatch::Present),
    ]
}

fn path_match() -> impl Strategy<Value = PathMatch> {
    prop_oneof![
        "/[a-z0-9/._-]{0,12}".prop_map(|p| PathMatch::Prefix(p.into())),
        "/[a-z0-9/._-]{0,12}".prop_map(|p| PathMatch::Exact(p.into())),
        pattern().prop_map(PathMatch::Regex),
    ]
}

fn header_match() -> impl Strategy<Value = HeaderMatch> {
    let header_name = prop_oneof![
        "[a-z][a-z0-9-]{0,10}".prop_map(Name::from),
        Just(Name::from(":method")),
        Just(Name::from(":authority")),
    ];
    (header_name, value_match(), any::<bool>()).prop_map(|(name, value, invert)| HeaderMatch {
        name,
        value,
        invert,
    })
}

fn query_param_match() -> impl Strategy<Value = QueryParamMatch> {
    ("[a-zA-Z][a-zA-Z0-9_]{0,8}", value_match()).prop_map(|(name, value)| QueryParamMatch {
        name: name.into(),
        value,
    })
}

fn route_match() -> impl Strategy<Value = RouteMatch> {
    (
        path_match(),
        vec(header_match(), 0..3),
        vec(query_param_match(), 0..3),
    )
        .prop_map(|(path, headers, query_params)| RouteMatch {
            path,
            headers: headers.into(),
            query_params: query_params.into(),
        })
}

fn weighted_clusters() -> impl Strategy<Value = WeightedClusters> {
    prop_oneof![
        cluster_name().prop_map(WeightedClusters::single),
        vec((cluster_name(), 1u32..1000), 1..5).prop_map(|v| {
            WeightedClusters::new(
                v.into_iter()
                    .map(|(name, weight)| WeightedCluster { name, weight })
                    .collect(),
            )
            .unwrap()
        }),
    ]
}

fn route() -> impl Strategy<Value = Route> {
    (
        prop_oneof![Just(Name::from("")), name()],
        route_match(),
        weighted_clusters(),
    )
        .prop_map(|(name, matcher, action)| Route {
            policy: Default::default(),
            name,
            matcher,
            action,
        })
}

fn domain() -> impl Strategy<Value = Name> {
    prop_oneof![
        "[a-z][a-z0-9.-]{0,20}(:[0-9]{1,5})?".prop_map(Name::from),
        Just(Name::from("*")),
        "\\*\\.[a-z]{1,8}".prop_map(Name::from),
    ]
}

fn virtual_host() -> impl Strategy<Value = VirtualHost> {
    (name(), vec(domain(), 1..4), vec(route(), 0..4)).prop_map(|(name, domains, routes)| {
        VirtualHost {
            name,
            domains: domains.into(),
            routes: routes.into(),
        }
    })
}

fn route_config() -> impl Strategy<Value = RouteConfig> {
    (name(), vec(virtual_host(), 0..3)).prop_map(|(name, vhs)| RouteConfig {
        name,
        virtual_hosts: vhs.into(),
    })
}

fn listener() -> impl Strategy<Value = Listener> {
    (name(), name()).prop_map(|(name, route_config_name)| Listener {
        name,
        route_config_name,
    })
}

fn cluster() -> impl Strategy<Value = Cluster> {
    let lb = prop_oneof![
        Just(LbPolicy::RoundRobin),
        Just(LbPolicy::LeastRequest),
        Just(LbPolicy::Random),
    ];
    let protocol = prop_oneof![
        Just(Protocol::Http1),
        Just(Protocol::Http2),
        Just(Protocol::Grpc),
    ];
    (cluster_name(), cluster_name(), lb, protocol).prop_map(
        |(name, eds_service_name, lb_policy, protocol)| Cluster {
            eds_service_name,
            lb_policy,
            ..Cluster::new(name, protocol)
        },
    )
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u16; 8]>().prop_map(IpAddr::from),
    ]
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (
        ip(),
        any::<u16>(),
        1u32..1000,
        btree_map("[a-z][a-z0-9_./-]{0,8}", "[a-zA-Z0-9_.-]{0,8}", 0..4),
    )
        .prop_map(|(ip, port, weight, labels)| Endpoint {
            address: SocketAddr::new(ip, port),
            weight,
            labels: labels
                .into_iter()
                .map(|(k, v)| (Name::from(k), Name::from(v)))
                .collect(),
        })
}

fn locality_endpoints() -> impl Strategy<Value = LocalityEndpoints> {
    (
        ("[a-z0-9-]{0,6}", "[a-z0-9-]{0,6}", "[a-z0-9-]{0,6}"),
        1u32..100_000,
        0u32..3,
        vec(endpoint(), 0..4),
    )
        .prop_map(|((region, zone, sub_zone), weight, priority, endpoints)| {
            LocalityEndpoints {
                locality: Locality {
                    region: region.into(),
                    zone: zone.into(),
                    sub_zone: sub_zone.into(),
                },
                weight,
                priority,
                endpoints: endpoints.into(),
            }
        })
}

fn cla() -> impl Strategy<Value = ClusterLoadAssignment> {
    (cluster_name(), vec(locality_endpoints(), 0..4)).prop_map(|(name, localities)| {
        // Addresses must be unique across the whole assignment.
        let mut seen = HashSet::new();
        let localities = localities
            .into_iter()
            .map(|mut l| {
                l.endpoints = l
                    .endpoints
                    .iter()
                    .filter(|e| seen.insert(e.address))
                    .cloned()
                    .collect();
                l
            })
            .collect();
        ClusterLoadAssignment::new(name, localities).unwrap()
    })
}

/// The `Any` after a trip through protobuf bytes, as it crosses the network.
fn over_the_wire(any: &Any) -> Any {
    Any::decode(any.encode_to_vec().as_slice()).unwrap()
}

proptest! {
    #[test]
    fn listener_round_trips(l in listener()) {
        let any = encode_listener(&l);
        prop_assert_eq!(&any.type_url, LISTENER_TYPE);
        prop_assert_eq!(resource_name(&any), Some(l.name.to_string()));
        prop_assert_eq!(&decode_listener(&any).unwrap(), &l);
        prop_assert_eq!(&decode_listener(&over_the_wire(&any)).unwrap(), &l);
        prop_assert_eq!(&listener_from_proto(&listener_to_proto(&l)).unwrap(), &l);
    }

    #[test]
    fn route_config_round_trips(rc in route_config()) {
        let any = encode_route_config(&rc);
        prop_assert_eq!(&any.type_url, ROUTE_CONFIG_TYPE);
        prop_assert_eq!(resource_name(&any), Some(rc.name.to_string()));
        prop_assert_eq!(&decode_route_config(&any).unwrap(), &rc);
        prop_assert_eq!(&decode_route_config(&over_the_wire(&any)).unwrap(), &rc);
        prop_assert_eq!(&route_config_from_proto(&route_config_to_proto(&rc)).unwrap(), &rc);
    }

    #[test]
    fn cluster_round_trips(c in cluster()) {
        let any = encode_cluster(&c);
        prop_assert_eq!(&any.type_url, CLUSTER_TYPE);
        prop_assert_eq!(resource_name(&any), Some(c.name.to_string()));
        prop_assert_eq!(&decode_cluster(&any).unwrap(), &c);
        prop_assert_eq!(&decode_cluster(&over_the_wire(&any)).unwrap(), &c);
        prop_assert_eq!(&cluster_from_proto(&cluster_to_proto(&c)).unwrap(), &c);
    }

    #[test]
    fn endpoints_round_trip(e in cla()) {
        let any = encode_endpoints(&e);
        prop_assert_eq!(&any.type_url, ENDPOINT_TYPE);
        prop_assert_eq!(resource_name(&any), Some(e.cluster_name.to_string()));
        prop_assert_eq!(&decode_endpoints(&any).unwrap(), &e);
        prop_assert_eq!(&decode_endpoints(&over_the_wire(&any)).unwrap(), &e);
        prop_assert_eq!(&endpoints_from_proto(&endpoints_to_proto(&e)).unwrap(), &e);
        // The deterministic encoding is the generated message, byte for byte
        // compatible, and the same bytes every time.
        prop_assert_eq!(ClaProto::decode(any.value.as_slice()).unwrap(), endpoints_to_proto(&e));
        prop_assert_eq!(encode_endpoints(&e), any);
    }

    #[test]
    fn encoding_other_kinds_is_deterministic(rc in route_config(), c in cluster()) {
        prop_assert_eq!(encode_route_config(&rc), encode_route_config(&rc));
        prop_assert_eq!(encode_cluster(&c), encode_cluster(&c));
    }
}

// ---------------------------------------------------------------------------
// Fixtures

fn sample_route_config() -> RouteConfig {
    RouteConfig {
        name: "rc".into(),
        virtual_hosts: Arc::from([VirtualHost {
            name: "vh".into(),
            domains: Arc::from([Name::from("catalog")]),
            routes: Arc::from([Route {
                name: "r0".into(),
                matcher: RouteMatch {
                    path: PathMatch::Prefix("/".into()),
                    headers: Arc::from([HeaderMatch {
                        name: "x-user".into(),
                        value: ValueMatch::Present(false),
                        invert: false,
                    }]),
                    query_params: Arc::from([]),
                },
                action: WeightedClusters::single("outbound|80||catalog"),
                policy: Default::default(),
            }]),
        }]),
    }
}

fn sample_cluster(lb_policy: LbPolicy) -> Cluster {
    Cluster {
        lb_policy,
        ..Cluster::new("outbound|80||catalog", Protocol::Grpc)
    }
}

fn sample_cla() -> ClusterLoadAssignment {
    let endpoint = |last: u8, labels: &[(&str, &str)]| Endpoint {
        address: SocketAddr::from(([10, 0, 0, last], 8080)),
        weight: 1,
        labels: labels
            .iter()
            .map(|(k, v)| (Name::from(*k), Name::from(*v)))
            .collect(),
    };
    ClusterLoadAssignment::new(
        "outbound|80||catalog".into(),
        vec![LocalityEndpoints {
            locality: Locality::default(),
            weight: 2,
            priority: 0,
            endpoints: Arc::from([
                endpoint(1, &[("app", "catalog"), ("version", "v1")]),
                endpoint(2, &[]),
            ]),
        }],
    )
    .unwrap()
}

fn route_proto_mut(
    rc: &mut RouteConfiguration,
) -> &mut envoy_types::pb::envoy::config::route::v3::Route {
    &mut rc.virtual_hosts[0].routes[0]
}

fn hcm_of(listener: &ListenerProto) -> HttpConnectionManager {
    let any = listener
        .api_listener
        .as_ref()
        .and_then(|a| a.api_listener.as_ref())
        .unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    );
    HttpConnectionManager::decode(any.value.as_slice()).unwrap()
}

fn typed(name: &str, any: Any) -> Policy {
    Policy {
        typed_extension_config: Some(TypedExtensionConfig {
            name: name.into(),
            typed_config: Some(any),
        }),
    }
}

// ---------------------------------------------------------------------------
// Shape that gRPC clients read

#[test]
fn listener_has_rds_over_ads_and_the_router_last() {
    let proto = listener_to_proto(&Listener {
        name: "catalog:80".into(),
        route_config_name: "catalog.default.svc.cluster.local:80".into(),
    });
    let hcm = hcm_of(&proto);
    let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier else {
        panic!("expected rds, got {:?}", hcm.route_specifier);
    };
    assert_eq!(
        rds.route_config_name,
        "catalog.default.svc.cluster.local:80"
    );
    assert_eq!(rds.config_source, Some(ads_config_source()));
    let last = hcm.http_filters.last().unwrap();
    assert_eq!(last.name, "envoy.filters.http.router");
    let Some(ConfigType::TypedConfig(router)) = &last.config_type else {
        panic!("router without typed_config");
    };
    assert_eq!(
        router.type_url,
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    );
}

#[test]
fn clusters_never_say_lb_policy_least_request() {
    for policy in [
        LbPolicy::RoundRobin,
        LbPolicy::LeastRequest,
        LbPolicy::Random,
    ] {
        let proto = cluster_to_proto(&sample_cluster(policy));
        assert_ne!(proto.lb_policy, LbEnum::LeastRequest as i32, "{policy:?}");
        assert_eq!(proto.lb_policy, LbEnum::RoundRobin as i32, "{policy:?}");
        let eds = proto.eds_cluster_config.unwrap();
        assert_eq!(eds.service_name, "outbound|80||catalog");
        assert_eq!(eds.eds_config, Some(ads_config_source()));
    }
    // Least request: wrr_locality { [least_request, round_robin] }.
    let proto = cluster_to_proto(&sample_cluster(LbPolicy::LeastRequest));
    let top = proto.load_balancing_policy.unwrap();
    assert_eq!(top.policies.len(), 1);
    let wrr = top.policies[0].typed_extension_config.as_ref().unwrap();
    let wrr_any = wrr.typed_config.as_ref().unwrap();
    assert_eq!(
        wrr_any.type_url,
        "type.googleapis.com/envoy.extensions.load_balancing_policies.wrr_locality.v3.WrrLocality"
    );
    let wrr = envoy_types::pb::envoy::extensions::load_balancing_policies::wrr_locality::v3::WrrLocality::decode(
        wrr_any.value.as_slice(),
    )
    .unwrap();
    let children: Vec<String> = wrr
        .endpoint_picking_policy
        .unwrap()
        .policies
        .iter()
        .map(|p| {
            let any = p
                .typed_extension_config
                .as_ref()
                .unwrap()
                .typed_config
                .as_ref()
                .unwrap();
            type_name(&any.type_url).to_string()
        })
        .collect();
    assert_eq!(
        children,
        [
            "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
            "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
        ]
    );
}

#[test]
fn endpoints_have_locality_weight_and_health() {
    let proto = endpoints_to_proto(&sample_cla());
    let l = &proto.endpoints[0];
    assert!(l.locality.is_some());
    assert_eq!(l.load_balancing_weight.as_ref().map(|w| w.value), Some(2));
    for e in &l.lb_endpoints {
        assert_eq!(e.health_status, HealthStatus::Healthy as i32);
        assert_eq!(e.load_balancing_weight.as_ref().map(|w| w.value), Some(1));
    }
}

#[test]
fn present_false_is_present_match_false() {
    let proto = route_config_to_proto(&sample_route_config());
    let h = &proto.virtual_hosts[0].routes[0]
        .r#match
        .as_ref()
        .unwrap()
        .headers[0];
    assert_eq!(
        h.header_match_specifier,
        Some(HeaderMatchSpecifier::PresentMatch(false))
    );
    assert!(!h.invert_match);
}

#[test]
fn a_single_weighted_destination_keeps_its_weight() {
    let mut rc = sample_route_config();
    let mut vh = rc.virtual_hosts[0].clone();
    let mut route = vh.routes[0].clone();
    route.action = WeightedClusters::new(vec![WeightedCluster {
        name: "a".into(),
        weight: 5,
    }])
    .unwrap();
    vh.routes = Arc::from([route]);
    rc.virtual_hosts = Arc::from([vh]);
    assert_eq!(decode_route_config(&encode_route_config(&rc)).unwrap(), rc);
    // ... and a weight-0 single destination is a plain `cluster`.
    let proto = route_config_to_proto(&sample_route_config());
    let Some(Action::Route(action)) = &proto.virtual_hosts[0].routes[0].action else {
        panic!("not a route action");
    };
    assert!(matches!(
        action.cluster_specifier,
        Some(envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier::Cluster(ref c)) if c == "outbound|80||catalog"
    ));
}

// ---------------------------------------------------------------------------
// Errors

#[test]
fn wrong_type_url_is_rejected_and_named() {
    let err = decode_listener(&encode_cluster(&sample_cluster(LbPolicy::RoundRobin))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    let msg = err.to_string();
    assert!(
        msg.starts_with("Listener \"outbound|80||catalog\": expected "),
        "{msg}"
    );
    assert!(msg.contains(CLUSTER_TYPE), "{msg}");

    let garbage = Any {
        type_url: LISTENER_TYPE.into(),
        value: vec![0xff, 0xff, 0xff],
    };
    let err = decode_listener(&garbage).unwrap_err();
    assert!(
        err.to_string().starts_with("Listener: cannot decode"),
        "{err}"
    );
    assert_eq!(resource_name(&garbage), None);
    let unknown = Any {
        type_url: "type.googleapis.com/google.protobuf.Empty".into(),
        value: vec![],
    };
    assert_eq!(resource_name(&unknown), None);
}

#[test]
fn resource_type_maps_type_urls() {
    for t in ResourceType::ALL {
        assert_eq!(ResourceType::from_type_url(t.type_url()), Some(t));
    }
    assert_eq!(ResourceType::from_type_url("nope"), None);
    assert_eq!(ResourceType::Cluster.to_string(), "CDS");
}

#[test]
fn suffix_header_matcher_is_unsupported_and_named() {
    let mut proto = route_config_to_proto(&sample_route_config());
    route_proto_mut(&mut proto)
        .r#match
        .as_mut()
        .unwrap()
        .headers[0]
        .header_match_specifier = Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
        ignore_case: false,
        match_pattern: Some(MatchPattern::Suffix(".example.com".into())),
    }));
    let err = route_config_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let msg = err.to_string();
    assert!(
        msg.starts_with("RouteConfiguration \"rc\": virtual_hosts[0].routes[0].match.headers[0].string_match.suffix: "),
        "{msg}"
    );
    // The deprecated field form too.
    #[allow(deprecated)]
    let suffix = HeaderMatchSpecifier::SuffixMatch("x".into());
    route_proto_mut(&mut proto)
        .r#match
        .as_mut()
        .unwrap()
        .headers[0]
        .header_match_specifier = Some(suffix);
    let err = route_config_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("virtual_hosts[0].routes[0].match.headers[0]"),
        "{err}"
    );
}

#[test]
fn case_insensitive_matcher_is_unsupported() {
    let mut proto = route_config_to_proto(&sample_route_config());
    route_proto_mut(&mut proto)
        .r#match
        .as_mut()
        .unwrap()
        .headers[0]
        .header_match_specifier = Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
        ignore_case: true,
        match_pattern: Some(MatchPattern::Exact("Bob".into())),
    }));
    let err = route_config_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("match.headers[0].string_match.ignore_case"),
        "{err}"
    );
}

#[test]
fn invalid_regex_is_named() {
    let mut proto = route_config_to_proto(&sample_route_config());
    route_proto_mut(&mut proto)
        .r#match
        .as_mut()
        .unwrap()
        .path_specifier = Some(PathSpecifier::SafeRegex(RegexMatcher {
        regex: "(unclosed".into(),
        engine_type: None,
    }));
    let err = decode_route_config(&pack(&proto)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    let msg = err.to_string();
    assert!(
        msg.starts_with("RouteConfiguration \"rc\": virtual_hosts[0].routes[0].match.safe_regex: invalid regex \"(unclosed\""),
        "{msg}"
    );
}

#[test]
fn non_route_actions_are_unsupported() {
    let mut proto = route_config_to_proto(&sample_route_config());
    route_proto_mut(&mut proto).action = Some(Action::DirectResponse(DirectResponseAction {
        status: 200,
        ..Default::default()
    }));
    let err = route_config_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("virtual_hosts[0].routes[0].direct_response"),
        "{err}"
    );
}

#[test]
fn duplicate_endpoint_address_is_rejected() {
    let mut proto = endpoints_to_proto(&sample_cla());
    let dup = proto.endpoints[0].lb_endpoints[0].clone();
    proto.endpoints[0].lb_endpoints.push(dup);
    let err = decode_endpoints(&pack(&proto)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    let msg = err.to_string();
    assert!(
        msg.starts_with("ClusterLoadAssignment \"outbound|80||catalog\": "),
        "{msg}"
    );
    assert!(
        msg.contains("duplicate endpoint address 10.0.0.1:8080"),
        "{msg}"
    );
}

#[test]
fn unhealthy_endpoints_are_skipped() {
    let mut proto = endpoints_to_proto(&sample_cla());
    proto.endpoints[0].lb_endpoints[1].health_status = HealthStatus::Draining as i32;
    proto.endpoints[0].lb_endpoints[0].health_status = HealthStatus::Unknown as i32;
    let cla = endpoints_from_proto(&proto).unwrap();
    let addrs: Vec<_> = cla.localities[0]
        .endpoints
        .iter()
        .map(|e| e.address)
        .collect();
    assert_eq!(addrs, [SocketAddr::from(([10, 0, 0, 1], 8080))]);
}

#[test]
fn locality_without_weight_or_locality_is_rejected() {
    let mut proto = endpoints_to_proto(&sample_cla());
    proto.endpoints[0].load_balancing_weight = None;
    let err = endpoints_from_proto(&proto).unwrap_err();
    assert!(
        err.to_string()
            .contains("endpoints[0].load_balancing_weight: missing"),
        "{err}"
    );

    let mut proto = endpoints_to_proto(&sample_cla());
    proto.endpoints[0].locality = None;
    let err = endpoints_from_proto(&proto).unwrap_err();
    assert!(
        err.to_string().contains("endpoints[0].locality: missing"),
        "{err}"
    );
}

#[test]
fn hostnames_are_unsupported_and_bad_ips_invalid() {
    use envoy_types::pb::envoy::config::core::v3::address;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let set_host = |proto: &mut ClaProto, host: &str| {
        let Some(HostIdentifier::Endpoint(e)) =
            &mut proto.endpoints[0].lb_endpoints[0].host_identifier
        else {
            panic!("no endpoint");
        };
        let Some(address::Address::SocketAddress(sa)) = &mut e.address.as_mut().unwrap().address
        else {
            panic!("no socket address");
        };
        sa.address = host.into();
    };
    let mut proto = endpoints_to_proto(&sample_cla());
    set_host(&mut proto, "catalog.internal");
    let err = endpoints_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string().contains(
            "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: \"catalog.internal\" is a hostname"
        ),
        "{err}"
    );
    set_host(&mut proto, "10.0.0.300");
    let err = endpoints_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
}

#[test]
fn endpoint_labels_decode_sorted() {
    let mut proto = endpoints_to_proto(&sample_cla());
    let labels = Struct {
        fields: [("zeta", "1"), ("alpha", "2"), ("mid", "3")]
            .into_iter()
            .map(|(k, v)| {
                let v = Value {
                    kind: Some(Kind::StringValue(v.into())),
                };
                (k.to_string(), v)
            })
            .collect(),
    };
    let ours = Struct {
        fields: [(
            "labels".to_string(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        )]
        .into_iter()
        .collect(),
    };
    proto.endpoints[0].lb_endpoints[1].metadata =
        Some(envoy_types::pb::envoy::config::core::v3::Metadata {
            filter_metadata: [("proxyless".to_string(), ours)].into_iter().collect(),
            ..Default::default()
        });
    let cla = endpoints_from_proto(&proto).unwrap();
    let keys: Vec<&str> = cla.localities[0].endpoints[1]
        .labels
        .iter()
        .map(|(k, _)| &**k)
        .collect();
    assert_eq!(keys, ["alpha", "mid", "zeta"]);
}

#[test]
fn lb_policy_enum_least_request_decodes() {
    let mut proto = cluster_to_proto(&sample_cluster(LbPolicy::RoundRobin));
    proto.lb_policy = LbEnum::LeastRequest as i32;
    let c = decode_cluster(&pack(&proto)).unwrap();
    assert_eq!(c.lb_policy, LbPolicy::LeastRequest);
    proto.lb_policy = LbEnum::Random as i32;
    assert_eq!(
        cluster_from_proto(&proto).unwrap().lb_policy,
        LbPolicy::Random
    );
    proto.lb_policy = LbEnum::RingHash as i32;
    let err = cluster_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("lb_policy: RING_HASH is not supported"),
        "{err}"
    );
}

#[test]
fn load_balancing_policy_takes_the_first_known() {
    let mut proto: ClusterProto = cluster_to_proto(&sample_cluster(LbPolicy::RoundRobin));
    let unknown = Any {
        type_url: "type.googleapis.com/example.Unknown".into(),
        value: vec![],
    };
    proto.load_balancing_policy = Some(LoadBalancingPolicy {
        policies: vec![
            typed("unknown", unknown),
            typed("rr", pack(&RoundRobin::default())),
        ],
    });
    assert_eq!(
        cluster_from_proto(&proto).unwrap().lb_policy,
        LbPolicy::RoundRobin
    );

    proto.load_balancing_policy = Some(LoadBalancingPolicy {
        policies: vec![
            typed("ring", pack(&RingHash::default())),
            typed("rr", pack(&RoundRobin::default())),
        ],
    });
    let err = cluster_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("load_balancing_policy.policies[0].typed_extension_config.typed_config"),
        "{err}"
    );
}

#[test]
fn cluster_protocol_metadata_wins_then_options_then_http1() {
    let mut proto = cluster_to_proto(&sample_cluster(LbPolicy::RoundRobin));
    assert_eq!(cluster_from_proto(&proto).unwrap().protocol, Protocol::Grpc);
    proto.metadata = None; // the options say HTTP/2
    assert_eq!(
        cluster_from_proto(&proto).unwrap().protocol,
        Protocol::Http2
    );
    proto.typed_extension_protocol_options.clear();
    assert_eq!(
        cluster_from_proto(&proto).unwrap().protocol,
        Protocol::Http1
    );
}

#[test]
fn non_eds_clusters_are_unsupported() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    let mut proto = cluster_to_proto(&sample_cluster(LbPolicy::RoundRobin));
    proto.cluster_discovery_type =
        Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
    let err = cluster_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string().contains("type: STRICT_DNS clusters"),
        "{err}"
    );
}

#[test]
fn listener_with_inline_route_config_is_rejected() {
    let mut proto = listener_to_proto(&Listener {
        name: "catalog".into(),
        route_config_name: "rc".into(),
    });
    let mut hcm = hcm_of(&proto);
    hcm.route_specifier = Some(RouteSpecifier::RouteConfig(route_config_to_proto(
        &sample_route_config(),
    )));
    proto.api_listener.as_mut().unwrap().api_listener = Some(pack(&hcm));
    let err = decode_listener(&pack(&proto)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .starts_with("Listener \"catalog\": api_listener.api_listener.route_config: "),
        "{err}"
    );
}

#[test]
fn listener_without_api_listener_or_router_is_rejected() {
    let err = listener_from_proto(&ListenerProto {
        name: "grpc/server?xds.resource.listening_address=0.0.0.0:50051".into(),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("api_listener: missing"), "{err}");

    let mut proto = listener_to_proto(&Listener {
        name: "catalog".into(),
        route_config_name: "rc".into(),
    });
    let mut hcm = hcm_of(&proto);
    hcm.http_filters.clear();
    proto.api_listener.as_mut().unwrap().api_listener = Some(pack(&hcm));
    let err = listener_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(
        err.to_string()
            .contains("api_listener.api_listener.http_filters: empty"),
        "{err}"
    );
}
