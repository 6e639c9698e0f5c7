//! The Sidecar kind's spec as read from YAML ([`parse_sidecar`]).
//!
//! Apart from `sidecar.rs`, which applies Sidecars to views: the resources
//! (`resources.rs`) hold the parsed spec, and `sidecar.rs` walks the
//! resources, so with both halves in one module that module and
//! `resources` imported each other (issue 14).

use std::collections::BTreeMap;

use super::yaml::{Field, Fields, Sink, Spanned};

/// `Sidecar.spec`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sidecar {
    /// `workloadSelector.labels` (`None`: every workload of the namespace).
    pub(crate) selector: Option<BTreeMap<String, String>>,
    /// The hosts of every `egress[]` entry; `None` without `egress`
    /// (Istio's default, `*/*`).
    pub(crate) hosts: Option<Vec<Spanned<EgressHost>>>,
    /// Line of `egress` (or of the spec when absent), for messages.
    pub(crate) egress_line: usize,
}

/// One `egress[].hosts` entry: `namespace/dnsName`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EgressHost {
    pub(crate) namespace: HostNamespace,
    pub(crate) name: DnsName,
    /// As written.
    pub(crate) text: String,
}

/// The namespace part of an egress host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostNamespace {
    /// `*`.
    Any,
    /// `.`: the Sidecar's namespace (the workload's, for the root
    /// namespace's Sidecar).
    Own,
    /// `~`: no namespace.
    Nothing,
    /// A namespace name.
    Named(String),
}

/// The `dnsName` part of an egress host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DnsName {
    /// `*`.
    Any,
    /// `*.example.com`, kept as `.example.com`: any host ending so.
    Suffix(String),
    /// An FQDN.
    Exact(String),
}

impl DnsName {
    pub(super) fn matches(&self, fqdn: &str) -> bool {
        match self {
            DnsName::Any => true,
            DnsName::Suffix(s) => fqdn.len() > s.len() && fqdn.ends_with(s.as_str()),
            DnsName::Exact(h) => h == fqdn,
        }
    }
}

/// Fields Istio defines that configure a proxy's own inbound listeners.
const UNSUPPORTED: [&str; 2] = ["ingress", "inboundConnectionPool"];

/// Parses `Sidecar.spec`.
pub(crate) fn parse_sidecar(sink: &mut Sink<'_>, spec: Field<'_, '_, '_>) -> Option<Sidecar> {
    let known = ["workloadSelector", "egress", "outboundTrafficPolicy"];
    let f = Fields::of(sink, spec, &known, &UNSUPPORTED)?;
    let before = sink.count();
    let selector = f.get("workloadSelector").and_then(|w| {
        let w = Fields::of(sink, w, &["labels"], &[])?;
        let labels = w.require(sink, "labels")?;
        let map = labels.string_map(sink)?;
        if map.is_empty() {
            sink.error(
                labels.line(),
                format!(
                    "'{}' selects no label: leave workloadSelector out to apply the Sidecar to \
                     every workload of its namespace",
                    labels.path
                ),
            );
            return None;
        }
        Some(map)
    });
    if let Some(policy) = f.get("outboundTrafficPolicy") {
        outbound_traffic_policy(sink, policy);
    }
    let mut egress_line = f.line;
    let hosts = f.get("egress").and_then(|egress| {
        egress_line = egress.key_line;
        let items = egress.list(sink)?;
        let mut hosts = Vec::new();
        for (path, node) in &items {
            let item = Field {
                path,
                key_line: super::yaml::line_of(node),
                node,
            };
            let Some(e) = Fields::of(sink, item, &["hosts"], &["port", "bind", "captureMode"])
            else {
                continue;
            };
            let Some(list) = e.require(sink, "hosts") else {
                continue;
            };
            let Some(entries) = list.string_list(sink) else {
                continue;
            };
            if entries.is_empty() {
                sink.error(
                    list.line(),
                    format!("'{}' is empty: name at least one host", list.path),
                );
            }
            for (path, text) in entries {
                match egress_host(&text.value) {
                    Ok(host) => hosts.push(Spanned {
                        value: host,
                        line: text.line,
                    }),
                    Err(why) => sink.error(text.line, format!("'{path}': {why}")),
                }
            }
        }
        Some(hosts)
    });
    (sink.count() == before).then_some(Sidecar {
        selector,
        hosts,
        egress_line,
    })
}

/// `outboundTrafficPolicy`: `REGISTRY_ONLY` (the default) is what a
/// proxyless client does; the rest is reported.
fn outbound_traffic_policy(sink: &mut Sink<'_>, policy: Field<'_, '_, '_>) {
    let Some(p) = Fields::of(sink, policy, &["mode"], &["egressProxy"]) else {
        return;
    };
    let Some(field) = p.get("mode") else {
        return;
    };
    let Some(mode) = field.string(sink) else {
        return;
    };
    let path = field.path;
    match mode.value.as_str() {
        "REGISTRY_ONLY" => {}
        "ALLOW_ANY" => sink.error(
            mode.line,
            format!(
                "'{path}' ALLOW_ANY is not supported: a proxyless client has no passthrough \
                 to hosts the mesh does not know (it is always REGISTRY_ONLY)"
            ),
        ),
        other => sink.error(
            mode.line,
            format!("'{path}' must be REGISTRY_ONLY or ALLOW_ANY, found {other:?}"),
        ),
    }
}

/// Parses one `namespace/dnsName`.
pub(super) fn egress_host(text: &str) -> Result<EgressHost, String> {
    let Some((ns, name)) = text.split_once('/') else {
        return Err(format!(
            "{text:?} must be namespace/dnsName (\"*/{text}\" for any namespace, \"./{text}\" \
             for the Sidecar's own)"
        ));
    };
    let namespace = match ns {
        "*" => HostNamespace::Any,
        "." => HostNamespace::Own,
        "~" => HostNamespace::Nothing,
        "" => return Err(format!("{text:?} has an empty namespace")),
        n if n.contains('*') || !is_dns_label(n) => {
            return Err(format!(
                "{text:?}: namespace {n:?} must be a namespace name, '*', '.' or '~'"
            ));
        }
        n => HostNamespace::Named(n.to_string()),
    };
    let lower = name.to_ascii_lowercase();
    let name = if lower == "*" {
        DnsName::Any
    } else if let Some(suffix) = lower.strip_prefix("*.") {
        if suffix.is_empty() || suffix.contains('*') {
            return Err(format!(
                "{text:?}: a wildcard is allowed only as the left-most label (*.example.com)"
            ));
        }
        DnsName::Suffix(format!(".{suffix}"))
    } else if lower.contains('*') {
        return Err(format!(
            "{text:?}: a wildcard is allowed only as the left-most label (*.example.com)"
        ));
    } else if lower.is_empty() {
        return Err(format!(
            "{text:?} has an empty dnsName (use * for every host)"
        ));
    } else if !lower.contains('.') {
        return Err(format!(
            "{text:?}: dnsName {lower:?} is not a fully qualified name and matches no host \
             (write {lower}.<namespace>.svc.cluster.local, or {ns}/* for every host)"
        ));
    } else {
        DnsName::Exact(lower)
    };
    Ok(EgressHost {
        namespace,
        name,
        text: text.to_string(),
    })
}

/// A Kubernetes namespace name (RFC 1123 label).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
