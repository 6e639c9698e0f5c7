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
//! listener resolved for the client's workload — `node.metadata.NAMESPACE`
//! and `node.metadata.LABELS` select its PeerAuthentication mode and
//! AuthorizationPolicies — in the same SotW LDS response as the client
//! listeners it subscribed to. A change of those policies is a new version.
//!
//! References: the xDS REST and gRPC protocol (ACK/NACK, nonces, SotW
//! semantics), gRFC A27 (xDS-based global load balancing).

use std::collections::{BTreeMap, BTreeSet};
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
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures_util::{Stream, StreamExt};
use mesh_core::model::{Listener, ServerListener};
use mesh_core::xds::Any;
use mesh_core::xds::{self, ResourceType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Workload;
use crate::state::{ClientStatus, NackInfo, Served, Shared, TypeStatus};

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub(crate) struct Ads {
    pub(crate) shared: Arc<Shared>,
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
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let id = shared.next_client_id();
            let mut stream = AdsStream::new(id, shared.clone(), tx);
            shared.metrics.clients.inc();
            if let Err(status) = stream.run(inbound).await {
                tracing::debug!(client = id, ?peer, %status, "ADS stream ended");
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
}

struct AdsStream {
    id: u64,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    namespace: String,
    /// `node.metadata.LABELS`: the workload's labels, which select its
    /// PeerAuthentication and AuthorizationPolicies.
    labels: BTreeMap<String, String>,
    /// A gRPC proxyless client (by its user agent): it NACKs a whole CDS
    /// response that holds one cluster with file-based TLS (gRFC A29 knows
    /// only certificate provider instances), so such clusters are left out
    /// of its responses and only routes to them fail.
    grpc: bool,
    types: [TypeState; 4],
    nonce: u64,
}

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
            namespace: "default".into(),
            labels: BTreeMap::new(),
            grpc: false,
            types: Default::default(),
            nonce: 0,
        }
    }

    async fn run(&mut self, mut inbound: Streaming<DiscoveryRequest>) -> Result<(), Status> {
        let mut served_rx = self.shared.served.subscribe();
        loop {
            tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(req)) => {
                        let served = served_rx.borrow().clone();
                        self.on_request(req, &served).await?
                    }
                    Some(Err(status)) => return Err(status),
                    None => return Ok(()),
                },
                changed = served_rx.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("control server shutting down"));
                    }
                    let served = served_rx.borrow_and_update().clone();
                    for t in TYPES {
                        if self.types[index(t)].subscribed {
                            self.push(t, &served, false).await?;
                        }
                    }
                }
            }
        }
    }

    async fn on_request(&mut self, req: DiscoveryRequest, served: &Served) -> Result<(), Status> {
        if let Some(node) = &req.node {
            self.on_node(node);
        }
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            tracing::warn!(client = self.id, type_url = %req.type_url, "request for a type this server does not serve");
            return Ok(());
        };
        let i = index(t);
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let names_changed = !self.types[i].subscribed || names != self.types[i].names;
        if !req.response_nonce.is_empty() && req.response_nonce == self.types[i].nonce {
            self.record_ack_or_nack(t, &req);
        }
        if names_changed {
            self.types[i].names = names;
            self.types[i].subscribed = true;
            self.update_status(t, |s, st| s.subscribed = st.names.iter().cloned().collect());
            self.push(t, served, true).await?;
        }
        Ok(())
    }

    fn on_node(&mut self, node: &Node) {
        let namespace = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("NAMESPACE"))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "default".into());
        self.namespace = namespace.clone();
        self.grpc = crate::compat::ClientKind::from_user_agent(&node.user_agent_name)
            == crate::compat::ClientKind::Grpc;
        self.labels = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("LABELS"))
            .and_then(|v| match &v.kind {
                Some(Kind::StructValue(labels)) => Some(
                    labels
                        .fields
                        .iter()
                        .filter_map(|(k, v)| match &v.kind {
                            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                            _ => None,
                        })
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        let mut clients = self.shared.clients.lock();
        let status = clients.entry(self.id).or_insert_with(|| ClientStatus {
            connected_at: Some(SystemTime::now()),
            ..ClientStatus::default()
        });
        status.node_id = node.id.clone();
        status.node = Some(node.clone());
        status.user_agent_name = node.user_agent_name.clone();
        status.namespace = namespace;
        status.labels = self.labels.clone();
        status.user_agent = match &node.user_agent_version_type {
            Some(envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(v)) => {
                format!("{} {v}", node.user_agent_name)
            }
            _ => node.user_agent_name.clone(),
        };
    }

    fn record_ack_or_nack(&mut self, t: ResourceType, req: &DiscoveryRequest) {
        match &req.error_detail {
            Some(err) => {
                tracing::warn!(
                    client = self.id,
                    r#type = t.short_name(),
                    nonce = %req.response_nonce,
                    error = %err.message,
                    "client NACKed a response"
                );
                self.shared.metrics.nacks.inc();
                self.update_status(t, |s, _| {
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
            None => self.update_status(t, |s, _| s.acked_version = req.version_info.clone()),
        }
    }

    fn update_status(&self, t: ResourceType, f: impl FnOnce(&mut TypeStatus, &TypeState)) {
        let mut clients = self.shared.clients.lock();
        let status = clients.entry(self.id).or_insert_with(|| ClientStatus {
            connected_at: Some(SystemTime::now()),
            ..ClientStatus::default()
        });
        let ts = status.types.entry(t.short_name().to_string()).or_default();
        f(ts, &self.types[index(t)]);
    }

    /// Sends type `t` if what this client subscribed to differs from what it
    /// was last sent, or always when `force` (a subscription change must be
    /// answered even when nothing exists, so the client learns that).
    async fn push(&mut self, t: ResourceType, served: &Served, force: bool) -> Result<(), Status> {
        let resources = self.resources_for(t, served);
        let resource_errors = self.missing(t, &resources, served);
        let i = index(t);
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
        self.types[i].sent = Some(resources);
        self.types[i].nonce = nonce;
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

    /// A NOT_FOUND `resource_errors` entry for every subscribed name not in
    /// `resources`. SotW absence alone does not tell a gRPC client (grpc-core,
    /// grpc-go) that a name it never received does not exist: it waits out its
    /// 15 s timer. With `resource_errors` (xDS TP3, gRFC A88) it fails at once;
    /// clients that do not read the field ignore it.
    fn missing(&self, t: ResourceType, resources: &[Any], served: &Served) -> Vec<ResourceError> {
        let names = &self.types[index(t)].names;
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
                    message: if t == ResourceType::Cluster && file_tls(served, n) {
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
                            self.namespace
                        )
                    },
                    details: Vec::new(),
                }),
            })
            .collect()
    }

    fn resources_for(&self, t: ResourceType, served: &Served) -> Vec<Any> {
        let i = index(t);
        let all = &served.resources[i];
        let names = &self.types[i].names;
        if names.is_empty() {
            // Wildcard subscription (Envoy style): everything of this type.
            return all.values().cloned().collect();
        }
        names
            .iter()
            .filter_map(|name| match all.get(name.as_str()) {
                Some(_) if self.grpc && t == ResourceType::Cluster && file_tls(served, name) => {
                    None
                }
                Some(any) => Some(any.clone()),
                None if t == ResourceType::Listener => {
                    self.server_listener(name, served).or_else(|| {
                        self.short_listener(name, served)
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
    /// (namespace and labels) from PeerAuthentication and
    /// AuthorizationPolicy.
    fn server_listener(&self, name: &str, served: &Served) -> Option<Any> {
        server_listener_for(served, name, &self.namespace, &self.labels)
            .map(|listener| xds::encode_server_listener(&listener))
    }

    /// `catalog` / `catalog:80` asked by a client in namespace `shop` is
    /// served as the listener `catalog.shop` / `catalog.shop:80`, renamed.
    fn short_listener(&self, name: &str, served: &Served) -> Option<Listener> {
        let (host, port) = match name.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
            _ => (name, None),
        };
        if host.contains('.') || host.is_empty() {
            return None;
        }
        let qualified = match port {
            Some(p) => format!("{host}.{}:{p}", self.namespace),
            None => format!("{host}.{}", self.namespace),
        };
        let target = served.snapshot.listeners.get(qualified.as_str())?;
        Some(Listener {
            name: name.into(),
            route_config_name: target.route_config_name.clone(),
        })
    }
}

/// The parameter A36 server listener names carry the address in.
const LISTENING_ADDRESS: &str = "xds.resource.listening_address=";

/// Whether cluster `name` originates TLS with certificate files
/// (DestinationRule SIMPLE / MUTUAL).
fn file_tls(served: &Served, name: &str) -> bool {
    served.snapshot.clusters.get(name).is_some_and(|c| {
        c.tls.as_ref().is_some_and(|t| {
            !matches!(t.origination, mesh_core::model::TlsOrigination::IstioMutual)
        })
    })
}

/// The server listener `name` resolves to for a workload in `namespace`
/// with `labels`, if `name` is a server listener name (gRFC A36): what the
/// ADS stream sends and what `/status` checks for gRPC compatibility.
pub(crate) fn server_listener_for(
    served: &Served,
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Option<ServerListener> {
    let address = listening_address(name)?;
    Some(
        served
            .security
            .server_listener(name, address, Workload { namespace, labels }),
    )
}

/// The `ip:port` of a server listener name, if `name` is one.
pub(crate) fn listening_address(name: &str) -> Option<SocketAddr> {
    let start = name.find(LISTENING_ADDRESS)? + LISTENING_ADDRESS.len();
    let rest = name.get(start..)?;
    let value = rest.split('&').next().unwrap_or(rest);
    value.parse().ok()
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

pub(crate) fn type_index(t: ResourceType) -> usize {
    index(t)
}

#[cfg(test)]
mod tests {
    use super::listening_address;

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
