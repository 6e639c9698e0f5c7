//! Tests of the security resources: what a user writes (PeerAuthentication,
//! AuthorizationPolicy, WorkloadGroup, DestinationRule `tls`), what `check`
//! says about it (with the line), and what servers and clients get — the
//! mode and the decisions of `mesh_core::rbac::evaluate` for requests.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use mesh_core::model::{MtlsMode, ServerListener};
use mesh_core::rbac::{Reason, RequestAttributes, evaluate};
use mesh_core::spiffe::SpiffeId;

use super::tests::{DR_CATALOG, FQDN, SE_CATALOG, assert_one, check, reg, store};
use super::*;

// ------------------------------------------------------------------ helpers

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The server listener of a workload in `ns` with `labels` listening on `port`.
fn server(files: &[(&str, &str)], ns: &str, labels: &[(&str, &str)], port: u16) -> ServerListener {
    let (s, _d) = store(files);
    let labels = self::labels(labels);
    let addr = SocketAddr::new(IpAddr::from([10, 0, 0, 7]), port);
    s.security().server_listener(
        &format!("grpc/server?xds.resource.listening_address={addr}"),
        addr,
        Workload {
            namespace: ns,
            labels: &labels,
        },
    )
}

/// A request as the server on port 8000 sees it.
struct Req<'a> {
    peer: Option<&'a str>,
    ip: &'a str,
    method: &'a str,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
}

const GET: Req<'static> = Req {
    peer: None,
    ip: "10.1.2.3",
    method: "GET",
    path: "/",
    headers: &[],
};

fn from(peer: &'static str) -> Req<'static> {
    Req {
        peer: Some(peer),
        ..GET
    }
}

impl<'a> Req<'a> {
    fn method(self, method: &'a str, path: &'a str) -> Self {
        Req {
            method,
            path,
            ..self
        }
    }
}

/// Whether `listener` allows `req`, and the decision.
fn decide(listener: &ServerListener, req: &Req<'_>) -> mesh_core::rbac::Decision {
    let peer = req
        .peer
        .map(|p| SpiffeId::parse(&format!("spiffe://{p}")).unwrap_or_else(|e| panic!("{p}: {e}")));
    let mut headers = HeaderMap::new();
    for (k, v) in req.headers {
        headers.append(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let attrs = RequestAttributes {
        peer: peer.as_ref(),
        source_ip: req.ip.parse().unwrap(),
        host: "httpbin.foo:8000",
        destination_port: listener.address.port(),
        method: req.method,
        path: req.path,
        headers: &headers,
    };
    evaluate(&listener.policies, &attrs)
}

#[track_caller]
fn allowed(listener: &ServerListener, req: Req<'_>) -> bool {
    decide(listener, &req).allowed
}

const SLEEP: &str = "cluster.local/ns/default/sa/sleep";
const SLEEP_FOO: &str = "cluster.local/ns/foo/sa/sleep";

// ------------------------------------------------ authorization, Istio's examples

/// An AuthorizationPolicy `name` in `ns`; `spec` goes on the `spec:` line
/// (a newline, then the indented fields).
fn authz_policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:{spec}"
    )
}

/// The reference's first example (ALLOW from the `sleep` service account or
/// namespace `test`, GET on `/info*` or POST on `/data`):
/// <https://istio.io/latest/docs/reference/config/security/authorization-policy/>.
/// The example's `when request.auth.claims[iss]` (JWT) is left out: request
/// authentication is reported as unsupported (see the diagnostics tests).
const REFERENCE_ALLOW: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
"#;

#[test]
fn authz_01_allow_by_principal_or_namespace_with_method_and_path() {
    let l = server(&[("ap.yaml", REFERENCE_ALLOW)], "foo", &[], 8000);
    assert!(allowed(&l, from(SLEEP).method("GET", "/info/users")));
    assert!(allowed(
        &l,
        from("cluster.local/ns/test/sa/any").method("POST", "/data")
    ));
    // Right source, wrong method for the path.
    assert!(!allowed(&l, from(SLEEP).method("POST", "/info")));
    assert!(!allowed(&l, from(SLEEP).method("DELETE", "/data")));
    // Another service account of another namespace: no ALLOW matches.
    let d = decide(
        &l,
        &from("cluster.local/ns/prod/sa/sleep").method("GET", "/info"),
    );
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::NoAllowPolicyMatched);
    // Plaintext: no principal, no namespace.
    assert!(!allowed(&l, GET.method("GET", "/info")));
    let d = decide(&l, &from(SLEEP).method("GET", "/info"));
    assert_eq!(d.policy.as_deref(), Some("foo/httpbin"));
}

/// The reference's DENY example: requests from namespace `dev` to POST on
/// every workload of `foo` (no selector).
/// <https://istio.io/latest/docs/reference/config/security/authorization-policy/>
#[test]
fn authz_02_deny_post_from_a_namespace() {
    let ap: &str = &authz_policy(
        "foo",
        "httpbin",
        r#"
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["POST"]
"#,
    );
    let l = server(&[("ap.yaml", ap)], "foo", &[("app", "any")], 8000);
    let d = decide(
        &l,
        &from("cluster.local/ns/dev/sa/x").method("POST", "/data"),
    );
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("foo/httpbin"));
    assert!(allowed(
        &l,
        from("cluster.local/ns/dev/sa/x").method("GET", "/data")
    ));
    assert!(allowed(
        &l,
        from("cluster.local/ns/prod/sa/x").method("POST", "/data")
    ));
    // Another namespace's workload is not governed by it.
    let other = server(&[("ap.yaml", ap)], "bar", &[], 8000);
    assert!(allowed(
        &other,
        from("cluster.local/ns/dev/sa/x").method("POST", "/")
    ));
}

/// allow-nothing (`spec: {}`), deny-all (`DENY` with `rules: [{}]`) and
/// allow-all (`rules: [{}]`) from the reference: an ALLOW policy without
/// rules denies everything; DENY wins over an allow-all.
/// <https://istio.io/latest/docs/reference/config/security/authorization-policy/>
#[test]
fn authz_03_allow_nothing_deny_all_and_allow_all() {
    let allow_nothing = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-nothing\n  namespace: foo\nspec: {}\n";
    let allow_all = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-all\n  namespace: foo\nspec:\n  action: ALLOW\n  rules:\n  - {}\n";
    let deny_all = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all\n  namespace: foo\nspec:\n  action: DENY\n  rules:\n  - {}\n";
    let l = server(&[("a.yaml", allow_nothing)], "foo", &[], 8000);
    assert!(!allowed(&l, from(SLEEP_FOO)));
    assert!(!allowed(&l, GET));
    let l = server(&[("a.yaml", allow_all)], "foo", &[], 8000);
    assert!(allowed(&l, from(SLEEP_FOO)));
    assert!(allowed(&l, GET.method("DELETE", "/x")));
    let l = server(
        &[("a.yaml", allow_all), ("b.yaml", deny_all)],
        "foo",
        &[],
        8000,
    );
    let d = decide(&l, &from(SLEEP_FOO));
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("foo/deny-all"));
}

/// Explicit deny task: `deny-method-get` denies GET unless header
/// `x-token: admin` (a `when` on `request.headers[x-token]` with
/// `notValues`); then `allow-path-ip` allows only `/ip`, so the rest is
/// denied by default. <https://istio.io/latest/docs/tasks/security/authorization/authz-deny/>
const DENY_METHOD_GET: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-method-get
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - to:
    - operation:
        methods: ["GET"]
    when:
    - key: request.headers[x-token]
      notValues: ["admin"]
