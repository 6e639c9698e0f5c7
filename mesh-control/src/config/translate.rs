//! From resources and registrations to a snapshot of listeners, route
//! configs, clusters and endpoints.
//!
//! The shape follows what Istio generates for a sidecar
//! (<https://istio.io/latest/docs/ops/configuration/traffic-management/>),
//! cut down to what a gRPC proxyless client reads (gRFC A27/A28): a service
//! is a host with ports; each port gets a route config `<fqdn>:<port>` with
//! one virtual host, clusters `outbound|<port>|<subset>|<fqdn>` (one for the
//! whole port, one per DestinationRule subset) and their endpoints, grouped
//! by locality. Listeners are the names an app dials.
//!
//! Problems that involve more than one resource are found here, so they are
//! judged against a whole set (and, at run time, the registrations). Each
//! such problem is attributed to the resource it makes invalid
//! ([`Translation::invalid`]): the later of two ServiceEntries or
//! DestinationRules for a host, the VirtualService whose destination does not
//! exist. That is what `last_good` decides changes with: a change after
//! which some resource is invalid is not applied. A resource of the set
//! being served can still be invalid when the registrations it depends on
//! are gone; then a VirtualService is left out whole, and its hosts get the
//! default route, rather than routing half of what the user wrote.

use mesh_core::traffic::{HeaderRules, Mirror, Traffic};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::Snapshot;
use mesh_core::model::{
    Cluster, ClusterLoadAssignment, Discovery, DnsDiscovery, DnsHost, Endpoint, FileTls,
    HashPolicy, Listener, Locality, LocalityEndpoints, MtlsMode, Name, Protocol, RetryPolicy,
    Route, RouteConfig, RouteMatch, RoutePolicy, TlsOrigination, UpstreamTls, VirtualHost,
    WeightedCluster, WeightedClusters,
};
use mesh_core::spiffe::SpiffeId;

use super::names::{cluster_local, resolve_host};
use super::policy::{ClientTls, ClientTlsMode, TrafficPolicy};
use super::resources::{
    DestinationRule, DnsEndpoint, ExportTo, Meta, Resolution, Resource, ResourceKey, Spec,
    VirtualService, Workload,
};
use super::security::{self, Identities, SecurityPolicies};
use super::{Audience, Diagnostic, MeshOptions, Registration, ServiceInfo};

/// The cluster name of a service port or one of its subsets.
pub(crate) fn cluster_name(port: u16, subset: &str, fqdn: &str) -> String {
    format!("outbound|{port}|{subset}|{fqdn}")
}

/// A port of a service.
#[derive(Debug, Clone)]
struct Port {
    number: u16,
    name: Option<String>,
    protocol: Protocol,
    target_port: Option<u16>,
    /// `protocol: HTTPS` / `TLS`: the client originates TLS to it.
    tls: bool,
}

/// One endpoint of one port of a service.
#[derive(Debug, Clone)]
struct Member {
    port: u16,
    address: SocketAddr,
    labels: BTreeMap<String, String>,
    locality: Locality,
    weight: u32,
    /// The namespace of the workload (its PeerAuthentication's).
    namespace: String,
}

/// A host with ports and endpoints: declared by a ServiceEntry, or implied by
/// registrations.
#[derive(Debug, Clone)]
struct Service {
    fqdn: String,
    namespace: String,
    /// In declaration order; the first is the default port.
    ports: Vec<Port>,
    members: Vec<Member>,
    /// The ServiceEntry and the line of its `ports`; `None` when implicit.
    declared_by: Option<(Meta, usize)>,
    /// The ServiceEntry's `exportTo` (an implicit service: every namespace).
    export_to: ExportTo,
    /// `resolution: DNS` (`Some(false)`) or `DNS_ROUND_ROBIN`
    /// (`Some(true)`): the host is resolved by each client, its clusters
    /// are DNS clusters and its members unused.
    dns: Option<bool>,
    /// The `endpoints` of a DNS entry (names to resolve instead of the
    /// host).
    dns_endpoints: Vec<DnsEndpoint>,
    /// `location: MESH_EXTERNAL`: no auto mTLS to it.
    external: bool,
}

impl Service {
    fn has_port(&self, number: u16) -> bool {
        self.ports.iter().any(|p| p.number == number)
    }

    fn port_list(&self) -> String {
        let list: Vec<String> = self.ports.iter().map(|p| p.number.to_string()).collect();
        list.join(", ")
    }
}

fn unknown_host(fqdn: &str) -> String {
    format!(
        "host '{fqdn}' is not declared by any ServiceEntry or registered endpoint (declare it with a ServiceEntry, even without endpoints)"
    )
}

/// The problems a translation finds: every one, in the order found, and
/// those that make a resource invalid, by resource.
#[derive(Debug, Default)]
pub(crate) struct Problems {
    all: Vec<Diagnostic>,
    invalid: BTreeMap<ResourceKey, Vec<Diagnostic>>,
}

impl Problems {
    /// A problem that makes the resource `meta` names invalid.
    fn of(&mut self, meta: &Meta, diagnostic: Diagnostic) {
        self.invalid
            .entry(meta.key())
            .or_default()
            .push(diagnostic.clone());
        self.all.push(diagnostic);
    }

    /// A problem of something else than a resource (a registration).
    fn other(&mut self, diagnostic: Diagnostic) {
        self.all.push(diagnostic);
    }
}

