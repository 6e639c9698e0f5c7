//! The service graph read from a Prometheus that scrapes the workloads
//! (`mesh-control serve --prometheus URL`), as Kiali reads it: Istio's
//! metric names, `reporter="source"`. Pure: the answers of Prometheus'
//! query API in ([`Answer`], deserialized by the caller), a
//! [`super::Graph`] out ([`graph`]); mesh-control sends the queries
//! ([`queries`]).
//!
//! # The queries
//!
//! Over the same window as the embedded graph (`W`: 5 minutes,
//! [`super::WindowConfig`]'s default), with `E` the edge's labels
//! (below), each an instant query evaluated now:
//!
//! | what | PromQL |
//! |---|---|
//! | requests | `sum by (E, instance) (increase(istio_requests_total{reporter="source"}[W]))` |
//! | errors | `sum by (E) (increase(istio_requests_total{reporter="source",response_code=~"5.."}[W]) or increase(istio_requests_total{reporter="source",grpc_response_status!~"0\|"}[W]))` |
//! | p50, p99 | `histogram_quantile(0.5, sum by (E, le) (rate(istio_request_duration_milliseconds_bucket{reporter="source"}[W])))` (0.99) |
//! | retries | `sum by (instance, cluster_name) (increase(proxyless_retries_total[W]))` |
//! | denials | `sum by (policy, source_principal, destination_workload, destination_workload_namespace) (increase(mesh_authz_denied_total[W]))` |
//! | denials' last | the same labels, `max_over_time((timestamp(increase(mesh_authz_denied_total[1m]) > 0))[W:15s])` |
//! | first seen | `min by (E) (min_over_time(timestamp(istio_requests_total{reporter="source"})[W:5s]))` |
//!
//! Rates are the requests (`increase`) over the edge's age (from its first
//! sample, to 5 s) or the whole window if older, as the embedded window
//! divides by its edge's age: a new canary's rate is not diluted over 5
//! minutes it did not exist for. (Kiali divides by the whole window.)
//!
//! Errors are what the workloads' pushes count ([`super::EdgeDelta::errors`]):
//! an HTTP 5xx, or a gRPC status other than OK. The `or` of the two
//! selections takes a series matching both once (it matches on every
//! label). Retries carry no source labels (they are counted per cluster),
//! so they are read per scrape target (`instance`: one workload process)
//! and given, as the push does, to the first edge in key order of that
//! target to the retried service.
//!
//! # The labels, and why
//!
//! An edge ([`super::EdgeKey`]) is `source_workload_namespace`,
//! `source_workload`, `source_version`, `source_principal` (the source's
//! service account is its SPIFFE ID's `sa` segment), `destination_service`,
//! `destination_version`, `request_protocol` and
//! `connection_security_policy` (`mutual_tls` is the lock). These are the
//! labels Kiali's graph groups by (workload, app and version on both sides,
//! the service, the protocol and the security policy) and the ones the
//! pushed summary names, so that both sources give the same edges. Only the
//! source reporter is read: every workload of the mesh is a client that
//! reports its own calls, where Istio's sidecars also report as
//! destination. Reading both would count each call twice.
//!
//! # What Prometheus mode cannot show
//!
//! - **Who really sent.** The pushed summary is attributed to the sender's
//!   verified identity; a scrape takes the labels as the target wrote them,
//!   so the source is what the workload claims.
//! - **Calls that never reached a server.** The source reporter knows the
//!   destination version only once an endpoint answered; calls that ended
//!   before (a local fault, a timeout before the first byte) have version
//!   `unknown`, as in the pushed graph.
//! - **Exact counts.** `increase` extrapolates to the window's edges, so
//!   `requests` is an estimate, rounded; and every figure lags by up to one
//!   scrape interval.
//! - **Denials' age,** to about a minute: the last evaluation step (15 s)
//!   whose preceding minute held a denial.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::{DenialKey, DenialStats, EdgeKey, EdgeStats, Graph};

/// The labels of an edge, as the queries group by them.
pub const EDGE_LABELS: &str = "source_workload_namespace, source_workload, source_version, \
     source_principal, destination_service, destination_version, request_protocol, \
     connection_security_policy";

/// The labels of a denial.
const DENIAL_LABELS: &str =
    "policy, source_principal, destination_workload, destination_workload_namespace";

