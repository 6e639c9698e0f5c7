//! `security.istio.io` resources: PeerAuthentication and
//! AuthorizationPolicy, parsed one document at a time.
//!
//! The fields follow the Istio reference
//! (<https://istio.io/latest/docs/reference/config/security/peer_authentication/>,
//! <https://istio.io/latest/docs/reference/config/security/authorization-policy/>).
//! What this mesh cannot enforce is an error at its line, never ignored:
//! the CUSTOM action (an external authorizer), request authentication (JWT:
//! `requestPrincipals`, `request.auth.*`), `targetRef(s)` (Gateway API
//! attachment) and `remoteIpBlocks` (`X-Forwarded-For`, which a proxyless
//! server has no trusted hop to read). Values are checked with mesh-core's
//! own parsers ([`mesh_core::rbac`]), so a bad wildcard, CIDR block or port
//! is reported at the value's line.
//!
//! Istio's `istio.io/dry-run` annotation on an AuthorizationPolicy is read
//! too ([`parse_dry_run`]): `"true"` makes the policy a dry-run one
//! (evaluated and reported, never enforced; served as RBAC `shadow_rules`),
//! `"false"` or no annotation an enforced one. Any other value is an error
//! at its line rather than a guess: reading a typo as "enforce" could cut
//! off traffic the author meant only to observe, reading it as "dry-run"
//! would silently not enforce.

use std::collections::BTreeMap;

use mesh_core::model::MtlsMode;
use mesh_core::rbac::{self, Action, Condition, IpBlock, Operation, Rule, Source, StringMatch};

use super::yaml::{Field, Fields, Look, Sink, Spanned, join, line_of};

/// Istio's annotation for dry-run AuthorizationPolicies.
pub(crate) const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerAuthentication {
    /// `selector.matchLabels`; `None` (or empty) = namespace-wide.
    pub(crate) selector: Option<BTreeMap<String, String>>,
    /// `mtls.mode`; `None` for `UNSET` or absent (inherit from the parent).
    pub(crate) mode: Option<MtlsMode>,
    /// `portLevelMtls`: the mode per workload port (`None` = `UNSET`).
    pub(crate) ports: BTreeMap<u16, Option<MtlsMode>>,
}

/// `AuthorizationPolicy.spec`: which workloads it selects, and the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuthorizationPolicy {
    /// `selector.matchLabels`; `None` (or empty) = every workload of the
    /// namespace (of the mesh, in the root namespace).
    pub(crate) selector: Option<BTreeMap<String, String>>,
    pub(crate) policy: rbac::AuthorizationPolicy,
}

/// `selector: {matchLabels: {...}}`; empty labels mean "no selector", as
/// Istio reads them.
fn parse_selector(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
) -> Option<Option<BTreeMap<String, String>>> {
    let f = Fields::of(sink, field, &["matchLabels"], &[])?;
    let labels = match f.get("matchLabels") {
        Some(l) => l.string_map(sink)?,
        None => BTreeMap::new(),
    };
    Some((!labels.is_empty()).then_some(labels))
}

