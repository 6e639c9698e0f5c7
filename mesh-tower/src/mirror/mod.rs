//! Request mirroring (Istio `mirror` / `mirrors`, Envoy's shadowing): a
//! copy of a request goes to another cluster, fire-and-forget.
//!
//! What Envoy does, and this stack with it:
//!
//! - each mirror of the route copies a share of its requests (one random
//!   draw per mirror per request, made when the request is routed);
//! - the copy is the request as sent upstream: after the route's header
//!   changes and rewrites, with `Host` / `:authority` given the `-shadow`
//!   suffix (`catalog:8080` → `catalog-shadow:8080`), without the
//!   per-attempt headers (`x-envoy-attempt-count`, the announced timeout);
//! - it is sent when the request's first attempt is (a request the mesh
//!   answers itself, by a fault abort or a breaker overflow, is not
//!   copied), to an endpoint the mirror cluster's balancer picks, with a
//!   slot of that cluster's circuit breaker, through the same inner service
//!   (the [`Pool`](crate::Pool)) as attempts, never retried;
//! - its response is read to the end and discarded; its failure is counted
//!   and never reaches the caller, who does not wait for it: the copy runs
//!   in a task of its own (mirroring is opt-in: a task per copy is its
//!   price), ended by a timeout (the route's, at most [`MIRROR_TIMEOUT`]).
//!
//! What this stack adds so that a slow mirror cannot build up memory or
//! tasks: at most [`MeshLayer::mirror_in_flight`](crate::MeshLayer::mirror_in_flight)
//! copies in flight per [`MeshLayer`](crate::MeshLayer) (64 by default;
//! one more is not sent, counted in
//! [`MeshStats::mirrors_overflowed`](crate::MeshStats::mirrors_overflowed)),
//! and only bodies that are whole when the request is sent and no bigger
//! than [`MeshLayer::mirror_body_limit`](crate::MeshLayer::mirror_body_limit)
//! (64 KiB by default) are copied: a route with mirrors reads the body
//! ahead as a retry does (see [`MeshBody`]), and a bigger body or one still
//! being produced is sent to the route's cluster only (counted in
//! [`MeshStats::mirrors_skipped`](crate::MeshStats::mirrors_skipped)).
//! A route without mirrors pays one `Option` check.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::header::HOST;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, Uri};
use http_body::Body;
use mesh_core::breaker::RequestPermit;
use mesh_core::outlier::ResultClass;
use mesh_core::retry::Outcome;
use mesh_core::traffic::shadow_authority;
use tower::{Service, ServiceExt};

use crate::balance::{ActiveGuard, ClusterState};
use crate::body::MeshBody;
use crate::error::{BoxError, Error, ErrorKind};
use crate::stats::MeshStats;

/// The default cap on copies in flight per layer.
pub(crate) const DEFAULT_MIRROR_IN_FLIGHT: usize = 64;

/// The default size limit of a body that is copied.
pub(crate) const DEFAULT_MIRROR_BODY_LIMIT: usize = 64 * 1024;

/// The longest a copy may take (response body included) when the route's
/// timeout is longer or unset: a stalled mirror frees its slot then.
pub(crate) const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// The mirroring limits of one layer and the copies it has in flight,
/// shared by every service the layer builds (cheap to clone).
#[derive(Clone)]
pub(crate) struct Mirrors {
    gate: Arc<Gate>,
}

struct Gate {
    in_flight: AtomicUsize,
    max_in_flight: usize,
    body_limit: usize,
}

impl Mirrors {
    pub(crate) fn new(max_in_flight: usize, body_limit: usize) -> Self {
        Mirrors {
            gate: Arc::new(Gate {
                in_flight: AtomicUsize::new(0),
                max_in_flight,
                body_limit,
            }),
        }
    }

    /// The same limits with another cap on copies in flight (a new count:
    /// set before services are built).
    pub(crate) fn with_in_flight(&self, max: usize) -> Self {
        Mirrors::new(max, self.gate.body_limit)
    }

