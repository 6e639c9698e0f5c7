//! Hand-built mesh-core model snapshots, and the same resources in their xDS form
//! ([`xds`]), for tests that need a config without a control server.
//!
//! The names follow Istio's, as mesh-control writes them: a service `catalog` is the
//! listener `catalog`, the route config `catalog:80` (whose virtual host answers
//! `catalog` and `catalog:80`) and clusters `outbound|80|<subset>|catalog`.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::Snapshot;
use mesh_core::model::{
    Cluster, ClusterLoadAssignment, Endpoint, HeaderMatch, LbPolicy, Listener, Locality,
    LocalityEndpoints, Name, PathMatch, Protocol, Route, RouteConfig, RouteMatch, RoutePolicy,
    ValueMatch, VirtualHost, WeightedClusters,
};

/// An endpoint at `address`, weight 1, with `labels`.
pub fn endpoint(address: SocketAddr, labels: &[(&str, &str)]) -> Endpoint {
    Endpoint {
        address,
        weight: 1,
        labels: labels
            .iter()
            .map(|(k, v)| (Name::from(*k), Name::from(*v)))
            .collect(),
    }
}

/// The assignment `name`: `endpoints` in one locality of weight 1, priority 0.
pub fn assignment(
    name: &str,
    locality: Locality,
    endpoints: Vec<Endpoint>,
) -> ClusterLoadAssignment {
    match ClusterLoadAssignment::new(
        name.into(),
        vec![LocalityEndpoints {
            locality,
            weight: 1,
            priority: 0,
            endpoints: endpoints.into(),
        }],
    ) {
        Ok(cla) => cla,
        Err(e) => panic!("the assignment {name}: {e}"),
    }
}

/// The assignment `name`: `addrs` (a repeated address once) in the default locality,
/// without labels.
pub fn cla(name: &str, addrs: &[SocketAddr]) -> Arc<ClusterLoadAssignment> {
    let mut unique = addrs.to_vec();
    unique.dedup();
    let endpoints = unique.iter().map(|a| endpoint(*a, &[])).collect();
    Arc::new(assignment(name, Locality::default(), endpoints))
}

/// A route `name` for `matcher` to the one cluster `cluster`, with no policy.
pub fn route(name: &str, matcher: RouteMatch, cluster: &str) -> Route {
    Route {
        name: name.into(),
        matcher,
        action: WeightedClusters::single(cluster),
        policy: RoutePolicy::default(),
    }
}

/// The route config `name` with one virtual host (also `name`) for `domains`.
pub fn route_config(name: &str, domains: &[&str], routes: Vec<Route>) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        virtual_hosts: Arc::from([VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| Name::from(*d)).collect(),
            routes: routes.into(),
        }]),
    }
}

/// Adds the listener `name` → route config `<name>:80` (answering `name` and
/// `<name>:80`) with `routes` to `s`.
fn add_listener(s: &mut Snapshot, name: &str, routes: Vec<Route>) {
    let rc_name = format!("{name}:80");
    s.listeners.insert(
        name.into(),
        Arc::new(Listener {
            name: name.into(),
            route_config_name: rc_name.as_str().into(),
        }),
    );
    s.route_configs.insert(
        rc_name.as_str().into(),
        Arc::new(route_config(&rc_name, &[name, &rc_name], routes)),
    );
}

/// Service `catalog` (listener `catalog`) over two backends: header `x-version: v2`
/// or path `/b...` → backend `b`; `/both...` → round robin over `a` and `b`;
/// anything else → `a`. The control server said `nope` does not exist.
pub fn two_backends(a: SocketAddr, b: SocketAddr, protocol: Protocol) -> Snapshot {
    let mut s = Snapshot::default();
    add_two_backends(&mut s, "catalog", a, b, protocol);
    s.missing_listeners.insert("nope".into());
    s
}

