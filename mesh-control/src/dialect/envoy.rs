//! Envoy as a sidecar: the shared resources in the shape a stock Envoy
//! accepts and uses.
//!
//! The shared resources are written for gRPC proxyless clients (see
//! `mesh_core::xds`). A stock Envoy bootstrapped against this server
//! (`mesh-control envoy-bootstrap`, [`crate::envoy_bootstrap`]) cannot use
//! them as they are, so each push is converted here, in time linear in the
//! resources sent (Envoy clients are few; nothing is cached and nothing on
//! a request path is touched):
//!
//! - **LDS**: gRPC's API listeners mean nothing to Envoy (it has API
//!   listeners only in Envoy Mobile). An Envoy sidecar node gets one
//!   outbound listener instead, bound at `127.0.0.1:<port>`, the port from
//!   its `node.metadata.PROXYLESS_OUTBOUND_PORT` (default
//!   [`DEFAULT_OUTBOUND_PORT`]), named `outbound|<port>`. Its
//!   HttpConnectionManager fetches the route config of the same name over
//!   ADS and has the HTTP filters of the shared listeners (fault, local
//!   rate limit with a config that limits nothing, router), so the routes'
//!   `typed_per_filter_config` (fault, local rate limit) take effect. The
//!   app uses it as a plain HTTP proxy: the `Host` header (or the absolute
//!   URI) picks the service.
//! - **RDS**: that one route config merges the virtual hosts of every
//!   route config of the node's view. Envoy NACKs a route config whose
//!   domain appears in two virtual hosts, and the short forms (`catalog`,
//!   `catalog:80`) of same-named services in two namespaces collide: the
//!   service in the node's own namespace keeps the short form (what a
//!   Kubernetes resolver would pick), else the first in name order. Virtual
//!   hosts that need no change are copied byte for byte.
//! - **CDS**: Envoy rejects `load_balancing_policy` `wrr_locality` around
//!   round robin, least request or random ("WrrLocalityLoadBalancer only
//!   supports ClientSideWeightedRoundRobinLoadBalancer"), which is what
//!   gRPC needs. Such a cluster gets the `lb_policy` enum
//!   (ROUND_ROBIN / LEAST_REQUEST / RANDOM), with its slow start in the
//!   legacy `round_robin_lb_config` / `least_request_lb_config`, and every
//!   EDS cluster (ring hash too) gets
//!   `common_lb_config.locality_weighted_lb_config`, so that Envoy weighs
//!   localities by their EDS weights as `wrr_locality` does for gRPC.
//!   Circuit breakers, outlier detection, the connect timeout and the
//!   protocol options are kept. A29 mTLS (certificate provider instance
//!   `mesh`, which an Envoy bootstrap does not define) becomes SDS over
//!   ADS: the workload certificate is the secret
//!   [`SDS_WORKLOAD_CERT`](super::SDS_WORKLOAD_CERT), the trust bundle
//!   [`SDS_ROOT_CA`](super::SDS_ROOT_CA) in a `combined_validation_context`
//!   that keeps the exact SPIFFE ID matchers (as URI SAN matchers). TLS
//!   from files is Envoy's own shape already. The cluster's metadata is
//!   copied as served, so the bytes stay a deterministic function of the
//!   shared ones (a push is skipped when nothing changed).
//! - **EDS**: as shared, but for the clusters with Istio's default
//!   locality failover (`locality_failover`, which this mesh's client
//!   applies itself from its own locality): Envoy gets the EDS priorities
//!   istiod would compute for its `node.locality`.
//!
//! What Envoy still ignores of what it is sent is said by
//! `crate::compat::envoy_ignored`.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster as ClusterProto, LoadBalancingPolicy,
    cluster::{
        ClusterDiscoveryType, CommonLbConfig, DiscoveryType, LbConfig, LbPolicy as LbEnum,
        LeastRequestLbConfig, RoundRobinLbConfig, SlowStartConfig as LegacySlowStart,
        common_lb_config::{LocalityConfigSpecifier, LocalityWeightedLbConfig},
    },
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress,
    address::Address as AddressKind, config_source::ConfigSourceSpecifier,
    socket_address::PortSpecifier, transport_socket::ConfigType as SocketConfig,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, Listener as ListenerProto, filter::ConfigType as FilterConfig,
};
use envoy_types::pb::envoy::config::route::v3::VirtualHost as VirtualHostProto;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier,
    http_filter::ConfigType as HttpFilterConfig,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::{
    common::v3::SlowStartConfig, least_request::v3::LeastRequest, random::v3::Random,
    round_robin::v3::RoundRobin, wrr_locality::v3::WrrLocality,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, SdsSecretConfig, SubjectAltNameMatcher, UpstreamTlsContext,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
};
use envoy_types::pb::google::protobuf::Any;
use mesh_core::xds::{self, ResourceType};
use prost::{Message, Name as _};

