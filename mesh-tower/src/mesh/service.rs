use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONTENT_TYPE, HOST};
use http::uri::{Authority, Parts, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::Body;
use mesh_core::Snapshot;
use mesh_core::engine::Start;
use mesh_core::model::{LbPolicy, Listener};
use mesh_core::ring_hash::request_hash;
use mesh_core::route::RequestView;
use mesh_core::snapshot::ListenerLookup;
use rand::Rng;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::future::{ResponseFuture, Routed};
use super::mirror::{self, MIRROR_TIMEOUT, Mirrors, Targets};
use super::traffic;
use super::{MeshLayer, TargetEndpoint};
use crate::balance::{ActiveGuard, ClusterState, ClusterStates, StateCache};
use crate::body::{MeshBody, ResponseBody};
use crate::connection::ConnectionInfo;
use crate::deadline::{Deadline, grpc_timeout_header};
use crate::error::{BoxError, Error, ErrorKind};
use crate::local_reply::{LocalReply, is_grpc};
use crate::pool::{ensure_authority_in_uri, no_authority};
use crate::source::ConfigSource;
use crate::stats::MeshStats;
use crate::telemetry::DecisionRecord;
use mesh_core::model::RouteConfig;
use mesh_core::snapshot::{RouteHandle, route_index};
use mesh_core::traffic::Traffic;

/// The routing service built by [`MeshLayer`]: routes each request, then
/// calls the inner service `S` with a `Request<MeshBody<B>>` once per
/// attempt (see the [module docs](crate::mesh)).
pub struct Mesh<S, Src> {
    inner: S,
    shared: Shared<Src>,
    /// How this service's last request was routed (see [`LastRoute`]).
    last: LastRoute,
    /// The snapshot this clone last read, rechecked per request against
    /// the source's pointer (see [`ConfigSource::snapshot_cell`]); `None`
    /// for a source without one.
    snapshots: Option<SnapshotCache>,
}

/// A snapshot kept per mesh service clone, with the pointer it came from.
type SnapshotCache = arc_swap::Cache<Arc<arc_swap::ArcSwap<Snapshot>>, Arc<Snapshot>>;

/// How a service's last request was routed: a request to the same
/// authority on the same snapshot reuses its listener and virtual host
/// (no listener, route config or domain lookup), and one on the same
/// single-destination route reuses its cluster state too (no cluster or
/// endpoint lookup). Each clone of a mesh service has its own, cloned
/// with it (reference counts). It keeps the snapshot it was filled from
/// alive until the service's next request on a newer one, as its
/// cluster state keeps that cluster's config.
#[derive(Clone, Default)]
pub(crate) struct LastRoute {
    host: Option<Arc<HostRoute>>,
    /// The index (in `host`'s virtual host) of the single-destination
    /// route whose cluster state `states` holds.
    route: Option<usize>,
    /// The cluster state of the last request: a request to the same
    /// cluster and endpoints (by pointer) reuses it without looking the
    /// cluster's name up in the shared map (see
    /// [`ClusterStates::get_cached`]).
    states: StateCache,
}

/// What routing found for an authority on a snapshot, before the request
/// itself is matched.
struct HostRoute {
    /// Which snapshot (by pointer: held, so its address is not reused).
    snapshot: Arc<Snapshot>,
    authority: Box<str>,
    listener: Arc<Listener>,
    route_config: Arc<RouteConfig>,
    /// The index of the virtual host serving the authority.
    virtual_host: usize,
}

impl LastRoute {
    /// Whether the last request was to `authority` on `snapshot`.
    fn serves(&self, snapshot: &Arc<Snapshot>, authority: &str) -> bool {
        self.host
            .as_ref()
            .is_some_and(|h| Arc::ptr_eq(&h.snapshot, snapshot) && *h.authority == *authority)
    }
}

#[derive(Clone)]
pub(crate) struct Shared<Src> {
    pub(crate) source: Src,
    /// `source`'s [`ConfigSource::snapshot_cell`], asked once.
    pub(crate) snapshot_cell: Option<Arc<arc_swap::ArcSwap<Snapshot>>>,
    pub(crate) states: Arc<ClusterStates>,
    pub(crate) config: Config,
    pub(crate) stats: MeshStats,
    /// The mirroring limits and the copies in flight.
    pub(crate) mirrors: Mirrors,
    /// The limiters of routes with a client-side local rate limit.
    pub(crate) limiters: Arc<crate::ratelimit::RouteLimiters>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) listener_timeout: Duration,
    pub(crate) rewrite_uri: bool,
    pub(crate) retry_buffer_limit: usize,
}

impl<Src> fmt::Debug for Shared<Src> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .field("mirrors", &self.mirrors)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, Src: Clone> Clone for Mesh<S, Src> {
    fn clone(&self) -> Self {
        Mesh {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            last: self.last.clone(),
            snapshots: self.snapshots.clone(),
        }
    }
}

impl<S: fmt::Debug, Src> fmt::Debug for Mesh<S, Src> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, Src: ConfigSource> Mesh<S, Src> {
    /// Routes through the mesh described by `source`, then calls `inner`
    /// (the same as `MeshLayer::new(source).layer(inner)`).
    pub fn new(inner: S, source: Src) -> Self {
        tower::Layer::layer(&MeshLayer::new(source), inner)
    }
}

impl<S, Src> Mesh<S, Src> {
    pub(crate) fn from_shared(inner: S, shared: Shared<Src>) -> Self {
        Mesh {
            inner,
            snapshots: shared.snapshot_cell.clone().map(arc_swap::Cache::new),
            shared,
            last: LastRoute::default(),
        }
    }

