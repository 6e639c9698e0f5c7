//! The operator's web page (issue 17): `GET /ui` on the admin port, with
//! the service graph read from `/v1/graph` (workloads and services with
//! their versions as sub-nodes; per edge rps, error rate, p50 / p99,
//! observed vs configured share, retries and an mTLS padlock), the routing
//! of a clicked service with each destination's live traffic, the recent
//! authorization denials by policy (`/v1/graph`'s `denials`), and the
//! config-sync table read from `/status`, refreshed every 2 s with
//! `fetch()`.
//!
//! The page is three files embedded in the binary with `include_str!`
//! (`index.html`, `app.js`, `app.css`): it works offline, from no CDN, and
//! the control server ships as one file. The graph is hand-written SVG and
//! the script vanilla JS with no library: the page is small (a table, a
//! layered graph), and no vendored code means none to keep patched.
//! Everything the page shows is put in the DOM as text (`textContent`), never
//! as markup, so names from config or workloads cannot inject script.
//!
//! With a CA every `/ui` route, and the JSON the page reads, needs
//! credentials: a client certificate from the mesh CA, or a session cookie
//! that `POST /ui/login` sets for a read-only operator token
//! (`serve --operator-token-file`). The cookie holds a random 256-bit
//! session id mapped here to its expiry, never the token: it is `HttpOnly`
//! (no script reads it), `Secure` and `SameSite=Strict` (no other site's
//! page sends it). Sessions are bounded ([`MAX_SESSIONS`], the soonest to
//! expire evicted first) and expire after [`SESSION_TTL`]; `POST
//! /ui/logout` ends one. Unknown tokens count against the address's token
//! attempts, as on every other endpoint (429 once throttled). A request to
//! `/ui` without credentials gets the login form (401). Without a CA the
//! admin API is open (a trusted network) and so is the page.
//!
//! Every answer carries `Content-Security-Policy: default-src 'self'` (no
//! inline script or style, nothing from another origin), `nosniff`, no
//! framing, no referrer, no caching.
//!
//! `GET /v1/routes?service=HOST` answers the routing rules served for a
//! service (its virtual hosts' routes: match and weighted destinations,
//! each with the version of its endpoints), which the page shows when a
//! service node is clicked, each destination with the live traffic the
//! graph has for its version. Workload metrics carry no route name, so
//! live traffic is per destination version, not per rule: the panel says
//! so. `GET /v1/graph` carries each edge's configured share
//! ([`fill_configured_shares`]).
//!
//! The module is a child of `admin.rs` (it shares its credential checks).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::{Peer, Refusal, reader, token_refusal};
use crate::ca::TokenRefusal;
use crate::state::Shared;

/// The page.
const INDEX_HTML: &str = include_str!("index.html");
/// Its script.
const APP_JS: &str = include_str!("app.js");
/// Its style sheet.
const APP_CSS: &str = include_str!("app.css");
/// The login form (no script, no style: it is served without credentials).
const LOGIN_HTML: &str = include_str!("login.html");

/// The session cookie's name.
const COOKIE: &str = "mesh_ui_session";

/// How long a session lasts after its login.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// The most sessions kept at once.
pub(crate) const MAX_SESSIONS: usize = 1_000;

/// The largest login body read, in bytes.
const MAX_LOGIN_BODY: usize = 4 * 1024;

/// The logged-in sessions: id (hex) → expiry.
#[derive(Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    /// A new session's id, kept until `SESSION_TTL` from now.
    fn create(&self) -> String {
        let bytes: [u8; 32] = rand::random();
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, expiry| *expiry > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, expiry)| **expiry)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id.clone(), now + SESSION_TTL);
        id
    }

    /// Whether `id` is a live session.
    fn valid(&self, id: &str) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id).is_some_and(|expiry| *expiry > Instant::now())
    }

    fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// The session id of the request's cookie, if it sends one.
fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// Whether the request carries a live session cookie (for `reader`).
pub(super) fn has_session(shared: &Shared, headers: &HeaderMap) -> bool {
    session_id(headers).is_some_and(|id| shared.ui_sessions.valid(id))
}

