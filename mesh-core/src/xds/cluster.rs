//! CDS: EDS clusters (and DNS ones: the `cluster_dns` module), their
//! load-balancing policy (gRFC A27, A42, A48, A52) and upstream protocol. Circuit breakers, outlier detection and
//! connection settings are in the `cluster_policy` module.
//!
//! Ring hash is the `lb_policy: RING_HASH` enum with `ring_hash_lb_config
//! { minimum_ring_size, hash_function: XX_HASH }`, as Istio writes it and
//! gRPC reads it (A42); the `RingHash` extension policy is read too.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster as ClusterProto, LoadBalancingPolicy,
    cluster::{
        ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbConfig, LbPolicy as LbEnum,
        RingHashLbConfig, ring_hash_lb_config::HashFunction,
    },
    load_balancing_policy::Policy,
};
use envoy_types::pb::envoy::config::core::v3::{
    Http1ProtocolOptions, Http2ProtocolOptions, Metadata, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::{
    least_request::v3::LeastRequest,
    random::v3::Random,
    ring_hash::v3::{RingHash, ring_hash::HashFunction as ExtHashFunction},
    round_robin::v3::RoundRobin,
    wrr_locality::v3::WrrLocality,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    },
};
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, UInt64Value, Value, value::Kind};
use prost::Name as _;

use super::cluster_policy::{
    breakers_from_proto, breakers_to_proto, common_http_to_proto, connection_from_proto,
    keepalive_from_proto, keepalive_to_proto, outlier_from_proto, outlier_to_proto,
};
use super::tls::Transport;
use super::{
    At, Decoded, FieldError, METADATA_NAMESPACE, ResourceType, ads_config_source,
    check_config_source, duration_to_proto, missing, named, pack, reject_if, required_name,
    type_name, unpack,
};
use crate::Error;
use crate::model::{Cluster, LbPolicy, Protocol};

/// The `typed_extension_protocol_options` key of the upstream HTTP options.
pub(crate) const HTTP_PROTOCOL_OPTIONS_KEY: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Our metadata key of the upstream protocol.
pub(crate) const PROTOCOL_KEY: &str = "protocol";
/// Our metadata key of `locality_failover` (written only when true).
pub(crate) const LOCALITY_FAILOVER_KEY: &str = "locality_failover";
/// Envoy's and gRPC's default `minimum_ring_size`.
const DEFAULT_MIN_RING_SIZE: u64 = 1024;
/// The largest ring gRPC (A42) and Envoy's proto validation accept.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
const WRR_LOCALITY_NAME: &str = "envoy.load_balancing_policies.wrr_locality";
const ROUND_ROBIN_NAME: &str = "envoy.load_balancing_policies.round_robin";
const LEAST_REQUEST_NAME: &str = "envoy.load_balancing_policies.least_request";
const RANDOM_NAME: &str = "envoy.load_balancing_policies.random";

/// Policies gRPC clients know and this mesh does not implement: a list that
/// names one of them before one we know would be served by it, so it is
/// rejected rather than skipped.
const KNOWN_UNSUPPORTED_POLICIES: &[&str] = &[
    "envoy.extensions.load_balancing_policies.maglev.v3.Maglev",
    "envoy.extensions.load_balancing_policies.pick_first.v3.PickFirst",
    "envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin",
];

