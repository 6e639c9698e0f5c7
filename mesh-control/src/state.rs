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
//!
//! Registrations do not rebuild themselves: [`Shared::rebuild_soon`] asks
//! for a rebuild and waits for one that covers it. One task at a time runs
//! the rebuilds asked for, on a blocking thread (a full translation of
//! 10,000 endpoints takes tens of milliseconds: it must not hold a runtime
//! worker, nor the locks the admin handlers take, once per registration),
//! and starts them at least [`REGISTRATION_DEBOUNCE`] apart. A storm of n
//! registrations arriving over a time T thus costs at most T / debounce + 1
//! translations of O(n) each, instead of n of them (O(n²)); every
//! registration is still in the snapshot served when it is answered.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use mesh_core::Snapshot;
use mesh_core::xds::{self, Any, ResourceType};
use tokio::sync::watch;

use crate::ca::CertificateAuthority;
use crate::config::{
    ConfigChanges, ConfigStore, Diagnostic, Rejection, SecurityPolicies, ViewKey, ViewSource,
};
use crate::metrics::Counters;
use crate::persist::{SharedState, Store, Versions};
use crate::registry::{Registered, Registry};

pub(crate) mod labels;

/// The default minimum interval between the starts of two rebuilds asked
/// for by registrations ([`Shared::rebuild_soon`]).
///
/// What it costs: a registration that arrives right after a rebuild started
/// waits up to this long (plus one translation) for its answer. What it
/// buys: however fast registrations come, at most one full translation per
/// interval. Istio's istiod debounces the same way (`PILOT_DEBOUNCE_AFTER`,
/// 100 ms, waiting for a quiet period); here the first change of a quiet
/// period is translated at once and the interval only spaces the next ones,
/// so a lone registration is not delayed, and a burst cannot postpone its
/// own translation indefinitely.
pub(crate) const REGISTRATION_DEBOUNCE: Duration = Duration::from_millis(20);

/// The rebuilds asked for by [`Shared::rebuild_soon`]: tickets handed out,
/// and whether a task is running them.
#[derive(Debug, Default)]
struct Batch {
    /// The last ticket handed out (each call takes the next one).
    requested: u64,
    /// Whether a task runs the rebuilds asked for (at most one does).
    running: bool,
    /// When the last of these rebuilds started (the next starts a debounce
    /// later at the earliest, even in a new task).
    last_start: Option<tokio::time::Instant>,
}

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
    /// The per-node views of this config (`exportTo`, `sourceLabels`,
    /// `sourceNamespace`); none when it has no such field.
    pub(crate) views: Views,
    /// Istio Gateways and the VirtualServices bound to them, served to
    /// gateway nodes only (see `crate::dialect::gateway`).
    pub(crate) gateways: Arc<crate::config::GatewayConfig>,
}

/// How many views one published config caches. A client whose view would
/// be one more (workloads claiming ever new label values) gets its view
/// translated for each response instead of cached: memory stays bounded.
pub(crate) const MAX_CACHED_VIEWS: usize = 1024;

/// The per-node views of one published config (see "Per-node views" in
/// `config`): translated when a client first needs one (or, for the views
/// of the clients connected, by the rebuild that publishes the config),
/// cached by [`ViewKey`] until the next config.
///
/// The filtering is done here, before encoding, for every client kind:
/// gRPC proxyless clients and Envoy are sent only the routes and resources
/// of their view, exactly like this mesh's client, so there is nothing in
/// `exportTo` or the source conditions that they ignore.
#[derive(Debug, Default)]
pub(crate) struct Views {
    /// What views are translated from; `None`: every client gets the
    /// shared resources.
    pub(crate) source: Option<ViewSource>,
    /// The shared translation's problems (a view reports only its own).
    shared_problems: BTreeSet<Diagnostic>,
    /// One cell per key: concurrent first users of a view translate it once.
    cache: Locked<BTreeMap<ViewKey, Arc<OnceLock<Arc<View>>>>>,
}

