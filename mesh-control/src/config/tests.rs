//! Tests of the YAML front end: what a user writes, what `check` says about
//! it (with the line), and what clients get.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use http::{HeaderMap, Method, Uri};
use mesh_core::Snapshot;
use mesh_core::model::{
    HeaderMatch, LbPolicy, Locality, PathMatch, Pattern, Protocol, QueryParamMatch, RouteMatch,
    ValueMatch,
};
use mesh_core::route::RequestView;
use mesh_core::snapshot::ListenerLookup;
use tempfile::TempDir;

use super::*;

pub(super) const FQDN: &str = "catalog.shop.svc.cluster.local";

/// A directory holding `files`.
pub(super) fn dir(files: &[(&str, &str)]) -> TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

fn write(d: &TempDir, name: &str, text: &str) {
    std::fs::write(d.path().join(name), text).unwrap();
}

/// `check_dir` on one file.
pub(super) fn check(text: &str) -> Vec<Diagnostic> {
    let d = dir(&[("a.yaml", text)]);
    check_dir(d.path(), &MeshOptions::default())
}

/// Asserts that exactly one diagnostic is reported, at `line`, and that its
/// message contains `needle`.
#[track_caller]
pub(super) fn assert_one(diags: &[Diagnostic], line: usize, needle: &str) {
    assert_eq!(diags.len(), 1, "expected one diagnostic, got {diags:#?}");
    let d = &diags[0];
    assert!(
        d.message.contains(needle),
        "message {:?} lacks {needle:?}",
        d.message
    );
    assert_eq!(d.line, line, "wrong line for {d}");
}

/// A store loaded from `files`, asserting that the files themselves have
/// no problem; what is applied is judged without registrations, so a
/// change with a problem between resources is rejected (see
/// [`ConfigStore::rejections`]).
pub(super) fn store(files: &[(&str, &str)]) -> (ConfigStore, TempDir) {
    let d = dir(files);
    let mut s = ConfigStore::new(MeshOptions::default());
    let diags = s.read_dirs(&[d.path()]);
    assert!(diags.is_empty(), "{diags:#?}");
    s.settle(&[]);
    (s, d)
}

pub(super) fn reg(
    service: &str,
    ns: &str,
    ip: &str,
    port: u16,
    labels: &[(&str, &str)],
) -> Registration {
    Registration {
        service: service.into(),
        namespace: ns.into(),
        address: ip.parse::<IpAddr>().unwrap(),
        port,
        service_port: None,
        protocol: None,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        locality: Locality::default(),
    }
}

/// The listener an app in namespace `shop` gets for `authority`: the ADS
/// server resolves short names (`catalog`, `catalog:80`) in the client's
/// namespace.
pub(super) fn listener<'s>(snap: &'s Snapshot, authority: &str) -> &'s mesh_core::model::Listener {
    let name = match authority.split_once(':') {
        _ if snap.listeners.contains_key(authority) => authority.to_string(),
        Some((host, port)) if !host.contains('.') => format!("{host}.shop:{port}"),
        None if !authority.contains('.') => format!("{authority}.shop"),
        _ => authority.to_string(),
    };
    match snap.listener_for(&name) {
        ListenerLookup::Found(l) => l,
        _ => panic!("no listener for {authority}"),
    }
}

/// The cluster a request goes to, with a fixed random number.
pub(super) fn route_to(
    snap: &Snapshot,
    authority: &str,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    random: u64,
) -> String {
    let listener = listener(snap, authority);
    let method: Method = method.parse().unwrap();
    let uri: Uri = uri.parse().unwrap();
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let req = RequestView::new(&method, &uri, &map, authority);
    snap.resolve(listener, &req, random)
        .unwrap_or_else(|e| panic!("{authority}{uri}: {e}"))
        .cluster
        .name
        .to_string()
}

fn names<T>(map: &BTreeMap<mesh_core::model::Name, T>) -> Vec<String> {
    map.keys().map(|k| k.to_string()).collect()
}

pub(super) const SE_CATALOG: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: catalog
  namespace: shop
spec:
  hosts: [catalog]
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: STATIC
";

pub(super) const DR_CATALOG: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: catalog
  namespace: shop
spec:
  host: catalog
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
";

// ---------------------------------------------------------------- the example

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh")
}

#[test]
fn example_mesh_checks_clean() {
    let diags = check_dir(&example_dir(), &MeshOptions::default());
    assert!(diags.is_empty(), "{diags:#?}");
}

