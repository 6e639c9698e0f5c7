//! `localityLbSetting` (distribute, failover, failoverPriority) per caller
//! locality, and `warmupDurationSecs`, from YAML to the view's clusters and
//! endpoints; problems at their lines.

use std::collections::BTreeMap;

use mesh_core::model::Locality;

use super::super::tests::{check, dir};
use super::super::*;

/// catalog in `shop`: two endpoints in r1/z1, one in r1/z2, one in r2/z3,
/// one in r3/z4; team labels for failoverPriority.
const CATALOG: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.1.1, locality: r1/z1, labels: {team: a}}
  - {address: 10.0.1.2, locality: r1/z1, labels: {team: b}}
  - {address: 10.0.2.1, locality: r1/z2, labels: {team: a}}
  - {address: 10.0.3.1, locality: r2/z3, labels: {team: b}}
  - {address: 10.0.4.1, locality: r3/z4, labels: {team: a}}
---
";

const CLUSTER: &str = "outbound|80||catalog.shop.svc.cluster.local";

fn rule(traffic_policy: &str) -> String {
    format!(
        "{CATALOG}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
  trafficPolicy:
{traffic_policy}"
    )
}

fn store(yaml: &str) -> ConfigStore {
    let d = dir(&[("mesh.yaml", yaml)]);
    let mut store = ConfigStore::new(MeshOptions::default());
    let diags = store.load_dir(d.path());
    assert!(diags.is_empty(), "{diags:#?}");
    let (_, problems) = store.snapshot(&[]);
    assert!(problems.is_empty(), "{problems:#?}");
    store
}

fn at(locality: &str) -> Locality {
    super::super::resources::parse_locality(locality).unwrap()
}

/// (locality, weight, priority, endpoint count) of the cluster, as the
/// caller at `locality` with `labels` gets it.
fn seen(
    store: &ConfigStore,
    locality: &str,
    labels: &[(&str, &str)],
) -> Vec<(String, u32, u32, usize)> {
    let source = store.view_source(&[]).expect("the config has views");
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let key = source
        .dependencies
        .key_at("shop", &labels, &at(locality))
        .expect("a view key");
    let view = source.translate(&key);
    assert!(
        !view.snapshot.clusters[CLUSTER].locality_failover,
        "the server computed it: no client-side ordering on top"
    );
    let mut out: Vec<_> = view.snapshot.endpoints[CLUSTER]
        .localities
        .iter()
        .map(|l| {
            (
                format!("{}/{}", l.locality.region, l.locality.zone),
                l.weight,
                l.priority,
                l.endpoints.len(),
            )
        })
        .collect();
    out.sort();
    out
}

fn owned(v: &[(&str, u32, u32, usize)]) -> Vec<(String, u32, u32, usize)> {
    v.iter()
        .map(|(l, w, p, n)| (l.to_string(), *w, *p, *n))
        .collect()
}