impl Views {
    /// The views of a config translated from `source`, whose shared
    /// translation found `problems`.
    pub(crate) fn new(source: Option<ViewSource>, problems: &[Diagnostic]) -> Self {
        Views {
            shared_problems: match source {
                Some(_) => problems.iter().cloned().collect(),
                None => BTreeSet::new(),
            },
            source,
            cache: Locked::default(),
        }
    }

    /// The views cached so far.
    pub(crate) fn cached(&self) -> Vec<Arc<View>> {
        self.cache
            .lock()
            .values()
            .filter_map(|cell| cell.get().cloned())
            .collect()
    }

    /// The view `key`, if translated already.
    pub(crate) fn get(&self, key: &ViewKey) -> Option<Arc<View>> {
        self.cache
            .lock()
            .get(key)
            .and_then(|cell| cell.get().cloned())
    }
}

/// One per-node view of a published config: its translation, encoded where
/// it differs from the shared one.
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) key: ViewKey,
    /// The view's model (sharing the shared snapshot's values where equal).
    pub(crate) snapshot: Snapshot,
    /// Per type, the resources that differ from [`Served::resources`]:
    /// `Some`, this view's encoding; `None`, absent from this view.
    pub(crate) differs: [BTreeMap<String, Option<Any>>; 4],
    /// Names that exist for other namespaces only, with why.
    pub(crate) hidden: BTreeMap<String, String>,
    /// Problems of this view only (not of the shared translation).
    pub(crate) problems: Vec<Diagnostic>,
}

/// The resources one client is served: the shared ones, through its view
/// when it has one.
#[derive(Clone, Copy)]
pub(crate) struct Lookup<'a> {
    pub(crate) served: &'a Served,
    pub(crate) view: Option<&'a View>,
}

impl<'a> Lookup<'a> {
    /// The encoded resource `name` of type index `i`.
    pub(crate) fn get(&self, i: usize, name: &str) -> Option<&'a Any> {
        if let Some(view) = self.view
            && let Some(differs) = view.differs[i].get(name)
        {
            return differs.as_ref();
        }
        self.served.resources[i].get(name)
    }

    /// Every resource of type index `i` (a wildcard subscription).
    pub(crate) fn all(&self, i: usize) -> Vec<Any> {
        let shared = &self.served.resources[i];
        match self.view {
            None => shared.values().cloned().collect(),
            Some(view) => {
                let differs = &view.differs[i];
                let mut all: BTreeMap<&str, &Any> = shared
                    .iter()
                    .filter(|(name, _)| !differs.contains_key(name.as_str()))
                    .map(|(name, any)| (name.as_str(), any))
                    .collect();
                all.extend(
                    differs
                        .iter()
                        .filter_map(|(name, any)| Some((name.as_str(), any.as_ref()?))),
                );
                all.into_values().cloned().collect()
            }
        }
    }

    /// The model served to this client.
    pub(crate) fn snapshot(&self) -> &'a Snapshot {
        match self.view {
            Some(view) => &view.snapshot,
            None => &self.served.snapshot,
        }
    }

    /// Why `name` does not exist for this client although it exists for
    /// others (`exportTo`).
    pub(crate) fn hidden(&self, name: &str) -> Option<&'a str> {
        self.view?.hidden.get(name).map(String::as_str)
    }
}

impl Served {
    /// The view key of the workload `node` describes under this config;
    /// `None`: the shared resources. Its labels (when some `sourceLabels`
    /// needs them) are those of its registrations, else its node's
    /// `LABELS` over its WorkloadGroup's ([`labels::caller_labels`]).
    pub(crate) fn view_key(&self, node: &NodeWorkload) -> Option<ViewKey> {
        let deps = &self.views.source.as_ref()?.dependencies;
        let labels = if deps.labels.is_empty() && deps.priority_labels.is_empty() {
            BTreeMap::new()
        } else {
            labels::caller_labels(self, node)
        };
        let mut key = deps.key_at(&node.namespace, &labels, &node.locality)?;
        key.gateway = self.gateways.selecting(&node.labels).next().is_some();
        Some(key)
    }

