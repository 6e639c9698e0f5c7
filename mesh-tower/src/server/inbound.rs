//! The server's inbound policy: its PeerAuthentication mode and the
//! AuthorizationPolicies that apply to it, fixed or followed over xDS.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Request;
use mesh_core::cors::CorsRoute;
use mesh_core::model::{MtlsMode, Name, ServerListener};
use mesh_core::ratelimit::RateLimitConfig;
use mesh_core::rbac::{self, AuthorizationPolicy, DryRun, Reason, RequestAttributes};
use mesh_core::spiffe::SpiffeId;
use mesh_core::xds::ResourceType;
use mesh_xds_client::XdsClient;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::ServerContext;
use crate::connection::{Authorized, ConnectionInfo, PolicyKey};
use crate::error::{Error, ErrorKind};
use crate::local_reply::LocalReply;
use crate::ratelimit::{Limiter, carry_over};
use crate::telemetry::DecisionRecord;
use crate::tls::PeerIdentity;

/// The example template named in errors about a bootstrap without one.
const TEMPLATE_EXAMPLE: &str = "grpc/server?xds.resource.listening_address=%s";

/// What a server enforces on inbound connections and requests: the mTLS
/// mode (Istio's PeerAuthentication, resolved for this workload and port)
/// and the AuthorizationPolicies that apply (Istio's semantics, see
/// [`mesh_core::rbac`]).
///
/// Either fixed by the app ([`InboundPolicy::fixed`], changed with
/// [`InboundPolicy::set`]) or delivered by the control server as the
/// server's gRFC A36 listener ([`InboundPolicy::from_xds`]), updated in
/// place as the mesh config changes: new connections use the new mode,
/// every request the new policies, without a restart.
///
/// Cheap to clone (an `Arc`); clones share the policy. The request path
/// reads it with one lock-free atomic load ([`InboundPolicy::current`]).
/// Give it to [`serve_with`](crate::serve::serve_with), which accepts
/// connections under its mode and authorizes every request with it, and,
/// if the app should also be checked where it is not served by
/// `serve_with`, to [`ServerLayer::inbound`](crate::ServerLayer::inbound):
/// a layer given the policy `serve_with` already decided a request with
/// reuses that decision ([`Authorized`]) instead of evaluating it twice.
#[derive(Clone)]
pub struct InboundPolicy {
    shared: Arc<Shared>,
}

struct Shared {
    current: ArcSwap<InboundConfig>,
    mode: watch::Sender<MtlsMode>,
    status: watch::Sender<Status>,
    /// The A36 listener name, for xDS policies.
    listener: Option<Name>,
    denied: AtomicU64,
    /// What the [`Authorized`] decisions of this policy are known by.
    key: PolicyKey,
    /// The task following xDS, ended when the last handle goes.
    task: Option<AbortHandle>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Whether the policy has arrived (xDS) and what went wrong if not.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Pending,
    Ready,
    Missing,
    Rejected(String),
    Closed,
}

/// The inbound policy at one moment (see [`InboundPolicy::current`]).
#[derive(Clone)]
pub struct InboundConfig {
    mode: MtlsMode,
    policies: Arc<[AuthorizationPolicy]>,
    /// Whether any policy is in dry-run (computed once per config, so a
    /// request under a config without one pays nothing for dry-run).
    dry_run: bool,
    listener: Option<Name>,
    version: u64,
    ready: bool,
    /// The decisions this config can allow a request with when it has no
    /// dry-run policies, made once per config so that an allowed request
    /// is passed on with a clone (no allocation): entry `i` for the
    /// enforced ALLOW policy at index `i` of `policies`, the last entry
    /// for "no ALLOW policy applies".
    allowed: Arc<[Option<Authorized>]>,
    /// The decisions remembered per peer, when the policies read only the
    /// peer (see [`PeerVerdicts`]).
    peer_verdicts: Option<Arc<PeerVerdicts>>,
    /// The local rate limit and its buckets (`None`: none, or one that can
    /// never limit), carried over from the previous config when unchanged.
    rate_limit: Option<Arc<Limiter>>,
    /// The CORS routes (see the `cors` module docs); empty: no CORS.
    cors: Arc<[CorsRoute]>,
}

impl InboundConfig {
    fn new(
        mode: MtlsMode,
        policies: Arc<[AuthorizationPolicy]>,
        listener: Option<Name>,
        version: u64,
        ready: bool,
        key: &PolicyKey,
        rate_limit: Option<Arc<Limiter>>,
    ) -> Self {
        let no_dry_run = DryRun::default;
        let allowed = policies
            .iter()
            .map(|p| {
                (p.action() == rbac::Action::Allow && !p.is_dry_run()).then(|| {
                    Authorized::new(
                        key.clone(),
                        Some(p.id().clone()),
                        Reason::AllowedByPolicy,
                        no_dry_run(),
                    )
                })
            })
            .chain(std::iter::once(Some(Authorized::new(
                key.clone(),
                None,
                Reason::NoAllowPolicies,
                no_dry_run(),
            ))))
            .collect();
        InboundConfig {
            mode,
            dry_run: policies.iter().any(AuthorizationPolicy::is_dry_run),
            peer_verdicts: PeerVerdicts::of(&policies),
            policies,
            listener,
            version,
            ready,
            allowed,
            rate_limit,
            cors: Arc::from([]),
        }
    }

    /// The CORS routes requests are answered by (see the `cors` module docs);
    /// empty when no VirtualService `corsPolicy` applies.
    pub fn cors(&self) -> &Arc<[CorsRoute]> {
        &self.cors
    }

    /// The local rate limit requests are checked against (see
    /// [`crate::ratelimit`]), if any.
    pub fn rate_limit(&self) -> Option<&Arc<Limiter>> {
        self.rate_limit.as_ref()
    }

