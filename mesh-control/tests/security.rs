//! mesh-control with a CA, over real sockets: certificates only for the
//! identity a join token grants, authenticated and authorized
//! registration, ADS and the admin API over TLS verified with the trust
//! bundle file, and server listeners (gRFC A36) resolved from
//! PeerAuthentication for the client's workload.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use http_body_util::Full;
use hyper::body::Bytes;
use mesh_control::ca::{CertificateAuthority, JoinTokens};
use mesh_core::model::MtlsMode;
use mesh_core::xds;
use mesh_testkit::ads::AdsClient;
use mesh_testkit::http::{json_request, json_request_tls_bearer};
use mesh_testkit::pki::{self, Leaf, TestCa, csr, uri_sans};
use rustls::pki_types::ServerName;
use serde_json::json;

const CATALOG_TOKEN: &str = "catalog-token-0123456789";
const PAYMENT_TOKEN: &str = "payment-token-0123456789";
const ORDERS_TOKEN: &str = "orders-token-01234567890";

/// `catalog` is backed by the service account `catalog-sa` (WorkloadGroup);
/// `payment` by the default, the service account named `payment`.
const CONFIG: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: catalog, namespace: shop}
spec:
  template:
    serviceAccount: catalog-sa
"#;

fn tokens() -> JoinTokens {
    let mut tokens = JoinTokens::new();
    tokens
        .insert(CATALOG_TOKEN, "shop", "catalog-sa")
        .unwrap()
        .insert(PAYMENT_TOKEN, "shop", "payment")
        .unwrap()
        .insert(ORDERS_TOKEN, "shop", "orders")
        .unwrap();
    tokens
}

/// A control server with `config` and a CA honouring [`tokens`].
async fn start(config: &str) -> (tempfile::TempDir, mesh_control::ServerHandle) {
    let ca = CertificateAuthority::builder("cluster.local")
        .join_tokens(tokens())
        .build()
        .unwrap();
    start_with(config, ca).await
}

/// A control server with `config` (its mesh.yaml) and `ca`.
async fn start_with(
    config: &str,
    ca: CertificateAuthority,
) -> (tempfile::TempDir, mesh_control::ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), config).unwrap();
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .ca(ca)
        .start()
        .await
        .expect("start control server");
    (dir, server)
}

