//! The connections of one cluster to one endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::HOST;
use http::uri::{Parts, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::breaker::{ConnectionPermit, Overflow};
use mesh_core::model::Name;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::client::TlsStream;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{ClusterTls, ConnectionPolicy, Connector, PoolConfig, TargetEndpoint};
use crate::error::{BoxError, Error, ErrorKind};
use crate::telemetry::DecisionRecord;
use crate::tls::spiffe_id_of;

/// How many HTTP/1.1 connections a request tries when they turn out to be
/// closed before taking it.
const HTTP1_ATTEMPTS: usize = 3;

pub(super) struct Host<B> {
    addr: SocketAddr,
    /// The origin of `last_used` stamps.
    epoch: Instant,
    /// The HTTP/2 connections taking requests: one, unless the cluster's
    /// `maxConcurrentStreams` made more (see [`Host::open_http2`]).
    http2: ArcSwap<Vec<Arc<Http2Conn<B>>>>,
    dialing: tokio::sync::Mutex<()>,
    /// HTTP/2 dials that failed so far, to tell a request that waited on
    /// another request's failed dial.
    dials: AtomicU64,
    idle: Mutex<Vec<Idle<B>>>,
    /// Connections open or being dialed.
    open: AtomicUsize,
    /// Signalled when a connection comes back idle or closes: what pending
    /// requests wait for.
    freed: Notify,
    /// Whether a task is closing idle HTTP/1.1 connections.
    reaping: AtomicBool,
}

struct Http2Conn<B> {
    sender: http2::SendRequest<B>,
    /// Requests sent on it so far (counted when the cluster limits them).
    requests: AtomicU32,
    /// When it last took a request (millis since the host's epoch).
    last_used: AtomicU64,
    /// Requests in flight on it (counted when the cluster limits them:
    /// `maxConcurrentStreams`), from sending until the response head.
    streams: AtomicU32,
    /// The server's verified SPIFFE ID (TLS), read once at the handshake.
    principal: Option<Name>,
}

/// What a request takes to go out on an HTTP/2 connection: its sender,
/// its stream slot, and the server's verified SPIFFE ID (TLS).
type Http2Sender<B> = (http2::SendRequest<B>, StreamSlot<B>, Option<Name>);

/// A stream slot taken on an HTTP/2 connection (`maxConcurrentStreams`),
/// given back when the request has its response head or failed.
pub(super) struct StreamSlot<B>(Option<Arc<Http2Conn<B>>>);

impl<B> Drop for StreamSlot<B> {
    fn drop(&mut self) {
        if let Some(conn) = &self.0 {
            conn.streams.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

struct Idle<B> {
    sender: http1::SendRequest<B>,
    /// Requests it has carried.
    uses: u32,
    since: Instant,
    /// When its certificates expire (mTLS); it is not used after.
    expires: Option<Instant>,
    /// The server's verified SPIFFE ID (TLS).
    principal: Option<Name>,
}

/// An HTTP/1.1 connection handed to a request: the sender, how many
/// requests it will have carried, when its certificates expire (mTLS),
/// the server's verified SPIFFE ID (TLS).
struct Http1Lease<B> {
    sender: http1::SendRequest<B>,
    uses: u32,
    expires: Option<Instant>,
    principal: Option<Name>,
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl<B> Host<B> {
    pub(super) fn new(addr: SocketAddr) -> Self {
        Host {
            addr,
            epoch: Instant::now(),
            http2: ArcSwap::default(),
            dialing: tokio::sync::Mutex::new(()),
            dials: AtomicU64::new(0),
            idle: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            freed: Notify::new(),
            reaping: AtomicBool::new(false),
        }
    }

    /// Whether any connection to this endpoint is open.
    pub(super) fn is_alive(&self) -> bool {
        let http2 = self.http2.load().iter().any(|c| !c.sender.is_closed());
        http2 || self.open.load(Ordering::Acquire) > 0
    }

    /// Connections open or being dialed.
    pub(super) fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// A shared HTTP/2 connection that is open and willing to take one
    /// more request: it is retired once it carried `max_requests`, and with
    /// `max_streams` one with that many requests in flight is passed over
    /// (a request none takes dials another connection to the endpoint).
    /// No allocation: a load, and atomics on the connection.
    fn open_http2(&self, limits: Http2Limits, track_idle: bool) -> Option<Http2Sender<B>> {
        let conns = self.http2.load();
        for conn in conns.iter() {
            if conn.sender.is_closed() {
                continue;
            }
            let slot = match limits.max_streams {
                Some(max) => {
                    let taken =
                        conn.streams
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                                (n < max).then_some(n + 1)
                            });
                    if taken.is_err() {
                        continue;
                    }
                    StreamSlot(Some(conn.clone()))
                }
                None => StreamSlot(None),
            };
            if let Some(max) = limits.max_requests
                && conn.requests.fetch_add(1, Ordering::AcqRel) >= max
            {
                self.retire_http2(conn);
                continue;
            }
            if track_idle {
                conn.last_used
                    .store(millis_since(self.epoch), Ordering::Relaxed);
            }
            return Some((
                http2::SendRequest::clone(&conn.sender),
                slot,
                conn.principal.clone(),
            ));
        }
        None
    }

    /// Takes `conn` out of service: new requests go to another connection
    /// or dial a fresh one; this one closes once its streams are done.
    fn retire_http2(&self, conn: &Arc<Http2Conn<B>>) {
        if !self.http2.load().iter().any(|c| Arc::ptr_eq(c, conn)) {
            return;
        }
        self.http2.rcu(|conns| {
            conns
                .iter()
                .filter(|c| !Arc::ptr_eq(c, conn) && !c.sender.is_closed())
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// Adds a freshly dialed connection to those taking requests (dropping
    /// closed ones).
    fn add_http2(&self, conn: &Arc<Http2Conn<B>>) {
        self.http2.rcu(|conns| {
            conns
                .iter()
                .filter(|c| !c.sender.is_closed())
                .cloned()
                .chain(std::iter::once(conn.clone()))
                .collect::<Vec<_>>()
        });
    }

    fn idle_http1(&self, idle_timeout: Option<Duration>) -> Option<Http1Lease<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(entry) = idle.pop() {
            let fresh = idle_timeout.is_none_or(|t| entry.since.elapsed() < t)
                && entry.expires.is_none_or(|at| Instant::now() < at);
            if fresh && entry.sender.is_ready() {
                return Some(Http1Lease {
                    sender: entry.sender,
                    uses: entry.uses,
                    expires: entry.expires,
                    principal: entry.principal,
                });
            }
        }
        None
    }

    /// A connection whose response was read: back to the idle stack, or
    /// closed (by dropping it) when it carried its maximum of requests or
    /// the stack is full.
    fn put_idle(self: &Arc<Self>, lease: Http1Lease<B>, policy: IdlePolicy)
    where
        B: Send + 'static,
    {
        let Http1Lease {
            sender,
            uses,
            expires,
            principal,
        } = lease;
        if policy.max_requests.is_some_and(|max| uses >= max)
            || sender.is_closed()
            || expires.is_some_and(|at| Instant::now() >= at)
        {
            return;
        }
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() >= policy.max_idle {
                return;
            }
            idle.push(Idle {
                sender,
                uses,
                since: Instant::now(),
                expires,
                principal,
            });
        }
        self.freed.notify_one();
        // An entry idle for the shorter of the two is either idle too long
        // or past its age (it has been open at least that long).
        let reap_every = match (policy.idle_timeout, policy.max_age) {
            (Some(idle), Some(age)) => Some(idle.min(age)),
            (idle, age) => idle.or(age),
        };
        if let Some(timeout) = reap_every
            && !self.reaping.swap(true, Ordering::AcqRel)
        {
            tokio::spawn(reap_idle(Arc::downgrade(self), timeout));
        }
    }

    fn connection_closed(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.freed.notify_one();
    }
}

/// The limits of a cluster's HTTP/2 connections.
#[derive(Debug, Clone, Copy)]
struct Http2Limits {
    /// `maxRequestsPerConnection`.
    max_requests: Option<u32>,
    /// `maxConcurrentStreams`.
    max_streams: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
struct IdlePolicy {
    max_requests: Option<u32>,
    idle_timeout: Option<Duration>,
    /// `tcp.maxConnectionDuration`: idle connections are reaped at this
    /// pace too, so that an idle one does not outlive its age by much.
    max_age: Option<Duration>,
    max_idle: usize,
}

/// Closes HTTP/1.1 connections idle longer than `timeout`, until none is
/// left idle.
async fn reap_idle<B>(host: Weak<Host<B>>, timeout: Duration) {
    loop {
        tokio::time::sleep(timeout).await;
        let Some(host) = host.upgrade() else { return };
        let mut idle = host.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|entry| {
            entry.since.elapsed() < timeout
                && !entry.sender.is_closed()
                && entry.expires.is_none_or(|at| Instant::now() < at)
        });
        if idle.is_empty() {
            host.reaping.store(false, Ordering::Release);
            return;
        }
    }
}

/// Closes (retires) an HTTP/2 connection once it has taken no request for
/// `timeout`.
async fn watch_http2_idle<B>(host: &Host<B>, conn: Weak<Http2Conn<B>>, timeout: Duration) {
    let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let mut wait = timeout;
    loop {
        tokio::time::sleep(wait).await;
        let Some(conn) = conn.upgrade() else { return };
        let idle_for =
            millis_since(host.epoch).saturating_sub(conn.last_used.load(Ordering::Relaxed));
        if idle_for >= limit {
            host.retire_http2(&conn);
            return;
        }
        wait = Duration::from_millis(limit - idle_for);
    }
}

impl<B> Host<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub(super) async fn send_http2(
        self: Arc<Self>,
        mut req: Request<B>,
        target: &TargetEndpoint,
        config: PoolConfig,
        policy: Option<&ConnectionPolicy>,
    ) -> Result<Response<Incoming>, Error> {
        prepare_http2(&mut req)?;
        let (mut sender, slot, principal) = self.http2_sender(target, config, policy).await?;
        note_principal(&req, principal);
        let sent = sender.try_send_request(req).await;
        drop(slot);
        match sent {
            Ok(response) => Ok(response),
            Err(mut e) => match e.take_message() {
                // The connection closed before taking the request: send it
                // once more on a fresh connection.
                Some(req) => {
                    let (mut sender, slot, principal) =
                        self.http2_sender(target, config, policy).await?;
                    note_principal(&req, principal);
                    let sent = sender.send_request(req).await;
                    drop(slot);
                    sent.map_err(|e| upstream(target, e))
                }
                None => Err(upstream(target, e.into_error())),
            },
        }
    }

    async fn http2_sender(
        self: &Arc<Self>,
        target: &TargetEndpoint,
        config: PoolConfig,
        policy: Option<&ConnectionPolicy>,
    ) -> Result<Http2Sender<B>, Error> {
        let settings = policy.map(|p| &p.settings);
        let limits = Http2Limits {
            max_requests: settings.and_then(|s| s.max_requests_per_connection),
            max_streams: settings.and_then(|s| s.max_concurrent_streams),
        };
        let idle_timeout = settings.and_then(|s| s.idle_timeout);
        if let Some(sender) = self.open_http2(limits, idle_timeout.is_some()) {
            return Ok(sender);
        }
        // Waiting for a connection being dialed: a pending request.
        let _pending = match policy {
            Some(p) => Some(
                p.breaker
                    .try_pend(&p.limits)
                    .map_err(|o| overflow(target, o))?,
            ),
            None => None,
        };
        let attempts = self.dials.load(Ordering::Acquire);
        let _dialing = self.dialing.lock().await;
        if let Some(sender) = self.open_http2(limits, idle_timeout.is_some()) {
            return Ok(sender);
        }
        if self.dials.load(Ordering::Acquire) != attempts {
            // The dial this request waited for failed: share its fate rather
            // than queue one more connect timeout behind it.
            return Err(Error::new(
                ErrorKind::Connect,
                format!(
                    "cannot connect to endpoint {} of cluster {:?}: the connection attempt \
                     this request waited for failed",
                    self.addr,
                    target.cluster()
                ),
            ));
        }
        // One connection per endpoint: dialed even past maxConnections, as
        // Envoy does for an endpoint without any connection.
        let permit = policy.and_then(|p| p.breaker.try_connect(&p.limits));
        let dialed = async {
            let io = self.connect(target, config, policy).await?;
            let max_age = max_age(policy);
            match policy.and_then(|p| p.tls.as_ref()) {
                None => {
                    let at = (idle_timeout, max_age);
                    self.start_http2(io, target, config, permit, at, limits, None)
                        .await
                }
                Some(tls) => {
                    let (io, expires, principal) =
                        self.handshake_tls(io, tls, target, config, policy).await?;
                    let at = (
                        idle_timeout,
                        Some(max_age.map_or(expires, |at| at.min(expires))),
                    );
                    self.start_http2(io, target, config, permit, at, limits, principal)
                        .await
                }
            }
        }
        .await;
        if dialed.is_err() {
            self.dials.fetch_add(1, Ordering::AcqRel);
        }
        dialed
    }

    /// The HTTP/2 handshake over a dialed connection (plaintext or TLS);
    /// the connection joins the endpoint's shared ones (it takes the
    /// request that dialed it, counted against the limits) and is retired
    /// at `expires` (certificate expiry, maximum connection duration);
    /// `principal` is the server's verified SPIFFE ID (TLS).
    #[allow(clippy::too_many_arguments)]
    async fn start_http2<IO>(
        self: &Arc<Self>,
        io: IO,
        target: &TargetEndpoint,
        config: PoolConfig,
        permit: Option<ConnectionPermit>,
        (idle_timeout, expires): (Option<Duration>, Option<Instant>),
        limits: Http2Limits,
        principal: Option<Name>,
    ) -> Result<Http2Sender<B>, Error>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        if let Some(interval) = config.http2_keep_alive {
            builder
                .keep_alive_interval(interval)
                .keep_alive_timeout(interval.max(Duration::from_secs(1)))
                .keep_alive_while_idle(true);
        }
        let (sender, connection) = match builder.handshake(io).await {
            Ok(handshake) => handshake,
            Err(e) => {
                self.connection_closed();
                return Err(handshake_error(target, e));
            }
        };
        let conn = Arc::new(Http2Conn {
            sender: sender.clone(),
            requests: AtomicU32::new(1),
            last_used: AtomicU64::new(millis_since(self.epoch)),
            streams: AtomicU32::new(u32::from(limits.max_streams.is_some())),
            principal: principal.clone(),
        });
        self.add_http2(&conn);
        let slot = StreamSlot(limits.max_streams.is_some().then(|| conn.clone()));
        let host = self.clone();
        let watched = Arc::downgrade(&conn);
        drop(conn);
        tokio::spawn(async move {
            let _permit: Option<ConnectionPermit> = permit;
            let addr = host.addr;
            tokio::pin!(connection);
            let result = match (idle_timeout, expires) {
                (None, None) => connection.await,
                (idle_timeout, expires) => {
                    let idle = async {
                        match idle_timeout {
                            Some(timeout) => {
                                watch_http2_idle(&host, watched.clone(), timeout).await;
                            }
                            None => std::future::pending().await,
                        }
                    };
                    let expiry = async {
                        match expires {
                            // Retired when its certificates expire (or at
                            // its maximum duration): new requests dial a
                            // connection with the current certificate; this
                            // one finishes its streams.
                            Some(at) => {
                                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                                if let Some(conn) = watched.upgrade() {
                                    host.retire_http2(&conn);
                                }
                            }
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        result = &mut connection => result,
                        () = idle => connection.await,
                        () = expiry => connection.await,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%addr, error = %e, "HTTP/2 connection closed");
            }
            host.connection_closed();
        });
        Ok((sender, slot, principal))
    }

    pub(super) async fn send_http1(
        self: Arc<Self>,
        mut req: Request<B>,
        target: &TargetEndpoint,
        config: PoolConfig,
        policy: Option<&ConnectionPolicy>,
    ) -> Result<Response<Incoming>, Error> {
        prepare_http1(&mut req)?;
        let settings = policy.map(|p| &p.settings);
        let idle_policy = IdlePolicy {
            max_requests: settings.and_then(|s| s.max_requests_per_connection),
            idle_timeout: settings.and_then(|s| s.idle_timeout),
            max_age: settings.and_then(|s| s.max_connection_duration),
            max_idle: config.max_idle_per_host,
        };
        let mut last = None;
        for _ in 0..HTTP1_ATTEMPTS {
            let mut lease = self
                .http1_sender(target, config, policy, idle_policy)
                .await?;
            if let Some(principal) = &lease.principal {
                note_principal(&req, Some(principal.clone()));
            }
            let sent = lease.sender.try_send_request(req);
            // Back to the idle stack once this response has been read.
            let host = self.clone();
            tokio::spawn(async move {
                if lease.sender.ready().await.is_ok() {
                    host.put_idle(lease, idle_policy);
                }
            });
            match sent.await {
                Ok(response) => return Ok(response),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        req = unsent;
                        last = Some(e.into_error());
                    }
                    None => return Err(upstream(target, e.into_error())),
                },
            }
        }
        Err(match last {
            Some(e) => upstream(target, e),
            None => Error::new(ErrorKind::Upstream, "no connection took the request"),
        })
    }

    /// An idle connection, a new one, or (at `maxConnections`) the first
    /// one to come back, waiting as a pending request.
    async fn http1_sender(
        self: &Arc<Self>,
        target: &TargetEndpoint,
        config: PoolConfig,
        policy: Option<&ConnectionPolicy>,
        idle_policy: IdlePolicy,
    ) -> Result<Http1Lease<B>, Error> {
        // The common case under keep-alive: an idle connection, taken
        // without registering for `freed` (which locks the notifier's
        // waiter list twice). The loop below re-checks after registering.
        if let Some(mut lease) = self.idle_http1(idle_policy.idle_timeout) {
            lease.uses = lease.uses.saturating_add(1);
            return Ok(lease);
        }
        let mut pending = None;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(mut lease) = self.idle_http1(idle_policy.idle_timeout) {
                lease.uses = lease.uses.saturating_add(1);
                return Ok(lease);
            }
            let dial = match policy {
                None => Some(None),
                Some(p) => match p.breaker.try_connect(&p.limits) {
                    Some(permit) => Some(Some(permit)),
                    // An endpoint without connections may always open one.
                    None if self.open.load(Ordering::Acquire) == 0 => Some(None),
                    None => None,
                },
            };
            if let Some(permit) = dial {
                drop(pending);
                return self.dial_http1(target, config, policy, permit).await;
            }
            if pending.is_none()
                && let Some(p) = policy
            {
                pending = Some(
                    p.breaker
                        .try_pend(&p.limits)
                        .map_err(|o| overflow(target, o))?,
                );
            }
            freed.await;
        }
    }

    async fn dial_http1(
        self: &Arc<Self>,
        target: &TargetEndpoint,
        config: PoolConfig,
        policy: Option<&ConnectionPolicy>,
        permit: Option<ConnectionPermit>,
    ) -> Result<Http1Lease<B>, Error> {
        let io = self.connect(target, config, policy).await?;
        // Past its maximum duration a connection takes no new request: it
        // is dropped (closed) when its response has been read, or when an
        // idle one is next looked at.
        let max_age = max_age(policy);
        let (sender, expires, principal) = match policy.and_then(|p| p.tls.as_ref()) {
            None => (self.start_http1(io, target, permit).await?, max_age, None),
            Some(tls) => {
                let (io, expires, principal) =
                    self.handshake_tls(io, tls, target, config, policy).await?;
                let expires = max_age.map_or(expires, |at| at.min(expires));
                (
                    self.start_http1(io, target, permit).await?,
                    Some(expires),
                    principal,
                )
            }
        };
        Ok(Http1Lease {
            sender,
            uses: 1,
            expires,
            principal,
        })
    }

    /// The HTTP/1.1 handshake over a dialed connection (plaintext or TLS).
    async fn start_http1<IO>(
        self: &Arc<Self>,
        io: IO,
        target: &TargetEndpoint,
        permit: Option<ConnectionPermit>,
    ) -> Result<http1::SendRequest<B>, Error>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, connection) = match http1::handshake(io).await {
            Ok(handshake) => handshake,
            Err(e) => {
                self.connection_closed();
                return Err(handshake_error(target, e));
            }
        };
        let host = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection.await {
                tracing::debug!(addr = %host.addr, error = %e, "HTTP/1.1 connection closed");
            }
            host.connection_closed();
        });
        Ok(sender)
    }

    /// Dials the endpoint, counting the connection as open from now on (the
    /// caller calls `connection_closed` when it fails later).
    async fn connect(
        &self,
        target: &TargetEndpoint,
        config: PoolConfig,
        policy: Option<&ConnectionPolicy>,
    ) -> Result<TokioIo<TcpStream>, Error> {
        let timeout = connect_timeout(config, policy);
        self.open.fetch_add(1, Ordering::AcqRel);
        let result = connect(target, timeout).await;
        match &result {
            Ok(io) => {
                if let Some(keepalive) = policy.and_then(|p| p.settings.tcp_keepalive) {
                    set_keepalive(io.inner(), keepalive);
                }
            }
            Err(_) => self.connection_closed(),
        }
        result
    }
}

