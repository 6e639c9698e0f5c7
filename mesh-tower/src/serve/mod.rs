//! Serving a mesh service: register, serve, deregister, drain.
//!
//! [`serve()`] runs the life cycle a sidecar would otherwise run for the app:
//!
//! 1. start accepting on the given listener (HTTP/1.1 and HTTP/2 with prior
//!    knowledge, detected per connection by hyper-util's `auto` server, so
//!    gRPC and HTTP clients share one port);
//! 2. register the endpoint with mesh-control's admin API (see
//!    [`Registration`]) and renew the lease every third of its TTL,
//!    registering again if the control server forgot it. mesh-control
//!    being down does not keep the service from starting: when the first
//!    attempt cannot reach it (or has no answer within [`REGISTER_WAIT`]),
//!    [`serve()`] returns a serving [`Serving`] anyway and registers in the
//!    background, retrying with jittered exponential backoff (250 ms growing
//!    by 1.6 up to 10 s, as gRPC's connection backoff) until it is
//!    registered, then heartbeats as usual. Clients that already know the
//!    endpoint (from their own cached config, see
//!    `mesh_xds_client::cache`) reach it meanwhile. Only a refusal fails
//!    `serve` (mesh-control answered 4xx: an unknown namespace, an identity
//!    not allowed to back the service), since retrying cannot fix it;
//! 3. on [`Serving::shutdown`] (or when the [`Serving`] handle is dropped):
//!    deregister first, so clients stop picking this endpoint, and keep
//!    serving for [`PROPAGATION_GRACE`] while the change reaches them; then
//!    stop accepting and drain: HTTP/2 connections get GOAWAY, idle HTTP/1.1
//!    connections close, requests in flight finish (up to a drain timeout,
//!    after which the remaining connections are closed). This is the order
//!    Envoy's and Kubernetes' graceful termination use.
//!
//! Shutdown waits only for what needs waiting for, so an idle server stops
//! in a quarter of a second: deregistration is one call bounded by
//! [`DEREGISTER_TIMEOUT`] (a control server that does not answer costs that
//! much, and the lease then expires on its own), then the propagation
//! grace; a heartbeat under way is abandoned (a re-registration gets the
//! deregistration's bound, so the lease it made is the one removed), idle
//! keep-alive connections and connections still in their TLS handshake (no
//! request on them yet) are closed at once, and the drain ends when the
//! last request in flight has been answered.
//!
//! Every request carries a [`ConnectionInfo`] extension (peer and local
//! address); put [`ServerLayer`](crate::ServerLayer) on the app for the mesh
//! context.
//!
//! [`serve_with`] adds zero-trust transport security ([`Security`]): it
//! accepts connections under the mTLS mode of an
//! [`InboundPolicy`] (Istio's PeerAuthentication:
//! STRICT requires a client certificate of the mesh's trust domain,
//! PERMISSIVE takes mTLS and plaintext on one port, DISABLE plaintext),
//! with the workload certificate of a [`CertStore`]. The TLS handshake runs
//! in the connection's task under a timeout (10 s by default), never in
//! the accept loop. When the mode changes, connections accepted from then
//! on use the new one; live ones keep theirs. Requests on an mTLS
//! connection carry the client's verified
//! [`PeerIdentity`] next to [`ConnectionInfo`],
//! and `serve_with` authorizes every request under the `InboundPolicy`
//! itself, once, before the app sees it, whatever the app is made of (see
//! [the server stack](crate::server) for why, and how a
//! [`ServerLayer`](crate::ServerLayer) reuses the decision): denials are
//! logged and counted by [`InboundPolicy::denied`], and with
//! [`Security::telemetry`] also traced and counted in Istio's metrics. A
//! TLS connection
//! is closed gracefully (HTTP/2 GOAWAY, HTTP/1.1 `connection: close` after
//! the request in flight) when the server certificate it was established
//! with expires: a maximum connection age, so no connection outlives its
//! certificate, while requests in flight finish.