/// One value per query the graph needs: the PromQL ([`queries`]), then
/// its answer's samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerQuery<T> {
    /// Requests per edge and scrape target.
    pub requests: T,
    /// Errors per edge.
    pub errors: T,
    /// The median latency per edge, in ms.
    pub p50: T,
    /// The 99th percentile latency per edge, in ms.
    pub p99: T,
    /// Retries per scrape target and cluster.
    pub retries: T,
    /// Authorization denials per policy, caller and denying workload.
    pub denials: T,
    /// When each was last seen (Unix seconds).
    pub denials_last_seen: T,
    /// When each edge's first sample in the window was taken (Unix
    /// seconds): an edge younger than the window has its rates over its
    /// age, as in the embedded window.
    pub first_seen: T,
}

/// How many queries a graph takes.
pub const QUERIES: usize = 8;

impl<T> PerQuery<T> {
    /// Its values in the order of the fields.
    pub fn into_array(self) -> [T; QUERIES] {
        [
            self.requests,
            self.errors,
            self.p50,
            self.p99,
            self.retries,
            self.denials,
            self.denials_last_seen,
            self.first_seen,
        ]
    }

    /// From values in the order of the fields.
    pub fn from_array(values: [T; QUERIES]) -> Self {
        let [
            requests,
            errors,
            p50,
            p99,
            retries,
            denials,
            denials_last_seen,
            first_seen,
        ] = values;
        PerQuery {
            requests,
            errors,
            p50,
            p99,
            retries,
            denials,
            denials_last_seen,
            first_seen,
        }
    }
}

/// The PromQL of the graph over a window of `window_seconds` (see the
/// module's documentation).
pub fn queries(window_seconds: u64) -> PerQuery<String> {
    let w = format!("{}s", window_seconds.max(1));
    let requests = "istio_requests_total{reporter=\"source\"}";
    PerQuery {
        requests: format!("sum by ({EDGE_LABELS}, instance) (increase({requests}[{w}]))"),
        errors: format!(
            "sum by ({EDGE_LABELS}) (increase(istio_requests_total{{reporter=\"source\",\
             response_code=~\"5..\"}}[{w}]) or increase(istio_requests_total{{reporter=\
             \"source\",grpc_response_status!~\"0|\"}}[{w}]))"
        ),
        p50: quantile_query(0.5, &w),
        p99: quantile_query(0.99, &w),
        retries: format!(
            "sum by (instance, cluster_name) (increase(proxyless_retries_total[{w}]))"
        ),
        denials: format!("sum by ({DENIAL_LABELS}) (increase(mesh_authz_denied_total[{w}]))"),
        denials_last_seen: format!(
            "max by ({DENIAL_LABELS}) (max_over_time((timestamp(increase(\
             mesh_authz_denied_total[1m]) > 0))[{w}:15s]))"
        ),
        first_seen: format!(
            "min by ({EDGE_LABELS}) (min_over_time(timestamp({requests})[{w}:5s]))"
        ),
    }
}

fn quantile_query(q: f64, w: &str) -> String {
    format!(
        "histogram_quantile({q}, sum by ({EDGE_LABELS}, le) \
         (rate(istio_request_duration_milliseconds_bucket{{reporter=\"source\"}}[{w}])))"
    )
}

/// An answer of `GET /api/v1/query`, as Prometheus documents it
/// (<https://prometheus.io/docs/prometheus/latest/querying/api/>); only an
/// instant vector is taken.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Answer {
    /// `success` or `error`.
    pub status: String,
    /// The result, on success.
    #[serde(default)]
    pub data: Option<Data>,
    /// On error: `bad_data`, `timeout`, `execution`, ...
    #[serde(default, rename = "errorType")]
    pub error_type: String,
    /// On error: Prometheus' message.
    #[serde(default)]
    pub error: String,
}

/// A successful answer's `data`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Data {
    /// `vector` for the queries here.
    #[serde(rename = "resultType")]
    pub result_type: String,
    /// The series.
    #[serde(default)]
    pub result: Vec<Series>,
}

/// One series of an instant vector: its labels and its value at the
/// evaluation time.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Series {
    /// Its labels.
    #[serde(default)]
    pub metric: BTreeMap<String, String>,
    /// `[unix seconds, "value"]` (the value is a string: `NaN`, `+Inf`).
    pub value: (f64, String),
}

impl Series {
    /// Its value (`NaN` when it does not parse).
    pub fn number(&self) -> f64 {
        self.value.1.parse().unwrap_or(f64::NAN)
    }

