//! The Istio resources this mesh implements, parsed and checked one document
//! at a time.
//!
//! Each parser accepts exactly the fields it implements
//! (<https://istio.io/latest/docs/reference/config/networking/>): the fields
//! Istio defines that this mesh does not implement yet are reported as "not
//! supported yet", anything else as unknown (a typo). Problems that need
//! other resources (a destination host, a subset) are checked at translation
//! time, in `translate.rs`. Regular expressions are compiled here, so an
//! invalid one is reported at its line.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_core::model::{
    Fraction, HeaderMatch, Locality, PathMatch, Protocol, QueryParamMatch, RetryPolicy,
    RoutePolicy, ValueMatch,
};

use mesh_core::spiffe::SpiffeId;

use super::Diagnostic;
use super::auth;
use super::policy::{self, TrafficPolicy, is_header_name_byte, parse_string_match};
use super::traffic;
use super::yaml::{Field, Fields, Look, Node, Sink, Spanned, join, line_of};
use mesh_core::traffic::{HeaderRules, LocalAnswer, Traffic};

/// The API versions accepted for the networking kinds (Istio serves the same schema under each).
const NETWORKING_API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// The API versions accepted for PeerAuthentication and AuthorizationPolicy.
const SECURITY_API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// The API versions accepted for EnvoyFilter (Istio serves it under
/// v1alpha3; v1 for the newer API).
const ENVOY_FILTER_API_VERSIONS: [&str; 2] =
    ["networking.istio.io/v1alpha3", "networking.istio.io/v1"];

/// Istio kinds this mesh does not implement yet (anything else is unknown).
const UNSUPPORTED_KINDS: [&str; 5] = [
    "ProxyConfig",
    "RequestAuthentication",
    "Telemetry",
    "WasmPlugin",
    "ServiceEntryGroup",
];

/// The kinds of resource this mesh reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    VirtualService,
    DestinationRule,
    ServiceEntry,
    WorkloadEntry,
    WorkloadGroup,
    PeerAuthentication,
    AuthorizationPolicy,
    /// Only for the local rate limit filter (see `envoy_filter`).
    EnvoyFilter,
    /// An ingress gateway served to Envoy nodes (see `gateway`).
    Gateway,
    /// What a workload is sent and may subscribe to (see `sidecar`).
    Sidecar,
}

impl Kind {
    fn from_name(name: &str) -> Option<Kind> {
        Some(match name {
            "VirtualService" => Kind::VirtualService,
            "DestinationRule" => Kind::DestinationRule,
            "ServiceEntry" => Kind::ServiceEntry,
            "WorkloadEntry" => Kind::WorkloadEntry,
            "WorkloadGroup" => Kind::WorkloadGroup,
            "PeerAuthentication" => Kind::PeerAuthentication,
            "AuthorizationPolicy" => Kind::AuthorizationPolicy,
            "EnvoyFilter" => Kind::EnvoyFilter,
            "Gateway" => Kind::Gateway,
            "Sidecar" => Kind::Sidecar,
            _ => return None,
        })
    }

    /// The `apiVersion`s the kind is served under.
    fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::PeerAuthentication | Kind::AuthorizationPolicy => &SECURITY_API_VERSIONS,
            Kind::EnvoyFilter => &ENVOY_FILTER_API_VERSIONS,
            _ => &NETWORKING_API_VERSIONS,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::WorkloadGroup => "WorkloadGroup",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::EnvoyFilter => "EnvoyFilter",
            Kind::Gateway => "Gateway",
            Kind::Sidecar => "Sidecar",
        })
    }
}

/// Identity of a resource: kind, namespace, name.
pub(crate) type ResourceKey = (Kind, String, String);

/// Where a resource came from and what it is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) kind: Kind,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) file: PathBuf,
    /// Line of `metadata.name`.
    pub(crate) line: usize,
    /// Index of the document in its file (the order of VirtualServices).
    pub(crate) doc: usize,
}

impl Meta {
    pub(crate) fn key(&self) -> ResourceKey {
        (self.kind, self.namespace.clone(), self.name.clone())
    }

    /// A diagnostic about this resource at `line` of its file.
    pub(crate) fn diagnostic(&self, line: usize, message: impl fmt::Display) -> Diagnostic {
        Diagnostic {
            file: self.file.clone(),
            line,
            message: format!("{self}: {message}"),
        }
    }

    /// `file:line` of the resource, for messages that point at it.
    pub(crate) fn location(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

impl fmt::Display for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A parsed, valid resource.
#[derive(Debug, Clone)]
pub(crate) struct Resource {
    pub(crate) meta: Meta,
    pub(crate) spec: Spec,
}

/// The spec of a resource, by kind.
#[derive(Debug, Clone)]
pub(crate) enum Spec {
    VirtualService(VirtualService),
    DestinationRule(DestinationRule),
    ServiceEntry(ServiceEntry),
    WorkloadEntry(Workload),
    WorkloadGroup(WorkloadGroup),
    PeerAuthentication(auth::PeerAuthentication),
    AuthorizationPolicy(auth::AuthorizationPolicy),
    EnvoyFilter(super::envoy_filter::EnvoyFilter),
    Gateway(super::gateway_spec::Gateway),
    Sidecar(super::sidecar_spec::Sidecar),
}

/// `WorkloadGroup.spec`: what the workloads registering for the service
/// named like the group have in common.
#[derive(Debug, Clone)]
pub(crate) struct WorkloadGroup {
    /// `metadata.labels`: given to every endpoint registered for the service
    /// (a registration's own labels win).
    pub(crate) labels: BTreeMap<String, String>,
    /// `template.serviceAccount`, `default` when empty (as in Istio).
    pub(crate) service_account: String,
}

/// `VirtualService.spec`.
#[derive(Debug, Clone)]
pub(crate) struct VirtualService {
    /// Hosts as written (lower-cased), resolved at translation.
    pub(crate) hosts: Vec<Spanned<String>>,
    pub(crate) http: Vec<HttpRoute>,
    /// `exportTo`: the namespaces whose workloads it routes.
    pub(crate) export_to: ExportTo,
    /// `gateways`: `mesh` and Gateways (`name` in its namespace, or
    /// `namespace/name`) it is bound to; empty: the mesh only (as in Istio).
    pub(crate) gateways: Vec<Spanned<String>>,
}

/// `exportTo` of a VirtualService, DestinationRule or ServiceEntry: the
/// namespaces whose workloads see the resource (Istio's visibility). For a
/// workload of any other namespace the resource does not exist: a
/// ServiceEntry's hosts are unknown to it, a VirtualService does not route
/// it, a DestinationRule's policy and subsets do not apply to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExportTo {
    /// `*`, an empty list or no `exportTo` at all: every namespace.
    All,
    /// `.` (the resource's own namespace) and namespace names; `~` alone
    /// is the empty set (no namespace sees it).
    Namespaces {
        own: bool,
        names: BTreeSet<String>,
        /// Line of `exportTo`, for messages.
        line: usize,
    },
}

impl ExportTo {
    /// Whether a workload of `namespace` sees a resource of namespace `own_namespace`.
    pub(crate) fn exports_to(&self, own_namespace: &str, namespace: &str) -> bool {
        match self {
            ExportTo::All => true,
            ExportTo::Namespaces { own, names, .. } => {
                (*own && own_namespace == namespace) || names.contains(namespace)
            }
        }
    }

    /// Whether some namespace sees both this resource (of `own_namespace`)
    /// and `other` (of `other_namespace`).
    pub(crate) fn overlaps(
        &self,
        own_namespace: &str,
        other: &ExportTo,
        other_namespace: &str,
    ) -> bool {
        match (
            self.resolved(own_namespace),
            other.resolved(other_namespace),
        ) {
            (None, None) => true,
            (None, Some(set)) | (Some(set), None) => !set.is_empty(),
            (Some(a), Some(b)) => !a.is_disjoint(&b),
        }
    }