    /// The view `key` of this config, translated on first use (blocking:
    /// a full translation). Past [`MAX_CACHED_VIEWS`] a new key is
    /// translated each time and not kept.
    pub(crate) fn view(&self, key: &ViewKey) -> Arc<View> {
        let cell = {
            let mut cache = self.views.cache.lock();
            match cache.get(key) {
                Some(cell) => Some(cell.clone()),
                None if cache.len() < MAX_CACHED_VIEWS => Some(
                    cache
                        .entry(key.clone())
                        .or_insert_with(|| Arc::new(OnceLock::new()))
                        .clone(),
                ),
                None => None,
            }
        };
        match cell {
            Some(cell) => cell
                .get_or_init(|| Arc::new(self.translate_view(key)))
                .clone(),
            None => Arc::new(self.translate_view(key)),
        }
    }

    fn translate_view(&self, key: &ViewKey) -> View {
        let Some(source) = &self.views.source else {
            // No views: the shared translation.
            return View {
                key: key.clone(),
                snapshot: self.snapshot.clone(),
                differs: Default::default(),
                hidden: BTreeMap::new(),
                problems: Vec::new(),
            };
        };
        let t = source.translate_over(key, Some(&self.snapshot));
        let mut snapshot = t.snapshot;
        crate::dns::carry_over(&mut snapshot, &self.snapshot);
        let base = &self.snapshot;
        let differs = [
            diff(&mut snapshot.listeners, &base.listeners, |l| {
                xds::encode_listener(l)
            }),
            diff(&mut snapshot.route_configs, &base.route_configs, |rc| {
                xds::encode_route_config(rc)
            }),
            diff(&mut snapshot.clusters, &base.clusters, |c| {
                xds::encode_cluster(c)
            }),
            diff(&mut snapshot.endpoints, &base.endpoints, |e| {
                xds::encode_endpoints(e)
            }),
        ];
        let problems = t
            .diagnostics
            .into_iter()
            .filter(|d| !self.views.shared_problems.contains(d))
            .collect();
        View {
            key: key.clone(),
            snapshot,
            differs,
            hidden: t.hidden,
            problems,
        }
    }
}

/// The resources of `view` that differ from `shared`, encoded (`None`:
/// absent from the view); the equal ones are replaced by the shared value,
/// so that a view holds only its differences.
fn diff<T: PartialEq>(
    view: &mut BTreeMap<mesh_core::model::Name, Arc<T>>,
    shared: &BTreeMap<mesh_core::model::Name, Arc<T>>,
    encode: impl Fn(&T) -> Any,
) -> BTreeMap<String, Option<Any>> {
    let mut differs = BTreeMap::new();
    for (name, value) in view.iter_mut() {
        match shared.get(name) {
            Some(s) if s == value => *value = s.clone(),
            _ => {
                differs.insert(name.to_string(), Some(encode(value)));
            }
        }
    }
    for name in shared.keys() {
        if !view.contains_key(name) {
            differs.insert(name.to_string(), None);
        }
    }
    differs
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
    /// `node.locality` (empty strings where absent): what Istio's
    /// `localityLbSetting` `from` and failover compare with.
    pub(crate) locality: mesh_core::model::Locality,
    /// `node.metadata.PROXYLESS_OUTBOUND_PORT` (a string or a number): the
    /// port of an Envoy sidecar's outbound listener (see
    /// `crate::dialect::envoy`); `None`: absent or not a port.
    pub(crate) outbound_port: Option<u16>,
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
            locality: node
                .locality
                .as_ref()
                .map(|l| mesh_core::model::Locality {
                    region: l.region.as_str().into(),
                    zone: l.zone.as_str().into(),
                    sub_zone: l.sub_zone.as_str().into(),
                })
                .unwrap_or_default(),
            outbound_port: match field(crate::dialect::envoy::OUTBOUND_PORT_KEY) {
                Some(Kind::StringValue(s)) => s.trim().parse().ok(),
                Some(Kind::NumberValue(n)) if n.fract() == 0.0 && (1.0..=65535.0).contains(n) => {
                    Some(*n as u16)
                }
                _ => None,
            },
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
    pub(crate) deleted_but_kept: Vec<DeletedKept>,
    /// The view it was last served (`None`: the shared resources).
    pub(crate) view: Option<ViewKey>,
}

