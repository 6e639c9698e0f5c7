//! Issue 13, acceptance 3: with a CA, ADS and CSDS serve only authenticated
//! clients, over real sockets.
//!
//! - Without credentials (TLS, but no client certificate and no token) ADS
//!   and CSDS answer `UNAUTHENTICATED`, saying what to send; an unknown token
//!   too.
//! - A join token as `authorization: Bearer` metadata (what an Envoy sends in
//!   `initial_metadata`, what mesh-xds-client sends for a `mesh_ca`
//!   bootstrap) is served, and so is a client certificate from the mesh CA
//!   (gRFC A65's `certificate_file` in a gRPC bootstrap).
//! - The node's namespace comes from its credentials: a node without
//!   `NAMESPACE` resolves short names in its token's namespace, and a node
//!   claiming another namespace (or service account) than its credentials is
//!   refused with `PERMISSION_DENIED` naming both, so it never receives that
//!   namespace's server listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use mesh_control::ca::{CertificateAuthority, JoinTokens};
use mesh_core::xds;
use mesh_testkit::ads::{AdsClient, node};
use mesh_testkit::pki::{self, Leaf};
use rustls::pki_types::ServerName;
use tonic::Code;

const CATALOG_TOKEN: &str = "catalog-token-0123456789";
const TELLER_TOKEN: &str = "teller-token-01234567890";

/// catalog in `shop`; a STRICT PeerAuthentication for `bank`'s teller, whose
/// server listener a `shop` workload must never get.
const CONFIG: &str = r#"
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
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bank}
spec:
  mtls: {mode: STRICT}
"#;

const SERVER_NAME: &str = "grpc/server?xds.resource.listening_address=127.0.0.1:9001";

async fn start() -> (tempfile::TempDir, mesh_control::ServerHandle) {
    let mut tokens = JoinTokens::new();
    tokens
        .insert(CATALOG_TOKEN, "shop", "catalog")
        .and_then(|t| t.insert(TELLER_TOKEN, "bank", "teller"))
        .expect("join tokens");
    let ca = CertificateAuthority::builder("cluster.local")
        .join_tokens(tokens)
        .build()
        .expect("CA");
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::write(dir.path().join("mesh.yaml"), CONFIG).expect("config");
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .ca(ca)
        .start()
        .await
        .expect("start control server");
    (dir, server)
}