/// A client config trusting the server's bundle file, optionally
/// presenting a client certificate.
fn client_config(
    server: &mesh_control::ServerHandle,
    client_cert: Option<(&str, &str)>,
    alpn: &[u8],
) -> Arc<rustls::ClientConfig> {
    let bundle = server.trust_bundle_file().expect("a trust bundle file");
    let bundle = std::fs::read_to_string(&bundle).unwrap();
    let cert = client_cert.map(|(chain, key)| Leaf {
        chain: chain.to_owned(),
        key: key.to_owned(),
    });
    let mut config = pki::client_config(&bundle, cert.as_ref());
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// The admin API over https as one client sees it: what it trusts and the
/// client certificate it presents.
struct AdminClient {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl AdminClient {
    /// Trusting the server's bundle file as it is now.
    fn new(server: &mesh_control::ServerHandle, client_cert: Option<(&str, &str)>) -> AdminClient {
        AdminClient {
            addr: server.admin_addr(),
            tls: client_config(server, client_cert, b"http/1.1"),
        }
    }

    /// `POST /v1/certificates`.
    async fn issue(
        &self,
        bearer: Option<&str>,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        self.call("POST", "/v1/certificates", bearer, body).await
    }

    /// One request on a new connection (server name: the IP dialled).
    async fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        json_request_tls_bearer(self.addr, self.tls.clone(), method, path, bearer, &body).await
    }
}

fn registration(service: &str, port: u16) -> serde_json::Value {
    json!({
        "service": service,
        "namespace": "shop",
        "address": "127.0.0.1",
        "port": port,
        "protocol": "grpc",
        "ttl_seconds": 30,
    })
}

#[tokio::test]
async fn a_join_token_obtains_certificates_for_its_own_identity_only() {
    let (_dir, server) = start(CONFIG).await;
    let tls = AdminClient::new(&server, None);

    // A's token, a CSR asking for B: refused, naming both.
    let (b_csr, _) = csr(Some("spiffe://cluster.local/ns/shop/sa/payment"));
    let (code, body) = tls
        .issue(None, json!({"csr": b_csr, "token": CATALOG_TOKEN}))
        .await;
    assert_eq!(code, 403, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("spiffe://cluster.local/ns/shop/sa/catalog-sa")
            && error.contains("spiffe://cluster.local/ns/shop/sa/payment"),
        "{error}"
    );

    // A's token and a CSR without a SAN: a certificate for A, whatever
    // the CSR's subject says.
    let (a_csr, _) = csr(None);
    let (code, body) = tls
        .issue(
            None,
            json!({"csr": a_csr, "token": CATALOG_TOKEN, "lifetime_seconds": 600}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["spiffe_id"],
        "spiffe://cluster.local/ns/shop/sa/catalog-sa"
    );
    let chain = body["certificate_chain"].as_str().unwrap();
    assert_eq!(
        uri_sans(chain),
        vec!["spiffe://cluster.local/ns/shop/sa/catalog-sa".to_string()]
    );
    assert!(!body["serial"].as_str().unwrap().is_empty());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let not_after = body["not_after_unix"].as_u64().unwrap();
    assert!(
        not_after > now + 500 && not_after <= now + 601,
        "{not_after}"
    );
    let bundle = std::fs::read_to_string(server.trust_bundle_file().unwrap()).unwrap();
    assert_eq!(body["trust_bundle"], bundle.as_str());

    // The token in an Authorization header works too.
    let (code, body) = tls
        .issue(Some(PAYMENT_TOKEN), json!({"csr": csr(None).0}))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["spiffe_id"],
        "spiffe://cluster.local/ns/shop/sa/payment"
    );

    // An unknown token and no token: 401.
    let (code, body) = tls
        .issue(
            None,
            json!({"csr": csr(None).0, "token": "not-a-known-token-at-all"}),
        )
        .await;
    assert_eq!(code, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown join token"),
        "{body}"
    );
    let (code, body) = tls.issue(None, json!({"csr": csr(None).0})).await;
    assert_eq!(code, 401, "{body}");
    // A CSR that is not one: 400.
    let (code, body) = tls
        .issue(None, json!({"csr": "garbage", "token": CATALOG_TOKEN}))
        .await;
    assert_eq!(code, 400, "{body}");

    // The trust bundle is public.
    let (code, body) = tls.call("GET", "/v1/trust-bundle", None, json!(null)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["trust_bundle"], bundle.as_str());

    let status = server.status();
    assert_eq!(status["counters"]["certificates_issued"], 2, "{status}");
    assert_eq!(status["counters"]["certificates_denied"], 3, "{status}");
}

#[tokio::test]
async fn registration_needs_an_identity_allowed_to_back_the_service() {
    let (_dir, server) = start(CONFIG).await;
    let tls = AdminClient::new(&server, None);
    let register = |bearer: Option<&'static str>, body: serde_json::Value| {
        tls.call("POST", "/v1/endpoints", bearer, body)
    };

    // No credentials, an unknown token: 401.
    let (code, body) = register(None, registration("catalog", 9001)).await;
    assert_eq!(code, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    let (code, body) = register(
        Some("not-a-known-token-at-all"),
        registration("catalog", 9001),
    )
    .await;
    assert_eq!(code, 401, "{body}");

    // payment's identity may not back catalog (its WorkloadGroup says catalog-sa).
    let (code, body) = register(Some(PAYMENT_TOKEN), registration("catalog", 9001)).await;
    assert_eq!(code, 403, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("spiffe://cluster.local/ns/shop/sa/payment") && error.contains("catalog"),
        "{error}"
    );
    // orders may not back payment (default: the service account named like the service).
    let (code, body) = register(Some(ORDERS_TOKEN), registration("payment", 9002)).await;
    assert_eq!(code, 403, "{body}");

    // catalog-sa may.
    let (code, lease) = register(Some(CATALOG_TOKEN), registration("catalog", 9001)).await;
    assert_eq!(code, 201, "{lease}");
    let lease_id = lease["lease_id"].as_str().unwrap().to_string();

    // Another identity cannot take the same ip:port, even for its own service.
    let (code, body) = register(Some(PAYMENT_TOKEN), registration("payment", 9001)).await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("already registered"),
        "{body}"
    );
    // Nor can the same identity register the same endpoint twice.
    let (code, body) = register(Some(CATALOG_TOKEN), registration("catalog", 9001)).await;
    assert_eq!(code, 409, "{body}");

    // Only the identity that registered may renew or delete the lease.
    let path = format!("/v1/endpoints/{lease_id}");
    let (code, body) = tls
        .call("PUT", &path, Some(PAYMENT_TOKEN), json!(null))
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("catalog-sa"),
        "{body}"
    );
    let (code, body) = tls.call("PUT", &path, None, json!(null)).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = tls
        .call("DELETE", &path, Some(PAYMENT_TOKEN), json!(null))
        .await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = tls
        .call("PUT", &path, Some(CATALOG_TOKEN), json!(null))
        .await;
    assert_eq!(code, 200, "{body}");

    // A client certificate from the mesh CA identifies the caller without
    // a token: payment registers payment with its certificate.
    let (csr_pem, key_pem) = csr(None);
    let (code, cert) = tls
        .issue(None, json!({"csr": csr_pem, "token": PAYMENT_TOKEN}))
        .await;
    assert_eq!(code, 200, "{cert}");
    let mtls = AdminClient::new(
        &server,
        Some((cert["certificate_chain"].as_str().unwrap(), &key_pem)),
    );
    let (code, body) = mtls
        .call("POST", "/v1/endpoints", None, registration("payment", 9002))
        .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = mtls
        .call("POST", "/v1/endpoints", None, registration("catalog", 9003))
        .await;
    assert_eq!(code, 403, "{body}");
    // ... and cannot delete catalog's lease with it.
    let (code, body) = mtls.call("DELETE", &path, None, json!(null)).await;
    assert_eq!(code, 403, "{body}");

    let (code, body) = tls
        .call("DELETE", &path, Some(CATALOG_TOKEN), json!(null))
        .await;
    assert_eq!(code, 204, "{body}");
    let status = server.status();
    assert_eq!(status["counters"]["registrations"], 2, "{status}");
    assert!(
        status["counters"]["registrations_denied"].as_u64().unwrap() >= 7,
        "{status}"
    );
}

