//! The admin HTTP API: status, service listing, self-registration and,
//! with a CA, workload certificates.
//!
//! JSON over HTTP/1.1 or HTTP/2 (axum). Malformed requests get a 4xx whose
//! body says what was wrong: a workload whose registration fails must be
//! able to log something actionable.
//!
//! With a CA (the control server then serves this API over TLS):
//! `POST /v1/certificates` signs a CSR for the identity a join token
//! grants (401 for a missing or unknown token, 403 for a CSR asking for
//! another identity); `GET /v1/trust-bundle` returns the roots; and
//! registration is authenticated — `Authorization: Bearer <join token>`,
//! or the client certificate of the connection — and authorized: the
//! identity must be one the service allows
//! ([`crate::config::ConfigStore::authorize_registration`]), and only the
//! identity that registered a lease may renew or delete it. Without a CA
//! registration is open, as on a trusted network, and a lease is renewed
//! or deleted only with the secret its registration answered
//! (`lease_secret`, sent back in an `X-Lease-Secret` header; see
//! `registry.rs`). No error body names a lease id.
//!
//! With a CA, reads need credentials too: `/status`, `/v1/services` and
//! `/metrics` answer 401 without a client certificate from the mesh CA, a
//! join token, or a read-only operator token (`Authorization: Bearer`;
//! `serve --operator-token-file`), since they map the whole mesh.
//! `/healthz` and `/v1/trust-bundle` (public roots, needed to bootstrap)
//! stay open. An operator token can only read: anything else answers 403.
//!
//! Limits, each a 4xx with a message saying which: what one registration
//! may hold (`registry.rs`), leases per identity (429), certificates per
//! identity and failed token attempts per source address (429 with
//! `Retry-After`; `ca/limits.rs`), each refusal counted in `/metrics`
//! (`mesh_control_rate_limited_total`).
//!
//! With a data directory, a registration or deregistration is written there
//! before it is answered (a restart keeps it); renewals are written in
//! batches (see `persist.rs`). Replicas sharing an etcd make every
//! registration, renewal and deregistration in etcd instead (an etcd lease
//! per registration) and answer once it is there; while etcd cannot be
//! reached they answer 503 with a message naming etcd, and routing goes on
//! from the last state seen. `/status` lists under `rejected` each change
//! of the config directories that is not in force, at its `file:line`, with
//! its problems and the version kept in force (`kept`, null for a new
//! resource left out).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use mesh_core::spiffe::SpiffeId;
use serde::Deserialize;
use serde_json::{Value, json};

use std::collections::BTreeSet;

use crate::ErrorKind;
use crate::ads::server_listener_for;
use crate::ca::serving::PeerInfo;
use crate::ca::{CertificateAuthority, TokenRefusal, retry_after_seconds};
use crate::compat::{ClientKind, grpc_ignored};
use crate::persist::SharedError;
use crate::registry::{
    KeeperRefusal, LEASE_SECRET_HEADER, LeaseKeeper, RegisterRequest, Registered, lease_ttl,
    validate_with,
};

use crate::state::Shared;

/// The service graph's endpoints (a child: it shares the credential checks).
#[path = "graph.rs"]
pub(crate) mod graph;

/// The operator's web page at `/ui` and `/v1/routes` (a child: it shares
/// the credential checks).
#[path = "ui/mod.rs"]
pub(crate) mod ui;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/services", get(services))
        .route("/v1/endpoints", post(register))
        .route("/v1/endpoints/{lease_id}", put(renew).delete(deregister))
        .route("/v1/certificates", post(certificates))
        .route("/v1/trust-bundle", get(trust_bundle))
        // The service graph (graph.rs): workloads' summaries in, the graph out.
        .route(
            "/v1/graph/summaries",
            post(graph::push).layer(axum::extract::DefaultBodyLimit::max(graph::MAX_BODY)),
        )
        .route("/v1/graph", get(graph::get))
        .merge(ui::router())
        .with_state(shared)
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// The connection's peer, as the accept loop saw it.
type Peer = ConnectInfo<PeerInfo>;

