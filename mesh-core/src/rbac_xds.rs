//! AuthorizationPolicy ⇄ Envoy RBAC, in the shape gRPC servers read (gRFC A41).
//!
//! A server listener (gRFC A36) carries one RBAC HTTP filter per action, in
//! Istio's order: DENY, then ALLOW, then LOG (Istio's AUDIT).
//! [`rbac_filters_to_proto`] makes those filters' configs from the policies
//! that apply to a workload, [`rbac_filters_from_proto`] reads them back
//! into the model that [`crate::rbac::evaluate`] decides with, and
//! [`rbac_http_filter_config`] wraps one as the filter's `typed_config` with
//! a deterministic encoding (the generated `RBAC.policies` is a `HashMap`,
//! whose order would change the bytes from one encoding to the next).
//! [`rbac_to_proto`] / [`rbac_from_proto`] do the same for the enforced
//! `envoy.config.rbac.v3.RBAC` messages alone.
//!
//! Dry-run policies (Istio's `istio.io/dry-run: "true"`,
//! [`AuthorizationPolicy::is_dry_run`]) go where Istio's authz builder
//! puts them: into the `shadow_rules` of the filter of their action, with
//! `shadow_rules_stat_prefix` `istio_dry_run_allow_` or
//! `istio_dry_run_deny_`. Envoy evaluates shadow rules and reports the
//! result (stats, dynamic metadata) without acting on it; gRPC servers
//! ignore them (gRFC A41 reads `rules` only). A filter whose policies are
//! all dry-run has **no** `rules` field, again as Istio emits it: Envoy and
//! gRPC treat an absent `rules` as "no enforcement", whereas a present but
//! empty ALLOW `rules` denies every request, so a workload whose only ALLOW
//! policy is a dry-run one would otherwise be cut off. Our own client reads
//! shadow rules back as dry-run policies, which its server evaluates with
//! [`crate::rbac::evaluate_dry_run`] and reports.
//!
//! The translation is Istio's (`pilot/pkg/security/authz/model`), restricted
//! to what gRFC A41 implements:
//!
//! - each rule becomes one Envoy policy named `ns[<ns>]-policy[<name>]-rule[<i>]`
//!   (a policy without rules becomes `...-rule[none]`, a policy that matches
//!   nothing, so an ALLOW policy without rules still denies);
//! - `from` becomes principals: `principals` → `authenticated.principal_name`
//!   against the SPIFFE URI (`spiffe://` + the principal; `*suffix` as the
//!   regex `spiffe://.*suffix`; `*` as `.+`); `namespaces` → a regex on the
//!   URI's `/ns/<ns>/` segment; `ipBlocks` → `direct_remote_ip`; `not*`
//!   fields → `not_id`;
//! - `to` becomes permissions: `hosts` → an `:authority` header matcher
//!   ignoring case, `methods` → `:method`, `paths` → `url_path`, `ports` →
//!   `destination_port`; `not*` fields → `not_rule`;
//! - `when`: `request.headers[..]`, `source.principal`, `source.namespace`
//!   and `source.ip` become principals, `destination.port` a permission.
//!
//! Reading accepts exactly this shape (and the deprecated `source_ip` for
//! `direct_remote_ip`); anything else, such as CEL conditions, metadata
//! matchers or `remote_ip`, is an `Unsupported` error naming the policy, so
//! a client NACKs what it could not enforce instead of ignoring it.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::rbac::Action as RbacAction;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal,
};
use envoy_types::pb::envoy::config::route::v3::HeaderMatcher;
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use prost::Message;

use crate::Error;
use crate::model::Name;
use crate::rbac::{
    Action, AuthorizationPolicy, Condition, IpBlock, Operation, Rule, Source, StringMatch, Values,
    header_name,
};
use crate::spiffe::SCHEME_PREFIX;

/// The type URL of the RBAC HTTP filter's config (`typed_config`).
pub const RBAC_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// The HTTP filter name Envoy and gRPC use for RBAC.
pub const RBAC_FILTER_NAME: &str = "envoy.filters.http.rbac";

/// The regex Istio uses for `*` (any non-empty value).
const ANY_REGEX: &str = ".+";
/// `*suffix` principals: `spiffe://.*<escaped suffix>`.
const SUFFIX_PRINCIPAL_PREFIX: &str = "spiffe://.*";
/// Namespace regexes: `spiffe://[^/]+/ns/<pattern>/sa/[^/]+`.
const NS_REGEX_PREFIX: &str = "spiffe://[^/]+/ns/";
const NS_REGEX_SUFFIX: &str = "/sa/[^/]+";
const SEGMENT_ANY: &str = "[^/]+";
const SEGMENT_REST: &str = "[^/]*";

/// Istio's `shadow_rules_stat_prefix` of the dry-run ALLOW policies.
pub const DRY_RUN_ALLOW_STAT_PREFIX: &str = "istio_dry_run_allow_";
/// Istio's `shadow_rules_stat_prefix` of the dry-run DENY policies.
pub const DRY_RUN_DENY_STAT_PREFIX: &str = "istio_dry_run_deny_";

/// The enforced RBAC messages for `policies`: one per action that has an
/// enforced policy, DENY first, then ALLOW, then LOG (AUDIT). Dry-run
/// policies are left out (they are shadow rules, see
/// [`rbac_filters_to_proto`]). Without any enforced ALLOW policy no ALLOW
/// message is emitted, which allows what DENY does not deny.
pub fn rbac_to_proto(policies: &[AuthorizationPolicy]) -> Vec<Rbac> {
    [Action::Deny, Action::Allow, Action::Audit]
        .into_iter()
        .filter_map(|action| {
            rbac_of(
                action,
                policies
                    .iter()
                    .filter(|p| p.action() == action && !p.is_dry_run()),
            )
        })
        .collect()
}