/// The node of a workload in `namespace` with `labels`.
fn node(namespace: &str, labels: &[(&str, &str)]) -> Node {
    mesh_testkit::ads::node("test-node")
        .namespace(namespace)
        .labels(labels)
        .build()
}

async fn tls_channel(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: &'static str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = ServerName::try_from(server_name)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
}

/// A workload certificate of `shop/catalog-sa` from the server's CA (chain,
/// key): with the CA on, ADS needs a client certificate (or a join token).
fn workload_cert(server: &mesh_control::ServerHandle) -> (String, String) {
    let id =
        mesh_core::spiffe::SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/catalog-sa").unwrap();
    let (issued, key) = server
        .ca()
        .expect("a CA")
        .issue_serving_certificate(&id, &[], &[], None)
        .unwrap();
    (issued.chain_pem, key)
}

/// A TLS channel to the server's ADS port, verified with its bundle file
/// under the name `localhost`, presenting a workload certificate of the
/// namespace `shop`.
async fn ads_channel(server: &mesh_control::ServerHandle) -> tonic::transport::Channel {
    let (chain, key) = workload_cert(server);
    tls_channel(
        server.xds_addr(),
        client_config(server, Some((&chain, &key)), b"h2"),
        "localhost",
    )
    .await
    .unwrap()
}

