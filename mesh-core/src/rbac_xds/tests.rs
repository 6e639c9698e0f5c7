use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::rbac::v3::rbac::Action as RbacAction;
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Policy, Principal, Rbac};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use proptest::prelude::*;

use super::*;
use crate::ErrorKind;
use crate::rbac::{Action, AuthorizationPolicy, Condition, IpBlock, Operation, Rule, Source};

fn sm(list: &[&str]) -> Arc<[StringMatch]> {
    list.iter()
        .map(|s| StringMatch::parse(s).unwrap())
        .collect()
}

/// The reference example of Istio's AuthorizationPolicy page.
fn reference_policy() -> AuthorizationPolicy {
    AuthorizationPolicy::new(
        "foo",
        "httpbin",
        Action::Allow,
        vec![Rule {
            from: vec![
                Source {
                    principals: sm(&["cluster.local/ns/default/sa/sleep"]),
                    ..Default::default()
                },
                Source {
                    namespaces: sm(&["test"]),
                    ..Default::default()
                },
            ]
            .into(),
            to: vec![Operation {
                methods: sm(&["GET"]),
                paths: sm(&["/info*"]),
                ..Default::default()
            }]
            .into(),
            when: vec![Condition::parse("request.headers[x-token]", &["*"], &[]).unwrap()].into(),
        }],
    )
    .unwrap()
}

#[test]
fn reference_policy_has_the_a41_shape() {
    let rbacs = rbac_to_proto(&[reference_policy()]);
    let [rbac] = rbacs.as_slice() else {
        panic!("one RBAC per action: {rbacs:?}")
    };
    assert_eq!(rbac.action, RbacAction::Allow as i32);
    let policy = &rbac.policies["ns[foo]-policy[httpbin]-rule[0]"];
    let debug = format!("{policy:?}");
    for needle in [
        "Exact(\"spiffe://cluster.local/ns/default/sa/sleep\")",
        "regex: \"spiffe://[^/]+/ns/test/sa/[^/]+\"",
        "name: \":method\"",
        "Exact(\"GET\")",
        "UrlPath",
        "Prefix(\"/info\")",
        "name: \"x-token\"",
        "PresentMatch(true)",
    ] {
        assert!(debug.contains(needle), "{needle} not in {debug}");
    }
    assert_eq!(rbac_from_proto(&rbacs).unwrap(), vec![reference_policy()]);
}

#[test]
fn actions_are_ordered_deny_allow_log_and_absent_ones_omitted() {
    let p = |name: &str, action| AuthorizationPolicy::new("ns", name, action, vec![]).unwrap();
    let rbacs = rbac_to_proto(&[
        p("a", Action::Audit),
        p("b", Action::Allow),
        p("c", Action::Deny),
    ]);
    let actions: Vec<i32> = rbacs.iter().map(|r| r.action).collect();
    assert_eq!(
        actions,
        [
            RbacAction::Deny as i32,
            RbacAction::Allow as i32,
            RbacAction::Log as i32
        ]
    );
    assert!(
        rbac_to_proto(&[p("d", Action::Deny)])
            .iter()
            .all(|r| r.action != RbacAction::Allow as i32)
    );
    assert!(rbac_to_proto(&[]).is_empty());
    // An ALLOW policy without rules keeps a policy that matches nothing.
    let rbacs = rbac_to_proto(&[p("allow-nothing", Action::Allow)]);
    assert!(
        rbacs[0]
            .policies
            .contains_key("ns[ns]-policy[allow-nothing]-rule[none]")
    );
    assert_eq!(
        rbac_from_proto(&rbacs).unwrap(),
        vec![p("allow-nothing", Action::Allow)]
    );
}

