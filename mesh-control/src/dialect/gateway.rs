//! Envoy as an ingress gateway (Istio `Gateway`).
//!
//! An Envoy node whose `LABELS` match a Gateway's `selector` is a gateway:
//! it is sent that Gateway's listeners (one per port, bound to the
//! server's address, a filter chain per TLS server chosen by SNI, or one
//! for the plain HTTP servers), the route configs they name over RDS, the
//! mesh clusters those routes name, in Envoy's dialect, and their
//! endpoints. Nothing of the mesh's own listeners: a gateway is no sidecar.
//!
//! The listeners and route configs are built once per config by the
//! translation (`crate::config` `gateway`), with the functions here; the
//! clusters are the shared ones, converted per response (a handful).
//!
//! Clusters are converted to Envoy's dialect as for a sidecar
//! (`super::envoy::cluster`): `lb_policy` instead of gRPC's
//! `load_balancing_policy { wrr_locality }`, and mTLS certificates from SDS
//! on the same ADS stream (Istio's secret names, `default` and `ROOTCA`,
//! served by `crate::sds`) instead of gRFC A29's certificate provider
//! instances. Endpoints are a sidecar's (`super::envoy::endpoints`): the
//! shared ones, with Istio's default locality failover priorities for the
//! gateway's `node.locality` where the cluster has it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{
    Address, DataSource, SocketAddress, TransportSocket, address, data_source::Specifier,
    socket_address::PortSpecifier, transport_socket,
};
use envoy_types::pb::envoy::config::core::v3::{Http2ProtocolOptions, HttpProtocolOptions};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::virtual_host::TlsRequirementType;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, TlsCertificate,
    common_tls_context::ValidationContextType,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use mesh_core::model::RouteConfig;
use mesh_core::xds::ResourceType;
use prost::Message;

use crate::config::TranslatedGateway;
use crate::state::{Lookup, NodeWorkload, type_index};

/// The network filter that runs HTTP (Envoy's name).
const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
/// The listener filter that reads SNI (Envoy's name).
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";

fn pack<M: Message + prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn file(path: &str) -> DataSource {
    DataSource {
        specifier: Some(Specifier::Filename(path.to_string())),
        ..Default::default()
    }
}

/// Whether `node` is a gateway under this config: some `Gateway`'s
/// selector matches its labels.
pub(crate) fn is_gateway(lookup: Lookup<'_>, node: &NodeWorkload) -> bool {
    lookup
        .served
        .gateways
        .selecting(&node.labels)
        .next()
        .is_some()
}

/// The resources of type `t` the gateway node `node` is sent: `names`
/// subscribed (empty: wildcard). Two Gateways selecting one node with the
/// same listener (port) or route config name: the first in file order is
/// served.
pub(crate) fn resources(
    t: ResourceType,
    names: &BTreeSet<String>,
    lookup: Lookup<'_>,
    node: &NodeWorkload,
) -> Vec<Any> {
    let gateways: Vec<&TranslatedGateway> =
        lookup.served.gateways.selecting(&node.labels).collect();
    let wanted = |name: &str| names.is_empty() || names.contains(name);
    let mut out: std::collections::BTreeMap<&str, Any> = std::collections::BTreeMap::new();
    match t {
        ResourceType::Listener | ResourceType::RouteConfig => {
            for g in &gateways {
                let of = if t == ResourceType::Listener {
                    &g.listeners
                } else {
                    &g.route_configs
                };
                for (name, any) in of {
                    if wanted(name) && !out.contains_key(name.as_str()) {
                        out.insert(name, any.clone());
                    }
                }
            }
        }
        ResourceType::Cluster | ResourceType::Endpoints => {
            let clusters: BTreeSet<&str> = gateways
                .iter()
                .flat_map(|g| g.clusters.iter().map(String::as_str))
                .collect();
            for name in clusters.into_iter().filter(|n| wanted(n)) {
                if let Some(any) = lookup.get(type_index(t), name) {
                    let any = if t == ResourceType::Cluster {
                        super::envoy::cluster(any)
                    } else {
                        any.clone()
                    };
                    out.insert(name, any);
                }
            }
        }
    }
    let out = out.into_values().collect();
    if t == ResourceType::Endpoints {
        // As a sidecar's: the EDS priorities of Istio's default locality
        // failover for the gateway's `node.locality`.
        return super::envoy::endpoints(out, lookup, node);
    }
    out
}