mod registration;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use self::registration::RegisterFailure;
pub use self::registration::Registration;
// The admin API's client, also used by the graph push (telemetry/graph_push.rs).
pub(crate) use self::registration::Admin;
// Defined below both the server stack and the client stack, which read it;
// re-exported here, where `serve` sets it.
pub use crate::connection::ConnectionInfo;
use crate::error::{BoxError, Error, ErrorKind};
use crate::server::{Guard, InboundPolicy};
#[cfg(feature = "telemetry")]
use crate::telemetry::Telemetry;
use crate::tls::{ALPN_H2_HTTP11, CertStore, MeshAcceptor, MtlsMode, PeerIdentity};

/// How long shutdown waits for requests in flight by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long shutdown waits for mesh-control to acknowledge the
/// deregistration before it stops accepting anyway (a healthy control
/// server answers in milliseconds; an unreachable or hung one must not
/// hold a Ctrl-C up, and the lease expires on its own within its TTL).
pub const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a deregistered server keeps serving normally before it drains:
/// the time mesh-control's push takes to reach its clients (milliseconds;
/// this leaves room for a loaded machine). Until a client has applied the
/// new endpoint list it may still pick this endpoint, even on an idle
/// keep-alive connection, and a request written on a connection the server
/// has just closed fails without a response (Envoy's `UC`), which no retry
/// policy that leaves out `reset` retries. Draining only after the grace
/// costs an idle server this much at shutdown, and a busy one loses no
/// request (found by `examples/soak.rs`: 5-11 failed requests a minute
/// under endpoint churn without it). Like Kubernetes' `preStop` delay, but
/// started by the deregistration itself.
pub const PROPAGATION_GRACE: Duration = Duration::from_millis(250);

/// How long a client has to complete the TLS handshake by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`serve_with`] waits for an xDS inbound policy by default.
pub const DEFAULT_POLICY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`serve()`] waits for the first registration attempt before it
/// returns and leaves the registration to the background (a healthy
/// mesh-control answers in milliseconds, a down one refuses at once; this
/// bounds the wait on one that does neither).
pub const REGISTER_WAIT: Duration = Duration::from_secs(1);

/// The first delay between registration attempts while mesh-control is
/// unreachable, its growth and its cap: gRPC's connection backoff
/// (multiplier 1.6, jitter ±20 %), capped low enough that an endpoint joins
/// within seconds of mesh-control's return.
const REGISTER_BACKOFF_FIRST: Duration = Duration::from_millis(250);
const REGISTER_BACKOFF_CAP: Duration = Duration::from_secs(10);

/// The transport security and authorization [`serve_with`] serves under:
/// an [`InboundPolicy`] (mTLS mode and AuthorizationPolicies) and the
/// workload's certificates.
///
/// ```no_run
/// # async fn demo(
/// #     xds: mesh_xds_client::XdsClient,
/// #     store: mesh_tower::tls::CertStore,
/// #     app: axum::Router,
/// # ) -> Result<(), mesh_tower::BoxError> {
/// use mesh_tower::{InboundPolicy, Registration, Security, ServerLayer, ServerContext, serve_with};
/// let address: std::net::SocketAddr = "10.0.0.7:8080".parse()?;
/// let listener = tokio::net::TcpListener::bind(address).await?;
/// // The mode and policies mesh-control computes for this workload and port.
/// let policy = InboundPolicy::from_xds(&xds, address)?;
/// let app = app.layer(ServerLayer::from_bootstrap(xds.bootstrap(), "catalog"));
/// let registration = Registration::from_bootstrap(xds.bootstrap(), "catalog")?;
/// let security = Security::new(policy).certificates(store);
/// let serving = serve_with(listener, registration, app, security).await?;
/// serving.shutdown_on(tokio::signal::ctrl_c()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Security {
    inbound: InboundPolicy,
    certificates: Option<CertStore>,
    handshake_timeout: Duration,
    policy_timeout: Duration,
    #[cfg(feature = "telemetry")]
    telemetry: Option<Telemetry>,
}

