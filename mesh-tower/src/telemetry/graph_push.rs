//! The workload's side of the service graph (issue 17): every 5 s, what
//! this workload sent since the previous time, per edge, pushed to
//! mesh-control's `POST /v1/graph/summaries` ([`mesh_core::graph`] says
//! why push, why deltas, and what the message holds).
//!
//! Nothing here is on the request path: a background task reads the
//! [`MetricsRegistry`] the requests already count into (Istio's
//! `istio_requests_total` and `istio_request_duration_milliseconds` with
//! `reporter="source"`, and `proxyless_retries_total`) with the meaning a
//! scrape of `/metrics` would give them, sums its series per edge, and
//! sends the difference with the previous read
//! ([`mesh_core::graph::Differ`]).
//!
//! The Istio series are read from the registry's series cache (their
//! counters and bucket counts, labels as the interned peers and services
//! they are rendered from), not from the rendered text: rendering every
//! family (25 labels per series, 20 buckets per histogram, three
//! histograms) and parsing it back cost about 3.7 M instructions per edge;
//! the direct read costs about 14,000 (the bench row `graph/push-100`, a
//! push of 100 edges with its diff and JSON: 4.2 M instead of 372 M).
//! Retries and denials are read by encoding their two small families
//! alone. When the series
//! cache is full (more than `SERIES_CACHE_LIMIT` series), new series are
//! kept in the families only, and the push falls back to rendering the
//! whole registry and parsing it (`read_totals`, the reference the direct
//! read is tested against).
//!
//! It speaks to the admin API with the client and credentials of the
//! workload's [`Registration`](crate::serve::Registration) (https verified
//! with the control plane's CA, and the join token), so mesh-control
//! attributes the edges to the workload's identity: the [`GraphSource`]
//! must be that identity's namespace and service account, or every summary
//! is refused (403).
//!
//! Retries are counted per cluster, not per edge: a destination service's
//! retries are reported on one of its edges (the first in key order).
//!
//! The same read takes the requests this workload's authorization denied
//! (`mesh_authz_denied_total`, counted by the server telemetry, labelled
//! with the denying workload as the server knows itself), diffed the same
//! way into the summary's `denials`: the "recent authorization denials"
//! of the graph page. Only the denials of the source's own namespace are
//! sent (mesh-control refuses a summary naming another one).
//!
//! Several workloads of one process may share one registry (the shop demo
//! does): each push then reads every workload's series. Name the workload
//! ([`GraphSource::workload`]) to send only its own edges and denials, or
//! they are counted once per push.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use mesh_core::graph::{BUCKETS, DURATION_BUCKETS_MS, DenialKey, Differ, EdgeKey, EdgeTotals};

use super::metrics::{MetricsRegistry, Reporter, RequestProtocol, Security};
use crate::tls::AdminClient;

/// Who this workload is, as its summaries name it: the namespace and
/// service account of the identity it authenticates with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphSource {
    namespace: String,
    service_account: String,
    /// Only this workload's series, when set.
    workload: Option<String>,
}

impl GraphSource {
    /// The identity `namespace` / `service_account` (its join token's).
    pub fn new(namespace: impl Into<String>, service_account: impl Into<String>) -> Self {
        GraphSource {
            namespace: namespace.into(),
            service_account: service_account.into(),
            workload: None,
        }
    }

    /// Sends only the series of the workload named `workload` (its
    /// telemetry [`Identity`](super::Identity)'s workload name): its
    /// outbound edges (`source_workload`) and its denials
    /// (`destination_workload`). For a registry shared by several
    /// workloads, each pushing its own; without it every series is sent.
    pub fn workload(mut self, workload: impl Into<String>) -> Self {
        self.workload = Some(workload.into());
        self
    }

    /// Whether a series of `workload` is this source's to send.
    fn owns(&self, workload: &str) -> bool {
        self.workload.as_deref().is_none_or(|w| w == workload)
    }
}

