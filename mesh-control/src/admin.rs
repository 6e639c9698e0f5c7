//! The admin HTTP API: status, service listing and self-registration.
//!
//! JSON over HTTP/1.1 (axum). Malformed requests get a 4xx whose body says
//! what was wrong: a workload whose registration fails must be able to log
//! something actionable.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

use std::collections::BTreeSet;

use crate::compat::{ClientKind, grpc_ignored};
use crate::registry::RegisterRequest;

use crate::state::Shared;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/services", get(services))
        .route("/v1/endpoints", post(register))
        .route("/v1/endpoints/{lease_id}", put(renew).delete(deregister))
        .with_state(shared)
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn register(
    State(shared): State<Arc<Shared>>,
    body: Result<axum::Json<RegisterRequest>, JsonRejection>,
) -> Response {
    let axum::Json(req) = match body {
        Ok(b) => b,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid registration: {}; expected {{\"service\", \"address\", \"port\", \"ttl_seconds\", optional \"namespace\", \"service_port\", \"protocol\", \"labels\", \"locality\"}}",
                    rejection.body_text()
                ),
            );
        }
    };
    let salt = rand::random::<u64>();
    let result = shared.registry.lock().register(req, Instant::now(), salt);
    match result {
        Ok(lease) => {
            shared.metrics.registrations.inc();
            shared.rebuild();
            (StatusCode::CREATED, axum::Json(lease)).into_response()
        }
        Err(message) if message.contains("already registered") => {
            error(StatusCode::CONFLICT, message)
        }
        Err(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

async fn renew(State(shared): State<Arc<Shared>>, Path(lease_id): Path<String>) -> Response {
    if shared.registry.lock().renew(&lease_id, Instant::now()) {
        (StatusCode::OK, axum::Json(json!({ "lease_id": lease_id }))).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("lease {lease_id:?} is unknown or expired; register again"),
        )
    }
}

async fn deregister(State(shared): State<Arc<Shared>>, Path(lease_id): Path<String>) -> Response {
    let removed = shared.registry.lock().remove(&lease_id);
    if removed {
        shared.rebuild();
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("lease {lease_id:?} is unknown or expired"),
        )
    }
}

async fn services(State(shared): State<Arc<Shared>>) -> Response {
    let registrations = shared.registry.lock().registrations();
    let services = shared.store.lock().services(&registrations);
    let list: Vec<Value> = services
        .iter()
        .map(|s| {
            json!({
                "host": s.host,
                "namespace": s.namespace,
                "ports": s.ports.iter().map(|(p, proto)| json!({"port": p, "protocol": format!("{proto:?}")})).collect::<Vec<_>>(),
                "dial_names": s.dial_names,
                "endpoints": s.endpoints,
            })
        })
        .collect();
    axum::Json(json!({ "services": list })).into_response()
}

/// The `/status` document (also used by `mesh-control status`).
pub(crate) fn status_json(shared: &Shared) -> Value {
    let served = shared.served.borrow().clone();
    let now = Instant::now();
    let clients: Vec<Value> = shared
        .clients
        .lock()
        .values()
        .map(|c| {
            let types: serde_json::Map<String, Value> = c
                .types
                .iter()
                .map(|(t, s)| {
                    (
                        t.clone(),
                        json!({
                            "subscribed": s.subscribed,
                            "sent_version": s.sent_version,
                            "acked_version": s.acked_version,
                            "acked": s.acked_latest(),
                            "last_nack": s.last_nack.as_ref().map(|n| json!({
                                "version": n.version,
                                "nonce": n.nonce,
                                "message": n.message,
                                "seconds_ago": SystemTime::now().duration_since(n.at).map(|d| d.as_secs()).unwrap_or(0),
                            })),
                            "ms_since_push": s.last_push.map(|t| now.duration_since(t).as_millis() as u64),
                        }),
                    )
                })
                .collect();
            let kind = ClientKind::from_user_agent(&c.user_agent_name);
            let subscribed = |t: &str| -> BTreeSet<String> {
                c.types
                    .get(t)
                    .map(|s| s.subscribed.iter().cloned().collect())
                    .unwrap_or_default()
            };
            let ignored = match kind {
                ClientKind::Grpc => grpc_ignored(
                    &served.snapshot,
                    Some(&subscribed("RDS")),
                    Some(&subscribed("CDS")),
                ),
                _ => Vec::new(),
            };
            // Stale: a response it has not acknowledged (nor rejected) for a while.
            let stale = c.types.values().any(|s| {
                s.sent_version != s.acked_version
                    && !s.nacked_latest()
                    && s.last_push.is_some_and(|t| now.duration_since(t) > shared.stale_after)
            });
            json!({
                "node_id": c.node_id,
                "namespace": c.namespace,
                "user_agent": c.user_agent,
                "kind": kind.as_str(),
                "stale": stale,
                "ignored": ignored,
                "connected_seconds": c.connected_at.and_then(|t| SystemTime::now().duration_since(t).ok()).map(|d| d.as_secs()),
                "types": types,
            })
        })
        .collect();
    let diagnostics = shared.diagnostics.lock();
    let diagnostics: Vec<String> = diagnostics
        .0
        .iter()
        .chain(diagnostics.1.iter())
        .map(|d| d.to_string())
        .collect();
    json!({
        "version": served.version,
        "resources": {
            "LDS": served.resources[0].len(),
            "RDS": served.resources[1].len(),
            "CDS": served.resources[2].len(),
            "EDS": served.resources[3].len(),
        },
        "clients": clients,
        "diagnostics": diagnostics,
        "counters": {
            "pushes": shared.metrics.pushes.get(),
            "nacks": shared.metrics.nacks.get(),
            "registrations": shared.metrics.registrations.get(),
            "reloads": shared.metrics.reloads.get(),
        },
    })
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(status_json(&shared)).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}
