//! CDS: DNS clusters (Istio ServiceEntry `resolution: DNS` and
//! `DNS_ROUND_ROBIN`), in Envoy's shape, which this mesh's client reads too.
//!
//! A DNS cluster is `type: STRICT_DNS` (every address of every name is an
//! endpoint) or `LOGICAL_DNS` (the first address of the one name), with a
//! `load_assignment` whose endpoints are socket addresses holding host
//! *names* and ports, `dns_lookup_family: ALL` (A and AAAA records) and
//! `respect_dns_ttl: true` (re-resolved when the answer's TTL runs out,
//! within bounds: see `crate::dns`). That is what Istio sends Envoy, so
//! mesh-control's Envoy dialect passes it through, and this mesh's client
//! decodes it to [`Discovery::Dns`] and resolves the names itself.
//!
//! gRPC clients accept no STRICT_DNS cluster (gRFC A37: a CDS response
//! holding one is NACKed whole); mesh-control serves them an EDS cluster
//! and the answer it resolved instead (its `dialect::grpc`).
//!
//! Rejected when decoding (rather than ignored): a custom DNS resolver
//! (`dns_resolvers`, `dns_resolution_config`, `typed_dns_resolver_config`:
//! the client resolves through its own configured server), a LOGICAL_DNS
//! cluster with other than one endpoint (Envoy rejects it too), an
//! endpoint without `port_value`, and `eds_cluster_config` on a DNS
//! cluster.

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster as ClusterProto,
    cluster::{ClusterDiscoveryType, DiscoveryType, DnsLookupFamily},
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, SocketAddress, address, socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment as ClaProto, Endpoint as EndpointProto, LbEndpoint, LocalityLbEndpoints,
    lb_endpoint::HostIdentifier,
};

use super::{At, Decoded, FieldError, missing, reject_if};
use crate::model::{Discovery, DnsDiscovery, DnsHost};

/// Sets `proto` (an encoded EDS cluster) to the DNS cluster `dns` names.
#[allow(deprecated)] // respect_dns_ttl: what Istio sends Envoy 1.36 for the same meaning
pub(crate) fn dns_to_proto(proto: &mut ClusterProto, dns: &DnsDiscovery) {
    let kind = if dns.logical {
        DiscoveryType::LogicalDns
    } else {
        DiscoveryType::StrictDns
    };
    proto.cluster_discovery_type = Some(ClusterDiscoveryType::Type(kind as i32));
    proto.eds_cluster_config = None;
    proto.dns_lookup_family = DnsLookupFamily::All as i32;
    proto.respect_dns_ttl = true;
    proto.load_assignment = Some(ClaProto {
        cluster_name: proto.name.clone(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: dns
                .hosts
                .iter()
                .map(|h| LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(EndpointProto {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: h.name.to_string(),
                                port_specifier: Some(PortSpecifier::PortValue(u32::from(h.port))),
                                ..Default::default()
                            })),
                        }),
                        hostname: h.name.to_string(),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    });
}