/// An `mtls.mode` value: `Some(None)` for `UNSET`.
fn parse_mode(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Option<MtlsMode>> {
    let mode = field.string(sink)?;
    if mode.value == "UNSET" {
        return Some(None);
    }
    match MtlsMode::parse(&mode.value) {
        Some(m) => Some(Some(m)),
        None => {
            sink.error(
                mode.line,
                format!(
                    "'{}': unknown mode '{}' (expected STRICT, PERMISSIVE, DISABLE or UNSET)",
                    field.path, mode.value
                ),
            );
            None
        }
    }
}

/// `{mode: ...}` of `mtls` or a `portLevelMtls` entry.
fn parse_mtls(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Option<MtlsMode>> {
    let f = Fields::of(sink, field, &["mode"], &[])?;
    match f.get("mode") {
        Some(m) => parse_mode(sink, m),
        None => Some(None),
    }
}

pub(crate) fn parse_peer_authentication(
    sink: &mut Sink<'_>,
    spec: Field<'_, '_, '_>,
) -> Option<PeerAuthentication> {
    let before = sink.count();
    let mut f = Fields::read(
        sink,
        spec.node,
        "",
        &["selector", "mtls", "portLevelMtls"],
        &[],
    )?;
    f.line = spec.key_line;
    let selector = match f.get("selector") {
        Some(s) => parse_selector(sink, s).unwrap_or_default(),
        None => None,
    };
    let mode = f
        .get("mtls")
        .and_then(|m| parse_mtls(sink, m))
        .unwrap_or_default();
    let mut ports = BTreeMap::new();
    if let Some(p) = f.get("portLevelMtls") {
        if selector.is_none() {
            // Istio's validation: port-level settings need a workload selector.
            sink.error(
                p.key_line,
                "'portLevelMtls' requires a 'selector' with matchLabels (port-level mTLS applies to selected workloads only)",
            );
        }
        for e in p.scalar_key_entries(sink).unwrap_or_default() {
            let port = match e.key.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => {
                    sink.error(
                        e.line,
                        format!("'{}': '{}' is not a port number (1-65535)", p.path, e.key),
                    );
                    continue;
                }
            };
            if let Some(m) = parse_mtls(sink, e.field()) {
                ports.insert(port, m);
            }
        }
    }
    if sink.count() != before {
        return None;
    }
    Some(PeerAuthentication {
        selector,
        mode,
        ports,
    })
}

/// The `istio.io/dry-run` annotation of the document `doc`: `Some(true)`
/// for `"true"`, `Some(false)` for `"false"` or no annotation, `None` (and
/// an error at the value's line) for any other value. A value that is not
/// a string at all is left to the metadata check, which reports it.
pub(crate) fn parse_dry_run(sink: &mut Sink<'_>, doc: Look<'_, '_>) -> Option<bool> {
    let Some(value) = doc
        .get("metadata.annotations")
        .and_then(|a| {
            a.entries()
                .into_iter()
                .find(|(k, _)| k == DRY_RUN_ANNOTATION)
        })
        .map(|(_, v)| v)
    else {
        return Some(false);
    };
    if value.boolean().is_some() || value.integer().is_some() {
        return None; // "must be a string (quote it)", said by the metadata check
    }
    match value.text().as_deref() {
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            sink.error(
                value.line,
                format!(
                    "'metadata.annotations.{DRY_RUN_ANNOTATION}': {other:?} is neither \"true\" \
                     (evaluate and report the policy, never enforce it) nor \"false\" (enforce it)"
                ),
            );
            None
        }
        None => None,
    }
}

/// An AuthorizationPolicy's `spec`; `dry_run` is what its
/// `istio.io/dry-run` annotation says ([`parse_dry_run`]).
pub(crate) fn parse_authorization_policy(
    sink: &mut Sink<'_>,
    spec: Field<'_, '_, '_>,
    namespace: &str,
    name: &str,
    dry_run: bool,
) -> Option<AuthorizationPolicy> {
    let before = sink.count();
    let mut f = Fields::read(
        sink,
        spec.node,
        "",
        &[
            "selector",
            "action",
            "rules",
            "provider",
            "targetRef",
            "targetRefs",
        ],
        &[],
    )?;
    f.line = spec.key_line;
    // Fields Istio defines that this mesh cannot enforce: reported, never ignored.
    unsupported(
        sink,
        spec,
        &[
            (
                "provider",
                "the CUSTOM action (an external authorizer) is not supported",
            ),
            (
                "targetRef",
                "'targetRef' (Gateway API attachment) is not supported; use 'selector'",
            ),
            (
                "targetRefs",
                "'targetRefs' (Gateway API attachment) is not supported; use 'selector'",
            ),
        ],
    );
    let selector = match f.get("selector") {
        Some(s) => parse_selector(sink, s).unwrap_or_default(),
        None => None,
    };
    let action = match f.get("action") {
        None => Some(Action::Allow),
        Some(a) => a.string(sink).and_then(|v| match Action::parse(&v.value) {
            Ok(action) => Some(action),
            Err(e) => {
                sink.error(v.line, format!("'{}': {e}", a.path));
                None
            }
        }),
    };
    let mut rules = Vec::new();
    let mut rules_line = f.line;
    if let Some(r) = f.get("rules") {
        rules_line = r.key_line;
        for (path, node) in r.list(sink).unwrap_or_default() {
            let field = Field {
                path: &path,
                key_line: line_of(node),
                node,
            };
            if let Some(rule) = parse_rule(sink, field) {
                rules.push(rule);
            }
        }
    }
    if sink.count() != before {
        return None;
    }
    match rbac::AuthorizationPolicy::new(namespace, name, action?, rules) {
        Ok(policy) => Some(AuthorizationPolicy {
            selector,
            policy: policy.with_dry_run(dry_run),
        }),
        Err(e) => {
            sink.error(rules_line, e);
            None
        }
    }
}

