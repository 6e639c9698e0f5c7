//! Tests of DestinationRule `portLevelSettings` and the connection settings
//! of `connectionPool` (TCP keepalive, `maxConnectionDuration`, the two
//! idle timeouts, `h2UpgradePolicy`, `maxConcurrentStreams`): what a user
//! writes, what the clients' model says, and where `check` points when a
//! value is wrong.

use std::time::Duration;

use mesh_core::Snapshot;
use mesh_core::model::{Cluster, LbPolicy, Protocol, TcpKeepalive};

use super::tests::{FQDN, assert_one, check, store};

/// A service `catalog` with an HTTP port 80, a gRPC port 9090 and an HTTP
/// port 8080.
const SE_PORTS: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 9090, name: grpc, protocol: GRPC}
  - {number: 8080, name: http-alt, protocol: HTTP}
  resolution: STATIC
";

/// A DestinationRule for `catalog` whose spec continues with `rest`
/// (indented 2).
fn dr(rest: &str) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
{rest}"
    )
}

/// The 1-based line of the first line of `text` containing `needle`.
#[track_caller]
fn line_with(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in the text"))
}

fn snapshot(files: &[(&str, &str)]) -> Snapshot {
    let (s, _d) = store(files);
    let (snap, diags) = s.snapshot(&[]);
    assert!(diags.is_empty(), "{diags:#?}");
    snap
}

fn cluster<'s>(snap: &'s Snapshot, port: u16, subset: &str) -> &'s Cluster {
    &snap.clusters[&*format!("outbound|{port}|{subset}|{FQDN}")]
}

#[test]
fn tcp_settings_translate_to_the_cluster() {
    let rule = dr("  trafficPolicy:
    connectionPool:
      tcp:
        tcpKeepalive: {probes: 3, time: 7200s, interval: 75s}
        maxConnectionDuration: 300ms
        idleTimeout: 30s
");
    let snap = snapshot(&[("a.yaml", SE_PORTS), ("b.yaml", &rule)]);
    let c = &cluster(&snap, 80, "").connection;
    assert_eq!(
        c.tcp_keepalive,
        Some(TcpKeepalive {
            probes: Some(3),
            time: Some(Duration::from_secs(7200)),
            interval: Some(Duration::from_secs(75)),
        })
    );
    assert_eq!(c.max_connection_duration, Some(Duration::from_millis(300)));
    // tcp.idleTimeout applies when http.idleTimeout is not set.
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(30)));
    assert!(!c.h2_upgrade);
}

