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
//! AUDIT policies become RBAC `LOG`, which gRPC does not act on, and xDS
//! security is honored only by servers and channels built with xDS
//! credentials. [`grpc_security_ignored`] says so for a config, and
//! [`grpc_ignored`] for the server listeners a client was served.
//! DestinationRule `tls` SIMPLE / MUTUAL (certificate files) is worse than
//! ignored: gRPC clients would NACK a whole CDS update with a cluster naming
//! files (A29 reads only certificate provider instances), so the ADS server
//! leaves such clusters out of gRPC clients' responses (with a NOT_FOUND
//! resource error naming why), and [`grpc_ignored`] reports them per cluster.
//!
//! The client kind comes from `node.user_agent_name`: grpc-core based clients
//! (grpcio, C++, Ruby, PHP) send `gRPC C-core …`, grpc-go `gRPC Go`, grpc-java
//! `gRPC Java`; this mesh's own client sends `proxyless-rust`.

use std::collections::BTreeSet;

use mesh_core::Snapshot;
use mesh_core::model::{
    CircuitBreakers, ConnectionSettings, HashPolicy, LbPolicy, MtlsMode, RetryOn, TlsOrigination,
};
use mesh_core::rbac::Action;

use crate::config::SecurityPolicies;

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
        if cluster.connection != ConnectionSettings::default() {
            out.insert(format!(
                "{at}: connectTimeout / idleTimeout / maxRequestsPerConnection ignored"
            ));
        }
        if cluster.locality_failover {
            out.insert(format!(
                "{at}: localityLbSetting failover is a proxyless extension; gRPC clients ignore it"
            ));
        }
        if let Some(TlsOrigination::Files(files)) = cluster.tls.as_ref().map(|t| &t.origination) {
            out.insert(format!(
                "{at}: DestinationRule tls mode {} (certificate files) cannot be used by gRPC \
                 clients: gRFC A29 supports only certificate provider instances, so mesh-control \
                 leaves the cluster out of their CDS (a whole CDS update would be NACKed) and \
                 routes to it fail (use ISTIO_MUTUAL with the bootstrap's certificate_providers for \
                 gRPC clients)",
                files.mode()
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
    }
    out.into_iter().collect()
}

const PERMISSIVE: &str = "PERMISSIVE cannot be served to gRPC servers: they match filter chains on raw_buffer only, so they serve the plaintext chain and accept no mTLS (gRFC A36); use STRICT or DISABLE for gRPC servers";
const AUDIT: &str = "is ignored by gRPC servers (it is served as RBAC action LOG, which gRPC does not act on, gRFC A41)";
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
    let root = policies.root_namespace();
    let mesh_wide = policies
        .peers()
        .iter()
        .find(|p| p.namespace == root && p.selector.is_none())
        .and_then(|p| p.mode);
    if uses_mtls && mesh_wide.is_none_or(|m| m == MtlsMode::Permissive) {
        out.insert(format!(
            "workloads no STRICT or DISABLE PeerAuthentication covers are PERMISSIVE (Istio's default; no mesh-wide STRICT or DISABLE PeerAuthentication in namespace '{root}'): {PERMISSIVE}"
        ));
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
    for a in policies.authorization_policies() {
        if a.policy.action() == Action::Audit {
            out.insert(format!(
                "AuthorizationPolicy {}: AUDIT {AUDIT}",
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
    fn file_based_client_tls_is_reported_as_nacked_by_grpc() {
        use mesh_core::model::{FileTls, UpstreamTls};
        let mut snapshot = Snapshot::default();
        let mut cluster = Cluster::new("ext", Protocol::Grpc);
        cluster.lb_policy = LbPolicy::RoundRobin;
        cluster.tls = Some(UpstreamTls {
            sni: "api.example.com".into(),
            origination: TlsOrigination::Files(FileTls {
                ca_certificates: "/etc/ca.pem".into(),
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
    }
}
