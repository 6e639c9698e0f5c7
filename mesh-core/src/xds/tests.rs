//! Round trips (property tests) and the errors a NACK would carry.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

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
use envoy_types::pb::envoy::extensions::load_balancing_policies::maglev::v3::Maglev;
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
    AbortStatus, CircuitBreakers, ClientCertificateFiles, ConnectionSettings, Endpoint, FaultAbort,
    FaultDelay, FaultPolicy, FileTls, Fraction, HashPolicy, HeaderMatch, LbPolicy, Locality,
    LocalityEndpoints, Name, OutlierDetection, PathMatch, Pattern, Protocol, QueryParamMatch,
    RetryBudget, RetryOn, RetryPolicy, Route, RouteMatch, RoutePolicy, TlsOrigination, UpstreamTls,
    ValueMatch, VirtualHost, WeightedCluster, WeightedClusters,
};
use crate::spiffe::SpiffeId;

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
        any::<bool>(),
    )
        .prop_map(|(path, headers, query_params, ignore_case)| RouteMatch {
            path,
            headers: headers.into(),
            query_params: query_params.into(),
            ignore_case,
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

/// A positive duration in whole milliseconds (up to ~28 h).
fn millis() -> impl Strategy<Value = Duration> {
    prop_oneof![1u64..1_000, 1u64..100_000_000].prop_map(Duration::from_millis)
}

/// A fraction in millionths, with the edges.
fn fraction() -> impl Strategy<Value = Fraction> {
    prop_oneof![Just(0u32), Just(1_000_000u32), 0u32..=1_000_000]
        .prop_map(Fraction::from_per_million)
}

/// Any subset of the 12 known conditions.
fn retry_on() -> impl Strategy<Value = RetryOn> {
    any::<u16>().prop_map(|bits| {
        RetryOn::NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .fold(RetryOn::empty(), |acc, (_, (_, flag))| acc | *flag)
    })
}

fn retry_policy() -> impl Strategy<Value = RetryPolicy> {
    (
        1u32..=10,
        proptest::option::of(millis()),
        retry_on(),
        vec(100u16..=599, 0..3),
        (1u64..2_000, 0u64..10_000),
        any::<bool>(),
    )
        .prop_map(
            |(num_retries, per_try_timeout, retry_on, codes, (base, extra), remote)| RetryPolicy {
                num_retries,
                per_try_timeout,
                retry_on,
                retriable_status_codes: codes.into(),
                backoff_base: Duration::from_millis(base),
                backoff_max: Duration::from_millis(base + extra),
                retry_remote_localities: remote,
            },
        )
}

fn fault_policy() -> impl Strategy<Value = FaultPolicy> {
    let delay = (fraction(), 0u64..10_000).prop_map(|(fraction, ms)| FaultDelay {
        fraction,
        delay: Duration::from_millis(ms),
    });
    let status = prop_oneof![
        (200u16..=599).prop_map(AbortStatus::Http),
        (0u32..=16).prop_map(AbortStatus::Grpc),
    ];
    let abort = (fraction(), status).prop_map(|(fraction, status)| FaultAbort { fraction, status });
    (proptest::option::of(delay), proptest::option::of(abort))
        .prop_map(|(delay, abort)| FaultPolicy { delay, abort })
}

fn hash_policy() -> impl Strategy<Value = HashPolicy> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}".prop_map(|h| HashPolicy::Header(h.into())),
        (
            "[a-zA-Z][a-zA-Z0-9_-]{0,8}",
            proptest::option::of(prop_oneof![Just(Duration::ZERO), millis()]),
            proptest::option::of("/[a-z0-9/]{0,8}"),
        )
            .prop_map(|(name, ttl, path)| HashPolicy::Cookie {
                name: name.into(),
                ttl,
                path: path.map(Name::from),
            }),
        Just(HashPolicy::SourceIp),
        "[a-zA-Z][a-zA-Z0-9_]{0,8}".prop_map(|q| HashPolicy::QueryParameter(q.into())),
    ]
}

fn route_policy() -> impl Strategy<Value = RoutePolicy> {
    (
        proptest::option::of(millis()),
        proptest::option::of(retry_policy()),
        proptest::option::of(fault_policy()),
        vec(hash_policy(), 0..3),
    )
        .prop_map(|(timeout, retry, fault, hash_policy)| RoutePolicy {
            timeout,
            retry,
            fault,
            hash_policy: hash_policy.into(),
            traffic: None,
            rate_limit: None,
        })
}

