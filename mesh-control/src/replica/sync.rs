//! The replica at run time: feeding the server from etcd (a list, then the
//! watch), and the registrations it makes in etcd for the admin API.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::view::{FORMAT, StoredRegistration, Touched, View};
use super::{Layout, lease_of};
use crate::Error;
use crate::etcd::{self, Etcd, Op, Watch};
use crate::persist::{Pending, SharedError, SharedState, Versions};
use crate::registry::{Lease, LeaseKeeper, LeaseSecret, Registered, Registry, to_stored};
use crate::state::Shared;

/// How long a write waits for this replica's own view to show it before
/// answering anyway (the write is in etcd; the view follows).
const SEE_OWN_WRITE: Duration = Duration::from_secs(2);

/// How many times a registration is judged again when another one was
/// written meanwhile.
const REGISTER_ATTEMPTS: usize = 5;

/// The first wait before listing again after the watch ended, doubling to
/// [`MAX_RELIST_BACKOFF`].
const RELIST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_RELIST_BACKOFF: Duration = Duration::from_secs(5);

/// A replica being set up: [`Replica::new`] before the server's shared
/// state exists (it needs the replica's [`SharedState`]), then
/// [`Replica::start`] once it does.
pub(crate) struct Replica {
    etcd: Etcd,
    layout: Layout,
    applied: watch::Sender<i64>,
}

impl Replica {
    /// A replica of the state under `prefix` in `etcd`, and what the admin
    /// API makes registrations through.
    pub(crate) fn new(etcd: Etcd, prefix: &str) -> Result<(Replica, Arc<dyn SharedState>), Error> {
        let layout = Layout::new(prefix)?;
        let (applied, seen) = watch::channel(0);
        let leases = EtcdLeases {
            etcd: etcd.clone(),
            layout: layout.clone(),
            applied: seen,
        };
        Ok((
            Replica {
                etcd,
                layout,
                applied,
            },
            Arc::new(leases),
        ))
    }

    /// The versions a replica publishes: etcd's revisions.
    pub(crate) fn versions() -> Versions {
        Versions::revisions()
    }

    /// Lists the prefix and publishes what it holds (before this returns:
    /// no client is served before the state is loaded), then watches it
    /// in a task that publishes every change. An etcd that cannot be
    /// listed is an error: a replica that never saw the state has nothing
    /// to serve.
    pub(crate) async fn start(self, shared: Arc<Shared>) -> Result<JoinHandle<()>, Error> {
        let prefix = self.layout.prefix().to_string();
        let (kvs, revision) =
            self.etcd.get_prefix(&prefix).await.map_err(|e| {
                Error::config(format!("cannot read the mesh's state from etcd: {e}"))
            })?;
        let view = View::from_list(&self.layout, kvs, revision);
        let mut reported = BTreeSet::new();
        publish(&shared, &self.layout, &view, Touched::ALL, &mut reported).await;
        self.applied.send_replace(view.revision);
        tracing::info!(
            etcd = ?self.etcd.endpoints(),
            prefix,
            revision,
            resources = view.resources.len(),
            registrations = view.registrations.len(),
            "loaded the mesh's state from etcd"
        );
        let watch = self
            .etcd
            .watch_prefix(&prefix, revision.saturating_add(1))
            .await
            .map_err(|e| Error::config(format!("cannot watch the mesh's state in etcd: {e}")))?;
        Ok(tokio::spawn(self.run(shared, view, watch, reported)))
    }

    /// Publishes each batch of the watch; lists again when the watch ends
    /// (etcd compacted the revisions it would resume from, or canceled it).
    async fn run(
        self,
        shared: Arc<Shared>,
        mut view: View,
        mut watch: Watch,
        mut reported: BTreeSet<String>,
    ) {
        loop {
            let ended = match watch.next().await {
                Some(Ok(batch)) => {
                    let touched = view.apply(&self.layout, &batch);
                    publish(&shared, &self.layout, &view, touched, &mut reported).await;
                    self.applied.send_replace(view.revision);
                    continue;
                }
                Some(Err(e)) => e.to_string(),
                None => "the watch ended".to_string(),
            };
            tracing::warn!("etcd: {ended}; listing the mesh's state again");
            (view, watch) = self.relist(&shared, &mut reported).await;
        }
    }

