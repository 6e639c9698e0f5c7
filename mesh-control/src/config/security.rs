//! PeerAuthentication and AuthorizationPolicy, resolved per workload into
//! server listeners (gRFC A36), and the service accounts a service allows.
//!
//! # PeerAuthentication
//!
//! The mode of a workload's port is taken from, in order
//! (<https://istio.io/latest/docs/concepts/security/#peer-authentication>):
//! the PeerAuthentication of the workload's namespace whose
//! `selector.matchLabels` match its labels (the most specific one, i.e. the
//! one with the most labels; ties go to the first name), its
//! `portLevelMtls` entry for the port first; then the namespace-wide one (no
//! selector; the first name if several, the others are reported); then the
//! mesh-wide one (no selector, in the root namespace); then PERMISSIVE,
//! Istio's default. A mode of `UNSET` (or none) inherits from the next in
//! that order.
//!
//! # AuthorizationPolicy
//!
//! A policy applies to a workload when it is in the root namespace without a
//! selector (every workload of the mesh), in the root namespace with a
//! selector matching the workload's labels (in every namespace), in the
//! workload's namespace without a selector, or in the workload's namespace
//! with a matching selector. The server listener carries them DENY first,
//! then ALLOW, then AUDIT, root namespace before others, then by namespace
//! and name, so the DENY policy a decision names is predictable.
//!
//! # EnvoyFilter (local rate limits)
//!
//! An EnvoyFilter applies to a workload as Istio applies one: in the root
//! namespace without a `workloadSelector`, every workload of the mesh; with
//! one, the workloads (of any namespace) whose labels match; in another
//! namespace, that namespace's workloads (those matching its selector, if
//! any). Root-namespace filters come first, then by namespace and name
//! (Istio: creation time). Of their `SIDECAR_INBOUND` patches, the first
//! `HTTP_FILTER` is the server listener's filter; every `HTTP_ROUTE` patch
//! whose virtual host is `inbound|http|<port>` of the listener's port (or
//! any) and whose route is any or Istio's inbound route `default` is merged
//! into its route, in order (a later config replaces an earlier one,
//! `rate_limits` append, as a proto MERGE does). Route patches without a
//! filter limit nothing, as in Envoy.
//!
//! # VirtualService `corsPolicy`
//!
//! The CORS routes of a server listener are those of the VirtualServices
//! whose hosts the workload backs (by ServiceEntry `workloadSelector`, the
//! WorkloadGroup named like the service, or the `app` label), for its
//! port; see [`super::cors::CorsServices`].
//!
//! # Workload labels
//!
//! A workload has one label set, used both for DestinationRule subsets (the
//! labels of its EDS endpoints) and for the selectors above. From lowest to
//! highest precedence: the `metadata.labels` of the WorkloadGroup named like
//! the service in the service's namespace (Istio's WorkloadGroup template
//! gives its labels to every workload of the group), then the labels the
//! workload registered with (`proxyless::Registration` sends the bootstrap's
//! `node.metadata.LABELS` overridden by its own `.label()`s).
//! [`SecurityPolicies::registered_labels`] merges them for a registration;
//! the control server resolves a server listener with the merged labels of
//! the registration at the listening address, and with the node's `LABELS`
//! over the WorkloadGroup's ([`SecurityPolicies::node_labels`]) for a
//! workload that has not registered.
//!
//! # Service identities
//!
//! The service accounts allowed to back service S in namespace N (what
//! clients verify, `Cluster.tls.server_identities`, and who may register
//! endpoints of S): the WorkloadGroup named S in N (`template.serviceAccount`,
//! `default` when empty, as in Istio), the `serviceAccount` of S's static
//! endpoints (ServiceEntry `endpoints` and the WorkloadEntries it selects), and
//! the ServiceEntry's `subjectAltNames`. When none is configured, the service
//! account named S (the Kubernetes convention of one service account per
//! service).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::model::{MtlsMode, ServerListener};
use mesh_core::ratelimit::{Action, LocalRateLimit, RateLimitConfig};
use mesh_core::rbac::{Action as RbacAction, AuthorizationPolicy};
use mesh_core::spiffe::SpiffeId;

