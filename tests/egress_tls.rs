//! Egress with TLS origination (issue 16, acceptance 3b) over real sockets:
//! Istio YAML → embedded mesh-control → ADS → `XdsClient` → `proxyless::Client`
//! → a rustls HTTPS server on 127.0.0.1 standing in for `api.example.com`.
//!
//! The app calls `http://api.example.com/charge` in plaintext; a ServiceEntry
//! names the external host (its port 80 is the endpoint's TLS port) and a
//! DestinationRule `tls.mode: SIMPLE` makes the mesh originate TLS with the SNI
//! and verify the server: against `caCertificates` (a test CA written to a
//! file), or, without it, against the system's roots. The backend records the
//! SNI of every ClientHello, whether any connection arrived in plaintext, and
//! each HTTP request it served, so every test says what the server saw:
//!
//! 1. the call gets the backend's answer, and the backend saw SNI
//!    `api.example.com` over TLS;
//! 2. a certificate for another name fails the call, naming the name
//!    mismatch, counted `UF` in Istio's metrics, with no HTTP request served;
//! 3. a DestinationRule `sni` the certificate is not for fails closed the same
//!    way (the backend saw that SNI);
//! 4. without `caCertificates` the system's roots are used, which do not
//!    include the test CA: unknown issuer, and never plaintext; and they are
//!    the OS trust store: with `SSL_CERT_FILE` naming the test CA (in a
//!    child process, as the store is read once per process) the same rule
//!    verifies the backend;
//! 5. it is an ordinary cluster: a VirtualService's retries (a 503, then a 200:
//!    one call, two attempts, counted in `proxyless_retries`) and timeouts
//!    (`504`, `UT`) apply.

mod support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_control::ServerHandle;
use mesh_testkit::pki::{self, Leaf, TestCa};
use mesh_testkit::prometheus;
use proxyless::telemetry::{Identity, MetricsRegistry, Telemetry};
use proxyless::{Bootstrap, Client, XdsClient};
use tokio::net::TcpListener;
use tokio_rustls::LazyConfigAcceptor;
use tower::ServiceExt;

/// The namespace of the app and of the config.
const NAMESPACE: &str = "shop";
/// The external host the app calls.
const API: &str = "api.example.com";
/// The cluster of `API`'s port 80.
const CLUSTER: &str = "outbound|80||api.example.com";

// ---------------------------------------------------------------------------
// The external HTTPS server.

/// What the backend saw.
#[derive(Default)]
struct Seen {
    /// The SNI of every ClientHello (`None`: none sent).
    sni: Mutex<Vec<Option<String>>>,
    /// Connections whose first byte was not a TLS handshake record.
    plaintext: AtomicUsize,
    /// `path x-envoy-attempt-count` of every HTTP request served.
    requests: Mutex<Vec<String>>,
}

impl Seen {
    fn sni(&self) -> Vec<Option<String>> {
        self.sni.lock().unwrap().clone()
    }
    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// A TLS server (HTTP/1.1) presenting `leaf`. `/slow` answers after 5 s; other
/// paths answer the next status of `script`, then `200`, with the body `charged`.
async fn backend(leaf: &Leaf, script: &[u16]) -> (SocketAddr, Arc<Seen>) {
    let mut config = pki::server_config(leaf, None);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
    let state = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (config, seen, script) = (config.clone(), state.clone(), script.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if tcp.peek(&mut first).await.ok() != Some(1) {
                    return;
                }
                if first[0] != 0x16 {
                    seen.plaintext.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
                let Ok(start) = acceptor.await else {
                    return;
                };
                let sni = start.client_hello().server_name().map(str::to_owned);
                seen.sni.lock().unwrap().push(sni);
                let Ok(tls) = start.into_stream(config).await else {
                    return;
                };
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (seen, script) = (seen.clone(), script.clone());
                    async move {
                        let attempt = req
                            .headers()
                            .get("x-envoy-attempt-count")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        seen.requests
                            .lock()
                            .unwrap()
                            .push(format!("{} {attempt}", req.uri().path()));
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        let status = script.lock().unwrap().pop_front().unwrap_or(200);
                        let mut response = Response::new(Full::new(Bytes::from("charged")));
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

// ---------------------------------------------------------------------------
// The mesh.

/// The ServiceEntry of `API` (MESH_EXTERNAL, STATIC at 127.0.0.1; port 80's
/// `targetPort` is the backend's TLS port), its DestinationRule with `tls`
/// (YAML under `tls:`) for port 80 (`portLevelSettings`, as in Istio's
/// "Egress TLS Origination" task) and a VirtualService whose
/// `/charge` route retries a 503 once and whose `/slow` route times out after
/// 300 ms.
fn mesh_yaml(backend: SocketAddr, tls: &str) -> String {
    let tls: String = tls.lines().map(|l| format!("        {l}\n")).collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: {NAMESPACE}}}
spec:
  hosts: [{API}]
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
    targetPort: {port}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: {NAMESPACE}}}
spec:
  host: {API}
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls:
{tls}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: {NAMESPACE}}}
spec:
  hosts: [{API}]
  http:
  - match: [{{uri: {{prefix: /slow}}}}]
    timeout: 300ms
    retries: {{attempts: 0}}
    route: [{{destination: {{host: {API}}}}}]
  - route: [{{destination: {{host: {API}}}}}]
    timeout: 5s
    retries:
      attempts: 1
      retryOn: 5xx
      perTryTimeout: 2s