/// The RBAC HTTP filter configs for `policies`: one per action that has a
/// policy, DENY first, then ALLOW, then LOG (AUDIT), as Istio's authz
/// builder makes them. The enforced policies of the action are the
/// filter's `rules`, absent when there are none (an absent `rules` enforces
/// nothing, in Envoy and in gRPC; a present but empty ALLOW one would deny
/// everything); its dry-run policies are the `shadow_rules`, with Istio's
/// `shadow_rules_stat_prefix` ([`DRY_RUN_ALLOW_STAT_PREFIX`],
/// [`DRY_RUN_DENY_STAT_PREFIX`]; none for LOG, as Istio). Put them, in this
/// order, into a server listener's HTTP filters (see
/// [`rbac_http_filter_config`]).
pub fn rbac_filters_to_proto(policies: &[AuthorizationPolicy]) -> Vec<RbacFilter> {
    let mut out = Vec::new();
    for action in [Action::Deny, Action::Allow, Action::Audit] {
        let of = |dry_run: bool| {
            rbac_of(
                action,
                policies
                    .iter()
                    .filter(|p| p.action() == action && p.is_dry_run() == dry_run),
            )
        };
        let rules = of(false);
        let shadow_rules = of(true);
        if rules.is_none() && shadow_rules.is_none() {
            continue;
        }
        let shadow_rules_stat_prefix = match (&shadow_rules, action) {
            (None, _) | (Some(_), Action::Audit) => String::new(),
            (Some(_), Action::Allow) => DRY_RUN_ALLOW_STAT_PREFIX.to_owned(),
            (Some(_), Action::Deny) => DRY_RUN_DENY_STAT_PREFIX.to_owned(),
        };
        out.push(RbacFilter {
            rules,
            shadow_rules,
            shadow_rules_stat_prefix,
            ..Default::default()
        });
    }
    out
}

/// One RBAC message of `action` holding `policies`; `None` when there is
/// no policy.
fn rbac_of<'a>(
    action: Action,
    policies: impl Iterator<Item = &'a AuthorizationPolicy>,
) -> Option<Rbac> {
    let mut rbac = Rbac {
        action: action_to_proto(action) as i32,
        ..Default::default()
    };
    let mut any = false;
    for policy in policies {
        any = true;
        if policy.rules().is_empty() {
            rbac.policies.insert(
                policy_name(policy.namespace(), policy.name(), None),
                matches_nothing(),
            );
        }
        for (i, rule) in policy.rules().iter().enumerate() {
            rbac.policies.insert(
                policy_name(policy.namespace(), policy.name(), Some(i)),
                rule_to_proto(rule),
            );
        }
    }
    any.then_some(rbac)
}

/// The policies in RBAC messages made by [`rbac_to_proto`]: policies of
/// each message sorted by namespace and name, messages in the given order.
pub fn rbac_from_proto(rbacs: &[Rbac]) -> Result<Vec<AuthorizationPolicy>, Error> {
    let mut out = Vec::new();
    for rbac in rbacs {
        let action = match RbacAction::try_from(rbac.action) {
            Ok(RbacAction::Allow) => Action::Allow,
            Ok(RbacAction::Deny) => Action::Deny,
            Ok(RbacAction::Log) => Action::Audit,
            Err(_) => {
                return Err(Error::invalid(format!(
                    "RBAC: unknown action {}",
                    rbac.action
                )));
            }
        };
        if rbac.audit_logging_options.is_some() {
            return Err(Error::unsupported(
                "RBAC: audit_logging_options are not supported",
            ));
        }
        if action == Action::Allow && rbac.policies.is_empty() {
            // Envoy and gRPC deny every request here; the model has no
            // policy to say it with, and reading it as "no ALLOW policy"
            // would allow everything.
            return Err(Error::unsupported(
                "RBAC: an ALLOW RBAC without policies (denies every request) is not supported; \
                 leave `rules` out to enforce nothing, or name a policy that matches nothing",
            ));
        }
        // (namespace, name) → rule index (None: the no-rules marker) → rule.
        type Rules = BTreeMap<Option<usize>, Rule>;
        let mut grouped: BTreeMap<(String, String), Rules> = BTreeMap::new();
        for (key, policy) in &rbac.policies {
            let fail = |e: Error| e.context(format!("RBAC policy {key:?}"));
            let (namespace, name, index) = parse_policy_name(key).ok_or_else(|| {
                fail(Error::unsupported(
                    "the name must be ns[<namespace>]-policy[<name>]-rule[<index>]",
                ))
            })?;
            let rule = match index {
                None if *policy == matches_nothing() => Rule::default(),
                None => {
                    return Err(fail(Error::invalid(
                        "a rule[none] policy must match nothing",
                    )));
                }
                Some(_) => rule_from_proto(policy).map_err(fail)?,
            };
            grouped
                .entry((namespace.to_owned(), name.to_owned()))
                .or_default()
                .insert(index, rule);
        }
        for ((namespace, name), rules) in grouped {
            let fail = |e: Error| e.context(format!("RBAC policy ns[{namespace}]-policy[{name}]"));
            if rules.contains_key(&None) && rules.len() > 1 {
                return Err(fail(Error::invalid("has both rule[none] and rules")));
            }
            let rules: Vec<Rule> = rules
                .into_iter()
                .filter(|(index, _)| index.is_some())
                .map(|(_, rule)| rule)
                .collect();
            out.push(
                AuthorizationPolicy::new(namespace.as_str(), name.as_str(), action, rules)
                    .map_err(fail)?,
            );
        }
    }
    Ok(out)
}