"#;

#[test]
fn authz_04_header_condition_with_not_values() {
    let l = server(
        &[("d.yaml", DENY_METHOD_GET)],
        "foo",
        &[("app", "httpbin")],
        8000,
    );
    let d = decide(&l, &from(SLEEP_FOO).method("GET", "/get"));
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("foo/deny-method-get"));
    let admin = Req {
        headers: &[("x-token", "admin")],
        ..from(SLEEP_FOO).method("GET", "/get")
    };
    assert!(allowed(&l, admin));
    let guest = Req {
        headers: &[("x-token", "guest")],
        ..from(SLEEP_FOO).method("GET", "/get")
    };
    assert!(!allowed(&l, guest));
    assert!(allowed(&l, from(SLEEP_FOO).method("POST", "/post")));
}

#[test]
fn authz_05_default_deny_once_an_allow_policy_exists() {
    let allow_path_ip: &str = &authz_policy(
        "foo",
        "allow-path-ip",
        r#"
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - to:
    - operation:
        paths: ["/ip"]
"#,
    );
    let files = [("a.yaml", allow_path_ip), ("d.yaml", DENY_METHOD_GET)];
    let l = server(&files, "foo", &[("app", "httpbin")], 8000);
    let admin = &[("x-token", "admin")][..];
    assert!(allowed(
        &l,
        Req {
            headers: admin,
            ..from(SLEEP_FOO).method("GET", "/ip")
        }
    ));
    // Not denied by the DENY policy, but no ALLOW policy matches.
    let d = decide(
        &l,
        &Req {
            headers: admin,
            ..from(SLEEP_FOO).method("GET", "/headers")
        },
    );
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::NoAllowPolicyMatched);
    // DENY is evaluated first: GET /ip without the token is denied.
    let d = decide(&l, &from(SLEEP_FOO).method("GET", "/ip"));
    assert_eq!(d.policy.as_deref(), Some("foo/deny-method-get"));
}

/// Explicit deny task, `deny-path-headers`: DENY on path `/headers` beats
/// an ALLOW that matches everything.
/// <https://istio.io/latest/docs/tasks/security/authorization/authz-deny/>
#[test]
fn authz_06_deny_by_path_beats_allow() {
    let ap: &str = &format!(
        "{}---\n{}",
        authz_policy(
            "foo",
            "deny-path-headers",
            r#"
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"#,
        ),
        authz_policy(
            "foo",
            "allow-all",
            r#"
  rules:
  - {}
"#,
        ),
    );
    let l = server(&[("a.yaml", ap)], "foo", &[("app", "httpbin")], 8000);
    assert!(!allowed(&l, from(SLEEP_FOO).method("GET", "/headers")));
    // The query string is not part of the path.
    assert!(!allowed(&l, from(SLEEP_FOO).method("GET", "/headers?x=1")));
    assert!(allowed(&l, from(SLEEP_FOO).method("GET", "/ip")));
}

/// Value matching from the security concepts: prefix (`/test/*`), suffix
/// (`*/info`) and presence (`principals: ["*"]`, any authenticated peer).
/// <https://istio.io/latest/docs/concepts/security/#authorization-policies>
#[test]
fn authz_07_prefix_suffix_and_presence_matching() {
    let ap: &str = &authz_policy(
        "default",
        "tester",
        r#"
  selector:
    matchLabels:
      app: products
  rules:
  - from:
    - source:
        principals: ["*"]
    to:
    - operation:
        paths: ["/test/*", "*/info"]
"#,
    );
    let l = server(&[("a.yaml", ap)], "default", &[("app", "products")], 8000);
    assert!(allowed(&l, from(SLEEP).method("GET", "/test/foo")));
    assert!(allowed(&l, from(SLEEP).method("GET", "/v1/info")));
    assert!(!allowed(&l, from(SLEEP).method("GET", "/other")));
    // Presence: a plaintext peer has no principal.
    assert!(!allowed(&l, GET.method("GET", "/test/foo")));
}

/// Namespace wildcards (prefix and suffix, as the concepts' value matching
/// allows in every string field):
/// <https://istio.io/latest/docs/concepts/security/#authorization-policies>
#[test]
fn authz_08_namespace_wildcards() {
    let ap: &str = &authz_policy(
        "foo",
        "from-prod",
        r#"
  rules:
  - from:
    - source:
        namespaces: ["prod-*", "*-canary"]
        notNamespaces: ["prod-legacy"]
"#,
    );
    let l = server(&[("a.yaml", ap)], "foo", &[], 8000);
    assert!(allowed(&l, from("cluster.local/ns/prod-eu/sa/web")));
    assert!(allowed(&l, from("cluster.local/ns/shop-canary/sa/web")));
    assert!(!allowed(&l, from("cluster.local/ns/prod-legacy/sa/web")));
    assert!(!allowed(&l, from("cluster.local/ns/staging/sa/web")));
}

/// Exclusion matching from the concepts: deny every path but `/healthz` to
/// peers without an identity. The page's example uses
/// `notRequestPrincipals` (JWT); its mTLS counterpart is `notPrincipals`.
/// <https://istio.io/latest/docs/concepts/security/#exclusion-matching>
#[test]
fn authz_09_not_paths_and_not_principals() {
    let ap: &str = &authz_policy(
        "default",
        "disable-jwt-for-healthz",
        r#"
  selector:
    matchLabels:
      app: products
  action: DENY
  rules:
  - to:
    - operation:
        notPaths: ["/healthz"]
    from:
    - source:
        notPrincipals: ["*"]
"#,
    );
    let l = server(&[("a.yaml", ap)], "default", &[("app", "products")], 8000);
    assert!(allowed(&l, GET.method("GET", "/healthz")));
    assert!(!allowed(&l, GET.method("GET", "/orders")));
    assert!(allowed(&l, from(SLEEP).method("GET", "/orders")));
}

/// IP-based allow list of the ingress task (`ipBlocks` with an address and
/// a CIDR block), and a DENY on `notIpBlocks`.
/// <https://istio.io/latest/docs/tasks/security/authorization/authz-ingress/>
#[test]
fn authz_10_ip_blocks() {
    let ap: &str = &authz_policy(
        "foo",
        "ingress-policy",
        r#"
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: ["1.2.3.4", "5.6.7.0/24"]
"#,
    );
    let l = server(&[("a.yaml", ap)], "foo", &[("app", "httpbin")], 8000);
    assert!(allowed(
        &l,
        Req {
            ip: "1.2.3.4",
            ..GET
        }
    ));
    assert!(allowed(
        &l,
        Req {
            ip: "5.6.7.200",
            ..GET
        }
    ));
    // A dual-stack socket reports IPv4 peers as mapped addresses.
    assert!(allowed(
        &l,
        Req {
            ip: "::ffff:5.6.7.8",
            ..GET
        }
    ));
    assert!(!allowed(
        &l,
        Req {
            ip: "5.6.8.1",
            ..GET
        }
    ));
    let deny = ap
        .replace("action: ALLOW", "action: DENY")
        .replace("ipBlocks:", "notIpBlocks:");
    let l = server(&[("a.yaml", &deny)], "foo", &[("app", "httpbin")], 8000);
    assert!(!allowed(
        &l,
        Req {
            ip: "10.0.0.1",
            ..GET
        }
    ));
    assert!(allowed(
        &l,
        Req {
            ip: "1.2.3.4",
            ..GET
        }
    ));
}