use super::{SDS_ROOT_CA, SDS_WORKLOAD_CERT};
use crate::state::{Lookup, NodeWorkload, type_index};

/// The outbound listener's port when the node's metadata names none
/// (Istio's outbound capture port).
pub(crate) const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// The node metadata key of the outbound listener's port.
pub(crate) const OUTBOUND_PORT_KEY: &str = "PROXYLESS_OUTBOUND_PORT";

/// The HttpConnectionManager network filter's name.
const HCM_FILTER_NAME: &str = "envoy.filters.network.http_connection_manager";

/// The resources of type `t` an Envoy node is sent: `names` subscribed
/// (empty: wildcard), from `lookup`, for the workload `node` describes.
pub(crate) fn resources(
    t: ResourceType,
    names: &BTreeSet<String>,
    lookup: Lookup<'_>,
    node: &NodeWorkload,
) -> Vec<Any> {
    if super::gateway::is_gateway(lookup, node) {
        return super::gateway::resources(t, names, lookup, node);
    }
    let port = node.outbound_port.unwrap_or(DEFAULT_OUTBOUND_PORT);
    let name = outbound_name(port);
    let wanted = |name: &str| names.is_empty() || names.contains(name);
    match t {
        ResourceType::Listener if wanted(&name) => vec![outbound_listener(port)],
        ResourceType::RouteConfig if wanted(&name) => {
            vec![merged_route_config(&name, lookup, &node.namespace)]
        }
        ResourceType::Listener | ResourceType::RouteConfig => Vec::new(),
        ResourceType::Cluster => selected(lookup, t, names).iter().map(cluster).collect(),
        ResourceType::Endpoints => endpoints(selected(lookup, t, names), lookup, node),
    }
}

/// The name of the outbound listener on `port`, and of its route config.
pub(crate) fn outbound_name(port: u16) -> String {
    format!("outbound|{port}")
}

/// The shared resources of type `t` named (all when `names` is empty).
fn selected(lookup: Lookup<'_>, t: ResourceType, names: &BTreeSet<String>) -> Vec<Any> {
    let i = type_index(t);
    if names.is_empty() {
        lookup.all(i)
    } else {
        names
            .iter()
            .filter_map(|name| lookup.get(i, name).cloned())
            .collect()
    }
}

// ---------------------------------------------------------------------------
// LDS

/// `ads {}`, v3: fetch over the ADS stream itself.
pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// Packs a message into an `Any` with its `type.googleapis.com/` URL.
pub(crate) fn pack<M: Message + prost::Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// The HTTP filters of the shared client listeners (fault, local rate
/// limit, router): what the shared routes' `typed_per_filter_config`
/// entries need in the chain. Taken from mesh-core's encoding so that
/// both dialects stay in step.
pub(crate) fn http_filters() -> Vec<HttpFilter> {
    let name = mesh_core::model::Name::from("outbound");
    let shared = xds::listener_to_proto(&mesh_core::model::Listener {
        name: name.clone(),
        route_config_name: name,
    });
    shared
        .api_listener
        .and_then(|api| api.api_listener)
        .and_then(|any| HttpConnectionManager::decode(any.value.as_slice()).ok())
        .map(|hcm| hcm.http_filters)
        .filter(|filters| !filters.is_empty())
        .unwrap_or_else(|| {
            vec![HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(HttpFilterConfig::TypedConfig(pack(&Router::default()))),
                ..Default::default()
            }]
        })
}