/// A listener or cluster a client was sent and accepted that the server
/// has since deleted (a SotW response without it) while the client still
/// subscribes to it. A client that honors deletions dropped it; a gRPC
/// client running with `ignore_resource_deletion` (gRFC A53) or with
/// gRFC A88's data error handling keeps using it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeletedKept {
    /// `LDS` or `CDS`.
    pub(crate) type_name: &'static str,
    pub(crate) name: String,
    /// The version of the first response without it.
    pub(crate) deleted_at_version: String,
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
    /// The DNS clusters' latest answers (`crate::dns`), added to each
    /// rebuild's snapshot for the gRPC clients.
    pub(crate) dns: crate::dns::Answers,
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
    /// The last ticket of a lease write asked for (taken after the registry
    /// change it must hold).
    lease_requested: AtomicU64,
    /// The highest ticket a successful lease write holds.
    leases_written: AtomicU64,
    /// The config generation last written to the store.
    persisted_generation: AtomicU64,
    /// One config write at a time, each of the config as it is then.
    config_writes: Mutex<()>,
    /// What was last logged and counted, so that a rebuild reports only
    /// what is new (a rejected edit is judged again at every registration).
    reported: Locked<Reported>,
    next_client: AtomicU64,
    rebuild_lock: Mutex<()>,
    /// The minimum interval between two rebuilds asked for by
    /// registrations ([`REGISTRATION_DEBOUNCE`] unless set).
    registration_debounce: Duration,
    batch: Locked<Batch>,
    /// The highest ticket of [`Shared::rebuild_soon`] covered: a rebuild
    /// that began after that ticket was taken has been published (or the
    /// rebuilds were given up: a panic, the server stopping).
    covered: watch::Sender<u64>,
    /// The service graph: workloads' summaries over the last minutes
    /// (`graph.rs`).
    pub(crate) graph: crate::admin::graph::GraphStore,
    /// The web page's login sessions (`ui/mod.rs`).
    pub(crate) ui_sessions: crate::admin::ui::Sessions,
    /// The Prometheus `GET /v1/graph` reads the graph from, if one is
    /// configured (`graph_prom.rs`); else the graph is the window above.
    pub(crate) prometheus: Option<crate::graph_prom::PromGraph>,
}