#[test]
fn example_mesh_routes_beta_users_and_splits() {
    let mut s = ConfigStore::new(MeshOptions::default());
    assert!(s.load_dir(&example_dir()).is_empty());
    let regs = [
        reg("catalog", "shop", "10.0.0.1", 41001, &[("version", "v1")]),
        reg("catalog", "shop", "10.0.0.2", 41002, &[("version", "v2")]),
        reg("payment", "shop", "10.0.1.1", 42001, &[("version", "v1")]),
        reg("payment", "shop", "10.0.1.2", 42002, &[("version", "v2")]),
    ];
    let (snap, diags) = s.snapshot(&regs);
    assert!(diags.is_empty(), "{diags:#?}");
    let v1 = format!("outbound|80|v1|{FQDN}");
    let v2 = format!("outbound|80|v2|{FQDN}");
    assert_eq!(
        route_to(&snap, "catalog", "GET", "/items", &[("x-user", "beta")], 0),
        v2
    );
    assert_eq!(route_to(&snap, "catalog", "GET", "/items", &[], 0), v1);
    assert_eq!(
        route_to(&snap, "catalog", "GET", "/items", &[], u64::MAX),
        v2
    );
    let rc = &snap.route_configs[&*format!("{FQDN}:80")];
    let split = &rc.virtual_hosts[0].routes[1];
    let weights: Vec<(String, u32)> = split
        .action
        .clusters()
        .iter()
        .map(|c| (c.name.to_string(), c.weight))
        .collect();
    assert_eq!(weights, vec![(v1.clone(), 90), (v2.clone(), 10)]);
    assert_eq!(snap.clusters[&*v1].lb_policy, LbPolicy::RoundRobin);
    let v1_eps = &snap.endpoints[&*v1];
    assert_eq!(v1_eps.endpoint_count(), 1);
    assert_eq!(
        v1_eps.localities[0].endpoints[0].address,
        "10.0.0.1:41001".parse().unwrap()
    );
    assert_eq!(
        snap.endpoints[&*format!("outbound|80||{FQDN}")].endpoint_count(),
        2
    );

    let pay = "payment.shop.svc.cluster.local";
    let p1 = format!("outbound|50051|v1|{pay}");
    assert_eq!(snap.clusters[&*p1].protocol, Protocol::Grpc);
    assert_eq!(snap.clusters[&*p1].lb_policy, LbPolicy::LeastRequest);
    let rc = &snap.route_configs[&*format!("{pay}:50051")];
    let w: Vec<u32> = rc.virtual_hosts[0].routes[0]
        .action
        .clusters()
        .iter()
        .map(|c| c.weight)
        .collect();
    assert_eq!(w, vec![70, 30]);
    assert_eq!(
        route_to(
            &snap,
            "payment.shop:50051",
            "POST",
            "/pay.Payment/Charge",
            &[],
            0
        ),
        p1
    );
}

// ------------------------------------------------------- diagnostics and lines

#[test]
fn yaml_syntax_error_reports_the_parser_line() {
    let diags = check(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: [a, b\nspec: {}\n",
    );
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert!(
        diags[0].message.starts_with("YAML syntax error"),
        "{diags:?}"
    );
    assert_eq!(diags[0].line, 4);
}

#[test]
fn duplicate_yaml_key_is_a_syntax_error() {
    let text = format!("{SE_CATALOG}  resolution: STATIC\n");
    let diags = check(&text);
    assert_one(&diags, 13, "duplicated key");
}

#[test]
fn unknown_and_unsupported_kinds_and_api_versions() {
    let diags = check(
        "apiVersion: networking.istio.io/v1\nkind: VirtualServise\nmetadata: {name: x}\nspec: {}\n",
    );
    assert_one(&diags, 2, "unknown kind 'VirtualServise'");
    let diags = check(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: x}\nspec: {}\n",
    );
    assert_one(&diags, 2, "kind 'Telemetry' is not supported yet");
    let text = SE_CATALOG.replace("networking.istio.io/v1\n", "networking.istio.io/v2\n");
    assert_one(
        &check(&text),
        1,
        "unknown apiVersion 'networking.istio.io/v2'",
    );
    for v in ["v1beta1", "v1alpha3"] {
        let text = SE_CATALOG.replace("istio.io/v1\n", &format!("istio.io/{v}\n"));
        assert!(check(&text).is_empty(), "{v}");
    }
    let diags = check("kind: ServiceEntry\nmetadata: {name: x}\nspec: {}\n");
    assert!(
        diags
            .iter()
            .any(|d| d.line == 1 && d.message.contains("missing field 'apiVersion'")),
        "{diags:#?}"
    );
}

#[test]
fn missing_metadata_name() {
    let text = SE_CATALOG.replace("  name: catalog\n", "");
    let diags = check(&text);
    assert_one(&diags, 3, "missing field 'metadata.name'");
    assert_eq!(
        diags[0].message,
        "ServiceEntry: missing field 'metadata.name'"
    );
}

#[test]
fn unsupported_field_names_the_path_and_line() {
    let text = format!(
        "{SE_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: catalog
  namespace: shop
spec:
  hosts: [catalog]
  http:
  - route:
    - destination:
        host: catalog
    delegate:
      name: catalog
"
    );
    let diags = check(&text);
    assert_one(&diags, 25, "");
    assert_eq!(
        diags[0].message,
        "VirtualService shop/catalog: field 'http[0].delegate' is not supported yet"
    );
    assert!(diags[0].to_string().ends_with(
        "a.yaml:25: VirtualService shop/catalog: field 'http[0].delegate' is not supported yet"
    ));
}

#[test]
fn unknown_field_is_a_typo() {
    let text = format!(
        "{SE_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: catalog
  namespace: shop
spec:
  hosts: [catalog]
  htpp:
  - route:
    - destination:
        host: catalog
"
    );
    let diags = check(&text);
    // The typo, and the `http` it was meant to be.
    assert_eq!(diags.len(), 2, "{diags:#?}");
    assert!(
        diags
            .iter()
            .any(|d| d.line == 21 && d.message.ends_with("unknown field 'htpp'"))
    );
    assert!(
        diags
            .iter()
            .any(|d| d.line == 19 && d.message.contains("missing field 'http'"))
    );
    assert!(
        diags
            .iter()
            .any(|d| d.message.contains("missing field 'http'"))
    );
}

#[test]
fn unsupported_traffic_policy_fields() {
    let cases = [
        (
            "    tunnel: {targetHost: x, targetPort: 1}\n",
            "trafficPolicy.tunnel",
        ),
        (
            "    tls: {mode: SIMPLE, caCertificates: /ca.pem, caCrl: /crl.pem}\n",
            "trafficPolicy.tls.caCrl",
        ),
        (
            "    loadBalancer:\n      warmup: {duration: 10s}\n",
            "trafficPolicy.loadBalancer.warmup",
        ),
    ];
    for (policy, path) in cases {
        let text = format!(
            "{SE_CATALOG}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
  trafficPolicy:
{policy}"
        );
        let line = if path.contains("loadBalancer") {
            21
        } else {
            20
        };
        assert_one(
            &check(&text),
            line,
            &format!("field '{path}' is not supported yet"),
        );
    }
}