/// The reference's AUDIT example (GET on `/user/profile/*`): it marks the
/// request for audit and never changes the decision.
/// <https://istio.io/latest/docs/reference/config/security/authorization-policy/>
#[test]
fn authz_11_audit_does_not_change_the_decision() {
    let audit: &str = &authz_policy(
        "ns1",
        "audit-profile",
        r#"
  selector:
    matchLabels:
      app: myapi
  action: AUDIT
  rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["/user/profile/*"]
"#,
    );
    let l = server(&[("a.yaml", audit)], "ns1", &[("app", "myapi")], 8000);
    let d = decide(&l, &from(SLEEP).method("GET", "/user/profile/7"));
    assert!(d.allowed);
    assert!(d.audit);
    assert_eq!(d.reason, Reason::NoAllowPolicies);
    let d = decide(&l, &from(SLEEP).method("GET", "/other"));
    assert!(d.allowed && !d.audit);
    // With an allow-nothing next to it, the audited request is still denied.
    let nothing = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: none, namespace: ns1}\nspec: {}\n";
    let l = server(
        &[("a.yaml", audit), ("b.yaml", nothing)],
        "ns1",
        &[("app", "myapi")],
        8000,
    );
    let d = decide(&l, &from(SLEEP).method("GET", "/user/profile/7"));
    assert!(!d.allowed && d.audit);
    // The listener carries DENY, ALLOW, AUDIT in that order.
    let actions: Vec<_> = l.policies.iter().map(|p| p.action()).collect();
    assert_eq!(
        actions,
        [
            mesh_core::rbac::Action::Allow,
            mesh_core::rbac::Action::Audit
        ]
    );
}

/// A policy in the root namespace applies to every workload of the mesh;
/// with a selector, to the matching workloads of every namespace.
/// <https://istio.io/latest/docs/reference/config/security/authorization-policy/>
/// (the `istio-system` examples) and the concepts' policy target.
#[test]
fn authz_12_root_namespace_policy_applies_everywhere() {
    let ap: &str = &format!(
        "{}---\n{}",
        authz_policy(
            "istio-system",
            "deny-admin",
            r#"
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin*"]
"#,
        ),
        authz_policy(
            "istio-system",
            "payments-from-shop",
            r#"
  selector:
    matchLabels:
      app: payments
  rules:
  - from:
    - source:
        namespaces: ["shop"]
"#,
        ),
    );
    for ns in ["foo", "bar", "istio-system"] {
        let l = server(&[("a.yaml", ap)], ns, &[("app", "web")], 8000);
        let d = decide(&l, &from(SLEEP).method("GET", "/admin/users"));
        assert!(!d.allowed, "{ns}");
        assert_eq!(d.policy.as_deref(), Some("istio-system/deny-admin"));
        assert!(allowed(&l, from(SLEEP).method("GET", "/")), "{ns}");
    }
    let payments = server(&[("a.yaml", ap)], "billing", &[("app", "payments")], 8000);
    assert!(allowed(&payments, from("cluster.local/ns/shop/sa/web")));
    assert!(!allowed(&payments, from(SLEEP)));
}

/// A selector applies only to workloads with the labels; the other
/// workloads of the namespace are not governed by it.
/// <https://istio.io/latest/docs/reference/config/security/authorization-policy/>
#[test]
fn authz_13_selector_applies_only_to_matching_labels() {
    let ap: &str = &authz_policy(
        "foo",
        "httpbin-v1",
        r#"
  selector:
    matchLabels:
      app: httpbin
      version: v1
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/foo/sa/sleep"]
"#,
    );
    let v1 = server(
        &[("a.yaml", ap)],
        "foo",
        &[("app", "httpbin"), ("version", "v1")],
        8000,
    );
    assert_eq!(v1.policies.len(), 1);
    assert!(allowed(&v1, from(SLEEP_FOO)));
    assert!(!allowed(&v1, from(SLEEP)));
    let v2 = server(
        &[("a.yaml", ap)],
        "foo",
        &[("app", "httpbin"), ("version", "v2")],
        8000,
    );
    assert!(v2.policies.is_empty());
    assert!(allowed(&v2, from(SLEEP)));
}

/// Conditions on the source and the port (`when` keys of
/// <https://istio.io/latest/docs/reference/config/security/conditions/>),
/// and `ports` / `notMethods` of an operation.
#[test]
fn authz_14_conditions_on_source_and_port() {
    let ap: &str = &authz_policy(
        "foo",
        "conditions",
        r#"
  rules:
  - to:
    - operation:
        ports: ["8000"]
        notMethods: ["DELETE"]
    when:
    - key: source.namespace
      values: ["foo"]
    - key: destination.port
      values: ["8000"]
"#,
    );
    let l = server(&[("a.yaml", ap)], "foo", &[], 8000);
    assert!(allowed(&l, from(SLEEP_FOO)));
    assert!(!allowed(&l, from(SLEEP_FOO).method("DELETE", "/")));
    assert!(!allowed(&l, from(SLEEP)));
    let other_port = server(&[("a.yaml", ap)], "foo", &[], 9000);
    assert!(!allowed(&other_port, from(SLEEP_FOO)));
}

// ------------------------------------------------------- PeerAuthentication

fn pa(ns: &str, name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{body}"
    )
}

#[test]
fn peer_authentication_default_is_permissive() {
    let l = server(&[("a.yaml", SE_CATALOG)], "shop", &[], 8080);
    assert_eq!(l.mtls, MtlsMode::Permissive);
    assert!(l.policies.is_empty());
    assert_eq!(l.address.port(), 8080);
    assert_eq!(
        &*l.name,
        "grpc/server?xds.resource.listening_address=10.0.0.7:8080"
    );
}

#[test]
fn peer_authentication_precedence_selector_namespace_root() {
    let root = pa("istio-system", "default", "  mtls: {mode: STRICT}\n");
    let ns = pa("shop", "default", "  mtls: {mode: PERMISSIVE}\n");
    let workload = pa(
        "shop",
        "catalog",
        "  selector:\n    matchLabels: {app: catalog}\n  mtls: {mode: DISABLE}\n",
    );
    // Root only: STRICT everywhere.
    let files = [("root.yaml", root.as_str())];
    assert_eq!(server(&files, "shop", &[], 80).mtls, MtlsMode::Strict);
    assert_eq!(server(&files, "web", &[], 80).mtls, MtlsMode::Strict);
    // The namespace's own wins over the root's.
    let files = [("root.yaml", root.as_str()), ("ns.yaml", ns.as_str())];
    assert_eq!(server(&files, "shop", &[], 80).mtls, MtlsMode::Permissive);
    assert_eq!(server(&files, "web", &[], 80).mtls, MtlsMode::Strict);
    // The workload's wins over both, for its labels only.
    let files = [
        ("root.yaml", root.as_str()),
        ("ns.yaml", ns.as_str()),
        ("w.yaml", workload.as_str()),
    ];
    assert_eq!(
        server(&files, "shop", &[("app", "catalog")], 80).mtls,
        MtlsMode::Disable
    );
    assert_eq!(
        server(&files, "shop", &[("app", "cart")], 80).mtls,
        MtlsMode::Permissive
    );
    // A selector in another namespace does not apply.
    assert_eq!(
        server(&files, "web", &[("app", "catalog")], 80).mtls,
        MtlsMode::Strict
    );
}