    /// Presents `store`'s certificate to clusters that require mTLS (see
    /// [`MeshLayer::certificates`]); the cluster state starts afresh.
    pub(crate) fn set_certificates(&mut self, store: crate::tls::CertStore) {
        self.shared.states = Arc::new(ClusterStates::with_certificates(store));
        self.last = LastRoute::default();
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The config source.
    pub fn source(&self) -> &Src {
        &self.shared.source
    }

    /// What the stack did to requests (retries, overflows, ejections, ...).
    pub fn stats(&self) -> &MeshStats {
        &self.shared.stats
    }
}

impl<S, Src, B, RB> Service<Request<B>> for Mesh<S, Src>
where
    S: Service<Request<MeshBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    Src: ConfigSource,
    B: Body + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    RB: Body + Send + 'static,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = Error;
    type Future = ResponseFuture<S, B, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|e| {
            Error::from_boxed(e.into(), ErrorKind::Upstream, "the inner service failed")
        })
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The routed case builds the response future right here: the
        // engine's state is moved as little as possible.
        let waiting = {
            // The kept snapshot after a pointer compare when the source
            // has a cell, else a load (see `ConfigSource::snapshot_cell`).
            let guard;
            let snapshot: &Arc<Snapshot> = match &mut self.snapshots {
                Some(cache) => cache.load(),
                None => {
                    guard = self.shared.source.snapshot();
                    &guard
                }
            };
            let Some(authority) = authority_of(&req) else {
                return ResponseFuture::failed(no_authority());
            };
            // Asked once here and handed to `plan`, which would ask again.
            let served = self.last.serves(snapshot, authority);
            let lookup = if served {
                None
            } else {
                Some(snapshot.listener_for(authority))
            };
            match lookup {
                None | Some(ListenerLookup::Found(_)) => {
                    let planned =
                        self.shared
                            .plan(snapshot, &req, authority, &mut self.last, served);
                    let routed = match planned {
                        Ok(Planned::Route(routed)) => routed,
                        Ok(Planned::Answer(route)) => {
                            return ResponseFuture::ready(Ok(answer(&route, &req)));
                        }
                        Err(e) => return ResponseFuture::failed(e),
                    };
                    if let Some(refused) = self.shared.rate_limited(&routed, &req) {
                        return ResponseFuture::ready(Ok(refused));
                    }
                    if let Err(e) = apply_traffic(&routed, &mut req) {
                        return ResponseFuture::failed(e);
                    }
                    if let Some(reason) = routed.state.unusable() {
                        let reply = mtls_unavailable(reason, routed.grpc);
                        return ResponseFuture::ready(Ok(reply));
                    }
                    return ResponseFuture::start(
                        routed,
                        req,
                        &mut self.inner,
                        &self.shared.stats,
                        self.shared.config,
                        mirror::launch::<S, B, RB>,
                    );
                }
                Some(ListenerLookup::Missing) => {
                    return ResponseFuture::failed(not_found(authority));
                }
                Some(ListenerLookup::Unknown) => authority.to_owned(),
            }
        };
        let inner = self.take_ready();
        let shared = self.shared.clone();
        ResponseFuture::waiting(Box::pin(async move {
            shared.send_after_wait(inner, req, waiting).await
        }))
    }
}