#[test]
fn weights_must_be_non_negative_integers_and_not_all_zero() {
    let vs = |w1: &str, w2: &str| {
        format!(
            "{SE_CATALOG}---
{DR_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - route:
    - destination: {{host: catalog, subset: v1}}
      weight: {w1}
    - destination: {{host: catalog, subset: v2}}
      weight: {w2}
"
        )
    };
    assert!(check(&vs("90", "10")).is_empty());
    assert!(check(&vs("0", "1")).is_empty(), "one zero weight is fine");
    assert_one(
        &check(&vs("-1", "10")),
        35,
        "weight -1 must not be negative",
    );
    assert_one(
        &check(&vs("90", "1.5")),
        37,
        "'http[0].route[1].weight' must be an integer",
    );
    assert_one(
        &check(&vs("90", "ten")),
        37,
        "must be an integer, found a string",
    );
    assert_one(
        &check(&vs("0", "0")),
        33,
        "all weights of 'http[0].route' are zero",
    );
}

#[test]
fn port_numbers_out_of_range() {
    let text = SE_CATALOG.replace("number: 80", "number: 70000");
    assert_one(&check(&text), 9, "port number 70000 is out of range");
    let text = format!(
        "{SE_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - route:
    - destination:
        host: catalog
        port:
          number: 0
"
    );
    assert_one(&check(&text), 24, "port number 0 is out of range");
}

#[test]
fn duplicate_resources_in_one_file_and_across_files() {
    let text = format!("{SE_CATALOG}---\n{SE_CATALOG}");
    let diags = check(&text);
    assert_one(
        &diags,
        17,
        "duplicate ServiceEntry shop/catalog: already defined at ",
    );
    assert!(
        diags[0].message.ends_with("a.yaml:4"),
        "{}",
        diags[0].message
    );

    let d = dir(&[("a.yaml", SE_CATALOG), ("b.yaml", SE_CATALOG)]);
    let diags = check_dir(d.path(), &MeshOptions::default());
    assert_one(&diags, 4, "duplicate ServiceEntry shop/catalog");
    assert!(diags[0].file.ends_with("b.yaml"));
    // Same name in another namespace, or of another kind, is no duplicate.
    let other = SE_CATALOG.replace("namespace: shop", "namespace: web");
    let d = dir(&[("a.yaml", SE_CATALOG), ("b.yaml", &other)]);
    assert!(check_dir(d.path(), &MeshOptions::default()).is_empty());
}

#[test]
fn invalid_regex_points_at_the_regex() {
    let text = format!(
        "{SE_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - match:
    - uri:
        prefix: /api
    - headers:
        x-id:
          regex: \"[0-9+\"
    route:
    - destination: {{host: catalog}}
"
    );
    assert_one(
        &check(&text),
        25,
        "'http[0].match[1].headers.x-id.regex': invalid regex",
    );
}

#[test]
fn string_match_needs_exactly_one_kind() {
    let text = format!(
        "{SE_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - match:
    - uri:
        prefix: /api
        exact: /api
    route:
    - destination: {{host: catalog}}
"
    );
    assert_one(&check(&text), 23, "only one of exact, prefix or regex");
}

#[test]
fn route_to_unknown_host() {
    let text = format!(
        "{SE_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - route:
    - destination:
        host: reviews
"
    );
    let diags = check(&text);
    assert_one(
        &diags,
        22,
        "'http[0].route[0].destination.host': host 'reviews.shop.svc.cluster.local' is not declared",
    );
    assert!(
        diags[0]
            .message
            .starts_with("VirtualService shop/catalog: ")
    );
}

#[test]
fn undefined_subset() {
    let text = format!(
        "{SE_CATALOG}---
{DR_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - route:
    - destination:
        host: catalog
        subset: v3
"
    );
    assert_one(
        &check(&text),
        36,
        "subset 'v3' is not defined by DestinationRule shop/catalog",
    );
    // Without any DestinationRule.
    let text = format!(
        "{SE_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - route:
    - destination: {{host: catalog, subset: v1}}
"
    );
    assert_one(&check(&text), 21, "no DestinationRule for host");
}

#[test]
fn subset_selecting_nothing_is_not_an_error() {
    let dr = DR_CATALOG.replace("{version: v2}", "{version: nowhere}");
    assert!(check(&format!("{SE_CATALOG}---\n{dr}")).is_empty());
}

#[test]
fn second_virtual_service_for_a_host() {
    let vs = |name: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts:
  - catalog
  http:
  - route:
    - destination: {{host: catalog}}
"
        )
    };
    let d = dir(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", &vs("first")),
        ("c.yaml", &vs("second")),
    ]);
    let diags = check_dir(d.path(), &MeshOptions::default());
    assert_one(
        &diags,
        6,
        "host 'catalog.shop.svc.cluster.local' already routed by VirtualService shop/first at ",
    );
    assert!(diags[0].file.ends_with("c.yaml"));
    assert!(
        diags[0].message.ends_with("b.yaml:3"),
        "{}",
        diags[0].message
    );
}

#[test]
fn other_rejected_values() {
    let cases: &[(&str, &str, usize, &str)] = &[
        (
            "resolution: STATIC",
            "resolution: DNS_SOMETIMES",
            12,
            "unknown resolution 'DNS_SOMETIMES'",
        ),
        (
            "protocol: HTTP",
            "protocol: TCP",
            11,
            "'ports[0].protocol: TCP' is not supported yet",
        ),
        (
            "hosts: [catalog]",
            "hosts: ['*.shop']",
            7,
            "wildcard host '*.shop' is not supported yet",
        ),
        (
            "namespace: shop",
            "namespace: Shop",
            5,
            "metadata.namespace 'Shop' must be a DNS label",
        ),
        (
            "  resolution: STATIC\n",
            "  resolution: STATIC\n  addresses: ['10.9.9.x']\n",
            13,
            "'10.9.9.x' is not an IP address or CIDR block",
        ),
    ];
    for (from, to, line, needle) in cases {
        let text = SE_CATALOG.replace(from, to);
        assert_one(&check(&text), *line, needle);
    }
}

