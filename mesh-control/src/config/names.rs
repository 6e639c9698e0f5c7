//! Service host names as Istio reads them: short names resolved from a
//! namespace, and cluster-local hosts split back into name and namespace.
//!
//! Both the security policies and the translation to the mesh model read
//! names this way; the helpers live here, below both, so that imports run
//! one way (docs/ARCHITECTURE.md, "Conventions").

/// The host a name stands for, seen from `namespace`: no dot →
/// `<host>.<namespace>.<suffix>`; one dot (`<name>.<ns>`) → `<host>.<suffix>`;
/// otherwise the name as is (Istio's short-name rule).
pub(crate) fn resolve_host(host: &str, namespace: &str, suffix: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}.{suffix}"),
        1 => format!("{host}.{suffix}"),
        _ => host,
    }
}

/// `(name, namespace)` of a `<name>.<ns>.<suffix>` host.
pub(crate) fn cluster_local<'h>(fqdn: &'h str, suffix: &str) -> Option<(&'h str, &'h str)> {
    let rest = fqdn.strip_suffix(suffix)?.strip_suffix('.')?;
    let (name, ns) = rest.split_once('.')?;
    (!name.is_empty() && !ns.is_empty() && !ns.contains('.')).then_some((name, ns))
}