/// Collects the services: ServiceEntry hosts (with their static endpoints and
/// selected WorkloadEntries), then registrations.
fn collect_services(
    options: &MeshOptions,
    resources: &[&Resource],
    registrations: &[Registration],
    audience: Audience<'_>,
    problems: &mut Problems,
    hidden: &mut BTreeMap<String, String>,
) -> BTreeMap<String, Service> {
    let suffix = options.domain_suffix.as_str();
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    // Hosts of ServiceEntries this audience does not see: their
    // registrations are hidden with them.
    let mut hidden_hosts: BTreeSet<String> = BTreeSet::new();
    let workload_entries: Vec<(&Meta, &Workload)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::WorkloadEntry(w) => Some((&r.meta, w)),
            _ => None,
        })
        .collect();
    for r in resources {
        let Spec::ServiceEntry(se) = &r.spec else {
            continue;
        };
        if let Some(namespace) = audience.hidden_from(&r.meta, &se.export_to) {
            for host in &se.hosts {
                let fqdn = resolve_host(&host.value, &r.meta.namespace, suffix);
                let why = format!(
                    "not exported to namespace {namespace:?} by ServiceEntry {}/{} at {} \
                     (exportTo{}: {})",
                    r.meta.namespace,
                    r.meta.name,
                    r.meta.location(),
                    se.export_to
                        .line()
                        .map(|l| format!(" at line {l}"))
                        .unwrap_or_default(),
                    se.export_to.describe(&r.meta.namespace)
                );
                let local = cluster_local(&fqdn, suffix);
                for (i, p) in se.ports.iter().enumerate() {
                    for name in dial_names(&fqdn, local, p.number, i == 0) {
                        hidden.entry(name).or_insert_with(|| why.clone());
                    }
                    hidden
                        .entry(cluster_name(p.number, "", &fqdn))
                        .or_insert_with(|| why.clone());
                }
                hidden_hosts.insert(fqdn);
            }
            continue;
        }
        let ports: Vec<Port> = se
            .ports
            .iter()
            .map(|p| Port {
                number: p.number,
                name: p.name.clone(),
                protocol: p.protocol,
                target_port: p.target_port,
                tls: p.tls,
            })
            .collect();
        let mut workloads: Vec<&Workload> = se.endpoints.iter().collect();
        if let Some(selector) = &se.selector {
            workloads.extend(
                workload_entries
                    .iter()
                    .filter(|(m, w)| {
                        m.namespace == r.meta.namespace
                            && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                    .map(|(_, w)| *w),
            );
        }
        let mut members = Vec::new();
        for w in &workloads {
            for p in &ports {
                let target = p
                    .name
                    .as_ref()
                    .and_then(|n| w.ports.get(n).copied())
                    .or(p.target_port)
                    .unwrap_or(p.number);
                members.push(Member {
                    port: p.number,
                    address: SocketAddr::new(w.address, target),
                    labels: w.labels.clone(),
                    locality: w.locality.clone(),
                    weight: w.weight,
                    namespace: r.meta.namespace.clone(),
                });
            }
        }
        // `resolution: NONE`: the addresses are the endpoints (see
        // `resources::Resolution`).
        if let Resolution::None { addresses } = &se.resolution {
            for ip in addresses {
                for p in &ports {
                    members.push(Member {
                        port: p.number,
                        address: SocketAddr::new(*ip, p.target_port.unwrap_or(p.number)),
                        labels: BTreeMap::new(),
                        locality: Locality::default(),
                        weight: 1,
                        namespace: r.meta.namespace.clone(),
                    });
                }
            }
        }
        let dns = match se.resolution {
            Resolution::Dns { round_robin } => Some(round_robin),
            _ => None,
        };
        for host in &se.hosts {
            let fqdn = resolve_host(&host.value, &r.meta.namespace, suffix);
            if let Some(existing) = services.get(&fqdn) {
                // Two declarations for disjoint sets of namespaces are no
                // conflict: no workload sees both (each view has its own).
                let other_ns = existing
                    .declared_by
                    .as_ref()
                    .map_or("", |(m, _)| m.namespace.as_str());
                if !existing
                    .export_to
                    .overlaps(other_ns, &se.export_to, &r.meta.namespace)
                {
                    continue;
                }
                let by = existing
                    .declared_by
                    .as_ref()
                    .map(|(m, _)| format!("{m} at {}", m.location()))
                    .unwrap_or_default();
                problems.of(
                    &r.meta,
                    r.meta.diagnostic(
                        host.line,
                        format!(
                            "host '{fqdn}' is already declared by {by}; this declaration is ignored"
                        ),
                    ),
                );
                continue;
            }
            let namespace = cluster_local(&fqdn, suffix)
                .map(|(_, ns)| ns.to_string())
                .unwrap_or_else(|| r.meta.namespace.clone());
            services.insert(
                fqdn.clone(),
                Service {
                    fqdn,
                    namespace,
                    ports: ports.clone(),
                    members: members.clone(),
                    declared_by: Some((r.meta.clone(), se.ports_line)),
                    export_to: se.export_to.clone(),
                    dns,
                    dns_endpoints: se.dns_endpoints.clone(),
                    external: se.mesh_external,
                },
            );
        }
    }
    let mut implicit = BTreeSet::new();
    let identities = Identities::new(options, resources);
    for reg in registrations {
        let fqdn = resolve_host(&reg.service, &reg.namespace, suffix);
        if hidden_hosts.contains(&fqdn) && !services.contains_key(&fqdn) {
            continue;
        }
        let service_ns = cluster_local(&fqdn, suffix)
            .map(|(_, ns)| ns)
            .unwrap_or(&reg.namespace);
        // The WorkloadGroup's labels, under the registration's own.
        let mut labels = identities
            .group_labels(&fqdn, service_ns, suffix)
            .cloned()
            .unwrap_or_default();
        labels.extend(reg.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        let member = |port: u16| Member {
            port,
            address: SocketAddr::new(reg.address, reg.port),
            labels: labels.clone(),
            locality: reg.locality.clone(),
            weight: 1,
            namespace: reg.namespace.clone(),
        };
        match services.get_mut(&fqdn) {
            Some(svc) if svc.declared_by.is_some() => match reg.service_port {
                Some(sp) if svc.has_port(sp) => svc.members.push(member(sp)),
                Some(sp) => {
                    // The registration's problem, not the ServiceEntry's.
                    if let Some((meta, line)) = &svc.declared_by {
                        problems.other(meta.diagnostic(
                            *line,
                            format!(
                                "endpoint {} registered for port {sp} of host '{fqdn}', which has only port(s) {}; it is not used",
                                SocketAddr::new(reg.address, reg.port),
                                svc.port_list()
                            ),
                        ));
                    }
                }
                None => {
                    let ports: Vec<u16> = svc.ports.iter().map(|p| p.number).collect();
                    svc.members.extend(ports.into_iter().map(member));
                }
            },
            Some(svc) => {
                let port = reg.service_port.unwrap_or(80);
                if !svc.has_port(port) {
                    svc.ports.push(Port {
                        number: port,
                        name: None,
                        protocol: reg.protocol.unwrap_or(Protocol::Http1),
                        target_port: None,
                        tls: false,
                    });
                }
                svc.members.push(member(port));
            }
            None => {
                let port = reg.service_port.unwrap_or(80);
                let namespace = cluster_local(&fqdn, suffix)
                    .map(|(_, ns)| ns.to_string())
                    .unwrap_or_else(|| reg.namespace.clone());
                implicit.insert(fqdn.clone());
                services.insert(
                    fqdn.clone(),
                    Service {
                        fqdn,
                        namespace,
                        ports: vec![Port {
                            number: port,
                            name: None,
                            protocol: reg.protocol.unwrap_or(Protocol::Http1),
                            target_port: None,
                            tls: false,
                        }],
                        members: vec![member(port)],
                        declared_by: None,
                        export_to: ExportTo::All,
                        dns: None,
                        dns_endpoints: Vec::new(),
                        external: false,
                    },
                );
            }
        }
    }
    // Registrations come in no particular order: an implicit service's ports
    // are sorted so that its default port does not depend on it.
    for fqdn in implicit {
        if let Some(svc) = services.get_mut(&fqdn) {
            svc.ports.sort_by_key(|p| p.number);
        }
    }
    services
}

/// The DestinationRules of each host the audience sees: the first one (in
/// file order) applies. Another is kept only when no namespace sees both
/// (`exportTo`): it is the one of other views, and its subsets exist for
/// the VirtualServices checked without a view.
#[derive(Default)]
struct Rules<'r> {
    first: BTreeMap<String, (&'r Meta, &'r DestinationRule)>,
    others: BTreeMap<String, Vec<&'r DestinationRule>>,
}

impl<'r> Rules<'r> {
    /// The rule that applies to `fqdn`.
    fn get(&self, fqdn: &str) -> Option<&(&'r Meta, &'r DestinationRule)> {
        self.first.get(fqdn)
    }

    /// Whether some rule of `fqdn` defines `subset`.
    fn defines(&self, fqdn: &str, subset: &str) -> bool {
        let defines = |r: &DestinationRule| r.subsets.iter().any(|x| x.name.value == subset);
        self.first.get(fqdn).is_some_and(|(_, r)| defines(r))
            || self
                .others
                .get(fqdn)
                .is_some_and(|rs| rs.iter().any(|r| defines(r)))
    }
}

/// The DestinationRules of each host (see [`Rules`]).
fn collect_rules<'r>(
    options: &MeshOptions,
    resources: &[&'r Resource],
    services: &BTreeMap<String, Service>,
    audience: Audience<'_>,
    problems: &mut Problems,
) -> Rules<'r> {
    let mut rules = Rules::default();
    for r in resources {
        let Spec::DestinationRule(dr) = &r.spec else {
            continue;
        };
        if audience.hidden_from(&r.meta, &dr.export_to).is_some() {
            continue;
        }
        let fqdn = resolve_host(&dr.host.value, &r.meta.namespace, &options.domain_suffix);
        if let Some((first, first_rule)) = rules.first.get(&fqdn) {
            if !first_rule
                .export_to
                .overlaps(&first.namespace, &dr.export_to, &r.meta.namespace)
            {
                rules.others.entry(fqdn).or_default().push(dr);
                continue;
            }
            problems.of(
                &r.meta,
                r.meta.diagnostic(
                    dr.host.line,
                    format!(
                        "host '{fqdn}' already has DestinationRule {}/{} at {}; this one is ignored",
                        first.namespace,
                        first.name,
                        first.location()
                    ),
                ),
            );
            continue;
        }
        if !services.contains_key(&fqdn) {
            // Still the host's rule: it takes effect when the host appears.
            problems.of(
                &r.meta,
                r.meta.diagnostic(dr.host.line, unknown_host(&fqdn)),
            );
        }
        rules.first.insert(fqdn, (&r.meta, dr));
    }
    rules
}