/// The proto for a cluster: `type: EDS` over ADS, its lb policy (see the
/// module docs of [`crate::xds`] for why least-request is not the
/// `lb_policy` enum), its protocol, limits, outlier detection,
/// connection settings and, with `tls`, the A29 `UpstreamTlsContext`.
pub fn cluster_to_proto(cluster: &Cluster) -> ClusterProto {
    let (lb_policy, lb_config, load_balancing_policy) = match cluster.lb_policy {
        LbPolicy::RoundRobin => (
            LbEnum::RoundRobin,
            super::slow_start::round_robin_lb_config(cluster.slow_start),
            None,
        ),
        LbPolicy::LeastRequest => (
            LbEnum::RoundRobin,
            None,
            Some(wrr_locality(typed_policy(
                LEAST_REQUEST_NAME,
                pack(&LeastRequest {
                    slow_start_config: super::slow_start::typed(cluster.slow_start),
                    ..LeastRequest::default()
                }),
            ))),
        ),
        LbPolicy::Random => (
            LbEnum::RoundRobin,
            None,
            Some(wrr_locality(typed_policy(
                RANDOM_NAME,
                pack(&Random::default()),
            ))),
        ),
        LbPolicy::RingHash { minimum_ring_size } => (
            LbEnum::RingHash,
            Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                minimum_ring_size: Some(UInt64Value {
                    value: minimum_ring_size,
                }),
                hash_function: HashFunction::XxHash as i32,
                maximum_ring_size: None,
            })),
            None,
        ),
    };
    // HTTP/2 for HTTP/2 and gRPC clusters, and for HTTP/1.1 ones upgraded
    // (Istio's `h2UpgradePolicy: UPGRADE`, which our metadata's protocol
    // still calls http1); `max_concurrent_streams` only there, as Istio.
    let protocol_config = if cluster.protocol.is_http2() || cluster.connection.h2_upgrade {
        ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions {
            max_concurrent_streams: cluster
                .connection
                .max_concurrent_streams
                .map(|value| UInt32Value { value }),
            ..Default::default()
        })
    } else {
        ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())
    };
    let options = HttpProtocolOptions {
        common_http_protocol_options: common_http_to_proto(&cluster.connection),
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(protocol_config),
            },
        )),
        ..Default::default()
    };
    let (outlier_detection, common_lb_config) = match &cluster.outlier_detection {
        Some(o) => {
            let (outlier, common) = outlier_to_proto(o);
            (Some(outlier), Some(common))
        }
        None => (None, None),
    };
    let mut ours = HashMap::from([(
        PROTOCOL_KEY.to_string(),
        Value {
            kind: Some(Kind::StringValue(protocol_name(cluster.protocol).into())),
        },
    )]);
    if cluster.locality_failover {
        ours.insert(
            LOCALITY_FAILOVER_KEY.to_string(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        );
    }
    let mut proto = ClusterProto {
        name: cluster.name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: cluster.eds_service_name.to_string(),
        }),
        lb_policy: lb_policy as i32,
        lb_config,
        load_balancing_policy,
        connect_timeout: cluster.connection.connect_timeout.map(duration_to_proto),
        upstream_connection_options: keepalive_to_proto(&cluster.connection),
        circuit_breakers: Some(breakers_to_proto(&cluster.circuit_breakers)),
        outlier_detection,
        transport_socket: cluster.tls.as_ref().map(super::tls::upstream_to_proto),
        common_lb_config,
        typed_extension_protocol_options: HashMap::from([(
            HTTP_PROTOCOL_OPTIONS_KEY.to_string(),
            pack(&options),
        )]),
        metadata: Some(Metadata {
            filter_metadata: HashMap::from([(
                METADATA_NAMESPACE.to_string(),
                Struct { fields: ours },
            )]),
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(dns) = cluster.discovery.dns() {
        super::cluster_dns::dns_to_proto(&mut proto, dns);
    }
    proto
}

/// Our metadata's name of a protocol.
pub(crate) fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Grpc => "grpc",
    }
}

fn typed_policy(name: &str, config: super::Any) -> Policy {
    Policy {
        typed_extension_config: Some(TypedExtensionConfig {
            name: name.to_string(),
            typed_config: Some(config),
        }),
    }
}

/// `wrr_locality { endpoint_picking_policy: [first, round_robin] }`:
/// locality weights as gRPC applies them, round robin for clients that do
/// not know `first`.
fn wrr_locality(first: Policy) -> LoadBalancingPolicy {
    let child = LoadBalancingPolicy {
        policies: vec![
            first,
            typed_policy(ROUND_ROBIN_NAME, pack(&RoundRobin::default())),
        ],
    };
    LoadBalancingPolicy {
        policies: vec![typed_policy(
            WRR_LOCALITY_NAME,
            pack(&WrrLocality {
                endpoint_picking_policy: Some(child),
            }),
        )],
    }
}

/// The cluster a proto describes. Only EDS clusters are accepted; the lb
/// policy comes from `load_balancing_policy` when set (the first policy this
/// mesh knows wins, as in gRPC), else from the `lb_policy` enum. The protocol
/// comes from our metadata when present, else from the upstream
/// `HttpProtocolOptions`, else HTTP/1.1. Circuit breakers, outlier detection
/// and connection settings: see the `cluster_policy` module.
pub fn cluster_from_proto(proto: &ClusterProto) -> Result<Cluster, Error> {
    cluster_fields(proto).map_err(named(ResourceType::Cluster, &proto.name))
}