use super::names::{cluster_local, resolve_host};
use super::resources::{Meta, Resource, Spec};
use super::{Diagnostic, MeshOptions, Registration};

/// Labels by key.
type Labels = BTreeMap<String, String>;

/// The workload a server listener is built for, as its xDS node describes
/// it: `node.metadata.NAMESPACE` and `node.metadata.LABELS`.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    /// The workload's namespace.
    pub namespace: &'a str,
    /// The workload's labels (matched by `selector.matchLabels`).
    pub labels: &'a BTreeMap<String, String>,
}

/// One PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) namespace: String,
    pub(crate) name: String,
    /// `None` = namespace-wide (mesh-wide in the root namespace).
    pub(crate) selector: Option<BTreeMap<String, String>>,
    /// `None` = UNSET.
    pub(crate) mode: Option<MtlsMode>,
    pub(crate) ports: BTreeMap<u16, Option<MtlsMode>>,
}

/// One AuthorizationPolicy and the workloads it selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authz {
    pub(crate) selector: Option<BTreeMap<String, String>>,
    pub(crate) policy: AuthorizationPolicy,
}

/// The inbound local rate limit patches of one EnvoyFilter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RateLimitFilter {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) selector: Option<BTreeMap<String, String>>,
    /// Its first `HTTP_FILTER` patch's config.
    pub(crate) filter: Option<LocalRateLimit>,
    pub(crate) routes: Vec<RoutePatch>,
}

/// One inbound `HTTP_ROUTE` patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoutePatch {
    pub(crate) port: Option<u16>,
    pub(crate) route: Option<String>,
    pub(crate) config: Option<LocalRateLimit>,
    pub(crate) rate_limits: Vec<Arc<[Action]>>,
}

/// Istio's name of the route of an inbound virtual host.
const INBOUND_ROUTE: &str = "default";

#[derive(Debug, Default, PartialEq, Eq)]
struct Inner {
    root_namespace: String,
    /// The suffix of cluster-local hosts (service names resolve with it).
    domain_suffix: String,
    /// By namespace, then name.
    peers: Vec<Peer>,
    /// In evaluation order (see the module docs).
    authz: Vec<Authz>,
    /// WorkloadGroup `metadata.labels` by (namespace, name).
    groups: BTreeMap<(String, String), Labels>,
    /// EnvoyFilters with inbound patches, root namespace first, then by
    /// namespace and name.
    rate_limits: Vec<RateLimitFilter>,
    /// The VirtualService `corsPolicy` routes, by the hosts they are for.
    cors: super::cors::CorsServices,
}