/// The running push task; dropping it stops the task.
#[derive(Debug)]
pub struct GraphPush {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GraphPush {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MetricsRegistry {
    /// The push loop of [`MetricsRegistry::push_graph`] (written in
    /// `serve/registration.rs`, beside the [`crate::serve::Registration`]
    /// it takes: telemetry sits below `serve` and does not import it).
    pub(crate) fn push_graph_to(
        &self,
        client: AdminClient,
        source: GraphSource,
        every: Duration,
    ) -> GraphPush {
        let registry = self.clone();
        let task = tokio::spawn(async move {
            let mut differ = Differ::default();
            let mut last = Instant::now();
            // The first push after 0.5 to 1.5 intervals, at random: workloads
            // started together (a deployment's replicas, the demo's
            // services) do not all push at once.
            let first = every.mul_f64(rand::random_range(0.5..1.5));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let interval_ms = u64::try_from(last.elapsed().as_millis()).unwrap_or(u64::MAX);
                // Diff against what was last *sent*: a failed push keeps
                // its differ, so the next one carries those requests too.
                let mut attempt = differ.clone();
                let Some(body) = registry.graph_summary_body(&source, &mut attempt, interval_ms)
                else {
                    differ = attempt;
                    last = Instant::now();
                    continue;
                };
                match client
                    .call(Method::POST, "/v1/graph/summaries", Some(&body))
                    .await
                {
                    Ok((status, _)) if status.is_success() => {
                        differ = attempt;
                        last = Instant::now();
                    }
                    Ok((status, reply)) if status == StatusCode::TOO_MANY_REQUESTS => {
                        tracing::debug!(
                            error = %client.refused("POST /v1/graph/summaries", status, &reply),
                            "graph summary deferred"
                        );
                        // Another workload of this identity sent one within
                        // the gate's second: move this one's phase by 1 to
                        // 2.5 s and send then (two pushers on one phase would
                        // collide on every tick).
                        let shift = Duration::from_millis(rand::random_range(1_000..2_500));
                        tokio::time::sleep(shift).await;
                        tick.reset_immediately();
                    }
                    Ok((status, reply)) => {
                        // Refused (403, 400): sending it again will not
                        // help; drop these deltas.
                        tracing::warn!(
                            error = %client.refused("POST /v1/graph/summaries", status, &reply),
                            "graph summary refused"
                        );
                        differ = attempt;
                        last = Instant::now();
                    }
                    Err(e) => tracing::debug!(error = %e, "graph summary not sent"),
                }
            }
        });
        GraphPush { task }
    }
}

impl MetricsRegistry {
    /// One push's work short of sending it: the registry read as edges and
    /// denials, their change since `differ`'s previous read (which it
    /// remembers), as the JSON body of `POST /v1/graph/summaries`; `None`
    /// when neither changed. The push task calls it every 5 s; `benches/instructions.rs`
    /// counts its instructions (row `graph/push-100`).
    #[doc(hidden)]
    pub fn graph_summary_body(
        &self,
        source: &GraphSource,
        differ: &mut Differ,
        interval_ms: u64,
    ) -> Option<serde_json::Value> {
        let (totals, denials) = read_registry(self, source);
        let mut summary = differ.diff(totals, interval_ms);
        summary.denials = differ.diff_denials(denials);
        if summary.edges.is_empty() && summary.denials.is_empty() {
            return None;
        }
        serde_json::to_value(&summary)
            .map_err(|e| tracing::warn!(error = %e, "graph summary: not encodable"))
            .ok()
    }
}

/// A line's labels: name and (unescaped) value.
type Labels<'a> = Vec<(&'a str, String)>;

/// One Prometheus text line: the metric's name, its labels, its value.
fn parse_line(line: &str) -> Option<(&str, Labels<'_>, f64)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (name, rest) = match line.find('{') {
        Some(open) => (&line[..open], &line[open + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some((name, Vec::new(), value.trim().parse().ok()?));
        }
    };
    let mut labels = Vec::new();
    let mut rest = rest;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            let value = after.split_whitespace().next()?.parse().ok()?;
            return Some((name, labels, value));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key, value));
        rest = &after[end + 1..];
    }
}