impl Security {
    /// Serving under `inbound`'s mode and policies. Any mode but DISABLE
    /// also needs [`Security::certificates`].
    pub fn new(inbound: InboundPolicy) -> Self {
        Security {
            inbound,
            certificates: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            policy_timeout: DEFAULT_POLICY_TIMEOUT,
            #[cfg(feature = "telemetry")]
            telemetry: None,
        }
    }

    /// The workload's certificate, key and trust bundle (rotated in place:
    /// new handshakes use the current ones).
    pub fn certificates(mut self, store: CertStore) -> Self {
        self.certificates = Some(store);
        self
    }

    /// How long a client may take to complete the TLS handshake
    /// ([`DEFAULT_HANDSHAKE_TIMEOUT`]); a slower one is disconnected.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long [`serve_with`] waits for an xDS inbound policy to arrive
    /// before failing ([`DEFAULT_POLICY_TIMEOUT`]).
    pub fn policy_timeout(mut self, timeout: Duration) -> Self {
        self.policy_timeout = timeout;
        self
    }

    /// Reports the requests [`serve_with`] refuses itself (denied by the
    /// inbound policy, or refused before the policy arrived) under
    /// `telemetry`: a SERVER span continuing the caller's trace, with the
    /// decision (`mesh.authz.*`, `istio.authorization.dry_run.*`), Istio's
    /// metrics (`response_code="403"`), the dry-run counter and an access
    /// log line, as the app's
    /// [`ServerTelemetryLayer`](crate::telemetry::ServerTelemetryLayer)
    /// reports the requests it sees. Without it those requests are only
    /// logged (`tracing` INFO) and counted by [`InboundPolicy::denied`].
    /// Pass the app's telemetry: requests that reach the app are reported
    /// by the app's layer, never here, so nothing is counted twice.
    /// Feature `telemetry`.
    #[cfg(feature = "telemetry")]
    pub fn telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// The inbound policy.
    pub fn inbound(&self) -> &InboundPolicy {
        &self.inbound
    }
}

/// What the accept loop of a secure server holds.
struct Secure {
    inbound: InboundPolicy,
    certificates: Option<CertStore>,
    handshake_timeout: Duration,
    #[cfg(feature = "telemetry")]
    telemetry: Option<Telemetry>,
    /// The acceptor for `mode`; `None` when the mode needs certificates
    /// the server does not have (connections are refused then).
    acceptor: Option<MeshAcceptor>,
    mode: MtlsMode,
}

impl Secure {
    fn new(security: Security) -> Result<Self, Error> {
        let mode = security.inbound.mode();
        let acceptor = acceptor_for(mode, security.certificates.as_ref())?;
        Ok(Secure {
            inbound: security.inbound,
            certificates: security.certificates,
            handshake_timeout: security.handshake_timeout,
            #[cfg(feature = "telemetry")]
            telemetry: security.telemetry,
            acceptor: Some(acceptor),
            mode,
        })
    }

    /// What each request of a connection is checked under.
    fn checks(&self) -> Checks {
        Checks {
            policy: self.inbound.clone(),
            #[cfg(feature = "telemetry")]
            telemetry: self.telemetry.clone(),
        }
    }

    /// The acceptor for the current mode, rebuilt when the mode changed.
    fn acceptor(&mut self) -> Option<&MeshAcceptor> {
        let mode = self.inbound.mode();
        if mode != self.mode {
            self.mode = mode;
            self.acceptor = match acceptor_for(mode, self.certificates.as_ref()) {
                Ok(acceptor) => {
                    tracing::info!(%mode, "mTLS mode changed; new connections use it");
                    Some(acceptor)
                }
                Err(e) => {
                    tracing::error!(%mode, error = %e, "cannot serve under the new mTLS mode; refusing connections");
                    None
                }
            };
        }
        self.acceptor.as_ref()
    }
}

/// What [`serve_with`] checks every request of a connection under: the
/// inbound policy, and the telemetry its refusals are reported under.
struct Checks {
    policy: InboundPolicy,
    #[cfg(feature = "telemetry")]
    telemetry: Option<Telemetry>,
}