/// The Envoy policy name of rule `index` of a policy (Istio's format), or
/// of its no-rules marker when `index` is `None`.
pub fn policy_name(namespace: &str, name: &str, index: Option<usize>) -> String {
    match index {
        Some(i) => format!("ns[{namespace}]-policy[{name}]-rule[{i}]"),
        None => format!("ns[{namespace}]-policy[{name}]-rule[none]"),
    }
}

fn parse_policy_name(key: &str) -> Option<(&str, &str, Option<usize>)> {
    let rest = key.strip_prefix("ns[")?;
    let (namespace, rest) = rest.split_once("]-policy[")?;
    let (name, rule) = rest.rsplit_once("]-rule[")?;
    let rule = rule.strip_suffix(']')?;
    let index = match rule {
        "none" => None,
        n => Some(n.parse().ok()?),
    };
    Some((namespace, name, index))
}

/// The policies of RBAC HTTP filter configs made by
/// [`rbac_filters_to_proto`] (or read by [`rbac_from_filter_config`]): for
/// each action, DENY, ALLOW then LOG, the policies of the filters' `rules`,
/// then those of their `shadow_rules` as dry-run policies
/// ([`AuthorizationPolicy::with_dry_run`]); inside each, as
/// [`rbac_from_proto`] orders them. A filter with neither adds nothing.
///
/// The result means what the filters do only if no two of them hold
/// `rules` (or no two hold `shadow_rules`) of action ALLOW: Envoy requires
/// a request to match each ALLOW filter, the model one ALLOW policy (the
/// caller refuses such listeners, see `xds::server_listener`).
pub fn rbac_filters_from_proto(filters: &[RbacFilter]) -> Result<Vec<AuthorizationPolicy>, Error> {
    let rank = |rbac: &Rbac| match RbacAction::try_from(rbac.action) {
        Ok(RbacAction::Deny) => 0,
        Ok(RbacAction::Allow) => 1,
        _ => 2,
    };
    let mut all: Vec<(u8, bool, &Rbac)> = Vec::new();
    for filter in filters {
        if let Some(rules) = &filter.rules {
            all.push((rank(rules), false, rules));
        }
        if let Some(shadow) = &filter.shadow_rules {
            all.push((rank(shadow), true, shadow));
        }
    }
    // Stable: filters of one kind keep their order.
    all.sort_by_key(|(rank, dry_run, _)| (*rank, *dry_run));
    let mut out = Vec::new();
    for (_, dry_run, rbac) in all {
        let policies = rbac_from_proto(std::slice::from_ref(rbac));
        if !dry_run {
            out.extend(policies?);
            continue;
        }
        let policies = policies.map_err(|e| e.context("shadow_rules"))?;
        out.extend(policies.into_iter().map(|p| p.with_dry_run(true)));
    }
    Ok(out)
}

/// The RBAC HTTP filter config (`typed_config` of the filter named
/// [`RBAC_FILTER_NAME`]) enforcing `rbac` (its `rules`), encoded with its
/// policies in name order so equal inputs give equal bytes.
pub fn rbac_filter_config(rbac: &Rbac) -> crate::xds::Any {
    encode_filter(Some(rbac), None, "")
}

/// The RBAC HTTP filter config of `filter` (one of
/// [`rbac_filters_to_proto`]): its `rules`, `shadow_rules` and
/// `shadow_rules_stat_prefix`, with the policies in name order so equal
/// inputs give equal bytes. Other fields of the filter (matchers, per-rule
/// stats) are not encoded: this module never sets them.
pub fn rbac_http_filter_config(filter: &RbacFilter) -> crate::xds::Any {
    encode_filter(
        filter.rules.as_ref(),
        filter.shadow_rules.as_ref(),
        &filter.shadow_rules_stat_prefix,
    )
}

fn encode_filter(
    rules: Option<&Rbac>,
    shadow_rules: Option<&Rbac>,
    shadow_rules_stat_prefix: &str,
) -> crate::xds::Any {
    let wire = wire::RbacFilter {
        rules: rules.map(wire_rbac),
        shadow_rules: shadow_rules.map(wire_rbac),
        shadow_rules_stat_prefix: shadow_rules_stat_prefix.to_owned(),
    };
    crate::xds::Any {
        type_url: RBAC_FILTER_TYPE.to_owned(),
        value: wire.encode_to_vec(),
    }
}

fn wire_rbac(rbac: &Rbac) -> wire::Rbac {
    let mut entries: Vec<(&String, &Policy)> = rbac.policies.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    wire::Rbac {
        action: rbac.action,
        policies: entries
            .into_iter()
            .map(|(key, value)| wire::PolicyEntry {
                key: key.clone(),
                value: Some(value.clone()),
            })
            .collect(),
    }
}

