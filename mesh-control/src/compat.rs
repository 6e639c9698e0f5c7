//! What each kind of xDS client does not honor of the config it is served.
//!
//! gRPC's proxyless clients implement a subset of Envoy's xDS (gRFC A27 and
//! the feature gRFCs). Serving them Istio config is still right — they follow
//! routing, splits, fault injection, gRPC retries — but some fields change
//! nothing for them. Pretending otherwise hides outages ("we set
//! consecutive5xxErrors, why was the bad pod not ejected?"), so
//! mesh-control says it: per connected client in `/status`, and offline in
//! `mesh-control check --for grpc`.
//!
//! Security config has gaps of the same kind on gRPC *servers* (gRFC A36,
//! A41): PERMISSIVE cannot be served (a gRPC server's filter chains match
//! `raw_buffer` only, so it gets the plaintext chain and accepts no TLS),
//! AUDIT policies become RBAC `LOG`, which gRPC does not act on, dry-run
//! policies (`istio.io/dry-run: "true"`) become RBAC `shadow_rules`, which
//! gRPC does not read (so a gRPC server neither enforces them, which is
//! right, nor reports what they would have done, which the author of a dry
//! run is waiting for), and xDS security is honored only by servers and
//! channels built with xDS credentials. [`grpc_security_ignored`] says so for a config, and
//! [`grpc_ignored`] for the server listeners a client was served.
//! DestinationRule `tls` SIMPLE / MUTUAL (certificate files) is worse than
//! ignored: gRPC clients would NACK a whole CDS update with a cluster naming
//! files (A29 reads only certificate provider instances), so the ADS server
//! leaves such clusters out of gRPC clients' responses (with a NOT_FOUND
//! resource error naming why), and [`grpc_ignored`] reports them per cluster.
//!
//! Offline, `check --for grpc` ([`grpc_report`]) separates two things a
//! served config mixes: what gRPC ignores of what the YAML *says* (each at
//! the line of the field, read from the YAML itself), and the mesh's own
//! defaults — Istio's default retry conditions on a route without
//! `retryOn`, LEAST_REQUEST for a cluster without `loadBalancer.simple`,
//! PERMISSIVE, auto mTLS — which gRPC clients handle differently but which
//! are nobody's mistake, so they get one summary line each.
//!
//! The client kind comes from `node.user_agent_name`: grpc-core based clients
//! (grpcio, C++, Ruby, PHP) send `gRPC C-core …`, grpc-go `gRPC Go`, grpc-java
//! `gRPC Java`; this mesh's own client sends `proxyless-rust`.

use std::collections::BTreeSet;
use std::path::Path;

use mesh_core::Snapshot;
use mesh_core::model::{
    CircuitBreakers, ConnectionSettings, HashPolicy, LbPolicy, MtlsMode, RetryOn, RetryPolicy,
    TlsOrigination,
};
use mesh_core::rbac::Action;

use crate::config::{
    ConfigStore, Diagnostic, Look, SecurityPolicies, parse_documents, resolve_host,
};

/// Who is on the other end of an ADS stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientKind {
    /// This mesh's Rust client: honors everything it accepts.
    Proxyless,
    /// A gRPC proxyless client (any language).
    Grpc,
    /// Envoy.
    Envoy,
    /// Anything else.
    Unknown,
}

impl ClientKind {
    pub(crate) fn from_user_agent(name: &str) -> Self {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("proxyless") {
            ClientKind::Proxyless
        } else if lower.starts_with("grpc") {
            ClientKind::Grpc
        } else if lower == "envoy" {
            ClientKind::Envoy
        } else {
            ClientKind::Unknown
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ClientKind::Proxyless => "proxyless",
            ClientKind::Grpc => "grpc",
            ClientKind::Envoy => "envoy",
            ClientKind::Unknown => "unknown",
        }
    }
}

/// The retry conditions gRPC clients read (gRFC A44).
const GRPC_RETRY_ON: RetryOn = RetryOn::CANCELLED
    .union(RetryOn::DEADLINE_EXCEEDED)
    .union(RetryOn::INTERNAL)
    .union(RetryOn::RESOURCE_EXHAUSTED)
    .union(RetryOn::UNAVAILABLE);

/// What a gRPC client ignores of the route configs and clusters named
/// (all of them when `None`), one sentence per finding, stable order.
pub(crate) fn grpc_ignored(
    snapshot: &Snapshot,
    route_configs: Option<&BTreeSet<String>>,
    clusters: Option<&BTreeSet<String>>,
) -> Vec<String> {
    let mut out = BTreeSet::new();
    for (name, rc) in &snapshot.route_configs {
        if route_configs.is_some_and(|names| !names.contains(&**name)) {
            continue;
        }
        for route in rc.virtual_hosts.iter().flat_map(|vh| vh.routes.iter()) {
            let at = format!("route {:?} of {name:?}", route.name);
            if let Some(retry) = &route.policy.retry {
                let ignored: Vec<&str> = retry
                    .retry_on
                    .names()
                    .filter(|n| {
                        RetryOn::from_name(n).is_some_and(|flag| !GRPC_RETRY_ON.contains(flag))
                    })
                    .collect();
                if !ignored.is_empty() {
                    out.insert(format!(
                        "{at}: retryOn {} ignored; gRPC retries only on gRPC status codes (gRFC A44)",
                        ignored.join(",")
                    ));
                }
                if retry.per_try_timeout.is_some() {
                    out.insert(format!("{at}: perTryTimeout ignored (gRFC A44)"));
                }
                if retry.num_retries > 4 {
                    out.insert(format!(
                        "{at}: {} retries clamped to 4 (gRFC A44: at most 5 attempts)",
                        retry.num_retries
                    ));
                }
            }
            if let Some(traffic) = &route.policy.traffic {
                if traffic.answer.is_some() {
                    out.insert(format!(
                        "{at}: a redirect / direct response: gRPC clients fail every RPC this \
                         route matches with UNAVAILABLE (gRFC A28 follows only routes to clusters)"
                    ));
                }
                if !traffic.headers.is_empty() || traffic.destinations.iter().any(|d| !d.is_empty())
                {
                    out.insert(format!(
                        "{at}: header changes ignored (gRFC A28 has no header changes)"
                    ));
                }
                if !traffic.rewrite.is_empty() {
                    out.insert(format!(
                        "{at}: rewrite ignored (gRFC A28 has no rewrites): gRPC clients send the \
                         original path and authority"
                    ));
                }
                if !traffic.mirrors.is_empty() {
                    out.insert(format!(
                        "{at}: mirroring ignored (gRFC A28 has no request mirroring)"
                    ));
                }
            }
            for h in route.matcher.headers.iter() {
                if let Some(key) = h
                    .name
                    .strip_prefix(':')
                    .filter(|n| *n == "authority" || *n == "scheme")
                {
                    out.insert(format!("{at}: a {}", SCHEME_AUTHORITY.replace("{}", key)));
                }
            }
            if route.matcher.ignore_case {
                out.insert(format!("{at}: ignoreUriCase {IGNORE_CASE}"));
            }
            if route.policy.rate_limit.is_some() {
                out.insert(format!("{at}: {RATE_LIMIT}"));
            }
            for policy in route.policy.hash_policy.iter() {
                let kind = match policy {
                    HashPolicy::Header(_) => continue,
                    HashPolicy::Cookie { .. } => "httpCookie",
                    HashPolicy::SourceIp => "useSourceIp",
                    HashPolicy::QueryParameter(_) => "httpQueryParameterName",
                };
                out.insert(format!(
                    "{at}: consistentHash {kind} falls back to a random hash (gRFC A42 reads header hashing only)"
                ));
            }
        }
    }
    for (name, cluster) in &snapshot.clusters {
        if clusters.is_some_and(|names| !names.contains(&**name)) {
            continue;
        }
        let at = format!("cluster {name:?}");
        if let Some(od) = &cluster.outlier_detection
            && (od.consecutive_5xx.is_some() || od.consecutive_gateway_errors.is_some())
        {
            out.insert(format!(
                "{at}: outlierDetection consecutive5xxErrors/consecutiveGatewayErrors ignored (gRFC A50 implements success-rate and failure-percentage ejection only)"
            ));
        }
        let cb = &cluster.circuit_breakers;
        let defaults = CircuitBreakers::default();
        if cb.max_connections != defaults.max_connections
            || cb.max_pending_requests != defaults.max_pending_requests
            || cb.max_retries != defaults.max_retries
            || cb.retry_budget.is_some()
        {
            out.insert(format!(
                "{at}: connectionPool limits other than http2MaxRequests (and retryBudget) ignored (gRFC A32 reads max_requests only)"
            ));
        }
        if let Some(ignored) = connection_ignored(&cluster.connection) {
            out.insert(format!("{at}: {ignored}"));
        }
        out.extend(locality_findings(&at, cluster));
        if let Some(TlsOrigination::Files(files)) = cluster.tls.as_ref().map(|t| &t.origination) {
            out.insert(format!(
                "{at}: DestinationRule tls mode {} ({}) cannot be used by gRPC \
                 clients: gRFC A29 supports only certificate provider instances, so mesh-control \
                 leaves the cluster out of their CDS (a whole CDS update would be NACKed) and \
                 routes to it fail (use ISTIO_MUTUAL with the bootstrap's certificate_providers for \
                 gRPC clients)",
                files.mode(),
                grpc_file_tls_what(files)
            ));
        }
        if cluster.lb_policy == LbPolicy::LeastRequest {
            out.insert(format!(
                "{at}: LEAST_REQUEST is served inside wrr_locality with round_robin as fallback; gRPC clients without least_request support (gRFC A48) use round robin"
            ));
        }
    }
    for (name, listener) in &snapshot.server_listeners {
        let at = format!("server listener {name:?}");
        if listener.mtls == MtlsMode::Permissive {
            out.insert(format!("{at}: {PERMISSIVE}"));
        }
        for p in listener
            .policies
            .iter()
            .filter(|p| p.action() == Action::Audit)
        {
            out.insert(format!("{at}: AUDIT policy {} {AUDIT}", p.id()));
        }
        for p in listener.policies.iter().filter(|p| p.is_dry_run()) {
            out.insert(format!(
                "{at}: the shadow_rules of dry-run AuthorizationPolicy {} {DRY_RUN}",
                p.id()
            ));
        }
        if listener.rate_limit.is_some() {
            out.insert(format!("{at}: {RATE_LIMIT}"));
        }
        if listener.cors.iter().any(|r| r.policy.is_some()) {
            out.insert(format!("{at}: {CORS}"));
        }
    }
    out.into_iter().collect()
}