fn route() -> impl Strategy<Value = Route> {
    (
        prop_oneof![Just(Name::from("")), name()],
        route_match(),
        weighted_clusters(),
        prop_oneof![Just(RoutePolicy::default()), route_policy()],
    )
        .prop_map(|(name, matcher, action, policy)| Route {
            policy,
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

/// A limit: Istio's "unlimited" (`u32::MAX`) or a small number.
fn limit() -> impl Strategy<Value = u32> {
    prop_oneof![Just(u32::MAX), 0u32..100]
}

fn circuit_breakers() -> impl Strategy<Value = CircuitBreakers> {
    let budget = (fraction(), limit()).prop_map(|(budget, min_retry_concurrency)| RetryBudget {
        budget,
        min_retry_concurrency,
    });
    (
        limit(),
        limit(),
        limit(),
        limit(),
        proptest::option::of(budget),
    )
        .prop_map(
            |(max_connections, max_pending_requests, max_requests, max_retries, retry_budget)| {
                CircuitBreakers {
                    max_connections,
                    max_pending_requests,
                    max_requests,
                    max_retries,
                    retry_budget,
                }
            },
        )
}

fn outlier_detection() -> impl Strategy<Value = OutlierDetection> {
    (
        proptest::option::of(0u32..20),
        proptest::option::of(0u32..20),
        millis(),
        millis(),
        0u32..=100,
        0u32..=100,
    )
        .prop_map(
            |(
                consecutive_5xx,
                consecutive_gateway_errors,
                interval,
                base_ejection_time,
                max_ejection_percent,
                min_health_percent,
            )| OutlierDetection {
                consecutive_5xx,
                consecutive_gateway_errors,
                interval,
                base_ejection_time,
                max_ejection_percent,
                min_health_percent,
            },
        )
}

fn connection_settings() -> impl Strategy<Value = ConnectionSettings> {
    (
        proptest::option::of(millis()),
        proptest::option::of(millis()),
        proptest::option::of(prop_oneof![Just(u32::MAX), 1u32..1_000]),
        // TCP keepalive (whole seconds, as Envoy counts them) and the
        // maximum connection duration: valid for every protocol.
        proptest::option::of((
            proptest::option::of(1u32..10),
            proptest::option::of(1u64..100_000),
            proptest::option::of(1u64..1_000),
        )),
        proptest::option::of(millis()),
    )
        .prop_map(
            |(connect_timeout, idle_timeout, max_requests_per_connection, keepalive, max_age)| {
                ConnectionSettings {
                    connect_timeout,
                    idle_timeout,
                    max_requests_per_connection,
                    tcp_keepalive: keepalive.map(|(probes, time, interval)| {
                        mesh_core_keepalive(probes, time, interval)
                    }),
                    max_connection_duration: max_age,
                    ..ConnectionSettings::default()
                }
            },
        )
}

/// A [`crate::model::TcpKeepalive`] with times in seconds.
fn mesh_core_keepalive(
    probes: Option<u32>,
    time: Option<u64>,
    interval: Option<u64>,
) -> crate::model::TcpKeepalive {
    crate::model::TcpKeepalive {
        probes,
        time: time.map(Duration::from_secs),
        interval: interval.map(Duration::from_secs),
    }
}

fn cluster() -> impl Strategy<Value = Cluster> {
    let lb = prop_oneof![
        Just(LbPolicy::RoundRobin),
        Just(LbPolicy::LeastRequest),
        Just(LbPolicy::Random),
        prop_oneof![Just(1024u64), 1u64..=8_388_608]
            .prop_map(|minimum_ring_size| LbPolicy::RingHash { minimum_ring_size }),
    ];
    let protocol = prop_oneof![
        Just(Protocol::Http1),
        Just(Protocol::Http2),
        Just(Protocol::Grpc),
    ];
    let policy = (
        prop_oneof![Just(CircuitBreakers::default()), circuit_breakers()],
        proptest::option::of(outlier_detection()),
        prop_oneof![Just(ConnectionSettings::default()), connection_settings()],
        any::<bool>(),
        proptest::option::of(upstream_tls()),
    );
    (cluster_name(), cluster_name(), lb, protocol, policy).prop_map(
        |(
            name,
            eds_service_name,
            lb_policy,
            protocol,
            (circuit_breakers, outlier_detection, connection, locality_failover, tls),
        )| Cluster {
            eds_service_name,
            lb_policy,
            circuit_breakers,
            outlier_detection,
            connection,
            locality_failover,
            tls,
            ..Cluster::new(name, protocol)
        },
    )
}

fn spiffe_id() -> impl Strategy<Value = SpiffeId> {
    (
        prop_oneof![Just("cluster.local"), Just("example.org")],
        "[a-z][a-z0-9-]{0,8}",
        "[a-z][a-z0-9-]{0,8}",
    )
        .prop_map(|(td, ns, sa)| SpiffeId::new(td, &ns, &sa).unwrap())
}

fn upstream_tls() -> impl Strategy<Value = UpstreamTls> {
    let mesh = (
        vec(spiffe_id(), 0..4),
        prop_oneof![Just(String::new()), "[a-z_.|0-9]{1,30}"],
    )
        .prop_map(|(ids, sni)| UpstreamTls {
            server_identities: ids.into(),
            sni: sni.into(),
            origination: TlsOrigination::IstioMutual,
        });
    // SIMPLE / MUTUAL: an SNI or SANs (or both) to check the name against.
    let files = (
        proptest::option::of("/[a-z/]{1,20}\\.pem"),
        vec(
            prop_oneof!["[a-z]{1,8}\\.example\\.com", "spiffe://[a-z]{1,8}/x"],
            0..3,
        ),
        proptest::option::of(("/[a-z]{1,10}\\.pem", "/[a-z]{1,10}\\.key")),
        "[a-z.]{1,20}",
        any::<bool>(),
    )
        .prop_map(|(ca, sans, client, sni, send_sni)| {
            let keep_sni = send_sni || sans.is_empty();
            UpstreamTls {
                server_identities: Arc::from([]),
                sni: if keep_sni { sni.into() } else { "".into() },
                origination: TlsOrigination::Files(FileTls {
                    ca_certificates: ca.map(Name::from),
                    subject_alt_names: sans.into_iter().map(Name::from).collect(),
                    client_certificate: client.map(|(chain, key)| ClientCertificateFiles {
                        certificate_chain: chain.into(),
                        private_key: key.into(),
                    }),
                }),
            }
        });
    prop_oneof![mesh, files]
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
        // The deterministic encoding is the generated message.
        prop_assert_eq!(ClusterProto::decode(any.value.as_slice()).unwrap(), cluster_to_proto(&c));
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
                    ignore_case: false,
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
    route_proto_mut(&mut proto).action = Some(Action::NonForwardingAction(Default::default()));
    let err = route_config_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("virtual_hosts[0].routes[0].non_forwarding_action"),
        "{err}"
    );
    // A direct response is a route that answers itself.
    route_proto_mut(&mut proto).action = Some(Action::DirectResponse(DirectResponseAction {
        status: 200,
        ..Default::default()
    }));
    let rc = route_config_from_proto(&proto).expect("a direct response decodes");
    let route = &rc.virtual_hosts[0].routes[0];
    assert!(route.action.is_none());
    assert!(matches!(
        route
            .policy
            .traffic
            .as_ref()
            .and_then(|t| t.answer.as_ref()),
        Some(crate::traffic::LocalAnswer::Direct(_))
    ));
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
fn endpoints_with_equal_labels_share_them() {
    let endpoint = |last: u8, version: &str| Endpoint {
        address: SocketAddr::from(([10, 0, 0, last], 8080)),
        weight: 1,
        labels: Arc::from([
            (Name::from("app"), Name::from("catalog")),
            (Name::from("version"), Name::from(version)),
        ]),
    };
    let cla = ClusterLoadAssignment::new(
        "outbound|80||catalog".into(),
        vec![
            LocalityEndpoints {
                locality: Locality::default(),
                weight: 1,
                priority: 0,
                endpoints: Arc::from([endpoint(1, "v1"), endpoint(2, "v2"), endpoint(3, "v1")]),
            },
            LocalityEndpoints {
                locality: Locality {
                    zone: "b".into(),
                    ..Locality::default()
                },
                weight: 1,
                priority: 0,
                endpoints: Arc::from([endpoint(4, "v1")]),
            },
        ],
    )
    .unwrap();
    let decoded = decode_endpoints(&encode_endpoints(&cla)).unwrap();
    assert_eq!(decoded, cla);
    let labels: Vec<&Arc<[(Name, Name)]>> = decoded
        .localities
        .iter()
        .flat_map(|l| l.endpoints.iter())
        .map(|e| &e.labels)
        .collect();
    // One set per distinct labels, across localities.
    assert!(Arc::ptr_eq(labels[0], labels[2]));
    assert!(Arc::ptr_eq(labels[0], labels[3]));
    assert!(!Arc::ptr_eq(labels[0], labels[1]));
    // And one name per distinct key or value, across sets.
    assert!(Arc::ptr_eq(&labels[0][0].0, &labels[1][0].0));
    assert!(Arc::ptr_eq(&labels[0][0].1, &labels[1][0].1));
    assert_eq!(&*labels[1][1].1, "v2");
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
    // RING_HASH without ring_hash_lb_config: Envoy's default ring.
    proto.lb_policy = LbEnum::RingHash as i32;
    assert_eq!(
        cluster_from_proto(&proto).unwrap().lb_policy,
        LbPolicy::RingHash {
            minimum_ring_size: 1024
        }
    );
    proto.lb_policy = LbEnum::Maglev as i32;
    let err = cluster_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("lb_policy: MAGLEV is not supported"),
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

    // Ring hash is known (default ring of 1024).
    proto.load_balancing_policy = Some(LoadBalancingPolicy {
        policies: vec![
            typed("ring", pack(&RingHash::default())),
            typed("rr", pack(&RoundRobin::default())),
        ],
    });
    assert_eq!(
        cluster_from_proto(&proto).unwrap().lb_policy,
        LbPolicy::RingHash {
            minimum_ring_size: 1024
        }
    );

    proto.load_balancing_policy = Some(LoadBalancingPolicy {
        policies: vec![
            typed("maglev", pack(&Maglev::default())),
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
    proto.cluster_discovery_type = Some(ClusterDiscoveryType::Type(
        DiscoveryType::OriginalDst as i32,
    ));
    let err = cluster_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string().contains("type: ORIGINAL_DST clusters"),
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

// ---------------------------------------------------------------------------
// Resilience: the shape Envoy and gRPC read (A31, A32, A33, A42, A44, A50)

fn route_config_with(policy: RoutePolicy) -> RouteConfig {
    let mut rc = sample_route_config();
    let mut vh = rc.virtual_hosts[0].clone();
    let mut route = vh.routes[0].clone();
    route.policy = policy;
    vh.routes = Arc::from([route]);
    rc.virtual_hosts = Arc::from([vh]);
    rc
}

fn route_action_of(
    rc: &RouteConfiguration,
) -> &envoy_types::pb::envoy::config::route::v3::RouteAction {
    let Some(Action::Route(action)) = &rc.virtual_hosts[0].routes[0].action else {
        panic!("not a route action");
    };
    action
}

fn route_action_mut(
    rc: &mut RouteConfiguration,
) -> &mut envoy_types::pb::envoy::config::route::v3::RouteAction {
    let Some(Action::Route(action)) = &mut route_proto_mut(rc).action else {
        panic!("not a route action");
    };
    action
}

fn proto_duration(ms: u64) -> envoy_types::pb::google::protobuf::Duration {
    duration_to_proto(Duration::from_millis(ms))
}

fn sample_retry() -> RetryPolicy {
    RetryPolicy {
        num_retries: 3,
        per_try_timeout: Some(Duration::from_millis(100)),
        retry_on: RetryOn::FIVE_XX | RetryOn::UNAVAILABLE | RetryOn::CANCELLED,
        retriable_status_codes: Arc::from([503u16]),
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(10),
        retry_remote_localities: true,
    }
}

#[test]
fn retry_policy_has_the_fields_grpc_reads() {
    let rc = route_config_with(RoutePolicy {
        retry: Some(sample_retry()),
        ..Default::default()
    });
    let proto = route_config_to_proto(&rc);
    let retry = route_action_of(&proto).retry_policy.as_ref().unwrap();
    assert_eq!(retry.retry_on, "5xx,cancelled,unavailable");
    assert_eq!(retry.num_retries.map(|n| n.value), Some(3));
    assert_eq!(retry.per_try_timeout, Some(proto_duration(100)));
    let backoff = retry.retry_back_off.unwrap();
    assert_eq!(backoff.base_interval, Some(proto_duration(1)));
    assert_eq!(backoff.max_interval, Some(proto_duration(10)));
    assert_eq!(retry.retriable_status_codes, [503]);
    // What Istio adds: prefer untried hosts; remote localities on retry.
    assert_eq!(
        retry.retry_host_predicate[0].name,
        "envoy.retry_host_predicates.previous_hosts"
    );
    assert_eq!(retry.host_selection_retry_max_attempts, 5);
    assert_eq!(
        retry.retry_priority.as_ref().unwrap().name,
        "envoy.retry_priorities.previous_priorities"
    );
    assert_eq!(decode_route_config(&encode_route_config(&rc)).unwrap(), rc);
}

#[test]
fn zero_retries_are_no_retry_policy() {
    // gRPC NACKs `num_retries: 0`; Istio writes no policy for `attempts: 0`.
    let rc = route_config_with(RoutePolicy {
        retry: Some(RetryPolicy {
            num_retries: 0,
            ..sample_retry()
        }),
        ..Default::default()
    });
    let proto = route_config_to_proto(&rc);
    assert_eq!(route_action_of(&proto).retry_policy, None);
    let decoded = route_config_from_proto(&proto).unwrap();
    assert_eq!(decoded.virtual_hosts[0].routes[0].policy.retry, None);
}

#[test]
fn route_timeout_is_timeout_and_max_stream_duration() {
    let rc = route_config_with(RoutePolicy {
        timeout: Some(Duration::from_millis(1500)),
        ..Default::default()
    });
    let proto = route_config_to_proto(&rc);
    let action = route_action_of(&proto);
    assert_eq!(action.timeout, Some(proto_duration(1500)));
    let msd = action.max_stream_duration.unwrap();
    assert_eq!(msd.max_stream_duration, Some(proto_duration(1500)));
    assert_eq!(msd.grpc_timeout_header_max, None);
    assert_eq!(decode_route_config(&encode_route_config(&rc)).unwrap(), rc);

    // No timeout: `timeout: 0s` (disabled in Envoy), no max_stream_duration.
    let proto = route_config_to_proto(&sample_route_config());
    let action = route_action_of(&proto);
    assert_eq!(action.timeout, Some(proto_duration(0)));
    assert_eq!(action.max_stream_duration, None);
}

#[test]
fn timeouts_from_other_servers() {
    let mut proto = route_config_to_proto(&sample_route_config());
    // Envoy style: only `timeout` (and Istio's max_grpc_timeout equal to it).
    let action = route_action_mut(&mut proto);
    action.timeout = Some(proto_duration(300));
    #[allow(deprecated)]
    {
        action.max_grpc_timeout = Some(proto_duration(300));
    }
    let rc = route_config_from_proto(&proto).unwrap();
    assert_eq!(
        rc.virtual_hosts[0].routes[0].policy.timeout,
        Some(Duration::from_millis(300))
    );
    // Both limits: the smaller wins (Envoy applies both).
    route_action_mut(&mut proto).max_stream_duration = Some(
        envoy_types::pb::envoy::config::route::v3::route_action::MaxStreamDuration {
            max_stream_duration: Some(proto_duration(200)),
            ..Default::default()
        },
    );
    #[allow(deprecated)]
    {
        route_action_mut(&mut proto).max_grpc_timeout = None;
    }
    let rc = route_config_from_proto(&proto).unwrap();
    assert_eq!(
        rc.virtual_hosts[0].routes[0].policy.timeout,
        Some(Duration::from_millis(200))
    );
    // A grpc-timeout cap that is not the route timeout changes behavior.
    route_action_mut(&mut proto)
        .max_stream_duration
        .as_mut()
        .unwrap()
        .grpc_timeout_header_max = Some(proto_duration(0));
    let err = route_config_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("routes[0].route.max_stream_duration.grpc_timeout_header_max"),
        "{err}"
    );
}

#[test]
fn fault_is_typed_per_filter_config_with_million_denominators() {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
        HttpFault, fault_abort::ErrorType,
    };
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    let rc = route_config_with(RoutePolicy {
        fault: Some(FaultPolicy {
            delay: Some(FaultDelay {
                fraction: Fraction::from_per_million(100_000),
                delay: Duration::from_millis(50),
            }),
            abort: Some(FaultAbort {
                fraction: Fraction::from_per_million(200_000),
                status: AbortStatus::Grpc(14),
            }),
        }),
        ..Default::default()
    });
    let proto = route_config_to_proto(&rc);
    let per_filter = &proto.virtual_hosts[0].routes[0].typed_per_filter_config;
    assert_eq!(
        per_filter.keys().collect::<Vec<_>>(),
        ["envoy.filters.http.fault"]
    );
    let any = &per_filter["envoy.filters.http.fault"];
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
    );
    let fault = HttpFault::decode(any.value.as_slice()).unwrap();
    let delay = fault.delay.unwrap();
    let pct = delay.percentage.unwrap();
    assert_eq!(
        (pct.numerator, pct.denominator),
        (100_000, DenominatorType::Million as i32)
    );
    assert_eq!(
        delay.fault_delay_secifier,
        Some(FaultDelaySecifier::FixedDelay(proto_duration(50)))
    );
    let abort = fault.abort.unwrap();
    let pct = abort.percentage.unwrap();
    assert_eq!(
        (pct.numerator, pct.denominator),
        (200_000, DenominatorType::Million as i32)
    );
    assert_eq!(abort.error_type, Some(ErrorType::GrpcStatus(14)));
    assert_eq!(decode_route_config(&encode_route_config(&rc)).unwrap(), rc);

    // Other denominators decode to millionths: 20/100 = 200,000 ppm.
    let mut proto = proto;
    let mut fault = HttpFault::decode(
        proto.virtual_hosts[0].routes[0].typed_per_filter_config["envoy.filters.http.fault"]
            .value
            .as_slice(),
    )
    .unwrap();
    fault.abort.as_mut().unwrap().percentage =
        Some(envoy_types::pb::envoy::r#type::v3::FractionalPercent {
            numerator: 20,
            denominator: DenominatorType::Hundred as i32,
        });
    fault.abort.as_mut().unwrap().error_type = Some(ErrorType::HttpStatus(700));
    route_proto_mut(&mut proto)
        .typed_per_filter_config
        .insert("envoy.filters.http.fault".into(), pack(&fault));
    let err = route_config_from_proto(&proto).unwrap_err();
    assert!(
        err.to_string().contains(
            "routes[0].typed_per_filter_config[\"envoy.filters.http.fault\"].abort.http_status: 700"
        ),
        "{err}"
    );
    fault.abort.as_mut().unwrap().error_type = Some(ErrorType::HttpStatus(503));
    route_proto_mut(&mut proto)
        .typed_per_filter_config
        .insert("envoy.filters.http.fault".into(), pack(&fault));
    let decoded = route_config_from_proto(&proto).unwrap();
    let abort = decoded.virtual_hosts[0].routes[0]
        .policy
        .fault
        .as_ref()
        .unwrap()
        .abort
        .clone()
        .unwrap();
    assert_eq!(abort.fraction, Fraction::from_per_million(200_000));
    assert_eq!(abort.status, AbortStatus::Http(503));
}

#[test]
fn listener_filters_are_fault_then_router() {
    let proto = listener_to_proto(&Listener {
        name: "catalog".into(),
        route_config_name: "rc".into(),
    });
    let hcm = hcm_of(&proto);
    let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "envoy.filters.http.fault",
            "envoy.filters.http.local_ratelimit",
            "envoy.filters.http.router"
        ]
    );
    // The rate limit filter limits nothing by itself (routes carry their
    // limits) and is optional, so gRPC ignores it (gRFC A39).
    assert!(hcm.http_filters[1].is_optional);
    let Some(ConfigType::TypedConfig(fault)) = &hcm.http_filters[0].config_type else {
        panic!("fault filter without typed_config");
    };
    assert_eq!(
        fault.type_url,
        "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
    );

    let with_filters = |filters| {
        let mut proto = proto.clone();
        let mut hcm = hcm_of(&proto);
        hcm.http_filters = filters;
        proto.api_listener.as_mut().unwrap().api_listener = Some(pack(&hcm));
        listener_from_proto(&proto)
    };
    // [router] alone is accepted, as before.
    assert!(with_filters(vec![hcm.http_filters[2].clone()]).is_ok());
    // [router, fault] is not.
    let err = with_filters(vec![
        hcm.http_filters[2].clone(),
        hcm.http_filters[0].clone(),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("http_filters[0]"), "{err}");
    // A listener-wide fault is not supported: faults are per route.
    let mut wide = hcm.http_filters[0].clone();
    let noisy = envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault {
        abort: Some(
            envoy_types::pb::envoy::extensions::filters::http::fault::v3::FaultAbort {
                error_type: Some(envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType::HttpStatus(503)),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    wide.config_type = Some(ConfigType::TypedConfig(pack(&noisy)));
    let err = with_filters(vec![wide, hcm.http_filters[2].clone()]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("api_listener.api_listener.http_filters[0].typed_config: listener-wide"),
        "{err}"
    );
}

#[test]
fn unknown_retry_on_name_is_rejected_and_named() {
    let rc = route_config_with(RoutePolicy {
        retry: Some(sample_retry()),
        ..Default::default()
    });
    let mut proto = route_config_to_proto(&rc);
    route_action_mut(&mut proto)
        .retry_policy
        .as_mut()
        .unwrap()
        .retry_on = "5xx, envoy-ratelimited".into();
    let err = decode_route_config(&pack(&proto)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "RouteConfiguration \"rc\": virtual_hosts[0].routes[0].route.retry_policy.retry_on: \
             unknown retry condition \"envoy-ratelimited\""
        ),
        "{msg}"
    );
}

#[test]
fn retry_policy_defaults_and_virtual_host_policy() {
    use envoy_types::pb::envoy::config::route::v3::RetryPolicy as RetryProto;
    let mut proto = route_config_to_proto(&sample_route_config());
    // Envoy's defaults: 1 retry, 25 ms / 250 ms backoff.
    proto.virtual_hosts[0].retry_policy = Some(RetryProto {
        retry_on: "unavailable".into(),
        ..Default::default()
    });
    let rc = route_config_from_proto(&proto).unwrap();
    let retry = rc.virtual_hosts[0].routes[0].policy.retry.clone().unwrap();
    assert_eq!(retry.num_retries, 1);
    assert_eq!(retry.retry_on, RetryOn::UNAVAILABLE);
    assert_eq!(
        (retry.backoff_base, retry.backoff_max),
        (Duration::from_millis(25), Duration::from_millis(250))
    );
    assert!(!retry.retry_remote_localities);
    // A route's own policy wins over the virtual host's.
    route_action_mut(&mut proto).retry_policy = Some(RetryProto {
        retry_on: "reset".into(),
        num_retries: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 4 }),
        ..Default::default()
    });
    let rc = route_config_from_proto(&proto).unwrap();
    let retry = rc.virtual_hosts[0].routes[0].policy.retry.clone().unwrap();
    assert_eq!((retry.num_retries, retry.retry_on), (4, RetryOn::RESET));
    // max_interval below base_interval is invalid (Envoy, gRPC).
    route_action_mut(&mut proto)
        .retry_policy
        .as_mut()
        .unwrap()
        .retry_back_off = Some(
        envoy_types::pb::envoy::config::route::v3::retry_policy::RetryBackOff {
            base_interval: Some(proto_duration(100)),
            max_interval: Some(proto_duration(10)),
        },
    );
    let err = route_config_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(
        err.to_string()
            .contains("route.retry_policy.retry_back_off.max_interval"),
        "{err}"
    );
}

#[test]
fn hash_policies_keep_their_order_and_first_key_rule() {
    use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::{
        FilterState, PolicySpecifier,
    };
    let rc = route_config_with(RoutePolicy {
        hash_policy: Arc::from([HashPolicy::Header("x-user".into()), HashPolicy::SourceIp]),
        ..Default::default()
    });
    let mut proto = route_config_to_proto(&rc);
    let hash = &route_action_of(&proto).hash_policy;
    assert!(matches!(
        &hash[0].policy_specifier,
        Some(PolicySpecifier::Header(h)) if h.header_name == "x-user"
    ));
    // Every policy but the last is terminal: the first key found decides.
    assert_eq!(
        hash.iter().map(|h| h.terminal).collect::<Vec<_>>(),
        [true, false]
    );
    assert!(matches!(
        &hash[1].policy_specifier,
        Some(PolicySpecifier::ConnectionProperties(c)) if c.source_ip
    ));
    route_action_mut(&mut proto).hash_policy[1].policy_specifier =
        Some(PolicySpecifier::FilterState(FilterState {
            key: "io.grpc.channel_id".into(),
        }));
    let err = route_config_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("route.hash_policy[1].filter_state"),
        "{err}"
    );
}

#[test]
fn ring_hash_cluster_uses_the_ring_hash_enum_and_config() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        LbConfig, ring_hash_lb_config::HashFunction,
    };
    let c = sample_cluster(LbPolicy::RingHash {
        minimum_ring_size: 4096,
    });
    let mut proto = cluster_to_proto(&c);
    assert_eq!(proto.lb_policy, LbEnum::RingHash as i32);
    assert_eq!(proto.load_balancing_policy, None);
    let Some(LbConfig::RingHashLbConfig(config)) = &mut proto.lb_config else {
        panic!("no ring_hash_lb_config: {:?}", proto.lb_config);
    };
    assert_eq!(config.minimum_ring_size.map(|v| v.value), Some(4096));
    assert_eq!(config.hash_function, HashFunction::XxHash as i32);
    assert_eq!(decode_cluster(&encode_cluster(&c)).unwrap(), c);
    // gRPC NACKs other hash functions; so do we.
    config.hash_function = HashFunction::MurmurHash2 as i32;
    let err = cluster_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("ring_hash_lb_config.hash_function: MURMUR_HASH_2"),
        "{err}"
    );
}