/// A refusal: the status and the message of its `{"error"}` body (small,
/// unlike a `Response`, for `Result`s), and for a 429 when to come back.
struct Refusal(StatusCode, String, Option<Duration>);

impl Refusal {
    fn new(code: StatusCode, message: impl Into<String>) -> Self {
        Refusal(code, message.into(), None)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = error(self.0, self.1);
        if let Some(wait) = self.2
            && let Ok(value) = header::HeaderValue::try_from(retry_after_seconds(wait).to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// The token of an `Authorization: Bearer <token>` header. `Err` is a
/// malformed header (another scheme, not text).
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Refusal> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| {
        Refusal::new(
            StatusCode::UNAUTHORIZED,
            "the Authorization header is not text; send `Authorization: Bearer <join token>`",
        )
    })?;
    match crate::ca::bearer_token(value) {
        Some(token) => Ok(Some(token)),
        None => Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "the Authorization header must be `Bearer <join token>`",
        )),
    }
}

/// The refusal for a token that was not accepted (see
/// [`CertificateAuthority::authenticate_from`]); `what` names the request.
fn token_refusal(what: &str, refusal: TokenRefusal) -> Refusal {
    match refusal {
        TokenRefusal::Unknown(e) => Refusal::new(StatusCode::UNAUTHORIZED, format!("{what}: {e}")),
        TokenRefusal::Throttled(wait) => Refusal(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{what}: too many unknown tokens from this address; try again in {} s",
                retry_after_seconds(wait)
            ),
            Some(wait),
        ),
        TokenRefusal::Operator => Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "{what}: an operator token may only read (/status, /v1/services, /metrics); \
                 use the workload's join token"
            ),
        ),
    }
}

/// Who is calling a registration endpoint: `Ok(None)` when registration is
/// open (no CA), the identity of the join token or else of the client
/// certificate when it is authenticated, or the 401 (403 for an operator
/// token, 429 for an address out of token attempts) to answer.
fn caller(
    shared: &Shared,
    headers: &HeaderMap,
    peer: &PeerInfo,
) -> Result<Option<SpiffeId>, Refusal> {
    let Some(ca) = &shared.ca else {
        return Ok(None);
    };
    let denied = |refusal: Refusal| {
        shared.metrics.registrations_denied.inc();
        refusal
    };
    let token = bearer(headers).map_err(denied)?;
    match token {
        Some(token) => ca
            .authenticate_from(token, peer.addr.ip())
            .map(Some)
            .map_err(|e| denied(token_refusal("registration", e))),
        None => match &peer.identity {
            Some(id) => Ok(Some(id.clone())),
            None => Err(denied(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "registration requires credentials: an `Authorization: Bearer <join token>` \
                 header, or a client certificate from the mesh CA",
            ))),
        },
    }
}

/// Whether the caller may read the mesh's state (`/status`,
/// `/v1/services`, `/metrics`): anyone without a CA; with one, a client
/// certificate from the mesh CA (the TLS layer verified it), a join token,
/// an operator token, or the session cookie of an operator logged in to the
/// web page (`/ui/login`, ui/mod.rs). `Err` is the 401 (429) to answer.
fn reader(shared: &Shared, headers: &HeaderMap, peer: &PeerInfo) -> Result<(), Refusal> {
    let Some(ca) = &shared.ca else {
        return Ok(());
    };
    match bearer(headers)? {
        Some(token) => match ca.authenticate_from(token, peer.addr.ip()) {
            Ok(_) | Err(TokenRefusal::Operator) => Ok(()),
            Err(e) => Err(token_refusal("reading the mesh's state", e)),
        },
        None if peer.identity.is_some() => Ok(()),
        // The web page's session cookie (ui/mod.rs: an operator's login).
        None if ui::has_session(shared, headers) => Ok(()),
        None => Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "this control server runs a CA: reading the mesh's state needs credentials, a \
             client certificate from the mesh CA, a join token, or a read-only operator token \
             (serve --operator-token-file; `mesh-control status --token-file FILE`) as \
             `Authorization: Bearer <token>`",
        )),
    }
}