/// VirtualService `corsPolicy` on a gRPC server, and for gRPC clients.
const CORS: &str = "the CORS policy (VirtualService corsPolicy) is ignored by gRPC servers: gRPC has no cors filter, so it is served with is_optional: true and each route's CorsPolicy wrapped in FilterConfig { is_optional: true } (gRFC A39), which gRPC skips instead of NACKing the listener; preflights reach the gRPC server's handlers unanswered. Only this mesh's servers (ServerLayer, serve_with) answer them";

/// What gRPC clients ignore of a cluster's connection settings: all of
/// them (grpc-core reads none of `connect_timeout`, the upstream
/// `common_http_protocol_options`, `upstream_connection_options` or the
/// cluster's `http2_protocol_options`; it always speaks HTTP/2, so an
/// h2UpgradePolicy changes nothing for it). `None` when none is set.
fn connection_ignored(c: &ConnectionSettings) -> Option<String> {
    if *c == ConnectionSettings::default() {
        return None;
    }
    let fields = [
        (c.connect_timeout.is_some(), "connectTimeout"),
        (c.idle_timeout.is_some(), "idleTimeout"),
        (
            c.max_requests_per_connection.is_some(),
            "maxRequestsPerConnection",
        ),
        (c.tcp_keepalive.is_some(), "tcpKeepalive"),
        (c.max_connection_duration.is_some(), "maxConnectionDuration"),
        (c.max_concurrent_streams.is_some(), "maxConcurrentStreams"),
    ];
    let set: Vec<&str> = fields
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
    let mut out = Vec::new();
    if !set.is_empty() {
        out.push(format!(
            "{} ignored (gRPC clients read none of a cluster's connection settings)",
            set.join(" / ")
        ));
    }
    if c.h2_upgrade {
        out.push(
            "h2UpgradePolicy UPGRADE changes nothing for gRPC clients (they always speak HTTP/2)"
                .to_string(),
        );
    }
    Some(out.join("; "))
}

const PERMISSIVE: &str = "PERMISSIVE cannot be served to gRPC servers: they match filter chains on raw_buffer only, so they serve the plaintext chain and accept no mTLS (gRFC A36); use STRICT or DISABLE for gRPC servers";
const AUDIT: &str = "is ignored by gRPC servers (it is served as RBAC action LOG, which gRPC does not act on, gRFC A41)";
/// Istio's annotation for dry-run AuthorizationPolicies (the YAML front end
/// reads it in `config/auth.rs`).
const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
const DRY_RUN: &str = "are ignored by gRPC servers (gRFC A41 reads an RBAC filter's rules only): they enforce nothing, as intended, but report nothing either (no dry-run span attributes, metrics or logs); only this mesh's servers report what a dry-run policy would have done";
const RATE_LIMIT: &str = "the local rate limit (EnvoyFilter envoy.filters.http.local_ratelimit) is ignored by gRPC: gRPC has no local_ratelimit filter, so the filter is served with is_optional: true and its per-route config wrapped in FilterConfig { is_optional: true } (gRFC A39), which gRPC skips instead of NACKing the listener; only this mesh's servers (ServerLayer, SIDECAR_INBOUND) and clients (MeshLayer, SIDECAR_OUTBOUND) enforce it";
/// `match.authority` / `match.scheme` (`{}`: which), served as header
/// matchers on the pseudo-headers, as Istio writes them. gRFC A28 matches
/// headers against the call's metadata; the implementations read (C-core's
/// `RpcMatchContext`, grpc-go's composite matcher) skip `-bin` headers,
/// answer `content-type` with `application/grpc`, and have no
/// pseudo-headers in that metadata.
const SCHEME_AUTHORITY: &str = "served as a header matcher on :{} (as Istio does); gRPC clients match headers against the call's metadata, which holds no :authority or :scheme pseudo-header (gRFC A28), so for them the condition does not hold as in Envoy and the route is skipped";
/// `match.ignoreUriCase`, served as `case_sensitive: false`.
const IGNORE_CASE: &str = "served as case_sensitive: false; current gRPC clients honor it (case-insensitive prefix and path matchers), but gRPC releases that implement the original gRFC A28 text NACK case_sensitive: false, which rejects the whole RouteConfiguration";
const CREDENTIALS: &str = "gRPC enforces it only on servers built with xDS server credentials (with insecure credentials they serve plaintext and skip the mTLS requirement)";