/// The `/ui` routes and `/v1/routes`.
pub(super) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/app.js", get(script))
        .route("/ui/app.css", get(style))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/v1/routes", get(routes))
}

/// The security headers every `/ui` answer carries.
fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn login_form(code: StatusCode, message: &str) -> Response {
    let body = LOGIN_HTML.replace("{{message}}", message);
    secured(
        (
            code,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
    )
}

/// `content` to a reader, or the login form.
fn asset(
    shared: &Shared,
    headers: &HeaderMap,
    peer: &crate::ca::serving::PeerInfo,
    content_type: &'static str,
    content: &'static str,
) -> Response {
    match reader(shared, headers, peer) {
        Ok(()) => secured(([(header::CONTENT_TYPE, content_type)], content).into_response()),
        Err(Refusal(StatusCode::TOO_MANY_REQUESTS, message, _)) => {
            login_form(StatusCode::TOO_MANY_REQUESTS, &html_text(&message))
        }
        Err(_) => login_form(StatusCode::UNAUTHORIZED, ""),
    }
}

async fn page(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> Response {
    asset(
        &shared,
        &headers,
        &peer,
        "text/html; charset=utf-8",
        INDEX_HTML,
    )
}

async fn script(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> Response {
    asset(
        &shared,
        &headers,
        &peer,
        "text/javascript; charset=utf-8",
        APP_JS,
    )
}

async fn style(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> Response {
    asset(&shared, &headers, &peer, "text/css; charset=utf-8", APP_CSS)
}

/// `text` with HTML's special characters escaped.
fn html_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The value of `name` in an `application/x-www-form-urlencoded` body.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    let raw = body
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)?
        .1;
    let mut out = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn redirect_to_ui() -> Response {
    secured((StatusCode::SEE_OTHER, [(header::LOCATION, "/ui")]).into_response())
}

/// `POST /ui/login` (form field `token`): a read-only operator token in,
/// a session cookie out.
async fn login(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(peer): Peer,
    body: Bytes,
) -> Response {
    let Some(ca) = &shared.ca else {
        // No CA: the page is open.
        return redirect_to_ui();
    };
    if body.len() > MAX_LOGIN_BODY {
        return login_form(StatusCode::PAYLOAD_TOO_LARGE, "The form is too large.");
    }
    let Some(token) = form_field(&body, "token").filter(|t| !t.trim().is_empty()) else {
        return login_form(StatusCode::BAD_REQUEST, "Enter the operator token.");
    };
    match ca.authenticate_from(token.trim(), peer.addr.ip()) {
        // Only a read-only operator token logs in: the page only reads.
        Err(TokenRefusal::Operator) => {
            let id = shared.ui_sessions.create();
            let cookie = format!(
                "{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
                SESSION_TTL.as_secs()
            );
            let mut response = redirect_to_ui();
            if let Ok(value) = HeaderValue::try_from(cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        Ok(_) => login_form(
            StatusCode::FORBIDDEN,
            "That is a workload's join token; the page takes a read-only operator token \
             (serve --operator-token-file).",
        ),
        Err(e @ TokenRefusal::Throttled(_)) => {
            let Refusal(code, message, _) = token_refusal("login", e);
            login_form(code, &html_text(&message))
        }
        Err(TokenRefusal::Unknown(_)) => login_form(StatusCode::UNAUTHORIZED, "Unknown token."),
    }
}

/// `POST /ui/logout`: ends the session and clears the cookie.
async fn logout(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_id(&headers) {
        shared.ui_sessions.remove(id);
    }
    let mut response = login_form(StatusCode::OK, "Logged out.");
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "mesh_ui_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}

#[derive(Deserialize)]
struct RoutesQuery {
    service: String,
}

/// `GET /v1/routes?service=HOST`: the routes served for a service, per
/// route config and virtual host whose domains name it.
async fn routes(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(peer): Peer,
    headers: HeaderMap,
    query: Result<Query<RoutesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refusal) = reader(&shared, &headers, &peer) {
        return refusal.into_response();
    }
    let Ok(Query(query)) = query else {
        return super::error(
            StatusCode::BAD_REQUEST,
            "GET /v1/routes needs ?service=<host> (catalog.shop.svc.cluster.local)",
        );
    };
    let service = query.service;
    let served = shared.served.borrow().clone();
    let mut found = Vec::new();
    for (name, config) in &served.snapshot.route_configs {
        for vhost in config.virtual_hosts.iter() {
            if !vhost.domains.iter().any(|d| names_service(d, &service)) {
                continue;
            }
            let routes: Vec<_> = vhost
                .routes
                .iter()
                .map(|route| {
                    let m = &route.matcher;
                    let total = route.action.total_weight();
                    json!({
                        "name": route.name.to_string(),
                        "match": {
                            "path": format!("{:?}", m.path),
                            "headers": m.headers.iter().map(|h| format!(
                                "{} {}{:?}",
                                h.name,
                                if h.invert { "not " } else { "" },
                                h.value
                            )).collect::<Vec<_>>(),
                            "query_params": m.query_params.iter().map(|q| format!("{q:?}")).collect::<Vec<_>>(),
                            "ignore_case": m.ignore_case,
                        },
                        "destinations": route.action.clusters().iter().map(|c| json!({
                            "cluster": c.name.to_string(),
                            "weight": c.weight,
                            // A single destination takes everything (its weight may be 0).
                            "percent": if total == 0 { 100.0 } else { f64::from(c.weight) * 100.0 / total as f64 },
                            // The endpoints' version, for the page to put the
                            // graph's live traffic beside it (null: several).
                            "version": cluster_version(&served.snapshot, &c.name),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            found.push(json!({
                "route_config": name.to_string(),
                "virtual_host": vhost.name.to_string(),
                "routes": routes,
            }));
        }
    }
    // One route config per listener port may repeat a virtual host: the
    // first of each is enough for the page.
    found.dedup_by(|a, b| a["virtual_host"] == b["virtual_host"] && a["routes"] == b["routes"]);
    axum::Json(json!({ "service": service, "virtual_hosts": found })).into_response()
}

/// Fills in each edge's `configured_share`: the share of its source's calls
/// to the destination service that the served routes give the edge's
/// destination version (GET /v1/graph, so the page can put "configured
/// 10%" beside the observed share).
///
/// How, per destination service:
/// - the routes are those of the first virtual host (in route-config name
///   order) whose domains name the service, in the shared snapshot served
///   to every client (a per-node view, from `sourceLabels` or a Sidecar,
///   is not looked at: the graph's edge does not say which view its source
///   had);
/// - of them, the **default route**: the last route without a header or
///   query-parameter condition (Istio's catch-all `http[]` entry, after
///   the matched ones such as beta users). It is what plain traffic gets,
///   so it is the split the observed share is compared with; a matched
///   route's users are a subset whose size the config does not say;
/// - each weighted cluster (`outbound|80|v2|catalog...`) maps to the
///   `version` label of the endpoints its DestinationRule subset selected
///   (the labels are on the cluster's EDS endpoints in the snapshot, so
///   a subset named `canary` with `version: v2` counts as v2); a cluster
///   without endpoints falls back to its subset name as the version; a
///   cluster whose endpoints carry several versions (no subset) splits by
///   load balancing, not by config, and attributes no share;
/// - `configured_share` = the weights of the version's clusters / the
///   route's total weight (a single destination takes everything). A
///   version the route gives nothing gets 0, unless some weight went to a
///   cluster of several versions (then it is unknown: `None`).
///
/// `None` when no served route names the service, for edges with no
/// endpoint version (`unknown`: no endpoint answered), and when the
/// default route has no destination.
pub(super) fn fill_configured_shares(shared: &Shared, graph: &mut mesh_core::graph::Graph) {
    let served = shared.served.borrow().clone();
    configured_shares(&served.snapshot, graph);
}

/// A default route's split by destination version: version → share, and
/// whether every weight went to one version (then a version not listed
/// gets 0).
type Split = (HashMap<String, f64>, bool);

/// [`fill_configured_shares`] against one snapshot.
fn configured_shares(snapshot: &mesh_core::Snapshot, graph: &mut mesh_core::graph::Graph) {
    // Per service host: version → share, and whether unlisted versions are
    // known to get 0.
    let mut splits: HashMap<String, Option<Split>> = HashMap::new();
    for edge in &mut graph.edges {
        let version = edge.key.destination_version.as_str();
        if version.is_empty() || version == "unknown" {
            edge.configured_share = None;
            continue;
        }
        let split = splits
            .entry(edge.key.destination_service.clone())
            .or_insert_with(|| default_split(snapshot, &edge.key.destination_service));
        edge.configured_share = split.as_ref().and_then(|(shares, complete)| {
            shares
                .get(version)
                .copied()
                .or(if *complete { Some(0.0) } else { None })
        });
    }
}

/// Whether a virtual host's `domain` names `service` (the host, or the
/// host with a port).
fn names_service(domain: &str, service: &str) -> bool {
    domain == service
        || domain
            .strip_prefix(service)
            .is_some_and(|rest| rest.starts_with(':'))
}

/// The split of `service`'s default route by destination version (see
/// [`fill_configured_shares`]): version → share, and whether every weight
/// was attributed to one version.
fn default_split(snapshot: &mesh_core::Snapshot, service: &str) -> Option<Split> {
    let route = snapshot
        .route_configs
        .values()
        .flat_map(|config| config.virtual_hosts.iter())
        .filter(|vhost| vhost.domains.iter().any(|d| names_service(d, service)))
        .find_map(|vhost| {
            vhost
                .routes
                .iter()
                .rev()
                .find(|r| r.matcher.headers.is_empty() && r.matcher.query_params.is_empty())
        })?;
    let clusters = route.action.clusters();
    if clusters.is_empty() {
        return None;
    }
    let total = route.action.total_weight();
    let mut shares: HashMap<String, f64> = HashMap::new();
    let mut complete = true;
    for cluster in clusters {
        // A single destination takes everything (its weight may be 0).
        let share = if total == 0 {
            1.0
        } else {
            f64::from(cluster.weight) / total as f64
        };
        match cluster_version(snapshot, &cluster.name) {
            Some(version) => *shares.entry(version).or_default() += share,
            None => complete = false,
        }
    }
    Some((shares, complete))
}

/// The one version a cluster's endpoints carry (`version` label), else its
/// subset name (`outbound|80|v2|host`) when it has no endpoints; `None`
/// for a cluster of several versions or without a subset.
fn cluster_version(snapshot: &mesh_core::Snapshot, name: &str) -> Option<String> {
    let subset = name.split('|').nth(2).filter(|s| !s.is_empty());
    let eds = snapshot
        .clusters
        .get(name)
        .map_or(name, |c| c.eds_service_name.as_ref());
    let mut versions = std::collections::BTreeSet::new();
    let mut unlabelled = false;
    for locality in snapshot
        .endpoints
        .get(eds)
        .map(|a| a.localities.iter())
        .into_iter()
        .flatten()
    {
        for endpoint in locality.endpoints.iter() {
            match endpoint
                .labels
                .iter()
                .find(|(k, _)| k.as_ref() == "version")
            {
                Some((_, v)) => {
                    versions.insert(v.to_string());
                }
                None => unlabelled = true,
            }
        }
    }
    match (versions.len(), unlabelled) {
        (0, _) => subset.map(str::to_owned),
        (1, false) => versions.pop_first(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_are_decoded() {
        assert_eq!(
            form_field(b"a=1&token=ab%2Bc+d", "token").as_deref(),
            Some("ab+c d")
        );
        assert_eq!(form_field(b"token=%zz", "token"), None);
        assert_eq!(form_field(b"token=%4", "token"), None);
        assert_eq!(form_field(b"other=1", "token"), None);
    }

    #[test]
    fn sessions_are_bounded_and_removable() {
        let sessions = Sessions::default();
        let first = sessions.create();
        assert!(sessions.valid(&first));
        assert!(!sessions.valid("not-a-session"));
        for _ in 0..MAX_SESSIONS {
            sessions.create();
        }
        assert_eq!(sessions.map.lock().unwrap().len(), MAX_SESSIONS);
        assert!(!sessions.valid(&first), "the oldest session was evicted");
        let last = sessions.create();
        sessions.remove(&last);
        assert!(!sessions.valid(&last));
    }

    /// catalog: v1 and v2 endpoints; subsets v1, v2 and `canary` (which
    /// selects version v2: the version comes from the endpoints, not the
    /// subset's name); beta users to v2, everyone else 90/10.
    const CANARY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog.shop.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: shop}
spec:
  host: catalog.shop.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: canary, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog.shop.svc.cluster.local]
  http:
  - name: beta-users
    match: [{headers: {x-user: {exact: beta}}}]
    route: [{destination: {host: catalog.shop.svc.cluster.local, subset: canary}}]
  - name: canary-split
    route:
    - {destination: {host: catalog.shop.svc.cluster.local, subset: v1}, weight: 90}
    - {destination: {host: catalog.shop.svc.cluster.local, subset: canary}, weight: 10}
";

    fn snapshot_of(yaml: &str) -> mesh_core::Snapshot {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
        let mut store = crate::config::ConfigStore::new(crate::config::MeshOptions::default());
        let problems = store.load_dir(dir.path());
        assert!(problems.is_empty(), "{problems:?}");
        store.snapshot(&[]).0
    }

    fn graph_to(service: &str, versions: &[&str]) -> mesh_core::graph::Graph {
        use mesh_core::graph::{EdgeDelta, EdgeKey, GraphWindow, Summary, WindowConfig};
        let mut window = GraphWindow::new(WindowConfig::default());
        let edges = versions
            .iter()
            .map(|v| EdgeDelta {
                key: EdgeKey {
                    source_namespace: "shop".into(),
                    source_service_account: "frontend".into(),
                    source_workload: "frontend".into(),
                    source_version: "v1".into(),
                    destination_service: service.into(),
                    destination_version: (*v).into(),
                    protocol: "http".into(),
                    mtls: true,
                },
                requests: 10,
                errors: 0,
                retries: 0,
                latency_ms: vec![],
            })
            .collect();
        let summary = Summary {
            interval_ms: 5_000,
            edges,
            denials: vec![],
        };
        window.record(&summary, 5_000);
        window.graph(5_000)
    }

    fn shares(graph: &mesh_core::graph::Graph) -> Vec<(String, Option<f64>)> {
        graph
            .edges
            .iter()
            .map(|e| (e.key.destination_version.clone(), e.configured_share))
            .collect()
    }

    /// The default route's weights, per endpoint version: v1 90%, v2 10%
    /// (its subset is named `canary`), a version the route never sends to
    /// 0, and no figure for calls no endpoint answered.
    #[test]
    fn configured_shares_are_the_default_routes_weights_per_version() {
        let snapshot = snapshot_of(CANARY);
        let mut graph = graph_to(
            "catalog.shop.svc.cluster.local",
            &["unknown", "v1", "v2", "v3"],
        );
        configured_shares(&snapshot, &mut graph);
        let got = shares(&graph);
        assert_eq!(got.len(), 4, "{got:?}");
        for (version, share) in got {
            let expected = match version.as_str() {
                "v1" => Some(0.9),
                "v2" => Some(0.1),
                "v3" => Some(0.0),
                _ => None,
            };
            match (share, expected) {
                (Some(s), Some(e)) => assert!((s - e).abs() < 1e-9, "{version}: {s} vs {e}"),
                (s, e) => assert_eq!(s, e, "{version}"),
            }
        }
    }

    /// No route names the service: no configured share; a route to the
    /// service with no subset (its endpoints of two versions) attributes
    /// none either.
    #[test]
    fn no_configured_share_without_a_versioned_route() {
        let snapshot = snapshot_of(CANARY);
        let mut graph = graph_to("payment.shop.svc.cluster.local", &["v1"]);
        configured_shares(&snapshot, &mut graph);
        assert_eq!(shares(&graph), vec![("v1".to_owned(), None)]);

        let plain = CANARY.split("---").next().unwrap();
        let snapshot = snapshot_of(plain);
        let mut graph = graph_to("catalog.shop.svc.cluster.local", &["v1", "v2"]);
        configured_shares(&snapshot, &mut graph);
        assert_eq!(
            shares(&graph),
            vec![("v1".to_owned(), None), ("v2".to_owned(), None)]
        );
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; mesh_ui_session=abc; c=d"),
        );
        assert_eq!(session_id(&headers), Some("abc"));
    }
}