    /// The namespaces it names, `.` resolved; `None` for every namespace.
    fn resolved<'a>(&'a self, own_namespace: &'a str) -> Option<BTreeSet<&'a str>> {
        match self {
            ExportTo::All => None,
            ExportTo::Namespaces { own, names, .. } => {
                let mut set: BTreeSet<&str> = names.iter().map(String::as_str).collect();
                if *own {
                    set.insert(own_namespace);
                }
                Some(set)
            }
        }
    }

    /// The namespaces as a sentence part (`namespaces a, b`, `no namespace`).
    pub(crate) fn describe(&self, own_namespace: &str) -> String {
        match self.resolved(own_namespace) {
            None => "every namespace".to_string(),
            Some(set) if set.is_empty() => "no namespace (exportTo: ~)".to_string(),
            Some(set) => {
                let list: Vec<&str> = set.into_iter().collect();
                let word = if list.len() == 1 {
                    "namespace"
                } else {
                    "namespaces"
                };
                format!("{word} {}", list.join(", "))
            }
        }
    }

    /// The line of `exportTo`, when set to something else than every namespace.
    pub(crate) fn line(&self) -> Option<usize> {
        match self {
            ExportTo::All => None,
            ExportTo::Namespaces { line, .. } => Some(*line),
        }
    }
}

/// One `http[]` entry.
#[derive(Debug, Clone)]
pub(crate) struct HttpRoute {
    pub(crate) name: Option<String>,
    /// ORed conditions; empty means "every request".
    pub(crate) matches: Vec<HttpMatch>,
    /// The destinations (empty when the route answers itself: `traffic.answer`).
    pub(crate) route: Vec<Destination>,
    /// Timeout, retries and fault injection; the hash policy is added at
    /// translation, from the DestinationRule of the first destination.
    pub(crate) policy: RoutePolicy,
    /// Route-level `headers`, `rewrite`, and `redirect` / `directResponse`;
    /// destination-level headers are on each [`Destination`].
    pub(crate) traffic: Traffic,
    /// Where copies of the requests go (`mirror`, `mirrors`).
    pub(crate) mirrors: Vec<Mirror>,
    /// `corsPolicy`, enforced by the servers of the hosts (see
    /// `super::cors` and `super::security`).
    pub(crate) cors: Option<Arc<mesh_core::cors::CorsPolicy>>,
    pub(crate) line: usize,
}

/// One `match[]` entry: ANDed conditions, already in model form.
#[derive(Debug, Clone)]
pub(crate) struct HttpMatch {
    pub(crate) path: PathMatch,
    /// `match.ignoreUriCase` (Envoy `case_sensitive: false`).
    pub(crate) ignore_uri_case: bool,
    pub(crate) headers: Vec<HeaderMatch>,
    pub(crate) query_params: Vec<QueryParamMatch>,
    /// `match.port`: the route applies only to this port of the host.
    pub(crate) port: Option<Spanned<u16>>,
    /// `match.sourceLabels`: the route exists only for calling workloads
    /// with all these labels (applied per node view, before encoding).
    pub(crate) source_labels: BTreeMap<String, String>,
    /// `match.sourceNamespace`: the route exists only for calling
    /// workloads of this namespace (per node view, like `source_labels`).
    pub(crate) source_namespace: Option<String>,
}

/// One `route[]` entry.
#[derive(Debug, Clone)]
pub(crate) struct Destination {
    /// Host as written (lower-cased).
    pub(crate) host: Spanned<String>,
    pub(crate) subset: Option<Spanned<String>>,
    pub(crate) port: Option<Spanned<u16>>,
    /// Relative weight (0 when absent).
    pub(crate) weight: u32,
    /// The destination's `headers`.
    pub(crate) headers: HeaderRules,
    /// Line of the destination, for problems about it as a whole.
    pub(crate) line: usize,
}

/// A mirror of a route: its destination (weight and headers unused) and
/// the share of requests copied there.
#[derive(Debug, Clone)]
pub(crate) struct Mirror {
    pub(crate) destination: Destination,
    pub(crate) fraction: Fraction,
}

/// `DestinationRule.spec`.
#[derive(Debug, Clone)]
pub(crate) struct DestinationRule {
    pub(crate) host: Spanned<String>,
    pub(crate) policy: TrafficPolicy,
    pub(crate) subsets: Vec<Subset>,
    /// `exportTo`: the namespaces whose workloads it applies to.
    pub(crate) export_to: ExportTo,
}

/// One `subsets[]` entry.
#[derive(Debug, Clone)]
pub(crate) struct Subset {
    pub(crate) name: Spanned<String>,
    pub(crate) labels: BTreeMap<String, String>,
    /// Merged over the rule's policy, one top-level field at a time.
    pub(crate) policy: TrafficPolicy,
}

/// `ServiceEntry.spec`.
#[derive(Debug, Clone)]
pub(crate) struct ServiceEntry {
    pub(crate) hosts: Vec<Spanned<String>>,
    pub(crate) ports: Vec<ServicePort>,
    /// Line of `ports`, for problems about the ports as a whole.
    pub(crate) ports_line: usize,
    pub(crate) endpoints: Vec<Workload>,
    pub(crate) selector: Option<BTreeMap<String, String>>,
    /// `subjectAltNames`: SPIFFE IDs the service's servers may present.
    pub(crate) subject_alt_names: Vec<SpiffeId>,
    /// `exportTo`: the namespaces whose workloads know its hosts.
    pub(crate) export_to: ExportTo,
    /// `resolution` (default STATIC here; see `config`'s "Smaller rules").
    pub(crate) resolution: Resolution,
    /// `location: MESH_EXTERNAL`: its endpoints are outside the mesh's
    /// identity system, so auto mTLS never applies to them.
    pub(crate) mesh_external: bool,
    /// `endpoints` of a `resolution: DNS` entry: names (or IPs) each client
    /// resolves, instead of the hosts.
    pub(crate) dns_endpoints: Vec<DnsEndpoint>,
}

/// One `endpoints[]` entry of a `resolution: DNS` ServiceEntry.
#[derive(Debug, Clone)]
pub(crate) struct DnsEndpoint {
    /// The DNS name (or IP) to resolve.
    pub(crate) address: String,
    /// Port name → port, as in a workload's `ports`.
    pub(crate) ports: BTreeMap<String, u16>,
}

/// A ServiceEntry's `resolution`.
///
/// `NONE` is Istio's passthrough: the sidecar forwards to the address the
/// application dialed. An in-process client is dialed by name, so there
/// is no such address: here `NONE` needs `addresses` (plain IPs, not
/// CIDRs), and those are the endpoints (on each port's `targetPort`, else
/// its number). `DNS` / `DNS_ROUND_ROBIN` resolve each host (STRICT_DNS /
/// LOGICAL_DNS clusters: `mesh_core::model::Discovery::Dns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolution {
    Static,
    Dns { round_robin: bool },
    None { addresses: Vec<IpAddr> },
}

/// One `ports[]` entry of a ServiceEntry.
#[derive(Debug, Clone)]
pub(crate) struct ServicePort {
    pub(crate) number: u16,
    pub(crate) name: Option<String>,
    pub(crate) protocol: Protocol,
    pub(crate) target_port: Option<u16>,
    /// `protocol: HTTPS` or `TLS`: the endpoints speak TLS, and the
    /// in-process client is the TLS client (it originates TLS, SNI the
    /// host, verified against the system roots, unless a DestinationRule
    /// says otherwise); HTTP/1.1 inside.
    pub(crate) tls: bool,
}

