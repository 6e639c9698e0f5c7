//! Authorization fails closed by construction (issue 13, acceptance 1):
//! `serve_with` checks every request itself, whatever the app is made of,
//! and a `ServerLayer` never switches that check off. Over real sockets and
//! real mTLS (certificates from `mesh_testkit::pki`), with an app of three
//! parts that a `ServerLayer` does not all wrap: a route merged after
//! `.layer(...)`, a nested router and a second tonic service (CSDS, from
//! envoy-types, as axum routes). Under STRICT and an ALLOW policy for the
//! frontend (A), payment (B) gets 403 / PERMISSION_DENIED on every route
//! and A gets 200 / OK; a layer built and never applied changes nothing; a
//! `ServerLayer` used without `serve_with` authorizes by itself; and a
//! denial decided by `serve_with` is traced and counted.

#![cfg(feature = "telemetry")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use common::admin::fake_admin;
use common::pki::TestCaExt as _;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::{
    ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::status::v3::{
    ClientConfig as CsdsConfig, ClientStatusRequest, ClientStatusResponse,
};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::model::MtlsMode;
use mesh_core::rbac::{Action, AuthorizationPolicy, Rule, Source, StringMatch};
use mesh_core::spiffe::SpiffeId;
use mesh_testkit::otlp::{Receiver, SpanKind, find};
use mesh_testkit::pki::{CATALOG, FRONTEND, Leaf, PAYMENT, TestCa, server_name, trust_any_server};
use mesh_testkit::wait::within;
use mesh_tower::telemetry::{Identity, MetricsRegistry, OtelConfig, OtlpProtocol, Telemetry};
use mesh_tower::tls::PeerIdentity;
use mesh_tower::{
    InboundPolicy, Registration, Security, ServerContext, ServerLayer, Serving, serve_with,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tonic::{Code, Status, Streaming};
use tower::ServiceExt as _;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a test waits for spans to be exported.
const EXPORT_WAIT: Duration = Duration::from_secs(10);

/// An ALLOW policy in namespace `shop` for one principal.
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

/// STRICT, and only the frontend is allowed.
fn frontend_only() -> InboundPolicy {
    InboundPolicy::fixed(
        MtlsMode::Strict,
        vec![allow_principal("allow-frontend", FRONTEND)],
    )
}

fn context() -> ServerContext {
    ServerContext::new("catalog", "shop", "catalog-1")
}

// ----- the app -----

/// The second tonic service: CSDS answering with the node it was asked about.
/// Counts the calls that reach it.
struct Csds(Arc<AtomicUsize>);

#[tonic::async_trait]
impl ClientStatusDiscoveryService for Csds {
    type StreamClientStatusStream = tokio_stream::Empty<Result<ClientStatusResponse, Status>>;

    async fn stream_client_status(
        &self,
        _: tonic::Request<Streaming<ClientStatusRequest>>,
    ) -> Result<tonic::Response<Self::StreamClientStatusStream>, Status> {
        Err(Status::unimplemented("not here"))
    }

    async fn fetch_client_status(
        &self,
        request: tonic::Request<ClientStatusRequest>,
    ) -> Result<tonic::Response<ClientStatusResponse>, Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        let asked = request.into_inner().node.map(|n| n.id).unwrap_or_default();
        Ok(tonic::Response::new(ClientStatusResponse {
            config: vec![CsdsConfig {
                node: Some(Node {
                    id: asked,
                    ..Node::default()
                }),
                ..CsdsConfig::default()
            }],
        }))
    }
}

/// A handler answering `body`, counting its calls.
fn counted(calls: &Arc<AtomicUsize>, body: &'static str) -> axum::routing::MethodRouter {
    let calls = calls.clone();
    get(move || {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            body
        }
    })
}

/// The app of three parts: `/items` under a `ServerLayer` with `policy`;
/// `/late` merged after that layer; `/admin/orders` in a nested router; the
/// CSDS tonic service as axum routes. Every part counts into `calls`.
fn three_part_app(policy: &InboundPolicy, calls: &Arc<AtomicUsize>) -> Router {
    let nested = Router::new().route("/orders", counted(calls, "orders"));
    let csds =
        tonic::service::Routes::new(ClientStatusDiscoveryServiceServer::new(Csds(calls.clone())))
            .into_axum_router();
    Router::new()
        .route("/items", counted(calls, "items"))
        .layer(ServerLayer::new(context()).inbound(policy.clone()))
        .merge(Router::new().route("/late", counted(calls, "late")))
        .nest("/admin", nested)
        .merge(csds)
}