    /// The decision made once for an allowed `verdict` (see
    /// [`InboundConfig::allowed`]); `None` if it has none, which does not
    /// happen for a verdict of this config's policies.
    fn allowed(&self, verdict: &rbac::Verdict) -> Option<&Authorized> {
        let index = match (verdict.reason, verdict.policy) {
            (Reason::AllowedByPolicy, Some(i)) => i,
            (Reason::NoAllowPolicies, None) => self.policies.len(),
            _ => return None,
        };
        self.allowed.get(index)?.as_ref()
    }

    /// Whether any of the policies is in dry-run (`istio.io/dry-run`):
    /// evaluated beside the enforced ones and reported, never enforced.
    pub fn has_dry_run(&self) -> bool {
        self.dry_run
    }

    /// The mTLS mode for new connections. STRICT until an xDS policy has
    /// arrived (fail closed).
    pub fn mode(&self) -> MtlsMode {
        self.mode
    }

    /// The AuthorizationPolicies that apply, in evaluation order.
    pub fn policies(&self) -> &[AuthorizationPolicy] {
        &self.policies
    }

    /// The gRFC A36 listener this came from (xDS policies).
    pub fn listener(&self) -> Option<&str> {
        self.listener.as_deref()
    }

    /// Bumped on every change (0: the xDS listener has not arrived yet).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether the policy is known: always for fixed policies; for xDS
    /// ones once the listener arrived. Until then requests are refused
    /// (503 / UNAVAILABLE), as gRFC A36 servers do not serve before it.
    pub fn is_ready(&self) -> bool {
        self.ready
    }
}

impl InboundPolicy {
    /// A policy the app sets: `mode` for connections, `policies` for
    /// requests (empty: every request is allowed).
    pub fn fixed(mode: MtlsMode, policies: Vec<AuthorizationPolicy>) -> Self {
        let key = PolicyKey::default();
        let config = InboundConfig::new(mode, policies.into(), None, 1, true, &key, None);
        InboundPolicy::with(config, key, None, Status::Ready, None)
    }

    fn with(
        config: InboundConfig,
        key: PolicyKey,
        listener: Option<Name>,
        status: Status,
        task: Option<AbortHandle>,
    ) -> Self {
        InboundPolicy {
            shared: Arc::new(Shared {
                mode: watch::Sender::new(config.mode),
                current: ArcSwap::from_pointee(config),
                status: watch::Sender::new(status),
                listener,
                denied: AtomicU64::new(0),
                key,
                task,
            }),
        }
    }

