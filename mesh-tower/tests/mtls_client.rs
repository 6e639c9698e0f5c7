//! The client side of mTLS over real sockets: `MeshClient::with_certificates`
//! against STRICT servers (`MeshAcceptor::strict`), the cluster's server
//! identities, the 503 for a client without certificates, rotation and
//! certificate expiry in the pool, and the `mesh_ca` provider against a
//! stub of mesh-control's `/v1/certificates` (plaintext and https).

mod common;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::Snapshot;
use mesh_core::model::{Cluster, Locality, Protocol, RoutePolicy, UpstreamTls};
use mesh_core::spiffe::SpiffeId;
use mesh_tower::local_reply::LOCAL_REPLY_HEADER;
use mesh_tower::telemetry::DecisionRecord;
use mesh_tower::tls::{
    ALPN_H2_HTTP11, CertStore, Credentials, MeshAcceptor, MeshCaConfig, WorkloadCertificates,
};
use mesh_tower::{ErrorKind, MeshClient, StaticSource};
use rcgen::CertificateSigningRequestParams;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tower::ServiceExt;
use x509_parser::prelude::{FromDer, X509Certificate};

use common::pki::TestCaExt as _;
use common::{chain, serve_fn};
use mesh_testkit::pki::{self, CATALOG, FRONTEND, PAYMENT, TestCa, Validity, host_san, uri_san};
use mesh_testkit::snapshot::{add_one_service, one_service};
use mesh_testkit::wait::{until, within};

/// A store with a one-hour certificate for `uri`, as mesh-control's CA
/// issues them.
fn store(ca: &TestCa, uri: &str) -> CertStore {
    CertStore::new(credentials(ca, uri, Duration::from_secs(3600))).unwrap()
}

/// Credentials for `uri` valid for `lifetime` from now.
fn credentials(ca: &TestCa, uri: &str, lifetime: Duration) -> Credentials {
    ca.credentials(&ca.leaf_with(uri, Validity::For(lifetime)))
}