fn sample_outlier() -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: Some(3),
        consecutive_gateway_errors: None,
        interval: Duration::from_millis(200),
        base_ejection_time: Duration::from_millis(200),
        max_ejection_percent: 50,
        min_health_percent: 0,
    }
}

#[test]
fn outlier_detection_is_istio_shaped_with_success_rate_off() {
    let c = Cluster {
        outlier_detection: Some(sample_outlier()),
        ..sample_cluster(LbPolicy::RoundRobin)
    };
    let mut proto = cluster_to_proto(&c);
    let od = proto.outlier_detection.clone().unwrap();
    let v = |x: Option<envoy_types::pb::google::protobuf::UInt32Value>| x.map(|x| x.value);
    assert_eq!(v(od.enforcing_success_rate), Some(0));
    assert_eq!(v(od.consecutive_5xx), Some(3));
    assert_eq!(v(od.enforcing_consecutive_5xx), Some(100));
    assert_eq!(v(od.enforcing_consecutive_gateway_failure), Some(0));
    assert_eq!(v(od.max_ejection_percent), Some(50));
    assert_eq!(od.interval, Some(proto_duration(200)));
    assert_eq!(od.base_ejection_time, Some(proto_duration(200)));
    assert_eq!(
        proto
            .common_lb_config
            .as_ref()
            .and_then(|c| c.healthy_panic_threshold)
            .map(|p| p.value),
        Some(0.0)
    );
    assert_eq!(decode_cluster(&encode_cluster(&c)).unwrap(), c);

    // Envoy's default enforcing_success_rate (100) would run success-rate
    // ejection, which this mesh does not do.
    proto
        .outlier_detection
        .as_mut()
        .unwrap()
        .enforcing_success_rate = None;
    let err = cluster_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("outlier_detection.enforcing_success_rate: 100%"),
        "{err}"
    );
    let mut proto = cluster_to_proto(&c);
    proto.outlier_detection.as_mut().unwrap().max_ejection_time = Some(proto_duration(1000));
    let err = cluster_from_proto(&proto).unwrap_err();
    assert!(
        err.to_string()
            .contains("outlier_detection.max_ejection_time"),
        "{err}"
    );
}

