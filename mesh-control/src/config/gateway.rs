//! Istio `Gateway`: an ingress gateway served to Envoy nodes whose labels
//! match its `selector` (Istio's `istio: ingressgateway`).
//!
//! A Gateway says which ports a stock Envoy listens on, for which hosts, and
//! how it terminates TLS (certificate files, SIMPLE or MUTUAL); the
//! VirtualServices that name it in `gateways:` say where the requests go.
//! Those are translated here with the mesh's own VirtualService translation
//! (`translate::routes_for_port`), so splits, matches, retries, timeouts,
//! faults and header changes work at the gateway exactly as between
//! services; VirtualServices bound to one gateway merge per host, in file
//! order, as Istio merges them.
//!
//! The result ([`GatewayConfig`]) is kept out of `mesh_core::Snapshot`:
//! this mesh's clients and gRPC never see gateway listeners. It is held by
//! `Served` and sent only to gateway nodes (`crate::dialect::gateway`),
//! which also get the clusters its routes name, in Envoy's dialect.
//!
//! What is not supported is reported at its line rather than ignored:
//! `credentialName` (Kubernetes secrets: use `serverCertificate` /
//! `privateKey` files), PASSTHROUGH / AUTO_PASSTHROUGH / ISTIO_MUTUAL /
//! OPTIONAL_MUTUAL, and TCP / TLS server protocols.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use mesh_core::model::{Name, Route, RouteConfig, VirtualHost};

use super::Diagnostic;
use super::gateway_spec::{GatewayHost, Server};
use super::resources::{Meta, Resource, Spec, VirtualService};

/// The translated gateways of one config, in file order.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct GatewayConfig {
    pub(crate) gateways: Vec<Arc<TranslatedGateway>>,
}