#[test]
fn distribute_sets_the_weights_for_callers_it_is_from() {
    let store = store(&rule(
        "    loadBalancer:
      localityLbSetting:
        distribute:
        - from: r1/z1/*
          to: {r1/z1/*: 70, r1/z2/*: 20, r2/*: 10}
    outlierDetection: {consecutive5xxErrors: 1}
",
    ));
    let deps = store.view_source(&[]).unwrap().dependencies;
    assert!(deps.locality && deps.priority_labels.is_empty());
    // r3 matches no `to`: it has no endpoints for these callers.
    assert_eq!(
        seen(&store, "r1/z1/s9", &[]),
        owned(&[
            ("r1/z1", 70, 0, 2),
            ("r1/z2", 20, 0, 1),
            ("r2/z3", 10, 0, 1)
        ])
    );
    // Callers it is not from: the weights of the shared translation, and
    // no failover either (Istio applies one of distribute or failover).
    assert_eq!(
        seen(&store, "r2/z3", &[]),
        owned(&[
            ("r1/z1", 2, 0, 2),
            ("r1/z2", 1, 0, 1),
            ("r2/z3", 1, 0, 1),
            ("r3/z4", 1, 0, 1)
        ])
    );
    // The shared translation is unchanged.
    let (shared, _) = store.snapshot(&[]);
    assert_eq!(shared.endpoints[CLUSTER].localities.len(), 4);
}

#[test]
fn a_wildcard_to_shares_its_weight_by_the_localities_own_weights() {
    let store = store(&rule(
        "    loadBalancer:
      localityLbSetting:
        distribute:
        - from: '*'
          to: {r1/*: 90, '*': 10}
",
    ));
    // r1/z1 (2 endpoints) and r1/z2 (1) share 90 as 2:1 (60, 30), and the
    // rest 10 as 1:1, rounded up (5, 5).
    assert_eq!(
        seen(&store, "r9", &[]),
        owned(&[
            ("r1/z1", 60, 0, 2),
            ("r1/z2", 30, 0, 1),
            ("r2/z3", 5, 0, 1),
            ("r3/z4", 5, 0, 1)
        ])
    );
}

#[test]
fn failover_orders_by_closeness_then_the_named_region() {
    let store = store(&rule(
        "    loadBalancer:
      localityLbSetting:
        failover: [{from: r1, to: r3}]
    outlierDetection: {consecutive5xxErrors: 1}
",
    ));
    // Same zone 0, same region 1, the failover region 2, the rest 3.
    assert_eq!(
        seen(&store, "r1/z1", &[]),
        owned(&[
            ("r1/z1", 2, 0, 2),
            ("r1/z2", 1, 1, 1),
            ("r2/z3", 1, 3, 1),
            ("r3/z4", 1, 2, 1)
        ])
    );
    // From r2 no failover entry applies: closeness only.
    assert_eq!(
        seen(&store, "r2/z3", &[]),
        owned(&[
            ("r1/z1", 2, 1, 2),
            ("r1/z2", 1, 1, 1),
            ("r2/z3", 1, 0, 1),
            ("r3/z4", 1, 1, 1)
        ])
    );
    // Without outlier detection Istio applies no failover (and check says so).
    let store = super::super::tests::dir(&[(
        "mesh.yaml",
        &rule(
            "    loadBalancer:
      localityLbSetting:
        failover: [{from: r1, to: r3}]
",
        ),
    )]);
    let mut config = ConfigStore::new(MeshOptions::default());
    assert!(config.load_dir(store.path()).is_empty());
    let source = config.view_source(&[]).unwrap();
    let key = source
        .dependencies
        .key_at("shop", &BTreeMap::new(), &at("r1/z1"))
        .unwrap();
    let view = source.translate(&key);
    assert!(
        view.snapshot.endpoints[CLUSTER]
            .localities
            .iter()
            .all(|l| l.priority == 0)
    );
    let notes = check_notes(&[store.path()]);
    assert_eq!(notes.len(), 1, "{notes:#?}");
    assert_eq!(notes[0].line, 23);
    assert!(
        notes[0].message.contains("without outlierDetection"),
        "{notes:#?}"
    );
}

#[test]
fn failover_priority_splits_localities_by_the_caller_labels_it_shares() {
    let store = store(&rule(
        "    loadBalancer:
      localityLbSetting:
        failoverPriority: [team, topology.kubernetes.io/region]
    outlierDetection: {consecutive5xxErrors: 1}
",
    ));
    let deps = store.view_source(&[]).unwrap().dependencies;
    assert_eq!(
        deps.priority_labels.iter().collect::<Vec<_>>(),
        ["team"],
        "the region comes from the locality"
    );
    // Team a in r1: same team and region 0, same team 1, other team 2.
    assert_eq!(
        seen(&store, "r1/z1", &[("team", "a"), ("pod", "x")]),
        owned(&[
            ("r1/z1", 1, 0, 1),
            ("r1/z1", 1, 2, 1),
            ("r1/z2", 1, 0, 1),
            ("r2/z3", 1, 2, 1),
            ("r3/z4", 1, 1, 1)
        ])
    );
    // `label=value` compares with the value, whatever the caller has.
    let store = super::super::tests::dir(&[(
        "mesh.yaml",
        &rule(
            "    loadBalancer:
      localityLbSetting:
        failoverPriority: [team=b]
    outlierDetection: {consecutive5xxErrors: 1}
",
        ),
    )]);
    let mut config = ConfigStore::new(MeshOptions::default());
    assert!(config.load_dir(store.path()).is_empty());
    let source = config.view_source(&[]).unwrap();
    assert!(source.dependencies.priority_labels.is_empty());
    let key = source
        .dependencies
        .key_at("shop", &BTreeMap::new(), &at("r3/z4"))
        .unwrap();
    let cla = &source.translate(&key).snapshot.endpoints[CLUSTER];
    let first: Vec<String> = cla
        .localities
        .iter()
        .filter(|l| l.priority == 0)
        .flat_map(|l| l.endpoints.iter().map(|e| e.address.ip().to_string()))
        .collect();
    assert_eq!(first, ["10.0.1.2", "10.0.3.1"]);
}

#[test]
fn a_config_without_locality_settings_does_not_depend_on_the_locality() {
    let store = store(&rule(
        "    loadBalancer: {localityLbSetting: {enabled: true}, warmupDurationSecs: 30s}
    outlierDetection: {consecutive5xxErrors: 1}
",
    ));
    assert!(store.view_source(&[]).is_none());
    let (shared, _) = store.snapshot(&[]);
    let c = &shared.clusters[CLUSTER];
    assert!(
        c.locality_failover,
        "Istio's default failover stays client-side"
    );
    assert_eq!(c.slow_start, Some(std::time::Duration::from_secs(30)));
}

#[test]
fn warmup_applies_to_round_robin_and_least_request_only() {
    for (lb, want) in [
        ("simple: ROUND_ROBIN", Some(45)),
        ("simple: LEAST_REQUEST", Some(45)),
        ("simple: RANDOM", None),
        ("consistentHash: {httpHeaderName: x-user}", None),
    ] {
        let yaml = rule(&format!(
            "    loadBalancer: {{{lb}, warmupDurationSecs: 45s}}\n"
        ));
        let store = store(&yaml);
        let (shared, _) = store.snapshot(&[]);
        assert_eq!(
            shared.clusters[CLUSTER].slow_start,
            want.map(std::time::Duration::from_secs),
            "{lb}"
        );
        let d = dir(&[("mesh.yaml", &yaml)]);
        let notes = check_notes(&[d.path()]);
        assert_eq!(notes.len(), usize::from(want.is_none()), "{lb}: {notes:#?}");
    }
}

#[test]
fn bad_locality_settings_are_reported_at_their_lines() {
    let cases: [(&str, usize, &str); 7] = [
        (
            "    loadBalancer:
      localityLbSetting:
        distribute: [{from: r1/z1/*, to: {r1/*: 80, r2/*: 20}}]
        failover: [{from: r1, to: r2}]
",
            24,
            "only one of distribute or failover",
        ),
        (
            "    loadBalancer:
      localityLbSetting:
        distribute:
        - from: r1/z1/*
          to: {r1/*: 70, r2/*: 20}
",
            25,
            "add up to 90",
        ),
        (
            "    loadBalancer:
      localityLbSetting:
        distribute:
        - from: r1/*/z1
          to: {r1/*: 100}
",
            24,
            "one '*', at the end",
        ),
        (
            "    loadBalancer:
      localityLbSetting:
        distribute:
        - from: r1
          to: {r1/*: 0, r2: 100}
",
            25,
            "between 1 and 100",
        ),
        (
            "    loadBalancer:
      localityLbSetting:
        failover: [{from: r1, to: r1}]
",
            23,
            "to itself",
        ),
        (
            "    loadBalancer:
      localityLbSetting:
        failover: [{from: r1/z1, to: r2}]
",
            23,
            "names a region",
        ),
        (
            "    loadBalancer:
      localityLbSetting:
        failover: [{from: r1, to: r2}]
        failoverPriority: [topology.kubernetes.io/zone]
",
            24,
            "cannot be used together with 'failover'",
        ),
    ];
    for (policy, line, needle) in cases {
        let diags = check(&rule(policy));
        assert_eq!(diags.len(), 1, "{policy}: {diags:#?}");
        assert_eq!(diags[0].line, line, "{policy}: {diags:#?}");
        assert!(diags[0].message.contains(needle), "{policy}: {diags:#?}");
    }
}

#[test]
fn a_port_level_locality_setting_makes_views_too() {
    let store = store(&rule(
        "    portLevelSettings:
    - port: {number: 80}
      loadBalancer:
        localityLbSetting:
          distribute:
          - from: r1/*
            to: {r1/*: 100}
",
    ));
    assert_eq!(
        seen(&store, "r1/z2", &[]),
        owned(&[("r1/z1", 67, 0, 2), ("r1/z2", 34, 0, 1)])
    );
}