fn acceptor_for(mode: MtlsMode, certificates: Option<&CertStore>) -> Result<MeshAcceptor, Error> {
    if mode != MtlsMode::Disable && certificates.is_none() {
        return Err(Error::new(
            ErrorKind::Tls,
            format!(
                "the server's mTLS mode is {mode} but it has no workload certificate: configure \
                 certificate_providers.mesh in the bootstrap (file_watcher or mesh_ca) and pass \
                 its store with Security::certificates"
            ),
        ));
    }
    MeshAcceptor::new(mode, certificates, ALPN_H2_HTTP11)
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
/// is registered, or, when mesh-control cannot be reached (or does not
/// answer within [`REGISTER_WAIT`]), once serving, with the registration
/// retried in the background ([`Serving::is_registered`]). Fails when
/// mesh-control refuses the registration (the listener is closed then).
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
    start(listener, registration, app, None).await
}

/// [`serve()`] under `security`: mTLS under the inbound policy's mode,
/// the peer's identity and the policy on every request (see the
/// [module docs](self)). Every request is authorized here before `app`
/// sees it; a [`ServerLayer`](crate::ServerLayer) on `app` records the
/// decision (and one given the same policy does not evaluate it again).
///
/// Waits for an xDS policy to arrive first (gRFC A36: a server does not
/// serve before its listener arrives; up to [`Security::policy_timeout`]).
/// While mesh-control is down, the policy of the xDS client's cache file
/// counts (it arrives within the client's cache wait, 1 s), so a workload
/// that served before restarts under the policy it last had, and
/// registers in the background as [`serve()`] does. Fails without
/// registering when no policy arrives, or when the mode is STRICT or
/// PERMISSIVE and there are no certificates.
pub async fn serve_with<S, RB>(
    listener: TcpListener,
    registration: Registration,
    app: S,
    security: Security,
) -> Result<Serving, Error>
where
    S: Service<Request<Incoming>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    security.inbound.ready(security.policy_timeout).await?;
    let secure = Secure::new(security)?;
    start(listener, registration, app, Some(secure)).await
}

/// The bounds [`serve()`] puts on `app`, named once for the functions
/// behind it.
trait App<RB>:
    Service<
        Request<Incoming>,
        Response = Response<RB>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
}

impl<S, RB> App<RB> for S
where
    S: Service<Request<Incoming>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
}

/// The bounds [`serve()`] puts on the response body of `app`.
trait AppBody: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> AppBody for B
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
}

async fn start<S, RB>(
    listener: TcpListener,
    registration: Registration,
    app: S,
    secure: Option<Secure>,
) -> Result<Serving, Error>
where
    S: App<RB>,
    RB: AppBody,
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
    let mut admin = Admin::new(registration.admin())?;
    if let Some(store) = secure.as_ref().and_then(|s| s.certificates.as_ref()) {
        // Heartbeats keep verifying mesh-control after a root rotation.
        admin = admin.trusting(store);
    }
    let body = registration.to_json(address, port);

    // Accept before registering: once clients learn the endpoint, it answers.
    let (drain_tx, drain_rx) = watch::channel(None);
    let accept = tokio::spawn(accept_loop(listener, app, drain_rx, secure));

    let (lease_tx, lease_rx) = watch::channel(String::new());
    let (first_tx, first_rx) = oneshot::channel();
    let (heartbeat_stop, heartbeat_stopped) = oneshot::channel();
    let endpoint = Endpoint {
        service: registration.service().to_owned(),
        address,
        port,
    };
    let heartbeat = tokio::spawn(keep_registered(
        Registrar {
            admin,
            body,
            endpoint: endpoint.clone(),
        },
        lease_tx,
        first_tx,
        heartbeat_stopped,
    ));
    match tokio::time::timeout(REGISTER_WAIT, first_rx).await {
        Ok(Ok(First::Refused(e))) => {
            let _ = drain_tx.send(Some(Duration::ZERO));
            let _ = accept.await;
            let _ = heartbeat.await;
            return Err(e.with_context(format!(
                "registering {:?} at {address}:{port}",
                endpoint.service
            )));
        }
        Ok(Ok(First::Registered | First::Retrying)) => {}
        Ok(Err(_)) | Err(_) => {
            tracing::warn!(
                service = %endpoint.service,
                %address,
                port,
                "mesh-control's admin API has not answered within {REGISTER_WAIT:?}: serving, \
                 registering in the background"
            );
        }
    }
    let (stop, stopped) = oneshot::channel();
    let registered = lease_rx.clone();
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
        // Clients that knew the endpoint learn it left before it drains;
        // one never registered was never known, and a zero drain asks for
        // no delay.
        if deregistered.is_ok() && !registered.borrow().is_empty() && !drain_timeout.is_zero() {
            tokio::time::sleep(PROPAGATION_GRACE).await;
        }
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
    /// endpoint and it registered again); empty while the endpoint is not
    /// registered yet (mesh-control unreachable since the start).
    pub fn lease_id(&self) -> String {
        self.lease.borrow().clone()
    }

    /// Whether the endpoint has been registered: false while mesh-control
    /// has been unreachable since [`serve()`] returned (the registration is
    /// retried in the background).
    pub fn is_registered(&self) -> bool {
        !self.lease.borrow().is_empty()
    }

    /// Deregisters (within [`DEREGISTER_TIMEOUT`]), stops accepting, closes
    /// idle connections, and waits for requests in flight (up to
    /// [`DEFAULT_DRAIN_TIMEOUT`]); with nothing in flight it returns as soon
    /// as mesh-control has acknowledged. Fails if deregistration failed (the
    /// lease then expires on its own); the server is stopped either way.
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