impl<S: Clone, Src> Mesh<S, Src> {
    /// The readied service goes to a request that uses it later; this one
    /// keeps a clone (tower's guidance for services used in a future).
    fn take_ready(&mut self) -> S {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

impl<Src: ConfigSource> Shared<Src> {
    /// Routes `req`, whose authority has a listener in `snapshot`: the
    /// route, and once per request the weighted cluster (retries stay in
    /// it). What depends on the authority only comes from `last` when it
    /// served this authority on this snapshot, and is kept there;
    /// `served` is what [`LastRoute::serves`] said of it (the caller asked
    /// already).
    pub(crate) fn plan<B>(
        &self,
        snapshot: &Arc<Snapshot>,
        req: &Request<B>,
        authority: &str,
        last: &mut LastRoute,
        served: bool,
    ) -> Result<Planned, Error> {
        // Built only when a matcher or a hash policy reads more than the
        // path (see the route match below).
        let view = || RequestView::new(req.method(), req.uri(), req.headers(), authority);
        let no_route = |e: mesh_core::Error| {
            Error::new(
                ErrorKind::NoRoute,
                format!(
                    "no route for {} {authority:?} {}",
                    req.method(),
                    req.uri().path()
                ),
            )
            .with_source(e)
        };
        if !served {
            let Some(listener) = snapshot.listener_handle(authority) else {
                return Err(not_found(authority));
            };
            let (route_config, virtual_host) = snapshot
                .virtual_host_for(listener, authority)
                .map_err(no_route)?;
            *last = LastRoute {
                host: Some(Arc::new(HostRoute {
                    snapshot: Arc::clone(snapshot),
                    authority: authority.into(),
                    listener: listener.clone(),
                    route_config: route_config.clone(),
                    virtual_host,
                })),
                route: None,
                states: std::mem::take(&mut last.states),
            };
        }
        let LastRoute {
            host: Some(host),
            route: last_route,
            states: cache,
        } = last
        else {
            return Err(not_found(authority));
        };
        let listener = &*host.listener;
        let vh = &host.route_config.virtual_hosts[host.virtual_host];
        // A first route that reads only the path (Istio's catch-all
        // `prefix: /`, the only route of a service without a virtual
        // service) is checked on the path alone: no request view, no
        // route walk (about 120 instructions per request).
        let index = match vh.routes.first() {
            Some(first)
                if first.matcher.is_path_only() && first.matcher.matches_path(req.uri().path()) =>
            {
                0
            }
            _ => route_index(vh, &view()).map_err(no_route)?,
        };
        let Some(handle) = RouteHandle::new(&vh.routes, index) else {
            return Err(not_found(authority));
        };
        if handle
            .policy
            .traffic
            .as_ref()
            .is_some_and(|t| t.answer.is_some())
        {
            return Ok(Planned::Answer(handle));
        }
        // The same single-destination route of the same snapshot goes to
        // the same cluster and endpoints: their state is the cached one
        // while the shared map has not changed.
        let cached = match *last_route {
            Some(i) if i == index => cache.fresh(self.states.generation()).cloned(),
            _ => None,
        };
        let route = &*handle;
        let mut destination = 0;
        let state = match cached {
            Some(state) => state,
            None => {
                let resolved = snapshot
                    .destination(listener, &vh.routes, index, || rand::rng().random())
                    .map_err(no_route)?;
                destination = resolved.destination;
                let state = self.states.get_cached(
                    cache,
                    snapshot,
                    resolved.cluster,
                    resolved.endpoints,
                    || self.source.locality(),
                );
                *last_route = (route.action.clusters().len() == 1).then_some(index);
                state
            }
        };
        let cluster = state.cluster();
        if state.len() == 0 {
            return Err(Error::new(
                ErrorKind::NoEndpoints,
                format!(
                    "cluster {:?} has no endpoints (request to {authority:?}, route {:?})",
                    cluster.name, route.name
                ),
            ));
        }
        let policy = &route.policy;
        let hash = match cluster.lb_policy {
            LbPolicy::RingHash { .. } if !policy.hash_policy.is_empty() => {
                let source_ip = req
                    .extensions()
                    .get::<ConnectionInfo>()
                    .map(|c| c.peer_addr().ip());
                request_hash(&policy.hash_policy, &view(), source_ip)
            }
            _ => None,
        };
        // Mirrors: one `Option` check for a route without traffic rules.
        let mirrors = match &policy.traffic {
            Some(t) if !t.mirrors.is_empty() => self.mirror_targets(snapshot, t, policy.timeout),
            _ => None,
        };
        let record = req.extensions().get::<DecisionRecord>().cloned();
        if let Some(r) = &record {
            // Route and cluster in one set-once cell (one write, not two).
            r.routed(
                &snapshot.versions,
                &listener.name,
                &route.name,
                &cluster.name,
                cluster.lb_policy,
            );
            r.timeouts(
                policy.timeout,
                policy
                    .retry
                    .as_ref()
                    .filter(|r| r.num_retries > 0 && !r.retry_on.is_empty())
                    .and_then(|p| p.per_try_timeout),
            );
        }
        // The caller's deadline: the `Deadline` extension or a gRPC
        // `grpc-timeout`; the clock is read only when there is one.
        let grpc = is_grpc_request(req.headers());
        let extension = Deadline::from_request(req);
        let now = (extension.is_some() || grpc).then(Instant::now);
        let caller = now.and_then(|now| {
            let header = grpc
                .then(|| grpc_timeout_header(req.headers(), now))
                .flatten();
            let at = match (extension.map(|d| d.at()), header) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }?;
            Some(at.saturating_duration_since(now))
        });
        Ok(Planned::Route(Routed {
            route: handle,
            // Whether the body is whole is read where the body is taken
            // apart (`ResponseFuture::start`).
            start: Start {
                deadline: caller,
                replayable: false,
            },
            now,
            state,
            hash,
            record,
            grpc,
            destination,
            mirrors,
        }))
    }

    /// The refusal of a request its route's client-side local rate limit
    /// refuses (Envoy's answer, flag `RL`); `None`, after one pointer
    /// check, for a route without a limit. Checked before the route's
    /// header changes, as Envoy's filter runs before the router.
    fn rate_limited<B, RB>(
        &self,
        routed: &Routed,
        req: &Request<B>,
    ) -> Option<Response<ResponseBody<RB>>> {
        let config = routed.route.policy.rate_limit.as_ref()?;
        self.refuse(config, routed.record.as_ref(), req)
    }

    #[cold]
    fn refuse<B, RB>(
        &self,
        config: &Arc<mesh_core::ratelimit::RateLimitConfig>,
        record: Option<&DecisionRecord>,
        req: &Request<B>,
    ) -> Option<Response<ResponseBody<RB>>> {
        let limiter = self.limiters.get(config);
        if limiter.check(req) != crate::ratelimit::Verdict::Refused {
            return None;
        }
        if let Some(r) = record {
            r.flag(crate::telemetry::ResponseFlags::RATE_LIMITED);
        }
        let (head, body) = limiter.refusal(req.headers());
        Some(head.map(|()| ResponseBody::local(body)))
    }

    /// The mirror clusters whose share this request falls in (one draw
    /// per mirror), with their state; `None` when there is none. A mirror
    /// cluster the snapshot lacks is counted as a failed copy.
    #[cold]
    fn mirror_targets(
        &self,
        snapshot: &Snapshot,
        traffic: &Traffic,
        timeout: Option<Duration>,
    ) -> Option<Box<Targets>> {
        let mut rng = rand::rng();
        let mut clusters = Vec::new();
        for m in traffic.mirrors.iter() {
            if !m.fraction.hit(rng.random()) {
                continue;
            }
            match (
                snapshot.clusters.get(&*m.cluster),
                snapshot.endpoints.get(&*m.cluster),
            ) {
                (Some(cluster), Some(cla)) => {
                    clusters.push(
                        self.states
                            .get(snapshot, cluster, cla, || self.source.locality()),
                    );
                }
                _ => {
                    self.stats.add_mirror_failed();
                    tracing::debug!(cluster = %m.cluster, "mirror cluster not in the configuration");
                }
            }
        }
        if clusters.is_empty() {
            return None;
        }
        let timeout = timeout
            .filter(|t| !t.is_zero())
            .map_or(MIRROR_TIMEOUT, |t| t.min(MIRROR_TIMEOUT));
        Some(Box::new(Targets {
            clusters,
            timeout,
            mirrors: self.mirrors.clone(),
        }))
    }

    /// The slow path: wait for `authority`'s config, then route and send.
    async fn send_after_wait<S, B, RB>(
        self,
        inner: S,
        mut req: Request<B>,
        authority: String,
    ) -> Result<Response<ResponseBody<RB>>, Error>
    where
        S: Service<Request<MeshBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
        RB: Body + Send + 'static,
    {
        let waited = tokio::time::timeout(
            self.config.listener_timeout,
            self.source.wait_for_listener(&authority),
        )
        .await;
        let routed = {
            let snapshot = self.source.snapshot();
            let lookup = snapshot.listener_for(&authority);
            match (waited, lookup) {
                (_, ListenerLookup::Found(_)) => {
                    let mut last = LastRoute::default();
                    match self.plan(&snapshot, &req, &authority, &mut last, false)? {
                        Planned::Route(routed) => routed,
                        Planned::Answer(route) => return Ok(answer(&route, &req)),
                    }
                }
                // The xDS client's error carries why the server says so
                // (`exportTo`, in its `resource_errors` entry).
                (Ok(Err(e)), ListenerLookup::Missing | ListenerLookup::Unknown)
                    if is_not_found(&*e) =>
                {
                    return Err(not_found(&authority).with_source(e));
                }
                (_, ListenerLookup::Missing) | (Ok(Ok(())), ListenerLookup::Unknown) => {
                    return Err(not_found(&authority));
                }
                (Ok(Err(e)), ListenerLookup::Unknown) => {
                    return Err(Error::new(
                        ErrorKind::Discovery,
                        format!("cannot get the configuration of {authority:?}"),
                    )
                    .with_source(e));
                }
                (Err(_elapsed), ListenerLookup::Unknown) => {
                    let error = Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "no configuration for {authority:?} after {:?}: is the control \
                             server reachable, and does the mesh have this service?",
                            self.config.listener_timeout
                        ),
                    );
                    return Err(match self.source.last_error() {
                        Some(cause) => error.with_source(cause),
                        None => error,
                    });
                }
            }
        };
        if let Some(refused) = self.rate_limited(&routed, &req) {
            return Ok(refused);
        }
        apply_traffic(&routed, &mut req)?;
        if let Some(reason) = routed.state.unusable() {
            return Ok(mtls_unavailable(reason, is_grpc(req.headers())));
        }
        let mut inner = inner.ready_oneshot().await.map_err(|e| {
            Error::from_boxed(e.into(), ErrorKind::Upstream, "the inner service failed")
        })?;
        let launch: mirror::Launch<S, B> = mirror::launch::<S, B, RB>;
        ResponseFuture::start(routed, req, &mut inner, &self.stats, self.config, launch).await
    }
}

/// What routing decided for a request.
pub(crate) enum Planned {
    /// Send it to a cluster.
    Route(Routed),
    /// The route answers itself (a redirect or a direct response).
    Answer(RouteHandle),
}

/// The answer of a route that answers itself (see [`Planned::Answer`]).
fn answer<B, RB>(route: &RouteHandle, req: &Request<B>) -> Response<ResponseBody<RB>> {
    match route.policy.traffic.as_deref() {
        Some(
            traffic @ Traffic {
                answer: Some(answer),
                ..
            },
        ) => traffic::local_answer(answer, traffic, req),
        // `Planned::Answer` is made only for a route with an answer.
        _ => local(
            LocalReply {
                cause: crate::local_reply::Cause::FaultAbort,
                http: http::StatusCode::INTERNAL_SERVER_ERROR,
                grpc: Some(crate::local_reply::code::INTERNAL),
                message: format!("route {:?} has no answer", route.name),
            },
            is_grpc(req.headers()),
        ),
    }
}

/// Applies the request side of the route's traffic rules (header changes,
/// rewrites) to the request before the engine sends it.
fn apply_traffic<B>(routed: &Routed, req: &mut Request<B>) -> Result<(), Error> {
    match &routed.route.policy.traffic {
        Some(t) => {
            traffic::apply_to_request(t, routed.destination, &routed.route.matcher.path, req)
        }
        None => Ok(()),
    }
}

