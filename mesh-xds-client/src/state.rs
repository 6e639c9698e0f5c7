//! The ADS state machine, sans-io: subscriptions, versions, nonces, ACK/NACK
//! and the LDS → RDS → CDS → EDS cascade of state-of-the-world aggregated xDS.
//!
//! No tokio and no sockets here: the driver ([`crate::XdsClient`]) feeds events
//! in ([`AdsState::on_connected`], [`AdsState::on_response`],
//! [`AdsState::subscribe`]) and sends the requests they return, so every
//! protocol rule is unit-tested without a runtime (the shape of grpc-rust's
//! `xds-client` worker and junction-core's ADS state).
//!
//! The rules, from the xDS REST and gRPC protocol document
//! (<https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol>) and
//! gRFC A27 / A46:
//! - The first request of a type on a stream carries no nonce; on a new stream
//!   it carries the last accepted `version_info` of that type.
//! - ACK: `version_info` of the accepted response and its nonce. NACK: the last
//!   accepted `version_info`, the rejected nonce, and `error_detail`
//!   (google.rpc.Status INVALID_ARGUMENT naming each bad resource and why).
//! - gRFC A46: a response with some invalid resources is NACKed as a whole, yet
//!   its valid resources are used; an invalid resource keeps its previously
//!   accepted version.
//! - SotW: an LDS or CDS response lists every subscribed resource that exists,
//!   so a subscribed name it lacks does not exist (a listener becomes
//!   "missing" at once; a cluster is removed). RDS and EDS responses may carry
//!   a subset: absence deletes nothing. With the `ignore_resource_deletion`
//!   server feature (gRFC A53) previously received resources are kept.
//! - Server listeners (gRFC A36) are LDS resources too, subscribed by name
//!   like any listener ([`AdsState::subscribe`]) and told apart by their
//!   shape ([`mesh_core::xds::decode_lds`]); they land in
//!   `Snapshot::server_listeners`, a name the server leaves out of an LDS
//!   response is in `Snapshot::missing_listeners` as for client listeners,
//!   and they reference no RDS or CDS resource.
//! - Subscriptions cascade: RDS names are the route configs of the accepted
//!   listeners, CDS the clusters of the accepted route configs, EDS the EDS
//!   service names of the accepted clusters. A change of a set is a new request
//!   of that type; resources no longer subscribed are dropped.
//!
//! A response lacking a name only proves the name does not exist if the server
//! had seen the name when it answered. SotW responses do not say which request
//! they answer, so the subscription sets sent and not yet answered are queued
//! and matched to responses in order (a server answers every change of
//! `resource_names`); a response naming something newer than the queue head
//! answers a later request.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status;
use mesh_core::Snapshot;
use mesh_core::model::{
    Cluster, ClusterLoadAssignment, Listener, Name, RouteConfig, ServerListener,
};
use mesh_core::snapshot::ListenerLookup;
use mesh_core::xds::{self, Any, ResourceType};
use prost::Message;

/// google.rpc.Code INVALID_ARGUMENT, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;
/// `google.rpc.Code.NOT_FOUND`.
const NOT_FOUND: i32 = 5;
/// Bound on remembered unanswered subscription changes per type.
const MAX_UNANSWERED: usize = 32;

const TYPES: [ResourceType; 4] = [
    ResourceType::Listener,
    ResourceType::RouteConfig,
    ResourceType::Cluster,
    ResourceType::Endpoints,
];

fn index(t: ResourceType) -> usize {
    match t {
        ResourceType::Listener => 0,
        ResourceType::RouteConfig => 1,
        ResourceType::Cluster => 2,
        ResourceType::Endpoints => 3,
    }
}

/// What the client knows beyond the snapshot: clusters the server said do
/// not exist, and resources it rejected without an earlier valid version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    missing_clusters: BTreeSet<Name>,
    rejected: [BTreeMap<Name, Arc<str>>; 4],
    /// Why the server says a missing listener or cluster does not exist:
    /// the message of its NOT_FOUND `resource_errors` entry (xDS TP3,
    /// gRFC A88), e.g. which `exportTo` hides it.
    absent_why: [BTreeMap<Name, Arc<str>>; 4],
}

impl SyncStatus {
    /// Whether the last CDS response said this subscribed cluster does not exist.
    pub fn is_cluster_missing(&self, name: &str) -> bool {
        self.missing_clusters.contains(name)
    }

    /// Why the server said the resource does not exist, when it said why
    /// (its `resource_errors` entry's message).
    pub fn absence(&self, kind: ResourceType, name: &str) -> Option<&str> {
        self.absent_why[index(kind)].get(name).map(|s| &**s)
    }

    /// Why the resource was rejected (NACKed), if its last version was.
    pub fn rejection(&self, kind: ResourceType, name: &str) -> Option<&str> {
        self.rejected[index(kind)].get(name).map(|s| &**s)
    }

