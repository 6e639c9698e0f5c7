//! Where the client stack reads its configuration from.
//!
//! In production that is the [`XdsClient`](mesh_xds_client::XdsClient): an
//! ADS subscription that publishes complete [`Snapshot`]s through an atomic
//! pointer. The routing core only needs two things from it: the current
//! snapshot (read once per request, lock-free) and a way to wait for a
//! listener the process has not asked about yet (gRFC A27: a name is
//! subscribed on first use). [`ConfigSource`] is that seam, so routing is
//! testable against a hand-built snapshot ([`StaticSource`]).

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_core::Snapshot;
use mesh_core::model::Locality;
use mesh_core::snapshot::ListenerLookup;
use tokio::sync::watch;

use crate::error::BoxError;

/// A source of routing configuration.
pub trait ConfigSource: Clone + Send + Sync + 'static {
    /// The current snapshot; a lock-free load.
    fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>>;

    /// The pointer this source publishes its snapshots through, when it
    /// has one of its own (`None`, the default: the mesh layer calls
    /// [`snapshot`](Self::snapshot) on every request).
    ///
    /// Why: with it, each clone of a [`Mesh`](crate::Mesh) keeps the
    /// snapshot it last read ([`arc_swap::Cache`]) and checks per request
    /// whether the pointer still points at it (one relaxed atomic load and
    /// a compare), instead of a full `arc_swap` load and guard release
    /// (about 55 instructions per request). A newly published snapshot is
    /// seen by the next request as with `snapshot`; the old one is held by
    /// each clone until its next request (as its last route holds it).
    fn snapshot_cell(&self) -> Option<Arc<ArcSwap<Snapshot>>> {
        None
    }

    /// Resolves once a listener named `name` (and everything it refers to)
    /// is in the snapshot, or fails when the source knows it does not exist.
    /// Callers bound the wait with their own timeout.
    fn wait_for_listener(&self, name: &str) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Why configuration may not be arriving (the last connection error to
    /// the control server), to explain a wait that timed out.
    fn last_error(&self) -> Option<BoxError> {
        None
    }

    /// Where this process runs, for locality failover (Istio
    /// `localityLbSetting`): endpoints of the same region, zone and
    /// sub-zone are preferred. `None` (the default): no preference.
    fn locality(&self) -> Option<Locality> {
        None
    }
}

/// A bare snapshot pointer: what it holds is all there is. Waiting for a
/// listener resolves at once, so an unknown name is reported as not found.
impl ConfigSource for Arc<ArcSwap<Snapshot>> {
    fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.load()
    }

    fn snapshot_cell(&self) -> Option<Arc<ArcSwap<Snapshot>>> {
        Some(Arc::clone(self))
    }

    fn wait_for_listener(&self, _name: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        std::future::ready(Ok(()))
    }
}

impl ConfigSource for mesh_xds_client::XdsClient {
    fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        mesh_xds_client::XdsClient::snapshot(self)
    }

    fn snapshot_cell(&self) -> Option<Arc<ArcSwap<Snapshot>>> {
        Some(mesh_xds_client::XdsClient::snapshot_cell(self))
    }

    fn wait_for_listener(&self, name: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        let client = self.clone();
        let name = name.to_owned();
        async move {
            client
                .wait_for_listener(&name)
                .await
                .map_err(|e| Box::new(e) as BoxError)
        }
    }

    fn last_error(&self) -> Option<BoxError> {
        mesh_xds_client::XdsClient::last_error(self).map(|e| Box::new(e) as BoxError)
    }

    /// The bootstrap's `node.locality`, unless it is empty.
    fn locality(&self) -> Option<Locality> {
        let locality = self.bootstrap().locality();
        (locality != Locality::default()).then_some(locality)
    }
}

/// A snapshot set by hand, with change notification: for tests, examples
/// and processes that build their routing table themselves.
///
/// Waiting for a listener resolves when a published snapshot has it, and
/// fails when a published snapshot lists it in `missing_listeners`.
#[derive(Clone, Debug)]
pub struct StaticSource {
    snapshot: Arc<ArcSwap<Snapshot>>,
    version: Arc<watch::Sender<u64>>,
    locality: Option<Locality>,
}

impl StaticSource {
    /// A source that starts with `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        StaticSource {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            version: Arc::new(watch::Sender::new(0)),
            locality: None,
        }
    }

    /// Says this process runs in `locality` (see [`ConfigSource::locality`]).
    pub fn with_locality(mut self, locality: Locality) -> Self {
        self.locality = Some(locality);
        self
    }

    /// Replaces the snapshot and wakes every waiter.
    pub fn publish(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// How many requests are waiting for a listener this source has not
    /// published yet.
    pub fn waiting(&self) -> usize {
        self.version.receiver_count()
    }

    /// The underlying pointer (shared with this source).
    pub fn pointer(&self) -> &Arc<ArcSwap<Snapshot>> {
        &self.snapshot
    }
}

impl ConfigSource for StaticSource {
    fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    fn snapshot_cell(&self) -> Option<Arc<ArcSwap<Snapshot>>> {
        Some(Arc::clone(&self.snapshot))
    }

    fn locality(&self) -> Option<Locality> {
        self.locality.clone()
    }

    fn wait_for_listener(&self, name: &str) -> impl Future<Output = Result<(), BoxError>> + Send {
        let mut changes = self.version.subscribe();
        let snapshot = self.snapshot.clone();
        let name = name.to_owned();
        async move {
            loop {
                // Mark the current version seen before looking, so a publish
                // between the look and the wait is not missed.
                changes.borrow_and_update();
                match snapshot.load().listener_for(&name) {
                    ListenerLookup::Found(_) => return Ok(()),
                    ListenerLookup::Missing => {
                        return Err(format!("listener {name:?} does not exist").into());
                    }
                    ListenerLookup::Unknown => {}
                }
                if changes.changed().await.is_err() {
                    return Err("the static config source was dropped".into());
                }
            }
        }
    }
}