/// A gateway route config, encoded: the mesh's encoding of `rc`, with
/// `require_tls: ALL` on every virtual host (and a catch-all one) when
/// `https_redirect` (Istio's `httpsRedirect`: a 301 to https).
pub(crate) fn encode_route_config(rc: &RouteConfig, https_redirect: bool) -> Any {
    if !https_redirect {
        return mesh_core::xds::encode_route_config(rc);
    }
    let mut proto: RouteConfiguration = mesh_core::xds::route_config_to_proto(rc);
    for vh in &mut proto.virtual_hosts {
        vh.require_tls = TlsRequirementType::All as i32;
    }
    proto.virtual_hosts.push(VirtualHost {
        name: "https-redirect".into(),
        domains: vec!["*".into()],
        require_tls: TlsRequirementType::All as i32,
        ..Default::default()
    });
    pack(&proto)
}

/// A filter chain running HTTP with routes `rc_name` over RDS; with `tls`,
/// terminating TLS with its files for `server_names` (SNI; empty: any).
pub(crate) fn filter_chain(
    rc_name: &str,
    server_names: Vec<String>,
    tls: Option<&crate::config::ServerTls>,
) -> FilterChain {
    let listener = mesh_core::model::Listener {
        name: rc_name.into(),
        route_config_name: rc_name.into(),
    };
    // The mesh's connection manager (RDS over ADS, the fault and inert
    // local rate limit filters, the router): what routes are encoded for;
    // with Envoy's edge settings (a gateway faces the outside).
    let mut hcm = mesh_core::xds::listener_to_proto(&listener)
        .api_listener
        .and_then(|a| a.api_listener)
        .and_then(|a| HttpConnectionManager::decode(a.value.as_slice()).ok())
        .unwrap_or_default();
    edge(&mut hcm);
    let transport_socket = tls.map(|tls| {
        let context = DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificates: vec![TlsCertificate {
                    certificate_chain: Some(file(&tls.server_certificate)),
                    private_key: Some(file(&tls.private_key)),
                    ..Default::default()
                }],
                validation_context_type: tls.ca_certificates.as_deref().map(|ca| {
                    ValidationContextType::ValidationContext(CertificateValidationContext {
                        trusted_ca: Some(file(ca)),
                        ..Default::default()
                    })
                }),
                alpn_protocols: vec!["h2".into(), "http/1.1".into()],
                ..Default::default()
            }),
            require_client_certificate: Some(BoolValue { value: tls.mutual }),
            ..Default::default()
        };
        TransportSocket {
            name: mesh_core::xds::TLS_TRANSPORT_SOCKET.to_string(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&context))),
        }
    });
    FilterChain {
        name: rc_name.to_string(),
        filter_chain_match: (!server_names.is_empty()).then(|| FilterChainMatch {
            server_names,
            ..Default::default()
        }),
        filters: vec![Filter {
            name: HCM_FILTER.to_string(),
            config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
        }],
        transport_socket,
        ..Default::default()
    }
}

/// Envoy's recommended settings for an edge proxy ("Configuring Envoy as
/// an edge proxy"): the client's address is the peer's (no trusting
/// `x-forwarded-for` from the outside), paths are normalized before routes
/// match them (as Istio's default `BASE` normalization), slow or idle
/// clients are cut off, and HTTP/2 clients get bounded streams and windows.
fn edge(hcm: &mut HttpConnectionManager) {
    hcm.stat_prefix = "gateway".into();
    hcm.use_remote_address = Some(BoolValue { value: true });
    hcm.normalize_path = Some(BoolValue { value: true });
    hcm.request_headers_timeout = Some(PbDuration {
        seconds: 10,
        nanos: 0,
    });
    hcm.stream_idle_timeout = Some(PbDuration {
        seconds: 300,
        nanos: 0,
    });
    hcm.common_http_protocol_options = Some(HttpProtocolOptions {
        idle_timeout: Some(PbDuration {
            seconds: 3600,
            nanos: 0,
        }),
        ..Default::default()
    });
    hcm.http2_protocol_options = Some(Http2ProtocolOptions {
        max_concurrent_streams: Some(UInt32Value { value: 100 }),
        initial_stream_window_size: Some(UInt32Value { value: 65_536 }),
        initial_connection_window_size: Some(UInt32Value { value: 1_048_576 }),
        ..Default::default()
    });
}