#[test]
fn peer_authentication_port_level_and_unset_inherit() {
    let ns = pa("shop", "default", "  mtls: {mode: STRICT}\n");
    let workload = pa(
        "shop",
        "catalog",
        "  selector:\n    matchLabels: {app: catalog}\n  mtls:\n    mode: UNSET\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n    \"9090\": {mode: PERMISSIVE}\n    7070: {mode: UNSET}\n",
    );
    let files = [("ns.yaml", ns.as_str()), ("w.yaml", workload.as_str())];
    let app = [("app", "catalog")];
    assert_eq!(server(&files, "shop", &app, 8080).mtls, MtlsMode::Disable);
    assert_eq!(
        server(&files, "shop", &app, 9090).mtls,
        MtlsMode::Permissive
    );
    // UNSET at the port inherits the workload's, UNSET there the namespace's.
    assert_eq!(server(&files, "shop", &app, 7070).mtls, MtlsMode::Strict);
    assert_eq!(server(&files, "shop", &app, 80).mtls, MtlsMode::Strict);
    // An UNSET namespace-wide policy inherits the mesh-wide one, else PERMISSIVE.
    let unset = pa("shop", "default", "  mtls: {mode: UNSET}\n");
    let root = pa("istio-system", "default", "  mtls: {mode: DISABLE}\n");
    let files = [("ns.yaml", unset.as_str())];
    assert_eq!(server(&files, "shop", &[], 80).mtls, MtlsMode::Permissive);
    let files = [("ns.yaml", unset.as_str()), ("root.yaml", root.as_str())];
    assert_eq!(server(&files, "shop", &[], 80).mtls, MtlsMode::Disable);
}

#[test]
fn most_specific_selector_wins_then_name() {
    let broad = pa(
        "shop",
        "a-broad",
        "  selector:\n    matchLabels: {app: catalog}\n  mtls: {mode: DISABLE}\n",
    );
    let narrow = pa(
        "shop",
        "z-narrow",
        "  selector:\n    matchLabels: {app: catalog, version: v2}\n  mtls: {mode: STRICT}\n",
    );
    let tie = pa(
        "shop",
        "b-tie",
        "  selector:\n    matchLabels: {app: catalog}\n  mtls: {mode: PERMISSIVE}\n",
    );
    let files = [
        ("1.yaml", broad.as_str()),
        ("2.yaml", narrow.as_str()),
        ("3.yaml", tie.as_str()),
    ];
    assert_eq!(
        server(&files, "shop", &[("app", "catalog"), ("version", "v2")], 80).mtls,
        MtlsMode::Strict
    );
    assert_eq!(
        server(&files, "shop", &[("app", "catalog"), ("version", "v1")], 80).mtls,
        MtlsMode::Disable
    );
}

#[test]
fn second_namespace_wide_peer_authentication_is_reported() {
    let a = pa("shop", "a", "  mtls: {mode: STRICT}\n");
    let b = pa("shop", "b", "  mtls: {mode: DISABLE}\n");
    let text = format!("{a}---\n{b}");
    assert_one(
        &check(&text),
        12,
        "namespace 'shop' already has the namespace-wide PeerAuthentication 'a'",
    );
    let l = server(&[("a.yaml", &text)], "shop", &[], 80);
    assert_eq!(l.mtls, MtlsMode::Strict);
}

// ---------------------------------------------------------------- diagnostics

/// The 1-based line of the first line of `text` containing `needle`.
fn line_with(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
        + 1
}

#[track_caller]
fn assert_rejected(text: &str, at: &str, needle: &str) {
    assert_one(&check(text), line_with(text, at), needle);
}

fn authz(body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: foo\nspec:\n{body}"
    )
}

#[test]
fn authorization_policy_problems_point_at_their_line() {
    let cases = [
        (
            "  action: CUSTOM\n  rules: [{}]\n",
            "action: CUSTOM",
            "action CUSTOM (an external authorizer) is not supported",
        ),
        (
            "  action: MAYBE\n",
            "MAYBE",
            "action \"MAYBE\" is not one of ALLOW, DENY, AUDIT",
        ),
        (
            "  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"*\"]\n",
            "requestPrincipals",
            "request authentication (JWT) is not supported",
        ),
        (
            "  rules:\n  - when:\n    - key: request.auth.claims[iss]\n      values: [\"https://accounts.google.com\"]\n",
            "key: request",
            "request authentication (JWT) conditions are not supported",
        ),
        (
            "  targetRefs:\n  - kind: Gateway\n    name: gw\n",
            "targetRefs",
            "'targetRefs' (Gateway API attachment) is not supported",
        ),
        (
            "  rules:\n  - from:\n    - source:\n        ipBlocks:\n        - 10.0.0.0/8\n        - 10.0.0.0/40\n",
            "/40",
            "the prefix length is at most 32",
        ),
        (
            "  rules:\n  - to:\n    - operation:\n        paths: [\"/a/{*}/b\"]\n",
            "paths",
            "path templates",
        ),
        (
            "  rules:\n  - to:\n    - operation:\n        methods: [\"G*T\"]\n",
            "methods",
            "a wildcard '*' is only allowed at the start or the end",
        ),
        (
            "  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n",
            "ports",
            "is not a port number",
        ),
        (
            "  rules:\n  - from:\n    - source: {}\n",
            "source",
            "'rules[0].from[0].source' must set at least one field",
        ),
        (
            "  rules:\n  - when:\n    - key: source.ip\n      values: [\"10.0.0.1\", \"ten\"]\n",
            "\"ten\"",
            "is not an IP address",
        ),
        (
            "  rules:\n  - from:\n    - source:\n        remoteIpBlocks: [\"1.2.3.4\"]\n",
            "remoteIpBlocks",
            "X-Forwarded-For",
        ),
    ];
    for (body, at, needle) in cases {
        assert_rejected(&authz(body), at, needle);
    }
    // CUSTOM also reports its provider, each at its own line.
    let text = authz("  action: CUSTOM\n  provider: {name: ext-authz}\n");
    let diags = check(&text);
    assert_eq!(diags.len(), 2, "{diags:#?}");
    assert_eq!(diags[0].line, 7);
    assert_eq!(diags[1].line, 8);
    assert!(
        diags[0]
            .to_string()
            .ends_with("a.yaml:7: AuthorizationPolicy foo/p: 'action': action CUSTOM (an external authorizer) is not supported; use ALLOW, DENY or AUDIT"),
        "{}",
        diags[0]
    );
}

#[test]
fn peer_authentication_problems_point_at_their_line() {
    let cases = [
        (
            "  mtls: {mode: STRICTER}\n",
            "STRICTER",
            "unknown mode 'STRICTER' (expected STRICT, PERMISSIVE, DISABLE or UNSET)",
        ),
        (
            "  portLevelMtls:\n    8080: {mode: DISABLE}\n",
            "portLevelMtls",
            "'portLevelMtls' requires a 'selector'",
        ),
        (
            "  selector:\n    matchLabels: {app: a}\n  portLevelMtls:\n    http: {mode: DISABLE}\n",
            "http",
            "'portLevelMtls': 'http' is not a port number",
        ),
        (
            "  selector:\n    matchLabels: {app: a}\n  portLevelMtls:\n    80: {mode: strict}\n",
            "strict",
            "unknown mode 'strict'",
        ),
        (
            "  mtls: {mode: STRICT}\n  mttls: {}\n",
            "mttls",
            "unknown field 'mttls'",
        ),
    ];
    for (body, at, needle) in cases {
        assert_rejected(&pa("shop", "p", body), at, needle);
    }
    // The networking group is not the security group.
    let text = pa("shop", "p", "  mtls: {mode: STRICT}\n")
        .replace("security.istio.io/v1beta1", "networking.istio.io/v1");
    assert_rejected(
        &text,
        "apiVersion",
        "unknown apiVersion 'networking.istio.io/v1' for kind PeerAuthentication (expected security.istio.io/v1, v1beta1)",
    );
}

