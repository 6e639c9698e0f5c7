//! Serving a mesh service: register, serve, deregister, drain.
//!
//! [`serve()`] runs the life cycle a sidecar would otherwise run for the app:
//!
//! 1. start accepting on the given listener (HTTP/1.1 and HTTP/2 with prior
//!    knowledge, detected per connection by hyper-util's `auto` server, so
//!    gRPC and HTTP clients share one port);
//! 2. register the endpoint with mesh-control's admin API (see
//!    [`Registration`]) and renew the lease every third of its TTL,
//!    registering again if the control server forgot it;
//! 3. on [`Serving::shutdown`] (or when the [`Serving`] handle is dropped):
//!    deregister first, so clients stop picking this endpoint, while still
//!    accepting connections from clients that have not heard yet; then stop
//!    accepting and drain: HTTP/2 connections get GOAWAY, idle HTTP/1.1
//!    connections close, requests in flight finish (up to a drain timeout,
//!    after which the remaining connections are closed). This is the order
//!    Envoy's and Kubernetes' graceful termination use.
//!
//! Every request carries a [`ConnectionInfo`] extension (peer and local
//! address); put [`ServerLayer`](crate::ServerLayer) on the app for the mesh
//! context.

mod registration;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tower::{Service, ServiceExt};

pub use self::registration::Registration;
use self::registration::{Admin, Lease};
use crate::error::{BoxError, Error, ErrorKind};

/// How long shutdown waits for requests in flight by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection a request arrived on: a request extension set by [`serve()`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionInfo {
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
}

impl ConnectionInfo {
    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The local address the connection was accepted on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// A running service: registered, heartbeating, serving. Shut it down with
/// [`Serving::shutdown`]; dropping it shuts it down in the background.
#[derive(Debug)]
#[must_use = "dropping `Serving` shuts the server down: keep it, or await `shutdown_on`"]
pub struct Serving {
    local_addr: SocketAddr,
    lease: watch::Receiver<String>,
    stop: Option<oneshot::Sender<Duration>>,
    task: Option<JoinHandle<Result<(), Error>>>,
}

/// Serves `app` on `listener` as an endpoint of the mesh service named by
/// `registration` (see the [module docs](self)). Returns once the endpoint
/// is registered; fails if registration does (the listener is closed then).
///
/// `app` is any cloneable `tower::Service<Request<Incoming>>`: an axum
/// `Router`, tonic's `Routes` (or `Routes::into_axum_router()`), or either
/// wrapped in [`ServerLayer`](crate::ServerLayer).
pub async fn serve<S, RB>(
    listener: TcpListener,
    registration: Registration,
    app: S,
) -> Result<Serving, Error>
where
    S: Service<Request<Incoming>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    let local_addr = listener.local_addr().map_err(|e| {
        Error::new(ErrorKind::Io, "cannot read the listener's local address").with_source(e)
    })?;
    let address = registration
        .advertised_address()
        .unwrap_or_else(|| local_addr.ip());
    if address.is_unspecified() {
        return Err(Error::new(
            ErrorKind::Registration,
            format!(
                "the listener is bound to {local_addr}, which clients cannot dial: set \
                 Registration::advertise_address to this host's address"
            ),
        ));
    }
    let port = registration.advertised_port().unwrap_or(local_addr.port());
    let admin = Admin::new(registration.admin())?;
    let body = registration.to_json(address, port);

    // Accept before registering: once clients learn the endpoint, it answers.
    let (drain_tx, drain_rx) = watch::channel(None);
    let accept = tokio::spawn(accept_loop(listener, app, drain_rx));

    let lease = match admin.register(&body).await {
        Ok(lease) => lease,
        Err(e) => {
            let _ = drain_tx.send(Some(Duration::ZERO));
            let _ = accept.await;
            return Err(e.with_context(format!(
                "registering {:?} at {address}:{port}",
                registration.service()
            )));
        }
    };
    tracing::info!(
        service = registration.service(),
        %address,
        port,
        lease = %lease.id,
        "registered with the mesh"
    );
    let (lease_tx, lease_rx) = watch::channel(lease.id.clone());
    let (heartbeat_stop, heartbeat_stopped) = oneshot::channel();
    let heartbeat = tokio::spawn(keep_registered(
        admin,
        body,
        lease,
        lease_tx,
        heartbeat_stopped,
    ));
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        // A dropped handle means: shut down with the default timeout.
        let drain_timeout = stopped.await.unwrap_or(DEFAULT_DRAIN_TIMEOUT);
        let _ = heartbeat_stop.send(());
        let deregistered = match heartbeat.await {
            Ok(result) => result,
            Err(e) => {
                Err(Error::new(ErrorKind::Registration, "the heartbeat task failed").with_source(e))
            }
        };
        let _ = drain_tx.send(Some(drain_timeout));
        let _ = accept.await;
        deregistered
    });
    Ok(Serving {
        local_addr,
        lease: lease_rx,
        stop: Some(stop),
        task: Some(task),
    })
}