#[test]
fn keepalive_without_values_keeps_the_os_defaults() {
    let rule = dr("  trafficPolicy:
    connectionPool:
      tcp:
        tcpKeepalive: {}
");
    let snap = snapshot(&[("a.yaml", SE_PORTS), ("b.yaml", &rule)]);
    assert_eq!(
        cluster(&snap, 80, "").connection.tcp_keepalive,
        Some(TcpKeepalive::default())
    );
}

#[test]
fn http_idle_timeout_wins_over_tcp_idle_timeout() {
    let rule = dr("  trafficPolicy:
    connectionPool:
      tcp: {idleTimeout: 30s}
      http: {idleTimeout: 5s}
");
    let snap = snapshot(&[("a.yaml", SE_PORTS), ("b.yaml", &rule)]);
    assert_eq!(
        cluster(&snap, 80, "").connection.idle_timeout,
        Some(Duration::from_secs(5))
    );
}

#[test]
fn h2_upgrade_and_max_concurrent_streams() {
    let rule = dr("  trafficPolicy:
    connectionPool:
      http: {h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 2}
");
    let snap = snapshot(&[("a.yaml", SE_PORTS), ("b.yaml", &rule)]);
    let http = cluster(&snap, 80, "");
    assert_eq!(http.protocol, Protocol::Http1);
    assert!(http.connection.h2_upgrade);
    assert_eq!(http.connection.max_concurrent_streams, Some(2));
    // A gRPC port is HTTP/2 already: not "upgraded", and the streams cap applies.
    let grpc = cluster(&snap, 9090, "");
    assert!(!grpc.connection.h2_upgrade);
    assert_eq!(grpc.connection.max_concurrent_streams, Some(2));
}

#[test]
fn max_concurrent_streams_applies_to_http2_clusters_only() {
    // As Istio: set only where the cluster speaks HTTP/2.
    let rule = dr("  trafficPolicy:
    connectionPool:
      http: {maxConcurrentStreams: 2, h2UpgradePolicy: DO_NOT_UPGRADE}
");
    let snap = snapshot(&[("a.yaml", SE_PORTS), ("b.yaml", &rule)]);
    assert_eq!(
        cluster(&snap, 80, "").connection.max_concurrent_streams,
        None
    );
    assert!(!cluster(&snap, 80, "").connection.h2_upgrade);
    assert_eq!(
        cluster(&snap, 9090, "").connection.max_concurrent_streams,
        Some(2)
    );
}

#[test]
fn port_level_settings_replace_the_top_level_for_their_port_only() {
    let rule = dr("  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool:
      http: {maxRequestsPerConnection: 5}
    outlierDetection: {consecutive5xxErrors: 3}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: ROUND_ROBIN}
      connectionPool:
        http: {maxRequestsPerConnection: 1}
  subsets:
  - name: v1
    labels: {version: v1}
");
    let snap = snapshot(&[("a.yaml", SE_PORTS), ("b.yaml", &rule)]);
    for subset in ["", "v1"] {
        let top = cluster(&snap, 80, subset);
        assert_eq!(top.lb_policy, LbPolicy::Random);
        assert_eq!(top.connection.max_requests_per_connection, Some(5));
        assert!(top.outlier_detection.is_some());
        let port = cluster(&snap, 8080, subset);
        assert_eq!(port.lb_policy, LbPolicy::RoundRobin);
        assert_eq!(port.connection.max_requests_per_connection, Some(1));
        // Not inherited: the port-level entry has no outlierDetection.
        assert_eq!(port.outlier_detection, None, "{subset}");
    }
}

#[test]
fn a_subset_policy_merges_over_the_port_level_one() {
    let rule = dr("  trafficPolicy:
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: ROUND_ROBIN}
      connectionPool:
        http: {maxRequestsPerConnection: 1}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
      portLevelSettings:
      - port: {number: 8080}
        connectionPool:
          http: {maxRequestsPerConnection: 7}
");
    let snap = snapshot(&[("a.yaml", SE_PORTS), ("b.yaml", &rule)]);
    // v1: its loadBalancer over the rule's port-level entry.
    let v1 = cluster(&snap, 8080, "v1");
    assert_eq!(v1.lb_policy, LbPolicy::Random);
    assert_eq!(v1.connection.max_requests_per_connection, Some(1));
    // v2: its own entry for 8080 replaces all four fields (no loadBalancer
    // there: the default, least request).
    let v2 = cluster(&snap, 8080, "v2");
    assert_eq!(v2.lb_policy, LbPolicy::LeastRequest);
    assert_eq!(v2.connection.max_requests_per_connection, Some(7));
    // On port 80, v2's subset policy applies as usual.
    assert_eq!(cluster(&snap, 80, "v2").lb_policy, LbPolicy::Random);
    assert_eq!(
        cluster(&snap, 80, "v2")
            .connection
            .max_requests_per_connection,
        None
    );
}

#[test]
fn a_port_level_consistent_hash_reaches_the_routes_of_that_port() {
    let rule = dr("  trafficPolicy:
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer:
        consistentHash: {httpHeaderName: x-user}
");
    let snap = snapshot(&[("a.yaml", SE_PORTS), ("b.yaml", &rule)]);
    let hashed = |port: u16| {
        snap.route_configs[&*format!("{FQDN}:{port}")].virtual_hosts[0].routes[0]
            .policy
            .hash_policy
            .len()
    };
    assert_eq!(hashed(8080), 1);
    assert_eq!(hashed(80), 0);
}

#[test]
fn a_port_named_twice_is_an_error_at_the_second() {
    let rule = dr("  trafficPolicy:
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: RANDOM}
    - port:
        number: 8080
      loadBalancer: {simple: ROUND_ROBIN}
");
    let diags = check(&rule);
    assert_one(
        &diags,
        line_with(&rule, "        number: 8080"),
        "port 8080 already has settings at line 8",
    );
}

#[test]
fn a_port_level_entry_needs_a_port() {
    let rule = dr("  trafficPolicy:
    portLevelSettings:
    - loadBalancer: {simple: RANDOM}
");
    assert_one(
        &check(&rule),
        line_with(&rule, "- loadBalancer"),
        "missing field 'trafficPolicy.portLevelSettings[0].port'",
    );
    let rule = dr("  trafficPolicy:
    portLevelSettings:
    - port: {number: 70000}
");
    assert_one(&check(&rule), line_with(&rule, "70000"), "out of range");
}

#[test]
fn bad_connection_settings_are_reported_at_their_line() {
    let cases = [
        (
            "      tcp:\n        tcpKeepalive: {time: 1500ms}\n",
            "1500ms",
            "whole number of seconds",
        ),
        (
            "      tcp:\n        tcpKeepalive:\n          probes: 0\n",
            "probes: 0",
            "tcpKeepalive.probes",
        ),
        (
            "      tcp:\n        maxConnectionDuration: soon\n",
            "soon",
            "is not a duration",
        ),
        (
            "      http:\n        h2UpgradePolicy: SOMETIMES\n",
            "SOMETIMES",
            "unknown policy 'SOMETIMES'",
        ),
        (
            "      http:\n        maxConcurrentStreams: 0\n",
            "maxConcurrentStreams: 0",
            "maxConcurrentStreams",
        ),
        (
            "      http:\n        maxConcurrentStreams: 2147483648\n",
            "2147483648",
            "maxConcurrentStreams",
        ),
        (
            "      http:\n        useClientProtocol: true\n",
            "useClientProtocol",
            "not supported yet",
        ),
    ];
    for (pool, needle, message) in cases {
        let rule = dr(&format!("  trafficPolicy:\n    connectionPool:\n{pool}"));
        assert_one(&check(&rule), line_with(&rule, needle), message);
    }
}

#[test]
fn grpc_findings_name_each_connection_setting_at_its_line() {
    let rule = dr("  trafficPolicy:
    connectionPool:
      tcp:
        tcpKeepalive: {time: 60s}
        maxConnectionDuration: 10m
    portLevelSettings:
    - port: {number: 9090}
      connectionPool:
        http: {maxConcurrentStreams: 8, h2UpgradePolicy: UPGRADE}
");
    let yaml = format!("{SE_PORTS}---\n{rule}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), &yaml).unwrap();
    let report = crate::grpc_report(&[dir.path()], &super::MeshOptions::default());
    let at = |needle: &str| {
        let line = line_with(&yaml, needle);
        let notes: Vec<&str> = report
            .written
            .iter()
            .filter(|d| d.line == line)
            .map(|d| d.message.as_str())
            .collect();
        assert!(
            !notes.is_empty(),
            "no note at line {line}: {:#?}",
            report.written
        );
        notes.join("\n")
    };
    assert!(at("tcpKeepalive").contains("connectionPool.tcp.tcpKeepalive': ignored by gRPC"));
    assert!(at("maxConnectionDuration").contains("ignored by gRPC clients"));
    let port = at("maxConcurrentStreams");
    assert!(
        port.contains("portLevelSettings[0].connectionPool.http.maxConcurrentStreams"),
        "{port}"
    );
    assert!(
        port.contains("h2UpgradePolicy': changes nothing for gRPC clients"),
        "{port}"
    );

    // The served view says the same, per cluster.
    let snap = snapshot(&[("a.yaml", SE_PORTS), ("b.yaml", &rule)]);
    let found = crate::compat::grpc_ignored(&snap, None, None);
    let of = |port: u16| {
        let name = format!("cluster \"outbound|{port}||{FQDN}\"");
        found
            .iter()
            .filter(|f| f.starts_with(&name))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        of(80)
            .iter()
            .any(|f| f
                .contains("tcpKeepalive / maxConnectionDuration ignored (gRPC clients read none")),
        "{found:#?}"
    );
    // Port 9090 (gRPC, so not "upgraded") takes its port-level settings only.
    assert!(
        of(9090)
            .iter()
            .any(|f| f.contains(": maxConcurrentStreams ignored")),
        "{found:#?}"
    );
}