    fn label(&self, name: &str) -> &str {
        self.metric.get(name).map_or("", String::as_str)
    }
}

impl Answer {
    /// Its series, or what Prometheus said went wrong (its error type and
    /// message), or why the answer is not an instant vector.
    pub fn into_vector(self) -> Result<Vec<Series>, String> {
        if self.status != "success" {
            return Err(if self.error.is_empty() {
                format!("status {:?} without an error message", self.status)
            } else {
                format!("{}: {}", self.error_type, self.error)
            });
        }
        match self.data {
            Some(data) if data.result_type == "vector" => Ok(data.result),
            Some(data) => Err(format!(
                "a {} result where an instant vector was expected",
                data.result_type
            )),
            None => Err("a success without data".to_owned()),
        }
    }
}

/// The edge a series' labels name; `None` when it names no destination
/// service (nothing to draw).
fn edge_key(s: &Series) -> Option<EdgeKey> {
    let destination_service = s.label("destination_service");
    if destination_service.is_empty() {
        return None;
    }
    let or_unknown = |v: &str| {
        if v.is_empty() {
            "unknown".to_owned()
        } else {
            v.to_owned()
        }
    };
    let protocol = match s.label("request_protocol") {
        p @ ("http" | "grpc" | "tcp") => p,
        _ => "http",
    };
    Some(EdgeKey {
        source_namespace: or_unknown(s.label("source_workload_namespace")),
        source_service_account: or_unknown(service_account(s.label("source_principal"))),
        source_workload: or_unknown(s.label("source_workload")),
        source_version: s.label("source_version").to_owned(),
        destination_service: destination_service.to_owned(),
        destination_version: s.label("destination_version").to_owned(),
        protocol: protocol.to_owned(),
        mtls: s.label("connection_security_policy") == "mutual_tls",
    })
}

/// The service account of a SPIFFE ID `spiffe://<domain>/ns/<ns>/sa/<sa>`,
/// `""` for anything else (`unknown`, a plaintext caller).
fn service_account(principal: &str) -> &str {
    principal
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once("/sa/"))
        .map_or("", |(_, sa)| sa)
}

/// A count read from an `increase`: finite and not negative, else 0.
fn count(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}