/// Adds service `name` as [`two_backends`] builds `catalog` to `s`.
pub fn add_two_backends(
    s: &mut Snapshot,
    name: &str,
    a: SocketAddr,
    b: SocketAddr,
    protocol: Protocol,
) {
    let v2 = RouteMatch {
        headers: vec![HeaderMatch {
            name: "x-version".into(),
            value: ValueMatch::Exact("v2".into()),
            invert: false,
        }]
        .into(),
        ..RouteMatch::any()
    };
    let prefix = |p: &str| RouteMatch {
        path: PathMatch::Prefix(p.into()),
        ..RouteMatch::any()
    };
    let ca = format!("outbound|80|a|{name}");
    let cb = format!("outbound|80|b|{name}");
    let cboth = format!("outbound|80||{name}");
    add_listener(
        s,
        name,
        vec![
            route("v2", v2, &cb),
            route("both", prefix("/both"), &cboth),
            route("b", prefix("/b"), &cb),
            route("stream", prefix("/stream"), &ca),
            route("default", RouteMatch::any(), &ca),
        ],
    );
    for (cluster, addrs) in [(&ca, vec![a]), (&cb, vec![b]), (&cboth, vec![a, b])] {
        s.clusters.insert(
            cluster.as_str().into(),
            Arc::new(Cluster {
                lb_policy: LbPolicy::RoundRobin,
                ..Cluster::new(cluster.as_str(), protocol)
            }),
        );
        s.endpoints
            .insert(cluster.as_str().into(), cla(cluster, &addrs));
    }
}

/// A snapshot with one service `name` (listener `name`), one route `all` with
/// `policy` to one cluster (`cluster`, renamed `outbound|80||<name>`) whose
/// endpoints are `endpoints`, each with its locality, weight 1 (a locality's weight
/// is its endpoint count).
pub fn one_service(
    name: &str,
    cluster: Cluster,
    policy: RoutePolicy,
    endpoints: &[(SocketAddr, Locality)],
) -> Snapshot {
    let mut s = Snapshot::default();
    add_one_service(&mut s, name, cluster, policy, endpoints);
    s
}

/// Adds what [`one_service`] builds to `s`.
pub fn add_one_service(
    s: &mut Snapshot,
    name: &str,
    cluster: Cluster,
    policy: RoutePolicy,
    endpoints: &[(SocketAddr, Locality)],
) {
    let cluster_name = format!("outbound|80||{name}");
    add_listener(
        s,
        name,
        vec![Route {
            policy,
            ..route("all", RouteMatch::any(), &cluster_name)
        }],
    );
    s.clusters.insert(
        cluster_name.as_str().into(),
        Arc::new(Cluster {
            name: cluster_name.as_str().into(),
            eds_service_name: cluster_name.as_str().into(),
            ..cluster
        }),
    );
    let mut localities: Vec<LocalityEndpoints> = Vec::new();
    for (addr, locality) in endpoints {
        let endpoint = endpoint(*addr, &[]);
        match localities.iter_mut().find(|l| &l.locality == locality) {
            Some(l) => {
                let mut all = l.endpoints.to_vec();
                all.push(endpoint);
                l.endpoints = all.into();
                l.weight += 1;
            }
            None => localities.push(LocalityEndpoints {
                locality: locality.clone(),
                weight: 1,
                priority: 0,
                endpoints: vec![endpoint].into(),
            }),
        }
    }
    let cla = match ClusterLoadAssignment::new(cluster_name.as_str().into(), localities) {
        Ok(cla) => cla,
        Err(e) => panic!("the assignment of {name}: {e}"),
    };
    s.endpoints
        .insert(cluster_name.as_str().into(), Arc::new(cla));
}

/// The same resources in their xDS form (`Any`), for xDS clients and the state
/// machine: LDS, RDS, CDS and EDS resources and SotW responses.
pub mod xds {
    use std::net::SocketAddr;

    use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use mesh_core::model::{
        Cluster, LbPolicy, Listener, Locality, Protocol, RouteMatch, WeightedCluster,
        WeightedClusters,
    };
    use mesh_core::xds::{self, Any, ResourceType};
    use prost::Message as _;