/// `app` under `serve_with` with the catalog's certificate from `ca`.
async fn serve(
    ca: &TestCa,
    policy: InboundPolicy,
    app: Router,
    telemetry: Option<Telemetry>,
) -> (SocketAddr, Serving) {
    let (admin, _) = fake_admin(0, None).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut security = Security::new(policy).certificates(ca.store(CATALOG));
    if let Some(telemetry) = telemetry {
        security = security.telemetry(telemetry);
    }
    let serving = serve_with(
        listener,
        Registration::new(admin.to_string(), "catalog").namespace("shop"),
        app,
        security,
    )
    .await
    .unwrap();
    (addr, serving)
}

// ----- clients -----

/// A TLS connection presenting `leaf`, offering `alpn`.
async fn connect(
    addr: SocketAddr,
    leaf: &Leaf,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BoxError> {
    let mut config = trust_any_server(Some(leaf));
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    Ok(TlsConnector::from(Arc::new(config))
        .connect(server_name(), tcp)
        .await?)
}

/// GET `path` over mTLS as `leaf`, HTTP/1.1 or (`h2`) HTTP/2: status and body.
async fn get_as(addr: SocketAddr, leaf: &Leaf, h2: bool, path: &str) -> (StatusCode, String) {
    within("a request", async {
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let io = TokioIo::new(connect(addr, leaf, alpn).await.unwrap());
        let request = Request::get(format!("http://catalog{path}"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = if h2 {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        } else {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        };
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
    .await
}

/// A tonic CSDS client over mTLS as `leaf`.
async fn csds_client(
    addr: SocketAddr,
    leaf: &Leaf,
) -> ClientStatusDiscoveryServiceClient<tonic::transport::Channel> {
    let leaf = leaf.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let leaf = leaf.clone();
        async move { Ok::<_, BoxError>(TokioIo::new(connect(addr, &leaf, b"h2").await?)) }
    });
    let channel = tonic::transport::Endpoint::from_static("http://catalog")
        .connect_with_connector(connector)
        .await
        .unwrap();
    ClientStatusDiscoveryServiceClient::new(channel)
}

/// One CSDS FetchClientStatus call as `leaf`, asking about `node`.
async fn fetch_status(
    addr: SocketAddr,
    leaf: &Leaf,
    node: &str,
) -> Result<ClientStatusResponse, Status> {
    let mut client = csds_client(addr, leaf).await;
    within(
        "a CSDS call",
        client.fetch_client_status(ClientStatusRequest {
            node: Some(Node {
                id: node.to_owned(),
                ..Node::default()
            }),
            ..ClientStatusRequest::default()
        }),
    )
    .await
    .map(tonic::Response::into_inner)
}

const HTTP_ROUTES: [(&str, &str); 3] = [
    ("/items", "items"),
    ("/late", "late"),
    ("/admin/orders", "orders"),
];

/// B is refused on every part of the app, which never runs; A is served
/// on every part.
async fn assert_every_route_checked(addr: SocketAddr, ca: &TestCa, calls: &AtomicUsize) {
    let frontend = ca.leaf(FRONTEND);
    let payment = ca.leaf(PAYMENT);
    for h2 in [false, true] {
        for (path, _) in HTTP_ROUTES {
            let (status, body) = get_as(addr, &payment, h2, path).await;
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "B on {path} (h2: {h2}): {body}"
            );
            assert!(
                body.starts_with("RBAC: access denied") && body.contains("shop/allow-frontend"),
                "B on {path}: {body}"
            );
        }
    }
    let denied = fetch_status(addr, &payment, "payment-1").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("shop/allow-frontend"),
        "{denied:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a request from B reached the app"
    );

    for h2 in [false, true] {
        for (path, body) in HTTP_ROUTES {
            let reply = get_as(addr, &frontend, h2, path).await;
            assert_eq!(reply, (StatusCode::OK, body.to_owned()), "A on {path}");
        }
    }
    let served = fetch_status(addr, &frontend, "frontend-1").await.unwrap();
    assert_eq!(
        served.config[0].node.as_ref().map(|n| n.id.as_str()),
        Some("frontend-1")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 7);
}

// ----- tests -----

#[tokio::test]
async fn every_part_of_an_app_is_checked_whether_or_not_a_server_layer_wraps_it() {
    let ca = TestCa::new("mesh root");
    let policy = frontend_only();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = three_part_app(&policy, &calls);
    let (addr, _serving) = serve(&ca, policy.clone(), app, None).await;
    assert_every_route_checked(addr, &ca, &calls).await;
    // Each of B's 7 requests was evaluated once (by serve_with; the layer on
    // /items reused its decision instead of counting it again).
    assert_eq!(policy.denied(), 7);
}

#[tokio::test]
async fn a_server_layer_built_but_never_applied_leaves_serve_with_checking() {
    let ca = TestCa::new("mesh root");
    let policy = frontend_only();
    // Built with the policy, then forgotten: it must not switch anything off.
    let forgotten = ServerLayer::new(context()).inbound(policy.clone());
    drop(forgotten);
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/items", counted(&calls, "items"))
        .layer(ServerLayer::new(context()));
    let (addr, _serving) = serve(&ca, policy.clone(), app, None).await;
    let (status, body) = get_as(addr, &ca.leaf(PAYMENT), true, "/items").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let reply = get_as(addr, &ca.leaf(FRONTEND), true, "/items").await;
    assert_eq!(reply, (StatusCode::OK, "items".to_owned()));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_server_layer_without_serve_with_authorizes_by_itself() {
    let policy = frontend_only();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/items", counted(&calls, "items"))
        .layer(ServerLayer::new(context()).inbound(policy.clone()));
    let request = |peer: &str| {
        let mut req = Request::get("http://catalog/items")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(PeerIdentity::new(SpiffeId::parse(peer).unwrap()));
        req
    };

    // B, with a verified identity but no serve_with: denied by the layer.
    let response = app.clone().oneshot(request(PAYMENT)).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("shop/allow-frontend"),
        "{body:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(policy.denied(), 1);

    // A is served.
    let response = app.clone().oneshot(request(FRONTEND)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Over a real socket without TLS (axum::serve): STRICT refuses, since
    // no request has a verified peer.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let response = within(
        "a plaintext request",
        client.request(
            Request::get(format!("http://{addr}/items"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_denial_decided_by_serve_with_is_traced_and_counted() {
    let ca = TestCa::new("mesh root");
    let (receiver, otlp, _) = Receiver::start().await;
    let registry = MetricsRegistry::new();
    let telemetry = Telemetry::builder(Identity::new("catalog", "shop").with_principal(CATALOG))
        .otel(
            &OtelConfig::default()
                .with_protocol(OtlpProtocol::Grpc)
                .with_endpoint(format!("http://{otlp}"))
                .unwrap(),
        )
        .unwrap()
        .metrics(&registry)
        .build();
    let policy = frontend_only();
    let calls = Arc::new(AtomicUsize::new(0));
    // The app's telemetry wraps only /items; /late is outside it.
    let app = Router::new()
        .route("/items", counted(&calls, "items"))
        .layer(
            ServerLayer::new(context())
                .inbound(policy.clone())
                .telemetry(telemetry.clone()),
        )
        .merge(Router::new().route("/late", counted(&calls, "late")));
    let (addr, _serving) = serve(&ca, policy, app, Some(telemetry.clone())).await;

    let payment = ca.leaf(PAYMENT);
    let frontend = ca.leaf(FRONTEND);
    for path in ["/items", "/late"] {
        assert_eq!(
            get_as(addr, &payment, true, path).await.0,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        get_as(addr, &frontend, true, "/items").await.0,
        StatusCode::OK
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // One SERVER span per request: the two denials from serve_with, the
    // allowed one from the app's layer (no request reported twice).
    let spans = receiver
        .wait_for(
            EXPORT_WAIT,
            async || telemetry.flush().await.unwrap(),
            |s| find(s, "catalog", SpanKind::Server).len() >= 3,
        )
        .await;
    let server = find(&spans, "catalog", SpanKind::Server);
    assert_eq!(server.len(), 3, "{server:#?}");
    let denied: Vec<_> = server
        .iter()
        .filter(|s| s.attributes.get("mesh.authz.decision").map(String::as_str) == Some("deny"))
        .collect();
    assert_eq!(denied.len(), 2, "{server:#?}");
    for span in &denied {
        assert_eq!(span.attr("http.response.status_code"), "403");
        assert_eq!(span.attr("mesh.peer.principal"), PAYMENT);
    }
    let mut paths: Vec<&str> = denied.iter().map(|s| s.attr("url.path")).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/items", "/late"]);
    let allowed = server
        .iter()
        .find(|s| s.attributes.get("mesh.authz.decision").map(String::as_str) == Some("allow"))
        .unwrap_or_else(|| panic!("{server:#?}"));
    assert_eq!(allowed.attr("mesh.authz.policy"), "shop/allow-frontend");

    // Istio's metrics count the two denials once each, with the peer.
    let metrics = registry.render();
    let series = |code: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("reporter=\"destination\"")
                    && l.contains(&format!("response_code=\"{code}\""))
            })
            .unwrap_or_else(|| panic!("no {code} series: {metrics}"))
            .to_owned()
    };
    let denied = series("403");
    assert!(denied.ends_with(" 2"), "{denied}");
    assert!(
        denied.contains(&format!("source_principal=\"{PAYMENT}\"")),
        "{denied}"
    );
    assert!(series("200").ends_with(" 1"), "{metrics}");
}