/// The security resources of a config, resolved for lookups per workload.
///
/// Cheap to clone (one `Arc`): the ADS server resolves a server listener
/// per client from the same value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityPolicies {
    inner: Arc<Inner>,
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl SecurityPolicies {
    /// The server listener named `name` for `workload` listening on
    /// `address`: the PeerAuthentication mode for the port (workload
    /// selector, then namespace, then root namespace, then PERMISSIVE;
    /// `portLevelMtls` for the port) and the AuthorizationPolicies that
    /// select it.
    pub fn server_listener(
        &self,
        name: &str,
        address: SocketAddr,
        workload: Workload<'_>,
    ) -> ServerListener {
        ServerListener {
            name: name.into(),
            address,
            mtls: self.mode(workload.namespace, workload.labels, address.port()),
            policies: self.policies(workload.namespace, workload.labels),
            rate_limit: self.rate_limit(workload.namespace, workload.labels, address.port()),
            cors: self.cors(workload.namespace, workload.labels, address.port()),
        }
    }

    /// The CORS routes of the server of a workload with `labels` in
    /// `namespace` listening on `port` (see the module docs): empty when
    /// no VirtualService `corsPolicy` applies to it.
    pub fn cors(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> Arc<[mesh_core::cors::CorsRoute]> {
        self.inner.cors.for_workload(namespace, labels, port)
    }

    /// The local rate limit of the server of a workload with `labels` in
    /// `namespace` listening on `port` (see the module docs): `None` when
    /// no EnvoyFilter inserts the filter for it.
    pub fn rate_limit(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> Option<Arc<RateLimitConfig>> {
        let root = self.inner.root_namespace.as_str();
        let mut filter = None;
        let mut route = None;
        let mut rate_limits = Vec::new();
        let applies = |f: &&RateLimitFilter| match &f.selector {
            Some(s) => (f.namespace == root || f.namespace == namespace) && selects(s, labels),
            None => f.namespace == root || f.namespace == namespace,
        };
        for f in self.inner.rate_limits.iter().filter(applies) {
            if filter.is_none() {
                filter = f.filter.clone();
            }
            for r in &f.routes {
                let port_matches = r.port.is_none_or(|p| p == port);
                let route_matches = r.route.as_deref().is_none_or(|n| n == INBOUND_ROUTE);
                if port_matches && route_matches {
                    if let Some(c) = &r.config {
                        route = Some(c.clone());
                    }
                    rate_limits.extend(r.rate_limits.iter().cloned());
                }
            }
        }
        Some(Arc::new(RateLimitConfig {
            filter: filter?,
            route,
            rate_limits: rate_limits.into(),
        }))
    }

    /// The EnvoyFilters with inbound local rate limit patches.
    pub(crate) fn rate_limit_filters(&self) -> &[RateLimitFilter] {
        &self.inner.rate_limits
    }

    /// The PeerAuthentication mode of `port` of a workload with `labels` in
    /// `namespace`.
    pub fn mode(&self, namespace: &str, labels: &BTreeMap<String, String>, port: u16) -> MtlsMode {
        let selected = self
            .inner
            .peers
            .iter()
            .filter(|p| {
                p.namespace == namespace && p.selector.as_ref().is_some_and(|s| selects(s, labels))
            })
            // Most labels wins; on a tie, the first name (peers are sorted).
            .max_by(|a, b| {
                let len = |p: &Peer| p.selector.as_ref().map_or(0, BTreeMap::len);
                len(a).cmp(&len(b)).then_with(|| b.name.cmp(&a.name))
            });
        selected
            .and_then(|p| p.ports.get(&port).copied().flatten().or(p.mode))
            .unwrap_or_else(|| self.namespace_mode(namespace))
    }

    /// The mode of a namespace as a whole: its namespace-wide
    /// PeerAuthentication, else the mesh-wide one, else PERMISSIVE.
    pub fn namespace_mode(&self, namespace: &str) -> MtlsMode {
        let wide = |ns: &str| {
            self.inner
                .peers
                .iter()
                .find(|p| p.namespace == ns && p.selector.is_none())
                .and_then(|p| p.mode)
        };
        wide(namespace)
            .or_else(|| wide(&self.inner.root_namespace))
            .unwrap_or(MtlsMode::Permissive)
    }

    /// The AuthorizationPolicies that apply to a workload with `labels` in
    /// `namespace`, in evaluation order.
    pub fn policies(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Arc<[AuthorizationPolicy]> {
        let root = self.inner.root_namespace.as_str();
        self.inner
            .authz
            .iter()
            .filter(|a| {
                let ns = a.policy.namespace();
                (**ns == *root || **ns == *namespace)
                    && a.selector.as_ref().is_none_or(|s| selects(s, labels))
            })
            .map(|a| a.policy.clone())
            .collect()
    }

    /// The labels of the WorkloadGroup of `service` (a name as registered:
    /// `catalog`, `catalog.shop` or a full host, resolved in `namespace`):
    /// the group named like the service, in the service's namespace.
    pub fn group_labels(
        &self,
        service: &str,
        namespace: &str,
    ) -> Option<&BTreeMap<String, String>> {
        self.inner
            .groups
            .get(&group_of(service, namespace, &self.inner.domain_suffix))
    }

    /// The one label set of a registered endpoint (see the module docs):
    /// its WorkloadGroup's labels, overridden by the labels it registered
    /// with. Its EDS endpoint carries these, and its server listener is
    /// resolved with them.
    pub fn registered_labels(&self, registration: &Registration) -> BTreeMap<String, String> {
        over(
            self.group_labels(&registration.service, &registration.namespace),
            &registration.labels,
        )
    }

    /// The labels of a workload that has not registered, for its server
    /// listener: its node's `LABELS` over the labels of the WorkloadGroup
    /// of `service` (the node's `cluster`, which names its service), as
    /// [`SecurityPolicies::registered_labels`] merges them.
    pub fn node_labels(
        &self,
        service: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let group = (!service.is_empty())
            .then(|| self.group_labels(service, namespace))
            .flatten();
        over(group, labels)
    }

    /// The root namespace (mesh-wide policy).
    pub(crate) fn root_namespace(&self) -> &str {
        &self.inner.root_namespace
    }

    /// Every PeerAuthentication, by namespace and name.
    pub(crate) fn peers(&self) -> &[Peer] {
        &self.inner.peers
    }

    /// Every AuthorizationPolicy, in evaluation order.
    pub(crate) fn authorization_policies(&self) -> &[Authz] {
        &self.inner.authz
    }
}

/// `own` over `base`: a key in both takes `own`'s value.
fn over(base: Option<&Labels>, own: &Labels) -> Labels {
    let mut labels = base.cloned().unwrap_or_default();
    labels.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
}

/// The (namespace, name) of the WorkloadGroup of `service` resolved in
/// `namespace`: named like the service (its short name), in the service's
/// namespace (`catalog.shop` from any namespace is the group `catalog` of
/// `shop`).
fn group_of(service: &str, namespace: &str, suffix: &str) -> (String, String) {
    let fqdn = resolve_host(service, namespace, suffix);
    let group_namespace = cluster_local(&fqdn, suffix).map_or(namespace, |(_, ns)| ns);
    (
        group_namespace.to_string(),
        Identities::short_name(&fqdn, suffix).to_string(),
    )
}

fn action_rank(a: RbacAction) -> u8 {
    match a {
        RbacAction::Deny => 0,
        RbacAction::Allow => 1,
        RbacAction::Audit => 2,
    }
}

/// The inbound patches of an EnvoyFilter (`None`: it has none).
fn rate_limit_filter(meta: &Meta, f: &super::envoy_filter::EnvoyFilter) -> Option<RateLimitFilter> {
    use super::envoy_filter::{Context, Patch};
    let mut filter = None;
    let mut routes = Vec::new();
    for p in &f.patches {
        match p {
            Patch::Filter {
                context: Context::Inbound,
                config,
                ..
            } => {
                filter.get_or_insert_with(|| config.clone());
            }
            Patch::Route {
                context: Context::Inbound,
                port,
                route,
                config,
                rate_limits,
                ..
            } => routes.push(RoutePatch {
                port: *port,
                route: route.clone(),
                config: config.clone(),
                rate_limits: rate_limits.clone(),
            }),
            _ => {}
        }
    }
    (filter.is_some() || !routes.is_empty()).then(|| RateLimitFilter {
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        selector: f.selector.clone(),
        filter,
        routes,
    })
}

pub(super) fn resolve(options: &MeshOptions, resources: &[&Resource]) -> SecurityPolicies {
    let root = options.root_namespace.as_str();
    let mut peers = Vec::new();
    let mut authz = Vec::new();
    let mut groups = BTreeMap::new();
    let mut rate_limits = Vec::new();
    for r in resources {
        match &r.spec {
            Spec::EnvoyFilter(f) => rate_limits.extend(rate_limit_filter(&r.meta, f)),
            Spec::WorkloadGroup(g) => {
                groups.insert(
                    (r.meta.namespace.clone(), r.meta.name.clone()),
                    g.labels.clone(),
                );
            }
            Spec::PeerAuthentication(pa) => peers.push(Peer {
                namespace: r.meta.namespace.clone(),
                name: r.meta.name.clone(),
                selector: pa.selector.clone(),
                mode: pa.mode,
                ports: pa.ports.clone(),
            }),
            Spec::AuthorizationPolicy(ap) => authz.push(Authz {
                selector: ap.selector.clone(),
                policy: ap.policy.clone(),
            }),
            _ => {}
        }
    }
    peers.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    rate_limits.sort_by(|a: &RateLimitFilter, b: &RateLimitFilter| {
        let key = |f: &RateLimitFilter| (f.namespace != root, f.namespace.clone(), f.name.clone());
        key(a).cmp(&key(b))
    });
    authz.sort_by(|a, b| {
        let key = |x: &Authz| {
            let ns = x.policy.namespace().to_string();
            (
                action_rank(x.policy.action()),
                ns != root,
                ns,
                x.policy.name().to_string(),
            )
        };
        key(a).cmp(&key(b))
    });
    SecurityPolicies {
        inner: Arc::new(Inner {
            root_namespace: root.to_string(),
            domain_suffix: options.domain_suffix.clone(),
            peers,
            authz,
            groups,
            rate_limits,
            cors: super::cors::CorsServices::resolve(&options.domain_suffix, resources),
        }),
    }
}

/// Problems between security resources, for `ConfigStore::snapshot`: a
/// second namespace-wide PeerAuthentication in a namespace (the first by
/// name applies).
pub(super) fn check(resources: &[&Resource]) -> Vec<Diagnostic> {
    let mut wide: BTreeMap<&str, Vec<&Meta>> = BTreeMap::new();
    for r in resources {
        if let Spec::PeerAuthentication(pa) = &r.spec
            && pa.selector.is_none()
        {
            wide.entry(r.meta.namespace.as_str())
                .or_default()
                .push(&r.meta);
        }
    }
    let mut out = Vec::new();
    for r in resources {
        let Spec::EnvoyFilter(f) = &r.spec else {
            continue;
        };
        use super::envoy_filter::{Context, Patch};
        let mut filters = f.patches.iter().filter_map(|p| match p {
            Patch::Filter {
                context: Context::Inbound,
                line,
                ..
            } => Some(*line),
            _ => None,
        });
        for p in &f.patches {
            if let Patch::Route {
                context: Context::Inbound,
                route: Some(name),
                line,
                ..
            } = p
                && name != INBOUND_ROUTE
            {
                out.push(r.meta.diagnostic(
                    *line,
                    format!(
                        "route name {name:?} matches no inbound route (Istio names the route of \
                         an inbound virtual host {INBOUND_ROUTE:?}); this patch applies to nothing"
                    ),
                ));
            }
        }
        let first = filters.next();
        for line in filters {
            out.push(r.meta.diagnostic(
                line,
                format!(
                    "a second SIDECAR_INBOUND HTTP_FILTER patch for the local rate limit; only the \
                     first (line {}) applies (put the limits in one filter, or per route)",
                    first.unwrap_or_default()
                ),
            ));
        }
    }
    for metas in wide.values_mut() {
        metas.sort_by(|a, b| a.name.cmp(&b.name));
        if let [first, rest @ ..] = metas.as_slice() {
            for m in rest {
                out.push(m.diagnostic(
                    m.line,
                    format!(
                        "namespace '{}' already has the namespace-wide PeerAuthentication '{}' at {}; this one is ignored (give it a selector, or merge them)",
                        m.namespace,
                        first.name,
                        first.location()
                    ),
                ));
            }
        }
    }
    out
}

/// The service accounts each service allows (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Identities {
    /// WorkloadGroups by (namespace, name): service account and labels.
    groups: BTreeMap<(String, String), (String, BTreeMap<String, String>)>,
    /// Per host: the namespace of the first ServiceEntry declaring it, and
    /// the SPIFFE IDs that ServiceEntry names (subjectAltNames and its
    /// endpoints' service accounts).
    by_host: BTreeMap<String, (String, BTreeSet<SpiffeId>)>,
    trust_domain: String,
}

impl Identities {
    pub(crate) fn new(options: &MeshOptions, resources: &[&Resource]) -> Identities {
        let suffix = options.domain_suffix.as_str();
        let td = options.trust_domain.as_str();
        let mut ids = Identities {
            trust_domain: td.to_string(),
            ..Identities::default()
        };
        let mut entries = Vec::new();
        for r in resources {
            match &r.spec {
                Spec::WorkloadGroup(g) => {
                    ids.groups.insert(
                        (r.meta.namespace.clone(), r.meta.name.clone()),
                        (g.service_account.clone(), g.labels.clone()),
                    );
                }
                Spec::WorkloadEntry(w) => entries.push((&r.meta, w)),
                _ => {}
            }
        }
        for r in resources {
            let Spec::ServiceEntry(se) = &r.spec else {
                continue;
            };
            let ns = r.meta.namespace.as_str();
            let mut set: BTreeSet<SpiffeId> = se.subject_alt_names.iter().cloned().collect();
            let selected = se.selector.as_ref().map(|sel| {
                entries
                    .iter()
                    .filter(move |(m, w)| m.namespace == ns && selects(sel, &w.labels))
                    .map(|(_, w)| *w)
            });
            let workloads = se.endpoints.iter().chain(selected.into_iter().flatten());
            for w in workloads {
                if let Some(sa) = &w.service_account
                    && let Ok(id) = SpiffeId::new(td, ns, sa)
                {
                    set.insert(id);
                }
            }
            for host in &se.hosts {
                let fqdn = resolve_host(&host.value, ns, suffix);
                // The first ServiceEntry for a host wins, as for routing.
                ids.by_host
                    .entry(fqdn)
                    .or_insert_with(|| (ns.to_string(), set.clone()));
            }
        }
        ids
    }

    /// The short name of a host: `catalog` of `catalog.shop.svc.cluster.local`
    /// (the first label of any other host).
    fn short_name<'h>(fqdn: &'h str, suffix: &str) -> &'h str {
        cluster_local(fqdn, suffix)
            .map(|(name, _)| name)
            .unwrap_or_else(|| fqdn.split('.').next().unwrap_or(fqdn))
    }

    /// The namespace a host belongs to (see [`authorize_registration`]):
    /// the one its name says for a cluster-local host, else the namespace
    /// of the ServiceEntry declaring it; `None` for an external host no
    /// ServiceEntry declares.
    pub(crate) fn host_namespace<'a>(&'a self, fqdn: &'a str, suffix: &str) -> Option<&'a str> {
        match cluster_local(fqdn, suffix) {
            Some((_, ns)) => Some(ns),
            None => self.by_host.get(fqdn).map(|(ns, _)| ns.as_str()),
        }
    }

    /// The WorkloadGroup's labels for the service `fqdn` in `namespace`.
    pub(crate) fn group_labels(
        &self,
        fqdn: &str,
        namespace: &str,
        suffix: &str,
    ) -> Option<&BTreeMap<String, String>> {
        let short = Self::short_name(fqdn, suffix);
        self.groups
            .get(&(namespace.to_string(), short.to_string()))
            .map(|(_, labels)| labels)
    }

    /// The SPIFFE IDs allowed to serve `fqdn` (a service of `namespace`),
    /// sorted; never empty unless the names make no valid SPIFFE ID.
    pub(crate) fn allowed(&self, fqdn: &str, namespace: &str, suffix: &str) -> Vec<SpiffeId> {
        let short = Self::short_name(fqdn, suffix);
        let mut set: BTreeSet<SpiffeId> = self
            .by_host
            .get(fqdn)
            .map(|(_, ids)| ids.clone())
            .unwrap_or_default();
        if let Some((sa, _)) = self.groups.get(&(namespace.to_string(), short.to_string()))
            && let Ok(id) = SpiffeId::new(&self.trust_domain, namespace, sa)
        {
            set.insert(id);
        }
        if set.is_empty()
            && let Ok(id) = SpiffeId::new(&self.trust_domain, namespace, short)
        {
            set.insert(id);
        }
        set.into_iter().collect()
    }
}