/// The traffic policy of the cluster of `port` for `subset` (`""` for the
/// whole service): the rule's, with the subset's merged over it, each with
/// its `portLevelSettings` for `port` applied first (see
/// [`TrafficPolicy::for_cluster`]).
fn cluster_policy(rule: Option<&DestinationRule>, subset: &str, port: u16) -> TrafficPolicy {
    let Some(rule) = rule else {
        return TrafficPolicy::default();
    };
    let subset = rule
        .subsets
        .iter()
        .find(|s| !subset.is_empty() && s.name.value == subset);
    rule.policy.for_cluster(subset.map(|s| &s.policy), port)
}

/// The consistent-hash key of requests sent to `subset` of `fqdn` on
/// `port`, from its DestinationRule (Envoy carries it on the route, Istio
/// puts it there, port-level settings included).
fn hash_policy_for(rules: &Rules<'_>, fqdn: &str, subset: &str, port: u16) -> Arc<[HashPolicy]> {
    let rule = rules.get(fqdn).map(|(_, r)| *r);
    match cluster_policy(rule, subset, port).hash_policy() {
        Some(h) => Arc::from([h.clone()]),
        None => Arc::from([]),
    }
}

/// Routes of one VirtualService for each (host, port) it serves.
type RouteTable = BTreeMap<(String, u16), Vec<Route>>;

