use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, Parts, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use mesh_core::Snapshot;
use mesh_core::model::Listener;
use mesh_core::route::RequestView;
use mesh_core::snapshot::ListenerLookup;
use rand::Rng;
use tower::{Service, ServiceExt};

use super::future::ResponseFuture;
use super::{MeshLayer, TargetEndpoint};
use crate::balance::{ActiveGuard, ClusterStates};
use crate::body::ResponseBody;
use crate::error::{BoxError, Error, ErrorKind};
use crate::source::ConfigSource;

/// The routing service built by [`MeshLayer`]: picks the endpoint, then
/// calls the inner service `S`.
pub struct Mesh<S, Src> {
    inner: S,
    shared: Shared<Src>,
}

#[derive(Clone)]
pub(crate) struct Shared<Src> {
    pub(crate) source: Src,
    pub(crate) states: Arc<ClusterStates>,
    pub(crate) config: Config,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) listener_timeout: Duration,
    pub(crate) rewrite_uri: bool,
}

impl<Src> fmt::Debug for Shared<Src> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, Src: Clone> Clone for Mesh<S, Src> {
    fn clone(&self) -> Self {
        Mesh {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
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
        Mesh { inner, shared }
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
}

/// A routing decision, made against one snapshot.
pub(crate) struct Routed {
    pub(crate) active: ActiveGuard,
    pub(crate) target: TargetEndpoint,
}

enum Decision {
    Routed(Routed),
    Wait(String),
    Fail(Error),
}

impl<S, Src, B, RB> Service<Request<B>> for Mesh<S, Src>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    Src: ConfigSource,
    B: Send + 'static,
    RB: http_body::Body + Send + 'static,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = Error;
    type Future = ResponseFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|e| {
            Error::from_boxed(e.into(), ErrorKind::Upstream, "the inner service failed")
        })
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let decision = {
            let snapshot = self.shared.source.snapshot();
            match authority_of(&req) {
                None => Decision::Fail(no_authority()),
                Some(authority) => match snapshot.listener_for(authority) {
                    ListenerLookup::Found(listener) => {
                        match self.shared.route(&snapshot, listener, &req, authority) {
                            Ok(routed) => Decision::Routed(routed),
                            Err(e) => Decision::Fail(e),
                        }
                    }
                    ListenerLookup::Missing => Decision::Fail(not_found(authority)),
                    ListenerLookup::Unknown => Decision::Wait(authority.to_owned()),
                },
            }
        };
        match decision {
            Decision::Routed(routed) => {
                if let Err(e) = self.shared.prepare(&mut req, &routed) {
                    return ResponseFuture::failed(e);
                }
                let future = self.inner.call(req);
                ResponseFuture::sending(future, routed.active)
            }
            Decision::Fail(e) => ResponseFuture::failed(e),
            Decision::Wait(authority) => {
                // The readied service goes to the waiting request; this one
                // keeps a clone (tower's guidance for services used later).
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                let shared = self.shared.clone();
                ResponseFuture::waiting(Box::pin(async move {
                    shared.send_after_wait(inner, req, authority).await
                }))
            }
        }
    }
}

impl<Src: ConfigSource> Shared<Src> {
    /// Routes `req` to an endpoint of `listener`'s route table.
    pub(crate) fn route<B>(
        &self,
        snapshot: &Snapshot,
        listener: &Listener,
        req: &Request<B>,
        authority: &str,
    ) -> Result<Routed, Error> {
        let view = RequestView::new(req.method(), req.uri(), req.headers(), authority);
        let mut rng = rand::rng();
        let resolved = snapshot
            .resolve(listener, &view, rng.random())
            .map_err(|e| {
                Error::new(
                    ErrorKind::NoRoute,
                    format!(
                        "no route for {} {authority:?} {}",
                        req.method(),
                        req.uri().path()
                    ),
                )
                .with_source(e)
            })?;
        let cluster = resolved.cluster;
        let state = self
            .states
            .get(snapshot, &cluster.eds_service_name, resolved.endpoints);
        let active = state.pick(cluster.lb_policy, &mut rng).ok_or_else(|| {
            Error::new(
                ErrorKind::NoEndpoints,
                format!(
                    "cluster {:?} has no endpoints (request to {authority:?}, route {:?})",
                    cluster.name, resolved.route.name
                ),
            )
        })?;
        let target = TargetEndpoint {
            addr: active.address(),
            protocol: cluster.protocol,
            cluster: cluster.name.clone(),
        };
        Ok(Routed { active, target })
    }