/// Ends a [`Shared::run_rebuilds`] task that did not finish its work:
/// marks it gone and releases every waiter, under the batch lock, so that
/// a later call starts a new task for a ticket above those released.
struct Release(Option<Arc<Shared>>);

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            let mut batch = shared.batch.lock();
            batch.running = false;
            let requested = batch.requested;
            shared.covered.send_if_modified(|covered| {
                let newer = requested > *covered;
                if newer {
                    *covered = requested;
                }
                newer
            });
        }
    }
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
            lease_requested: AtomicU64::new(0),
            leases_written: AtomicU64::new(0),
            persisted_generation: AtomicU64::new(0),
            config_writes: Mutex::new(()),
            reported: Locked::default(),
            next_client: AtomicU64::new(1),
            rebuild_lock: Mutex::new(()),
            registration_debounce: REGISTRATION_DEBOUNCE,
            batch: Locked::default(),
            covered: watch::channel(0).0,
            graph: Default::default(),
            ui_sessions: Default::default(),
            prometheus: None,
            dns: crate::dns::Answers::default(),
        }
        .with_metrics()
    }

    fn with_metrics(self) -> Self {
        self.metrics
            .set_registration_debounce(self.registration_debounce);
        self
    }

    /// Sets the minimum interval between two rebuilds asked for by
    /// registrations (see [`REGISTRATION_DEBOUNCE`] for the trade-off).
    /// Zero spaces them by nothing but the translation itself, which still
    /// coalesces: the registrations that arrive during one translation
    /// share the next.
    pub(crate) fn set_registration_debounce(&mut self, debounce: Duration) {
        self.registration_debounce = debounce;
        self.metrics.set_registration_debounce(debounce);
    }

    pub(crate) fn next_client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks for a [`Shared::rebuild`] and waits until one that began after
    /// this call has been published: what the registration paths call
    /// (after changing the registry), so that a registration answered is in
    /// the snapshot clients get, and a storm of registrations costs a
    /// bounded number of full translations instead of one each.
    ///
    /// The rebuilds run on a blocking thread, driven by one task at a time
    /// ([`Shared::run_rebuilds`]), at least the registration debounce
    /// apart; the registrations that arrive meanwhile share the next one.
    /// Returns early, without waiting for a publication, when the server
    /// stops (a stop is not delayed by a registration) or when the rebuilds
    /// were given up (a rebuild that panicked is logged; the registration
    /// stays in the registry and is published by the next rebuild).
    pub(crate) async fn rebuild_soon(self: &Arc<Self>) {
        let mut covered = self.covered.subscribe();
        let mut stop = self.stop.subscribe();
        let (ticket, start) = {
            let mut batch = self.batch.lock();
            batch.requested += 1;
            let start = !batch.running;
            batch.running = true;
            (batch.requested, start)
        };
        if start {
            tokio::spawn(self.clone().run_rebuilds());
        }
        tokio::select! {
            _ = covered.wait_for(|c| *c >= ticket) => {}
            _ = stop.wait_for(|stopped| *stopped) => {}
        }
    }

    /// Runs the rebuilds asked for by [`Shared::rebuild_soon`] until none
    /// is pending, then ends (a new call starts a new task). Each rebuild
    /// covers the tickets handed out before it began.
    async fn run_rebuilds(self: Arc<Self>) {
        // However this task ends (the server stopping, the runtime dropping
        // it, a panic), nobody is left waiting on it.
        let mut release = Release(Some(self.clone()));
        let mut stop = self.stop.subscribe();
        loop {
            let not_before = self
                .batch
                .lock()
                .last_start
                .map(|last| last + self.registration_debounce);
            if let Some(not_before) = not_before {
                tokio::select! {
                    _ = tokio::time::sleep_until(not_before) => {}
                    _ = stop.wait_for(|stopped| *stopped) => return,
                }
            }
            if *stop.borrow() {
                return;
            }
            // Read before the rebuild reads the registry: every ticket up
            // to here was taken after its registry change.
            let ticket = {
                let mut batch = self.batch.lock();
                batch.last_start = Some(tokio::time::Instant::now());
                batch.requested
            };
            let shared = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || shared.rebuild()).await {
                tracing::error!(
                    error = %e,
                    "rebuilding the config after a registration failed: the registrations \
                     waiting are answered, and served from the next rebuild"
                );
            }
            let mut batch = self.batch.lock();
            self.covered.send_if_modified(|covered| {
                let newer = ticket > *covered;
                if newer {
                    *covered = ticket;
                }
                newer
            });
            if batch.requested == ticket {
                batch.running = false;
                release.0 = None;
                return;
            }
        }
    }

    /// Applies what can be applied of the files read, persists the config
    /// in force if it changed, translates it and the registrations and
    /// publishes the result, with a new version, if anything a client can
    /// see changed. Returns what the resources in force changed by.
    pub(crate) fn rebuild(&self) -> ConfigChanges {
        let _serialized = self.rebuild_lock.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
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
            let (mut snapshot, diagnostics) = store.snapshot(&registrations);
            self.dns.fill(&mut snapshot);
            let views = store.view_source(&registrations);
            let gateways = store.gateways(&registrations);
            let rejections = store.rejections().to_vec();
            (
                snapshot,
                (diagnostics, views, gateways),
                security,
                changes,
                rejections,
            )
        };
        let (diagnostics, view_source, gateways) = diagnostics;
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
        self.metrics.observe_translation(started.elapsed());
        let current = self.served.borrow().clone();
        // Server listeners are built per client from `security` and the
        // registrations: a change there is a new version even when no
        // shared resource changed.
        if current.version > 0
            && current.resources == resources
            && current.security == security
            && current.registered == registered
            && current.views.source == view_source
            && *current.gateways == gateways
        {
            return changes;
        }
        let version = self.next_version();
        self.metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        let views = Views::new(view_source, &self.diagnostics.lock().1);
        let served = Served {
            version,
            published_at: Some(Instant::now()),
            snapshot,
            resources,
            security,
            registered,
            views,
            gateways: Arc::new(gateways),
        };
        // The views of the clients connected are ready before they are
        // pushed to (a new client's view is translated when it asks).
        if served.views.source.is_some() {
            let workloads: Vec<NodeWorkload> = self
                .clients
                .lock()
                .values()
                .filter(|c| c.node.is_some())
                .map(|c| c.workload.clone())
                .collect();
            let keys: BTreeSet<ViewKey> = workloads
                .iter()
                .filter_map(|w| served.view_key(w))
                .collect();
            for key in &keys {
                served.view(key);
            }
        }
        self.served.send_replace(Arc::new(served));
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

    /// Writes the leases as they are now, unless a write that began after `ticket` was
    /// taken has succeeded already: callers that queued behind one write
    /// share the next (a group commit), so that a storm of registrations
    /// writes the lease file about once per fsync instead of once per
    /// registration, each time whole. Blocking (an fsync): called on a
    /// blocking thread by [`Shared::persist_leases`].
    fn write_leases_covering(&self, ticket: u64) {
        let Some(store) = &self.persistence else {
            return;
        };
        let _one = self.lease_writes.lock().unwrap_or_else(|e| e.into_inner());
        if self.leases_written.load(Ordering::SeqCst) >= ticket {
            return;
        }
        // Read before the registry is: every ticket up to here was taken
        // after its change, which this write therefore holds.
        let covering = self.lease_requested.load(Ordering::SeqCst);
        // Cleared before the registry is read: a renewal after this point
        // marks it again and is written by the next flush.
        self.leases_dirty.store(false, Ordering::SeqCst);
        let leases = self
            .registry
            .lock()
            .export(Instant::now(), SystemTime::now());
        match store.save_leases(&leases) {
            Ok(()) => self.leases_written.store(covering, Ordering::SeqCst),
            Err(e) => {
                self.leases_dirty.store(true, Ordering::SeqCst);
                self.persist_failed("the leases", &e);
            }
        }
    }

    /// Writes the leases on a blocking thread, awaited: a
    /// registration is on disk before it is answered (call it after the
    /// registry changed).
    pub(crate) async fn persist_leases(self: &Arc<Self>) {
        if self.persistence.is_none() {
            return;
        }
        let ticket = self.lease_requested.fetch_add(1, Ordering::SeqCst) + 1;
        let shared = self.clone();
        let _ = tokio::task::spawn_blocking(move || shared.write_leases_covering(ticket)).await;
    }
}

