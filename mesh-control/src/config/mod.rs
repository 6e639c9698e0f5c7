//! The Istio YAML front end: directories of VirtualService, DestinationRule,
//! ServiceEntry, WorkloadEntry and WorkloadGroup resources, PeerAuthentication
//! and AuthorizationPolicy, plus self-registered endpoints, in; a
//! [`mesh_core::Snapshot`] out, and the server listeners
//! ([`SecurityPolicies::server_listener`]) and registration rights
//! ([`ConfigStore::authorize_registration`]) the security resources give.
//!
//! # What is read
//!
//! Every `*.yaml` / `*.yml` file directly in each config directory (not in
//! its subdirectories), each holding one or more `---`-separated documents.
//! Several directories ([`ConfigStore::load_dirs`], `serve --config A
//! --config B`) are read as one config: the directories in the order given,
//! each one's files in file-name order. Subdirectories are not read, so a
//! directory of drafts or backups next to the live files stays out of the
//! mesh, and a team's directory is added by naming it. The same directory
//! named twice is read once. Paths in diagnostics are as given (`A/x.yaml`).
//!
//! The kinds:
//!
//! - `apiVersion: networking.istio.io/v1` (or `v1beta1`, `v1alpha3`):
//!   VirtualService, DestinationRule, ServiceEntry, WorkloadEntry and
//!   WorkloadGroup (its `metadata.labels` and `template.serviceAccount`);
//! - `apiVersion: security.istio.io/v1` (or `v1beta1`): PeerAuthentication
//!   (`selector`, `mtls.mode`, `portLevelMtls`) and AuthorizationPolicy
//!   (`selector`, `action` ALLOW / DENY / AUDIT, `rules` with `from.source`,
//!   `to.operation` and `when`).
//!
//! Resources follow the Istio reference
//! (<https://istio.io/latest/docs/reference/config/networking/>,
//! <https://istio.io/latest/docs/reference/config/security/>) for the
//! fields this mesh implements; a field it does not implement yet (`delegate`,
//! `tunnel`, `proxyProtocol`, ...) is an error, as is an
//! unknown field: config is rejected, never silently ignored. In particular
//! the AuthorizationPolicy features a proxyless server cannot enforce — the
//! CUSTOM action, request authentication (`requestPrincipals`,
//! `request.auth.*`), `targetRef(s)`, `remoteIpBlocks` — are reported as not
//! supported at their line. The resilience fields (`timeout`, `retries`,
//! `fault`, `connectionPool`, `outlierDetection`, `consistentHash`,
//! `localityLbSetting.enabled`, `retryBudget`) and the Istio defaults they
//! keep are described in `policy.rs`; in short, a route without `retries`
//! gets Istio's default retry policy, the default route included.
//!
//! # Security
//!
//! How PeerAuthentication and AuthorizationPolicy select workloads and
//! combine (selector > namespace > root namespace > PERMISSIVE; DENY, then
//! ALLOW, AUDIT only marks), and which service accounts may back a service
//! (WorkloadGroup, WorkloadEntry `serviceAccount`, ServiceEntry
//! `subjectAltNames`, by default the one named like the service), is
//! described in `security.rs`. A cluster gets mutual TLS
//! ([`mesh_core::model::Cluster::tls`]) from DestinationRule
//! `trafficPolicy.tls.mode: ISTIO_MUTUAL` (a subset's `tls` replaces the
//! rule's; `DISABLE` turns it off; `SIMPLE` and `MUTUAL` originate TLS with
//! certificate files read by the client, [`mesh_core::model::FileTls`],
//! verified against `caCertificates`, else the system's roots, for
//! `subjectAltNames` or the SNI, which
//! is `sni` or the service host), or, when `tls` is not set, by Istio's auto mTLS: when the
//! destination namespace is STRICT (its namespace-wide PeerAuthentication,
//! else the mesh-wide one) or every endpoint of the cluster is STRICT by its
//! own workload's policy. The client verifies the server's SPIFFE ID against
//! the service's allowed identities (or the rule's `subjectAltNames`) and
//! sends Istio's SNI, `outbound_.<port>_.<subset>_.<host>`, unless `sni` is
//! set.
//!
//! # Names
//!
//! `metadata.namespace` defaults to `default`. A host without a dot is
//! resolved in the resource's namespace (`catalog` in `shop` is
//! `catalog.shop.svc.cluster.local`), a host with one dot is `<name>.<ns>`
//! (`catalog.shop` → `catalog.shop.svc.cluster.local`), anything else is
//! taken as written (the suffix is [`MeshOptions::domain_suffix`]).
//!
//! # Order and conflicts
//!
//! Istio orders VirtualServices by creation time, which files do not have:
//! here the order is directory (as given), then file name, then document
//! order within the file. A host
//! is routed by the first VirtualService that names it; a later one naming
//! the same host is an error ("host X already routed by VirtualService
//! ns/name at file:line") — Istio merges VirtualServices only for gateways.
//! Likewise the first DestinationRule and the first ServiceEntry for a host
//! win and later ones are reported. A resource (kind, namespace, name)
//! defined twice, in one directory or across two, is an error at the second
//! definition's line naming the first; the first is used. Within a VirtualService, the first
//! matching `http[]` route wins; the conditions of one `match[]` entry are
//! ANDed and several entries are ORed (each becomes its own route, named
//! after `http[].name` or `<vs-name>.<index>`).
//!
//! # Last good config, per resource
//!
//! Every problem is a [`Diagnostic`] pointing at the line of the offending
//! field. A running mesh must not change its routing because of a wrong
//! edit, so the store keeps the *last good version* of each resource (kind,
//! namespace, name) and applies a change read from disk only when it is
//! valid — on its own, and together with everything else in force:
//!
//! - an edit with a problem of its own (a typo, an unsupported field, a
//!   subset that no DestinationRule defines) is rejected: the resource keeps
//!   its last good version; a new resource with a problem is left out;
//! - an edit that would make *another* resource invalid (a DestinationRule
//!   dropping a subset a VirtualService routes to) is rejected too, and both
//!   lines are reported: the edit's, and the problem it would cause;
//! - a new file never displaces a resource in force: a second
//!   VirtualService for a host (in a file sorting first, say) is the one
//!   rejected, and so is a second definition of a resource in another file;
//! - removing a resource (its document or its whole file) is a change like
//!   any other: applied unless it would make another resource invalid;
//! - a file with a YAML syntax error (or that cannot be read, or holding a
//!   document whose kind or name cannot be read) keeps every resource it
//!   had, since what it holds cannot be told.
//!
//! Changes valid only together (a subset renamed in the DestinationRule and
//! the VirtualService at once) are applied together; the decision is pure
//! and deterministic (`last_good.rs`). Each rejection is shown at its line
//! by `mesh-control check`, in `/status` (`rejected`, with the version kept),
//! in the log and in the metrics. A rejected change is judged again at every
//! reload and registration change, so it applies once the rest allows it.
//! [`ConfigStore::load_dir`] judges offline (without registrations); the
//! server reads (`ConfigStore::read_dirs`) and then settles with the
//! registrations of the moment.