impl<B> Host<B> {
    /// The TLS handshake over a dialed connection (bounded by the connect
    /// timeout too, as Envoy's covers the TLS handshake): the stream, when
    /// the certificates it was established with expire, and the server's
    /// verified SPIFFE ID (what the client's metrics report as
    /// `destination_principal`; read here once per connection). On failure
    /// the connection is counted closed.
    async fn handshake_tls(
        &self,
        io: TokioIo<TcpStream>,
        tls: &ClusterTls,
        target: &TargetEndpoint,
        config: PoolConfig,
        policy: Option<&ConnectionPolicy>,
    ) -> Result<(TokioIo<TlsStream<TcpStream>>, Instant, Option<Name>), Error> {
        let timeout = connect_timeout(config, policy);
        let ip;
        let server_name = match &tls.sni {
            Some(sni) => &**sni,
            None => {
                ip = target.addr().ip().to_string();
                &ip
            }
        };
        let tcp = io.into_inner();
        let handshake = async {
            match &tls.connector {
                Connector::Mesh { connector, store } => {
                    // Read before the handshake: a rotation during it can
                    // only make the certificate used later-expiring than this.
                    let client_expiry = store.not_after();
                    // The identity the connector verified against the
                    // cluster's allowed ones: kept, not parsed again.
                    let (stream, peer) = connector.connect(server_name, tcp).await?;
                    let principal = Name::from(peer.spiffe_id().as_str());
                    Ok::<_, Error>((stream, Some(client_expiry), Some(principal)))
                }
                Connector::Files(connector) => {
                    let (stream, client_expiry) = connector.connect(server_name, tcp).await?;
                    // SIMPLE / MUTUAL: a verified server certificate's
                    // SPIFFE ID, when it has one (Envoy reports the URI SAN).
                    let principal = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|leaf| spiffe_id_of(leaf).ok())
                        .map(|id| Name::from(id.as_str()));
                    Ok((stream, client_expiry, principal))
                }
            }
        };
        let (stream, client_expiry, principal) =
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(connected)) => connected,
                Ok(Err(e)) => {
                    self.connection_closed();
                    return Err(Error::new(
                        ErrorKind::Connect,
                        format!(
                            "{} handshake with endpoint {} of cluster {:?} failed",
                            tls.mode(),
                            target.addr(),
                            target.cluster()
                        ),
                    )
                    .with_source(e));
                }
                Err(_) => {
                    self.connection_closed();
                    return Err(Error::new(
                        ErrorKind::Connect,
                        format!(
                            "the {} handshake with endpoint {} of cluster {:?} timed out after \
                         {timeout:?}",
                            tls.mode(),
                            target.addr(),
                            target.cluster()
                        ),
                    )
                    .with_source(std::io::Error::from(std::io::ErrorKind::TimedOut)));
                }
            };
        let server_expiry = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| X509Certificate::from_der(leaf).ok())
            .and_then(|(_, cert)| u64::try_from(cert.validity().not_after.timestamp()).ok())
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        let expiry = match (server_expiry, client_expiry) {
            (Some(s), Some(c)) => Some(s.min(c)),
            (s, c) => s.or(c),
        };
        let left = match expiry {
            // Retired a little before the certificates expire: the server
            // closes its side at its certificate's expiry, and a request
            // sent on an HTTP/1.1 connection as it closes would be lost.
            Some(expiry) => {
                let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
                left - (left / 4).min(RETIRE_MARGIN)
            }
            // No expiry known (SIMPLE, and a server certificate that does
            // not parse): a day, re-dialed and re-verified then.
            None => Duration::from_secs(24 * 3600),
        };
        Ok((TokioIo::new(stream), Instant::now() + left, principal))
    }
}

