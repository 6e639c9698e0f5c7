//! The client against a tiny in-test ADS server over real sockets on
//! 127.0.0.1: sync, missing listeners, NACKs, server fallback, reconnect and
//! re-subscribe, the static-stability cache, and task shutdown.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures_util::Stream;
use mesh_core::model::{
    Cluster, ClusterLoadAssignment, Endpoint, LbPolicy, Listener, Locality, LocalityEndpoints,
    Name, Protocol, Route, RouteConfig, RouteMatch, VirtualHost, WeightedClusters,
};
use mesh_core::route::RequestView;
use mesh_core::snapshot::ListenerLookup;
use mesh_core::xds::{self, Any, ResourceType};
use mesh_xds_client::{Bootstrap, ClientOptions, ErrorKind, XdsClient};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const DEADLINE: Duration = Duration::from_secs(10);
const LISTENER: &str = "catalog:8080";
const FQDN_PORT: &str = "catalog.default.svc.cluster.local:8080";
const CLUSTER: &str = "outbound|8080||catalog.default.svc.cluster.local";

/// The canned resources: type URL → name → resource.
type Resources = HashMap<&'static str, BTreeMap<String, Any>>;

fn resources(endpoint: SocketAddr) -> Resources {
    let mut r = Resources::new();
    r.entry(xds::LISTENER_TYPE).or_default().insert(
        LISTENER.into(),
        xds::encode_listener(&Listener {
            name: LISTENER.into(),
            route_config_name: FQDN_PORT.into(),
        }),
    );
    r.entry(xds::ROUTE_CONFIG_TYPE).or_default().insert(
        FQDN_PORT.into(),
        xds::encode_route_config(&RouteConfig {
            name: FQDN_PORT.into(),
            virtual_hosts: Arc::from([VirtualHost {
                name: FQDN_PORT.into(),
                domains: Arc::from([Name::from("catalog"), Name::from("catalog:8080")]),
                routes: Arc::from([Route {
                    name: "default".into(),
                    matcher: RouteMatch::any(),
                    action: WeightedClusters::single(CLUSTER),
                    policy: Default::default(),
                }]),
            }]),
        }),
    );
    r.entry(xds::CLUSTER_TYPE).or_default().insert(
        CLUSTER.into(),
        xds::encode_cluster(&Cluster {
            eds_service_name: CLUSTER.into(),
            lb_policy: LbPolicy::RoundRobin,
            ..Cluster::new(CLUSTER, Protocol::Http1)
        }),
    );
    r.entry(xds::ENDPOINT_TYPE).or_default().insert(
        CLUSTER.into(),
        xds::encode_endpoints(
            &ClusterLoadAssignment::new(
                CLUSTER.into(),
                vec![LocalityEndpoints {
                    locality: Locality::default(),
                    weight: 1,
                    priority: 0,
                    endpoints: Arc::from([Endpoint {
                        address: endpoint,
                        weight: 1,
                        labels: Arc::from([]),
                    }]),
                }],
            )
            .unwrap(),
        ),
    );
    r
}

