//! The operator's web page (issue 17): `GET /ui` on the admin port, a
//! config-sync table read from `/status` and the service graph read from
//! `/v1/graph`, refreshed every 2 s with `fetch()`.
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
//! service (its virtual hosts' routes: match and weighted destinations),
//! which the page shows when a service node is clicked.
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
    let names_service = |domain: &str| {
        domain == service
            || domain
                .strip_prefix(service.as_str())
                .is_some_and(|rest| rest.starts_with(':'))
    };
    let mut found = Vec::new();
    for (name, config) in &served.snapshot.route_configs {
        for vhost in config.virtual_hosts.iter() {
            if !vhost.domains.iter().any(|d| names_service(d)) {
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