/// Hands the server's verified SPIFFE ID (TLS) to the request's decision
/// record, for the attempt under way (a telemetry layer above made one):
/// the client's `destination_principal`. An extension lookup and a
/// reference count; nothing for plaintext.
fn note_principal<B>(req: &Request<B>, principal: Option<Name>) {
    if let Some(principal) = principal
        && let Some(record) = req.extensions().get::<DecisionRecord>()
    {
        record.upstream_principal(principal);
    }
}

/// How long before its certificates expire a connection is retired (at
/// most a quarter of what is left).
const RETIRE_MARGIN: Duration = Duration::from_secs(1);

/// When a connection dialed now reaches the cluster's maximum connection
/// duration (`tcp.maxConnectionDuration`), if it has one.
fn max_age(policy: Option<&ConnectionPolicy>) -> Option<Instant> {
    policy
        .and_then(|p| p.settings.max_connection_duration)
        .map(|d| Instant::now() + d)
}

/// TCP keepalive on a dialed socket (Istio `tcp.tcpKeepalive`, as Envoy's
/// `upstream_connection_options.tcp_keepalive`): `SO_KEEPALIVE` on, and the
/// idle time (`TCP_KEEPIDLE`), probe interval (`TCP_KEEPINTVL`) and probe
/// count (`TCP_KEEPCNT`) the cluster sets; the others keep the OS default.
/// Once per connection. A platform refusing an option keeps its default
/// (logged): the connection is still usable.
fn set_keepalive(stream: &TcpStream, k: mesh_core::model::TcpKeepalive) {
    let socket = socket2::SockRef::from(stream);
    let result = if k.time.is_none() && k.interval.is_none() && k.probes.is_none() {
        socket.set_keepalive(true)
    } else {
        let mut params = socket2::TcpKeepalive::new();
        if let Some(time) = k.time {
            params = params.with_time(time);
        }
        #[cfg(any(
            target_os = "linux",
            target_os = "android",
            target_os = "macos",
            target_os = "ios",
            target_os = "freebsd",
            target_os = "netbsd",
            windows
        ))]
        if let Some(interval) = k.interval {
            params = params.with_interval(interval);
        }
        #[cfg(any(
            target_os = "linux",
            target_os = "android",
            target_os = "macos",
            target_os = "ios",
            target_os = "freebsd",
            target_os = "netbsd"
        ))]
        if let Some(probes) = k.probes {
            params = params.with_retries(probes);
        }
        socket.set_tcp_keepalive(&params)
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot set TCP keepalive on an upstream connection");
    }
}