impl GatewayConfig {
    /// The gateways whose selector `labels` (a node's, in `namespace`)
    /// match. As in Istio, a Gateway selects the gateway workloads of
    /// every namespace; an empty selector selects none here (Istio's
    /// would select every proxy, which is never meant for an ingress).
    pub(crate) fn selecting<'a>(
        &'a self,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a TranslatedGateway> + 'a {
        self.gateways.iter().map(Arc::as_ref).filter(move |g| {
            !g.selector.is_empty() && g.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
    }
}

/// One Gateway, ready to serve: Envoy listeners, route configs (both
/// encoded) and the clusters its routes name.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct TranslatedGateway {
    /// `namespace/name`.
    pub(crate) name: String,
    pub(crate) selector: BTreeMap<String, String>,
    /// By name (`0.0.0.0_<port>`).
    pub(crate) listeners: BTreeMap<String, Any>,
    /// By name (`http.<port>`, `https.<port>.<port name>.<gateway>.<ns>`).
    pub(crate) route_configs: BTreeMap<String, Any>,
    /// The clusters the routes name (mesh clusters, `outbound|...`).
    pub(crate) clusters: BTreeSet<String>,
    /// What of the bound VirtualServices the gateway does not honor, one
    /// finding each (`/status` `ignored`, see `crate::compat`).
    pub(crate) ignored: Vec<String>,
}

/// Whether VirtualService `vs` of `meta` is bound to the mesh (no
/// `gateways`, or the `mesh` keyword among them).
pub(crate) fn binds_mesh(vs: &VirtualService) -> bool {
    vs.gateways.is_empty() || vs.gateways.iter().any(|g| g.value == "mesh")
}

/// Whether `vs` (of namespace `vs_ns`) names the Gateway `gw`.
fn binds(vs: &VirtualService, vs_ns: &str, gw: &Meta) -> bool {
    vs.gateways.iter().any(|g| match g.value.split_once('/') {
        Some((ns, name)) => ns == gw.namespace && name == gw.name,
        None => vs_ns == gw.namespace && g.value == gw.name,
    })
}

/// Checks the `gateways` of every VirtualService: each must name a Gateway
/// of the config (or `mesh`).
pub(crate) fn check(resources: &[&Resource]) -> Vec<(usize, Diagnostic)> {
    let gateways: Vec<&Meta> = resources
        .iter()
        .filter(|r| matches!(r.spec, Spec::Gateway(_)))
        .map(|r| &r.meta)
        .collect();
    let mut out = Vec::new();
    for (i, r) in resources.iter().enumerate() {
        let Spec::VirtualService(vs) = &r.spec else {
            continue;
        };
        for g in &vs.gateways {
            if g.value == "mesh" {
                continue;
            }
            let (ns, name) = g
                .value
                .split_once('/')
                .unwrap_or((r.meta.namespace.as_str(), g.value.as_str()));
            if !gateways.iter().any(|m| m.namespace == ns && m.name == name) {
                out.push((
                    i,
                    r.meta.diagnostic(
                        g.line,
                        format!("'gateways': no Gateway {ns}/{name} in the config"),
                    ),
                ));
            }
        }
    }
    out
}

/// Translates every Gateway of `resources` (in file order): `routes`
/// gives the routes of a VirtualService for a gateway port (the mesh's
/// translation of `http[]`).
pub(crate) fn translate(
    resources: &[&Resource],
    mut routes: impl FnMut(&Meta, &VirtualService, u16) -> Vec<Route>,
) -> GatewayConfig {
    let mut out = GatewayConfig::default();
    for r in resources {
        let Spec::Gateway(gw) = &r.spec else {
            continue;
        };
        let bound: Vec<(&Meta, &VirtualService)> = resources
            .iter()
            .filter_map(|v| match &v.spec {
                Spec::VirtualService(vs) if binds(vs, &v.meta.namespace, &r.meta) => {
                    Some((&v.meta, vs))
                }
                _ => None,
            })
            .collect();
        let mut t = TranslatedGateway {
            name: format!("{}/{}", r.meta.namespace, r.meta.name),
            selector: gw.selector.clone(),
            ..TranslatedGateway::default()
        };
        for (meta, vs) in &bound {
            for (i, http) in vs.http.iter().enumerate() {
                let source = http
                    .matches
                    .iter()
                    .any(|m| !m.source_labels.is_empty() || m.source_namespace.is_some());
                if source {
                    t.ignored.push(crate::compat::gateway_source_match(
                        &t.name,
                        &format!("{}/{}", meta.namespace, meta.name),
                        i,
                        &format!("{}:{}", meta.file.display(), http.line),
                    ));
                }
            }
        }
        let mut ports: BTreeMap<u16, Vec<&Server>> = BTreeMap::new();
        for s in &gw.servers {
            ports.entry(s.port).or_default().push(s);
        }
        for (port, servers) in ports {
            let mut chains = Vec::new();
            // Plain servers share one route config per port; each TLS
            // server has its own (its filter chain is chosen by SNI).
            let groups: Vec<(String, Vec<&Server>, Option<&Server>)> =
                if servers.iter().all(|s| s.tls.is_none()) {
                    vec![(format!("http.{port}"), servers.clone(), None)]
                } else {
                    servers
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let port_name = if s.port_name.is_empty() {
                                format!("server{i}")
                            } else {
                                s.port_name.clone()
                            };
                            (
                                format!(
                                    "https.{port}.{port_name}.{}.{}",
                                    r.meta.name, r.meta.namespace
                                ),
                                vec![*s],
                                Some(*s),
                            )
                        })
                        .collect()
                };
            for (rc_name, group, tls_server) in groups {
                let rc = route_config(&rc_name, port, &r.meta, &group, &bound, &mut routes);
                for vh in rc.virtual_hosts.iter() {
                    for route in vh.routes.iter() {
                        t.clusters
                            .extend(route.action.clusters().iter().map(|c| c.name.to_string()));
                        if let Some(traffic) = &route.policy.traffic {
                            t.clusters
                                .extend(traffic.mirrors.iter().map(|m| m.cluster.to_string()));
                        }
                    }
                }
                let redirect = group.iter().any(|s| s.https_redirect && s.tls.is_none());
                t.route_configs.insert(
                    rc_name.clone(),
                    crate::dialect::gateway::encode_route_config(&rc, redirect),
                );
                let server_names: Vec<String> = tls_server
                    .map(|s| {
                        s.hosts
                            .iter()
                            .map(|h| h.value.host.clone())
                            .filter(|h| h != "*")
                            .collect()
                    })
                    .unwrap_or_default();
                chains.push(crate::dialect::gateway::filter_chain(
                    &rc_name,
                    server_names,
                    tls_server.and_then(|s| s.tls.as_ref()),
                ));
            }
            let (name, listener) = crate::dialect::gateway::listener(servers[0].bind, port, chains);
            t.listeners.insert(name, listener);
        }
        out.gateways.push(Arc::new(t));
    }
    out
}

