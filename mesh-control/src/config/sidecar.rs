//! Istio `Sidecar`: which hosts a workload is sent and may subscribe to
//! (`egress[].hosts`), per workload (`workloadSelector`), on the per-node
//! views (see "Per-node views" in the module above).
//!
//! # Which Sidecar applies
//!
//! As in Istio (<https://istio.io/latest/docs/reference/config/networking/sidecar/>):
//! a Sidecar of the workload's namespace whose `workloadSelector` selects
//! it, else the namespace's Sidecar without a selector, else the root
//! namespace's ([`super::MeshOptions::root_namespace`]) Sidecar without a
//! selector, else none: the workload sees everything its namespace is
//! exported. Istio leaves two Sidecars of the same rank undefined; here the
//! earlier one (reading order: directory, file name, document) applies and
//! the other is reported at its line — a second selector-less Sidecar of a
//! namespace, or one with the same selector, is a problem of its own (so a
//! new one never displaces the one in force); two selectors that both
//! select one workload are reported in that workload's view.
//!
//! # What it narrows
//!
//! `egress[].hosts` entries are `namespace/dnsName`: `*/` any namespace,
//! `./` the Sidecar's namespace (for the root namespace's Sidecar: the
//! namespace of the workload it applies to, as Istio converts it), `~/`
//! none; `dnsName` is an FQDN, `*`, or `*.suffix`. A service is visible
//! when an entry matches its namespace (the ServiceEntry's namespace, or the
//! namespace of a registered or cluster-local service) and its host. A
//! VirtualService is imported when an entry matches its own namespace and
//! one of its hosts (Istio imports configuration by the namespace it lives
//! in); one that is not leaves its hosts the default route. DestinationRules
//! follow the services they apply to. `exportTo` still applies first: a
//! Sidecar only narrows. No `egress` is Istio's default listener, `*/*`.
//!
//! The hidden services' listeners, route configurations, clusters and
//! endpoints are left out of the view, and asking for one is NOT_FOUND
//! naming the Sidecar and its line (the view's `hidden` names, like
//! `exportTo`'s), so a call to a hidden host fails with that reason.
//!
//! Unlike Istio, the destinations of an imported VirtualService are not
//! added behind the Sidecar's back: a route to a host the Sidecar hides
//! fails (NOT_FOUND naming it), and `mesh-control check` reports such a
//! route at its destination's line ([`hidden_destinations`]).
//!
//! # Fields
//!
//! `workloadSelector.labels` and `egress[].hosts` are implemented;
//! `outboundTrafficPolicy.mode: REGISTRY_ONLY` is accepted as what a
//! proxyless client always does (a host the mesh does not know is NOT_FOUND,
//! there is no passthrough). `ALLOW_ANY`, `egressProxy`, `ingress`,
//! `inboundConnectionPool`, `egress[].port`, `egress[].bind` and
//! `egress[].captureMode` configure a proxy's listeners, which a proxyless
//! workload does not have: they are reported as not supported at their line.
//!
//! # gRPC clients
//!
//! A gRPC client running with `ignore_resource_deletion` (gRFC A53; the
//! bootstraps mesh-control writes set it) or A88's data error handling keeps
//! the listeners and clusters it already holds when a Sidecar narrows what it
//! is sent: the narrowing reaches it when it restarts. `/status` lists such
//! resources under `deleted_but_kept` (with the Sidecar that hides them) and
//! `mesh-control check` notes it for every Sidecar with `egress` ([`notes`];
//! `check --for grpc` too).
//!
//! # Cost
//!
//! A scoped view translates only what it can reach ([`Scope::prune`]: the
//! admitted hosts, and the hosts and destinations of the VirtualServices it
//! imports); the names of the hosts it hides are read off the translation
//! for every workload ([`HostNames`], once per published config), not
//! translated per view. A workload scoped to 10 of 1,000 services is sent
//! about 1% of the bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::names::{cluster_local, resolve_host};
use super::resources::{Meta, Resource, Spec};
use super::sidecar_spec::{HostNamespace, Sidecar};
use super::yaml::Look;
use super::{Diagnostic, MeshOptions, Registration, ViewKey};