fn connect_timeout(config: PoolConfig, policy: Option<&ConnectionPolicy>) -> Duration {
    policy
        .and_then(|p| p.settings.connect_timeout)
        .unwrap_or(config.connect_timeout)
}

async fn connect(target: &TargetEndpoint, timeout: Duration) -> Result<TokioIo<TcpStream>, Error> {
    let addr = target.addr();
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            // Requests are small and latency-bound: no Nagle delay.
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(stream))
        }
        Ok(Err(e)) => Err(Error::new(
            ErrorKind::Connect,
            format!(
                "cannot connect to endpoint {addr} of cluster {:?}",
                target.cluster()
            ),
        )
        .with_source(e)),
        Err(_) => Err(Error::new(
            ErrorKind::Connect,
            format!(
                "connecting to endpoint {addr} of cluster {:?} timed out after {timeout:?}",
                target.cluster()
            ),
        )
        .with_source(std::io::Error::from(std::io::ErrorKind::TimedOut))),
    }
}

fn overflow(target: &TargetEndpoint, o: Overflow) -> Error {
    Error::new(
        ErrorKind::Overflow,
        format!(
            "cluster {:?}: circuit breaker {} limit of {} reached",
            target.cluster(),
            o.limit,
            o.value
        ),
    )
    .with_source(o)
}