#[allow(deprecated)] // common_http_protocol_options, max_requests_per_connection: read as fallbacks
fn cluster_fields(c: &ClusterProto) -> Decoded<Cluster> {
    let name = required_name(&c.name, "name")?;
    const ONLY: &str = "only EDS, STRICT_DNS and LOGICAL_DNS";
    let dns = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32 => None,
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::StrictDns as i32 => Some(false),
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::LogicalDns as i32 => Some(true),
        Some(ClusterDiscoveryType::Type(t)) => {
            let kind = DiscoveryType::try_from(*t).map_or("unknown", |d| d.as_str_name());
            return Err(FieldError::unsupported(format!(
                "{kind} clusters are not supported: {ONLY}"
            ))
            .at("type"));
        }
        Some(ClusterDiscoveryType::ClusterType(custom)) => {
            return Err(FieldError::unsupported(format!(
                "custom cluster type {:?} is not supported: {ONLY}",
                custom.name
            ))
            .at("cluster_type"));
        }
        None => {
            return Err(FieldError::unsupported(format!(
                "STATIC clusters are not supported: {ONLY}"
            ))
            .at("type"));
        }
    };
    let (eds_service_name, discovery) = match dns {
        Some(logical) => (
            name.clone(),
            super::cluster_dns::dns_from_proto(c, logical)?,
        ),
        None => {
            let eds = c
                .eds_cluster_config
                .as_ref()
                .ok_or_else(|| missing("eds_cluster_config"))?;
            check_config_source(eds.eds_config.as_ref()).at("eds_cluster_config.eds_config")?;
            let eds_service_name = if eds.service_name.is_empty() {
                name.clone()
            } else {
                eds.service_name.as_str().into()
            };
            (eds_service_name, crate::model::Discovery::Eds)
        }
    };
    reject_if(c.lb_subset_config.is_some(), "lb_subset_config")?;
    reject_if(
        !c.transport_socket_matches.is_empty(),
        "transport_socket_matches",
    )?;
    reject_if(
        c.transport_socket_matcher.is_some(),
        "transport_socket_matcher",
    )?;
    let tls =
        match super::tls::transport_from_proto::<UpstreamTlsContext>(c.transport_socket.as_ref())
            .at("transport_socket")?
        {
            Transport::Plaintext => None,
            Transport::Tls(context) => Some(
                super::tls::upstream_from_proto(&context)
                    .at("typed_config")
                    .at("transport_socket")?,
            ),
        };
    let lb_policy = match &c.load_balancing_policy {
        Some(policy) => policy_from_list(policy).at("load_balancing_policy")?,
        None => lb_enum_from_proto(c)?,
    };
    let options = http_options(c).at(OPTIONS_AT)?;
    let protocol = protocol_from_proto(c, options.as_ref())?;
    let typed_common = options
        .as_ref()
        .and_then(|o| o.common_http_protocol_options.as_ref());
    let mut connection = match typed_common {
        Some(common) => connection_from_proto(Some(common))
            .at("common_http_protocol_options")
            .at(OPTIONS_AT)?,
        None => connection_from_proto(c.common_http_protocol_options.as_ref())
            .at("common_http_protocol_options")?,
    };
    connection.connect_timeout = opt_positive(c.connect_timeout.as_ref(), "connect_timeout")?;
    connection.tcp_keepalive = keepalive_from_proto(c.upstream_connection_options.as_ref())
        .at("upstream_connection_options")?;
    let http2 = http2_options(c, options.as_ref());
    connection.h2_upgrade = protocol == Protocol::Http1 && http2.is_some();
    connection.max_concurrent_streams = http2
        .and_then(|o| o.max_concurrent_streams)
        .map(|v| v.value);
    if connection.max_requests_per_connection.is_none() {
        connection.max_requests_per_connection = c.max_requests_per_connection.map(|v| v.value);
    }
    let circuit_breakers =
        breakers_from_proto(c.circuit_breakers.as_ref()).at("circuit_breakers")?;
    let outlier_detection = c
        .outlier_detection
        .as_ref()
        .map(|o| outlier_from_proto(o, c.common_lb_config.as_ref()))
        .transpose()
        .at("outlier_detection")?;
    Ok(Cluster {
        eds_service_name,
        lb_policy,
        circuit_breakers,
        outlier_detection,
        connection,
        locality_failover: locality_failover_from_proto(c)?,
        slow_start: super::slow_start::from_proto(c)?,
        tls,
        discovery,
        ..Cluster::new(name, protocol)
    })
}