    /// The same limits with another body size limit.
    pub(crate) fn with_body_limit(&self, bytes: usize) -> Self {
        Mirrors::new(self.gate.max_in_flight, bytes)
    }

    /// The largest body copied.
    pub(crate) fn body_limit(&self) -> usize {
        self.gate.body_limit
    }

    /// A slot for one more copy in flight, unless the cap is reached.
    pub(crate) fn try_acquire(&self) -> Option<InFlight> {
        let gate = &self.gate;
        gate.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < gate.max_in_flight).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(self.gate.clone()))
    }

    /// Copies in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.gate.in_flight.load(Ordering::Acquire)
    }
}

impl Default for Mirrors {
    fn default() -> Self {
        Mirrors::new(DEFAULT_MIRROR_IN_FLIGHT, DEFAULT_MIRROR_BODY_LIMIT)
    }
}

impl fmt::Debug for Mirrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mirrors")
            .field("max_in_flight", &self.gate.max_in_flight)
            .field("body_limit", &self.gate.body_limit)
            .finish_non_exhaustive()
    }
}

/// One copy's place under the in-flight cap, given back when dropped.
pub(crate) struct InFlight(Arc<Gate>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The copies routing decided for a request: the mirror clusters whose
/// share it fell in.
pub(crate) struct Targets {
    pub(crate) clusters: Vec<Arc<ClusterState>>,
    /// How long each copy may take.
    pub(crate) timeout: Duration,
    pub(crate) mirrors: Mirrors,
}

/// How the copy of a request is handed to a task: a function made where
/// the types are known to be `Send + 'static` (in `Mesh::call`), so that
/// the response future itself needs no such bounds.
pub(crate) type Launch<S, B> = fn(&S, Request<MeshBody<B>>, Ticket) -> bool;

/// The copies of a request, from its start to its first attempt.
pub(crate) struct Mirroring<S, B> {
    pub(crate) targets: Box<Targets>,
    /// A service of the copies' own (each copy gets a clone).
    pub(crate) svc: S,
    pub(crate) launch: Launch<S, B>,
    /// The body is being read ahead for the copies (the route does not
    /// retry): the engine's breaker slot is taken once it is read.
    pub(crate) reading: bool,
}

/// What a copy holds while in flight: its place under the cap, its
/// endpoint (in-flight count) and its breaker slot.
pub(crate) struct Ticket {
    pub(crate) _in_flight: InFlight,
    pub(crate) active: ActiveGuard,
    pub(crate) _slot: RequestPermit,
    pub(crate) stats: MeshStats,
    pub(crate) timeout: Duration,
}

/// Gives the copy's `Host` / `:authority` Envoy's `-shadow` suffix: the
/// URI's authority when it has one, and the `Host` header when there is
/// one.
pub(crate) fn shadow<T>(req: &mut Request<T>) -> Result<(), Error> {
    if let Some(authority) = req.uri().authority() {
        let shadowed = Authority::try_from(shadow_authority(authority.as_str())).map_err(|e| {
            Error::new(ErrorKind::InvalidRequest, "invalid shadow authority").with_source(e)
        })?;
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.authority = Some(shadowed);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|e| {
            Error::new(ErrorKind::InvalidRequest, "cannot rewrite the URI").with_source(e)
        })?;
    }
    if let Some(host) = req.headers().get(HOST).and_then(|h| h.to_str().ok()) {
        let shadowed = HeaderValue::try_from(shadow_authority(host)).map_err(|e| {
            Error::new(ErrorKind::InvalidRequest, "invalid shadow host").with_source(e)
        })?;
        req.headers_mut().insert(HOST, shadowed);
    }
    Ok(())
}

/// Spawns the task of a copy on the current runtime; false (nothing sent)
/// outside one.
pub(crate) fn launch<S, B, RB>(svc: &S, req: Request<MeshBody<B>>, ticket: Ticket) -> bool
where
    S: Service<Request<MeshBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Body + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(copy(svc.clone(), req, ticket));
            true
        }
        Err(_) => false,
    }
}