/// The outbound listener of a sidecar: `127.0.0.1:<port>`, one filter
/// chain whose HttpConnectionManager fetches `outbound|<port>` over RDS.
fn outbound_listener(port: u16) -> Any {
    let name = outbound_name(port);
    let hcm = HttpConnectionManager {
        stat_prefix: format!("outbound_{port}"),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.clone(),
        })),
        http_filters: http_filters(),
        ..Default::default()
    };
    pack(&ListenerProto {
        name,
        address: Some(socket_address("127.0.0.1", port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: HCM_FILTER_NAME.into(),
                config_type: Some(FilterConfig::TypedConfig(pack(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// A TCP socket address.
pub(crate) fn socket_address(ip: &str, port: u16) -> Address {
    Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

// ---------------------------------------------------------------------------
// RDS

/// A RouteConfiguration read as its name and raw virtual hosts, and
/// written the same way: virtual hosts are copied without decoding them.
#[derive(Clone, PartialEq, Message)]
struct RawRouteConfig {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(bytes = "vec", repeated, tag = "2")]
    virtual_hosts: Vec<Vec<u8>>,
}

/// A VirtualHost read as its name and domains only.
#[derive(Clone, PartialEq, Message)]
struct VirtualHostDomains {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, repeated, tag = "2")]
    domains: Vec<String>,
}

/// One route config `name` with the virtual hosts of every route config
/// of the view, each domain in one virtual host only (see the module docs).
fn merged_route_config(name: &str, lookup: Lookup<'_>, namespace: &str) -> Any {
    let hosts: Vec<(Vec<u8>, VirtualHostDomains)> = lookup
        .all(type_index(ResourceType::RouteConfig))
        .iter()
        .filter_map(|any| RawRouteConfig::decode(any.value.as_slice()).ok())
        .flat_map(|rc| rc.virtual_hosts)
        .filter_map(|raw| {
            let domains = VirtualHostDomains::decode(raw.as_slice()).ok()?;
            Some((raw, domains))
        })
        .collect();
    RawRouteConfig {
        name: name.into(),
        virtual_hosts: merge_virtual_hosts(hosts, namespace),
    }
    .encoded()
}

impl RawRouteConfig {
    fn encoded(&self) -> Any {
        Any {
            type_url: xds::ROUTE_CONFIG_TYPE.into(),
            value: self.encode_to_vec(),
        }
    }
}

/// The virtual hosts `hosts` (raw, with their names and domains) with
/// each domain kept in one of them: the one local to `namespace` for a
/// short name, else the first. Virtual hosts left without a domain are
/// dropped; duplicate names get a `#n` suffix.
fn merge_virtual_hosts(hosts: Vec<(Vec<u8>, VirtualHostDomains)>, namespace: &str) -> Vec<Vec<u8>> {
    let mut owner: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, (_, vh)) in hosts.iter().enumerate() {
        for domain in &vh.domains {
            let domain = domain.as_str();
            match owner.get(domain) {
                None => {
                    owner.insert(domain, i);
                }
                Some(&first)
                    if is_local(&vh.domains, domain, namespace)
                        && !is_local(&hosts[first].1.domains, domain, namespace) =>
                {
                    owner.insert(domain, i);
                }
                Some(_) => {}
            }
        }
    }
    let mut names: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::with_capacity(hosts.len());
    for (i, (raw, vh)) in hosts.iter().enumerate() {
        let kept: Vec<String> = vh
            .domains
            .iter()
            .filter(|d| owner.get(d.as_str()) == Some(&i))
            .cloned()
            .collect();
        if kept.is_empty() {
            continue;
        }
        let mut name = vh.name.clone();
        let mut n = 1;
        while names.contains(&name) {
            n += 1;
            name = format!("{}#{n}", vh.name);
        }
        let mut bytes = if kept.len() == vh.domains.len() && name == vh.name {
            raw.clone()
        } else if let Ok(mut proto) = VirtualHostProto::decode(raw.as_slice()) {
            proto.domains = kept;
            proto.name = name.clone();
            proto.encode_to_vec()
        } else {
            continue;
        };
        // `include_request_attempt_count: true` (field 14, varint 1), as
        // Istio sets on every outbound virtual host: Envoy then sends
        // `x-envoy-attempt-count` on each attempt, as our client and the
        // upstream's retry accounting expect. Appended to the encoded
        // message: a later scalar field wins when protobuf merges.
        bytes.extend_from_slice(&[14 << 3, 1]);
        out.push(bytes);
        names.insert(name);
    }
    out
}

/// Whether the short `domain` (`catalog`, `catalog:80`) names the service
/// of these `domains` in `namespace` (they hold `catalog.<namespace>`).
fn is_local(domains: &[String], domain: &str, namespace: &str) -> bool {
    let (host, port) = match domain.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    if host.contains('.') {
        return false;
    }
    let qualified = match port {
        Some(port) => format!("{host}.{namespace}:{port}"),
        None => format!("{host}.{namespace}"),
    };
    domains.contains(&qualified)
}

// ---------------------------------------------------------------------------
// CDS

/// A Cluster read as its metadata only (field 25), kept as bytes so that
/// it is written back exactly as the shared encoding wrote it.
#[derive(Clone, PartialEq, Message)]
struct RawMetadata {
    #[prost(bytes = "vec", optional, tag = "25")]
    metadata: Option<Vec<u8>>,
}

/// The shared cluster `any` in Envoy's shape (see the module docs);
/// unchanged when nothing in it needs converting or it cannot be read.
pub(crate) fn cluster(any: &Any) -> Any {
    let Ok(mut proto) = ClusterProto::decode(any.value.as_slice()) else {
        return any.clone();
    };
    let lb = lb_for_envoy(&mut proto);
    let tls = tls_for_envoy(&mut proto);
    if !lb && !tls {
        return any.clone();
    }
    // The metadata is a map (a HashMap once decoded): written back as the
    // shared bytes had it, so that the encoding is deterministic.
    let metadata = RawMetadata::decode(any.value.as_slice())
        .ok()
        .and_then(|m| m.metadata);
    proto.metadata = None;
    let mut value = proto.encode_to_vec();
    if metadata.is_some() {
        value.extend_from_slice(&RawMetadata { metadata }.encode_to_vec());
    }
    Any {
        type_url: xds::CLUSTER_TYPE.into(),
        value,
    }
}

/// What a `load_balancing_policy` picks, as far as Envoy's enum says it.
enum Picked {
    RoundRobin(Option<SlowStartConfig>),
    LeastRequest(Box<LeastRequest>),
    Random,
}

/// The first policy of `list` this converts, looking inside `wrr_locality`.
fn picked(list: &LoadBalancingPolicy) -> Option<Picked> {
    list.policies.iter().find_map(|p| {
        let any = p.typed_extension_config.as_ref()?.typed_config.as_ref()?;
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        if name == WrrLocality::full_name() {
            let wrr = WrrLocality::decode(any.value.as_slice()).ok()?;
            picked(wrr.endpoint_picking_policy.as_ref()?)
        } else if name == LeastRequest::full_name() {
            let lr = LeastRequest::decode(any.value.as_slice()).ok()?;
            Some(Picked::LeastRequest(Box::new(lr)))
        } else if name == RoundRobin::full_name() {
            let rr = RoundRobin::decode(any.value.as_slice()).ok()?;
            Some(Picked::RoundRobin(rr.slow_start_config))
        } else if name == Random::full_name() {
            Some(Picked::Random)
        } else {
            None
        }
    })
}

fn legacy_slow_start(s: SlowStartConfig) -> LegacySlowStart {
    LegacySlowStart {
        slow_start_window: s.slow_start_window,
        aggression: s.aggression,
        min_weight_percent: s.min_weight_percent,
    }
}

/// Replaces a `load_balancing_policy` Envoy would reject by the `lb_policy`
/// enum, and turns locality weighting on for EDS clusters; whether
/// anything changed.
fn lb_for_envoy(c: &mut ClusterProto) -> bool {
    let mut changed = false;
    if let Some(list) = &c.load_balancing_policy
        && let Some(picked) = picked(list)
    {
        c.load_balancing_policy = None;
        let (policy, config) = match picked {
            Picked::RoundRobin(slow_start) => (
                LbEnum::RoundRobin,
                slow_start.map(|s| {
                    LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
                        slow_start_config: Some(legacy_slow_start(s)),
                    })
                }),
            ),
            Picked::LeastRequest(lr) => (
                LbEnum::LeastRequest,
                Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
                    choice_count: lr.choice_count,
                    active_request_bias: lr.active_request_bias,
                    slow_start_config: lr.slow_start_config.map(legacy_slow_start),
                })),
            ),
            Picked::Random => (LbEnum::Random, None),
        };
        c.lb_policy = policy as i32;
        c.lb_config = config;
        changed = true;
    }
    let eds = matches!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
    );
    let weighted = [
        LbEnum::RoundRobin,
        LbEnum::LeastRequest,
        LbEnum::Random,
        LbEnum::RingHash,
    ]
    .iter()
    .any(|p| *p as i32 == c.lb_policy);
    if eds && weighted && c.load_balancing_policy.is_none() {
        let common = c
            .common_lb_config
            .get_or_insert_with(CommonLbConfig::default);
        if common.locality_config_specifier.is_none() {
            common.locality_config_specifier = Some(
                LocalityConfigSpecifier::LocalityWeightedLbConfig(LocalityWeightedLbConfig {}),
            );
            changed = true;
        }
    }
    changed
}