//! # Hosts that only registrations provide
//!
//! At run time a destination host is known when a ServiceEntry declares it or
//! an endpoint registered for it, so [`ConfigStore::snapshot`] accepts a route
//! to a host that only registrations provide. [`check_dir`] works offline,
//! without registrations, so there a host that no ServiceEntry declares is an
//! error: declare such hosts with a ServiceEntry without endpoints (the
//! registrations fill it).
//!
//! # Smaller rules
//!
//! - A ServiceEntry without `resolution` is `STATIC` (Istio's default,
//!   `NONE`, is passthrough to the address the application dialed, which an
//!   in-process client dialing by name does not have: here `NONE` needs
//!   `addresses`, which become the endpoints). `DNS` / `DNS_ROUND_ROBIN`
//!   make DNS clusters that each client resolves (mesh-control resolves
//!   them for gRPC clients: `crate::dns`); `addresses` are otherwise
//!   accepted and unused (virtual IPs serve traffic capture).
//!   `location: MESH_EXTERNAL` turns auto mTLS off for the host; a port of
//!   protocol `HTTPS` or `TLS` has the client originate TLS (SNI the host,
//!   system roots) unless a DestinationRule sets `tls`. A port without
//!   `protocol` takes it from its name as Istio does (`grpc-*`, `http2-*`),
//!   else HTTP/1.
//! - An empty header or query-parameter match (`x-user: {}`) means "present".
//! - An http route whose `match` entries all name another port does not apply
//!   to that port; a port a VirtualService yields no route for gets the
//!   default route (`/` → `outbound|<port>||<fqdn>`).
//! - A registration for a port its ServiceEntry does not declare is reported
//!   at the ServiceEntry's `ports` and not used. An implicit service's ports
//!   are sorted, so its default port is its lowest.
//! - An endpoint address seen twice in one cluster is kept once (the first).
//! - A DestinationRule for a host nothing declares is reported; it takes
//!   effect as soon as the host appears.
//!
//! # Per-node views
//!
//! Four things make the config differ from one workload to another:
//! `exportTo` on a VirtualService, DestinationRule or ServiceEntry (`.` its
//! own namespace, `*` every namespace, `~` none, or namespace names; the
//! default is every namespace), and `match[].sourceLabels` /
//! `match[].sourceNamespace` of a VirtualService route. A resource not
//! exported to a workload's namespace does not exist for it: a
//! ServiceEntry's hosts are unknown (asking for one is NOT_FOUND saying
//! why), a VirtualService does not route it (it gets the routing it would
//! have without it), a DestinationRule does not apply (default cluster
//! policy, no subsets). A `match[]` entry whose source conditions a caller
//! does not meet is not in its routes at all, as Istio generates routes per
//! proxy (Envoy has no source-label matcher). The fourth is a
//! DestinationRule's `localityLbSetting` `distribute`, `failover` or
//! `failoverPriority`: the caller's `node.locality` (and the labels
//! `failoverPriority` names) decide its EDS locality weights and priorities,
//! which Istio also computes per proxy (see `locality.rs`).
//!
//! The server applies all of this before encoding, per *view*: a
//! translation for the workloads that share a [`ViewKey`], which holds only
//! the node attributes the config in force depends on ([`ViewDependencies`]:
//! the namespace if some resource is namespace-sensitive, the values of
//! the label keys some `sourceLabels` or `failoverPriority` names, and the
//! locality when a locality setting needs it). Every kind of client (this
//! mesh's, gRPC proxyless, Envoy) therefore gets the same filtered config and
//! nothing is left for it to ignore. A config that uses none of these fields
//! has no dependencies: every workload gets the one shared translation.
//! Two VirtualServices (or DestinationRules, or ServiceEntries) for one host
//! conflict only when some namespace sees both.
//!
//! An Istio `Sidecar` narrows a view further: the Sidecar that applies to
//! the workload (its `workloadSelector`, else its namespace's, else the root
//! namespace's) keeps only the hosts its `egress[].hosts` admit; the others'
//! names are hidden, NOT_FOUND naming the Sidecar at its line. Its namespace
//! and selector labels join the view dependencies (see `sidecar.rs`).

mod auth;
mod cors;
mod cors_policy;
mod envoy_filter;
mod envoy_filter_outbound;
mod gateway;
mod gateway_spec;
pub(crate) use gateway::{GatewayConfig, TranslatedGateway};
pub(crate) use gateway_spec::ServerTls;
mod last_good;
mod locality;
mod names;
mod policy;
mod resources;
mod security;
mod sidecar;
mod sidecar_spec;
mod traffic;
mod translate;
mod yaml;

pub use security::{SecurityPolicies, Workload};

pub(crate) use names::resolve_host;
pub(crate) use sidecar::GRPC_KEEPS as SIDECAR_GRPC_KEEPS;
pub(crate) use yaml::{Look, parse_documents};

#[cfg(test)]
mod connection_tests;
#[cfg(test)]
mod documents_tests;
#[cfg(test)]
mod egress_tests;
#[cfg(test)]
mod last_good_tests;
#[cfg(test)]
mod resilience_tests;
#[cfg(test)]
mod security_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod views_tests;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_core::Snapshot;
use mesh_core::model::{Locality, Protocol};

use last_good::{Change, Refusal};
use resources::{ExportTo, HttpMatch, Meta, Resource, ResourceKey, Spec};

use crate::persist::{StoredConfig, StoredResource};

/// A problem with the config, at a line of a file.
///
/// Sorted by file, then line, then message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    /// The file (as found in the directory, i.e. `DIR/name.yaml`).
    pub file: PathBuf,
    /// The 1-based line of the offending field.
    pub line: usize,
    /// What is wrong, naming the resource and the field.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Mesh-wide naming settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshOptions {
    /// The suffix of cluster-local hosts: `catalog.shop.<suffix>`.
    /// Default `svc.cluster.local`.
    pub domain_suffix: String,
    /// The namespace of mesh-wide policy (Istio's root namespace). Default
    /// `istio-system`: PeerAuthentication and AuthorizationPolicy there
    /// without a selector apply to the whole mesh.
    pub root_namespace: String,
    /// The SPIFFE trust domain of workload identities
    /// (`spiffe://<trust_domain>/ns/<ns>/sa/<sa>`). Default `cluster.local`.
    pub trust_domain: String,
    /// Whether a registration may name a link-local address
    /// (169.254.0.0/16, fe80::/10; `serve --allow-link-local-endpoints`).
    /// Default false: link-local is where cloud metadata services answer
    /// (169.254.169.254), and an endpoint there would send the mesh's
    /// traffic, credentials included, to whatever answers on each client's
    /// own host. Unspecified, multicast and broadcast addresses are refused
    /// regardless.
    pub allow_link_local_endpoints: bool,
    /// How many leases one identity may hold at once (authenticated
    /// registration; `serve --max-leases-per-identity`). Default
    /// [`DEFAULT_MAX_LEASES_PER_IDENTITY`]. A registration beyond it gets
    /// 429: a leaked join token cannot fill the mesh's EDS.
    pub max_leases_per_identity: usize,
}

/// The default of [`MeshOptions::max_leases_per_identity`].
pub const DEFAULT_MAX_LEASES_PER_IDENTITY: usize = 256;

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            domain_suffix: "svc.cluster.local".to_string(),
            root_namespace: "istio-system".to_string(),
            trust_domain: "cluster.local".to_string(),
            allow_link_local_endpoints: false,
            max_leases_per_identity: DEFAULT_MAX_LEASES_PER_IDENTITY,
        }
    }
}

/// An endpoint that registered itself (the admin API's `POST /v1/endpoints`).
///
/// It joins the service `service`, resolved like a host in `namespace`. If a
/// ServiceEntry declares that host, the endpoint joins its port
/// `service_port`, or every port of it when absent; otherwise the service
/// exists implicitly with the port `service_port` (default 80) and the
/// protocol `protocol` (default HTTP/1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Service name (`catalog`, `catalog.shop`, or a full host).
    pub service: String,
    /// Namespace the name is resolved in.
    pub namespace: String,
    /// Address clients connect to.
    pub address: IpAddr,
    /// Port clients connect to.
    pub port: u16,
    /// The service port this endpoint serves.
    pub service_port: Option<u16>,
    /// Protocol of an implicit service.
    pub protocol: Option<Protocol>,
    /// Labels, matched by DestinationRule subsets.
    pub labels: BTreeMap<String, String>,
    /// Where the endpoint runs.
    pub locality: Locality,
}

/// A service as clients see it, for status pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// The fully qualified host.
    pub host: String,
    /// Its namespace.
    pub namespace: String,
    /// Its ports, the default (first) one first, with their protocols.
    pub ports: Vec<(u16, Protocol)>,
    /// Every name an app in the service's namespace may dial for it.
    pub dial_names: Vec<String>,
    /// Number of distinct endpoint addresses across its ports.
    pub endpoints: usize,
}

/// The config in force, per resource, and what the config directories held
/// at the last read (see "Last good config, per resource" above).
#[derive(Debug, Clone, Default)]
pub struct ConfigStore {
    options: MeshOptions,
    /// The last good version of each resource: what is served.
    good: BTreeMap<ResourceKey, Held>,
    /// What the files held at the last read.
    disk: Disk,
    /// The position of each file read (directory order, then file name):
    /// the order VirtualServices are applied in.
    file_order: BTreeMap<PathBuf, usize>,
    /// What the last [`ConfigStore::settle`] did not apply, and why.
    rejections: Vec<Rejection>,
    /// Bumped whenever `good` changes: what is persisted follows it.
    generation: u64,
}

/// A resource in force, or proposed by a file: the parsed resource, a
/// fingerprint of its document (its content, not its layout), and the text
/// of the file it was read from, which is what is persisted to parse it
/// again exactly as it was accepted.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    resource: Resource,
    fingerprint: u64,
    source: Arc<str>,
}

/// One text resources are read from: a file of a config directory, or a
/// document kept in a shared store.
struct Source {
    file: PathBuf,
    /// The index of its first document among its file's documents.
    first_doc: usize,
    /// Its text, or why it cannot be read.
    text: Result<Arc<str>, String>,
}

