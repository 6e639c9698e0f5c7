//! The service graph's admin endpoints (issue 17's data path):
//! `POST /v1/graph/summaries` takes a workload's [`Summary`] and
//! `GET /v1/graph` answers the graph over the last five minutes.
//!
//! A summary is authenticated as a registration is (a join token, or a
//! client certificate from the mesh CA; open without a CA) and attributed
//! to the verified identity: every edge's source namespace and service
//! account must be the caller's, or the summary is refused with a 403
//! naming both (a workload cannot invent traffic for another one). Limits,
//! each a 4xx saying which: the body ([`MAX_BODY`], 413), the edges of one
//! summary ([`SummaryLimits`], 400), one summary per second per identity
//! and address (per address without a CA; 429 with `Retry-After`). The window behind
//! it is bounded ([`mesh_core::graph::WindowConfig`]: 5,000 edges of 5
//! minutes).
//!
//! `GET /v1/graph` is a read of the mesh's state, like `/status`: with a
//! CA it needs a client certificate, a join token or an operator token.
//! Each edge carries its observed share of its source's requests to that
//! service (`observed_share`) and the share its routes configure
//! (`configured_share`). Denials (`denials`) are checked like edges, on
//! the namespace only: a workload reports the denials of its own
//! namespace (a SPIFFE ID names no workload).
//!
//! The module is a child of `admin.rs` (it shares its credential checks).

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mesh_core::graph::{GraphWindow, RateGate, Summary, SummaryLimits, WindowConfig};
use mesh_core::spiffe::SpiffeId;
use serde_json::json;

use super::{Peer, Refusal, bearer, error, reader, token_refusal};
use crate::ca::serving::PeerInfo;
use crate::state::Shared;

/// The largest summary body taken, in bytes: 1,000 edges of about 310 B.
pub(crate) const MAX_BODY: usize = 512 * 1024;

/// The shortest gap between two summaries of one identity, in ms (a
/// workload sends one every 5 s).
const MIN_GAP_MS: u64 = 1_000;

/// The most senders the rate gate remembers at once.
const MAX_SENDERS: usize = 100_000;

/// The window of every workload's summaries, and the per-sender gate.
pub(crate) struct GraphStore {
    epoch: Instant,
    limits: SummaryLimits,
    state: Mutex<(GraphWindow, RateGate)>,
}

impl Default for GraphStore {
    fn default() -> Self {
        GraphStore {
            epoch: Instant::now(),
            limits: SummaryLimits::default(),
            state: Mutex::new((
                GraphWindow::new(WindowConfig::default()),
                RateGate::new(MIN_GAP_MS, MAX_SENDERS),
            )),
        }
    }
}

impl std::fmt::Debug for GraphStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphStore").finish_non_exhaustive()
    }
}

impl GraphStore {
    /// The window's clock, in ms: the time since this store was made,
    /// plus the longest interval a summary may cover, so that the start of
    /// any summary's interval is on the clock (never before its zero).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(self.limits.max_interval_ms)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (GraphWindow, RateGate)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Who sends a summary: `Ok(None)` without a CA (anyone), else the
/// identity of the join token or of the client certificate; `Err` is the
/// 401 (403 for an operator token, 429 for too many unknown tokens).
fn sender(
    shared: &Shared,
    headers: &HeaderMap,
    peer: &PeerInfo,
) -> Result<Option<SpiffeId>, Refusal> {
    let Some(ca) = &shared.ca else {
        return Ok(None);
    };
    match bearer(headers)? {
        Some(token) => ca
            .authenticate_from(token, peer.addr.ip())
            .map(Some)
            .map_err(|e| token_refusal("graph summary", e)),
        None => match &peer.identity {
            Some(id) => Ok(Some(id.clone())),
            None => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "a graph summary requires credentials: an `Authorization: Bearer <join token>` \
                 header, or a client certificate from the mesh CA",
            )),
        },
    }
}

