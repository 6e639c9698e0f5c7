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
//! fields this mesh implements; a field it does not implement yet (`mirror`,
//! `rewrite`, `corsPolicy`, `portLevelSettings`, ...) is an error, as is an
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
//! verified against `caCertificates` for `subjectAltNames` or the SNI, which
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
//! # Errors keep the last good config
//!
//! Every problem is a [`Diagnostic`] pointing at the line of the offending
//! field. [`ConfigStore::load_dir`] replaces each resource that parses
//! cleanly, keeps the previous good version of one that does not (and every
//! resource of a file with a YAML syntax error), and forgets resources gone
//! from disk. Problems that involve several resources (a destination host or
//! subset that does not exist, a second VirtualService for a host) are found
//! by [`ConfigStore::snapshot`]: the offending VirtualService is left out
//! whole (its hosts get the default route) until it is fixed.
//!
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
//! - A ServiceEntry without `resolution` is `STATIC` (the only one
//!   implemented; Istio's default, `NONE`, is passthrough); a port without
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

mod auth;
mod policy;
mod resources;
mod security;
mod translate;
mod yaml;

pub use security::{SecurityPolicies, Workload};

pub(crate) use translate::resolve_host;
pub(crate) use yaml::{Look, parse_documents};

#[cfg(test)]
mod resilience_tests;
#[cfg(test)]
mod security_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use mesh_core::Snapshot;
use mesh_core::model::{Locality, Protocol};

use resources::{Resource, ResourceKey};

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
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            domain_suffix: "svc.cluster.local".to_string(),
            root_namespace: "istio-system".to_string(),
            trust_domain: "cluster.local".to_string(),
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

/// The current good resources of the config directories.
#[derive(Debug, Clone, Default)]
pub struct ConfigStore {
    options: MeshOptions,
    resources: BTreeMap<ResourceKey, Resource>,
    /// The position of each file read (directory order, then file name):
    /// the order VirtualServices are applied in.
    file_order: BTreeMap<PathBuf, usize>,
    /// A fingerprint of each held resource's document (its YAML content,
    /// not its lines or comments), to tell a reload what it changed.
    versions: ResourceVersions,
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

    /// Number of resources currently held.
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    /// Whether no resource is held.
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// Re-reads `dir`: [`ConfigStore::load_dirs`] with one directory.
    pub fn load_dir(&mut self, dir: &Path) -> Vec<Diagnostic> {
        self.load_dirs(&[dir])
    }