/// One resource as a shared store keeps it (`mesh-control apply` writes
/// them to etcd): its document's text, and where it was read from, so that
/// replicas report problems at the line of the file that was applied and
/// order VirtualServices as the files were ordered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SourceDocument {
    /// The file it was applied from, as given to `apply`.
    pub(crate) file: PathBuf,
    /// The position of that file in the reading order of the apply
    /// (directory as given, then file name).
    pub(crate) position: usize,
    /// The index of the document among its file's non-empty documents.
    pub(crate) doc: usize,
    /// The line its text starts on in the file.
    pub(crate) line: usize,
    /// The document's text (one YAML document).
    pub(crate) yaml: String,
}

/// The longest file, in lines, a stored document may say it came from: a
/// document is read at its line by putting that many newlines before it.
const MAX_LINE: usize = 1_000_000;

/// One document cut out of its file ([`split_documents`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    /// The line it starts on.
    line: usize,
    /// Its text, from that line to the next document.
    text: String,
    /// [`yaml::fingerprint`] of the document.
    fingerprint: u64,
}

/// A resource in force as a shared store keeps it
/// ([`ConfigStore::export_documents`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResourceDocument {
    pub(crate) kind: String,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) document: SourceDocument,
}

/// `yaml` preceded by the newlines that put its first line at `line`, so
/// its problems are reported at the lines of the file it came from.
fn at_line(line: usize, yaml: &str) -> Result<String, String> {
    if line == 0 || line > MAX_LINE {
        return Err(format!(
            "the stored document says it starts at line {line}, outside 1..={MAX_LINE}"
        ));
    }
    let mut text = "\n".repeat(line - 1);
    text.push_str(yaml);
    Ok(text)
}

/// Each non-empty document of `text` as a text of its own: its first line,
/// and the lines from there to the next document (the `---` separating
/// them included, and any comment before it). Each piece is checked to
/// read back, at its line, as the same document; a file whose documents
/// cannot be told apart by lines is an error at the document's line.
fn split_documents(text: &str) -> Result<Vec<Piece>, (usize, String)> {
    let docs = yaml::parse_documents(text)?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let starts: Vec<usize> = docs.iter().map(yaml::line_of).collect();
    let mut pieces = Vec::with_capacity(docs.len());
    for (i, doc) in docs.iter().enumerate() {
        let start = starts.get(i).copied().unwrap_or(1);
        let end = starts
            .get(i + 1)
            .map_or(lines.len(), |next| next.saturating_sub(1));
        let piece: String = lines
            .get(start - 1..end.max(start - 1))
            .unwrap_or_default()
            .concat();
        let fingerprint = yaml::fingerprint(doc);
        let same = at_line(start, &piece).is_ok_and(|text| {
            yaml::parse_documents(&text).is_ok_and(|back| {
                matches!(back.as_slice(), [one] if yaml::fingerprint(one) == fingerprint
                    && yaml::line_of(one) == start)
            })
        });
        if !same {
            return Err((
                start,
                "this document cannot be stored apart from the rest of its file (start each \
                 document on a line of its own after a `---` line)"
                    .to_string(),
            ));
        }
        pieces.push(Piece {
            line: start,
            text: piece,
            fingerprint,
        });
    }
    Ok(pieces)
}

/// What the config directories held at one read.
#[derive(Debug, Clone, Default)]
struct Disk {
    /// Whether they were read at all (before, nothing is proposed).
    read: bool,
    /// Each resource found, by identity: the one definition that counts.
    resources: BTreeMap<ResourceKey, OnDisk>,
    /// Files whose resources cannot all be told — unreadable, a YAML
    /// syntax error, a document whose kind or name cannot be read — with
    /// their first problem, and whether the whole file is unreadable. A
    /// resource in force that came from such a file and is not found
    /// elsewhere is kept: it may be the document that cannot be read.
    unsure: BTreeMap<PathBuf, (Diagnostic, bool)>,
    /// Documents rejected as such: second definitions of a resource, and
    /// documents without a readable identity.
    documents: Vec<(Option<ResourceKey>, Diagnostic)>,
}

/// One read of the config directories, not applied yet
/// ([`ConfigStore::read`]).
#[derive(Debug)]
pub(crate) struct Read {
    /// What the files held and the position of each file; `None` when a
    /// directory could not be read (what was read before stays).
    found: Option<(Disk, BTreeMap<PathBuf, usize>)>,
    /// The problems of the files themselves.
    diagnostics: Vec<Diagnostic>,
}

/// A read and what applying it would do ([`ConfigStore::trial`]).
#[derive(Debug)]
pub(crate) struct Trial {
    read: Read,
    /// `None` when a directory could not be read.
    settled: Option<Settled>,
    clean: bool,
}

impl Trial {
    /// Whether applying it brings no new problem and removes nothing.
    pub(crate) fn is_clean(&self) -> bool {
        self.clean
    }
}

/// What one settle decided ([`ConfigStore::judge`]).
#[derive(Debug)]
struct Settled {
    /// The resources in force after it; `None`: unchanged.
    good: Option<BTreeMap<ResourceKey, Held>>,
    rejections: Vec<Rejection>,
    /// Whether the resources in force change.
    changed: bool,
}

/// One resource as a file defines it.
#[derive(Debug, Clone)]
enum OnDisk {
    /// Valid on its own.
    Valid(Box<Held>),
    /// With problems of its own, at their lines.
    Invalid {
        file: PathBuf,
        line: usize,
        diagnostics: Vec<Diagnostic>,
    },
}

/// A change read from disk that is not applied, shown at the line of the
/// rejected version (`check`, `/status`, the log, a metric).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// `VirtualService shop/payment`; `None` for a document whose kind or
    /// name cannot be read, or a file none of whose resources is in force.
    pub(crate) resource: Option<String>,
    pub(crate) change: RejectedChange,
    /// Where the rejected version is (for a removal: where the removed
    /// version was).
    pub(crate) file: PathBuf,
    pub(crate) line: usize,
    /// Each at its line: the rejected version's own problems, and those it
    /// would cause in other resources.
    pub(crate) problems: Vec<Diagnostic>,
    /// The version still in force, if any (none: a new resource left out).
    pub(crate) kept: Option<Kept>,
}

/// What kind of change a [`Rejection`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum RejectedChange {
    /// A new resource.
    Added,
    /// A new version of a resource in force.
    Changed,
    /// The removal of a resource in force.
    Removed,
    /// A file that cannot be read or parsed: what it holds is unknown.
    Unreadable,
    /// A second definition of a resource.
    Duplicate,
    /// A document whose kind or name cannot be read.
    Unidentified,
}

impl RejectedChange {
    /// How `/status` names it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RejectedChange::Added => "added",
            RejectedChange::Changed => "changed",
            RejectedChange::Removed => "removed",
            RejectedChange::Unreadable => "unreadable",
            RejectedChange::Duplicate => "duplicate",
            RejectedChange::Unidentified => "unidentified",
        }
    }
}

/// The version of a resource in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kept {
    /// Where it was read from (its `metadata.name` line).
    pub(crate) file: PathBuf,
    pub(crate) line: usize,
    /// A fingerprint of its content.
    pub(crate) fingerprint: u64,
}

impl Kept {
    fn of(held: &Held) -> Kept {
        Kept {
            file: held.resource.meta.file.clone(),
            line: held.resource.meta.line,
            fingerprint: held.fingerprint,
        }
    }
}

impl fmt::Display for Rejection {
    /// One line for the log: `file:line: VirtualService shop/payment:
    /// change rejected, its last good version (file:line) stays in force:
    /// file:line: problem; ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(resource) = &self.resource {
            write!(f, "{resource}: ")?;
        }
        let what = match self.change {
            RejectedChange::Added => "new resource rejected",
            RejectedChange::Changed => "change rejected",
            RejectedChange::Removed => "removal rejected",
            RejectedChange::Unreadable => "file unreadable",
            RejectedChange::Duplicate => "second definition rejected",
            RejectedChange::Unidentified => "document rejected",
        };
        match &self.kept {
            Some(k) => write!(
                f,
                "{what}, its last good version ({}:{}) stays in force",
                k.file.display(),
                k.line
            )?,
            None if self.resource.is_some() => write!(f, "{what}, left out")?,
            None => f.write_str(what)?,
        }
        for (i, d) in self.problems.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

fn resource_name((kind, namespace, name): &ResourceKey) -> String {
    format!("{kind} {namespace}/{name}")
}

/// A fingerprint of each resource a [`ConfigStore`] holds, as of one load;
/// [`ResourceVersions::changes_to`] says what a later load changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResourceVersions(BTreeMap<ResourceKey, u64>);

/// What a reload changed, by resource (`VirtualService shop/catalog`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ConfigChanges {
    pub(crate) added: Vec<String>,
    pub(crate) changed: Vec<String>,
    pub(crate) removed: Vec<String>,
}

