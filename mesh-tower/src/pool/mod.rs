//! Pooled hyper connections, keyed by cluster, endpoint address and protocol.
//!
//! The mesh chooses the endpoint, so the pool must not derive the address
//! from the URI (that would lose the service name): it dials the
//! [`TargetEndpoint`] the routing layer put on the request and sends the
//! request with its URI as written, so the endpoint sees the original
//! `:authority` (HTTP/2) or `Host` (HTTP/1.1), as Envoy's upstream
//! connections do. Connections belong to a cluster, as Envoy's connection
//! pools do, so each cluster's limits and settings apply to its own
//! connections, and they are keyed by endpoint, protocol and TLS identity
//! set (docs/ARCHITECTURE.md, "Client stack"): a plaintext and an mTLS
//! connection to one address, or two mTLS connections verified for
//! different server identities, are different pool entries.
//!
//! mTLS (clusters with `tls`, Istio ISTIO_MUTUAL; gRFC A29): the pool runs
//! the TLS handshake with [`MeshConnector`] over
//! the TCP connection, presenting the workload's certificate and checking
//! the server's SPIFFE ID against the cluster's identities; ALPN `h2` for
//! HTTP/2 clusters, `http/1.1` for HTTP/1.1 ones; SNI from the cluster,
//! else none. A connection is not used past the expiry of the certificates
//! it was established with (the client's or the server's, whichever ends
//! first): an HTTP/2 connection is retired then (it closes once its
//! streams are done), an idle HTTP/1.1 one is dropped. New connections use
//! the current certificate, so a rotation reaches them without touching
//! live ones. Plaintext clusters take exactly the path they took before.
//!
//! The server's verified SPIFFE ID (the one the connector checked against
//! the cluster's identities; for SIMPLE / MUTUAL, the server certificate's
//! URI SAN when it is one) is kept with the connection, read once at the
//! handshake. Each request sent on it hands it, a reference count, to the
//! attempt under way in the request's
//! [`DecisionRecord`](crate::telemetry::DecisionRecord) when a telemetry
//! layer made one: the client's Istio metrics report it as
//! `destination_principal`, as Envoy reports its upstream peer's URI SAN.
//!
//! TLS from files (Istio's SIMPLE and MUTUAL, [`FileTlsConnector`]
//! (crate::tls::FileTlsConnector)): the same, with the cluster's CA file
//! (or the system's roots),
//! names and (MUTUAL) client certificate; connections are keyed by those
//! settings and retired when the server's (or the client's) certificate
//! expires.
//!
//! - HTTP/2 (clusters of protocol `HTTP2` / `GRPC`, and HTTP/1.1 ones with
//!   `http.h2UpgradePolicy: UPGRADE`, spoken with prior knowledge as
//!   Envoy's upgraded clusters do): one shared connection per endpoint,
//!   multiplexing every request, as gRPC's subchannels do; re-dialed when
//!   it closes (GOAWAY, reset). Getting it is a lock-free load; a request
//!   the closed connection never took is re-sent once on a fresh one.
//! - HTTP/1.1: a small stack of idle connections per endpoint (a short
//!   critical section under an uncontended mutex); a connection returns to
//!   it when its response has been read to the end.
//!
//! The cluster's settings (from the request, set by the mesh layer; Istio
//! `connectionPool`) apply as Envoy applies them:
//!
//! - `tcp.connectTimeout`: how long a dial may take (else the pool's
//!   [`Pool::connect_timeout`], 10 s).
//! - `tcp.maxConnections`: beyond it a request needing a new HTTP/1.1
//!   connection waits, as *pending*, for one of the endpoint's connections
//!   to come back or close (an endpoint without any connection may always
//!   open one, as in Envoy, so no request waits forever on other
//!   endpoints' connections). HTTP/2 needs one connection per endpoint.
//! - `http.http1MaxPendingRequests`: requests waiting for a connection
//!   (for a free HTTP/1.1 connection, or for an HTTP/2 connection being
//!   dialed); one more fails at once with [`ErrorKind::Overflow`] naming
//!   the limit.
//! - `http.maxRequestsPerConnection`: a connection that has carried that
//!   many requests takes no more (HTTP/1.1: it is closed after its
//!   response; HTTP/2: the next request dials a fresh one while the old one
//!   finishes its streams).
//! - `http.idleTimeout` (else `tcp.idleTimeout`): a connection without
//!   requests that long is closed (HTTP/2: once its streams are done).
//! - `tcp.tcpKeepalive`: `SO_KEEPALIVE` and the probe idle time, interval
//!   and count on each dialed socket (socket2), once per connection.
//! - `tcp.maxConnectionDuration`: a connection that old takes no new
//!   request. HTTP/2: a timer (the connection task's own) retires it, and it
//!   closes once its streams are done; HTTP/1.1: it is closed when its
//!   response has been read, or when it is next taken from the idle stack
//!   (an idle one is not closed at the very moment it ages out; the idle
//!   timeout closes it if set). The same mechanism as the retirement of
//!   mTLS connections at certificate expiry: no timer per request.
//! - `http.maxConcurrentStreams`: each HTTP/2 connection takes at most that
//!   many requests at once; a request none of an endpoint's connections
//!   can take dials another connection to it (dials are serialized per
//!   endpoint, so a burst opens one connection per `maxConcurrentStreams`
//!   requests). A request holds its slot from sending until its response
//!   head arrives (a streaming response's body is not counted). Like an
//!   endpoint's first HTTP/2 connection, the extra ones take a
//!   `tcp.maxConnections` permit when one is free and are dialed even when
//!   none is (Envoy would queue the request instead). The
//!   endpoint's connections are a copy-on-write list: taking one is a load
//!   and an atomic update, allocation-free; adding or retiring one copies
//!   the list.
//!
//! The response future is boxed, as hyper-util's `Client`'s is.