impl Serving {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The current lease id (a new one after the control server forgot the
    /// endpoint and it registered again).
    pub fn lease_id(&self) -> String {
        self.lease.borrow().clone()
    }

    /// Deregisters, stops accepting, and waits for requests in flight (up to
    /// [`DEFAULT_DRAIN_TIMEOUT`]). Fails if deregistration failed (the lease
    /// then expires on its own); the server is stopped either way.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.shutdown_within(DEFAULT_DRAIN_TIMEOUT).await
    }

    /// [`Serving::shutdown`] with a drain timeout: connections still open
    /// after it are closed.
    pub async fn shutdown_within(mut self, drain_timeout: Duration) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(drain_timeout);
        }
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| Error::new(ErrorKind::Io, "the serving task failed").with_source(e))?,
            None => Ok(()),
        }
    }

    /// Serves until `signal` resolves (`tokio::signal::ctrl_c()`), then
    /// shuts down.
    pub async fn shutdown_on<F: Future>(self, signal: F) -> Result<(), Error> {
        signal.await;
        self.shutdown().await
    }
}

/// Renews the lease until told to stop, then deregisters.
async fn keep_registered(
    admin: Admin,
    body: serde_json::Value,
    mut lease: Lease,
    lease_tx: watch::Sender<String>,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), Error> {
    loop {
        let interval = lease.heartbeat_interval();
        let renewed = tokio::select! {
            _ = &mut stop => break,
            renewed = async {
                tokio::time::sleep(interval).await;
                admin.renew(&lease).await
            } => renewed,
        };
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(lease = %lease.id, "the control server forgot this endpoint; registering again");
                match admin.register(&body).await {
                    Ok(fresh) => {
                        lease = fresh;
                        lease_tx.send_replace(lease.id.clone());
                    }
                    Err(e) => tracing::warn!(error = %e, "registering again failed; retrying"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; retrying"),
        }
    }
    admin.deregister(&lease).await?;
    tracing::info!(lease = %lease.id, "deregistered from the mesh");
    Ok(())
}

/// Accepts connections until told to drain, then drains them.
async fn accept_loop<S, RB>(
    listener: TcpListener,
    app: S,
    mut drain: watch::Receiver<Option<Duration>>,
) where
    S: Service<Request<Incoming>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let local_addr = listener.local_addr().ok();
    let mut connections = JoinSet::new();
    let (closing_tx, closing_rx) = watch::channel(false);
    let drain_timeout = loop {
        tokio::select! {
            changed = drain.changed() => match changed {
                Ok(()) => match *drain.borrow_and_update() {
                    Some(timeout) => break timeout,
                    None => continue,
                },
                Err(_) => break DEFAULT_DRAIN_TIMEOUT,
            },
            accepted = listener.accept() => match accepted {
                Ok((stream, peer_addr)) => {
                    let info = ConnectionInfo {
                        peer_addr,
                        local_addr: local_addr.unwrap_or(peer_addr),
                    };
                    connections.spawn(serve_connection(
                        builder.clone(),
                        stream,
                        info,
                        app.clone(),
                        closing_rx.clone(),
                    ));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the drain timeout; closing them"
        );
        connections.shutdown().await;
    }
}

async fn serve_connection<S, RB>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    info: ConnectionInfo,
    app: S,
    mut closing: watch::Receiver<bool>,
) where
    S: Service<Request<Incoming>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(info);
        app.clone().oneshot(req)
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(peer = %info.peer_addr, error = %e, "connection ended with an error");
            }
        }
        () = async {
            let _ = closing.wait_for(|closing| *closing).await;
        } => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
