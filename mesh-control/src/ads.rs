//! The aggregated discovery service: state-of-the-world ADS over gRPC.
//!
//! One task per stream. It answers every subscription (so a client learns at
//! once that a name does not exist: a SotW LDS or CDS response without the
//! name means exactly that), pushes a type again only when what this client
//! subscribed to changed, and records each ACK and NACK per type for
//! `/status` (a CSDS-like view). Short names (`catalog`, `catalog:80`) are
//! resolved relative to the client's namespace, read from
//! `node.metadata.NAMESPACE`, as Istio resolves them relative to the
//! workload's namespace; the listener is served under the name asked for,
//! because gRPC clients require the resource name to equal the target.
//!
//! Servers ask LDS for their own inbound listener by the name their
//! bootstrap's `server_listener_resource_name_template` makes of the
//! address they listen on (`grpc/server?xds.resource.listening_address=
//! 10.0.0.5:8080`, gRFC A36). Such a name is answered with a server
//! listener resolved for the client's workload — its namespace
//! (`node.metadata.NAMESPACE`) and its one label set select its
//! PeerAuthentication mode and AuthorizationPolicies: the labels of its
//! registration at that address, the ones its EDS endpoint carries for
//! subsets, or else its node's `LABELS` (see [`workload_labels`]) — in the
//! same SotW LDS response as the client listeners it subscribed to. A change
//! of those policies, or of the registrations, is a new version.
//!
//! Per-node views (`exportTo`, `match.sourceLabels`, `match.sourceNamespace`,
//! see `config`): each response is taken from the client's view, found for
//! each config from its namespace and labels
//! ([`caller_labels`](crate::state::labels::caller_labels)), so every
//! client kind — this mesh's, gRPC proxyless, Envoy — is sent the routes and
//! resources of its view only, filtered by the server before encoding:
//! nothing of these fields is left for a client to ignore. A name its view
//! hides (a ServiceEntry not exported to its namespace) gets a NOT_FOUND
//! `resource_errors` entry saying which resource hides it and where. A
//! config without these fields has one shared view, served as before.
//!
//! When the control server stops, every stream ends with `UNAVAILABLE`
//! ("shutting down") after the GOAWAY of its connection: a status the client
//! reads, not a reset, so that it reconnects at once (to another replica, or
//! to this one restarted) instead of waiting out a keepalive.
//!
//! With a CA ([`crate::ServerBuilder::ca`]) every stream is authenticated
//! before it is served ([`authenticate`]): a client certificate the mesh CA
//! issued (gRFC A65 `certificate_file` / `private_key_file` in the
//! bootstrap's `tls` channel credentials), or a join token as
//! `authorization: Bearer <token>` metadata (what an Envoy puts in its
//! `initial_metadata`, and what mesh-xds-client sends for a `mesh_ca`
//! bootstrap). Anything else is refused with `UNAUTHENTICATED`. The
//! node's namespace and service account then come from that identity:
//! `node.metadata.NAMESPACE` / `SERVICE_ACCOUNT`, when given, must agree
//! with it (else `PERMISSION_DENIED` naming both), so a workload cannot
//! claim another namespace to read that namespace's server listeners and
//! their RBAC. Both refusals are logged at WARN with the peer's address.
//!
//! Limits: a subscription of more than
//! [`crate::ServerBuilder::ads_max_names_per_subscription`] names (10,000
//! by default) ends the stream with `RESOURCE_EXHAUSTED` saying so, before
//! anything is built from it; streams per connection and reset floods are
//! bounded by the HTTP/2 settings in `server.rs`.
//!
//! References: the xDS REST and gRPC protocol (ACK/NACK, nonces, SotW
//! semantics), gRFC A27 (xDS-based global load balancing).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    ResourceError, ResourceName,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures_util::{Stream, StreamExt};
use mesh_core::model::{Listener, ServerListener};
use mesh_core::spiffe::SpiffeId;
use mesh_core::xds::Any;
use mesh_core::xds::{self, ResourceType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::TokenRefusal;
use crate::ca::serving::PeerInfo;
use crate::config::Workload;
use crate::state::labels::workload_labels;
use crate::state::{
    ClientStatus, DeletedKept, Lookup, NackInfo, NodeWorkload, Served, Shared, TypeStatus, View,
    type_index,
};

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub(crate) struct Ads {
    pub(crate) shared: Arc<Shared>,
    /// The most names one subscription (one type of one stream) may hold.
    pub(crate) max_names: usize,
}

/// The default of [`crate::ServerBuilder::ads_max_names_per_subscription`]:
/// far more than a workload asks for (Istio's largest meshes have a few
/// thousand services), far less than what would let one request make the
/// server build and hold megabytes per stream.
pub(crate) const DEFAULT_MAX_NAMES_PER_SUBSCRIPTION: usize = 10_000;

/// Who opened a gRPC call to ADS or CSDS, with a CA.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// No CA: the ports are as open as the network.
    Open,
    /// A workload: the identity of its join token or client certificate.
    Workload(SpiffeId),
    /// A read-only operator token (CSDS takes it, ADS does not).
    Operator,
}