/// The DNS discovery of a STRICT_DNS (`logical` false) or LOGICAL_DNS
/// cluster `c`.
#[allow(deprecated)] // dns_resolvers: still rejected by name
pub(crate) fn dns_from_proto(c: &ClusterProto, logical: bool) -> Decoded<Discovery> {
    reject_if(c.eds_cluster_config.is_some(), "eds_cluster_config")?;
    reject_if(!c.dns_resolvers.is_empty(), "dns_resolvers")?;
    reject_if(c.dns_resolution_config.is_some(), "dns_resolution_config")?;
    reject_if(
        c.typed_dns_resolver_config.is_some(),
        "typed_dns_resolver_config",
    )?;
    let cla = c
        .load_assignment
        .as_ref()
        .ok_or_else(|| missing("load_assignment"))?;
    let mut hosts = Vec::new();
    for (i, locality) in cla.endpoints.iter().enumerate() {
        for (j, lb) in locality.lb_endpoints.iter().enumerate() {
            let host = dns_host(lb)
                .at_index("lb_endpoints", j)
                .at_index("endpoints", i)
                .at("load_assignment")?;
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
    }
    if hosts.is_empty() {
        return Err(
            FieldError::invalid("a DNS cluster needs at least one endpoint")
                .at("endpoints")
                .at("load_assignment"),
        );
    }
    let endpoints: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
    if logical && endpoints != 1 {
        return Err(FieldError::invalid(format!(
            "a LOGICAL_DNS cluster has exactly one endpoint, not {endpoints}"
        ))
        .at("load_assignment"));
    }
    Ok(Discovery::Dns(DnsDiscovery {
        hosts: Arc::from(hosts),
        logical,
    }))
}

fn dns_host(lb: &LbEndpoint) -> Decoded<DnsHost> {
    let Some(HostIdentifier::Endpoint(endpoint)) = &lb.host_identifier else {
        return Err(missing("endpoint"));
    };
    let Some(address::Address::SocketAddress(sa)) =
        endpoint.address.as_ref().and_then(|a| a.address.as_ref())
    else {
        return Err(missing("socket_address").at("address").at("endpoint"));
    };
    let at = |e: FieldError| e.at("socket_address").at("address").at("endpoint");
    reject_if(!sa.resolver_name.is_empty(), "resolver_name").map_err(at)?;
    if sa.address.is_empty() {
        return Err(at(missing("address")));
    }
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| at(FieldError::invalid(format!("port_value {p} is not a port"))))?,
        _ => return Err(at(missing("port_value"))),
    };
    Ok(DnsHost {
        name: sa.address.as_str().into(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::model::{Cluster, Protocol};
    use crate::xds::{cluster_from_proto, cluster_to_proto, decode_cluster, encode_cluster};

    fn dns_cluster(logical: bool, names: &[(&str, u16)]) -> Cluster {
        Cluster {
            discovery: Discovery::Dns(DnsDiscovery {
                hosts: names
                    .iter()
                    .map(|(name, port)| DnsHost {
                        name: (*name).into(),
                        port: *port,
                    })
                    .collect(),
                logical,
            }),
            ..Cluster::new("outbound|443||api.example.com", Protocol::Http1)
        }
    }

    #[test]
    fn strict_and_logical_round_trip_in_envoys_shape() {
        for (logical, kind) in [
            (false, DiscoveryType::StrictDns),
            (true, DiscoveryType::LogicalDns),
        ] {
            let names: &[(&str, u16)] = if logical {
                &[("api.example.com", 443)]
            } else {
                &[("api.example.com", 443), ("api2.example.com", 8443)]
            };
            let c = dns_cluster(logical, names);
            let proto = cluster_to_proto(&c);
            assert_eq!(
                proto.cluster_discovery_type,
                Some(ClusterDiscoveryType::Type(kind as i32))
            );
            assert!(proto.eds_cluster_config.is_none());
            let cla = proto.load_assignment.as_ref().expect("load_assignment");
            assert_eq!(cla.endpoints[0].lb_endpoints.len(), names.len());
            assert_eq!(decode_cluster(&encode_cluster(&c)).expect("decodes"), c);
        }
    }

    #[test]
    fn an_eds_cluster_has_no_load_assignment() {
        let c = Cluster::new("x", Protocol::Http1);
        assert!(cluster_to_proto(&c).load_assignment.is_none());
        assert_eq!(
            cluster_from_proto(&cluster_to_proto(&c)).unwrap().discovery,
            Discovery::Eds
        );
    }

    #[test]
    fn what_cannot_be_honored_is_rejected() {
        let c = dns_cluster(false, &[("api.example.com", 443)]);
        let mut p = cluster_to_proto(&c);
        p.load_assignment = None;
        let e = cluster_from_proto(&p).unwrap_err();
        assert!(e.to_string().contains("load_assignment"), "{e}");

        let mut p = cluster_to_proto(&c);
        p.typed_dns_resolver_config = Some(Default::default());
        let e = cluster_from_proto(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("typed_dns_resolver_config"), "{e}");

        let two = dns_cluster(false, &[("a.example.com", 1), ("b.example.com", 2)]);
        let mut p = cluster_to_proto(&two);
        p.cluster_discovery_type =
            Some(ClusterDiscoveryType::Type(DiscoveryType::LogicalDns as i32));
        let e = cluster_from_proto(&p).unwrap_err();
        assert!(e.to_string().contains("exactly one endpoint, not 2"), "{e}");

        let mut p = cluster_to_proto(&c);
        if let Some(HostIdentifier::Endpoint(ep)) =
            &mut p.load_assignment.as_mut().unwrap().endpoints[0].lb_endpoints[0].host_identifier
            && let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_mut().and_then(|a| a.address.as_mut())
        {
            sa.port_specifier = None;
        }
        let e = cluster_from_proto(&p).unwrap_err();
        assert!(e.to_string().contains("port_value"), "{e}");

        let mut p = cluster_to_proto(&c);
        p.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
        let e = cluster_from_proto(&p).unwrap_err();
        assert!(
            e.to_string()
                .contains("only EDS, STRICT_DNS and LOGICAL_DNS"),
            "{e}"
        );
    }
}
