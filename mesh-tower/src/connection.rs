//! What the server knows about a request before the app sees it: the
//! connection it arrived on ([`ConnectionInfo`]) and the authorization
//! decision it was let in with ([`Authorized`]).
//!
//! [`serve`](crate::serve()) and [`serve_with`](crate::serve::serve_with)
//! set them; the server stack (authorization), telemetry and the client
//! stack (which passes the caller's address on) read them. They live here,
//! below all of them, so that imports run down the layering
//! (docs/ARCHITECTURE.md, "Conventions"): `server/` makes an [`Authorized`]
//! and `telemetry/` records it, and neither imports the other for it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::model::Name;
use mesh_core::rbac::{DryRun, Reason};

/// The connection a request arrived on: a request extension set by
/// [`serve()`](crate::serve()).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionInfo {
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
}

impl ConnectionInfo {
    /// The connection from `peer_addr`, accepted on `local_addr`.
    pub(crate) fn new(peer_addr: SocketAddr, local_addr: SocketAddr) -> Self {
        ConnectionInfo {
            peer_addr,
            local_addr,
        }
    }

    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The local address the connection was accepted on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Which [`InboundPolicy`](crate::InboundPolicy) made a decision: every
/// policy (and its clones) holds one, and an [`Authorized`] a clone of the
/// key of the policy that decided it. Compared by address; the allocation
/// lives as long as any holder, so no later policy can take its address.
#[derive(Clone, Default)]
pub(crate) struct PolicyKey(Arc<()>);

impl PolicyKey {
    /// Whether `self` and `other` are the same policy's.
    pub(crate) fn same(&self, other: &PolicyKey) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A request's authorization decision: the request extension with which
/// [`serve_with`](crate::serve::serve_with) passes an allowed request on;
/// a [`ServerLayer`](crate::ServerLayer) passes the decision on (its own,
/// or the one it was given) inside the request's
/// [`ServerContext`](crate::ServerContext) instead, one extension for
/// both. [`Authorized::of`] finds a request's decision wherever it is.
///
/// It says which [`InboundPolicy`](crate::InboundPolicy) decided
/// ([`Authorized::is_decided_by`]), with which policy and why, and what the
/// dry-run policies would have decided. A `ServerLayer` records it on the
/// request's [`DecisionRecord`](crate::telemetry::DecisionRecord) (span
/// attributes, metrics, access log); a `ServerLayer` given the same policy
/// ([`ServerLayer::inbound`](crate::ServerLayer::inbound)) takes it as the
/// decision for this request instead of evaluating the policy again. It is
/// never a switch: a layer whose policy did not make this decision
/// authorizes by itself.
///
/// Only this crate makes one (there is no public constructor); an app
/// that copies a request's extensions into another request passes the
/// decision on along with the [`PeerIdentity`](crate::tls::PeerIdentity)
/// it was made for.
///
/// Cheap to clone (an `Arc`): a policy keeps one per decision it can make
/// without dry-run policies and hands out clones, so passing a decision on
/// allocates nothing.
#[derive(Clone)]
pub struct Authorized {
    inner: Arc<Decided>,
}

struct Decided {
    decider: PolicyKey,
    decided_by: Option<Name>,
    reason: Reason,
    dry_run: DryRun,
}

impl Authorized {
    /// The decision of the policy keyed `decider`.
    pub(crate) fn new(
        decider: PolicyKey,
        decided_by: Option<Name>,
        reason: Reason,
        dry_run: DryRun,
    ) -> Self {
        Authorized {
            inner: Arc::new(Decided {
                decider,
                decided_by,
                reason,
                dry_run,
            }),
        }
    }

    /// Whether the policy keyed `key` made this decision.
    pub(crate) fn is_decided_under(&self, key: &PolicyKey) -> bool {
        self.inner.decider.same(key)
    }

    /// The AuthorizationPolicy that allowed the request, as
    /// `<namespace>/<name>`; `None` when no ALLOW policy applies.
    pub fn policy(&self) -> Option<&Name> {
        self.inner.decided_by.as_ref()
    }

    /// Why the request was allowed.
    pub fn reason(&self) -> Reason {
        self.inner.reason
    }

    /// What the dry-run policies would have decided (empty without any).
    pub fn dry_run(&self) -> &DryRun {
        &self.inner.dry_run
    }
}

impl fmt::Debug for Authorized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorized")
            .field("policy", &self.inner.decided_by)
            .field("reason", &self.inner.reason)
            .field("dry_run", &self.inner.dry_run)
            .finish_non_exhaustive()
    }
}