/// A copy in flight: sent, its response read to the end and dropped, its
/// result reported to the mirror cluster's outlier detection; a failure
/// is counted, nothing else.
async fn copy<S, B, RB>(svc: S, req: Request<MeshBody<B>>, ticket: Ticket)
where
    S: Service<Request<MeshBody<B>>, Response = Response<RB>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Body + Send + 'static,
{
    let exchange = async {
        let response = svc.oneshot(req).await.map_err(Into::into)?;
        let outcome = crate::mesh::outcome_of(&response);
        let mut body = std::pin::pin!(response.into_body());
        // Read to the end (the connection can serve again), each frame
        // dropped as it comes; a body that fails just ends here.
        while let Some(Ok(_)) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {}
        Ok::<_, BoxError>(outcome)
    };
    match tokio::time::timeout(ticket.timeout, exchange).await {
        Ok(Ok(outcome)) => report(&ticket, &outcome),
        Ok(Err(e)) => {
            report(&ticket, &crate::mesh::outcome_of_error(&*e));
            ticket.stats.add_mirror_failed();
            tracing::debug!(
                cluster = %ticket.active.cluster_state().name(),
                endpoint = %ticket.active.address(),
                error = %e,
                "mirrored request failed"
            );
        }
        Err(_elapsed) => {
            ticket.stats.add_mirror_failed();
            tracing::debug!(
                cluster = %ticket.active.cluster_state().name(),
                endpoint = %ticket.active.address(),
                timeout = ?ticket.timeout,
                "mirrored request timed out"
            );
        }
    }
}

fn report(ticket: &Ticket, outcome: &Outcome) {
    crate::mesh::report(
        &ticket.active,
        ResultClass::of(outcome),
        &ticket.stats,
        None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_copies_in_flight_and_frees_them_when_dropped() {
        let mirrors = Mirrors::new(2, 10);
        let a = mirrors.try_acquire().expect("first");
        let b = mirrors.try_acquire().expect("second");
        assert!(mirrors.try_acquire().is_none(), "over the cap");
        assert_eq!(mirrors.in_flight(), 2);
        drop(a);
        assert_eq!(mirrors.in_flight(), 1);
        let c = mirrors.try_acquire().expect("a freed place");
        assert!(mirrors.try_acquire().is_none());
        drop((b, c));
        assert_eq!(mirrors.in_flight(), 0);
        // Clones share the count; a new cap starts a new one.
        let clone = mirrors.clone();
        let _held = clone.try_acquire().expect("clone");
        assert_eq!(mirrors.in_flight(), 1);
        assert_eq!(mirrors.with_in_flight(0).in_flight(), 0);
        assert!(mirrors.with_in_flight(0).try_acquire().is_none());
    }

    #[test]
    fn the_copy_gets_the_shadow_host() {
        let mut req = Request::get("http://catalog:8080/items?x=1")
            .body(())
            .expect("request");
        shadow(&mut req).unwrap();
        assert_eq!(req.uri(), "http://catalog-shadow:8080/items?x=1");
        assert!(req.headers().get(HOST).is_none());

        let mut req = Request::get("/items")
            .header(HOST, "catalog")
            .body(())
            .expect("request");
        shadow(&mut req).unwrap();
        assert_eq!(req.uri(), "/items");
        assert_eq!(req.headers()[HOST], "catalog-shadow");

        // A rewritten URI (the endpoint) with the name in Host: both.
        let mut req = Request::get("http://catalog.shop:80/")
            .header(HOST, "catalog.shop:80")
            .body(())
            .expect("request");
        shadow(&mut req).unwrap();
        assert_eq!(req.uri(), "http://catalog.shop-shadow:80/");
        assert_eq!(req.headers()[HOST], "catalog.shop-shadow:80");
    }
}