    /// Re-reads `dirs` as one config (each directory's YAML files, not its
    /// subdirectories; the same directory named twice is read once). Each
    /// resource that is invalid keeps its previous good version (if any)
    /// and yields diagnostics; valid ones replace theirs; resources gone
    /// from disk are removed; a resource defined twice is reported at the
    /// second definition. A file with a YAML syntax error (or that cannot be
    /// read) keeps all the resources it held. If a directory itself cannot
    /// be read, nothing changes.
    pub fn load_dirs(&mut self, dirs: &[impl AsRef<Path>]) -> Vec<Diagnostic> {
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
            return diagnostics;
        }
        let mut next: BTreeMap<ResourceKey, Resource> = BTreeMap::new();
        let mut versions: BTreeMap<ResourceKey, u64> = BTreeMap::new();
        let mut seen: BTreeMap<ResourceKey, (PathBuf, usize)> = BTreeMap::new();
        let mut keep: Vec<ResourceKey> = Vec::new();
        let mut broken_files: BTreeSet<PathBuf> = BTreeSet::new();
        let file_order: BTreeMap<PathBuf, usize> = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.clone(), i))
            .collect();
        for file in files {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    diagnostics.push(Diagnostic {
                        file: file.clone(),
                        line: 1,
                        message: format!("cannot read the file: {e}"),
                    });
                    broken_files.insert(file);
                    continue;
                }
            };
            let docs = match yaml::parse_documents(&text) {
                Ok(docs) => docs,
                Err((line, message)) => {
                    diagnostics.push(Diagnostic {
                        file: file.clone(),
                        line,
                        message,
                    });
                    broken_files.insert(file);
                    continue;
                }
            };
            for (i, doc) in docs.iter().enumerate() {
                let parsed = resources::parse_document(&file, i, doc);
                diagnostics.extend(parsed.diagnostics);
                let Some(key) = parsed.key else { continue };
                if let Some((first_file, first_line)) = seen.get(&key) {
                    diagnostics.push(Diagnostic {
                        file: file.clone(),
                        line: parsed.line,
                        message: format!(
                            "duplicate {} {}/{}: already defined at {}:{first_line}",
                            key.0,
                            key.1,
                            key.2,
                            first_file.display()
                        ),
                    });
                    continue;
                }
                seen.insert(key.clone(), (file.clone(), parsed.line));
                match parsed.resource {
                    Some(r) => {
                        versions.insert(key.clone(), yaml::fingerprint(doc));
                        next.insert(key, r);
                    }
                    None => keep.push(key),
                }
            }
        }
        let mut restore = |key: &ResourceKey, old: &Resource| {
            next.insert(key.clone(), old.clone());
            if let Some(v) = self.versions.0.get(key) {
                versions.insert(key.clone(), *v);
            }
        };
        for key in keep {
            if let Some(old) = self.resources.get(&key) {
                restore(&key, old);
            }
        }
        for (key, old) in &self.resources {
            if broken_files.contains(&old.meta.file) && !seen.contains_key(key) {
                restore(key, old);
            }
        }
        self.resources = next;
        self.versions = ResourceVersions(versions);
        self.file_order = file_order;
        diagnostics
    }

    /// The files read by the last load, in reading order (directory as
    /// given, then file name).
    pub(crate) fn files(&self) -> Vec<&Path> {
        let mut files: Vec<(&PathBuf, &usize)> = self.file_order.iter().collect();
        files.sort_by_key(|(_, position)| **position);
        files.into_iter().map(|(f, _)| f.as_path()).collect()
    }

    /// The fingerprints of the resources held now, to compare with after a
    /// reload ([`ResourceVersions::changes_to`]).
    pub(crate) fn versions(&self) -> &ResourceVersions {
        &self.versions
    }

    /// The resources in file order (directory as given, file name, then
    /// document), which is the order VirtualServices are applied in.
    fn ordered(&self) -> Vec<&Resource> {
        let mut all: Vec<&Resource> = self.resources.values().collect();
        let position = |r: &Resource| {
            let file = self.file_order.get(&r.meta.file).copied();
            (file.unwrap_or(usize::MAX), r.meta.file.clone(), r.meta.doc)
        };
        all.sort_by_cached_key(|r| (position(r), r.meta.key()));
        all
    }

    /// Translates the current good resources plus `registrations` into a full
    /// snapshot: for each port of each service, listeners for the names an app
    /// dials, a route config `<fqdn>:<port>`, clusters
    /// `outbound|<port>|<subset>|<fqdn>` and their endpoints. Problems between
    /// resources are reported here, and the offending VirtualService is left
    /// out (its hosts get the default route) until it is fixed.
    pub fn snapshot(&self, registrations: &[Registration]) -> (Snapshot, Vec<Diagnostic>) {
        let t = translate::translate(&self.options, &self.ordered(), registrations);
        (t.snapshot, t.diagnostics)
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

/// `dirs` without repeats: a directory named twice (even spelled
/// differently, `mesh` and `./mesh`) is read once, where it first appears.
fn distinct_dirs<P: AsRef<Path>>(dirs: &[P]) -> Vec<&Path> {
    let mut seen = BTreeSet::new();
    dirs.iter()
        .map(AsRef::as_ref)
        .filter(|dir| seen.insert(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())))
        .collect()
}

/// The `*.yaml` / `*.yml` files directly in `dir`, by file name.
pub(crate) fn list_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        if is_yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
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
    diagnostics.sort();
    diagnostics.dedup();
    diagnostics
}