/// A TLS channel to ADS verifying the server with its bundle, presenting
/// `cert` when given.
async fn channel(
    server: &mesh_control::ServerHandle,
    cert: Option<&Leaf>,
) -> tonic::transport::Channel {
    let bundle =
        std::fs::read_to_string(server.trust_bundle_file().expect("bundle file")).expect("bundle");
    let mut config = pki::client_config(&bundle, cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    let addr: SocketAddr = server.xds_addr();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_with_connector(connector)
        .await
        .expect("TLS channel to ADS")
}

/// A certificate of the mesh CA for the account of `token`, as a workload
/// gets it (a CSR with its join token).
fn certificate(server: &mesh_control::ServerHandle, token: &str) -> Leaf {
    let (csr, key) = pki::csr(None);
    let issued = server
        .ca()
        .expect("CA")
        .issue_with_token(token, &csr, None, None)
        .expect("certificate");
    Leaf {
        chain: issued.chain_pem,
        key,
    }
}

async fn csds(
    channel: tonic::transport::Channel,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let mut request = tonic::Request::new(ClientStatusRequest::default());
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    let response = ClientStatusDiscoveryServiceClient::new(channel)
        .fetch_client_status(request)
        .await?;
    Ok(response
        .into_inner()
        .config
        .iter()
        .filter_map(|c| c.node.as_ref().map(|n| n.id.clone()))
        .collect())
}

#[tokio::test]
async fn ads_and_csds_without_credentials_are_refused() {
    let (_dir, server) = start().await;

    // TLS verified both ways is not enough: no certificate, no token.
    let refused = AdsClient::open(channel(&server, None).await, node("anon").build()).await;
    let status = refused
        .err()
        .expect("an anonymous ADS stream must be refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("join token") && status.message().contains("certificate"),
        "the refusal must say what to send: {}",
        status.message()
    );

    // An unknown token is no better.
    let refused = AdsClient::open_with_token(
        channel(&server, None).await,
        node("guess").build(),
        "not-a-token-of-this-mesh",
    )
    .await;
    let status = refused.err().expect("an unknown token must be refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let status = csds(channel(&server, None).await, None)
        .await
        .expect_err("anonymous CSDS must be refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Nothing reached the server's view of its clients.
    assert_eq!(
        server.status()["clients"],
        serde_json::json!([]),
        "refused streams must not show up as clients"
    );
}

#[tokio::test]
async fn a_join_token_in_metadata_or_a_mesh_certificate_is_served() {
    let (_dir, server) = start().await;

    // A token (an Envoy's initial_metadata): the node says nothing about its
    // namespace, and `catalog:80` resolves in the token's namespace, shop.
    let mut ads = AdsClient::open_with_token(
        channel(&server, None).await,
        node("catalog-1").build(),
        CATALOG_TOKEN,
    )
    .await
    .expect("ADS with a join token");
    ads.subscribe(xds::LISTENER_TYPE, &["catalog:80"]).await;
    let response = ads.recv().await;
    let names: Vec<String> = response
        .resources
        .iter()
        .filter_map(xds::resource_name)
        .collect();
    assert_eq!(names, ["catalog:80"], "{response:?}");

    // A certificate of the mesh CA (gRFC A65 client certificate), no token.
    let cert = certificate(&server, CATALOG_TOKEN);
    let mut ads = AdsClient::open(
        channel(&server, Some(&cert)).await,
        node("catalog-2").namespace("shop").build(),
    )
    .await
    .expect("ADS with a client certificate");
    ads.subscribe(xds::LISTENER_TYPE, &["catalog:80"]).await;
    assert_eq!(ads.recv().await.resources.len(), 1);

    // CSDS with the certificate lists both clients.
    let mut ids = csds(channel(&server, Some(&cert)).await, None)
        .await
        .expect("CSDS with a client certificate");
    ids.sort();
    assert_eq!(ids, ["catalog-1", "catalog-2"]);
    // ... and with a token.
    assert!(
        csds(channel(&server, None).await, Some(CATALOG_TOKEN))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_node_claiming_another_namespace_than_its_credentials_is_refused() {
    let (_dir, server) = start().await;

    // A shop certificate, a node claiming bank (to get bank's STRICT
    // listener and its RBAC).
    let cert = certificate(&server, CATALOG_TOKEN);
    let mut ads = AdsClient::open(
        channel(&server, Some(&cert)).await,
        node("impostor-1").namespace("bank").build(),
    )
    .await
    .expect("the stream opens: the node comes with the first request");
    ads.subscribe(xds::LISTENER_TYPE, &[SERVER_NAME]).await;
    let status = ads
        .ended_with(Duration::from_secs(10))
        .await
        .expect("the stream must end with a refusal, not a listener");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("\"bank\"")
            && status.message().contains("\"shop\"")
            && status
                .message()
                .contains("spiffe://cluster.local/ns/shop/sa/catalog"),
        "the refusal must name the claim and the identity: {}",
        status.message()
    );

    // The same with a token, and a service account that is not the token's.
    let mut ads = AdsClient::open_with_token(
        channel(&server, None).await,
        node("impostor-2")
            .namespace("shop")
            .service_account("payment")
            .build(),
        CATALOG_TOKEN,
    )
    .await
    .expect("the stream opens");
    ads.subscribe(xds::LISTENER_TYPE, &["catalog:80"]).await;
    let status = ads
        .ended_with(Duration::from_secs(10))
        .await
        .expect("the stream must end with a refusal");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("\"payment\"") && status.message().contains("\"catalog\""),
        "{}",
        status.message()
    );

    // bank's own workload gets bank's STRICT server listener.
    let mut ads = AdsClient::open_with_token(
        channel(&server, None).await,
        node("teller-1").namespace("bank").build(),
        TELLER_TOKEN,
    )
    .await
    .expect("ADS for bank's workload");
    ads.subscribe(xds::LISTENER_TYPE, &[SERVER_NAME]).await;
    let response = ads.recv().await;
    let listener = xds::decode_server_listener(&response.resources[0]).expect("server listener");
    assert_eq!(listener.mtls, mesh_core::model::MtlsMode::Strict);
}