    /// The policy the control server gives the server listening on
    /// `listening_address`: the gRFC A36 listener named by the bootstrap's
    /// `server_listener_resource_name_template` with `%s` replaced by the
    /// address (`grpc/server?xds.resource.listening_address=10.0.0.7:8080`).
    /// Subscribes to it and follows its updates until the last handle is
    /// dropped. Returns at once; [`InboundPolicy::ready`] waits for the
    /// listener. Until it arrives the mode is STRICT and requests get 503.
    ///
    /// Fails when the bootstrap has no template, or outside a tokio runtime.
    pub fn from_xds(xds: &XdsClient, listening_address: SocketAddr) -> Result<Self, Error> {
        let address = listening_address.to_string();
        let name = xds
            .bootstrap()
            .server_listener_name(&address)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Discovery,
                    format!(
                        "the bootstrap has no server_listener_resource_name_template, so the \
                         server on {address} cannot ask the control server for its mTLS mode \
                         and authorization policies (gRFC A36): add \
                         \"server_listener_resource_name_template\": \"{TEMPLATE_EXAMPLE}\""
                    ),
                )
            })?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            Error::new(
                ErrorKind::Discovery,
                "InboundPolicy::from_xds needs a tokio runtime",
            )
            .with_source(e)
        })?;
        let name = Name::from(name);
        let key = PolicyKey::default();
        let pending = InboundConfig::new(
            MtlsMode::Strict,
            Arc::from([]),
            Some(name.clone()),
            0,
            false,
            &key,
            None,
        );
        // The task needs the shared state and the state the task's handle:
        // build the state, then hand the task a weak reference.
        let (weak_tx, weak_rx) = tokio::sync::oneshot::channel::<Weak<Shared>>();
        let follower = runtime.spawn(follow(xds.clone(), name.clone(), weak_rx));
        let policy = InboundPolicy::with(
            pending,
            key,
            Some(name.clone()),
            Status::Pending,
            Some(follower.abort_handle()),
        );
        let _ = weak_tx.send(Arc::downgrade(&policy.shared));
        xds.subscribe(&name);
        Ok(policy)
    }

    /// The policy now: one lock-free atomic load.
    pub fn current(&self) -> arc_swap::Guard<Arc<InboundConfig>> {
        self.shared.current.load()
    }

    /// The current mTLS mode.
    pub fn mode(&self) -> MtlsMode {
        self.shared.current.load().mode
    }

    /// The gRFC A36 listener name (xDS policies).
    pub fn listener(&self) -> Option<&str> {
        self.shared.listener.as_deref()
    }

    /// A receiver of the mTLS mode, changed when the mode changes (what
    /// `serve_with` rebuilds its TLS acceptor on).
    pub fn changes(&self) -> watch::Receiver<MtlsMode> {
        self.shared.mode.subscribe()
    }

    /// Replaces the mode and the policies: new connections use the mode,
    /// requests from now on the policies; live connections keep theirs.
    /// On an xDS policy the next update from the control server replaces
    /// this again.
    pub fn set(&self, mode: MtlsMode, policies: Vec<AuthorizationPolicy>) {
        let rate_limit = self.rate_limit_config();
        let cors = Arc::clone(&self.shared.current.load().cors);
        self.store(mode, policies.into(), rate_limit.as_ref(), cors, true);
    }

    /// Replaces the CORS routes (empty: no CORS; see the `cors` module docs); the
    /// rest stays. On an xDS policy the next update from the control
    /// server replaces this again.
    pub fn set_cors(&self, cors: Vec<CorsRoute>) {
        let current = self.shared.current.load_full();
        let rate_limit = self.rate_limit_config();
        self.store(
            current.mode,
            Arc::clone(&current.policies),
            rate_limit.as_ref(),
            cors.into(),
            current.ready,
        );
    }

    /// Replaces the local rate limit (`None`: none); the mode and the
    /// policies stay. A config equal to the current one keeps its buckets.
    /// On an xDS policy the next update from the control server replaces
    /// this again.
    pub fn set_rate_limit(&self, rate_limit: Option<Arc<RateLimitConfig>>) {
        let current = self.shared.current.load_full();
        self.store(
            current.mode,
            Arc::clone(&current.policies),
            rate_limit.as_ref(),
            Arc::clone(&current.cors),
            current.ready,
        );
    }

    /// The current rate limit config.
    fn rate_limit_config(&self) -> Option<Arc<RateLimitConfig>> {
        let current = self.shared.current.load();
        current.rate_limit.as_ref().map(|l| Arc::clone(l.config()))
    }

    fn store(
        &self,
        mode: MtlsMode,
        policies: Arc<[AuthorizationPolicy]>,
        rate_limit: Option<&Arc<RateLimitConfig>>,
        cors: Arc<[CorsRoute]>,
        ready: bool,
    ) {
        let current = self.shared.current.load();
        let version = current.version + 1;
        let rate_limit = carry_over(current.rate_limit.as_ref(), rate_limit);
        drop(current);
        let mut config = InboundConfig::new(
            mode,
            policies,
            self.shared.listener.clone(),
            version,
            ready,
            &self.shared.key,
            rate_limit,
        );
        config.cors = cors;
        self.shared.current.store(Arc::new(config));
        self.shared.mode.send_if_modified(|m| {
            let changed = *m != mode;
            *m = mode;
            changed
        });
    }

    /// Waits until the policy is known: at once for fixed policies; for xDS
    /// ones until the server listener arrives (gRFC A36: a server does not
    /// serve before it). Fails naming the listener when it does not arrive
    /// within `timeout`, when the control server says it does not exist,
    /// or when its config was rejected.
    pub async fn ready(&self, timeout: Duration) -> Result<(), Error> {
        let name = self.listener().unwrap_or("(fixed)");
        let mut status = self.shared.status.subscribe();
        let waited =
            tokio::time::timeout(timeout, status.wait_for(|s| *s != Status::Pending)).await;
        let status = match waited {
            Ok(Ok(status)) => status.clone(),
            Ok(Err(_)) => Status::Closed,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "the server listener {name:?} did not arrive from the control server \
                         within {timeout:?}; a server does not serve before its listener \
                         arrives (gRFC A36): is the control server reachable, and does it know \
                         this workload?"
                    ),
                ));
            }
        };
        match status {
            Status::Ready | Status::Pending => Ok(()),
            Status::Missing => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "the control server says the server listener {name:?} does not exist: \
                     check the listening address in the name (it must be the address clients \
                     reach) and that mesh-control knows this workload"
                ),
            )),
            Status::Rejected(why) => Err(Error::new(
                ErrorKind::Discovery,
                format!("the server listener {name:?} from the control server was rejected: {why}"),
            )),
            Status::Closed => Err(Error::new(
                ErrorKind::Discovery,
                format!(
                    "the xDS client ended before the server listener {name:?} arrived (its \
                     tokio runtime shut down)"
                ),
            )),
        }
    }

    /// Whether `self` and `other` are handles of the same policy (clones
    /// of one [`InboundPolicy::fixed`] or [`InboundPolicy::from_xds`]).
    pub fn same_as(&self, other: &InboundPolicy) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Requests denied so far (Envoy's `rbac.denied`), by a policy, by
    /// STRICT without a verified peer, or because the policy had not
    /// arrived.
    pub fn denied(&self) -> u64 {
        self.shared.denied.load(Ordering::Relaxed)
    }

    /// Applies the xDS listener, if it changed.
    fn apply(&self, listener: &ServerListener) {
        let current = self.shared.current.load();
        let same_limit = match (&current.rate_limit, &listener.rate_limit) {
            (Some(l), Some(c)) => **l.config() == **c,
            // A config that can never limit has no limiter.
            (None, c) => c.as_ref().is_none_or(|c| c.is_inert()),
            (Some(_), None) => false,
        };
        if current.ready
            && current.mode == listener.mtls
            && (Arc::ptr_eq(&current.policies, &listener.policies)
                || current.policies == listener.policies)
            && same_limit
            && (Arc::ptr_eq(&current.cors, &listener.cors) || current.cors == listener.cors)
        {
            return;
        }
        drop(current);
        self.store(
            listener.mtls,
            listener.policies.clone(),
            listener.rate_limit.as_ref(),
            listener.cors.clone(),
            true,
        );
        self.shared.status.send_if_modified(|s| {
            let changed = *s != Status::Ready;
            *s = Status::Ready;
            changed
        });
        tracing::info!(
            listener = %listener.name,
            mode = %listener.mtls,
            policies = listener.policies.len(),
            rate_limited = listener.rate_limit.is_some(),
            cors_routes = listener.cors.len(),
            "inbound policy updated"
        );
    }

    fn unavailable(&self, status: Status) {
        if self.shared.current.load().ready {
            // Keep serving with the last good policy, as xDS clients keep
            // the last good version of a resource.
            tracing::warn!(
                listener = self.listener().unwrap_or_default(),
                ?status,
                "the server listener is gone or was rejected; keeping the last inbound policy"
            );
            return;
        }
        self.shared.status.send_replace(status);
    }
}