    /// Every rejected resource: kind, name, reason.
    pub fn rejected(&self) -> impl Iterator<Item = (ResourceType, &str, &str)> {
        TYPES
            .iter()
            .zip(self.rejected.iter())
            .flat_map(|(t, m)| m.iter().map(move |(name, why)| (*t, &**name, &**why)))
    }
}

/// A resource as last accepted, in the form it arrived (kept with
/// [`AdsState::keep_raw`]): what CSDS reports as its `xds_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawResource {
    /// The resource as received.
    pub any: Any,
    /// `version_info` of the latest response that carried it.
    pub version: String,
    /// When its content or version last changed.
    pub updated: SystemTime,
}

/// The accepted resources of an [`AdsState`] in raw form, one response per
/// type that has any ([`AdsState::raw_config`]). It shares the resources
/// the state holds (an `Arc` each), so building one on every change copies
/// no resource; [`RawConfig::encode_length_delimited`] writes the bytes of
/// the [`DiscoveryResponse`]s of [`AdsState::cached_responses`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawConfig {
    types: Vec<RawType>,
}

/// One resource type of a [`RawConfig`].
#[derive(Debug, Clone, PartialEq)]
struct RawType {
    type_url: &'static str,
    version: String,
    resources: Vec<Arc<RawResource>>,
}

/// `DiscoveryResponse` fields, wire type 2 (length-delimited): the keys
/// its derived encoding writes.
const VERSION_INFO_KEY: u8 = 1 << 3 | 2;
const RESOURCES_KEY: u8 = 2 << 3 | 2;
const TYPE_URL_KEY: u8 = 4 << 3 | 2;

/// The size of a length-delimited field of `len` bytes with a one-byte key.
fn field_len(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

fn put_field(key: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(key);
    // Writing to a `Vec` cannot run out of room.
    let _ = prost::encode_length_delimiter(bytes.len(), out);
    out.extend_from_slice(bytes);
}

impl RawType {
    /// The size of its `DiscoveryResponse { version_info, resources, type_url }`.
    fn body_len(&self) -> usize {
        let version = if self.version.is_empty() {
            0
        } else {
            field_len(self.version.len())
        };
        let resources: usize = self
            .resources
            .iter()
            .map(|r| field_len(r.any.encoded_len()))
            .sum();
        version + resources + field_len(self.type_url.len())
    }
}

impl RawConfig {
    /// Whether it holds no resource.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// The number of bytes [`RawConfig::encode_length_delimited`] writes.
    pub fn encoded_len(&self) -> usize {
        self.types
            .iter()
            .map(|t| {
                let body = t.body_len();
                prost::length_delimiter_len(body) + body
            })
            .sum()
    }

    /// Appends each type's response, length-delimited: the bytes of
    /// `encode_length_delimited` of each of [`AdsState::cached_responses`]
    /// (fields in tag order, empty strings left out, as prost writes them).
    pub fn encode_length_delimited(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        for t in &self.types {
            let _ = prost::encode_length_delimiter(t.body_len(), out);
            if !t.version.is_empty() {
                put_field(VERSION_INFO_KEY, t.version.as_bytes(), out);
            }
            for r in &t.resources {
                out.push(RESOURCES_KEY);
                let _ = r.any.encode_length_delimited(out);
            }
            put_field(TYPE_URL_KEY, t.type_url.as_bytes(), out);
        }
    }
}

/// A rejected update (NACK): of one resource, or of a whole response.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// `version_info` of the rejected response.
    pub version: String,
    /// Why it was rejected (what the NACK's `error_detail` said about it).
    pub details: String,
    /// When it was rejected.
    pub at: SystemTime,
    /// The rejected resource as received, when it could be named.
    pub failed: Option<Any>,
}

/// A resource's status on the client, as CSDS reports it (gRFC A40,
/// `envoy.admin.v3.ClientResourceStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceStatus {
    /// Subscribed; the server has not sent it (yet).
    Requested,
    /// The server said it does not exist (left out of an LDS or CDS response).
    DoesNotExist,
    /// Accepted.
    Acked,
    /// Its last update was rejected; a previously accepted version may still be in use.
    Nacked,
}

impl ResourceStatus {
    /// The CSDS spelling: `REQUESTED`, `DOES_NOT_EXIST`, `ACKED`, `NACKED`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceStatus::Requested => "REQUESTED",
            ResourceStatus::DoesNotExist => "DOES_NOT_EXIST",
            ResourceStatus::Acked => "ACKED",
            ResourceStatus::Nacked => "NACKED",
        }
    }
}

/// One resource the client holds, waits for, or was told does not exist.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceEntry {
    /// Its type.
    pub kind: ResourceType,
    /// Its xDS resource name.
    pub name: Name,
    /// ACK/NACK/requested/does not exist.
    pub status: ResourceStatus,
    /// The accepted version in raw form (`None` without
    /// [`AdsState::keep_raw`], or when nothing valid was received).
    pub accepted: Option<Arc<RawResource>>,
    /// The rejection of its latest update, when [`ResourceStatus::Nacked`].
    pub rejection: Option<Arc<Rejection>>,
}