impl ResourceVersions {
    /// The resources added, changed (a different document) and removed
    /// between `self` and `after`, each in kind, namespace, name order.
    /// Linear in the number of resources; only fingerprints are compared.
    pub(crate) fn changes_to(&self, after: &ResourceVersions) -> ConfigChanges {
        let name = |(kind, ns, name): &ResourceKey| format!("{kind} {ns}/{name}");
        let mut changes = ConfigChanges::default();
        for (key, fp) in &after.0 {
            match self.0.get(key) {
                None => changes.added.push(name(key)),
                Some(old) if old != fp => changes.changed.push(name(key)),
                Some(_) => {}
            }
        }
        for key in self.0.keys() {
            if !after.0.contains_key(key) {
                changes.removed.push(name(key));
            }
        }
        changes
    }
}

impl ConfigChanges {
    /// Whether nothing was added, changed or removed.
    pub(crate) fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// At most this many resources are named in a log line; the rest are counted.
const CHANGES_NAMED: usize = 10;

impl fmt::Display for ConfigChanges {
    /// `changed VirtualService shop/catalog; added DestinationRule
    /// shop/payment`, naming at most ten resources in all (`... and 3 more`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut budget = CHANGES_NAMED;
        let mut first = true;
        for (verb, names) in [
            ("changed", &self.changed),
            ("added", &self.added),
            ("removed", &self.removed),
        ] {
            if names.is_empty() {
                continue;
            }
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            let shown = names.len().min(budget).max(1);
            budget = budget.saturating_sub(shown);
            write!(f, "{verb} {}", names[..shown].join(", "))?;
            if shown < names.len() {
                write!(f, " and {} more", names.len() - shown)?;
            }
        }
        if first {
            f.write_str("no resource changed")?;
        }
        Ok(())
    }
}

impl ConfigStore {
    /// An empty store.
    pub fn new(options: MeshOptions) -> Self {
        ConfigStore {
            options,
            ..ConfigStore::default()
        }
    }

    /// The naming settings.
    pub fn options(&self) -> &MeshOptions {
        &self.options
    }

    /// Number of resources in force.
    pub fn len(&self) -> usize {
        self.good.len()
    }

    /// Whether no resource is in force.
    pub fn is_empty(&self) -> bool {
        self.good.is_empty()
    }

    /// Re-reads `dir`: [`ConfigStore::load_dirs`] with one directory.
    pub fn load_dir(&mut self, dir: &Path) -> Vec<Diagnostic> {
        self.load_dirs(&[dir])
    }

    /// Re-reads `dirs` as one config (each directory's YAML files, not its
    /// subdirectories; the same directory named twice is read once) and
    /// applies what can be applied of it, judged without registrations
    /// (offline, as `check` does): each change that is valid replaces or
    /// removes the version in force, and each one that is not is rejected
    /// — the resource keeps its last good version, a new one is left out
    /// (see the module docs). Returns every problem, of the files and of
    /// the rejected changes, sorted by file and line. If a directory
    /// itself cannot be read, nothing changes.
    pub fn load_dirs(&mut self, dirs: &[impl AsRef<Path>]) -> Vec<Diagnostic> {
        let mut diagnostics = self.read_dirs(dirs);
        self.settle(&[]);
        diagnostics.extend(
            self.rejections
                .iter()
                .flat_map(|r| r.problems.iter().cloned()),
        );
        diagnostics.sort();
        diagnostics.dedup();
        diagnostics
    }

    /// Reads `dirs` (see [`ConfigStore::load_dirs`]) without applying
    /// anything: [`ConfigStore::settle`] does, with the registrations of
    /// the moment. Returns the problems of the files themselves. If a
    /// directory cannot be read, what was read before stays.
    pub(crate) fn read_dirs(&mut self, dirs: &[impl AsRef<Path>]) -> Vec<Diagnostic> {
        let read = self.read(dirs);
        self.install(read)
    }