#[test]
fn a_broken_policy_keeps_its_last_good_version() {
    let d = super::tests::dir(&[("ap.yaml", REFERENCE_ALLOW)]);
    let mut s = ConfigStore::new(MeshOptions::default());
    assert!(s.load_dir(d.path()).is_empty());
    std::fs::write(
        d.path().join("ap.yaml"),
        REFERENCE_ALLOW.replace("action: ALLOW", "action: CUSTOM"),
    )
    .unwrap();
    assert_eq!(s.load_dir(d.path()).len(), 1);
    let empty = BTreeMap::new();
    let l = s.security().server_listener(
        "l",
        "10.0.0.7:8000".parse().unwrap(),
        Workload {
            namespace: "foo",
            labels: &empty,
        },
    );
    assert_eq!(l.policies.len(), 1);
    assert_eq!(l.policies[0].action(), mesh_core::rbac::Action::Allow);
}

// ------------------------------------------------- client TLS and identities

fn dr_tls(policy: &str, v1: &str) -> String {
    let v1 = if v1.is_empty() {
        String::new()
    } else {
        format!("    trafficPolicy:\n      tls:\n{v1}")
    };
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
  trafficPolicy:
    tls:
{policy}  subsets:
  - name: v1
    labels: {{version: v1}}
{v1}  - name: v2
    labels: {{version: v2}}
"
    )
}

fn cluster_tls(files: &[(&str, &str)], subset: &str) -> Option<mesh_core::model::UpstreamTls> {
    let (s, _d) = store(files);
    let (snap, diags) = s.snapshot(&[reg(
        "catalog",
        "shop",
        "10.0.0.1",
        8080,
        &[("version", "v1")],
    )]);
    assert!(diags.is_empty(), "{diags:#?}");
    let name = format!("outbound|80|{subset}|{FQDN}");
    snap.clusters
        .get(name.as_str())
        .unwrap_or_else(|| panic!("no cluster {name}"))
        .tls
        .clone()
}

fn ids(tls: &mesh_core::model::UpstreamTls) -> Vec<&str> {
    tls.server_identities.iter().map(SpiffeId::as_str).collect()
}

#[test]
fn istio_mutual_gives_clusters_tls_with_the_service_identity_and_sni() {
    let dr = dr_tls("      mode: ISTIO_MUTUAL\n", "        mode: DISABLE\n");
    let files = [("se.yaml", SE_CATALOG), ("dr.yaml", dr.as_str())];
    let tls = cluster_tls(&files, "").expect("ISTIO_MUTUAL");
    assert_eq!(ids(&tls), ["spiffe://cluster.local/ns/shop/sa/catalog"]);
    assert_eq!(&*tls.sni, format!("outbound_.80_._.{FQDN}"));
    let v2 = cluster_tls(&files, "v2").expect("inherits the rule's tls");
    assert_eq!(&*v2.sni, format!("outbound_.80_.v2_.{FQDN}"));
    // The subset overrides.
    assert_eq!(cluster_tls(&files, "v1"), None);
    // DISABLE at the top, ISTIO_MUTUAL with sni and subjectAltNames on v1.
    let dr = dr_tls(
        "      mode: DISABLE\n",
        "        mode: ISTIO_MUTUAL\n        sni: catalog.internal\n        subjectAltNames: [\"spiffe://cluster.local/ns/shop/sa/catalog-v1\"]\n",
    );
    let files = [("se.yaml", SE_CATALOG), ("dr.yaml", dr.as_str())];
    assert_eq!(cluster_tls(&files, ""), None);
    let v1 = cluster_tls(&files, "v1").unwrap();
    assert_eq!(&*v1.sni, "catalog.internal");
    assert_eq!(ids(&v1), ["spiffe://cluster.local/ns/shop/sa/catalog-v1"]);
}