fn hex_serial(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A STRICT mTLS server (HTTP/1.1 and h2 by ALPN) answering with the
/// client's SPIFFE ID in the body and its certificate serial in
/// `x-serial`; `/slow` waits for `release`.
struct MtlsServer {
    addr: SocketAddr,
    /// The client certificate serial of each connection, in order.
    serials: Arc<Mutex<Vec<String>>>,
    requests: Arc<AtomicUsize>,
    in_slow: Arc<AtomicUsize>,
    release: Arc<Notify>,
}

async fn mtls_server(ca: &TestCa, identity: &str) -> MtlsServer {
    let acceptor = MeshAcceptor::strict(&store(ca, identity), ALPN_H2_HTTP11).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = MtlsServer {
        addr: listener.local_addr().unwrap(),
        serials: Arc::default(),
        requests: Arc::default(),
        in_slow: Arc::default(),
        release: Arc::new(Notify::new()),
    };
    let (serials, requests, in_slow, release) = (
        server.serials.clone(),
        server.requests.clone(),
        server.in_slow.clone(),
        server.release.clone(),
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let (serials, requests, in_slow, release) = (
                serials.clone(),
                requests.clone(),
                in_slow.clone(),
                release.clone(),
            );
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = stream.peer_identity().map(|p| p.to_string());
                let serial = stream.peer_certificate().map(|c| hex_serial(c));
                serials
                    .lock()
                    .unwrap()
                    .push(serial.clone().unwrap_or_default());
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (peer, serial) = (peer.clone(), serial.clone());
                    let (requests, in_slow, release) =
                        (requests.clone(), in_slow.clone(), release.clone());
                    async move {
                        requests.fetch_add(1, Ordering::SeqCst);
                        if req.uri().path() == "/slow" {
                            let released = release.notified();
                            in_slow.fetch_add(1, Ordering::SeqCst);
                            released.await;
                        }
                        let response = http::Response::builder()
                            .header("x-serial", serial.unwrap_or_default())
                            .body(Full::new(Bytes::from(peer.unwrap_or_default())))
                            .unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    server
}

type Fetched = Result<http::Response<Bytes>, mesh_tower::Error>;

impl MtlsServer {
    /// A GET of `/slow` through `client`, once the server holds it.
    async fn start_slow(&self, client: &Client) -> JoinHandle<Fetched> {
        let slow = tokio::spawn({
            let client = client.clone();
            async move { get(&client, "http://catalog/slow").await }
        });
        until("the slow request to arrive", || {
            self.in_slow.load(Ordering::SeqCst) == 1
        })
        .await;
        slow
    }

    /// Releases the request of `start_slow`: its response.
    async fn finish_slow(&self, slow: JoinHandle<Fetched>) -> http::Response<Bytes> {
        self.release.notify_waiters();
        within("the slow request", slow).await.unwrap().unwrap()
    }
}

/// Rotates `store` to a new one-hour certificate of the frontend: its serial.
fn renew(store: &CertStore, ca: &TestCa) -> String {
    store
        .update(credentials(ca, FRONTEND, Duration::from_secs(3600)))
        .unwrap();
    store.serial()
}

/// A cluster requiring mTLS with servers `identities`.
fn mtls_cluster(protocol: Protocol, identities: &[&str]) -> Cluster {
    Cluster {
        tls: Some(UpstreamTls {
            server_identities: identities
                .iter()
                .map(|id| SpiffeId::parse(id).unwrap())
                .collect(),
            sni: "".into(),
            origination: Default::default(),
        }),
        ..Cluster::new("x", protocol)
    }
}

fn snapshot(name: &str, cluster: Cluster, addr: SocketAddr) -> Snapshot {
    one_service(
        name,
        cluster,
        RoutePolicy::default(),
        &[(addr, Locality::default())],
    )
}

type Client = MeshClient<Full<Bytes>, StaticSource>;

/// Adds the service `legacy`: a plaintext server answering "plaintext".
async fn add_plaintext_legacy(snap: &mut Snapshot) {
    let plain = serve_fn(|_| async { common::reply(200, "plaintext") }).await;
    add_one_service(
        snap,
        "legacy",
        Cluster::new("x", Protocol::Http1),
        RoutePolicy::default(),
        &[(plain, Locality::default())],
    );
}

async fn get(client: &Client, uri: &str) -> Result<http::Response<Bytes>, mesh_tower::Error> {
    let request = Request::get(uri).body(Full::default()).unwrap();
    let response = within(uri, client.clone().oneshot(request)).await?;
    let (head, body) = response.into_parts();
    let body = within("the body", body.collect()).await.unwrap().to_bytes();
    Ok(http::Response::from_parts(head, body))
}

#[tokio::test]
async fn a_client_with_certificates_reaches_mtls_clusters_and_plaintext_ones() {
    let ca = TestCa::new("mesh root");
    let h1 = mtls_server(&ca, CATALOG).await;
    let h2 = mtls_server(&ca, CATALOG).await;
    let mut snap = snapshot(
        "catalog",
        mtls_cluster(Protocol::Http1, &[CATALOG]),
        h1.addr,
    );
    add_one_service(
        &mut snap,
        "catalog-grpc",
        mtls_cluster(Protocol::Http2, &[]),
        RoutePolicy::default(),
        &[(h2.addr, Locality::default())],
    );
    add_plaintext_legacy(&mut snap).await;
    let client = Client::new(StaticSource::new(snap)).with_certificates(store(&ca, FRONTEND));

    for uri in ["http://catalog/items", "http://catalog-grpc/items"] {
        let response = get(&client, uri).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
        assert_eq!(
            response.body(),
            FRONTEND,
            "{uri}: the server saw the client's identity"
        );
    }
    // Pooled: a second request reuses the connections.
    get(&client, "http://catalog/items").await.unwrap();
    get(&client, "http://catalog-grpc/items").await.unwrap();
    assert_eq!(h1.serials.lock().unwrap().len(), 1);
    assert_eq!(h2.serials.lock().unwrap().len(), 1);

    let response = get(&client, "http://legacy/").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.body(), "plaintext");
}

/// The pool hands each attempt the server identity it verified on the
/// connection (what the client's metrics report as `destination_principal`):
/// HTTP/1.1 and HTTP/2, on a fresh and on a pooled connection; none over
/// plaintext.
#[tokio::test]
async fn each_attempt_records_the_server_identity_its_connection_verified() {
    let ca = TestCa::new("mesh root");
    let h1 = mtls_server(&ca, CATALOG).await;
    let h2 = mtls_server(&ca, CATALOG).await;
    let mut snap = snapshot(
        "catalog",
        mtls_cluster(Protocol::Http1, &[CATALOG]),
        h1.addr,
    );
    add_one_service(
        &mut snap,
        "catalog-grpc",
        mtls_cluster(Protocol::Http2, &[]),
        RoutePolicy::default(),
        &[(h2.addr, Locality::default())],
    );
    add_plaintext_legacy(&mut snap).await;
    let client = Client::new(StaticSource::new(snap)).with_certificates(store(&ca, FRONTEND));

    for (uri, want) in [
        ("http://catalog/items", Some(CATALOG)),
        ("http://catalog-grpc/items", Some(CATALOG)),
        ("http://legacy/", None),
    ] {
        for connection in ["fresh", "pooled"] {
            let record = DecisionRecord::new();
            let mut request = Request::get(uri).body(Full::default()).unwrap();
            request.extensions_mut().insert(record.clone());
            let response = within(uri, client.clone().oneshot(request)).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{uri}");
            within("the body", response.into_body().collect())
                .await
                .unwrap();
            assert_eq!(record.attempts(), 1, "{uri}");
            assert_eq!(
                record.upstream_principal_id().map(|p| &**p),
                want,
                "{uri} on a {connection} connection"
            );
        }
    }
    assert_eq!(
        h1.serials.lock().unwrap().len(),
        1,
        "one HTTP/1.1 connection"
    );
    assert_eq!(h2.serials.lock().unwrap().len(), 1, "one HTTP/2 connection");
}

#[tokio::test]
async fn a_server_with_another_identity_fails_the_request_before_any_data() {
    let ca = TestCa::new("mesh root");
    let impostor = mtls_server(&ca, PAYMENT).await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let snap = snapshot("catalog", mtls_cluster(protocol, &[CATALOG]), impostor.addr);
        let client = Client::new(StaticSource::new(snap)).with_certificates(store(&ca, FRONTEND));
        let e = get(&client, "http://catalog/items").await.unwrap_err();
        let text = chain(&e);
        assert!(
            text.contains(&format!(
                "the server identity {PAYMENT} is not one of the cluster's"
            )),
            "{protocol:?}: {text}"
        );
        assert!(text.contains("mTLS handshake with endpoint"), "{text}");
    }
    assert_eq!(
        impostor.requests.load(Ordering::SeqCst),
        0,
        "no request reached the impostor"
    );
}

#[tokio::test]
async fn a_client_without_certificates_gets_a_503_naming_the_fix() {
    let ca = TestCa::new("mesh root");
    let server = mtls_server(&ca, CATALOG).await;
    let mut snap = snapshot(
        "catalog",
        mtls_cluster(Protocol::Http1, &[CATALOG]),
        server.addr,
    );
    add_plaintext_legacy(&mut snap).await;
    let client = Client::new(StaticSource::new(snap));
    let response = get(&client, "http://catalog/items").await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[LOCAL_REPLY_HEADER], "mtls-unavailable");
    let body = String::from_utf8_lossy(response.body());
    assert!(
        body.contains(
            "cluster outbound|80||catalog requires mTLS (ISTIO_MUTUAL) but this client has no \
             workload certificate: configure certificate_providers.mesh in the bootstrap"
        ),
        "{body}"
    );
    assert!(
        server.serials.lock().unwrap().is_empty(),
        "nothing was dialed"
    );
    // gRPC callers get UNAVAILABLE with the same message.
    let request = Request::get("http://catalog/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap();
    let response = client.clone().oneshot(request).await.unwrap();
    assert_eq!(mesh_tower::grpc_status(response.headers()), Some(14));
    // Plaintext clusters of the same client are unaffected.
    let response = get(&client, "http://legacy/").await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn after_a_rotation_new_connections_present_the_new_certificate_and_live_ones_finish() {
    let ca = TestCa::new("mesh root");
    let server = mtls_server(&ca, CATALOG).await;
    let snap = snapshot(
        "catalog",
        mtls_cluster(Protocol::Http1, &[CATALOG]),
        server.addr,
    );
    let store = store(&ca, FRONTEND);
    let client = Client::new(StaticSource::new(snap)).with_certificates(store.clone());
    let old = store.serial();

    // A request in flight on the first connection.
    let slow = server.start_slow(&client).await;

    let new = renew(&store, &ca);
    assert_ne!(old, new);

    // The first connection is busy: this one is new, with the new serial.
    let response = get(&client, "http://catalog/fast").await.unwrap();
    assert_eq!(response.headers()["x-serial"], new.as_str());

    let response = server.finish_slow(slow).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-serial"], old.as_str());
    assert_eq!(*server.serials.lock().unwrap(), vec![old, new]);
}

#[tokio::test]
async fn a_connection_is_not_used_past_the_expiry_of_its_certificate() {
    let ca = TestCa::new("mesh root");
    let server = mtls_server(&ca, CATALOG).await;
    let snap = snapshot(
        "catalog",
        mtls_cluster(Protocol::Http2, &[CATALOG]),
        server.addr,
    );
    let lifetime = Duration::from_secs(3);
    let store = CertStore::new(credentials(&ca, FRONTEND, lifetime)).unwrap();
    let client = Client::new(StaticSource::new(snap)).with_certificates(store.clone());
    let old = store.serial();

    let response = get(&client, "http://catalog/a").await.unwrap();
    assert_eq!(response.headers()["x-serial"], old.as_str());
    // A stream open across the expiry.
    let slow = server.start_slow(&client).await;
    // Rotated at "half-life": the shared HTTP/2 connection stays in use...
    let new = renew(&store, &ca);
    let response = get(&client, "http://catalog/b").await.unwrap();
    assert_eq!(response.headers()["x-serial"], old.as_str());
    // ...until the certificate it was established with expires.
    let expiry = store_expiry_wait(lifetime);
    tokio::time::sleep(expiry).await;
    let response = get(&client, "http://catalog/c").await.unwrap();
    assert_eq!(response.headers()["x-serial"], new.as_str());

    let response = server.finish_slow(slow).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the live stream finished"
    );
    assert_eq!(response.headers()["x-serial"], old.as_str());
}

/// Past a certificate of `lifetime` made just now (X.509 times are whole
/// seconds: one more).
fn store_expiry_wait(lifetime: Duration) -> Duration {
    lifetime + Duration::from_millis(1200)
}

// --- the mesh_ca provider against a stub of /v1/certificates ----------------

/// An issued certificate: its serial and the CSR's public key.
type Issued = (String, Vec<u8>);

#[derive(Clone)]
struct StubCa {
    ca: Arc<TestCa>,
    token: &'static str,
    /// Each issued certificate: (serial, the CSR's public key).
    issued: Arc<Mutex<Vec<Issued>>>,
    /// The `Authorization` header of each registration call.
    registrations: Arc<Mutex<Vec<String>>>,
}

async fn register(
    State(stub): State<StubCa>,
    headers: http::HeaderMap,
) -> (StatusCode, axum::Json<Value>) {
    let auth = headers
        .get(http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    stub.registrations.lock().unwrap().push(auth.clone());
    if auth != format!("Bearer {}", stub.token) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "unknown join token"})),
        );
    }
    (
        StatusCode::CREATED,
        axum::Json(json!({"lease_id": "lease-1", "ttl_seconds": 10})),
    )
}