    /// Reads `dirs` as [`ConfigStore::read_dirs`] does, without keeping
    /// what was read: [`ConfigStore::trial`] says what applying it would
    /// do, [`ConfigStore::commit`] applies it.
    pub(crate) fn read(&self, dirs: &[impl AsRef<Path>]) -> Read {
        let mut diagnostics = Vec::new();
        let mut files = Vec::new();
        for dir in distinct_dirs(dirs) {
            match list_files(dir) {
                Ok(found) => files.extend(found),
                Err(e) => diagnostics.push(Diagnostic {
                    file: dir.to_path_buf(),
                    line: 1,
                    message: format!("cannot read the config directory: {e}"),
                }),
            }
        }
        if !diagnostics.is_empty() {
            return Read {
                found: None,
                diagnostics,
            };
        }
        let file_order: BTreeMap<PathBuf, usize> = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.clone(), i))
            .collect();
        let sources = files
            .into_iter()
            .map(|file| {
                let text = std::fs::read_to_string(&file)
                    .map(Arc::from)
                    .map_err(|e| format!("cannot read the file: {e}"));
                Source {
                    file,
                    first_doc: 0,
                    text,
                }
            })
            .collect();
        self.read_sources(file_order, sources)
    }

    /// Keeps what `read` found as what the files hold (unless a directory
    /// could not be read: then what was read before stays); returns the
    /// problems of the files.
    fn install(&mut self, read: Read) -> Vec<Diagnostic> {
        if let Some((disk, file_order)) = read.found {
            self.disk = disk;
            self.file_order = file_order;
        }
        read.diagnostics
    }

    /// What applying `read` would do, judged with `registrations` as
    /// [`ConfigStore::settle`] would, without changing anything. The trial
    /// is *clean* when applying it brings no problem that is not standing
    /// already — every problem of the files is in `standing` (those of the
    /// read last applied), every rejection is one in force now — and
    /// removes no resource in force: then it can be applied before the
    /// writes settle without ever showing a transient state of a file
    /// being written (a truncated file looks like a removal; a half-written
    /// one like a syntax error).
    pub(crate) fn trial(
        &self,
        read: Read,
        registrations: &[Registration],
        standing: &[Diagnostic],
    ) -> Trial {
        let Some((disk, file_order)) = &read.found else {
            return Trial {
                read,
                settled: None,
                clean: false,
            };
        };
        let settled = self.judge(disk, file_order, registrations);
        let standing: BTreeSet<&Diagnostic> = standing.iter().collect();
        let clean = read.diagnostics.iter().all(|d| standing.contains(d))
            && settled
                .rejections
                .iter()
                .all(|r| self.rejections.contains(r))
            && settled
                .good
                .as_ref()
                .is_none_or(|good| self.good.keys().all(|k| good.contains_key(k)));
        Trial {
            read,
            settled: Some(settled),
            clean,
        }
    }

    /// Applies a [`ConfigStore::trial`] made under the same lock: what
    /// [`ConfigStore::read_dirs`] and then [`ConfigStore::settle`] would
    /// have done. Returns the problems of the files.
    pub(crate) fn commit(&mut self, trial: Trial) -> Vec<Diagnostic> {
        let diagnostics = self.install(trial.read);
        if let Some(settled) = trial.settled {
            self.keep(settled);
        }
        diagnostics
    }

    /// Reads documents kept elsewhere than in files (the resources replicas
    /// share in etcd, each written by `mesh-control apply` with the file
    /// and line it came from) as [`ConfigStore::read_dirs`] reads files:
    /// without applying anything, each document at the line it had in its
    /// file, files in the order of their `position`. Returns the problems
    /// of the documents themselves.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn read_documents(&mut self, documents: &[SourceDocument]) -> Vec<Diagnostic> {
        let mut documents: Vec<&SourceDocument> = documents.iter().collect();
        documents.sort_by(|a, b| (a.position, &a.file, a.doc).cmp(&(b.position, &b.file, b.doc)));
        let mut file_order = BTreeMap::new();
        for d in &documents {
            file_order.entry(d.file.clone()).or_insert(d.position);
        }
        let sources = documents
            .into_iter()
            .map(|d| Source {
                file: d.file.clone(),
                first_doc: d.doc,
                text: at_line(d.line, &d.yaml).map(Arc::from),
            })
            .collect();
        let read = self.read_sources(file_order, sources);
        self.install(read)
    }

    /// Reads `sources` as the files of the config, `file_order` giving the
    /// position of each file.
    fn read_sources(&self, file_order: BTreeMap<PathBuf, usize>, sources: Vec<Source>) -> Read {
        let mut diagnostics = Vec::new();
        let mut disk = Disk {
            read: true,
            ..Disk::default()
        };
        // Every definition of each resource, in reading order.
        let mut definitions: BTreeMap<ResourceKey, Vec<(PathBuf, usize, OnDisk)>> = BTreeMap::new();
        for Source {
            file,
            first_doc,
            text,
        } in sources
        {
            let source = match text {
                Ok(t) => t,
                Err(message) => {
                    let d = Diagnostic {
                        file: file.clone(),
                        line: 1,
                        message,
                    };
                    diagnostics.push(d.clone());
                    disk.unsure.insert(file, (d, true));
                    continue;
                }
            };
            let docs = match yaml::parse_documents(&source) {
                Ok(docs) => docs,
                Err((line, message)) => {
                    let d = Diagnostic {
                        file: file.clone(),
                        line,
                        message,
                    };
                    diagnostics.push(d.clone());
                    disk.unsure.insert(file, (d, true));
                    continue;
                }
            };
            for (i, doc) in docs.iter().enumerate() {
                let parsed = resources::parse_document(&file, first_doc.saturating_add(i), doc);
                diagnostics.extend(parsed.diagnostics.iter().cloned());
                let Some(key) = parsed.key else {
                    for d in &parsed.diagnostics {
                        disk.unsure
                            .entry(file.clone())
                            .or_insert_with(|| (d.clone(), false));
                        disk.documents.push((None, d.clone()));
                    }
                    continue;
                };
                let on_disk = match parsed.resource {
                    Some(resource) => OnDisk::Valid(Box::new(Held {
                        resource,
                        fingerprint: yaml::fingerprint(doc),
                        source: source.clone(),
                    })),
                    None => OnDisk::Invalid {
                        file: file.clone(),
                        line: parsed.line,
                        diagnostics: parsed.diagnostics,
                    },
                };
                definitions
                    .entry(key)
                    .or_default()
                    .push((file.clone(), parsed.line, on_disk));
            }
        }
        for (key, mut found) in definitions {
            // The definition in the file the version in force came from
            // counts (a new file never displaces a resource), else the
            // first one read.
            let counts = self
                .good
                .get(&key)
                .and_then(|g| found.iter().position(|(f, ..)| *f == g.resource.meta.file))
                .unwrap_or(0);
            let (first_file, first_line, on_disk) = found.remove(counts);
            for (file, line, _) in found {
                let d = Diagnostic {
                    file,
                    line,
                    message: format!(
                        "duplicate {} {}/{}: already defined at {}:{first_line}",
                        key.0,
                        key.1,
                        key.2,
                        first_file.display()
                    ),
                };
                diagnostics.push(d.clone());
                disk.documents.push((Some(key.clone()), d));
            }
            disk.resources.insert(key, on_disk);
        }
        Read {
            found: Some((disk, file_order)),
            diagnostics,
        }
    }

    /// Applies what can be applied of the last read to the resources in
    /// force, judging each change with `registrations` (a route to a host
    /// only registrations provide is valid while one is registered), and
    /// records what is rejected ([`ConfigStore::rejections`]). A change
    /// rejected now is tried again at the next call, so it applies once the
    /// rest allows it. Returns whether the resources in force changed.
    /// Cheap when the files propose nothing new.
    pub(crate) fn settle(&mut self, registrations: &[Registration]) -> bool {
        let settled = self.judge(&self.disk, &self.file_order, registrations);
        self.keep(settled)
    }

    /// What [`ConfigStore::settle`] would decide with `disk` read, without
    /// changing anything.
    fn judge(
        &self,
        disk: &Disk,
        file_order: &BTreeMap<PathBuf, usize>,
        registrations: &[Registration],
    ) -> Settled {
        if !disk.read {
            return Settled {
                good: None,
                rejections: Vec::new(),
                changed: false,
            };
        }
        let mut changes: BTreeMap<ResourceKey, Change<Held>> = BTreeMap::new();
        let mut rejections = Vec::new();
        let mut moved = Vec::new();
        for (key, on_disk) in &disk.resources {
            let kept = self.good.get(key);
            match on_disk {
                OnDisk::Valid(held) => match kept {
                    // The same content, maybe elsewhere (another file, other
                    // lines): nothing to judge, only where it is changes.
                    Some(g) if g.fingerprint == held.fingerprint => {
                        if g.resource.meta != held.resource.meta {
                            moved.push((key.clone(), Held::clone(held)));
                        }
                    }
                    _ => {
                        changes.insert(key.clone(), Change::Put(Held::clone(held)));
                    }
                },
                OnDisk::Invalid {
                    file,
                    line,
                    diagnostics,
                } => rejections.push(Rejection {
                    resource: Some(resource_name(key)),
                    change: if kept.is_some() {
                        RejectedChange::Changed
                    } else {
                        RejectedChange::Added
                    },
                    file: file.clone(),
                    line: *line,
                    problems: diagnostics.clone(),
                    kept: kept.map(Kept::of),
                }),
            }
        }
        let mut explained = BTreeSet::new();
        for (key, held) in &self.good {
            if disk.resources.contains_key(key) {
                continue;
            }
            match disk.unsure.get(&held.resource.meta.file) {
                Some((problem, _)) => {
                    explained.insert(held.resource.meta.file.clone());
                    rejections.push(Rejection {
                        resource: Some(resource_name(key)),
                        change: RejectedChange::Unreadable,
                        file: problem.file.clone(),
                        line: problem.line,
                        problems: vec![problem.clone()],
                        kept: Some(Kept::of(held)),
                    });
                }
                None => {
                    changes.insert(key.clone(), Change::Remove);
                }
            }
        }
        for (file, (problem, whole_file)) in &disk.unsure {
            if *whole_file && !explained.contains(file) {
                rejections.push(Rejection {
                    resource: None,
                    change: RejectedChange::Unreadable,
                    file: problem.file.clone(),
                    line: problem.line,
                    problems: vec![problem.clone()],
                    kept: None,
                });
            }
        }
        for (key, problem) in &disk.documents {
            rejections.push(Rejection {
                resource: key.as_ref().map(resource_name),
                change: if key.is_some() {
                    RejectedChange::Duplicate
                } else {
                    RejectedChange::Unidentified
                },
                file: problem.file.clone(),
                line: problem.line,
                problems: vec![problem.clone()],
                kept: key.as_ref().and_then(|k| self.good.get(k)).map(Kept::of),
            });
        }
        // Resources whose content stayed but moved (file, lines) are
        // updated in place, which is a change of what is persisted.
        let changed = !moved.is_empty();
        let base: Cow<'_, BTreeMap<ResourceKey, Held>> = if changed {
            let mut good = self.good.clone();
            good.extend(moved);
            Cow::Owned(good)
        } else {
            Cow::Borrowed(&self.good)
        };

        let options = &self.options;
        let outcome = last_good::settle(&base, &changes, |set, changed| {
            // Unchanged resources first: where the first of two wins (a
            // host routed by two VirtualServices), the one in force wins
            // and the newcomer is the one rejected.
            let mut resources: Vec<&Resource> = set.values().map(|h| &h.resource).collect();
            resources.sort_by_cached_key(|r| {
                let key = r.meta.key();
                (changed.contains(&key), position(file_order, r), key)
            });
            translate::translate(options, &resources, registrations).invalid
        });
        for (key, refusal) in &outcome.refused {
            let Some(change) = changes.get(key) else {
                continue;
            };
            rejections.push(explain(key, change, base.get(key), refusal));
        }
        let changed = changed || !outcome.accepted.is_empty();
        rejections.sort_by(|a, b| {
            (&a.file, a.line, &a.resource, a.change).cmp(&(&b.file, b.line, &b.resource, b.change))
        });
        rejections.dedup();
        Settled {
            good: Some(outcome.good),
            rejections,
            changed,
        }
    }

    /// Puts what [`ConfigStore::judge`] decided in force; returns whether
    /// the resources in force changed.
    fn keep(&mut self, settled: Settled) -> bool {
        if let Some(good) = settled.good {
            self.good = good;
        }
        self.rejections = settled.rejections;
        if settled.changed {
            self.generation += 1;
        }
        settled.changed
    }

    /// What the last [`ConfigStore::settle`] did not apply, by file and
    /// line.
    pub(crate) fn rejections(&self) -> &[Rejection] {
        &self.rejections
    }

    /// Changes whenever the resources in force change.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The resources in force, to persist: each as its document in the
    /// text of the file it was read from.
    pub(crate) fn export(&self) -> StoredConfig {
        let mut texts: Vec<String> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut resources = Vec::new();
        for held in self.good.values() {
            let text = *index.entry(&held.source).or_insert_with(|| {
                texts.push(held.source.to_string());
                texts.len() - 1
            });
            resources.push(StoredResource {
                file: held.resource.meta.file.clone(),
                doc: held.resource.meta.doc,
                text,
            });
        }
        StoredConfig {
            format: crate::persist::format(),
            texts,
            resources,
        }
    }

    /// The resources in force as a shared store keeps them (see
    /// [`SourceDocument`]), each with its kind, namespace and name: what
    /// `mesh-control apply` writes. A document that cannot be cut out of
    /// its file is a problem at its line.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn export_documents(&self) -> Result<Vec<ResourceDocument>, Vec<Diagnostic>> {
        let mut split: HashMap<*const u8, Vec<Piece>> = HashMap::new();
        let mut documents = Vec::new();
        let mut problems = Vec::new();
        for ((kind, namespace, name), held) in &self.good {
            let meta = &held.resource.meta;
            let pieces = match split.get(&held.source.as_ptr()) {
                Some(pieces) => pieces,
                None => match split_documents(&held.source) {
                    Ok(pieces) => split.entry(held.source.as_ptr()).or_insert(pieces),
                    Err((line, message)) => {
                        problems.push(meta.diagnostic(line, message));
                        continue;
                    }
                },
            };
            // The document of this resource: the one with its content.
            let Some(piece) = pieces.iter().find(|p| p.fingerprint == held.fingerprint) else {
                problems.push(meta.diagnostic(
                    meta.line,
                    "its document cannot be found again in the text it was read from",
                ));
                continue;
            };
            let position = self
                .file_order
                .get(&meta.file)
                .copied()
                .unwrap_or(usize::MAX);
            documents.push(ResourceDocument {
                kind: kind.to_string(),
                namespace: namespace.clone(),
                name: name.clone(),
                document: SourceDocument {
                    file: meta.file.clone(),
                    position,
                    doc: meta.doc,
                    line: piece.line,
                    yaml: piece.text.clone(),
                },
            });
        }
        if problems.is_empty() {
            Ok(documents)
        } else {
            problems.sort();
            Err(problems)
        }
    }

    /// Puts the persisted resources in force, as before a restart (before
    /// the config directories are read). A persisted resource that no
    /// longer parses (a field this version does not implement) is left
    /// out; each such problem is returned.
    pub(crate) fn restore(&mut self, stored: &StoredConfig) -> Vec<String> {
        let mut problems = Vec::new();
        let texts: Vec<Arc<str>> = stored.texts.iter().map(|t| Arc::from(t.as_str())).collect();
        let parsed: Vec<_> = texts.iter().map(|t| yaml::parse_documents(t)).collect();
        for r in &stored.resources {
            let (Some(source), Some(docs)) = (texts.get(r.text), parsed.get(r.text)) else {
                problems.push(format!(
                    "{}: the stored text {} is missing",
                    r.file.display(),
                    r.text
                ));
                continue;
            };
            let doc = match docs {
                Ok(docs) => docs.get(r.doc),
                Err((line, message)) => {
                    problems.push(format!("{}:{line}: {message}", r.file.display()));
                    continue;
                }
            };
            let Some(doc) = doc else {
                problems.push(format!(
                    "{}: the stored text has no document {}",
                    r.file.display(),
                    r.doc
                ));
                continue;
            };
            let parsed = resources::parse_document(&r.file, r.doc, doc);
            match (parsed.key, parsed.resource) {
                (Some(key), Some(resource)) => {
                    self.good.insert(
                        key,
                        Held {
                            resource,
                            fingerprint: yaml::fingerprint(doc),
                            source: source.clone(),
                        },
                    );
                }
                _ => problems.extend(parsed.diagnostics.iter().map(|d| d.to_string())),
            }
        }
        self.generation += 1;
        problems
    }

    /// The files read by the last load, in reading order (directory as
    /// given, then file name).
    pub(crate) fn files(&self) -> Vec<&Path> {
        let mut files: Vec<(&PathBuf, &usize)> = self.file_order.iter().collect();
        files.sort_by_key(|(_, position)| **position);
        files.into_iter().map(|(f, _)| f.as_path()).collect()
    }

    /// The fingerprints of the resources in force, to compare with after a
    /// reload ([`ResourceVersions::changes_to`]).
    pub(crate) fn versions(&self) -> ResourceVersions {
        ResourceVersions(
            self.good
                .iter()
                .map(|(k, h)| (k.clone(), h.fingerprint))
                .collect(),
        )
    }

    /// The resources in force in file order (directory as given, file
    /// name, then document), which is the order VirtualServices are
    /// applied in.
    fn ordered(&self) -> Vec<&Resource> {
        let mut all: Vec<&Resource> = self.good.values().map(|h| &h.resource).collect();
        all.sort_by_cached_key(|r| (position(&self.file_order, r), r.meta.key()));
        all
    }

    /// Translates the resources in force plus `registrations` into a full
    /// snapshot: for each port of each service, listeners for the names an app
    /// dials, a route config `<fqdn>:<port>`, clusters
    /// `outbound|<port>|<subset>|<fqdn>` and their endpoints. A resource in
    /// force can still have a problem here when it depends on registrations
    /// that are gone (a route to a host only registrations provide): such a
    /// VirtualService is left out (its hosts get the default route) until
    /// the host is back; the problems are returned.
    pub fn snapshot(&self, registrations: &[Registration]) -> (Snapshot, Vec<Diagnostic>) {
        let t = translate::translate(&self.options, &self.ordered(), registrations);
        (t.snapshot, t.diagnostics)
    }

    /// The Gateways in force and the VirtualServices bound to them,
    /// translated for gateway nodes (see `gateway`).
    pub(crate) fn gateways(&self, registrations: &[Registration]) -> GatewayConfig {
        translate::translate_gateways(&self.options, &self.ordered(), registrations)
    }

    /// The PeerAuthentication and AuthorizationPolicy resources, ready to
    /// be resolved for one workload's server listener (gRFC A36).
    pub fn security(&self) -> SecurityPolicies {
        security::resolve(&self.options, &self.ordered())
    }

    /// Whether a workload running as `identity` may register `registration`:
    /// its namespace must be the registration's, and its service account
    /// one the service allows (WorkloadGroup `template.serviceAccount`,
    /// WorkloadEntry `serviceAccount`, ServiceEntry `subjectAltNames`; by
    /// default the service account named like the service). The error
    /// says why not, naming the identity and the service.
    pub fn authorize_registration(
        &self,
        registration: &Registration,
        identity: &mesh_core::spiffe::SpiffeId,
    ) -> Result<(), String> {
        security::authorize_registration(&self.options, &self.ordered(), registration, identity)
    }

    /// What gRPC servers and channels would not honor of the security
    /// config (PERMISSIVE, explicit or by default; AUDIT policies; mTLS
    /// without xDS credentials), one sentence per finding, as served
    /// (`mesh-control check --for grpc` reports the same at the YAML's lines,
    /// see [`crate::grpc_report`]). `snapshot` is this store's
    /// [`ConfigStore::snapshot`] (its clusters with TLS count as mTLS use).
    pub fn grpc_security_gaps(&self, snapshot: &Snapshot) -> Vec<String> {
        crate::compat::grpc_security_ignored(&self.security(), snapshot)
    }

    /// The services the resources and `registrations` define, by host.
    pub fn services(&self, registrations: &[Registration]) -> Vec<ServiceInfo> {
        translate::services(&self.options, &self.ordered(), registrations)
    }
}