/// The label `name` of a parsed line (`""` when absent).
fn label<'a>(labels: &'a [(&str, String)], name: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| *k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// The edge of a `reporter="source"` series.
fn edge_of(labels: &[(&str, String)], source: &GraphSource) -> Option<EdgeKey> {
    if label(labels, "reporter") != "source" || !source.owns(label(labels, "source_workload")) {
        return None;
    }
    let protocol = match label(labels, "request_protocol") {
        p @ ("http" | "grpc" | "tcp") => p,
        _ => "http",
    };
    Some(EdgeKey {
        source_namespace: source.namespace.clone(),
        source_service_account: source.service_account.clone(),
        source_workload: label(labels, "source_workload").to_owned(),
        source_version: label(labels, "source_version").to_owned(),
        destination_service: label(labels, "destination_service").to_owned(),
        destination_version: label(labels, "destination_version").to_owned(),
        protocol: protocol.to_owned(),
        // The source reporter's connection_security_policy is `unknown`
        // (as Istio's); a destination principal is only known when the
        // client verified the server's certificate, i.e. over mutual TLS.
        mtls: label(labels, "connection_security_policy") == "mutual_tls"
            || label(labels, "destination_principal").starts_with("spiffe://"),
    })
}

/// The denial of a `mesh_authz_denied_total` series, if it is the
/// source's: of its namespace (and of its workload, when named).
fn denial_of(labels: &[(&str, String)], source: &GraphSource) -> Option<DenialKey> {
    let namespace = label(labels, "destination_workload_namespace");
    let workload = label(labels, "destination_workload");
    if namespace != source.namespace || workload.is_empty() || !source.owns(workload) {
        return None;
    }
    Some(DenialKey {
        policy: label(labels, "policy").to_owned(),
        source_principal: label(labels, "source_principal").to_owned(),
        destination_namespace: namespace.to_owned(),
        destination_workload: workload.to_owned(),
    })
}

/// What one push read: edges, denials, and retries per destination host
/// (not yet put on an edge).
#[derive(Default)]
struct Reading {
    edges: BTreeMap<EdgeKey, EdgeTotals>,
    denials: HashMap<DenialKey, u64>,
    retries: HashMap<String, u64>,
}

impl Reading {
    /// Every edge's totals and every denial's total: each destination
    /// service's retries go on its first edge in key order.
    fn finish(self) -> (HashMap<EdgeKey, EdgeTotals>, HashMap<DenialKey, u64>) {
        let Reading {
            edges,
            denials,
            mut retries,
        } = self;
        let edges = edges
            .into_iter()
            .map(|(key, mut e)| {
                // In key order: the first edge of a host takes its retries.
                if let Some(n) = retries.remove(&key.destination_service) {
                    e.retries = n;
                }
                (key, e)
            })
            .collect();
        (edges, denials)
    }
}

/// Every outbound edge's totals and every denial's total in the rendered
/// registry `text`, in one pass: the reference semantics (a scrape's
/// view), and the read when the series cache is full.
fn read_totals(
    text: &str,
    source: &GraphSource,
) -> (HashMap<EdgeKey, EdgeTotals>, HashMap<DenialKey, u64>) {
    let mut reading = Reading::default();
    read_text(text, source, &mut reading);
    reading.finish()
}

/// The same totals read from the registry's objects: the Istio series from
/// the series cache ([`read_series`]), retries and denials from their two
/// families alone. Falls back to [`read_totals`] over the whole rendered
/// registry when the cache is full (some series are then in the families
/// only).
fn read_registry(
    registry: &MetricsRegistry,
    source: &GraphSource,
) -> (HashMap<EdgeKey, EdgeTotals>, HashMap<DenialKey, u64>) {
    let mut reading = Reading::default();
    if !read_series(registry, source, &mut reading) {
        return read_totals(&registry.render(), source);
    }
    read_text(
        &registry.mesh().render_graph_families(),
        source,
        &mut reading,
    );
    reading.finish()
}