/// Who opened a gRPC call to ADS or CSDS (`what` names it in messages):
/// [`Caller::Open`] without a CA; else a join token (or an operator token)
/// sent as `authorization: Bearer <token>` metadata, or the client
/// certificate the connection presented (verified against the CA's bundle
/// by the TLS handshake). Anything else is `UNAUTHENTICATED`, logged with
/// the peer's address. Tokens are checked as the admin API checks them
/// ([`crate::ca::CertificateAuthority::authenticate_from`]): an address
/// past its failed attempts gets `RESOURCE_EXHAUSTED` before its token is
/// looked up.
pub(crate) fn authenticate<T>(
    shared: &Shared,
    request: &Request<T>,
    what: &str,
) -> Result<Caller, Status> {
    let Some(ca) = &shared.ca else {
        return Ok(Caller::Open);
    };
    let peer = request.extensions().get::<PeerInfo>();
    let addr = peer.map(|p| p.addr).or_else(|| request.remote_addr());
    let refuse = |status: Status| {
        tracing::warn!(peer = ?addr, "{what} refused: {}", status.message());
        Err(status)
    };
    if let Some(value) = request.metadata().get("authorization") {
        let Ok(value) = value.to_str() else {
            return refuse(Status::unauthenticated(format!(
                "{what}: the authorization metadata is not text; send `authorization: Bearer \
                 <join token>`"
            )));
        };
        let Some(token) = crate::ca::bearer_token(value) else {
            return refuse(Status::unauthenticated(format!(
                "{what}: the authorization metadata must be `Bearer <join token>`"
            )));
        };
        let from = addr.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        return match ca.authenticate_from(token, from) {
            Ok(identity) => Ok(Caller::Workload(identity)),
            Err(TokenRefusal::Operator) => Ok(Caller::Operator),
            Err(TokenRefusal::Throttled(wait)) => refuse(Status::resource_exhausted(format!(
                "{what}: too many unknown tokens from this address; retry in {}s",
                wait.as_secs().max(1)
            ))),
            Err(TokenRefusal::Unknown(e)) => {
                refuse(Status::unauthenticated(format!("{what}: {e}")))
            }
        };
    }
    match peer.and_then(|p| p.identity.clone()) {
        Some(identity) => Ok(Caller::Workload(identity)),
        None => refuse(Status::unauthenticated(format!(
            "{what} requires credentials when mesh-control runs a CA: a client certificate \
             from the mesh CA (certificate_file and private_key_file in the bootstrap's tls \
             channel_creds, gRFC A65) or `authorization: Bearer <join token>` metadata"
        ))),
    }
}

/// A string of `node.metadata`, if set and not empty.
fn node_string<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    use envoy_types::pb::google::protobuf::value::Kind;
    match node.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// Checks what `node` says about itself against the identity that
/// authenticated its stream: a `NAMESPACE` or `SERVICE_ACCOUNT` other than
/// the identity's is `PERMISSION_DENIED` naming both. `Ok` is the
/// workload with the identity's namespace and service account (filled in
/// when the node left them out).
fn verified_workload(node: &Node, identity: &SpiffeId) -> Result<NodeWorkload, Status> {
    let mut workload = NodeWorkload::from_node(node);
    for (key, claimed, actual) in [
        (
            "NAMESPACE",
            node_string(node, "NAMESPACE"),
            identity.namespace(),
        ),
        (
            "SERVICE_ACCOUNT",
            node_string(node, "SERVICE_ACCOUNT"),
            identity.service_account(),
        ),
    ] {
        if let Some(claimed) = claimed
            && claimed != actual
        {
            return Err(Status::permission_denied(format!(
                "node {:?} claims {key} {claimed:?} in node.metadata, but its credentials are \
                 for {identity} ({key} {actual:?}): a workload gets the config of its own \
                 namespace and service account only",
                node.id
            )));
        }
    }
    workload.namespace = identity.namespace().to_owned();
    workload.service_account = Some(identity.service_account().to_owned());
    Ok(workload)
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let identity = match authenticate(&self.shared, &request, "ADS")? {
            Caller::Open => None,
            Caller::Workload(identity) => Some(identity),
            Caller::Operator => {
                tracing::warn!("ADS refused: an operator token");
                return Err(Status::permission_denied(
                    "ADS: an operator token may only read status (CSDS, /status); a workload \
                     authenticates with its join token or its certificate from the mesh CA",
                ));
            }
        };
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.addr)
            .or_else(|| request.remote_addr());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let shared = self.shared.clone();
        let max_names = self.max_names;
        tokio::spawn(async move {
            let id = shared.next_client_id();
            let ending = tx.clone();
            let mut stream = AdsStream::new(id, shared.clone(), tx);
            stream.identity = identity;
            stream.peer = peer;
            stream.max_names = max_names;
            shared.metrics.clients.inc();
            if let Err(status) = stream.run(inbound).await {
                tracing::debug!(client = id, ?peer, %status, "ADS stream ended");
                // The stream's status, for the client to read (a client
                // that went away reads nothing).
                let _ = ending.send(Err(status)).await;
            }
            shared.metrics.clients.dec();
            shared.clients.lock().remove(&id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "incremental (delta) xDS is not served yet; use state-of-the-world ADS",
        ))
    }
}