/// `typed_extension_protocol_options[...HttpProtocolOptions]`, the path of
/// errors in the upstream HTTP options.
const OPTIONS_AT: &str =
    "typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"]";

/// An optional positive duration (zero is invalid, as Envoy's `gt: 0s`).
fn opt_positive(
    d: Option<&envoy_types::pb::google::protobuf::Duration>,
    field: &'static str,
) -> Decoded<Option<std::time::Duration>> {
    match super::opt_duration(d, field)? {
        Some(d) if d.is_zero() => Err(FieldError::invalid("must be positive").at(field)),
        other => Ok(other),
    }
}

/// The upstream HTTP options, if present; its features that would change
/// what is sent upstream (upstream filters, cluster-level retry, hash,
/// mirror and outlier policies) are unsupported.
fn http_options(c: &ClusterProto) -> Decoded<Option<HttpProtocolOptions>> {
    let Some(any) = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS_KEY)
    else {
        return Ok(None);
    };
    let options: HttpProtocolOptions = unpack(any)?;
    reject_if(!options.http_filters.is_empty(), "http_filters")?;
    reject_if(options.outlier_detection.is_some(), "outlier_detection")?;
    reject_if(
        !options.request_mirror_policies.is_empty(),
        "request_mirror_policies",
    )?;
    reject_if(!options.hash_policy.is_empty(), "hash_policy")?;
    reject_if(options.retry_policy.is_some(), "retry_policy")?;
    Ok(Some(options))
}

fn lb_enum_from_proto(c: &ClusterProto) -> Decoded<LbPolicy> {
    match LbEnum::try_from(c.lb_policy) {
        Ok(LbEnum::RoundRobin) => Ok(LbPolicy::RoundRobin),
        Ok(LbEnum::LeastRequest) => {
            if let Some(LbConfig::LeastRequestLbConfig(config)) = &c.lb_config {
                check_choice_count(config.choice_count.as_ref())
                    .at("least_request_lb_config.choice_count")?;
            }
            Ok(LbPolicy::LeastRequest)
        }
        Ok(LbEnum::Random) => Ok(LbPolicy::Random),
        Ok(LbEnum::RingHash) => {
            if let Some(common) = c
                .common_lb_config
                .as_ref()
                .and_then(|common| common.consistent_hashing_lb_config.as_ref())
            {
                check_consistent_hashing(
                    common.use_hostname_for_hashing,
                    common.hash_balance_factor.is_some(),
                )
                .at("common_lb_config.consistent_hashing_lb_config")?;
            }
            let config = match &c.lb_config {
                Some(LbConfig::RingHashLbConfig(config)) => *config,
                _ => RingHashLbConfig::default(),
            };
            let murmur = match HashFunction::try_from(config.hash_function) {
                Ok(HashFunction::XxHash) => false,
                Ok(HashFunction::MurmurHash2) => true,
                Err(_) => {
                    return Err(FieldError::invalid(format!(
                        "unknown value {}",
                        config.hash_function
                    ))
                    .at("ring_hash_lb_config.hash_function"));
                }
            };
            ring_hash(murmur, config.minimum_ring_size, config.maximum_ring_size)
                .at("ring_hash_lb_config")
        }
        Ok(other) => Err(FieldError::unsupported(format!(
            "{} is not supported: use ROUND_ROBIN, LEAST_REQUEST, RANDOM or RING_HASH",
            other.as_str_name()
        ))
        .at("lb_policy")),
        Err(_) => {
            Err(FieldError::invalid(format!("unknown value {}", c.lb_policy)).at("lb_policy"))
        }
    }
}