/// A workload: a `WorkloadEntry.spec` or a `ServiceEntry.endpoints[]` entry.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    pub(crate) address: IpAddr,
    pub(crate) ports: BTreeMap<String, u16>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) locality: Locality,
    pub(crate) weight: u32,
    /// `serviceAccount`: the identity the workload runs as (in the
    /// resource's namespace).
    pub(crate) service_account: Option<String>,
}

/// What one document yielded.
pub(crate) struct Parsed {
    /// The identity, when kind and name could be read.
    pub(crate) key: Option<ResourceKey>,
    /// Line of `metadata.name` (or of the document).
    pub(crate) line: usize,
    /// The resource, when it has no problem at all.
    pub(crate) resource: Option<Resource>,
    pub(crate) diagnostics: Vec<Diagnostic>,
}

/// Parses one document of `file`.
pub(crate) fn parse_document(file: &Path, doc: usize, node: &Node<'_>) -> Parsed {
    let mut sink = Sink::new(file);
    let mut parsed = Parsed {
        key: None,
        line: line_of(node),
        resource: None,
        diagnostics: Vec::new(),
    };
    let Some(top) = Fields::read(
        &mut sink,
        node,
        "",
        // `status`: written by the API server (`kubectl get -o yaml`
        // exports it); it describes, it does not configure.
        &["apiVersion", "kind", "metadata", "spec", "status"],
        &[],
    ) else {
        parsed.diagnostics = sink.into_diagnostics();
        return parsed;
    };
    let kind = match top
        .require(&mut sink, "kind")
        .and_then(|f| f.string(&mut sink))
    {
        Some(k) => match Kind::from_name(&k.value) {
            Some(kind) => kind,
            None => {
                if UNSUPPORTED_KINDS.contains(&k.value.as_str()) {
                    sink.error(k.line, format!("kind '{}' is not supported yet", k.value));
                } else {
                    sink.error(
                        k.line,
                        format!(
                            "unknown kind '{}' (expected VirtualService, DestinationRule, ServiceEntry, WorkloadEntry, WorkloadGroup, PeerAuthentication, AuthorizationPolicy or EnvoyFilter)",
                            k.value
                        ),
                    );
                }
                parsed.diagnostics = sink.into_diagnostics();
                return parsed;
            }
        },
        None => {
            parsed.diagnostics = sink.into_diagnostics();
            return parsed;
        }
    };
    sink.about(kind.to_string());
    if let Some(v) = top
        .require(&mut sink, "apiVersion")
        .and_then(|f| f.string(&mut sink))
        && !kind.api_versions().contains(&v.value.as_str())
    {
        let expected = match kind.api_versions() {
            [first, rest @ ..] => {
                let others: Vec<&str> = rest
                    .iter()
                    .map(|r| r.rsplit('/').next().unwrap_or(r))
                    .collect();
                format!("{first}, {}", others.join(" or "))
            }
            [] => String::new(),
        };
        sink.error(
            v.line,
            format!(
                "unknown apiVersion '{}' for kind {kind} (expected {expected})",
                v.value
            ),
        );
    }
    let meta = top
        .require(&mut sink, "metadata")
        .and_then(|m| parse_metadata(&mut sink, m, kind, file, doc));
    if let Some(meta) = &meta {
        parsed.key = Some(meta.key());
        parsed.line = meta.line;
        sink.about(meta.to_string());
    }
    let spec = top.require(&mut sink, "spec").and_then(|s| match kind {
        Kind::VirtualService => parse_virtual_service(&mut sink, s).map(Spec::VirtualService),
        Kind::DestinationRule => parse_destination_rule(&mut sink, s).map(Spec::DestinationRule),
        Kind::ServiceEntry => parse_service_entry(&mut sink, s).map(Spec::ServiceEntry),
        Kind::WorkloadEntry => Fields::read(
            &mut sink,
            s.node,
            "",
            &WORKLOAD_FIELDS,
            &WORKLOAD_UNSUPPORTED,
        )
        .and_then(|mut f| {
            f.line = s.key_line;
            parse_workload(&mut sink, &f)
        })
        .map(Spec::WorkloadEntry),
        Kind::WorkloadGroup => parse_workload_group(&mut sink, s).map(Spec::WorkloadGroup),
        Kind::PeerAuthentication => {
            auth::parse_peer_authentication(&mut sink, s).map(Spec::PeerAuthentication)
        }
        Kind::AuthorizationPolicy => {
            let (ns, name) = meta
                .as_ref()
                .map(|m| (m.namespace.as_str(), m.name.as_str()))
                .unwrap_or(("default", "unnamed"));
            // `None`: a bad value, already reported (the resource is refused).
            let dry_run = auth::parse_dry_run(&mut sink, Look::document(node)).unwrap_or(false);
            auth::parse_authorization_policy(&mut sink, s, ns, name, dry_run)
                .map(Spec::AuthorizationPolicy)
        }
        Kind::EnvoyFilter => {
            super::envoy_filter::parse_envoy_filter(&mut sink, s).map(Spec::EnvoyFilter)
        }
        Kind::Gateway => super::gateway_spec::parse_gateway(&mut sink, s).map(Spec::Gateway),
        Kind::Sidecar => super::sidecar_spec::parse_sidecar(&mut sink, s).map(Spec::Sidecar),
    });
    if sink.count() == 0
        && let (Some(meta), Some(spec)) = (meta, spec)
    {
        parsed.resource = Some(Resource { meta, spec });
    }
    parsed.diagnostics = sink.into_diagnostics();
    parsed
}

