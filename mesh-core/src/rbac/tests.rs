//! Table tests: examples from Istio's AuthorizationPolicy reference and its
//! security tasks (authorization for HTTP traffic, explicit deny, ingress
//! allow-nothing / deny-all), with the results Istio documents.

use std::net::IpAddr;

use http::HeaderMap;

use super::*;
use crate::ErrorKind;

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
const TEST_NS: &str = "spiffe://cluster.local/ns/test/sa/client";
const FOO_NS: &str = "spiffe://cluster.local/ns/foo/sa/httpbin";
const BAR_NS: &str = "spiffe://cluster.local/ns/bar/sa/curl";

fn sm(list: &[&str]) -> Arc<[StringMatch]> {
    list.iter()
        .map(|s| StringMatch::parse(s).unwrap())
        .collect()
}

fn ips(list: &[&str]) -> Arc<[IpBlock]> {
    list.iter().map(|s| IpBlock::parse(s).unwrap()).collect()
}

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy::new("foo", name, action, rules).unwrap()
}

fn when(key: &str, values: &[&str], not_values: &[&str]) -> Condition {
    Condition::parse(key, values, not_values).unwrap()
}

/// A request, owned, for building [`RequestAttributes`].
struct Req {
    peer: Option<SpiffeId>,
    ip: IpAddr,
    host: String,
    port: u16,
    method: String,
    path: String,
    headers: HeaderMap,
}

fn req(method: &str, path: &str) -> Req {
    Req {
        peer: None,
        ip: "10.0.0.1".parse().unwrap(),
        host: "httpbin.foo:8000".into(),
        port: 8000,
        method: method.into(),
        path: path.into(),
        headers: HeaderMap::new(),
    }
}

impl Req {
    fn from(mut self, peer: &str) -> Self {
        self.peer = Some(SpiffeId::parse(peer).unwrap());
        self
    }
    fn ip(mut self, ip: &str) -> Self {
        self.ip = ip.parse().unwrap();
        self
    }
    fn host(mut self, host: &str) -> Self {
        self.host = host.into();
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.append(name, value.parse().unwrap());
        self
    }
    fn attrs(&self) -> RequestAttributes<'_> {
        RequestAttributes {
            peer: self.peer.as_ref(),
            source_ip: self.ip,
            host: &self.host,
            destination_port: self.port,
            method: &self.method,
            path: &self.path,
            headers: &self.headers,
        }
    }
}

/// Asserts each `(request, allowed)` of a table against `policies`.
fn check(policies: &[AuthorizationPolicy], table: &[(Req, bool)]) {
    for (i, (r, allowed)) in table.iter().enumerate() {
        let d = evaluate(policies, &r.attrs());
        assert_eq!(
            d.allowed, *allowed,
            "case {i}: {} {} from {:?} ({:?}, host {}, port {}): {d:?}",
            r.method, r.path, r.peer, r.ip, r.host, r.port
        );
    }
}

#[test]
fn no_policy_allows() {
    let d = evaluate(&[], &req("GET", "/").attrs());
    assert!(d.allowed);
    assert_eq!(d.reason, Reason::NoAllowPolicies);
    assert_eq!(d.policy, None);
    assert!(!d.audit);
}

/// Istio: "allow-nothing" — an ALLOW policy without rules denies everything.
#[test]
fn allow_nothing() {
    let p = [policy("allow-nothing", Action::Allow, vec![])];
    let d = evaluate(&p, &req("GET", "/").from(SLEEP).attrs());
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::NoAllowPolicyMatched);
    assert_eq!(d.policy, None);
}

/// Istio: "allow-all" — one empty rule matches every request.
#[test]
fn allow_all() {
    let p = [
        policy("allow-nothing", Action::Allow, vec![]),
        policy("allow-all", Action::Allow, vec![Rule::default()]),
    ];
    let d = evaluate(&p, &req("DELETE", "/x").attrs());
    assert!(d.allowed);
    assert_eq!(d.policy.as_deref(), Some("foo/allow-all"));
    assert_eq!(d.reason, Reason::AllowedByPolicy);
}

