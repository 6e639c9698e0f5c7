//! Both ends of ADS (Envoy's aggregated discovery service, state of the world) for
//! protocol tests, with envoy-types and tonic:
//!
//! - [`AdsClient`], a raw client: a test sends exactly the `DiscoveryRequest`s it
//!   means (subscriptions, ACKs, NACKs with a reason, a gRPC user agent) and reads the
//!   responses, to test a control server as any xDS client would see it;
//! - [`AdsServer`], a server of canned [`Resources`]: it answers each new
//!   subscription with the named resources it holds, pushes them again when a test
//!   changes them, logs every request, and can be killed, to test an xDS client.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures_util::Stream;
use mesh_core::xds::Any;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::wait::{DEADLINE, within};

/// gRPC's `INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

// ---------------------------------------------------------------------------
// The raw client.

/// Builds the [`Node`] a raw client sends (see [`node`]).
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    node: Node,
    metadata: Vec<(String, Value)>,
}

/// A node `id` with the user agent `raw-test` and no metadata.
///
/// ```ignore
/// let node = node("catalog-1").namespace("shop").labels(&[("app", "catalog")]).build();
/// ```
pub fn node(id: &str) -> NodeBuilder {
    NodeBuilder {
        node: Node {
            id: id.into(),
            user_agent_name: "raw-test".into(),
            ..Node::default()
        },
        metadata: Vec::new(),
    }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

impl NodeBuilder {
    /// The user agent: what a control server tells gRPC clients apart by.
    pub fn user_agent(mut self, user_agent: &str) -> Self {
        self.node.user_agent_name = user_agent.into();
        self
    }

    /// The `NAMESPACE` metadata (Istio's): where short names resolve.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.metadata.push(("NAMESPACE".into(), string(namespace)));
        self
    }

    /// The `SERVICE_ACCOUNT` metadata (Istio's): the account it says it runs as.
    pub fn service_account(mut self, service_account: &str) -> Self {
        self.metadata
            .push(("SERVICE_ACCOUNT".into(), string(service_account)));
        self
    }

    /// The `LABELS` metadata (Istio's): what workload selectors match.
    pub fn labels(mut self, labels: &[(&str, &str)]) -> Self {
        let labels = Struct {
            fields: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), string(v)))
                .collect(),
        };
        self.metadata.push((
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        ));
        self
    }

    /// The node.
    pub fn build(self) -> Node {
        let mut node = self.node;
        if !self.metadata.is_empty() {
            node.metadata = Some(Struct {
                fields: self.metadata.into_iter().collect(),
            });
        }
        node
    }
}

/// A raw ADS stream: requests go out as written, responses come back unprocessed.
pub struct AdsClient {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    /// Sent with every request (a real client sends it on the first one only; a
    /// control server must take both).
    pub node: Node,
}