/// What one stream has asked for and been sent, per type.
#[derive(Default)]
struct TypeState {
    names: BTreeSet<String>,
    subscribed: bool,
    sent: Option<Vec<Any>>,
    nonce: String,
    /// The names and version of the last response sent.
    sent_names: BTreeSet<String>,
    sent_version: String,
    /// The names of the last few responses sent, by nonce: an ACK of one
    /// of them (even of an older one) says the client holds those.
    recent: VecDeque<(String, BTreeSet<String>)>,
    /// LDS and CDS: names the client accepted (ACKed a response holding
    /// them) and still subscribes to.
    held: BTreeSet<String>,
    /// Of `held`, those the server stopped sending since: name → the
    /// version of the first response without it.
    deleted: BTreeMap<String, String>,
}

/// How many sent responses per type an ACK is matched against.
const RECENT: usize = 4;

struct AdsStream {
    id: u64,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    /// What the node says about its workload: its namespace (short names
    /// resolve in it) and what its server listeners are resolved for.
    workload: NodeWorkload,
    /// A gRPC proxyless client (by its user agent): it NACKs a whole CDS
    /// response that holds one cluster with file-based TLS (gRFC A29 knows
    /// only certificate provider instances), so such clusters are left out
    /// of its responses and only routes to them fail.
    grpc: bool,
    /// Which dialect it is served (see `crate::dialect`), from its user agent.
    kind: crate::compat::ClientKind,
    /// SDS secrets asked for on this stream (Envoy; see `crate::sds`).
    sds: crate::sds::SdsStream,
    types: [TypeState; 4],
    nonce: u64,
    /// Who authenticated the stream (with a CA): the node's namespace and
    /// service account are this identity's.
    identity: Option<SpiffeId>,
    /// The client's address, for logs.
    peer: Option<SocketAddr>,
    /// The most names one subscription may hold.
    max_names: usize,
    /// The view this client was served under the config of that version
    /// (`None`: the shared resources), found once per version.
    view: Option<(u64, Option<Arc<View>>)>,
}

const TYPES: [ResourceType; 4] = [
    ResourceType::Listener,
    ResourceType::RouteConfig,
    ResourceType::Cluster,
    ResourceType::Endpoints,
];