/// An SDS secret fetched over ADS.
pub(crate) fn sds_secret(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ads()),
    }
}

/// A29 mTLS (the `mesh` certificate provider instance) as SDS over ADS;
/// whether the cluster had it.
#[allow(deprecated)] // match_subject_alt_names: what the shared (A29) shape carries
fn tls_for_envoy(c: &mut ClusterProto) -> bool {
    let Some(SocketConfig::TypedConfig(any)) = c
        .transport_socket
        .as_mut()
        .and_then(|ts| ts.config_type.as_mut())
    else {
        return false;
    };
    if any.type_url.rsplit('/').next() != Some(UpstreamTlsContext::full_name().as_str()) {
        return false;
    }
    let Ok(mut context) = UpstreamTlsContext::decode(any.value.as_slice()) else {
        return false;
    };
    let Some(common) = context.common_tls_context.as_mut() else {
        return false;
    };
    let mesh = common
        .tls_certificate_provider_instance
        .as_ref()
        .is_some_and(|p| p.instance_name == xds::MESH_PROVIDER_INSTANCE);
    if !mesh {
        return false;
    }
    common.tls_certificate_provider_instance = None;
    common.tls_certificate_sds_secret_configs = vec![sds_secret(SDS_WORKLOAD_CERT)];
    let sans = match common.validation_context_type.take() {
        Some(ValidationContextType::ValidationContext(v)) => v
            .match_subject_alt_names
            .into_iter()
            .map(|matcher| SubjectAltNameMatcher {
                san_type: SanType::Uri as i32,
                matcher: Some(matcher),
                oid: String::new(),
            })
            .chain(v.match_typed_subject_alt_names)
            .collect(),
        _ => Vec::new(),
    };
    common.validation_context_type = Some(ValidationContextType::CombinedValidationContext(
        CombinedCertificateValidationContext {
            default_validation_context: Some(CertificateValidationContext {
                match_typed_subject_alt_names: sans,
                ..Default::default()
            }),
            validation_context_sds_secret_config: Some(sds_secret(SDS_ROOT_CA)),
            ..Default::default()
        },
    ));
    *any = pack(&context);
    true
}