/// Istio: "deny-all" — DENY with one empty rule denies even when an ALLOW
/// policy allows all (DENY first).
#[test]
fn deny_all_beats_allow_all() {
    let p = [
        policy("allow-all", Action::Allow, vec![Rule::default()]),
        policy("deny-all", Action::Deny, vec![Rule::default()]),
    ];
    let d = evaluate(&p, &req("GET", "/").from(SLEEP).attrs());
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("foo/deny-all"));
    assert_eq!(d.reason, Reason::DeniedByPolicy);
    // A DENY policy without rules matches nothing.
    let p = [policy("deny-nothing", Action::Deny, vec![])];
    assert!(evaluate(&p, &req("GET", "/").attrs()).allowed);
}

/// The reference page's first example (without its JWT condition): two
/// sources (a principal or a namespace) × two operations (GET /info* or
/// POST /data).
#[test]
fn reference_example_sources_and_operations() {
    let rule = Rule {
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
        to: vec![
            Operation {
                methods: sm(&["GET"]),
                paths: sm(&["/info*"]),
                ..Default::default()
            },
            Operation {
                methods: sm(&["POST"]),
                paths: sm(&["/data"]),
                ..Default::default()
            },
        ]
        .into(),
        when: Arc::from([]),
    };
    let p = [policy("httpbin", Action::Allow, vec![rule])];
    check(
        &p,
        &[
            (req("GET", "/info").from(SLEEP), true),
            (req("GET", "/info/details?x=1").from(SLEEP), true),
            (req("POST", "/data").from(TEST_NS), true),
            (req("POST", "/data/more").from(TEST_NS), false),
            (req("DELETE", "/data").from(SLEEP), false),
            (req("GET", "/info").from(PRODUCTPAGE), false),
            (req("GET", "/info"), false),
        ],
    );
}