/// The RBAC HTTP filter config inside a filter's `typed_config`: its
/// `rules` (absent: the filter enforces nothing) and `shadow_rules` (never
/// enforced), to read with [`rbac_filters_from_proto`]. Matcher-based
/// configurations (`matcher`, `shadow_matcher`) are unsupported; the stat
/// prefixes only name Envoy statistics and are accepted as they are.
pub fn rbac_from_filter_config(any: &crate::xds::Any) -> Result<RbacFilter, Error> {
    if crate::xds::type_name(&any.type_url) != crate::xds::type_name(RBAC_FILTER_TYPE) {
        return Err(Error::invalid(format!(
            "RBAC filter: type {:?} is not {RBAC_FILTER_TYPE}",
            any.type_url
        )));
    }
    let filter = RbacFilter::decode(any.value.as_slice())
        .map_err(|e| Error::invalid(format!("RBAC filter: cannot decode: {e}")))?;
    if filter.matcher.is_some() || filter.shadow_matcher.is_some() {
        return Err(Error::unsupported(
            "RBAC filter: matcher-based RBAC is not supported",
        ));
    }
    Ok(filter)
}

fn action_to_proto(action: Action) -> RbacAction {
    match action {
        Action::Allow => RbacAction::Allow,
        Action::Deny => RbacAction::Deny,
        Action::Audit => RbacAction::Log,
    }
}

/// A policy that matches no request.
fn matches_nothing() -> Policy {
    Policy {
        permissions: vec![Permission {
            rule: Some(permission::Rule::NotRule(Box::new(any_permission()))),
        }],
        principals: vec![Principal {
            identifier: Some(principal::Identifier::NotId(Box::new(any_principal()))),
        }],
        ..Default::default()
    }
}

// ---------------------------------------------------------------- encoding

fn any_permission() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn any_principal() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn perm(rule: permission::Rule) -> Permission {
    Permission { rule: Some(rule) }
}

fn id(identifier: principal::Identifier) -> Principal {
    Principal {
        identifier: Some(identifier),
    }
}

fn and_rules(rules: Vec<Permission>) -> Permission {
    perm(permission::Rule::AndRules(permission::Set { rules }))
}

fn or_rules(rules: Vec<Permission>) -> Permission {
    perm(permission::Rule::OrRules(permission::Set { rules }))
}

fn and_ids(ids: Vec<Principal>) -> Principal {
    id(principal::Identifier::AndIds(principal::Set { ids }))
}

fn or_ids(ids: Vec<Principal>) -> Principal {
    id(principal::Identifier::OrIds(principal::Set { ids }))
}

fn rule_to_proto(rule: &Rule) -> Policy {
    let mut permissions = Vec::new();
    let mut principals = Vec::new();
    if !rule.to.is_empty() {
        permissions.push(or_rules(rule.to.iter().map(operation_to_proto).collect()));
    }
    if !rule.from.is_empty() {
        principals.push(or_ids(rule.from.iter().map(source_to_proto).collect()));
    }
    for condition in rule.when.iter() {
        match condition {
            Condition::DestinationPort(values) => {
                permissions.push(and_rules(perm_groups(values, |p| {
                    perm(permission::Rule::DestinationPort(u32::from(*p)))
                })));
            }
            Condition::RequestHeader { name, values } => {
                principals.push(and_ids(id_groups(values, |m| {
                    id(principal::Identifier::Header(header_matcher(
                        name, m, false,
                    )))
                })));
            }
            Condition::SourcePrincipal(values) => {
                principals.push(and_ids(id_groups(values, principal_matcher)));
            }
            Condition::SourceNamespace(values) => {
                principals.push(and_ids(id_groups(values, namespace_matcher)));
            }
            Condition::SourceIp(values) => {
                principals.push(and_ids(id_groups(values, ip_matcher)));
            }
        }
    }
    let top_permission = if permissions.is_empty() {
        any_permission()
    } else {
        and_rules(permissions)
    };
    let top_principal = if principals.is_empty() {
        any_principal()
    } else {
        and_ids(principals)
    };
    Policy {
        permissions: vec![top_permission],
        principals: vec![top_principal],
        ..Default::default()
    }
}

/// `or_rules(values)` and `not_rule(or_rules(not_values))`, those non-empty.
fn perm_groups<T>(values: &Values<T>, f: impl Fn(&T) -> Permission) -> Vec<Permission> {
    let mut out = Vec::new();
    push_perm_group(&mut out, &values.values, false, &f);
    push_perm_group(&mut out, &values.not_values, true, &f);
    out
}

fn push_perm_group<T>(
    out: &mut Vec<Permission>,
    values: &[T],
    negate: bool,
    f: impl Fn(&T) -> Permission,
) {
    if values.is_empty() {
        return;
    }
    let group = or_rules(values.iter().map(f).collect());
    out.push(if negate {
        perm(permission::Rule::NotRule(Box::new(group)))
    } else {
        group
    });
}

/// `or_ids(values)` and `not_id(or_ids(not_values))`, those non-empty.
fn id_groups<T>(values: &Values<T>, f: impl Fn(&T) -> Principal) -> Vec<Principal> {
    let mut out = Vec::new();
    push_id_group(&mut out, &values.values, false, &f);
    push_id_group(&mut out, &values.not_values, true, &f);
    out
}

fn push_id_group<T>(
    out: &mut Vec<Principal>,
    values: &[T],
    negate: bool,
    f: impl Fn(&T) -> Principal,
) {
    if values.is_empty() {
        return;
    }
    let group = or_ids(values.iter().map(f).collect());
    out.push(if negate {
        id(principal::Identifier::NotId(Box::new(group)))
    } else {
        group
    });
}