#[test]
fn filter_config_is_deterministic_and_round_trips() {
    let policies: Vec<AuthorizationPolicy> = (0..20)
        .map(|i| {
            AuthorizationPolicy::new("ns", format!("p{i}"), Action::Deny, vec![Rule::default()])
                .unwrap()
        })
        .collect();
    let rbac = &rbac_to_proto(&policies)[0];
    let any = rbac_filter_config(rbac);
    assert_eq!(any.type_url, RBAC_FILTER_TYPE);
    // A map rebuilt in another order encodes to the same bytes.
    let mut rebuilt = Rbac {
        action: rbac.action,
        ..Default::default()
    };
    let mut entries: Vec<_> = rbac.policies.iter().collect();
    entries.reverse();
    for (k, v) in entries {
        rebuilt.policies.insert(k.clone(), v.clone());
    }
    assert_eq!(rbac_filter_config(&rebuilt).value, any.value);
    let back = rbac_from_filter_config(&any).unwrap();
    assert_eq!(back.rules.as_ref(), Some(rbac));
    assert_eq!(back.shadow_rules, None);
    let wrong = crate::xds::Any {
        type_url: "type.googleapis.com/x".into(),
        value: vec![],
    };
    assert_eq!(
        rbac_from_filter_config(&wrong).unwrap_err().kind(),
        ErrorKind::InvalidConfig
    );
    let empty = crate::xds::Any {
        type_url: RBAC_FILTER_TYPE.into(),
        value: vec![],
    };
    let empty = rbac_from_filter_config(&empty).unwrap();
    assert_eq!((empty.rules, empty.shadow_rules), (None, None));
    assert!(
        rbac_filters_from_proto(&[RbacFilter::default()])
            .unwrap()
            .is_empty()
    );
}

/// How Envoy and gRPC read an RBAC filter config (gRFC A41; grpc-go's
/// `parseConfig`): an absent `rules` (or a LOG one) enforces nothing,
/// `shadow_rules` never enforce; otherwise ALLOW lets through what matches
/// a policy, DENY what matches none. `true`: the filter lets the request through.
fn enforced_by_grpc(filter: &RbacFilter, matches: impl Fn(&str) -> bool) -> bool {
    let Some(rules) = &filter.rules else {
        return true;
    };
    let hit = rules.policies.keys().any(|k| matches(k));
    match RbacAction::try_from(rules.action) {
        Ok(RbacAction::Allow) => hit,
        Ok(RbacAction::Deny) => !hit,
        _ => true,
    }
}

fn dry(name: &str, action: Action) -> AuthorizationPolicy {
    AuthorizationPolicy::new("shop", name, action, vec![Rule::default()])
        .unwrap()
        .with_dry_run(true)
}

/// A workload whose only ALLOW policy is a dry-run one keeps every request
/// flowing: its ALLOW filter has shadow rules and no `rules` at all (a
/// present but empty ALLOW `rules` would deny everything in Envoy and gRPC).
#[test]
fn a_dry_run_only_allow_policy_enforces_nothing() {
    let filters = rbac_filters_to_proto(&[dry("allow-frontend", Action::Allow)]);
    let [filter] = filters.as_slice() else {
        panic!("one filter for the ALLOW action: {filters:?}")
    };
    assert_eq!(filter.rules, None);
    let shadow = filter.shadow_rules.as_ref().expect("shadow rules");
    assert_eq!(shadow.action, RbacAction::Allow as i32);
    assert!(
        shadow
            .policies
            .contains_key("ns[shop]-policy[allow-frontend]-rule[0]")
    );
    assert_eq!(filter.shadow_rules_stat_prefix, "istio_dry_run_allow_");
    // gRPC and Envoy allow a request that matches no policy at all.
    assert!(enforced_by_grpc(filter, |_| false));
    // No enforced message exists for it.
    assert!(rbac_to_proto(&[dry("allow-frontend", Action::Allow)]).is_empty());
    // Our own client reads it back as a dry-run policy, which `evaluate`
    // skips and `evaluate_dry_run` reports.
    let any = rbac_http_filter_config(filter);
    let back = rbac_filters_from_proto(&[rbac_from_filter_config(&any).unwrap()]).unwrap();
    assert_eq!(back, vec![dry("allow-frontend", Action::Allow)]);
    assert!(back[0].is_dry_run());
}