/// Every resource a client holds or waits for, with each type's accepted
/// version and last NACK: what CSDS and the config dump report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceReport {
    entries: Vec<ResourceEntry>,
    versions: [String; 4],
    type_rejections: [Option<Arc<Rejection>>; 4],
}

impl ResourceReport {
    /// Every resource, by type (LDS, RDS, CDS, EDS) then name.
    pub fn entries(&self) -> &[ResourceEntry] {
        &self.entries
    }

    /// The resource of a type and name, if subscribed or held.
    pub fn get(&self, kind: ResourceType, name: &str) -> Option<&ResourceEntry> {
        // Entries are sorted: types in cascade order (`ResourceType`'s
        // `Ord`), names in order within a type.
        self.entries
            .binary_search_by(|e| (e.kind, &*e.name).cmp(&(kind, name)))
            .ok()
            .and_then(|i| self.entries.get(i))
    }

    /// The last accepted `version_info` of a type (empty before any).
    pub fn version(&self, kind: ResourceType) -> &str {
        &self.versions[index(kind)]
    }

    /// The last NACK of a type, if no response of it was accepted since:
    /// the whole message, including errors no resource could be named for.
    pub fn type_rejection(&self, kind: ResourceType) -> Option<&Rejection> {
        self.type_rejections[index(kind)].as_deref()
    }
}

/// Whether a listener and everything it needs to route have arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The listener, its route config, and every cluster it names (with its
    /// endpoints) are present; clusters the server said do not exist or
    /// rejected count as settled.
    Ready,
    /// The control server said the listener does not exist, and why when
    /// it said (its `resource_errors` message).
    Missing(Option<String>),
    /// The listener or its route config was rejected and no valid version exists.
    Rejected(String),
    /// Still waiting for the server.
    Pending,
}

/// The readiness of listener `name` in a published snapshot and status.
/// A server listener (gRFC A36) needs nothing else: it is ready once held.
pub fn readiness(snapshot: &Snapshot, status: &SyncStatus, name: &str) -> Readiness {
    if snapshot.server_listeners.contains_key(name) {
        return Readiness::Ready;
    }
    let listener = match snapshot.listener_for(name) {
        ListenerLookup::Missing => {
            return Readiness::Missing(
                status
                    .absence(ResourceType::Listener, name)
                    .map(str::to_owned),
            );
        }
        ListenerLookup::Unknown => {
            return match status.rejection(ResourceType::Listener, name) {
                Some(why) => Readiness::Rejected(why.to_owned()),
                None => Readiness::Pending,
            };
        }
        ListenerLookup::Found(l) => l,
    };
    let Some(rc) = snapshot.route_configs.get(&*listener.route_config_name) else {
        return match status.rejection(ResourceType::RouteConfig, &listener.route_config_name) {
            Some(why) => Readiness::Rejected(why.to_owned()),
            None => Readiness::Pending,
        };
    };
    let clusters = rc
        .virtual_hosts
        .iter()
        .flat_map(|vh| vh.routes.iter())
        .flat_map(|r| r.action.clusters().iter());
    for wc in clusters {
        match snapshot.clusters.get(&*wc.name) {
            Some(c) => {
                if !snapshot.endpoints.contains_key(&*c.eds_service_name)
                    && status
                        .rejection(ResourceType::Endpoints, &c.eds_service_name)
                        .is_none()
                {
                    return Readiness::Pending;
                }
            }
            None => {
                if !status.is_cluster_missing(&wc.name)
                    && status.rejection(ResourceType::Cluster, &wc.name).is_none()
                {
                    return Readiness::Pending;
                }
            }
        }
    }
    Readiness::Ready
}

/// Per-type protocol state.
#[derive(Debug, Default)]
struct TypeState {
    /// Names subscribed now.
    subscribed: BTreeSet<Name>,
    /// Last accepted `version_info` (kept across streams).
    version: String,
    /// Nonce of the latest response on this stream.
    nonce: String,
    /// Names of the last request sent on this stream; `None` before the first.
    sent: Option<BTreeSet<Name>>,
    /// Subscription sets sent on this stream and not yet answered, oldest first.
    unanswered: VecDeque<BTreeSet<Name>>,
}

enum Decoded {
    Listener(Listener),
    ServerListener(ServerListener),
    RouteConfig(RouteConfig),
    // Boxed: a cluster is several times the size of the other variants.
    Cluster(Box<Cluster>),
    Endpoints(ClusterLoadAssignment),
}