const SERVICE: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  resolution: STATIC
  ports:
  - {number: 80, name: grpc, protocol: GRPC}
  endpoints:
  - address: 127.0.0.1
    ports: {grpc: 9001}
"#;

fn peer_authentication(mode: &str) -> String {
    format!(
        r#"{SERVICE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: catalog, namespace: shop}}
spec:
  selector:
    matchLabels: {{app: catalog}}
  mtls: {{mode: {mode}}}
"#
    )
}

const SERVER_NAME: &str = "grpc/server?xds.resource.listening_address=127.0.0.1:9001";

/// The server listener [`SERVER_NAME`] of an LDS response, decoded.
fn server_listener(response: &DiscoveryResponse) -> mesh_core::model::ServerListener {
    let resource = response
        .resources
        .iter()
        .find(|r| xds::resource_name(r).as_deref() == Some(SERVER_NAME))
        .expect("the server listener in the response");
    xds::decode_server_listener(resource).unwrap()
}

#[tokio::test]
async fn ads_is_served_over_tls_to_clients_that_verify_the_ca() {
    let (_dir, server) = start(SERVICE).await;
    let addr = server.xds_addr();

    // The serving certificate: mesh-control's SPIFFE ID, localhost, the IP.
    let serving = server.serving_certificate_pem().unwrap();
    assert_eq!(
        uri_sans(&serving),
        vec!["spiffe://cluster.local/ns/istio-system/sa/mesh-control".to_string()]
    );

    // Verified by name (localhost) and by IP.
    let (chain, key) = workload_cert(&server);
    for name in ["localhost", "127.0.0.1"] {
        let channel = tls_channel(
            addr,
            client_config(&server, Some((&chain, &key)), b"h2"),
            name,
        )
        .await
        .expect("TLS connection to ADS");
        let mut ads = AdsClient::open(channel, node("shop", &[]))
            .await
            .expect("ADS stream");
        ads.subscribe(xds::LISTENER_TYPE, &["catalog:80"]).await;
        let response = ads.recv().await;
        assert_eq!(response.resources.len(), 1, "{response:?}");
        let listener = xds::decode_listener(&response.resources[0]).unwrap();
        assert_eq!(&*listener.name, "catalog:80");
    }

    // A client that does not trust this CA fails the handshake.
    let other = CertificateAuthority::builder("cluster.local")
        .build()
        .unwrap();
    let mut config = pki::client_config(&other.trust_bundle_pem(), None);
    config.alpn_protocols = vec![b"h2".to_vec()];
    assert!(
        tls_channel(addr, Arc::new(config), "localhost")
            .await
            .is_err()
    );

    // Plaintext gRPC gets nothing.
    let plaintext = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut ads = AdsClient::open(channel, node("shop", &[]))
            .await
            .map_err(|e| e.to_string())?;
        ads.subscribe(xds::LISTENER_TYPE, &["catalog:80"]).await;
        ads.try_recv(Duration::from_secs(5)).await.map(|_| ())
    };
    assert!(
        plaintext.await.is_err(),
        "a plaintext client must not be served"
    );

    // Plaintext HTTP to the admin API gets nothing either.
    let tcp = tokio::net::TcpStream::connect(server.admin_addr())
        .await
        .unwrap();
    let plain = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = http::Request::get("/status")
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(req).await
    };
    let result = tokio::time::timeout(Duration::from_secs(15), plain).await;
    assert!(
        !matches!(result, Ok(Ok(ref r)) if r.status().is_success()),
        "plaintext admin: {result:?}"
    );
}

