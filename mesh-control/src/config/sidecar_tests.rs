//! Sidecar: parse errors at their lines, which Sidecar applies, which hosts
//! its egress hosts admit, and what a view is then sent.

use std::collections::BTreeMap;

use super::super::sidecar_spec::{DnsName, HostNamespace, egress_host};
use super::super::tests::{assert_one, check, dir};
use super::super::*;

/// Services `catalog` in `shop`, `payments` in `billing`, `api.example.com`
/// (declared in `ext`) and a VirtualService in `shop` routing catalog's
/// `/pay` to payments.
const SERVICES: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: billing}
spec:
  hosts: [payments]
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: ext}
spec:
  hosts: [api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.3}]
";

const CATALOG: &str = "catalog.shop.svc.cluster.local";
const PAYMENTS: &str = "payments.billing.svc.cluster.local";
const API: &str = "api.example.com";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A store holding `yaml`, which must load without a problem.
fn loaded(yaml: &str) -> (ConfigStore, tempfile::TempDir) {
    let d = dir(&[("mesh.yaml", yaml)]);
    let mut store = ConfigStore::new(MeshOptions::default());
    let diags = store.load_dir(d.path());
    assert!(diags.is_empty(), "{diags:#?}");
    (store, d)
}

/// The view of a workload of `namespace` with `labels`.
fn view(store: &ConfigStore, namespace: &str, labels: &[(&str, &str)]) -> ViewTranslation {
    let source = store.view_source(&[]).expect("the config has views");
    let key = source
        .dependencies
        .key(namespace, &self::labels(labels))
        .expect("a view key");
    source.translate(&key)
}

/// The hosts of the clusters a view holds.
fn hosts(t: &ViewTranslation) -> Vec<String> {
    let mut hosts: Vec<String> = t
        .snapshot
        .clusters
        .keys()
        .filter_map(|c| c.rsplit_once('|').map(|(_, h)| h.to_string()))
        .collect();
    hosts.dedup();
    hosts
}

fn sidecar(namespace: &str, name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, \
         namespace: {namespace}}}\nspec:\n{body}"
    )
}

#[test]
fn egress_hosts_admit_by_namespace_and_name() {
    let parse = |s: &str| egress_host(s).unwrap();
    assert_eq!(parse("*/*").namespace, HostNamespace::Any);
    assert_eq!(parse("./*").namespace, HostNamespace::Own);
    assert_eq!(parse("~/*").namespace, HostNamespace::Nothing);
    assert_eq!(
        parse("shop/Catalog.shop.svc.cluster.local").name,
        DnsName::Exact(CATALOG.to_string())
    );
    let suffix = parse("*/*.example.com").name;
    assert!(suffix.matches("api.example.com"));
    assert!(suffix.matches("a.b.example.com"));
    assert!(!suffix.matches("example.com"));
    assert!(!suffix.matches("api.example.org"));
    for bad in [
        "catalog",
        "shop/catalog",
        "/x.y",
        "shop/a*.b.com",
        "shop/*.",
        "Shop/*",
        "*/",
    ] {
        assert!(egress_host(bad).is_err(), "{bad} must be refused");
    }
}

#[test]
fn parse_errors_are_reported_at_their_lines() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: web, namespace: shop}
spec:
  workloadSelector:
    labels: {}
  ingress: []
  outboundTrafficPolicy: {mode: ALLOW_ANY}
  egress:
  - hosts: [catalog]
    port: {number: 80, name: http, protocol: HTTP}
  - hosts: []
    captureMode: NONE
";
    let diags = check(yaml);
    let at = |line: usize, needle: &str| {
        assert!(
            diags
                .iter()
                .any(|d| d.line == line && d.message.contains(needle)),
            "expected {needle:?} at line {line}: {diags:#?}"
        );
    };
    at(6, "selects no label");
    at(7, "'spec.ingress' is not supported");
    at(
        8,
        "'spec.outboundTrafficPolicy.mode' ALLOW_ANY is not supported",
    );
    at(10, "must be namespace/dnsName");
    at(11, "'spec.egress[0].port' is not supported");
    at(12, "is empty");
    at(13, "'spec.egress[1].captureMode' is not supported");
    assert!(
        diags
            .iter()
            .all(|d| d.message.starts_with("Sidecar shop/web: "))
    );

    // REGISTRY_ONLY is what a proxyless client does: accepted.
    let ok = sidecar(
        "shop",
        "web",
        "  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  egress: [{hosts: ['./*']}]\n",
    );
    let diags = check(&format!("{SERVICES}{ok}"));
    assert!(diags.is_empty(), "{diags:#?}");
}