impl AdsStream {
    fn new(
        id: u64,
        shared: Arc<Shared>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> Self {
        AdsStream {
            id,
            shared,
            tx,
            workload: NodeWorkload {
                namespace: "default".into(),
                ..NodeWorkload::default()
            },
            grpc: false,
            kind: crate::compat::ClientKind::Unknown,
            sds: crate::sds::SdsStream::default(),
            types: Default::default(),
            nonce: 0,
            identity: None,
            peer: None,
            max_names: DEFAULT_MAX_NAMES_PER_SUBSCRIPTION,
            view: None,
        }
    }

    async fn run(&mut self, mut inbound: Streaming<DiscoveryRequest>) -> Result<(), Status> {
        let mut served_rx = self.shared.served.subscribe();
        let mut stop = self.shared.stop.subscribe();
        let stopping = async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        };
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                () = &mut stopping => {
                    return Err(Status::unavailable(
                        "mesh-control is shutting down; reconnect",
                    ));
                }
                msg = inbound.next() => match msg {
                    Some(Ok(req)) => {
                        let served = served_rx.borrow().clone();
                        self.on_request(req, &served).await?
                    }
                    Some(Err(status)) => return Err(status),
                    None => return Ok(()),
                },
                () = crate::sds::until(self.sds.due()) => {
                    let response = self.sds.renew(
                        self.shared.ca.as_deref(),
                        self.identity.as_ref(),
                        self.id,
                    );
                    if let Some(response) = response {
                        self.send_sds(response).await?;
                    }
                }
                changed = served_rx.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("control server shutting down"));
                    }
                    let served = served_rx.borrow_and_update().clone();
                    for t in TYPES {
                        if self.types[type_index(t)].subscribed {
                            self.push(t, &served, false).await?;
                        }
                    }
                }
            }
        }
    }

    async fn on_request(
        &mut self,
        req: DiscoveryRequest,
        served: &Arc<Served>,
    ) -> Result<(), Status> {
        if let Some(node) = &req.node {
            self.on_node(node)?;
        }
        if req.resource_names.len() > self.max_names {
            tracing::warn!(
                client = self.id,
                peer = ?self.peer,
                type_url = %req.type_url,
                names = req.resource_names.len(),
                limit = self.max_names,
                "ADS subscription over the limit of names: stream ended"
            );
            return Err(Status::resource_exhausted(format!(
                "a subscription to {} names of {} is over mesh-control's limit of {} names per \
                 type and stream: subscribe to fewer names, or to all with an empty list",
                req.resource_names.len(),
                req.type_url,
                self.max_names
            )));
        }
        if req.type_url == crate::dialect::SECRET_TYPE {
            if self.sds.answers_latest(&req) {
                self.record_ack_or_nack(crate::sds::STATUS_NAME, &req);
            }
            let response = self.sds.on_request(
                &req,
                self.shared.ca.as_deref(),
                self.identity.as_ref(),
                self.id,
            );
            if let Some(response) = response {
                self.send_sds(response).await?;
            }
            return Ok(());
        }
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            tracing::warn!(client = self.id, type_url = %req.type_url, "request for a type this server does not serve");
            return Ok(());
        };
        let i = type_index(t);
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let names_changed = !self.types[i].subscribed || names != self.types[i].names;
        if !req.response_nonce.is_empty() && req.response_nonce == self.types[i].nonce {
            self.record_ack_or_nack(t.short_name(), &req);
        }
        if !req.response_nonce.is_empty() && req.error_detail.is_none() {
            self.held_acked(t, &req.response_nonce);
        }
        if names_changed {
            self.types[i].names = names;
            self.types[i].subscribed = true;
            self.track_deleted(t);
            self.update_status(t, |s, st| s.subscribed = st.names.iter().cloned().collect());
            self.push(t, served, true).await?;
        }
        Ok(())
    }

    fn on_node(&mut self, node: &Node) -> Result<(), Status> {
        self.workload = match &self.identity {
            None => NodeWorkload::from_node(node),
            Some(identity) => verified_workload(node, identity).inspect_err(|status| {
                tracing::warn!(
                    client = self.id,
                    peer = ?self.peer,
                    "ADS refused: {}",
                    status.message()
                );
            })?,
        };
        self.kind = crate::compat::ClientKind::from_user_agent(&node.user_agent_name);
        self.grpc = self.kind == crate::compat::ClientKind::Grpc;
        // Its view follows what the node says about it.
        self.view = None;
        let mut clients = self.shared.clients.lock();
        let status = clients.entry(self.id).or_insert_with(|| ClientStatus {
            connected_at: Some(SystemTime::now()),
            ..ClientStatus::default()
        });
        status.node_id = node.id.clone();
        status.node = Some(node.clone());
        status.user_agent_name = node.user_agent_name.clone();
        status.workload = self.workload.clone();
        status.user_agent = match &node.user_agent_version_type {
            Some(envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(v)) => {
                format!("{} {v}", node.user_agent_name)
            }
            _ => node.user_agent_name.clone(),
        };
        Ok(())
    }

    /// Records an ACK or NACK of the latest response of the type named
    /// `type_name` (`LDS` … `EDS`, `SDS`) in the client's status.
    fn record_ack_or_nack(&mut self, type_name: &str, req: &DiscoveryRequest) {
        match &req.error_detail {
            Some(err) => {
                tracing::warn!(
                    client = self.id,
                    r#type = type_name,
                    nonce = %req.response_nonce,
                    error = %err.message,
                    "client NACKed a response"
                );
                self.shared.metrics.nacks.inc();
                self.update_type_status(type_name, |s| {
                    // The nonce is that of the latest response: its version
                    // is the one rejected; version_info is the last accepted.
                    s.last_nack = Some(NackInfo {
                        version: s.sent_version.clone(),
                        nonce: req.response_nonce.clone(),
                        message: err.message.clone(),
                        at: SystemTime::now(),
                    });
                    s.acked_version = req.version_info.clone();
                });
            }
            None => {
                self.update_type_status(type_name, |s| s.acked_version = req.version_info.clone())
            }
        }
    }

    fn update_status(&self, t: ResourceType, f: impl FnOnce(&mut TypeStatus, &TypeState)) {
        let state = &self.types[type_index(t)];
        self.update_type_status(t.short_name(), |s| f(s, state));
    }

    /// Updates the client's status of the type named `type_name`.
    fn update_type_status(&self, type_name: &str, f: impl FnOnce(&mut TypeStatus)) {
        let mut clients = self.shared.clients.lock();
        let status = clients.entry(self.id).or_insert_with(|| ClientStatus {
            connected_at: Some(SystemTime::now()),
            ..ClientStatus::default()
        });
        f(status.types.entry(type_name.to_string()).or_default());
    }

    /// Sends an SDS response, recording it in the client's status as a
    /// push of the other types is (`/status`, CSDS; private keys
    /// redacted).
    async fn send_sds(&mut self, response: DiscoveryResponse) -> Result<(), Status> {
        let subscribed: Vec<String> = self.sds.names().cloned().collect();
        let sent: Arc<[Any]> = Arc::from(crate::sds::redacted(&response.resources));
        let version = response.version_info.clone();
        self.update_type_status(crate::sds::STATUS_NAME, |s| {
            s.subscribed = subscribed;
            s.sent_version = version;
            s.last_push = Some(Instant::now());
            s.last_push_wall = Some(SystemTime::now());
            s.sent_resources = sent;
        });
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| Status::cancelled("client went away"))
    }

    /// Sends type `t` if what this client subscribed to differs from what it
    /// was last sent, or always when `force` (a subscription change must be
    /// answered even when nothing exists, so the client learns that).
    async fn push(
        &mut self,
        t: ResourceType,
        served: &Arc<Served>,
        force: bool,
    ) -> Result<(), Status> {
        let view = self.view(served).await?;
        let lookup = Lookup {
            served,
            view: view.as_deref(),
        };
        let resources = self.resources_for(t, lookup);
        let resource_errors = self.missing(t, &resources, lookup);
        let i = type_index(t);
        if !force && self.types[i].sent.as_ref() == Some(&resources) {
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let version = served.version.to_string();
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources: resources.clone(),
            type_url: t.type_url().to_string(),
            nonce: nonce.clone(),
            resource_errors,
            ..DiscoveryResponse::default()
        };
        let sent: Arc<[Any]> = Arc::from(resources.as_slice());
        let sent_names: BTreeSet<String> =
            resources.iter().filter_map(xds::resource_name).collect();
        let ts = &mut self.types[i];
        ts.recent.push_back((nonce.clone(), sent_names.clone()));
        if ts.recent.len() > RECENT {
            ts.recent.pop_front();
        }
        ts.sent_names = sent_names;
        ts.sent_version = version.clone();
        ts.sent = Some(resources);
        ts.nonce = nonce;
        self.track_deleted(t);
        let pushed_at = Instant::now();
        if !force && let Some(published) = served.published_at {
            self.shared
                .metrics
                .observe_push_latency(pushed_at.saturating_duration_since(published));
        }
        self.update_status(t, |s, _| {
            s.sent_version = version;
            s.last_push = Some(pushed_at);
            s.last_push_wall = Some(SystemTime::now());
            s.sent_resources = sent;
        });
        self.shared.metrics.pushes.inc();
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| Status::cancelled("client went away"))
    }

    /// The view this client gets under `served` (`None`: the shared
    /// resources): its key depends on its namespace and labels, which a
    /// registration can change, so it is found again for each config. A
    /// view not translated yet is translated on a blocking thread.
    async fn view(&mut self, served: &Arc<Served>) -> Result<Option<Arc<View>>, Status> {
        if let Some((version, view)) = &self.view
            && *version == served.version
        {
            return Ok(view.clone());
        }
        let view = match served.view_key(&self.workload) {
            None => None,
            Some(key) => match served.views.get(&key) {
                Some(view) => Some(view),
                None => {
                    let served = served.clone();
                    let view = tokio::task::spawn_blocking(move || served.view(&key))
                        .await
                        .map_err(|e| {
                            tracing::error!(client = self.id, error = %e, "translating a view failed");
                            Status::internal("mesh-control failed to translate this workload's view")
                        })?;
                    Some(view)
                }
            },
        };
        let key = view.as_ref().map(|v| v.key.clone());
        if let Some(status) = self.shared.clients.lock().get_mut(&self.id) {
            status.view = key;
        }
        self.view = Some((served.version, view.clone()));
        Ok(view)
    }

    /// The client ACKed the response `nonce` of type `t`: it holds what
    /// that response carried.
    fn held_acked(&mut self, t: ResourceType, nonce: &str) {
        if !tracks_deletions(t) {
            return;
        }
        let ts = &mut self.types[type_index(t)];
        let Some(pos) = ts.recent.iter().position(|(n, _)| n == nonce) else {
            return;
        };
        let (_, names) = &ts.recent[pos];
        ts.held.extend(names.iter().cloned());
        // An ACK of a response acknowledges the ones before it too.
        ts.recent.drain(..=pos);
        self.track_deleted(t);
    }

    /// Updates which LDS / CDS resources this client holds that the server
    /// deleted (see [`DeletedKept`]): a name it accepted, still subscribes
    /// to, and the last response left out. A name comes off the list when
    /// it is sent again or the client unsubscribes (which drops it from its
    /// cache). An empty subscription is a wildcard, except from a gRPC
    /// client, for which it means none.
    fn track_deleted(&mut self, t: ResourceType) {
        if !tracks_deletions(t) {
            return;
        }
        let grpc = self.grpc;
        let TypeState {
            names,
            held,
            deleted,
            sent_names,
            sent_version,
            ..
        } = &mut self.types[type_index(t)];
        held.retain(|n| names.contains(n) || (names.is_empty() && !grpc));
        deleted.retain(|n, _| held.contains(n) && !sent_names.contains(n));
        for n in held.iter().filter(|n| !sent_names.contains(*n)) {
            deleted
                .entry(n.clone())
                .or_insert_with(|| sent_version.clone());
        }
        let all = TYPES
            .into_iter()
            .filter(|t| tracks_deletions(*t))
            .flat_map(|t| {
                self.types[type_index(t)]
                    .deleted
                    .iter()
                    .map(move |(name, version)| DeletedKept {
                        type_name: t.short_name(),
                        name: name.clone(),
                        deleted_at_version: version.clone(),
                    })
            })
            .collect();
        publish_deleted(&self.shared, self.id, all);
    }

    /// A NOT_FOUND `resource_errors` entry for every subscribed name not in
    /// `resources`. SotW absence alone does not tell a gRPC client (grpc-core,
    /// grpc-go) that a name it never received does not exist: it waits out its
    /// 15 s timer. With `resource_errors` (xDS TP3, gRFC A88) it fails at once;
    /// clients that do not read the field ignore it.
    fn missing(
        &self,
        t: ResourceType,
        resources: &[Any],
        lookup: Lookup<'_>,
    ) -> Vec<ResourceError> {
        let names = &self.types[type_index(t)].names;
        if names.is_empty() {
            return Vec::new();
        }
        let present: BTreeSet<String> = resources.iter().filter_map(xds::resource_name).collect();
        names
            .iter()
            .filter(|n| !present.contains(n.as_str()))
            .map(|n| ResourceError {
                resource_name: Some(ResourceName {
                    name: n.clone(),
                    ..ResourceName::default()
                }),
                error_detail: Some(RpcStatus {
                    code: 5,
                    message: if let Some(why) = self.hidden(n, lookup) {
                        format!(
                            "{} resource {n:?} does not exist for this client: {why}",
                            t.short_name()
                        )
                    } else if t == ResourceType::Cluster && file_tls(lookup.snapshot(), n) {
                        format!(
                            "cluster {n:?} originates TLS with certificate files (DestinationRule \
                             tls SIMPLE / MUTUAL), which gRPC clients cannot load (gRFC A29 \
                             knows only certificate provider instances): not sent to this client"
                        )
                    } else {
                        format!(
                            "{} resource {n:?} does not exist on mesh-control (client namespace \
                             {:?})",
                            t.short_name(),
                            self.workload.namespace
                        )
                    },
                    details: Vec::new(),
                }),
            })
            .collect()
    }

    /// Why `name` (or the qualified name of a short one) does not exist
    /// for this client although it exists for other namespaces.
    fn hidden<'a>(&self, name: &str, lookup: Lookup<'a>) -> Option<&'a str> {
        lookup
            .hidden(name)
            .or_else(|| lookup.hidden(&self.qualified(name)?))
    }

    /// What this client is sent of type `t`, in its dialect (see
    /// `crate::dialect`).
    fn resources_for(&self, t: ResourceType, lookup: Lookup<'_>) -> Vec<Any> {
        let names = &self.types[type_index(t)].names;
        match self.kind {
            crate::compat::ClientKind::Envoy => {
                crate::dialect::envoy::resources(t, names, lookup, &self.workload)
            }
            crate::compat::ClientKind::Grpc => {
                let mut resources = self.shared_resources(t, lookup);
                crate::dialect::grpc::adapt(t, &mut resources, lookup);
                resources
            }
            _ => self.shared_resources(t, lookup),
        }
    }

    /// The shared resources of type `t` this client subscribes to (the
    /// dialect of gRPC clients and of this mesh's).
    fn shared_resources(&self, t: ResourceType, lookup: Lookup<'_>) -> Vec<Any> {
        let i = type_index(t);
        let names = &self.types[i].names;
        if names.is_empty() {
            // Wildcard subscription (Envoy style): everything of this type.
            return lookup.all(i);
        }
        names
            .iter()
            .filter_map(|name| match lookup.get(i, name) {
                Some(_)
                    if self.grpc
                        && t == ResourceType::Cluster
                        && file_tls(lookup.snapshot(), name) =>
                {
                    None
                }
                Some(any) => Some(any.clone()),
                None if t == ResourceType::Listener => {
                    self.server_listener(name, lookup.served).or_else(|| {
                        self.short_listener(name, lookup.snapshot())
                            .map(|l| xds::encode_listener(&l))
                    })
                }
                None => None,
            })
            .collect()
    }

    /// A server listener (gRFC A36): a name made from the bootstrap's
    /// `server_listener_resource_name_template`
    /// (`grpc/server?xds.resource.listening_address=%s`) is answered with
    /// the listener for that address, resolved for this client's workload
    /// (see [`server_listener_for`]).
    fn server_listener(&self, name: &str, served: &Served) -> Option<Any> {
        server_listener_for(served, name, &self.workload)
            .map(|listener| xds::encode_server_listener(&listener))
    }

    /// `catalog` / `catalog:80` asked by a client in namespace `shop`:
    /// `catalog.shop` / `catalog.shop:80`; `None` for a name with a dot.
    fn qualified(&self, name: &str) -> Option<String> {
        let (host, port) = match name.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
            _ => (name, None),
        };
        if host.contains('.') || host.is_empty() {
            return None;
        }
        Some(match port {
            Some(p) => format!("{host}.{}:{p}", self.workload.namespace),
            None => format!("{host}.{}", self.workload.namespace),
        })
    }

    /// `catalog` / `catalog:80` asked by a client in namespace `shop` is
    /// served as the listener `catalog.shop` / `catalog.shop:80`, renamed.
    fn short_listener(&self, name: &str, snapshot: &mesh_core::Snapshot) -> Option<Listener> {
        let qualified = self.qualified(name)?;
        let target = snapshot.listeners.get(qualified.as_str())?;
        Some(Listener {
            name: name.into(),
            route_config_name: target.route_config_name.clone(),
        })
    }
}