fn parse_metadata(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
    kind: Kind,
    file: &Path,
    doc: usize,
) -> Option<Meta> {
    let m = Fields::of(
        sink,
        field,
        &[
            "name",
            "namespace",
            "labels",
            "annotations",
            // What `kubectl get -o yaml` adds: the API server's bookkeeping,
            // which changes nothing here (accepted and ignored).
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
            "selfLink",
        ],
        &["finalizers", "ownerReferences", "deletionTimestamp"],
    )?;
    // Labels do not change routing; they are checked for shape only.
    if let Some(f) = m.get("labels") {
        f.string_map(sink);
    }
    // An annotation in one of Istio's domains may change what Istio does
    // with the resource: honored (`istio.io/dry-run` on an
    // AuthorizationPolicy) or reported, never silently ignored. Others
    // (kubectl's, Helm's, a team's own) change nothing.
    if let Some(f) = m.get("annotations")
        && f.string_map(sink).is_some()
    {
        for e in f.entries(sink).unwrap_or_default() {
            let istio = e.key.starts_with("istio.io/") || e.key.contains(".istio.io/");
            let honored = e.key == auth::DRY_RUN_ANNOTATION && kind == Kind::AuthorizationPolicy;
            if istio && !honored {
                sink.error(
                    e.line,
                    format!(
                        "annotation '{}' is not supported yet: it changes what Istio does \
                         with a {kind}, and this mesh would ignore it",
                        e.key
                    ),
                );
            }
        }
    }
    let namespace = match m.get("namespace") {
        Some(f) => {
            let ns = f.string(sink)?;
            if !is_dns_label(&ns.value) {
                sink.error(
                    ns.line,
                    format!(
                        "metadata.namespace '{}' must be a DNS label (lower-case letters, digits and '-')",
                        ns.value
                    ),
                );
                return None;
            }
            ns.value
        }
        None => "default".to_string(),
    };
    let Some(name) = m.get("name") else {
        sink.error(m.line, "missing field 'metadata.name'");
        return None;
    };
    let name = name.string(sink)?;
    if name.value.is_empty()
        || name.value.len() > 253
        || !name
            .value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        sink.error(
            name.line,
            format!(
                "metadata.name '{}' must be a DNS name (lower-case letters, digits, '-' and '.')",
                name.value
            ),
        );
        return None;
    }
    Some(Meta {
        kind,
        namespace,
        name: name.value,
        file: file.to_path_buf(),
        line: name.line,
        doc,
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Reads a host as written: lower-cased, checked for shape.
fn parse_host(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Spanned<String>> {
    let host = field.string(sink)?;
    let value = host.value.to_ascii_lowercase();
    if value.starts_with('*') || value.contains('*') {
        sink.error(
            host.line,
            format!(
                "'{}': wildcard host '{value}' is not supported yet",
                field.path
            ),
        );
        return None;
    }
    let valid = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !value.starts_with('.')
        && !value.ends_with('.')
        && !value.contains("..");
    if !valid {
        sink.error(
            host.line,
            format!(
                "'{}': '{}' is not a valid host name (letters, digits, '-' and '.', no port)",
                field.path, host.value
            ),
        );
        return None;
    }
    Some(Spanned {
        value,
        line: host.line,
    })
}

/// A non-empty list of hosts.
fn parse_hosts(sink: &mut Sink<'_>, f: &Fields<'_, '_>) -> Option<Vec<Spanned<String>>> {
    let field = f.require(sink, "hosts")?;
    let items = field.list(sink)?;
    if items.is_empty() {
        sink.error(field.key_line, "'hosts' must not be empty");
        return None;
    }
    let mut hosts: Vec<Spanned<String>> = Vec::new();
    for (path, node) in &items {
        let item = Field {
            path,
            key_line: line_of(node),
            node,
        };
        if let Some(h) = parse_host(sink, item) {
            if hosts.iter().any(|x| x.value == h.value) {
                sink.error(
                    h.line,
                    format!("'{path}': host '{}' is listed twice", h.value),
                );
            } else {
                hosts.push(h);
            }
        }
    }
    Some(hosts)
}

fn parse_virtual_service(sink: &mut Sink<'_>, spec: Field<'_, '_, '_>) -> Option<VirtualService> {
    let mut f = Fields::read(
        sink,
        spec.node,
        "",
        &["hosts", "http", "exportTo", "gateways"],
        &["tls", "tcp"],
    )?;
    f.line = spec.key_line;
    let hosts = parse_hosts(sink, &f);
    let export_to = parse_export_to(sink, &f);
    let gateways = parse_gateways(sink, &f);
    let http = match f.get("http") {
        Some(field) => {
            let items = field.list(sink)?;
            if items.is_empty() {
                sink.error(field.key_line, "'http' must not be empty");
            }
            items
                .iter()
                .filter_map(|(path, node)| parse_http_route(sink, path, node))
                .collect()
        }
        None => {
            sink.error(
                f.line,
                "missing field 'http' (tcp and tls routes are not supported yet)",
            );
            Vec::new()
        }
    };
    Some(VirtualService {
        hosts: hosts?,
        http,
        export_to: export_to?,
        gateways: gateways?,
    })
}

/// VirtualService `gateways`: `mesh`, `name` or `namespace/name`, each once.
fn parse_gateways(sink: &mut Sink<'_>, f: &Fields<'_, '_>) -> Option<Vec<Spanned<String>>> {
    let Some(field) = f.get("gateways") else {
        return Some(Vec::new());
    };
    let items = field.string_list(sink)?;
    let before = sink.count();
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    let mut out: Vec<Spanned<String>> = Vec::new();
    for (path, g) in items {
        let ok = match g.value.split_once('/') {
            Some((ns, name)) => name_ok(ns) && name_ok(name),
            None => name_ok(&g.value),
        };
        if !ok {
            sink.error(
                g.line,
                format!(
                    "'{path}': '{}' is not 'mesh', a Gateway name or 'namespace/name'",
                    g.value
                ),
            );
        } else if out.iter().any(|x| x.value == g.value) {
            sink.error(g.line, format!("'{path}': '{}' is listed twice", g.value));
        } else {
            out.push(g);
        }
    }
    (sink.count() == before).then_some(out)
}

/// `exportTo` (Istio's visibility): `.` (the resource's namespace), `*`
/// (every namespace, the default, also for an empty list), `~` (none) or
/// namespace names. `*` and `~` stand alone; a value listed twice or that
/// is no namespace name is an error at its line.
fn parse_export_to(sink: &mut Sink<'_>, f: &Fields<'_, '_>) -> Option<ExportTo> {
    let Some(field) = f.get("exportTo") else {
        return Some(ExportTo::All);
    };
    let items = field.string_list(sink)?;
    let before = sink.count();
    let mut own = false;
    let mut all = false;
    let mut none = false;
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (path, value) in &items {
        let v = value.value.as_str();
        if !seen.insert(v) {
            sink.error(value.line, format!("'{path}': '{v}' is listed twice"));
            continue;
        }
        match v {
            "." => own = true,
            "*" => all = true,
            "~" => none = true,
            name if is_dns_label(name) => {
                names.insert(name.to_string());
            }
            _ => sink.error(
                value.line,
                format!(
                    "'{path}': '{v}' is not a namespace name (expected '.', '*', '~' or a DNS \
                     label: lower-case letters, digits and '-')"
                ),
            ),
        }
    }
    if (all || none) && items.len() > 1 {
        sink.error(
            field.key_line,
            format!(
                "'{}': '{}' must be the only value",
                field.path,
                if all { "*" } else { "~" }
            ),
        );
    }
    if sink.count() != before {
        return None;
    }
    if all || items.is_empty() {
        return Some(ExportTo::All);
    }
    Some(ExportTo::Namespaces {
        own,
        names,
        line: field.key_line,
    })
}

fn parse_http_route(sink: &mut Sink<'_>, path: &str, node: &Node<'_>) -> Option<HttpRoute> {
    let f = Fields::read(
        sink,
        node,
        path,
        &[
            "name",
            "match",
            "route",
            "timeout",
            "retries",
            "fault",
            "headers",
            "rewrite",
            "redirect",
            "directResponse",
            "mirror",
            "mirrors",
            "mirrorPercentage",
            "mirrorPercent",
            "corsPolicy",
        ],
        &["delegate", "mirror_percent"],
    )?;
    let cors = f
        .get("corsPolicy")
        .and_then(|c| super::cors_policy::parse_cors_policy(sink, c));
    let name = f.get("name").and_then(|n| n.string(sink)).map(|s| s.value);
    let policy = RoutePolicy {
        timeout: f
            .get("timeout")
            .and_then(|t| policy::parse_timeout(sink, t)),
        // Istio's default when a route says nothing; `attempts: 0` disables.
        retry: match f.get("retries") {
            Some(r) => policy::parse_retries(sink, r),
            None => Some(RetryPolicy::istio_default()),
        },
        fault: f.get("fault").and_then(|x| policy::parse_fault(sink, x)),
        hash_policy: Arc::from([]),
        // Set at translation from `HttpRoute::traffic` (destinations and
        // mirrors become cluster names there).
        traffic: None,
        // Set at translation from outbound EnvoyFilters (per caller).
        rate_limit: None,
    };
    let mut matches = Vec::new();
    if let Some(m) = f.get("match") {
        for (p, n) in m.list(sink)? {
            matches.push(parse_match(sink, &p, n));
        }
    }
    let matches: Vec<HttpMatch> = matches.into_iter().collect::<Option<_>>()?;
    let before = sink.count();
    let answer = match (f.get("redirect"), f.get("directResponse")) {
        (Some(_), Some(direct)) => {
            sink.error(
                direct.key_line,
                format!("'{path}': only one of redirect or directResponse may be set"),
            );
            None
        }
        (Some(r), None) => traffic::parse_redirect(sink, r).map(LocalAnswer::Redirect),
        (None, Some(d)) => traffic::parse_direct_response(sink, d).map(LocalAnswer::Direct),
        (None, None) => None,
    };
    let headers = f
        .get("headers")
        .and_then(|h| traffic::parse_headers(sink, h))
        .unwrap_or_default();
    let mirrors = parse_mirrors(sink, &f);
    let paths: Vec<&PathMatch> = matches.iter().map(|m| &m.path).collect();
    let rewrite = f
        .get("rewrite")
        .and_then(|r| traffic::parse_rewrite(sink, r, &paths))
        .unwrap_or_default();
    if sink.count() != before {
        return None;
    }
    let answers = f.get("redirect").or(f.get("directResponse"));
    if let Some(answers) = answers {
        for other in [
            "route", "rewrite", "mirror", "mirrors", "timeout", "retries", "fault",
        ] {
            if let Some(o) = f.get(other) {
                sink.error(
                    o.key_line,
                    format!(
                        "'{}' cannot be set with '{}': the route answers itself",
                        o.path, answers.path
                    ),
                );
                return None;
            }
        }
        return Some(HttpRoute {
            name,
            matches,
            route: Vec::new(),
            policy,
            traffic: Traffic {
                headers,
                answer,
                ..Traffic::default()
            },
            mirrors: Vec::new(),
            cors,
            line: line_of(node),
        });
    }
    let route_field = f.require(sink, "route")?;
    let items = route_field.list(sink)?;
    if items.is_empty() {
        sink.error(
            route_field.key_line,
            format!("'{}' needs at least one destination", route_field.path),
        );
        return None;
    }
    let route: Vec<Option<Destination>> = items
        .iter()
        .map(|(p, n)| parse_destination(sink, p, n))
        .collect();
    let route: Vec<Destination> = route.into_iter().collect::<Option<_>>()?;
    if route.len() > 1 && route.iter().all(|d| d.weight == 0) {
        sink.error(
            route_field.key_line,
            format!(
                "all weights of '{}' are zero (set a positive weight on at least one destination)",
                route_field.path
            ),
        );
        return None;
    }
    let destinations: Arc<[HeaderRules]> = if route.iter().all(|d| d.headers.is_empty()) {
        Arc::from([])
    } else {
        route.iter().map(|d| d.headers.clone()).collect()
    };
    Some(HttpRoute {
        name,
        matches,
        route,
        policy,
        traffic: Traffic {
            headers,
            destinations,
            rewrite,
            answer: None,
            mirrors: Arc::from([]),
        },
        mirrors,
        cors,
        line: line_of(node),
    })
}

fn parse_match(sink: &mut Sink<'_>, path: &str, node: &Node<'_>) -> Option<HttpMatch> {
    let before = sink.count();
    let f = Fields::read(
        sink,
        node,
        path,
        &[
            "name",
            "uri",
            "headers",
            "withoutHeaders",
            "method",
            "queryParams",
            "port",
            "ignoreUriCase",
            "sourceLabels",
            "sourceNamespace",
            "scheme",
            "authority",
        ],
        &["gateways", "statPrefix"],
    )?;
    // `name` only labels the match in Istio's generated config: nothing to honor.
    if let Some(n) = f.get("name") {
        n.string(sink);
    }
    // Envoy's `case_sensitive: false`, as Istio translates it: exact and
    // prefix URIs only (a regex is matched as written, in Istio and Envoy).
    let ignore_uri_case = match f.get("ignoreUriCase") {
        Some(i) => i.boolean(sink).unwrap_or(false),
        None => false,
    };
    let path_match = match f.get("uri") {
        Some(u) => match parse_string_match(sink, u, false)? {
            ValueMatch::Exact(s) => PathMatch::Exact(s),
            ValueMatch::Prefix(s) => PathMatch::Prefix(s),
            ValueMatch::Regex(p) => PathMatch::Regex(p),
            ValueMatch::Present(_) => PathMatch::Prefix(Arc::from("/")),
        },
        None => PathMatch::Prefix(Arc::from("/")),
    };
    let mut headers = Vec::new();
    for (key, invert) in [("headers", false), ("withoutHeaders", true)] {
        if let Some(h) = f.get(key) {
            for e in h.entries(sink).unwrap_or_default() {
                let name = e.key.to_ascii_lowercase();
                if name.is_empty() || !name.bytes().all(is_header_name_byte) {
                    sink.error(e.line, format!("'{}': invalid header name", e.path));
                    continue;
                }
                if let Some(value) = parse_string_match(sink, e.field(), true) {
                    headers.push(HeaderMatch {
                        name: Arc::from(name),
                        value,
                        invert,
                    });
                }
            }
        }
    }
    // `method`, `authority` and `scheme` are header matchers on Envoy's
    // pseudo-headers, as Istio writes them.
    for (key, pseudo) in [
        ("method", ":method"),
        ("authority", ":authority"),
        ("scheme", ":scheme"),
    ] {
        if let Some(m) = f.get(key)
            && let Some(value) = parse_string_match(sink, m, false)
        {
            headers.push(HeaderMatch {
                name: Arc::from(pseudo),
                value,
                invert: false,
            });
        }
    }
    let mut query_params = Vec::new();
    if let Some(q) = f.get("queryParams") {
        for e in q.entries(sink).unwrap_or_default() {
            if e.key.is_empty() {
                sink.error(e.line, format!("'{}': empty query parameter name", e.path));
                continue;
            }
            if let Some(value) = parse_string_match(sink, e.field(), true) {
                query_params.push(QueryParamMatch {
                    name: Arc::from(e.key.as_str()),
                    value,
                });
            }
        }
    }
    let port = f.get("port").and_then(|p| {
        p.port(sink).map(|value| Spanned {
            value,
            line: p.line(),
        })
    });
    // The caller's conditions: Envoy has no matcher for them, so (as
    // Istio does) each node's view holds only the routes they admit.
    let source_labels = match f.get("sourceLabels") {
        Some(l) => {
            let labels = l.string_map(sink).unwrap_or_default();
            if labels.keys().any(String::is_empty) {
                sink.error(l.line(), format!("'{}': empty label name", l.path));
            }
            labels
        }
        None => BTreeMap::new(),
    };
    let source_namespace = f.get("sourceNamespace").and_then(|n| {
        let ns = n.string(sink)?;
        if !is_dns_label(&ns.value) {
            sink.error(
                ns.line,
                format!(
                    "'{}': '{}' is not a namespace name (lower-case letters, digits and '-')",
                    n.path, ns.value
                ),
            );
            return None;
        }
        Some(ns.value)
    });
    (sink.count() == before).then_some(HttpMatch {
        path: path_match,
        ignore_uri_case,
        headers,
        query_params,
        port,
        source_labels,
        source_namespace,
    })
}

fn parse_destination(sink: &mut Sink<'_>, path: &str, node: &Node<'_>) -> Option<Destination> {
    let before = sink.count();
    let f = Fields::read(sink, node, path, &["destination", "weight", "headers"], &[])?;
    let headers = f
        .get("headers")
        .and_then(|h| traffic::parse_headers(sink, h))
        .unwrap_or_default();
    let weight = match f.get("weight") {
        Some(w) => match w.integer(sink) {
            Some(n) if n < 0 => {
                sink.error(
                    w.line(),
                    format!("'{}': weight {n} must not be negative", w.path),
                );
                None
            }
            Some(n) => match u32::try_from(n) {
                Ok(n) => Some(n),
                Err(_) => {
                    sink.error(
                        w.line(),
                        format!("'{}': weight {n} is out of range", w.path),
                    );
                    None
                }
            },
            None => None,
        },
        None => Some(0),
    };
    let d = f.require(sink, "destination")?;
    let target = parse_target(sink, d);
    if sink.count() != before {
        return None;
    }
    Some(Destination {
        weight: weight?,
        headers,
        ..target?
    })
}

/// A `destination: {host, subset, port}` (of a route or a mirror): weight 0,
/// no headers.
fn parse_target(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Destination> {
    let before = sink.count();
    let d = Fields::of(sink, field, &["host", "subset", "port"], &[])?;
    let host = d.require(sink, "host").and_then(|h| parse_host(sink, h));
    let subset = d.get("subset").and_then(|s| {
        let s = s.string(sink)?;
        check_subset_name(sink, &s, &join(&d.path, "subset"))?;
        Some(s)
    });
    let port = match d.get("port") {
        Some(p) => {
            let pf = Fields::of(sink, p, &["number"], &[])?;
            let n = pf.require(sink, "number")?;
            let line = n.line();
            Some(Spanned {
                value: n.port(sink)?,
                line,
            })
        }
        None => None,
    };
    if sink.count() != before {
        return None;
    }
    Some(Destination {
        host: host?,
        subset,
        port,
        weight: 0,
        headers: HeaderRules::default(),
        line: d.line,
    })
}

/// `mirror` + `mirrorPercentage` (or the older `mirrorPercent`), or
/// `mirrors: [{destination, percentage}]`: where copies of a route's
/// requests go, and which share of them (100% when not said).
fn parse_mirrors(sink: &mut Sink<'_>, f: &Fields<'_, '_>) -> Vec<Mirror> {
    let before = sink.count();
    let percentage = |sink: &mut Sink<'_>, field: Option<Field<'_, '_, '_>>| match field {
        None => Some(Fraction::ALL),
        Some(p) => policy::percentage(sink, Some(p)),
    };
    let mut out = Vec::new();
    match (f.get("mirror"), f.get("mirrors")) {
        (Some(_), Some(mirrors)) => sink.error(
            mirrors.key_line,
            format!("'{}': only one of mirror or mirrors may be set", f.path),
        ),
        (Some(mirror), None) => {
            let share = match (f.get("mirrorPercentage"), f.get("mirrorPercent")) {
                (Some(_), Some(old)) => {
                    sink.error(
                        old.key_line,
                        format!(
                            "'{}': only one of mirrorPercentage or mirrorPercent may be set",
                            f.path
                        ),
                    );
                    None
                }
                (Some(p), None) => percentage(sink, Some(p)),
                (None, Some(old)) => old
                    .integer_in(sink, 0, 100, "a whole percentage")
                    .and_then(|n| Fraction::from_percent(n as f64)),
                (None, None) => Some(Fraction::ALL),
            };
            if let (Some(destination), Some(fraction)) = (parse_target(sink, mirror), share) {
                out.push(Mirror {
                    destination,
                    fraction,
                });
            }
        }
        (None, Some(mirrors)) => {
            for other in ["mirrorPercentage", "mirrorPercent"] {
                if let Some(o) = f.get(other) {
                    sink.error(
                        o.key_line,
                        format!("'{}' goes with 'mirror'; with 'mirrors' each entry has its own 'percentage'", o.path),
                    );
                }
            }
            for (path, node) in mirrors.list(sink).unwrap_or_default() {
                let Some(m) = Fields::read(sink, node, &path, &["destination", "percentage"], &[])
                else {
                    continue;
                };
                let destination = m
                    .require(sink, "destination")
                    .and_then(|d| parse_target(sink, d));
                let fraction = percentage(sink, m.get("percentage"));
                if let (Some(destination), Some(fraction)) = (destination, fraction) {
                    out.push(Mirror {
                        destination,
                        fraction,
                    });
                }
            }
        }
        (None, None) => {
            for other in ["mirrorPercentage", "mirrorPercent"] {
                if let Some(o) = f.get(other) {
                    sink.error(o.key_line, format!("'{}' needs 'mirror'", o.path));
                }
            }
        }
    }
    if sink.count() != before {
        out.clear();
    }
    out
}

/// Subset names become part of cluster names (`outbound|80|v1|host`).
fn check_subset_name(sink: &mut Sink<'_>, name: &Spanned<String>, path: &str) -> Option<()> {
    let ok = !name.value.is_empty()
        && name
            .value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Some(())
    } else {
        sink.error(
            name.line,
            format!(
                "'{path}': subset name '{}' may only hold letters, digits, '-', '_' and '.'",
                name.value
            ),
        );
        None
    }
}

fn parse_destination_rule(sink: &mut Sink<'_>, spec: Field<'_, '_, '_>) -> Option<DestinationRule> {
    let before = sink.count();
    let mut f = Fields::read(
        sink,
        spec.node,
        "",
        &["host", "trafficPolicy", "subsets", "exportTo"],
        &["workloadSelector"],
    )?;
    f.line = spec.key_line;
    let host = f.require(sink, "host").and_then(|h| parse_host(sink, h));
    let export_to = parse_export_to(sink, &f);
    let policy = f
        .get("trafficPolicy")
        .and_then(|t| policy::parse_traffic_policy(sink, t))
        .unwrap_or_default();
    let mut subsets: Vec<Subset> = Vec::new();
    if let Some(s) = f.get("subsets") {
        for (path, node) in s.list(sink).unwrap_or_default() {
            let Some(sf) =
                Fields::read(sink, node, &path, &["name", "labels", "trafficPolicy"], &[])
            else {
                continue;
            };
            let Some(name) = sf.require(sink, "name").and_then(|n| n.string(sink)) else {
                continue;
            };
            if check_subset_name(sink, &name, &join(&path, "name")).is_none() {
                continue;
            }
            if let Some(first) = subsets.iter().find(|s| s.name.value == name.value) {
                sink.error(
                    name.line,
                    format!(
                        "'{path}': subset '{}' is already defined at line {}",
                        name.value, first.name.line
                    ),
                );
                continue;
            }
            let labels = sf
                .get("labels")
                .and_then(|l| l.string_map(sink))
                .unwrap_or_default();
            let policy = sf
                .get("trafficPolicy")
                .and_then(|t| policy::parse_traffic_policy(sink, t))
                .unwrap_or_default();
            subsets.push(Subset {
                name,
                labels,
                policy,
            });
        }
    }
    if sink.count() != before {
        return None;
    }
    Some(DestinationRule {
        host: host?,
        policy,
        subsets,
        export_to: export_to?,
    })
}

fn parse_service_entry(sink: &mut Sink<'_>, spec: Field<'_, '_, '_>) -> Option<ServiceEntry> {
    let before = sink.count();
    let mut f = Fields::read(
        sink,
        spec.node,
        "",
        &[
            "hosts",
            "ports",
            "endpoints",
            "workloadSelector",
            "resolution",
            "location",
            "subjectAltNames",
            "exportTo",
            "addresses",
        ],
        &[],
    )?;
    f.line = spec.key_line;
    let hosts = parse_hosts(sink, &f);
    let export_to = parse_export_to(sink, &f);
    // `addresses`: IPs or CIDRs. Istio's virtual IPs, for traffic capture
    // (which an in-process client does not do): only NONE uses them.
    let mut addresses: Vec<IpAddr> = Vec::new();
    let mut cidrs: Vec<Spanned<String>> = Vec::new();
    if let Some(a) = f.get("addresses") {
        for (path, address) in a.string_list(sink).unwrap_or_default() {
            let (ip, prefix) = match address.value.split_once('/') {
                Some((ip, prefix)) => (ip, Some(prefix)),
                None => (address.value.as_str(), None),
            };
            let ip_ok = ip.parse::<IpAddr>();
            let prefix_ok = match (&ip_ok, prefix) {
                (_, None) => true,
                (Ok(ip), Some(p)) => p
                    .parse::<u8>()
                    .is_ok_and(|p| p <= if ip.is_ipv4() { 32 } else { 128 }),
                (Err(_), Some(_)) => false,
            };
            match ip_ok {
                Ok(ip) if prefix_ok => match prefix {
                    None => addresses.push(ip),
                    Some(_) => cidrs.push(address.clone()),
                },
                _ => sink.error(
                    address.line,
                    format!(
                        "'{path}': '{}' is not an IP address or CIDR block",
                        address.value
                    ),
                ),
            }
        }
    }
    let mut resolution = Resolution::Static;
    if let Some(r) = f.get("resolution").and_then(|r| r.string(sink)) {
        match r.value.as_str() {
            "STATIC" => {}
            "DNS" => resolution = Resolution::Dns { round_robin: false },
            "DNS_ROUND_ROBIN" => resolution = Resolution::Dns { round_robin: true },
            "NONE" => {
                if let Some(cidr) = cidrs.first() {
                    sink.error(
                        cidr.line,
                        format!(
                            "'resolution: NONE' calls the 'addresses' themselves (this mesh's \
                             client is dialed by name, so there is no original destination to \
                             pass through to): '{}' is a CIDR block, give single IPs",
                            cidr.value
                        ),
                    );
                } else if addresses.is_empty() {
                    sink.error(
                        r.line,
                        "'resolution: NONE' passes traffic through to the address the \
                         application dialed, and this mesh's client is dialed by name: there is \
                         no such address. List the IPs to call in 'addresses', or use \
                         'resolution: DNS' (the hosts resolved) or STATIC (with endpoints)",
                    );
                }
                resolution = Resolution::None {
                    addresses: addresses.clone(),
                };
            }
            other => sink.error(
                r.line,
                format!(
                    "unknown resolution '{other}' (expected STATIC, DNS, DNS_ROUND_ROBIN or NONE)"
                ),
            ),
        }
    }
    if let Resolution::Dns { .. } = resolution
        && let Some(hosts) = &hosts
    {
        for host in hosts.iter().filter(|h| h.value.contains('*')) {
            sink.error(
                host.line,
                format!(
                    "host '{}': a wildcard host cannot be resolved ('resolution: DNS' needs \
                     plain names; Istio refuses it too)",
                    host.value
                ),
            );
        }
    }
    let mut mesh_external = false;
    if let Some(l) = f.get("location").and_then(|l| l.string(sink)) {
        match l.value.as_str() {
            "MESH_INTERNAL" => {}
            "MESH_EXTERNAL" => mesh_external = true,
            other => sink.error(
                l.line,
                format!("unknown location '{other}' (expected MESH_INTERNAL or MESH_EXTERNAL)"),
            ),
        }
    }
    let mut ports: Vec<ServicePort> = Vec::new();
    let ports_line;
    match f.require(sink, "ports") {
        Some(p) => {
            ports_line = p.key_line;
            let items = p.list(sink).unwrap_or_default();
            if items.is_empty() {
                sink.error(p.key_line, "'ports' must not be empty");
            }
            for (path, node) in items {
                let Some(port) = parse_service_port(sink, &path, node) else {
                    continue;
                };
                if ports.iter().any(|q| q.number == port.number) {
                    sink.error(
                        line_of(node),
                        format!("'{path}': port {} is declared twice", port.number),
                    );
                } else if port.name.is_some() && ports.iter().any(|q| q.name == port.name) {
                    sink.error(
                        line_of(node),
                        format!(
                            "'{path}': port name '{}' is used twice",
                            port.name.as_deref().unwrap_or_default()
                        ),
                    );
                } else {
                    ports.push(port);
                }
            }
        }
        None => ports_line = f.line,
    }
    let port_names: BTreeSet<&str> = ports.iter().filter_map(|p| p.name.as_deref()).collect();
    let mut endpoints = Vec::new();
    let mut dns_endpoints = Vec::new();
    if let Some(e) = f.get("endpoints") {
        match resolution {
            Resolution::Static => {}
            Resolution::Dns { .. } => {
                for (path, node) in e.list(sink).unwrap_or_default() {
                    if let Some(ep) = parse_dns_endpoint(sink, &path, node, &port_names) {
                        dns_endpoints.push(ep);
                    }
                }
            }
            Resolution::None { .. } => sink.error(
                e.key_line,
                "'endpoints' with 'resolution: NONE': the 'addresses' are called instead",
            ),
        }
    }
    if let Some(ws) = f.get("workloadSelector")
        && resolution != Resolution::Static
    {
        sink.error(
            ws.key_line,
            "'workloadSelector' needs 'resolution: STATIC' (selected workloads are addresses)",
        );
    }
    if let Some(e) = f.get("endpoints")
        && resolution == Resolution::Static
    {
        for (path, node) in e.list(sink).unwrap_or_default() {
            let Some(wf) = Fields::read(sink, node, &path, &WORKLOAD_FIELDS, &WORKLOAD_UNSUPPORTED)
            else {
                continue;
            };
            if let Some(w) = parse_workload(sink, &wf) {
                if let Some(ports_field) = wf.get("ports") {
                    for name in w.ports.keys() {
                        if !port_names.contains(name.as_str()) {
                            sink.error(
                                ports_field.key_line,
                                format!(
                                    "'{}.{name}': the ServiceEntry has no port named '{name}'",
                                    ports_field.path
                                ),
                            );
                        }
                    }
                }
                endpoints.push(w);
            }
        }
    }
    let selector = match f.get("workloadSelector") {
        Some(ws) => {
            let wsf = Fields::of(sink, ws, &["labels"], &[])?;
            let labels = wsf
                .get("labels")
                .and_then(|l| l.string_map(sink))
                .unwrap_or_default();
            if f.get("endpoints").is_some() {
                sink.error(
                    ws.key_line,
                    "'workloadSelector' and 'endpoints' cannot both be set",
                );
            }
            Some(labels)
        }
        None => None,
    };
    let mut subject_alt_names = Vec::new();
    if let Some(sans) = f.get("subjectAltNames") {
        for (path, san) in sans.string_list(sink).unwrap_or_default() {
            match SpiffeId::parse(&san.value) {
                Ok(id) => subject_alt_names.push(id),
                Err(e) => sink.error(
                    san.line,
                    format!("'{path}': {e} (only SPIFFE IDs are verified)"),
                ),
            }
        }
    }
    if sink.count() != before {
        return None;
    }
    Some(ServiceEntry {
        hosts: hosts?,
        ports,
        ports_line,
        endpoints,
        selector,
        subject_alt_names,
        export_to: export_to?,
        resolution,
        mesh_external,
        dns_endpoints,
    })
}

/// One `endpoints[]` entry of a `resolution: DNS` ServiceEntry: an
/// `address` that is a DNS name (or an IP) and its `ports`. What
/// balances between endpoints (`locality`, `weight`) and what selects them
/// (`labels`) is not carried by a DNS cluster here: reported, not ignored.
fn parse_dns_endpoint(
    sink: &mut Sink<'_>,
    path: &str,
    node: &Node<'_>,
    port_names: &BTreeSet<&str>,
) -> Option<DnsEndpoint> {
    let before = sink.count();
    let f = Fields::read(
        sink,
        node,
        path,
        &["address", "ports"],
        &["labels", "locality", "weight", "serviceAccount", "network"],
    )?;
    let address = f.require(sink, "address").and_then(|a| {
        let s = a.string(sink)?;
        let name_ok = !s.value.is_empty()
            && s.value.len() <= 253
            && s.value.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if name_ok || s.value.parse::<IpAddr>().is_ok() {
            Some(s.value)
        } else {
            sink.error(
                s.line,
                format!(
                    "'{}': '{}' is not a DNS name or an IP address",
                    a.path, s.value
                ),
            );
            None
        }
    });
    let mut ports = BTreeMap::new();
    if let Some(p) = f.get("ports") {
        for e in p.entries(sink).unwrap_or_default() {
            if !port_names.contains(e.key.as_str()) {
                sink.error(
                    e.line,
                    format!(
                        "'{}': the ServiceEntry has no port named '{}'",
                        e.path, e.key
                    ),
                );
            } else if let Some(n) = e.field().port(sink) {
                ports.insert(e.key.clone(), n);
            }
        }
    }
    if sink.count() != before {
        return None;
    }
    Some(DnsEndpoint {
        address: address?,
        ports,
    })
}

fn parse_service_port(sink: &mut Sink<'_>, path: &str, node: &Node<'_>) -> Option<ServicePort> {
    let before = sink.count();
    let f = Fields::read(
        sink,
        node,
        path,
        &["number", "name", "protocol", "targetPort"],
        &[],
    )?;
    let number = f.require(sink, "number").and_then(|n| n.port(sink));
    let name = f.get("name").and_then(|n| n.string(sink)).map(|s| s.value);
    let mut tls = false;
    let protocol = match f.get("protocol") {
        Some(p) => p
            .string(sink)
            .inspect(|s| tls = matches!(s.value.to_ascii_uppercase().as_str(), "HTTPS" | "TLS"))
            .and_then(|s| match s.value.to_ascii_uppercase().as_str() {
                "HTTP" => Some(Protocol::Http1),
                "HTTP2" => Some(Protocol::Http2),
                "GRPC" => Some(Protocol::Grpc),
                // TLS to the endpoints, originated by the client: below.
                "HTTPS" | "TLS" => Some(Protocol::Http1),
                "TCP" | "UDP" | "MONGO" | "REDIS" | "MYSQL" | "GRPC-WEB" => {
                    sink.error(
                        s.line,
                        format!(
                            "'{}: {}' is not supported yet (HTTP, HTTP2, GRPC, HTTPS or TLS)",
                            p.path, s.value
                        ),
                    );
                    None
                }
                _ => {
                    sink.error(
                        s.line,
                        format!(
                            "'{}': unknown protocol '{}' (expected HTTP, HTTP2, GRPC, HTTPS or TLS)",
                            p.path, s.value
                        ),
                    );
                    None
                }
            }),
        // Istio's protocol selection by port name (`grpc-api`, `http2`, ...).
        None => Some(protocol_from_port_name(name.as_deref().unwrap_or(""))),
    };
    // Istio's selection by port name (`https-api`, `tls`) too.
    tls |= f.get("protocol").is_none()
        && matches!(
            name.as_deref()
                .unwrap_or("")
                .split('-')
                .next()
                .unwrap_or("")
                .to_ascii_lowercase()
                .as_str(),
            "https" | "tls"
        );
    let target_port = f.get("targetPort").and_then(|t| t.port(sink));
    if sink.count() != before {
        return None;
    }
    Some(ServicePort {
        number: number?,
        name,
        protocol: protocol?,
        target_port,
        tls,
    })
}

/// Istio's explicit protocol selection: a port named `<protocol>[-<suffix>]`.
/// Anything else is HTTP/1 here (Istio would sniff or fall back to TCP, which
/// this mesh does not route).
fn protocol_from_port_name(name: &str) -> Protocol {
    let prefix = name.split('-').next().unwrap_or("").to_ascii_lowercase();
    match prefix.as_str() {
        "grpc" => Protocol::Grpc,
        "http2" => Protocol::Http2,
        _ => Protocol::Http1,
    }
}

const WORKLOAD_FIELDS: [&str; 6] = [
    "address",
    "labels",
    "ports",
    "locality",
    "weight",
    "serviceAccount",
];
const WORKLOAD_UNSUPPORTED: [&str; 1] = ["network"];

/// A Kubernetes service account name (a DNS subdomain), which becomes the
/// last segment of a SPIFFE ID.
fn service_account(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<String> {
    let sa = field.string(sink)?;
    let ok = !sa.value.is_empty()
        && sa.value.len() <= 253
        && sa
            .value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !ok {
        sink.error(
            sa.line,
            format!(
                "'{}': '{}' is not a service account name (lower-case letters, digits, '-' and '.')",
                field.path, sa.value
            ),
        );
        return None;
    }
    Some(sa.value)
}

/// `WorkloadGroup.spec`: `metadata` (labels and annotations) and the
/// `template`'s `serviceAccount`. Istio says the template's `address` and
/// `labels` should not be set (labels belong in `metadata.labels`); the
/// other template fields are not implemented yet.
fn parse_workload_group(sink: &mut Sink<'_>, spec: Field<'_, '_, '_>) -> Option<WorkloadGroup> {
    let before = sink.count();
    let mut f = Fields::read(sink, spec.node, "", &["metadata", "template"], &["probe"])?;
    f.line = spec.key_line;
    let mut labels = BTreeMap::new();
    if let Some(m) = f.get("metadata") {
        let mf = Fields::of(sink, m, &["labels", "annotations"], &[])?;
        if let Some(l) = mf.get("labels") {
            labels = l.string_map(sink).unwrap_or_default();
        }
        if let Some(a) = mf.get("annotations") {
            a.string_map(sink);
        }
    }
    let template = f.require(sink, "template")?;
    let t = Fields::of(
        sink,
        template,
        &["serviceAccount", "address", "labels"],
        &["ports", "network", "locality", "weight"],
    )?;
    for (key, why) in [
        ("address", "the address comes from each registration"),
        ("labels", "set them in 'metadata.labels'"),
    ] {
        if let Some(field) = t.get(key) {
            sink.error(
                field.key_line,
                format!(
                    "'{}' should not be set in a WorkloadGroup template ({why})",
                    field.path
                ),
            );
        }
    }
    let service_account = match t.get("serviceAccount") {
        Some(sa) => service_account(sink, sa),
        None => Some("default".to_string()),
    };
    if sink.count() != before {
        return None;
    }
    Some(WorkloadGroup {
        labels,
        service_account: service_account?,
    })
}

fn parse_workload(sink: &mut Sink<'_>, f: &Fields<'_, '_>) -> Option<Workload> {
    let before = sink.count();
    let address = f.require(sink, "address").and_then(|a| {
        let s = a.string(sink)?;
        match s.value.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                sink.error(
                    s.line,
                    format!(
                        "'{}': '{}' is not an IP address (DNS names and Unix sockets are not supported yet)",
                        a.path, s.value
                    ),
                );
                None
            }
        }
    });
    let mut ports = BTreeMap::new();
    if let Some(p) = f.get("ports") {
        for e in p.entries(sink).unwrap_or_default() {
            if let Some(n) = e.field().port(sink) {
                ports.insert(e.key.clone(), n);
            }
        }
    }
    let labels = f
        .get("labels")
        .and_then(|l| l.string_map(sink))
        .unwrap_or_default();
    let locality = match f.get("locality") {
        Some(l) => l.string(sink).and_then(|s| {
            let parsed = parse_locality(&s.value);
            if parsed.is_none() {
                sink.error(
                    s.line,
                    format!(
                        "'{}': '{}' is not a locality (region/zone/subzone)",
                        l.path, s.value
                    ),
                );
            }
            parsed
        }),
        None => Some(Locality::default()),
    };
    let weight = match f.get("weight") {
        Some(w) => w.integer(sink).and_then(|n| match u32::try_from(n) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                sink.error(
                    w.line(),
                    format!(
                        "'{}': endpoint weight {n} must be between 1 and {}",
                        w.path,
                        u32::MAX
                    ),
                );
                None
            }
        }),
        None => Some(1),
    };
    let service_account = f
        .get("serviceAccount")
        .and_then(|sa| service_account(sink, sa));
    if sink.count() != before {
        return None;
    }
    Some(Workload {
        address: address?,
        ports,
        labels,
        locality: locality?,
        weight: weight?,
        service_account,
    })
}

/// `region/zone/subzone`, each part optional from the right.
pub(crate) fn parse_locality(s: &str) -> Option<Locality> {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() > 3 {
        return None;
    }
    let part = |i: usize| Arc::from(parts.get(i).copied().unwrap_or(""));
    Some(Locality {
        region: part(0),
        zone: part(1),
        sub_zone: part(2),
    })
}
