//! TLS origination with certificate files (Istio's DestinationRule `tls`
//! SIMPLE and MUTUAL) over real sockets: a plain rustls server with a
//! non-mesh certificate (DNS SAN `api.example.com`, its own CA) reached
//! through `MeshClient`. SIMPLE verifies the server against the CA file
//! for the SNI or the configured SANs; MUTUAL also presents a client
//! certificate from files; the files are re-read when they change.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::Snapshot;
use mesh_core::model::{
    ClientCertificateFiles, Cluster, FileTls, Locality, Name, Protocol, RoutePolicy,
    TlsOrigination, UpstreamTls,
};
use mesh_tower::tls::CertStore;
use mesh_tower::{MeshClient, StaticSource};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use common::chain;
use common::pki::TestCaExt as _;
use mesh_testkit::pki::{self, FRONTEND, Leaf, TestCa, write_pem};
use mesh_testkit::snapshot::one_service;
use mesh_testkit::wait::within;

const API: &str = "api.example.com";

/// A TLS server (HTTP/1.1 and h2 by ALPN) presenting `leaf`; with
/// `client_ca`, it requires a client certificate of that CA. It answers
/// with the number of client certificates the connection presented.
struct TlsServer {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
}

async fn tls_server(leaf: &Leaf, client_ca: Option<&TestCa>) -> TlsServer {
    let mut config = pki::server_config(leaf, client_ca.map(|ca| ca.pem.as_str()));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = TlsServer {
        addr: listener.local_addr().unwrap(),
        handshakes: Arc::default(),
    };
    let handshakes = server.handshakes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let handshakes = handshakes.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                handshakes.fetch_add(1, Ordering::SeqCst);
                let certs = tls.get_ref().1.peer_certificates().map_or(0, <[_]>::len);
                let service = service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(format!(
                        "client certificates: {certs}"
                    )))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    server
}

/// Writes `contents` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, contents: &str) -> Name {
    Name::from(write_pem(dir, name, contents).to_str().unwrap())
}

fn file_cluster(protocol: Protocol, sni: &str, files: FileTls) -> Cluster {
    Cluster {
        tls: Some(UpstreamTls {
            server_identities: Arc::from([]),
            sni: sni.into(),
            origination: TlsOrigination::Files(files),
        }),
        ..Cluster::new("x", protocol)
    }
}

fn simple(ca_file: &Name, sans: &[&str]) -> FileTls {
    FileTls {
        ca_certificates: Some(ca_file.clone()),
        subject_alt_names: sans.iter().map(|s| Name::from(*s)).collect(),
        client_certificate: None,
    }
}

type Client = MeshClient<Full<Bytes>, StaticSource>;

/// A client for service `api` whose cluster is `cluster`, at `addr`.
fn client(cluster: Cluster, addr: SocketAddr) -> Client {
    Client::new(StaticSource::new(api(cluster, addr))).with_certificates(mesh_store())
}

fn api(cluster: Cluster, addr: SocketAddr) -> Snapshot {
    one_service(
        "api",
        cluster,
        RoutePolicy::default(),
        &[(addr, Locality::default())],
    )
}

/// The workload certificate of a mesh client. SIMPLE and MUTUAL do not use
/// it (the tests pass with any); the client takes one until the cluster
/// state accepts file TLS without workload certificates.
fn mesh_store() -> CertStore {
    TestCa::new("mesh root").store(FRONTEND)
}

async fn get(client: &Client) -> Result<(StatusCode, String), String> {
    let request = Request::get("http://api/v1/items")
        .body(Full::default())
        .unwrap();
    match within("the request", client.clone().oneshot(request)).await {
        Ok(response) => {
            let (head, body) = response.into_parts();
            let body = within("the body", body.collect())
                .await
                .map_err(|e| chain(&*e))?
                .to_bytes();
            Ok((head.status, String::from_utf8_lossy(&body).into_owned()))
        }
        Err(e) => Err(chain(&e)),
    }
}

#[tokio::test]
async fn simple_verifies_the_server_against_the_ca_file_for_the_sni() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("external root");
    let server = tls_server(&ca.leaf_for(&[API]), None).await;
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let other_ca_file = write(dir.path(), "other.pem", &TestCa::new("other root").pem);

    for protocol in [Protocol::Http1, Protocol::Http2] {
        let ok = client(
            file_cluster(protocol, API, simple(&ca_file, &[])),
            server.addr,
        );
        assert_eq!(
            get(&ok).await,
            Ok((StatusCode::OK, "client certificates: 0".into())),
            "{protocol:?}"
        );
        // Another CA does not vouch for the server.
        let other = client(
            file_cluster(protocol, API, simple(&other_ca_file, &[])),
            server.addr,
        );
        let e = get(&other).await.unwrap_err();
        assert!(
            e.contains("SIMPLE handshake with endpoint") && e.contains("UnknownIssuer"),
            "{protocol:?}: {e}"
        );
        // The certificate is not valid for the SNI.
        let wrong_name = client(
            file_cluster(protocol, "web.example.com", simple(&ca_file, &[])),
            server.addr,
        );
        let e = get(&wrong_name).await.unwrap_err();
        assert!(
            e.contains("certificate not valid for name \"web.example.com\""),
            "{protocol:?}: {e}"
        );
    }
}

