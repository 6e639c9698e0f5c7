//! CORS on the server side: VirtualService `corsPolicy`, enforced by
//! [`ServerLayer`](crate::ServerLayer) as Envoy's `cors` filter enforces it
//! (the decisions are [`mesh_core::cors`]'s).
//!
//! The browser talks to the server, so this is where a preflight is
//! answered. The layer runs it first, before the local rate limit and
//! authorization, as Istio's inbound HTTP filter chain puts the `cors`
//! filter before `local_ratelimit` and RBAC: a preflight from an allowed
//! origin is answered `200` with the policy's headers and reaches neither
//! the limiter, the authorization policies nor the app (a browser sends no
//! credentials on a preflight, so authorizing it would refuse every
//! cross-origin call under a policy that requires a principal). Other
//! requests go on; one from an allowed origin gets
//! `access-control-allow-origin` (and `-allow-credentials`,
//! `-expose-headers`) on whatever answers it, the app or the layer's own
//! 429 / 403, since Envoy's `cors` filter encodes the local replies of the
//! filters after it too.
//!
//! The server's CORS routes come with its gRFC A36 listener
//! ([`InboundPolicy::from_xds`](crate::InboundPolicy::from_xds)), or from
//! [`InboundPolicy::set_cors`](crate::InboundPolicy::set_cors). A request
//! without an `Origin` header (every request that is not a browser's) costs
//! one header lookup and allocates nothing; a server without CORS routes
//! costs nothing.

use bytes::Bytes;
use http::header::{HOST, ORIGIN};
use http::{HeaderMap, Request, Response};
use mesh_core::cors::{CorsRoute, Decision};
use mesh_core::route::RequestView;

/// The decision for `req` under `routes` (see the module docs).
pub(crate) fn decide<B>(routes: &[CorsRoute], req: &Request<B>) -> Decision {
    if routes.is_empty() || !req.headers().contains_key(ORIGIN) {
        return Decision::Pass;
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    let view = RequestView::new(req.method(), req.uri(), req.headers(), authority);
    mesh_core::cors::decide(routes, &view)
}

/// The answer to a preflight: 200, these headers, no body (Envoy's
/// `cors_response`).
pub(crate) fn preflight_reply(headers: HeaderMap) -> (Response<()>, Option<Bytes>) {
    let mut response = Response::new(());
    *response.headers_mut() = headers;
    (response, None)
}