/// Checks a VirtualService against the services and rules and, when it has no
/// problem, translates its routes for each port of each of its hosts.
#[allow(clippy::too_many_arguments)]
fn translate_virtual_service(
    options: &MeshOptions,
    meta: &Meta,
    vs: &VirtualService,
    hosts: &[String],
    services: &BTreeMap<String, Service>,
    rules: &Rules<'_>,
    audience: Audience<'_>,
    problems: &mut Vec<Diagnostic>,
) -> RouteTable {
    let suffix = options.domain_suffix.as_str();
    let before = problems.len();
    for (i, http) in vs.http.iter().enumerate() {
        for (j, d) in http.route.iter().enumerate() {
            let path = format!("http[{i}].route[{j}].destination");
            let fqdn = resolve_host(&d.host.value, &meta.namespace, suffix);
            let Some(svc) = services.get(&fqdn) else {
                problems.push(meta.diagnostic(
                    d.host.line,
                    format!("'{path}.host': {}", unknown_host(&fqdn)),
                ));
                continue;
            };
            if let Some(p) = &d.port
                && !svc.has_port(p.value)
            {
                problems.push(meta.diagnostic(
                    p.line,
                    format!(
                        "'{path}.port.number': host '{fqdn}' has no port {} (its ports: {})",
                        p.value,
                        svc.port_list()
                    ),
                ));
            }
            if let Some(s) = &d.subset {
                let message = match rules.get(&fqdn) {
                    _ if rules.defines(&fqdn, &s.value) => None,
                    None => Some(format!(
                        "'{path}.subset': subset '{}' is not defined: no DestinationRule for host '{fqdn}'",
                        s.value
                    )),
                    Some((rm, rule)) if !rule.subsets.iter().any(|x| x.name.value == s.value) => {
                        Some(format!(
                            "'{path}.subset': subset '{}' is not defined by DestinationRule {}/{} at {}",
                            s.value,
                            rm.namespace,
                            rm.name,
                            rm.location()
                        ))
                    }
                    Some(_) => None,
                };
                if let Some(m) = message {
                    problems.push(meta.diagnostic(s.line, m));
                }
            }
        }
        for (k, m) in http.matches.iter().enumerate() {
            if let Some(p) = &m.port {
                let served = hosts
                    .iter()
                    .filter_map(|h| services.get(h))
                    .any(|s| s.has_port(p.value));
                if !served {
                    problems.push(meta.diagnostic(
                        p.line,
                        format!(
                            "'http[{i}].match[{k}].port': no host of this VirtualService has port {}",
                            p.value
                        ),
                    ));
                }
            }
        }
    }
    let mut table = RouteTable::new();
    if problems.len() != before {
        return table;
    }
    for fqdn in hosts {
        let Some(svc) = services.get(fqdn) else {
            continue;
        };
        for port in &svc.ports {
            let routes = routes_for_port(
                options,
                meta,
                vs,
                port.number,
                services,
                rules,
                audience,
                problems,
            );
            table.insert((fqdn.clone(), port.number), routes);
        }
    }
    table
}