/// The listener of one gateway port: its name (`<address>_<port>`, as
/// Istio names them) and encoding.
pub(crate) fn listener(bind: IpAddr, port: u16, chains: Vec<FilterChain>) -> (String, Any) {
    let name = format!("{bind}_{port}");
    let tls = chains.iter().any(|c| c.transport_socket.is_some());
    let listener = Listener {
        name: name.clone(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: bind.to_string(),
                port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
                ..Default::default()
            })),
        }),
        filter_chains: chains,
        // Envoy's edge recommendation: bounded buffering per connection.
        per_connection_buffer_limit_bytes: Some(UInt32Value { value: 32_768 }),
        listener_filters: if tls {
            vec![ListenerFilter {
                name: TLS_INSPECTOR.to_string(),
                config_type: Some(listener_filter::ConfigType::TypedConfig(pack(
                    &TlsInspector::default(),
                ))),
                ..Default::default()
            }]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    (name, pack(&listener))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use mesh_core::model::Locality;
    use mesh_core::xds;

    use super::*;
    use crate::config::{ConfigStore, MeshOptions};
    use crate::state::{Served, Views, encode_all};

    /// A gateway in front of `catalog`, with endpoints in three localities
    /// and outlier detection (Istio's default locality failover).
    const YAML: &str = "apiVersion: networking.istio.io/v1
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
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: [shop.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front, namespace: shop}
spec:
  hosts: [shop.example.com]
  gateways: [istio-system/ingress]
  http:
  - route:
    - destination: {host: catalog}
";

    fn published() -> Served {
        published_with(YAML)
    }

    fn published_with(yaml: &str) -> Served {
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
            gateways: Arc::new(store.gateways(&[])),
            ..Served::default()
        }
    }

    #[test]
    fn gateway_eds_carries_the_failover_priorities_for_its_locality() {
        let served = published();
        let lookup = Lookup {
            served: &served,
            view: None,
        };
        let mut node = NodeWorkload {
            id: "ingressgateway-1".into(),
            namespace: "istio-system".into(),
            labels: BTreeMap::from([("istio".to_string(), "ingressgateway".to_string())]),
            ..NodeWorkload::default()
        };
        assert!(is_gateway(lookup, &node));
        let priorities = |node: &NodeWorkload| -> BTreeMap<String, u32> {
            let all = resources(ResourceType::Endpoints, &BTreeSet::new(), lookup, node);
            assert_eq!(all.len(), 1, "catalog's endpoints only");
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
        // Without a locality: the shared endpoints, one priority.
        assert!(priorities(&node).values().all(|p| *p == 0));
        node.locality = Locality {
            region: "r1".into(),
            zone: "z2".into(),
            sub_zone: "".into(),
        };
        assert_eq!(
            priorities(&node),
            BTreeMap::from([
                ("r1/z2".to_string(), 0),
                ("r1/z1".to_string(), 1),
                ("r2/z1".to_string(), 2)
            ])
        );
    }

    #[test]
    fn a_gateway_says_it_does_not_evaluate_source_matches() {
        let yaml = YAML.replace(
            "  http:\n  - route:",
            "  http:\n  - match: [{uri: {prefix: /internal}, sourceLabels: {app: web}}]\n    \
             route:\n    - destination: {host: catalog}\n  - route:",
        );
        assert_ne!(yaml, YAML);
        let served = published_with(&yaml);
        let labels = BTreeMap::from([("istio".to_string(), "ingressgateway".to_string())]);
        let ignored = crate::compat::gateway_ignored(
            served.gateways.selecting(&labels),
            &served.snapshot,
            Some(true),
            Some(true),
        );
        assert_eq!(ignored.len(), 1, "{ignored:?}");
        assert!(
            ignored[0].starts_with("VirtualService shop/front http[0] (")
                && ignored[0].contains("mesh.yaml:")
                && ignored[0].contains("Gateway istio-system/ingress")
                && ignored[0].contains("not evaluated"),
            "{ignored:?}"
        );
        // Without source conditions, nothing; without a locality, the
        // failover of catalog (a cluster its routes name) is said.
        let served = published();
        assert!(
            crate::compat::gateway_ignored(
                served.gateways.selecting(&labels),
                &served.snapshot,
                Some(true),
                Some(true)
            )
            .is_empty()
        );
        let ignored = crate::compat::gateway_ignored(
            served.gateways.selecting(&labels),
            &served.snapshot,
            Some(false),
            Some(true),
        );
        assert!(
            ignored.len() == 1 && ignored[0].starts_with("locality failover: 1 cluster"),
            "{ignored:?}"
        );
    }
}