fn operation_to_proto(op: &Operation) -> Permission {
    let host = |m: &StringMatch| {
        perm(permission::Rule::Header(header_matcher(
            ":authority",
            m,
            true,
        )))
    };
    let method = |m: &StringMatch| {
        perm(permission::Rule::Header(header_matcher(
            ":method", m, false,
        )))
    };
    let path = |m: &StringMatch| {
        perm(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(string_matcher(m, false))),
        }))
    };
    let port = |p: &u16| perm(permission::Rule::DestinationPort(u32::from(*p)));
    let mut groups = Vec::new();
    push_perm_group(&mut groups, &op.hosts, false, host);
    push_perm_group(&mut groups, &op.not_hosts, true, host);
    push_perm_group(&mut groups, &op.ports, false, port);
    push_perm_group(&mut groups, &op.not_ports, true, port);
    push_perm_group(&mut groups, &op.methods, false, method);
    push_perm_group(&mut groups, &op.not_methods, true, method);
    push_perm_group(&mut groups, &op.paths, false, path);
    push_perm_group(&mut groups, &op.not_paths, true, path);
    and_rules(groups)
}

fn source_to_proto(source: &Source) -> Principal {
    let mut groups = Vec::new();
    push_id_group(&mut groups, &source.principals, false, principal_matcher);
    push_id_group(&mut groups, &source.not_principals, true, principal_matcher);
    push_id_group(&mut groups, &source.namespaces, false, namespace_matcher);
    push_id_group(&mut groups, &source.not_namespaces, true, namespace_matcher);
    push_id_group(&mut groups, &source.ip_blocks, false, ip_matcher);
    push_id_group(&mut groups, &source.not_ip_blocks, true, ip_matcher);
    and_ids(groups)
}

fn regex(regex: String) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
            regex,
            engine_type: None,
        })),
        ignore_case: false,
    }
}

fn string_matcher(m: &StringMatch, ignore_case: bool) -> StringMatcher {
    let pattern = match m {
        StringMatch::Exact(s) => MatchPattern::Exact(s.to_string()),
        StringMatch::Prefix(s) => MatchPattern::Prefix(s.to_string()),
        StringMatch::Suffix(s) => MatchPattern::Suffix(s.to_string()),
        StringMatch::Any => return regex(ANY_REGEX.to_owned()),
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    }
}

fn header_matcher(name: &str, m: &StringMatch, ignore_case: bool) -> HeaderMatcher {
    let specifier = match m {
        StringMatch::Any => HeaderMatchSpecifier::PresentMatch(true),
        other => HeaderMatchSpecifier::StringMatch(string_matcher(other, ignore_case)),
    };
    HeaderMatcher {
        name: name.to_owned(),
        header_match_specifier: Some(specifier),
        ..Default::default()
    }
}

fn authenticated(m: StringMatcher) -> Principal {
    id(principal::Identifier::Authenticated(
        principal::Authenticated {
            principal_name: Some(m),
        },
    ))
}

fn principal_matcher(m: &StringMatch) -> Principal {
    authenticated(match m {
        StringMatch::Exact(s) => StringMatcher {
            match_pattern: Some(MatchPattern::Exact(format!("{SCHEME_PREFIX}{s}"))),
            ignore_case: false,
        },
        StringMatch::Prefix(s) => StringMatcher {
            match_pattern: Some(MatchPattern::Prefix(format!("{SCHEME_PREFIX}{s}"))),
            ignore_case: false,
        },
        StringMatch::Suffix(s) => regex(format!("{SUFFIX_PRINCIPAL_PREFIX}{}", escape(s))),
        StringMatch::Any => regex(ANY_REGEX.to_owned()),
    })
}

fn namespace_matcher(m: &StringMatch) -> Principal {
    let segment = match m {
        StringMatch::Exact(s) => escape(s),
        StringMatch::Prefix(s) => format!("{}{SEGMENT_REST}", escape(s)),
        StringMatch::Suffix(s) => format!("{SEGMENT_REST}{}", escape(s)),
        StringMatch::Any => SEGMENT_ANY.to_owned(),
    };
    authenticated(regex(format!(
        "{NS_REGEX_PREFIX}{segment}{NS_REGEX_SUFFIX}"
    )))
}

fn ip_matcher(block: &IpBlock) -> Principal {
    id(principal::Identifier::DirectRemoteIp(CidrRange {
        address_prefix: block.addr().to_string(),
        prefix_len: Some(UInt32Value {
            value: u32::from(block.prefix_len()),
        }),
    }))
}

/// RE2 metacharacters, escaped with a backslash.
const REGEX_META: &[char] = &[
    '\\', '.', '+', '*', '?', '(', ')', '|', '[', ']', '{', '}', '^', '$',
];

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if REGEX_META.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The literal an [`escape`]d string stands for; `None` if it has an
/// unescaped metacharacter (not our shape).
fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next()?);
        } else if REGEX_META.contains(&c) {
            return None;
        } else {
            out.push(c);
        }
    }
    Some(out)
}

// ---------------------------------------------------------------- decoding

fn unsupported(what: impl std::fmt::Display) -> Error {
    Error::unsupported(format!(
        "{what} is not supported here (gRFC A41 shape as Istio emits it)"
    ))
}

fn rule_from_proto(policy: &Policy) -> Result<Rule, Error> {
    if policy.condition.is_some() || policy.checked_condition.is_some() {
        return Err(Error::unsupported("CEL conditions are not supported"));
    }
    let ([permission], [principal]) = (policy.permissions.as_slice(), policy.principals.as_slice())
    else {
        return Err(unsupported(
            "a policy without exactly one permission and one principal",
        ));
    };
    let (to, permission_conditions) = permission_top(permission)?;
    let (from, mut when) = principal_top(principal)?;
    when.extend(permission_conditions);
    Ok(Rule {
        from: from.into(),
        to: to.into(),
        when: when.into(),
    })
}