/// The route config `name` of `servers` (on `port`): a virtual host per
/// VirtualService host the servers admit, with the routes of every bound
/// VirtualService for that host, in file order (Istio's merge).
fn route_config(
    name: &str,
    port: u16,
    gw: &Meta,
    servers: &[&Server],
    bound: &[(&Meta, &VirtualService)],
    routes: &mut impl FnMut(&Meta, &VirtualService, u16) -> Vec<Route>,
) -> RouteConfig {
    let mut hosts: BTreeMap<String, Vec<Route>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (meta, vs) in bound {
        let admitted: Vec<&str> = vs
            .hosts
            .iter()
            .map(|h| h.value.as_str())
            .filter(|h| {
                servers.iter().any(|s| {
                    s.hosts.iter().any(|gh| {
                        let gh = match gh.value.namespace.as_deref() {
                            Some(".") => GatewayHost {
                                namespace: Some(gw.namespace.clone()),
                                host: gh.value.host.clone(),
                            },
                            _ => gh.value.clone(),
                        };
                        gh.admits(&meta.namespace, h)
                    })
                })
            })
            .collect();
        if admitted.is_empty() {
            continue;
        }
        let vs_routes = routes(meta, vs, port);
        for h in admitted {
            let entry = hosts.entry(h.to_string()).or_insert_with(|| {
                order.push(h.to_string());
                Vec::new()
            });
            entry.extend(vs_routes.iter().cloned());
        }
    }
    let virtual_hosts: Vec<VirtualHost> = order
        .iter()
        .map(|h| VirtualHost {
            name: Name::from(format!("{h}:{port}")),
            domains: Arc::from([Name::from(h.as_str()), Name::from(format!("{h}:{port}"))]),
            routes: hosts.remove(h).unwrap_or_default().into(),
        })
        .collect();
    RouteConfig {
        name: Name::from(name),
        virtual_hosts: virtual_hosts.into(),
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use prost::Message;

    use super::super::tests::{assert_one, check, store};

    const SERVICE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, labels: {version: v1}}]