/// What gRPC servers ignore of the PeerAuthentication and
/// AuthorizationPolicy resources (`mesh-control check --for grpc`), one
/// sentence per finding, stable order. The default mode (PERMISSIVE when no
/// mesh-wide PeerAuthentication says otherwise) is reported when the config
/// uses mTLS at all: a security resource, or a cluster with TLS in
/// `snapshot`.
pub(crate) fn grpc_security_ignored(
    policies: &SecurityPolicies,
    snapshot: &Snapshot,
) -> Vec<String> {
    let mut out = BTreeSet::new();
    let uses_mtls = !policies.peers().is_empty()
        || !policies.authorization_policies().is_empty()
        || snapshot.clusters.values().any(|c| c.tls.is_some());
    if uses_mtls && let Some(default) = default_permissive(policies) {
        out.insert(default);
    }
    for p in policies.peers() {
        let at = format!("PeerAuthentication {}/{}", p.namespace, p.name);
        if p.mode == Some(MtlsMode::Permissive) {
            out.insert(format!("{at}: {PERMISSIVE}"));
        }
        for (port, mode) in &p.ports {
            if *mode == Some(MtlsMode::Permissive) {
                out.insert(format!("{at}: portLevelMtls {port}: {PERMISSIVE}"));
            }
        }
        if p.mode == Some(MtlsMode::Strict)
            || p.ports.values().any(|m| *m == Some(MtlsMode::Strict))
        {
            out.insert(format!("{at}: STRICT: {CREDENTIALS}"));
        }
    }
    for f in policies.rate_limit_filters() {
        out.insert(format!(
            "EnvoyFilter {}/{}: {RATE_LIMIT}",
            f.namespace, f.name
        ));
    }
    for a in policies.authorization_policies() {
        if a.policy.action() == Action::Audit {
            out.insert(format!(
                "AuthorizationPolicy {}: AUDIT {AUDIT}",
                a.policy.id()
            ));
        }
        if a.policy.is_dry_run() {
            out.insert(format!(
                "AuthorizationPolicy {}: dry-run: its shadow_rules {DRY_RUN}",
                a.policy.id()
            ));
        }
    }
    if snapshot.clusters.values().any(|c| {
        c.tls
            .as_ref()
            .is_some_and(|t| t.origination == TlsOrigination::IstioMutual)
    }) {
        out.insert(format!(
            "clusters with mTLS (DestinationRule tls ISTIO_MUTUAL or auto mTLS): {}",
            CREDENTIALS.replace("servers built with xDS server", "channels built with xDS")
        ));
    }
    out.into_iter().collect()
}

/// The PERMISSIVE default, when no mesh-wide PeerAuthentication replaces it.
fn default_permissive(policies: &SecurityPolicies) -> Option<String> {
    let root = policies.root_namespace();
    let mesh_wide = policies
        .peers()
        .iter()
        .find(|p| p.namespace == root && p.selector.is_none())
        .and_then(|p| p.mode);
    mesh_wide.is_none_or(|m| m == MtlsMode::Permissive).then(|| {
        format!(
            "workloads no STRICT or DISABLE PeerAuthentication covers are PERMISSIVE (Istio's default; no mesh-wide STRICT or DISABLE PeerAuthentication in namespace '{root}'): {PERMISSIVE}"
        )
    })
}

/// What `mesh-control check --for grpc` reports about a config
/// ([`crate::grpc_report`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrpcReport {
    /// What gRPC clients (or xDS-enabled gRPC servers) ignore or handle
    /// differently of what the YAML says, one per field, at the line of the
    /// field, sorted by file and line.
    pub written: Vec<Diagnostic>,
    /// The mesh's own defaults — what applies where the YAML says nothing —
    /// that gRPC clients handle differently: one sentence each, starting
    /// with what it is about (`retries: ...`). Not problems of the YAML.
    pub defaults: Vec<String>,
}

/// How a SIMPLE / MUTUAL cluster's certificates are named in gRPC findings:
/// files, or (SIMPLE without `caCertificates`) the system's roots, which
/// gRPC reads only with gRFC A82, behind an environment variable.
fn grpc_file_tls_what(files: &mesh_core::model::FileTls) -> &'static str {
    if files.ca_certificates.is_none() && files.client_certificate.is_none() {
        SYSTEM_ROOTS_FOR_GRPC
    } else {
        "certificate files"
    }
}

/// SIMPLE with the system's roots, for gRPC findings.
const SYSTEM_ROOTS_FOR_GRPC: &str = "the system's roots: gRFC A82 system_root_certs, which gRPC \
     reads only with GRPC_EXPERIMENTAL_XDS_SYSTEM_ROOT_CERTS set, and not with A29 alone";

/// The [`GrpcReport`] of the config `store` holds (read from its files),
/// `snapshot` being its translation (the defaults are counted there).
pub(crate) fn grpc_report(store: &ConfigStore, snapshot: &Snapshot) -> GrpcReport {
    let mut walk = Walk::default();
    for file in store.files() {
        // A file that cannot be read or parsed is reported by `check` itself.
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let Ok(docs) = parse_documents(&text) else {
            continue;
        };
        for doc in &docs {
            walk.document(file, Look::document(doc), &store.options().domain_suffix);
        }
    }
    let mut defaults = Vec::new();

    let istio = RetryPolicy::istio_default();
    let default_routes = snapshot
        .route_configs
        .values()
        .flat_map(|rc| rc.virtual_hosts.iter())
        .flat_map(|vh| vh.routes.iter())
        .filter(|r| &*r.name == "default" && r.policy.retry.as_ref() == Some(&istio))
        .count();
    let routes = walk.default_retry_on + default_routes;
    if routes > 0 {
        let conditions: Vec<String> = istio
            .retry_on
            .names()
            .filter(|n| *n != "retriable-status-codes")
            .map(str::to_string)
            .chain(istio.retriable_status_codes.iter().map(u16::to_string))
            .collect();
        let honored: Vec<&str> = istio
            .retry_on
            .names()
            .filter(|n| RetryOn::from_name(n).is_some_and(|f| GRPC_RETRY_ON.contains(f)))
            .collect();
        defaults.push(format!(
            "retries: {routes} route(s) with no retries.retryOn (a service's default route \
             included) retry on Istio's default conditions {}; gRPC clients act only on {} \
             of them (gRFC A44)",
            conditions.join(","),
            honored.join(" and ")
        ));
    }

    let written = |set: &BTreeSet<(String, String)>, fqdn: &str, subset: &str| {
        set.contains(&(fqdn.to_string(), subset.to_string()))
            || set.contains(&(fqdn.to_string(), String::new()))
    };
    let mut least_request = 0;
    let mut auto_mtls = 0;
    for (name, cluster) in &snapshot.clusters {
        // `outbound|<port>|<subset>|<fqdn>`
        let mut parts = name.split('|').skip(2);
        let (Some(subset), Some(fqdn)) = (parts.next(), parts.next()) else {
            continue;
        };
        if cluster.lb_policy == LbPolicy::LeastRequest && !written(&walk.lb, fqdn, subset) {
            least_request += 1;
        }
        let istio_mutual = cluster
            .tls
            .as_ref()
            .is_some_and(|t| t.origination == TlsOrigination::IstioMutual);
        if istio_mutual && !written(&walk.tls, fqdn, subset) {
            auto_mtls += 1;
        }
    }
    if least_request > 0 {
        defaults.push(format!(
            "load balancing: {least_request} cluster(s) with no loadBalancer.simple use \
             LEAST_REQUEST (Istio's default), served inside wrr_locality with round_robin as \
             fallback; gRPC clients without least_request support (gRFC A48) use round robin"
        ));
    }
    if auto_mtls > 0 {
        defaults.push(format!(
            "mTLS: {auto_mtls} cluster(s) with no tls in their DestinationRule get ISTIO_MUTUAL \
             from Istio's auto mTLS (their destinations are STRICT): {}",
            CREDENTIALS.replace("servers built with xDS server", "channels built with xDS")
        ));
    }
    let uses_mtls = walk.uses_mtls || snapshot.clusters.values().any(|c| c.tls.is_some());
    if uses_mtls && let Some(default) = default_permissive(&store.security()) {
        defaults.push(format!("mTLS mode: {default}"));
    }

    walk.written.sort();
    walk.written.dedup();
    GrpcReport {
        written: walk.written,
        defaults,
    }
}

/// The walk of the YAML behind [`grpc_report`]: findings at their lines,
/// and what the defaults are measured against.
#[derive(Default)]
struct Walk {
    written: Vec<Diagnostic>,
    /// `http[]` routes with retries that say no `retryOn` (or no `retries`).
    default_retry_on: usize,
    /// `(fqdn, subset)` whose DestinationRule sets a load balancer
    /// (`simple` or `consistentHash`); subset `""` is the rule's own policy.
    lb: BTreeSet<(String, String)>,
    /// `(fqdn, subset)` whose DestinationRule sets `tls` (no auto mTLS).
    tls: BTreeSet<(String, String)>,
    /// Whether the YAML asks for mTLS anywhere (a `tls` or a security resource).
    uses_mtls: bool,
}