#[tokio::test]
async fn server_listeners_carry_the_peer_authentication_of_the_workload() {
    let (dir, server) = start(&peer_authentication("STRICT")).await;
    let channel = ads_channel(&server).await;
    let mut ads = AdsClient::open(channel, node("shop", &[("app", "catalog")]))
        .await
        .unwrap();
    // One SotW subscription with a client and a server listener.
    ads.subscribe(xds::LISTENER_TYPE, &["catalog:80", SERVER_NAME])
        .await;
    let first = ads.recv().await;
    assert_eq!(first.resources.len(), 2, "{first:?}");
    let names: Vec<String> = first
        .resources
        .iter()
        .filter_map(xds::resource_name)
        .collect();
    assert!(names.contains(&"catalog:80".to_string()), "{names:?}");
    let decoded = server_listener(&first);
    assert_eq!(decoded.mtls, MtlsMode::Strict);
    assert_eq!(decoded.address, "127.0.0.1:9001".parse().unwrap());
    ads.send(
        xds::LISTENER_TYPE,
        &["catalog:80", SERVER_NAME],
        &first.version_info,
        &first.nonce,
        None,
    )
    .await;

    // A workload the selector does not match: PERMISSIVE (the default).
    let channel = ads_channel(&server).await;
    // It is a gRPC server: /status says what it cannot honor of it.
    let grpc_node = mesh_testkit::ads::node("test-node")
        .namespace("shop")
        .labels(&[("app", "orders")])
        .user_agent("gRPC Go")
        .build();
    let mut other = AdsClient::open(channel, grpc_node).await.unwrap();
    other.subscribe(xds::LISTENER_TYPE, &[SERVER_NAME]).await;
    let response = other.recv().await;
    let decoded = xds::decode_server_listener(&response.resources[0]).unwrap();
    assert_eq!(decoded.mtls, MtlsMode::Permissive);
    let status = server.status();
    let grpc = status["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "grpc")
        .expect("the gRPC client in /status");
    assert!(
        grpc["ignored"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("PERMISSIVE")),
        "{grpc}"
    );

    // Changing only the PeerAuthentication is a new LDS version with the
    // new mode.
    std::fs::write(dir.path().join("mesh.yaml"), peer_authentication("DISABLE")).unwrap();
    server.reload();
    let second = ads.recv().await;
    assert_ne!(second.version_info, first.version_info);
    let decoded = server_listener(&second);
    assert_eq!(decoded.mtls, MtlsMode::Disable);
    assert_eq!(
        second.resources.len(),
        2,
        "client and server listeners together"
    );
}

#[tokio::test]
async fn a_root_rotation_reaches_the_bundle_file_and_new_handshakes() {
    // No overlap: the new root signs at once, so the next certificate
    // comes from it.
    let ca = CertificateAuthority::builder("cluster.local")
        .join_tokens(tokens())
        .rotation_overlap(Duration::ZERO)
        .build()
        .unwrap();
    let (_dir, server) = start_with(SERVICE, ca).await;
    let bundle_file = server.trust_bundle_file().unwrap();
    let count = |pem: &str| pem.matches("BEGIN CERTIFICATE").count();
    assert_eq!(count(&std::fs::read_to_string(&bundle_file).unwrap()), 1);
    let old_roots = AdminClient::new(&server, None);

    server.rotate_root().unwrap();
    let rotated = std::fs::read_to_string(&bundle_file).unwrap();
    assert_eq!(
        count(&rotated),
        2,
        "the old root stays while certificates it signed live"
    );
    let tls = AdminClient::new(&server, None);
    let (code, body) = tls.call("GET", "/v1/trust-bundle", None, json!(null)).await;
    assert_eq!(code, 200);
    assert_eq!(body["trust_bundle"], rotated.as_str());
    // Clients that know only the old root still connect: the serving
    // certificate it signed is still valid.
    let (code, _) = old_roots.call("GET", "/healthz", None, json!(null)).await;
    assert_eq!(code, 200);

    // A certificate from the new root is accepted as a client certificate
    // by new handshakes.
    let (csr_pem, key_pem) = csr(None);
    let (code, cert) = tls
        .issue(None, json!({"csr": csr_pem, "token": PAYMENT_TOKEN}))
        .await;
    assert_eq!(code, 200, "{cert}");
    let chain = cert["certificate_chain"].as_str().unwrap();
    let mtls = AdminClient::new(&server, Some((chain, &key_pem)));
    let (code, body) = mtls
        .call("POST", "/v1/endpoints", None, registration("payment", 9002))
        .await;
    assert_eq!(
        code, 201,
        "the new root's certificate identifies the caller: {body}"
    );
}

#[tokio::test]
async fn the_serving_certificate_is_renewed_at_half_life() {
    let ca = CertificateAuthority::builder("cluster.local")
        .default_lifetime(Duration::from_secs(2))
        .build()
        .unwrap();
    let (_dir, server) = start_with(SERVICE, ca).await;
    let first = server.serving_certificate_pem().unwrap();
    let tls = AdminClient::new(&server, None);
    let mut renewed = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = server.serving_certificate_pem().unwrap();
        if now != first {
            renewed = Some(now);
            break;
        }
    }
    assert!(renewed.is_some(), "renewed within 4 s of a 2 s lifetime");
    // New handshakes get the new certificate, and succeed after the first
    // one has expired.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (code, _) = tls.call("GET", "/healthz", None, json!(null)).await;
    assert_eq!(code, 200);
}