    /// Lists and watches again until both succeed, waiting longer after
    /// each failure; publishes the new list.
    async fn relist(&self, shared: &Arc<Shared>, reported: &mut BTreeSet<String>) -> (View, Watch) {
        let prefix = self.layout.prefix();
        let mut backoff = RELIST_BACKOFF;
        loop {
            tokio::time::sleep(backoff.mul_f64(rand::random_range(0.5..1.0))).await;
            backoff = (backoff * 2).min(MAX_RELIST_BACKOFF);
            let (kvs, revision) = match self.etcd.get_prefix(prefix).await {
                Ok(listed) => listed,
                Err(e) => {
                    tracing::debug!("etcd: listing the mesh's state: {e}");
                    continue;
                }
            };
            let watch = match self
                .etcd
                .watch_prefix(prefix, revision.saturating_add(1))
                .await
            {
                Ok(watch) => watch,
                Err(e) => {
                    tracing::debug!("etcd: watching the mesh's state: {e}");
                    continue;
                }
            };
            let view = View::from_list(&self.layout, kvs, revision);
            publish(shared, &self.layout, &view, Touched::ALL, reported).await;
            self.applied.send_replace(view.revision);
            tracing::info!(revision, "etcd: watching the mesh's state again");
            return (view, watch);
        }
    }
}

/// Feeds the server what `view` holds of what `touched` says changed, and
/// rebuilds: a new content is published under the view's revision. Values
/// that are not ours are logged once (and shown in `/status`).
async fn publish(
    shared: &Arc<Shared>,
    layout: &Layout,
    view: &View,
    touched: Touched,
    reported: &mut BTreeSet<String>,
) {
    let registry = touched.registrations.then(|| view.registry(layout));
    let documents = touched.config.then(|| view.documents());
    let mut problems: Vec<String> = Vec::new();
    if let Some((_, p)) = &registry {
        problems.extend(p.iter().cloned());
    }
    if let Some((_, p)) = &documents {
        problems.extend(p.iter().map(ToString::to_string));
    }
    for problem in &problems {
        if reported.insert(problem.clone()) {
            tracing::warn!("etcd: {problem}");
        }
    }
    let revision = u64::try_from(view.revision).unwrap_or(0);
    let shared = shared.clone();
    // Reading YAML and translating is CPU work: off the runtime's threads.
    let result = tokio::task::spawn_blocking(move || {
        if let Some((registry, _)) = registry {
            *shared.registry.lock() = registry;
        }
        if let Some((documents, mut problems)) = documents {
            problems.extend(shared.store.lock().read_documents(&documents));
            shared.diagnostics.lock().0 = problems;
        }
        shared.versions.lock().at_revision(revision);
        let before = shared.served.borrow().version;
        let changes = shared.rebuild();
        let after = shared.served.borrow().version;
        if !changes.is_empty() {
            tracing::info!(version = after, "config v{after} from etcd: {changes}");
        } else if after != before {
            tracing::debug!(version = after, "registrations changed: v{after}");
        }
    })
    .await;
    if let Err(e) = result {
        tracing::error!("publishing etcd's state failed: {e}");
    }
}

/// Registrations in etcd, for the admin API (see the module docs).
#[derive(Debug)]
struct EtcdLeases {
    etcd: Etcd,
    layout: Layout,
    /// The revision this replica's view has reached.
    applied: watch::Receiver<i64>,
}

/// An etcd failure as the admin API reports it.
fn unavailable(what: &str, e: &etcd::Error) -> SharedError {
    SharedError::Unavailable(format!(
        "cannot {what}: {e}. Registrations cannot change while etcd cannot be reached; routing \
         goes on with the last state this replica saw"
    ))
}

impl EtcdLeases {
    /// Waits (a little) for this replica's view to reach `revision`.
    async fn see(&self, revision: i64) {
        let mut seen = self.applied.clone();
        let caught_up = tokio::time::timeout(SEE_OWN_WRITE, seen.wait_for(|r| *r >= revision));
        if caught_up.await.is_err() {
            tracing::debug!(revision, "etcd: this replica's view has not caught up yet");
        }
    }