fn permission_top(p: &Permission) -> Result<(Vec<Operation>, Vec<Condition>), Error> {
    let set = match &p.rule {
        Some(permission::Rule::Any(true)) => return Ok((Vec::new(), Vec::new())),
        Some(permission::Rule::AndRules(set)) if !set.rules.is_empty() => set,
        _ => return Err(unsupported("this permission")),
    };
    let mut to = Vec::new();
    let mut when = Vec::new();
    for (i, rule) in set.rules.iter().enumerate() {
        match &rule.rule {
            Some(permission::Rule::OrRules(ops)) if i == 0 && !ops.rules.is_empty() => {
                to = ops
                    .rules
                    .iter()
                    .map(operation_from_proto)
                    .collect::<Result<_, _>>()?;
            }
            Some(permission::Rule::AndRules(groups)) => {
                let mut ports = Values::new(Vec::new(), Vec::new());
                for group in &groups.rules {
                    let (negated, values) = perm_group(group)?;
                    let list = values
                        .into_iter()
                        .map(|v| match v {
                            PermValue::Port(p) => Ok(p),
                            _ => Err(unsupported(
                                "a permission-side condition other than destination.port",
                            )),
                        })
                        .collect::<Result<Vec<u16>, _>>()?;
                    set_once(
                        if negated {
                            &mut ports.not_values
                        } else {
                            &mut ports.values
                        },
                        list,
                        "destination.port",
                    )?;
                }
                when.push(Condition::DestinationPort(ports));
            }
            _ => return Err(unsupported("this permission")),
        }
    }
    Ok((to, when))
}

fn principal_top(p: &Principal) -> Result<(Vec<Source>, Vec<Condition>), Error> {
    let set = match &p.identifier {
        Some(principal::Identifier::Any(true)) => return Ok((Vec::new(), Vec::new())),
        Some(principal::Identifier::AndIds(set)) if !set.ids.is_empty() => set,
        _ => return Err(unsupported("this principal")),
    };
    let mut from = Vec::new();
    let mut when = Vec::new();
    for (i, item) in set.ids.iter().enumerate() {
        match &item.identifier {
            Some(principal::Identifier::OrIds(sources)) if i == 0 && !sources.ids.is_empty() => {
                from = sources
                    .ids
                    .iter()
                    .map(source_from_proto)
                    .collect::<Result<_, _>>()?;
            }
            Some(principal::Identifier::AndIds(groups)) => {
                when.push(principal_condition(&groups.ids)?);
            }
            _ => return Err(unsupported("this principal")),
        }
    }
    Ok((from, when))
}

/// One value of a permission-side matcher.
enum PermValue {
    Host(StringMatch),
    Method(StringMatch),
    Path(StringMatch),
    Port(u16),
}

/// One value of a principal-side matcher.
enum IdValue {
    Principal(StringMatch),
    Namespace(StringMatch),
    Ip(IpBlock),
    Header(Name, StringMatch),
}

/// A group: `or_rules(values)` or `not_rule(or_rules(values))`.
fn perm_group(p: &Permission) -> Result<(bool, Vec<PermValue>), Error> {
    let (negated, inner) = match &p.rule {
        Some(permission::Rule::NotRule(inner)) => (true, inner.as_ref()),
        _ => (false, p),
    };
    match &inner.rule {
        Some(permission::Rule::OrRules(set)) if !set.rules.is_empty() => Ok((
            negated,
            set.rules.iter().map(perm_value).collect::<Result<_, _>>()?,
        )),
        _ => Err(unsupported("this permission group")),
    }
}

fn perm_value(p: &Permission) -> Result<PermValue, Error> {
    match &p.rule {
        Some(permission::Rule::Header(h)) if h.name == ":authority" => {
            Ok(PermValue::Host(header_match(h, true)?))
        }
        Some(permission::Rule::Header(h)) if h.name == ":method" => {
            Ok(PermValue::Method(header_match(h, false)?))
        }
        Some(permission::Rule::Header(h)) => Err(unsupported(format!(
            "a permission header matcher on {:?}",
            h.name
        ))),
        Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(m)),
        })) => Ok(PermValue::Path(string_match(m, false)?)),
        Some(permission::Rule::DestinationPort(port)) => u16::try_from(*port)
            .ok()
            .filter(|p| *p > 0)
            .map(PermValue::Port)
            .ok_or_else(|| Error::invalid(format!("destination_port {port} is not a port"))),
        _ => Err(unsupported("this permission matcher")),
    }
}

fn id_group(p: &Principal) -> Result<(bool, Vec<IdValue>), Error> {
    let (negated, inner) = match &p.identifier {
        Some(principal::Identifier::NotId(inner)) => (true, inner.as_ref()),
        _ => (false, p),
    };
    match &inner.identifier {
        Some(principal::Identifier::OrIds(set)) if !set.ids.is_empty() => Ok((
            negated,
            set.ids.iter().map(id_value).collect::<Result<_, _>>()?,
        )),
        _ => Err(unsupported("this principal group")),
    }
}

fn id_value(p: &Principal) -> Result<IdValue, Error> {
    #[allow(deprecated)]
    match &p.identifier {
        Some(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(m),
        })) => authenticated_value(m),
        Some(
            principal::Identifier::DirectRemoteIp(cidr) | principal::Identifier::SourceIp(cidr),
        ) => cidr_block(cidr).map(IdValue::Ip),
        Some(principal::Identifier::Header(h)) => {
            let name = header_name(&h.name)?;
            Ok(IdValue::Header(name, header_match(h, false)?))
        }
        _ => Err(unsupported("this principal matcher")),
    }
}