/// A ring hash of XX_HASH (gRPC NACKs anything else, A42) whose minimum
/// size is in [1, 8M] (default 1024) and whose maximum, if set, is not
/// below it. The maximum is otherwise not modeled: rings are sized from
/// the minimum.
fn ring_hash(
    murmur: bool,
    minimum: Option<UInt64Value>,
    maximum: Option<UInt64Value>,
) -> Decoded<LbPolicy> {
    if murmur {
        return Err(FieldError::unsupported(
            "MURMUR_HASH_2 is not supported: only XX_HASH (as gRPC, gRFC A42)",
        )
        .at("hash_function"));
    }
    let minimum_ring_size = minimum.map_or(DEFAULT_MIN_RING_SIZE, |v| v.value);
    if !(1..=MAX_RING_SIZE).contains(&minimum_ring_size) {
        return Err(FieldError::invalid(format!(
            "{minimum_ring_size} is not in [1, {MAX_RING_SIZE}]"
        ))
        .at("minimum_ring_size"));
    }
    if let Some(max) = maximum
        && !(minimum_ring_size..=MAX_RING_SIZE).contains(&max.value)
    {
        return Err(FieldError::invalid(format!(
            "{} is not in [minimum_ring_size ({minimum_ring_size}), {MAX_RING_SIZE}]",
            max.value
        ))
        .at("maximum_ring_size"));
    }
    Ok(LbPolicy::RingHash { minimum_ring_size })
}

/// Hashing by hostname and bounded loads are not supported.
fn check_consistent_hashing(use_hostname: bool, balance_factor: bool) -> Decoded<()> {
    reject_if(use_hostname, "use_hostname_for_hashing")?;
    reject_if(balance_factor, "hash_balance_factor")
}

/// Power of two choices is what we implement; other choice counts are rejected.
fn check_choice_count(count: Option<&UInt32Value>) -> Decoded<()> {
    match count {
        None => Ok(()),
        Some(c) if c.value == 2 => Ok(()),
        Some(c) => Err(FieldError::unsupported(format!(
            "{} is not supported: only 2 (power of two choices)",
            c.value
        ))),
    }
}

/// The first policy of the list this mesh knows (as gRPC does, gRFC A52);
/// unknown policies are skipped, but one gRPC would use and we cannot is
/// rejected.
fn policy_from_list(list: &LoadBalancingPolicy) -> Decoded<LbPolicy> {
    for (i, policy) in list.policies.iter().enumerate() {
        if let Some(found) = policy_from_proto(policy).at_index("policies", i)? {
            return Ok(found);
        }
    }
    Err(FieldError::unsupported(
        "no supported policy: use round_robin, least_request, random (optionally inside \
         wrr_locality) or ring_hash",
    ))
}

fn policy_from_proto(policy: &Policy) -> Decoded<Option<LbPolicy>> {
    let config = policy
        .typed_extension_config
        .as_ref()
        .ok_or_else(|| missing("typed_extension_config"))?;
    let any = config
        .typed_config
        .as_ref()
        .ok_or_else(|| missing("typed_extension_config.typed_config"))?;
    let name = type_name(&any.type_url);
    let at = "typed_extension_config.typed_config";
    if name == WrrLocality::full_name() {
        let wrr: WrrLocality = unpack(any).at(at)?;
        let child = wrr
            .endpoint_picking_policy
            .as_ref()
            .ok_or_else(|| missing("endpoint_picking_policy").at(at))?;
        policy_from_list(child)
            .at("endpoint_picking_policy")
            .at(at)
            .map(Some)
    } else if name == RoundRobin::full_name() {
        unpack::<RoundRobin>(any).at(at)?;
        Ok(Some(LbPolicy::RoundRobin))
    } else if name == LeastRequest::full_name() {
        let lr: LeastRequest = unpack(any).at(at)?;
        check_choice_count(lr.choice_count.as_ref())
            .at("choice_count")
            .at(at)?;
        Ok(Some(LbPolicy::LeastRequest))
    } else if name == Random::full_name() {
        unpack::<Random>(any).at(at)?;
        Ok(Some(LbPolicy::Random))
    } else if name == RingHash::full_name() {
        let rh: RingHash = unpack(any).at(at)?;
        ring_hash_extension(&rh).at(at).map(Some)
    } else if KNOWN_UNSUPPORTED_POLICIES.contains(&name) {
        Err(FieldError::unsupported(format!("{name} is not supported")).at(at))
    } else {
        Ok(None)
    }
}