---
";

    fn gateway(servers: &str) -> String {
        format!(
            "{SERVICE}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
{servers}"
        )
    }

    #[test]
    fn unsupported_tls_is_reported_at_its_line() {
        let yaml = gateway(
            "  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ['*']
    tls:
      mode: SIMPLE
      credentialName: shop-cert
",
        );
        let diags = check(&yaml);
        assert!(
            diags
                .iter()
                .any(|d| d.line == 20 && d.message.contains("credentialName")),
            "{diags:#?}"
        );
        let yaml = gateway(
            "  - port: {number: 443, name: tls, protocol: HTTPS}
    hosts: ['*']
    tls: {mode: PASSTHROUGH}
",
        );
        assert_one(&check(&yaml), 18, "'PASSTHROUGH' is not supported");
        let yaml = gateway(
            "  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ['*']
",
        );
        assert_one(&check(&yaml), 16, "needs 'tls'");
        let yaml = gateway(
            "  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ['*']
    tls: {mode: SIMPLE, serverCertificate: cert.pem, privateKey: /k.pem}
",
        );
        assert_one(&check(&yaml), 18, "must be an absolute path");
        let yaml = gateway(
            "  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ['shop/a/b']
",
        );
        assert_one(&check(&yaml), 17, "is not a gateway host");
        let yaml = gateway(
            "  - port: {number: 443, name: a, protocol: HTTPS}
    hosts: ['a.example.com']
    tls: {mode: SIMPLE, serverCertificate: /c.pem, privateKey: /k.pem}
  - port: {number: 443, name: b, protocol: HTTPS}
    hosts: ['b.example.com', 'a.example.com']
    tls: {mode: SIMPLE, serverCertificate: /c.pem, privateKey: /k.pem}
",
        );
        assert_one(&check(&yaml), 19, "SNI cannot tell them apart");
        let yaml = gateway(
            "  - port: {number: 80, name: a, protocol: HTTP}
    hosts: ['a.example.com']
  - port: {number: 80, name: b, protocol: HTTP}
    bind: 127.0.0.1
    hosts: ['b.example.com']
",
        );
        assert_one(&check(&yaml), 18, "one listener per port");
    }

    #[test]
    fn a_virtual_service_naming_no_gateway_is_reported() {
        let yaml = format!(
            "{SERVICE}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: front, namespace: shop}}
spec:
  hosts: [shop.example.com]
  gateways: [istio-system/missing]
  http:
  - route: [{{destination: {{host: catalog}}}}]
"
        );
        assert_one(&check(&yaml), 15, "no Gateway istio-system/missing");
    }

    #[test]
    fn bound_virtual_services_merge_per_host_and_stay_out_of_the_mesh() {
        let yaml = gateway(
            "  - port: {number: 8080, name: http, protocol: HTTP}
    bind: 127.0.0.1
    hosts: ['*/shop.example.com']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a, namespace: shop}
spec:
  hosts: [shop.example.com]
  gateways: [istio-system/ingress]
  http:
  - match: [{uri: {prefix: /a}}]
    route: [{destination: {host: catalog}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: shop}
spec:
  hosts: [shop.example.com, catalog]
  gateways: [istio-system/ingress, mesh]
  http:
  - match: [{uri: {prefix: /b}}]
    route: [{destination: {host: catalog}}]
",
        );
        let (s, _d) = store(&[("a.yaml", &yaml)]);
        let config = s.gateways(&[]);
        assert_eq!(config.gateways.len(), 1);
        let labels = [("istio".to_string(), "ingressgateway".to_string())].into();
        let g = config.selecting(&labels).next().expect("selected");
        assert!(config.selecting(&Default::default()).next().is_none());
        let listener = Listener::decode(g.listeners["127.0.0.1_8080"].value.as_slice()).unwrap();
        assert_eq!(listener.filter_chains.len(), 1);
        let rc = RouteConfiguration::decode(g.route_configs["http.8080"].value.as_slice()).unwrap();
        assert_eq!(rc.virtual_hosts.len(), 1);
        let vh = &rc.virtual_hosts[0];
        assert_eq!(vh.domains, ["shop.example.com", "shop.example.com:8080"]);
        assert_eq!(vh.routes.len(), 2, "a's route, then b's");
        assert_eq!(
            g.clusters.iter().collect::<Vec<_>>(),
            ["outbound|80||catalog.shop.svc.cluster.local"]
        );
        // The mesh: `a` is gateway-only, `b` also routes catalog.
        let (snapshot, problems) = s.snapshot(&[]);
        assert!(problems.is_empty(), "{problems:#?}");
        let mesh_routes: Vec<String> = snapshot
            .route_configs
            .values()
            .flat_map(|rc| rc.virtual_hosts.iter())
            .flat_map(|vh| vh.routes.iter().map(|r| r.name.to_string()))
            .collect();
        assert!(mesh_routes.contains(&"b.0".to_string()), "{mesh_routes:?}");
        assert!(!mesh_routes.contains(&"a.0".to_string()), "{mesh_routes:?}");
    }
}