// ------------------------------------------------------------- translation

#[test]
fn multi_document_files_and_default_route() {
    let (s, _d) = store(&[(
        "all.yml",
        &format!("---\n{SE_CATALOG}---\n---\n{DR_CATALOG}"),
    )]);
    assert_eq!(s.len(), 2);
    let (snap, diags) = s.snapshot(&[]);
    assert!(diags.is_empty(), "{diags:#?}");
    let mut want = vec![
        "catalog.shop".to_string(),
        "catalog.shop:80".into(),
        FQDN.into(),
        format!("{FQDN}:80"),
    ];
    want.sort();
    assert_eq!(names(&snap.listeners), want);
    let rc = &snap.route_configs[&*format!("{FQDN}:80")];
    let vh = &rc.virtual_hosts[0];
    let domains: Vec<&str> = vh.domains.iter().map(|d| &**d).collect();
    assert_eq!(
        domains,
        vec![
            FQDN,
            &format!("{FQDN}:80"),
            "catalog.shop",
            "catalog.shop:80",
            "catalog",
            "catalog:80"
        ]
    );
    assert_eq!(vh.routes.len(), 1);
    assert_eq!(vh.routes[0].matcher, RouteMatch::any());
    assert_eq!(
        &*vh.routes[0].action.clusters()[0].name,
        format!("outbound|80||{FQDN}")
    );
    assert_eq!(
        names(&snap.clusters),
        vec![
            format!("outbound|80|v1|{FQDN}"),
            format!("outbound|80|v2|{FQDN}"),
            format!("outbound|80||{FQDN}"),
        ]
    );
    for c in snap.clusters.values() {
        assert_eq!(c.eds_service_name, c.name);
        assert_eq!(c.lb_policy, LbPolicy::LeastRequest, "Istio's default");
        assert_eq!(c.protocol, Protocol::Http1);
        // An empty cluster still has its (empty) assignment.
        assert_eq!(snap.endpoints[&c.name].localities.len(), 0);
    }
}

#[test]
fn namespaces_and_short_names() {
    // The ServiceEntry in `shop`, the DestinationRule and VirtualService in
    // `web` naming it as `catalog.shop`, routing to the full name as well.
    let dr = "\
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: catalog-rules, namespace: web}
spec:
  host: catalog.shop
  subsets:
  - {name: v1, labels: {version: v1}}
";
    let vs = "\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: catalog-routes, namespace: web}
spec:
  hosts: [catalog.shop]
  http:
  - match: [{uri: {prefix: /v1}}]
    route:
    - destination: {host: catalog.shop.svc.cluster.local, subset: v1}
  - route:
    - destination: {host: catalog.shop}
";
    // A ServiceEntry without namespace lives in `default`.
    let se_default = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog}
spec:
  hosts: [catalog, api.example.com]
  ports: [{number: 8080, name: http}]
";
    let (s, _d) = store(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", dr),
        ("c.yaml", vs),
        ("d.yaml", se_default),
    ]);
    let (snap, diags) = s.snapshot(&[]);
    assert!(diags.is_empty(), "{diags:#?}");
    assert_eq!(
        route_to(&snap, "catalog.shop", "GET", "/v1/x", &[], 0),
        format!("outbound|80|v1|{FQDN}")
    );
    assert_eq!(
        route_to(&snap, FQDN, "GET", "/other", &[], 0),
        format!("outbound|80||{FQDN}")
    );
    let rc = &snap.route_configs[&*format!("{FQDN}:80")];
    let route_names: Vec<&str> = rc.virtual_hosts[0]
        .routes
        .iter()
        .map(|r| &*r.name)
        .collect();
    assert_eq!(route_names, vec!["catalog-routes.0", "catalog-routes.1"]);
    // catalog in `default` is another service; a host with two dots is as written.
    assert!(snap.listeners.contains_key("catalog.default:8080"));
    assert!(snap.listeners.contains_key("api.example.com:8080"));
    assert!(snap.listeners.contains_key("api.example.com"));
    assert!(!snap.listeners.contains_key("api.example:8080"));
    let rc = &snap.route_configs["api.example.com:8080"];
    let domains: Vec<&str> = rc.virtual_hosts[0].domains.iter().map(|d| &**d).collect();
    assert_eq!(domains, vec!["api.example.com", "api.example.com:8080"]);
}