/// Whether deletions of type `t` are tracked per client: the types whose
/// SotW responses carry every resource subscribed, so an absence is a
/// deletion (gRFC A53 ignores deletions of these).
fn tracks_deletions(t: ResourceType) -> bool {
    matches!(t, ResourceType::Listener | ResourceType::Cluster)
}

/// Records what [`DeletedKept`] client `client` holds, in its status.
fn publish_deleted(shared: &Shared, client: u64, deleted: Vec<DeletedKept>) {
    if let Some(status) = shared.clients.lock().get_mut(&client) {
        status.deleted_but_kept = deleted;
    }
}

/// The parameter A36 server listener names carry the address in.
const LISTENING_ADDRESS: &str = "xds.resource.listening_address=";

/// Whether cluster `name` originates TLS with certificate files
/// (DestinationRule SIMPLE / MUTUAL).
fn file_tls(snapshot: &mesh_core::Snapshot, name: &str) -> bool {
    snapshot.clusters.get(name).is_some_and(|c| {
        c.tls.as_ref().is_some_and(|t| {
            !matches!(t.origination, mesh_core::model::TlsOrigination::IstioMutual)
        })
    })
}

/// The server listener `name` resolves to for the workload `node`
/// describes, if `name` is a server listener name (gRFC A36): what the
/// ADS stream sends and what `/status` checks for gRPC compatibility.
/// PeerAuthentication and AuthorizationPolicy select it by the labels of
/// [`workload_labels`].
pub(crate) fn server_listener_for(
    served: &Served,
    name: &str,
    node: &NodeWorkload,
) -> Option<ServerListener> {
    let address = listening_address(name)?;
    let labels = workload_labels(served, address, node);
    Some(served.security.server_listener(
        name,
        address,
        Workload {
            namespace: &node.namespace,
            labels: &labels,
        },
    ))
}

