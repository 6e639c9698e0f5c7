//! Per-node views: what a config's views depend on (the view key), and what
//! each view holds (`exportTo`, `match.sourceLabels`, `match.sourceNamespace`).

use std::collections::BTreeMap;

use mesh_core::model::RouteConfig;

use super::tests::{assert_one, check, dir};
use super::*;

/// catalog in `a` (port 80) with subsets v1 / v2 (DestinationRule in `a`).
const CATALOG: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: a}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: a}
spec:
  host: catalog
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

const FQDN: &str = "catalog.a.svc.cluster.local";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A store holding `yaml` (which must load without a problem).
fn store(yaml: &str) -> ConfigStore {
    let d = dir(&[("mesh.yaml", yaml)]);
    let mut store = ConfigStore::new(MeshOptions::default());
    let diags = store.load_dir(d.path());
    assert!(diags.is_empty(), "{diags:#?}");
    let (_, problems) = store.snapshot(&[]);
    assert!(problems.is_empty(), "{problems:#?}");
    store
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

/// The clusters the routes of `rc` name, route by route.
fn routed(snapshot: &Snapshot, rc: &str) -> Vec<Vec<String>> {
    let rc: &RouteConfig = snapshot.route_configs.get(rc).expect("route config");
    rc.virtual_hosts[0]
        .routes
        .iter()
        .map(|r| {
            r.action
                .clusters()
                .iter()
                .map(|c| c.name.to_string())
                .collect()
        })
        .collect()
}

fn cluster(subset: &str) -> String {
    format!("outbound|80|{subset}|{FQDN}")
}

/// A VirtualService for catalog in `ns` whose `http:` is `http`.
fn vs(ns: &str, name: &str, extra: &str, http: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [catalog.a]
{extra}  http:
{http}"
    )
}

#[test]
fn a_config_without_these_fields_has_one_shared_view() {
    let store = store(&format!(
        "{CATALOG}{}",
        vs(
            "a",
            "catalog",
            "  exportTo: ['*']\n",
            "  - route: [{destination: {host: catalog, subset: v1}}]\n"
        )
    ));
    assert!(
        store.view_source(&[]).is_none(),
        "exportTo '*' is the default: nothing depends on the node"
    );
    let deps = ViewDependencies::of(store.ordered());
    assert!(deps.is_empty());
    assert_eq!(deps.key("a", &labels(&[("version", "canary")])), None);
}

#[test]
fn the_view_key_holds_only_what_the_config_depends_on() {
    let source_labels = store(&format!(
        "{CATALOG}{}",
        vs(
            "a",
            "catalog",
            "",
            "  - match: [{sourceLabels: {version: canary, team: x}}]
    route: [{destination: {host: catalog, subset: v2}}]
  - route: [{destination: {host: catalog, subset: v1}}]
"
        )
    ));
    let deps = source_labels.view_source(&[]).unwrap().dependencies;
    assert!(!deps.namespace);
    assert_eq!(
        deps.labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.iter().map(String::as_str).collect::<Vec<_>>()))
            .collect::<Vec<_>>(),
        [("team", vec!["x"]), ("version", vec!["canary"])]
    );
    let key = deps
        .key(
            "a",
            &labels(&[("version", "canary"), ("app", "web"), ("pod", "web-1")]),
        )
        .unwrap();
    assert_eq!(key.namespace, None, "no resource depends on the namespace");
    assert_eq!(key.labels, labels(&[("version", "canary")]));
    assert_eq!(key.to_string(), "labels={version=canary}");
    // Workloads that differ only in labels (or values) no selector names
    // share a view.
    assert_eq!(
        deps.key("b", &labels(&[("pod", "web-2"), ("version", "stable")])),
        deps.key("a", &labels(&[("pod", "web-1")]))
    );

    let exported = store(&CATALOG.replace(
        "  resolution: STATIC\n",
        "  resolution: STATIC\n  exportTo: ['.']\n",
    ));
    let deps = exported.view_source(&[]).unwrap().dependencies;
    assert!(deps.namespace);
    assert!(deps.labels.is_empty());
    let key = deps.key("b", &labels(&[("version", "canary")])).unwrap();
    assert_eq!(key.namespace.as_deref(), Some("b"));
    assert!(key.labels.is_empty());
    assert_eq!(key.to_string(), "namespace=b labels={}");

    let source_namespace = store(&format!(
        "{CATALOG}{}",
        vs(
            "a",
            "catalog",
            "",
            "  - match: [{sourceNamespace: b}]
    route: [{destination: {host: catalog, subset: v2}}]
  - route: [{destination: {host: catalog, subset: v1}}]
"
        )
    ));
    assert!(
        source_namespace
            .view_source(&[])
            .unwrap()
            .dependencies
            .namespace
    );
}