fn operation_from_proto(p: &Permission) -> Result<Operation, Error> {
    let Some(permission::Rule::AndRules(set)) = &p.rule else {
        return Err(unsupported("this operation"));
    };
    let mut op = Operation::default();
    for group in &set.rules {
        let (negated, values) = perm_group(group)?;
        let mut hosts = Vec::new();
        let mut methods = Vec::new();
        let mut paths = Vec::new();
        let mut ports = Vec::new();
        for v in values {
            match v {
                PermValue::Host(m) => hosts.push(m),
                PermValue::Method(m) => methods.push(m),
                PermValue::Path(m) => paths.push(m),
                PermValue::Port(p) => ports.push(p),
            }
        }
        let kinds = [
            !hosts.is_empty(),
            !methods.is_empty(),
            !paths.is_empty(),
            !ports.is_empty(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(unsupported(
                "an operation group mixing hosts, methods, paths and ports",
            ));
        }
        let (h, m, pa, po) = if negated {
            (
                &mut op.not_hosts,
                &mut op.not_methods,
                &mut op.not_paths,
                &mut op.not_ports,
            )
        } else {
            (&mut op.hosts, &mut op.methods, &mut op.paths, &mut op.ports)
        };
        set_arc_once(h, hosts, "hosts")?;
        set_arc_once(m, methods, "methods")?;
        set_arc_once(pa, paths, "paths")?;
        set_arc_once(po, ports, "ports")?;
    }
    if op.is_empty() {
        return Err(unsupported("an empty operation"));
    }
    Ok(op)
}

fn source_from_proto(p: &Principal) -> Result<Source, Error> {
    let Some(principal::Identifier::AndIds(set)) = &p.identifier else {
        return Err(unsupported("this source"));
    };
    let mut source = Source::default();
    for group in &set.ids {
        let (negated, values) = id_group(group)?;
        let mut principals = Vec::new();
        let mut namespaces = Vec::new();
        let mut ips = Vec::new();
        for v in values {
            match v {
                IdValue::Principal(m) => principals.push(m),
                IdValue::Namespace(m) => namespaces.push(m),
                IdValue::Ip(b) => ips.push(b),
                IdValue::Header(..) => return Err(unsupported("a header matcher in a source")),
            }
        }
        let kinds = [
            !principals.is_empty(),
            !namespaces.is_empty(),
            !ips.is_empty(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(unsupported(
                "a source group mixing principals, namespaces and IPs",
            ));
        }
        let (p, n, i) = if negated {
            (
                &mut source.not_principals,
                &mut source.not_namespaces,
                &mut source.not_ip_blocks,
            )
        } else {
            (
                &mut source.principals,
                &mut source.namespaces,
                &mut source.ip_blocks,
            )
        };
        set_arc_once(p, principals, "principals")?;
        set_arc_once(n, namespaces, "namespaces")?;
        set_arc_once(i, ips, "ipBlocks")?;
    }
    if source.is_empty() {
        return Err(unsupported("an empty source"));
    }
    Ok(source)
}

/// A principal-side `when` condition: its groups share one key.
fn principal_condition(groups: &[Principal]) -> Result<Condition, Error> {
    #[derive(PartialEq)]
    enum Key {
        Principal,
        Namespace,
        Ip,
        Header(Name),
    }
    let mut key: Option<Key> = None;
    let mut strings = Values::new(Vec::new(), Vec::new());
    let mut ips = Values::new(Vec::new(), Vec::new());
    for group in groups {
        let (negated, values) = id_group(group)?;
        let mut group_strings = Vec::new();
        let mut group_ips = Vec::new();
        for v in values {
            let (k, ip) = match v {
                IdValue::Principal(m) => (Key::Principal, Err(m)),
                IdValue::Namespace(m) => (Key::Namespace, Err(m)),
                IdValue::Ip(b) => (Key::Ip, Ok(b)),
                IdValue::Header(name, m) => (Key::Header(name), Err(m)),
            };
            match &key {
                Some(existing) if *existing != k => {
                    return Err(unsupported("a condition mixing keys"));
                }
                Some(_) => {}
                None => key = Some(k),
            }
            match ip {
                Ok(b) => group_ips.push(b),
                Err(m) => group_strings.push(m),
            }
        }
        if !group_strings.is_empty() {
            let list = if negated {
                &mut strings.not_values
            } else {
                &mut strings.values
            };
            set_arc_once(list, group_strings, "condition values")?;
        }
        if !group_ips.is_empty() {
            let list = if negated {
                &mut ips.not_values
            } else {
                &mut ips.values
            };
            set_arc_once(list, group_ips, "condition values")?;
        }
    }
    match key {
        Some(Key::Principal) => Ok(Condition::SourcePrincipal(strings)),
        Some(Key::Namespace) => Ok(Condition::SourceNamespace(strings)),
        Some(Key::Ip) => Ok(Condition::SourceIp(ips)),
        Some(Key::Header(name)) => Ok(Condition::RequestHeader {
            name,
            values: strings,
        }),
        None => Err(unsupported("an empty condition")),
    }
}

fn set_once<T>(slot: &mut std::sync::Arc<[T]>, list: Vec<T>, what: &str) -> Result<(), Error> {
    if !slot.is_empty() {
        return Err(unsupported(format!("{what} given twice")));
    }
    *slot = list.into();
    Ok(())
}

fn set_arc_once<T>(slot: &mut std::sync::Arc<[T]>, list: Vec<T>, what: &str) -> Result<(), Error> {
    if list.is_empty() {
        return Ok(());
    }
    set_once(slot, list, what)
}

fn header_match(h: &HeaderMatcher, ignore_case: bool) -> Result<StringMatch, Error> {
    if h.invert_match || h.treat_missing_header_as_empty {
        return Err(unsupported(format!(
            "header matcher {:?} with invert_match or treat_missing_header_as_empty",
            h.name
        )));
    }
    match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::PresentMatch(true)) => Ok(StringMatch::Any),
        Some(HeaderMatchSpecifier::StringMatch(m)) => string_match(m, ignore_case),
        _ => Err(unsupported(format!("header matcher {:?}", h.name))),
    }
}