async fn register(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    body: Result<axum::Json<RegisterRequest>, JsonRejection>,
) -> Response {
    let owner = match caller(&shared, &headers, &peer) {
        Ok(owner) => owner,
        Err(refusal) => return refusal.into_response(),
    };
    let axum::Json(req) = match body {
        Ok(b) => b,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid registration: {}; expected {{\"service\", \"address\", \"port\", \"ttl_seconds\", optional \"namespace\", \"service_port\", \"protocol\", \"labels\", \"locality\", \"node_id\"}}",
                    rejection.body_text()
                ),
            );
        }
    };
    let ttl_seconds = req.ttl_seconds;
    let node_id = req.node_id.clone().filter(|id| !id.is_empty());
    let (allow_link_local, max_leases) = {
        let store = shared.store.lock();
        let options = store.options();
        (
            options.allow_link_local_endpoints,
            options.max_leases_per_identity,
        )
    };
    let registration = match validate_with(req, allow_link_local) {
        Ok(r) => r,
        Err(message) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid registration: {message}"),
            );
        }
    };
    if let Some(identity) = &owner
        && let Err(reason) = shared
            .store
            .lock()
            .authorize_registration(&registration, identity)
    {
        shared.metrics.registrations_denied.inc();
        tracing::warn!(%identity, service = %registration.service, %reason, "registration refused");
        return error(StatusCode::FORBIDDEN, reason);
    }
    let too_many = |identity: &SpiffeId| {
        shared.metrics.registrations_denied.inc();
        tracing::warn!(%identity, max_leases, "registration refused: too many leases");
        error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{identity} holds {max_leases} leases, the most one identity may hold (serve \
                 --max-leases-per-identity); delete some or let them expire"
            ),
        )
    };
    let registered = Registered {
        registration,
        owner,
        node_id,
    };
    if let Some(state) = &shared.shared_state {
        let ttl = match lease_ttl(ttl_seconds) {
            Ok(ttl) => ttl,
            Err(message) => return error(StatusCode::BAD_REQUEST, message),
        };
        // The mirror may lag the store by a moment: the limit holds up to
        // the registrations this replica has seen.
        if let Some(identity) = &registered.owner
            && shared.registry.lock().leases_of(identity) >= max_leases
        {
            return too_many(identity);
        }
        return match state.register(registered, ttl).await {
            Ok(lease) => {
                shared.metrics.registrations.inc();
                (StatusCode::CREATED, axum::Json(lease)).into_response()
            }
            Err(e) => shared_error(e),
        };
    }
    let salt = rand::random::<u64>();
    let result = {
        let mut registry = shared.registry.lock();
        match &registered.owner {
            Some(identity) if registry.leases_of(identity) >= max_leases => {
                return too_many(identity);
            }
            _ => registry.insert(registered, ttl_seconds, Instant::now(), salt),
        }
    };
    match result {
        Ok(lease) => {
            shared.metrics.registrations.inc();
            shared.rebuild_soon().await;
            // On disk before it is answered: a restart keeps the lease.
            shared.persist_leases().await;
            (StatusCode::CREATED, axum::Json(lease)).into_response()
        }
        Err(message) if message.contains("already registered") => {
            error(StatusCode::CONFLICT, message)
        }
        Err(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

/// The answer to a failed [`crate::persist::SharedState`] call: 503 when
/// the store is unreachable, 409 or 400 for a refused registration.
fn shared_error(e: SharedError) -> Response {
    match e {
        SharedError::Unavailable(message) => error(StatusCode::SERVICE_UNAVAILABLE, message),
        SharedError::Refused(message) if message.contains("already registered") => {
            error(StatusCode::CONFLICT, message)
        }
        SharedError::Refused(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

/// What a renewal or deletion answers for a lease nobody may change.
const LEGACY_LEASE: &str = "this lease was stored by an older mesh-control, without an owner or \
     a secret: nobody can prove it is theirs, so it cannot be renewed or deleted and ends with \
     its TTL; register the endpoint again (a registration of the same endpoint replaces it)";

/// What a renewal or deletion of an unknown lease answers.
const UNKNOWN_LEASE: &str = "this lease is unknown or expired; register again";

/// Whether the caller (see [`caller`]) may renew or delete `lease_id`: the
/// identity that registered it, or without a CA whoever sends its secret
/// (`X-Lease-Secret`). `Err` is the answer (401 without credentials, 404
/// for an unknown lease, 403 for another identity or a missing or wrong
/// secret, 503 when a shared store that must be asked cannot be reached).
/// `renewal` says which: a lease nobody may change answers a renewal 404
/// (so the workload registers again) and a deletion 403.
async fn check_keeper(
    shared: &Shared,
    headers: &HeaderMap,
    peer: &PeerInfo,
    lease_id: &str,
    renewal: bool,
) -> Result<(), Refusal> {
    let caller = caller(shared, headers, peer)?;
    let mirrored = shared.registry.lock().keeper(lease_id);
    let keeper: Option<LeaseKeeper> = match (mirrored, &shared.shared_state) {
        (Some(keeper), _) => Some(keeper),
        // Registered through another replica a moment ago: this one's
        // mirror may not have it yet, the store has.
        (None, Some(state)) => state.keeper(lease_id).await.map_err(|e| match e {
            SharedError::Unavailable(message) => {
                Refusal::new(StatusCode::SERVICE_UNAVAILABLE, message)
            }
            SharedError::Refused(message) => Refusal::new(StatusCode::BAD_REQUEST, message),
        })?,
        (None, None) => None,
    };
    let Some(keeper) = keeper else {
        return Err(Refusal::new(StatusCode::NOT_FOUND, UNKNOWN_LEASE));
    };
    let secret = headers
        .get(LEASE_SECRET_HEADER)
        .and_then(|v| v.to_str().ok());
    match keeper.permits(caller.as_ref(), secret) {
        Ok(()) => Ok(()),
        Err(KeeperRefusal::Legacy) if renewal => {
            Err(Refusal::new(StatusCode::NOT_FOUND, LEGACY_LEASE))
        }
        Err(KeeperRefusal::Legacy) => Err(Refusal::new(StatusCode::FORBIDDEN, LEGACY_LEASE)),
        Err(KeeperRefusal::Forbidden(message)) => {
            shared.metrics.registrations_denied.inc();
            Err(Refusal::new(StatusCode::FORBIDDEN, message))
        }
    }
}

async fn renew(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(lease_id): Path<String>,
) -> Response {
    if let Err(refusal) = check_keeper(&shared, &headers, &peer, &lease_id, true).await {
        return refusal.into_response();
    }
    if let Some(state) = &shared.shared_state {
        return match state.renew(&lease_id).await {
            Ok(true) => {
                (StatusCode::OK, axum::Json(json!({ "lease_id": lease_id }))).into_response()
            }
            Ok(false) => error(StatusCode::NOT_FOUND, UNKNOWN_LEASE),
            Err(e) => shared_error(e),
        };
    }
    if shared.registry.lock().renew(&lease_id, Instant::now()) {
        // Renewals are frequent: written in the next batch.
        shared.leases_changed();
        (StatusCode::OK, axum::Json(json!({ "lease_id": lease_id }))).into_response()
    } else {
        error(StatusCode::NOT_FOUND, UNKNOWN_LEASE)
    }
}

async fn deregister(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(lease_id): Path<String>,
) -> Response {
    if let Err(refusal) = check_keeper(&shared, &headers, &peer, &lease_id, false).await {
        return refusal.into_response();
    }
    if let Some(state) = &shared.shared_state {
        return match state.remove(&lease_id).await {
            Ok(true) => StatusCode::NO_CONTENT.into_response(),
            Ok(false) => error(StatusCode::NOT_FOUND, UNKNOWN_LEASE),
            Err(e) => shared_error(e),
        };
    }
    let removed = shared.registry.lock().remove(&lease_id);
    if removed {
        shared.rebuild_soon().await;
        shared.persist_leases().await;
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, UNKNOWN_LEASE)
    }
}

/// The body of `POST /v1/certificates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateRequest {
    /// PKCS#10, PEM; only its public key is used.
    csr: String,
    /// The join token (or an `Authorization: Bearer` header).
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    lifetime_seconds: Option<u64>,
}

fn no_ca() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "this control server has no CA (start it with --ca-dir, --join-tokens and --trust-domain)",
    )
}

async fn certificates(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    body: Result<axum::Json<CertificateRequest>, JsonRejection>,
) -> Response {
    let Some(ca) = &shared.ca else {
        return no_ca();
    };
    let axum::Json(req) = match body {
        Ok(b) => b,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid certificate request: {}; expected {{\"csr\": \"<PEM PKCS#10>\", \"token\": \"<join token>\", optional \"lifetime_seconds\"}}",
                    rejection.body_text()
                ),
            );
        }
    };
    let denied = |code: StatusCode, message: String| {
        shared.metrics.certificates_denied.inc();
        tracing::warn!(status = code.as_u16(), %message, "certificate refused");
        error(code, message)
    };
    let header_token = match bearer(&headers) {
        Ok(t) => t,
        Err(refusal) => {
            shared.metrics.certificates_denied.inc();
            return refusal.into_response();
        }
    };
    let Some(token) = req.token.as_deref().or(header_token) else {
        return denied(
            StatusCode::UNAUTHORIZED,
            "a certificate request needs a join token (\"token\" in the body or              `Authorization: Bearer <token>`)"
                .into(),
        );
    };
    let identity = match ca.authenticate_from(token, peer.addr.ip()) {
        Ok(identity) => identity,
        Err(refusal) => {
            shared.metrics.certificates_denied.inc();
            let refusal = token_refusal("certificate request", refusal);
            tracing::warn!(status = refusal.0.as_u16(), message = %refusal.1, "certificate refused");
            return refusal.into_response();
        }
    };
    if let Err(wait) = ca.admit_signing(&identity) {
        shared.metrics.certificates_denied.inc();
        tracing::warn!(%identity, "certificate refused: signing rate limit");
        return Refusal(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{identity} asked for more certificates than its signing rate limit allows; \
                 try again in {} s",
                retry_after_seconds(wait)
            ),
            Some(wait),
        )
        .into_response();
    }
    let requested = match CertificateAuthority::csr_requested_identity(&req.csr) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let lifetime = req.lifetime_seconds.map(Duration::from_secs);
    match ca.issue_with_token(token, &req.csr, requested.as_ref(), lifetime) {
        Ok(issued) => {
            shared.metrics.certificates_issued.inc();
            tracing::info!(identity = %issued.spiffe_id, serial = %issued.serial, "issued a certificate");
            let not_after = issued
                .not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            axum::Json(json!({
                "certificate_chain": issued.chain_pem,
                "trust_bundle": issued.trust_bundle_pem,
                "spiffe_id": issued.spiffe_id.as_str(),
                "serial": issued.serial,
                "not_after_unix": not_after,
            }))
            .into_response()
        }
        Err(e) => match e.kind() {
            ErrorKind::Denied => denied(StatusCode::FORBIDDEN, e.to_string()),
            ErrorKind::InvalidRequest => error(StatusCode::BAD_REQUEST, e.to_string()),
            _ => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
    }
}