fn handshake_error(target: &TargetEndpoint, e: hyper::Error) -> Error {
    Error::new(
        ErrorKind::Connect,
        format!(
            "HTTP handshake with endpoint {} of cluster {:?} failed",
            target.addr(),
            target.cluster()
        ),
    )
    .with_source(e)
}

fn upstream(target: &TargetEndpoint, e: hyper::Error) -> Error {
    Error::new(
        ErrorKind::Upstream,
        format!(
            "request to endpoint {} of cluster {:?} failed",
            target.addr(),
            target.cluster()
        ),
    )
    .with_source(e)
}

/// HTTP/2: the URI carries `:scheme` and `:authority`; a `Host` header
/// would repeat the authority, so it is dropped.
fn prepare_http2<B>(req: &mut Request<B>) -> Result<(), Error> {
    super::ensure_authority_in_uri(req)?;
    req.headers_mut().remove(HOST);
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// HTTP/1.1: origin-form request target (`/path?query`) and a `Host` header
/// carrying the authority (RFC 9112 §3.2).
fn prepare_http1<B>(req: &mut Request<B>) -> Result<(), Error> {
    *req.version_mut() = Version::HTTP_11;
    let Parts {
        authority,
        path_and_query,
        ..
    } = std::mem::take(req.uri_mut()).into_parts();
    if !req.headers().contains_key(HOST) {
        let authority = authority.ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidRequest,
                "the request names no host: neither its URI nor a Host header has one",
            )
        })?;
        let value = HeaderValue::from_str(authority.as_str()).map_err(|e| {
            Error::new(ErrorKind::InvalidRequest, "invalid authority").with_source(e)
        })?;
        req.headers_mut().insert(HOST, value);
    }
    let mut parts = Parts::default();
    parts.path_and_query = Some(path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/")));
    *req.uri_mut() = Uri::from_parts(parts)
        .map_err(|e| Error::new(ErrorKind::InvalidRequest, "invalid path").with_source(e))?;
    Ok(())
}