",
        port = backend.port()
    )
}

/// mesh-control on one YAML file, and a client in `shop` with Istio's metrics.
struct Mesh {
    _server: ServerHandle,
    xds: XdsClient,
    client: proxyless::TracedClient,
    registry: MetricsRegistry,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start(yaml: &str) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
        let server = mesh_control::Server::builder()
            .config_dir(dir.path())
            .start()
            .await
            .expect("start mesh-control");
        let status = server.status();
        assert_eq!(
            status["diagnostics"],
            serde_json::json!([]),
            "mesh-control rejects the test's YAML:\n{yaml}\nstatus: {status:#}"
        );
        let json = server.bootstrap_json("checkout-1", NAMESPACE);
        let xds = XdsClient::start(Bootstrap::from_json(&json).expect("bootstrap"));
        let registry = MetricsRegistry::new();
        let telemetry = Telemetry::builder(Identity::new("checkout", NAMESPACE))
            .metrics(&registry)
            .build();
        let client = Client::new(xds.clone()).with_telemetry(telemetry);
        Mesh {
            _server: server,
            xds,
            client,
            registry,
            _dir: dir,
        }
    }

    /// `GET http://api.example.com{path}`: the status and body, or the error.
    async fn get(&self, path: &str) -> Result<(StatusCode, String), String> {
        let request = Request::get(format!("http://{API}{path}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        match self.client.clone().oneshot(request).await {
            Ok(response) => {
                let status = response.status();
                let body = response.into_body().collect().await.expect("body");
                Ok((
                    status,
                    String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                ))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// `istio_requests_total` of the client's calls to `API` whose
    /// `response_flags` include `flag` (`-`: none).
    fn requests(&self, flag: &str) -> f64 {
        prometheus::parse(&self.registry.render())
            .iter()
            .filter(|s| s.name == "istio_requests_total")
            .filter(|s| s.label("reporter") == "source" && s.label("destination_service") == API)
            .filter(|s| s.label("response_flags").split(',').any(|f| f == flag))
            .map(|s| s.value)
            .sum()
    }

    /// The client's cluster of `API`, as delivered over xDS.
    fn cluster(&self) -> proxyless::mesh_core::model::Cluster {
        let snapshot = self.xds.snapshot();
        let cluster = snapshot.clusters.get(CLUSTER);
        (**cluster.unwrap_or_else(|| panic!("cluster {CLUSTER} at the client"))).clone()
    }
}

/// The DestinationRule `tls` of SIMPLE with the test CA's file.
fn simple_with_ca(dir: &Path, ca: &TestCa, sni: &str) -> String {
    let ca_file = pki::write_pem(dir, "ca.pem", &ca.pem);
    format!(
        "mode: SIMPLE\ncaCertificates: {}\nsni: {sni}",
        ca_file.display()
    )
}

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_originates_tls_with_the_sni_to_the_external_api() {
    let files = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("payments provider root");
    let (addr, seen) = backend(&ca.leaf_for(&[API]), &[]).await;
    let mesh = Mesh::start(&mesh_yaml(addr, &simple_with_ca(files.path(), &ca, API))).await;

    assert_eq!(
        mesh.get("/charge").await,
        Ok((StatusCode::OK, "charged".to_string()))
    );
    assert_eq!(seen.sni(), [Some(API.to_string())]);
    assert_eq!(seen.requests(), ["/charge 1"]);
    assert_eq!(seen.plaintext.load(Ordering::SeqCst), 0);
    assert_eq!(mesh.requests("-"), 1.0);
    // A second call: the same, over the pooled connection or a new one
    // (whichever the pool has ready), each one verified with the SNI.
    assert_eq!(
        mesh.get("/charge").await,
        Ok((StatusCode::OK, "charged".to_string()))
    );
    assert_eq!(seen.requests(), ["/charge 1", "/charge 1"]);
    assert!(seen.sni().iter().all(|s| s.as_deref() == Some(API)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_fails_the_call_closed() {
    let files = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("payments provider root");
    let (addr, seen) = backend(&ca.leaf_for(&["other.example.com"]), &[]).await;
    let mesh = Mesh::start(&mesh_yaml(addr, &simple_with_ca(files.path(), &ca, API))).await;

    let e = mesh
        .get("/charge")
        .await
        .expect_err("a certificate for another name");
    println!("what the caller sees: {e}");
    assert!(
        e.contains("SIMPLE handshake with endpoint")
            && e.contains("the server's certificate is not valid for \"api.example.com\"")
            && e.contains("NotValidForName"),
        "{e}"
    );
    assert!(!seen.sni().is_empty(), "the backend saw no TLS handshake");
    assert!(seen.sni().iter().all(|s| s.as_deref() == Some(API)));
    assert_eq!(seen.requests(), Vec::<String>::new(), "no HTTP request");
    assert_eq!(seen.plaintext.load(Ordering::SeqCst), 0);
    assert_eq!(mesh.requests("UF"), 1.0, "{}", mesh.registry.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sni_fails_closed() {
    let files = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("payments provider root");
    let (addr, seen) = backend(&ca.leaf_for(&[API]), &[]).await;
    let tls = simple_with_ca(files.path(), &ca, "wrong.example.com");
    let mesh = Mesh::start(&mesh_yaml(addr, &tls)).await;

    let e = mesh.get("/charge").await.expect_err("a wrong SNI");
    println!("what the caller sees: {e}");
    assert!(
        e.contains("the server's certificate is not valid for \"wrong.example.com\"")
            && e.contains("NotValidForName"),
        "{e}"
    );
    assert!(!seen.sni().is_empty(), "the backend saw no TLS handshake");
    assert!(
        seen.sni()
            .iter()
            .all(|s| s.as_deref() == Some("wrong.example.com"))
    );
    assert_eq!(seen.requests(), Vec::<String>::new(), "no HTTP request");
    assert_eq!(mesh.requests("UF"), 1.0, "{}", mesh.registry.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ca_certificates_the_system_roots_are_used_and_a_private_ca_is_refused() {
    let ca = TestCa::new("payments provider root");
    let (addr, seen) = backend(&ca.leaf_for(&[API]), &[]).await;
    let mesh = Mesh::start(&mesh_yaml(addr, "mode: SIMPLE")).await;

    let e = mesh
        .get("/charge")
        .await
        .expect_err("the test CA is no system root");
    println!("what the caller sees: {e}");
    // The machine's trust store: its bundle (rustls-native-certs reads
    // SSL_CERT_FILE, else the distribution's), or, on a machine without one,
    // nothing at all. Either way the call fails closed and says why.
    if e.contains("UnknownIssuer") {
        assert!(
            e.contains(
                "the server's certificate is not signed by a root of the system's trust store \
                 (no caCertificates given) (UnknownIssuer)"
            ),
            "{e}"
        );
        assert!(!seen.sni().is_empty(), "the backend saw no TLS handshake");
        // No SNI or SANs given: the service host is the SNI.
        assert!(seen.sni().iter().all(|s| s.as_deref() == Some(API)));
    } else {
        let bundle = std::env::var_os("SSL_CERT_FILE").map_or_else(
            || Path::new(proxyless::mesh_core::xds::SYSTEM_CA_BUNDLE).to_path_buf(),
            Into::into,
        );
        assert!(
            !bundle.exists()
                && e.contains("no usable root certificate in the system's trust store"),
            "{e}"
        );
    }
    assert_eq!(seen.plaintext.load(Ordering::SeqCst), 0, "never plaintext");
    assert_eq!(seen.requests(), Vec::<String>::new(), "no HTTP request");
    assert_eq!(mesh.requests("UF"), 1.0, "{}", mesh.registry.render());
    // What the client was given over xDS: SIMPLE with the system's roots.
    let tls = mesh.cluster().tls.expect("the cluster has TLS");
    assert_eq!(&*tls.sni, API);
    match tls.origination {
        proxyless::mesh_core::model::TlsOrigination::Files(files) => {
            assert_eq!(files.mode(), "SIMPLE");
            assert_eq!(files.ca_certificates, None);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_timeouts_apply_to_the_tls_cluster() {
    let files = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("payments provider root");
    let (addr, seen) = backend(&ca.leaf_for(&[API]), &[503]).await;
    let mesh = Mesh::start(&mesh_yaml(addr, &simple_with_ca(files.path(), &ca, API))).await;

    // A 503, retried once: one call, two attempts.
    assert_eq!(
        mesh.get("/charge").await,
        Ok((StatusCode::OK, "charged".to_string()))
    );
    assert_eq!(seen.requests(), ["/charge 1", "/charge 2"]);
    let samples = prometheus::parse(&mesh.registry.render());
    assert_eq!(
        prometheus::total(
            &samples,
            "proxyless_retries_total",
            &[("cluster_name", CLUSTER)]
        ),
        1.0,
        "{}",
        mesh.registry.render()
    );
    assert_eq!(mesh.requests("-"), 1.0);

    // The route's 300 ms timeout: a 504 from the mesh, long before the
    // backend's 5 s answer.
    let started = Instant::now();
    let (status, _) = mesh.get("/slow").await.expect("a local reply");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(mesh.requests("UT"), 1.0, "{}", mesh.registry.render());
    // Everything went over verified TLS with the SNI.
    assert!(seen.sni().iter().all(|s| s.as_deref() == Some(API)));
    assert_eq!(seen.plaintext.load(Ordering::SeqCst), 0);
}

/// The test below run again as a child process: the address of its backend.
const CHILD_BACKEND: &str = "EGRESS_TLS_SYSTEM_ROOTS_BACKEND";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_roots_are_the_os_trust_store() {
    if let Some(addr) = std::env::var_os(CHILD_BACKEND) {
        // The child: SSL_CERT_FILE is the test CA, the system's only root.
        let addr: SocketAddr = addr.to_str().unwrap().parse().unwrap();
        let mesh = Mesh::start(&mesh_yaml(addr, "mode: SIMPLE")).await;
        assert_eq!(
            mesh.get("/charge").await,
            Ok((StatusCode::OK, "charged".to_string()))
        );
        return;
    }
    let files = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("corporate root");
    let (addr, seen) = backend(&ca.leaf_for(&[API]), &[]).await;
    let ca_file = pki::write_pem(files.path(), "corporate-ca.pem", &ca.pem);
    let exe = std::env::current_exe().expect("the test binary");
    let child = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args(["--exact", "the_system_roots_are_the_os_trust_store"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD_BACKEND, addr.to_string())
            .env("SSL_CERT_FILE", ca_file)
            .env_remove("SSL_CERT_DIR")
            .output()
            .expect("run the test binary")
    })
    .await
    .expect("the child");
    let out = String::from_utf8_lossy(&child.stdout);
    let err = String::from_utf8_lossy(&child.stderr);
    assert!(
        child.status.success() && out.contains("1 passed"),
        "the child failed:\n{out}\n{err}"
    );
    assert_eq!(seen.sni(), [Some(API.to_string())]);
    assert_eq!(seen.requests(), ["/charge 1"]);
}

// ---------------------------------------------------------------------------
// The same transport socket, read by a stock Envoy.

/// A stock Envoy whose one cluster carries the transport socket this mesh
/// encodes for `files` (`cluster_to_proto`, what mesh-control serves) towards
/// `backend`, behind a plaintext listener; `None` while it does not listen
/// (it refused the config: its log says why).
struct StaticEnvoy {
    child: std::process::Child,
    log: std::path::PathBuf,
    listen: SocketAddr,
    _dir: tempfile::TempDir,
}

impl StaticEnvoy {
    fn start(backend: SocketAddr, ca: Option<&Path>) -> StaticEnvoy {
        use envoy_types::pb::envoy::config::bootstrap::v3::{
            Bootstrap, bootstrap::StaticResources,
        };
        use envoy_types::pb::envoy::config::cluster::v3::{
            Cluster as ClusterProto,
            cluster::{ClusterDiscoveryType, DiscoveryType},
        };
        use envoy_types::pb::envoy::config::core::v3::{
            Address, SocketAddress, address, socket_address,
        };
        use envoy_types::pb::envoy::config::endpoint::v3::{
            ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
        };
        use prost::Message as _;
        use proxyless::mesh_core::model::{
            Cluster, FileTls, Protocol, TlsOrigination, UpstreamTls,
        };

        let mut cluster = Cluster::new("api", Protocol::Http1);
        cluster.tls = Some(UpstreamTls {
            sni: API.into(),
            origination: TlsOrigination::Files(FileTls {
                ca_certificates: ca.map(|p| p.to_str().unwrap().into()),
                subject_alt_names: Arc::from([]),
                client_certificate: None,
            }),
            ..UpstreamTls::default()
        });
        let transport_socket = proxyless::mesh_core::xds::cluster_to_proto(&cluster)
            .transport_socket
            .expect("a TLS transport socket");
        let socket = |addr: SocketAddr| Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: addr.ip().to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                    addr.port(),
                ))),
                ..Default::default()
            })),
        };
        let bootstrap = Bootstrap {
            static_resources: Some(StaticResources {
                clusters: vec![ClusterProto {
                    name: "api".into(),
                    cluster_discovery_type: Some(ClusterDiscoveryType::Type(
                        DiscoveryType::Static as i32,
                    )),
                    connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                        seconds: 5,
                        nanos: 0,
                    }),
                    load_assignment: Some(ClusterLoadAssignment {
                        cluster_name: "api".into(),
                        endpoints: vec![LocalityLbEndpoints {
                            lb_endpoints: vec![LbEndpoint {
                                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
                                    Endpoint {
                                        address: Some(socket(backend)),
                                        ..Default::default()
                                    },
                                )),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    transport_socket: Some(transport_socket),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("envoy.pb");
        std::fs::write(&config, bootstrap.encode_to_vec()).expect("write envoy.pb");
        let listen: SocketAddr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("addr")
        };
        // The listener in YAML, merged into the binary bootstrap by Envoy.
        let listener = format!(
            r#"static_resources:
  listeners:
  - name: app
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: app
          route_config:
            virtual_hosts:
            - name: api
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: api}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
            port = listen.port()
        );
        let log = dir.path().join("envoy.log");
        let binary = mesh_testkit::envoy::binary().unwrap_or_else(|e| panic!("{e}"));
        let child = std::process::Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .args(["--config-yaml", &listener])
            .args(["--concurrency", "1", "--log-level", "info"])
            .arg("--disable-hot-restart")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        StaticEnvoy {
            child,
            log,
            listen,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /charge` through Envoy's listener once it listens; `Err` with
    /// Envoy's log when it exited instead (a refused config).
    async fn get(&mut self) -> Result<(u16, String), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("envoy's status") {
                return Err(format!("envoy exited ({status}):\n{}", self.log()));
            }
            if tokio::net::TcpStream::connect(self.listen).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "envoy never listened:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, body) = mesh_testkit::http::get_text(self.listen, "/charge").await;
        Ok((status, body))
    }
}

impl Drop for StaticEnvoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_envoy_verifies_with_the_same_transport_socket() {
    let files = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("payments provider root");
    let ca_file = pki::write_pem(files.path(), "ca.pem", &ca.pem);

    // The CA file: Envoy verifies the backend and sends the SNI.
    let (addr, seen) = backend(&ca.leaf_for(&[API]), &[]).await;
    let mut envoy = StaticEnvoy::start(addr, Some(&ca_file));
    let answer = envoy.get().await;
    assert_eq!(answer, Ok((200, "charged".to_string())), "{}", envoy.log());
    assert_eq!(seen.sni(), [Some(API.to_string())]);
    assert_eq!(seen.requests(), ["/charge -"]);
    drop(envoy);

    // The system's roots: Envoy reads the system bundle named as trusted_ca
    // (it ignores system_root_certs) and refuses the test CA. Were it given
    // no trusted_ca, it would not verify and answer 200.
    let (addr, seen) = backend(&ca.leaf_for(&[API]), &[]).await;
    let mut envoy = StaticEnvoy::start(addr, None);
    let bundle = proxyless::mesh_core::xds::SYSTEM_CA_BUNDLE;
    match envoy.get().await {
        Ok((status, body)) => {
            assert_eq!(status, 503, "{body}\n{}", envoy.log());
            assert!(
                body.contains("CERTIFICATE_VERIFY_FAILED"),
                "{body}\n{}",
                envoy.log()
            );
            assert!(!seen.sni().is_empty(), "the backend saw no TLS handshake");
            assert_eq!(seen.requests(), Vec::<String>::new(), "no HTTP request");
        }
        // Without the bundle on this machine, Envoy refuses the cluster.
        Err(log) => assert!(!Path::new(bundle).exists() && log.contains(bundle), "{log}"),
    }
}