impl AdsClient {
    /// Opens a stream to the plaintext ADS server at `addr`; panics when it cannot.
    pub async fn connect(addr: SocketAddr, node: Node) -> AdsClient {
        let channel = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
            Ok(endpoint) => match endpoint.connect().await {
                Ok(channel) => channel,
                Err(e) => panic!("connecting to ADS at {addr}: {e}"),
            },
            Err(e) => panic!("an endpoint for {addr}: {e}"),
        };
        match AdsClient::open(channel, node).await {
            Ok(client) => client,
            Err(status) => panic!("opening an ADS stream to {addr}: {status}"),
        }
    }

    /// Opens a stream over `channel` (a TLS channel, say); Err is the server's answer.
    pub async fn open(
        channel: tonic::transport::Channel,
        node: Node,
    ) -> Result<AdsClient, tonic::Status> {
        AdsClient::open_with(channel, node, None).await
    }

    /// [`AdsClient::open`] with `authorization: Bearer <token>` metadata, as an
    /// Envoy sends a join token in its `initial_metadata`.
    pub async fn open_with_token(
        channel: tonic::transport::Channel,
        node: Node,
        token: &str,
    ) -> Result<AdsClient, tonic::Status> {
        AdsClient::open_with(channel, node, Some(token)).await
    }

    async fn open_with(
        channel: tonic::transport::Channel,
        node: Node,
        token: Option<&str>,
    ) -> Result<AdsClient, tonic::Status> {
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_encoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(8);
        let mut request = Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            match format!("Bearer {token}").parse() {
                Ok(value) => {
                    request.metadata_mut().insert("authorization", value);
                }
                Err(_) => return Err(Status::invalid_argument("the token is not header text")),
            }
        }
        let stream = client
            .stream_aggregated_resources(request)
            .await?
            .into_inner();
        Ok(AdsClient {
            tx,
            rx: stream,
            node,
        })
    }

    /// Sends one request: `names` of `type_url`, with the `version` and `nonce` of the
    /// response it answers (empty for none) and, for a NACK, its reason.
    pub async fn send(
        &self,
        type_url: &str,
        names: &[&str],
        version: &str,
        nonce: &str,
        nack: Option<&str>,
    ) {
        let request = DiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.into(),
            resource_names: names.iter().map(|s| (*s).to_owned()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            error_detail: nack.map(|reason| RpcStatus {
                code: INVALID_ARGUMENT,
                message: reason.into(),
                details: vec![],
            }),
            ..DiscoveryRequest::default()
        };
        if self.tx.send(request).await.is_err() {
            panic!("the ADS stream is closed: cannot send a {type_url} request");
        }
    }

    /// Sends one subscription to `names` (owned: a test of limits sends many).
    pub async fn subscribe_owned(&self, type_url: &str, names: Vec<String>) {
        let request = DiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.into(),
            resource_names: names,
            ..DiscoveryRequest::default()
        };
        if self.tx.send(request).await.is_err() {
            panic!("the ADS stream is closed: cannot send a {type_url} request");
        }
    }

    /// The status that ended the stream, waiting up to `wait`; Err says what
    /// came instead (a response, the end of the stream without a status, nothing).
    pub async fn ended_with(&mut self, wait: Duration) -> Result<Status, String> {
        match tokio::time::timeout(wait, self.rx.next()).await {
            Ok(Some(Err(status))) => Ok(status),
            Ok(Some(Ok(response))) => Err(format!(
                "a response instead of the end of the stream: {} resources of {}",
                response.resources.len(),
                response.type_url
            )),
            Ok(None) => Err("the ADS stream ended without a status".to_owned()),
            Err(_) => Err(format!("the ADS stream still open after {wait:?}")),
        }
    }

    /// A first subscription to `names` of `type_url` (no version, no nonce).
    pub async fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.send(type_url, names, "", "", None).await;
    }

    /// The next response; panics when none comes within [`DEADLINE`] or the stream
    /// ends or fails.
    pub async fn recv(&mut self) -> DiscoveryResponse {
        match self.try_recv(DEADLINE).await {
            Ok(response) => response,
            Err(e) => panic!("{e}"),
        }
    }

    /// The next response within `wait`; Err says what came instead.
    pub async fn try_recv(&mut self, wait: Duration) -> Result<DiscoveryResponse, String> {
        match tokio::time::timeout(wait, self.rx.next()).await {
            Ok(Some(Ok(response))) => Ok(response),
            Ok(Some(Err(status))) => Err(format!("the ADS stream failed: {status}")),
            Ok(None) => Err("the ADS stream ended".to_owned()),
            Err(_) => Err(format!("no ADS response within {wait:?}")),
        }
    }
}

// ---------------------------------------------------------------------------
// The server.

/// Canned xDS resources: type URL → resource name → resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources(HashMap<String, BTreeMap<String, Any>>);

impl Resources {
    /// None.
    pub fn new() -> Resources {
        Resources::default()
    }

    /// Adds (or replaces) `resource` under `name`, filed by its own type URL.
    pub fn insert(&mut self, name: impl Into<String>, resource: Any) -> &mut Resources {
        self.0
            .entry(resource.type_url.clone())
            .or_default()
            .insert(name.into(), resource);
        self
    }

    /// [`Resources::insert`] for building.
    pub fn with(mut self, name: impl Into<String>, resource: Any) -> Resources {
        self.insert(name, resource);
        self
    }

    /// One service as an xDS client resolves it: the listener `listener` → the
    /// route config `route_config` (one virtual host for `domains`, one route
    /// `default` for any path) → the round-robin HTTP/1.1 cluster `cluster` (its own
    /// EDS name) → one endpoint at `endpoint`.
    pub fn one_service(
        listener: &str,
        route_config: &str,
        domains: &[&str],
        cluster: &str,
        endpoint: SocketAddr,
    ) -> Resources {
        use crate::snapshot::xds;
        Resources::new()
            .with(listener, xds::listener(listener, route_config))
            .with(
                route_config,
                xds::route_config(route_config, domains, "default", &[(cluster, 0)]),
            )
            .with(cluster, xds::cluster(cluster, cluster))
            .with(
                cluster,
                xds::endpoints(cluster, endpoint, Default::default(), &[]),
            )
    }

    /// Removes `name` of `type_url`.
    pub fn remove(&mut self, type_url: &str, name: &str) -> Option<Any> {
        self.0.get_mut(type_url)?.remove(name)
    }

    /// The resource `name` of `type_url`.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&Any> {
        self.0.get(type_url)?.get(name)
    }
}