/// One resource's findings: `{what}: '{path}': {text}` at a line.
struct Notes<'w> {
    walk: &'w mut Walk,
    file: &'w Path,
    what: String,
}

impl Notes<'_> {
    fn note(&mut self, line: usize, path: &str, text: impl std::fmt::Display) {
        self.walk.written.push(Diagnostic {
            file: self.file.to_path_buf(),
            line,
            message: format!("{}: '{path}': {text}", self.what),
        });
    }
}

impl Walk {
    fn document(&mut self, file: &Path, doc: Look<'_, '_>, suffix: &str) {
        let text = |path: &str| doc.get(path).and_then(|l| l.text());
        let kind = text("kind").unwrap_or_default();
        let namespace = text("metadata.namespace").unwrap_or_else(|| "default".to_string());
        let name = text("metadata.name").unwrap_or_default();
        let mut notes = Notes {
            walk: self,
            file,
            what: format!("{kind} {namespace}/{name}"),
        };
        match kind.as_str() {
            "VirtualService" => notes.virtual_service(doc),
            "DestinationRule" => {
                let Some(host) = text("spec.host") else {
                    return;
                };
                let fqdn = resolve_host(&host, &namespace, suffix);
                if let Some(policy) = doc.get("spec.trafficPolicy") {
                    notes.traffic_policy("trafficPolicy", &fqdn, "", policy);
                }
                let subsets = doc.get("spec.subsets").map(|s| s.items());
                for (j, subset) in subsets.unwrap_or_default().into_iter().enumerate() {
                    let name = subset
                        .get("name")
                        .and_then(|n| n.text())
                        .unwrap_or_default();
                    if let Some(policy) = subset.get("trafficPolicy") {
                        let path = format!("subsets[{j}].trafficPolicy");
                        notes.traffic_policy(&path, &fqdn, &name, policy);
                    }
                }
            }
            "PeerAuthentication" => notes.peer_authentication(doc),
            // What gRPC clients keep when a Sidecar narrows (see `config::sidecar`).
            "Sidecar" => {
                if let Some(egress) = doc.get("spec.egress") {
                    notes.note(egress.line, "egress", crate::config::SIDECAR_GRPC_KEEPS);
                }
            }
            "EnvoyFilter" => {
                if let Some(patches) = doc.get("spec.configPatches") {
                    notes.note(patches.line, "configPatches", RATE_LIMIT);
                }
            }
            "AuthorizationPolicy" => {
                notes.walk.uses_mtls = true;
                if let Some(action) = doc.get("spec.action")
                    && action.text().as_deref() == Some("AUDIT")
                {
                    notes.note(action.line, "action", format!("AUDIT {AUDIT}"));
                }
                let dry_run = doc.get("metadata.annotations").and_then(|a| {
                    a.entries()
                        .into_iter()
                        .find(|(k, _)| k == DRY_RUN_ANNOTATION)
                });
                if let Some((key, value)) = dry_run
                    && value.text().as_deref() == Some("true")
                {
                    notes.note(
                        value.line,
                        &format!("metadata.annotations.{key}"),
                        format!("the policy's shadow_rules {DRY_RUN}"),
                    );
                }
            }
            _ => {}
        }
    }
}