/// Encodes every resource of a snapshot, by type and name.
pub(crate) fn encode_all(snapshot: &mesh_core::Snapshot) -> [BTreeMap<String, Any>; 4] {
    let mut out: [BTreeMap<String, Any>; 4] = Default::default();
    for (name, l) in &snapshot.listeners {
        out[0].insert(name.to_string(), xds::encode_listener(l));
    }
    for (name, rc) in &snapshot.route_configs {
        out[1].insert(name.to_string(), xds::encode_route_config(rc));
    }
    for (name, c) in &snapshot.clusters {
        out[2].insert(name.to_string(), xds::encode_cluster(c));
    }
    for (name, e) in &snapshot.endpoints {
        out[3].insert(name.to_string(), xds::encode_endpoints(e));
    }
    out
}

/// The position of resource type `t` in the per-type arrays: those of
/// [`encode_all`], and an ADS stream's per-type state.
pub(crate) fn type_index(t: ResourceType) -> usize {
    match t {
        ResourceType::Listener => 0,
        ResourceType::RouteConfig => 1,
        ResourceType::Cluster => 2,
        ResourceType::Endpoints => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MeshOptions;

    fn shared(debounce: Duration) -> Arc<Shared> {
        let mut shared = Shared::new(ConfigStore::new(MeshOptions::default()));
        shared.set_registration_debounce(debounce);
        Arc::new(shared)
    }

    /// A published config with `yaml` (no registrations), as the rebuild
    /// publishes it.
    fn published(yaml: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
        let mut store = ConfigStore::new(MeshOptions::default());
        assert!(store.load_dir(dir.path()).is_empty());
        let (snapshot, diagnostics) = store.snapshot(&[]);
        Served {
            version: 1,
            resources: encode_all(&snapshot),
            snapshot,
            views: Views::new(store.view_source(&[]), &diagnostics),
            ..Served::default()
        }
    }

    fn workload(namespace: &str) -> NodeWorkload {
        NodeWorkload {
            id: format!("{namespace}-1"),
            namespace: namespace.into(),
            ..NodeWorkload::default()
        }
    }

    const CATALOG: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}]