/// What a server serves: its resources, and how often [`AdsServer::update`] changed
/// them (the version is `<version>.<updates>` after the first update).
#[derive(Debug, Clone, Default)]
struct Served {
    resources: Resources,
    updates: u64,
}

/// What every stream of a server shares.
#[derive(Clone)]
struct Service {
    served: watch::Receiver<Served>,
    version: String,
    log: mpsc::UnboundedSender<DiscoveryRequest>,
    kill: watch::Receiver<bool>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let mut this = self.clone();
        tokio::spawn(async move {
            // Per type URL: the names of its current subscription.
            let mut subscribed: HashMap<String, Vec<String>> = HashMap::new();
            let mut nonce = 0u64;
            loop {
                let types: Vec<String> = tokio::select! {
                    msg = inbound.message() => {
                        let Ok(Some(req)) = msg else { return };
                        let _ = this.log.send(req.clone());
                        let mut names = req.resource_names.clone();
                        names.sort();
                        if subscribed.get(&req.type_url) == Some(&names) {
                            continue; // an ACK or a NACK
                        }
                        subscribed.insert(req.type_url.clone(), names);
                        vec![req.type_url]
                    }
                    changed = this.served.changed() => {
                        if changed.is_err() {
                            return; // the server is gone
                        }
                        subscribed.keys().cloned().collect()
                    }
                    _ = async { let _ = this.kill.wait_for(|k| *k).await; } => {
                        let _ = tx.send(Err(Status::unavailable("server killed"))).await;
                        return;
                    }
                };
                for type_url in types {
                    nonce += 1;
                    let response = this.response(&type_url, &subscribed[&type_url], nonce);
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented("delta"))
    }
}

impl Service {
    /// The resources of `names` of `type_url` this server has, as of now.
    fn response(&mut self, type_url: &str, names: &[String], nonce: u64) -> DiscoveryResponse {
        let served = self.served.borrow_and_update();
        DiscoveryResponse {
            version_info: match served.updates {
                0 => self.version.clone(),
                n => format!("{}.{n}", self.version),
            },
            resources: names
                .iter()
                .filter_map(|n| served.resources.get(type_url, n).cloned())
                .collect(),
            type_url: type_url.to_owned(),
            nonce: nonce.to_string(),
            ..DiscoveryResponse::default()
        }
    }
}

/// An ADS server of canned [`Resources`] on 127.0.0.1 (see the module docs).
///
/// Each stream answers a request whose names differ from the last of its type with
/// the named resources the server has (a state-of-the-world response: the names it
/// lacks are left out), takes a request with the same names as an ACK or NACK, and
/// answers every subscription again after [`AdsServer::update`]. Dropping the server
/// ends every stream with UNAVAILABLE and stops it.
pub struct AdsServer {
    addr: SocketAddr,
    served: watch::Sender<Served>,
    log: mpsc::UnboundedReceiver<DiscoveryRequest>,
    kill: watch::Sender<bool>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl AdsServer {
    /// Serves `resources` as `version` on 127.0.0.1 (a free port).
    pub async fn start(resources: Resources, version: &str) -> AdsServer {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(e) => panic!("binding an ADS server: {e}"),
        };
        AdsServer::start_on(listener, resources, version)
    }

    /// [`AdsServer::start`] on `listener` (to restart a server on the same port).
    pub fn start_on(listener: TcpListener, resources: Resources, version: &str) -> AdsServer {
        let addr = match listener.local_addr() {
            Ok(addr) => addr,
            Err(e) => panic!("the ADS server's address: {e}"),
        };
        AdsServer::serve(addr, TcpListenerStream::new(listener), resources, version)
    }

    /// [`AdsServer::start`] over TLS with `config` (its certificate, and a client
    /// verifier for mTLS); ALPN `h2` is added. A failed handshake is the client's to
    /// report.
    pub async fn start_tls(
        resources: Resources,
        version: &str,
        mut config: rustls::ServerConfig,
    ) -> AdsServer {
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(e) => panic!("binding an ADS server: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(addr) => addr,
            Err(e) => panic!("the ADS server's address: {e}"),
        };
        let (conns_tx, conns_rx) = mpsc::channel::<Result<tls::Conn, std::io::Error>>(4);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let conns = conns_tx.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = conns.send(Ok(tls::Conn(stream))).await;
                    }
                });
            }
        });
        AdsServer::serve(addr, ReceiverStream::new(conns_rx), resources, version)
    }

    fn serve<S, IO>(addr: SocketAddr, incoming: S, resources: Resources, version: &str) -> AdsServer
    where
        S: Stream<Item = Result<IO, std::io::Error>> + Send + 'static,
        IO: tonic::transport::server::Connected
            + tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + Unpin
            + Send
            + 'static,
    {
        let (served, served_rx) = watch::channel(Served {
            resources,
            updates: 0,
        });
        let (log_tx, log) = mpsc::unbounded_channel();
        let (kill, kill_rx) = watch::channel(false);
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let service = Service {
            served: served_rx,
            version: version.to_owned(),
            log: log_tx,
            kill: kill_rx,
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = shutdown_rx.await;
                })
                .await;
        });
        AdsServer {
            addr,
            served,
            log,
            kill,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the resources and pushes every stream's subscriptions again, with
    /// the version `<version>.<n>` for the n-th update.
    pub fn update(&self, change: impl FnOnce(&mut Resources)) {
        self.served.send_modify(|served| {
            change(&mut served.resources);
            served.updates += 1;
        });
    }

    /// Waits (at most [`DEADLINE`]) for a logged request matching `pred`; the
    /// requests before it are consumed.
    pub async fn request_where(
        &mut self,
        pred: impl Fn(&DiscoveryRequest) -> bool,
    ) -> DiscoveryRequest {
        within("a matching request at the ADS server", async {
            loop {
                let Some(req) = self.log.recv().await else {
                    panic!("the ADS server's log closed");
                };
                if pred(&req) {
                    return req;
                }
            }
        })
        .await
    }

    /// Ends every stream with UNAVAILABLE and stops the server; the port is free
    /// after. Returns the address, to start another server there.
    pub async fn kill(mut self) -> SocketAddr {
        let _ = self.kill.send(true);
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(e) = within("the ADS server to stop", task).await
        {
            panic!("the ADS server failed: {e}");
        }
        self.addr
    }
}