#[test]
fn circuit_breakers_are_one_default_threshold_with_every_limit() {
    use envoy_types::pb::envoy::config::core::v3::RoutingPriority;
    let c = Cluster {
        circuit_breakers: CircuitBreakers {
            max_connections: u32::MAX,
            max_pending_requests: 7,
            max_requests: 10,
            max_retries: 2,
            retry_budget: Some(RetryBudget {
                budget: Fraction::from_per_million(250_000),
                min_retry_concurrency: 5,
            }),
        },
        ..sample_cluster(LbPolicy::LeastRequest)
    };
    let mut proto = cluster_to_proto(&c);
    let cb = proto.circuit_breakers.clone().unwrap();
    assert_eq!(cb.thresholds.len(), 1);
    let t = cb.thresholds[0];
    assert_eq!(t.priority, RoutingPriority::Default as i32);
    let v = |x: Option<envoy_types::pb::google::protobuf::UInt32Value>| x.map(|x| x.value);
    assert_eq!(
        [
            v(t.max_connections),
            v(t.max_pending_requests),
            v(t.max_requests),
            v(t.max_retries)
        ],
        [Some(u32::MAX), Some(7), Some(10), Some(2)]
    );
    let budget = t.retry_budget.unwrap();
    assert_eq!(budget.budget_percent.map(|p| p.value), Some(25.0));
    assert_eq!(v(budget.min_retry_concurrency), Some(5));
    assert_eq!(decode_cluster(&encode_cluster(&c)).unwrap(), c);

    // Envoy's defaults when a server sends no limits.
    proto.circuit_breakers = None;
    let decoded = cluster_from_proto(&proto).unwrap().circuit_breakers;
    assert_eq!(
        (
            decoded.max_connections,
            decoded.max_pending_requests,
            decoded.max_requests,
            decoded.max_retries
        ),
        (1024, 1024, 1024, 3)
    );
    // HIGH thresholds alone: unsupported.
    let mut high = cb.clone();
    high.thresholds[0].priority = RoutingPriority::High as i32;
    proto.circuit_breakers = Some(high);
    let err = cluster_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string()
            .contains("circuit_breakers.thresholds: only HIGH"),
        "{err}"
    );
}

#[test]
fn connection_settings_and_locality_failover_are_encoded() {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    let c = Cluster {
        connection: ConnectionSettings {
            connect_timeout: Some(Duration::from_millis(250)),
            idle_timeout: Some(Duration::from_secs(30)),
            max_requests_per_connection: Some(100),
            ..ConnectionSettings::default()
        },
        locality_failover: true,
        slow_start: None,
        tls: None,
        ..sample_cluster(LbPolicy::RoundRobin)
    };
    let proto = cluster_to_proto(&c);
    assert_eq!(proto.connect_timeout, Some(proto_duration(250)));
    let options = HttpProtocolOptions::decode(
        proto.typed_extension_protocol_options[cluster::HTTP_PROTOCOL_OPTIONS_KEY]
            .value
            .as_slice(),
    )
    .unwrap();
    let common = options.common_http_protocol_options.unwrap();
    assert_eq!(common.idle_timeout, Some(proto_duration(30_000)));
    assert_eq!(
        common.max_requests_per_connection.map(|v| v.value),
        Some(100)
    );
    let ours = &proto.metadata.as_ref().unwrap().filter_metadata["proxyless"];
    assert_eq!(
        ours.fields["locality_failover"].kind,
        Some(Kind::BoolValue(true))
    );
    // The deterministic encoding decodes to the same message, every time.
    let any = encode_cluster(&c);
    assert_eq!(ClusterProto::decode(any.value.as_slice()).unwrap(), proto);
    assert_eq!(encode_cluster(&c), any);
    assert_eq!(decode_cluster(&any).unwrap(), c);
}

#[test]
fn durations_saturate_at_the_largest_valid_proto_duration() {
    let forever = duration_to_proto(Duration::MAX);
    assert_eq!((forever.seconds, forever.nanos), (315_576_000_000, 0));
    let d = duration_to_proto(Duration::from_millis(1_500));
    assert_eq!((d.seconds, d.nanos), (1, 500_000_000));
    assert_eq!(
        duration_from_proto(&d).unwrap(),
        Duration::from_millis(1_500)
    );
    let negative = envoy_types::pb::google::protobuf::Duration {
        seconds: -1,
        nanos: 0,
    };
    assert!(duration_from_proto(&negative).is_err());
}

// ---------------------------------------------------------------------------
// Zero trust: cluster mTLS (gRFC A29) and server listeners (A36, A41).