#[test]
fn a_scoped_view_is_sent_only_the_hosts_it_admits_and_hidden_names_say_why() {
    let yaml = format!(
        "{SERVICES}{}",
        sidecar(
            "shop",
            "default",
            "  egress:\n  - hosts: ['./*', 'ext/api.example.com']\n"
        )
    );
    let (store, _d) = loaded(&yaml);
    let shop = view(&store, "shop", &[]);
    assert_eq!(hosts(&shop), [API, CATALOG]);
    assert!(shop.snapshot.listeners.contains_key("catalog.shop:80"));
    assert!(!shop.snapshot.listeners.contains_key("payments.billing:80"));
    for name in [
        "payments.billing",
        "payments.billing:80",
        "payments.billing.svc.cluster.local:80",
        "outbound|80||payments.billing.svc.cluster.local",
    ] {
        let why = shop
            .hidden
            .get(name)
            .unwrap_or_else(|| panic!("{name} hidden"));
        assert!(
            why.contains("hidden by Sidecar shop/default at ")
                && why.contains("mesh.yaml:")
                && why.contains("billing/payments.billing.svc.cluster.local"),
            "{why}"
        );
    }
    // Another namespace has no Sidecar: it sees everything.
    let web = view(&store, "web", &[]);
    assert_eq!(hosts(&web), [API, CATALOG, PAYMENTS]);
    assert!(web.hidden.is_empty(), "{:?}", web.hidden);
}

#[test]
fn precedence_selector_then_namespace_then_root_then_none() {
    let yaml = format!(
        "{SERVICES}{}{}{}",
        sidecar("istio-system", "default", "  egress: [{hosts: ['./*']}]\n"),
        sidecar("shop", "default", "  egress: [{hosts: ['billing/*']}]\n"),
        sidecar(
            "shop",
            "web",
            "  workloadSelector: {labels: {app: web}}\n  egress: [{hosts: ['ext/*']}]\n"
        ),
    );
    let (store, _d) = loaded(&yaml);
    // The selector wins in its namespace.
    assert_eq!(hosts(&view(&store, "shop", &[("app", "web")])), [API]);
    // Without the label: the namespace's default.
    assert_eq!(hosts(&view(&store, "shop", &[("app", "db")])), [PAYMENTS]);
    // Another namespace: the root's, where `./` is the workload's namespace.
    assert_eq!(hosts(&view(&store, "billing", &[])), [PAYMENTS]);
    assert_eq!(hosts(&view(&store, "ext", &[])), [API]);
    let why = &view(&store, "ext", &[]).hidden["outbound|80||catalog.shop.svc.cluster.local"];
    assert!(
        why.contains("Sidecar istio-system/default") && why.contains("root namespace's"),
        "{why}"
    );
    // A selector of another namespace does not apply.
    assert_eq!(
        hosts(&view(&store, "billing", &[("app", "web")])),
        [PAYMENTS]
    );
}

#[test]
fn without_egress_or_with_none_admitted() {
    let yaml = format!(
        "{SERVICES}{}{}",
        sidecar(
            "shop",
            "default",
            "  workloadSelector: {labels: {app: all}}\n"
        ),
        sidecar("billing", "default", "  egress: [{hosts: ['~/*']}]\n"),
    );
    let (store, _d) = loaded(&yaml);
    assert_eq!(
        hosts(&view(&store, "shop", &[("app", "all")])),
        [API, CATALOG, PAYMENTS]
    );
    assert!(hosts(&view(&store, "billing", &[])).is_empty());
}

