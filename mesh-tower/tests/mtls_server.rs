//! The secure server over real sockets: `serve_with` under an
//! `InboundPolicy` (STRICT, PERMISSIVE, DISABLE), authorization in
//! `ServerLayer` (403 / PERMISSION_DENIED naming the policy), policy changes
//! without a restart, and the maximum connection age (a connection is
//! GOAWAY'd when the certificate it was established with expires).
//! Certificates come from rcgen CAs made in the test (`mesh_testkit::pki`).

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::Request as AxumRequest;
use bytes::Bytes;
use common::admin::fake_admin;
use common::chain;
use common::pki::TestCaExt as _;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::model::MtlsMode;
use mesh_core::rbac::{Action, AuthorizationPolicy, Operation, Rule, Source, StringMatch};
use mesh_testkit::ads::{AdsServer, Resources};
use mesh_testkit::logs::Lines;
use mesh_testkit::pki::{
    CATALOG, FRONTEND, Leaf, PAYMENT, TestCa, Validity, server_name, trust_any_server,
};
use mesh_testkit::wait::within;
use mesh_tower::telemetry::{Identity, MetricsRegistry, Telemetry};
use mesh_tower::tls::{CertStore, PeerIdentity};
use mesh_tower::{
    ConnectionInfo, ErrorKind, InboundPolicy, Registration, Security, ServerContext, ServerLayer,
    Serving, serve_with,
};
use mesh_xds_client::{Bootstrap, XdsClient};
use rustls::ClientConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ----- policies -----

/// An ALLOW policy in namespace `shop` for one principal (Istio's
/// `from.source.principals`, written without `spiffe://`).
fn allow_principal(name: &str, spiffe_id: &str) -> AuthorizationPolicy {
    let principal = spiffe_id.trim_start_matches("spiffe://");
    AuthorizationPolicy::new(
        "shop",
        name,
        Action::Allow,
        vec![Rule {
            from: vec![Source {
                principals: vec![StringMatch::parse(principal).unwrap()].into(),
                ..Source::default()
            }]
            .into(),
            ..Rule::default()
        }],
    )
    .unwrap()
}

/// A DENY policy in namespace `shop` for paths under `prefix`.
fn deny_path(name: &str, prefix: &str) -> AuthorizationPolicy {
    AuthorizationPolicy::new(
        "shop",
        name,
        Action::Deny,
        vec![Rule {
            to: vec![Operation {
                paths: vec![StringMatch::parse_path(&format!("{prefix}*")).unwrap()].into(),
                ..Operation::default()
            }]
            .into(),
            ..Rule::default()
        }],
    )
    .unwrap()
}

// ----- the server -----

/// The app: answers `peer=<SPIFFE ID or none> port=<client port>`; `/slow`
/// after `slow_for`. Counts the requests it sees.
fn app(calls: Arc<AtomicUsize>, slow_for: Duration) -> Router {
    Router::new().fallback(move |req: AxumRequest| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if req.uri().path() == "/slow" {
                tokio::time::sleep(slow_for).await;
            }
            let peer = req
                .extensions()
                .get::<PeerIdentity>()
                .map_or("none".to_string(), |p| p.to_string());
            let port = req
                .extensions()
                .get::<ConnectionInfo>()
                .map_or(0, |c| c.peer_addr().port());
            format!("peer={peer} port={port}")
        }
    })
}

fn context() -> ServerContext {
    ServerContext::new("catalog", "shop", "catalog-1")
}

struct Server {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    _serving: Serving,
}

/// `serve_with` under `policy`, with `store` as the workload certificate,
/// the app under a `ServerLayer` (which authorizes with the policy
/// `serve_with` passes along).
async fn secure_server(
    policy: InboundPolicy,
    store: Option<CertStore>,
) -> Result<Server, mesh_tower::Error> {
    secure_server_with(policy, store, |app| app.layer(ServerLayer::new(context()))).await
}

async fn secure_server_with(
    policy: InboundPolicy,
    store: Option<CertStore>,
    layer: impl FnOnce(Router) -> Router,
) -> Result<Server, mesh_tower::Error> {
    secure_server_reporting(policy, store, layer, None).await
}