fn decode(kind: ResourceType, any: &Any) -> Result<(Name, Decoded), mesh_core::Error> {
    Ok(match kind {
        ResourceType::Listener => match xds::decode_lds(any)? {
            xds::LdsResource::Client(l) => (l.name.clone(), Decoded::Listener(l)),
            xds::LdsResource::Server(l) => (l.name.clone(), Decoded::ServerListener(l)),
        },
        ResourceType::RouteConfig => {
            let r = xds::decode_route_config(any)?;
            (r.name.clone(), Decoded::RouteConfig(r))
        }
        ResourceType::Cluster => {
            let c = xds::decode_cluster(any)?;
            (c.name.clone(), Decoded::Cluster(Box::new(c)))
        }
        ResourceType::Endpoints => {
            let e = xds::decode_endpoints(any)?;
            (e.cluster_name.clone(), Decoded::Endpoints(e))
        }
    })
}

/// Inserts `value` under `name` unless an equal value is there; true if it changed.
fn upsert<T: PartialEq>(map: &mut BTreeMap<Name, Arc<T>>, name: Name, value: T) -> bool {
    match map.get(&name) {
        Some(old) if **old == value => false,
        _ => {
            map.insert(name, Arc::new(value));
            true
        }
    }
}

/// The ADS client state machine for one node.
#[derive(Debug)]
pub struct AdsState {
    node: Node,
    send_node: bool,
    connected: bool,
    ignore_resource_deletion: bool,
    keep_raw: bool,
    received: bool,
    types: [TypeState; 4],
    snapshot: Snapshot,
    status: SyncStatus,
    raw: [BTreeMap<Name, Arc<RawResource>>; 4],
    /// Why each rejected resource was rejected (parallel to `status.rejected`).
    rejections: [BTreeMap<Name, Arc<Rejection>>; 4],
    /// The last NACK of each type, until a response of it is accepted.
    type_rejections: [Option<Arc<Rejection>>; 4],
    changed: bool,
    pending: Vec<DiscoveryRequest>,
}

impl AdsState {
    /// A state machine for `node` (sent in the first request of each stream),
    /// with nothing subscribed and no stream.
    pub fn new(node: Node) -> Self {
        AdsState {
            node,
            send_node: true,
            connected: false,
            ignore_resource_deletion: false,
            keep_raw: false,
            received: false,
            types: Default::default(),
            snapshot: Snapshot::default(),
            status: SyncStatus::default(),
            raw: Default::default(),
            rejections: Default::default(),
            type_rejections: Default::default(),
            changed: false,
            pending: Vec::new(),
        }
    }

    /// Keeps previously received listeners and clusters that a response
    /// lacks (the `ignore_resource_deletion` server feature, gRFC A53).
    pub fn ignore_resource_deletion(mut self, ignore: bool) -> Self {
        self.ignore_resource_deletion = ignore;
        self
    }

    /// Keeps the raw accepted resources, for [`AdsState::cached_responses`]
    /// and the `xds_config` of [`AdsState::resource_report`] (CSDS). Only
    /// what is held is kept: one copy of each accepted resource.
    pub fn keep_raw(mut self, keep: bool) -> Self {
        self.keep_raw = keep;
        self
    }

    /// Subscribes to a listener name. Returns whether it is new; when a stream
    /// is up, the LDS request with the new name is queued for
    /// [`AdsState::pending_requests`].
    pub fn subscribe(&mut self, listener_name: &str) -> bool {
        let i = index(ResourceType::Listener);
        if self.types[i].subscribed.contains(listener_name) {
            return false;
        }
        self.types[i].subscribed.insert(Name::from(listener_name));
        if self.connected {
            let req = self.request(i, None);
            self.pending.push(req);
        }
        true
    }

    /// The listener names subscribed.
    pub fn listener_names(&self) -> &BTreeSet<Name> {
        &self.types[index(ResourceType::Listener)].subscribed
    }

    /// The names subscribed for a type.
    pub fn subscription(&self, kind: ResourceType) -> &BTreeSet<Name> {
        &self.types[index(kind)].subscribed
    }

    /// The last accepted `version_info` of a type.
    pub fn version(&self, kind: ResourceType) -> &str {
        &self.types[index(kind)].version
    }

    /// A new stream is up: the initial request of every type with a non-empty
    /// subscription (no nonce, the last accepted version), LDS first.
    pub fn on_connected(&mut self) -> Vec<DiscoveryRequest> {
        self.connected = true;
        self.send_node = true;
        self.pending.clear();
        let mut out = Vec::new();
        for i in 0..TYPES.len() {
            let ts = &mut self.types[i];
            ts.nonce.clear();
            ts.sent = None;
            ts.unanswered.clear();
            if !ts.subscribed.is_empty() {
                out.push(self.request(i, None));
            }
        }
        out
    }