/// A state-of-the-world ADS server that answers every change of
/// `resource_names` with the named resources it has, and logs requests.
#[derive(Clone)]
struct TestAds {
    resources: Arc<Resources>,
    version: String,
    log: mpsc::UnboundedSender<DiscoveryRequest>,
    kill: watch::Receiver<bool>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for TestAds {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let mut kill = self.kill.clone();
        tokio::spawn(async move {
            let mut last: HashMap<String, Vec<String>> = HashMap::new();
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    msg = inbound.message() => {
                        let Ok(Some(req)) = msg else { return };
                        let _ = this.log.send(req.clone());
                        let mut names = req.resource_names.clone();
                        names.sort();
                        if last.get(&req.type_url) == Some(&names) {
                            continue; // an ACK or NACK
                        }
                        last.insert(req.type_url.clone(), names.clone());
                        nonce += 1;
                        let have = this.resources.get(req.type_url.as_str());
                        let resources = names
                            .iter()
                            .filter_map(|n| have.and_then(|h| h.get(n)).cloned())
                            .collect();
                        let resp = DiscoveryResponse {
                            version_info: this.version.clone(),
                            resources,
                            type_url: req.type_url.clone(),
                            nonce: nonce.to_string(),
                            ..DiscoveryResponse::default()
                        };
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                    _ = async { let _ = kill.wait_for(|k| *k).await; } => {
                        let _ = tx.send(Err(Status::unavailable("server killed"))).await;
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

struct RunningServer {
    addr: SocketAddr,
    log: mpsc::UnboundedReceiver<DiscoveryRequest>,
    kill: watch::Sender<bool>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn serve_on(listener: TcpListener, resources: Resources, version: &str) -> RunningServer {
    let addr = listener.local_addr().unwrap();
    let (log_tx, log) = mpsc::unbounded_channel();
    let (kill, kill_rx) = watch::channel(false);
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let svc = TestAds {
        resources: Arc::new(resources),
        version: version.to_owned(),
        log: log_tx,
        kill: kill_rx,
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(svc))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = shutdown_rx.await;
            })
            .await;
    });
    RunningServer {
        addr,
        log,
        kill,
        shutdown: Some(shutdown),
        task,
    }
}

async fn serve(resources: Resources, version: &str) -> RunningServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_on(listener, resources, version).await
}

impl RunningServer {
    /// Ends every stream with UNAVAILABLE and stops the server; the port is free after.
    async fn kill(mut self) -> SocketAddr {
        let _ = self.kill.send(true);
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        timeout(DEADLINE, &mut self.task).await.unwrap().unwrap();
        self.addr
    }

    /// Waits for a logged request matching `pred`.
    async fn request_where(
        &mut self,
        pred: impl Fn(&DiscoveryRequest) -> bool,
    ) -> DiscoveryRequest {
        timeout(DEADLINE, async {
            loop {
                let req = self.log.recv().await.expect("server log closed");
                if pred(&req) {
                    return req;
                }
            }
        })
        .await
        .expect("no matching request in time")
    }
}

fn options() -> ClientOptions {
    ClientOptions::default()
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
        .connect_timeout(Duration::from_secs(2))
}

fn bootstrap(addr: SocketAddr) -> Bootstrap {
    Bootstrap::builder(addr.to_string(), "test-client")
        .namespace("default")
        .build()
        .unwrap()
}

fn backend() -> SocketAddr {
    ([127, 0, 0, 1], 41000).into()
}

/// A port nothing listens on.
async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Waits until `cond` holds for the client's snapshot.
async fn until(client: &XdsClient, cond: impl Fn(&mesh_core::Snapshot) -> bool) {
    let mut changes = client.changes();
    timeout(DEADLINE, async {
        loop {
            changes.borrow_and_update();
            if cond(&client.snapshot()) {
                return;
            }
            changes.changed().await.expect("client task ended");
        }
    })
    .await
    .expect("condition not met in time");
}

#[tokio::test]
async fn wait_for_listener_syncs_the_cascade_and_the_snapshot_routes() {
    let mut server = serve(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr), options());
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .expect("timed out")
        .expect("listener should sync");

    let snapshot = client.snapshot();
    let ListenerLookup::Found(listener) = snapshot.listener_for(LISTENER) else {
        panic!("listener not found");
    };
    let (method, uri, headers) = (
        http::Method::GET,
        "/items".parse::<http::Uri>().unwrap(),
        http::HeaderMap::new(),
    );
    let resolved = snapshot
        .resolve(
            listener,
            &RequestView::new(&method, &uri, &headers, LISTENER),
            7,
        )
        .unwrap();
    assert_eq!(&*resolved.cluster.name, CLUSTER);
    assert_eq!(
        resolved.endpoints.localities[0].endpoints[0].address,
        backend()
    );
    assert_eq!(&*snapshot.versions.listeners, "v1");
    assert!(*client.changes().borrow() > 0);
    assert_eq!(client.connected_server(), Some(server.addr.to_string()));
    assert!(client.last_error().is_none());

    // The server saw the node once, and ACKs for every type.
    let first = server.request_where(|_| true).await;
    let node = first.node.expect("node on the first request");
    assert_eq!(node.id, "test-client");
    assert_eq!(node.user_agent_name, "proxyless-rust");
    for t in ResourceType::ALL {
        let ack = server
            .request_where(|r| r.type_url == t.type_url() && r.version_info == "v1")
            .await;
        assert!(ack.error_detail.is_none());
        assert!(ack.node.is_none());
    }
    // Subscribing again is a no-op, and a second wait returns at once.
    client.subscribe(LISTENER);
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_listener_the_server_does_not_have_fails_fast_with_its_name() {
    let server = serve(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr), options());
    let err = timeout(DEADLINE, client.wait_for_listener("nope:80"))
        .await
        .expect("a missing listener must not wait for a timeout")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let msg = err.to_string();
    assert!(msg.contains("\"nope:80\""), "{msg}");
    assert!(
        msg.contains("does not exist on the control server"),
        "{msg}"
    );
    assert!(msg.contains(&server.addr.to_string()), "{msg}");
    // Other listeners are unaffected.
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn an_invalid_listener_is_nacked_and_the_wait_fails_with_the_reason() {
    let mut r = resources(backend());
    r.entry(xds::LISTENER_TYPE).or_default().insert(
        "broken".into(),
        Any {
            type_url: xds::LISTENER_TYPE.into(),
            value: ListenerProto {
                name: "broken".into(),
                ..ListenerProto::default()
            }
            .encode_to_vec(),
        },
    );
    let mut server = serve(r, "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr), options());
    let err = timeout(DEADLINE, client.wait_for_listener("broken"))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.to_string().contains("\"broken\""), "{err}");
    let nack = server.request_where(|r| r.error_detail.is_some()).await;
    assert_eq!(nack.type_url, xds::LISTENER_TYPE);
    assert_eq!(nack.version_info, "", "nothing accepted before");
    assert!(nack.error_detail.unwrap().message.contains("\"broken\""));
}

#[tokio::test]
async fn the_next_server_is_used_when_the_first_is_down() {
    let dead = dead_port().await;
    let server = serve(resources(backend()), "v1").await;
    let b = Bootstrap::builder(dead.to_string(), "test-client")
        .server(server.addr.to_string())
        .build()
        .unwrap();
    let client = XdsClient::start_with(b, options());
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.connected_server(), Some(server.addr.to_string()));
}

#[tokio::test]
async fn the_client_reconnects_to_a_restarted_server_and_resubscribes_with_versions() {
    let server = serve(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr), options());
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();