/// A quantile's value: `None` for `NaN` (no requests) or an infinity.
fn latency(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The graph of the answers to [`queries`] over `window_seconds`: nodes and
/// shares as the embedded window computes them ([`Graph::from_edges`]).
/// Series without a destination service are left out; missing answers
/// (no latency, no retries, no denial counter) leave those figures empty.
pub fn graph(answers: &PerQuery<Vec<Series>>, window_seconds: f64) -> Graph {
    let window_seconds = if window_seconds > 0.0 {
        window_seconds
    } else {
        1.0
    };
    // Requests per edge, summed over targets; per target, its edges.
    let mut requests: BTreeMap<EdgeKey, f64> = BTreeMap::new();
    let mut by_target: HashMap<&str, Vec<EdgeKey>> = HashMap::new();
    for s in &answers.requests {
        let Some(key) = edge_key(s) else { continue };
        *requests.entry(key.clone()).or_default() += count(s.number());
        by_target.entry(s.label("instance")).or_default().push(key);
    }
    let per_edge = |series: &[Series]| -> HashMap<EdgeKey, f64> {
        let mut out: HashMap<EdgeKey, f64> = HashMap::new();
        for s in series {
            if let Some(key) = edge_key(s) {
                *out.entry(key).or_default() += s.number();
            }
        }
        out
    };
    // The edges' ages: from their first sample to the evaluation time.
    let mut first: HashMap<EdgeKey, (f64, f64)> = HashMap::new();
    for s in &answers.first_seen {
        let (Some(key), seen) = (edge_key(s), s.number()) else {
            continue;
        };
        if seen.is_finite() {
            let e = first.entry(key).or_insert((s.value.0, seen));
            e.1 = e.1.min(seen);
        }
    }
    let span = |key: &EdgeKey| match first.get(key) {
        Some((now, seen)) => (now - seen).clamp(1.0, window_seconds),
        None => window_seconds,
    };
    let errors = per_edge(&answers.errors);
    let p50 = per_edge(&answers.p50);
    let p99 = per_edge(&answers.p99);
    // Retries: per target, to the first edge in key order to the service.
    let mut retries: HashMap<EdgeKey, f64> = HashMap::new();
    for s in &answers.retries {
        let cluster = s.label("cluster_name");
        let host = cluster.rsplit('|').next().unwrap_or(cluster);
        let first = by_target
            .get(s.label("instance"))
            .and_then(|keys| keys.iter().filter(|k| k.destination_service == host).min());
        if let Some(key) = first {
            *retries.entry(key.clone()).or_default() += count(s.number());
        }
    }
    let mut edges = Vec::with_capacity(requests.len());
    for (key, n) in requests {
        let retried = retries.get(&key).copied().unwrap_or(0.0);
        let rounded = n.round() as u64;
        if rounded == 0 && retried < 0.5 {
            continue;
        }
        let errors = errors.get(&key).copied().map_or(0.0, count);
        let seconds = span(&key);
        edges.push(EdgeStats {
            requests: rounded,
            rps: n / seconds,
            error_rate: if n > 0.0 {
                (errors / n).clamp(0.0, 1.0)
            } else {
                0.0
            },
            retries_per_second: retried / seconds,
            p50_ms: p50.get(&key).copied().and_then(latency),
            p99_ms: p99.get(&key).copied().and_then(latency),
            observed_share: 0.0,
            configured_share: None,
            key,
        });
    }
    let mut g = Graph::from_edges(window_seconds, edges);
    g.denials = denials(answers);
    g
}

/// The denials of the answers, most first.
fn denials(answers: &PerQuery<Vec<Series>>) -> Vec<DenialStats> {
    let key = |s: &Series| DenialKey {
        policy: s.label("policy").to_owned(),
        source_principal: s.label("source_principal").to_owned(),
        destination_namespace: s.label("destination_workload_namespace").to_owned(),
        destination_workload: s.label("destination_workload").to_owned(),
    };
    let last: HashMap<DenialKey, (f64, f64)> = answers
        .denials_last_seen
        .iter()
        .map(|s| (key(s), (s.value.0, s.number())))
        .collect();
    let mut out: Vec<DenialStats> = answers
        .denials
        .iter()
        .filter_map(|s| {
            let count = count(s.number()).round() as u64;
            if count == 0 {
                return None;
            }
            let key = key(s);
            let last_seen_seconds_ago = match last.get(&key) {
                Some((now, seen)) if seen.is_finite() => (now - seen).max(0.0),
                _ => 0.0,
            };
            Some(DenialStats {
                key,
                count,
                last_seen_seconds_ago,
            })
        })
        .collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A series of `labels` with `value` at t = 1000.
    fn series(labels: &[(&str, &str)], value: &str) -> Series {
        Series {
            metric: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value: (1000.0, value.to_owned()),
        }
    }

    /// The labels of the edge frontend → catalog `version`.
    fn edge(version: &str) -> Vec<(&'static str, String)> {
        vec![
            ("source_workload_namespace", "shop".into()),
            ("source_workload", "frontend".into()),
            ("source_version", "v1".into()),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/frontend".into(),
            ),
            (
                "destination_service",
                "catalog.shop.svc.cluster.local".into(),
            ),
            ("destination_version", version.into()),
            ("request_protocol", "http".into()),
            ("connection_security_policy", "mutual_tls".into()),
        ]
    }

    fn with(
        labels: &[(&'static str, String)],
        extra: &[(&'static str, &str)],
        value: &str,
    ) -> Series {
        let mut all: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(extra);
        series(&all, value)
    }

    #[test]
    fn answers_parse_and_errors_name_prometheus_message() {
        let table: Vec<(&str, Result<usize, &str>)> = vec![
            (
                r#"{"status":"success","data":{"resultType":"vector","result":[
                    {"metric":{"a":"b"},"value":[1712.5,"3"]},{"metric":{},"value":[1712.5,"NaN"]}]}}"#,
                Ok(2),
            ),
            (
                r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
                Ok(0),
            ),
            (
                r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#,
                Err("bad_data: parse error at char 5"),
            ),
            (
                r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
                Err("a matrix result"),
            ),
            (r#"{"status":"success"}"#, Err("without data")),
        ];
        for (json, want) in table {
            let answer: Answer = serde_json::from_str(json).unwrap();
            match (answer.into_vector(), want) {
                (Ok(v), Ok(n)) => assert_eq!(v.len(), n, "{json}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{e:?} lacks {w:?}"),
                (got, want) => panic!("{json}: {got:?}, expected {want:?}"),
            }
        }
        let v: Answer = serde_json::from_str(
            r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{},"value":[1,"+Inf"]},{"metric":{},"value":[1,"2.5"]}]}}"#,
        )
        .unwrap();
        let v = v.into_vector().unwrap();
        assert_eq!(v[0].number(), f64::INFINITY);
        assert_eq!(v[1].number(), 2.5);
    }

    #[test]
    fn the_queries_group_by_the_edge_and_read_the_source_reporter() {
        let q = queries(300);
        for promql in [&q.requests, &q.errors, &q.p50, &q.p99] {
            assert!(promql.contains("reporter=\"source\""), "{promql}");
            assert!(promql.contains(EDGE_LABELS), "{promql}");
            assert!(promql.contains("[300s]"), "{promql}");
        }
        assert!(q.requests.contains("instance"), "{}", q.requests);
        assert!(q.errors.contains("response_code=~\"5..\""), "{}", q.errors);
        assert!(
            q.errors.contains("grpc_response_status!~\"0|\""),
            "{}",
            q.errors
        );
        assert!(q.p99.starts_with("histogram_quantile(0.99,"), "{}", q.p99);
        assert!(q.retries.contains("proxyless_retries_total[300s]"));
        assert!(q.denials.contains("mesh_authz_denied_total[300s]"));
        let all = q.clone().into_array();
        assert_eq!(PerQuery::from_array(all), q);
    }

    /// Table: answers in, the edges' figures out.
    #[test]
    fn answers_become_the_graph_the_window_would_draw() {
        let (v1, v2) = (edge("v1"), edge("v2"));
        let answers = PerQuery {
            // v1 from two targets (two frontend pods): 200 + 160; v2: 40.
            requests: vec![
                with(&v1, &[("instance", "10.0.0.1:9090")], "200"),
                with(&v1, &[("instance", "10.0.0.2:9090")], "160.4"),
                with(&v2, &[("instance", "10.0.0.1:9090")], "39.8"),
                // No destination service: not an edge.
                series(&[("source_workload", "x")], "5"),
                // Nothing in the window: left out.
                with(&edge("v3"), &[("instance", "10.0.0.1:9090")], "0"),
            ],
            errors: vec![with(&v1, &[], "36.04")],
            p50: vec![with(&v1, &[], "7.5"), with(&v2, &[], "NaN")],
            p99: vec![with(&v1, &[], "48"), with(&v2, &[], "99")],
            retries: vec![
                series(
                    &[
                        ("instance", "10.0.0.1:9090"),
                        (
                            "cluster_name",
                            "outbound|80|v2|catalog.shop.svc.cluster.local",
                        ),
                    ],
                    "30",
                ),
                // A target with no edge to the service: nowhere to draw it.
                series(
                    &[
                        ("instance", "10.0.0.9:9090"),
                        (
                            "cluster_name",
                            "outbound|80|v1|catalog.shop.svc.cluster.local",
                        ),
                    ],
                    "99",
                ),
            ],
            denials: vec![],
            denials_last_seen: vec![],
            // v2 first seen 100 s before the evaluation (t = 1000): its
            // rate is over its age; v1 older than the window.
            first_seen: vec![with(&v1, &[], "500"), with(&v2, &[], "900")],
        };
        let g = graph(&answers, 300.0);
        assert_eq!(g.window_seconds, 300.0);
        assert_eq!(g.edges.len(), 2, "{:?}", g.edges);
        let (e1, e2) = (&g.edges[0], &g.edges[1]);
        assert_eq!(e1.key.destination_version, "v1");
        assert_eq!(e1.key.source_service_account, "frontend");
        assert_eq!(e1.key.source_namespace, "shop");
        assert!(e1.key.mtls);
        assert_eq!((e1.requests, e2.requests), (360, 40));
        assert!((e1.rps - 360.4 / 300.0).abs() < 1e-9, "{}", e1.rps);
        assert!((e1.error_rate - 0.1).abs() < 1e-9, "{}", e1.error_rate);
        assert_eq!(e2.error_rate, 0.0);
        assert!((e2.rps - 39.8 / 100.0).abs() < 1e-9, "{}", e2.rps);
        assert_eq!((e1.p50_ms, e1.p99_ms), (Some(7.5), Some(48.0)));
        assert_eq!((e2.p50_ms, e2.p99_ms), (None, Some(99.0)));
        // Retries of target 1 to catalog: its first edge in key order (v1).
        assert!((e1.retries_per_second - 0.1).abs() < 1e-9);
        assert_eq!(e2.retries_per_second, 0.0);
        // Shares and nodes as the window computes them.
        assert!((e1.observed_share - 0.9).abs() < 1e-9);
        assert!((e2.observed_share - 0.1).abs() < 1e-9);
        let ids: Vec<_> = g.nodes.iter().map(|n| (n.kind, n.id.as_str())).collect();
        assert_eq!(
            ids,
            [
                ("service", "catalog.shop.svc.cluster.local"),
                ("workload", "shop/frontend")
            ]
        );
        assert_eq!(g.nodes[0].versions, ["v1", "v2"]);
        assert!(g.denials.is_empty());
    }

    #[test]
    fn the_same_edges_as_the_window_give_the_same_nodes_and_shares() {
        use super::super::{EdgeDelta, GraphWindow, PUSH_INTERVAL, Summary, WindowConfig};
        let key = |version: &str| {
            let s = with(&edge(version), &[], "0");
            edge_key(&s).unwrap()
        };
        let mut w = GraphWindow::new(WindowConfig::default());
        let t0 = 1_000_000;
        for i in 0..10u64 {
            let edges = [("v1", 27), ("v2", 3)]
                .into_iter()
                .map(|(v, n)| EdgeDelta {
                    key: key(v),
                    requests: n,
                    errors: 0,
                    retries: 0,
                    latency_ms: vec![],
                })
                .collect();
            w.record(
                &Summary {
                    interval_ms: PUSH_INTERVAL,
                    edges,
                    denials: vec![],
                },
                t0 + i * PUSH_INTERVAL,
            );
        }
        let window = w.graph(t0 + 9 * PUSH_INTERVAL);
        let answers = PerQuery {
            requests: vec![with(&edge("v1"), &[], "270"), with(&edge("v2"), &[], "30")],
            ..PerQuery::default()
        };
        let prom = graph(&answers, 300.0);
        assert_eq!(prom.nodes, window.nodes);
        let view = |g: &Graph| -> Vec<(EdgeKey, u64, f64)> {
            g.edges
                .iter()
                .map(|e| (e.key.clone(), e.requests, e.observed_share))
                .collect()
        };
        assert_eq!(view(&prom), view(&window));
    }

    #[test]
    fn denials_are_counted_most_first_and_absent_is_empty() {
        let d = |policy: &str, workload: &str| {
            series(
                &[
                    ("policy", policy),
                    (
                        "source_principal",
                        "spiffe://cluster.local/ns/shop/sa/intruder",
                    ),
                    ("destination_workload", workload),
                    ("destination_workload_namespace", "shop"),
                ],
                "0",
            )
        };
        let at = |mut s: Series, value: &str| {
            s.value.1 = value.to_owned();
            s
        };
        let answers = PerQuery {
            denials: vec![
                at(d("shop/deny-intruder", "catalog-v1"), "12"),
                at(d("", "payment-v1"), "30.2"),
                at(d("shop/deny-intruder", "catalog-v2"), "0"),
            ],
            denials_last_seen: vec![Series {
                value: (1000.0, "940".into()),
                ..d("shop/deny-intruder", "catalog-v1")
            }],
            ..PerQuery::default()
        };
        let g = graph(&answers, 300.0);
        let got: Vec<_> = g
            .denials
            .iter()
            .map(|s| {
                (
                    s.key.policy.as_str(),
                    s.key.destination_workload.as_str(),
                    s.count,
                    s.last_seen_seconds_ago,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("", "payment-v1", 30, 0.0),
                ("shop/deny-intruder", "catalog-v1", 12, 60.0)
            ]
        );
        assert_eq!(
            g.denials[0].key.source_principal,
            "spiffe://cluster.local/ns/shop/sa/intruder"
        );
        // No denial counter at all (a mesh without it): no denials, no error.
        assert!(graph(&PerQuery::default(), 300.0).denials.is_empty());
    }

    #[test]
    fn service_accounts_come_from_spiffe_ids() {
        for (principal, sa) in [
            ("spiffe://cluster.local/ns/shop/sa/frontend", "frontend"),
            ("unknown", ""),
            ("", ""),
            ("spiffe://cluster.local/ns/shop", ""),
        ] {
            assert_eq!(service_account(principal), sa, "{principal}");
        }
    }
}