#[test]
fn service_identities_come_from_workload_groups_entries_and_subject_alt_names() {
    let dr = dr_tls("      mode: ISTIO_MUTUAL\n", "");
    let wg = "apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: catalog, namespace: shop}
spec:
  metadata:
    labels: {app: catalog, version: v1}
  template:
    serviceAccount: catalog-sa
";
    let files = [
        ("se.yaml", SE_CATALOG),
        ("dr.yaml", dr.as_str()),
        ("wg.yaml", wg),
    ];
    let tls = cluster_tls(&files, "").unwrap();
    assert_eq!(ids(&tls), ["spiffe://cluster.local/ns/shop/sa/catalog-sa"]);
    // The group's labels reach the registered endpoint (subset v1 selects it).
    let (s, _d) = store(&files);
    let (snap, _) = s.snapshot(&[reg("catalog", "shop", "10.0.0.1", 8080, &[])]);
    let v1 = snap
        .endpoints
        .get(format!("outbound|80|v1|{FQDN}").as_str())
        .unwrap();
    assert_eq!(v1.localities[0].endpoints.len(), 1);

    let se = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports:
  - {number: 80, name: http}
  subjectAltNames: [\"spiffe://other.domain/ns/shop/sa/legacy\"]
  endpoints:
  - address: 10.0.0.2
    serviceAccount: catalog-static
";
    let files = [("se.yaml", se), ("dr.yaml", dr.as_str()), ("wg.yaml", wg)];
    let tls = cluster_tls(&files, "").unwrap();
    assert_eq!(
        ids(&tls),
        [
            "spiffe://cluster.local/ns/shop/sa/catalog-sa",
            "spiffe://cluster.local/ns/shop/sa/catalog-static",
            "spiffe://other.domain/ns/shop/sa/legacy",
        ]
    );
}

#[test]
fn auto_mtls_follows_the_destination_namespace() {
    let strict = pa("shop", "default", "  mtls: {mode: STRICT}\n");
    let root_strict = pa("istio-system", "default", "  mtls: {mode: STRICT}\n");
    let ns_permissive = pa("shop", "default", "  mtls: {mode: PERMISSIVE}\n");
    let none: [(&str, &str); 1] = [("se.yaml", SE_CATALOG)];
    assert_eq!(cluster_tls(&none, ""), None);
    let tls = cluster_tls(&[("se.yaml", SE_CATALOG), ("pa.yaml", &strict)], "").unwrap();
    assert_eq!(ids(&tls), ["spiffe://cluster.local/ns/shop/sa/catalog"]);
    assert_eq!(&*tls.sni, format!("outbound_.80_._.{FQDN}"));
    assert!(cluster_tls(&[("se.yaml", SE_CATALOG), ("pa.yaml", &root_strict)], "").is_some());
    assert_eq!(
        cluster_tls(
            &[
                ("se.yaml", SE_CATALOG),
                ("pa.yaml", &root_strict),
                ("ns.yaml", &ns_permissive)
            ],
            ""
        ),
        None
    );
    // An explicit DISABLE wins over auto mTLS.
    let dr = dr_tls("      mode: DISABLE\n", "");
    assert_eq!(
        cluster_tls(
            &[
                ("se.yaml", SE_CATALOG),
                ("pa.yaml", &strict),
                ("dr.yaml", &dr)
            ],
            ""
        ),
        None
    );
    // Every endpoint STRICT by its workload's policy (and port): mTLS too.
    let workload = pa(
        "shop",
        "catalog",
        "  selector:\n    matchLabels: {version: v1}\n  mtls: {mode: STRICT}\n",
    );
    assert!(cluster_tls(&[("se.yaml", SE_CATALOG), ("w.yaml", &workload)], "").is_some());
}

#[test]
fn client_tls_problems_point_at_their_line() {
    let cases = [
        ("      mode: ISTIO\n", "ISTIO", "unknown TLS mode 'ISTIO'"),
        (
            "      mode: DISABLE\n      sni: x\n",
            "sni",
            "'trafficPolicy.tls.sni' needs TLS (TLS is disabled)",
        ),
        (
            "      mode: ISTIO_MUTUAL\n      subjectAltNames: [catalog.shop]\n",
            "subjectAltNames",
            "ISTIO_MUTUAL verifies SPIFFE IDs; use SIMPLE or MUTUAL for DNS names",
        ),
        (
            "      mode: ISTIO_MUTUAL\n      clientCertificate: /c.pem\n",
            "clientCertificate",
            "'trafficPolicy.tls.clientCertificate' is not used with 'mode: ISTIO_MUTUAL' (a \
             client certificate needs 'mode: MUTUAL')",
        ),
        (
            "      mode: ISTIO_MUTUAL\n      caCertificates: /ca.pem\n",
            "caCertificates",
            "'trafficPolicy.tls.caCertificates' is not used with 'mode: ISTIO_MUTUAL' (CA files \
             need 'mode: SIMPLE' or 'MUTUAL')",
        ),
        (
            "      mode: SIMPLE\n      caCertificates: /ca.pem\n      privateKey: /k.pem\n",
            "privateKey",
            "'trafficPolicy.tls.privateKey' is not used with 'mode: SIMPLE'",
        ),
        (
            // No caCertificates is fine (the system's roots); the rest of
            // the settings are still checked.
            "      mode: SIMPLE\n      clientCertificate: /c.pem\n",
            "clientCertificate",
            "'trafficPolicy.tls.clientCertificate' is not used with 'mode: SIMPLE'",
        ),
        (
            "      mode: MUTUAL\n      caCertificates: /ca.pem\n      privateKey: /k.pem\n",
            "MUTUAL",
            "'trafficPolicy.tls': mode MUTUAL needs 'clientCertificate' (a PEM file on the client)",
        ),
        (
            "      mode: MUTUAL\n      caCertificates: /ca.pem\n      clientCertificate: /c.pem\n",
            "MUTUAL",
            "mode MUTUAL needs 'privateKey'",
        ),
        (
            "      mode: MUTUAL\n      credentialName: client-credential\n",
            "credentialName",
            "'trafficPolicy.tls.credentialName' is not supported (no Kubernetes secrets): use \
             clientCertificate/privateKey (and caCertificates) files",
        ),
        (
            "      mode: SIMPLE\n      caCertificates: /ca.pem\n      insecureSkipVerify: true\n",
            "insecureSkipVerify",
            "'trafficPolicy.tls.insecureSkipVerify: true' is not supported: the server's \
             certificate is always verified",
        ),
        (
            "      mode: SIMPLE\n      caCertificates: \"\"\n",
            "caCertificates",
            "'trafficPolicy.tls.caCertificates' must be a file path",
        ),
        (
            "      mode: SIMPLE\n      caCertificates: /ca.pem\n      subjectAltNames: [\"a b\"]\n",
            "a b",
            "'trafficPolicy.tls.subjectAltNames[0]': 'a b' is not a DNS name or URI",
        ),
        (
            "      mode: SIMPLE\n      caCertificates: /ca.pem\n      caCrl: /crl.pem\n",
            "caCrl",
            "field 'trafficPolicy.tls.caCrl' is not supported yet",
        ),
    ];
    for (tls, at, needle) in cases {
        let text = format!("{SE_CATALOG}---\n{}", dr_tls(tls, ""));
        assert_rejected(&text, at, needle);
    }
}

fn files(tls: &mesh_core::model::UpstreamTls) -> &mesh_core::model::FileTls {
    match &tls.origination {
        mesh_core::model::TlsOrigination::Files(files) => files,
        other => panic!("not file TLS: {other:?}"),
    }
}

#[test]
fn simple_and_mutual_give_clusters_file_tls_with_the_host_as_sni() {
    let dr = dr_tls(
        "      mode: SIMPLE\n      caCertificates: /etc/certs/ca.pem\n",
        "        mode: MUTUAL\n        clientCertificate: /etc/certs/client.pem\n        privateKey: /etc/certs/client.key\n        caCertificates: /etc/certs/ca.pem\n        sni: catalog.example.com\n        subjectAltNames: [catalog.example.com, \"spiffe://example.com/catalog\"]\n        insecureSkipVerify: false\n",
    );
    let text = [("se.yaml", SE_CATALOG), ("dr.yaml", dr.as_str())];
    let simple = cluster_tls(&text, "").expect("SIMPLE");
    assert_eq!(&*simple.sni, FQDN, "the service host is the SNI");
    assert!(simple.server_identities.is_empty());
    let f = files(&simple);
    assert_eq!(f.mode(), "SIMPLE");
    assert_eq!(f.ca_certificates.as_deref(), Some("/etc/certs/ca.pem"));
    assert!(f.subject_alt_names.is_empty());
    assert_eq!(f.client_certificate, None);
    // Subsets inherit the rule's tls, or override it.
    assert_eq!(cluster_tls(&text, "v2"), Some(simple));
    let mutual = cluster_tls(&text, "v1").expect("MUTUAL");
    assert_eq!(&*mutual.sni, "catalog.example.com");
    let f = files(&mutual);
    assert_eq!(f.mode(), "MUTUAL");
    let sans: Vec<&str> = f.subject_alt_names.iter().map(|n| &**n).collect();
    assert_eq!(
        sans,
        ["catalog.example.com", "spiffe://example.com/catalog"]
    );
    let client = f.client_certificate.as_ref().unwrap();
    assert_eq!(&*client.certificate_chain, "/etc/certs/client.pem");
    assert_eq!(&*client.private_key, "/etc/certs/client.key");

    // An explicit SIMPLE wins over auto mTLS (a STRICT namespace).
    let strict = pa("shop", "default", "  mtls: {mode: STRICT}\n");
    let dr = dr_tls(
        "      mode: SIMPLE\n      caCertificates: /etc/certs/ca.pem\n",
        "",
    );
    let text = [
        ("se.yaml", SE_CATALOG),
        ("dr.yaml", dr.as_str()),
        ("pa.yaml", strict.as_str()),
    ];
    assert_eq!(files(&cluster_tls(&text, "").unwrap()).mode(), "SIMPLE");
}

#[test]
fn simple_and_mutual_without_ca_certificates_verify_against_the_system_roots() {
    let dr = dr_tls(
        "      mode: SIMPLE\n      sni: api.example.com\n",
        "        mode: MUTUAL\n        clientCertificate: /c.pem\n        privateKey: /k.pem\n",
    );
    let text = [("se.yaml", SE_CATALOG), ("dr.yaml", dr.as_str())];
    assert!(check(&format!("{SE_CATALOG}---\n{dr}")).is_empty());
    let simple = cluster_tls(&text, "").expect("SIMPLE");
    assert_eq!(&*simple.sni, "api.example.com");
    let f = files(&simple);
    assert_eq!((f.mode(), f.ca_certificates.as_ref()), ("SIMPLE", None));
    let mutual = cluster_tls(&text, "v1").expect("MUTUAL");
    let f = files(&mutual);
    assert_eq!((f.mode(), f.ca_certificates.as_ref()), ("MUTUAL", None));
    // `check` says so, at each mode's line (the rule's and the subset's);
    // a rule with a CA file gets no such note.
    let d = super::tests::dir(&[("dr.yaml", dr.as_str())]);
    let notes = check_notes(&[d.path()]);
    let lines: Vec<usize> = notes.iter().map(|n| n.line).collect();
    assert_eq!(lines, [8, 15], "{notes:#?}");
    assert!(
        notes[0].message.starts_with(
            "tls.mode SIMPLE without caCertificates: the server's certificate is verified \
             against the system's roots of each client's machine"
        ),
        "{notes:#?}"
    );
    assert!(
        notes[1].message.starts_with("tls.mode MUTUAL"),
        "{notes:#?}"
    );
    let with_ca = dr_tls("      mode: SIMPLE\n      caCertificates: /ca.pem\n", "");
    let d = super::tests::dir(&[("dr.yaml", with_ca.as_str())]);
    assert!(check_notes(&[d.path()]).is_empty());
}

#[test]
fn workload_group_and_entry_problems() {
    let wg = |template: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {{name: catalog, namespace: shop}}\nspec:\n  template:\n{template}"
        )
    };
    assert!(check(&wg("    serviceAccount: catalog\n")).is_empty());
    assert_rejected(
        &wg("    serviceAccount: catalog\n    labels: {app: x}\n"),
        "labels",
        "should not be set in a WorkloadGroup template (set them in 'metadata.labels')",
    );
    assert_rejected(
        &wg("    serviceAccount: Catalog_SA\n"),
        "Catalog_SA",
        "is not a service account name",
    );
    assert_rejected(
        &wg("    serviceAccount: catalog\n    network: n1\n"),
        "network: n1",
        "field 'template.network' is not supported yet",
    );
    let text = SE_CATALOG.replace(
        "  resolution: STATIC\n",
        "  resolution: STATIC\n  subjectAltNames: [\"spiffe://cluster.local/catalog\"]\n",
    );
    assert_rejected(&text, "subjectAltNames", "only SPIFFE IDs are verified");
}

