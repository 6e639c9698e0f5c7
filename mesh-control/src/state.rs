//! The control server's shared state: the YAML store, the registry, the
//! snapshot being served and what each connected client has acknowledged.
//!
//! Everything that changes config funnels through [`Shared::rebuild`], which
//! applies what can be applied of the files read (`ConfigStore::settle`,
//! judged with the registrations of the moment), persists the config in
//! force when it changed, translates, encodes and publishes one new
//! immutable [`Served`] value on a watch channel; ADS streams only read it.
//! Locks here are held briefly and never across an await; the blocking
//! writes of a data directory happen under the rebuild lock only (config,
//! version ceiling) or on blocking threads (leases).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use mesh_core::Snapshot;
use mesh_core::xds::Any;
use mesh_core::xds::ResourceType;
use tokio::sync::watch;

use crate::ads::{encode_all, type_index};
use crate::ca::CertificateAuthority;
use crate::config::{ConfigChanges, ConfigStore, Diagnostic, Rejection, SecurityPolicies};
use crate::metrics::Counters;
use crate::persist::{SharedState, Store, Versions};
use crate::registry::{Registered, Registry};

/// A mutex whose poisoning is ignored: the data behind it is replaced
/// wholesale, so a panic elsewhere cannot leave it half-written.
#[derive(Debug, Default)]
pub(crate) struct Locked<T>(Mutex<T>);