/// The endpoint a registration is for, for logs and errors.
#[derive(Debug, Clone)]
struct Endpoint {
    service: String,
    address: std::net::IpAddr,
    port: u16,
}

/// What registering and heartbeating need.
struct Registrar {
    admin: Admin,
    body: serde_json::Value,
    endpoint: Endpoint,
}

/// How the first registration attempt went, for [`serve()`] to decide
/// whether to return serving.
enum First {
    Registered,
    /// mesh-control could not take it; the background retries.
    Retrying,
    /// mesh-control refused it: `serve` fails.
    Refused(Error),
}

/// Jittered exponential backoff between registration attempts.
struct RegisterBackoff {
    next: Duration,
}

impl RegisterBackoff {
    fn new() -> Self {
        RegisterBackoff {
            next: REGISTER_BACKOFF_FIRST,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.mul_f64(1.6).min(REGISTER_BACKOFF_CAP);
        delay.mul_f64(rand::random_range(0.8..=1.2))
    }
}

/// Registers (retrying with backoff until it is done), then renews the
/// lease until told to stop, then deregisters. Reports the first attempt
/// through `first`; a first attempt that is refused ends the task.
///
/// Shutdown takes at most [`DEREGISTER_TIMEOUT`] here: a heartbeat or a
/// backoff wait under way is abandoned, but a registration under way is
/// given what is left of that time to finish, so a lease it creates is the
/// one deregistered instead of one left to expire while clients still pick
/// a stopping endpoint. A stop before any registration deregisters nothing.
async fn keep_registered(
    registrar: Registrar,
    lease_tx: watch::Sender<String>,
    first: oneshot::Sender<First>,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), Error> {
    let Registrar {
        admin,
        body,
        endpoint,
    } = registrar;
    let Endpoint {
        service,
        address,
        port,
    } = &endpoint;
    let mut first = Some(first);
    let mut backoff = RegisterBackoff::new();
    let mut attempts = 0u32;
    let mut last_problem: Option<String> = None;
    let (mut lease, mut stopping) = loop {
        attempts += 1;
        let (attempt, stopping) = register_or_stop(&admin, &body, &mut stop).await;
        let failure = match attempt {
            Some(Ok(lease)) => break (lease, stopping),
            // Stopped, and no registration landed that we know of.
            None => return Ok(()),
            Some(Err(_)) if stopping.is_some() => return Ok(()),
            Some(Err(RegisterFailure::Refused(e))) if first.is_some() => {
                if let Some(first) = first.take() {
                    let _ = first.send(First::Refused(e));
                }
                return Ok(());
            }
            Some(Err(failure)) => failure,
        };
        let delay = backoff.next_delay();
        let refused = matches!(failure, RegisterFailure::Refused(_));
        let problem = failure.into_error().to_string();
        if let Some(first) = first.take() {
            tracing::warn!(
                %service, %address, port,
                retry_in = ?delay,
                "cannot register with mesh-control: serving anyway, registering in the \
                 background until it answers: {problem}"
            );
            let _ = first.send(First::Retrying);
        } else if refused {
            // The config changed under a running endpoint: say so each time.
            tracing::error!(%service, %address, port, retry_in = ?delay, "mesh-control refuses to register this endpoint: {problem}");
        } else if last_problem.as_deref() != Some(problem.as_str()) {
            tracing::warn!(%service, %address, port, retry_in = ?delay, "registering with mesh-control failed again: {problem}");
        } else {
            tracing::debug!(%service, %address, port, retry_in = ?delay, attempts, "registering with mesh-control failed again: {problem}");
        }
        last_problem = Some(problem);
        tokio::select! {
            _ = &mut stop => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    };
    // The lease first: `serve` returns on the report, and the `Serving` it
    // returns must say it is registered.
    lease_tx.send_replace(lease.id.clone());
    if let Some(first) = first.take() {
        let _ = first.send(First::Registered);
    }
    tracing::info!(
        %service,
        %address,
        port,
        lease = %lease.id,
        attempts,
        "registered with the mesh"
    );
    let deadline = loop {
        if let Some(deadline) = stopping {
            break deadline;
        }
        let renewed = tokio::select! {
            _ = &mut stop => break Instant::now() + DEREGISTER_TIMEOUT,
            renewed = async {
                tokio::time::sleep(lease.heartbeat_interval()).await;
                admin.renew(&lease).await
            } => renewed,
        };
        match renewed {
            Ok(true) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed; retrying");
                continue;
            }
            Ok(false) => {}
        }
        tracing::warn!(lease = %lease.id, "the control server forgot this endpoint; registering again");
        let (fresh, stop_at) = register_or_stop(&admin, &body, &mut stop).await;
        stopping = stop_at;
        match fresh {
            Some(Ok(fresh)) => {
                lease = fresh;
                lease_tx.send_replace(lease.id.clone());
            }
            Some(Err(failure)) => {
                let e = failure.into_error();
                tracing::warn!(error = %e, "registering again failed; retrying");
            }
            None => {}
        }
    };
    match tokio::time::timeout_at(deadline, admin.deregister(&lease)).await {
        Ok(Ok(())) => {
            tracing::info!(lease = %lease.id, "deregistered from the mesh");
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::new(
            ErrorKind::Registration,
            format!(
                "deregistering lease {} got no answer within {DEREGISTER_TIMEOUT:?}; the \
                 endpoint leaves the mesh when its lease expires",
                lease.id
            ),
        )),
    }
}

/// One registration attempt. When the stop comes first, the attempt gets
/// until [`DEREGISTER_TIMEOUT`] from then to finish (its lease must be
/// deregistered, not left behind); that deadline is returned with the
/// outcome (`None`: it did not finish in time).
async fn register_or_stop(
    admin: &Admin,
    body: &serde_json::Value,
    stop: &mut oneshot::Receiver<()>,
) -> (
    Option<Result<registration::Lease, RegisterFailure>>,
    Option<Instant>,
) {
    let attempt = admin.register(body);
    tokio::pin!(attempt);
    tokio::select! {
        outcome = &mut attempt => (Some(outcome), None),
        _ = stop => {
            let deadline = Instant::now() + DEREGISTER_TIMEOUT;
            (tokio::time::timeout_at(deadline, attempt).await.ok(), Some(deadline))
        }
    }
}

/// Accepts connections until told to drain, then drains them.
async fn accept_loop<S, RB>(
    listener: TcpListener,
    app: S,
    mut drain: watch::Receiver<Option<Duration>>,
    mut secure: Option<Secure>,
) where
    S: App<RB>,
    RB: AppBody,
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
                    let _ = stream.set_nodelay(true);
                    let info = ConnectionInfo::new(peer_addr, local_addr.unwrap_or(peer_addr));
                    match &mut secure {
                        None => {
                            connections.spawn(serve_connection(
                                builder.clone(),
                                stream,
                                Conn {
                                    info,
                                    peer: None,
                                    inbound: None,
                                    max_age: None,
                                },
                                app.clone(),
                                closing_rx.clone(),
                            ));
                        }
                        Some(secure) => {
                            let Some(acceptor) = secure.acceptor().cloned() else {
                                // Fail closed: the mode needs certificates
                                // this server does not have.
                                drop(stream);
                                continue;
                            };
                            connections.spawn(serve_secure(
                                builder.clone(),
                                stream,
                                acceptor,
                                secure.handshake_timeout,
                                secure.certificates.clone(),
                                secure.checks(),
                                info,
                                app.clone(),
                                closing_rx.clone(),
                            ));
                        }
                    }
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

/// Runs the TLS handshake (under a timeout, in the connection's own task),
/// then serves the connection.
#[allow(clippy::too_many_arguments)]
async fn serve_secure<S, RB>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    acceptor: MeshAcceptor,
    handshake_timeout: Duration,
    certificates: Option<CertStore>,
    inbound: Checks,
    info: ConnectionInfo,
    app: S,
    mut closing: watch::Receiver<bool>,
) where
    S: App<RB>,
    RB: AppBody,
{
    // Read before the handshake: if the store rotates during it, the
    // connection's age is bounded by the older (earlier) expiry.
    let not_after = certificates.as_ref().map(CertStore::not_after);
    let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
    let stream = tokio::select! {
        accepted = handshake => match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(peer = %info.peer_addr(), mode = %acceptor.mode(), error = %e, "connection refused");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %info.peer_addr(), timeout = ?handshake_timeout, "TLS handshake timed out");
                return;
            }
        },
        // No request can be in flight before the handshake: a draining
        // server closes the connection instead of waiting it out.
        () = async {
            let _ = closing.wait_for(|closing| *closing).await;
        } => {
            tracing::debug!(peer = %info.peer_addr(), "closed during its TLS handshake: the server is shutting down");
            return;
        }
    };
    let max_age = match not_after {
        Some(not_after) if stream.is_tls() => {
            let left = not_after
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO);
            Some(Instant::now() + left)
        }
        _ => None,
    };
    let conn = Conn {
        info,
        peer: stream.peer_identity().cloned(),
        inbound: Some(inbound),
        max_age,
    };
    serve_connection(builder, stream, conn, app, closing).await;
}