/// The edges of the cached Istio series into `reading`, as [`read_text`]
/// reads their rendered lines; `false` (and nothing read) when the cache
/// is full.
fn read_series(registry: &MetricsRegistry, source: &GraphSource, reading: &mut Reading) -> bool {
    /// An edge by the addresses of its interned labels: series of one edge
    /// (differing in response code, principal, flags) share them, so most
    /// series add to an edge without building its strings.
    type ByAddress = (usize, usize, usize, RequestProtocol, bool);
    let mut by_address: HashMap<ByAddress, (EdgeKey, EdgeTotals)> = HashMap::new();
    let complete = registry.istio().for_each_series(|s| {
        if s.reporter != Reporter::Source || !source.owns(&s.source.workload) {
            return;
        }
        // As `edge_of`: the source reporter's policy is `unknown`, a
        // verified server certificate's principal means mutual TLS.
        let mtls = s.security == Security::MutualTls
            || s.destination_principal
                .is_some_and(|p| p.starts_with("spiffe://"));
        let address = (
            std::ptr::from_ref(s.source) as usize,
            std::ptr::from_ref(s.destination) as usize,
            std::ptr::from_ref(s.service) as usize,
            s.protocol,
            mtls,
        );
        let (_, e) = by_address.entry(address).or_insert_with(|| {
            let key = EdgeKey {
                source_namespace: source.namespace.clone(),
                source_service_account: source.service_account.clone(),
                source_workload: s.source.workload.to_string(),
                source_version: s.source.version.to_string(),
                destination_service: s.service.host.to_string(),
                destination_version: s.destination.version.to_string(),
                protocol: match s.protocol {
                    RequestProtocol::Http => "http",
                    RequestProtocol::Grpc => "grpc",
                }
                .to_owned(),
                mtls,
            };
            (key, EdgeTotals::default())
        });
        // As `read_totals`: 5xx, or a gRPC status other than OK.
        let error = s.response_code >= 500 || s.grpc_status.is_some_and(|c| c != 0);
        add_series(e, s.requests, error, s.duration.bucket_counts());
    });
    if !complete {
        return false;
    }
    // Peers interned apart (a header's and an endpoint's) may carry the
    // same labels: one edge.
    for (key, totals) in by_address.into_values() {
        let e = reading.edges.entry(key).or_default();
        add_series(e, totals.requests, false, totals.latency_ms.into_iter());
        e.errors = e.errors.saturating_add(totals.errors);
    }
    true
}

/// Adds one series' requests and (non-cumulative) duration buckets to an
/// edge's totals.
fn add_series(e: &mut EdgeTotals, requests: u64, error: bool, buckets: impl Iterator<Item = u64>) {
    e.requests = e.requests.saturating_add(requests);
    if error {
        e.errors = e.errors.saturating_add(requests);
    }
    if e.latency_ms.len() < BUCKETS {
        e.latency_ms.resize(BUCKETS, 0);
    }
    for (total, n) in e.latency_ms.iter_mut().zip(buckets) {
        *total = total.saturating_add(n);
    }
}