/// [`secure_server_with`], with `serve_with` reporting the requests it
/// refuses itself under `telemetry`.
async fn secure_server_reporting(
    policy: InboundPolicy,
    store: Option<CertStore>,
    layer: impl FnOnce(Router) -> Router,
    telemetry: Option<Telemetry>,
) -> Result<Server, mesh_tower::Error> {
    let (admin, _) = fake_admin(0, None).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut security = Security::new(policy);
    if let Some(store) = store {
        security = security.certificates(store);
    }
    if let Some(telemetry) = telemetry {
        security = security.telemetry(telemetry);
    }
    let serving = serve_with(
        listener,
        Registration::new(admin.to_string(), "catalog").namespace("shop"),
        layer(app(calls.clone(), Duration::from_millis(2500))),
        security,
    )
    .await?;
    Ok(Server {
        addr,
        calls,
        _serving: serving,
    })
}

// ----- clients -----

/// How a test client connects.
#[derive(Clone)]
enum Tls {
    Plaintext,
    /// TLS without a client certificate.
    Anonymous,
    /// mTLS with this certificate.
    Cert(Leaf),
}

/// A client TLS config that trusts any server (these tests check the
/// server) and presents `cert`, if any.
fn client_config(cert: Option<&Leaf>, alpn: &[u8]) -> Arc<ClientConfig> {
    let mut config = trust_any_server(cert);
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// A response, read whole.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn grpc_status(&self) -> Option<&str> {
        self.headers.get("grpc-status").map(|v| v.to_str().unwrap())
    }

    fn grpc_message(&self) -> &str {
        self.headers
            .get("grpc-message")
            .map_or("", |v| v.to_str().unwrap())
    }
}

/// One request on a new connection: HTTP/1.1 or (`h2`) HTTP/2, over
/// plaintext or TLS. `Err` when the connection or the request failed.
async fn send(
    addr: SocketAddr,
    tls: &Tls,
    h2: bool,
    request: Request<Full<Bytes>>,
) -> Result<Reply, BoxError> {
    within("a request", async {
        let tcp = TcpStream::connect(addr).await?;
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        match tls {
            Tls::Plaintext => exchange(tcp, h2, request).await,
            Tls::Anonymous => {
                let stream = TlsConnector::from(client_config(None, alpn))
                    .connect(server_name(), tcp)
                    .await?;
                exchange(stream, h2, request).await
            }
            Tls::Cert(leaf) => {
                let stream = TlsConnector::from(client_config(Some(leaf), alpn))
                    .connect(server_name(), tcp)
                    .await?;
                exchange(stream, h2, request).await
            }
        }
    })
    .await
}

async fn exchange<IO>(io: IO, h2: bool, request: Request<Full<Bytes>>) -> Result<Reply, BoxError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(connection);
        sender.send_request(request).await?
    };
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://catalog{path}"))
        .body(Full::default())
        .unwrap()
}

/// GET `path`, which must be answered (any status).
async fn get_reply(addr: SocketAddr, tls: &Tls, h2: bool, path: &str) -> Reply {
    send(addr, tls, h2, get(path)).await.unwrap()
}

/// GET `path` is served (200) and the app sees `peer`: the client's
/// SPIFFE ID, or `none` without a verified one.
async fn assert_served_as(addr: SocketAddr, tls: &Tls, h2: bool, path: &str, peer: &str) {
    let reply = get_reply(addr, tls, h2, path).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply.body.starts_with(&format!("peer={peer} ")),
        "{reply:?}"
    );
}

/// A unary gRPC call's request (the body is not looked at).
fn grpc(path: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://catalog{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::from(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap()
}

/// A server with the catalog's certificate from `ca`, `mode` and `policies`.
async fn catalog_server(ca: &TestCa, mode: MtlsMode, policies: Vec<AuthorizationPolicy>) -> Server {
    secure_server(
        InboundPolicy::fixed(mode, policies),
        Some(ca.store(CATALOG)),
    )
    .await
    .unwrap()
}

/// A GET of `/items` with a frontend certificate from `ca` is served, and
/// the app sees the frontend.
async fn assert_served_as_frontend(addr: SocketAddr, ca: &TestCa, h2: bool) {
    assert_served_as(addr, &Tls::Cert(ca.leaf(FRONTEND)), h2, "/items", FRONTEND).await;
}

// ----- tests -----