mod host;
mod target;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, Parts, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use mesh_core::breaker::CircuitBreaker;
use mesh_core::model::{
    CircuitBreakers, ConnectionSettings, FileTls, Name, Protocol, TlsOrigination, UpstreamTls,
};
use tower::Service;

use self::host::Host;
pub(crate) use self::target::TargetCluster;
pub use self::target::{CarriesTarget, TargetEndpoint};
use crate::error::{BoxError, Error, ErrorKind};
use crate::tls::{CertStore, FileTlsConnector, MeshConnector, ServerIdentities};

/// The connection pool: a `tower::Service` sending each request to its
/// [`TargetEndpoint`] (see [`TargetEndpoint::of`] and the
/// [module docs](self)): a request body of another type than
/// [`MeshBody`](crate::MeshBody) must implement [`CarriesTarget`]. Cheap
/// to clone; clones share the connections.
pub struct Pool<B> {
    hosts: Arc<Hosts<B>>,
    config: PoolConfig,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolConfig {
    pub(crate) connect_timeout: Duration,
    pub(crate) max_idle_per_host: usize,
    pub(crate) http2_keep_alive: Option<Duration>,
}

/// A cluster's name, protocol, connection limits and settings, put on each
/// request by the mesh layer for the pool (in its [`TargetEndpoint`]).
#[derive(Debug, Clone)]
pub(crate) struct ClusterConnections(pub(crate) Arc<TargetCluster>);

/// What a cluster says about its connections.
#[derive(Debug)]
pub(crate) struct ConnectionPolicy {
    pub(crate) breaker: CircuitBreaker,
    pub(crate) limits: CircuitBreakers,
    pub(crate) settings: ConnectionSettings,
    /// mTLS to the cluster's endpoints; `None`: plaintext.
    pub(crate) tls: Option<ClusterTls>,
}

/// How the pool secures a cluster's connections.
pub(crate) struct ClusterTls {
    connector: Connector,
    /// What the connections were verified for (part of the pool key).
    key: TlsKey,
    /// The SNI to send; `None` sends none.
    sni: Option<Box<str>>,
}

/// The TLS client of a cluster.
enum Connector {
    /// ISTIO_MUTUAL: the workload certificate of `store`.
    Mesh {
        connector: MeshConnector,
        store: CertStore,
    },
    /// SIMPLE / MUTUAL: certificate files.
    Files(FileTlsConnector),
}

/// What a TLS connection was verified for: connections verified under
/// different settings are different pool entries.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum TlsKey {
    /// ISTIO_MUTUAL, for these server identities.
    Mesh(ServerIdentities),
    /// SIMPLE / MUTUAL with these files and names.
    Files(Arc<FileTls>),
}

/// Hashes only what is cheap (the kind, the number of identities): every
/// request looks its connection up by a key holding this, and hashing the
/// identity URIs or file names each time would cost more than the rest of
/// the lookup. Consistent with `Eq` (equal keys hash alike); keys that
/// differ only in what is not hashed are told apart by `Eq`, which takes a
/// pointer comparison for the shared identity set of a cluster.
impl std::hash::Hash for TlsKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            TlsKey::Mesh(identities) => {
                state.write_u8(0);
                state.write_usize(identities.len());
            }
            TlsKey::Files(_) => state.write_u8(1),
        }
    }
}