// ----------------------------------------------------------- workload labels

/// The WorkloadGroup of catalog in shop, with labels.
const WG_LABELS: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: catalog, namespace: shop}
spec:
  metadata:
    labels: {app: catalog, version: v0, tier: backend}
  template:
    serviceAccount: catalog
";

#[test]
fn a_registration_s_labels_win_over_its_workload_group_s() {
    let (s, _d) = store(&[("se.yaml", SE_CATALOG), ("wg.yaml", WG_LABELS)]);
    let security = s.security();
    // However the service is named, from its own namespace or another.
    for (service, ns) in [
        ("catalog", "shop"),
        ("catalog.shop", "shop"),
        (FQDN, "shop"),
        ("catalog.shop", "web"),
    ] {
        let r = reg(
            service,
            ns,
            "10.0.0.1",
            8080,
            &[("version", "v1"), ("track", "canary")],
        );
        assert_eq!(
            security.registered_labels(&r),
            labels(&[
                ("app", "catalog"),
                ("tier", "backend"),
                ("version", "v1"),
                ("track", "canary"),
            ]),
            "{service} from {ns}: the group's labels, its own on top"
        );
    }
    // Without labels of its own, the group's.
    let bare = reg("catalog", "shop", "10.0.0.1", 8080, &[]);
    assert_eq!(
        security.registered_labels(&bare),
        labels(&[("app", "catalog"), ("tier", "backend"), ("version", "v0")])
    );
    // `catalog` of another namespace is another service: not this group.
    let other = reg("catalog", "web", "10.0.0.1", 8080, &[("version", "v1")]);
    assert_eq!(
        security.registered_labels(&other),
        labels(&[("version", "v1")])
    );
}

#[test]
fn an_unregistered_node_s_labels_win_over_the_group_its_cluster_names() {
    let (s, _d) = store(&[("se.yaml", SE_CATALOG), ("wg.yaml", WG_LABELS)]);
    let security = s.security();
    let node = labels(&[("version", "v1")]);
    let merged = labels(&[("app", "catalog"), ("tier", "backend"), ("version", "v1")]);
    // `node.cluster` as gRPC bootstraps write it, or Istio's `<app>.<ns>`.
    assert_eq!(security.node_labels("catalog", "shop", &node), merged);
    assert_eq!(security.node_labels("catalog.shop", "shop", &node), merged);
    // A cluster naming no group (a node id, or nothing): the node's own.
    assert_eq!(security.node_labels("catalog-1", "shop", &node), node);
    assert_eq!(security.node_labels("", "shop", &node), node);
}

#[test]
fn subsets_and_policies_see_the_one_merged_label_set() {
    let deny_backend = authz_policy(
        "shop",
        "deny-backend",
        "\n  selector: {matchLabels: {tier: backend}}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/internal\"]}}]\n",
    );
    let (s, _d) = store(&[
        ("se.yaml", SE_CATALOG),
        ("dr.yaml", DR_CATALOG),
        ("wg.yaml", WG_LABELS),
        ("authz.yaml", &deny_backend),
    ]);
    let security = s.security();
    let r = reg("catalog", "shop", "10.0.0.1", 8080, &[("version", "v1")]);
    let merged = security.registered_labels(&r);
    // Subset v1 (version: v1) holds the endpoint: its own version beat the
    // group's v0.
    let (snap, diags) = s.snapshot(std::slice::from_ref(&r));
    assert!(diags.is_empty(), "{diags:#?}");
    let v1 = &snap.endpoints[format!("outbound|80|v1|{FQDN}").as_str()];
    assert_eq!(v1.endpoint_count(), 1);
    assert_eq!(
        snap.endpoints[format!("outbound|80|v2|{FQDN}").as_str()].endpoint_count(),
        0
    );
    // The policy selecting the group's `tier: backend` applies to it.
    let addr = SocketAddr::new(r.address, r.port);
    let listener = security.server_listener(
        "grpc/server?xds.resource.listening_address=10.0.0.1:8080",
        addr,
        Workload {
            namespace: "shop",
            labels: &merged,
        },
    );
    assert!(!allowed(&listener, GET.method("GET", "/internal")));
    assert!(allowed(&listener, GET.method("GET", "/items")));
}

// ------------------------------------------------------ registration access

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

#[test]
fn registration_needs_an_allowed_service_account_of_the_namespace() {
    let (s, _d) = store(&[("se.yaml", SE_CATALOG), ("dr.yaml", DR_CATALOG)]);
    let r = reg("catalog", "shop", "10.0.0.1", 8080, &[]);
    // By default the service account named like the service.
    assert_eq!(
        s.authorize_registration(&r, &id("spiffe://cluster.local/ns/shop/sa/catalog")),
        Ok(())
    );
    let err = s
        .authorize_registration(&r, &id("spiffe://cluster.local/ns/shop/sa/frontend"))
        .unwrap_err();
    assert!(
        err.contains("spiffe://cluster.local/ns/shop/sa/frontend"),
        "{err}"
    );
    assert!(err.contains(FQDN), "{err}");
    assert!(
        err.contains("allows spiffe://cluster.local/ns/shop/sa/catalog"),
        "{err}"
    );
    assert!(
        err.contains("add a WorkloadGroup named 'catalog' in namespace 'shop' with spec.template.serviceAccount: frontend"),
        "{err}"
    );
    // Another namespace's identity, even with the right name.
    let err = s
        .authorize_registration(&r, &id("spiffe://cluster.local/ns/web/sa/catalog"))
        .unwrap_err();
    assert!(err.contains("only in its own namespace"), "{err}");
    // Another trust domain.
    assert!(
        s.authorize_registration(&r, &id("spiffe://evil.example/ns/shop/sa/catalog"))
            .is_err()
    );
    // An implicit service (registrations only) follows the same rule.
    let r = reg("cart", "shop", "10.0.0.2", 8080, &[]);
    assert!(
        s.authorize_registration(&r, &id("spiffe://cluster.local/ns/shop/sa/cart"))
            .is_ok()
    );
}