#[test]
fn matches_translate_to_the_model() {
    let vs = format!(
        "{SE_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - name: complex
    match:
    - uri: {{regex: '/items/[0-9]+'}}
      headers:
        X-User: {{exact: beta}}
        x-tier: {{prefix: gold}}
        x-present: {{}}
      withoutHeaders:
        x-debug: {{exact: '1'}}
      method: {{exact: POST}}
      queryParams:
        page: {{regex: '[0-9]+'}}
        lang: {{exact: en}}
    - uri: {{exact: /health}}
    route:
    - destination: {{host: catalog}}
"
    );
    let (s, _d) = store(&[("a.yaml", &vs)]);
    let (snap, diags) = s.snapshot(&[]);
    assert!(diags.is_empty(), "{diags:#?}");
    let routes = &snap.route_configs[&*format!("{FQDN}:80")].virtual_hosts[0].routes;
    assert_eq!(routes.len(), 2, "two ORed matches, two routes");
    assert!(routes.iter().all(|r| &*r.name == "complex"));
    assert_eq!(routes[0].action, routes[1].action);
    let h = |name: &str, value: ValueMatch, invert: bool| HeaderMatch {
        name: name.into(),
        value,
        invert,
    };
    let want = RouteMatch {
        path: PathMatch::Regex(Pattern::new("/items/[0-9]+").unwrap()),
        headers: vec![
            h("x-user", ValueMatch::Exact("beta".into()), false),
            h("x-tier", ValueMatch::Prefix("gold".into()), false),
            h("x-present", ValueMatch::Present(true), false),
            h("x-debug", ValueMatch::Exact("1".into()), true),
            h(":method", ValueMatch::Exact("POST".into()), false),
        ]
        .into(),
        query_params: vec![
            QueryParamMatch {
                name: "page".into(),
                value: ValueMatch::Regex(Pattern::new("[0-9]+").unwrap()),
            },
            QueryParamMatch {
                name: "lang".into(),
                value: ValueMatch::Exact("en".into()),
            },
        ]
        .into(),
        ignore_case: false,
    };
    assert_eq!(routes[0].matcher, want);
    assert_eq!(
        routes[1].matcher,
        RouteMatch {
            path: PathMatch::Exact("/health".into()),
            ..RouteMatch::any()
        }
    );
    // And they behave: everything must hold for the first route.
    let ok = [("x-user", "beta"), ("x-tier", "golden"), ("x-present", "")];
    let c = format!("outbound|80||{FQDN}");
    assert_eq!(
        route_to(&snap, "catalog", "POST", "/items/42?page=2&lang=en", &ok, 0),
        c
    );
    let l = listener(&snap, "catalog");
    let no_route = |method: &str, uri: &str, headers: &[(&str, &str)]| {
        let method: Method = method.parse().unwrap();
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        snap.resolve(l, &RequestView::new(&method, &uri, &map, "catalog"), 0)
            .is_err()
    };
    assert!(no_route("GET", "/items/42?page=2&lang=en", &ok));
    assert!(no_route("POST", "/items/42?page=x&lang=en", &ok));
    let mut debug = ok.to_vec();
    debug.push(("x-debug", "1"));
    assert!(no_route("POST", "/items/42?page=2&lang=en", &debug));
    assert!(!no_route("GET", "/health", &[]));
}

#[test]
fn match_port_limits_a_route_to_that_port_and_destination_ports() {
    let se = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports:
  - {number: 80, name: http}
  - {number: 8080, name: http-admin}
";
    let vs = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  http:
  - name: admin-only
    match: [{port: 8080, uri: {prefix: /admin}}]
    route: [{destination: {host: catalog}}]
  - name: rest
    route: [{destination: {host: catalog}}]
";
    let (s, _d) = store(&[("a.yaml", se), ("b.yaml", vs)]);
    let (snap, diags) = s.snapshot(&[]);
    assert!(diags.is_empty(), "{diags:#?}");
    let names_of = |port: u16| -> Vec<(String, String)> {
        snap.route_configs[&*format!("{FQDN}:{port}")].virtual_hosts[0]
            .routes
            .iter()
            .map(|r| (r.name.to_string(), r.action.clusters()[0].name.to_string()))
            .collect()
    };
    // A destination without port goes to the same port of a multi-port host.
    assert_eq!(
        names_of(80),
        vec![("rest".into(), format!("outbound|80||{FQDN}"))]
    );
    assert_eq!(
        names_of(8080),
        vec![
            ("admin-only".into(), format!("outbound|8080||{FQDN}")),
            ("rest".into(), format!("outbound|8080||{FQDN}")),
        ]
    );
    // Only the default port has the port-less names.
    assert!(snap.listeners.contains_key("catalog.shop"));
    assert!(snap.listeners.contains_key("catalog.shop:8080"));
    let domains: Vec<String> = snap.route_configs[&*format!("{FQDN}:8080")].virtual_hosts[0]
        .domains
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(
        domains,
        vec![
            format!("{FQDN}:8080"),
            "catalog.shop:8080".into(),
            "catalog:8080".into()
        ]
    );

    // From another service with a single port, a port-less destination to
    // the two-port catalog is ambiguous.
    let front = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: front, namespace: shop}
spec:
  hosts: [front]
  ports: [{number: 9000, name: http}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front, namespace: shop}
spec:
  hosts: [front]
  http:
  - route:
    - destination:
        host: catalog
";
    let d = dir(&[("a.yaml", se), ("c.yaml", front)]);
    let diags = check_dir(d.path(), &MeshOptions::default());
    assert_one(
        &diags,
        15,
        "has several ports (80, 8080) and none is 9000; set 'port.number'",
    );
}

#[test]
fn weighted_routes_and_subsets_with_lb_override() {
    let dr = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: shop}
spec:
  host: catalog
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  - name: v2
    labels: {version: v2}
";
    let vs = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  http:
  - route:
    - destination: {host: catalog, subset: v1}
      weight: 1
    - destination: {host: catalog, subset: v2, port: {number: 80}}
      weight: 3
    - destination: {host: catalog}
      weight: 0
";
    let (s, _d) = store(&[("a.yaml", SE_CATALOG), ("b.yaml", dr), ("c.yaml", vs)]);
    let (snap, diags) = s.snapshot(&[]);
    assert!(diags.is_empty(), "{diags:#?}");
    let route = &snap.route_configs[&*format!("{FQDN}:80")].virtual_hosts[0].routes[0];
    let got: Vec<(String, u32)> = route
        .action
        .clusters()
        .iter()
        .map(|c| (c.name.to_string(), c.weight))
        .collect();
    assert_eq!(
        got,
        vec![
            (format!("outbound|80|v1|{FQDN}"), 1),
            (format!("outbound|80|v2|{FQDN}"), 3),
            (format!("outbound|80||{FQDN}"), 0),
        ]
    );
    assert_eq!(route.action.total_weight(), 4);
    assert_eq!(&*route.name, "catalog.0");
    let lb = |n: &str| snap.clusters[&*format!("outbound|80|{n}|{FQDN}")].lb_policy;
    assert_eq!(lb("v1"), LbPolicy::RoundRobin);
    assert_eq!(lb("v2"), LbPolicy::Random);
    assert_eq!(lb(""), LbPolicy::Random);
}