/// Runs `mesh-control serve` with `ca_args` (and a join tokens file and a
/// read-only operator token file), waits for `bundle` to appear and returns
/// `status --json` read over https with it as the CA file and the operator
/// token; also checks that plaintext `status` fails, and that `status`
/// without the token is refused (with the CA on, reads need credentials). The
/// server is killed on return.
async fn cli_status_over_https(
    dir: &Path,
    ca_args: &[&std::ffi::OsStr],
    bundle: &Path,
) -> serde_json::Value {
    let config = dir.join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("mesh.yaml"), SERVICE).unwrap();
    let tokens = dir.join("tokens.json");
    std::fs::write(
        &tokens,
        json!({"tokens": [{"token": CATALOG_TOKEN, "namespace": "shop", "service_account": "catalog-sa"}]})
            .to_string(),
    )
    .unwrap();
    let operator = dir.join("operator-token");
    std::fs::write(
        &operator,
        "# read-only, for status\noperator-token-0123456789\n",
    )
    .unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (xds_addr, admin_addr) = (free(), free());
    let bin = env!("CARGO_BIN_EXE_mesh-control");
    let mut child = tokio::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .args([
            "--xds",
            &xds_addr.to_string(),
            "--admin",
            &admin_addr.to_string(),
        ])
        .args(ca_args)
        .arg("--join-tokens")
        .arg(&tokens)
        .arg("--operator-token-file")
        .arg(&operator)
        .args(["--trust-domain", "example.org", "--cert-lifetime", "1h"])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut output = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !bundle.exists() {
            continue;
        }
        let out = tokio::process::Command::new(bin)
            .args([
                "status",
                "--json",
                "--admin",
                &admin_addr.to_string(),
                "--ca-file",
            ])
            .arg(bundle)
            .arg("--token-file")
            .arg(&operator)
            .output()
            .await
            .unwrap();
        if out.status.success() {
            output = Some(out);
            break;
        }
    }
    let output = output.expect("status over https");
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // Without the operator token: refused, saying what to pass.
    let out = tokio::process::Command::new(bin)
        .args(["status", "--admin", &admin_addr.to_string(), "--ca-file"])
        .arg(bundle)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("--token-file"),
        "{stderr}"
    );
    // Without --ca-file (plaintext), status fails.
    let out = tokio::process::Command::new(bin)
        .args(["status", "--admin", &admin_addr.to_string()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    child.kill().await.unwrap();
    status
}

#[tokio::test]
async fn the_cli_serves_with_a_ca_and_status_reads_it_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let status = cli_status_over_https(
        dir.path(),
        &["--ca-dir".as_ref(), ca_dir.as_os_str()],
        &ca_dir.join("trust-bundle.pem"),
    )
    .await;
    assert_eq!(
        status["security"]["trust_domain"], "example.org",
        "{status}"
    );
    // The CA is persisted.
    assert!(ca_dir.join("root-cert.pem").exists() && ca_dir.join("root-key.pem").exists());
}