#[test]
fn a_workload_group_names_who_may_register() {
    let wg = "apiVersion: networking.istio.io/v1beta1
kind: WorkloadGroup
metadata: {name: catalog, namespace: shop}
spec:
  template:
    serviceAccount: catalog-vm
";
    let (s, _d) = store(&[("se.yaml", SE_CATALOG), ("wg.yaml", wg)]);
    for service in ["catalog", "catalog.shop", FQDN] {
        let r = reg(service, "shop", "10.0.0.1", 8080, &[]);
        assert_eq!(
            s.authorize_registration(&r, &id("spiffe://cluster.local/ns/shop/sa/catalog-vm")),
            Ok(()),
            "{service}"
        );
        assert!(
            s.authorize_registration(&r, &id("spiffe://cluster.local/ns/shop/sa/catalog"))
                .is_err(),
            "the group replaces the default"
        );
    }
    // A group without a service account means `default`, as in Istio.
    let wg = wg.replace("    serviceAccount: catalog-vm\n", "    {}\n");
    let (s, _d) = store(&[("se.yaml", SE_CATALOG), ("wg.yaml", &wg)]);
    let r = reg("catalog", "shop", "10.0.0.1", 8080, &[]);
    assert_eq!(
        s.authorize_registration(&r, &id("spiffe://cluster.local/ns/shop/sa/default")),
        Ok(())
    );
}

#[test]
fn an_external_host_belongs_to_the_namespace_of_its_service_entry() {
    let se = "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [payments.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
";
    let (s, _d) = store(&[("se.yaml", se)]);
    // The hijack of issue 13: another namespace's same-named account,
    // registering from its own namespace.
    let r = reg("payments.example.com", "evil", "127.0.0.9", 80, &[]);
    let err = s
        .authorize_registration(&r, &id("spiffe://cluster.local/ns/evil/sa/payments"))
        .unwrap_err();
    assert!(
        err.contains(
            "only identities the configuration of namespace 'shop' names may back its hosts"
        ),
        "{err}"
    );
    assert!(
        err.contains("declared by a ServiceEntry of namespace 'shop'"),
        "{err}"
    );
    // The same-named account of the host's namespace may.
    let r = reg("payments.example.com", "shop", "127.0.0.9", 80, &[]);
    assert_eq!(
        s.authorize_registration(&r, &id("spiffe://cluster.local/ns/shop/sa/payments")),
        Ok(())
    );
    // subjectAltNames may name an account of another namespace, which then
    // registers from its own namespace.
    let with_san = se.replace(
        "  resolution: STATIC\n",
        "  resolution: STATIC\n  subjectAltNames: [spiffe://cluster.local/ns/billing/sa/pay]\n",
    );
    let (s, _d) = store(&[("se.yaml", &with_san)]);
    let r = reg("payments.example.com", "billing", "127.0.0.9", 80, &[]);
    assert_eq!(
        s.authorize_registration(&r, &id("spiffe://cluster.local/ns/billing/sa/pay")),
        Ok(())
    );
    let r = reg("payments.example.com", "shop", "127.0.0.9", 80, &[]);
    assert!(
        s.authorize_registration(&r, &id("spiffe://cluster.local/ns/shop/sa/payments"))
            .is_err(),
        "subjectAltNames replace the default"
    );
    // An external host no ServiceEntry declares belongs to no namespace.
    let r = reg("ledger.example.com", "evil", "127.0.0.9", 80, &[]);
    let err = s
        .authorize_registration(&r, &id("spiffe://cluster.local/ns/evil/sa/ledger"))
        .unwrap_err();
    assert!(
        err.contains("no ServiceEntry declares ledger.example.com"),
        "{err}"
    );
}

// --------------------------------------------------------- gRPC compatibility

#[test]
fn check_for_grpc_says_grpc_clients_nack_file_tls() {
    let dr = dr_tls(
        "      mode: MUTUAL\n      caCertificates: /ca.pem\n      clientCertificate: /c.pem\n      privateKey: /k.pem\n",
        "",
    );
    let d = super::tests::dir(&[("se.yaml", SE_CATALOG), ("dr.yaml", dr.as_str())]);
    let found = crate::grpc_compatibility(d.path(), &MeshOptions::default());
    let text = found.join("\n");
    assert!(
        text.contains(&format!(
            "cluster \"outbound|80||{FQDN}\": DestinationRule tls mode MUTUAL (certificate files) \
             cannot be used by gRPC clients: gRFC A29 supports only certificate provider instances"
        )),
        "{text}"
    );
}

#[test]
fn check_for_grpc_reports_permissive_audit_and_credentials() {
    let (s, _d) = store(&[("se.yaml", SE_CATALOG)]);
    let (snap, _) = s.snapshot(&[]);
    // No mTLS in use: nothing to say.
    assert!(s.grpc_security_gaps(&snap).is_empty());

    let ns = pa("shop", "default", "  mtls: {mode: PERMISSIVE}\n");
    let audit = authz("  action: AUDIT\n  rules: [{}]\n");
    let strict = pa(
        "shop",
        "catalog",
        "  selector:\n    matchLabels: {app: catalog}\n  mtls: {mode: STRICT}\n",
    );
    let (s, _d) = store(&[
        ("se.yaml", SE_CATALOG),
        ("ns.yaml", &ns),
        ("ap.yaml", &audit),
        ("w.yaml", &strict),
    ]);
    let (snap, _) = s.snapshot(&[]);
    let found = s.grpc_security_gaps(&snap);
    let text = found.join("\n");
    assert!(text.contains("PERMISSIVE (Istio's default; no mesh-wide STRICT or DISABLE PeerAuthentication in namespace 'istio-system')"), "{text}");
    assert!(
        text.contains(
            "PeerAuthentication shop/default: PERMISSIVE cannot be served to gRPC servers"
        ),
        "{text}"
    );
    assert!(
        text.contains("AuthorizationPolicy foo/p: AUDIT is ignored by gRPC servers"),
        "{text}"
    );
    assert!(text.contains("PeerAuthentication shop/catalog: STRICT: gRPC enforces it only on servers built with xDS server credentials"), "{text}");
    assert_eq!(found.len(), 4, "{text}");

    // A mesh-wide STRICT: no default warning; served listeners are judged too.
    let root = pa("istio-system", "default", "  mtls: {mode: STRICT}\n");
    let (s, _d) = store(&[("se.yaml", SE_CATALOG), ("root.yaml", &root)]);
    let (mut snap, _) = s.snapshot(&[]);
    let text = s.grpc_security_gaps(&snap).join("\n");
    assert!(!text.contains("Istio's default"), "{text}");
    assert!(text.contains("clusters with mTLS"), "{text}");
    let l = server(&[("ns.yaml", &ns), ("ap.yaml", &audit)], "foo", &[], 8000);
    snap.server_listeners
        .insert(l.name.clone(), std::sync::Arc::new(l));
    let served =
        crate::compat::grpc_ignored(&snap, Some(&Default::default()), Some(&Default::default()));
    assert_eq!(served.len(), 2, "{served:#?}");
    assert!(
        served[0].contains("AUDIT policy foo/p is ignored"),
        "{served:#?}"
    );
    assert!(
        served[1].contains("PERMISSIVE cannot be served"),
        "{served:#?}"
    );
}