/// The routes of `vs` that apply to `port` of its hosts, in order, for
/// the callers of `audience`: a `match[]` entry whose `sourceLabels` or
/// `sourceNamespace` the audience's callers do not have is left out (a
/// route with none left is), as Istio generates routes per proxy. A route
/// gets the hash policy of its first destination's cluster.
#[allow(clippy::too_many_arguments)]
fn routes_for_port(
    options: &MeshOptions,
    meta: &Meta,
    vs: &VirtualService,
    port: u16,
    services: &BTreeMap<String, Service>,
    rules: &Rules<'_>,
    audience: Audience<'_>,
    problems: &mut Vec<Diagnostic>,
) -> Vec<Route> {
    let mut routes = Vec::new();
    for (i, http) in vs.http.iter().enumerate() {
        let matchers: Vec<RouteMatch> = if http.matches.is_empty() {
            vec![RouteMatch::any()]
        } else {
            http.matches
                .iter()
                .filter(|m| m.port.as_ref().is_none_or(|p| p.value == port))
                .filter(|m| audience.admits(m))
                .map(|m| RouteMatch {
                    path: m.path.clone(),
                    headers: m.headers.clone().into(),
                    query_params: m.query_params.clone().into(),
                    ignore_case: m.ignore_uri_case,
                })
                .collect()
        };
        if matchers.is_empty() {
            continue;
        }
        let mut clusters = Vec::new();
        // The destination-level header rules of the clusters kept, in order.
        let mut destination_rules = Vec::new();
        let mut hash_policy: Arc<[HashPolicy]> = Arc::from([]);
        for (j, d) in http.route.iter().enumerate() {
            let fqdn = resolve_host(&d.host.value, &meta.namespace, &options.domain_suffix);
            let Some(svc) = services.get(&fqdn) else {
                continue;
            };
            let dest_port = match (&d.port, svc.ports.as_slice()) {
                (Some(p), _) => p.value,
                (None, [only]) => only.number,
                (None, _) if svc.has_port(port) => port,
                (None, _) => {
                    problems.push(meta.diagnostic(
                        d.line,
                        format!(
                            "'http[{i}].route[{j}].destination': host '{fqdn}' has several ports ({}) and none is {port}; set 'port.number'",
                            svc.port_list()
                        ),
                    ));
                    continue;
                }
            };
            let subset = d.subset.as_ref().map(|s| s.value.as_str()).unwrap_or("");
            if clusters.is_empty() {
                hash_policy = hash_policy_for(rules, &fqdn, subset, dest_port);
            }
            clusters.push(WeightedCluster {
                name: Name::from(cluster_name(dest_port, subset, &fqdn)),
                weight: d.weight,
            });
            destination_rules.push(d.headers.clone());
        }
        let mut mirrors = Vec::new();
        for (j, m) in http.mirrors.iter().enumerate() {
            let d = &m.destination;
            let what = if http.mirrors.len() == 1 && j == 0 {
                format!("http[{i}].mirror")
            } else {
                format!("http[{i}].mirrors[{j}].destination")
            };
            let fqdn = resolve_host(&d.host.value, &meta.namespace, &options.domain_suffix);
            let Some(svc) = services.get(&fqdn) else {
                problems.push(meta.diagnostic(
                    d.host.line,
                    format!("'{what}.host': {}", unknown_host(&fqdn)),
                ));
                continue;
            };
            let mirror_port = match (&d.port, svc.ports.as_slice()) {
                (Some(p), _) => p.value,
                (None, [only]) => only.number,
                (None, _) if svc.has_port(port) => port,
                (None, _) => {
                    problems.push(meta.diagnostic(
                        d.line,
                        format!(
                            "'{what}': host '{fqdn}' has several ports ({}) and none is {port}; set 'port.number'",
                            svc.port_list()
                        ),
                    ));
                    continue;
                }
            };
            let subset = d.subset.as_ref().map(|s| s.value.as_str()).unwrap_or("");
            mirrors.push(Mirror {
                cluster: Name::from(cluster_name(mirror_port, subset, &fqdn)),
                fraction: m.fraction,
            });
        }
        let answers = http.traffic.answer.is_some();
        let action = match clusters.as_slice() {
            [] if answers => WeightedClusters::none(),
            [] => continue,
            [one] => WeightedClusters::single(one.name.clone()),
            _ => match WeightedClusters::new(clusters) {
                Ok(w) => w,
                Err(e) => {
                    problems.push(meta.diagnostic(http.line, format!("'http[{i}].route': {e}")));
                    continue;
                }
            },
        };
        let name: Name = match &http.name {
            Some(n) => Name::from(n.as_str()),
            None => Name::from(format!("{}.{i}", meta.name)),
        };
        let traffic = Traffic {
            destinations: if destination_rules.iter().all(HeaderRules::is_empty) {
                Arc::from([])
            } else {
                destination_rules.into()
            },
            mirrors: mirrors.into(),
            ..http.traffic.clone()
        };
        let traffic = (!traffic.is_empty()).then(|| Arc::new(traffic));
        let policy = if answers {
            // A route that answers itself: nothing else of a policy applies.
            RoutePolicy {
                traffic,
                ..RoutePolicy::default()
            }
        } else {
            RoutePolicy {
                hash_policy,
                traffic,
                ..http.policy.clone()
            }
        };
        for matcher in matchers {
            routes.push(Route {
                name: name.clone(),
                matcher,
                action: action.clone(),
                policy: policy.clone(),
            });
        }
    }
    routes
}

/// Translates the Gateways of `resources` and the VirtualServices bound to
/// them (see `gateway`): nothing to do, and no translation, without a
/// Gateway. Problems are the shared translation's (`translate`).
pub(crate) fn translate_gateways(
    options: &MeshOptions,
    resources: &[&Resource],
    registrations: &[Registration],
) -> super::gateway::GatewayConfig {
    if !resources.iter().any(|r| matches!(r.spec, Spec::Gateway(_))) {
        return super::gateway::GatewayConfig::default();
    }
    let mut found = Problems::default();
    let mut hidden = BTreeMap::new();
    let audience = Audience::Everyone;
    let services = collect_services(
        options,
        resources,
        registrations,
        audience,
        &mut found,
        &mut hidden,
    );
    let rules = collect_rules(options, resources, &services, audience, &mut found);
    super::gateway::translate(resources, |meta, vs, port| {
        let mut problems = Vec::new();
        let routes = routes_for_port(
            options,
            meta,
            vs,
            port,
            &services,
            &rules,
            audience,
            &mut problems,
        );
        if problems.is_empty() {
            routes
        } else {
            Vec::new()
        }
    })
}

/// The result of a translation.
pub(crate) struct Translation {
    pub(crate) snapshot: Snapshot,
    /// Every problem found, sorted by file and line.
    pub(crate) diagnostics: Vec<Diagnostic>,
    /// The resources these problems make invalid, with theirs: what a
    /// change must not add to (see `last_good`). A registration's problem
    /// (a port its ServiceEntry lacks) is in `diagnostics` only.
    pub(crate) invalid: BTreeMap<ResourceKey, Vec<Diagnostic>>,
    /// For a view: the names of listeners, route configs and clusters that
    /// exist for other namespaces only (`exportTo`), with why, for the
    /// NOT_FOUND a client asking for one gets.
    pub(crate) hidden: BTreeMap<String, String>,
}

/// The names an app dials for port `port` of `fqdn` (`local`: its short
/// name and namespace when cluster-local): its listeners.
fn dial_names(fqdn: &str, local: Option<(&str, &str)>, port: u16, is_default: bool) -> Vec<String> {
    let mut names = vec![format!("{fqdn}:{port}")];
    if is_default {
        names.push(fqdn.to_string());
    }
    if let Some((name, ns)) = local {
        names.push(format!("{name}.{ns}:{port}"));
        if is_default {
            names.push(format!("{name}.{ns}"));
        }
    }
    names
}

/// Translates `resources` (in file order) and `registrations` for every
/// workload: every resource and route, whatever its `exportTo` and source
/// conditions (the shared translation, and what changes are judged by).
pub(crate) fn translate(
    options: &MeshOptions,
    resources: &[&Resource],
    registrations: &[Registration],
) -> Translation {
    translate_for(options, resources, registrations, Audience::Everyone)
}