#[test]
fn two_sidecars_of_equal_rank_the_earlier_applies() {
    let yaml = format!(
        "{SERVICES}{}{}",
        sidecar("shop", "first", "  egress: [{hosts: ['./*']}]\n"),
        sidecar("shop", "second", "  egress: [{hosts: ['*/*']}]\n"),
    );
    let d = dir(&[("mesh.yaml", &yaml)]);
    let mut store = ConfigStore::new(MeshOptions::default());
    let diags = store.load_dir(d.path());
    let second_line = yaml
        .lines()
        .position(|l| l.contains("name: second"))
        .unwrap()
        + 1;
    assert!(
        diags.iter().any(|d| d.line == second_line
            && d.message.contains("Sidecar shop/second")
            && d.message
                .contains("already has a Sidecar without workloadSelector: Sidecar shop/first")),
        "{diags:#?}"
    );
    assert_eq!(hosts(&view(&store, "shop", &[])), [CATALOG]);

    // Two selectors both selecting one workload: the earlier applies, the
    // view reports the other.
    let yaml = format!(
        "{SERVICES}{}{}",
        sidecar(
            "shop",
            "by-app",
            "  workloadSelector: {labels: {app: web}}\n  egress: [{hosts: ['./*']}]\n"
        ),
        sidecar(
            "shop",
            "by-version",
            "  workloadSelector: {labels: {version: v2}}\n  egress: [{hosts: ['*/*']}]\n"
        ),
    );
    let (store, _d) = loaded(&yaml);
    let both = view(&store, "shop", &[("app", "web"), ("version", "v2")]);
    assert_eq!(hosts(&both), [CATALOG]);
    assert!(
        both.diagnostics
            .iter()
            .any(|d| d.message.contains("Sidecar shop/by-version")
                && d.message.contains("as the earlier Sidecar shop/by-app")),
        "{:#?}",
        both.diagnostics
    );
    assert_eq!(
        hosts(&view(&store, "shop", &[("version", "v2")])),
        [API, CATALOG, PAYMENTS]
    );
}

#[test]
fn a_virtual_service_is_imported_by_its_own_namespace() {
    // A VirtualService in `routing` for catalog.shop: imported only when an
    // egress host admits `routing/catalog...`.
    let vs = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: routing}
spec:
  hosts: [catalog.shop.svc.cluster.local]
  http:
  - route: [{destination: {host: catalog.shop.svc.cluster.local}}]
    timeout: 3s
";
    let timeout = |t: &ViewTranslation| {
        t.snapshot.route_configs[format!("{CATALOG}:80").as_str()].virtual_hosts[0].routes[0]
            .policy
            .timeout
    };
    let not_imported = format!(
        "{SERVICES}{vs}{}",
        sidecar("web", "default", "  egress: [{hosts: ['shop/*']}]\n")
    );
    let (store, _d) = loaded(&not_imported);
    assert_eq!(timeout(&view(&store, "web", &[])), None);
    let imported = format!(
        "{SERVICES}{vs}{}",
        sidecar(
            "web",
            "default",
            "  egress: [{hosts: ['shop/*', 'routing/*']}]\n"
        )
    );
    let (store, _d) = loaded(&imported);
    assert_eq!(
        timeout(&view(&store, "web", &[])),
        Some(std::time::Duration::from_secs(3))
    );
}