/// Where a resource is in reading order: its file's position (a file no
/// longer read last), then its document.
fn position(file_order: &BTreeMap<PathBuf, usize>, r: &Resource) -> (usize, PathBuf, usize) {
    let file = file_order.get(&r.meta.file).copied();
    (file.unwrap_or(usize::MAX), r.meta.file.clone(), r.meta.doc)
}

/// The rejection of a change `last_good` refused: at the rejected
/// version's line (a removal: the removed version's), its own problems,
/// then, for each resource it would make invalid, a line saying so and
/// that resource's problems at their lines.
fn explain(
    key: &ResourceKey,
    change: &Change<Held>,
    kept: Option<&Held>,
    refusal: &Refusal<ResourceKey, Diagnostic>,
) -> Rejection {
    let what = resource_name(key);
    let (meta, kind) = match (change, kept) {
        (Change::Put(new), Some(_)) => (&new.resource.meta, RejectedChange::Changed),
        (Change::Put(new), None) => (&new.resource.meta, RejectedChange::Added),
        (Change::Remove, Some(old)) => (&old.resource.meta, RejectedChange::Removed),
        // Unreachable: only a resource in force can be removed.
        (Change::Remove, None) => {
            return Rejection {
                resource: Some(what),
                change: RejectedChange::Removed,
                file: PathBuf::new(),
                line: 1,
                problems: refusal.own.clone(),
                kept: None,
            };
        }
    };
    let mut problems = refusal.own.clone();
    let (verb, outcome) = match kind {
        RejectedChange::Added => ("adding it", "it is left out"),
        RejectedChange::Removed => ("removing it", "it stays in force"),
        _ => ("this change", "its last good version stays in force"),
    };
    for (other, diagnostics) in &refusal.breaks {
        let other = resource_name(other);
        problems.push(meta.diagnostic(
            meta.line,
            format!("{verb} would make {other} invalid, so {outcome}"),
        ));
        for d in diagnostics {
            problems.push(Diagnostic {
                file: d.file.clone(),
                line: d.line,
                message: format!("{} (with the rejected change to {what})", d.message),
            });
        }
    }
    Rejection {
        resource: Some(what),
        change: kind,
        file: meta.file.clone(),
        line: meta.line,
        problems,
        kept: kept.map(Kept::of),
    }
}