    use super::{Route, RoutePolicy, assignment, endpoint};

    /// The listener `name` naming the route config `rc`.
    pub fn listener(name: &str, rc: &str) -> Any {
        xds::encode_listener(&Listener {
            name: name.into(),
            route_config_name: rc.into(),
        })
    }

    /// A listener that names itself but is invalid (no api_listener): a client
    /// NACKs it, naming it.
    pub fn bad_listener(name: &str) -> Any {
        Any {
            type_url: xds::LISTENER_TYPE.to_owned(),
            value: ListenerProto {
                name: name.to_owned(),
                ..ListenerProto::default()
            }
            .encode_to_vec(),
        }
    }

    /// The route config `name`: one virtual host for `domains`, one route `route`
    /// (matching anything) splitting between the weighted `clusters`.
    pub fn route_config(
        name: &str,
        domains: &[&str],
        route: &str,
        clusters: &[(&str, u32)],
    ) -> Any {
        let action = WeightedClusters::new(
            clusters
                .iter()
                .map(|(c, w)| WeightedCluster {
                    name: (*c).into(),
                    weight: *w,
                })
                .collect(),
        );
        let action = match action {
            Ok(action) => action,
            Err(e) => panic!("the clusters of {name}: {e}"),
        };
        xds::encode_route_config(&super::route_config(
            name,
            domains,
            vec![Route {
                name: route.into(),
                matcher: RouteMatch::any(),
                action,
                policy: RoutePolicy::default(),
            }],
        ))
    }

    /// The HTTP/1.1 round-robin cluster `name` whose endpoints are the EDS resource
    /// `eds`.
    pub fn cluster(name: &str, eds: &str) -> Any {
        xds::encode_cluster(&Cluster {
            eds_service_name: eds.into(),
            lb_policy: LbPolicy::RoundRobin,
            ..Cluster::new(name, Protocol::Http1)
        })
    }

    /// The EDS resource `name`: one endpoint at `address` in `locality`, with
    /// `labels`.
    pub fn endpoints(
        name: &str,
        address: SocketAddr,
        locality: Locality,
        labels: &[(&str, &str)],
    ) -> Any {
        xds::encode_endpoints(&assignment(name, locality, vec![endpoint(address, labels)]))
    }

    /// A SotW response of `kind` carrying `resources`.
    pub fn response(
        kind: ResourceType,
        version: &str,
        nonce: &str,
        resources: Vec<Any>,
    ) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.to_owned(),
            type_url: kind.type_url().to_owned(),
            nonce: nonce.to_owned(),
            resources,
            ..DiscoveryResponse::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::snapshot::ListenerLookup;

    use super::*;

    #[test]
    fn the_builders_make_snapshots_that_resolve() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let s = two_backends(a, b, Protocol::Http1);
        assert!(matches!(
            s.listener_for("catalog"),
            ListenerLookup::Found(_)
        ));
        assert_eq!(s.clusters.len(), 3);
        assert_eq!(s.endpoints["outbound|80||catalog"].endpoint_count(), 2);

        let here = Locality::default();
        let there = Locality {
            zone: "z2".into(),
            ..Locality::default()
        };
        let s = one_service(
            "payment",
            Cluster::new("ignored", Protocol::Grpc),
            RoutePolicy::default(),
            &[(a, here.clone()), (b, here), (c, there)],
        );
        let cla = &s.endpoints["outbound|80||payment"];
        assert_eq!(cla.localities.len(), 2);
        assert_eq!(cla.localities[0].weight, 2);
        assert_eq!(
            &*s.clusters["outbound|80||payment"].eds_service_name,
            "outbound|80||payment"
        );

        let decoded = mesh_core::xds::decode_endpoints(&xds::endpoints(
            "c1",
            a,
            Locality::default(),
            &[("version", "v1")],
        ))
        .unwrap();
        assert_eq!(&*decoded.localities[0].endpoints[0].labels[0].1, "v1");
        assert!(mesh_core::xds::decode_listener(&xds::bad_listener("x")).is_err());
    }
}