#[tokio::test]
async fn subject_alt_names_replace_the_sni_check_and_any_one_matches() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("external root");
    let server = tls_server(&ca.leaf_for(&[API]), None).await;
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);

    let any_of = client(
        file_cluster(
            Protocol::Http1,
            "api.internal",
            simple(&ca_file, &["spiffe://example.com/api", API]),
        ),
        server.addr,
    );
    assert_eq!(get(&any_of).await.map(|r| r.0), Ok(StatusCode::OK));

    let wrong_san = client(
        file_cluster(Protocol::Http1, API, simple(&ca_file, &["web.example.com"])),
        server.addr,
    );
    let e = get(&wrong_san).await.unwrap_err();
    assert!(
        e.contains("match none of subjectAltNames [\"web.example.com\"]"),
        "{e}"
    );
}

#[tokio::test]
async fn mutual_presents_the_client_certificate_and_fails_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = TestCa::new("external root");
    let client_ca = TestCa::new("client root");
    let server = tls_server(&server_ca.leaf_for(&[API]), Some(&client_ca)).await;
    let ca_file = write(dir.path(), "ca.pem", &server_ca.pem);
    let leaf = client_ca.leaf_for(&["shop-frontend.example.com"]);
    let mutual = FileTls {
        client_certificate: Some(ClientCertificateFiles {
            certificate_chain: write(dir.path(), "client.pem", &leaf.chain),
            private_key: write(dir.path(), "client.key", &leaf.key),
        }),
        ..simple(&ca_file, &[])
    };

    for protocol in [Protocol::Http1, Protocol::Http2] {
        let c = client(file_cluster(protocol, API, mutual.clone()), server.addr);
        assert_eq!(
            get(&c).await,
            Ok((StatusCode::OK, "client certificates: 1".into())),
            "{protocol:?}"
        );
        // SIMPLE to the same server: no client certificate, refused.
        let c = client(
            file_cluster(protocol, API, simple(&ca_file, &[])),
            server.addr,
        );
        let result = get(&c).await;
        assert!(
            !matches!(result, Ok((StatusCode::OK, _))),
            "{protocol:?}: {result:?}"
        );
    }

    // A client certificate of another CA is refused too.
    let stranger = TestCa::new("stranger").leaf_for(&["shop-frontend.example.com"]);
    let files = FileTls {
        client_certificate: Some(ClientCertificateFiles {
            certificate_chain: write(dir.path(), "stranger.pem", &stranger.chain),
            private_key: write(dir.path(), "stranger.key", &stranger.key),
        }),
        ..simple(&ca_file, &[])
    };
    let c = client(file_cluster(Protocol::Http1, API, files), server.addr);
    let result = get(&c).await;
    assert!(!matches!(result, Ok((StatusCode::OK, _))), "{result:?}");
}

#[tokio::test]
async fn files_are_read_by_the_client_and_re_read_when_they_change() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("external root");
    let server = tls_server(&ca.leaf_for(&[API]), None).await;
    let ca_path = dir.path().join("ca.pem");
    let ca_file = Name::from(ca_path.to_str().unwrap());
    // HTTP/1.1 with one idle connection per request: every request after a
    // failure dials anew.
    let c = client(
        file_cluster(Protocol::Http1, API, simple(&ca_file, &[])),
        server.addr,
    );

    // Not there yet: the error names the file.
    let e = get(&c).await.unwrap_err();
    assert!(
        e.contains(&format!("cannot read caCertificates file {ca_file}")),
        "{e}"
    );
    // Another CA: refused.
    std::fs::write(&ca_path, TestCa::new("other root").pem).unwrap();
    let e = get(&c).await.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    // The right CA, same path, same config: the next connection uses it.
    std::fs::write(&ca_path, &ca.pem).unwrap();
    assert_eq!(get(&c).await.map(|r| r.0), Ok(StatusCode::OK));
    // A change that cannot be used keeps the last good file.
    std::fs::write(&ca_path, "not a certificate").unwrap();
    let fresh = client(
        file_cluster(Protocol::Http1, API, simple(&ca_file, &[])),
        server.addr,
    );
    let e = get(&fresh).await.unwrap_err();
    assert!(e.contains("no PEM certificate in the file"), "{e}");
}

#[tokio::test]
async fn file_tls_needs_no_workload_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("external root");
    let server = tls_server(&ca.leaf_for(&[API]), None).await;
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let c = Client::new(StaticSource::new(api(
        file_cluster(Protocol::Http2, API, simple(&ca_file, &[])),
        server.addr,
    )));
    assert_eq!(get(&c).await.map(|r| r.0), Ok(StatusCode::OK));
}