/// Follows the xDS client's snapshots, applying the server listener `name`.
async fn follow(xds: XdsClient, name: Name, shared: tokio::sync::oneshot::Receiver<Weak<Shared>>) {
    let Ok(weak) = shared.await else { return };
    let mut changes = xds.changes();
    loop {
        changes.borrow_and_update();
        let Some(shared) = weak.upgrade() else { return };
        let policy = InboundPolicy { shared };
        let listener = xds.snapshot().server_listeners.get(&name).cloned();
        match listener {
            Some(listener) => policy.apply(&listener),
            None => {
                let missing = xds.snapshot().missing_listeners.contains(&name);
                let rejected = xds
                    .sync_status()
                    .rejection(ResourceType::Listener, &name)
                    .map(str::to_owned);
                match (missing, rejected) {
                    (_, Some(why)) => policy.unavailable(Status::Rejected(why)),
                    (true, None) => policy.unavailable(Status::Missing),
                    (false, None) => {}
                }
            }
        }
        drop(policy);
        if changes.changed().await.is_err() {
            if let Some(shared) = weak.upgrade() {
                InboundPolicy { shared }.unavailable(Status::Closed);
            }
            return;
        }
    }
}

/// As `#[derive(Debug)]` printed it before the decisions made once were
/// added (they say nothing the policies do not).
impl fmt::Debug for InboundConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundConfig")
            .field("mode", &self.mode)
            .field("policies", &self.policies)
            .field("dry_run", &self.dry_run)
            .field("listener", &self.listener)
            .field("version", &self.version)
            .field("ready", &self.ready)
            .finish()
    }
}

impl fmt::Debug for InboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current();
        f.debug_struct("InboundPolicy")
            .field("listener", &self.shared.listener)
            .field("mode", &current.mode)
            .field("policies", &current.policies.len())
            .field("version", &current.version)
            .field("ready", &current.ready)
            .finish()
    }
}

impl Authorized {
    /// Whether `policy` (the same instance, or a clone of it) made this
    /// decision.
    pub fn is_decided_by(&self, policy: &InboundPolicy) -> bool {
        self.is_decided_under(&policy.shared.key)
    }

    /// The decision `req` was let in with: the one a
    /// [`ServerLayer`](crate::ServerLayer) passed on in the request's
    /// [`ServerContext`] (the innermost layer's, which carries on what it
    /// was given), else the `Authorized` extension of
    /// [`serve_with`](crate::serve::serve_with); `None` when no policy
    /// decided the request.
    pub fn of<B>(req: &Request<B>) -> Option<&Authorized> {
        let extensions = req.extensions();
        extensions
            .get::<ServerContext>()
            .and_then(ServerContext::authorized)
            .or_else(|| extensions.get::<Authorized>())
    }
}

/// A handle of an [`InboundPolicy`] that keeps the config it read last,
/// for a service called with `&mut self` ([`Server`](super::Server)):
/// reading the current config is then one relaxed atomic load and a
/// pointer comparison (arc-swap's `Cache`) instead of a full `ArcSwap`
/// load and guard. The config is still the current one for every request:
/// a changed pointer is loaded again, and the kept `Arc` cannot be freed
/// (and its address reused) while it is kept.
///
/// It also remembers the last decision it allowed a request with, when
/// that decision can be given again to the same peer under the same config
/// (see [`Remembered`]): a service is called with `&mut self` and is
/// usually cloned per connection, so this is a per-connection memo whose
/// hit costs two pointer comparisons, with no hashing and no atomic
/// read-modify-write beyond the decision's clone.
#[derive(Clone)]
pub(crate) struct CachedPolicy {
    policy: InboundPolicy,
    config: arc_swap::cache::Cache<Current, Arc<InboundConfig>>,
    last: Option<Remembered>,
}

/// An allowed decision a [`CachedPolicy`] gives again without evaluating:
/// the config's policies read only the peer and none is in dry-run or
/// AUDIT (the config's own [`PeerVerdicts`] memo exists, and the verdict
/// took the short path of [`authorize`]), so every request of this peer
/// under this config is decided alike, records the same thing on its
/// [`DecisionRecord`] and logs nothing. A different peer or config
/// evaluates as before (and may take the place).
#[derive(Clone)]
pub(crate) struct Remembered {
    /// The deciding config, kept alive so that its address cannot be
    /// reused by a later config: a pointer comparison tells them apart.
    config: Arc<InboundConfig>,
    /// The peer's SPIFFE ID (the `Arc` its connection's
    /// [`PeerIdentity`] holds, compared by address first).
    peer: Arc<str>,
    authorized: Authorized,
}

/// A [`CachedPolicy`] read for one request: the policy, its current
/// config, and the remembered decision.
pub(crate) struct Loaded<'a> {
    pub(crate) policy: &'a InboundPolicy,
    pub(crate) config: &'a Arc<InboundConfig>,
    last: &'a mut Option<Remembered>,
}

impl Loaded<'_> {
    /// The remembered decision, if it applies to `req` (its peer is the
    /// remembered one, under the current config), recorded on the request's
    /// [`DecisionRecord`] exactly as [`authorize`]'s short path records it
    /// (allowed, the deciding policy, no dry-run result). It is the very
    /// decision `authorize` would make now, and the one any check of this
    /// policy under this config made for the request before (the config's
    /// decisions are made once, [`InboundConfig::allowed`]): the services
    /// ask this first, before looking for such an earlier decision (two
    /// type-map lookups that miss on most requests).
    pub(crate) fn remembered<B>(&self, req: &Request<B>) -> Option<Authorized> {
        let last = self.last.as_ref()?;
        let extensions = req.extensions();
        if !Arc::ptr_eq(&last.config, self.config) {
            return None;
        }
        let peer = extensions.get::<PeerIdentity>()?.spiffe_id();
        if !(Arc::ptr_eq(&last.peer, peer.uri()) || *last.peer == *peer.as_str()) {
            return None;
        }
        if let Some(record) = extensions.get::<DecisionRecord>() {
            record.authorized(&last.authorized);
        }
        Some(last.authorized.clone())
    }

    /// [`authorize`]s `req`, remembering the decision if it can be given
    /// again (see [`Remembered`]).
    pub(crate) fn authorize<B>(self, req: &Request<B>) -> Outcome {
        authorize(self.policy, self.config, req, Some(self.last))
    }
}

