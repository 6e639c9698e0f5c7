//! The workload's side of the service graph (issue 17): every 5 s, what
//! this workload sent since the previous time, per edge, pushed to
//! mesh-control's `POST /v1/graph/summaries` ([`mesh_core::graph`] says
//! why push, why deltas, and what the message holds).
//!
//! Nothing here is on the request path: a background task reads the
//! [`MetricsRegistry`] the requests already count into (Istio's
//! `istio_requests_total` and `istio_request_duration_milliseconds` with
//! `reporter="source"`, and `proxyless_retries_total`), as a scrape of
//! `/metrics` would, sums its series per edge, and sends the difference
//! with the previous read ([`mesh_core::graph::Differ`]). Its cost is one
//! render of the registry every 5 s.
//!
//! It speaks to the admin API with the client and credentials of the
//! workload's [`Registration`] (https verified with the control plane's
//! CA, and the join token), so mesh-control attributes the edges to the
//! workload's identity: the [`GraphSource`] must be that identity's
//! namespace and service account, or every summary is refused (403).
//!
//! Retries are counted per cluster, not per edge: a destination service's
//! retries are reported on one of its edges (the first in key order).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use mesh_core::graph::{BUCKETS, DURATION_BUCKETS_MS, Differ, EdgeKey, EdgeTotals, PUSH_INTERVAL};

use super::metrics::MetricsRegistry;
use crate::error::Error;
use crate::serve::Registration;
use crate::tls::AdminClient;

/// Who this workload is, as its summaries name it: the namespace and
/// service account of the identity it authenticates with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphSource {
    namespace: String,
    service_account: String,
}

impl GraphSource {
    /// The identity `namespace` / `service_account` (its join token's).
    pub fn new(namespace: impl Into<String>, service_account: impl Into<String>) -> Self {
        GraphSource {
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
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
    /// Starts pushing this registry's outbound edges to mesh-control's
    /// admin API (the one `registration` registers with, with its
    /// credentials) every 5 s, as `source`. Must run inside a tokio
    /// runtime. A failed push is logged and the next one carries its
    /// requests too (the deltas are taken from what was sent).
    pub fn push_graph(
        &self,
        registration: &Registration,
        source: GraphSource,
    ) -> Result<GraphPush, Error> {
        let client = crate::serve::Admin::new(registration.admin())?
            .client()
            .clone();
        Ok(self.push_graph_to(client, source, Duration::from_millis(PUSH_INTERVAL)))
    }

    fn push_graph_to(
        &self,
        client: AdminClient,
        source: GraphSource,
        every: Duration,
    ) -> GraphPush {
        let registry = self.clone();
        let task = tokio::spawn(async move {
            let mut differ = Differ::default();
            let mut last = Instant::now();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let totals = edge_totals(&registry.render(), &source);
                let interval_ms = u64::try_from(last.elapsed().as_millis()).unwrap_or(u64::MAX);
                // Diff against what was last *sent*: a failed push keeps
                // its differ, so the next one carries those requests too.
                let mut attempt = differ.clone();
                let summary = attempt.diff(totals, interval_ms);
                if summary.edges.is_empty() {
                    differ = attempt;
                    last = Instant::now();
                    continue;
                }
                let body = match serde_json::to_value(&summary) {
                    Ok(body) => body,
                    Err(e) => {
                        tracing::warn!(error = %e, "graph summary: not encodable");
                        continue;
                    }
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
    if label(labels, "reporter") != "source" {
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
        mtls: label(labels, "connection_security_policy") == "mutual_tls",
    })
}

/// Every outbound edge's totals in the rendered registry `text`.
fn edge_totals(text: &str, source: &GraphSource) -> HashMap<EdgeKey, EdgeTotals> {
    let mut edges: BTreeMap<EdgeKey, EdgeTotals> = BTreeMap::new();
    let mut retries: HashMap<String, u64> = HashMap::new();
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
                *retries.entry(host.to_owned()).or_default() += value;
            }
            _ => {}
        }
    }
    for (host, n) in retries {
        if let Some((_, e)) = edges
            .iter_mut()
            .find(|(k, _)| k.destination_service == host)
        {
            e.retries = n;
        }
    }
    edges.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::super::flags::ResponseFlags;
    use super::super::metrics::{Observation, Reporter, RequestProtocol, Security};
    use super::*;
    use crate::error::ErrorKind;

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
        let totals = edge_totals(&registry.render(), &source);
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
        let second = differ.diff(edge_totals(&registry.render(), &source), 5_000);
        assert_eq!(second.edges.len(), 1, "{second:?}");
        assert_eq!(second.edges[0].requests, 2);
        assert_eq!(second.edges[0].latency_ms, [2]);
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