/// The edges, retries and denials of the rendered `text` into `reading`.
fn read_text(text: &str, source: &GraphSource, reading: &mut Reading) {
    let Reading {
        edges,
        denials,
        retries,
    } = reading;
    // The cumulative count of the previous bucket of the series being read.
    let mut previous = 0u64;
    for line in text.lines() {
        let Some((name, labels, value)) = parse_line(line) else {
            continue;
        };
        let value = if value.is_finite() && value > 0.0 {
            value as u64
        } else {
            0
        };
        match name {
            "istio_requests_total" => {
                let Some(key) = edge_of(&labels, source) else {
                    continue;
                };
                let code: u16 = label(&labels, "response_code").parse().unwrap_or(0);
                let grpc = label(&labels, "grpc_response_status");
                let error = code >= 500 || !(grpc.is_empty() || grpc == "0");
                let e = edges.entry(key).or_default();
                e.requests = e.requests.saturating_add(value);
                if error {
                    e.errors = e.errors.saturating_add(value);
                }
            }
            "istio_request_duration_milliseconds_bucket" => {
                let Some(key) = edge_of(&labels, source) else {
                    continue;
                };
                let le = label(&labels, "le");
                let index = if le == "+Inf" {
                    DURATION_BUCKETS_MS.len()
                } else {
                    let Ok(bound) = le.parse::<f64>() else {
                        continue;
                    };
                    match DURATION_BUCKETS_MS.iter().position(|b| *b == bound) {
                        Some(i) => i,
                        None => continue,
                    }
                };
                if index == 0 {
                    previous = 0;
                }
                let count = value.saturating_sub(previous);
                previous = value;
                let e = edges.entry(key).or_default();
                if e.latency_ms.len() < BUCKETS {
                    e.latency_ms.resize(BUCKETS, 0);
                }
                e.latency_ms[index] = e.latency_ms[index].saturating_add(count);
            }
            "proxyless_retries_total" => {
                let cluster = label(&labels, "cluster_name");
                let host = cluster.rsplit('|').next().unwrap_or(cluster);
                let n = retries.entry(host.to_owned()).or_default();
                *n = n.saturating_add(value);
            }
            "mesh_authz_denied_total" => {
                if let Some(key) = denial_of(&labels, source) {
                    let n = denials.entry(key).or_default();
                    *n = n.saturating_add(value);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::super::flags::ResponseFlags;
    use super::super::metrics::{Observation, Reporter, RequestProtocol, Security};
    use super::*;
    use crate::error::ErrorKind;
    use mesh_core::model::Name;

    /// Counts `n` requests of `registry` to `host` as the client stack does.
    fn count(registry: &MetricsRegistry, host: &str, n: usize, code: u16, ms: f64) {
        let istio = registry.istio();
        let service = istio.service_of_host(host);
        for _ in 0..n {
            istio.observe(&Observation {
                reporter: Reporter::Source,
                source: istio.unknown_peer(),
                source_principal: None,
                destination: istio.unknown_peer(),
                destination_principal: None,
                service: &service,
                protocol: RequestProtocol::Http,
                response_code: code,
                grpc_status: None,
                flags: ResponseFlags::empty(),
                security: Security::MutualTls,
                duration_ms: ms,
                request_bytes: 0,
                response_bytes: 0,
            });
        }
    }

    #[test]
    fn the_registry_reads_as_edges() {
        let registry = MetricsRegistry::new();
        count(&registry, "reviews.shop.svc.cluster.local", 9, 200, 7.0);
        count(&registry, "reviews.shop.svc.cluster.local", 1, 503, 70.0);
        count(&registry, "ratings.shop.svc.cluster.local", 4, 200, 0.2);
        let source = GraphSource::new("shop", "productpage");
        let totals = read_totals(&registry.render(), &source).0;
        assert_eq!(totals.len(), 2, "{totals:?}");
        let reviews = totals
            .iter()
            .find(|(k, _)| k.destination_service == "reviews.shop.svc.cluster.local")
            .unwrap();
        assert_eq!(reviews.0.source_namespace, "shop");
        assert_eq!(reviews.0.source_service_account, "productpage");
        assert!(reviews.0.mtls);
        assert_eq!(reviews.1.requests, 10);
        assert_eq!(reviews.1.errors, 1);
        // 9 in (5, 10], 1 in (50, 100].
        assert_eq!(reviews.1.latency_ms[3], 9);
        assert_eq!(reviews.1.latency_ms[6], 1);
        assert_eq!(reviews.1.latency_ms.iter().sum::<u64>(), 10);
        let mut differ = Differ::default();
        let first = differ.diff(totals, 5_000);
        assert_eq!(first.edges.len(), 2);
        count(&registry, "ratings.shop.svc.cluster.local", 2, 200, 0.2);
        let second = differ.diff(read_totals(&registry.render(), &source).0, 5_000);
        assert_eq!(second.edges.len(), 1, "{second:?}");
        assert_eq!(second.edges[0].requests, 2);
        assert_eq!(second.edges[0].latency_ms, [2]);
    }

    /// Denials counted as the server telemetry counts them read as the
    /// summary's `denials`: this namespace's only, diffed, and a summary
    /// with denials but no edges is still sent.
    #[test]
    fn denials_are_read_diffed_and_sent_without_edges() {
        let registry = MetricsRegistry::new();
        let catalog = super::super::Identity::new("catalog", "shop")
            .with_workload("catalog-v1")
            .peer();
        let elsewhere = super::super::Identity::new("vault", "admin").peer();
        let deny_x: Name = "shop/deny-x".into();
        let intruder: Name = "spiffe://cluster.local/ns/shop/sa/intruder".into();
        let mesh = registry.mesh();
        for _ in 0..3 {
            mesh.denied(Some(&deny_x), Some(&intruder), &catalog);
        }
        mesh.denied(None, None, &catalog);
        mesh.denied(Some(&deny_x), Some(&intruder), &elsewhere);
        let text = registry.render();
        assert!(
            text.lines().any(|l| l
                == "mesh_authz_denied_total{policy=\"shop/deny-x\",\
                    source_principal=\"spiffe://cluster.local/ns/shop/sa/intruder\",\
                    destination_workload=\"catalog-v1\",destination_workload_namespace=\"shop\"} 3"),
            "{text}"
        );

        let source = GraphSource::new("shop", "catalog");
        let mut differ = Differ::default();
        let body = registry
            .graph_summary_body(&source, &mut differ, 5_000)
            .expect("denials are news");
        assert_eq!(
            body,
            serde_json::json!({
                "interval_ms": 5_000,
                "edges": [],
                "denials": [
                    {"policy": "", "source_principal": "", "destination_namespace": "shop",
                     "destination_workload": "catalog-v1", "count": 1},
                    {"policy": "shop/deny-x", "source_principal": intruder.as_ref(),
                     "destination_namespace": "shop", "destination_workload": "catalog-v1",
                     "count": 3},
                ],
            })
        );
        // Nothing new: nothing sent.
        assert_eq!(
            registry.graph_summary_body(&source, &mut differ, 5_000),
            None
        );
        mesh.denied(Some(&deny_x), Some(&intruder), &catalog);
        let body = registry
            .graph_summary_body(&source, &mut differ, 5_000)
            .expect("one more denial");
        assert_eq!(body["denials"].as_array().map(Vec::len), Some(1), "{body}");
        assert_eq!(body["denials"][0]["count"], 1, "{body}");

        // A source naming another workload of the registry sends none of
        // catalog-v1's.
        let other = GraphSource::new("shop", "catalog").workload("catalog-v2");
        assert_eq!(
            registry.graph_summary_body(&other, &mut Differ::default(), 5_000),
            None
        );
    }

    /// One request of `registry` as a layer reports it.
    #[allow(clippy::too_many_arguments)]
    fn one(
        registry: &MetricsRegistry,
        reporter: Reporter,
        from: &Arc<super::super::identity::Peer>,
        to: &Arc<super::super::identity::Peer>,
        host: &str,
        protocol: RequestProtocol,
        (code, grpc): (u16, Option<u16>),
        (security, principal): (Security, Option<&Name>),
        ms: f64,
    ) {
        let istio = registry.istio();
        istio.observe(&Observation {
            reporter,
            source: from,
            source_principal: None,
            destination: to,
            destination_principal: principal,
            service: &istio.service_of_host(host),
            protocol,
            response_code: code,
            grpc_status: grpc,
            flags: ResponseFlags::empty(),
            security,
            duration_ms: ms,
            request_bytes: 0,
            response_bytes: 0,
        });
    }

    /// The direct read of the series cache gives exactly the totals of the
    /// text a scrape sees (the reference semantics): errors (5xx, gRPC
    /// non-OK), mTLS (policy or a verified server principal), protocols,
    /// latency buckets, two peers with one set of labels as one edge,
    /// destination-reported series left out, retries on the destination's
    /// first edge, denials, and a named workload's series only.
    #[test]
    fn the_series_cache_reads_as_the_rendered_text() {
        use super::super::{DecisionRecord, Identity};
        use mesh_core::model::{LbPolicy, RetryOn};
        let registry = MetricsRegistry::new();
        let peer = |workload: &str, version: &str| {
            Arc::new(
                Identity::new(workload, "shop")
                    .with_workload(workload)
                    .with_version(version)
                    .peer(),
            )
        };
        let page = peer("productpage-v1", "v1");
        let other = peer("reviews-v2", "v2");
        // Two interned peers, one set of labels.
        let (reviews, reviews_again) = (peer("reviews-v1", "v1"), peer("reviews-v1", "v1"));
        let ratings = peer("ratings-v1", "v1");
        let spiffe: Name = "spiffe://cluster.local/ns/shop/sa/reviews".into();
        let (http, grpc) = (RequestProtocol::Http, RequestProtocol::Grpc);
        let src = Reporter::Source;
        let reviews_host = "reviews.shop.svc.cluster.local";
        let ratings_host = "ratings.shop.svc.cluster.local";
        let mtls = (Security::MutualTls, None);
        let verified = (Security::Unknown, Some(&spiffe));
        let plain = (Security::None, None);
        for (i, ms) in [0.3, 0.7, 3.0, 7.0, 60.0, 2e4, 1e7].into_iter().enumerate() {
            let code = if i % 3 == 0 { 503 } else { 200 };
            let dst = Reporter::Destination;
            for (reporter, from, to, host, protocol, status, security) in [
                (src, &page, &reviews, reviews_host, http, (code, None), mtls),
                (
                    src,
                    &page,
                    &reviews_again,
                    reviews_host,
                    http,
                    (404, None),
                    mtls,
                ),
                (
                    src,
                    &page,
                    &reviews,
                    reviews_host,
                    http,
                    (200, None),
                    verified,
                ),
                (
                    src,
                    &page,
                    &ratings,
                    ratings_host,
                    grpc,
                    (200, Some(0)),
                    plain,
                ),
                (
                    src,
                    &page,
                    &ratings,
                    ratings_host,
                    grpc,
                    (200, Some(14)),
                    plain,
                ),
                (src, &other, &ratings, ratings_host, http, (500, None), mtls),
                (dst, &page, &reviews, reviews_host, http, (200, None), mtls),
            ] {
                one(
                    &registry, reporter, from, to, host, protocol, status, security, ms,
                );
            }
        }
        let cluster: Name = format!("outbound|9080||{reviews_host}").into();
        let record = DecisionRecord::new();
        record.cluster(&cluster, LbPolicy::Random);
        record.retrying(RetryOn::CONNECT_FAILURE, Duration::ZERO);
        record.retrying(RetryOn::CONNECT_FAILURE, Duration::ZERO);
        registry
            .mesh()
            .client_request(&cluster, &record, ResponseFlags::empty());
        let deny: Name = "shop/deny-x".into();
        registry.mesh().denied(Some(&deny), Some(&spiffe), &page);
        registry.mesh().denied(None, None, &other);

        for source in [
            GraphSource::new("shop", "productpage"),
            GraphSource::new("shop", "productpage").workload("productpage-v1"),
            GraphSource::new("shop", "reviews").workload("reviews-v2"),
        ] {
            let direct = read_registry(&registry, &source);
            let text = read_totals(&registry.render(), &source);
            assert_eq!(direct, text, "{source:?}");
        }
        let (edges, denials) = read_registry(&registry, &GraphSource::new("shop", "productpage"));
        // reviews: mTLS (two peers and a verified principal: one edge);
        // ratings: gRPC with and without an error; reviews-v2's ratings.
        assert_eq!(edges.len(), 3, "{edges:?}");
        assert_eq!(denials.len(), 2, "{denials:?}");
        let reviews = edges
            .iter()
            .find(|(k, _)| k.destination_service == reviews_host)
            .unwrap();
        assert!(reviews.0.mtls);
        assert_eq!(reviews.0.source_version, "v1");
        assert_eq!(reviews.1.requests, 21);
        assert_eq!(reviews.1.errors, 3);
        assert_eq!(reviews.1.retries, 2);
        assert_eq!(reviews.1.latency_ms[0], 3, "{:?}", reviews.1.latency_ms);
        assert_eq!(reviews.1.latency_ms[BUCKETS - 1], 3);
        let ratings = edges
            .iter()
            .find(|(k, _)| k.source_workload == "productpage-v1" && k.protocol == "grpc")
            .unwrap();
        assert!(!ratings.0.mtls);
        assert_eq!((ratings.1.requests, ratings.1.errors), (14, 7));
    }

    /// With the series cache full, new series are in the families only: the
    /// push then reads the rendered registry and still counts them.
    #[test]
    fn a_full_series_cache_falls_back_to_the_text() {
        let registry = MetricsRegistry::new();
        let istio = registry.istio();
        let limit = u16::try_from(super::super::metrics::SERIES_CACHE_LIMIT).unwrap();
        // One series per response code, beyond the cache's bound.
        for code in 1000..1000 + limit + 5 {
            one(
                &registry,
                Reporter::Source,
                istio.unknown_peer(),
                istio.unknown_peer(),
                "reviews.shop.svc.cluster.local",
                RequestProtocol::Http,
                (code, None),
                (Security::MutualTls, None),
                1.0,
            );
        }
        let source = GraphSource::new("shop", "productpage");
        let (edges, _) = read_registry(&registry, &source);
        assert_eq!(edges, read_totals(&registry.render(), &source).0);
        let total: u64 = edges.values().map(|e| e.requests).sum();
        assert_eq!(total, u64::from(limit) + 5, "every request, cached or not");
    }

    #[test]
    fn label_values_are_unescaped() {
        let (name, labels, value) =
            parse_line(r#"m_total{a="x\"y",b="c\\d\ne",le="+Inf"} 42"#).unwrap();
        assert_eq!(name, "m_total");
        assert_eq!(label(&labels, "a"), "x\"y");
        assert_eq!(label(&labels, "b"), "c\\d\ne");
        assert_eq!(value, 42.0);
        assert_eq!(parse_line("# HELP x y"), None);
        assert_eq!(parse_line("m{a=\"unterminated} 1"), None);
    }

    /// The task pushes over real HTTP, as the admin client does, only what
    /// is new.
    #[tokio::test]
    async fn the_task_pushes_deltas_to_the_admin_api() {
        let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let app = axum::Router::new().route(
            "/v1/graph/summaries",
            axum::routing::post({
                let seen = seen.clone();
                move |axum::Json(body): axum::Json<serde_json::Value>| async move {
                    seen.lock().unwrap().push(body);
                    StatusCode::ACCEPTED
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let registry = MetricsRegistry::new();
        count(&registry, "reviews.shop.svc.cluster.local", 5, 200, 7.0);
        let client =
            AdminClient::new(&addr.to_string(), None, None, ErrorKind::Registration).unwrap();
        let push = registry.push_graph_to(
            client,
            GraphSource::new("shop", "productpage"),
            Duration::from_millis(100),
        );
        let wait_for = |n: usize| {
            let seen = seen.clone();
            async move {
                for _ in 0..100 {
                    if seen.lock().unwrap().len() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("no summary {n} pushed");
            }
        };
        wait_for(1).await;
        count(&registry, "reviews.shop.svc.cluster.local", 3, 200, 7.0);
        wait_for(2).await;
        drop(push);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0]["edges"][0]["requests"], 5, "{seen:?}");
        assert_eq!(seen[0]["edges"][0]["source_service_account"], "productpage");
        assert_eq!(seen[1]["edges"][0]["requests"], 3, "{seen:?}");
        assert!(seen[1]["interval_ms"].as_u64().unwrap() >= 90, "{seen:?}");
    }
}
