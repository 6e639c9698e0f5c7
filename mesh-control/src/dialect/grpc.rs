//! gRPC proxyless clients: they accept only EDS, LOGICAL_DNS and aggregate
//! clusters (gRFC A37), and a CDS response holding a STRICT_DNS cluster is
//! NACKed whole.
//!
//! A DNS cluster (ServiceEntry `resolution: DNS` or `DNS_ROUND_ROBIN`) is
//! therefore sent to a gRPC client as an EDS cluster of the same name,
//! whose ClusterLoadAssignment is what mesh-control resolved
//! (`crate::dns`: re-resolved on the TTL, pushed when it changes). One
//! shape for both strict and round robin: gRPC's LOGICAL_DNS would resolve
//! through the client's own resolver, not the one this server is told to
//! use, and EDS makes both kinds follow the same answers. Every other
//! resource goes as shared.

use envoy_types::pb::google::protobuf::Any;
use mesh_core::model::Discovery;
use mesh_core::xds::{self, ResourceType};

use crate::state::Lookup;

/// Rewrites the resources of type `t` about to be sent to a gRPC client
/// into what it accepts: DNS clusters become EDS clusters.
pub(crate) fn adapt(t: ResourceType, resources: &mut [Any], lookup: Lookup<'_>) {
    if t != ResourceType::Cluster {
        return;
    }
    let snapshot = lookup.snapshot();
    // Most configs have no DNS cluster: nothing decoded then.
    if snapshot
        .clusters
        .values()
        .all(|c| c.discovery == Discovery::Eds)
    {
        return;
    }
    for any in resources.iter_mut() {
        let Some(name) = xds::resource_name(any) else {
            continue;
        };
        if let Some(cluster) = snapshot.clusters.get(name.as_str())
            && cluster.discovery != Discovery::Eds
        {
            let mut eds = (**cluster).clone();
            eds.discovery = Discovery::Eds;
            *any = xds::encode_cluster(&eds);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_core::model::{Cluster, DnsDiscovery, DnsHost, Protocol};

    use super::*;
    use crate::state::Served;

    #[test]
    fn a_dns_cluster_becomes_eds_for_grpc() {
        let dns = Cluster {
            discovery: Discovery::Dns(DnsDiscovery {
                hosts: Arc::from([DnsHost {
                    name: "api.example.com".into(),
                    port: 443,
                }]),
                logical: false,
            }),
            ..Cluster::new("outbound|443||api.example.com", Protocol::Http1)
        };
        let eds = Cluster::new(
            "outbound|80||catalog.shop.svc.cluster.local",
            Protocol::Http1,
        );
        let mut served = Served::default();
        for c in [&dns, &eds] {
            served
                .snapshot
                .clusters
                .insert(c.name.clone(), Arc::new(c.clone()));
        }
        let mut resources = vec![xds::encode_cluster(&dns), xds::encode_cluster(&eds)];
        adapt(
            ResourceType::Cluster,
            &mut resources,
            Lookup {
                served: &served,
                view: None,
            },
        );
        let got: Vec<Discovery> = resources
            .iter()
            .map(|a| xds::decode_cluster(a).expect("decodes").discovery)
            .collect();
        assert_eq!(got, [Discovery::Eds, Discovery::Eds]);
        assert_eq!(
            resources[1],
            xds::encode_cluster(&eds),
            "EDS clusters untouched"
        );
    }
}