/// What the cache reads: the policy's `ArcSwap`.
#[derive(Clone)]
struct Current(Arc<Shared>);

impl std::ops::Deref for Current {
    type Target = ArcSwap<InboundConfig>;

    fn deref(&self) -> &ArcSwap<InboundConfig> {
        &self.0.current
    }
}

impl CachedPolicy {
    pub(crate) fn new(policy: InboundPolicy) -> Self {
        let config = arc_swap::cache::Cache::new(Current(Arc::clone(&policy.shared)));
        CachedPolicy {
            policy,
            config,
            last: None,
        }
    }

    /// The policy, its current config and the remembered decision.
    pub(crate) fn current(&mut self) -> Loaded<'_> {
        Loaded {
            policy: &self.policy,
            config: self.config.load(),
            last: &mut self.last,
        }
    }
}

impl fmt::Debug for CachedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.policy.fmt(f)
    }
}

/// The peer's address and the port the connection was accepted on, as the
/// request's [`ConnectionInfo`] says.
fn connection<B>(req: &Request<B>) -> (IpAddr, u16) {
    match req.extensions().get::<ConnectionInfo>() {
        Some(c) => (c.peer_addr().ip(), c.local_addr().port()),
        // Not served by `serve`: no addresses (ip blocks and ports do not
        // match).
        None => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
    }
}

/// The decisions of a config whose policies read nothing of a request but
/// its peer identity, remembered per peer: such a config decides every
/// request of one peer alike ([`AuthorizationPolicy::reads_only_peer`]),
/// so a request from a peer seen before costs a comparison of its SPIFFE
/// ID instead of an evaluation. Only for configs without dry-run policies
/// (their result is passed on per request); one per config, so a changed
/// policy starts with none.
///
/// A fixed number of set-once slots, chosen by the SPIFFE ID: a slot keeps
/// the first peer decided in it (a server's callers are a few service
/// accounts), and a peer whose slot holds another is evaluated every time,
/// as without the memo. Nothing is replaced, so nothing is allocated or
/// freed per request, and a slot is read with one atomic load.
struct PeerVerdicts {
    slots: [OnceLock<(Option<Arc<str>>, rbac::Verdict)>; PEER_SLOTS],
}

/// How many peers a config remembers decisions for (at most).
const PEER_SLOTS: usize = 32;

impl PeerVerdicts {
    /// A memo for `policies`, if they read only the peer and none is in
    /// dry-run.
    fn of(policies: &[AuthorizationPolicy]) -> Option<Arc<PeerVerdicts>> {
        let memoizable = !policies.is_empty()
            && policies
                .iter()
                .all(|p| !p.is_dry_run() && p.reads_only_peer());
        memoizable.then(|| {
            Arc::new(PeerVerdicts {
                slots: std::array::from_fn(|_| OnceLock::new()),
            })
        })
    }

    /// The verdict for `peer`: the remembered one, else `decide()`'s
    /// (remembered if its slot is free).
    fn verdict(
        &self,
        peer: Option<&SpiffeId>,
        decide: impl FnOnce() -> rbac::Verdict,
    ) -> rbac::Verdict {
        let slot = &self.slots[slot_of(peer)];
        match slot.get() {
            Some((seen, verdict)) => {
                let same = match (seen, peer) {
                    (Some(seen), Some(peer)) => {
                        Arc::ptr_eq(seen, peer.uri()) || **seen == *peer.as_str()
                    }
                    (None, None) => true,
                    _ => false,
                };
                if same { *verdict } else { decide() }
            }
            None => {
                let verdict = decide();
                let _ = slot.set((peer.map(|p| Arc::clone(p.uri())), verdict));
                verdict
            }
        }
    }
}

/// The slot of `peer`, from the ID's length and last bytes (the service
/// account, what tells a server's callers apart). Any slot is correct:
/// the ID in it is compared.
#[inline]
fn slot_of(peer: Option<&SpiffeId>) -> usize {
    let Some(peer) = peer else { return 0 };
    let uri = peer.as_str().as_bytes();
    // A SPIFFE ID is longer than its `spiffe://` scheme: 8 bytes are there.
    let tail = uri
        .len()
        .checked_sub(8)
        .and_then(|start| uri.get(start..))
        .and_then(|tail| <[u8; 8]>::try_from(tail).ok())
        .map_or(0, u64::from_le_bytes);
    let mixed = (tail ^ uri.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> 58) as usize % PEER_SLOTS
}

impl fmt::Debug for PeerVerdicts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seen = self.slots.iter().filter(|s| s.get().is_some()).count();
        f.debug_struct("PeerVerdicts").field("seen", &seen).finish()
    }
}

/// What [`authorize`] decided.
pub(crate) enum Outcome {
    /// Let the request through, with the decision to pass on in its
    /// extensions (`None`: the config has no policies, so there was nothing
    /// to decide beyond the mTLS mode, and nothing to pass on).
    Allowed(Option<Authorized>),
    /// Refuse it (boxed: the allowed outcome, every request's, stays a
    /// pointer wide instead of being copied about at the size of a reply).
    Denied(Box<Denial>),
}