/// Reports the keys of `field`'s mapping named in `keys` (with why), so a
/// field Istio has but this mesh cannot enforce says so precisely.
fn unsupported(sink: &mut Sink<'_>, field: Field<'_, '_, '_>, keys: &[(&str, &str)]) {
    use saphyr::{Scalar, YamlData};
    let YamlData::Mapping(map) = &field.node.data else {
        return;
    };
    for (k, _) in map.iter() {
        if let YamlData::Value(Scalar::String(key)) = &k.data
            && let Some((_, why)) = keys.iter().find(|(name, _)| *name == &**key)
        {
            sink.error(line_of(k), format!("'{}': {why}", join(field.path, key)));
        }
    }
}

/// Istio's `{from, to, when}`.
fn parse_rule(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Rule> {
    let before = sink.count();
    let f = Fields::read(sink, field.node, field.path, &["from", "to", "when"], &[])?;
    let mut from = Vec::new();
    if let Some(list) = f.get("from") {
        for (path, node) in list.list(sink).unwrap_or_default() {
            let item = Field {
                path: &path,
                key_line: line_of(node),
                node,
            };
            let Some(src) = Fields::of(sink, item, &["source"], &[]) else {
                continue;
            };
            if let Some(s) = src.require(sink, "source")
                && let Some(source) = parse_source(sink, s)
            {
                from.push(source);
            }
        }
    }
    let mut to = Vec::new();
    if let Some(list) = f.get("to") {
        for (path, node) in list.list(sink).unwrap_or_default() {
            let item = Field {
                path: &path,
                key_line: line_of(node),
                node,
            };
            let Some(op) = Fields::of(sink, item, &["operation"], &[]) else {
                continue;
            };
            if let Some(o) = op.require(sink, "operation")
                && let Some(operation) = parse_operation(sink, o)
            {
                to.push(operation);
            }
        }
    }
    let mut when = Vec::new();
    if let Some(list) = f.get("when") {
        for (path, node) in list.list(sink).unwrap_or_default() {
            let item = Field {
                path: &path,
                key_line: line_of(node),
                node,
            };
            if let Some(c) = parse_condition(sink, item) {
                when.push(c);
            }
        }
    }
    (sink.count() == before).then(|| Rule {
        from: from.into(),
        to: to.into(),
        when: when.into(),
    })
}

/// The values of a list field, each parsed by `parse`; an error is
/// reported at the value's line.
fn values<T>(
    sink: &mut Sink<'_>,
    f: &Fields<'_, '_>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, mesh_core::Error>,
) -> Vec<T> {
    let Some(field) = f.get(key) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (path, v) in scalar_list(sink, field) {
        match parse(&v.value) {
            Ok(x) => out.push(x),
            Err(e) => sink.error(v.line, format!("'{path}': {e}")),
        }
    }
    out
}

/// A list of strings; numbers are taken as written (`ports: [8080]`).
fn scalar_list(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Vec<(String, Spanned<String>)> {
    use saphyr::{Scalar, YamlData};
    let mut out = Vec::new();
    for (path, node) in field.list(sink).unwrap_or_default() {
        let item = Field {
            path: &path,
            key_line: line_of(node),
            node,
        };
        let value = match &node.data {
            YamlData::Value(Scalar::Integer(i)) => Some(Spanned {
                value: i.to_string(),
                line: line_of(node),
            }),
            _ => item.string(sink),
        };
        if let Some(v) = value {
            out.push((path.clone(), v));
        }
    }
    out
}

const JWT: &str =
    "request authentication (JWT) is not supported; use 'principals' (the peer's mTLS identity)";
const REMOTE_IP: &str =
    "'remoteIpBlocks' (X-Forwarded-For) is not supported; use 'ipBlocks' (the peer's address)";

fn parse_source(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Source> {
    let before = sink.count();
    unsupported(
        sink,
        field,
        &[
            ("requestPrincipals", JWT),
            ("notRequestPrincipals", JWT),
            ("remoteIpBlocks", REMOTE_IP),
            ("notRemoteIpBlocks", REMOTE_IP),
        ],
    );
    let f = Fields::of(
        sink,
        field,
        &[
            "principals",
            "notPrincipals",
            "namespaces",
            "notNamespaces",
            "ipBlocks",
            "notIpBlocks",
            "requestPrincipals",
            "notRequestPrincipals",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
        ],
        &["serviceAccounts", "notServiceAccounts"],
    )?;
    let source = Source {
        principals: values(sink, &f, "principals", StringMatch::parse).into(),
        not_principals: values(sink, &f, "notPrincipals", StringMatch::parse).into(),
        namespaces: values(sink, &f, "namespaces", StringMatch::parse).into(),
        not_namespaces: values(sink, &f, "notNamespaces", StringMatch::parse).into(),
        ip_blocks: values(sink, &f, "ipBlocks", IpBlock::parse).into(),
        not_ip_blocks: values(sink, &f, "notIpBlocks", IpBlock::parse).into(),
    };
    if sink.count() != before {
        return None;
    }
    if source.is_empty() {
        sink.error(
            field.key_line,
            format!(
                "'{}' must set at least one field (Istio rejects an empty source)",
                field.path
            ),
        );
        return None;
    }
    Some(source)
}

fn parse_operation(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Operation> {
    let before = sink.count();
    let f = Fields::of(
        sink,
        field,
        &[
            "hosts",
            "notHosts",
            "ports",
            "notPorts",
            "methods",
            "notMethods",
            "paths",
            "notPaths",
        ],
        &[],
    )?;
    let operation = Operation {
        hosts: values(sink, &f, "hosts", StringMatch::parse).into(),
        not_hosts: values(sink, &f, "notHosts", StringMatch::parse).into(),
        ports: values(sink, &f, "ports", rbac::parse_port).into(),
        not_ports: values(sink, &f, "notPorts", rbac::parse_port).into(),
        methods: values(sink, &f, "methods", StringMatch::parse).into(),
        not_methods: values(sink, &f, "notMethods", StringMatch::parse).into(),
        paths: values(sink, &f, "paths", StringMatch::parse_path).into(),
        not_paths: values(sink, &f, "notPaths", StringMatch::parse_path).into(),
    };
    if sink.count() != before {
        return None;
    }
    if operation.is_empty() {
        sink.error(
            field.key_line,
            format!(
                "'{}' must set at least one field (Istio rejects an empty operation)",
                field.path
            ),
        );
        return None;
    }
    Some(operation)
}

fn parse_condition(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Condition> {
    let f = Fields::read(
        sink,
        field.node,
        field.path,
        &["key", "values", "notValues"],
        &[],
    )?;
    let key = f.require(sink, "key")?.string(sink)?;
    let list = |sink: &mut Sink<'_>, name: &str| -> Vec<Spanned<String>> {
        f.get(name)
            .map(|v| scalar_list(sink, v).into_iter().map(|(_, s)| s).collect())
            .unwrap_or_default()
    };
    let values = list(sink, "values");
    let not_values = list(sink, "notValues");
    let v: Vec<&str> = values.iter().map(|s| s.value.as_str()).collect();
    let nv: Vec<&str> = not_values.iter().map(|s| s.value.as_str()).collect();
    match Condition::parse(&key.value, &v, &nv) {
        Ok(c) => Some(c),
        Err(e) => {
            // An unsupported key is the key's fault; otherwise point at the
            // first value that fails on its own.
            let line = if e.kind() == mesh_core::ErrorKind::Unsupported {
                key.line
            } else {
                values
                    .iter()
                    .map(|s| (s, Condition::parse(&key.value, &[&s.value], &[])))
                    .chain(
                        not_values
                            .iter()
                            .map(|s| (s, Condition::parse(&key.value, &[], &[&s.value]))),
                    )
                    .find(|(_, r)| r.is_err())
                    .map(|(s, _)| s.line)
                    .unwrap_or(key.line)
            };
            sink.error(line, format!("'{}': {e}", join(field.path, "key")));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, SocketAddr};

    use mesh_core::rbac::{RequestAttributes, evaluate, evaluate_dry_run};

    use super::super::Workload;
    use super::super::tests::{assert_one, check, store};

    fn policy(annotations: &str) -> String {
        format!(
            "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: shop
{annotations}spec:
  action: DENY
  rules:
  - {{}}
"
        )
    }

    const ALLOW_FRONTEND: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-frontend
  namespace: shop
spec:
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
";

    /// The policies a workload of `shop` gets from `files`, as served.
    fn served(files: &[(&str, &str)]) -> Vec<mesh_core::rbac::AuthorizationPolicy> {
        let (s, _d) = store(files);
        let addr = SocketAddr::new(IpAddr::from([10, 0, 0, 7]), 8080);
        let labels = BTreeMap::new();
        s.security()
            .server_listener(
                &format!("grpc/server?xds.resource.listening_address={addr}"),
                addr,
                Workload {
                    namespace: "shop",
                    labels: &labels,
                },
            )
            .policies
            .to_vec()
    }

    /// `"true"` makes the policy dry-run: it travels with the enforced ones
    /// to the workload's server listener, denies nothing, and the dry run
    /// says it would have denied.
    #[test]
    fn dry_run_true_is_served_but_not_enforced() {
        let yaml = policy("  annotations:\n    istio.io/dry-run: \"true\"\n");
        assert!(check(&yaml).is_empty(), "{:#?}", check(&yaml));
        let policies = served(&[("a.yaml", &yaml), ("b.yaml", ALLOW_FRONTEND)]);
        let ids: Vec<(&str, bool)> = policies
            .iter()
            .map(|p| (&**p.id(), p.is_dry_run()))
            .collect();
        assert_eq!(
            ids,
            [("shop/deny-all", true), ("shop/allow-frontend", false)]
        );
        let frontend =
            mesh_core::spiffe::SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend")
                .unwrap();
        let headers = http::HeaderMap::new();
        let attrs = RequestAttributes {
            peer: Some(&frontend),
            source_ip: IpAddr::from([10, 0, 0, 1]),
            host: "catalog",
            destination_port: 8080,
            method: "GET",
            path: "/",
            headers: &headers,
        };
        let decision = evaluate(&policies, &attrs);
        assert!(decision.allowed, "{decision:?}");
        assert_eq!(decision.policy.as_deref(), Some("shop/allow-frontend"));
        let dry = evaluate_dry_run(&policies, &attrs);
        assert_eq!(
            dry.deny.map(|d| (d.allowed, d.policy)),
            Some((false, Some("shop/deny-all".into())))
        );
    }

    /// `"false"`, no annotation, or other annotations only: enforced.
    #[test]
    fn dry_run_false_or_absent_is_enforced() {
        for annotations in [
            "  annotations:\n    istio.io/dry-run: \"false\"\n",
            "  annotations:\n    owner: team-a\n",
            "",
        ] {
            let yaml = policy(annotations);
            let policies = served(&[("a.yaml", &yaml)]);
            assert_eq!(policies.len(), 1, "{annotations:?}");
            assert!(!policies[0].is_dry_run(), "{annotations:?}");
        }
    }

    /// Any other value is an error at its line: neither a silent
    /// enforcement nor a silent dry run.
    #[test]
    fn another_dry_run_value_is_an_error_at_its_line() {
        let yaml = policy("  annotations:\n    owner: team-a\n    istio.io/dry-run: \"yes\"\n");
        assert_one(
            &check(&yaml),
            8,
            "AuthorizationPolicy shop/deny-all: 'metadata.annotations.istio.io/dry-run': \
             \"yes\" is neither \"true\"",
        );
        // Unquoted, it is a YAML boolean, which annotations cannot be.
        let yaml = policy("  annotations:\n    istio.io/dry-run: true\n");
        assert_one(&check(&yaml), 7, "quote it");
    }
}