#[tokio::test]
async fn strict_accepts_only_valid_mesh_identities() {
    let ca = TestCa::new("mesh root");
    let other_ca = TestCa::new("another root");
    let server = catalog_server(&ca, MtlsMode::Strict, Vec::new()).await;

    // A valid mesh identity: accepted, over HTTP/1.1 and HTTP/2, and the
    // app sees who called.
    for h2 in [false, true] {
        assert_served_as_frontend(server.addr, &ca, h2).await;
    }
    let seen = server.calls.load(Ordering::SeqCst);

    let refused = [
        ("no client certificate", Tls::Anonymous),
        (
            "a certificate from another CA",
            Tls::Cert(other_ca.leaf(FRONTEND)),
        ),
        (
            "another trust domain",
            Tls::Cert(ca.leaf("spiffe://other.org/ns/shop/sa/frontend")),
        ),
        (
            "an expired certificate",
            Tls::Cert(ca.leaf_with(FRONTEND, Validity::Expired)),
        ),
        ("plaintext", Tls::Plaintext),
    ];
    for (why, tls) in refused {
        for h2 in [false, true] {
            let result = send(server.addr, &tls, h2, get("/items")).await;
            assert!(result.is_err(), "{why} (h2: {h2}): got {result:?}");
        }
    }
    assert_eq!(
        server.calls.load(Ordering::SeqCst),
        seen,
        "a refused client reached the app"
    );
}