/// Translates `resources` and `registrations` for `audience`: with a view,
/// only the resources exported to its namespace, and only the routes
/// whose source conditions its callers meet.
pub(crate) fn translate_for(
    options: &MeshOptions,
    resources: &[&Resource],
    registrations: &[Registration],
    audience: Audience<'_>,
) -> Translation {
    let suffix = options.domain_suffix.as_str();
    let mut found = Problems::default();
    let mut hidden = BTreeMap::new();
    let services = collect_services(
        options,
        resources,
        registrations,
        audience,
        &mut found,
        &mut hidden,
    );
    let rules = collect_rules(options, resources, &services, audience, &mut found);
    // security.rs reports at the line of the resource it ignores (its
    // `metadata.name`): that is how its problems are attributed.
    for d in security::check(resources) {
        match resources
            .iter()
            .find(|r| r.meta.file == d.file && r.meta.line == d.line)
        {
            Some(r) => found.of(&r.meta, d),
            None => found.other(d),
        }
    }
    // VirtualServices naming a Gateway the config lacks.
    for (i, d) in super::gateway::check(resources) {
        found.of(&resources[i].meta, d);
    }
    // A second Sidecar for the same workloads (the earlier one applies).
    for (meta, d) in super::sidecar::check(resources) {
        found.of(meta, d);
    }
    let security = security::resolve(options, resources);
    let identities = Identities::new(options, resources);
    // Client-side local rate limits (EnvoyFilter SIDECAR_OUTBOUND) of this
    // audience's callers, set on their routes below.
    let outbound =
        super::envoy_filter_outbound::Outbound::new(&options.root_namespace, resources, audience);

    // VirtualServices, in file order: the first to name a host routes it
    // (for the namespaces it is exported to: two exported to disjoint sets
    // of namespaces are no conflict, each routes its own).
    let mut claims: BTreeMap<String, Vec<(&Meta, &ExportTo)>> = BTreeMap::new();
    let mut routed = RouteTable::new();
    for r in resources {
        let Spec::VirtualService(vs) = &r.spec else {
            continue;
        };
        if audience.hidden_from(&r.meta, &vs.export_to).is_some() {
            continue;
        }
        let mut problems = Vec::new();
        if !super::gateway::binds_mesh(vs) {
            // Bound to gateways only: served to gateway nodes (see
            // `translate_gateways`), never to the mesh's workloads; its
            // destinations are still checked here (a `match.port` is a
            // gateway port there, not a service's).
            let mut destinations = vs.clone();
            for http in &mut destinations.http {
                for m in &mut http.matches {
                    m.port = None;
                }
            }
            translate_virtual_service(
                options,
                &r.meta,
                &destinations,
                &[],
                &services,
                &rules,
                audience,
                &mut problems,
            );
            for d in problems {
                found.of(&r.meta, d);
            }
            continue;
        }
        let mut hosts = Vec::new();
        for h in &vs.hosts {
            let fqdn = resolve_host(&h.value, &r.meta.namespace, suffix);
            let earlier = claims.get(&fqdn).and_then(|c| {
                c.iter()
                    .find(|(m, e)| e.overlaps(&m.namespace, &vs.export_to, &r.meta.namespace))
            });
            if let Some((first, _)) = earlier {
                problems.push(r.meta.diagnostic(
                    h.line,
                    format!(
                        "host '{fqdn}' already routed by VirtualService {}/{} at {}",
                        first.namespace,
                        first.name,
                        first.location()
                    ),
                ));
                continue;
            }
            claims
                .entry(fqdn.clone())
                .or_default()
                .push((&r.meta, &vs.export_to));
            if services.contains_key(&fqdn) {
                hosts.push(fqdn);
            } else if vs.gateways.len() < 2 {
                // Bound to the mesh and gateways: a host the mesh does not
                // know is one of the gateways' (an outside name).
                problems.push(r.meta.diagnostic(h.line, unknown_host(&fqdn)));
            }
        }
        let table = translate_virtual_service(
            options,
            &r.meta,
            vs,
            &hosts,
            &services,
            &rules,
            audience,
            &mut problems,
        );
        if problems.is_empty() {
            for (key, routes) in table {
                routed.entry(key).or_insert(routes);
            }
        } else {
            for d in problems {
                found.of(&r.meta, d);
            }
        }
    }

    let mut snapshot = Snapshot::default();
    for svc in services.values() {
        let fqdn = svc.fqdn.as_str();
        let local = cluster_local(fqdn, suffix);
        let rule = rules.get(fqdn).map(|(_, r)| *r);
        let Some(default_port) = svc.ports.first().map(|p| p.number) else {
            continue;
        };
        for port in &svc.ports {
            let p = port.number;
            let is_default = p == default_port;
            let rc_name = Name::from(format!("{fqdn}:{p}"));

            let listener_names = dial_names(fqdn, local, p, is_default);
            let mut domains = Vec::new();
            if is_default {
                domains.push(fqdn.to_string());
            }
            domains.push(format!("{fqdn}:{p}"));
            if let Some((name, ns)) = local {
                if is_default {
                    domains.push(format!("{name}.{ns}"));
                }
                domains.push(format!("{name}.{ns}:{p}"));
                if is_default {
                    domains.push(name.to_string());
                }
                domains.push(format!("{name}:{p}"));
            }
            for l in listener_names {
                let name = Name::from(l);
                snapshot.listeners.insert(
                    name.clone(),
                    Arc::new(Listener {
                        name,
                        route_config_name: rc_name.clone(),
                    }),
                );
            }

            let base = cluster_name(p, "", fqdn);
            let routes = match routed.get(&(fqdn.to_string(), p)) {
                Some(r) if !r.is_empty() => r.clone(),
                // Istio's default route: default retries, no timeout, and
                // the service's consistent-hash key if its rule sets one.
                _ => vec![Route {
                    name: Name::from("default"),
                    matcher: RouteMatch::any(),
                    action: WeightedClusters::single(base.as_str()),
                    policy: RoutePolicy {
                        retry: Some(RetryPolicy::istio_default()),
                        hash_policy: hash_policy_for(&rules, fqdn, "", p),
                        ..RoutePolicy::default()
                    },
                }],
            };
            let mut routes = routes;
            if !outbound.is_empty() {
                // Not on a route that answers itself: Envoy's filter would
                // limit it, but the model keeps such routes policy-free.
                for r in routes
                    .iter_mut()
                    .filter(|r| r.policy.traffic.as_ref().is_none_or(|t| t.answer.is_none()))
                {
                    r.policy.rate_limit = outbound.for_route(&rc_name, &r.name);
                }
            }
            snapshot.route_configs.insert(
                rc_name.clone(),
                Arc::new(RouteConfig {
                    name: rc_name.clone(),
                    virtual_hosts: Arc::from([VirtualHost {
                        name: rc_name.clone(),
                        domains: domains.into_iter().map(Name::from).collect(),
                        routes: routes.into(),
                    }]),
                }),
            );

            let members: Vec<&Member> = svc.members.iter().filter(|m| m.port == p).collect();
            let mut allowed: Option<Arc<[SpiffeId]>> = None;
            let mut add_cluster =
                |name: String,
                 subset: &str,
                 policy: TrafficPolicy,
                 labels: &BTreeMap<String, String>| {
                    let name = Name::from(name);
                    let mut cluster = Cluster::new(name.clone(), port.protocol);
                    policy.apply(&mut cluster);
                    policy.apply_locality(&mut cluster);
                    // `resolution: DNS`: each client resolves the host.
                    if let Some(round_robin) = svc.dns {
                        cluster.discovery = Discovery::Dns(dns_discovery(svc, port, round_robin));
                    }
                    // An HTTPS / TLS port: the client originates TLS
                    // (system roots, SNI the host) unless the rule says how.
                    if port.tls && policy.tls.is_none() {
                        cluster.tls = Some(UpstreamTls {
                            server_identities: Arc::from([]),
                            sni: Name::from(fqdn),
                            origination: TlsOrigination::Files(FileTls {
                                ca_certificates: None,
                                subject_alt_names: Arc::from([]),
                                client_certificate: None,
                            }),
                        });
                    }
                    let selected: Vec<&Member> = members
                        .iter()
                        .filter(|m| labels.iter().all(|(k, v)| m.labels.get(k) == Some(v)))
                        .copied()
                        .collect();
                    // ISTIO_MUTUAL (explicit, or auto mTLS): its SANs and SNI.
                    // Never to MESH_EXTERNAL hosts (outside the mesh's
                    // identities) nor to TLS ports (their own TLS).
                    let istio_mutual = match policy.tls.as_ref() {
                        None => (!svc.external
                            && !port.tls
                            && auto_mtls(&security, &svc.namespace, &selected))
                        .then_some((&[][..], None)),
                        Some(ClientTls { mode, sni }) => match mode {
                            ClientTlsMode::Disable => None,
                            ClientTlsMode::IstioMutual { subject_alt_names } => {
                                Some((subject_alt_names.as_slice(), sni.as_deref()))
                            }
                            ClientTlsMode::Files(files) => {
                                cluster.tls = Some(UpstreamTls {
                                    server_identities: Arc::from([]),
                                    // The host the client addresses, as
                                    // Istio's sidecar sends it (auto SNI).
                                    sni: Name::from(sni.as_deref().unwrap_or(fqdn)),
                                    origination: TlsOrigination::Files(FileTls::clone(files)),
                                });
                                None
                            }
                        },
                    };
                    if let Some((sans, sni)) = istio_mutual {
                        let server_identities = if sans.is_empty() {
                            allowed
                                .get_or_insert_with(|| {
                                    identities.allowed(fqdn, &svc.namespace, suffix).into()
                                })
                                .clone()
                        } else {
                            Arc::from(sans)
                        };
                        let sni = match sni {
                            Some(sni) => Name::from(sni),
                            None => Name::from(format!("outbound_.{p}_.{subset}_.{fqdn}")),
                        };
                        cluster.tls = Some(UpstreamTls {
                            server_identities,
                            sni,
                            origination: TlsOrigination::IstioMutual,
                        });
                    }
                    let dns = cluster.discovery != Discovery::Eds;
                    snapshot.clusters.insert(name.clone(), Arc::new(cluster));
                    // A DNS cluster's endpoints are resolved, not assigned.
                    if dns {
                        return;
                    }
                    snapshot.endpoints.insert(
                        name.clone(),
                        Arc::new(locality_for_view(
                            load_assignment(name, selected.into_iter()),
                            &policy,
                            audience,
                        )),
                    );
                };
            add_cluster(base, "", cluster_policy(rule, "", p), &BTreeMap::new());
            for subset in rule.map(|r| r.subsets.as_slice()).unwrap_or_default() {
                add_cluster(
                    cluster_name(p, &subset.name.value, fqdn),
                    &subset.name.value,
                    cluster_policy(rule, &subset.name.value, p),
                    &subset.labels,
                );
            }
        }
    }
    // An outbound route patch naming no virtual host applies to nothing:
    // judged once, on the translation for everyone.
    if matches!(audience, Audience::Everyone) {
        let vhosts: BTreeSet<String> = snapshot
            .route_configs
            .keys()
            .map(|n| n.to_string())
            .collect();
        let all = super::envoy_filter_outbound::Outbound::all(&options.root_namespace, resources);
        for (meta, d) in all.unmatched(&vhosts) {
            found.of(meta, d);
        }
    }
    let Problems {
        all: mut diagnostics,
        invalid,
    } = found;
    diagnostics.sort();
    diagnostics.dedup();
    // A name another ServiceEntry of the same host provides to this view
    // is not hidden.
    hidden.retain(|name, _| {
        !snapshot.listeners.contains_key(name.as_str())
            && !snapshot.clusters.contains_key(name.as_str())
    });
    Translation {
        snapshot,
        diagnostics,
        invalid,
        hidden,
    }
}