    async fn register_once(
        &self,
        registered: &Registered,
        ttl: Duration,
        lease: &mut Option<etcd::Lease>,
    ) -> Result<Option<Lease>, SharedError> {
        let prefix = self.layout.registrations();
        let (kvs, revision) = self
            .etcd
            .get_prefix(&prefix)
            .await
            .map_err(|e| unavailable("read the registrations from etcd", &e))?;
        let view = View::from_list(&self.layout, kvs, revision);
        let (registry, _) = view.registry(&self.layout);
        registry.check(registered).map_err(SharedError::Refused)?;
        let granted = match lease {
            Some(granted) => *granted,
            None => {
                let granted = self
                    .etcd
                    .grant(ttl)
                    .await
                    .map_err(|e| unavailable("grant an etcd lease for the registration", &e))?;
                *lease = Some(granted);
                granted
            }
        };
        let lease_id = granted.id.to_string();
        let secret = registered.owner.is_none().then(LeaseSecret::generate);
        let value = serde_json::to_vec(&StoredRegistration {
            format: FORMAT,
            lease: to_stored(&lease_id, registered, secret.as_ref(), granted.ttl),
        })
        .map_err(|e| SharedError::Refused(format!("cannot encode the registration: {e}")))?;
        let put = Op::put(
            self.layout.registration(granted.id),
            value,
            Some(granted.id),
        );
        match self
            .etcd
            .commit_if_unchanged(&prefix, revision, [put])
            .await
        {
            Ok(committed) => {
                self.see(committed).await;
                Ok(Some(Lease {
                    lease_id,
                    ttl_seconds: granted.ttl.as_secs().max(1),
                    lease_secret: secret.map(|s| s.as_str().to_string()),
                }))
            }
            Err(e) if e.kind() == etcd::ErrorKind::Conflict => Ok(None),
            Err(e) => Err(unavailable("write the registration to etcd", &e)),
        }
    }
}

impl SharedState for EtcdLeases {
    fn register(&self, registered: Registered, ttl: Duration) -> Pending<'_, Lease> {
        Box::pin(async move {
            let mut lease = None;
            let mut outcome = Err(SharedError::Unavailable(
                "registrations in etcd kept changing while this one was written; try again".into(),
            ));
            for _ in 0..REGISTER_ATTEMPTS {
                match self.register_once(&registered, ttl, &mut lease).await {
                    Ok(Some(done)) => return Ok(done),
                    Ok(None) => continue,
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            // Not registered: the lease (and a key whose write may have
            // been applied without its answer arriving) goes.
            if let Some(granted) = lease
                && let Err(e) = self.etcd.revoke(granted.id).await
            {
                tracing::warn!("etcd: revoking the unused lease {}: {e}", granted.id);
            }
            outcome
        })
    }

    fn keeper(&self, lease_id: &str) -> Pending<'_, Option<LeaseKeeper>> {
        let lease = lease_of(lease_id);
        Box::pin(async move {
            let Some(lease) = lease else {
                return Ok(None);
            };
            let kv = self
                .etcd
                .get(self.layout.registration(lease))
                .await
                .map_err(|e| unavailable("read the registration from etcd", &e))?;
            let Some(kv) = kv else {
                return Ok(None);
            };
            // The answers name no lease id (see `registry.rs`); the log does.
            let damaged = |why: String| {
                tracing::warn!(%lease, "etcd: a damaged registration: {why}");
                SharedError::Refused(
                    "this lease's registration in etcd cannot be read (see mesh-control's log); \
                     register again"
                        .into(),
                )
            };
            let stored: StoredRegistration =
                serde_json::from_slice(&kv.value).map_err(|e| damaged(format!("not JSON: {e}")))?;
            let lease_id = lease.to_string();
            let (registry, problems) = Registry::mirror([(lease_id.as_str(), &stored.lease)]);
            match registry.keeper(&lease_id) {
                Some(keeper) => Ok(Some(keeper)),
                None => Err(damaged(problems.join("; "))),
            }
        })
    }

    fn renew(&self, lease_id: &str) -> Pending<'_, bool> {
        let lease = lease_of(lease_id);
        Box::pin(async move {
            let Some(lease) = lease else {
                return Ok(false);
            };
            match self.etcd.keep_alive(lease).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == etcd::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(unavailable("renew the registration's etcd lease", &e)),
            }
        })
    }

    fn remove(&self, lease_id: &str) -> Pending<'_, bool> {
        let lease = lease_of(lease_id);
        Box::pin(async move {
            let Some(lease) = lease else {
                return Ok(false);
            };
            let key = self.layout.registration(lease);
            match self.etcd.revoke(lease).await {
                Ok(()) => {
                    // Revoking deletes the key: wait until this replica has
                    // seen it go, so its EDS no longer lists it.
                    if let Ok(status) = self.etcd.status().await {
                        self.see(status.revision).await;
                    }
                    tracing::debug!(key, "registration deleted");
                    Ok(true)
                }
                Err(e) if e.kind() == etcd::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(unavailable("revoke the registration's etcd lease", &e)),
            }
        })
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "store": "etcd",
            "endpoints": self.etcd.endpoints(),
            "prefix": self.layout.prefix(),
            "revision": *self.applied.borrow(),
        })
    }
}
