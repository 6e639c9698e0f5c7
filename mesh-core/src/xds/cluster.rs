//! CDS: EDS clusters, their load-balancing policy (gRFC A27, A48, A52) and
//! upstream protocol.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster as ClusterProto, LoadBalancingPolicy,
    cluster::{
        ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbConfig, LbPolicy as LbEnum,
    },
    load_balancing_policy::Policy,
};
use envoy_types::pb::envoy::config::core::v3::{
    Http1ProtocolOptions, Http2ProtocolOptions, Metadata, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::{
    least_request::v3::LeastRequest, random::v3::Random, round_robin::v3::RoundRobin,
    wrr_locality::v3::WrrLocality,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions,
    http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
    },
};
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value::Kind};
use prost::Name as _;

use super::{
    At, Decoded, FieldError, METADATA_NAMESPACE, ResourceType, ads_config_source,
    check_config_source, missing, named, pack, reject_if, required_name, type_name, unpack,
};
use crate::Error;
use crate::model::{Cluster, LbPolicy, Protocol};

/// The `typed_extension_protocol_options` key of the upstream HTTP options.
pub(crate) const HTTP_PROTOCOL_OPTIONS_KEY: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

const PROTOCOL_KEY: &str = "protocol";
const WRR_LOCALITY_NAME: &str = "envoy.load_balancing_policies.wrr_locality";
const ROUND_ROBIN_NAME: &str = "envoy.load_balancing_policies.round_robin";
const LEAST_REQUEST_NAME: &str = "envoy.load_balancing_policies.least_request";
const RANDOM_NAME: &str = "envoy.load_balancing_policies.random";

/// Policies gRPC clients know and this mesh does not implement: a list that
/// names one of them before one we know would be served by it, so it is
/// rejected rather than skipped.
const KNOWN_UNSUPPORTED_POLICIES: &[&str] = &[
    "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash",
    "envoy.extensions.load_balancing_policies.maglev.v3.Maglev",
    "envoy.extensions.load_balancing_policies.pick_first.v3.PickFirst",
    "envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin",
];

/// The proto for a cluster: `type: EDS` over ADS, its lb policy (see the
/// module docs of [`crate::xds`] for why least-request is not the
/// `lb_policy` enum), and its protocol.
pub fn cluster_to_proto(cluster: &Cluster) -> ClusterProto {
    let load_balancing_policy = match cluster.lb_policy {
        LbPolicy::RoundRobin => None,
        LbPolicy::LeastRequest => Some(wrr_locality(typed_policy(
            LEAST_REQUEST_NAME,
            pack(&LeastRequest::default()),
        ))),
        LbPolicy::Random => Some(wrr_locality(typed_policy(
            RANDOM_NAME,
            pack(&Random::default()),
        ))),
        // Placeholder until ring hash conversion lands (issue 4).
        LbPolicy::RingHash { .. } => None,
    };
    let protocol_config = if cluster.protocol.is_http2() {
        ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
    } else {
        ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())
    };
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(protocol_config),
            },
        )),
        ..Default::default()
    };
    ClusterProto {
        name: cluster.name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: cluster.eds_service_name.to_string(),
        }),
        lb_policy: LbEnum::RoundRobin as i32,
        load_balancing_policy,
        typed_extension_protocol_options: HashMap::from([(
            HTTP_PROTOCOL_OPTIONS_KEY.to_string(),
            pack(&options),
        )]),
        metadata: Some(Metadata {
            filter_metadata: HashMap::from([(
                METADATA_NAMESPACE.to_string(),
                Struct {
                    fields: HashMap::from([(
                        PROTOCOL_KEY.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(protocol_name(cluster.protocol).into())),
                        },
                    )]),
                },
            )]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn protocol_name(p: Protocol) -> &'static str {
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
/// `HttpProtocolOptions`, else HTTP/1.1.
pub fn cluster_from_proto(proto: &ClusterProto) -> Result<Cluster, Error> {
    cluster_fields(proto).map_err(named(ResourceType::Cluster, &proto.name))
}

fn cluster_fields(c: &ClusterProto) -> Decoded<Cluster> {
    let name = required_name(&c.name, "name")?;
    match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32 => {}
        Some(ClusterDiscoveryType::Type(t)) => {
            let kind = DiscoveryType::try_from(*t).map_or("unknown", |d| d.as_str_name());
            return Err(FieldError::unsupported(format!(
                "{kind} clusters are not supported: only EDS"
            ))
            .at("type"));
        }
        Some(ClusterDiscoveryType::ClusterType(custom)) => {
            return Err(FieldError::unsupported(format!(
                "custom cluster type {:?} is not supported: only EDS",
                custom.name
            ))
            .at("cluster_type"));
        }
        None => {
            return Err(
                FieldError::unsupported("STATIC clusters are not supported: only EDS").at("type"),
            );
        }
    }
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
    reject_if(c.lb_subset_config.is_some(), "lb_subset_config")?;
    reject_if(
        !c.transport_socket_matches.is_empty(),
        "transport_socket_matches",
    )?;
    reject_if(
        c.transport_socket_matcher.is_some(),
        "transport_socket_matcher",
    )?;
    if let Some(ts) = &c.transport_socket {
        let plaintext = match &ts.config_type {
            Some(
                envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                    any,
                ),
            ) => {
                type_name(&any.type_url)
                    == "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
            }
            None => ts.name == "envoy.transport_sockets.raw_buffer",
        };
        if !plaintext {
            return Err(FieldError::unsupported(format!(
                "transport socket {:?} is not supported (upstream TLS is not implemented yet)",
                ts.name
            ))
            .at("transport_socket"));
        }
    }
    let lb_policy = match &c.load_balancing_policy {
        Some(policy) => policy_from_list(policy).at("load_balancing_policy")?,
        None => lb_enum_from_proto(c)?,
    };
    Ok(Cluster {
        eds_service_name,
        lb_policy,
        ..Cluster::new(name, protocol_from_proto(c)?)
    })
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
        Ok(other) => Err(FieldError::unsupported(format!(
            "{} is not supported: use ROUND_ROBIN, LEAST_REQUEST or RANDOM",
            other.as_str_name()
        ))
        .at("lb_policy")),
        Err(_) => {
            Err(FieldError::invalid(format!("unknown value {}", c.lb_policy)).at("lb_policy"))
        }
    }
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
        "no supported policy: use round_robin, least_request or random (optionally inside wrr_locality)",
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
    } else if KNOWN_UNSUPPORTED_POLICIES.contains(&name) {
        Err(FieldError::unsupported(format!("{name} is not supported")).at(at))
    } else {
        Ok(None)
    }
}

#[allow(deprecated)] // the old `http2_protocol_options` field still selects HTTP/2
fn protocol_from_proto(c: &ClusterProto) -> Decoded<Protocol> {
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
    if let Some(any) = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS_KEY)
    {
        let at = "typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"]";
        let options: HttpProtocolOptions = unpack(any).at(at)?;
        return match options.upstream_protocol_options {
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