/// What a port of a `resolution: DNS` service resolves: its `endpoints`
/// (each on its own port for this port's name, else the `targetPort`,
/// else the port), or the host itself. `DNS_ROUND_ROBIN` is a LOGICAL_DNS
/// cluster, which has one endpoint (Envoy's rule): of several, the first,
/// as Istio does.
fn dns_discovery(svc: &Service, port: &Port, round_robin: bool) -> DnsDiscovery {
    let default_port = port.target_port.unwrap_or(port.number);
    let mut hosts: Vec<DnsHost> = if svc.dns_endpoints.is_empty() {
        vec![DnsHost {
            name: Name::from(svc.fqdn.as_str()),
            port: default_port,
        }]
    } else {
        svc.dns_endpoints
            .iter()
            .map(|e| DnsHost {
                name: Name::from(e.address.as_str()),
                port: port
                    .name
                    .as_ref()
                    .and_then(|n| e.ports.get(n).copied())
                    .unwrap_or(default_port),
            })
            .collect()
    };
    hosts.dedup();
    if round_robin {
        hosts.truncate(1);
    }
    DnsDiscovery {
        hosts: hosts.into(),
        logical: round_robin,
    }
}

/// Istio's auto mTLS for a cluster whose DestinationRule does not set
/// `tls`: mutual TLS when the destination namespace is STRICT (its
/// namespace-wide PeerAuthentication, else the mesh-wide one), or when every
/// endpoint of the cluster (at least one) is STRICT by its own workload's
/// PeerAuthentication (selector and port). Otherwise plaintext, which
/// PERMISSIVE and DISABLE servers accept.
fn auto_mtls(security: &SecurityPolicies, namespace: &str, members: &[&Member]) -> bool {
    security.namespace_mode(namespace) == MtlsMode::Strict
        || (!members.is_empty()
            && members.iter().all(|m| {
                security.mode(&m.namespace, &m.labels, m.address.port()) == MtlsMode::Strict
            }))
}