impl Notes<'_> {
    fn virtual_service(&mut self, doc: Look<'_, '_>) {
        let http = doc.get("spec.http").map(|h| h.items()).unwrap_or_default();
        for (i, route) in http.into_iter().enumerate() {
            self.traffic(i, &route);
            self.matches(i, &route);
            self.cors(i, &route);
            let Some(retries) = route.get("retries") else {
                self.walk.default_retry_on += 1;
                continue;
            };
            // `attempts` absent or 0 disables retries: nothing is served.
            let attempts = retries.get("attempts");
            let n = attempts.and_then(|a| a.integer()).unwrap_or(0);
            if n <= 0 {
                continue;
            }
            match retries.get("retryOn") {
                None => self.walk.default_retry_on += 1,
                Some(on) => {
                    let text = on.text().unwrap_or_default();
                    let ignored: Vec<&str> = text
                        .split(',')
                        .map(str::trim)
                        .filter(|c| {
                            !c.is_empty()
                                && !RetryOn::from_name(c).is_some_and(|f| GRPC_RETRY_ON.contains(f))
                        })
                        .collect();
                    if !ignored.is_empty() {
                        self.note(
                            on.line,
                            &format!("http[{i}].retries.retryOn"),
                            format!(
                                "{} ignored by gRPC clients, which retry only on gRPC status \
                                 codes (cancelled, deadline-exceeded, internal, \
                                 resource-exhausted, unavailable; gRFC A44)",
                                ignored.join(",")
                            ),
                        );
                    }
                }
            }
            if let Some(t) = retries.get("perTryTimeout") {
                let path = format!("http[{i}].retries.perTryTimeout");
                self.note(t.line, &path, "ignored by gRPC clients (gRFC A44)");
            }
            if let Some(a) = attempts.filter(|_| n > 4) {
                self.note(
                    a.line,
                    &format!("http[{i}].retries.attempts"),
                    format!("{n} retries are clamped to 4 by gRPC clients (gRFC A44: at most 5 attempts)"),
                );
            }
        }
    }

    /// What gRPC does with a route's header changes, rewrites and local
    /// answers: gRFC A28 has none of them.
    fn traffic(&mut self, i: usize, route: &Look<'_, '_>) {
        if let Some(h) = route.get("headers") {
            self.note(
                h.line,
                &format!("http[{i}].headers"),
                "ignored by gRPC clients (gRFC A28 has no header changes)",
            );
        }
        for (j, d) in route
            .get("route")
            .map(|r| r.items())
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            if let Some(h) = d.get("headers") {
                self.note(
                    h.line,
                    &format!("http[{i}].route[{j}].headers"),
                    "ignored by gRPC clients (gRFC A28 has no header changes)",
                );
            }
        }
        if let Some(r) = route.get("rewrite") {
            self.note(
                r.line,
                &format!("http[{i}].rewrite"),
                "ignored by gRPC clients (gRFC A28 has no rewrites): they send the \
                 original path and authority",
            );
        }
        for key in ["mirror", "mirrors"] {
            if let Some(m) = route.get(key) {
                self.note(
                    m.line,
                    &format!("http[{i}].{key}"),
                    "ignored by gRPC clients (gRFC A28 has no request mirroring)",
                );
            }
        }
        for key in ["redirect", "directResponse"] {
            if let Some(a) = route.get(key) {
                self.note(
                    a.line,
                    &format!("http[{i}].{key}"),
                    "gRPC clients fail every RPC this route matches with UNAVAILABLE \
                     (gRFC A28 follows only routes to clusters)",
                );
            }
        }
    }

    /// `corsPolicy`: enforced by the servers of the hosts, which gRPC
    /// servers do not (see [`CORS`]); clients never read it.
    fn cors(&mut self, i: usize, route: &Look<'_, '_>) {
        if let Some(c) = route.get("corsPolicy") {
            self.note(
                c.line,
                &format!("http[{i}].corsPolicy"),
                "enforced by the servers of the hosts (ServerLayer); gRPC servers ignore it \
                 (no cors filter; served with is_optional: true, gRFC A39), and gRPC clients \
                 never read it (browsers do, on the server's answers)",
            );
        }
    }

    /// What gRPC does with a route's `match[]` conditions that Envoy reads
    /// from the request line (see [`SCHEME_AUTHORITY`], [`IGNORE_CASE`]).
    fn matches(&mut self, i: usize, route: &Look<'_, '_>) {
        let entries = route.get("match").map(|m| m.items()).unwrap_or_default();
        for (k, m) in entries.into_iter().enumerate() {
            for key in ["authority", "scheme"] {
                if let Some(f) = m.get(key) {
                    let path = format!("http[{i}].match[{k}].{key}");
                    self.note(f.line, &path, SCHEME_AUTHORITY.replace("{}", key));
                }
            }
            if let Some(f) = m.get("ignoreUriCase")
                && f.boolean() == Some(true)
            {
                let path = format!("http[{i}].match[{k}].ignoreUriCase");
                self.note(f.line, &path, IGNORE_CASE);
            }
        }
    }

    /// A DestinationRule's (`subset` `""`) or one subset's `trafficPolicy`.
    fn traffic_policy(&mut self, path: &str, fqdn: &str, subset: &str, p: Look<'_, '_>) {
        let scope = (fqdn.to_string(), subset.to_string());
        let at = |field: &str| format!("{path}.{field}");
        let lb = p.get("loadBalancer");
        if lb.is_some_and(|lb| lb.get("simple").is_some() || lb.get("consistentHash").is_some()) {
            self.walk.lb.insert(scope.clone());
        }
        if let Some(simple) = lb.and_then(|lb| lb.get("simple"))
            && let Some(name @ ("LEAST_REQUEST" | "LEAST_CONN" | "UNSPECIFIED")) =
                simple.text().as_deref()
        {
            self.note(
                simple.line,
                &at("loadBalancer.simple"),
                format!(
                    "{name} is served inside wrr_locality with round_robin as fallback; gRPC \
                     clients without least_request support (gRFC A48) use round robin"
                ),
            );
        }
        for key in ["httpCookie", "useSourceIp", "httpQueryParameterName"] {
            let field = format!("loadBalancer.consistentHash.{key}");
            if let Some(h) = p.get(&field) {
                self.note(
                    h.line,
                    &at(&field),
                    "gRPC clients fall back to a random hash (gRFC A42 reads header hashing only)",
                );
            }
        }
        let explicit = ["distribute", "failover", "failoverPriority"]
            .into_iter()
            .find_map(|k| {
                p.get(&format!("loadBalancer.localityLbSetting.{k}"))
                    .map(|f| (k, f))
            });
        for (line, field, text) in locality_notes(p, explicit) {
            self.note(line, &at(&field), text);
        }
        let locality = p.get("loadBalancer.localityLbSetting.enabled");
        let locality = match explicit {
            Some((_, f)) => Some(f),
            None => locality,
        };
        if let Some(enabled) = locality.filter(|e| e.boolean() == Some(true)) {
            self.note(
                enabled.line,
                &at("loadBalancer.localityLbSetting.enabled"),
                "locality failover is a proxyless extension; gRPC clients ignore it",
            );
        }
        if let Some(od) = p.get("outlierDetection") {
            let counter = |key: &str| od.get(key).map(|c| (c.line, c.integer().unwrap_or(0)));
            match counter("consecutive5xxErrors") {
                Some((line, n)) if n > 0 => self.note(
                    line,
                    &at("outlierDetection.consecutive5xxErrors"),
                    "ignored by gRPC clients (gRFC A50 ejects on success rate and failure \
                     percentage only)",
                ),
                Some(_) => {}
                None => self.note(
                    od.line,
                    &at("outlierDetection"),
                    "ejects after 5 consecutive 5xx errors (Envoy's default, kept by Istio), \
                     which gRPC clients ignore (gRFC A50 ejects on success rate and failure \
                     percentage only)",
                ),
            }
            if let Some((line, n)) = counter("consecutiveGatewayErrors")
                && n > 0
            {
                self.note(
                    line,
                    &at("outlierDetection.consecutiveGatewayErrors"),
                    "ignored by gRPC clients (gRFC A50 ejects on success rate and failure \
                     percentage only)",
                );
            }
            if locality.is_none() {
                self.note(
                    od.line,
                    &at("outlierDetection"),
                    "also turns on locality failover (Istio does, unless \
                     localityLbSetting.enabled says otherwise), a proxyless extension gRPC \
                     clients ignore",
                );
            }
        }
        for field in [
            "connectionPool.tcp.maxConnections",
            "connectionPool.http.http1MaxPendingRequests",
            "connectionPool.http.maxRetries",
            "retryBudget",
        ] {
            if let Some(f) = p.get(field) {
                self.note(
                    f.line,
                    &at(field),
                    "ignored by gRPC clients (gRFC A32 reads http2MaxRequests only)",
                );
            }
        }
        for field in [
            "connectionPool.tcp.connectTimeout",
            "connectionPool.http.idleTimeout",
            "connectionPool.http.maxRequestsPerConnection",
            "connectionPool.tcp.tcpKeepalive",
            "connectionPool.tcp.maxConnectionDuration",
            "connectionPool.tcp.idleTimeout",
            "connectionPool.http.maxConcurrentStreams",
        ] {
            if let Some(f) = p.get(field) {
                self.note(f.line, &at(field), "ignored by gRPC clients");
            }
        }
        if let Some(f) = p.get("connectionPool.http.h2UpgradePolicy") {
            self.note(
                f.line,
                &at("connectionPool.http.h2UpgradePolicy"),
                "changes nothing for gRPC clients (they always speak HTTP/2)",
            );
        }
        // Each port's settings, noted the same way (the port's clusters
        // take them instead of the top-level ones).
        let ports = p.get("portLevelSettings").map(|l| l.items());
        for (k, entry) in ports.unwrap_or_default().into_iter().enumerate() {
            self.traffic_policy(&at(&format!("portLevelSettings[{k}]")), fqdn, subset, entry);
        }
        if let Some(tls) = p.get("tls") {
            self.walk.tls.insert(scope);
            let mode = tls.get("mode");
            match mode.and_then(|m| m.text()).as_deref() {
                Some(files @ ("SIMPLE" | "MUTUAL")) => self.note(
                    mode.map_or(tls.line, |m| m.line),
                    &at("tls.mode"),
                    format!(
                        "{files} ({}) cannot be used by gRPC clients: gRFC A29 \
                         supports only certificate provider instances, so mesh-control leaves \
                         the cluster out of their CDS (a whole CDS update would be NACKed) and \
                         routes to it fail (use ISTIO_MUTUAL with the bootstrap's \
                         certificate_providers for gRPC clients)",
                        if tls.get("caCertificates").is_none()
                            && tls.get("clientCertificate").is_none()
                        {
                            SYSTEM_ROOTS_FOR_GRPC
                        } else {
                            "certificate files"
                        }
                    ),
                ),
                Some("ISTIO_MUTUAL") => {
                    self.walk.uses_mtls = true;
                    self.note(
                        mode.map_or(tls.line, |m| m.line),
                        &at("tls.mode"),
                        format!(
                            "ISTIO_MUTUAL: {}",
                            CREDENTIALS.replace(
                                "servers built with xDS server",
                                "channels built with xDS"
                            )
                        ),
                    );
                }
                _ => {}
            }
        }
    }

    fn peer_authentication(&mut self, doc: Look<'_, '_>) {
        self.walk.uses_mtls = true;
        let mut modes = Vec::new();
        if let Some(mode) = doc.get("spec.mtls.mode") {
            modes.push(("mtls.mode".to_string(), mode));
        }
        let ports = doc.get("spec.portLevelMtls").map(|p| p.entries());
        for (port, setting) in ports.unwrap_or_default() {
            if let Some(mode) = setting.get("mode") {
                modes.push((format!("portLevelMtls.{port}.mode"), mode));
            }
        }
        for (path, mode) in modes {
            match mode.text().as_deref() {
                Some("PERMISSIVE") => self.note(mode.line, &path, PERMISSIVE),
                Some("STRICT") => self.note(mode.line, &path, format!("STRICT: {CREDENTIALS}")),
                _ => {}
            }
        }
    }
}