#[test]
fn registrations_join_declared_and_implicit_services() {
    let se = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports:
  - {number: 80, name: http}
  - {number: 9090, name: grpc-admin}
";
    let (s, _d) = store(&[("a.yaml", se), ("b.yaml", DR_CATALOG)]);
    let mut only_admin = reg("catalog", "shop", "10.0.0.3", 7000, &[("version", "v2")]);
    only_admin.service_port = Some(9090);
    let mut wrong_port = reg("catalog", "shop", "10.0.0.4", 7000, &[]);
    wrong_port.service_port = Some(1234);
    let mut cart = reg("Cart", "shop", "10.0.2.1", 8000, &[]);
    cart.protocol = Some(Protocol::Http2);
    let mut cart_admin = reg("cart", "shop", "10.0.2.1", 8001, &[]);
    cart_admin.service_port = Some(81);
    let regs = [
        reg("catalog", "shop", "10.0.0.1", 7000, &[("version", "v1")]),
        reg(
            "catalog.shop",
            "web",
            "10.0.0.2",
            7000,
            &[("version", "v2")],
        ),
        only_admin,
        wrong_port,
        cart_admin,
        cart,
        // The same endpoint twice is kept once.
        reg("catalog", "shop", "10.0.0.1", 7000, &[("version", "v1")]),
    ];
    let (snap, diags) = s.snapshot(&regs);
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert!(
        diags[0]
            .message
            .contains("10.0.0.4:7000 registered for port 1234")
    );
    assert_eq!(diags[0].line, 6, "the ServiceEntry's ports");

    let addrs = |cluster: String| -> Vec<String> {
        let mut v: Vec<String> = snap.endpoints[&*cluster]
            .localities
            .iter()
            .flat_map(|l| l.endpoints.iter().map(|e| e.address.to_string()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        addrs(format!("outbound|80||{FQDN}")),
        vec!["10.0.0.1:7000", "10.0.0.2:7000"]
    );
    assert_eq!(
        addrs(format!("outbound|80|v1|{FQDN}")),
        vec!["10.0.0.1:7000"]
    );
    assert_eq!(
        addrs(format!("outbound|80|v2|{FQDN}")),
        vec!["10.0.0.2:7000"]
    );
    assert_eq!(
        addrs(format!("outbound|9090|v2|{FQDN}")),
        vec!["10.0.0.2:7000", "10.0.0.3:7000"]
    );
    assert_eq!(
        snap.clusters[&*format!("outbound|9090||{FQDN}")].protocol,
        Protocol::Grpc,
        "protocol from the port name"
    );

    // cart exists only through registrations: ports 80 (default, lowest) and 81.
    let cart = "cart.shop.svc.cluster.local";
    assert_eq!(addrs(format!("outbound|80||{cart}")), vec!["10.0.2.1:8000"]);
    assert_eq!(addrs(format!("outbound|81||{cart}")), vec!["10.0.2.1:8001"]);
    assert_eq!(
        snap.clusters[&*format!("outbound|80||{cart}")].protocol,
        Protocol::Http2
    );
    assert_eq!(
        snap.clusters[&*format!("outbound|81||{cart}")].protocol,
        Protocol::Http1
    );
    assert_eq!(
        route_to(&snap, "cart", "GET", "/", &[], 0),
        format!("outbound|80||{cart}")
    );
    assert_eq!(
        snap.listeners["cart.shop"].route_config_name.as_ref(),
        format!("{cart}:80")
    );

    let services = s.services(&regs);
    let hosts: Vec<&str> = services.iter().map(|s| s.host.as_str()).collect();
    assert_eq!(hosts, vec![cart, FQDN]);
    assert_eq!(
        services[0].ports,
        vec![(80, Protocol::Http2), (81, Protocol::Http1)]
    );
    assert_eq!(services[0].namespace, "shop");
    assert_eq!(services[0].endpoints, 2);
    assert_eq!(services[1].endpoints, 3);
    assert_eq!(
        services[1].dial_names,
        vec![
            FQDN.to_string(),
            "catalog.shop".into(),
            "catalog".into(),
            format!("{FQDN}:80"),
            "catalog.shop:80".into(),
            "catalog:80".into(),
            format!("{FQDN}:9090"),
            "catalog.shop:9090".into(),
            "catalog:9090".into(),
        ]
    );
}

#[test]
fn virtual_service_may_route_to_a_registered_only_host_at_run_time() {
    let vs = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front, namespace: shop}
spec:
  hosts: [front]
  http:
  - route: [{destination: {host: catalog}}]
";
    let (mut s, d) = store(&[("a.yaml", vs)]);
    // Offline, neither host is declared: both are errors, and the
    // VirtualService is not applied.
    let diags = check_dir(d.path(), &MeshOptions::default());
    assert_eq!(diags.len(), 2, "{diags:#?}");
    assert!(diags.iter().all(|d| d.message.contains("is not declared")));
    assert!(s.is_empty());
    assert_eq!(s.rejections().len(), 1);
    // At run time both are registered: judged again, it applies.
    let regs = [
        reg("front", "shop", "10.0.0.9", 80, &[]),
        reg("catalog", "shop", "10.0.0.1", 80, &[]),
    ];
    assert!(s.settle(&regs), "applied once its hosts exist");
    assert!(s.rejections().is_empty());
    let (snap, diags) = s.snapshot(&regs);
    assert!(diags.is_empty(), "{diags:#?}");
    assert_eq!(
        route_to(&snap, "front", "GET", "/", &[], 0),
        format!("outbound|80||{FQDN}")
    );
    // Without the destination (its registration gone), the VirtualService
    // stays in force but is left out of what is served: default route. No
    // config change, so nothing is rejected.
    assert!(!s.settle(&regs[..1]));
    assert!(s.rejections().is_empty());
    let (snap, diags) = s.snapshot(&regs[..1]);
    assert_one(
        &diags,
        7,
        "host 'catalog.shop.svc.cluster.local' is not declared",
    );
    assert_eq!(
        route_to(&snap, "front", "GET", "/", &[], 0),
        "outbound|80||front.shop.svc.cluster.local"
    );
}

#[test]
fn static_endpoints_workload_entries_and_localities() {
    let se = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 80, name: http, targetPort: 8080}
  endpoints:
  - address: 10.0.0.1
    locality: eu/west-1/a
    weight: 2
  - address: 10.0.0.2
    ports: {http: 9999}
    locality: eu/west-1/a
    weight: 3
  - address: 10.0.0.3
    locality: us
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  ports: [{number: 80, name: http}]
  workloadSelector:
    labels: {app: reviews}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-1, namespace: shop}