impl ClusterTls {
    /// The TLS client of a cluster of `protocol` whose `tls` says how
    /// connections are secured. ISTIO_MUTUAL presents `store`'s
    /// certificate (an error without one); SIMPLE and MUTUAL use their
    /// files and need no store. Accepts `&CertStore` or
    /// `Option<&CertStore>`.
    pub(crate) fn new<'s>(
        store: impl Into<Option<&'s CertStore>>,
        tls: &UpstreamTls,
        protocol: Protocol,
    ) -> Result<Self, Error> {
        let alpn: &[&[u8]] = if protocol.is_http2() {
            &[b"h2"]
        } else {
            &[b"http/1.1"]
        };
        let sni = (!tls.sni.is_empty()).then(|| Box::from(&*tls.sni));
        match &tls.origination {
            TlsOrigination::IstioMutual => {
                let store = store.into().ok_or_else(|| {
                    Error::new(
                        ErrorKind::Tls,
                        "ISTIO_MUTUAL needs a workload certificate: configure \
                         certificate_providers.mesh in the bootstrap",
                    )
                })?;
                let identities = ServerIdentities::new(tls.server_identities.iter().cloned());
                Ok(ClusterTls {
                    connector: Connector::Mesh {
                        connector: MeshConnector::new(store, identities.clone(), alpn)?,
                        store: store.clone(),
                    },
                    key: TlsKey::Mesh(identities),
                    sni,
                })
            }
            TlsOrigination::Files(files) => Ok(ClusterTls {
                connector: Connector::Files(FileTlsConnector::new(files, alpn)),
                key: TlsKey::Files(Arc::new(files.clone())),
                sni,
            }),
        }
    }

    /// Istio's name of the mode, for messages.
    fn mode(&self) -> &'static str {
        match &self.connector {
            Connector::Mesh { .. } => "mTLS",
            Connector::Files(files) => files.files().mode(),
        }
    }
}

impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ClusterTls");
        match &self.key {
            TlsKey::Mesh(identities) => d.field("identities", identities),
            TlsKey::Files(files) => d.field("files", files),
        };
        d.field("sni", &self.sni).finish_non_exhaustive()
    }
}

/// (cluster, endpoint address, HTTP/2, what a TLS connection was verified
/// for; `None`: plaintext).
type Key = (Name, SocketAddr, bool, Option<TlsKey>);

struct Hosts<B> {
    map: ArcSwap<HashMap<Key, Arc<Host<B>>>>,
    insert: Mutex<()>,
}

impl<B> Pool<B> {
    /// An empty pool: connect timeout 10 s (Istio's default), up to 32 idle
    /// HTTP/1.1 connections per endpoint, no HTTP/2 keep-alive pings.
    pub fn new() -> Self {
        Pool {
            hosts: Arc::new(Hosts {
                map: ArcSwap::default(),
                insert: Mutex::new(()),
            }),
            config: PoolConfig {
                connect_timeout: Duration::from_secs(10),
                max_idle_per_host: 32,
                http2_keep_alive: None,
            },
        }
    }

    /// How long dialing an endpoint may take, unless its cluster says
    /// (`connectionPool.tcp.connectTimeout`).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// How many idle HTTP/1.1 connections to keep per endpoint.
    pub fn max_idle_per_host(mut self, max: usize) -> Self {
        self.config.max_idle_per_host = max;
        self
    }

    /// Sends HTTP/2 PING frames at this interval (and closes a connection
    /// whose peer stops answering), detecting dead peers without traffic.
    pub fn http2_keep_alive(mut self, interval: Duration) -> Self {
        self.config.http2_keep_alive = Some(interval);
        self
    }

    /// Number of endpoints with an open connection (idle or busy), counted
    /// once per cluster they serve.
    pub fn open_endpoints(&self) -> usize {
        self.hosts
            .map
            .load()
            .values()
            .filter(|h| h.is_alive())
            .count()
    }

    /// Connections open now, across endpoints and clusters.
    pub fn open_connections(&self) -> usize {
        self.hosts
            .map
            .load()
            .values()
            .map(|h| h.open_connections())
            .sum()
    }

    fn host(&self, target: &TargetEndpoint, http2: bool, tls: Option<&TlsKey>) -> Arc<Host<B>> {
        let key = (
            target.cluster_name().clone(),
            target.addr(),
            http2,
            tls.cloned(),
        );
        if let Some(host) = self.hosts.map.load().get(&key) {
            return host.clone();
        }
        self.insert_host(key)
    }

    #[cold]
    fn insert_host(&self, key: Key) -> Arc<Host<B>> {
        let _writer = self
            .hosts
            .insert
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.hosts.map.load_full();
        if let Some(host) = current.get(&key) {
            return host.clone();
        }
        // Forget endpoints without connections that no request is using.
        // Counted in `current`, whose own reference is the only one the map
        // holds: in a clone every host would be held twice and never forgotten
        // (an endpoint that left, with its dead connections, kept forever).
        let mut map: HashMap<_, _> = current
            .iter()
            .filter(|(_, h)| h.is_alive() || Arc::strong_count(h) > 1)
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        let host = Arc::new(Host::new(key.1));
        map.insert(key, host.clone());
        self.hosts.map.store(Arc::new(map));
        host
    }
}