/// `check --for grpc` notes of a `trafficPolicy`'s explicit locality
/// settings (served per caller as EDS weights / priorities, which gRPC
/// honors, with a difference in when it fails over) and of its warmup.
fn locality_notes(
    p: Look<'_, '_>,
    explicit: Option<(&str, Look<'_, '_>)>,
) -> Vec<(usize, String, &'static str)> {
    let mut out = Vec::new();
    match explicit {
        Some(("distribute", f)) => out.push((
            f.line,
            "loadBalancer.localityLbSetting.distribute".to_string(),
            "served as per-caller EDS locality weights, which gRPC clients honor (gRFC A52)",
        )),
        Some((key, f)) => out.push((
            f.line,
            format!("loadBalancer.localityLbSetting.{key}"),
            "served as per-caller EDS priorities, which gRPC clients honor; gRPC moves to the \
             next priority only when every endpoint of a priority is unreachable (its outlier \
             detection ignores consecutive 5xx)",
        )),
        None => {}
    }
    if let Some(w) = p.get("loadBalancer.warmupDurationSecs") {
        out.push((
            w.line,
            "loadBalancer.warmupDurationSecs".to_string(),
            "ignored by gRPC clients (no slow start)",
        ));
    }
    out
}

/// What gRPC clients make of a cluster's locality and warmup settings.
/// Istio's explicit `localityLbSetting` (`distribute`, `failover`,
/// `failoverPriority`) is served as per-node EDS locality weights and
/// priorities, which gRPC honors (gRFC A52 `wrr_locality`, the priority
/// policy), so it needs no finding; what remains is the client-side
/// ordering of Istio's default (outlier detection without explicit
/// settings) and slow start.
fn locality_findings(at: &str, cluster: &mesh_core::model::Cluster) -> Vec<String> {
    let mut out = Vec::new();
    if cluster.locality_failover {
        out.push(format!(
            "{at}: locality failover by the caller's own locality (Istio's default with \
             outlierDetection and no explicit localityLbSetting) is a proxyless extension; gRPC \
             clients ignore it (explicit distribute / failover / failoverPriority are served as \
             EDS weights and priorities, which gRPC honors)"
        ));
    }
    if cluster.slow_start.is_some() {
        out.push(format!(
            "{at}: warmupDurationSecs (slow_start_config) ignored: gRPC clients have no slow start"
        ));
    }
    out
}