/// `dirs` without repeats: a directory named twice (even spelled
/// differently, `mesh` and `./mesh`) is read once, where it first appears.
fn distinct_dirs<P: AsRef<Path>>(dirs: &[P]) -> Vec<&Path> {
    let mut seen = BTreeSet::new();
    dirs.iter()
        .map(AsRef::as_ref)
        .filter(|dir| seen.insert(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())))
        .collect()
}

/// What `mesh-control check` notes without calling it a problem: parts of
/// the files that are read and deliberately ignored, at their lines. Today
/// that is a top-level `status`, which `kubectl get -o yaml` exports: the
/// API server writes it, it configures nothing.
pub fn check_notes(dirs: &[impl AsRef<Path>]) -> Vec<Diagnostic> {
    let mut notes = Vec::new();
    for dir in dirs {
        let Ok(files) = list_files(dir.as_ref()) else {
            continue;
        };
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let Ok(docs) = yaml::parse_documents(&text) else {
                continue;
            };
            for doc in &docs {
                let doc = Look::document(doc);
                let mut note = |line: usize, message: String| {
                    notes.push(Diagnostic {
                        file: file.clone(),
                        line,
                        message,
                    })
                };
                if let Some(status) = doc.get("status") {
                    note(
                        status.line,
                        "top-level 'status' ignored: the Kubernetes API server writes it \
                         (kubectl get -o yaml), it configures nothing"
                            .to_string(),
                    );
                }
                if doc.get("kind").and_then(|k| k.text()).as_deref() == Some("Sidecar") {
                    for (line, text) in sidecar::notes(doc) {
                        note(line, text);
                    }
                }
                if doc.get("kind").and_then(|k| k.text()).as_deref() == Some("VirtualService") {
                    for (line, text) in cors::notes(doc) {
                        note(line, text);
                    }
                }
                if doc.get("kind").and_then(|k| k.text()).as_deref() == Some("DestinationRule") {
                    let subsets = doc
                        .get("spec.subsets")
                        .map(|s| s.items())
                        .unwrap_or_default();
                    let policies = doc
                        .get("spec.trafficPolicy")
                        .into_iter()
                        .chain(subsets.iter().filter_map(|s| s.get("trafficPolicy")));
                    let top = doc.get("spec.trafficPolicy");
                    for policy in policies {
                        for (what, text) in consistent_hash_notes(policy) {
                            note(what, text);
                        }
                        for (what, text) in locality::notes(policy, top) {
                            note(what, text);
                        }
                        for (what, text) in policy::client_tls_notes(policy) {
                            note(what, text);
                        }
                    }
                }
            }
        }
    }
    notes
}

/// What this mesh's client accepts of a `trafficPolicy`'s consistent hash
/// but does not do as Envoy does (until it does): `httpCookie.ttl` (Envoy
/// makes the cookie when the request has none) and `useSourceIp` (the
/// caller's address is known only to requests that carry their connection).
fn consistent_hash_notes(policy: Look<'_, '_>) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let Some(hash) = policy.get("loadBalancer.consistentHash") else {
        return out;
    };
    if let Some(ttl) = hash.get("httpCookie.ttl") {
        out.push((
            ttl.line,
            "consistentHash.httpCookie.ttl: the client does not generate the cookie as \
             Envoy does when ttl is set; a request without the cookie gets a random endpoint"
                .to_string(),
        ));
    }
    if let Some(ip) = hash.get("useSourceIp")
        && ip.boolean() == Some(true)
    {
        out.push((
            ip.line,
            "consistentHash.useSourceIp: the client hashes a source address only for a \
             request that carries a ConnectionInfo extension (the app copies the incoming \
             request's into its outgoing one); other requests get a random endpoint"
                .to_string(),
        ));
    }
    out
}

/// Whether `path` is named as a config file is: `*.yaml` or `*.yml`.
pub(crate) fn is_config_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

/// The `*.yaml` / `*.yml` files directly in `dir`, by file name.
pub(crate) fn list_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if is_config_file(&path) && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// The node attributes a config's per-node views depend on (see "Per-node
/// views" above). Empty: one shared translation for every workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ViewDependencies {
    /// Some resource's `exportTo` is not every namespace, or some route has
    /// a `sourceNamespace`.
    pub(crate) namespace: bool,
    /// The labels some `sourceLabels` names: each key with the values
    /// named for it. Matching is by equality, so a value no selector names
    /// is as good as no label: the key keeps only named values.
    pub(crate) labels: BTreeMap<String, BTreeSet<String>>,
    /// Some DestinationRule has `localityLbSetting` `distribute`,
    /// `failover` or `failoverPriority` (computed per caller locality, as
    /// Istio does; see `locality.rs`).
    pub(crate) locality: bool,
    /// The labels some `failoverPriority` compares: any value counts.
    pub(crate) priority_labels: BTreeSet<String>,
}

impl ViewDependencies {
    /// What `resources` depend on.
    pub(crate) fn of<'r>(resources: impl IntoIterator<Item = &'r Resource>) -> Self {
        let mut deps = ViewDependencies::default();
        let restricted = |e: &ExportTo| !matches!(e, ExportTo::All);
        for r in resources {
            match &r.spec {
                Spec::VirtualService(vs) => {
                    deps.namespace |= restricted(&vs.export_to);
                    for m in vs.http.iter().flat_map(|h| &h.matches) {
                        deps.namespace |= m.source_namespace.is_some();
                        for (k, v) in &m.source_labels {
                            deps.labels.entry(k.clone()).or_default().insert(v.clone());
                        }
                    }
                }
                Spec::DestinationRule(dr) => {
                    deps.namespace |= restricted(&dr.export_to);
                    // The rule's, its subsets' and their portLevelSettings.
                    let policies = std::iter::once(&dr.policy)
                        .chain(dr.subsets.iter().map(|s| &s.policy))
                        .flat_map(|p| {
                            std::iter::once(p).chain(p.port_level.iter().map(|l| &l.policy))
                        });
                    for setting in policies.filter_map(policy::TrafficPolicy::locality_setting) {
                        deps.locality = true;
                        deps.priority_labels
                            .extend(setting.caller_label_keys().map(str::to_owned));
                    }
                }
                Spec::ServiceEntry(se) => deps.namespace |= restricted(&se.export_to),
                // Client-side (SIDECAR_OUTBOUND) local rate limits.
                Spec::EnvoyFilter(f) => envoy_filter::view_dependencies(&mut deps, f),
                // Which Sidecar applies depends on the namespace (and `./`
                // means it) and on the labels its selector names.
                Spec::Sidecar(s) => {
                    deps.namespace = true;
                    for (k, v) in s.selector.iter().flatten() {
                        deps.labels.entry(k.clone()).or_default().insert(v.clone());
                    }
                }
                _ => {}
            }
        }
        deps
    }

    /// Whether every workload gets the same config.
    pub(crate) fn is_empty(&self) -> bool {
        !self.namespace
            && self.labels.is_empty()
            && !self.locality
            && self.priority_labels.is_empty()
    }

    /// The view of a workload of `namespace` with `labels`; `None`: the
    /// shared translation (nothing depends on the workload).
    #[cfg(test)]
    pub(crate) fn key(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<ViewKey> {
        self.key_at(namespace, labels, &mesh_core::model::Locality::default())
    }

    /// [`ViewDependencies::key`] of a workload at `locality` (its
    /// `node.locality`).
    pub(crate) fn key_at(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        locality: &mesh_core::model::Locality,
    ) -> Option<ViewKey> {
        if self.is_empty() {
            return None;
        }
        let mut key_labels: BTreeMap<String, String> = self
            .labels
            .iter()
            .filter_map(|(k, named)| {
                let v = labels.get(k)?;
                named.contains(v).then(|| (k.clone(), v.clone()))
            })
            .collect();
        for k in &self.priority_labels {
            if let Some(v) = labels.get(k) {
                key_labels.insert(k.clone(), v.clone());
            }
        }
        Some(ViewKey {
            namespace: self.namespace.then(|| namespace.to_owned()),
            labels: key_labels,
            locality: self.locality.then(|| locality.clone()),
            gateway: false,
        })
    }
}