/// Enforced and dry-run policies of one action share its filter: the
/// enforced ones are `rules` (so enforcement does not change), the dry-run
/// ones `shadow_rules` with Istio's stat prefix per action.
#[test]
fn dry_run_policies_are_the_shadow_rules_of_their_actions_filter() {
    let enforced =
        AuthorizationPolicy::new("shop", "deny-admin", Action::Deny, vec![Rule::default()])
            .unwrap();
    let policies = vec![
        enforced.clone(),
        dry("deny-all", Action::Deny),
        dry("allow-some", Action::Allow),
        dry("audit-all", Action::Audit),
    ];
    let filters = rbac_filters_to_proto(&policies);
    let summary: Vec<(Option<i32>, Option<i32>, &str)> = filters
        .iter()
        .map(|f| {
            (
                f.rules.as_ref().map(|r| r.action),
                f.shadow_rules.as_ref().map(|r| r.action),
                f.shadow_rules_stat_prefix.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                Some(RbacAction::Deny as i32),
                Some(RbacAction::Deny as i32),
                "istio_dry_run_deny_"
            ),
            (None, Some(RbacAction::Allow as i32), "istio_dry_run_allow_"),
            // Istio gives LOG shadow rules no prefix.
            (None, Some(RbacAction::Log as i32), ""),
        ]
    );
    let deny = &filters[0];
    assert_eq!(
        deny.rules
            .as_ref()
            .unwrap()
            .policies
            .keys()
            .collect::<Vec<_>>(),
        ["ns[shop]-policy[deny-admin]-rule[0]"]
    );
    assert_eq!(
        deny.shadow_rules
            .as_ref()
            .unwrap()
            .policies
            .keys()
            .collect::<Vec<_>>(),
        ["ns[shop]-policy[deny-all]-rule[0]"]
    );
    // Enforcement is exactly that of the enforced policy alone.
    assert_eq!(
        rbac_to_proto(&policies),
        rbac_to_proto(std::slice::from_ref(&enforced))
    );
    // Without dry-run policies the bytes are those of the enforced message.
    let plain = rbac_filters_to_proto(std::slice::from_ref(&enforced));
    assert_eq!(
        rbac_http_filter_config(&plain[0]).value,
        rbac_filter_config(&rbac_to_proto(&[enforced])[0]).value
    );
    // Decoded: per action, enforced first, then dry-run.
    let back = rbac_filters_from_proto(&filters).unwrap();
    let ids: Vec<(&str, bool)> = back.iter().map(|p| (&**p.id(), p.is_dry_run())).collect();
    assert_eq!(
        ids,
        [
            ("shop/deny-admin", false),
            ("shop/deny-all", true),
            ("shop/allow-some", true),
            ("shop/audit-all", true),
        ]
    );
}