";

    /// A view holds only its differences from the shared resources, and is
    /// translated once per key.
    #[test]
    fn a_view_serves_the_shared_resources_but_its_differences() {
        let shared = published(CATALOG);
        assert!(shared.views.source.is_none());
        assert_eq!(shared.view_key(&workload("web")), None, "one shared view");

        let served = published(&CATALOG.replace("  endpoints", "  exportTo: ['.']\n  endpoints"));
        assert_eq!(
            served.resources, shared.resources,
            "the shared translation holds everything"
        );
        let web = served.view_key(&workload("web")).unwrap();
        let view = served.view(&web);
        assert!(Arc::ptr_eq(&view, &served.view(&web)), "cached");
        let lookup = Lookup {
            served: &served,
            view: Some(&view),
        };
        assert!(lookup.get(0, "catalog.shop").is_none());
        assert!(
            lookup
                .hidden("catalog.shop")
                .is_some_and(|why| why.contains("not exported to namespace \"web\""))
        );
        assert!(lookup.all(0).is_empty() && lookup.all(2).is_empty());

        let shop = served.view_key(&workload("shop")).unwrap();
        let view = served.view(&shop);
        assert!(
            view.differs.iter().all(BTreeMap::is_empty),
            "its own namespace sees what everyone would: nothing of its own"
        );
        let lookup = Lookup {
            served: &served,
            view: Some(&view),
        };
        assert_eq!(
            lookup.get(0, "catalog.shop"),
            served.resources[0].get("catalog.shop")
        );
        assert_eq!(lookup.all(0).len(), served.resources[0].len());
        assert_eq!(served.views.cached().len(), 2);
    }

    /// A registration waiting for its rebuild is answered when the server
    /// stops, instead of holding the stop (the admin server drains its
    /// requests) until the debounce has passed.
    #[tokio::test]
    async fn a_stop_releases_a_registration_waiting_for_its_rebuild() {
        let shared = shared(Duration::from_secs(3600));
        // The first of a quiet period is translated at once.
        shared.rebuild_soon().await;
        assert_eq!(shared.metrics.translations.get(), 1);
        assert_eq!(shared.served.borrow().version, 1);
        // The next waits for the debounce: an hour.
        let waiting = tokio::spawn({
            let shared = shared.clone();
            async move { shared.rebuild_soon().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        shared.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("released by the stop")
            .unwrap();
        assert_eq!(shared.metrics.translations.get(), 1);
        // And a call after the stop does not wait either, nor translate.
        tokio::time::timeout(Duration::from_secs(30), shared.rebuild_soon())
            .await
            .expect("not held after the stop");
        assert_eq!(shared.metrics.translations.get(), 1);
    }

    /// Concurrent callers share translations: each returns once one that
    /// began after its call is published, and there are at most one per
    /// debounce (plus the first).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_translations() {
        let debounce = Duration::from_millis(50);
        let shared = shared(debounce);
        let started = Instant::now();
        let callers: Vec<_> = (0..500)
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move { shared.rebuild_soon().await })
            })
            .collect();
        for caller in callers {
            tokio::time::timeout(Duration::from_secs(30), caller)
                .await
                .expect("every caller is answered")
                .unwrap();
        }
        let elapsed = started.elapsed();
        let translations = shared.metrics.translations.get();
        let bound = elapsed.as_millis() / debounce.as_millis() + 2;
        assert!(
            (1..=u64::try_from(bound).unwrap()).contains(&translations),
            "{translations} translations for 500 callers in {elapsed:?}"
        );
        let batch = shared.batch.lock();
        assert!(!batch.running, "the task ends when nothing is pending");
        assert_eq!(*shared.covered.borrow(), batch.requested);
    }
}