    /// Marks `req` with its target and, in rewrite mode, points its URI at it.
    pub(crate) fn prepare<B>(&self, req: &mut Request<B>, routed: &Routed) -> Result<(), Error> {
        if self.config.rewrite_uri {
            let endpoint = routed.active.authority().cloned().ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidRequest,
                    format!(
                        "endpoint {} of cluster {:?} cannot be written as a URI authority",
                        routed.target.addr, routed.target.cluster
                    ),
                )
            })?;
            rewrite_to_endpoint(req, endpoint)?;
        } else {
            ensure_authority_in_uri(req)?;
        }
        req.extensions_mut().insert(routed.target.clone());
        Ok(())
    }

    /// The slow path: wait for `authority`'s config, then route and send.
    async fn send_after_wait<S, B, RB>(
        self,
        mut inner: S,
        mut req: Request<B>,
        authority: String,
    ) -> Result<Response<ResponseBody<RB>>, Error>
    where
        S: Service<Request<B>, Response = Response<RB>>,
        S::Error: Into<BoxError>,
        RB: http_body::Body,
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
                (_, ListenerLookup::Found(listener)) => {
                    self.route(&snapshot, listener, &req, &authority)?
                }
                (_, ListenerLookup::Missing) | (Ok(Ok(())), ListenerLookup::Unknown) => {
                    return Err(not_found(&authority));
                }
                (Ok(Err(e)), ListenerLookup::Unknown) if is_not_found(&*e) => {
                    return Err(not_found(&authority).with_source(e));
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
        self.prepare(&mut req, &routed)?;
        let svc = inner.ready().await.map_err(|e| {
            Error::from_boxed(e.into(), ErrorKind::Upstream, "the inner service failed")
        })?;
        match svc.call(req).await {
            Ok(response) => Ok(response.map(|body| ResponseBody::new(body, Some(routed.active)))),
            Err(e) => Err(upstream_error(e.into(), &routed.active)),
        }
    }
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

fn no_authority() -> Error {
    Error::new(
        ErrorKind::InvalidRequest,
        "the request names no service: call `http://<service>/<path>` (with tonic, build the \
         client with `with_origin(client, \"http://<service>\".parse()?)`)",
    )
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

/// A request addressed by `Host` only gets `http://<host>` in its URI, so
/// HTTP/2 sends it as `:authority`.
pub(crate) fn ensure_authority_in_uri<B>(req: &mut Request<B>) -> Result<(), Error> {
    if req.uri().authority().is_some() {
        return Ok(());
    }
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .ok_or_else(no_authority)?;
    let Parts { path_and_query, .. } = std::mem::take(req.uri_mut()).into_parts();
    let mut parts = Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(host);
    parts.path_and_query = Some(path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/")));
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| {
        Error::new(ErrorKind::InvalidRequest, "cannot rebuild the URI").with_source(e)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use mesh_core::model::{
        Cluster, ClusterLoadAssignment, Endpoint, LbPolicy, Locality, LocalityEndpoints, Protocol,
        Route, RouteConfig, RouteMatch, VirtualHost, WeightedClusters,
    };
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;
    use tower::Layer;

    use super::*;
    use crate::source::StaticSource;

    type Chunk = Result<Frame<Bytes>, Infallible>;
    type Body = StreamBody<UnboundedReceiverStream<Chunk>>;
    type Seen = (Uri, Option<HeaderValue>, TargetEndpoint);

    fn snapshot(ports: &[u16]) -> Snapshot {
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
                        policy: Default::default(),
                    }]
                    .into(),
                }]
                .into(),
            }),
        );
        s.clusters.insert(
            "c".into(),
            Arc::new(Cluster {
                eds_service_name: "c".into(),
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

    impl Service<Request<()>> for Recorder {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<()>) -> Self::Future {
            let target = req.extensions().get::<TargetEndpoint>().cloned().unwrap();
            let host = req.headers().get(HOST).cloned();
            self.seen
                .lock()
                .unwrap()
                .push((req.uri().clone(), host, target));
            let (tx, rx) = mpsc::unbounded_channel();
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
        mesh.call(Request::get(uri).body(()).unwrap()).await
    }

    #[tokio::test]
    async fn rewrite_mode_points_the_uri_at_the_endpoint_and_keeps_the_name_in_host() {
        let recorder = Recorder::default();
        let layer = MeshLayer::new(StaticSource::new(snapshot(&[41000])));
        let mut mesh = layer.layer(recorder.clone());
        let _response = send(&mut mesh, "http://svc/items?page=2").await.unwrap();
        let (uri, host, target) = recorder.seen.lock().unwrap().pop().unwrap();
        assert_eq!(uri, "http://127.0.0.1:41000/items?page=2");
        assert_eq!(host.unwrap(), "svc");
        assert_eq!(target.addr(), SocketAddr::from(([127, 0, 0, 1], 41000)));
        assert_eq!(target.cluster(), "c");
        assert_eq!(target.protocol(), Protocol::Http1);
    }

    #[tokio::test]
    async fn keep_mode_leaves_the_uri_alone() {
        let recorder = Recorder::default();
        let layer = MeshLayer::new(StaticSource::new(snapshot(&[41000]))).rewrite_uri(false);
        let mut mesh = layer.layer(recorder.clone());
        let _response = send(&mut mesh, "http://svc/items").await.unwrap();
        let (uri, host, _) = recorder.seen.lock().unwrap().pop().unwrap();
        assert_eq!(uri, "http://svc/items");
        assert_eq!(host, None);
    }

    #[tokio::test]
    async fn least_request_avoids_the_endpoint_whose_response_is_still_streaming() {
        let recorder = Recorder::default();
        let layer = MeshLayer::new(StaticSource::new(snapshot(&[1, 2])));
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
            let cla = snapshot.endpoints.get("c").unwrap().clone();
            mesh.shared.states.get(&snapshot, &"c".into(), &cla)
        };
        assert_eq!((state.in_flight(0), state.in_flight(1)), (0, 0));
    }

    #[tokio::test]
    async fn a_cluster_without_endpoints_is_an_error_naming_it() {
        let mut mesh = MeshLayer::new(StaticSource::new(snapshot(&[]))).layer(Recorder::default());
        let e = send(&mut mesh, "http://svc/").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoEndpoints);
        assert!(e.to_string().contains("cluster \"c\""), "{e}");
    }
}