    /// The stream ended: nothing is sent until [`AdsState::on_connected`].
    /// Accepted resources stay (they are the best config there is).
    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.pending.clear();
    }

    /// Requests queued by [`AdsState::subscribe`] since the last call.
    pub fn pending_requests(&mut self) -> Vec<DiscoveryRequest> {
        std::mem::take(&mut self.pending)
    }

    /// Whether any response was received (on any stream).
    pub fn has_received(&self) -> bool {
        self.received
    }

    /// Handles a response: the ACK or NACK of it, then a request for every
    /// type whose subscription changed as a result.
    pub fn on_response(&mut self, resp: DiscoveryResponse) -> Vec<DiscoveryRequest> {
        self.on_response_at(resp, SystemTime::now())
    }

    /// [`AdsState::on_response`] received at `now` (the time CSDS reports
    /// as `last_updated` and a rejection's `last_update_attempt`).
    pub fn on_response_at(
        &mut self,
        mut resp: DiscoveryResponse,
        now: SystemTime,
    ) -> Vec<DiscoveryRequest> {
        let Some(kind) = ResourceType::from_type_url(&resp.type_url) else {
            tracing::warn!(type_url = %resp.type_url, "ignoring a response of a type never asked for");
            return Vec::new();
        };
        let i = index(kind);
        if self.types[i].sent.is_none() {
            tracing::warn!(type_url = %resp.type_url, "ignoring a response to no request on this stream");
            return Vec::new();
        }
        self.received = true;
        self.types[i].nonce = resp.nonce.clone();
        let short = kind.short_name();
        // NOT_FOUND entries (xDS TP3, gRFC A88): the server says these do
        // not exist, and why. Other codes are not acted on.
        let told_absent: BTreeMap<Name, Arc<str>> = std::mem::take(&mut resp.resource_errors)
            .into_iter()
            .filter_map(|e| {
                let status = e.error_detail?;
                let name = e.resource_name?.name;
                (status.code == NOT_FOUND && self.types[i].subscribed.contains(name.as_str()))
                    .then(|| (Name::from(name), Arc::from(status.message)))
            })
            .collect();

        let mut errors: Vec<String> = Vec::new();
        // `None`: the resource is the one held, byte for byte (see `held_name`).
        let mut valid: Vec<(Name, Option<Decoded>, Any)> = Vec::new();
        let mut invalid: Vec<(Name, String, Any)> = Vec::new();
        let mut seen: BTreeSet<Name> = BTreeSet::new();
        let mut unnamed = false;
        for (pos, any) in resp.resources.into_iter().enumerate() {
            if any.type_url != resp.type_url {
                unnamed = true;
                errors.push(format!(
                    "{short} resources[{pos}]: type {:?} in a response of type {:?}",
                    any.type_url, resp.type_url
                ));
                continue;
            }
            let decoded = match self.held_name(i, &any) {
                Some(name) => Ok((name, None)),
                None => decode(kind, &any).map(|(name, res)| (name, Some(res))),
            };
            match decoded {
                Ok((name, res)) => {
                    if !seen.insert(name.clone()) {
                        errors.push(format!("{short} resource {name:?}: listed twice"));
                        continue;
                    }
                    valid.push((name, res, any));
                }
                Err(e) => match xds::resource_name(&any) {
                    Some(name) => {
                        let name = Name::from(name);
                        let why = format!("{short} resource {name:?}: {e}");
                        errors.push(why.clone());
                        seen.insert(name.clone());
                        invalid.push((name, why, any));
                    }
                    None => {
                        unnamed = true;
                        errors.push(format!("{short} resources[{pos}]: {e}"));
                    }
                },
            }
        }

        let known = self.answered_names(i, &seen);
        for (name, res, any) in valid {
            if !self.types[i].subscribed.contains(&name) {
                continue;
            }
            self.store(i, name, res, Some((any, &resp.version_info, now)));
        }
        for (name, why, any) in invalid {
            if self.types[i].subscribed.contains(&name) {
                self.rejections[i].insert(
                    name.clone(),
                    Arc::new(Rejection {
                        version: resp.version_info.clone(),
                        details: why.clone(),
                        at: now,
                        failed: Some(any),
                    }),
                );
                self.status.rejected[i].insert(name, why.into());
                self.changed = true;
            }
        }
        // SotW: a subscribed LDS/CDS name the server knew of and left out does
        // not exist. With an unnamed bad resource, absence proves nothing,
        // unless the server said so in a `resource_errors` entry.
        if matches!(kind, ResourceType::Listener | ResourceType::Cluster) {
            let absent: Vec<Name> = self.types[i]
                .subscribed
                .iter()
                .filter(|n| {
                    !seen.contains(*n)
                        && ((known.contains(*n) && !unnamed) || told_absent.contains_key(*n))
                })
                .cloned()
                .collect();
            for name in absent {
                let why = told_absent.get(&name).cloned();
                self.on_absent(kind, name, why);
            }
        }

        let error_detail = if errors.is_empty() {
            if self.types[i].version != resp.version_info {
                self.set_version(kind, &resp.version_info);
            }
            if self.type_rejections[i].take().is_some() {
                self.changed = true;
            }
            None
        } else {
            tracing::warn!(
                type_url = %resp.type_url,
                nonce = %resp.nonce,
                "NACK: {}",
                errors.join("; ")
            );
            let message = format!(
                "{} rejected (version {:?}): {}",
                short,
                resp.version_info,
                errors.join("; ")
            );
            self.type_rejections[i] = Some(Arc::new(Rejection {
                version: resp.version_info.clone(),
                details: message.clone(),
                at: now,
                failed: None,
            }));
            self.changed = true;
            Some(Status {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            })
        };
        let mut out = vec![self.request(i, error_detail)];
        self.cascade(&mut out);
        out
    }

    /// The name of `any` when it is, byte for byte, the accepted version of
    /// a resource held (with [`AdsState::keep_raw`]): decoding it again
    /// would give the model held. A state-of-the-world server resends every
    /// resource of a type when one changes (all 1,000 endpoints of ten
    /// services for one new endpoint), so most of a response is skipped
    /// this way: no decoding, no copy of the model to compare and drop.
    fn held_name(&self, i: usize, any: &Any) -> Option<Name> {
        if !self.keep_raw || self.raw[i].is_empty() {
            return None;
        }
        // Held resources are keyed by their decoded name, which is field 1
        // of each of the four messages: a hit is the same resource.
        let (name, held) = self.raw[i].get_key_value(xds::resource_name(any)?.as_str())?;
        (held.any == *any).then(|| name.clone())
    }

    /// The names the server had seen when it sent this response.
    fn answered_names(&mut self, i: usize, seen: &BTreeSet<Name>) -> BTreeSet<Name> {
        let ts = &mut self.types[i];
        let Some(mut known) = ts.unanswered.pop_front() else {
            return ts.sent.clone().unwrap_or_default();
        };
        // A response naming a subscribed name the oldest request lacked
        // answers a later request.
        while seen
            .iter()
            .any(|n| !known.contains(n) && ts.subscribed.contains(n))
        {
            match ts.unanswered.pop_front() {
                Some(next) => known = next,
                None => {
                    known = ts.sent.clone().unwrap_or_default();
                    break;
                }
            }
        }
        known
    }

    fn set_version(&mut self, kind: ResourceType, version: &str) {
        self.types[index(kind)].version = version.to_owned();
        let v = Name::from(version);
        let versions = &mut self.snapshot.versions;
        match kind {
            ResourceType::Listener => versions.listeners = v,
            ResourceType::RouteConfig => versions.route_configs = v,
            ResourceType::Cluster => versions.clusters = v,
            ResourceType::Endpoints => versions.endpoints = v,
        }
        self.changed = true;
    }

    /// Stores an accepted resource; `raw` is its received form, the
    /// response's version and the time it arrived. `res` is `None` for the
    /// resource held, received again unchanged (`held_name`).
    fn store(
        &mut self,
        i: usize,
        name: Name,
        res: Option<Decoded>,
        raw: Option<(Any, &str, SystemTime)>,
    ) {
        let changed = match res {
            // The model is held: only what its arrival clears.
            None => match TYPES[i] {
                ResourceType::Listener => self.snapshot.missing_listeners.remove(&name),
                ResourceType::Cluster => self.status.missing_clusters.remove(&name),
                ResourceType::RouteConfig | ResourceType::Endpoints => false,
            },
            Some(Decoded::Listener(l)) => {
                let gone = self.snapshot.missing_listeners.remove(&name);
                let other = self.snapshot.server_listeners.remove(&name).is_some();
                upsert(&mut self.snapshot.listeners, name.clone(), l) || gone || other
            }
            Some(Decoded::ServerListener(l)) => {
                let gone = self.snapshot.missing_listeners.remove(&name);
                let other = self.snapshot.listeners.remove(&name).is_some();
                upsert(&mut self.snapshot.server_listeners, name.clone(), l) || gone || other
            }
            Some(Decoded::RouteConfig(r)) => {
                upsert(&mut self.snapshot.route_configs, name.clone(), r)
            }
            Some(Decoded::Cluster(c)) => {
                let gone = self.status.missing_clusters.remove(&name);
                upsert(&mut self.snapshot.clusters, name.clone(), *c) || gone
            }
            Some(Decoded::Endpoints(e)) => upsert(&mut self.snapshot.endpoints, name.clone(), e),
        };
        let unrejected = self.status.rejected[i].remove(&name).is_some();
        self.status.absent_why[i].remove(&name);
        self.rejections[i].remove(&name);
        if self.keep_raw
            && let Some((any, version, now)) = raw
        {
            let same = self.raw[i]
                .get(&name)
                .is_some_and(|r| r.any == any && r.version == version);
            if !same {
                self.raw[i].insert(
                    name,
                    Arc::new(RawResource {
                        any,
                        version: version.to_owned(),
                        updated: now,
                    }),
                );
                self.changed = true;
            }
        }
        self.changed |= changed || unrejected;
    }

    fn on_absent(&mut self, kind: ResourceType, name: Name, why: Option<Arc<str>>) {
        let i = index(kind);
        let present = match kind {
            ResourceType::Listener => {
                self.snapshot.listeners.contains_key(&name)
                    || self.snapshot.server_listeners.contains_key(&name)
            }
            _ => self.snapshot.clusters.contains_key(&name),
        };
        if present && self.ignore_resource_deletion {
            tracing::warn!(
                resource = %name,
                "{} resource left out of a response; kept (ignore_resource_deletion)",
                kind.short_name()
            );
            return;
        }
        self.raw[i].remove(&name);
        self.rejections[i].remove(&name);
        self.status.rejected[i].remove(&name);
        let why_changed = match why {
            Some(why) => self.status.absent_why[i].insert(name.clone(), why.clone()) != Some(why),
            None => self.status.absent_why[i].remove(&name).is_some(),
        };
        self.changed |= why_changed;
        let newly_missing = match kind {
            ResourceType::Listener => {
                self.snapshot.listeners.remove(&name);
                self.snapshot.server_listeners.remove(&name);
                self.snapshot.missing_listeners.insert(name)
            }
            _ => {
                self.snapshot.clusters.remove(&name);
                self.status.missing_clusters.insert(name)
            }
        };
        self.changed |= newly_missing || present;
    }

    /// Recomputes the RDS, CDS and EDS subscriptions from what is accepted,
    /// drops what is no longer subscribed, and queues a request for each
    /// changed set.
    fn cascade(&mut self, out: &mut Vec<DiscoveryRequest>) {
        let rds = self.snapshot.referenced_route_configs();
        self.set_subscription(ResourceType::RouteConfig, rds, out);
        let cds = self.snapshot.referenced_clusters();
        self.set_subscription(ResourceType::Cluster, cds, out);
        let eds = self.snapshot.referenced_endpoints();
        self.set_subscription(ResourceType::Endpoints, eds, out);
    }

    fn set_subscription(
        &mut self,
        kind: ResourceType,
        names: BTreeSet<Name>,
        out: &mut Vec<DiscoveryRequest>,
    ) {
        let i = index(kind);
        if self.types[i].subscribed == names {
            return;
        }
        match kind {
            ResourceType::RouteConfig => {
                let n = self.snapshot.route_configs.len();
                self.snapshot.route_configs.retain(|k, _| names.contains(k));
                self.changed |= n != self.snapshot.route_configs.len();
            }
            ResourceType::Cluster => {
                let n = self.snapshot.clusters.len() + self.status.missing_clusters.len();
                self.snapshot.clusters.retain(|k, _| names.contains(k));
                self.status.missing_clusters.retain(|k| names.contains(k));
                self.changed |=
                    n != self.snapshot.clusters.len() + self.status.missing_clusters.len();
            }
            ResourceType::Endpoints => {
                let n = self.snapshot.endpoints.len();
                self.snapshot.endpoints.retain(|k, _| names.contains(k));
                self.changed |= n != self.snapshot.endpoints.len();
            }
            ResourceType::Listener => {}
        }
        self.status.absent_why[i].retain(|k, _| names.contains(k));
        let n = self.status.rejected[i].len();
        self.status.rejected[i].retain(|k, _| names.contains(k));
        self.changed |= n != self.status.rejected[i].len();
        self.raw[i].retain(|k, _| names.contains(k));
        self.rejections[i].retain(|k, _| names.contains(k));
        self.types[i].subscribed = names;
        // An empty LDS/CDS list would read as a wildcard: only say "nothing"
        // to a server that was told names on this stream.
        if self.connected && (!self.types[i].subscribed.is_empty() || self.types[i].sent.is_some())
        {
            out.push(self.request(i, None));
        }
    }

    fn request(&mut self, i: usize, error_detail: Option<Status>) -> DiscoveryRequest {
        let node = if self.send_node {
            self.send_node = false;
            Some(self.node.clone())
        } else {
            None
        };
        let ts = &mut self.types[i];
        if ts.sent.as_ref() != Some(&ts.subscribed) {
            if ts.unanswered.len() >= MAX_UNANSWERED {
                ts.unanswered.pop_front();
            }
            ts.unanswered.push_back(ts.subscribed.clone());
            ts.sent = Some(ts.subscribed.clone());
        }
        DiscoveryRequest {
            version_info: ts.version.clone(),
            node,
            resource_names: ts.subscribed.iter().map(|n| n.to_string()).collect(),
            type_url: TYPES[i].type_url().to_owned(),
            response_nonce: ts.nonce.clone(),
            error_detail,
            ..DiscoveryRequest::default()
        }
    }

    /// The accepted resources as a snapshot (versions included).
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Missing clusters and rejected resources.
    pub fn status(&self) -> &SyncStatus {
        &self.status
    }

    /// The snapshot and status to publish, if anything changed since the last call.
    pub fn take_changes(&mut self) -> Option<(Arc<Snapshot>, Arc<SyncStatus>)> {
        if !self.changed {
            return None;
        }
        self.changed = false;
        Some((
            Arc::new(self.snapshot.clone()),
            Arc::new(self.status.clone()),
        ))
    }

    /// Every resource subscribed or held, with its status, raw form and
    /// rejection, and each type's version and last NACK (gRFC A40's CSDS
    /// view). Missing listeners and clusters are `DOES_NOT_EXIST`; an RDS or
    /// EDS name the server has not sent stays `REQUESTED` (SotW cannot tell).
    pub fn resource_report(&self) -> ResourceReport {
        let mut entries = Vec::new();
        for (i, kind) in TYPES.iter().enumerate() {
            let mut names: BTreeSet<&Name> = self.types[i].subscribed.iter().collect();
            names.extend(self.raw[i].keys());
            names.extend(self.rejections[i].keys());
            let held: Vec<&Name> = match kind {
                ResourceType::Listener => {
                    let mut both: Vec<&Name> = self
                        .snapshot
                        .listeners
                        .keys()
                        .chain(self.snapshot.server_listeners.keys())
                        .collect();
                    both.sort_unstable();
                    both
                }
                ResourceType::RouteConfig => self.snapshot.route_configs.keys().collect(),
                ResourceType::Cluster => self.snapshot.clusters.keys().collect(),
                ResourceType::Endpoints => self.snapshot.endpoints.keys().collect(),
            };
            names.extend(held.iter().copied());
            for name in names {
                let rejection = self.rejections[i].get(name).cloned();
                let missing = match kind {
                    ResourceType::Listener => self.snapshot.missing_listeners.contains(name),
                    ResourceType::Cluster => self.status.missing_clusters.contains(name),
                    _ => false,
                };
                let status = if rejection.is_some() {
                    ResourceStatus::Nacked
                } else if held.binary_search(&name).is_ok() {
                    ResourceStatus::Acked
                } else if missing {
                    ResourceStatus::DoesNotExist
                } else {
                    ResourceStatus::Requested
                };
                entries.push(ResourceEntry {
                    kind: *kind,
                    name: name.clone(),
                    status,
                    accepted: self.raw[i].get(name).cloned(),
                    rejection,
                });
            }
        }
        ResourceReport {
            entries,
            versions: std::array::from_fn(|i| self.types[i].version.clone()),
            type_rejections: self.type_rejections.clone(),
        }
    }

    /// The accepted resources in raw form, one response per type that has any
    /// (needs [`AdsState::keep_raw`]): what the static-stability cache stores.
    pub fn cached_responses(&self) -> Vec<DiscoveryResponse> {
        TYPES
            .iter()
            .zip(self.raw.iter())
            .zip(self.types.iter())
            .filter(|((_, raw), _)| !raw.is_empty())
            .map(|((t, raw), ts)| DiscoveryResponse {
                version_info: ts.version.clone(),
                type_url: t.type_url().to_owned(),
                resources: raw.values().map(|r| r.any.clone()).collect(),
                ..DiscoveryResponse::default()
            })
            .collect()
    }

    /// The accepted resources in raw form, sharing the copies this state
    /// holds (needs [`AdsState::keep_raw`]): what the static-stability cache
    /// writes, encoded as [`AdsState::cached_responses`] would be without
    /// copying a resource.
    pub fn raw_config(&self) -> RawConfig {
        RawConfig {
            types: TYPES
                .iter()
                .zip(self.raw.iter())
                .zip(self.types.iter())
                .filter(|((_, raw), _)| !raw.is_empty())
                .map(|((t, raw), ts)| RawType {
                    type_url: t.type_url(),
                    version: ts.version.clone(),
                    resources: raw.values().cloned().collect(),
                })
                .collect(),
        }
    }

    /// Loads resources saved by [`AdsState::cached_responses`] (static
    /// stability: the last good config when no control server answers).
    /// Cached listeners are subscribed; versions are not taken over, so the
    /// server sends everything once it answers. Invalid entries are skipped.
    pub fn load_cached(&mut self, responses: Vec<DiscoveryResponse>) -> usize {
        let now = SystemTime::now();
        let mut by_type: [Vec<(Any, String)>; 4] = Default::default();
        for r in responses {
            if let Some(t) = ResourceType::from_type_url(&r.type_url) {
                let version = r.version_info;
                by_type[index(t)].extend(r.resources.into_iter().map(|a| (a, version.clone())));
            }
        }
        let mut loaded = 0;
        let mut out = Vec::new();
        for (i, resources) in by_type.into_iter().enumerate() {
            let kind = TYPES[i];
            for (any, version) in resources {
                let Ok((name, res)) = decode(kind, &any) else {
                    continue;
                };
                if kind == ResourceType::Listener {
                    self.subscribe(&name);
                } else if !self.types[i].subscribed.contains(&name) {
                    continue;
                }
                self.store(i, name, Some(res), Some((any, &version, now)));
                loaded += 1;
            }
            self.cascade(&mut out);
        }
        self.pending.extend(out);
        loaded
    }
}

#[cfg(test)]
mod tests;