/// A foreign config with an ALLOW `rules` that has no policy denies every
/// request in Envoy and gRPC; the model cannot say it, and reading it as
/// "no ALLOW policy" would fail open, so it is refused (the client NACKs).
#[test]
fn an_empty_allow_rules_is_refused_not_read_as_allow_all() {
    let filter = RbacFilter {
        rules: Some(Rbac {
            action: RbacAction::Allow as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(!enforced_by_grpc(&filter, |_| true));
    let err = rbac_filters_from_proto(&[filter]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("denies every request"), "{err}");
    // An empty DENY denies nothing: that one the model can say.
    let deny = Rbac {
        action: RbacAction::Deny as i32,
        ..Default::default()
    };
    assert_eq!(rbac_from_proto(&[deny]).unwrap(), vec![]);
}

/// A shadow rule that cannot be read is an error naming `shadow_rules`.
#[test]
fn a_bad_shadow_rule_is_refused_naming_shadow_rules() {
    let mut filter = rbac_filters_to_proto(&[dry("deny-all", Action::Deny)]).remove(0);
    if let Some(shadow) = &mut filter.shadow_rules {
        let p = shadow.policies.values_mut().next().unwrap();
        p.condition = Some(Default::default());
    }
    let err = rbac_filters_from_proto(&[filter]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("shadow_rules"), "{err}");
}

#[test]
fn what_grpc_or_istio_could_send_but_we_cannot_enforce_is_refused() {
    let base = rbac_to_proto(&[reference_policy()]).remove(0);
    let key = "ns[foo]-policy[httpbin]-rule[0]".to_string();
    let with_policy = |f: &dyn Fn(&mut Policy)| {
        let mut rbac = base.clone();
        if let Some(p) = rbac.policies.get_mut(&key) {
            f(p);
        }
        rbac
    };
    let cases: Vec<(&str, Rbac)> = vec![
        (
            "a CEL condition",
            with_policy(&|p| p.condition = Some(Default::default())),
        ),
        (
            "remote_ip",
            with_policy(&|p| {
                p.principals = vec![Principal {
                    identifier: Some(principal::Identifier::RemoteIp(Default::default())),
                }]
            }),
        ),
        (
            "two permissions",
            with_policy(&|p| p.permissions.push(p.permissions[0].clone())),
        ),
        (
            "requested server name",
            with_policy(&|p| {
                p.permissions = vec![Permission {
                    rule: Some(permission::Rule::RequestedServerName(Default::default())),
                }]
            }),
        ),
        ("a foreign policy name", {
            let mut rbac = base.clone();
            let p = rbac.policies.remove(&key).unwrap();
            rbac.policies.insert("allow-sleep".into(), p);
            rbac
        }),
        ("audit logging options", {
            let mut rbac = base.clone();
            rbac.audit_logging_options = Some(Default::default());
            rbac
        }),
    ];
    for (what, rbac) in cases {
        let err = rbac_from_proto(&[rbac]).expect_err(what);
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{what}: {err}");
    }
    // A principal name matcher that is not a SPIFFE URI.
    let mut rbac = base.clone();
    let debug_before = format!("{rbac:?}");
    if let Some(p) = rbac.policies.get_mut(&key) {
        rewrite_exact(p, "spiffe://cluster.local/ns/default/sa/sleep", "sleep");
    }
    assert_ne!(format!("{rbac:?}"), debug_before);
    let err = rbac_from_proto(&[rbac]).unwrap_err();
    assert!(
        err.to_string().contains("ns[foo]-policy[httpbin]-rule[0]"),
        "{err}"
    );
}

/// Replaces an exact principal-name matcher's value, wherever it is.
fn rewrite_exact(p: &mut Policy, from: &str, to: &str) {
    fn walk(p: &mut Principal, from: &str, to: &str) {
        match &mut p.identifier {
            Some(principal::Identifier::AndIds(s) | principal::Identifier::OrIds(s)) => {
                s.ids.iter_mut().for_each(|i| walk(i, from, to))
            }
            Some(principal::Identifier::NotId(i)) => walk(i, from, to),
            Some(principal::Identifier::Authenticated(a)) => {
                if let Some(m) = &mut a.principal_name
                    && m.match_pattern == Some(MatchPattern::Exact(from.into()))
                {
                    m.match_pattern = Some(MatchPattern::Exact(to.into()));
                }
            }
            _ => {}
        }
    }
    p.principals.iter_mut().for_each(|i| walk(i, from, to));
}

// ------------------------------------------------------------ round trip

/// Literal text for matchers, with regex metacharacters so escaping is
/// exercised (no `*`, which the wildcard syntax reserves).
fn text() -> impl Strategy<Value = Name> + Clone {
    "[a-zA-Z0-9./_:+?()|{}^$\\[\\]\\\\-]{1,8}".prop_map(|s| Name::from(s.as_str()))
}

/// A namespace-like segment (what SPIFFE allows there).
fn segment() -> impl Strategy<Value = Name> + Clone {
    "[a-zA-Z0-9._-]{1,8}".prop_map(|s| Name::from(s.as_str()))
}

fn matcher(
    text: impl Strategy<Value = Name> + Clone,
) -> impl Strategy<Value = StringMatch> + Clone {
    prop_oneof![
        text.clone().prop_map(StringMatch::Exact),
        text.clone().prop_map(StringMatch::Prefix),
        text.prop_map(StringMatch::Suffix),
        Just(StringMatch::Any),
    ]
}

fn matchers(
    text: impl Strategy<Value = Name> + Clone,
) -> impl Strategy<Value = Arc<[StringMatch]>> {
    prop::collection::vec(matcher(text), 0..3).prop_map(Arc::from)
}

fn ip_block() -> impl Strategy<Value = IpBlock> + Clone {
    prop_oneof![
        (any::<u32>(), 0u8..=32)
            .prop_map(|(a, l)| IpBlock::new(IpAddr::V4(Ipv4Addr::from(a)), l).unwrap()),
        (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpBlock::new(
            IpAddr::V6(Ipv6Addr::from(a)),
            l
        )
        .unwrap()),
    ]
}

fn ip_blocks() -> impl Strategy<Value = Arc<[IpBlock]>> {
    prop::collection::vec(ip_block(), 0..3).prop_map(Arc::from)
}

fn ports() -> impl Strategy<Value = Arc<[u16]>> {
    prop::collection::vec(1u16.., 0..3).prop_map(Arc::from)
}

fn source() -> impl Strategy<Value = Source> {
    (
        matchers(text()),
        matchers(text()),
        matchers(segment()),
        matchers(segment()),
        ip_blocks(),
        ip_blocks(),
    )
        .prop_map(|(p, np, n, nn, i, ni)| Source {
            principals: p,
            not_principals: np,
            namespaces: n,
            not_namespaces: nn,
            ip_blocks: i,
            not_ip_blocks: ni,
        })
        .prop_filter("Istio rejects an empty source", |s| !s.is_empty())
}

fn operation() -> impl Strategy<Value = Operation> {
    (
        (matchers(text()), matchers(text()), ports(), ports()),
        (
            matchers(text()),
            matchers(text()),
            matchers(text()),
            matchers(text()),
        ),
    )
        .prop_map(|((h, nh, p, np), (m, nm, pa, npa))| Operation {
            hosts: h,
            not_hosts: nh,
            ports: p,
            not_ports: np,
            methods: m,
            not_methods: nm,
            paths: pa,
            not_paths: npa,
        })
        .prop_filter("Istio rejects an empty operation", |o| !o.is_empty())
}

fn values<T: std::fmt::Debug + Clone>(
    item: impl Strategy<Value = T> + Clone,
) -> impl Strategy<Value = Values<T>> {
    (
        prop::collection::vec(item.clone(), 0..3),
        prop::collection::vec(item, 0..3),
    )
        .prop_map(|(v, n)| Values::new(v, n))
        .prop_filter("values or notValues", |v| !v.is_empty())
}

fn condition() -> impl Strategy<Value = Condition> {
    let header = prop_oneof![
        "[a-z][a-z0-9-]{0,8}".prop_map(|s| Name::from(s.as_str())),
        Just(Name::from(":authority")),
        Just(Name::from(":path")),
    ];
    prop_oneof![
        (header, values(matcher(text())))
            .prop_map(|(name, values)| Condition::RequestHeader { name, values }),
        values(matcher(text())).prop_map(Condition::SourcePrincipal),
        values(matcher(segment())).prop_map(Condition::SourceNamespace),
        values(ip_block()).prop_map(Condition::SourceIp),
        values(1u16..).prop_map(Condition::DestinationPort),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(source(), 0..3),
        prop::collection::vec(operation(), 0..3),
        prop::collection::vec(condition(), 0..3),
    )
        .prop_map(|(from, to, when)| Rule {
            from: from.into(),
            to: to.into(),
            when: when.into(),
        })
}

fn policies() -> impl Strategy<Value = Vec<AuthorizationPolicy>> {
    let action = prop_oneof![Just(Action::Allow), Just(Action::Deny), Just(Action::Audit)];
    prop::collection::vec(
        (
            "[a-z]{1,3}",
            action,
            prop::collection::vec(rule(), 0..3),
            prop::bool::weighted(0.3),
        ),
        0..5,
    )
    .prop_map(|list| {
        list.into_iter()
            .enumerate()
            .map(|(i, (ns, action, rules, dry_run))| {
                AuthorizationPolicy::new(ns.as_str(), format!("p{i}"), action, rules)
                    .unwrap()
                    .with_dry_run(dry_run)
            })
            .collect()
    })
}

/// The order decoding produces: policies by action (DENY, ALLOW, AUDIT),
/// enforced before dry-run, then namespace and name; in each rule the
/// principal-side conditions before `destination.port` ones (`when` is an
/// AND: order carries no meaning).
fn normalized(mut policies: Vec<AuthorizationPolicy>) -> Vec<AuthorizationPolicy> {
    policies.sort_by(|a, b| {
        (a.action(), a.is_dry_run(), a.namespace(), a.name()).cmp(&(
            b.action(),
            b.is_dry_run(),
            b.namespace(),
            b.name(),
        ))
    });
    policies
        .into_iter()
        .map(|p| {
            let rules = p
                .rules()
                .iter()
                .map(|r| {
                    let mut when = r.when.to_vec();
                    when.sort_by_key(|c| matches!(c, Condition::DestinationPort(_)));
                    Rule {
                        when: when.into(),
                        ..r.clone()
                    }
                })
                .collect();
            AuthorizationPolicy::new(p.namespace().clone(), p.name().clone(), p.action(), rules)
                .unwrap()
                .with_dry_run(p.is_dry_run())
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn model_to_proto_to_model(policies in policies()) {
        // The enforced messages carry the enforced policies only.
        let rbacs = rbac_to_proto(&policies);
        let back = rbac_from_proto(&rbacs).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let enforced: Vec<AuthorizationPolicy> =
            policies.iter().filter(|p| !p.is_dry_run()).cloned().collect();
        prop_assert_eq!(&back, &normalized(enforced));
        // The filters carry all of them, dry-run ones as shadow rules.
        let filters = rbac_filters_to_proto(&policies);
        let back = rbac_filters_from_proto(&filters)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &normalized(policies.clone()));
        // Through the filter configs' bytes, too.
        let through_any: Vec<RbacFilter> = filters
            .iter()
            .map(|f| rbac_from_filter_config(&rbac_http_filter_config(f)).unwrap())
            .collect();
        prop_assert_eq!(&through_any, &filters);
        // No filter's `rules` is present without a policy: an empty ALLOW
        // `rules` would deny everything.
        for f in &filters {
            prop_assert!(f.rules.as_ref().is_none_or(|r| !r.policies.is_empty()));
        }
        // And enforcement is what it is without the dry-run policies.
        prop_assert_eq!(rbac_to_proto(&policies), filters.iter().filter_map(|f| f.rules.clone()).collect::<Vec<_>>());
    }

    #[test]
    fn decoding_random_policy_names_never_panics(name in ".{0,40}") {
        let rbac = Rbac {
            action: 0,
            policies: [(name, Policy::default())].into_iter().collect(),
            ..Default::default()
        };
        let _ = rbac_from_proto(&[rbac]);
    }
}

#[test]
fn escaping_round_trips() {
    for s in ["a.b", "x\\", "[^/]*", "a\\[", "$^|", "(){}?+"] {
        assert_eq!(unescape(&escape(s)).as_deref(), Some(s), "{s}");
    }
    assert_eq!(unescape("a.b"), None);
    assert_eq!(unescape("a\\"), None);
}

/// Through a whole server listener (gRFC A36), as mesh-control serves it
/// and our client reads it: dry-run policies come back as dry-run, the
/// ALLOW filter of a workload with only a dry-run ALLOW policy has no
/// `rules`, and a second filter with ALLOW shadow rules is refused.
#[test]
fn server_listeners_carry_dry_run_policies_as_shadow_rules() {
    use envoy_types::pb::envoy::config::listener::v3::filter;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_filter::ConfigType,
    };

    use crate::model::{MtlsMode, ServerListener};
    use crate::xds::{decode_server_listener, encode_server_listener, server_listener_to_proto};

    let enforced =
        AuthorizationPolicy::new("shop", "deny-admin", Action::Deny, vec![Rule::default()])
            .unwrap();
    let listener = ServerListener {
        name: "grpc/server?xds.resource.listening_address=10.0.0.7:8080".into(),
        address: "10.0.0.7:8080".parse().unwrap(),
        mtls: MtlsMode::Strict,
        policies: vec![
            enforced,
            dry("deny-all", Action::Deny),
            dry("allow-frontend", Action::Allow),
        ]
        .into(),
        rate_limit: None,
        cors: Default::default(),
    };
    let back = decode_server_listener(&encode_server_listener(&listener)).unwrap();
    assert_eq!(back, listener);
    assert_eq!(
        back.policies.iter().filter(|p| p.is_dry_run()).count(),
        2,
        "{back:?}"
    );

    let mut proto = server_listener_to_proto(&listener);
    let hcm_of = |proto: &envoy_types::pb::envoy::config::listener::v3::Listener| {
        let Some(filter::ConfigType::TypedConfig(any)) =
            &proto.filter_chains[0].filters[0].config_type
        else {
            panic!("no HCM")
        };
        HttpConnectionManager::decode(any.value.as_slice()).unwrap()
    };
    let hcm = hcm_of(&proto);
    let rbac_filters: Vec<RbacFilter> = hcm
        .http_filters
        .iter()
        .filter_map(|f| match &f.config_type {
            Some(ConfigType::TypedConfig(any)) if any.type_url == RBAC_FILTER_TYPE => {
                Some(RbacFilter::decode(any.value.as_slice()).unwrap())
            }
            _ => None,
        })
        .collect();
    assert_eq!(rbac_filters.len(), 2, "{rbac_filters:?}");
    let allow = &rbac_filters[1];
    assert_eq!(allow.rules, None, "no ALLOW rules: nothing is denied");
    assert_eq!(allow.shadow_rules_stat_prefix, DRY_RUN_ALLOW_STAT_PREFIX);
    assert_eq!(
        rbac_filters[0].shadow_rules_stat_prefix,
        DRY_RUN_DENY_STAT_PREFIX
    );

    // A second filter with ALLOW shadow rules: refused, naming it.
    let mut hcm = hcm;
    let second = hcm.http_filters[1].clone();
    hcm.http_filters.insert(2, second);
    if let Some(filter::ConfigType::TypedConfig(any)) =
        &mut proto.filter_chains[0].filters[0].config_type
    {
        any.value = hcm.encode_to_vec();
    }
    let err = crate::xds::server_listener_from_proto(&proto).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(
        err.to_string()
            .contains("http_filters[2]: a second ALLOW RBAC filter with ALLOW shadow_rules"),
        "{err}"
    );
}