spec:
  address: 10.1.0.1
  labels: {app: reviews, version: v1}
  ports: {http: 7000}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-2, namespace: shop}
spec:
  address: 10.1.0.2
  labels: {app: reviews, version: v2}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other, namespace: shop}
spec:
  address: 10.1.0.3
  labels: {app: ratings}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-elsewhere, namespace: web}
spec:
  address: 10.1.0.4
  labels: {app: reviews}
";
    let (s, _d) = store(&[("a.yaml", se)]);
    let (snap, diags) = s.snapshot(&[]);
    assert!(diags.is_empty(), "{diags:#?}");
    let cla = &snap.endpoints[&*format!("outbound|80||{FQDN}")];
    // (locality, its weight, its endpoints with their weights)
    type View = (String, u32, Vec<(String, u32)>);
    let got: Vec<View> = cla
        .localities
        .iter()
        .map(|l| {
            (
                format!(
                    "{}/{}/{}",
                    l.locality.region, l.locality.zone, l.locality.sub_zone
                ),
                l.weight,
                l.endpoints
                    .iter()
                    .map(|e| (e.address.to_string(), e.weight))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "eu/west-1/a".to_string(),
                5,
                vec![
                    ("10.0.0.1:8080".to_string(), 2),
                    ("10.0.0.2:9999".to_string(), 3)
                ]
            ),
            (
                "us//".to_string(),
                1,
                vec![("10.0.0.3:8080".to_string(), 1)]
            ),
        ]
    );
    let reviews = &snap.endpoints["outbound|80||reviews.shop.svc.cluster.local"];
    let mut addrs: Vec<String> = reviews.localities[0]
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    addrs.sort();
    assert_eq!(addrs, vec!["10.1.0.1:7000", "10.1.0.2:80"]);
}

#[test]
fn invalid_resource_keeps_its_previous_good_version() {
    let vs_good = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  http:
  - route: [{destination: {host: catalog, subset: v2}}]
";
    let d = dir(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", DR_CATALOG),
        ("c.yaml", vs_good),
    ]);
    let mut s = ConfigStore::new(MeshOptions::default());
    assert!(s.load_dir(d.path()).is_empty());
    let v2 = format!("outbound|80|v2|{FQDN}");
    let routes = |s: &ConfigStore| route_to(&s.snapshot(&[]).0, "catalog", "GET", "/", &[], 0);
    assert_eq!(routes(&s), v2);

    // An unsupported field: reported, and the old version still routes.
    write(
        &d,
        "c.yaml",
        &vs_good.replace("subset: v2}}]", "subset: v1}}]\n    delegate: {name: x}"),
    );
    let diags = s.load_dir(d.path());
    assert_one(&diags, 8, "field 'http[0].delegate' is not supported yet");
    assert_eq!(routes(&s), v2);

    // A syntax error keeps every resource of the file.
    write(&d, "c.yaml", "apiVersion: [\n");
    let diags = s.load_dir(d.path());
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert!(diags[0].message.starts_with("YAML syntax error"));
    assert_eq!(routes(&s), v2);
    assert_eq!(s.len(), 3);

    // Fixed: the new version replaces the old.
    write(&d, "c.yaml", &vs_good.replace("subset: v2", "subset: v1"));
    assert!(s.load_dir(d.path()).is_empty());
    assert_eq!(routes(&s), format!("outbound|80|v1|{FQDN}"));
}

#[test]
fn removed_file_removes_its_resources() {
    let vs = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  http:
  - route: [{destination: {host: catalog, subset: v1}}]
";
    let d = dir(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", DR_CATALOG),
        ("c.yaml", vs),
    ]);
    let mut s = ConfigStore::new(MeshOptions::default());
    assert!(s.load_dir(d.path()).is_empty());
    assert_eq!(s.len(), 3);
    std::fs::remove_file(d.path().join("c.yaml")).unwrap();
    assert!(s.load_dir(d.path()).is_empty());
    assert_eq!(s.len(), 2);
    let (snap, _) = s.snapshot(&[]);
    assert_eq!(
        route_to(&snap, "catalog", "GET", "/", &[], 0),
        format!("outbound|80||{FQDN}")
    );
    // Files with other extensions are not read.
    write(&d, "notes.txt", "not yaml: [");
    assert!(s.load_dir(d.path()).is_empty());
    // A directory that cannot be read changes nothing.
    let diags = s.load_dir(&d.path().join("missing"));
    assert_one(&diags, 1, "cannot read the config directory");
    assert_eq!(s.len(), 2);
}