async fn issue(
    State(stub): State<StubCa>,
    axum::Json(body): axum::Json<Value>,
) -> (StatusCode, axum::Json<Value>) {
    if body["token"] != stub.token {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "unknown join token"})),
        );
    }
    let csr = CertificateSigningRequestParams::from_pem(body["csr"].as_str().unwrap()).unwrap();
    let lifetime = Duration::from_secs(body["lifetime_seconds"].as_u64().unwrap_or(3600));
    let cert = stub
        .ca
        .params(vec![uri_san(FRONTEND)], Validity::For(lifetime))
        .signed_by(&csr.public_key, &stub.ca.issuer)
        .unwrap();
    let serial = hex_serial(cert.der());
    let key = rcgen::PublicKeyData::der_bytes(&csr.public_key).to_vec();
    stub.issued.lock().unwrap().push((serial.clone(), key));
    (
        StatusCode::OK,
        axum::Json(json!({
            "certificate_chain": cert.pem(),
            "trust_bundle": stub.ca.pem,
            "spiffe_id": FRONTEND,
            "serial": serial,
        })),
    )
}

fn stub_ca() -> StubCa {
    StubCa {
        ca: Arc::new(TestCa::new("mesh root")),
        token: "join-frontend",
        issued: Arc::default(),
        registrations: Arc::default(),
    }
}