#[test]
fn check_reports_a_route_to_a_host_the_sidecar_hides_at_the_destination() {
    let yaml = format!(
        "{SERVICES}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - match: [{{uri: {{prefix: /pay}}}}]
    route:
    - destination: {{host: payments.billing}}
  - route: [{{destination: {{host: catalog}}}}]
{}",
        sidecar("shop", "default", "  egress: [{hosts: ['./*']}]\n")
    );
    let line = yaml
        .lines()
        .position(|l| l.contains("host: payments.billing"))
        .unwrap()
        + 1;
    let diags = check(&yaml);
    assert_one(
        &diags,
        line,
        "destination payments.billing.svc.cluster.local is hidden by Sidecar shop/default at ",
    );
    assert!(
        diags[0]
            .message
            .contains("add \"billing/payments.billing.svc.cluster.local\""),
        "{}",
        diags[0].message
    );
    // Admitting it clears the report.
    let fixed = yaml.replace("['./*']", "['./*', 'billing/*']");
    assert!(check(&fixed).is_empty(), "{:#?}", check(&fixed));

    // The view of those workloads reports it too, and keeps the route.
    let (store, _d) = loaded(&yaml);
    let shop = view(&store, "shop", &[]);
    assert!(
        shop.diagnostics.iter().any(|d| d.line == line),
        "{:#?}",
        shop.diagnostics
    );
    let payments = format!("outbound|80||{PAYMENTS}");
    let rc = &shop.snapshot.route_configs[format!("{CATALOG}:80").as_str()];
    let first = rc.virtual_hosts[0].routes[0].action.clusters();
    assert_eq!(first[0].name.to_string(), payments, "the route stays");
    assert!(!shop.snapshot.clusters.contains_key(payments.as_str()));
    assert!(
        shop.hidden[&payments].contains("hidden by Sidecar shop/default"),
        "{}",
        shop.hidden[&payments]
    );
}

#[test]
fn check_notes_what_grpc_clients_keep() {
    let yaml = format!(
        "{SERVICES}{}",
        sidecar("shop", "default", "  egress: [{hosts: ['./*']}]\n")
    );
    let d = dir(&[("mesh.yaml", &yaml)]);
    let notes = check_notes(&[d.path()]);
    let egress = yaml
        .lines()
        .position(|l| l.starts_with("  egress:"))
        .unwrap()
        + 1;
    assert!(
        notes
            .iter()
            .any(|n| n.line == egress && n.message.contains("ignore_resource_deletion")),
        "{notes:#?}"
    );
}

#[test]
fn the_view_key_depends_on_the_namespace_and_the_selector_labels() {
    let yaml = format!(
        "{SERVICES}{}",
        sidecar(
            "shop",
            "web",
            "  workloadSelector: {labels: {app: web}}\n  egress: [{hosts: ['./*']}]\n"
        )
    );
    let (store, _d) = loaded(&yaml);
    let deps = store.view_source(&[]).expect("views").dependencies;
    assert!(deps.namespace);
    let key = deps
        .key("shop", &labels(&[("app", "web"), ("team", "x")]))
        .expect("key");
    assert_eq!(key.to_string(), "namespace=shop labels={app=web}");
    let other = deps.key("shop", &labels(&[("app", "db")])).expect("key");
    assert_eq!(other.to_string(), "namespace=shop labels={}");
}

#[test]
fn check_for_grpc_notes_each_sidecar() {
    let yaml = format!(
        "{SERVICES}{}",
        sidecar("shop", "default", "  egress: [{hosts: ['./*']}]\n")
    );
    let d = dir(&[("mesh.yaml", &yaml)]);
    let report = crate::grpc_report(&[d.path()], &MeshOptions::default());
    let egress = yaml
        .lines()
        .position(|l| l.starts_with("  egress:"))
        .unwrap()
        + 1;
    assert!(
        report.written.iter().any(|n| n.line == egress
            && n.message.starts_with("Sidecar shop/default: 'egress': ")
            && n.message.contains("deleted_but_kept")),
        "{:#?}",
        report.written
    );
}

#[test]
fn no_sidecar_applies_to_a_gateway_node() {
    // A root-namespace Sidecar admitting nothing would hide every service
    // from the gateway in istio-system; Istio applies Sidecars to sidecars
    // only, and so does the view of a node a Gateway selects.
    let yaml = format!(
        "{SERVICES}{}",
        sidecar("istio-system", "default", "  egress: [{hosts: ['~/*']}]\n"),
    );
    let (store, _d) = loaded(&yaml);
    let source = store.view_source(&[]).expect("the config has views");
    let mut key = source
        .dependencies
        .key("istio-system", &labels(&[("istio", "ingressgateway")]))
        .expect("a view key");
    assert!(hosts(&source.translate(&key)).is_empty());
    key.gateway = true;
    assert_eq!(hosts(&source.translate(&key)), [API, CATALOG, PAYMENTS]);
}