    let addr = server.kill().await;
    // The old config stays while the server is away.
    assert!(matches!(
        client.snapshot().listener_for(LISTENER),
        ListenerLookup::Found(_)
    ));
    let mut restarted = serve_on(
        TcpListener::bind(addr).await.unwrap(),
        resources(backend()),
        "v2",
    )
    .await;

    let lds = restarted
        .request_where(|r| r.type_url == xds::LISTENER_TYPE)
        .await;
    assert_eq!(lds.resource_names, [LISTENER]);
    assert_eq!(
        lds.version_info, "v1",
        "re-subscribes with the last accepted version"
    );
    assert_eq!(
        lds.response_nonce, "",
        "a new stream starts without a nonce"
    );
    assert!(lds.node.is_some());
    until(&client, |s| {
        &*s.versions.listeners == "v2" && &*s.versions.endpoints == "v2"
    })
    .await;
    assert!(client.last_error().is_none());
}

#[tokio::test]
async fn pre_warmed_listeners_sync_without_a_subscribe_call() {
    let server = serve(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr), options().listeners([LISTENER]));
    until(&client, |s| s.endpoints.contains_key(CLUSTER)).await;
}

#[tokio::test]
async fn the_cache_serves_the_last_good_config_when_no_server_answers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("xds.cache");
    let server = serve(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr), options().cache_file(&cache));
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();
    drop(client);
    server.kill().await;

    let dead = dead_port().await;
    let client = XdsClient::start_with(bootstrap(dead), options().cache_file(&cache));
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .expect("the cached config should be served")
        .unwrap();
    assert_eq!(
        &*client.snapshot().versions.listeners,
        "",
        "cached config has no version"
    );
    assert!(
        client
            .last_error()
            .is_some_and(|e| e.kind() == ErrorKind::Connect)
    );
}