/// What one per-node view is for: the node attributes the config depends
/// on, and only those ([`ViewDependencies::key`]), so that workloads that
/// differ in nothing else share one view. General on purpose: whatever
/// else selects workloads (a Sidecar's namespace and `workloadSelector`)
/// adds its namespace and label keys to the dependencies.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ViewKey {
    /// The workload's namespace, when the config depends on it.
    pub(crate) namespace: Option<String>,
    /// The workload's labels that some selector of the config names, key
    /// and value (a label with a value no selector names is absent: it
    /// selects nothing). With `failoverPriority`, also the values of the
    /// labels it compares, whatever they are.
    pub(crate) labels: BTreeMap<String, String>,
    /// The workload's `node.locality`, when some locality setting depends
    /// on it.
    pub(crate) locality: Option<mesh_core::model::Locality>,
    /// The node is an ingress gateway (a `Gateway` selects it): no
    /// `Sidecar` applies to it, as in Istio, where Sidecars scope sidecars
    /// only (a root-namespace Sidecar would otherwise hide every service
    /// from the gateway in `istio-system`).
    pub(crate) gateway: bool,
}

impl fmt::Display for ViewKey {
    /// `namespace=shop labels={version=canary}` (`labels={}` when the
    /// workload has none of the labels the config names).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ns) = &self.namespace {
            write!(f, "namespace={ns} ")?;
        }
        f.write_str("labels={")?;
        for (i, (k, v)) in self.labels.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        f.write_str("}")?;
        if let Some(l) = &self.locality {
            write!(f, " locality={}/{}/{}", l.region, l.zone, l.sub_zone)?;
        }
        Ok(())
    }
}

/// Who a translation is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Audience<'k> {
    /// Every workload: every resource and route, whatever its `exportTo`
    /// and source conditions (the shared translation, and what changes are
    /// judged by).
    Everyone,
    /// The workloads of one view.
    View(&'k ViewKey),
}

impl<'k> Audience<'k> {
    /// The namespace of this audience that a resource (`meta`) exported to
    /// `export_to` is hidden from, if it is.
    pub(crate) fn hidden_from(self, meta: &Meta, export_to: &ExportTo) -> Option<&'k str> {
        match self {
            Audience::Everyone => None,
            Audience::View(key) => {
                let ns = key.namespace.as_deref()?;
                (!export_to.exports_to(&meta.namespace, ns)).then_some(ns)
            }
        }
    }

    /// Whether the callers of this audience meet the source conditions of
    /// `m` (`sourceNamespace`, `sourceLabels`).
    pub(crate) fn admits(self, m: &HttpMatch) -> bool {
        match self {
            Audience::Everyone => true,
            Audience::View(key) => {
                m.source_namespace
                    .as_ref()
                    .is_none_or(|ns| key.namespace.as_ref() == Some(ns))
                    && m.source_labels
                        .iter()
                        .all(|(k, v)| key.labels.get(k) == Some(v))
            }
        }
    }
}

/// What the views of one published config are translated from: a copy of
/// the resources in force and the registrations, so that a view is
/// translated when a workload first needs it, from the config it was
/// published with.
#[derive(Debug, Default)]
pub(crate) struct ViewSource {
    options: MeshOptions,
    /// In file order.
    resources: Vec<Resource>,
    registrations: Vec<Registration>,
    /// What the views depend on (never empty: no views otherwise).
    pub(crate) dependencies: ViewDependencies,
    /// The fingerprints of `resources`: two sources with the same
    /// fingerprints, registrations and options translate alike.
    versions: ResourceVersions,
    /// The names of each service host in the translation for everyone,
    /// built on first use when some Sidecar scopes a view: what a view
    /// names as hidden without translating the hosts its Sidecar hides.
    sidecar_names: std::sync::OnceLock<sidecar::HostNames>,
}

impl PartialEq for ViewSource {
    fn eq(&self, other: &Self) -> bool {
        self.versions == other.versions
            && self.registrations == other.registrations
            && self.options == other.options
            && self.dependencies == other.dependencies
    }
}

/// A view's translation.
#[derive(Debug, Default)]
pub(crate) struct ViewTranslation {
    pub(crate) snapshot: Snapshot,
    /// Its problems (a VirtualService exported to the view routing to a
    /// subset of a DestinationRule that is not is left out of it).
    pub(crate) diagnostics: Vec<Diagnostic>,
    /// Names that exist for other namespaces only, with why.
    pub(crate) hidden: BTreeMap<String, String>,
}

impl ViewSource {
    /// Translates the view `key`.
    #[cfg(test)]
    pub(crate) fn translate(&self, key: &ViewKey) -> ViewTranslation {
        self.translate_over(key, None)
    }

    /// Translates the view `key`; `shared` is the translation for every
    /// workload of the same config when the caller has it (the names a
    /// Sidecar hides are read off it rather than translated again).
    pub(crate) fn translate_over(
        &self,
        key: &ViewKey,
        shared: Option<&Snapshot>,
    ) -> ViewTranslation {
        let all: Vec<&Resource> = self.resources.iter().collect();
        // The Sidecar of these workloads, if any: it drops the
        // VirtualServices it does not import before translating, and the
        // services it hides after (see `sidecar.rs`).
        let (scope, mut problems) = sidecar::Scope::of_view(&self.options, &all, key);
        let Some(scope) = scope else {
            let t = translate::translate_for(
                &self.options,
                &all,
                &self.registrations,
                Audience::View(key),
            );
            return ViewTranslation {
                snapshot: t.snapshot,
                diagnostics: t.diagnostics,
                hidden: t.hidden,
            };
        };
        let namespaces = sidecar::HostNamespaces::new(&self.options, &all, &self.registrations);
        let imported: Vec<&Resource> = all
            .iter()
            .copied()
            .filter(|r| scope.imports(&self.options, r))
            .collect();
        let (resources, registrations) =
            scope.prune(&self.options, &imported, &self.registrations, &namespaces);
        let t = translate::translate_for(
            &self.options,
            &resources,
            &registrations,
            Audience::View(key),
        );
        let mut view = ViewTranslation {
            snapshot: t.snapshot,
            diagnostics: t.diagnostics,
            hidden: t.hidden,
        };
        scope.narrow(&namespaces, &mut view.snapshot, &mut view.hidden);
        let names = self.sidecar_names.get_or_init(|| match shared {
            Some(shared) => sidecar::HostNames::of(shared),
            None => {
                let everyone = translate::translate(&self.options, &all, &self.registrations);
                sidecar::HostNames::of(&everyone.snapshot)
            }
        });
        scope.hide_untranslated(names, &namespaces, &view.snapshot, &mut view.hidden);
        problems.extend(scope.hidden_destinations(&self.options, &imported, &namespaces));
        view.diagnostics.extend(problems);
        view.diagnostics.sort();
        view.diagnostics.dedup();
        view
    }
}

impl ConfigStore {
    /// What the views of the config in force (with `registrations`) are
    /// translated from; `None` when it has no per-node views (every
    /// workload gets [`ConfigStore::snapshot`]).
    pub(crate) fn view_source(&self, registrations: &[Registration]) -> Option<ViewSource> {
        let ordered = self.ordered();
        let dependencies = ViewDependencies::of(ordered.iter().copied());
        if dependencies.is_empty() {
            return None;
        }
        Some(ViewSource {
            options: self.options.clone(),
            resources: ordered.into_iter().cloned().collect(),
            registrations: registrations.to_vec(),
            dependencies,
            versions: self.versions(),
            sidecar_names: std::sync::OnceLock::new(),
        })
    }
}

/// Offline validation for `mesh-control check DIR`: [`check_dirs`] with one
/// directory.
pub fn check_dir(dir: &Path, options: &MeshOptions) -> Vec<Diagnostic> {
    check_dirs(&[dir], options)
}

/// Offline validation for `mesh-control check DIR...`: every problem of the
/// files of `dirs` (read as one config, as [`ConfigStore::load_dirs`] does)
/// and between them, sorted by file then line. Without registrations, a
/// host that no ServiceEntry declares is an error.
pub fn check_dirs(dirs: &[impl AsRef<Path>], options: &MeshOptions) -> Vec<Diagnostic> {
    let mut store = ConfigStore::new(options.clone());
    let mut diagnostics = store.load_dirs(dirs);
    diagnostics.extend(store.snapshot(&[]).1);
    // Routes whose destination a Sidecar hides from workloads sent them.
    diagnostics.extend(sidecar::hidden_destinations(options, &store.ordered()));
    diagnostics.sort();
    diagnostics.dedup();
    diagnostics
}