/// Endpoints grouped by locality; a locality weighs the sum of its endpoints'
/// weights, as Istio computes it. An address seen twice is kept once (the
/// first), since gRPC rejects duplicates.
fn load_assignment<'m>(
    name: Name,
    members: impl Iterator<Item = &'m Member>,
) -> ClusterLoadAssignment {
    let mut seen = HashSet::new();
    let mut by_locality: BTreeMap<Locality, Vec<Endpoint>> = BTreeMap::new();
    for m in members {
        if !seen.insert(m.address) {
            continue;
        }
        by_locality
            .entry(m.locality.clone())
            .or_default()
            .push(Endpoint {
                address: m.address,
                weight: m.weight.max(1),
                labels: m
                    .labels
                    .iter()
                    .map(|(k, v)| (Name::from(k.as_str()), Name::from(v.as_str())))
                    .collect(),
            });
    }
    let localities: Vec<LocalityEndpoints> = by_locality
        .into_iter()
        .map(|(locality, endpoints)| {
            let sum: u64 = endpoints.iter().map(|e| u64::from(e.weight)).sum();
            LocalityEndpoints {
                locality,
                weight: u32::try_from(sum).unwrap_or(u32::MAX),
                priority: 0,
                endpoints: endpoints.into(),
            }
        })
        .collect();
    match ClusterLoadAssignment::new(name.clone(), localities) {
        Ok(cla) => cla,
        // Unreachable: weights are positive and addresses unique by construction.
        Err(_) => ClusterLoadAssignment {
            cluster_name: name,
            localities: Arc::from([]),
        },
    }
}

/// The services known from `resources` and `registrations`, by host.
pub(crate) fn services(
    options: &MeshOptions,
    resources: &[&Resource],
    registrations: &[Registration],
) -> Vec<ServiceInfo> {
    let suffix = options.domain_suffix.as_str();
    let mut ignored = Problems::default();
    let services = collect_services(
        options,
        resources,
        registrations,
        Audience::Everyone,
        &mut ignored,
        &mut BTreeMap::new(),
    );
    services
        .values()
        .map(|svc| {
            let fqdn = svc.fqdn.as_str();
            let local = cluster_local(fqdn, suffix);
            let mut dial_names = vec![fqdn.to_string()];
            if let Some((name, ns)) = local {
                dial_names.push(format!("{name}.{ns}"));
                dial_names.push(name.to_string());
            }
            for p in &svc.ports {
                dial_names.push(format!("{fqdn}:{}", p.number));
                if let Some((name, ns)) = local {
                    dial_names.push(format!("{name}.{ns}:{}", p.number));
                    dial_names.push(format!("{name}:{}", p.number));
                }
            }
            let endpoints: HashSet<SocketAddr> = svc.members.iter().map(|m| m.address).collect();
            ServiceInfo {
                host: svc.fqdn.clone(),
                namespace: svc.namespace.clone(),
                ports: svc.ports.iter().map(|p| (p.number, p.protocol)).collect(),
                dial_names,
                endpoints: endpoints.len(),
            }
        })
        .collect()
}

/// `cla` as the callers of `audience` get it under `policy` (see
/// `locality.rs`); unchanged for the shared translation.
pub(crate) fn locality_for_view(
    cla: ClusterLoadAssignment,
    policy: &TrafficPolicy,
    audience: Audience<'_>,
) -> ClusterLoadAssignment {
    let Audience::View(key) = audience else {
        return cla;
    };
    let Some(setting) = policy.locality_setting() else {
        return cla;
    };
    let Some(local) = &key.locality else {
        return cla;
    };
    let failover = policy.outlier_detection.is_some();
    let labels = mesh_core::locality::caller_labels(local, &key.labels);
    let localities = mesh_core::locality::apply(&cla.localities, setting, failover, local, &labels);
    ClusterLoadAssignment::new(cla.cluster_name.clone(), localities).unwrap_or(cla)
}