#[tokio::test]
async fn the_task_ends_with_the_last_handle() {
    let server = serve(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr), options());
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();
    let mut changes = client.changes();
    let clone = client.clone();
    drop(client);
    clone.subscribe("still-alive");
    drop(clone);
    let ended = timeout(DEADLINE, async {
        loop {
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the task should end when the last handle is dropped"
    );
}

// ---------------------------------------------------------------------------
// TLS to the control server (channel_creds "tls").

mod tls {
    use std::io;
    use std::path::Path;
    use std::task::{Context, Poll};

    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::server::TlsStream;

    use super::*;
    use mesh_xds_client::ChannelTls;

    /// A CA, and PEM files of it and of certificates it issued.
    struct Pki {
        issuer: Issuer<'static, KeyPair>,
        ca_pem: String,
    }

    impl Pki {
        fn new() -> Pki {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_pem = params.self_signed(&key).unwrap().pem();
            Pki {
                issuer: Issuer::new(params, key),
                ca_pem,
            }
        }

        /// (certificate PEM, key PEM) for `names` (IP addresses become IP SANs).
        fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
            let key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    /// A TLS connection tonic can serve on.
    struct Conn(TlsStream<tokio::net::TcpStream>);

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

    /// The test ADS server over TLS with `cert`/`key`; with `client_ca`,
    /// a client certificate of that CA is required.
    async fn serve_tls(
        resources: Resources,
        cert: &str,
        key: &str,
        client_ca: Option<&str>,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<DiscoveryRequest>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conns_tx, conns_rx) = mpsc::channel::<Result<Conn, io::Error>>(4);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let conns = conns_tx.clone();
                tokio::spawn(async move {
                    // Failed handshakes are the client's to report.
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = conns.send(Ok(Conn(tls))).await;
                    }
                });
            }
        });
        let (log_tx, log) = mpsc::unbounded_channel();
        let (_kill, kill_rx) = watch::channel(false);
        let svc = TestAds {
            resources: Arc::new(resources),
            version: "tls-v1".into(),
            log: log_tx,
            kill: kill_rx,
        };
        tokio::spawn(async move {
            let _kill = _kill;
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(svc))
                .serve_with_incoming(ReceiverStream::new(conns_rx))
                .await;
        });
        (addr, log)
    }

    /// A client of the ADS server at `addr` over TLS verified with the CA
    /// file `ca_file` (no client certificate).
    fn tls_client(addr: SocketAddr, ca_file: impl AsRef<Path>) -> XdsClient {
        let bootstrap = Bootstrap::builder(addr.to_string(), "tls-client")
            .channel_tls(ca_file.as_ref())
            .build()
            .unwrap();
        XdsClient::start_with(bootstrap, options())
    }

    fn write(dir: &Path, name: &str, pem: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }

    #[tokio::test]
    async fn the_client_syncs_over_tls_verifying_the_server_by_ip_san() {
        let pki = Pki::new();
        let (cert, key) = pki.leaf(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
        let (addr, mut log) = serve_tls(resources(backend()), &cert, &key, None).await;
        let dir = tempfile::tempdir().unwrap();
        let ca = write(dir.path(), "root-cert.pem", &pki.ca_pem);
        let client = tls_client(addr, &ca);
        timeout(DEADLINE, client.wait_for_listener(LISTENER))
            .await
            .expect("timed out")
            .expect("listener should sync over TLS");
        assert!(client.snapshot().clusters.contains_key(CLUSTER));
        let first = timeout(DEADLINE, log.recv()).await.unwrap().unwrap();
        assert_eq!(first.node.unwrap().id, "tls-client");
    }

    #[tokio::test]
    async fn a_client_certificate_is_presented_when_configured() {
        let pki = Pki::new();
        let (cert, key) = pki.leaf(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
        let (addr, _log) = serve_tls(resources(backend()), &cert, &key, Some(&pki.ca_pem)).await;
        let (client_cert, client_key) =
            pki.leaf(&["workload"], ExtendedKeyUsagePurpose::ClientAuth);
        let dir = tempfile::tempdir().unwrap();
        let ca = write(dir.path(), "root-cert.pem", &pki.ca_pem);
        let cert_file = write(dir.path(), "cert.pem", &client_cert);
        let key_file = write(dir.path(), "key.pem", &client_key);
        let bootstrap = Bootstrap::builder(addr.to_string(), "tls-client")
            .channel_credentials(ChannelTls::new(&ca).with_identity(&cert_file, &key_file))
            .build()
            .unwrap();
        let client = XdsClient::start_with(bootstrap, options());
        timeout(DEADLINE, client.wait_for_listener(LISTENER))
            .await
            .expect("timed out")
            .expect("listener should sync with a client certificate");
    }

    /// Waits for the client's last error to contain `needle`.
    async fn error_containing(client: &XdsClient, needle: &str) -> String {
        timeout(DEADLINE, async {
            loop {
                if let Some(e) = client.last_error() {
                    let msg = e.to_string();
                    if msg.contains(needle) {
                        assert_eq!(e.kind(), ErrorKind::Connect, "{msg}");
                        return msg;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no error with {needle:?}: {:?}", client.last_error()))
    }

    #[tokio::test]
    async fn a_server_certificate_of_another_ca_fails_verification() {
        let pki = Pki::new();
        let (cert, key) = pki.leaf(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
        let (addr, _log) = serve_tls(resources(backend()), &cert, &key, None).await;
        let dir = tempfile::tempdir().unwrap();
        let other = write(dir.path(), "other-root.pem", &Pki::new().ca_pem);
        let client = tls_client(addr, &other);
        let msg = error_containing(&client, "certificate verification failed").await;
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(msg.contains("other-root.pem"), "{msg}");
        assert!(client.snapshot().listeners.is_empty());

        // A certificate of the right CA for another name fails too.
        let (cert, key) = pki.leaf(&["10.9.9.9"], ExtendedKeyUsagePurpose::ServerAuth);
        let (addr, _log) = serve_tls(resources(backend()), &cert, &key, None).await;
        let ca = write(dir.path(), "root-cert.pem", &pki.ca_pem);
        let client = tls_client(addr, &ca);
        let msg = error_containing(&client, "certificate verification failed").await;
        assert!(msg.contains("valid for 127.0.0.1"), "{msg}");
    }

    #[tokio::test]
    async fn a_missing_ca_file_is_a_clear_error() {
        let addr = dead_port().await;
        let client = tls_client(addr, "/nonexistent/root-cert.pem");
        let msg = error_containing(&client, "cannot read ca_certificate_file").await;
        assert!(msg.contains("/nonexistent/root-cert.pem"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        let empty = write(dir.path(), "empty.pem", "not a certificate\n");
        let client = tls_client(addr, &empty);
        error_containing(&client, "holds no PEM CERTIFICATE block").await;
    }
}