/// The `ip:port` of a server listener name, if `name` is one.
pub(crate) fn listening_address(name: &str) -> Option<SocketAddr> {
    let start = name.find(LISTENING_ADDRESS)? + LISTENING_ADDRESS.len();
    let rest = name.get(start..)?;
    let value = rest.split('&').next().unwrap_or(rest);
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    use mesh_core::spiffe::SpiffeId;

    use super::{listening_address, server_listener_for};
    use crate::config::{ConfigStore, MeshOptions, Registration};
    use crate::registry::Registered;
    use crate::state::labels::{caller_labels, workload_labels};
    use crate::state::{NodeWorkload, Served};

    /// catalog's WorkloadGroup gives `tier: backend, version: v0`; a DENY
    /// policy selects `version: v2`.
    const MESH: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: catalog, namespace: shop}
spec:
  metadata:
    labels: {tier: backend, version: v0}
  template: {serviceAccount: catalog}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-v2, namespace: shop}
spec:
  selector: {matchLabels: {version: v2}}
  action: DENY
  rules:
  - to: [{operation: {paths: [\"/canary\"]}}]
";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A registration of `service` in shop at `address`, made from node
    /// `node_id` by `owner`, with its own `labels`.
    fn registered(
        service: &str,
        address: &str,
        node_id: Option<&str>,
        owner: Option<&str>,
        own: &[(&str, &str)],
    ) -> Registered {
        let address: SocketAddr = address.parse().unwrap();
        Registered {
            registration: Registration {
                service: service.into(),
                namespace: "shop".into(),
                address: address.ip(),
                port: address.port(),
                service_port: None,
                protocol: None,
                labels: labels(own),
                locality: Default::default(),
            },
            owner: owner.map(|o| SpiffeId::parse(o).unwrap()),
            node_id: node_id.map(str::to_owned),
        }
    }

    /// What the control server serves for `registrations`: each with its
    /// labels merged over its WorkloadGroup's, as `Shared::rebuild` does.
    fn served(registrations: Vec<Registered>) -> Served {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), MESH).unwrap();
        let mut store = ConfigStore::new(MeshOptions::default());
        assert!(store.load_dir(dir.path()).is_empty());
        let security = store.security();
        let registered = registrations
            .into_iter()
            .map(|mut r| {
                r.registration.labels = security.registered_labels(&r.registration);
                r
            })
            .collect();
        Served {
            security,
            registered,
            ..Served::default()
        }
    }

    /// Node `id` in shop (cluster `cluster`) claiming `node_labels`.
    fn node(id: &str, cluster: &str, node_labels: &[(&str, &str)]) -> NodeWorkload {
        NodeWorkload {
            id: id.into(),
            cluster: cluster.into(),
            namespace: "shop".into(),
            service_account: None,
            labels: labels(node_labels),
            locality: Default::default(),
            outbound_port: None,
        }
    }

    fn at(address: &str) -> SocketAddr {
        address.parse().unwrap()
    }

    #[test]
    fn a_listener_at_a_registered_address_gets_that_registration_s_labels() {
        let served = served(vec![registered(
            "catalog",
            "10.0.0.7:8080",
            None,
            None,
            &[("version", "v2")],
        )]);
        let node = node("catalog-1", "catalog-1", &[("version", "v1")]);
        assert_eq!(
            workload_labels(&served, at("10.0.0.7:8080"), &node),
            labels(&[("tier", "backend"), ("version", "v2")]),
            "the registration's labels (over the group's), not the node's"
        );
        // The policy selecting version: v2 is in its server listener.
        let name = "grpc/server?xds.resource.listening_address=10.0.0.7:8080";
        let listener = server_listener_for(&served, name, &node).unwrap();
        assert_eq!(listener.policies.len(), 1);
        assert_eq!(&**listener.policies[0].name(), "deny-v2");
        // Another port of the same host is another workload.
        assert_eq!(
            workload_labels(&served, at("10.0.0.7:9090"), &node),
            labels(&[("version", "v1")])
        );
    }

    #[test]
    fn a_listener_on_an_unspecified_address_finds_its_registration_by_node_id_and_port() {
        let served = served(vec![
            registered(
                "catalog",
                "10.0.0.7:8080",
                Some("catalog-1"),
                None,
                &[("version", "v2")],
            ),
            registered(
                "catalog",
                "10.0.0.8:8080",
                Some("catalog-2"),
                None,
                &[("version", "v3")],
            ),
        ]);
        let mine = node("catalog-1", "catalog-1", &[("version", "v1")]);
        assert_eq!(
            workload_labels(&served, at("0.0.0.0:8080"), &mine),
            labels(&[("tier", "backend"), ("version", "v2")])
        );
        assert_eq!(
            workload_labels(&served, at("[::]:8080"), &mine),
            labels(&[("tier", "backend"), ("version", "v2")])
        );
        // Bound to another address than the one it advertises: still its own.
        assert_eq!(
            workload_labels(&served, at("127.0.0.1:8080"), &mine),
            labels(&[("tier", "backend"), ("version", "v2")])
        );
        // Another port, or a node that registered nothing: the node's labels.
        assert_eq!(
            workload_labels(&served, at("0.0.0.0:9090"), &mine),
            labels(&[("version", "v1")])
        );
        let stranger = node("catalog-9", "catalog-9", &[("version", "v1")]);
        assert_eq!(
            workload_labels(&served, at("0.0.0.0:8080"), &stranger),
            labels(&[("version", "v1")]),
            "the port alone does not pick another node's registration"
        );
    }

    #[test]
    fn only_registrations_of_the_node_s_namespace_and_identity_count() {
        let owner = "spiffe://cluster.local/ns/shop/sa/catalog";
        let served = served(vec![registered(
            "catalog",
            "10.0.0.7:8080",
            Some("catalog-1"),
            Some(owner),
            &[("version", "v2")],
        )]);
        let mut node = node("catalog-1", "catalog-1", &[("version", "v1")]);
        // Registered by an identity: used only by a node claiming it.
        assert_eq!(
            workload_labels(&served, at("10.0.0.7:8080"), &node),
            labels(&[("version", "v1")])
        );
        node.service_account = Some("frontend".into());
        assert_eq!(
            workload_labels(&served, at("10.0.0.7:8080"), &node),
            labels(&[("version", "v1")]),
            "another identity's registration cannot choose this workload's labels"
        );
        node.service_account = Some("catalog".into());
        assert_eq!(
            workload_labels(&served, at("10.0.0.7:8080"), &node),
            labels(&[("tier", "backend"), ("version", "v2")])
        );
        node.namespace = "web".into();
        assert_eq!(
            workload_labels(&served, at("10.0.0.7:8080"), &node),
            labels(&[("version", "v1")]),
            "a node of another namespace"
        );
    }

    #[test]
    fn without_a_registration_the_node_s_labels_win_over_its_cluster_s_group() {
        let served = served(Vec::new());
        assert_eq!(
            workload_labels(
                &served,
                at("10.0.0.7:8080"),
                &node("c-1", "catalog", &[("version", "v1")])
            ),
            labels(&[("tier", "backend"), ("version", "v1")])
        );
        assert_eq!(
            workload_labels(
                &served,
                at("10.0.0.7:8080"),
                &node("c-1", "c-1", &[("version", "v1")])
            ),
            labels(&[("version", "v1")])
        );
    }

    #[test]
    fn an_endpoint_backing_two_services_has_both_label_sets_first_service_winning() {
        let served = served(vec![
            registered(
                "catalog-admin",
                "10.0.0.7:8080",
                None,
                None,
                &[("version", "v9"), ("admin", "yes")],
            ),
            registered("catalog", "10.0.0.7:8080", None, None, &[("version", "v2")]),
        ]);
        assert_eq!(
            workload_labels(&served, at("10.0.0.7:8080"), &node("c-1", "c-1", &[])),
            labels(&[("admin", "yes"), ("tier", "backend"), ("version", "v2")])
        );
    }

    /// What `match.sourceLabels` sees of a caller (its view key).
    #[test]
    fn a_caller_s_labels_are_those_of_its_registrations_else_its_node_s() {
        let served = served(vec![
            registered(
                "catalog",
                "10.0.0.7:8080",
                Some("catalog-1"),
                None,
                &[("version", "v2")],
            ),
            registered(
                "catalog",
                "10.0.0.8:8080",
                Some("catalog-2"),
                Some("spiffe://cluster.local/ns/shop/sa/catalog"),
                &[("version", "v3")],
            ),
        ]);
        assert_eq!(
            caller_labels(
                &served,
                &node("catalog-1", "catalog-1", &[("version", "v1")])
            ),
            labels(&[("tier", "backend"), ("version", "v2")]),
            "its registration's labels (over the group's), whatever the port"
        );
        assert_eq!(
            caller_labels(&served, &node("web-1", "catalog", &[("version", "v1")])),
            labels(&[("tier", "backend"), ("version", "v1")]),
            "no registration: its node's labels over its cluster's group"
        );
        assert_eq!(
            caller_labels(
                &served,
                &node("catalog-2", "catalog-2", &[("version", "v1")])
            ),
            labels(&[("version", "v1")]),
            "another identity's registration cannot choose its labels"
        );
    }

    #[test]
    fn listening_addresses_are_read_from_a36_names() {
        assert_eq!(
            listening_address("grpc/server?xds.resource.listening_address=127.0.0.1:8080"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            listening_address("grpc/server?xds.resource.listening_address=[::1]:443&x=y"),
            Some("[::1]:443".parse().unwrap())
        );
        assert_eq!(listening_address("catalog.shop:80"), None);
        assert_eq!(
            listening_address("grpc/server?xds.resource.listening_address=nope"),
            None
        );
    }
}