/// The `RingHash` extension (gRFC A52 form of A42). Its
/// `locality_weighted_lb_config` is ignored: how locality weights enter
/// the ring is the client's choice (gRPC always uses them).
#[allow(deprecated)] // use_hostname_for_hashing, hash_balance_factor: still rejected by name
fn ring_hash_extension(rh: &RingHash) -> Decoded<LbPolicy> {
    let murmur = match ExtHashFunction::try_from(rh.hash_function) {
        Ok(ExtHashFunction::DefaultHash | ExtHashFunction::XxHash) => false,
        Ok(ExtHashFunction::MurmurHash2) => true,
        Err(_) => {
            return Err(
                FieldError::invalid(format!("unknown value {}", rh.hash_function))
                    .at("hash_function"),
            );
        }
    };
    check_consistent_hashing(
        rh.use_hostname_for_hashing,
        rh.hash_balance_factor.is_some(),
    )?;
    if let Some(c) = &rh.consistent_hashing_lb_config {
        check_consistent_hashing(c.use_hostname_for_hashing, c.hash_balance_factor.is_some())
            .at("consistent_hashing_lb_config")?;
    }
    ring_hash(murmur, rh.minimum_ring_size, rh.maximum_ring_size)
}

/// `metadata.filter_metadata["proxyless"].locality_failover`, false when absent.
fn locality_failover_from_proto(c: &ClusterProto) -> Decoded<bool> {
    let value = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(METADATA_NAMESPACE))
        .and_then(|s| s.fields.get(LOCALITY_FAILOVER_KEY));
    match value.map(|v| &v.kind) {
        None => Ok(false),
        Some(Some(Kind::BoolValue(b))) => Ok(*b),
        Some(_) => Err(FieldError::invalid("not a bool")
            .at("metadata.filter_metadata[\"proxyless\"].locality_failover")),
    }
}

/// The HTTP/2 options the cluster speaks with, if it speaks HTTP/2: the
/// upstream options' explicit HTTP/2 config, else the old cluster field.
/// An HTTP/1.1 cluster (by our metadata) with them is upgraded (Istio's
/// `h2UpgradePolicy: UPGRADE`).
#[allow(deprecated)] // the old `http2_protocol_options` field
fn http2_options<'c>(
    c: &'c ClusterProto,
    options: Option<&'c HttpProtocolOptions>,
) -> Option<&'c Http2ProtocolOptions> {
    match options.and_then(|o| o.upstream_protocol_options.as_ref()) {
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(h2)),
        })) => Some(h2),
        Some(_) => None,
        None => c.http2_protocol_options.as_ref(),
    }
}

#[allow(deprecated)] // the old `http2_protocol_options` field still selects HTTP/2
fn protocol_from_proto(
    c: &ClusterProto,
    options: Option<&HttpProtocolOptions>,
) -> Decoded<Protocol> {
    let ours = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(METADATA_NAMESPACE))
        .and_then(|s| s.fields.get(PROTOCOL_KEY));
    if let Some(value) = ours {
        let at = "metadata.filter_metadata[\"proxyless\"].protocol";
        return match &value.kind {
            Some(Kind::StringValue(s)) => match s.as_str() {
                "http1" => Ok(Protocol::Http1),
                "http2" => Ok(Protocol::Http2),
                "grpc" => Ok(Protocol::Grpc),
                other => Err(FieldError::invalid(format!(
                    "unknown protocol {other:?}: use \"http1\", \"http2\" or \"grpc\""
                ))
                .at(at)),
            },
            _ => Err(FieldError::invalid("not a string").at(at)),
        };
    }
    if let Some(options) = options {
        let at = OPTIONS_AT;
        return match &options.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) => {
                match explicit.protocol_config {
                    Some(ProtocolConfig::HttpProtocolOptions(_)) => Ok(Protocol::Http1),
                    Some(ProtocolConfig::Http2ProtocolOptions(_)) => Ok(Protocol::Http2),
                    Some(ProtocolConfig::Http3ProtocolOptions(_)) => Err(FieldError::unsupported(
                        "HTTP/3 is not supported",
                    )
                    .at("explicit_http_config.http3_protocol_options")
                    .at(at)),
                    None => Err(missing("explicit_http_config.protocol_config").at(at)),
                }
            }
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => Err(
                FieldError::unsupported("protocol selection by the downstream protocol is not supported: use explicit_http_config")
                    .at("use_downstream_protocol_config")
                    .at(at),
            ),
            Some(UpstreamProtocolOptions::AutoConfig(_)) => Err(FieldError::unsupported(
                "automatic protocol selection is not supported: use explicit_http_config",
            )
            .at("auto_config")
            .at(at)),
            None => Ok(Protocol::Http1),
        };
    }
    if c.http2_protocol_options.is_some() {
        return Ok(Protocol::Http2);
    }
    Ok(Protocol::Http1)
}