/// What an Envoy sidecar does not honor, or cannot use, of what it is
/// served (in Envoy's dialect, `crate::dialect::envoy`), one sentence per
/// finding, stable order. Envoy implements everything the mesh writes
/// (routes, retries, faults, rate limits, circuit breakers, outlier
/// detection, slow start, locality weights and priorities), so what is
/// left is where a sidecar's position differs from an in-process client's:
///
/// - a consistent hash on the source IP hashes the app's loopback
///   connection to its sidecar, so all of a workload's requests hash alike;
/// - Istio's default locality failover is served as EDS priorities from
///   the node's locality, and an Envoy whose bootstrap names none gets one
///   priority (`locality_known`: whether it names one; `None`: offline,
///   said as a condition);
/// - ISTIO_MUTUAL clusters load the certificate and trust bundle over SDS,
///   which mesh-control serves only when it runs a CA (`sds`: whether it
///   does; `None`: offline, said as a condition);
/// - PeerAuthentication and AuthorizationPolicy (`policies`) apply to a
///   server's inbound traffic, which does not pass through an Envoy
///   sidecar of this mesh (it is served an outbound listener only).
pub(crate) fn envoy_ignored(
    snapshot: &Snapshot,
    policies: Option<&SecurityPolicies>,
    locality_known: Option<bool>,
    sds: Option<bool>,
) -> Vec<String> {
    let mut out = BTreeSet::new();
    for (name, rc) in &snapshot.route_configs {
        for route in rc.virtual_hosts.iter().flat_map(|vh| vh.routes.iter()) {
            if route
                .policy
                .hash_policy
                .iter()
                .any(|p| matches!(p, HashPolicy::SourceIp))
            {
                out.insert(format!(
                    "route {:?} of {name:?}: consistentHash useSourceIp hashes the source of the \
                     request Envoy receives, the app's own loopback connection to its sidecar: \
                     every request of one workload hashes alike (use a header or cookie key)",
                    route.name
                ));
            }
        }
    }
    let failover = snapshot
        .clusters
        .values()
        .filter(|c| c.locality_failover)
        .count();
    if failover > 0 && locality_known != Some(true) {
        let which = match locality_known {
            Some(_) => "this Envoy's bootstrap names none",
            None => "an Envoy whose bootstrap names none",
        };
        out.insert(format!(
            "locality failover: {failover} cluster(s) fail over by locality (Istio's default \
             with outlierDetection), served to Envoy as EDS priorities from its node.locality; \
             {which} (envoy-bootstrap --locality) gets every locality as one priority"
        ));
    }
    if sds != Some(true) {
        for (name, cluster) in &snapshot.clusters {
            if cluster
                .tls
                .as_ref()
                .is_some_and(|t| t.origination == TlsOrigination::IstioMutual)
            {
                out.insert(format!(
                    "cluster {name:?}: ISTIO_MUTUAL: Envoy loads its certificate and the trust \
                     bundle over SDS (secrets \"default\" and \"ROOTCA\"), which mesh-control \
                     serves only when it runs a CA (serve --ca-dir{}); without one Envoy waits \
                     for them (SDS's initial fetch timeout, 15 s) and then fails every request \
                     to the cluster",
                    if sds.is_some() {
                        ", which it does not"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    if let Some(policies) = policies
        && (!policies.peers().is_empty() || !policies.authorization_policies().is_empty())
    {
        out.insert(
            "inbound: PeerAuthentication and AuthorizationPolicy apply to a server's inbound \
             requests, which do not pass through an Envoy sidecar of this mesh (it is served \
             one outbound listener); the server enforces them itself (this mesh's ServerLayer, \
             or gRPC xDS server credentials)"
                .to_string(),
        );
    }
    out.into_iter().collect()
}

/// The finding for `http[route]` of VirtualService `vs` (`ns/name`, at
/// `at`, file:line) bound to Gateway `gateway`: its `match[]` has
/// `sourceLabels` or `sourceNamespace`. A gateway's routes are translated
/// once for every gateway node (the audience of the shared translation),
/// so these conditions are not evaluated: the match applies to every
/// request through the gateway. Istio evaluates them against the gateway
/// proxy's own labels and namespace.
pub(crate) fn gateway_source_match(gateway: &str, vs: &str, route: usize, at: &str) -> String {
    format!(
        "VirtualService {vs} http[{route}] ({at}), bound to Gateway {gateway}: match          sourceLabels / sourceNamespace are not evaluated for a gateway; the match applies to          every request it receives (Istio matches them against the gateway's own labels and          namespace)"
    )
}

/// What an Envoy gateway node selected by `gateways` does not honor: its
/// Gateways' findings (`gateway_source_match`), and of what
/// [`envoy_ignored`] says, what concerns the clusters its routes name
/// (ISTIO_MUTUAL without SDS, locality failover without a locality). A
/// sidecar's findings (its loopback source IP, inbound policies) are not
/// a gateway's.
pub(crate) fn gateway_ignored<'a>(
    gateways: impl IntoIterator<Item = &'a crate::config::TranslatedGateway>,
    snapshot: &Snapshot,
    locality_known: Option<bool>,
    sds: Option<bool>,
) -> Vec<String> {
    let mut out = BTreeSet::new();
    let mut clusters = Snapshot::default();
    for g in gateways {
        out.extend(g.ignored.iter().cloned());
        for name in &g.clusters {
            if let Some((k, c)) = snapshot.clusters.get_key_value(name.as_str()) {
                clusters.clusters.insert(k.clone(), c.clone());
            }
        }
    }
    out.extend(envoy_ignored(&clusters, None, locality_known, sds));
    out.into_iter().collect()
}

/// What `mesh-control check --for envoy` reports about a config: what an
/// Envoy sidecar would not honor ([`envoy_ignored`]), the SDS and locality
/// conditions stated as requirements (offline, neither is known).
pub(crate) fn envoy_report(store: &ConfigStore, snapshot: &Snapshot) -> Vec<String> {
    envoy_ignored(snapshot, Some(&store.security()), None, None)
}

#[cfg(test)]
mod envoy_tests {
    use std::sync::Arc;

    use mesh_core::model::{
        Cluster, HashPolicy, Protocol, Route, RouteConfig, RouteMatch, RoutePolicy, UpstreamTls,
        VirtualHost, WeightedClusters,
    };

    use super::*;

    #[test]
    fn reports_what_an_envoy_sidecar_cannot_honor() {
        let mut snapshot = Snapshot::default();
        let mut cluster = Cluster::new("outbound|80||catalog", Protocol::Http1);
        cluster.locality_failover = true;
        cluster.tls = Some(UpstreamTls::default());
        snapshot
            .clusters
            .insert(cluster.name.clone(), Arc::new(cluster));
        let route = Route {
            name: "sticky".into(),
            matcher: RouteMatch::any(),
            action: WeightedClusters::single("outbound|80||catalog"),
            policy: RoutePolicy {
                hash_policy: Arc::from([HashPolicy::SourceIp]),
                ..RoutePolicy::default()
            },
        };
        snapshot.route_configs.insert(
            "catalog:80".into(),
            Arc::new(RouteConfig {
                name: "catalog:80".into(),
                virtual_hosts: Arc::from([VirtualHost {
                    name: "catalog:80".into(),
                    domains: Arc::from(["catalog:80".into()]),
                    routes: Arc::from([route]),
                }]),
            }),
        );
        let all = envoy_ignored(&snapshot, None, Some(false), Some(false));
        assert_eq!(all.len(), 3, "{all:#?}");
        assert!(all.iter().any(|f| f.contains("useSourceIp")));
        assert!(
            all.iter()
                .any(|f| f.contains("this Envoy's bootstrap names none"))
        );
        assert!(all.iter().any(|f| f.contains("which it does not")));
        let offline = envoy_ignored(&snapshot, None, None, None);
        assert!(
            offline
                .iter()
                .any(|f| f.contains("an Envoy whose bootstrap"))
        );
        assert!(all.iter().any(|f| f.contains("SDS")));
        // With a locality and a CA, only the source-IP hash is left.
        let left = envoy_ignored(&snapshot, None, Some(true), Some(true));
        assert_eq!(left.len(), 1, "{left:#?}");
        assert!(envoy_ignored(&Snapshot::default(), None, None, None).is_empty());
    }

    /// `check --for envoy`: read from the YAML, the conditions stated as
    /// requirements, inbound policies included.
    #[test]
    fn the_offline_report_states_what_an_envoy_sidecar_needs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mesh.yaml"),
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: shop}
spec:
  host: catalog
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3}
    tls: {mode: ISTIO_MUTUAL}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
",
        )
        .unwrap();
        let mut store = ConfigStore::new(crate::config::MeshOptions::default());
        assert!(store.load_dir(dir.path()).is_empty());
        let (snapshot, _) = store.snapshot(&[]);
        let report = envoy_report(&store, &snapshot);
        assert!(
            report
                .iter()
                .any(|f| f.contains("an Envoy whose bootstrap")),
            "{report:#?}"
        );
        assert!(
            report.iter().any(|f| f.contains("ISTIO_MUTUAL")
                && f.contains("only when it runs a CA")
                && !f.contains("which it does not")),
            "{report:#?}"
        );
        assert!(
            report.iter().any(|f| f.starts_with("inbound:")),
            "{report:#?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use mesh_core::model::{
        Cluster, OutlierDetection, Protocol, RetryPolicy, Route, RouteConfig, RouteMatch,
        RoutePolicy, VirtualHost, WeightedClusters,
    };

    use super::*;

    #[test]
    fn client_kinds() {
        assert_eq!(
            ClientKind::from_user_agent("gRPC C-core linux Python"),
            ClientKind::Grpc
        );
        assert_eq!(ClientKind::from_user_agent("gRPC Go"), ClientKind::Grpc);
        assert_eq!(
            ClientKind::from_user_agent("proxyless-rust"),
            ClientKind::Proxyless
        );
        assert_eq!(ClientKind::from_user_agent("envoy"), ClientKind::Envoy);
    }

    #[test]
    fn reports_what_grpc_ignores_and_only_that() {
        let mut snapshot = Snapshot::default();
        let mut retry = RetryPolicy::istio_default();
        retry.per_try_timeout = Some(Duration::from_millis(100));
        retry.num_retries = 6;
        snapshot.route_configs.insert(
            "rc".into(),
            Arc::new(RouteConfig {
                name: "rc".into(),
                virtual_hosts: Arc::from([VirtualHost {
                    name: "vh".into(),
                    domains: Arc::from([]),
                    routes: Arc::from([Route {
                        name: "r".into(),
                        matcher: RouteMatch::any(),
                        action: WeightedClusters::single("c"),
                        policy: RoutePolicy {
                            retry: Some(retry),
                            hash_policy: Arc::from([
                                HashPolicy::Header("x-user".into()),
                                HashPolicy::SourceIp,
                            ]),
                            ..RoutePolicy::default()
                        },
                    }]),
                }]),
            }),
        );
        let mut cluster = Cluster::new("c", Protocol::Grpc);
        cluster.lb_policy = LbPolicy::RoundRobin;
        cluster.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: Some(5),
            consecutive_gateway_errors: None,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        });
        snapshot.clusters.insert("c".into(), Arc::new(cluster));
        let found = grpc_ignored(&snapshot, None, None);
        let text = found.join("\n");
        assert!(
            text.contains("retryOn connect-failure,refused-stream,retriable-status-codes ignored"),
            "{text}"
        );
        assert!(text.contains("perTryTimeout ignored"), "{text}");
        assert!(text.contains("6 retries clamped to 4"), "{text}");
        assert!(text.contains("useSourceIp falls back"), "{text}");
        assert!(!text.contains("httpHeaderName"), "{text}");
        assert!(text.contains("consecutive5xxErrors"), "{text}");
        assert_eq!(found.len(), 5, "{text}");
        // Filtering by what the client subscribed to.
        let none = BTreeSet::new();
        assert!(grpc_ignored(&snapshot, Some(&none), Some(&none)).is_empty());
    }

    #[test]
    fn client_rate_limits_and_request_line_matches_are_reported_per_route() {
        use mesh_core::model::{HeaderMatch, ValueMatch};
        use mesh_core::ratelimit::{LocalRateLimit, RateLimitConfig};
        let route = |name: &str, matcher: RouteMatch, limited: bool| Route {
            name: name.into(),
            matcher,
            action: WeightedClusters::single("outbound|80||catalog"),
            policy: RoutePolicy {
                rate_limit: limited.then(|| {
                    Arc::new(RateLimitConfig {
                        filter: LocalRateLimit::inert(),
                        route: Some(LocalRateLimit::inert()),
                        rate_limits: Arc::from([]),
                    })
                }),
                ..RoutePolicy::default()
            },
        };
        let scheme = RouteMatch {
            headers: Arc::from([HeaderMatch {
                name: ":scheme".into(),
                value: ValueMatch::Exact("https".into()),
                invert: false,
            }]),
            ..RouteMatch::any()
        };
        let folded = RouteMatch {
            ignore_case: true,
            ..RouteMatch::any()
        };
        let mut snapshot = Snapshot::default();
        snapshot.route_configs.insert(
            "catalog:80".into(),
            Arc::new(RouteConfig {
                name: "catalog:80".into(),
                virtual_hosts: Arc::from([VirtualHost {
                    name: "catalog:80".into(),
                    domains: Arc::from(["catalog".into()]),
                    routes: Arc::from([
                        route("limited", RouteMatch::any(), true),
                        route("tls-only", scheme, false),
                        route("folded", folded, false),
                        route("plain", RouteMatch::any(), false),
                    ]),
                }]),
            }),
        );
        let found = grpc_ignored(&snapshot, None, None);
        let about = |name: &str| -> Vec<&String> {
            found
                .iter()
                .filter(|f| f.starts_with(&format!("route {name:?}")))
                .collect()
        };
        assert!(
            about("limited")[0].contains("SIDECAR_OUTBOUND"),
            "{found:#?}"
        );
        assert!(about("tls-only")[0].contains(":scheme"), "{found:#?}");
        assert!(
            about("folded")[0].contains("case_sensitive: false"),
            "{found:#?}"
        );
        assert!(about("plain").is_empty(), "{found:#?}");
    }

    #[test]
    fn file_based_client_tls_is_reported_as_nacked_by_grpc() {
        use mesh_core::model::{FileTls, UpstreamTls};
        let mut snapshot = Snapshot::default();
        let mut cluster = Cluster::new("ext", Protocol::Grpc);
        cluster.lb_policy = LbPolicy::RoundRobin;
        cluster.tls = Some(UpstreamTls {
            sni: "api.example.com".into(),
            origination: TlsOrigination::Files(FileTls {
                ca_certificates: Some("/etc/ca.pem".into()),
                subject_alt_names: Arc::from([]),
                client_certificate: None,
            }),
            ..UpstreamTls::default()
        });
        snapshot.clusters.insert("ext".into(), Arc::new(cluster));
        let found = grpc_ignored(&snapshot, None, None);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].starts_with(
                "cluster \"ext\": DestinationRule tls mode SIMPLE (certificate files) cannot be \
                 used by gRPC clients"
            ),
            "{}",
            found[0]
        );
        // Not an mTLS finding: the xDS-credentials note is about ISTIO_MUTUAL.
        let security = grpc_security_ignored(&SecurityPolicies::default(), &snapshot);
        assert!(
            !security.iter().any(|f| f.contains("clusters with mTLS")),
            "{security:#?}"
        );
        // SIMPLE with the system's roots: left out too, and said so.
        let mut cluster = (*snapshot.clusters["ext"]).clone();
        if let Some(TlsOrigination::Files(files)) = cluster.tls.as_mut().map(|t| &mut t.origination)
        {
            files.ca_certificates = None;
        }
        snapshot.clusters.insert("ext".into(), Arc::new(cluster));
        let found = grpc_ignored(&snapshot, None, None);
        assert!(
            found[0].starts_with(
                "cluster \"ext\": DestinationRule tls mode SIMPLE (the system's roots: gRFC A82 \
                 system_root_certs, which gRPC reads only with \
                 GRPC_EXPERIMENTAL_XDS_SYSTEM_ROOT_CERTS set"
            ),
            "{}",
            found[0]
        );
    }

    /// A dry-run policy a gRPC server was served is reported by name: gRPC
    /// ignores shadow_rules (A41), so it will never say what the policy
    /// would have done. Enforced policies are not reported.
    #[test]
    fn dry_run_policies_served_to_grpc_servers_are_reported() {
        use mesh_core::model::ServerListener;
        use mesh_core::rbac::{AuthorizationPolicy, Rule};
        let policy = |name: &str, action, dry_run| {
            AuthorizationPolicy::new("shop", name, action, vec![Rule::default()])
                .unwrap()
                .with_dry_run(dry_run)
        };
        let mut snapshot = Snapshot::default();
        snapshot.server_listeners.insert(
            "grpc/server".into(),
            Arc::new(ServerListener {
                name: "grpc/server".into(),
                address: "10.0.0.7:8080".parse().unwrap(),
                mtls: MtlsMode::Strict,
                policies: vec![
                    policy("deny-admin", Action::Deny, false),
                    policy("deny-all", Action::Deny, true),
                ]
                .into(),
                rate_limit: None,
                cors: Default::default(),
            }),
        );
        let found = grpc_ignored(&snapshot, None, None);
        assert_eq!(
            found,
            [format!(
                "server listener \"grpc/server\": the shadow_rules of dry-run \
                 AuthorizationPolicy shop/deny-all {DRY_RUN}"
            )]
        );
        assert!(
            found[0].contains("are ignored by gRPC servers (gRFC A41"),
            "{}",
            found[0]
        );
    }

    /// `check --for grpc` points at the annotation that makes a policy
    /// dry-run; `"false"` is not reported.
    #[test]
    fn the_report_points_at_the_dry_run_annotation() {
        let yaml = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: shop
  annotations:
    istio.io/dry-run: \"true\"
spec:
  action: DENY
  rules:
  - {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: shop
  annotations:
    istio.io/dry-run: \"false\"
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin]}}]
";
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("authz.yaml"), yaml).unwrap();
        let report = crate::grpc_report(&[dir.path()], &crate::config::MeshOptions::default());
        let found: Vec<(usize, String)> = report
            .written
            .iter()
            .map(|d| (d.line, d.message.clone()))
            .collect();
        assert_eq!(
            found,
            [(
                7,
                format!(
                    "AuthorizationPolicy shop/deny-all: 'metadata.annotations.istio.io/dry-run': \
                     the policy's shadow_rules {DRY_RUN}"
                )
            )]
        );
        // The served view says the same, by policy.
        let mut store = crate::config::ConfigStore::new(crate::config::MeshOptions::default());
        assert!(store.load_dir(dir.path()).is_empty());
        let (snapshot, _) = store.snapshot(&[]);
        let security = grpc_security_ignored(&store.security(), &snapshot);
        assert!(
            security.contains(&format!(
                "AuthorizationPolicy shop/deny-all: dry-run: its shadow_rules {DRY_RUN}"
            )),
            "{security:#?}"
        );
        assert!(
            !security.iter().any(|f| f.contains("deny-admin")),
            "{security:#?}"
        );
    }

    const WRITTEN: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  http:
  - retries:
      attempts: 6
      perTryTimeout: 1s
      retryOn: unavailable,5xx
    route: [{destination: {host: catalog}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: shop}
spec:
  host: catalog
  trafficPolicy:
    loadBalancer:
      consistentHash: {useSourceIp: true}
    outlierDetection: {interval: 5s}
    connectionPool:
      tcp: {maxConnections: 10}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: PERMISSIVE}