fn string_match(m: &StringMatcher, ignore_case: bool) -> Result<StringMatch, Error> {
    let literal = |s: &String| {
        if m.ignore_case != ignore_case {
            Err(unsupported(format!(
                "string matcher {s:?} with ignore_case {}",
                m.ignore_case
            )))
        } else {
            Ok(Name::from(s.as_str()))
        }
    };
    match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => Ok(StringMatch::Exact(literal(s)?)),
        Some(MatchPattern::Prefix(s)) => Ok(StringMatch::Prefix(literal(s)?)),
        Some(MatchPattern::Suffix(s)) => Ok(StringMatch::Suffix(literal(s)?)),
        Some(MatchPattern::SafeRegex(r)) if r.regex == ANY_REGEX => Ok(StringMatch::Any),
        _ => Err(unsupported("this string matcher")),
    }
}

fn authenticated_value(m: &StringMatcher) -> Result<IdValue, Error> {
    let not_spiffe = || unsupported("a principal name that is not a spiffe:// URI");
    if m.ignore_case {
        return Err(unsupported("a principal name matcher ignoring case"));
    }
    match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => {
            let p = s.strip_prefix(SCHEME_PREFIX).ok_or_else(not_spiffe)?;
            Ok(IdValue::Principal(StringMatch::Exact(Name::from(p))))
        }
        Some(MatchPattern::Prefix(s)) => {
            let p = s.strip_prefix(SCHEME_PREFIX).ok_or_else(not_spiffe)?;
            Ok(IdValue::Principal(StringMatch::Prefix(Name::from(p))))
        }
        Some(MatchPattern::SafeRegex(r)) => {
            let r = r.regex.as_str();
            if r == ANY_REGEX {
                return Ok(IdValue::Principal(StringMatch::Any));
            }
            if let Some(suffix) = r.strip_prefix(SUFFIX_PRINCIPAL_PREFIX) {
                let s = unescape(suffix).ok_or_else(|| unsupported(format!("regex {r:?}")))?;
                return Ok(IdValue::Principal(StringMatch::Suffix(Name::from(s))));
            }
            let segment = r
                .strip_prefix(NS_REGEX_PREFIX)
                .and_then(|s| s.strip_suffix(NS_REGEX_SUFFIX))
                .ok_or_else(|| unsupported(format!("regex {r:?}")))?;
            namespace_segment(segment)
                .map(IdValue::Namespace)
                .ok_or_else(|| unsupported(format!("regex {r:?}")))
        }
        _ => Err(unsupported("this principal name matcher")),
    }
}

fn namespace_segment(segment: &str) -> Option<StringMatch> {
    if segment == SEGMENT_ANY {
        return Some(StringMatch::Any);
    }
    if let Some(rest) = segment.strip_prefix(SEGMENT_REST) {
        return Some(StringMatch::Suffix(Name::from(unescape(rest)?)));
    }
    if let Some(rest) = segment.strip_suffix(SEGMENT_REST) {
        // A literal `[` is always escaped, so this is the wildcard.
        return Some(StringMatch::Prefix(Name::from(unescape(rest)?)));
    }
    Some(StringMatch::Exact(Name::from(unescape(segment)?)))
}

fn cidr_block(cidr: &CidrRange) -> Result<IpBlock, Error> {
    let addr = cidr
        .address_prefix
        .parse()
        .map_err(|_| Error::invalid(format!("{:?} is not an IP address", cidr.address_prefix)))?;
    let len = cidr.prefix_len.as_ref().map_or(0, |l| l.value);
    let len = u8::try_from(len)
        .map_err(|_| Error::invalid(format!("prefix length {len} is too long")))?;
    IpBlock::new(addr, len)
}

/// Wire mirrors of the RBAC filter config with the policy map as an ordered
/// list of entries (how a protobuf map is encoded), for deterministic bytes.
mod wire {
    use envoy_types::pb::envoy::config::rbac::v3::Policy;

    /// `envoy.extensions.filters.http.rbac.v3.RBAC`: `rules`,
    /// `shadow_rules` and `shadow_rules_stat_prefix`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct RbacFilter {
        #[prost(message, optional, tag = "1")]
        pub(super) rules: Option<Rbac>,
        #[prost(message, optional, tag = "2")]
        pub(super) shadow_rules: Option<Rbac>,
        #[prost(string, tag = "3")]
        pub(super) shadow_rules_stat_prefix: String,
    }

    /// `envoy.config.rbac.v3.RBAC` without audit options.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Rbac {
        #[prost(int32, tag = "1")]
        pub(super) action: i32,
        #[prost(message, repeated, tag = "2")]
        pub(super) policies: Vec<PolicyEntry>,
    }

    /// One `map<string, Policy>` entry.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct PolicyEntry {
        #[prost(string, tag = "1")]
        pub(super) key: String,
        #[prost(message, optional, tag = "2")]
        pub(super) value: Option<Policy>,
    }
}

#[cfg(test)]
mod tests;