/// Whether `identity` may back the service `registration` names (the
/// admin API asks this of every authenticated registration).
///
/// Names belong to namespaces, and only the configuration of the host's
/// own namespace says who may back it: a WorkloadGroup named like the
/// service there (`template.serviceAccount`), the service accounts of the
/// declaring ServiceEntry's endpoints and WorkloadEntries, its
/// `subjectAltNames`, or, when none of these is configured, the service
/// account named like the service *in the host's namespace*. The host's
/// namespace is the one its name says for a cluster-local host
/// (`catalog.shop.svc.cluster.local` is `shop`'s); any other host
/// (`payments.example.com`) belongs to the namespace of the ServiceEntry
/// that declares it (the first one, as for routing), and one that no
/// ServiceEntry declares cannot be registered at all: otherwise the first
/// namespace to register a name would own it, and any namespace could
/// claim `payments.example.com` by registering first. The caller's own
/// namespace never stands in for the host's.
///
/// A workload also registers only in its own namespace (the namespace a
/// registration's name is resolved in), so that what it registers reads
/// the same from its namespace as from the host's.
pub(super) fn authorize_registration(
    options: &MeshOptions,
    resources: &[&Resource],
    registration: &Registration,
    identity: &SpiffeId,
) -> Result<(), String> {
    let suffix = options.domain_suffix.as_str();
    let fqdn = resolve_host(&registration.service, &registration.namespace, suffix);
    if identity.namespace() != registration.namespace {
        return Err(format!(
            "identity {identity} may not register endpoints in namespace '{}': a workload \
             registers only in its own namespace ('{}')",
            registration.namespace,
            identity.namespace()
        ));
    }
    let identities = Identities::new(options, resources);
    let Some(namespace) = identities.host_namespace(&fqdn, suffix) else {
        return Err(format!(
            "identity {identity} may not register endpoints of {fqdn}: a host outside the \
             cluster domain '{suffix}' belongs to the namespace of the ServiceEntry that \
             declares it, and no ServiceEntry declares {fqdn}; declare it in the namespace \
             that owns it (with subjectAltNames naming who may back it)"
        ));
    };
    let allowed = identities.allowed(&fqdn, namespace, suffix);
    if allowed.contains(identity) {
        return Ok(());
    }
    let list: Vec<&str> = allowed.iter().map(SpiffeId::as_str).collect();
    let short = Identities::short_name(&fqdn, suffix);
    let declared = if cluster_local(&fqdn, suffix).is_some() {
        String::new()
    } else {
        format!(" (declared by a ServiceEntry of namespace '{namespace}')")
    };
    Err(format!(
        "identity {identity} may not register endpoints of service {fqdn}{declared}, which \
         allows {}: only identities the configuration of namespace '{namespace}' names may \
         back its hosts; to allow it, add a WorkloadGroup named '{short}' in namespace \
         '{namespace}' with spec.template.serviceAccount: {}, or list {identity} in the \
         subjectAltNames of the ServiceEntry for {fqdn}",
        if list.is_empty() {
            "no identity".to_string()
        } else {
            list.join(", ")
        },
        identity.service_account()
    ))
}