/// A response the mesh makes itself.
pub(crate) fn local<RB>(reply: LocalReply, grpc: bool) -> Response<ResponseBody<RB>> {
    let (head, body) = reply.into_parts(grpc);
    head.map(|()| ResponseBody::local(body))
}

/// The local reply to a request for a cluster that requires mTLS this
/// client cannot do: 503 / UNAVAILABLE naming the cluster and the fix,
/// marked `x-proxyless-local-reply: mtls-unavailable`.
fn mtls_unavailable<RB>(reason: &str, grpc: bool) -> Response<ResponseBody<RB>> {
    let reply = LocalReply {
        cause: crate::local_reply::Cause::FaultAbort,
        http: http::StatusCode::SERVICE_UNAVAILABLE,
        grpc: Some(crate::local_reply::code::UNAVAILABLE),
        message: reason.to_owned(),
    };
    let mut response = local(reply, grpc);
    response.headers_mut().insert(
        crate::local_reply::LOCAL_REPLY_HEADER,
        HeaderValue::from_static("mtls-unavailable"),
    );
    response
}

/// Marks `req` with its target and, in rewrite mode, points its URI at it.
pub(crate) fn prepare_target<B>(
    req: &mut Request<MeshBody<B>>,
    active: &ActiveGuard,
    state: &ClusterState,
    config: &Config,
) -> Result<(), Error> {
    if config.rewrite_uri {
        let endpoint = active.authority().cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidRequest,
                format!(
                    "endpoint {} of cluster {:?} cannot be written as a URI authority",
                    active.address(),
                    state.name()
                ),
            )
        })?;
        rewrite_to_endpoint(req, endpoint)?;
    } else {
        ensure_authority_in_uri(req)?;
    }
    // In the body, not the extensions: no allocation (see `CarriesTarget`).
    req.body_mut().set_target(TargetEndpoint::with_connections(
        active.address(),
        state.connections(),
    ));
    Ok(())
}

/// Whether a request is gRPC, as [`is_grpc`] decides (its first
/// `content-type` value), found without a hash lookup in a small map.
///
/// Why: a client request reaches the mesh with no headers or a few (the
/// trace headers telemetry adds); a lookup hashes the name and probes
/// (about 85 instructions on such a request), while a walk over a few
/// names compares standard-header tags (a custom name differs at once).
/// [`HeaderMap::iter`](http::HeaderMap::iter) yields each name's first
/// value first, so the value found is the one `get` returns.
fn is_grpc_request(headers: &http::HeaderMap) -> bool {
    /// Up to this many names a walk is cheaper than a hashed lookup.
    const WALK: usize = 4;
    if headers.is_empty() {
        return false;
    }
    if headers.keys_len() > WALK {
        return is_grpc(headers);
    }
    headers
        .iter()
        .find(|(name, _)| **name == CONTENT_TYPE)
        .is_some_and(|(_, v)| v.as_bytes().starts_with(b"application/grpc"))
}

/// The authority a request is addressed to: the URI's, else `Host`.
fn authority_of<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req.headers().get(HOST)?.to_str().ok(),
    }
}

/// Whether the config source said the listener does not exist.
fn is_not_found(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<mesh_xds_client::Error>()
        .is_some_and(|e| e.kind() == mesh_xds_client::ErrorKind::NotFound)
}

fn not_found(authority: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no such service {authority:?} in the mesh"),
    )
}

pub(crate) fn upstream_error(e: BoxError, active: &ActiveGuard) -> Error {
    Error::from_boxed(
        e,
        ErrorKind::Upstream,
        format_args!(
            "request to endpoint {} of cluster {:?} failed",
            active.address(),
            active.cluster_state().name()
        ),
    )
}