#[tokio::test]
async fn an_allow_policy_admits_its_principal_and_denies_others_with_403_or_permission_denied() {
    let ca = TestCa::new("mesh root");
    let server = catalog_server(
        &ca,
        MtlsMode::Strict,
        vec![allow_principal("allow-frontend", FRONTEND)],
    )
    .await;
    let frontend = Tls::Cert(ca.leaf(FRONTEND));
    let payment = Tls::Cert(ca.leaf(PAYMENT));

    // A (frontend) is allowed.
    let reply = get_reply(server.addr, &frontend, false, "/items").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let reply = send(server.addr, &frontend, true, grpc("/shop.Catalog/List"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_ne!(reply.grpc_status(), Some("7"), "{reply:?}");
    let allowed = server.calls.load(Ordering::SeqCst);
    assert_eq!(allowed, 2);

    // B (payment) is denied: 403 naming the policy, the app not called.
    for h2 in [false, true] {
        let reply = get_reply(server.addr, &payment, h2, "/items").await;
        assert_eq!(reply.status, 403, "{reply:?}");
        assert!(reply.body.starts_with("RBAC: access denied"), "{reply:?}");
        assert!(reply.body.contains("shop/allow-frontend"), "{reply:?}");
    }
    // A gRPC call from B: Trailers-Only PERMISSION_DENIED naming the policy.
    let reply = send(server.addr, &payment, true, grpc("/shop.Catalog/List"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.grpc_status(), Some("7"), "{reply:?}");
    assert!(
        reply.grpc_message().starts_with("RBAC: access denied"),
        "{reply:?}"
    );
    assert!(
        reply.grpc_message().contains("shop/allow-frontend"),
        "{reply:?}"
    );
    assert_eq!(server.calls.load(Ordering::SeqCst), allowed);
}

#[tokio::test]
async fn serve_with_enforces_the_policy_when_the_app_has_no_server_layer() {
    // The app forgot ServerLayer: serve_with authorizes itself, so the policy
    // still holds (an app served under a policy is never left unchecked).
    let ca = TestCa::new("mesh root");
    let policy = InboundPolicy::fixed(
        MtlsMode::Strict,
        vec![allow_principal("allow-frontend", FRONTEND)],
    );
    let server = secure_server_with(policy.clone(), Some(ca.store(CATALOG)), |app| app)
        .await
        .unwrap();
    let reply = get_reply(server.addr, &Tls::Cert(ca.leaf(PAYMENT)), true, "/items").await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert!(reply.body.contains("shop/allow-frontend"), "{reply:?}");
    let reply = send(
        server.addr,
        &Tls::Cert(ca.leaf(PAYMENT)),
        true,
        grpc("/shop.Catalog/List"),
    )
    .await
    .unwrap();
    assert_eq!(reply.grpc_status(), Some("7"), "{reply:?}");
    assert_eq!(
        server.calls.load(Ordering::SeqCst),
        0,
        "a denied request ran the app"
    );
    assert_eq!(policy.denied(), 2);
    assert_served_as_frontend(server.addr, &ca, false).await;
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_deny_policy_names_itself_and_other_paths_pass() {
    let ca = TestCa::new("mesh root");
    let policy = InboundPolicy::fixed(MtlsMode::Strict, vec![deny_path("deny-admin", "/admin")]);
    let server = secure_server(policy.clone(), Some(ca.store(CATALOG)))
        .await
        .unwrap();
    let frontend = Tls::Cert(ca.leaf(FRONTEND));
    let reply = get_reply(server.addr, &frontend, false, "/admin/users").await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.body.trim_end(),
        "RBAC: access denied (policy shop/deny-admin)"
    );
    let reply = get_reply(server.addr, &frontend, false, "/items").await;
    assert_eq!(reply.status, 200);
    assert_eq!(policy.denied(), 1);
}

#[tokio::test]
async fn permissive_accepts_plaintext_and_mtls_and_only_mtls_has_an_identity() {
    let ca = TestCa::new("mesh root");
    let server = catalog_server(&ca, MtlsMode::Permissive, Vec::new()).await;
    for h2 in [false, true] {
        assert_served_as(server.addr, &Tls::Plaintext, h2, "/items", "none").await;

        assert_served_as_frontend(server.addr, &ca, h2).await;

        // TLS without a client certificate: served, unauthenticated.
        assert_served_as(server.addr, &Tls::Anonymous, h2, "/items", "none").await;
    }
}

#[tokio::test]
async fn disable_serves_plaintext_without_certificates() {
    let ca = TestCa::new("mesh root");
    let server = secure_server(InboundPolicy::fixed(MtlsMode::Disable, Vec::new()), None)
        .await
        .unwrap();
    for h2 in [false, true] {
        assert_served_as(server.addr, &Tls::Plaintext, h2, "/items", "none").await;
    }
    let tls = send(
        server.addr,
        &Tls::Cert(ca.leaf(FRONTEND)),
        false,
        get("/items"),
    )
    .await;
    assert!(tls.is_err(), "TLS to a DISABLE port: {tls:?}");
}

#[tokio::test]
async fn strict_or_permissive_without_certificates_refuse_to_start() {
    for mode in [MtlsMode::Strict, MtlsMode::Permissive] {
        let Err(e) = secure_server(InboundPolicy::fixed(mode, Vec::new()), None).await else {
            panic!("{mode} served without certificates");
        };
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert!(e.to_string().contains("certificate_providers.mesh"), "{e}");
        assert!(e.to_string().contains(mode.as_str()), "{e}");
    }
}

#[tokio::test]
async fn server_layer_under_strict_fails_closed_without_the_secure_serve() {
    // A plain hyper server (axum::serve): no TLS, so no peer identity.
    let policy = InboundPolicy::fixed(MtlsMode::Strict, Vec::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(calls.clone(), Duration::ZERO)
        .layer(ServerLayer::new(context()).inbound(policy.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    for h2 in [false, true] {
        let reply = get_reply(addr, &Tls::Plaintext, h2, "/items").await;
        assert_eq!(reply.status, 403, "{reply:?}");
        assert!(reply.body.starts_with("RBAC: access denied"), "{reply:?}");
        assert!(reply.body.contains("STRICT"), "{reply:?}");
    }
    let reply = send(addr, &Tls::Plaintext, true, grpc("/shop.Catalog/List"))
        .await
        .unwrap();
    assert_eq!(reply.grpc_status(), Some("7"), "{reply:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(policy.denied(), 3);

    // PERMISSIVE with no policies lets plaintext through.
    policy.set(MtlsMode::Permissive, Vec::new());
    let reply = get_reply(addr, &Tls::Plaintext, false, "/items").await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn policy_and_mode_changes_apply_without_a_restart() {
    let ca = TestCa::new("mesh root");
    let policy = InboundPolicy::fixed(
        MtlsMode::Strict,
        vec![allow_principal("allow-frontend", FRONTEND)],
    );
    let mut modes = policy.changes();
    let server = secure_server(policy.clone(), Some(ca.store(CATALOG)))
        .await
        .unwrap();
    let frontend = Tls::Cert(ca.leaf(FRONTEND));
    let payment = Tls::Cert(ca.leaf(PAYMENT));
    assert_eq!(
        get_reply(server.addr, &payment, false, "/pay").await.status,
        403
    );

    // New policies: requests from now on use them.
    policy.set(
        MtlsMode::Strict,
        vec![allow_principal("allow-payment", PAYMENT)],
    );
    assert!(!modes.has_changed().unwrap());
    assert_eq!(
        get_reply(server.addr, &payment, false, "/pay").await.status,
        200
    );
    let reply = get_reply(server.addr, &frontend, false, "/pay").await;
    assert_eq!(reply.status, 403);
    assert!(reply.body.contains("shop/allow-payment"), "{reply:?}");
    assert!(
        send(server.addr, &Tls::Plaintext, false, get("/pay"))
            .await
            .is_err()
    );

    // A new mode: new connections are accepted under it.
    policy.set(MtlsMode::Permissive, Vec::new());
    assert!(modes.has_changed().unwrap());
    assert_eq!(*modes.borrow_and_update(), MtlsMode::Permissive);
    assert_served_as(server.addr, &Tls::Plaintext, false, "/pay", "none").await;
    assert_eq!(
        get_reply(server.addr, &frontend, true, "/pay").await.status,
        200
    );

    // And back to STRICT: plaintext is refused again.
    policy.set(MtlsMode::Strict, Vec::new());
    assert!(
        send(server.addr, &Tls::Plaintext, false, get("/pay"))
            .await
            .is_err()
    );
    assert_eq!(
        get_reply(server.addr, &frontend, false, "/pay")
            .await
            .status,
        200
    );
}

/// A pooling HTTP/2 client over TLS (hyper-util's legacy client with a
/// rustls connector), which reconnects after a GOAWAY.
#[derive(Clone)]
struct TlsConnect {
    addr: SocketAddr,
    connector: TlsConnector,
    connects: Arc<AtomicUsize>,
}

struct TlsIo(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl tower::Service<Uri> for TlsConnect {
    type Response = TlsIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            this.connects.fetch_add(1, Ordering::SeqCst);
            let tcp = TcpStream::connect(this.addr).await?;
            let tls = this.connector.connect(server_name(), tcp).await?;
            Ok(TlsIo(TokioIo::new(tls)))
        })
    }
}

impl hyper::rt::Read for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl Connection for TlsIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

#[tokio::test]
async fn a_connection_is_goawayed_when_its_certificate_expires_and_the_client_reconnects() {
    let ca = TestCa::new("mesh root");
    // The server starts with a certificate that expires in 1 to 2 s
    // (validity has whole seconds)...
    let short = ca.leaf_with(CATALOG, Validity::For(Duration::from_secs(2)));
    let store = CertStore::new(ca.credentials(&short)).unwrap();
    let expires = store.not_after();
    let server = secure_server(
        InboundPolicy::fixed(MtlsMode::Strict, Vec::new()),
        Some(store.clone()),
    )
    .await
    .unwrap();
    let connects = Arc::new(AtomicUsize::new(0));
    let client: Client<TlsConnect, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(TlsConnect {
            addr: server.addr,
            connector: TlsConnector::from(client_config(Some(&ca.leaf(FRONTEND)), b"h2")),
            connects: connects.clone(),
        });
    let fetch = |path: &'static str| {
        let client = client.clone();
        async move {
            let response = within("a pooled request", client.request(get(path)))
                .await
                .map_err(|e| chain(&e))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| chain(&e))?;
            Ok::<_, String>((
                status,
                String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            ))
        }
    };
    let port = |body: &str| body.rsplit_once("port=").unwrap().1.to_string();

    let (status, first) = fetch("/items").await.unwrap();
    assert_eq!(status, 200);
    // ...and is renewed right away: the live connection keeps its age.
    store.update(ca.credentials(&ca.leaf(CATALOG))).unwrap();

    // A request in flight across the expiry finishes on the first
    // connection (the app holds `/slow` for 2.5 s, past the expiry).
    let slow = tokio::spawn(fetch("/slow"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, during) = fetch("/items").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(port(&during), port(&first), "one pooled connection");
    let (status, slow) = slow.await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(port(&slow), port(&first));
    assert_eq!(connects.load(Ordering::SeqCst), 1);

    // After the expiry the first connection is gone; the next request
    // opens a new one and succeeds.
    let past_expiry = expires + Duration::from_millis(300);
    if let Ok(wait) = past_expiry.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let (status, after) = fetch("/items").await.unwrap();
    assert_eq!(status, 200);
    assert_ne!(
        port(&after),
        port(&first),
        "still on the expired connection"
    );
    assert_eq!(connects.load(Ordering::SeqCst), 2);
    // The new connection has the renewed certificate's age: it stays.
    let (status, again) = fetch("/items").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(port(&again), port(&after));
}

#[tokio::test]
async fn from_xds_needs_the_server_listener_template_and_waits_for_the_listener() {
    // No template in the bootstrap: the error says what to add.
    let bootstrap = Bootstrap::builder("http://127.0.0.1:1", "catalog-1")
        .build()
        .unwrap();
    let xds = XdsClient::start(bootstrap);
    let addr: SocketAddr = "10.0.0.7:8080".parse().unwrap();
    let e = InboundPolicy::from_xds(&xds, addr).unwrap_err();
    assert!(
        e.to_string()
            .contains("server_listener_resource_name_template"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("grpc/server?xds.resource.listening_address=%s"),
        "{e}"
    );

    // With a template, but no control server: not ready, named, fails closed.
    let bootstrap = Bootstrap::builder("http://127.0.0.1:1", "catalog-1")
        .server_listener_resource_name_template("grpc/server?xds.resource.listening_address=%s")
        .build()
        .unwrap();
    let xds = XdsClient::start(bootstrap);
    let policy = InboundPolicy::from_xds(&xds, addr).unwrap();
    assert_eq!(
        policy.listener(),
        Some("grpc/server?xds.resource.listening_address=10.0.0.7:8080")
    );
    assert!(!policy.current().is_ready());
    assert_eq!(policy.mode(), MtlsMode::Strict);
    let e = policy.ready(Duration::from_millis(200)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(
        e.to_string()
            .contains("grpc/server?xds.resource.listening_address=10.0.0.7:8080"),
        "{e}"
    );
    // serve_with does not serve before the listener arrives.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = serve_with(
        listener,
        Registration::new("127.0.0.1:1", "catalog"),
        Router::new(),
        Security::new(policy.clone()).policy_timeout(Duration::from_millis(100)),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);

    // A ServerLayer under a policy that has not arrived refuses requests
    // (503 / UNAVAILABLE), never lets them through.
    let app = Router::new()
        .fallback(|| async { "served" })
        .layer(ServerLayer::new(context()).inbound(policy));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let reply = get_reply(addr, &Tls::Plaintext, false, "/items").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    let reply = send(addr, &Tls::Plaintext, true, grpc("/shop.Catalog/List"))
        .await
        .unwrap();
    assert_eq!(reply.grpc_status(), Some("14"), "{reply:?}");
}

#[test]
fn a_denial_is_counted_logged_and_recorded_with_the_policy() {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "proxyless::access=info,mesh_tower::server=info",
        ))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // One thread: the subscriber above sees every task.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry = MetricsRegistry::new();
    runtime.block_on(async {
        let ca = TestCa::new("mesh root");
        let telemetry =
            Telemetry::builder(Identity::new("catalog", "shop").with_principal(CATALOG))
                .metrics(&registry)
                .access_log(true)
                .build();
        // serve_with denies before the app: under the same telemetry as the
        // app's, its denials are traced, counted and logged as the app's
        // requests are (each request by one of the two, never both).
        let policy =
            InboundPolicy::fixed(MtlsMode::Strict, vec![deny_path("deny-admin", "/admin")]);
        let server = secure_server_reporting(
            policy.clone(),
            Some(ca.store(CATALOG)),
            |app| {
                app.layer(
                    ServerLayer::new(context())
                        .inbound(policy)
                        .telemetry(telemetry.clone()),
                )
            },
            Some(telemetry.clone()),
        )
        .await
        .unwrap();
        let payment = Tls::Cert(ca.leaf(PAYMENT));
        let reply = get_reply(server.addr, &payment, false, "/admin/keys").await;
        assert_eq!(reply.status, 403);
        let reply = get_reply(server.addr, &payment, false, "/items").await;
        assert_eq!(reply.status, 200);
        // The access log line is written when the response body ends.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while lines.text().matches("\"direction\":\"inbound\"").count() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "{}", lines.text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let text = lines.text();
    // A `tracing` INFO line names the policy.
    assert!(
        text.lines()
            .any(|l| l.contains("request denied by authorization")
                && l.contains("shop/deny-admin")
                && l.contains(PAYMENT)),
        "{text}"
    );
    // The access log line carries it, as Envoy's RBAC filter writes it.
    let access: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.find('{').map(|i| &l[i..]))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let denied = access
        .iter()
        .find(|v| v["response_code"] == 403)
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(
        denied["response_code_details"],
        "rbac_access_denied_matched_policy[shop/deny-admin]"
    );
    assert_eq!(denied["downstream_peer_principal"], PAYMENT);
    assert_eq!(denied["path"], "/admin/keys");
    let allowed = access
        .iter()
        .find(|v| v["response_code"] == 200)
        .unwrap_or_else(|| panic!("{text}"));
    assert!(allowed["response_code_details"].is_null());

    // Istio's metrics count it with response_code 403 and the peer's
    // principal, over mTLS.
    let metrics = registry.render();
    let denied_series = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("response_code=\"403\"")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        denied_series.contains(&format!("source_principal=\"{PAYMENT}\"")),
        "{denied_series}"
    );
    assert!(
        denied_series.contains("connection_security_policy=\"mutual_tls\""),
        "{denied_series}"
    );
    assert!(denied_series.ends_with(" 1"), "{denied_series}");
}

// ----- the policy over xDS (gRFC A36), from an ADS server of canned resources -----

fn server_listener(
    name: &str,
    address: SocketAddr,
    mtls: MtlsMode,
    policies: Vec<AuthorizationPolicy>,
) -> mesh_core::xds::Any {
    mesh_core::xds::encode_server_listener(&mesh_core::model::ServerListener {
        name: name.into(),
        address,
        mtls,
        policies: policies.into(),
        rate_limit: None,
        cors: Default::default(),
    })
}

#[tokio::test]
async fn an_xds_policy_arrives_before_serving_and_updates_in_place() {
    const TEMPLATE: &str = "grpc/server?xds.resource.listening_address=%s";
    let ca = TestCa::new("mesh root");
    let ads = AdsServer::start(Resources::new(), "1").await;
    let xds = XdsClient::start(
        Bootstrap::builder(format!("http://{}", ads.addr()), "catalog-1")
            .server_listener_resource_name_template(TEMPLATE)
            .build()
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = TEMPLATE.replace("%s", &addr.to_string());
    ads.update(|r| {
        r.insert(
            name.clone(),
            server_listener(
                &name,
                addr,
                MtlsMode::Strict,
                vec![allow_principal("allow-frontend", FRONTEND)],
            ),
        );
    });

    let policy = InboundPolicy::from_xds(&xds, addr).unwrap();
    assert_eq!(policy.listener(), Some(name.as_str()));
    let mut modes = policy.changes();
    let (admin, _) = fake_admin(0, None).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let _serving = serve_with(
        listener,
        Registration::new(admin.to_string(), "catalog").namespace("shop"),
        app(calls, Duration::ZERO).layer(ServerLayer::new(context())),
        Security::new(policy.clone()).certificates(ca.store(CATALOG)),
    )
    .await
    .unwrap();
    // Served only once the listener arrived, under its mode and policies.
    assert!(policy.current().is_ready());
    assert_eq!(policy.mode(), MtlsMode::Strict);
    let frontend = Tls::Cert(ca.leaf(FRONTEND));
    let payment = Tls::Cert(ca.leaf(PAYMENT));
    assert_eq!(
        get_reply(addr, &frontend, false, "/items").await.status,
        200
    );
    let reply = send(addr, &payment, true, grpc("/shop.Catalog/List"))
        .await
        .unwrap();
    assert_eq!(reply.grpc_status(), Some("7"), "{reply:?}");
    assert!(
        reply.grpc_message().contains("shop/allow-frontend"),
        "{reply:?}"
    );
    assert!(
        send(addr, &Tls::Plaintext, false, get("/items"))
            .await
            .is_err()
    );

    // The control server changes the listener: PERMISSIVE, no policies.
    ads.update(|r| {
        r.insert(
            name.clone(),
            server_listener(&name, addr, MtlsMode::Permissive, Vec::new()),
        );
    });
    within(
        "the new mode",
        modes.wait_for(|m| *m == MtlsMode::Permissive),
    )
    .await
    .unwrap();
    assert!(policy.current().policies().is_empty());
    let reply = get_reply(addr, &Tls::Plaintext, false, "/items").await;
    assert_eq!(reply.status, 200);
    assert_eq!(get_reply(addr, &payment, false, "/items").await.status, 200);

    // A listener the control server does not have: ready() says so.
    let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let missing = InboundPolicy::from_xds(&xds, other).unwrap();
    let e = missing.ready(Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string().contains("listening_address=127.0.0.1:1"),
        "{e}"
    );
}
