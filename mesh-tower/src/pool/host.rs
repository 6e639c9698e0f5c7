//! The connections to one endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::HOST;
use http::uri::{Parts, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::PoolConfig;
use crate::error::{BoxError, Error, ErrorKind};
use crate::mesh::TargetEndpoint;

/// How many HTTP/1.1 connections a request tries when they turn out to be
/// closed before taking it.
const HTTP1_ATTEMPTS: usize = 3;

pub(super) struct Host<B> {
    addr: SocketAddr,
    http2: ArcSwapOption<http2::SendRequest<B>>,
    dialing: tokio::sync::Mutex<()>,
    /// HTTP/2 dial attempts so far, to tell a request that waited on another
    /// request's failed dial.
    dials: AtomicU64,
    idle: Mutex<Vec<http1::SendRequest<B>>>,
}

impl<B> Host<B> {
    pub(super) fn new(addr: SocketAddr) -> Self {
        Host {
            addr,
            http2: ArcSwapOption::empty(),
            dialing: tokio::sync::Mutex::new(()),
            dials: AtomicU64::new(0),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Whether any connection to this endpoint is open.
    pub(super) fn is_alive(&self) -> bool {
        let http2 = self.http2.load().as_ref().is_some_and(|s| !s.is_closed());
        http2
            || self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|s| !s.is_closed())
    }

    fn open_http2(&self) -> Option<http2::SendRequest<B>> {
        match &*self.http2.load() {
            Some(sender) if !sender.is_closed() => Some(http2::SendRequest::clone(sender)),
            _ => None,
        }
    }

    fn idle_http1(&self) -> Option<http1::SendRequest<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(sender) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: http1::SendRequest<B>, max: usize) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < max && !sender.is_closed() {
            idle.push(sender);
        }
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
    ) -> Result<Response<Incoming>, Error> {
        prepare_http2(&mut req)?;
        let mut sender = self.http2_sender(target, config).await?;
        match sender.try_send_request(req).await {
            Ok(response) => Ok(response),
            Err(mut e) => match e.take_message() {
                // The connection closed before taking the request: send it
                // once more on a fresh connection.
                Some(req) => {
                    let mut sender = self.http2_sender(target, config).await?;
                    sender
                        .send_request(req)
                        .await
                        .map_err(|e| upstream(target, e))
                }
                None => Err(upstream(target, e.into_error())),
            },
        }
    }

    async fn http2_sender(
        &self,
        target: &TargetEndpoint,
        config: PoolConfig,
    ) -> Result<http2::SendRequest<B>, Error> {
        if let Some(sender) = self.open_http2() {
            return Ok(sender);
        }
        let attempts = self.dials.load(Ordering::Acquire);
        let _dialing = self.dialing.lock().await;
        if let Some(sender) = self.open_http2() {
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
        self.dials.fetch_add(1, Ordering::AcqRel);
        let io = connect(target, config.connect_timeout).await?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        if let Some(interval) = config.http2_keep_alive {
            builder
                .keep_alive_interval(interval)
                .keep_alive_timeout(interval.max(Duration::from_secs(1)))
                .keep_alive_while_idle(true);
        }
        let (sender, connection) = builder
            .handshake(io)
            .await
            .map_err(|e| handshake_error(target, e))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%addr, error = %e, "HTTP/2 connection closed");
            }
        });
        self.http2.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    pub(super) async fn send_http1(
        self: Arc<Self>,
        mut req: Request<B>,
        target: &TargetEndpoint,
        config: PoolConfig,
    ) -> Result<Response<Incoming>, Error> {
        prepare_http1(&mut req)?;
        let mut last = None;
        for _ in 0..HTTP1_ATTEMPTS {
            let mut sender = match self.idle_http1() {
                Some(sender) => sender,
                None => self.dial_http1(target, config).await?,
            };
            let sent = sender.try_send_request(req);
            // Back to the idle stack once this response has been read.
            let host = self.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    host.put_idle(sender, config.max_idle_per_host);
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

    async fn dial_http1(
        &self,
        target: &TargetEndpoint,
        config: PoolConfig,
    ) -> Result<http1::SendRequest<B>, Error> {
        let io = connect(target, config.connect_timeout).await?;
        let (sender, connection) = http1::handshake(io)
            .await
            .map_err(|e| handshake_error(target, e))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%addr, error = %e, "HTTP/1.1 connection closed");
            }
        });
        Ok(sender)
    }
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
    crate::mesh::ensure_authority_in_uri(req)?;
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