/// A refused request: the reply, and what to record about it.
pub(crate) struct Denial {
    pub(crate) reply: LocalReply,
    pub(crate) decision: Refusal,
}

/// What refused a request, for a record made after the decision.
pub(crate) struct Refusal {
    /// `false` when the policy had not arrived (503): no authorization
    /// decision was made.
    decided: bool,
    policy: Option<Name>,
    dry_run: DryRun,
}

impl Refusal {
    /// Writes the decision on `record` (which `authorize` could not, when
    /// the record is made after the decision: `serve_with`'s telemetry).
    #[cfg_attr(not(feature = "telemetry"), allow(dead_code))]
    pub(crate) fn record(&self, record: &DecisionRecord) {
        if self.decided {
            record.authorization(false, self.policy.as_ref());
        }
        if !self.dry_run.is_empty() {
            record.dry_run(&self.dry_run);
        }
    }
}

/// Authorizes `req` under `policy`. Records the decision on the request's
/// [`DecisionRecord`], if it has one, and logs denials (`tracing` INFO,
/// naming the policy) and dry-run policies that would have denied.
///
/// Cost when allowed: one atomic load, and without policies nothing more;
/// with policies, what [`rbac::decide`] needs (nothing allocated, but for
/// a header condition on a header sent several times) and a clone of the
/// [`Authorized`] the config made once for the deciding policy; dry-run
/// policies are evaluated only when the config has some
/// ([`InboundConfig::has_dry_run`]), and then the decision passed on is
/// made for the request (it carries the dry-run result).
///
/// A decision that every request of this peer under this config gets
/// alike (see [`Remembered`]) is put in `remember`, if given.
pub(crate) fn authorize<B>(
    policy: &InboundPolicy,
    config: &Arc<InboundConfig>,
    req: &Request<B>,
    remember: Option<&mut Option<Remembered>>,
) -> Outcome {
    let peer = req
        .extensions()
        .get::<PeerIdentity>()
        .map(PeerIdentity::spiffe_id);
    if !config.ready {
        let listener = config.listener().unwrap_or_default();
        policy.shared.denied.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            listener,
            path = req.uri().path(),
            "request refused: the server listener has not arrived from the control server"
        );
        return Outcome::Denied(Box::new(Denial {
            reply: LocalReply::not_serving(format!(
                "the server's inbound policy (xDS listener {listener}) has not arrived from the \
                 control server yet"
            )),
            decision: Refusal {
                decided: false,
                policy: None,
                dry_run: DryRun::default(),
            },
        }));
    }
    let record = req.extensions().get::<DecisionRecord>();
    if config.mode == MtlsMode::Strict && peer.is_none() {
        policy.shared.denied.fetch_add(1, Ordering::Relaxed);
        if let Some(record) = record {
            record.authorization(false, None);
        }
        tracing::info!(
            path = req.uri().path(),
            "request denied: mTLS mode STRICT and the connection has no verified client \
             certificate"
        );
        return Outcome::Denied(Box::new(Denial {
            reply: LocalReply::denied(
                "RBAC: access denied (mTLS mode STRICT: the connection has no verified client \
                 certificate; serve the app with serve_with and certificates)"
                    .into(),
            ),
            decision: Refusal {
                decided: true,
                policy: None,
                dry_run: DryRun::default(),
            },
        }));
    }
    if config.policies.is_empty() {
        return Outcome::Allowed(None);
    }
    let attributes = || {
        let (source_ip, port) = connection(req);
        RequestAttributes::from_request(req, peer, source_ip, port)
    };
    let (verdict, attributes) = match &config.peer_verdicts {
        // The policies read only the peer: its decision, made once.
        Some(memo) => (
            memo.verdict(peer, || rbac::decide(&config.policies, &attributes())),
            None,
        ),
        None => {
            let attributes = attributes();
            (
                rbac::decide(&config.policies, &attributes),
                Some(attributes),
            )
        }
    };
    let decided_by = verdict
        .policy
        .and_then(|i| config.policies.get(i))
        .map(AuthorizationPolicy::id);
    if verdict.allowed && !verdict.audit && !config.dry_run {
        // The usual case, in short: allowed, nothing to log, no dry-run
        // result to carry; the decision passed on is the config's own.
        if let Some(record) = record {
            record.authorization(true, decided_by);
        }
        let made_once = config.allowed(&verdict).cloned();
        let authorized = made_once.unwrap_or_else(|| {
            Authorized::new(
                policy.shared.key.clone(),
                decided_by.cloned(),
                verdict.reason,
                DryRun::default(),
            )
        });
        // Peer-only policies without dry-run (the memo exists): this
        // peer's next requests under this config are decided alike.
        if let (Some(remember), Some(peer), Some(_)) = (remember, peer, &config.peer_verdicts) {
            *remember = Some(Remembered {
                config: Arc::clone(config),
                peer: Arc::clone(peer.uri()),
                authorized: authorized.clone(),
            });
        }
        return Outcome::Allowed(Some(authorized));
    }
    // Dry-run policies are never memoized (`peer_verdicts` is `None`).
    let dry_run = if let Some(attributes) = attributes.as_ref().filter(|_| config.dry_run) {
        let dry_run = rbac::evaluate_dry_run(&config.policies, attributes);
        if dry_run.would_deny() {
            fn named(r: &Option<rbac::ShadowResult>) -> Option<&str> {
                r.as_ref().filter(|r| !r.allowed).map(|r| {
                    r.policy
                        .as_deref()
                        .unwrap_or("no dry-run ALLOW policy matched")
                })
            }
            tracing::info!(
                deny_policy = named(&dry_run.deny),
                allow_policy = named(&dry_run.allow),
                enforced = if verdict.allowed { "allowed" } else { "denied" },
                peer = peer.map(|p| p.as_str()),
                method = req.method().as_str(),
                path = req.uri().path(),
                "a dry-run authorization policy would have denied this request (not enforced)"
            );
        }
        dry_run
    } else {
        DryRun::default()
    };
    if let Some(record) = record {
        record.authorization(verdict.allowed, decided_by);
        if !dry_run.is_empty() {
            record.dry_run(&dry_run);
        }
    }
    if verdict.audit {
        tracing::info!(
            peer = peer.map(|p| p.as_str()),
            method = req.method().as_str(),
            path = req.uri().path(),
            allowed = verdict.allowed,
            "request matched an AUDIT authorization policy"
        );
    }
    if verdict.allowed {
        let made_once = if dry_run.is_empty() {
            config.allowed(&verdict).cloned()
        } else {
            None
        };
        return Outcome::Allowed(Some(made_once.unwrap_or_else(|| {
            Authorized::new(
                policy.shared.key.clone(),
                decided_by.cloned(),
                verdict.reason,
                dry_run,
            )
        })));
    }
    policy.shared.denied.fetch_add(1, Ordering::Relaxed);
    let named = match (decided_by, verdict.reason) {
        (Some(policy), _) => format!("policy {policy}"),
        (None, Reason::NoAllowPolicyMatched) => {
            let allow: Vec<&str> = config
                .policies
                .iter()
                .filter(|p| p.action() == rbac::Action::Allow && !p.is_dry_run())
                .map(|p| &**p.id())
                .collect();
            format!("no ALLOW policy matched: {}", allow.join(", "))
        }
        (None, _) => "denied".to_string(),
    };
    tracing::info!(
        policy = decided_by.map(|p| &**p),
        peer = peer.map(|p| p.as_str()),
        source = %connection(req).0,
        method = req.method().as_str(),
        path = req.uri().path(),
        "request denied by authorization ({named})"
    );
    Outcome::Denied(Box::new(Denial {
        reply: LocalReply::denied(format!("RBAC: access denied ({named})")),
        decision: Refusal {
            decided: true,
            policy: decided_by.cloned(),
            dry_run,
        },
    }))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{Response, StatusCode};
    use mesh_core::rbac::{Action, Operation, Rule, Source, StringMatch};
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::ServerLayer;

    fn peer(ns: &str, sa: &str) -> PeerIdentity {
        PeerIdentity::new(SpiffeId::new("cluster.local", ns, sa).unwrap())
    }

    fn matches(list: &[&str]) -> Arc<[StringMatch]> {
        list.iter()
            .map(|s| StringMatch::parse(s).unwrap())
            .collect()
    }

    /// ALLOW `*/sa/frontend`, DENY namespace `bar`: reads only the peer.
    fn peer_policies() -> Vec<AuthorizationPolicy> {
        let from = |source: Source| Rule {
            from: vec![source].into(),
            ..Rule::default()
        };
        vec![
            AuthorizationPolicy::new(
                "shop",
                "allow-frontend",
                Action::Allow,
                vec![from(Source {
                    principals: matches(&["*/sa/frontend"]),
                    ..Source::default()
                })],
            )
            .unwrap(),
            AuthorizationPolicy::new(
                "shop",
                "deny-bar",
                Action::Deny,
                vec![from(Source {
                    namespaces: matches(&["bar"]),
                    ..Source::default()
                })],
            )
            .unwrap(),
        ]
    }

    fn request(peer: Option<&PeerIdentity>, path: &str) -> Request<()> {
        let mut req = Request::get(path).body(()).unwrap();
        if let Some(peer) = peer {
            req.extensions_mut().insert(peer.clone());
        }
        req
    }

    /// Whether `authorize` lets `req` in, and with which policy.
    fn outcome(policy: &InboundPolicy, req: &Request<()>) -> Option<Option<Name>> {
        match authorize(policy, &policy.current(), req, None) {
            Outcome::Allowed(authorized) => Some(authorized.and_then(|a| a.policy().cloned())),
            Outcome::Denied(_) => None,
        }
    }

    /// What the policies decide for `req`, evaluated from scratch.
    fn evaluated(policies: &[AuthorizationPolicy], req: &Request<()>) -> Option<Option<Name>> {
        let peer = req
            .extensions()
            .get::<PeerIdentity>()
            .map(PeerIdentity::spiffe_id);
        let attrs =
            RequestAttributes::from_request(req, peer, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        let decision = rbac::evaluate(policies, &attrs);
        decision.allowed.then_some(decision.policy)
    }

    /// Policies that read only the peer are decided once per peer, and
    /// every request gets what evaluating it would give: peers seen before
    /// and not, equal IDs in different allocations, no peer at all, and
    /// more peers than the memo has slots.
    #[test]
    fn remembered_decisions_are_the_evaluated_ones() {
        let policies = peer_policies();
        let policy = InboundPolicy::fixed(MtlsMode::Permissive, policies.clone());
        assert!(policy.current().peer_verdicts.is_some());
        let mut peers: Vec<Option<PeerIdentity>> = vec![
            Some(peer("shop", "frontend")),
            Some(peer("bar", "frontend")),
            Some(peer("shop", "backend")),
            None,
            // An equal ID parsed again: another allocation.
            Some(peer("shop", "frontend")),
        ];
        peers.extend((0..2 * PEER_SLOTS).map(|i| Some(peer("shop", &format!("sa-{i}")))));
        peers.extend((0..PEER_SLOTS).map(|i| Some(peer("ns", "frontend")).filter(|_| i > 0)));
        for round in 0..3 {
            for (i, p) in peers.iter().enumerate() {
                let req = request(p.as_ref(), "/items");
                assert_eq!(
                    outcome(&policy, &req),
                    evaluated(&policies, &req),
                    "round {round}, peer {i}: {p:?}"
                );
            }
        }
        assert_eq!(
            outcome(&policy, &request(Some(&peer("bar", "frontend")), "/")),
            None
        );
        assert_eq!(
            outcome(&policy, &request(Some(&peer("shop", "frontend")), "/")),
            Some(Some("shop/allow-frontend".into()))
        );
    }

    /// A changed policy is a new config with nothing remembered: the same
    /// peer is decided by the new policies at once.
    #[test]
    fn a_changed_policy_forgets_what_it_decided() {
        let policy = InboundPolicy::fixed(MtlsMode::Strict, peer_policies());
        let frontend = peer("shop", "frontend");
        assert!(outcome(&policy, &request(Some(&frontend), "/")).is_some());
        let deny_frontend = AuthorizationPolicy::new(
            "shop",
            "deny-frontend",
            Action::Deny,
            vec![Rule {
                from: vec![Source {
                    principals: matches(&["*/sa/frontend"]),
                    ..Source::default()
                }]
                .into(),
                ..Rule::default()
            }],
        )
        .unwrap();
        policy.set(MtlsMode::Strict, vec![deny_frontend]);
        assert_eq!(outcome(&policy, &request(Some(&frontend), "/")), None);
        policy.set(MtlsMode::Strict, peer_policies());
        assert!(outcome(&policy, &request(Some(&frontend), "/")).is_some());
    }

    /// Policies that read the request are evaluated for every request,
    /// with nothing remembered: one peer, two paths, two decisions.
    #[test]
    fn policies_that_read_the_request_are_evaluated_per_request() {
        let mut policies = peer_policies();
        policies.push(
            AuthorizationPolicy::new(
                "shop",
                "deny-admin",
                Action::Deny,
                vec![Rule {
                    to: vec![Operation {
                        paths: matches(&["/admin*"]),
                        ..Operation::default()
                    }]
                    .into(),
                    ..Rule::default()
                }],
            )
            .unwrap(),
        );
        let policy = InboundPolicy::fixed(MtlsMode::Strict, policies);
        assert!(policy.current().peer_verdicts.is_none());
        let frontend = peer("shop", "frontend");
        for _ in 0..2 {
            assert!(outcome(&policy, &request(Some(&frontend), "/items")).is_some());
            assert_eq!(outcome(&policy, &request(Some(&frontend), "/admin")), None);
        }
    }

    /// The layer passes its decision on in the request's `ServerContext`
    /// (one extension): the app reads it there or with `Authorized::of`,
    /// an inner layer with the same policy takes it instead of deciding
    /// again, and contexts compare by service, namespace and node alone.
    #[tokio::test]
    async fn the_decision_travels_in_the_server_context() {
        let policy = InboundPolicy::fixed(MtlsMode::Strict, peer_policies());
        let context = ServerContext::new("catalog", "shop", "catalog-1");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let app = {
            let seen = Arc::clone(&seen);
            tower::service_fn(move |req: Request<()>| {
                let ctx = req.extensions().get::<ServerContext>().cloned().unwrap();
                let of = Authorized::of(&req).map(|a| a.policy().cloned());
                seen.lock().unwrap().push((ctx, of));
                async { Ok::<_, Infallible>(Response::new(String::new())) }
            })
        };
        let layer = ServerLayer::new(context.clone()).inbound(policy.clone());
        let svc = layer.layer(layer.layer(app));
        let frontend = peer("shop", "frontend");
        let response = svc
            .clone()
            .oneshot(request(Some(&frontend), "/"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let response = svc
            .oneshot(request(Some(&peer("bar", "frontend")), "/"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(policy.denied(), 1);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (ctx, of) = &seen[0];
        assert_eq!(*ctx, context);
        assert_eq!(context.authorized().map(|a| a.policy().cloned()), None);
        let authorized = ctx.authorized().expect("the decision");
        assert!(authorized.is_decided_by(&policy));
        assert_eq!(
            authorized.policy().map(|p| &**p),
            Some("shop/allow-frontend")
        );
        assert_eq!(of.clone(), Some(Some("shop/allow-frontend".into())));
    }

    /// The decision a service remembers for its last allowed peer (see
    /// `CachedPolicy`) is given only to that peer (an equal ID in another
    /// allocation included), only under the config that made it: another
    /// peer is evaluated, and a changed policy decides at once.
    #[tokio::test]
    async fn a_remembered_decision_serves_one_peer_under_one_config() {
        use tower::Service as _;
        let policy = InboundPolicy::fixed(MtlsMode::Strict, peer_policies());
        let app = tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        });
        let mut svc = ServerLayer::new(ServerContext::new("catalog", "shop", "catalog-1"))
            .inbound(policy.clone())
            .layer(app);
        let mut status = async |peer: &PeerIdentity| {
            let response = svc
                .ready()
                .await
                .unwrap()
                .call(request(Some(peer), "/"))
                .await
                .unwrap();
            response.status()
        };
        let frontend = peer("shop", "frontend");
        assert_eq!(status(&frontend).await, StatusCode::OK);
        // Remembered now: the same peer, and an equal ID elsewhere.
        assert_eq!(status(&frontend).await, StatusCode::OK);
        assert_eq!(status(&peer("shop", "frontend")).await, StatusCode::OK);
        // Another peer is decided by the policies, not by the memo.
        assert_eq!(
            status(&peer("bar", "frontend")).await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(&peer("shop", "backend")).await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(status(&frontend).await, StatusCode::OK);
        // A policy denying the remembered peer applies to its next request.
        let deny_all =
            AuthorizationPolicy::new("shop", "deny-all", Action::Deny, vec![Rule::default()])
                .unwrap();
        policy.set(MtlsMode::Strict, vec![deny_all]);
        assert_eq!(status(&frontend).await, StatusCode::FORBIDDEN);
        assert_eq!(policy.denied(), 3);
    }
}