impl<B> Default for Pool<B> {
    fn default() -> Self {
        Pool::new()
    }
}

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Pool {
            hosts: self.hosts.clone(),
            config: self.config,
        }
    }
}

impl<B> fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.config)
            .field("endpoints", &self.hosts.map.load().len())
            .finish()
    }
}

impl<B> Service<Request<B>> for Pool<B>
where
    B: http_body::Body<Data = Bytes> + CarriesTarget + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(target) = TargetEndpoint::of(&req).cloned() else {
            return ResponseFuture::new(std::future::ready(Err(Error::new(
                ErrorKind::InvalidRequest,
                "the request has no TargetEndpoint: put the pool under the mesh layer \
                 (MeshLayer::new(source).rewrite_uri(false))",
            ))));
        };
        let policy = target.connections();
        // HTTP/2 clusters, and HTTP/1.1 ones upgraded (h2UpgradePolicy).
        let http2 = target.protocol().is_http2() || policy.is_some_and(|p| p.settings.h2_upgrade);
        let tls = policy.and_then(|p| p.tls.as_ref()).map(|t| &t.key);
        let host = self.host(&target, http2, tls);
        let config = self.config;
        if http2 {
            ResponseFuture::new(async move {
                host.send_http2(req, &target, config, target.connections())
                    .await
            })
        } else {
            ResponseFuture::new(async move {
                host.send_http1(req, &target, config, target.connections())
                    .await
            })
        }
    }
}

/// The response future of [`Pool`].
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Response<Incoming>, Error>> + Send + 'static>>,
}

impl ResponseFuture {
    fn new(
        future: impl Future<Output = Result<Response<Incoming>, Error>> + Send + 'static,
    ) -> Self {
        ResponseFuture {
            inner: Box::pin(future),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Incoming>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// A request addressed by `Host` only gets `http://<host>` in its URI, so
/// HTTP/2 sends it as `:authority`.
///
/// Here rather than in the mesh layer, which calls it too when it keeps the
/// URI: the pool is the lower of the two.
///
/// Inlined check, out-of-line rebuild: a request with an authority (every
/// client request of the fast path) pays a branch, not a call.
#[inline]
pub(crate) fn ensure_authority_in_uri<B>(req: &mut Request<B>) -> Result<(), Error> {
    if req.uri().authority().is_some() {
        return Ok(());
    }
    authority_from_host(req)
}

#[cold]
fn authority_from_host<B>(req: &mut Request<B>) -> Result<(), Error> {
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

/// The error for a request that names no service (no authority in its URI
/// nor a `Host` header).
pub(crate) fn no_authority() -> Error {
    Error::new(
        ErrorKind::InvalidRequest,
        "the request names no service: call `http://<service>/<path>` (with tonic, build the \
         client with `with_origin(client, \"http://<service>\".parse()?)`)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint that left the mesh, with no connection and no request
    /// using it, is forgotten when the next endpoint is added: a pool under
    /// endpoint churn stays the size of the live endpoint set (found by the
    /// soak example as live heap growing with every replaced server).
    #[test]
    fn endpoints_nobody_uses_are_forgotten() {
        let pool: Pool<http_body_util::Full<bytes::Bytes>> = Pool::new();
        for port in 1..=5u16 {
            let target = TargetEndpoint::new(
                SocketAddr::from(([127, 0, 0, 1], port)),
                Protocol::Http1,
                "c",
            );
            drop(pool.host(&target, false, None));
        }
        assert_eq!(
            pool.hosts.map.load().len(),
            1,
            "only the newest entry is kept"
        );

        // One in use is kept.
        let held = pool.host(
            &TargetEndpoint::new(SocketAddr::from(([127, 0, 0, 1], 10)), Protocol::Http1, "c"),
            false,
            None,
        );
        let _ = pool.host(
            &TargetEndpoint::new(SocketAddr::from(([127, 0, 0, 1], 11)), Protocol::Http1, "c"),
            false,
            None,
        );
        let _ = pool.host(
            &TargetEndpoint::new(SocketAddr::from(([127, 0, 0, 1], 12)), Protocol::Http1, "c"),
            false,
            None,
        );
        let keys: Vec<u16> = pool.hosts.map.load().keys().map(|k| k.1.port()).collect();
        assert!(
            keys.contains(&10) && keys.contains(&12) && !keys.contains(&11),
            "{keys:?}"
        );
        drop(held);
    }
}