";

    /// Each field gRPC ignores is reported at its own line, named by its
    /// path; what the YAML did not write (the 5xx counter, failover) is
    /// said at the line of the block that brings it.
    #[test]
    fn the_report_points_at_the_fields_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), WRITTEN).unwrap();
        let report = crate::grpc_report(&[dir.path()], &crate::config::MeshOptions::default());
        let found: Vec<(usize, String)> = report
            .written
            .iter()
            .map(|d| (d.line, d.message.clone()))
            .collect();
        let at = |line: usize, needle: &str| {
            assert!(
                found.iter().any(|(l, m)| *l == line && m.contains(needle)),
                "{needle:?} at line {line}, in {found:#?}"
            );
        };
        at(
            15,
            "VirtualService shop/catalog: 'http[0].retries.attempts': 6 retries are clamped to 4",
        );
        at(
            16,
            "'http[0].retries.perTryTimeout': ignored by gRPC clients",
        );
        at(17, "'http[0].retries.retryOn': 5xx ignored by gRPC clients");
        at(
            27,
            "'trafficPolicy.loadBalancer.consistentHash.useSourceIp': gRPC clients fall back",
        );
        at(
            28,
            "'trafficPolicy.outlierDetection': ejects after 5 consecutive 5xx errors",
        );
        at(
            28,
            "'trafficPolicy.outlierDetection': also turns on locality failover",
        );
        at(
            30,
            "'trafficPolicy.connectionPool.tcp.maxConnections': ignored by gRPC clients",
        );
        at(
            36,
            "PeerAuthentication shop/default: 'mtls.mode': PERMISSIVE cannot be served",
        );
        assert_eq!(found.len(), 8, "{found:#?}");
        // Retries and the load balancer are written: no default for them.
        // A PeerAuthentication puts mTLS in use, so the default mode of the
        // workloads it does not cover is summarized.
        let defaults = report.defaults.join("\n");
        assert!(!defaults.contains("retries:"), "{defaults}");
        assert!(!defaults.contains("load balancing:"), "{defaults}");
        assert!(
            defaults.contains("mTLS mode: workloads no STRICT"),
            "{defaults}"
        );
    }
}