/// Istio: DENY requests from any namespace but `foo` (notNamespaces). A
/// plaintext request has no namespace, so it is denied too.
#[test]
fn deny_not_namespaces() {
    let p = [policy(
        "deny-other-namespaces",
        Action::Deny,
        vec![Rule {
            from: vec![Source {
                not_namespaces: sm(&["foo"]),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        }],
    )];
    check(
        &p,
        &[
            (req("GET", "/").from(FOO_NS), true),
            (req("GET", "/").from(BAR_NS), false),
            (req("GET", "/"), false),
        ],
    );
}

/// Istio's explicit-deny task: DENY GET unless `x-token: admin`, then an
/// ALLOW for `/ip` only.
#[test]
fn explicit_deny_with_header_condition_then_allow_path() {
    let deny = policy(
        "deny-method-get",
        Action::Deny,
        vec![Rule {
            to: vec![Operation {
                methods: sm(&["GET"]),
                ..Default::default()
            }]
            .into(),
            when: vec![when("request.headers[x-token]", &[], &["admin"])].into(),
            ..Default::default()
        }],
    );
    check(
        std::slice::from_ref(&deny),
        &[
            (req("GET", "/get").header("x-token", "guest"), false),
            (req("GET", "/get"), false),
            (req("GET", "/get").header("x-token", "admin"), true),
            (req("POST", "/post").header("x-token", "guest"), true),
        ],
    );
    let allow = policy(
        "allow-path-ip",
        Action::Allow,
        vec![Rule {
            to: vec![Operation {
                paths: sm(&["/ip"]),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        }],
    );
    let both = [deny, allow];
    check(
        &both,
        &[
            (req("GET", "/ip").header("x-token", "admin"), true),
            (req("GET", "/headers").header("x-token", "admin"), false),
            (req("GET", "/ip").header("x-token", "guest"), false),
        ],
    );
    let d = evaluate(&both, &req("GET", "/ip").header("x-token", "guest").attrs());
    assert_eq!(d.policy.as_deref(), Some("foo/deny-method-get"));
}

/// Istio: DENY requests without a peer identity (`notPrincipals: ["*"]`),
/// and ALLOW with `principals: ["*"]` (any authenticated peer).
#[test]
fn require_mtls_two_ways() {
    let deny = [policy(
        "require-mtls",
        Action::Deny,
        vec![Rule {
            from: vec![Source {
                not_principals: sm(&["*"]),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        }],
    )];
    let allow = [policy(
        "any-authenticated",
        Action::Allow,
        vec![Rule {
            from: vec![Source {
                principals: sm(&["*"]),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        }],
    )];
    for p in [&deny[..], &allow[..]] {
        check(
            p,
            &[
                (req("GET", "/").from(SLEEP), true),
                (req("GET", "/").from(BAR_NS), true),
                (req("GET", "/"), false),
            ],
        );
    }
}

/// Istio's value matching: prefix (`abc*`), suffix (`*abc`) and presence
/// (`*`) on principals and namespaces.
#[test]
fn principal_and_namespace_wildcards() {
    let p = [policy(
        "wildcards",
        Action::Allow,
        vec![Rule {
            from: vec![
                Source {
                    principals: sm(&["cluster.local/ns/default/*"]),
                    ..Default::default()
                },
                Source {
                    principals: sm(&["*/sa/curl"]),
                    ..Default::default()
                },
                Source {
                    namespaces: sm(&["te*"]),
                    ..Default::default()
                },
            ]
            .into(),
            ..Default::default()
        }],
    )];
    check(
        &p,
        &[
            (req("GET", "/").from(SLEEP), true),
            (req("GET", "/").from(PRODUCTPAGE), true),
            (req("GET", "/").from(BAR_NS), true),
            (req("GET", "/").from(TEST_NS), true),
            (req("GET", "/").from(FOO_NS), false),
            (req("GET", "/"), false),
        ],
    );
}

/// Hosts compare case-insensitively with the `:authority` as sent (Istio
/// documents that a port in the host must be matched explicitly); paths,
/// methods with prefix and suffix wildcards.
#[test]
fn hosts_paths_methods() {
    let p = [policy(
        "hosts",
        Action::Allow,
        vec![Rule {
            to: vec![
                Operation {
                    hosts: sm(&["*.example.com", "httpbin.foo:8000"]),
                    not_paths: sm(&["*/secret"]),
                    ..Default::default()
                },
                Operation {
                    methods: sm(&["PU*"]),
                    ..Default::default()
                },
            ]
            .into(),
            ..Default::default()
        }],
    )];
    check(
        &p,
        &[
            (req("GET", "/a").host("api.EXAMPLE.com"), true),
            (req("GET", "/a").host("HTTPBIN.foo:8000"), true),
            (req("GET", "/a").host("httpbin.foo"), false),
            (req("GET", "/a/secret").host("api.example.com"), false),
            (req("GET", "/a/secret?q").host("api.example.com"), false),
            (req("PUT", "/a/secret").host("other"), true),
            (req("PATCH", "/a").host("other"), false),
            (req("GET", "/a").host(""), false),
        ],
    );
}

/// `ipBlocks` / `notIpBlocks` with single addresses and CIDR blocks, IPv4
/// and IPv6, and an IPv4-mapped peer address.
#[test]
fn ip_blocks() {
    let p = [policy(
        "ip",
        Action::Allow,
        vec![Rule {
            from: vec![Source {
                ip_blocks: ips(&["1.2.3.4", "5.6.7.0/24", "2001:db8::/32"]),
                not_ip_blocks: ips(&["5.6.7.8"]),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        }],
    )];
    check(
        &p,
        &[
            (req("GET", "/").ip("1.2.3.4"), true),
            (req("GET", "/").ip("1.2.3.5"), false),
            (req("GET", "/").ip("5.6.7.200"), true),
            (req("GET", "/").ip("5.6.7.8"), false),
            (req("GET", "/").ip("::ffff:5.6.7.9"), true),
            (req("GET", "/").ip("2001:db8:1::1"), true),
            (req("GET", "/").ip("2001:db9::1"), false),
        ],
    );
}

/// `when` on a header (values with wildcards; several values of one header
/// are joined with `,` as Envoy does), source.namespace, source.principal,
/// source.ip and destination.port; `to.ports`.
#[test]
fn when_conditions_and_ports() {
    let p = [policy(
        "conditions",
        Action::Allow,
        vec![
            Rule {
                when: vec![when(
                    "request.headers[Version]",
                    &["v1", "v2*"],
                    &["v2-beta"],
                )]
                .into(),
                ..Default::default()
            },
            Rule {
                when: vec![
                    when("source.namespace", &["test"], &[]),
                    when("destination.port", &["9000"], &[]),
                ]
                .into(),
                ..Default::default()
            },
            Rule {
                when: vec![
                    when("source.principal", &["*/sa/sleep"], &[]),
                    when("source.ip", &["10.0.0.0/8"], &["10.9.9.9"]),
                ]
                .into(),
                ..Default::default()
            },
            Rule {
                to: vec![Operation {
                    ports: Arc::from([7000u16]),
                    not_methods: sm(&["DELETE"]),
                    ..Default::default()
                }]
                .into(),
                ..Default::default()
            },
        ],
    )];
    check(
        &p,
        &[
            (req("GET", "/").header("version", "v1"), true),
            (req("GET", "/").header("version", "v2-rc1"), true),
            (req("GET", "/").header("version", "v2-beta"), false),
            (
                req("GET", "/")
                    .header("version", "v1")
                    .header("version", "v3"),
                false,
            ),
            (
                req("GET", "/")
                    .header("version", "v3")
                    .header("version", "v1"),
                false,
            ),
            (req("GET", "/").from(TEST_NS).port(9000), true),
            (req("GET", "/").from(TEST_NS).port(8000), false),
            (req("GET", "/").from(SLEEP), true),
            (req("GET", "/").from(SLEEP).ip("10.9.9.9"), false),
            (req("GET", "/").from(SLEEP).ip("192.168.0.1"), false),
            (req("GET", "/").port(7000), true),
            (req("DELETE", "/").port(7000), false),
        ],
    );
}

/// AUDIT marks requests but never changes the decision.
#[test]
fn audit_only_marks() {
    let audit = policy(
        "audit-headers",
        Action::Audit,
        vec![Rule {
            to: vec![Operation {
                paths: sm(&["/headers"]),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        }],
    );
    let d = evaluate(
        std::slice::from_ref(&audit),
        &req("GET", "/headers").attrs(),
    );
    assert!(d.allowed);
    assert!(d.audit);
    assert_eq!(d.reason, Reason::NoAllowPolicies);
    let d = evaluate(std::slice::from_ref(&audit), &req("GET", "/ip").attrs());
    assert!(d.allowed && !d.audit);
    let p = [audit, policy("allow-nothing", Action::Allow, vec![])];
    let d = evaluate(&p, &req("GET", "/headers").attrs());
    assert!(!d.allowed && d.audit);
}

fn path_rule(prefix: &str) -> Rule {
    Rule {
        to: vec![Operation {
            paths: sm(&[prefix]),
            ..Default::default()
        }]
        .into(),
        ..Default::default()
    }
}

/// Istio's dry-run task: a dry-run DENY policy on `/headers` denies
/// nothing, and what it would have done is reported ("denied", named) for
/// the requests it matches, "allowed" for the others.
#[test]
fn a_dry_run_deny_policy_denies_nothing_and_reports_what_it_would_deny() {
    let deny = policy(
        "deny-path-headers",
        Action::Deny,
        vec![path_rule("/headers")],
    )
    .with_dry_run(true);
    assert!(deny.is_dry_run());
    assert!(!deny.clone().with_dry_run(false).is_dry_run());
    let p = [deny];
    let headers = req("GET", "/headers").from(SLEEP);
    let d = evaluate(&p, &headers.attrs());
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.policy, None);
    assert_eq!(d.reason, Reason::NoAllowPolicies);
    let dry = evaluate_dry_run(&p, &headers.attrs());
    assert_eq!(
        dry.deny,
        Some(ShadowResult {
            allowed: false,
            policy: Some("foo/deny-path-headers".into()),
        })
    );
    assert_eq!(dry.allow, None);
    assert!(dry.would_deny() && !dry.is_empty());
    // A request it does not match: would have been allowed, no policy named.
    let dry = evaluate_dry_run(&p, &req("GET", "/ip").attrs());
    assert_eq!(
        dry.deny,
        Some(ShadowResult {
            allowed: true,
            policy: None,
        })
    );
    assert!(!dry.would_deny());
}

/// A dry-run ALLOW policy does not turn the workload into "deny what no
/// ALLOW policy matches": enforcement is that of the enforced policies
/// alone. Its own result is "allowed" when it matches, "denied" (no policy
/// named) when it does not.
#[test]
fn a_dry_run_allow_policy_changes_no_decision() {
    let allow = policy(
        "allow-sleep",
        Action::Allow,
        vec![Rule {
            from: vec![Source {
                principals: sm(&["cluster.local/ns/default/sa/sleep"]),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        }],
    )
    .with_dry_run(true);
    let p = [allow.clone()];
    let other = req("GET", "/").from(PRODUCTPAGE);
    let d = evaluate(&p, &other.attrs());
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.reason, Reason::NoAllowPolicies);
    let dry = evaluate_dry_run(&p, &other.attrs());
    assert_eq!(
        dry.allow,
        Some(ShadowResult {
            allowed: false,
            policy: None,
        })
    );
    assert!(dry.would_deny());
    let sleep = req("GET", "/").from(SLEEP);
    let dry = evaluate_dry_run(&p, &sleep.attrs());
    assert_eq!(
        dry.allow,
        Some(ShadowResult {
            allowed: true,
            policy: Some("foo/allow-sleep".into()),
        })
    );
    // Beside an enforced ALLOW policy, the decision is the enforced one's.
    let p = [allow, policy("allow-nothing", Action::Allow, vec![])];
    let d = evaluate(&p, &sleep.attrs());
    assert!(!d.allowed, "the enforced allow-nothing decides: {d:?}");
    assert_eq!(d.reason, Reason::NoAllowPolicyMatched);
}

/// Enforced policies play no part in the dry run, dry-run ones none in the
/// decision; the first matching dry-run policy (in order) is the one named;
/// dry-run AUDIT policies neither mark nor report.
#[test]
fn enforced_and_dry_run_policies_are_evaluated_apart() {
    let p = [
        policy("deny-admin", Action::Deny, vec![path_rule("/admin*")]),
        policy("deny-all-a", Action::Deny, vec![Rule::default()]).with_dry_run(true),
        policy("deny-all-b", Action::Deny, vec![Rule::default()]).with_dry_run(true),
        policy("audit-all", Action::Audit, vec![Rule::default()]).with_dry_run(true),
    ];
    let admin = req("GET", "/admin/x");
    let d = evaluate(&p, &admin.attrs());
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("foo/deny-admin"));
    assert!(!d.audit, "a dry-run AUDIT policy marks nothing");
    let dry = evaluate_dry_run(&p, &admin.attrs());
    assert_eq!(
        dry.deny.and_then(|r| r.policy).as_deref(),
        Some("foo/deny-all-a")
    );
    assert_eq!(dry.allow, None);
    let d = evaluate(&p, &req("GET", "/ok").attrs());
    assert!(d.allowed && d.policy.is_none(), "{d:?}");
    // Without dry-run policies there is nothing to report.
    let enforced = [policy(
        "deny-admin",
        Action::Deny,
        vec![path_rule("/admin*")],
    )];
    let dry = evaluate_dry_run(&enforced, &admin.attrs());
    assert!(dry.is_empty() && !dry.would_deny());
    assert_eq!(dry, DryRun::default());
}

#[test]
fn string_match_syntax() {
    assert_eq!(StringMatch::parse("*").unwrap(), StringMatch::Any);
    assert_eq!(
        StringMatch::parse("/a*").unwrap(),
        StringMatch::Prefix("/a".into())
    );
    assert_eq!(
        StringMatch::parse("*.b").unwrap(),
        StringMatch::Suffix(".b".into())
    );
    for s in ["/a*", "*.b", "x", "*"] {
        assert_eq!(StringMatch::parse(s).unwrap().to_string(), s);
    }
    for bad in ["", "a*b", "**", "*a*", "a**"] {
        assert_eq!(
            StringMatch::parse(bad).unwrap_err().kind(),
            ErrorKind::InvalidConfig,
            "{bad:?}"
        );
    }
    let e = StringMatch::parse_path("/a/{*}/b").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(StringMatch::Suffix("AbC".into()).matches_ignore_case("xxabc"));
    assert!(!StringMatch::Suffix("AbC".into()).matches_ignore_case("bc"));
    assert!(StringMatch::Prefix("AbC".into()).matches_ignore_case("abcd"));
}

#[test]
fn unsupported_and_invalid_config_is_reported() {
    assert_eq!(
        Action::parse("CUSTOM").unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    assert_eq!(
        Action::parse("allow").unwrap_err().kind(),
        ErrorKind::InvalidConfig
    );
    let e = Condition::parse("request.auth.claims[iss]", &["x"], &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("request.auth.claims[iss]"), "{e}");
    let e = Condition::parse("connection.sni", &["x"], &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    for (key, values) in [
        ("request.headers[x", &["a"][..]),
        ("request.headers[bad header]", &["a"][..]),
        ("source.ip", &["300.1.1.1"][..]),
        ("source.ip", &["1.2.3.4/33"][..]),
        ("destination.port", &["0"][..]),
        ("destination.port", &["http"][..]),
        ("source.principal", &[][..]),
    ] {
        let e = Condition::parse(key, values, &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{key} {values:?}: {e}");
    }
    let e = AuthorizationPolicy::new(
        "foo",
        "p",
        Action::Allow,
        vec![Rule {
            from: vec![Source::default()].into(),
            ..Default::default()
        }],
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("foo/p: rules[0]: a from.source"),
        "{e}"
    );
    assert!(AuthorizationPolicy::new("foo", "p[0]", Action::Allow, vec![]).is_err());
    assert!(AuthorizationPolicy::new("", "p", Action::Allow, vec![]).is_err());
}

#[test]
fn ip_block_edges() {
    let all = IpBlock::parse("0.0.0.0/0").unwrap();
    assert!(all.contains("255.1.2.3".parse().unwrap()));
    assert!(!all.contains("::1".parse().unwrap()));
    let all6 = IpBlock::parse("::/0").unwrap();
    assert!(all6.contains("::1".parse().unwrap()));
    let host = IpBlock::parse("10.1.2.3").unwrap();
    assert_eq!(host.prefix_len(), 32);
    assert_eq!(host.to_string(), "10.1.2.3/32");
    assert!(IpBlock::parse("10.1.2.3/x").is_err());
    assert!(IpBlock::parse("::1/129").is_err());
}

#[test]
fn attributes_of_an_http_request() {
    let peer = SpiffeId::parse(SLEEP).unwrap();
    let ip: IpAddr = "10.1.1.1".parse().unwrap();
    let h2 = http::Request::post("http://catalog.shop:8080/pkg.Svc/Get?x=1")
        .header("x-user", "beta")
        .body(())
        .unwrap();
    let a = RequestAttributes::from_request(&h2, Some(&peer), ip, 8080);
    assert_eq!(a.host, "catalog.shop:8080");
    assert_eq!(a.method, "POST");
    assert_eq!(a.path, "/pkg.Svc/Get");
    assert_eq!(a.destination_port, 8080);
    assert_eq!(a.peer, Some(&peer));
    assert_eq!(a.header("x-user").as_deref(), Some("beta"));
    let h1 = http::Request::get("/items")
        .header("host", "catalog")
        .body(())
        .unwrap();
    let a = RequestAttributes::from_request(&h1, None, ip, 80);
    assert_eq!(a.host, "catalog");
    assert_eq!(a.header(":authority").as_deref(), Some("catalog"));
    let bare = http::Request::get("/items").body(()).unwrap();
    assert_eq!(
        RequestAttributes::from_request(&bare, None, ip, 80).host,
        ""
    );
}

/// Istio's precedence written out as three passes (audit, DENY, ALLOW):
/// what the one-pass [`decide`] must agree with.
fn three_passes(policies: &[AuthorizationPolicy], attrs: &RequestAttributes<'_>) -> Decision {
    let enforced = || policies.iter().filter(|p| !p.is_dry_run());
    let audit = enforced().any(|p| p.action() == Action::Audit && p.matches(attrs));
    if let Some(deny) = enforced().find(|p| p.action() == Action::Deny && p.matches(attrs)) {
        return Decision {
            allowed: false,
            policy: Some(deny.id().clone()),
            audit,
            reason: Reason::DeniedByPolicy,
        };
    }
    if !enforced().any(|p| p.action() == Action::Allow) {
        return Decision {
            allowed: true,
            policy: None,
            audit,
            reason: Reason::NoAllowPolicies,
        };
    }
    match enforced().find(|p| p.action() == Action::Allow && p.matches(attrs)) {
        Some(allow) => Decision {
            allowed: true,
            policy: Some(allow.id().clone()),
            audit,
            reason: Reason::AllowedByPolicy,
        },
        None => Decision {
            allowed: false,
            policy: None,
            audit,
            reason: Reason::NoAllowPolicyMatched,
        },
    }
}

/// The one-pass evaluation decides as the three passes do, whatever the
/// order of the policies (an ALLOW before the DENY that wins, an AUDIT
/// after a DENY that matched), and names the deciding policy by index.
#[test]
fn one_pass_decides_as_istio_precedence() {
    let from = |principal: &str| Rule {
        from: vec![Source {
            principals: sm(&[principal]),
            ..Default::default()
        }]
        .into(),
        ..Default::default()
    };
    let allow_sleep = policy("allow-sleep", Action::Allow, vec![from("*/sa/sleep")]);
    let allow_admin = policy("allow-admin", Action::Allow, vec![path_rule("/admin*")]);
    let deny_admin = policy("deny-admin", Action::Deny, vec![path_rule("/admin*")]);
    let deny_bar = policy(
        "deny-bar",
        Action::Deny,
        vec![Rule {
            from: vec![Source {
                namespaces: sm(&["bar"]),
                ..Default::default()
            }]
            .into(),
            ..Default::default()
        }],
    );
    let audit_all = policy("audit-all", Action::Audit, vec![Rule::default()]);
    let audit_ip = policy("audit-ip", Action::Audit, vec![path_rule("/ip")]);
    let dry_deny_all =
        policy("dry-deny-all", Action::Deny, vec![Rule::default()]).with_dry_run(true);
    let sets: Vec<Vec<AuthorizationPolicy>> = vec![
        vec![],
        vec![allow_sleep.clone()],
        vec![allow_sleep.clone(), deny_admin.clone()],
        vec![deny_admin.clone(), allow_sleep.clone(), audit_all.clone()],
        vec![allow_admin.clone(), deny_admin.clone(), audit_ip.clone()],
        vec![deny_bar.clone(), deny_admin.clone(), audit_ip.clone()],
        vec![
            audit_ip.clone(),
            deny_bar.clone(),
            allow_sleep.clone(),
            allow_admin,
        ],
        vec![dry_deny_all.clone(), allow_sleep.clone()],
        vec![dry_deny_all, audit_all],
    ];
    let requests = [
        req("GET", "/"),
        req("GET", "/ip"),
        req("GET", "/admin/x"),
        req("GET", "/").from(SLEEP),
        req("GET", "/admin/x").from(SLEEP),
        req("GET", "/ip").from(BAR_NS),
        req("GET", "/admin?x=1").from(FOO_NS),
    ];
    for (s, policies) in sets.iter().enumerate() {
        for (r, request) in requests.iter().enumerate() {
            let attrs = request.attrs();
            let verdict = decide(policies, &attrs);
            let expected = three_passes(policies, &attrs);
            assert_eq!(evaluate(policies, &attrs), expected, "set {s}, request {r}");
            assert_eq!(
                verdict.to_decision(policies),
                expected,
                "set {s}, request {r}"
            );
            assert_eq!(
                verdict.policy.map(|i| policies[i].id().clone()),
                expected.policy,
                "set {s}, request {r}"
            );
        }
    }
}

/// A policy reads only the peer identity when no rule has an ip block, an
/// operation or a request condition; then every request from one peer
/// gets one decision, whatever else differs.
#[test]
fn policies_that_read_only_the_peer() {
    let source = |s: Source| Rule {
        from: vec![s].into(),
        ..Default::default()
    };
    let principals = policy(
        "principals",
        Action::Allow,
        vec![source(Source {
            principals: sm(&["*/sa/sleep"]),
            not_namespaces: sm(&["bar"]),
            ..Default::default()
        })],
    );
    let conditions = policy(
        "conditions",
        Action::Deny,
        vec![Rule {
            when: vec![
                when("source.principal", &["cluster.local/ns/foo/*"], &[]),
                when("source.namespace", &[], &["test"]),
            ]
            .into(),
            ..Default::default()
        }],
    );
    let everything = policy("everything", Action::Allow, vec![Rule::default()]);
    let nothing = policy("nothing", Action::Allow, vec![]);
    for p in [&principals, &conditions, &everything, &nothing] {
        assert!(p.reads_only_peer(), "{}", p.id());
    }
    let ip = policy(
        "ip",
        Action::Allow,
        vec![source(Source {
            principals: sm(&["*"]),
            not_ip_blocks: ips(&["10.0.0.0/8"]),
            ..Default::default()
        })],
    );
    let path = policy("path", Action::Allow, vec![path_rule("/admin*")]);
    let header = policy(
        "header",
        Action::Deny,
        vec![Rule {
            when: vec![when("request.headers[x-user]", &["bob"], &[])].into(),
            ..Default::default()
        }],
    );
    let port = policy(
        "port",
        Action::Deny,
        vec![Rule {
            when: vec![when("destination.port", &["8080"], &[])].into(),
            ..Default::default()
        }],
    );
    let ips_when = policy(
        "source-ip",
        Action::Deny,
        vec![Rule {
            when: vec![when("source.ip", &["10.0.0.0/8"], &[])].into(),
            ..Default::default()
        }],
    );
    for p in [&ip, &path, &header, &port, &ips_when] {
        assert!(!p.reads_only_peer(), "{}", p.id());
    }
    // Requests that differ in everything but the peer are decided alike.
    let peer_only = [principals, conditions, everything, nothing];
    for peer in [None, Some(SLEEP), Some(FOO_NS), Some(BAR_NS), Some(TEST_NS)] {
        let requests = [
            req("GET", "/"),
            req("POST", "/admin?x=1")
                .ip("192.168.1.1")
                .host("other:9000")
                .port(9000)
                .header("x-user", "bob"),
        ];
        let decisions: Vec<Verdict> = requests
            .into_iter()
            .map(|r| match peer {
                Some(peer) => r.from(peer),
                None => r,
            })
            .map(|r| decide(&peer_only, &r.attrs()))
            .collect();
        assert_eq!(decisions[0], decisions[1], "peer {peer:?}");
    }
}