// ---------------------------------------------------------------------------
// EDS

/// The shared endpoints `shared`, with the EDS priorities of Istio's
/// default locality failover for the clusters that have it
/// (`locality_failover`: outlier detection and no explicit
/// `localityLbSetting`): same region, zone and sub-zone as the node first,
/// then same zone, then same region, then the rest (istiod's
/// `LbPriority`). This mesh's client orders localities so itself; Envoy
/// follows EDS priorities only. Unchanged for a node without a locality
/// (Istio applies none then either).
pub(crate) fn endpoints(shared: Vec<Any>, lookup: Lookup<'_>, node: &NodeWorkload) -> Vec<Any> {
    if node.locality == mesh_core::model::Locality::default() {
        return shared;
    }
    let snapshot = lookup.snapshot();
    let failover: BTreeSet<&str> = snapshot
        .clusters
        .values()
        .filter(|c| c.locality_failover)
        .map(|c| &*c.eds_service_name)
        .collect();
    if failover.is_empty() {
        return shared;
    }
    shared
        .into_iter()
        .map(|any| {
            let Some(cla) = xds::resource_name(&any)
                .filter(|name| failover.contains(name.as_str()))
                .and_then(|name| snapshot.endpoints.get(name.as_str()))
            else {
                return any;
            };
            let localities = mesh_core::locality::apply(
                &cla.localities,
                &mesh_core::locality::LocalityLbSetting::default(),
                true,
                &node.locality,
                &BTreeMap::new(),
            );
            match mesh_core::model::ClusterLoadAssignment::new(cla.cluster_name.clone(), localities)
            {
                Ok(cla) => xds::encode_endpoints(&cla),
                Err(_) => any,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use mesh_core::model::{Cluster, LbPolicy, Protocol, UpstreamTls};
    use mesh_core::spiffe::SpiffeId;

    use super::*;
    use crate::config::{ConfigStore, MeshOptions};
    use crate::state::{Served, Views, encode_all};

    /// A published config with `yaml`, as the rebuild publishes it.
    fn published(yaml: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
        let mut store = ConfigStore::new(MeshOptions::default());
        let problems = store.load_dir(dir.path());
        assert!(problems.is_empty(), "{problems:?}");
        let (snapshot, diagnostics) = store.snapshot(&[]);
        Served {
            version: 1,
            resources: encode_all(&snapshot),
            snapshot,
            views: Views::new(store.view_source(&[]), &diagnostics),
            ..Served::default()
        }
    }

    fn service(name: &str, namespace: &str, port: u16) -> String {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [{name}]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  endpoints: [{{address: 10.0.0.1}}]
---
"
        )
    }

    fn node(namespace: &str, port: Option<u16>) -> NodeWorkload {
        NodeWorkload {
            id: "envoy-1".into(),
            namespace: namespace.into(),
            outbound_port: port,
            ..NodeWorkload::default()
        }
    }

    fn served_to(t: ResourceType, served: &Served, node: &NodeWorkload) -> Vec<Any> {
        let lookup = Lookup { served, view: None };
        resources(t, &BTreeSet::new(), lookup, node)
    }

    fn one<M: Message + Default>(anys: &[Any]) -> M {
        assert_eq!(anys.len(), 1, "{anys:?}");
        M::decode(anys[0].value.as_slice()).unwrap()
    }

    #[test]
    fn lds_is_one_outbound_listener_on_the_nodes_port() {
        let served = published(&service("catalog", "shop", 80));
        let listener: ListenerProto = one(&served_to(
            ResourceType::Listener,
            &served,
            &node("shop", Some(18001)),
        ));
        assert_eq!(listener.name, "outbound|18001");
        assert_eq!(listener.address, Some(socket_address("127.0.0.1", 18001)));
        let Some(FilterConfig::TypedConfig(any)) =
            &listener.filter_chains[0].filters[0].config_type
        else {
            panic!("no HCM");
        };
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier else {
            panic!("not rds");
        };
        assert_eq!(rds.route_config_name, "outbound|18001");
        let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "envoy.filters.http.fault",
                "envoy.filters.http.local_ratelimit",
                "envoy.filters.http.router"
            ]
        );
        // The same bytes each time (a push is skipped when nothing changed).
        let again = served_to(ResourceType::Listener, &served, &node("shop", Some(18001)));
        assert_eq!(
            again,
            served_to(ResourceType::Listener, &served, &node("shop", Some(18001)))
        );
        // Default port; another name is not served.
        let default: ListenerProto = one(&served_to(
            ResourceType::Listener,
            &served,
            &node("shop", None),
        ));
        assert_eq!(default.name, "outbound|15001");
        let lookup = Lookup {
            served: &served,
            view: None,
        };
        let other = BTreeSet::from(["catalog".to_string()]);
        assert!(resources(ResourceType::Listener, &other, lookup, &node("shop", None)).is_empty());
    }

    #[test]
    fn rds_merges_every_virtual_host_with_each_domain_once() {
        let yaml = service("catalog", "shop", 80)
            + &service("catalog", "other", 80)
            + &service("payment", "shop", 8080);
        let served = published(&yaml);
        for namespace in ["shop", "other"] {
            let rc: RouteConfiguration = one(&served_to(
                ResourceType::RouteConfig,
                &served,
                &node(namespace, None),
            ));
            assert_eq!(rc.name, "outbound|15001");
            assert_eq!(rc.virtual_hosts.len(), 3);
            let mut all: Vec<&str> = rc
                .virtual_hosts
                .iter()
                .flat_map(|vh| vh.domains.iter().map(String::as_str))
                .collect();
            let n = all.len();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), n, "a domain in two virtual hosts: {rc:?}");
            // The short name is the service in the node's namespace.
            let owner = rc
                .virtual_hosts
                .iter()
                .find(|vh| vh.domains.iter().any(|d| d == "catalog:80"))
                .unwrap();
            assert!(
                owner.domains.contains(&format!("catalog.{namespace}:80")),
                "{namespace}: {owner:?}"
            );
            // Routes came along.
            assert!(rc.virtual_hosts.iter().all(|vh| !vh.routes.is_empty()));
            assert!(
                rc.virtual_hosts
                    .iter()
                    .all(|vh| vh.include_request_attempt_count),
                "Envoy is told to send x-envoy-attempt-count, as Istio does"
            );
        }
        // The same config, the same bytes.
        let a = served_to(ResourceType::RouteConfig, &served, &node("shop", None));
        let b = served_to(ResourceType::RouteConfig, &served, &node("shop", None));
        assert_eq!(a, b);
    }

    fn decoded(c: &Cluster) -> ClusterProto {
        let any = cluster(&xds::encode_cluster(c));
        ClusterProto::decode(any.value.as_slice()).unwrap()
    }

    fn locality_weighted(c: &ClusterProto) -> bool {
        matches!(
            c.common_lb_config
                .as_ref()
                .and_then(|l| l.locality_config_specifier),
            Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
        )
    }

    #[test]
    fn cds_uses_the_lb_policy_enum_with_locality_weights() {
        let mut c = Cluster::new(
            "outbound|80||catalog.shop.svc.cluster.local",
            Protocol::Http1,
        );
        c.lb_policy = LbPolicy::LeastRequest;
        c.slow_start = Some(Duration::from_secs(30));
        c.circuit_breakers.max_requests = 7;
        let proto = decoded(&c);
        assert_eq!(proto.lb_policy, LbEnum::LeastRequest as i32);
        assert!(proto.load_balancing_policy.is_none());
        assert!(locality_weighted(&proto));
        let Some(LbConfig::LeastRequestLbConfig(lr)) = &proto.lb_config else {
            panic!("{:?}", proto.lb_config);
        };
        let window = lr.slow_start_config.as_ref().unwrap().slow_start_window;
        assert_eq!(window.unwrap().seconds, 30);
        assert_eq!(
            proto.circuit_breakers.unwrap().thresholds[0]
                .max_requests
                .unwrap()
                .value,
            7
        );
        // The metadata is kept, byte for byte: deterministic.
        assert_eq!(
            cluster(&xds::encode_cluster(&c)),
            cluster(&xds::encode_cluster(&c))
        );
        assert!(proto.metadata.is_some());

        c.lb_policy = LbPolicy::Random;
        let proto = decoded(&c);
        assert_eq!(proto.lb_policy, LbEnum::Random as i32);
        assert!(proto.load_balancing_policy.is_none() && locality_weighted(&proto));

        c.lb_policy = LbPolicy::RoundRobin;
        let proto = decoded(&c);
        assert_eq!(proto.lb_policy, LbEnum::RoundRobin as i32);
        assert!(locality_weighted(&proto));
        let Some(LbConfig::RoundRobinLbConfig(rr)) = &proto.lb_config else {
            panic!("{:?}", proto.lb_config);
        };
        assert!(rr.slow_start_config.is_some());

        // A ring weighs localities too (Envoy scales its hosts' shares).
        c.lb_policy = LbPolicy::RingHash {
            minimum_ring_size: 2048,
        };
        c.slow_start = None;
        let proto = decoded(&c);
        assert_eq!(proto.lb_policy, LbEnum::RingHash as i32);
        assert!(locality_weighted(&proto));
        let Some(LbConfig::RingHashLbConfig(ring)) = &proto.lb_config else {
            panic!("{:?}", proto.lb_config);
        };
        assert_eq!(ring.minimum_ring_size.unwrap().value, 2048);
    }

    #[test]
    fn cds_mtls_comes_over_sds_with_the_spiffe_matchers() {
        let mut c = Cluster::new(
            "outbound|80||catalog.shop.svc.cluster.local",
            Protocol::Http1,
        );
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/catalog").unwrap();
        c.tls = Some(UpstreamTls {
            server_identities: Arc::from([id]),
            sni: "outbound_.80_._.catalog.shop.svc.cluster.local".into(),
            ..UpstreamTls::default()
        });
        let proto = decoded(&c);
        let Some(SocketConfig::TypedConfig(any)) =
            proto.transport_socket.and_then(|t| t.config_type)
        else {
            panic!("no transport socket");
        };
        let context = UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
        assert_eq!(
            context.sni,
            "outbound_.80_._.catalog.shop.svc.cluster.local"
        );
        let common = context.common_tls_context.unwrap();
        assert!(common.tls_certificate_provider_instance.is_none());
        assert_eq!(
            common.tls_certificate_sds_secret_configs,
            [sds_secret("default")]
        );
        let Some(ValidationContextType::CombinedValidationContext(combined)) =
            common.validation_context_type
        else {
            panic!("no combined validation context");
        };
        assert_eq!(
            combined.validation_context_sds_secret_config,
            Some(sds_secret("ROOTCA"))
        );
        let sans = combined
            .default_validation_context
            .unwrap()
            .match_typed_subject_alt_names;
        assert_eq!(sans.len(), 1);
        assert_eq!(sans[0].san_type, SanType::Uri as i32);
        assert_eq!(
            format!("{:?}", sans[0].matcher),
            format!(
                "{:?}",
                Some(envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher {
                    match_pattern: Some(
                        envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(
                            "spiffe://cluster.local/ns/shop/sa/catalog".into()
                        )
                    ),
                    ignore_case: false,
                })
            )
        );
    }

    #[test]
    fn eds_carries_istios_default_failover_priorities_for_the_nodes_locality() {
        let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, locality: r1/z1}
  - {address: 10.0.0.2, locality: r1/z2}
  - {address: 10.0.0.3, locality: r2/z1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: shop}
