//! mTLS over real loopback sockets: STRICT, PERMISSIVE and DISABLE servers,
//! the client's check of server identities, hot rotation, and the
//! `file_watcher` provider. Certificates come from rcgen CAs made in the test (`mesh_testkit::pki`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::chain;
use common::pki::{LeafExt as _, TestCaExt as _};
use mesh_core::spiffe::SpiffeId;
use mesh_testkit::pki::{
    CATALOG, FRONTEND, Leaf, PAYMENT, TestCa, Validity, server_name, trust_any_server,
};
use mesh_tower::tls::{
    FileWatcher, FileWatcherConfig, MeshAcceptor, MeshConnector, MtlsMode, PeerIdentity,
    ServerIdentities,
};
use mesh_tower::{Error, ErrorKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use x509_parser::prelude::{FromDer, X509Certificate};

const DEADLINE: Duration = Duration::from_secs(10);

/// What the server saw of each connection: TLS or not, the peer identity,
/// or why accepting failed.
type Seen = Result<(bool, Option<PeerIdentity>), Error>;

struct Server {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl Server {
    async fn next(&mut self) -> Seen {
        timeout(DEADLINE, self.seen.recv())
            .await
            .expect("the server saw no connection in time")
            .expect("the server stopped")
    }
}

/// A server answering each 4-byte `ping` with `pong:<peer identity>\n`.
async fn server(acceptor: MeshAcceptor) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(stream) => {
                        let peer = stream.peer_identity().cloned();
                        let _ = tx.send(Ok((stream.is_tls(), peer.clone())));
                        let who = peer.map_or("anonymous".to_string(), |p| p.to_string());
                        echo(stream, who).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        }
    });
    Server { addr, seen }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, who: String) {
    let mut buf = [0u8; 4];
    while s.read_exact(&mut buf).await.is_ok() {
        if s.write_all(format!("pong:{who}\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
        let _ = s.flush().await;
    }
}

/// Sends `ping`, returns the answer line.
async fn ping<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<String> {
    timeout(DEADLINE, async {
        s.write_all(b"ping").await?;
        s.flush().await?;
        let mut line = Vec::new();
        loop {
            let byte = s.read_u8().await?;
            if byte == b'\n' {
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            line.push(byte);
        }
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// The serial number of the certificate the server presented.
fn server_serial<IO>(stream: &tokio_rustls::client::TlsStream<IO>) -> Vec<u8> {
    let certs = stream.get_ref().1.peer_certificates().unwrap();
    let (_, cert) = X509Certificate::from_der(&certs[0]).unwrap();
    cert.raw_serial().to_vec()
}

/// A client that trusts any server and presents `cert` (or nothing): it
/// tests the server's checks alone.
fn raw_client(cert: Option<&Leaf>) -> TlsConnector {
    TlsConnector::from(Arc::new(trust_any_server(cert)))
}

/// Connects with `client`, pings; `Ok(answer)` only if all of it worked.
async fn raw_ping(client: &TlsConnector, addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = client.connect(server_name(), tcp(addr).await).await?;
    ping(&mut stream).await
}

fn expect_rejected(seen: Seen, why: &str) -> Error {
    match seen {
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Tls, "{why}: {e}");
            e
        }
        Ok(ok) => panic!("{why}: the server accepted: {ok:?}"),
    }
}

#[tokio::test]
async fn strict_accepts_a_mesh_identity_and_exposes_it() {
    let ca = TestCa::new("mesh root");
    let server_store = ca.store(CATALOG);
    let mut srv = server(MeshAcceptor::strict(&server_store, &[]).unwrap()).await;
    let client = MeshConnector::new(
        &ca.store(FRONTEND),
        ServerIdentities::new([SpiffeId::parse(CATALOG).unwrap()]),
        &[],
    )
    .unwrap();
    let (mut stream, server_id) = client
        .connect("catalog.shop.svc.cluster.local", tcp(srv.addr).await)
        .await
        .unwrap();
    assert_eq!(server_id.spiffe_id().as_str(), CATALOG);
    assert_eq!(ping(&mut stream).await.unwrap(), format!("pong:{FRONTEND}"));
    let (tls, peer) = srv.next().await.unwrap();
    assert!(tls);
    assert_eq!(peer.unwrap().spiffe_id().as_str(), FRONTEND);
    assert_eq!(server_store.identity().as_str(), CATALOG);
}

#[tokio::test]
async fn strict_rejects_what_is_not_a_valid_mesh_identity() {
    let ca = TestCa::new("mesh root");
    let other_ca = TestCa::new("another root");
    let mut srv = server(MeshAcceptor::strict(&ca.store(CATALOG), &[]).unwrap()).await;

    // Control: the raw client with a good certificate gets through.
    let good = raw_client(Some(&ca.leaf(FRONTEND)));
    assert_eq!(
        raw_ping(&good, srv.addr).await.unwrap(),
        format!("pong:{FRONTEND}")
    );
    srv.next().await.unwrap();

    let cases = [
        (
            "no client certificate",
            raw_client(None),
            "sent no certificate",
        ),
        (
            "a certificate from another CA",
            raw_client(Some(&other_ca.leaf(FRONTEND))),
            "UnknownIssuer",
        ),
        (
            "another trust domain",
            raw_client(Some(&ca.leaf("spiffe://other.org/ns/shop/sa/frontend"))),
            "not in the trust domain cluster.local",
        ),
        (
            "an expired certificate",
            raw_client(Some(&ca.leaf_with(FRONTEND, Validity::Expired))),
            "xpired",
        ),
        (
            "a certificate without a SPIFFE ID",
            raw_client(Some(&ca.leaf("https://catalog.example.com/"))),
            "must start with",
        ),
    ];
    for (why, client, reason) in cases {
        let answer = raw_ping(&client, srv.addr).await;
        assert!(answer.is_err(), "{why}: the client got {answer:?}");
        let e = expect_rejected(srv.next().await, why);
        let text = format!("{} / {e:?}", chain(&e));
        assert!(text.contains(reason), "{why}: {text}");
    }

    // Plaintext to a STRICT port.
    let mut plain = tcp(srv.addr).await;
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: catalog\r\n\r\n")
        .await
        .unwrap();
    let e = expect_rejected(srv.next().await, "plaintext");
    assert!(chain(&e).contains("plaintext"), "{}", chain(&e));
    let mut rest = Vec::new();
    let _ = timeout(DEADLINE, plain.read_to_end(&mut rest)).await;
    assert!(!String::from_utf8_lossy(&rest).contains("pong"));
}

#[tokio::test]
async fn the_client_checks_the_server_identity() {
    let ca = TestCa::new("mesh root");
    let other_ca = TestCa::new("another root");
    let client_store = ca.store(FRONTEND);
    let catalog_only = ServerIdentities::new([SpiffeId::parse(CATALOG).unwrap()]);

    let cases = [
        (
            "the cluster's identity",
            ca.store(CATALOG),
            catalog_only.clone(),
            true,
        ),
        (
            "any identity of the trust domain",
            ca.store(PAYMENT),
            ServerIdentities::any(),
            true,
        ),
        (
            "an identity CDS did not name",
            ca.store(PAYMENT),
            catalog_only.clone(),
            false,
        ),
        (
            "another trust domain",
            ca.store("spiffe://other.org/ns/shop/sa/catalog"),
            ServerIdentities::any(),
            false,
        ),
        (
            "another CA",
            other_ca.store(CATALOG),
            ServerIdentities::any(),
            false,
        ),
    ];
    for (why, server_store, identities, ok) in cases {
        let mut srv = server(MeshAcceptor::strict(&server_store, &[]).unwrap()).await;
        let connector = MeshConnector::new(&client_store, identities, &[]).unwrap();
        let result = connector.connect("catalog", tcp(srv.addr).await).await;
        match (ok, result) {
            (true, Ok((mut stream, id))) => {
                assert_eq!(id.spiffe_id(), &server_store.identity(), "{why}");
                assert!(ping(&mut stream).await.is_ok(), "{why}");
                srv.next().await.unwrap();
            }
            (false, Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::Tls, "{why}: {e}");
                assert!(
                    chain(&e).contains("TLS handshake with catalog failed"),
                    "{why}"
                );
            }
            (ok, result) => panic!("{why}: expected ok={ok}, got {result:?}"),
        }
    }
}

#[tokio::test]
async fn permissive_accepts_plaintext_and_mtls_on_one_port() {
    let ca = TestCa::new("mesh root");
    let mut srv = server(MeshAcceptor::permissive(&ca.store(CATALOG), &[]).unwrap()).await;
    assert_eq!(MtlsMode::parse("PERMISSIVE"), Some(MtlsMode::Permissive));

    let mut plain = tcp(srv.addr).await;
    assert_eq!(ping(&mut plain).await.unwrap(), "pong:anonymous");
    assert_eq!(srv.next().await.unwrap(), (false, None));

    let connector = MeshConnector::new(&ca.store(FRONTEND), ServerIdentities::any(), &[]).unwrap();
    let (mut stream, _) = connector
        .connect("catalog", tcp(srv.addr).await)
        .await
        .unwrap();
    assert_eq!(ping(&mut stream).await.unwrap(), format!("pong:{FRONTEND}"));
    let (tls, peer) = srv.next().await.unwrap();
    assert!(tls);
    assert_eq!(peer.unwrap().spiffe_id().as_str(), FRONTEND);

    // TLS without a client certificate: accepted, unauthenticated.
    assert_eq!(
        raw_ping(&raw_client(None), srv.addr).await.unwrap(),
        "pong:anonymous"
    );
    assert_eq!(srv.next().await.unwrap(), (true, None));

    // A certificate that does not verify is still refused.
    let other = TestCa::new("another root");
    assert!(
        raw_ping(&raw_client(Some(&other.leaf(FRONTEND))), srv.addr)
            .await
            .is_err()
    );
    expect_rejected(srv.next().await, "another CA under PERMISSIVE");

    // A client that connects and says nothing, then leaves.
    drop(tcp(srv.addr).await);
    let e = srv.next().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
}

#[tokio::test]
async fn disable_is_plaintext_only() {
    let ca = TestCa::new("mesh root");
    let acceptor = MeshAcceptor::new(MtlsMode::Disable, None, &[]).unwrap();
    assert_eq!(acceptor.mode(), MtlsMode::Disable);
    let mut srv = server(acceptor).await;
    let mut plain = tcp(srv.addr).await;
    assert_eq!(ping(&mut plain).await.unwrap(), "pong:anonymous");
    assert_eq!(srv.next().await.unwrap(), (false, None));
    let connector = MeshConnector::new(&ca.store(FRONTEND), ServerIdentities::any(), &[]).unwrap();
    assert!(
        connector
            .connect("catalog", tcp(srv.addr).await)
            .await
            .is_err()
    );
    // STRICT and PERMISSIVE need a certificate.
    let e = MeshAcceptor::new(MtlsMode::Strict, None, &[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Tls);
}

#[tokio::test]
async fn rotation_applies_to_new_connections_and_keeps_live_ones() {
    let ca = TestCa::new("mesh root");
    let server_store = ca.store(CATALOG);
    let mut srv = server(MeshAcceptor::strict(&server_store, &[]).unwrap()).await;
    let client_store = ca.store(FRONTEND);
    let connector = MeshConnector::new(&client_store, ServerIdentities::any(), &[]).unwrap();

    let (mut old, _) = connector
        .connect("catalog", tcp(srv.addr).await)
        .await
        .unwrap();
    assert!(ping(&mut old).await.is_ok());
    srv.next().await.unwrap();
    let first_serial = server_serial(&old);
    let serial_before = server_store.serial();

    // Rotate the server's certificate (new key too); then the trust bundle
    // to a new root, with old and new trusted during the overlap.
    let mut changes = server_store.changes();
    server_store
        .update(ca.credentials(&ca.leaf(CATALOG)))
        .unwrap();
    timeout(DEADLINE, changes.changed()).await.unwrap().unwrap();
    assert_ne!(server_store.serial(), serial_before);
    let (mut new, _) = connector
        .connect("catalog", tcp(srv.addr).await)
        .await
        .unwrap();
    assert!(ping(&mut new).await.is_ok());
    srv.next().await.unwrap();
    assert_ne!(
        server_serial(&new),
        first_serial,
        "a new connection sees the new certificate"
    );
    assert_eq!(
        hex(&server_serial(&new)),
        server_store.serial(),
        "the store reports the serial it serves"
    );
    // The old connection still works.
    assert_eq!(ping(&mut old).await.unwrap(), format!("pong:{FRONTEND}"));

    let next_ca = TestCa::new("next root");
    let both = format!("{}{}", ca.pem, next_ca.pem);
    client_store
        .update(ca.leaf(FRONTEND).credentials(&both))
        .unwrap();
    server_store
        .update(next_ca.leaf(CATALOG).credentials(&both))
        .unwrap();
    let (mut third, _) = connector
        .connect("catalog", tcp(srv.addr).await)
        .await
        .unwrap();
    assert_eq!(ping(&mut third).await.unwrap(), format!("pong:{FRONTEND}"));
    srv.next().await.unwrap();
    // Both earlier connections are untouched.
    assert!(ping(&mut old).await.is_ok());
    assert!(ping(&mut new).await.is_ok());

    // An invalid update (a key that does not belong) keeps the old credentials.
    let serial = server_store.serial();
    let mismatched = Leaf {
        chain: ca.leaf(CATALOG).chain,
        key: ca.leaf(CATALOG).key,
    };
    let e = server_store
        .update(mismatched.credentials(&both))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Tls);
    assert_eq!(server_store.serial(), serial);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn file_watcher_reloads_rotated_files() {
    let ca = TestCa::new("mesh root");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, bundle) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    let write = |leaf: &Leaf| {
        std::fs::write(&cert, &leaf.chain).unwrap();
        std::fs::write(&key, &leaf.key).unwrap();
    };
    write(&ca.leaf(CATALOG));
    std::fs::write(&bundle, &ca.pem).unwrap();
    let bootstrap = serde_json::json!({"certificate_providers": {"mesh": {
        "plugin_name": "file_watcher",
        "config": {"certificate_file": cert, "private_key_file": key,
                   "ca_certificate_file": bundle, "refresh_interval": "0.02s"}}}});
    let config = FileWatcherConfig::from_bootstrap(&bootstrap, "mesh").unwrap();
    let (store, watcher) = FileWatcher::start(config).unwrap();
    assert_eq!(store.identity().as_str(), CATALOG);
    let first = store.serial();
    let mut changes = store.changes();

    // A rotation written by an external tool (cert-manager, SPIRE).
    write(&ca.leaf(PAYMENT));
    timeout(DEADLINE, changes.changed()).await.unwrap().unwrap();
    assert_eq!(store.identity().as_str(), PAYMENT);
    assert_ne!(store.serial(), first);

    // The store serves the new certificate.
    let mut srv = server(MeshAcceptor::strict(&store, &[]).unwrap()).await;
    let connector = MeshConnector::new(&ca.store(FRONTEND), ServerIdentities::any(), &[]).unwrap();
    let (_, id) = connector
        .connect("payment", tcp(srv.addr).await)
        .await
        .unwrap();
    assert_eq!(id.spiffe_id().as_str(), PAYMENT);
    srv.next().await.unwrap();
    drop(watcher);

    // Files that cannot be used at start are an error naming the file.
    std::fs::remove_file(&key).unwrap();
    let config = FileWatcherConfig::from_bootstrap(&bootstrap, "mesh").unwrap();
    let e = FileWatcher::start(config).unwrap_err();
    assert!(e.to_string().contains("key.pem"), "{e}");
}

/// HTTP over the accepted streams: HTTP/2 over mTLS (ALPN `h2`) and
/// HTTP/1.1 plaintext on one PERMISSIVE port, hyper-util's `auto` server,
/// the peer identity handed to the app as a request extension.
#[tokio::test]
async fn http_over_mtls_and_plaintext_on_one_port() {
    use axum::Router;
    use axum::routing::get;
    use bytes::Bytes;
    use http::Request;
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use mesh_tower::tls::ALPN_H2_HTTP11;
    use tower::ServiceExt;

    let ca = TestCa::new("mesh root");
    let acceptor = MeshAcceptor::permissive(&ca.store(CATALOG), ALPN_H2_HTTP11).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = stream.peer_identity().cloned();
                let app = Router::new().route(
                    "/whoami",
                    get(|req: axum::extract::Request| async move {
                        req.extensions()
                            .get::<PeerIdentity>()
                            .map_or("anonymous".to_string(), |p| p.to_string())
                    }),
                );
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    if let Some(peer) = &peer {
                        req.extensions_mut().insert(peer.clone());
                    }
                    app.clone().oneshot(req)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let body = |resp: http::Response<Incoming>| async move {
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    };

    let connector =
        MeshConnector::new(&ca.store(FRONTEND), ServerIdentities::any(), ALPN_H2_HTTP11).unwrap();
    let (tls, _) = connector.connect("catalog", tcp(addr).await).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let request = Request::get("http://catalog/whoami")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = h2.send_request(request).await.unwrap();
        assert_eq!(body(resp).await, FRONTEND);
    }

    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp(addr).await))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/whoami")
        .header("host", "catalog")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = h1.send_request(request).await.unwrap();
    assert_eq!(body(resp).await, "anonymous");
}