impl Drop for AdsServer {
    fn drop(&mut self) {
        let _ = self.kill.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A TLS connection tonic's server can take.
mod tls {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_rustls::server::TlsStream;

    pub(super) struct Conn(pub(super) TlsStream<tokio::net::TcpStream>);

    impl tonic::transport::server::Connected for Conn {
        type ConnectInfo = ();
        fn connect_info(&self) {}
    }

    impl AsyncRead for Conn {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Conn {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::xds::{LISTENER_TYPE, ROUTE_CONFIG_TYPE};

    use super::*;
    use crate::snapshot::xds::listener;

    #[tokio::test]
    async fn the_client_and_server_speak_sotw_with_acks_updates_and_a_kill() {
        let resources = Resources::new().with("a", listener("a", "rc-a"));
        let mut server = AdsServer::start(resources, "v1").await;
        let node = node("n-1")
            .namespace("shop")
            .labels(&[("app", "catalog")])
            .build();
        let mut ads = AdsClient::connect(server.addr(), node).await;

        // A subscription gets the named resources the server has, no others.
        ads.subscribe(LISTENER_TYPE, &["a", "missing"]).await;
        let first = ads.recv().await;
        assert_eq!(
            (first.version_info.as_str(), first.resources.len()),
            ("v1", 1)
        );
        let logged = server.request_where(|r| r.type_url == LISTENER_TYPE).await;
        let metadata = logged.node.unwrap().metadata.unwrap();
        assert!(
            metadata.fields.contains_key("NAMESPACE") && metadata.fields.contains_key("LABELS")
        );

        // An ACK is not answered; a NACK is logged with its reason.
        ads.send(LISTENER_TYPE, &["a", "missing"], "v1", &first.nonce, None)
            .await;
        ads.send(
            LISTENER_TYPE,
            &["a", "missing"],
            "v1",
            &first.nonce,
            Some("bad"),
        )
        .await;
        let nack = server.request_where(|r| r.error_detail.is_some()).await;
        assert_eq!(nack.error_detail.unwrap().message, "bad");
        assert!(ads.try_recv(Duration::from_millis(100)).await.is_err());

        // An update pushes every subscription again, with a new version.
        ads.subscribe(ROUTE_CONFIG_TYPE, &["rc-a"]).await;
        assert!(ads.recv().await.resources.is_empty());
        server.update(|r| {
            r.insert("missing", listener("missing", "rc-b"));
        });
        let mut pushed = vec![ads.recv().await, ads.recv().await];
        pushed.sort_by(|a, b| a.type_url.cmp(&b.type_url));
        assert_eq!(pushed[0].version_info, "v1.1");
        assert_eq!(pushed[0].resources.len(), 2, "{pushed:?}");

        // A kill ends the stream with UNAVAILABLE.
        server.kill().await;
        let error = ads.try_recv(DEADLINE).await.unwrap_err();
        assert!(error.contains("server killed"), "{error}");
    }
}