/// What the requests of one connection are given, and how long it may live.
struct Conn {
    info: ConnectionInfo,
    peer: Option<PeerIdentity>,
    inbound: Option<Checks>,
    /// When the server certificate the connection was established with
    /// expires.
    max_age: Option<Instant>,
}

async fn serve_connection<IO, S, RB>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: IO,
    conn: Conn,
    app: S,
    mut closing: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: App<RB>,
    RB: AppBody,
{
    let Conn {
        info,
        peer,
        inbound,
        max_age,
    } = conn;
    let app = match inbound {
        None => Guard::new(app, None),
        Some(checks) => {
            let guard = Guard::new(app, Some(checks.policy));
            #[cfg(feature = "telemetry")]
            let guard = guard.with_telemetry(checks.telemetry);
            guard
        }
    };
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let extensions = req.extensions_mut();
        extensions.insert(info);
        if let Some(peer) = &peer {
            extensions.insert(peer.clone());
        }
        app.clone().oneshot(req)
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let expired = async {
        match max_age {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(peer = %info.peer_addr(), error = %e, "connection ended with an error");
            }
        }
        () = async {
            let _ = closing.wait_for(|closing| *closing).await;
        } => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
        () = expired => {
            tracing::debug!(peer = %info.peer_addr(), "the certificate this connection was established with expired; closing it gracefully");
            connection.as_mut().graceful_shutdown();
            // Still drains on shutdown: the accept loop's drain timeout
            // ends it.
            let _ = connection.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::routing::{delete, post, put};
    use mesh_testkit::wait::{DEADLINE, eventually, within};
    use serde_json::json;

    use super::*;

    /// The admin API calls seen, as `METHOD path`.
    type Calls = Arc<Mutex<Vec<String>>>;

    fn seen(calls: &Calls) -> Vec<String> {
        calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A minimal mesh-control admin API on `listener`: every registration
    /// gets lease `lease-1` (TTL 1 s).
    fn admin_api(listener: TcpListener, calls: Calls) -> JoinHandle<()> {
        let record = move |call: &str| {
            calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(call.to_owned());
        };
        let (r1, r2, r3) = (record.clone(), record.clone(), record);
        let app = Router::new()
            .route(
                "/v1/endpoints",
                post(move || async move {
                    r1("POST /v1/endpoints");
                    axum::Json(json!({"lease_id": "lease-1", "ttl_seconds": 1}))
                }),
            )
            .route(
                "/v1/endpoints/{lease}",
                put(move || async move { r2("PUT /v1/endpoints/lease-1") }),
            )
            .route(
                "/v1/endpoints/{lease}",
                delete(move || async move { r3("DELETE /v1/endpoints/lease-1") }),
            );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }

    /// A free port on 127.0.0.1 (bound, then released).
    async fn free_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    /// mesh-control down: `serve` returns serving, unregistered, and the
    /// endpoint answers; once the admin API comes up, the background
    /// registration lands (with backoff, within seconds), heartbeats follow,
    /// and shutdown deregisters.
    #[tokio::test]
    async fn serve_starts_without_mesh_control_and_registers_when_it_comes_up() {
        let admin = free_port().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(|| async { "served" });
        let serving = within(
            "serve with mesh-control down",
            serve(
                listener,
                Registration::new(admin.to_string(), "catalog").ttl(Duration::from_secs(1)),
                app,
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("serve must not fail while mesh-control is down: {e}"));
        assert!(!serving.is_registered());
        assert_eq!(serving.lease_id(), "");
        let reply = http_get(addr).await;
        assert!(reply.ends_with("served"), "the endpoint answers: {reply}");

        let calls = Calls::default();
        let _api = admin_api(TcpListener::bind(admin).await.unwrap(), calls.clone());
        eventually("the background registration", DEADLINE, || {
            serving.is_registered()
        })
        .await;
        assert_eq!(serving.lease_id(), "lease-1");
        eventually("a heartbeat", DEADLINE, || {
            seen(&calls).iter().any(|c| c.starts_with("PUT "))
        })
        .await;
        within("shutdown", serving.shutdown()).await.unwrap();
        assert_eq!(
            seen(&calls).last().map(String::as_str),
            Some("DELETE /v1/endpoints/lease-1")
        );
        assert_eq!(
            seen(&calls)
                .iter()
                .filter(|c| c.starts_with("POST "))
                .count(),
            1
        );
    }

    /// Never registered: shutdown has nothing to deregister and stops at once.
    #[tokio::test]
    async fn an_unregistered_server_shuts_down_without_deregistering() {
        let admin = free_port().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = serve(
            listener,
            Registration::new(admin.to_string(), "catalog"),
            axum::Router::new(),
        )
        .await
        .unwrap();
        assert!(!serving.is_registered());
        within("shutdown", serving.shutdown()).await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "stopped");
    }

    #[test]
    fn registration_backoff_grows_with_jitter_to_its_cap() {
        let mut b = RegisterBackoff::new();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(200) && first <= Duration::from_millis(300));
        for _ in 0..30 {
            let d = b.next_delay();
            assert!(d <= REGISTER_BACKOFF_CAP.mul_f64(1.2), "{d:?}");
        }
        assert_eq!(b.next, REGISTER_BACKOFF_CAP);
    }

    /// One plaintext HTTP/1.1 GET of `/`: the raw reply.
    async fn http_get(addr: SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        within("the reply", stream.read_to_string(&mut reply))
            .await
            .unwrap();
        reply
    }
}