#[test]
fn diagnostics_are_sorted_by_file_then_line() {
    let bad = SE_CATALOG.replace(
        "resolution: STATIC",
        "resolution: DNS_SOMETIMES\n  addresses: [1.2.3.x]",
    );
    let d = dir(&[
        ("b.yaml", &bad),
        ("a.yaml", "kind: Nope\n---\nkind: Telemetry\n"),
    ]);
    let diags = check_dir(d.path(), &MeshOptions::default());
    let got: Vec<(String, usize)> = diags
        .iter()
        .map(|d| {
            (
                d.file.file_name().unwrap().to_string_lossy().into_owned(),
                d.line,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("a.yaml".to_string(), 1),
            ("a.yaml".into(), 3),
            ("b.yaml".into(), 12),
            ("b.yaml".into(), 13),
        ]
    );
}

// ------------------------------------------------- several config directories

/// A VirtualService for catalog routing to `subset`.
fn vs_to(name: &str, subset: &str) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - route: [{{destination: {{host: catalog, subset: {subset}}}}}]
"
    )
}

/// Directories are read in the order given, whatever their names: the
/// first directory's VirtualService routes the host, and the later one is
/// reported at its line as a second VirtualService for it.
#[test]
fn directories_apply_in_the_order_given() {
    let z = dir(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", DR_CATALOG),
        ("vs.yaml", &vs_to("first", "v2")),
    ]);
    let a = dir(&[("vs.yaml", &vs_to("second", "v1"))]);
    let mut s = ConfigStore::new(MeshOptions::default());
    let diags = s.load_dirs(&[z.path(), a.path()]);
    let (snap, problems) = s.snapshot(&[]);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(
        route_to(&snap, "catalog", "GET", "/", &[], 0),
        format!("outbound|80|v2|{FQDN}"),
        "the first directory's VirtualService wins"
    );
    assert_one(&diags, 5, "already routed by VirtualService shop/first");
    assert_eq!(diags[0].file, a.path().join("vs.yaml"), "the path as given");

    // The other order, the other winner.
    let mut s = ConfigStore::new(MeshOptions::default());
    assert_eq!(s.load_dirs(&[a.path(), z.path()]).len(), 1);
    let (snap, _) = s.snapshot(&[]);
    assert_eq!(
        route_to(&snap, "catalog", "GET", "/", &[], 0),
        format!("outbound|80|v1|{FQDN}")
    );
}

#[test]
fn a_directory_named_twice_is_read_once_and_a_missing_one_changes_nothing() {
    let d = dir(&[("a.yaml", SE_CATALOG), ("b.yaml", DR_CATALOG)]);
    let again = d.path().join(".");
    let mut s = ConfigStore::new(MeshOptions::default());
    assert!(s.load_dirs(&[d.path(), &again]).is_empty(), "no duplicates");
    assert_eq!(s.len(), 2);
    let missing = d.path().join("missing");
    let diags = s.load_dirs(&[d.path(), &missing]);
    assert_one(&diags, 1, "cannot read the config directory");
    assert_eq!(diags[0].file, missing);
    assert_eq!(s.len(), 2, "the resources stay");
}

/// What a reload logs: resources added, changed (their content, not their
/// layout) and removed, by kind, namespace and name.
#[test]
fn reloads_know_what_changed() {
    let dr_v1 = DR_CATALOG.replace("  - name: v2\n    labels: {version: v2}\n", "");
    let d = dir(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", &dr_v1),
        ("vs.yaml", &vs_to("catalog", "v1")),
    ]);
    let mut s = ConfigStore::new(MeshOptions::default());
    let empty = s.versions();
    assert!(s.load_dir(d.path()).is_empty());
    let first = s.versions();
    assert_eq!(
        empty.changes_to(&first).to_string(),
        "added VirtualService shop/catalog, DestinationRule shop/catalog, ServiceEntry shop/catalog"
    );

    // A comment and a re-indented document: nothing changed.
    write(&d, "a.yaml", &format!("# the catalog\n{SE_CATALOG}"));
    assert!(s.load_dir(d.path()).is_empty());
    let changes = first.changes_to(&s.versions());
    assert!(changes.is_empty(), "{changes}");

    // A new subset target and the subset it needs, a new file.
    write(&d, "vs.yaml", &vs_to("catalog", "v2"));
    write(&d, "b.yaml", DR_CATALOG);
    write(&d, "c.yaml", &SE_CATALOG.replace("catalog", "reviews"));
    assert!(s.load_dir(d.path()).is_empty());
    let second = s.versions();
    assert_eq!(
        first.changes_to(&second).to_string(),
        "changed VirtualService shop/catalog, DestinationRule shop/catalog; \
         added ServiceEntry shop/reviews"
    );
    // A removed file.
    std::fs::remove_file(d.path().join("c.yaml")).unwrap();
    assert!(s.load_dir(d.path()).is_empty());
    assert_eq!(
        second.changes_to(&s.versions()).to_string(),
        "removed ServiceEntry shop/reviews"
    );

    // An invalid edit keeps the last good version: not a change.
    let before = s.versions();
    write(
        &d,
        "vs.yaml",
        &vs_to("catalog", "v2").replace("hosts:", "hostz:"),
    );
    assert!(!s.load_dir(d.path()).is_empty());
    assert!(before.changes_to(&s.versions()).is_empty());
}

#[test]
fn a_long_list_of_changes_is_cut_short() {
    let changes = ConfigChanges {
        added: (0..12)
            .map(|i| format!("ServiceEntry shop/s{i:02}"))
            .collect(),
        changed: vec!["VirtualService shop/catalog".into()],
        removed: vec!["DestinationRule shop/old".into()],
    };
    assert_eq!(
        changes.to_string(),
        "changed VirtualService shop/catalog; added ServiceEntry shop/s00, ServiceEntry shop/s01, \
         ServiceEntry shop/s02, ServiceEntry shop/s03, ServiceEntry shop/s04, ServiceEntry \
         shop/s05, ServiceEntry shop/s06, ServiceEntry shop/s07, ServiceEntry shop/s08 and 3 \
         more; removed DestinationRule shop/old"
    );
}