#[tokio::test]
async fn the_cli_signs_with_an_operator_supplied_intermediate() {
    let root = TestCa::new("operator root");
    let intermediate = root.intermediate("operator intermediate");
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    let (chain, key) = (pki.join("cert-chain.pem"), pki.join("ca-key.pem"));
    std::fs::write(&chain, format!("{}{}", intermediate.pem, root.pem)).unwrap();
    std::fs::write(&key, intermediate.key_pem()).unwrap();
    // The trust bundle lands next to the chain and holds the operator's root only:
    // status verifies mesh-control's serving certificate (issued by the
    // intermediate, which the server sends along) against it.
    let bundle = pki.join("trust-bundle.pem");
    let status = cli_status_over_https(
        dir.path(),
        &[
            "--ca-cert-chain".as_ref(),
            chain.as_os_str(),
            "--ca-key".as_ref(),
            key.as_os_str(),
        ],
        &bundle,
    )
    .await;
    assert_eq!(
        status["security"]["trust_domain"], "example.org",
        "{status}"
    );
    let bundle = std::fs::read_to_string(&bundle).unwrap();
    assert_eq!(
        bundle.trim(),
        root.pem.trim(),
        "the bundle is the operator's root"
    );
}

#[tokio::test]
async fn bootstraps_name_the_trust_bundle_and_the_certificate_provider() {
    let (_dir, server) = start(SERVICE).await;
    let spec = mesh_control::BootstrapSpec::new("catalog-1", "shop")
        .service_account("catalog-sa")
        .label("app", "catalog")
        .join_token_with_lifetime(CATALOG_TOKEN, Duration::from_secs(4));
    let doc: serde_json::Value = serde_json::from_str(&server.bootstrap(&spec)).unwrap();
    let bundle = server.trust_bundle_file().unwrap();
    assert_eq!(
        doc["xds_servers"][0]["channel_creds"][0],
        json!({"type": "tls", "config": {"ca_certificate_file": bundle.display().to_string()}})
    );
    assert_eq!(
        doc["xds_servers"][0]["server_uri"],
        server.xds_addr().to_string()
    );
    let metadata = &doc["node"]["metadata"];
    assert_eq!(metadata["NAMESPACE"], "shop");
    assert_eq!(metadata["SERVICE_ACCOUNT"], "catalog-sa");
    assert_eq!(metadata["LABELS"], json!({"app": "catalog"}));
    assert_eq!(metadata["PROXYLESS_ADMIN"], server.admin_addr().to_string());
    assert_eq!(
        doc["certificate_providers"]["mesh"],
        json!({"plugin_name": "mesh_ca", "config": {"token": CATALOG_TOKEN, "lifetime": "4s"}})
    );
    assert_eq!(
        doc["server_listener_resource_name_template"],
        mesh_control::SERVER_LISTENER_TEMPLATE
    );

    // file_watcher certificates (SPIRE, cert-manager).
    let spec = mesh_control::BootstrapSpec::new("payment-1", "shop").file_watcher(
        "/certs/cert.pem",
        "/certs/key.pem",
        "/certs/ca.pem",
    );
    let doc: serde_json::Value = serde_json::from_str(&server.bootstrap(&spec)).unwrap();
    assert_eq!(
        doc["certificate_providers"]["mesh"],
        json!({"plugin_name": "file_watcher", "config": {
            "certificate_file": "/certs/cert.pem",
            "private_key_file": "/certs/key.pem",
            "ca_certificate_file": "/certs/ca.pem",
        }})
    );

    // Without a CA: insecure, no certificate API.
    let open = mesh_control::Server::builder().start().await.unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&open.bootstrap(&mesh_control::BootstrapSpec::new("n", "shop")))
            .unwrap();
    assert_eq!(
        doc["xds_servers"][0]["channel_creds"],
        json!([{"type": "insecure"}])
    );
    assert!(open.trust_bundle_file().is_none() && open.ca().is_none());
    let (code, _) = json_request(open.admin_addr(), "GET", "/v1/trust-bundle", "").await;
    assert_eq!(code, 404);
}