#[test]
fn source_labels_and_source_namespace_leave_out_the_routes_a_caller_does_not_meet() {
    let store = store(&format!(
        "{CATALOG}{}",
        vs(
            "a",
            "catalog",
            "",
            "  - match: [{sourceLabels: {version: canary}}]
    route: [{destination: {host: catalog, subset: v2}}]
  - match: [{sourceNamespace: b, uri: {prefix: /b}}]
    route: [{destination: {host: catalog, subset: v2}}]
  - route: [{destination: {host: catalog, subset: v1}}]
"
        )
    ));
    // The shared translation (what changes are judged by) has every route.
    let (shared, _) = store.snapshot(&[]);
    assert_eq!(
        routed(&shared, &format!("{FQDN}:80")),
        [
            vec![cluster("v2")],
            vec![cluster("v2")],
            vec![cluster("v1")]
        ]
    );
    let rc = format!("{FQDN}:80");
    let canary_in_a = view(&store, "a", &[("version", "canary")]);
    assert_eq!(
        routed(&canary_in_a.snapshot, &rc),
        [vec![cluster("v2")], vec![cluster("v1")]]
    );
    let stable_in_a = view(&store, "a", &[("version", "v1")]);
    assert_eq!(routed(&stable_in_a.snapshot, &rc), [vec![cluster("v1")]]);
    let stable_in_b = view(&store, "b", &[]);
    assert_eq!(
        routed(&stable_in_b.snapshot, &rc),
        [vec![cluster("v2")], vec![cluster("v1")]]
    );
    for v in [canary_in_a, stable_in_a, stable_in_b] {
        assert!(v.diagnostics.is_empty(), "{:#?}", v.diagnostics);
        assert!(v.hidden.is_empty());
    }
}

#[test]
fn a_route_left_with_no_match_for_the_caller_leaves_the_default_route() {
    let store = store(&format!(
        "{CATALOG}{}",
        vs(
            "a",
            "catalog",
            "",
            "  - match: [{sourceLabels: {version: canary}}]
    route: [{destination: {host: catalog, subset: v2}}]
"
        )
    ));
    let other = view(&store, "a", &[]);
    assert_eq!(
        routed(&other.snapshot, &format!("{FQDN}:80")),
        [vec![cluster("")]]
    );
}

#[test]
fn a_service_entry_exported_to_its_namespace_does_not_exist_for_others() {
    let store = store(&CATALOG.replace(
        "  resolution: STATIC\n",
        "  resolution: STATIC\n  exportTo: ['.']\n",
    ));
    let own = view(&store, "a", &[]);
    assert!(own.snapshot.listeners.contains_key("catalog.a"));
    assert!(own.hidden.is_empty());
    let other = view(&store, "b", &[]);
    for name in [
        "catalog.a",
        "catalog.a:80",
        FQDN,
        &format!("{FQDN}:80"),
        &cluster(""),
    ] {
        assert!(!other.snapshot.listeners.contains_key(name), "{name}");
        let why = other.hidden.get(name).unwrap_or_else(|| panic!("{name}"));
        assert!(
            why.contains("not exported to namespace \"b\" by ServiceEntry a/catalog at ")
                && why.contains("mesh.yaml:3")
                && why.contains("exportTo at line 8: namespace a"),
            "{why}"
        );
    }
    assert!(other.snapshot.clusters.is_empty());
    assert!(other.snapshot.endpoints.is_empty());
}

#[test]
fn registrations_of_a_hidden_service_entry_s_host_are_hidden_with_it() {
    let store = store(&CATALOG.replace(
        "  resolution: STATIC\n",
        "  resolution: STATIC\n  exportTo: [a, c]\n",
    ));
    let registration = Registration {
        service: "catalog".into(),
        namespace: "a".into(),
        address: "10.0.0.9".parse().unwrap(),
        port: 8080,
        service_port: None,
        protocol: None,
        labels: BTreeMap::new(),
        locality: Default::default(),
    };
    let source = store.view_source(&[registration]).unwrap();
    let b = source.translate(&source.dependencies.key("b", &BTreeMap::new()).unwrap());
    assert!(
        b.snapshot.listeners.is_empty(),
        "no implicit service either"
    );
    let c = source.translate(&source.dependencies.key("c", &BTreeMap::new()).unwrap());
    assert_eq!(
        c.snapshot.endpoints[cluster("").as_str()]
            .localities
            .iter()
            .map(|l| l.endpoints.len())
            .sum::<usize>(),
        3
    );
}