spec:
  host: catalog
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3}
";
        let served = published(yaml);
        let mut at = node("shop", None);
        at.locality = mesh_core::model::Locality {
            region: "r1".into(),
            zone: "z2".into(),
            sub_zone: "".into(),
        };
        let priorities = |n: &NodeWorkload| -> BTreeMap<String, u32> {
            let all = served_to(ResourceType::Endpoints, &served, n);
            let cla = xds::decode_endpoints(&all[0]).unwrap();
            cla.localities
                .iter()
                .map(|l| {
                    (
                        format!("{}/{}", l.locality.region, l.locality.zone),
                        l.priority,
                    )
                })
                .collect()
        };
        assert_eq!(
            priorities(&at),
            BTreeMap::from([
                ("r1/z2".to_string(), 0),
                ("r1/z1".to_string(), 1),
                ("r2/z1".to_string(), 2)
            ])
        );
        // Without a locality: as shared (one priority).
        assert!(priorities(&node("shop", None)).values().all(|p| *p == 0));
    }

    #[test]
    fn cds_and_eds_follow_the_subscription() {
        let served = published(&service("catalog", "shop", 80));
        let clusters = served_to(ResourceType::Cluster, &served, &node("shop", None));
        assert_eq!(clusters.len(), served.resources[2].len());
        let endpoints = served_to(ResourceType::Endpoints, &served, &node("shop", None));
        let shared: Vec<Any> = served.resources[3].values().cloned().collect();
        assert_eq!(endpoints, shared);
        let lookup = Lookup {
            served: &served,
            view: None,
        };
        let name = served.resources[3].keys().next().unwrap().clone();
        let one = resources(
            ResourceType::Endpoints,
            &BTreeSet::from([name.clone(), "nothing".into()]),
            lookup,
            &node("shop", None),
        );
        assert_eq!(one, [served.resources[3][&name].clone()]);
    }
}