impl<T> Locked<T> {
    pub(crate) fn new(value: T) -> Self {
        Locked(Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One published config: the model, and each resource encoded once.
#[derive(Debug, Default)]
pub(crate) struct Served {
    pub(crate) version: u64,
    /// When this version was published (push latency is measured from here).
    pub(crate) published_at: Option<Instant>,
    pub(crate) snapshot: Snapshot,
    pub(crate) resources: [BTreeMap<String, Any>; 4],
    /// PeerAuthentication and AuthorizationPolicy, resolved per workload
    /// into server listeners when a client asks for one (gRFC A36).
    pub(crate) security: SecurityPolicies,
    /// The live registrations, each with its one label set (its
    /// WorkloadGroup's labels under its own, as its EDS endpoints carry
    /// them): a server listener is resolved with the labels of the
    /// registration at its address.
    pub(crate) registered: Arc<[Registered]>,
}

/// What a client's xDS node says about its workload: who it is, and the
/// labels it claims (`node.metadata`, Istio's names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NodeWorkload {
    /// `node.id`.
    pub(crate) id: String,
    /// `node.cluster`: the service the workload runs (the WorkloadGroup of
    /// that name gives it labels until it registers).
    pub(crate) cluster: String,
    /// `node.metadata.NAMESPACE`, `default` when absent.
    pub(crate) namespace: String,
    /// `node.metadata.SERVICE_ACCOUNT`.
    pub(crate) service_account: Option<String>,
    /// `node.metadata.LABELS` (string values only).
    pub(crate) labels: BTreeMap<String, String>,
}

impl NodeWorkload {
    /// Reads a node as a client sent it.
    pub(crate) fn from_node(node: &Node) -> Self {
        let field = |key: &str| {
            node.metadata
                .as_ref()
                .and_then(|m| m.fields.get(key))
                .and_then(|v| v.kind.as_ref())
        };
        let string = |key: &str| match field(key) {
            Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        let labels = match field("LABELS") {
            Some(Kind::StructValue(labels)) => labels
                .fields
                .iter()
                .filter_map(|(k, v)| match &v.kind {
                    Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                    _ => None,
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        NodeWorkload {
            id: node.id.clone(),
            cluster: node.cluster.clone(),
            namespace: string("NAMESPACE").unwrap_or_else(|| "default".into()),
            service_account: string("SERVICE_ACCOUNT"),
            labels,
        }
    }
}

/// What `/status` shows for one ADS client.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientStatus {
    /// The node as the client sent it (CSDS echoes it).
    pub(crate) node: Option<envoy_types::pb::envoy::config::core::v3::Node>,
    /// `node.user_agent_name` alone (client kind detection).
    pub(crate) user_agent_name: String,
    pub(crate) node_id: String,
    /// What the node says about its workload (server listeners are
    /// resolved for it).
    pub(crate) workload: NodeWorkload,
    pub(crate) user_agent: String,
    pub(crate) connected_at: Option<SystemTime>,
    pub(crate) types: BTreeMap<String, TypeStatus>,
    /// Listeners and clusters it accepted that were deleted since, while it
    /// still subscribes to them (`/status` shows them for gRPC clients).
    pub(crate) deleted_but_kept: Vec<crate::ads::DeletedKept>,
}

/// Per client and type: versions sent and acknowledged, the last NACK.
#[derive(Debug, Clone, Default)]
pub(crate) struct TypeStatus {
    pub(crate) subscribed: Vec<String>,
    pub(crate) sent_version: String,
    pub(crate) acked_version: String,
    pub(crate) last_nack: Option<NackInfo>,
    pub(crate) last_push: Option<Instant>,
    /// The resources of the last response sent (CSDS reports them).
    pub(crate) sent_resources: Arc<[Any]>,
    pub(crate) last_push_wall: Option<SystemTime>,
}

impl TypeStatus {
    /// Whether the client rejected the latest response it was sent.
    pub(crate) fn nacked_latest(&self) -> bool {
        self.last_nack
            .as_ref()
            .is_some_and(|n| n.version == self.sent_version)
    }

    /// Whether the client accepted the latest response it was sent.
    pub(crate) fn acked_latest(&self) -> bool {
        !self.sent_version.is_empty()
            && self.sent_version == self.acked_version
            && !self.nacked_latest()
    }
}

/// A rejected response.
#[derive(Debug, Clone)]
pub(crate) struct NackInfo {
    pub(crate) version: String,
    pub(crate) nonce: String,
    pub(crate) message: String,
    pub(crate) at: SystemTime,
}

/// Everything the tasks of one control server share.
pub(crate) struct Shared {
    pub(crate) served: watch::Sender<Arc<Served>>,
    pub(crate) clients: Locked<BTreeMap<u64, ClientStatus>>,
    pub(crate) store: Locked<ConfigStore>,
    pub(crate) registry: Locked<Registry>,
    /// Problems of the last YAML read and of the last translation.
    pub(crate) diagnostics: Locked<(Vec<Diagnostic>, Vec<Diagnostic>)>,
    /// Raw resources served instead of the translated ones (test hook).
    pub(crate) raw: Locked<Vec<(ResourceType, String, Any)>>,
    /// A client that has not acknowledged a response this long is stale.
    pub(crate) stale_after: std::time::Duration,
    pub(crate) metrics: Counters,
    /// The CA, when security is on: certificates and authenticated
    /// registration.
    pub(crate) ca: Option<Arc<CertificateAuthority>>,
    /// Where the config in force, the leases and the version ceiling are
    /// kept across restarts (`--data-dir`); `None`: in memory only.
    pub(crate) persistence: Option<Arc<dyn Store>>,
    /// Where registrations are made when replicas share them (etcd): the
    /// admin API goes there, and `registry` only mirrors it.
    pub(crate) shared_state: Option<Arc<dyn SharedState>>,
    /// The xDS version counter (reserved in the store, with one; a shared
    /// store's revisions, with one).
    pub(crate) versions: Locked<Versions>,
    /// True once the server stops: the servers drain, ADS streams end.
    pub(crate) stop: watch::Sender<bool>,
    /// Renewals not yet written (they are batched).
    leases_dirty: AtomicBool,
    /// One lease write at a time, each of the registry as it is then.
    lease_writes: Mutex<()>,
    /// The config generation last written to the store.
    persisted_generation: AtomicU64,
    /// One config write at a time, each of the config as it is then.
    config_writes: Mutex<()>,
    /// What was last logged and counted, so that a rebuild reports only
    /// what is new (a rejected edit is judged again at every registration).
    reported: Locked<Reported>,
    next_client: AtomicU64,
    rebuild_lock: Mutex<()>,
}

/// The rejections and translation problems last reported.
#[derive(Debug, Default)]
struct Reported {
    rejections: Vec<Rejection>,
    problems: BTreeSet<Diagnostic>,
}

impl Shared {
    pub(crate) fn new(store: ConfigStore) -> Self {
        let (served, _) = watch::channel(Arc::new(Served::default()));
        let (stop, _) = watch::channel(false);
        Shared {
            served,
            clients: Locked::default(),
            store: Locked::new(store),
            registry: Locked::default(),
            diagnostics: Locked::default(),
            raw: Locked::default(),
            stale_after: std::time::Duration::from_secs(5),
            metrics: Counters::default(),
            ca: None,
            persistence: None,
            shared_state: None,
            versions: Locked::new(Versions::in_memory()),
            stop,
            leases_dirty: AtomicBool::new(false),
            lease_writes: Mutex::new(()),
            persisted_generation: AtomicU64::new(0),
            config_writes: Mutex::new(()),
            reported: Locked::default(),
            next_client: AtomicU64::new(1),
            rebuild_lock: Mutex::new(()),
        }
    }

    pub(crate) fn next_client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    /// Applies what can be applied of the files read, persists the config
    /// in force if it changed, translates it and the registrations and
    /// publishes the result, with a new version, if anything a client can
    /// see changed. Returns what the resources in force changed by.
    pub(crate) fn rebuild(&self) -> ConfigChanges {
        let _serialized = self.rebuild_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut registered = self.registry.lock().registered();
        let registrations: Vec<_> = registered.iter().map(|r| r.registration.clone()).collect();
        let (snapshot, diagnostics, security, changes, rejections) = {
            let mut store = self.store.lock();
            let before = store.versions();
            store.settle(&registrations);
            let changes = before.changes_to(&store.versions());
            let security = store.security();
            // One label set per workload: the EDS endpoints carry the
            // labels server listeners are resolved with.
            for r in &mut registered {
                r.registration.labels = security.registered_labels(&r.registration);
            }
            let registrations: Vec<_> = registered.iter().map(|r| r.registration.clone()).collect();
            let (snapshot, diagnostics) = store.snapshot(&registrations);
            let rejections = store.rejections().to_vec();
            (snapshot, diagnostics, security, changes, rejections)
        };
        // The config in force is on disk before it is served: a restart
        // never serves less than what clients were sent.
        self.write_config();
        self.report(&rejections, &diagnostics);
        let registered: Arc<[Registered]> = registered.into();
        self.diagnostics.lock().1 = diagnostics;
        let mut resources = encode_all(&snapshot);
        for (t, name, any) in self.raw.lock().iter() {
            resources[type_index(*t)].insert(name.clone(), any.clone());
        }
        let current = self.served.borrow().clone();
        // Server listeners are built per client from `security` and the
        // registrations: a change there is a new version even when no
        // shared resource changed.
        if current.version > 0
            && current.resources == resources
            && current.security == security
            && current.registered == registered
        {
            return changes;
        }
        let version = self.next_version();
        self.metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.served.send_replace(Arc::new(Served {
            version,
            published_at: Some(Instant::now()),
            snapshot,
            resources,
            security,
            registered,
        }));
        changes
    }

    /// The next xDS version; with a store, reserved there before it is
    /// used, so that no version is ever sent with two contents across
    /// restarts.
    fn next_version(&self) -> u64 {
        let mut versions = self.versions.lock();
        let version = versions.next();
        if let (Some(store), Some(ceiling)) = (&self.persistence, versions.reservation()) {
            match store.save_version_ceiling(ceiling) {
                Ok(()) => versions.reserved(ceiling),
                Err(e) => self.persist_failed("the version ceiling", &e),
            }
        }
        version
    }

    /// Logs and counts the rejections and translation problems not
    /// reported before.
    fn report(&self, rejections: &[Rejection], problems: &[Diagnostic]) {
        let mut reported = self.reported.lock();
        for r in rejections {
            if !reported.rejections.contains(r) {
                tracing::warn!("{r}");
                self.metrics.config_rejections.inc();
            }
        }
        for d in problems {
            if !reported.problems.contains(d) {
                tracing::warn!("{d}");
            }
        }
        self.metrics
            .config_rejected
            .set(i64::try_from(rejections.len()).unwrap_or(i64::MAX));
        reported.rejections = rejections.to_vec();
        reported.problems = problems.iter().cloned().collect();
    }

    fn persist_failed(&self, what: &str, error: &crate::Error) {
        self.metrics.persist_errors.inc();
        tracing::error!(
            %error,
            "cannot persist {what}: it lives in memory only until a write succeeds"
        );
    }

    /// Writes the config in force if it changed since it was last written
    /// (or the last write failed). Blocking: the rebuild calls it before it
    /// publishes, and a stop once more.
    pub(crate) fn write_config(&self) {
        let Some(store) = &self.persistence else {
            return;
        };
        // Exported and written under one lock: a later write never carries
        // an older config than an earlier one.
        let _one = self.config_writes.lock().unwrap_or_else(|e| e.into_inner());
        let export = {
            let config = self.store.lock();
            let generation = config.generation();
            (generation != self.persisted_generation.load(Ordering::SeqCst))
                .then(|| (generation, config.export()))
        };
        if let Some((generation, config)) = export {
            match store.save_config(&config) {
                Ok(()) => self
                    .persisted_generation
                    .store(generation, Ordering::SeqCst),
                Err(e) => self.persist_failed("the config in force", &e),
            }
        }
    }

    /// Marks the leases as changed (a renewal, an expiry): written within
    /// [`crate::persist::LEASE_FLUSH`].
    pub(crate) fn leases_changed(&self) {
        if self.persistence.is_some() {
            self.leases_dirty.store(true, Ordering::SeqCst);
        }
    }

    /// Whether renewals wait to be written.
    pub(crate) fn leases_dirty(&self) -> bool {
        self.leases_dirty.load(Ordering::SeqCst)
    }

    /// Writes the leases as they are now. Blocking (an fsync): call it from
    /// a blocking thread ([`Shared::persist_leases`]).
    pub(crate) fn write_leases(&self) {
        let Some(store) = &self.persistence else {
            return;
        };
        let _one = self.lease_writes.lock().unwrap_or_else(|e| e.into_inner());
        // Cleared before the registry is read: a renewal after this point
        // marks it again and is written by the next flush.
        self.leases_dirty.store(false, Ordering::SeqCst);
        let leases = self
            .registry
            .lock()
            .export(Instant::now(), SystemTime::now());
        if let Err(e) = store.save_leases(&leases) {
            self.leases_dirty.store(true, Ordering::SeqCst);
            self.persist_failed("the leases", &e);
        }
    }

    /// [`Shared::write_leases`] on a blocking thread, awaited: a
    /// registration is on disk before it is answered.
    pub(crate) async fn persist_leases(self: &Arc<Self>) {
        if self.persistence.is_none() {
            return;
        }
        let shared = self.clone();
        let _ = tokio::task::spawn_blocking(move || shared.write_leases()).await;
    }
}
