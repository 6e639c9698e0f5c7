//! The control server's shared state: the YAML store, the registry, the
//! snapshot being served and what each connected client has acknowledged.
//!
//! Everything that changes config funnels through [`Shared::rebuild`], which
//! translates, encodes and publishes one new immutable [`Served`] value on a
//! watch channel; ADS streams only read it. Locks here are held briefly and
//! never across an await.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::config::{ConfigStore, Diagnostic, SecurityPolicies};
use crate::metrics::Counters;
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
    /// Problems of the last YAML load and of the last translation.
    pub(crate) diagnostics: Locked<(Vec<Diagnostic>, Vec<Diagnostic>)>,
    /// Raw resources served instead of the translated ones (test hook).
    pub(crate) raw: Locked<Vec<(ResourceType, String, Any)>>,
    /// A client that has not acknowledged a response this long is stale.
    pub(crate) stale_after: std::time::Duration,
    pub(crate) metrics: Counters,
    /// The CA, when security is on: certificates and authenticated
    /// registration.
    pub(crate) ca: Option<Arc<CertificateAuthority>>,
    next_client: AtomicU64,
    rebuild_lock: Mutex<()>,
}

impl Shared {
    pub(crate) fn new(store: ConfigStore) -> Self {
        let (served, _) = watch::channel(Arc::new(Served::default()));
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
            next_client: AtomicU64::new(1),
            rebuild_lock: Mutex::new(()),
        }
    }

    pub(crate) fn next_client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    /// Translates the current resources and registrations and publishes the
    /// result, with a new version, if anything a client can see changed.
    pub(crate) fn rebuild(&self) {
        let _serialized = self.rebuild_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut registered = self.registry.lock().registered();
        let (snapshot, diagnostics, security) = {
            let store = self.store.lock();
            let security = store.security();
            // One label set per workload: the EDS endpoints carry the
            // labels server listeners are resolved with.
            for r in &mut registered {
                r.registration.labels = security.registered_labels(&r.registration);
            }
            let registrations: Vec<_> = registered.iter().map(|r| r.registration.clone()).collect();
            let (snapshot, diagnostics) = store.snapshot(&registrations);
            (snapshot, diagnostics, security)
        };
        let registered: Arc<[Registered]> = registered.into();
        for d in &diagnostics {
            tracing::warn!("{d}");
        }
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
            return;
        }
        self.metrics
            .config_version
            .set((current.version + 1) as i64);
        self.served.send_replace(Arc::new(Served {
            version: current.version + 1,
            published_at: Some(Instant::now()),
            snapshot,
            resources,
            security,
            registered,
        }));
    }
}