#[test]
fn a_virtual_service_not_exported_leaves_the_routing_without_it() {
    let store = store(&format!(
        "{CATALOG}{}",
        vs(
            "a",
            "catalog",
            "  exportTo: ['.', c]\n",
            "  - route: [{destination: {host: catalog, subset: v2}}]\n"
        )
    ));
    let rc = format!("{FQDN}:80");
    assert_eq!(
        routed(&view(&store, "a", &[]).snapshot, &rc),
        [vec![cluster("v2")]]
    );
    assert_eq!(
        routed(&view(&store, "c", &[]).snapshot, &rc),
        [vec![cluster("v2")]]
    );
    assert_eq!(
        routed(&view(&store, "b", &[]).snapshot, &rc),
        [vec![cluster("")]],
        "the default route"
    );
}

#[test]
fn virtual_services_exported_to_disjoint_namespaces_each_route_their_own() {
    let store = store(&format!(
        "{CATALOG}{}{}",
        vs(
            "a",
            "catalog-for-a",
            "  exportTo: ['.']\n",
            "  - route: [{destination: {host: catalog, subset: v1}}]\n"
        ),
        vs(
            "b",
            "catalog-for-b",
            "  exportTo: ['.']\n",
            "  - route: [{destination: {host: catalog.a, subset: v2}}]\n"
        )
    ));
    let rc = format!("{FQDN}:80");
    assert_eq!(
        routed(&view(&store, "a", &[]).snapshot, &rc),
        [vec![cluster("v1")]]
    );
    assert_eq!(
        routed(&view(&store, "b", &[]).snapshot, &rc),
        [vec![cluster("v2")]]
    );
    assert_eq!(
        routed(&view(&store, "c", &[]).snapshot, &rc),
        [vec![cluster("")]]
    );
    // Overlapping ones still conflict.
    let diags = check(&format!(
        "{CATALOG}{}{}",
        vs(
            "a",
            "one",
            "  exportTo: ['.', b]\n",
            "  - route: [{destination: {host: catalog}}]\n"
        ),
        vs(
            "b",
            "two",
            "  exportTo: ['.']\n",
            "  - route: [{destination: {host: catalog.a}}]\n"
        )
    ));
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert!(
        diags[0]
            .message
            .contains("already routed by VirtualService a/one")
    );
}

#[test]
fn a_destination_rule_not_exported_leaves_the_default_cluster_policy() {
    let store = store(
        &CATALOG.replace(
            "  host: catalog\n",
            "  host: catalog\n  exportTo: ['.']\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n",
        ),
    );
    let own = view(&store, "a", &[]);
    let other = view(&store, "b", &[]);
    assert!(own.snapshot.clusters.contains_key(cluster("v1").as_str()));
    assert!(!other.snapshot.clusters.contains_key(cluster("v1").as_str()));
    assert_ne!(
        own.snapshot.clusters[cluster("").as_str()],
        other.snapshot.clusters[cluster("").as_str()]
    );
    let (shared_without, _) =
        super::tests::store(&[("mesh.yaml", CATALOG.split("---").next().unwrap())])
            .0
            .snapshot(&[]);
    assert_eq!(
        other.snapshot.clusters[cluster("").as_str()],
        shared_without.clusters[cluster("").as_str()],
        "as without the DestinationRule"
    );
}

#[test]
fn bad_export_to_and_source_values_are_reported_at_their_line() {
    let se = |export: &str| {
        CATALOG.split("---").next().unwrap().replace(
            "  resolution: STATIC\n",
            &format!("  resolution: STATIC\n  exportTo: {export}\n"),
        )
    };
    assert_one(&check(&se("['*', b]")), 8, "'*' must be the only value");
    assert_one(&check(&se("['~', b]")), 8, "'~' must be the only value");
    assert_one(
        &check(&se("[b, b]")),
        8,
        "'exportTo[1]': 'b' is listed twice",
    );
    assert_one(&check(&se("[Shop]")), 8, "'Shop' is not a namespace name");
    assert_one(&check(&se("b")), 8, "exportTo");
    assert!(check(&se("[]")).is_empty());
    assert!(check(&se("['~']")).is_empty());
    let bad_match = |m: &str| {
        format!(
            "{CATALOG}{}",
            vs(
                "a",
                "catalog",
                "",
                &format!("  - match: [{m}]\n    route: [{{destination: {{host: catalog}}}}]\n")
            )
        )
    };
    assert_one(
        &check(&bad_match("{sourceNamespace: Not_A_Namespace}")),
        27,
        "'Not_A_Namespace' is not a namespace name",
    );
    assert_one(
        &check(&bad_match("{sourceLabels: [version]}")),
        27,
        "sourceLabels",
    );
}