async fn trust_bundle(State(shared): State<Arc<Shared>>) -> Response {
    match &shared.ca {
        Some(ca) => axum::Json(json!({ "trust_bundle": ca.trust_bundle_pem() })).into_response(),
        None => no_ca(),
    }
}

async fn services(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = reader(&shared, &headers, &peer) {
        return refusal.into_response();
    }
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

/// Why `deleted_but_kept` matters, in `/status` next to a non-empty list.
const DELETED_BUT_KEPT_NOTE: &str = "mesh-control deleted these resources (a state-of-the-world \
     response without them) after this client accepted them, and the client still subscribes \
     to them. A gRPC client running with ignore_resource_deletion in its bootstrap's \
     server_features (gRFC A53; the bootstraps mesh-control writes set it), or with \
     GRPC_EXPERIMENTAL_XDS_DATA_ERROR_HANDLING=true (gRFC A88, where ignoring deletions is the \
     default), keeps using them until they come back, it unsubscribes or it restarts; one \
     with neither dropped them. Flagged for every gRPC user agent: server_features are not \
     sent to the control server.";

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
                ClientKind::Grpc => {
                    let mut ignored = grpc_ignored(
                        &served.snapshot,
                        Some(&subscribed("RDS")),
                        Some(&subscribed("CDS")),
                    );
                    // The server listeners it asked for, as it was served them.
                    let server_listeners = subscribed("LDS")
                        .iter()
                        .filter_map(|name| {
                            let listener =
                                server_listener_for(&served, name, &c.workload)?;
                            Some((name.as_str().into(), Arc::new(listener)))
                        })
                        .collect::<std::collections::BTreeMap<_, _>>();
                    if !server_listeners.is_empty() {
                        let servers = mesh_core::Snapshot {
                            server_listeners,
                            ..mesh_core::Snapshot::default()
                        };
                        let none = BTreeSet::new();
                        ignored.extend(grpc_ignored(&servers, Some(&none), Some(&none)));
                    }
                    ignored
                }
                ClientKind::Envoy
                    if served.gateways.selecting(&c.workload.labels).next().is_some() =>
                {
                    crate::compat::gateway_ignored(
                        served.gateways.selecting(&c.workload.labels),
                        &served.snapshot,
                        Some(c.workload.locality != mesh_core::model::Locality::default()),
                        Some(shared.ca.is_some()),
                    )
                }
                ClientKind::Envoy => crate::compat::envoy_ignored(
                    &served.snapshot,
                    Some(&served.security),
                    Some(c.workload.locality != mesh_core::model::Locality::default()),
                    Some(shared.ca.is_some()),
                ),
                _ => Vec::new(),
            };
            // Stale: a response it has not acknowledged (nor rejected) for a while.
            let stale = c.types.values().any(|s| {
                s.sent_version != s.acked_version
                    && !s.nacked_latest()
                    && s.last_push.is_some_and(|t| now.duration_since(t) > shared.stale_after)
            });
            // Only gRPC clients keep what was deleted (A53 / A88); this
            // mesh's client and Envoy drop it, as SotW says.
            // Its view says why a name is gone for it (a Sidecar that
            // narrowed what it is sent, an exportTo).
            let view = c.view.as_ref().and_then(|k| served.views.get(k));
            let deleted: Vec<Value> = match kind {
                ClientKind::Grpc => c
                    .deleted_but_kept
                    .iter()
                    .map(|d| {
                        let mut entry = json!({
                            "type": d.type_name,
                            "name": d.name,
                            "deleted_at_version": d.deleted_at_version,
                        });
                        if let Some(why) = view.as_ref().and_then(|v| v.hidden.get(&d.name)) {
                            entry["hidden_by"] = json!(why);
                        }
                        entry
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let deleted_note = (!deleted.is_empty()).then_some(DELETED_BUT_KEPT_NOTE);
            json!({
                "node_id": c.node_id,
                "namespace": c.workload.namespace,
                // Its per-node view (namespace / labels the config depends
                // on), or "shared": the one translation every client gets.
                "view": c.view.as_ref().map_or_else(|| "shared".to_string(), |k| k.to_string()),
                "user_agent": c.user_agent,
                "kind": kind.as_str(),
                "stale": stale,
                "ignored": ignored,
                "deleted_but_kept": deleted,
                "deleted_but_kept_note": deleted_note,
                "connected_seconds": c.connected_at.and_then(|t| SystemTime::now().duration_since(t).ok()).map(|d| d.as_secs()),
                "types": types,
            })
        })
        .collect();
    let rejections = shared.store.lock().rejections().to_vec();
    let diagnostics: Vec<String> = {
        let diagnostics = shared.diagnostics.lock();
        let mut all: Vec<&crate::config::Diagnostic> = diagnostics
            .0
            .iter()
            .chain(diagnostics.1.iter())
            .chain(rejections.iter().flat_map(|r| r.problems.iter()))
            .collect();
        all.sort();
        all.dedup();
        all.into_iter().map(|d| d.to_string()).collect()
    };
    let rejected: Vec<Value> = rejections
        .iter()
        .map(|r| {
            json!({
                "resource": r.resource,
                "change": r.change.as_str(),
                "at": format!("{}:{}", r.file.display(), r.line),
                "problems": r.problems.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
                "kept": r.kept.as_ref().map(|k| json!({
                    "at": format!("{}:{}", k.file.display(), k.line),
                    "fingerprint": format!("{:016x}", k.fingerprint),
                })),
            })
        })
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
        "views": views_json(&served),
        "diagnostics": diagnostics,
        "rejected": rejected,
        "counters": {
            "pushes": shared.metrics.pushes.get(),
            "nacks": shared.metrics.nacks.get(),
            "registrations": shared.metrics.registrations.get(),
            "reloads": shared.metrics.reloads.get(),
            "registrations_denied": shared.metrics.registrations_denied.get(),
            "certificates_issued": shared.metrics.certificates_issued.get(),
            "certificates_denied": shared.metrics.certificates_denied.get(),
            "config_rejections": shared.metrics.config_rejections.get(),
            "persist_errors": shared.metrics.persist_errors.get(),
        },
        "security": shared.ca.as_ref().map(|ca| {
            let (signing, tokens) = ca.throttled();
            json!({
                "trust_domain": ca.trust_domain(),
                "rate_limited": {
                    "certificate_signing": signing,
                    "failed_token_attempts": tokens,
                },
            })
        }),
        "shared": shared.shared_state.as_ref().map(|s| s.status()),
    })
}

/// The per-node views of the config served: what they depend on, and
/// those translated so far (with their own problems).
fn views_json(served: &crate::state::Served) -> Value {
    let Some(source) = &served.views.source else {
        return json!({ "depends_on": Value::Null, "cached": 0, "keys": [] });
    };
    let deps = &source.dependencies;
    let cached = served.views.cached();
    let problems: BTreeSet<String> = cached
        .iter()
        .flat_map(|v| v.problems.iter().map(|d| format!("view {}: {d}", v.key)))
        .collect();
    json!({
        "depends_on": {
            "namespace": deps.namespace,
            "labels": deps.labels,
        },
        "cached": cached.len(),
        "keys": cached.iter().map(|v| v.key.to_string()).collect::<Vec<_>>(),
        "problems": problems,
    })
}

async fn status(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = reader(&shared, &headers, &peer) {
        return refusal.into_response();
    }
    axum::Json(status_json(&shared)).into_response()
}

async fn metrics(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = reader(&shared, &headers, &peer) {
        return refusal.into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}