fn stub_app(stub: &StubCa) -> Router {
    Router::new()
        .route("/v1/certificates", post(issue))
        .route("/v1/endpoints", post(register))
        .route(
            "/v1/endpoints/{id}",
            axum::routing::put(|| async { StatusCode::OK })
                .delete(|| async { StatusCode::NO_CONTENT }),
        )
        .with_state(stub.clone())
}

async fn plaintext_stub(stub: &StubCa) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = stub_app(stub);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The stub over https with a certificate for 127.0.0.1 from `admin_ca`
/// (as mesh-control's admin API, certified by its own CA).
async fn https_stub(stub: &StubCa, admin_ca: &TestCa) -> SocketAddr {
    let cert = admin_ca.issue(
        vec![host_san("127.0.0.1")],
        Validity::For(Duration::from_secs(3600)),
    );
    let config = pki::server_config(&cert, None);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = stub_app(stub);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn mesh_ca_issues_the_first_certificate_and_renews_at_half_life_with_a_new_key() {
    let stub = stub_ca();
    let addr = plaintext_stub(&stub).await;
    let started = Instant::now();
    let certs = WorkloadCertificates::from_mesh_ca(
        MeshCaConfig::new(addr.to_string(), "join-frontend").lifetime(Duration::from_secs(4)),
    )
    .await
    .unwrap();
    assert_eq!(certs.spiffe_id().as_str(), FRONTEND);
    assert_eq!(certs.token(), Some("join-frontend"));
    let first = certs.store().serial();

    // Renewed at half-life (about 2 s of 4), then again.
    let mut changes = certs.store().changes();
    within("the first renewal", changes.changed())
        .await
        .unwrap();
    let renewed_after = started.elapsed();
    assert!(
        renewed_after >= Duration::from_millis(1000),
        "renewed too early: {renewed_after:?}"
    );
    assert_ne!(certs.store().serial(), first);
    within("the second renewal", changes.changed())
        .await
        .unwrap();

    let issued = stub.issued.lock().unwrap().clone();
    assert!(issued.len() >= 3, "{issued:?}");
    let keys: BTreeSet<_> = issued.iter().map(|(_, key)| key.clone()).collect();
    assert_eq!(keys.len(), issued.len(), "a new key for every certificate");
    assert!(
        issued
            .iter()
            .any(|(serial, _)| *serial == certs.store().serial())
    );

    // Renewal stops with the last handle.
    drop(certs);
    let count = stub.issued.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(stub.issued.lock().unwrap().len(), count);
}

/// The app of the registration tests.
async fn ok(
    _req: Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    Ok(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// Serves with `registration`, which registers with the stub by the join
/// token of the frontend, then shuts down.
async fn registers_with_the_join_token(stub: &StubCa, registration: mesh_tower::Registration) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving = mesh_tower::serve(listener, registration, tower::service_fn(ok))
        .await
        .unwrap();
    assert_eq!(
        *stub.registrations.lock().unwrap(),
        vec!["Bearer join-frontend".to_owned()]
    );
    serving.shutdown().await.unwrap();
}

/// The certificates of the `mesh` provider of `bootstrap`: the frontend's.
async fn frontend_certificates(bootstrap: &mesh_xds_client::Bootstrap) -> WorkloadCertificates {
    let certs = WorkloadCertificates::from_bootstrap(bootstrap)
        .await
        .unwrap()
        .expect("certificate_providers.mesh is set");
    assert_eq!(certs.spiffe_id().as_str(), FRONTEND);
    certs
}

#[tokio::test]
async fn mesh_ca_over_https_and_a_refused_token() {
    let stub = stub_ca();
    let admin_ca = TestCa::new("mesh-control root");
    let addr = https_stub(&stub, &admin_ca).await;
    let certs = WorkloadCertificates::from_ca_endpoint(
        &addr.to_string(),
        "join-frontend",
        Some(admin_ca.pem.as_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(certs.spiffe_id().as_str(), FRONTEND);

    let e = WorkloadCertificates::from_ca_endpoint(
        &addr.to_string(),
        "stolen",
        Some(admin_ca.pem.as_bytes()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Tls);
    let text = e.to_string();
    assert!(
        text.contains("401 Unauthorized: unknown join token"),
        "{text}"
    );

    // A server certificate from another CA is refused.
    let other = TestCa::new("someone else");
    let e = WorkloadCertificates::from_ca_endpoint(
        &addr.to_string(),
        "join-frontend",
        Some(other.pem.as_bytes()),
    )
    .await
    .unwrap_err();
    assert!(
        chain(&e).contains("POST /v1/certificates failed"),
        "{}",
        chain(&e)
    );
}

#[tokio::test]
async fn mesh_ca_from_the_bootstrap_with_a_token_file() {
    let stub = stub_ca();
    let addr = plaintext_stub(&stub).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "join-frontend\n").unwrap();
    let bootstrap = mesh_xds_client::Bootstrap::builder("http://127.0.0.1:1", "frontend-1")
        .admin_address(addr.to_string())
        .certificate_provider(
            "mesh",
            json!({"plugin_name": "mesh_ca",
                   "config": {"token_file": token.to_str().unwrap(), "lifetime": "1h"}}),
        )
        .build()
        .unwrap();
    let certs = frontend_certificates(&bootstrap).await;
    assert_eq!(certs.token(), Some("join-frontend"));
    let not_after = certs.store().not_after();
    let left = not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(3000) && left <= Duration::from_secs(3601),
        "{left:?}"
    );
}

#[tokio::test]
async fn registration_over_https_sends_the_join_token_and_shows_a_refusal() {
    let stub = stub_ca();
    let admin_ca = TestCa::new("mesh-control root");
    let addr = https_stub(&stub, &admin_ca).await;

    let registration = mesh_tower::Registration::new(addr.to_string(), "catalog")
        .admin_ca_pem(admin_ca.pem.as_bytes())
        .token("join-frontend");
    registers_with_the_join_token(&stub, registration).await;

    let refused = mesh_tower::Registration::new(addr.to_string(), "catalog")
        .admin_ca_pem(admin_ca.pem.as_bytes())
        .token("stolen");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = mesh_tower::serve(listener, refused, tower::service_fn(ok))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Registration);
    let text = chain(&e);
    assert!(
        text.contains("POST /v1/endpoints answered 401 Unauthorized: unknown join token"),
        "{text}"
    );
    assert!(text.contains(&format!("https://{addr}")), "{text}");
}

#[tokio::test]
async fn mesh_ca_from_a_tls_bootstrap_uses_https_verified_with_its_ca_file() {
    let stub = stub_ca();
    let admin_ca = TestCa::new("mesh-control root");
    let addr = https_stub(&stub, &admin_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, &admin_ca.pem).unwrap();
    // A TLS bootstrap naming `ca_file`, the mesh_ca provider with a token.
    let tls_bootstrap = |ca_file: std::path::PathBuf| {
        mesh_xds_client::Bootstrap::builder("http://127.0.0.1:1", "frontend-1")
            .channel_tls(ca_file)
            .admin_address(addr.to_string())
            .certificate_provider(
                "mesh",
                json!({"plugin_name": "mesh_ca", "config": {"token": "join-frontend"}}),
            )
            .build()
            .unwrap()
    };
    let bootstrap = tls_bootstrap(root);
    let _certs = frontend_certificates(&bootstrap).await;

    // Registration from the same bootstrap: https, and the join token.
    let registration = mesh_tower::Registration::from_bootstrap(&bootstrap, "catalog").unwrap();
    registers_with_the_join_token(&stub, registration).await;

    // A CA file that cannot be read is named.
    let missing = tls_bootstrap(dir.path().join("nope.pem"));
    let e = WorkloadCertificates::from_bootstrap(&missing)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
    assert!(e.to_string().contains("ca_certificate_file"), "{e}");
}
