//! The server's inbound policy: its PeerAuthentication mode and the
//! AuthorizationPolicies that apply to it, fixed or followed over xDS.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Request;
use mesh_core::model::{MtlsMode, Name, ServerListener};
use mesh_core::rbac::{self, AuthorizationPolicy, DryRun, Reason, RequestAttributes};
use mesh_core::xds::ResourceType;
use mesh_xds_client::XdsClient;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::connection::{Authorized, ConnectionInfo, PolicyKey};
use crate::error::{Error, ErrorKind};
use crate::local_reply::LocalReply;
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
#[derive(Debug, Clone)]
pub struct InboundConfig {
    mode: MtlsMode,
    policies: Arc<[AuthorizationPolicy]>,
    /// Whether any policy is in dry-run (computed once per config, so a
    /// request under a config without one pays nothing for dry-run).
    dry_run: bool,
    listener: Option<Name>,
    version: u64,
    ready: bool,
}

impl InboundConfig {
    fn new(
        mode: MtlsMode,
        policies: Arc<[AuthorizationPolicy]>,
        listener: Option<Name>,
        version: u64,
        ready: bool,
    ) -> Self {
        InboundConfig {
            mode,
            dry_run: policies.iter().any(AuthorizationPolicy::is_dry_run),
            policies,
            listener,
            version,
            ready,
        }
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
        let config = InboundConfig::new(mode, policies.into(), None, 1, true);
        InboundPolicy::with(config, None, Status::Ready, None)
    }

    fn with(
        config: InboundConfig,
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
                key: PolicyKey::default(),
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
        let pending = InboundConfig::new(
            MtlsMode::Strict,
            Arc::from([]),
            Some(name.clone()),
            0,
            false,
        );
        // The task needs the shared state and the state the task's handle:
        // build the state, then hand the task a weak reference.
        let (weak_tx, weak_rx) = tokio::sync::oneshot::channel::<Weak<Shared>>();
        let follower = runtime.spawn(follow(xds.clone(), name.clone(), weak_rx));
        let policy = InboundPolicy::with(
            pending,
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
        self.store(mode, policies.into(), true);
    }

    fn store(&self, mode: MtlsMode, policies: Arc<[AuthorizationPolicy]>, ready: bool) {
        let version = self.shared.current.load().version + 1;
        self.shared.current.store(Arc::new(InboundConfig::new(
            mode,
            policies,
            self.shared.listener.clone(),
            version,
            ready,
        )));
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
        if current.ready
            && current.mode == listener.mtls
            && (Arc::ptr_eq(&current.policies, &listener.policies)
                || current.policies == listener.policies)
        {
            return;
        }
        drop(current);
        self.store(listener.mtls, listener.policies.clone(), true);
        self.shared.status.send_if_modified(|s| {
            let changed = *s != Status::Ready;
            *s = Status::Ready;
            changed
        });
        tracing::info!(
            listener = %listener.name,
            mode = %listener.mtls,
            policies = listener.policies.len(),
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
}

/// What [`authorize`] decided.
pub(crate) enum Outcome {
    /// Let the request through, with the decision to pass on in its
    /// extensions (`None`: the config has no policies, so there was nothing
    /// to decide beyond the mTLS mode, and nothing to pass on).
    Allowed(Option<Authorized>),
    /// Refuse it.
    Denied(Denial),
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
/// with policies, what [`rbac::evaluate`] needs (header conditions may
/// allocate) and the [`Authorized`] to pass on; dry-run policies are
/// evaluated only when the config has some ([`InboundConfig::has_dry_run`]).
pub(crate) fn authorize<B>(policy: &InboundPolicy, req: &Request<B>) -> Outcome {
    let config = policy.current();
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
        return Outcome::Denied(Denial {
            reply: LocalReply::not_serving(format!(
                "the server's inbound policy (xDS listener {listener}) has not arrived from the \
                 control server yet"
            )),
            decision: Refusal {
                decided: false,
                policy: None,
                dry_run: DryRun::default(),
            },
        });
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
        return Outcome::Denied(Denial {
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
        });
    }
    if config.policies.is_empty() {
        return Outcome::Allowed(None);
    }
    let connection = req.extensions().get::<ConnectionInfo>();
    let (source_ip, port) = match connection {
        Some(c) => (c.peer_addr().ip(), c.local_addr().port()),
        // Not served by `serve`: no addresses (ip blocks and ports do not
        // match).
        None => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
    };
    let attributes = RequestAttributes::from_request(req, peer, source_ip, port);
    let decision = rbac::evaluate(&config.policies, &attributes);
    let dry_run = if config.dry_run {
        let dry_run = rbac::evaluate_dry_run(&config.policies, &attributes);
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
                enforced = if decision.allowed {
                    "allowed"
                } else {
                    "denied"
                },
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
        record.authorization(decision.allowed, decision.policy.as_ref());
        if !dry_run.is_empty() {
            record.dry_run(&dry_run);
        }
    }
    if decision.audit {
        tracing::info!(
            peer = peer.map(|p| p.as_str()),
            method = req.method().as_str(),
            path = req.uri().path(),
            allowed = decision.allowed,
            "request matched an AUDIT authorization policy"
        );
    }
    if decision.allowed {
        return Outcome::Allowed(Some(Authorized::new(
            policy.shared.key.clone(),
            decision.policy,
            decision.reason,
            dry_run,
        )));
    }
    policy.shared.denied.fetch_add(1, Ordering::Relaxed);
    let named = match (&decision.policy, decision.reason) {
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
        policy = decision.policy.as_deref(),
        peer = peer.map(|p| p.as_str()),
        source = %source_ip,
        method = req.method().as_str(),
        path = req.uri().path(),
        "request denied by authorization ({named})"
    );
    Outcome::Denied(Denial {
        reply: LocalReply::denied(format!("RBAC: access denied ({named})")),
        decision: Refusal {
            decided: true,
            policy: decision.policy,
            dry_run,
        },
    })
}