/// `POST /v1/graph/summaries`. Edges must name the caller as their
/// source (namespace and service account), denials the caller's namespace
/// as the denying workload's ([`Summary::foreign_denial`]: a workload name
/// is not part of an identity, so within its namespace a workload is
/// trusted to name itself, as for an edge's `source_workload`); 403
/// otherwise.
pub(super) async fn push(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    body: Result<axum::Json<Summary>, JsonRejection>,
) -> Response {
    let identity = match sender(&shared, &headers, &peer) {
        Ok(identity) => identity,
        Err(refusal) => return refusal.into_response(),
    };
    let summary = match body {
        Ok(axum::Json(summary)) => summary,
        Err(rejection) => {
            let code = rejection.status();
            let hint = if code == StatusCode::PAYLOAD_TOO_LARGE {
                format!(" (at most {MAX_BODY} bytes)")
            } else {
                String::new()
            };
            return error(
                code,
                format!(
                    "invalid graph summary: {}{hint}; expected {{\"interval_ms\", \"edges\": \
                     [{{\"source_namespace\", \"source_service_account\", \"source_workload\", \
                     \"destination_service\", \"protocol\", \"requests\", ...}}]}}",
                    rejection.body_text()
                ),
            );
        }
    };
    let graph = &shared.graph;
    if let Err(message) = summary.validate(&graph.limits) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid graph summary: {message}"),
        );
    }
    if let Some(id) = &identity
        && let Some((i, claimed)) = summary.foreign_source(id.namespace(), id.service_account())
    {
        tracing::warn!(%id, claimed, "graph summary refused: another source");
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "edge {i} claims the source {claimed}, but the caller is {id} \
                 (namespace {}, service account {}): a workload reports its own traffic only",
                id.namespace(),
                id.service_account()
            ),
        );
    }
    if let Some(id) = &identity
        && let Some((i, claimed)) = summary.foreign_denial(id.namespace())
    {
        tracing::warn!(%id, claimed, "graph summary refused: another namespace's denials");
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "denial {i} claims a workload of namespace {claimed}, but the caller is {id} \
                 (namespace {}): a workload reports its own denials only",
                id.namespace()
            ),
        );
    }
    // Per identity and address: the replicas of one service account on
    // other hosts are other senders (a deployment's pods share their
    // identity); two on one host take turns (they move their phase on 429).
    let sender = match &identity {
        Some(id) => format!("{id} from {}", peer.addr.ip()),
        None => peer.addr.ip().to_string(),
    };
    let now = graph.now_ms();
    let mut state = graph.lock();
    let (window, gate) = &mut *state;
    if let Err(wait_ms) = gate.admit(&sender, now) {
        drop(state);
        let wait = Duration::from_millis(wait_ms);
        return Refusal(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{sender} sent a graph summary less than {MIN_GAP_MS} ms ago; send one every 5 s"
            ),
            Some(wait),
        )
        .into_response();
    }
    window.record(&summary, now);
    let edges = window.len();
    drop(state);
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "accepted": summary.edges.len(),
            "edges": edges,
            "denials": summary.denials.len(),
        })),
    )
        .into_response()
}

/// `GET /v1/graph`: nodes and edges over the window. With a Prometheus
/// configured (`--prometheus`), read from it (`graph_prom.rs`; a 502 naming
/// Prometheus' message when it fails), unless `?source=window` asks for the
/// embedded window; `?source=prometheus` insists on Prometheus (400
/// without one). The answer's `X-Graph-Source` header says which it is.
pub(super) async fn get(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    if let Err(refusal) = reader(&shared, &headers, &peer) {
        return refusal.into_response();
    }
    let prometheus = match query.get("source").map(String::as_str) {
        None => shared.prometheus.as_ref(),
        Some("window") => None,
        Some("prometheus") => match &shared.prometheus {
            Some(p) => Some(p),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "source=prometheus: this server reads no Prometheus (serve --prometheus URL)",
                );
            }
        },
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("source={other:?}: expected `window` or `prometheus`"),
            );
        }
    };
    let (mut graph, source) = match prometheus {
        Some(p) => match p.graph().await {
            Ok(graph) => (graph, "prometheus"),
            Err(message) => return error(StatusCode::BAD_GATEWAY, message),
        },
        None => {
            let now = shared.graph.now_ms();
            (shared.graph.lock().0.graph(now), "window")
        }
    };
    super::ui::fill_configured_shares(&shared, &mut graph);
    let mut response = axum::Json(graph).into_response();
    response.headers_mut().insert(
        "x-graph-source",
        axum::http::HeaderValue::from_static(source),
    );
    response
}