/// How a Sidecar came to apply to a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    /// Its `workloadSelector` selects the workload.
    Selector,
    /// The workload's namespace's, without a selector.
    Namespace,
    /// The root namespace's, without a selector.
    Root,
}

/// The Sidecar that applies to the workloads of one view.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scope<'r> {
    meta: &'r Meta,
    sidecar: &'r Sidecar,
    /// The workloads' namespace (what `./` means).
    namespace: &'r str,
    rank: Rank,
}

impl fmt::Display for Scope<'_> {
    /// `Sidecar shop/web at mesh.yaml:12`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sidecar {}/{} at {}",
            self.meta.namespace,
            self.meta.name,
            self.meta.location()
        )
    }
}

/// The Sidecars of `resources`, in reading order.
fn sidecars<'r>(resources: &[&'r Resource]) -> impl Iterator<Item = (&'r Meta, &'r Sidecar)> {
    resources.iter().filter_map(|r| match &r.spec {
        Spec::Sidecar(s) => Some((&r.meta, s)),
        _ => None,
    })
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `app=web,version=v2`.
fn describe_labels(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(",")
}

impl<'r> Scope<'r> {
    /// The Sidecar that applies to the workloads of `key` (`None`: no
    /// Sidecar, they see everything exported to them), and the problems of
    /// the choice (two selectors selecting these workloads).
    pub(crate) fn of_view(
        options: &MeshOptions,
        resources: &[&'r Resource],
        key: &'r ViewKey,
    ) -> (Option<Scope<'r>>, Vec<Diagnostic>) {
        let mut problems = Vec::new();
        let Some(namespace) = key.namespace.as_deref() else {
            return (None, problems);
        };
        if key.gateway {
            // Sidecars scope sidecars: a gateway sees what its routes name.
            return (None, problems);
        }
        let mut best: Option<Scope<'r>> = None;
        for (meta, sidecar) in sidecars(resources) {
            let rank = match &sidecar.selector {
                Some(sel) if meta.namespace == namespace && selects(sel, &key.labels) => {
                    Rank::Selector
                }
                Some(_) => continue,
                None if meta.namespace == namespace => Rank::Namespace,
                None if meta.namespace == options.root_namespace => Rank::Root,
                None => continue,
            };
            let candidate = Scope {
                meta,
                sidecar,
                namespace,
                rank,
            };
            match best {
                Some(b) if b.rank < rank => {}
                Some(b) if b.rank == rank => {
                    // Selector-less duplicates are reported by `check`.
                    if rank == Rank::Selector {
                        problems.push(meta.diagnostic(
                            meta.line,
                            format!(
                                "selects the same workloads (labels {}) as the earlier {b}, \
                                 which applies to them; this one does not",
                                describe_labels(&key.labels)
                            ),
                        ));
                    }
                }
                _ => best = Some(candidate),
            }
        }
        (best, problems)
    }

    /// Whether an egress host admits the service `fqdn` of `host_namespace`
    /// (or a VirtualService of that namespace for that host).
    pub(crate) fn allows(&self, host_namespace: &str, fqdn: &str) -> bool {
        let Some(hosts) = &self.sidecar.hosts else {
            return true;
        };
        hosts.iter().any(|h| {
            let ns_ok = match &h.value.namespace {
                HostNamespace::Any => true,
                HostNamespace::Own => host_namespace == self.namespace,
                HostNamespace::Nothing => false,
                HostNamespace::Named(n) => n == host_namespace,
            };
            ns_ok && h.value.name.matches(fqdn)
        })
    }

    /// Whether this view keeps `r`: every resource but a VirtualService none
    /// of whose hosts an egress host admits in the VirtualService's namespace.
    pub(crate) fn imports(&self, options: &MeshOptions, r: &Resource) -> bool {
        let Spec::VirtualService(vs) = &r.spec else {
            return true;
        };
        vs.hosts.iter().any(|h| {
            let fqdn = resolve_host(&h.value, &r.meta.namespace, &options.domain_suffix);
            self.allows(&r.meta.namespace, &fqdn)
        })
    }

    /// Why a name of `fqdn` (of `host_namespace`) is not sent.
    fn why(&self, host_namespace: &str, fqdn: &str) -> String {
        let whose = match self.rank {
            Rank::Selector => format!(
                " (it selects this workload by {})",
                describe_labels(self.sidecar.selector.as_ref().unwrap_or(&BTreeMap::new()))
            ),
            Rank::Namespace => format!(" (namespace {}'s default)", self.namespace),
            Rank::Root => format!(
                " (the root namespace's, for namespace {} which has none)",
                self.namespace
            ),
        };
        let listed: Vec<&str> = self
            .sidecar
            .hosts
            .iter()
            .flatten()
            .map(|h| h.value.text.as_str())
            .collect();
        format!(
            "hidden by {self}{whose}: no egress host at line {} admits {host_namespace}/{fqdn} \
             (egress hosts: {})",
            self.sidecar.egress_line,
            if listed.is_empty() {
                "none".to_string()
            } else {
                listed.join(", ")
            }
        )
    }

    /// Leaves out of `snapshot` the listeners, route configurations,
    /// clusters and endpoints of the services this Sidecar hides, and
    /// records each name in `hidden` with why.
    pub(crate) fn narrow(
        &self,
        namespaces: &HostNamespaces,
        snapshot: &mut mesh_core::Snapshot,
        hidden: &mut BTreeMap<String, String>,
    ) {
        let mut verdicts: BTreeMap<String, bool> = BTreeMap::new();
        let mut visible = |fqdn: &str| -> bool {
            if let Some(v) = verdicts.get(fqdn) {
                return *v;
            }
            let v = self.allows(namespaces.of(fqdn), fqdn);
            verdicts.insert(fqdn.to_string(), v);
            v
        };
        let hide = |hidden: &mut BTreeMap<String, String>, name: &str, fqdn: &str| {
            hidden
                .entry(name.to_string())
                .or_insert_with(|| self.why(namespaces.of(fqdn), fqdn));
        };
        snapshot.listeners.retain(|name, l| {
            let fqdn = rc_host(&l.route_config_name);
            let keep = visible(fqdn);
            if !keep {
                hide(hidden, name, fqdn);
            }
            keep
        });
        snapshot.route_configs.retain(|name, _| {
            let fqdn = rc_host(name);
            let keep = visible(fqdn);
            if !keep {
                hide(hidden, name, fqdn);
            }
            keep
        });
        snapshot.clusters.retain(|name, _| {
            let Some(fqdn) = cluster_host(name) else {
                return true;
            };
            let keep = visible(fqdn);
            if !keep {
                hide(hidden, name, fqdn);
            }
            keep
        });
        snapshot.endpoints.retain(|name, _| {
            let Some(fqdn) = cluster_host(name) else {
                return true;
            };
            let keep = visible(fqdn);
            if !keep {
                hide(hidden, name, fqdn);
            }
            keep
        });
    }

    /// Each destination (and mirror) of a route of a VirtualService these
    /// workloads are sent whose host this Sidecar hides: a call on that
    /// route fails. At the destination's line.
    pub(crate) fn hidden_destinations(
        &self,
        options: &MeshOptions,
        resources: &[&Resource],
        namespaces: &HostNamespaces,
    ) -> Vec<Diagnostic> {
        let suffix = options.domain_suffix.as_str();
        let mut out = Vec::new();
        for r in resources {
            let Spec::VirtualService(vs) = &r.spec else {
                continue;
            };
            let ns = r.meta.namespace.as_str();
            if !vs.export_to.exports_to(ns, self.namespace) || !self.imports(options, r) {
                continue;
            }
            // The route is reachable only through a host these workloads see.
            let reachable = vs.hosts.iter().any(|h| {
                let fqdn = resolve_host(&h.value, ns, suffix);
                self.allows(namespaces.of(&fqdn), &fqdn)
            });
            if !reachable {
                continue;
            }
            for route in &vs.http {
                let for_them = route.matches.is_empty()
                    || route.matches.iter().any(|m| {
                        m.source_namespace
                            .as_deref()
                            .is_none_or(|s| s == self.namespace)
                    });
                if !for_them {
                    continue;
                }
                let destinations = route
                    .route
                    .iter()
                    .chain(route.mirrors.iter().map(|m| &m.destination));
                for d in destinations {
                    let fqdn = resolve_host(&d.host.value, ns, suffix);
                    let host_ns = namespaces.of(&fqdn);
                    if self.allows(host_ns, &fqdn) {
                        continue;
                    }
                    let whom = match &self.sidecar.selector {
                        Some(sel) if self.rank == Rank::Selector => format!(
                            "the workloads of namespace {} labelled {}",
                            self.namespace,
                            describe_labels(sel)
                        ),
                        _ => format!("the workloads of namespace {}", self.namespace),
                    };
                    out.push(r.meta.diagnostic(
                        d.host.line,
                        format!(
                            "destination {fqdn} is hidden by {self} from {whom}, who are sent \
                             this route: their calls on it fail (NOT_FOUND naming the Sidecar); \
                             add \"{host_ns}/{fqdn}\" to its egress hosts"
                        ),
                    ));
                }
            }
        }
        out
    }
}

impl<'r> Scope<'r> {
    /// What a view needs translated: `resources` without the ServiceEntries
    /// and DestinationRules of hosts nobody here reaches, and
    /// `registrations` without theirs, so that a view translates the few
    /// services it admits rather than the whole mesh. Kept: the hosts this
    /// Sidecar admits, and the hosts and destinations of the VirtualServices
    /// it imports (`resources` is filtered by [`Scope::imports`] already),
    /// so that those stay valid; [`Scope::narrow`] then hides what is not
    /// admitted of them, and [`Scope::hide_untranslated`] names the rest.
    pub(crate) fn prune(
        &self,
        options: &MeshOptions,
        resources: &[&'r Resource],
        registrations: &[Registration],
        namespaces: &HostNamespaces,
    ) -> (Vec<&'r Resource>, Vec<Registration>) {
        let suffix = options.domain_suffix.as_str();
        let mut routed: BTreeSet<String> = BTreeSet::new();
        for r in resources {
            if let Spec::VirtualService(vs) = &r.spec {
                let ns = r.meta.namespace.as_str();
                routed.extend(vs.hosts.iter().map(|h| resolve_host(&h.value, ns, suffix)));
                for route in &vs.http {
                    let destinations = route
                        .route
                        .iter()
                        .chain(route.mirrors.iter().map(|m| &m.destination));
                    routed.extend(destinations.map(|d| resolve_host(&d.host.value, ns, suffix)));
                }
            }
        }
        let needed = |fqdn: &str| routed.contains(fqdn) || self.allows(namespaces.of(fqdn), fqdn);
        let kept = resources
            .iter()
            .copied()
            .filter(|r| match &r.spec {
                Spec::ServiceEntry(se) => se
                    .hosts
                    .iter()
                    .any(|h| needed(&resolve_host(&h.value, &r.meta.namespace, suffix))),
                Spec::DestinationRule(dr) => {
                    dr.host.value.contains('*')
                        || needed(&resolve_host(&dr.host.value, &r.meta.namespace, suffix))
                }
                _ => true,
            })
            .collect();
        let registrations = registrations
            .iter()
            .filter(|reg| needed(&resolve_host(&reg.service, &reg.namespace, suffix)))
            .cloned()
            .collect();
        (kept, registrations)
    }

    /// Records in `hidden` the names of every host this Sidecar hides that
    /// [`Scope::prune`] left untranslated: those the translation for every
    /// workload has (`names`) and this view's `snapshot` lacks.
    pub(crate) fn hide_untranslated(
        &self,
        names: &HostNames,
        namespaces: &HostNamespaces,
        snapshot: &mesh_core::Snapshot,
        hidden: &mut BTreeMap<String, String>,
    ) {
        for (fqdn, of_host) in &names.0 {
            let host_ns = namespaces.of(fqdn);
            if self.allows(host_ns, fqdn) {
                continue;
            }
            let mut why: Option<String> = None;
            for name in of_host {
                let present = snapshot.listeners.contains_key(name.as_str())
                    || snapshot.route_configs.contains_key(name.as_str())
                    || snapshot.clusters.contains_key(name.as_str());
                if present || hidden.contains_key(name) {
                    continue;
                }
                let why = why.get_or_insert_with(|| self.why(host_ns, fqdn));
                hidden.insert(name.clone(), why.clone());
            }
        }
    }
}

/// The listener, route configuration and cluster names of each service
/// host in a translation (what a Sidecar hides by host).
#[derive(Debug, Default)]
pub(crate) struct HostNames(BTreeMap<String, Vec<String>>);

impl HostNames {
    /// The names of `snapshot`, by host.
    pub(crate) fn of(snapshot: &mesh_core::Snapshot) -> HostNames {
        let mut by_host: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut add = |fqdn: &str, name: &str| {
            by_host
                .entry(fqdn.to_string())
                .or_default()
                .push(name.to_string());
        };
        for (name, l) in &snapshot.listeners {
            add(rc_host(&l.route_config_name), name);
        }
        for name in snapshot.route_configs.keys() {
            add(rc_host(name), name);
        }
        // Endpoints are named like their clusters.
        for name in snapshot.clusters.keys() {
            if let Some(fqdn) = cluster_host(name) {
                add(fqdn, name);
            }
        }
        HostNames(by_host)
    }
}

/// The host of a route configuration `<fqdn>:<port>` (what listeners name).
fn rc_host(name: &str) -> &str {
    name.rsplit_once(':').map_or(name, |(h, _)| h)
}

/// The host of a cluster `outbound|<port>|<subset>|<fqdn>`.
fn cluster_host(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("outbound|")?;
    rest.rsplit_once('|').map(|(_, h)| h)
}

/// The namespace each service host belongs to, for egress hosts: its
/// ServiceEntry's namespace, else (registered services) the namespace of a
/// cluster-local name or of the registration.
#[derive(Debug, Default)]
pub(crate) struct HostNamespaces {
    by_host: BTreeMap<String, String>,
    suffix: String,
}

impl HostNamespaces {
    pub(crate) fn new(
        options: &MeshOptions,
        resources: &[&Resource],
        registrations: &[Registration],
    ) -> Self {
        let suffix = options.domain_suffix.as_str();
        let mut by_host = BTreeMap::new();
        for r in resources {
            if let Spec::ServiceEntry(se) = &r.spec {
                for h in &se.hosts {
                    by_host
                        .entry(resolve_host(&h.value, &r.meta.namespace, suffix))
                        .or_insert_with(|| r.meta.namespace.clone());
                }
            }
        }
        for reg in registrations {
            let fqdn = resolve_host(&reg.service, &reg.namespace, suffix);
            if cluster_local(&fqdn, suffix).is_none() {
                by_host.entry(fqdn).or_insert_with(|| reg.namespace.clone());
            }
        }
        HostNamespaces {
            by_host,
            suffix: suffix.to_string(),
        }
    }

    /// The namespace of `fqdn` (`""` when nothing tells).
    pub(crate) fn of<'a>(&'a self, fqdn: &'a str) -> &'a str {
        if let Some(ns) = self.by_host.get(fqdn) {
            return ns;
        }
        cluster_local(fqdn, &self.suffix).map_or("", |(_, ns)| ns)
    }
}

/// Workload labels, or a selector's.
type Labels = BTreeMap<String, String>;

/// Problems of the Sidecars among `resources` that need the others: a
/// second Sidecar of the same rank for the same workloads (selector-less in
/// one namespace, or the same selector), reported at its line: the earlier
/// one applies.
pub(crate) fn check<'r>(resources: &[&'r Resource]) -> Vec<(&'r Meta, Diagnostic)> {
    // The first Sidecar of each (namespace, selector).
    let mut first: BTreeMap<(&str, Option<&Labels>), &Meta> = BTreeMap::new();
    let mut out = Vec::new();
    for (meta, sidecar) in sidecars(resources) {
        let key = (meta.namespace.as_str(), sidecar.selector.as_ref());
        match first.get(&key) {
            Some(earlier) => {
                let what = match &sidecar.selector {
                    None => format!(
                        "namespace {} already has a Sidecar without workloadSelector",
                        meta.namespace
                    ),
                    Some(sel) => format!(
                        "the workloads labelled {} already have a Sidecar",
                        describe_labels(sel)
                    ),
                };
                out.push((
                    meta,
                    meta.diagnostic(
                        meta.line,
                        format!(
                            "{what}: Sidecar {}/{} at {} (Istio leaves two undefined; the earlier \
                             one applies and this one is left out)",
                            earlier.namespace,
                            earlier.name,
                            earlier.location()
                        ),
                    ),
                ));
            }
            None => {
                first.insert(key, meta);
            }
        }
    }
    out
}

/// Every route destination some Sidecar hides from workloads that are sent
/// the route (see [`Scope::hidden_destinations`]), for `mesh-control check`:
/// for each Sidecar, the workloads it applies to — those of its namespace
/// (that its selector selects), or, for the root namespace's, those of
/// every namespace the config names that has no Sidecar of its own.
pub(crate) fn hidden_destinations(
    options: &MeshOptions,
    resources: &[&Resource],
) -> Vec<Diagnostic> {
    let all: Vec<(&Meta, &Sidecar)> = sidecars(resources).collect();
    if all.is_empty() {
        return Vec::new();
    }
    let namespaces = HostNamespaces::new(options, resources, &[]);
    let own_default: BTreeSet<&str> = all
        .iter()
        .filter(|(_, s)| s.selector.is_none())
        .map(|(m, _)| m.namespace.as_str())
        .collect();
    let mut out = Vec::new();
    for (meta, sidecar) in &all {
        let root = sidecar.selector.is_none() && meta.namespace == options.root_namespace;
        let applies_to: BTreeSet<&str> = if root {
            resources
                .iter()
                .map(|r| r.meta.namespace.as_str())
                .filter(|ns| !own_default.contains(ns) || *ns == options.root_namespace)
                .collect()
        } else {
            BTreeSet::from([meta.namespace.as_str()])
        };
        for ns in applies_to {
            let scope = Scope {
                meta,
                sidecar,
                namespace: ns,
                rank: match (&sidecar.selector, root) {
                    (Some(_), _) => Rank::Selector,
                    (None, true) => Rank::Root,
                    (None, false) => Rank::Namespace,
                },
            };
            out.extend(scope.hidden_destinations(options, resources, &namespaces));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// What `mesh-control check` notes about a Sidecar document: gRPC clients
/// keep what they already hold when it narrows what they are sent.
/// A Sidecar without `egress` admits every host (`*/*`): it narrows nothing.
pub(crate) fn notes(doc: Look<'_, '_>) -> Vec<(usize, String)> {
    doc.get("spec.egress")
        .map(|egress| (egress.line, GRPC_KEEPS.to_string()))
        .into_iter()
        .collect()
}

/// The note on what a Sidecar's narrowing does to gRPC clients.
pub(crate) const GRPC_KEEPS: &str = "Sidecar: when it narrows what a workload is sent (a new \
     Sidecar, or fewer egress hosts), gRPC clients already connected keep the listeners and \
     clusters they hold (ignore_resource_deletion, gRFC A53, set in the bootstraps mesh-control \
     writes; A88 data error handling) until they restart: /status lists them under \
     deleted_but_kept; this mesh's client and Envoy drop them at once";

#[cfg(test)]
#[path = "sidecar_tests.rs"]
mod tests;
