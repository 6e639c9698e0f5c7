//! EDS: cluster load assignments, localities with weights, endpoints with
//! labels (gRFC A27).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    Address, HealthStatus, Locality as LocalityProto, Metadata, SocketAddress, address,
    socket_address::{PortSpecifier, Protocol as SocketProtocol},
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment as ClaProto, Endpoint as EndpointProto, LbEndpoint, LocalityLbEndpoints,
    lb_endpoint::HostIdentifier, locality_lb_endpoints::LbConfig,
};
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value::Kind};

use super::{
    At, Decoded, FieldError, METADATA_NAMESPACE, ResourceType, missing, named, reject_if,
    required_name,
};
use crate::Error;
use crate::model::{ClusterLoadAssignment, Endpoint, Locality, LocalityEndpoints, Name};

/// The key of the labels struct in our metadata namespace.
pub(crate) const LABELS_KEY: &str = "labels";
/// `HealthStatus::Healthy`, what every encoded endpoint says.
pub(crate) const HEALTHY: i32 = HealthStatus::Healthy as i32;

/// The proto for endpoints: every locality with its `locality` and
/// `load_balancing_weight` set, every endpoint `HEALTHY` with its weight and
/// labels (`metadata.filter_metadata["proxyless"].labels`).
///
/// Labels are in a `HashMap` here; [`super::encode_endpoints`] writes the same
/// message with a stable order.
pub fn endpoints_to_proto(cla: &ClusterLoadAssignment) -> ClaProto {
    ClaProto {
        cluster_name: cla.cluster_name.to_string(),
        endpoints: cla
            .localities
            .iter()
            .map(|l| LocalityLbEndpoints {
                locality: Some(LocalityProto {
                    region: l.locality.region.to_string(),
                    zone: l.locality.zone.to_string(),
                    sub_zone: l.locality.sub_zone.to_string(),
                }),
                load_balancing_weight: Some(UInt32Value { value: l.weight }),
                priority: l.priority,
                lb_endpoints: l
                    .endpoints
                    .iter()
                    .map(|e| LbEndpoint {
                        host_identifier: Some(HostIdentifier::Endpoint(endpoint_proto(e.address))),
                        health_status: HEALTHY,
                        metadata: (!e.labels.is_empty()).then(|| labels_metadata(&e.labels)),
                        load_balancing_weight: Some(UInt32Value { value: e.weight }),
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// `endpoint { address { socket_address { address, port_value } } }`.
pub(crate) fn endpoint_proto(addr: SocketAddr) -> EndpointProto {
    EndpointProto {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: addr.ip().to_string(),
                port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

fn labels_metadata(labels: &[(Name, Name)]) -> Metadata {
    let labels = Struct {
        fields: labels
            .iter()
            .map(|(k, v)| {
                let value = Value {
                    kind: Some(Kind::StringValue(v.to_string())),
                };
                (k.to_string(), value)
            })
            .collect(),
    };
    let ours = Struct {
        fields: HashMap::from([(
            LABELS_KEY.to_string(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        )]),
    };
    Metadata {
        filter_metadata: HashMap::from([(METADATA_NAMESPACE.to_string(), ours)]),
        ..Default::default()
    }
}

/// The endpoints a proto describes.
///
/// Endpoints whose `health_status` is neither UNKNOWN nor HEALTHY are
/// skipped, as gRPC does. Stricter than gRPC: a locality without
/// `load_balancing_weight` is an error here, where gRPC silently ignores the
/// locality (and every call to it then fails UNAVAILABLE); a locality
/// without `locality` is an error in both. Weights must be positive and
/// addresses unique ([`ClusterLoadAssignment::new`]); addresses must be IP
/// literals (hostnames are unsupported: no DNS resolution yet). Labels are
/// returned sorted by key.
pub fn endpoints_from_proto(proto: &ClaProto) -> Result<ClusterLoadAssignment, Error> {
    cla_fields(proto).map_err(named(ResourceType::Endpoints, &proto.cluster_name))
}

fn cla_fields(p: &ClaProto) -> Decoded<ClusterLoadAssignment> {
    let name = required_name(&p.cluster_name, "cluster_name")?;
    if let Some(policy) = &p.policy {
        reject_if(!policy.drop_overloads.is_empty(), "policy.drop_overloads")?;
    }
    reject_if(!p.named_endpoints.is_empty(), "named_endpoints")?;
    let mut labels = LabelSets::default();
    let localities = p
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, l)| locality_from_proto(l, &mut labels).at_index("endpoints", i))
        .collect::<Decoded<Vec<_>>>()?;
    ClusterLoadAssignment::new(name, localities).map_err(FieldError::from)
}

fn locality_from_proto<'p>(
    l: &'p LocalityLbEndpoints,
    labels: &mut LabelSets<'p>,
) -> Decoded<LocalityEndpoints> {
    let locality = l.locality.as_ref().ok_or_else(|| {
        FieldError::invalid("missing (gRPC clients reject endpoints without a locality)")
            .at("locality")
    })?;
    let weight = l.load_balancing_weight.as_ref().ok_or_else(|| {
        FieldError::invalid(
            "missing (gRPC clients would ignore this locality and fail every call to it)",
        )
        .at("load_balancing_weight")
    })?;
    #[allow(deprecated)] // load_balancer_endpoints: deprecated, still rejected by name
    match &l.lb_config {
        Some(LbConfig::LedsClusterLocalityConfig(_)) => {
            return Err(
                FieldError::unsupported("LEDS is not supported: list lb_endpoints")
                    .at("leds_cluster_locality_config"),
            );
        }
        Some(LbConfig::LoadBalancerEndpoints(_)) => {
            return Err(FieldError::unsupported("not supported: list lb_endpoints")
                .at("load_balancer_endpoints"));
        }
        None => {}
    }
    let mut endpoints = Vec::with_capacity(l.lb_endpoints.len());
    for (j, e) in l.lb_endpoints.iter().enumerate() {
        let usable = e.health_status == HealthStatus::Unknown as i32 || e.health_status == HEALTHY;
        if usable {
            endpoints.push(endpoint_from_proto(e, labels).at_index("lb_endpoints", j)?);
        }
    }
    Ok(LocalityEndpoints {
        locality: Locality {
            region: locality.region.as_str().into(),
            zone: locality.zone.as_str().into(),
            sub_zone: locality.sub_zone.as_str().into(),
        },
        weight: weight.value,
        priority: l.priority,
        endpoints: endpoints.into(),
    })
}

fn endpoint_from_proto<'p>(e: &'p LbEndpoint, labels: &mut LabelSets<'p>) -> Decoded<Endpoint> {
    let endpoint = match &e.host_identifier {
        Some(HostIdentifier::Endpoint(endpoint)) => endpoint,
        Some(HostIdentifier::EndpointName(_)) => {
            return Err(
                FieldError::unsupported("named endpoints are not supported").at("endpoint_name")
            );
        }
        None => return Err(missing("endpoint")),
    };
    let address = endpoint
        .address
        .as_ref()
        .ok_or_else(|| missing("endpoint.address"))?;
    let address = socket_address(address).at("endpoint.address")?;
    Ok(Endpoint {
        address,
        // Unset means 1, as in Envoy; 0 is rejected by the model.
        weight: e.load_balancing_weight.as_ref().map_or(1, |w| w.value),
        labels: labels.decode(e.metadata.as_ref())?,
    })
}

fn socket_address(address: &Address) -> Decoded<SocketAddr> {
    let sa = match &address.address {
        Some(address::Address::SocketAddress(sa)) => sa,
        Some(address::Address::Pipe(_)) => {
            return Err(FieldError::unsupported("pipe addresses are not supported").at("pipe"));
        }
        Some(address::Address::EnvoyInternalAddress(_)) => {
            return Err(
                FieldError::unsupported("internal addresses are not supported")
                    .at("envoy_internal_address"),
            );
        }
        None => return Err(missing("socket_address")),
    };
    let sa_field = |e: FieldError| e.at("socket_address");
    if sa.protocol != SocketProtocol::Tcp as i32 {
        return Err(sa_field(
            FieldError::unsupported("only TCP is supported").at("protocol"),
        ));
    }
    reject_if(!sa.resolver_name.is_empty(), "resolver_name").map_err(sa_field)?;
    let port = match &sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(*p).map_err(|_| {
            sa_field(FieldError::invalid(format!("{p} is not a port number")).at("port_value"))
        })?,
        Some(PortSpecifier::NamedPort(_)) => {
            return Err(sa_field(
                FieldError::unsupported("named ports are not supported").at("named_port"),
            ));
        }
        None => return Err(sa_field(missing("port_value"))),
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        let host = &sa.address;
        let hostname = !host.is_empty()
            && host.chars().any(|c| c.is_ascii_alphabetic())
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        let e = if hostname {
            FieldError::unsupported(format!(
                "{host:?} is a hostname: DNS resolution is not supported yet, use an IP address"
            ))
        } else {
            FieldError::invalid(format!("{host:?} is not an IP address"))
        };
        sa_field(e.at("address"))
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// The label sets of one assignment's endpoints, each decoded once.
///
/// Endpoints of a service mostly carry one of a few label sets (`version:
/// v1`, `version: v2`): endpoints with equal labels share one
/// `Arc<[(Name, Name)]>`, and equal keys and values one [`Name`], instead
/// of three allocations per endpoint (about 100 bytes of heap each, a
/// tenth of a megabyte per 1,000 endpoints).
#[derive(Default)]
struct LabelSets<'p> {
    /// Each distinct set, by its pairs sorted by key.
    sets: HashMap<Vec<Pair<'p>>, Labels>,
    /// Each distinct key or value.
    names: HashMap<&'p str, Name>,
    /// The pairs of the endpoint at hand (reused).
    scratch: Vec<Pair<'p>>,
}

/// A label as the proto has it.
type Pair<'p> = (&'p str, &'p str);

/// An endpoint's labels in the model.
type Labels = Arc<[(Name, Name)]>;

impl<'p> LabelSets<'p> {
    /// `metadata.filter_metadata["proxyless"].labels`, sorted by key.
    fn decode(&mut self, metadata: Option<&'p Metadata>) -> Decoded<Labels> {
        let at = "metadata.filter_metadata[\"proxyless\"].labels";
        let Some(value) = metadata
            .and_then(|m| m.filter_metadata.get(METADATA_NAMESPACE))
            .and_then(|s| s.fields.get(LABELS_KEY))
        else {
            return Ok(Arc::from([]));
        };
        let Some(Kind::StructValue(labels)) = &value.kind else {
            return Err(FieldError::invalid("not a struct").at(at));
        };
        self.scratch.clear();
        for (k, v) in &labels.fields {
            match &v.kind {
                Some(Kind::StringValue(s)) => self.scratch.push((k.as_str(), s.as_str())),
                _ => return Err(FieldError::invalid(format!("label {k:?} is not a string")).at(at)),
            }
        }
        // Keys are unique (a protobuf map): the order is total.
        self.scratch.sort_unstable_by(|a, b| a.0.cmp(b.0));
        if let Some(set) = self.sets.get(self.scratch.as_slice()) {
            return Ok(set.clone());
        }
        let mut name = |s: &'p str| self.names.entry(s).or_insert_with(|| Name::from(s)).clone();
        let set: Labels = self
            .scratch
            .iter()
            .map(|(k, v)| (name(k), name(v)))
            .collect();
        self.sets.insert(self.scratch.clone(), set.clone());
        Ok(set)
    }
}