/// `http://catalog/items?x` → `http://10.0.0.7:8080/items?x` with
/// `Host: catalog` (unless the request already has a `Host`).
fn rewrite_to_endpoint<B>(req: &mut Request<B>, endpoint: Authority) -> Result<(), Error> {
    let Parts {
        authority,
        path_and_query,
        ..
    } = std::mem::take(req.uri_mut()).into_parts();
    if let Some(original) = authority
        && !req.headers().contains_key(HOST)
    {
        let value = HeaderValue::from_str(original.as_str()).map_err(|e| {
            Error::new(ErrorKind::InvalidRequest, "invalid authority").with_source(e)
        })?;
        req.headers_mut().insert(HOST, value);
    }
    let mut parts = Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(endpoint);
    parts.path_and_query = Some(path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/")));
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| {
        Error::new(ErrorKind::InvalidRequest, "cannot rewrite the URI").with_source(e)
    })?;
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use mesh_core::model::{
        Cluster, ClusterLoadAssignment, Endpoint, Locality, LocalityEndpoints, Protocol, Route,
        RouteConfig, RouteMatch, VirtualHost, WeightedClusters,
    };
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;
    use tower::Layer;

    use mesh_core::model::{AbortStatus, RoutePolicy};

    use super::*;
    use crate::source::StaticSource;
    use crate::telemetry::{AttemptOutcome, BreakerLimit};

    type Chunk = Result<Frame<Bytes>, Infallible>;
    type Body = StreamBody<UnboundedReceiverStream<Chunk>>;
    type Seen = (
        Uri,
        Option<HeaderValue>,
        TargetEndpoint,
        Option<HeaderValue>,
    );

    pub(crate) fn snapshot(ports: &[u16], policy: RoutePolicy) -> Snapshot {
        let mut s = Snapshot::default();
        s.listeners.insert(
            "svc".into(),
            Arc::new(Listener {
                name: "svc".into(),
                route_config_name: "svc:80".into(),
            }),
        );
        s.route_configs.insert(
            "svc:80".into(),
            Arc::new(RouteConfig {
                name: "svc:80".into(),
                virtual_hosts: vec![VirtualHost {
                    name: "svc:80".into(),
                    domains: vec!["svc".into()].into(),
                    routes: vec![Route {
                        name: "all".into(),
                        matcher: RouteMatch::any(),
                        action: WeightedClusters::single("c"),
                        policy,
                    }]
                    .into(),
                }]
                .into(),
            }),
        );
        s.clusters.insert(
            "c".into(),
            Arc::new(Cluster {
                lb_policy: LbPolicy::LeastRequest,
                ..Cluster::new("c", Protocol::Http1)
            }),
        );
        let endpoints = ports
            .iter()
            .map(|p| Endpoint {
                address: SocketAddr::from(([127, 0, 0, 1], *p)),
                weight: 1,
                labels: Arc::from([]),
            })
            .collect();
        let cla = ClusterLoadAssignment::new(
            "c".into(),
            vec![LocalityEndpoints {
                locality: Locality::default(),
                weight: 1,
                priority: 0,
                endpoints,
            }],
        )
        .unwrap();
        s.endpoints.insert("c".into(), Arc::new(cla));
        s
    }

    /// An inner service that records what it was asked and answers with a
    /// body that stays open until its sender is dropped.
    #[derive(Clone, Default)]
    struct Recorder {
        seen: Arc<Mutex<Vec<Seen>>>,
        open: Arc<Mutex<Vec<mpsc::UnboundedSender<Chunk>>>>,
    }

    impl Service<Request<MeshBody<Empty<Bytes>>>> for Recorder {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<MeshBody<Empty<Bytes>>>) -> Self::Future {
            let target = TargetEndpoint::of(&req).cloned().unwrap();
            // The target rides in the body: no extension map is made for it.
            assert!(req.extensions().get::<TargetEndpoint>().is_none());
            let host = req.headers().get(HOST).cloned();
            let timeout = req.headers().get("x-envoy-expected-rq-timeout-ms").cloned();
            self.seen
                .lock()
                .unwrap()
                .push((req.uri().clone(), host, target, timeout));
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x"))));
            self.open.lock().unwrap().push(tx);
            std::future::ready(Ok(Response::new(StreamBody::new(
                UnboundedReceiverStream::new(rx),
            ))))
        }
    }

    async fn send(
        mesh: &mut Mesh<Recorder, StaticSource>,
        uri: &str,
    ) -> Result<Response<ResponseBody<Body>>, Error> {
        mesh.ready().await?;
        mesh.call(Request::get(uri).body(Empty::new()).unwrap())
            .await
    }

    #[tokio::test]
    async fn rewrite_mode_points_the_uri_at_the_endpoint_and_keeps_the_name_in_host() {
        let recorder = Recorder::default();
        let layer = MeshLayer::new(StaticSource::new(snapshot(
            &[41000],
            RoutePolicy::default(),
        )));
        let mut mesh = layer.layer(recorder.clone());
        let _response = send(&mut mesh, "http://svc/items?page=2").await.unwrap();
        let (uri, host, target, _) = recorder.seen.lock().unwrap().pop().unwrap();
        assert_eq!(uri, "http://127.0.0.1:41000/items?page=2");
        assert_eq!(host.unwrap(), "svc");
        assert_eq!(target.addr(), SocketAddr::from(([127, 0, 0, 1], 41000)));
        assert_eq!(target.cluster(), "c");
        assert_eq!(target.protocol(), Protocol::Http1);
    }

    /// A mesh service keeps the snapshot it read (checked per request
    /// against the source's pointer): a snapshot published after is used
    /// by the same clone's next request, and by a clone made before it.
    #[tokio::test]
    async fn a_published_snapshot_reaches_the_next_request_of_each_clone() {
        let recorder = Recorder::default();
        let source = StaticSource::new(snapshot(&[41000], RoutePolicy::default()));
        assert!(
            source.snapshot_cell().is_some(),
            "the cached path is tested"
        );
        let mut mesh = MeshLayer::new(source.clone()).layer(recorder.clone());
        let mut clone = mesh.clone();
        for mesh in [&mut mesh, &mut clone] {
            let _response = send(mesh, "http://svc/").await.unwrap();
            let (_, _, target, _) = recorder.seen.lock().unwrap().pop().unwrap();
            assert_eq!(target.addr().port(), 41000);
        }
        source.publish(snapshot(&[41001], RoutePolicy::default()));
        for mesh in [&mut mesh, &mut clone] {
            let _response = send(mesh, "http://svc/").await.unwrap();
            let (_, _, target, _) = recorder.seen.lock().unwrap().pop().unwrap();
            assert_eq!(target.addr().port(), 41001);
        }
    }

    /// The walk of `is_grpc_request` answers as the hashed lookup of
    /// `is_grpc` on small and large maps, with the first value deciding.
    #[test]
    fn grpc_requests_are_found_by_a_walk_as_by_a_lookup() {
        use http::HeaderMap;
        let mut maps = vec![HeaderMap::new()];
        for extra in 0..6 {
            for ct in [None, Some("application/grpc+proto"), Some("text/plain")] {
                let mut h = HeaderMap::new();
                for i in 0..extra {
                    h.insert(
                        http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                        HeaderValue::from_static("v"),
                    );
                }
                if let Some(ct) = ct {
                    h.append(CONTENT_TYPE, HeaderValue::from_static(ct));
                    // A second value never decides.
                    h.append(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                }
                maps.push(h);
            }
        }
        let mut grpc = 0;
        for h in &maps {
            assert_eq!(is_grpc_request(h), is_grpc(h), "{h:?}");
            grpc += usize::from(is_grpc(h));
        }
        assert_eq!(grpc, 6, "both answers are tried");
    }

    #[tokio::test]
    async fn keep_mode_leaves_the_uri_alone() {
        let recorder = Recorder::default();
        let layer = MeshLayer::new(StaticSource::new(snapshot(
            &[41000],
            RoutePolicy::default(),
        )))
        .rewrite_uri(false);
        let mut mesh = layer.layer(recorder.clone());
        let _response = send(&mut mesh, "http://svc/items").await.unwrap();
        let (uri, host, _, _) = recorder.seen.lock().unwrap().pop().unwrap();
        assert_eq!(uri, "http://svc/items");
        assert_eq!(host, None);
    }

    #[tokio::test]
    async fn a_route_timeout_is_announced_to_the_endpoint() {
        let recorder = Recorder::default();
        let policy = RoutePolicy {
            timeout: Some(Duration::from_secs(2)),
            ..RoutePolicy::default()
        };
        let layer = MeshLayer::new(StaticSource::new(snapshot(&[41000], policy)));
        let mut mesh = layer.layer(recorder.clone());
        let _response = send(&mut mesh, "http://svc/").await.unwrap();
        let (_, _, _, timeout) = recorder.seen.lock().unwrap().pop().unwrap();
        let ms: u64 = timeout.unwrap().to_str().unwrap().parse().unwrap();
        assert!(ms <= 2000 && ms > 1500, "{ms}");
    }

    #[tokio::test]
    async fn least_request_avoids_the_endpoint_whose_response_is_still_streaming() {
        let recorder = Recorder::default();
        let layer = MeshLayer::new(StaticSource::new(snapshot(&[1, 2], RoutePolicy::default())));
        let mut mesh = layer.layer(recorder.clone());
        // The first response stays open: its endpoint is busy.
        let busy_response = send(&mut mesh, "http://svc/").await.unwrap();
        let busy = recorder.seen.lock().unwrap()[0].2.addr();
        for _ in 0..20 {
            let response = send(&mut mesh, "http://svc/").await.unwrap();
            let target = recorder.seen.lock().unwrap().last().unwrap().2.addr();
            assert_ne!(target, busy);
            // Finish this response: its endpoint is idle again.
            recorder.open.lock().unwrap().pop();
            response.into_body().collect().await.unwrap();
        }
        // Once the busy body ends, nothing is in flight anywhere.
        drop(recorder.open.lock().unwrap().pop());
        busy_response.into_body().collect().await.unwrap();
        let state = {
            let snapshot = mesh.shared.source.snapshot();
            let cluster = snapshot.clusters.get("c").unwrap().clone();
            let cla = snapshot.endpoints.get("c").unwrap().clone();
            mesh.shared.states.get(&snapshot, &cluster, &cla, || None)
        };
        assert_eq!((state.in_flight(0), state.in_flight(1)), (0, 0));
        assert_eq!(state.breaker().active_requests(), 0);
    }

    #[tokio::test]
    async fn a_cluster_without_endpoints_is_an_error_naming_it() {
        let mut mesh = MeshLayer::new(StaticSource::new(snapshot(&[], RoutePolicy::default())))
            .layer(Recorder::default());
        let e = send(&mut mesh, "http://svc/").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoEndpoints);
        assert!(e.to_string().contains("cluster \"c\""), "{e}");
    }

    /// An inner service answering each request with the next scripted
    /// status (200 once the script is over), with a one-frame body.
    #[derive(Clone, Default)]
    struct Scripted {
        statuses: Arc<Mutex<Vec<u16>>>,
        /// Per call: the endpoint and the `traceparent` sent.
        seen: Arc<Mutex<Vec<Sent>>>,
    }

    type Sent = (SocketAddr, Option<HeaderValue>);

    impl Service<Request<MeshBody<Empty<Bytes>>>> for Scripted {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<MeshBody<Empty<Bytes>>>) -> Self::Future {
            let target = TargetEndpoint::of(&req).unwrap().addr();
            let traceparent = req.headers().get("traceparent").cloned();
            self.seen.lock().unwrap().push((target, traceparent));
            let status = {
                let mut statuses = self.statuses.lock().unwrap();
                if statuses.is_empty() {
                    200
                } else {
                    statuses.remove(0)
                }
            };
            let mut response = Response::new(Full::new(Bytes::from_static(b"x")));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            std::future::ready(Ok(response))
        }
    }

    async fn send_recorded<S>(
        mesh: &mut Mesh<S, StaticSource>,
        uri: &str,
    ) -> (http::StatusCode, DecisionRecord)
    where
        S: Service<Request<MeshBody<Empty<Bytes>>>, Response = Response<Full<Bytes>>>
            + Clone
            + Send
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let record = DecisionRecord::new();
        let mut req = Request::get(uri).body(Empty::new()).unwrap();
        req.extensions_mut().insert(record.clone());
        mesh.ready().await.unwrap();
        let response = mesh.call(req).await.unwrap();
        let status = response.status();
        response.into_body().collect().await.unwrap();
        (status, record)
    }

    fn outcomes(record: &DecisionRecord) -> Vec<AttemptOutcome> {
        record
            .recorded_attempts()
            .map(|a| *a.outcome.get().expect("every attempt is finished"))
            .collect()
    }

    fn answered(status: u16) -> AttemptOutcome {
        AttemptOutcome::Response {
            status: http::StatusCode::from_u16(status).unwrap(),
            grpc_status: None,
        }
    }

    #[tokio::test]
    async fn the_fast_path_records_route_cluster_balancer_and_the_attempt() {
        let inner = Scripted::default();
        let mut mesh = MeshLayer::new(StaticSource::new(snapshot(
            &[41000],
            RoutePolicy::default(),
        )))
        .layer(inner.clone());
        let (status, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(status, 200);
        assert_eq!(record.listener_name().map(|n| &**n), Some("svc"));
        assert_eq!(record.route_name().map(|n| &**n), Some("all"));
        assert_eq!(record.cluster_name().map(|n| &**n), Some("c"));
        assert_eq!(record.attempts(), 1);
        assert_eq!(
            record.endpoint().map(|(a, _)| a),
            Some(SocketAddr::from(([127, 0, 0, 1], 41000)))
        );
        assert_eq!(outcomes(&record), [answered(200)]);
        assert!(record.flags().is_empty());
        // The balancer is read back through the span attributes.
        #[cfg(feature = "telemetry")]
        {
            let attributes: Vec<String> = record
                .attributes()
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect();
            assert!(
                attributes.contains(&"mesh.lb_policy=LEAST_REQUEST".to_owned()),
                "{attributes:?}"
            );
        }
    }

    #[tokio::test]
    async fn each_attempt_is_recorded_with_its_outcome_and_the_retry_reason() {
        let inner = Scripted::default();
        inner.statuses.lock().unwrap().extend([503, 503]);
        let policy = RoutePolicy {
            timeout: Some(Duration::from_secs(5)),
            retry: Some(mesh_core::model::RetryPolicy {
                num_retries: 3,
                backoff_base: Duration::ZERO,
                backoff_max: Duration::ZERO,
                ..mesh_core::model::RetryPolicy::istio_default()
            }),
            ..RoutePolicy::default()
        };
        let mut mesh =
            MeshLayer::new(StaticSource::new(snapshot(&[1, 2, 3], policy))).layer(inner.clone());
        let (status, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(status, 200);
        assert_eq!(record.attempts(), 3);
        assert_eq!(
            outcomes(&record),
            [answered(503), answered(503), answered(200)]
        );
        assert_eq!(
            record.retry_reasons(),
            mesh_core::model::RetryOn::RETRIABLE_STATUS_CODES
        );
        assert_eq!(
            record.retries_by_reason().collect::<Vec<_>>(),
            [("retriable-status-codes", 2)]
        );
        // Retries went to endpoints not tried yet.
        let endpoints: std::collections::BTreeSet<_> =
            inner.seen.lock().unwrap().iter().map(|(a, _)| *a).collect();
        assert_eq!(endpoints.len(), 3);
        assert!(record.flags().is_empty());
    }

    #[tokio::test]
    async fn retries_used_up_are_flagged_urx() {
        let inner = Scripted::default();
        inner.statuses.lock().unwrap().extend([503, 503]);
        let policy = RoutePolicy {
            retry: Some(mesh_core::model::RetryPolicy {
                num_retries: 1,
                backoff_base: Duration::ZERO,
                backoff_max: Duration::ZERO,
                ..mesh_core::model::RetryPolicy::istio_default()
            }),
            ..RoutePolicy::default()
        };
        let mut mesh =
            MeshLayer::new(StaticSource::new(snapshot(&[1, 2], policy))).layer(inner.clone());
        let (status, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(status, 503);
        assert_eq!(record.attempts(), 2);
        assert_eq!(record.flags().to_string(), "URX");
    }

    #[tokio::test]
    async fn an_injected_abort_is_recorded_without_an_attempt() {
        let policy = RoutePolicy {
            fault: Some(mesh_core::model::FaultPolicy {
                delay: None,
                abort: Some(mesh_core::model::FaultAbort {
                    fraction: mesh_core::model::Fraction::ALL,
                    status: AbortStatus::Http(418),
                }),
            }),
            ..RoutePolicy::default()
        };
        let mut mesh =
            MeshLayer::new(StaticSource::new(snapshot(&[1], policy))).layer(Scripted::default());
        let (status, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(status, 418);
        assert_eq!(record.attempts(), 0);
        assert_eq!(record.flags().to_string(), "FI");
        // The abort status is read back through the span attributes.
        #[cfg(feature = "telemetry")]
        {
            let attributes: Vec<String> = record
                .attributes()
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect();
            assert!(
                attributes.contains(&"mesh.fault.abort_http_status=418".to_owned()),
                "{attributes:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_breaker_overflow_is_recorded_with_its_limit() {
        let recorder = Recorder::default();
        let mut s = snapshot(&[1], RoutePolicy::default());
        let cluster = Arc::new(Cluster {
            lb_policy: LbPolicy::RoundRobin,
            circuit_breakers: mesh_core::model::CircuitBreakers {
                max_requests: 1,
                ..Default::default()
            },
            ..Cluster::new("c", Protocol::Http1)
        });
        s.clusters.insert("c".into(), cluster);
        let mut mesh = MeshLayer::new(StaticSource::new(s)).layer(recorder.clone());
        // The first response stays open: it holds the only request slot.
        let _busy = send(&mut mesh, "http://svc/").await.unwrap();
        let record = DecisionRecord::new();
        let mut req = Request::get("http://svc/").body(Empty::new()).unwrap();
        req.extensions_mut().insert(record.clone());
        mesh.ready().await.unwrap();
        let response = mesh.call(req).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(record.flags().to_string(), "UO");
        assert_eq!(
            record.overflows().collect::<Vec<_>>(),
            [BreakerLimit::MaxRequests]
        );
        assert_eq!(record.attempts(), 0);
    }

    #[tokio::test]
    async fn a_passed_deadline_is_flagged_and_a_live_one_recorded() {
        let inner = Scripted::default();
        let mut mesh = MeshLayer::new(StaticSource::new(snapshot(&[1], RoutePolicy::default())))
            .layer(inner.clone());
        for (left, flags) in [(Duration::ZERO, "DT"), (Duration::from_secs(30), "")] {
            let record = DecisionRecord::new();
            let mut req = Request::get("http://svc/").body(Empty::new()).unwrap();
            req.extensions_mut().insert(record.clone());
            req.extensions_mut().insert(Deadline::after(left));
            mesh.ready().await.unwrap();
            let response = mesh.call(req).await.unwrap();
            response.into_body().collect().await.unwrap();
            assert!(record.flags().to_string().starts_with(flags));
            // What was left is read back through the span attributes.
            #[cfg(feature = "telemetry")]
            if flags.is_empty() {
                assert!(record.flags().is_empty());
                let remaining = record
                    .attributes()
                    .into_iter()
                    .find(|kv| kv.key.as_str() == "mesh.deadline.remaining_ms")
                    .map(|kv| kv.value.to_string().parse::<f64>().unwrap())
                    .unwrap();
                assert!(remaining > 29_000.0 && remaining <= 30_000.0, "{remaining}");
            }
        }
    }

    #[tokio::test]
    async fn an_ejection_caused_by_the_response_is_recorded() {
        let inner = Scripted::default();
        inner.statuses.lock().unwrap().push(500);
        let mut s = snapshot(&[1, 2], RoutePolicy::default());
        let cluster = Arc::new(Cluster {
            outlier_detection: Some(mesh_core::model::OutlierDetection {
                consecutive_5xx: Some(1),
                consecutive_gateway_errors: None,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_percent: 100,
                min_health_percent: 0,
            }),
            ..Cluster::new("c", Protocol::Http1)
        });
        s.clusters.insert("c".into(), cluster);
        let mut mesh = MeshLayer::new(StaticSource::new(s)).layer(inner.clone());
        let (status, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(status, 500);
        assert_eq!(record.ejections(), 1);
        let (_, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(record.ejections(), 0);
    }

    #[tokio::test]
    async fn without_a_record_nothing_is_recorded_and_no_header_is_added() {
        let inner = Scripted::default();
        let mut mesh = MeshLayer::new(StaticSource::new(snapshot(&[1], RoutePolicy::default())))
            .layer(inner.clone());
        mesh.ready().await.unwrap();
        let response = mesh
            .call(Request::get("http://svc/").body(Empty::new()).unwrap())
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(inner.seen.lock().unwrap()[0].1, None);
    }

    /// Mirroring, through an inner service that records every request
    /// (cluster, `Host`, URI, a header, body) and keeps the responses to
    /// the mirror cluster open until the test lets them go.
    mod mirrors {
        use std::future::Future;
        use std::pin::Pin;

        use mesh_core::model::Fraction;
        use mesh_core::traffic::{HeaderOps, HeaderRules, Mirror, header_name, header_value};

        use super::*;

        #[derive(Debug, Clone, PartialEq)]
        struct Copy {
            cluster: String,
            host: Option<HeaderValue>,
            uri: Uri,
            tag: Option<HeaderValue>,
            attempt: Option<HeaderValue>,
            body: Bytes,
        }

        #[derive(Clone, Default)]
        struct Copies {
            seen: Arc<Mutex<Vec<Copy>>>,
            open: Arc<Mutex<Vec<mpsc::UnboundedSender<Chunk>>>>,
        }

        impl Copies {
            fn to(&self, cluster: &str) -> Vec<Copy> {
                let seen = self.seen.lock().unwrap();
                seen.iter()
                    .filter(|c| c.cluster == cluster)
                    .cloned()
                    .collect()
            }
        }

        type Boxed = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

        impl<B> Service<Request<MeshBody<B>>> for Copies
        where
            B: http_body::Body + Unpin + Send + 'static,
            B::Data: Send,
            B::Error: Into<BoxError>,
        {
            type Response = Response<Body>;
            type Error = Infallible;
            type Future = Boxed;

            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: Request<MeshBody<B>>) -> Self::Future {
                let this = self.clone();
                Box::pin(async move {
                    let target = TargetEndpoint::of(&req).cloned().unwrap();
                    let (head, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let cluster = target.cluster().to_owned();
                    this.seen.lock().unwrap().push(Copy {
                        cluster: cluster.clone(),
                        host: head.headers.get(HOST).cloned(),
                        uri: head.uri.clone(),
                        tag: head.headers.get("x-tag").cloned(),
                        attempt: head.headers.get(crate::mesh::ATTEMPT_COUNT).cloned(),
                        body,
                    });
                    let (tx, rx) = mpsc::unbounded_channel();
                    let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x"))));
                    if cluster == "m" {
                        this.open.lock().unwrap().push(tx);
                    }
                    Ok(Response::new(StreamBody::new(
                        UnboundedReceiverStream::new(rx),
                    )))
                })
            }
        }

        /// `svc` routed to cluster `c` (endpoint :1), copied to cluster
        /// `m` (endpoint :2) for `fraction` of requests, the route setting
        /// `x-tag: routed`.
        fn mirrored(fraction: Fraction) -> Snapshot {
            let traffic = Traffic {
                headers: HeaderRules {
                    request: HeaderOps {
                        set: Arc::from([(
                            header_name("x-tag").unwrap(),
                            header_value("x-tag", "routed").unwrap(),
                        )]),
                        ..HeaderOps::default()
                    },
                    response: HeaderOps::default(),
                },
                mirrors: Arc::from([Mirror {
                    cluster: "m".into(),
                    fraction,
                }]),
                ..Traffic::default()
            };
            let policy = RoutePolicy {
                traffic: Some(Arc::new(traffic)),
                ..RoutePolicy::default()
            };
            let mut s = snapshot(&[1], policy);
            let other = snapshot(&[2], RoutePolicy::default());
            let cla = ClusterLoadAssignment::new(
                "m".into(),
                other.endpoints.get("c").unwrap().localities.to_vec(),
            )
            .unwrap();
            s.clusters
                .insert("m".into(), Arc::new(Cluster::new("m", Protocol::Http1)));
            s.endpoints.insert("m".into(), Arc::new(cla));
            s
        }

        async fn call<B>(mesh: &mut Mesh<Copies, StaticSource>, req: Request<B>) -> Bytes
        where
            B: http_body::Body + Unpin + Send + 'static,
            B::Data: Send,
            B::Error: Into<BoxError>,
        {
            ServiceExt::<Request<B>>::ready(mesh).await.unwrap();
            let response = mesh.call(req).await.unwrap();
            response.into_body().collect().await.unwrap().to_bytes()
        }

        /// Lets the copies' tasks run until `n` requests reached `m`.
        async fn copies_reach(inner: &Copies, n: usize) {
            for _ in 0..1000 {
                if inner.to("m").len() >= n {
                    return;
                }
                tokio::task::yield_now().await;
            }
            panic!("{} copies, not {n}", inner.to("m").len());
        }

        #[tokio::test]
        async fn the_copy_is_the_routed_request_with_the_shadow_host() {
            let inner = Copies::default();
            let layer = MeshLayer::new(StaticSource::new(mirrored(Fraction::ALL)));
            let stats = layer.stats().clone();
            let mut mesh = layer.layer(inner.clone());
            let req = Request::post("http://svc:80/items?x=1")
                .body(Full::new(Bytes::from_static(b"order")))
                .unwrap();
            // The caller's response does not wait for the copy's, which
            // stays open.
            assert_eq!(&call(&mut mesh, req).await[..], b"x");
            copies_reach(&inner, 1).await;
            let sent = inner.to("c").pop().unwrap();
            let copy = inner.to("m").pop().unwrap();
            assert_eq!(sent.host.unwrap(), "svc:80");
            assert_eq!(copy.host.unwrap(), "svc-shadow:80");
            assert_eq!(copy.uri, "http://127.0.0.1:2/items?x=1");
            assert_eq!(
                copy.tag.unwrap(),
                "routed",
                "after the route's header changes"
            );
            assert_eq!(copy.attempt, None, "no attempt header on a copy");
            assert_eq!(&copy.body[..], b"order");
            assert_eq!(&sent.body[..], b"order");
            assert_eq!(stats.mirrors_sent(), 1);
            // Its place under the cap is held until its response ends.
            assert_eq!(mesh.shared.mirrors.in_flight(), 1);
            inner.open.lock().unwrap().clear();
            for _ in 0..100 {
                if mesh.shared.mirrors.in_flight() == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(mesh.shared.mirrors.in_flight(), 0);
            assert_eq!(
                (
                    stats.mirrors_overflowed(),
                    stats.mirrors_skipped(),
                    stats.mirrors_failed()
                ),
                (0, 0, 0)
            );
        }

        #[tokio::test]
        async fn copies_over_the_cap_are_counted_not_sent() {
            let inner = Copies::default();
            let layer =
                MeshLayer::new(StaticSource::new(mirrored(Fraction::ALL))).mirror_in_flight(2);
            let stats = layer.stats().clone();
            let mut mesh = layer.layer(inner.clone());
            for _ in 0..5 {
                let req = Request::get("http://svc/")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                call(&mut mesh, req).await;
                copies_reach(&inner, inner.to("m").len().min(2)).await;
            }
            copies_reach(&inner, 2).await;
            assert_eq!(inner.to("c").len(), 5, "every caller request is sent");
            assert_eq!(inner.to("m").len(), 2);
            assert_eq!((stats.mirrors_sent(), stats.mirrors_overflowed()), (2, 3));
            // Once they end, copies are sent again.
            inner.open.lock().unwrap().clear();
            for _ in 0..100 {
                if mesh.shared.mirrors.in_flight() == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let req = Request::get("http://svc/")
                .body(Empty::<Bytes>::new())
                .unwrap();
            call(&mut mesh, req).await;
            copies_reach(&inner, 3).await;
            assert_eq!(stats.mirrors_sent(), 3);
        }

        #[tokio::test]
        async fn a_big_or_streaming_body_is_not_copied() {
            let inner = Copies::default();
            let layer =
                MeshLayer::new(StaticSource::new(mirrored(Fraction::ALL))).mirror_body_limit(4);
            let stats = layer.stats().clone();
            let mut mesh = layer.layer(inner.clone());
            let big = Request::post("http://svc/")
                .body(Full::new(Bytes::from_static(b"too big")))
                .unwrap();
            call(&mut mesh, big).await;
            assert_eq!(stats.mirrors_skipped(), 1);
            // A body still being produced when the request is sent.
            let (tx, rx) = mpsc::unbounded_channel::<Chunk>();
            tx.send(Ok(Frame::data(Bytes::from_static(b"a")))).unwrap();
            let streaming = Request::post("http://svc/")
                .body(StreamBody::new(UnboundedReceiverStream::new(rx)))
                .unwrap();
            ServiceExt::<Request<Body>>::ready(&mut mesh).await.unwrap();
            let response = mesh.call(streaming);
            drop(tx);
            response.await.unwrap().into_body().collect().await.unwrap();
            assert_eq!(stats.mirrors_skipped(), 2);
            // A small one is.
            let small = Request::post("http://svc/")
                .body(Full::new(Bytes::from_static(b"ok")))
                .unwrap();
            call(&mut mesh, small).await;
            copies_reach(&inner, 1).await;
            assert_eq!(&inner.to("m")[0].body[..], b"ok");
            // The caller's bodies all arrived whole.
            let bodies: Vec<Bytes> = inner.to("c").into_iter().map(|c| c.body).collect();
            assert_eq!(bodies, [&b"too big"[..], b"a", b"ok"]);
            assert_eq!((stats.mirrors_sent(), stats.mirrors_skipped()), (1, 2));
        }

        #[tokio::test]
        async fn no_share_no_copy_and_a_missing_cluster_is_a_failed_copy() {
            let inner = Copies::default();
            let layer = MeshLayer::new(StaticSource::new(mirrored(Fraction::from_per_million(0))));
            let stats = layer.stats().clone();
            let mut mesh = layer.layer(inner.clone());
            let req = Request::get("http://svc/")
                .body(Empty::<Bytes>::new())
                .unwrap();
            call(&mut mesh, req).await;
            assert_eq!(stats.mirrors_sent(), 0);

            let mut s = mirrored(Fraction::ALL);
            s.clusters.remove("m");
            let layer = MeshLayer::new(StaticSource::new(s));
            let stats = layer.stats().clone();
            let mut mesh = layer.layer(inner.clone());
            let req = Request::get("http://svc/")
                .body(Empty::<Bytes>::new())
                .unwrap();
            assert_eq!(&call(&mut mesh, req).await[..], b"x");
            assert_eq!((stats.mirrors_sent(), stats.mirrors_failed()), (0, 1));
            assert!(inner.to("m").is_empty());
        }
    }
}