mod zero_trust {
    use envoy_types::pb::envoy::config::core::v3::address;
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier as DataSourceSpecifier;
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType as TsConfig;
    use envoy_types::pb::envoy::config::core::v3::{DataSource, TransportSocket};
    use envoy_types::pb::envoy::config::listener::v3::{
        FilterChain, FilterChainMatch, filter::ConfigType as FilterConfig,
    };
    use envoy_types::pb::envoy::config::route::v3::Route as RouteProto;
    use envoy_types::pb::envoy::config::route::v3::{
        NonForwardingAction, RouteAction, route_action::ClusterSpecifier,
    };
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
    use envoy_types::pb::envoy::extensions::transport_sockets::alts::v3::Alts;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CertificateProviderPluginInstance, CertificateValidationContext, DownstreamTlsContext,
        SubjectAltNameMatcher, UpstreamTlsContext,
        common_tls_context::{
            CertificateProviderInstance, CombinedCertificateValidationContext,
            ValidationContextType,
        },
        subject_alt_name_matcher::SanType,
    };
    use envoy_types::pb::google::protobuf::BoolValue;

    use super::*;
    use crate::model::{MtlsMode, ServerListener};
    use crate::rbac::{
        Action as RbacAction, AuthorizationPolicy, Operation, Rule, Source, StringMatch,
    };
    use crate::rbac_xds::{RBAC_FILTER_NAME, rbac_filter_config, rbac_to_proto};

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).unwrap()
    }

    fn tls_cluster() -> Cluster {
        Cluster {
            tls: Some(UpstreamTls {
                server_identities: vec![id("payment"), id("payment-canary")].into(),
                sni: "outbound_.8080_._.payment.shop.svc.cluster.local".into(),
                origination: TlsOrigination::IstioMutual,
            }),
            ..sample_cluster(LbPolicy::RoundRobin)
        }
    }

    fn upstream_context(proto: &ClusterProto) -> UpstreamTlsContext {
        let ts = proto.transport_socket.as_ref().unwrap();
        let Some(TsConfig::TypedConfig(any)) = &ts.config_type else {
            panic!("no typed_config: {ts:?}")
        };
        UpstreamTlsContext::decode(any.value.as_slice()).unwrap()
    }

    fn set_upstream_context(proto: &mut ClusterProto, context: &UpstreamTlsContext) {
        proto.transport_socket = Some(TransportSocket {
            name: TLS_TRANSPORT_SOCKET.into(),
            config_type: Some(TsConfig::TypedConfig(pack(context))),
        });
    }

    fn validation_mut(context: &mut UpstreamTlsContext) -> &mut CertificateValidationContext {
        match context
            .common_tls_context
            .as_mut()
            .unwrap()
            .validation_context_type
            .as_mut()
        {
            Some(ValidationContextType::ValidationContext(v)) => v,
            other => panic!("{other:?}"),
        }
    }

    /// The error for `cluster` with a modified UpstreamTlsContext.
    fn context_error(cluster: &Cluster, modify: impl FnOnce(&mut UpstreamTlsContext)) -> Error {
        let mut proto = cluster_to_proto(cluster);
        let mut context = upstream_context(&proto);
        modify(&mut context);
        set_upstream_context(&mut proto, &context);
        cluster_from_proto(&proto).unwrap_err()
    }

    /// The cluster error for a modified UpstreamTlsContext.
    fn tls_error(modify: impl FnOnce(&mut UpstreamTlsContext)) -> Error {
        context_error(&tls_cluster(), modify)
    }

    /// Each error is of its kind and its message starts with its prefix.
    #[track_caller]
    fn assert_errors(cases: Vec<(Error, ErrorKind, String)>) {
        for (err, kind, prefix) in cases {
            assert_eq!(err.kind(), kind, "{err}");
            assert!(
                err.to_string().starts_with(&prefix),
                "{err}\n  expected: {prefix}"
            );
        }
    }

    #[test]
    #[allow(deprecated)] // match_subject_alt_names: what gRPC enforces
    fn cluster_tls_is_an_a29_upstream_tls_context() {
        let c = tls_cluster();
        let proto = cluster_to_proto(&c);
        assert_eq!(
            proto.transport_socket.as_ref().unwrap().name,
            "envoy.transport_sockets.tls"
        );
        let context = upstream_context(&proto);
        assert_eq!(
            context.sni,
            "outbound_.8080_._.payment.shop.svc.cluster.local"
        );
        let common = context.common_tls_context.as_ref().unwrap();
        assert_eq!(
            common.tls_certificate_provider_instance,
            Some(CertificateProviderPluginInstance {
                instance_name: "mesh".into(),
                certificate_name: "default".into(),
            })
        );
        let Some(ValidationContextType::ValidationContext(v)) = &common.validation_context_type
        else {
            panic!("{common:?}")
        };
        assert_eq!(
            v.ca_certificate_provider_instance,
            Some(CertificateProviderPluginInstance {
                instance_name: "mesh".into(),
                certificate_name: "ROOTCA".into(),
            })
        );
        let sans: Vec<_> = v
            .match_subject_alt_names
            .iter()
            .map(|m| (m.match_pattern.clone(), m.ignore_case))
            .collect();
        assert_eq!(
            sans,
            [
                (
                    Some(MatchPattern::Exact(
                        "spiffe://cluster.local/ns/shop/sa/payment".into()
                    )),
                    false
                ),
                (
                    Some(MatchPattern::Exact(
                        "spiffe://cluster.local/ns/shop/sa/payment-canary".into()
                    )),
                    false
                ),
            ]
        );
        // Round trip, through the deterministic encoding and the wire.
        let any = encode_cluster(&c);
        assert_eq!(decode_cluster(&over_the_wire(&any)).unwrap(), c);
        // Plaintext clusters have no transport socket.
        let plain = sample_cluster(LbPolicy::RoundRobin);
        assert!(cluster_to_proto(&plain).transport_socket.is_none());
        assert_eq!(decode_cluster(&encode_cluster(&plain)).unwrap().tls, None);
    }

    fn file_tls_cluster(mutual: bool, sans: &[&str]) -> Cluster {
        Cluster {
            tls: Some(UpstreamTls {
                server_identities: Arc::from([]),
                sni: "api.example.com".into(),
                origination: TlsOrigination::Files(FileTls {
                    ca_certificates: Some("/etc/certs/ca.pem".into()),
                    subject_alt_names: sans.iter().map(|s| Name::from(*s)).collect(),
                    client_certificate: mutual.then(|| ClientCertificateFiles {
                        certificate_chain: "/etc/certs/client.pem".into(),
                        private_key: "/etc/certs/client.key".into(),
                    }),
                }),
            }),
            ..sample_cluster(LbPolicy::RoundRobin)
        }
    }

    fn filename(source: Option<&DataSource>) -> Option<&str> {
        match source.and_then(|s| s.specifier.as_ref()) {
            Some(DataSourceSpecifier::Filename(f)) => Some(f),
            _ => None,
        }
    }

    #[test]
    #[allow(deprecated)] // match_subject_alt_names
    fn simple_and_mutual_are_encoded_in_envoys_file_shape_and_round_trip() {
        let mutual = file_tls_cluster(true, &["api.example.com", "spiffe://example.com/api"]);
        let context = upstream_context(&cluster_to_proto(&mutual));
        assert_eq!(context.sni, "api.example.com");
        let common = context.common_tls_context.as_ref().unwrap();
        assert_eq!(common.tls_certificate_provider_instance, None);
        assert_eq!(common.tls_certificates.len(), 1);
        let cert = &common.tls_certificates[0];
        assert_eq!(
            filename(cert.certificate_chain.as_ref()),
            Some("/etc/certs/client.pem")
        );
        assert_eq!(
            filename(cert.private_key.as_ref()),
            Some("/etc/certs/client.key")
        );
        let Some(ValidationContextType::ValidationContext(v)) = &common.validation_context_type
        else {
            panic!("{common:?}")
        };
        assert_eq!(v.ca_certificate_provider_instance, None);
        assert_eq!(filename(v.trusted_ca.as_ref()), Some("/etc/certs/ca.pem"));
        let sans: Vec<_> = v
            .match_subject_alt_names
            .iter()
            .map(|m| m.match_pattern.clone())
            .collect();
        assert_eq!(
            sans,
            [
                Some(MatchPattern::Exact("api.example.com".into())),
                Some(MatchPattern::Exact("spiffe://example.com/api".into())),
            ]
        );
        let simple = file_tls_cluster(false, &[]);
        let context = upstream_context(&cluster_to_proto(&simple));
        assert!(
            context
                .common_tls_context
                .unwrap()
                .tls_certificates
                .is_empty()
        );
        for c in [mutual, simple] {
            let any = encode_cluster(&c);
            assert_eq!(decode_cluster(&over_the_wire(&any)).unwrap(), c);
        }
        // DNS- and URI-typed SAN matchers read the same.
        let c = file_tls_cluster(false, &["api.example.com", "spiffe://example.com/api"]);
        let mut proto = cluster_to_proto(&c);
        let mut context = upstream_context(&proto);
        let v = validation_mut(&mut context);
        v.match_typed_subject_alt_names = v
            .match_subject_alt_names
            .drain(..)
            .zip([SanType::Dns, SanType::Uri])
            .map(|(m, t)| SubjectAltNameMatcher {
                san_type: t as i32,
                matcher: Some(m),
                oid: String::new(),
            })
            .collect();
        set_upstream_context(&mut proto, &context);
        assert_eq!(cluster_from_proto(&proto).unwrap(), c);
    }

    #[test]
    fn file_tls_that_cannot_be_honored_is_rejected_with_the_field() {
        let at =
            "Cluster \"outbound|80||catalog\": transport_socket.typed_config.common_tls_context.";
        let file_error = |mutual: bool, modify: &dyn Fn(&mut UpstreamTlsContext)| {
            context_error(&file_tls_cluster(mutual, &[]), modify)
        };
        let cases: Vec<(Error, ErrorKind, String)> = vec![
            (
                file_error(false, &|c| validation_mut(c).trusted_ca = None),
                // Neither a client certificate nor a CA file: not the file
                // shape, so A29's rules answer.
                ErrorKind::Unsupported,
                format!("{at}tls_certificate_provider_instance: missing"),
            ),
            (
                // A client certificate but no roots at all (neither a CA
                // file nor system_root_certs): Envoy would not verify.
                file_error(true, &|c| validation_mut(c).trusted_ca = None),
                ErrorKind::InvalidConfig,
                format!(
                    "{at}validation_context.trusted_ca: missing: the server's certificate must be verified"
                ),
            ),
            (
                file_error(false, &|c| {
                    validation_mut(c).trusted_ca = Some(DataSource {
                        specifier: Some(DataSourceSpecifier::InlineString("PEM".into())),
                        ..Default::default()
                    })
                }),
                ErrorKind::Unsupported,
                format!(
                    "{at}validation_context.trusted_ca: only filename data sources are supported"
                ),
            ),
            (
                file_error(true, &|c| {
                    c.common_tls_context.as_mut().unwrap().tls_certificates[0].private_key = None;
                }),
                ErrorKind::InvalidConfig,
                format!("{at}tls_certificates[0].private_key: missing"),
            ),
            (
                file_error(true, &|c| {
                    let certs = &mut c.common_tls_context.as_mut().unwrap().tls_certificates;
                    certs.push(certs[0].clone());
                }),
                ErrorKind::Unsupported,
                format!("{at}tls_certificates: 2 certificates"),
            ),
            (
                file_error(false, &|c| validation_mut(c).allow_expired_certificate = true),
                ErrorKind::Unsupported,
                format!("{at}validation_context.allow_expired_certificate"),
            ),
            (
                file_error(false, &|c| {
                    validation_mut(c).match_typed_subject_alt_names.push(SubjectAltNameMatcher {
                        san_type: SanType::Email as i32,
                        matcher: None,
                        oid: String::new(),
                    })
                }),
                ErrorKind::Unsupported,
                format!(
                    "{at}validation_context.match_typed_subject_alt_names[0].san_type: SAN type EMAIL"
                ),
            ),
            (
                file_error(false, &|c| c.sni.clear()),
                ErrorKind::InvalidConfig,
                "Cluster \"outbound|80||catalog\": transport_socket.typed_config.sni: missing: TLS from files needs an sni"
                    .to_string(),
            ),
        ];
        assert_errors(cases);
    }

    #[test]
    #[allow(deprecated)] // the older A29 fields
    fn cluster_tls_in_the_older_a29_form_decodes() {
        let mut proto = cluster_to_proto(&tls_cluster());
        let mut context = upstream_context(&proto);
        let common = context.common_tls_context.as_mut().unwrap();
        common.tls_certificate_provider_instance = None;
        common.tls_certificate_certificate_provider_instance = Some(CertificateProviderInstance {
            instance_name: "mesh".into(),
            certificate_name: "default".into(),
        });
        let Some(ValidationContextType::ValidationContext(mut v)) =
            common.validation_context_type.take()
        else {
            panic!()
        };
        v.ca_certificate_provider_instance = None;
        common.validation_context_type = Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(v),
                validation_context_certificate_provider_instance: Some(
                    CertificateProviderInstance {
                        instance_name: "mesh".into(),
                        certificate_name: "ROOTCA".into(),
                    },
                ),
                ..Default::default()
            },
        ));
        set_upstream_context(&mut proto, &context);
        assert_eq!(cluster_from_proto(&proto).unwrap(), tls_cluster());

        // URI-typed SAN matchers (Envoy's newer form) read the same.
        let mut proto = cluster_to_proto(&tls_cluster());
        let mut context = upstream_context(&proto);
        let v = validation_mut(&mut context);
        v.match_typed_subject_alt_names = v
            .match_subject_alt_names
            .drain(..)
            .map(|m| SubjectAltNameMatcher {
                san_type: SanType::Uri as i32,
                matcher: Some(m),
                oid: String::new(),
            })
            .collect();
        set_upstream_context(&mut proto, &context);
        assert_eq!(cluster_from_proto(&proto).unwrap(), tls_cluster());
    }

    #[test]
    #[allow(deprecated)] // match_subject_alt_names
    fn cluster_tls_that_cannot_be_honored_is_rejected_with_the_field() {
        let at =
            "Cluster \"outbound|80||catalog\": transport_socket.typed_config.common_tls_context.";
        let cases: Vec<(Error, ErrorKind, String)> = vec![
            (
                tls_error(|c| {
                    validation_mut(c).match_subject_alt_names[1].match_pattern =
                        Some(MatchPattern::Prefix("spiffe://cluster.local/".into()));
                }),
                ErrorKind::Unsupported,
                format!("{at}validation_context.match_subject_alt_names[1]: only exact SPIFFE ID"),
            ),
            (
                tls_error(|c| validation_mut(c).match_subject_alt_names[0].ignore_case = true),
                ErrorKind::Unsupported,
                format!("{at}validation_context.match_subject_alt_names[0]: ignore_case"),
            ),
            (
                tls_error(|c| {
                    validation_mut(c).match_subject_alt_names[0].match_pattern =
                        Some(MatchPattern::Exact("payment.shop.svc".into()));
                }),
                ErrorKind::InvalidConfig,
                format!(
                    "{at}validation_context.match_subject_alt_names[0].exact: \"payment.shop.svc\" is not a SPIFFE ID"
                ),
            ),
            (
                tls_error(|c| {
                    validation_mut(c).match_typed_subject_alt_names.push(SubjectAltNameMatcher {
                        san_type: SanType::Dns as i32,
                        matcher: None,
                        oid: String::new(),
                    });
                }),
                ErrorKind::Unsupported,
                format!(
                    "{at}validation_context.match_typed_subject_alt_names[0].san_type: SAN type DNS"
                ),
            ),
            (
                tls_error(|c| {
                    c.common_tls_context
                        .as_mut()
                        .unwrap()
                        .tls_certificate_provider_instance
                        .as_mut()
                        .unwrap()
                        .instance_name = "default".into();
                }),
                ErrorKind::Unsupported,
                format!(
                    "{at}tls_certificate_provider_instance.instance_name: certificate provider instance \"default\" is not supported"
                ),
            ),
            (
                tls_error(|c| {
                    validation_mut(c)
                        .ca_certificate_provider_instance
                        .as_mut()
                        .unwrap()
                        .instance_name = "other".into();
                }),
                ErrorKind::Unsupported,
                format!("{at}validation_context.ca_certificate_provider_instance.instance_name"),
            ),
            (
                tls_error(|c| {
                    c.common_tls_context.as_mut().unwrap().tls_certificate_provider_instance =
                        None;
                }),
                ErrorKind::Unsupported,
                format!("{at}tls_certificate_provider_instance: missing: only mutual TLS"),
            ),
            (
                tls_error(|c| {
                    c.common_tls_context.as_mut().unwrap().validation_context_type = None;
                }),
                ErrorKind::InvalidConfig,
                format!("{at}validation_context: missing: peer certificates must be verified"),
            ),
            (
                tls_error(|c| validation_mut(c).ca_certificate_provider_instance = None),
                ErrorKind::InvalidConfig,
                format!("{at}validation_context.ca_certificate_provider_instance: missing"),
            ),
            (
                tls_error(|c| validation_mut(c).allow_expired_certificate = true),
                ErrorKind::Unsupported,
                format!("{at}validation_context.allow_expired_certificate: not supported"),
            ),
            (
                tls_error(|c| c.auto_host_sni = true),
                ErrorKind::Unsupported,
                "Cluster \"outbound|80||catalog\": transport_socket.typed_config.auto_host_sni: not supported"
                    .to_string(),
            ),
        ];
        assert_errors(cases);
        // Another transport socket altogether.
        let mut proto = cluster_to_proto(&tls_cluster());
        proto.transport_socket = Some(TransportSocket {
            name: "envoy.transport_sockets.alts".into(),
            config_type: Some(TsConfig::TypedConfig(pack(&Alts::default()))),
        });
        let err = cluster_from_proto(&proto).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(
            err.to_string().starts_with(
                "Cluster \"outbound|80||catalog\": transport_socket.typed_config: transport socket \"envoy.transport_sockets.alts\""
            ),
            "{err}"
        );
    }

    // ----------------------------------------------------------- server side

    fn sm(s: &str) -> Arc<[StringMatch]> {
        vec![StringMatch::parse(s).unwrap()].into()
    }

    /// DENY, ALLOW and AUDIT policies, in the decoded order (by action,
    /// then namespace and name).
    fn policies() -> Vec<AuthorizationPolicy> {
        vec![
            AuthorizationPolicy::new(
                "shop",
                "deny-admin",
                RbacAction::Deny,
                vec![Rule {
                    to: vec![Operation {
                        paths: sm("/admin*"),
                        ..Default::default()
                    }]
                    .into(),
                    ..Default::default()
                }],
            )
            .unwrap(),
            AuthorizationPolicy::new(
                "istio-system",
                "allow-frontend",
                RbacAction::Allow,
                vec![Rule {
                    from: vec![Source {
                        principals: sm("cluster.local/ns/shop/sa/frontend"),
                        ..Default::default()
                    }]
                    .into(),
                    ..Default::default()
                }],
            )
            .unwrap(),
            AuthorizationPolicy::new(
                "shop",
                "allow-get",
                RbacAction::Allow,
                vec![Rule {
                    to: vec![Operation {
                        methods: sm("GET"),
                        ..Default::default()
                    }]
                    .into(),
                    ..Default::default()
                }],
            )
            .unwrap(),
            AuthorizationPolicy::new(
                "shop",
                "audit-all",
                RbacAction::Audit,
                vec![Rule::default()],
            )
            .unwrap(),
        ]
    }

    fn server(mtls: MtlsMode, policies: Vec<AuthorizationPolicy>) -> ServerListener {
        ServerListener {
            name: "grpc/server?xds.resource.listening_address=10.0.0.7:8080".into(),
            address: "10.0.0.7:8080".parse().unwrap(),
            mtls,
            policies: policies.into(),
            rate_limit: None,
            cors: Default::default(),
        }
    }

    fn decode_server(any: &Any) -> ServerListener {
        match decode_lds(any).unwrap() {
            LdsResource::Server(s) => s,
            other => panic!("not a server listener: {other:?}"),
        }
    }

    #[test]
    fn server_listeners_round_trip_in_every_mode() {
        let only_deny = vec![policies().remove(0)];
        for mtls in [MtlsMode::Strict, MtlsMode::Permissive, MtlsMode::Disable] {
            for p in [vec![], only_deny.clone(), policies()] {
                let l = server(mtls, p);
                let any = encode_server_listener(&l);
                assert_eq!(any.type_url, LISTENER_TYPE);
                assert_eq!(resource_name(&any), Some(l.name.to_string()));
                assert_eq!(encode_server_listener(&l), any, "deterministic");
                assert_eq!(decode_server(&any), l);
                assert_eq!(decode_server(&over_the_wire(&any)), l);
                assert_eq!(decode_server_listener(&any).unwrap(), l);
                let proto = server_listener_to_proto(&l);
                assert!(is_server_listener(&proto));
                assert_eq!(server_listener_from_proto(&proto).unwrap(), l);
                assert_eq!(decode_lds(&any).unwrap().name(), &l.name);
            }
        }
        // IPv6 addresses too.
        let mut l = server(MtlsMode::Strict, vec![]);
        l.address = "[::]:50051".parse().unwrap();
        assert_eq!(decode_server(&encode_server_listener(&l)), l);
    }

    fn hcm_of(chain: &FilterChain) -> HttpConnectionManager {
        let Some(FilterConfig::TypedConfig(any)) = &chain.filters[0].config_type else {
            panic!()
        };
        HttpConnectionManager::decode(any.value.as_slice()).unwrap()
    }

    fn downstream_of(chain: &FilterChain) -> Option<DownstreamTlsContext> {
        let ts = chain.transport_socket.as_ref()?;
        assert_eq!(ts.name, "envoy.transport_sockets.tls");
        let Some(TsConfig::TypedConfig(any)) = &ts.config_type else {
            panic!()
        };
        Some(DownstreamTlsContext::decode(any.value.as_slice()).unwrap())
    }

    #[test]
    fn server_listener_has_the_a36_shape() {
        let strict = server_listener_to_proto(&server(MtlsMode::Strict, policies()));
        let Some(address::Address::SocketAddress(sa)) =
            strict.address.as_ref().and_then(|a| a.address.clone())
        else {
            panic!()
        };
        assert_eq!(sa.address, "10.0.0.7");
        assert_eq!(
            sa.port_specifier,
            Some(
                envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                    8080
                )
            )
        );
        assert!(strict.api_listener.is_none());
        let [chain] = strict.filter_chains.as_slice() else {
            panic!()
        };
        let tls = downstream_of(chain).unwrap();
        assert_eq!(
            tls.require_client_certificate,
            Some(BoolValue { value: true })
        );
        let common = tls.common_tls_context.unwrap();
        assert_eq!(
            common
                .tls_certificate_provider_instance
                .unwrap()
                .instance_name,
            "mesh"
        );
        let Some(ValidationContextType::ValidationContext(v)) = common.validation_context_type
        else {
            panic!()
        };
        assert_eq!(
            v.ca_certificate_provider_instance.unwrap().certificate_name,
            "ROOTCA"
        );
        assert_eq!(
            chain.filters[0].name,
            "envoy.filters.network.http_connection_manager"
        );
        let hcm = hcm_of(chain);
        let Some(RouteSpecifier::RouteConfig(rc)) = &hcm.route_specifier else {
            panic!()
        };
        assert_eq!(rc.name, "inbound|8080");
        assert_eq!(rc.virtual_hosts[0].domains, ["*"]);
        let route = &rc.virtual_hosts[0].routes[0];
        assert_eq!(
            route.r#match.as_ref().unwrap().path_specifier,
            Some(PathSpecifier::Prefix("/".into()))
        );
        assert_eq!(
            route.action,
            Some(Action::NonForwardingAction(NonForwardingAction {}))
        );
        let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                RBAC_FILTER_NAME,
                RBAC_FILTER_NAME,
                RBAC_FILTER_NAME,
                "envoy.filters.http.router"
            ]
        );
        // DENY, ALLOW, LOG: the filter configs are rbac_xds's, in order.
        let expected: Vec<Any> = rbac_to_proto(&policies())
            .iter()
            .map(rbac_filter_config)
            .collect();
        let configs: Vec<Any> = hcm.http_filters[..3]
            .iter()
            .map(|f| match &f.config_type {
                Some(ConfigType::TypedConfig(any)) => any.clone(),
                _ => panic!(),
            })
            .collect();
        assert_eq!(configs, expected);

        let permissive = server_listener_to_proto(&server(MtlsMode::Permissive, vec![]));
        let protocols: Vec<(String, Option<bool>)> = permissive
            .filter_chains
            .iter()
            .map(|c| {
                (
                    c.filter_chain_match
                        .clone()
                        .unwrap_or_default()
                        .transport_protocol,
                    downstream_of(c).map(|t| t.require_client_certificate.unwrap().value),
                )
            })
            .collect();
        assert_eq!(
            protocols,
            [("tls".into(), Some(false)), ("raw_buffer".into(), None)]
        );
        // Without policies: only the router.
        assert_eq!(hcm_of(&permissive.filter_chains[1]).http_filters.len(), 1);

        let disable = server_listener_to_proto(&server(MtlsMode::Disable, vec![]));
        let [chain] = disable.filter_chains.as_slice() else {
            panic!()
        };
        assert!(chain.transport_socket.is_none());
    }

    /// What a gRPC control plane sends a gRPC server: a plaintext chain
    /// matching raw_buffer, a route with non_forwarding_action.
    fn grpc_style_listener() -> ListenerProto {
        let hcm = HttpConnectionManager {
            route_specifier: Some(RouteSpecifier::RouteConfig(RouteConfiguration {
                name: "inbound|50051".into(),
                virtual_hosts: vec![envoy_types::pb::envoy::config::route::v3::VirtualHost {
                    name: "inbound|http|50051".into(),
                    domains: vec!["*".into()],
                    routes: vec![RouteProto {
                        r#match: Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
                            path_specifier: Some(PathSpecifier::Prefix(String::new())),
                            ..Default::default()
                        }),
                        action: Some(Action::NonForwardingAction(NonForwardingAction {})),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            })),
            http_filters: vec![HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(ConfigType::TypedConfig(pack(
                    &envoy_types::pb::envoy::extensions::filters::http::router::v3::Router::default(
                    ),
                ))),
                ..Default::default()
            }],
            ..Default::default()
        };
        ListenerProto {
            name: "grpc/server?xds.resource.listening_address=0.0.0.0:50051".into(),
            address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                address: Some(address::Address::SocketAddress(
                    envoy_types::pb::envoy::config::core::v3::SocketAddress {
                        address: "0.0.0.0".into(),
                        port_specifier: Some(
                            envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(50051),
                        ),
                        ..Default::default()
                    },
                )),
            }),
            filter_chains: vec![FilterChain {
                filter_chain_match: Some(FilterChainMatch {
                    transport_protocol: "raw_buffer".into(),
                    destination_port: Some(envoy_types::pb::google::protobuf::UInt32Value {
                        value: 50051,
                    }),
                    ..Default::default()
                }),
                filters: vec![envoy_types::pb::envoy::config::listener::v3::Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(FilterConfig::TypedConfig(pack(&hcm))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn hcm_mut(proto: &mut ListenerProto, edit: impl FnOnce(&mut HttpConnectionManager)) {
        let chain = &mut proto.filter_chains[0];
        let mut hcm = hcm_of(chain);
        edit(&mut hcm);
        chain.filters[0].config_type = Some(FilterConfig::TypedConfig(pack(&hcm)));
    }

    fn route_mut(proto: &mut ListenerProto, edit: impl FnOnce(&mut RouteProto)) {
        hcm_mut(proto, |hcm| {
            let Some(RouteSpecifier::RouteConfig(rc)) = &mut hcm.route_specifier else {
                panic!()
            };
            edit(&mut rc.virtual_hosts[0].routes[0]);
        });
    }

    #[test]
    #[allow(deprecated)] // the older A29 fields
    fn a_grpc_style_server_listener_decodes() {
        let proto = grpc_style_listener();
        let l = server_listener_from_proto(&proto).unwrap();
        assert_eq!(l.mtls, MtlsMode::Disable);
        assert_eq!(l.address, "0.0.0.0:50051".parse().unwrap());
        assert!(l.policies.is_empty());
        assert!(matches!(
            decode_lds(&pack(&proto)).unwrap(),
            LdsResource::Server(_)
        ));

        // STRICT in the older A29 form, with an ALLOW RBAC filter.
        let mut strict = grpc_style_listener();
        let chain = &mut strict.filter_chains[0];
        chain.filter_chain_match = None;
        chain.transport_socket = Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(TsConfig::TypedConfig(pack(&DownstreamTlsContext {
                require_client_certificate: Some(BoolValue { value: true }),
                common_tls_context: Some(
                    envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CommonTlsContext {
                        tls_certificate_certificate_provider_instance: Some(
                            CertificateProviderInstance {
                                instance_name: "mesh".into(),
                                certificate_name: "default".into(),
                            },
                        ),
                        validation_context_type: Some(
                            ValidationContextType::CombinedValidationContext(
                                CombinedCertificateValidationContext {
                                    default_validation_context: Some(Default::default()),
                                    validation_context_certificate_provider_instance: Some(
                                        CertificateProviderInstance {
                                            instance_name: "mesh".into(),
                                            certificate_name: "ROOTCA".into(),
                                        },
                                    ),
                                    ..Default::default()
                                },
                            ),
                        ),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            }))),
        });
        let allow = vec![policies().remove(1)];
        hcm_mut(&mut strict, |hcm| {
            hcm.http_filters.insert(
                0,
                HttpFilter {
                    name: RBAC_FILTER_NAME.into(),
                    config_type: Some(ConfigType::TypedConfig(rbac_filter_config(
                        &rbac_to_proto(&allow)[0],
                    ))),
                    ..Default::default()
                },
            );
        });
        let l = server_listener_from_proto(&strict).unwrap();
        assert_eq!(l.mtls, MtlsMode::Strict);
        assert_eq!(&*l.policies, allow.as_slice());

        // Filters in another order (ALLOW before DENY) decode in evaluation order.
        let mut swapped =
            server_listener_to_proto(&server(MtlsMode::Disable, policies()[..3].to_vec()));
        hcm_mut(&mut swapped, |hcm| hcm.http_filters.swap(0, 1));
        assert_eq!(
            &*server_listener_from_proto(&swapped).unwrap().policies,
            &policies()[..3]
        );
    }

    #[test]
    fn client_listeners_decode_as_before() {
        let l = Listener {
            name: "payment".into(),
            route_config_name: "payment-routes".into(),
        };
        match decode_lds(&encode_listener(&l)).unwrap() {
            LdsResource::Client(c) => assert_eq!(c, l),
            other => panic!("{other:?}"),
        }
        // Neither api_listener nor filter chains: the client listener error.
        let bare = ListenerProto {
            name: "x".into(),
            ..Default::default()
        };
        assert!(!is_server_listener(&bare));
        let err = decode_lds(&pack(&bare)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Listener \"x\": api_listener: missing: only client (API) listeners"),
            "{err}"
        );
        // The client decoder still refuses server listeners.
        let any = encode_server_listener(&server(MtlsMode::Strict, vec![]));
        assert!(decode_listener(&any).is_err());
    }

    /// The error decoding `proto` as a server listener, which must start
    /// with `prefix` (after `Listener "<name>": `).
    fn assert_server_error(proto: &ListenerProto, kind: ErrorKind, prefix: &str) {
        let err = decode_lds(&pack(proto)).unwrap_err();
        let msg = err.to_string();
        let rest = msg
            .strip_prefix(&format!("Listener {:?}: ", proto.name))
            .unwrap_or_else(|| panic!("unnamed: {msg}"));
        assert!(rest.starts_with(prefix), "{msg}\n  expected: {prefix}");
        assert_eq!(err.kind(), kind, "{msg}");
    }

    #[test]
    fn malformed_server_listeners_are_rejected_with_the_field() {
        let hcm_at = "filter_chains[0].filters[0].typed_config.";
        let mut p = grpc_style_listener();
        route_mut(&mut p, |r| {
            r.action = Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster("backend".into())),
                ..Default::default()
            }));
        });
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            &format!(
                "{hcm_at}route_config.virtual_hosts[0].routes[0].action: routes of a server listener must have non_forwarding_action"
            ),
        );

        let mut p = grpc_style_listener();
        route_mut(&mut p, |r| {
            r.r#match.as_mut().unwrap().path_specifier = Some(PathSpecifier::Prefix("/api".into()));
        });
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            &format!(
                "{hcm_at}route_config.virtual_hosts[0].routes: no route matches every request"
            ),
        );

        let mut p = grpc_style_listener();
        hcm_mut(&mut p, |hcm| {
            hcm.route_specifier = Some(RouteSpecifier::Rds(Default::default()));
        });
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            &format!("{hcm_at}rds: RDS is not supported"),
        );

        let mut p = grpc_style_listener();
        hcm_mut(&mut p, |hcm| {
            hcm.http_filters.insert(
                0,
                HttpFilter {
                    name: "envoy.filters.http.fault".into(),
                    config_type: Some(ConfigType::TypedConfig(pack(&HttpFault::default()))),
                    ..Default::default()
                },
            );
        });
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            &format!("{hcm_at}http_filters[0]: HTTP filter \"envoy.filters.http.fault\""),
        );

        let mut p = grpc_style_listener();
        hcm_mut(&mut p, |hcm| hcm.http_filters.clear());
        assert_server_error(
            &p,
            ErrorKind::InvalidConfig,
            &format!("{hcm_at}http_filters: empty"),
        );

        let mut p = grpc_style_listener();
        p.filter_chains[0]
            .filter_chain_match
            .as_mut()
            .unwrap()
            .transport_protocol = "quic".into();
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            "filter_chains[0].filter_chain_match.transport_protocol: \"quic\"",
        );

        let mut p = grpc_style_listener();
        p.filter_chains[0]
            .filter_chain_match
            .as_mut()
            .unwrap()
            .server_names = vec!["a".into()];
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            "filter_chains[0].filter_chain_match.server_names: only transport_protocol",
        );

        let mut p = grpc_style_listener();
        p.address = None;
        assert_server_error(
            &p,
            ErrorKind::InvalidConfig,
            "address.socket_address: missing",
        );

        let mut p = grpc_style_listener();
        if let Some(address::Address::SocketAddress(sa)) =
            p.address.as_mut().and_then(|a| a.address.as_mut())
        {
            sa.address = "server.local".into();
        }
        assert_server_error(
            &p,
            ErrorKind::InvalidConfig,
            "address.socket_address.address: \"server.local\" is not an IP address",
        );

        // Two chains for the same connections.
        let mut p = grpc_style_listener();
        p.filter_chains.push(p.filter_chains[0].clone());
        assert_server_error(
            &p,
            ErrorKind::InvalidConfig,
            "filter_chains[1]: the same filter_chain_match",
        );

        // Chains that authorize differently.
        let mut p = server_listener_to_proto(&server(MtlsMode::Permissive, policies()));
        let other = server_listener_to_proto(&server(MtlsMode::Permissive, vec![]));
        p.filter_chains[1].filters = other.filter_chains[1].filters.clone();
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            "filter_chains[1]: its RBAC policies differ from those of filter_chains[0]",
        );

        // PERMISSIVE whose TLS chain requires a client certificate.
        let mut p = server_listener_to_proto(&server(MtlsMode::Permissive, vec![]));
        p.filter_chains[0].transport_socket =
            server_listener_to_proto(&server(MtlsMode::Strict, vec![])).filter_chains[0]
                .transport_socket
                .clone();
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            "filter_chains[0].transport_socket.typed_config.require_client_certificate: a TLS chain next to a plaintext chain",
        );

        // TLS without a client certificate and no plaintext chain.
        let mut p = server_listener_to_proto(&server(MtlsMode::Permissive, vec![]));
        p.filter_chains.pop();
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            "filter_chains[0]: TLS without a required client certificate",
        );

        // A "tls" chain without TLS.
        let mut p = server_listener_to_proto(&server(MtlsMode::Permissive, vec![]));
        p.filter_chains[0].transport_socket = None;
        assert_server_error(
            &p,
            ErrorKind::InvalidConfig,
            "filter_chains[0].transport_socket: a chain matching transport_protocol \"tls\"",
        );

        // Server-side SAN matching.
        let mut p = server_listener_to_proto(&server(MtlsMode::Strict, vec![]));
        let mut tls = downstream_of(&p.filter_chains[0]).unwrap();
        #[allow(deprecated)]
        if let Some(ValidationContextType::ValidationContext(v)) = &mut tls
            .common_tls_context
            .as_mut()
            .unwrap()
            .validation_context_type
        {
            v.match_subject_alt_names.push(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(id("frontend").as_str().into())),
                ignore_case: false,
            });
        }
        p.filter_chains[0].transport_socket = Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(TsConfig::TypedConfig(pack(&tls))),
        });
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            "filter_chains[0].transport_socket.typed_config.common_tls_context.validation_context.match_subject_alt_names: matching client certificates by SAN",
        );

        // No chains at all, but an address: a server listener without chains.
        let mut p = grpc_style_listener();
        p.filter_chains.clear();
        assert_server_error(&p, ErrorKind::InvalidConfig, "filter_chains: missing");

        // Two ALLOW filters.
        let mut p = grpc_style_listener();
        let allow = rbac_filter_config(&rbac_to_proto(&policies()[1..2])[0]);
        hcm_mut(&mut p, |hcm| {
            for _ in 0..2 {
                hcm.http_filters.insert(
                    0,
                    HttpFilter {
                        name: RBAC_FILTER_NAME.into(),
                        config_type: Some(ConfigType::TypedConfig(allow.clone())),
                        ..Default::default()
                    },
                );
            }
        });
        assert_server_error(
            &p,
            ErrorKind::Unsupported,
            &format!("{hcm_at}http_filters[1]: a second ALLOW RBAC filter"),
        );
    }
}
