//! The two applications every row runs, each in a process of its own: a **client
//! app** that serves HTTP/1.1 to the load generator and makes one upstream call per
//! request, and a **server app** that answers that call with 1 KiB. Only the way
//! they talk to each other changes from row to row ([`AppKind`]); what they do per
//! request does not.
//!
//! Both run one tokio worker thread by default (`MESH_BENCH_APP_THREADS`), the way
//! each Envoy of row (e) runs with `--concurrency 1`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use proxyless::layers::telemetry::{
    ClientTelemetry, Identity, MetricsRegistry, Sampling, Telemetry,
};
use proxyless::mesh_core::model::{MtlsMode, Protocol};
use proxyless::{
    Bootstrap, InboundPolicy, Registration, Security, ServerContext, ServerLayer,
    WorkloadCertificates, XdsClient,
};
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};

use super::shop::payment_client::PaymentClient;
use super::shop::payment_server::{Payment, PaymentServer};
use super::shop::{PayReply, PayRequest, StreamReply, StreamRequest};
use super::tls::{TlsConnector, TlsMaterial, TlsServerConn};
use crate::common::{announce_ready, env_usize, exit_when_stdin_closes, fail_role, runtime};

/// The size of every answer.
pub(crate) const BODY_LEN: usize = 1024;
static BODY: [u8; BODY_LEN] = [b'x'; BODY_LEN];

/// The mesh service the HTTP rows register and call.
pub(crate) const HTTP_SERVICE: &str = "bench-http";
/// The mesh service the gRPC rows register and call.
pub(crate) const GRPC_SERVICE: &str = "bench-grpc";
/// Their namespace.
pub(crate) const NAMESPACE: &str = "bench";

/// The admin address of mesh-control, for a mesh server app.
pub(crate) const ADMIN_ENV: &str = "MESH_BENCH_ADMIN";
/// The server app's address, for a plain client app.
pub(crate) const UPSTREAM_ENV: &str = "MESH_BENCH_UPSTREAM";
/// The xDS bootstrap of a mesh client app (gRPC's inline bootstrap variable).
pub(crate) const BOOTSTRAP_ENV: &str = "GRPC_XDS_BOOTSTRAP_CONFIG";

/// How the client app and the server app talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppKind {
    /// hyper-util's pooled client → hyper-util's server, HTTP/1.1.
    PlainHttp,
    /// `proxyless::Client` → `ServerLayer` + `proxyless::serve`, HTTP/1.1.
    MeshHttp,
    /// As `MeshHttp` with telemetry on both sides: Istio's request metrics
    /// recorded, a tracer provider whose sampler is off (spans decided, never
    /// recorded), trace context propagated, no access log.
    MeshHttpTelemetry,
    /// As `PlainHttp`, over mutual TLS with rustls.
    PlainTls,
    /// As `MeshHttp` with the mesh's zero trust on: certificates from
    /// mesh-control's CA (join tokens, CSRs), the client's cluster ISTIO_MUTUAL,
    /// the server's A36 listener STRICT with an ALLOW policy naming the client's
    /// principal (`serve_with` + `Security`, `ServerLayer::inbound`).
    MeshTls,
    /// The production stack: `MeshTls` with telemetry on both sides as
    /// `MeshHttpTelemetry` has it (the server's `serve_with` reporting under the
    /// same telemetry), on a route with Istio's default retry policy, which the
    /// client checks it received.
    MeshTlsTelemetry,
    /// A tonic `Channel` → tonic's server, gRPC.
    PlainGrpc,
    /// As `PlainGrpc`, over mutual TLS with rustls (ALPN h2).
    PlainGrpcTls,
    /// tonic over `proxyless::Client` → `ServerLayer` + `proxyless::serve`, gRPC.
    MeshGrpc,
    /// As `MeshGrpc` with the mesh's zero trust on, as `MeshTls`.
    MeshGrpcTls,
}

impl AppKind {
    /// The name passed on the command line of a role.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AppKind::PlainHttp => "plain-http",
            AppKind::MeshHttp => "mesh-http",
            AppKind::MeshHttpTelemetry => "mesh-http-otel",
            AppKind::PlainTls => "plain-tls",
            AppKind::MeshTls => "mesh-tls",
            AppKind::MeshTlsTelemetry => "mesh-tls-otel",
            AppKind::PlainGrpc => "plain-grpc",
            AppKind::PlainGrpcTls => "plain-grpc-tls",
            AppKind::MeshGrpc => "mesh-grpc",
            AppKind::MeshGrpcTls => "mesh-grpc-tls",
        }
    }

    /// The inverse of [`AppKind::as_str`].
    pub(crate) fn parse(s: &str) -> Option<AppKind> {
        [
            AppKind::PlainHttp,
            AppKind::MeshHttp,
            AppKind::MeshHttpTelemetry,
            AppKind::PlainTls,
            AppKind::MeshTls,
            AppKind::MeshTlsTelemetry,
            AppKind::PlainGrpc,
            AppKind::PlainGrpcTls,
            AppKind::MeshGrpc,
            AppKind::MeshGrpcTls,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// Whether the apps need mesh-control.
    pub(crate) fn is_mesh(self) -> bool {
        matches!(
            self,
            AppKind::MeshHttp
                | AppKind::MeshHttpTelemetry
                | AppKind::MeshTls
                | AppKind::MeshTlsTelemetry
                | AppKind::MeshGrpc
                | AppKind::MeshGrpcTls
        )
    }

    /// Whether the apps need TLS material (the plain rows: PEM in the
    /// environment; the mesh rows: mesh-control's CA under the same root).
    pub(crate) fn is_tls(self) -> bool {
        matches!(
            self,
            AppKind::PlainTls
                | AppKind::PlainGrpcTls
                | AppKind::MeshTls
                | AppKind::MeshTlsTelemetry
                | AppKind::MeshGrpcTls
        )
    }

    /// The mesh service the apps use.
    pub(crate) fn service(self) -> &'static str {
        match self {
            AppKind::PlainGrpc
            | AppKind::PlainGrpcTls
            | AppKind::MeshGrpc
            | AppKind::MeshGrpcTls => GRPC_SERVICE,
            _ => HTTP_SERVICE,
        }
    }
}

fn app_threads() -> usize {
    env_usize("MESH_BENCH_APP_THREADS", 1)
}

fn kind_arg() -> AppKind {
    let arg = std::env::args().nth(1).unwrap_or_default();
    AppKind::parse(&arg).unwrap_or_else(|| fail_role(format!("unknown app kind {arg:?}")))
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| fail_role(format!("{name} is not set")))
}

// ---------------------------------------------------------------------------------
// Server app

/// The Payment service of the gRPC rows: answers every `Pay` with 1 KiB.
#[derive(Clone)]
struct BenchPayment {
    reply: Arc<str>,
}

#[tonic::async_trait]
impl Payment for BenchPayment {
    async fn pay(
        &self,
        _request: tonic::Request<PayRequest>,
    ) -> Result<tonic::Response<PayReply>, tonic::Status> {
        Ok(tonic::Response::new(PayReply {
            served_by: self.reply.to_string(),
            version: "v1".into(),
        }))
    }

    type StreamStream = tokio_stream::Empty<Result<StreamReply, tonic::Status>>;

    async fn stream(
        &self,
        _request: tonic::Request<StreamRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not part of the bench"))
    }
}

fn bench_payment() -> BenchPayment {
    BenchPayment {
        reply: Arc::from(String::from_utf8_lossy(&BODY).as_ref()),
    }
}

async fn answer<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(&BODY))))
}

/// The server-app role: `MESH_BENCH_ROLE=server <kind>`.
pub(crate) fn server_main() -> ! {
    let kind = kind_arg();
    exit_when_stdin_closes();
    let rt = runtime(app_threads());
    let result: Result<(), String> = rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("binding the server app: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("server app address: {e}"))?;
        match kind {
            AppKind::PlainHttp => {
                announce_ready(addr);
                serve_plain(listener, None).await
            }
            AppKind::PlainTls => {
                let config = TlsMaterial::from_env()?.server_config(&[b"http/1.1"])?;
                announce_ready(addr);
                serve_plain(listener, Some(tokio_rustls::TlsAcceptor::from(config))).await
            }
            AppKind::PlainGrpcTls => {
                let config = TlsMaterial::from_env()?.server_config(&[b"h2"])?;
                announce_ready(addr);
                serve_grpc_tls(listener, tokio_rustls::TlsAcceptor::from(config)).await
            }
            AppKind::MeshTls => {
                let secure = SecureServer::start(addr).await?;
                let layer = server_layer(HTTP_SERVICE).inbound(secure.inbound.clone());
                let app = layer.layer(tower::service_fn(answer::<Incoming>));
                let registration = secure.registration(HTTP_SERVICE, Protocol::Http1)?;
                let serving = proxyless::serve_with(listener, registration, app, secure.security())
                    .await
                    .map_err(|e| format!("proxyless::serve_with: {e}"))?;
                announce_ready(addr);
                std::future::pending::<()>().await;
                drop((serving, secure));
                Ok(())
            }
            AppKind::MeshTlsTelemetry => {
                // As production runs it: one telemetry for the app's stack and
                // for the requests `serve_with` refuses itself.
                let secure = SecureServer::start(addr).await?;
                let telemetry = telemetry("bench-server");
                let layer = server_layer(HTTP_SERVICE)
                    .inbound(secure.inbound.clone())
                    .telemetry(telemetry.clone());
                let app = layer.layer(tower::service_fn(answer::<Incoming>));
                let registration = secure.registration(HTTP_SERVICE, Protocol::Http1)?;
                let security = secure.security().telemetry(telemetry);
                let serving = proxyless::serve_with(listener, registration, app, security)
                    .await
                    .map_err(|e| format!("proxyless::serve_with: {e}"))?;
                announce_ready(addr);
                std::future::pending::<()>().await;
                drop((serving, secure));
                Ok(())
            }
            AppKind::MeshGrpcTls => {
                let secure = SecureServer::start(addr).await?;
                let layer = server_layer(GRPC_SERVICE).inbound(secure.inbound.clone());
                let routes = tonic::service::Routes::new(PaymentServer::new(bench_payment()));
                let registration = secure.registration(GRPC_SERVICE, Protocol::Grpc)?;
                let serving = proxyless::serve_with(
                    listener,
                    registration,
                    layer.layer(routes),
                    secure.security(),
                )
                .await
                .map_err(|e| format!("proxyless::serve_with: {e}"))?;
                announce_ready(addr);
                std::future::pending::<()>().await;
                drop((serving, secure));
                Ok(())
            }
            AppKind::PlainGrpc => {
                announce_ready(addr);
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                tonic::transport::Server::builder()
                    .add_service(PaymentServer::new(bench_payment()))
                    .serve_with_incoming(incoming)
                    .await
                    .map_err(|e| format!("tonic server: {e}"))
            }
            AppKind::MeshHttp => {
                let layer = server_layer(HTTP_SERVICE);
                let app = layer.layer(tower::service_fn(answer::<Incoming>));
                let serving = proxyless::serve(listener, http_registration(), app)
                    .await
                    .map_err(|e| format!("proxyless::serve: {e}"))?;
                announce_ready(addr);
                std::future::pending::<()>().await;
                drop(serving);
                Ok(())
            }
            AppKind::MeshHttpTelemetry => {
                let layer = server_layer(HTTP_SERVICE).telemetry(telemetry("bench-server"));
                let app = layer.layer(tower::service_fn(answer::<Incoming>));
                let serving = proxyless::serve(listener, http_registration(), app)
                    .await
                    .map_err(|e| format!("proxyless::serve: {e}"))?;
                announce_ready(addr);
                std::future::pending::<()>().await;
                drop(serving);
                Ok(())
            }
            AppKind::MeshGrpc => {
                let layer = server_layer(GRPC_SERVICE);
                let registration = Registration::new(env(ADMIN_ENV), GRPC_SERVICE)
                    .namespace(NAMESPACE)
                    .protocol(Protocol::Grpc);
                let routes = tonic::service::Routes::new(PaymentServer::new(bench_payment()));
                let serving = proxyless::serve(listener, registration, layer.layer(routes))
                    .await
                    .map_err(|e| format!("proxyless::serve: {e}"))?;
                announce_ready(addr);
                std::future::pending::<()>().await;
                drop(serving);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => fail_role(e),
    }
}

/// What a zero-trust mesh server app holds: its certificates (renewed at
/// half-life by a task these keep alive), its xDS client and its inbound policy
/// (the A36 listener mesh-control sends for it).
struct SecureServer {
    bootstrap: Bootstrap,
    certificates: WorkloadCertificates,
    _xds: XdsClient,
    inbound: InboundPolicy,
}

impl SecureServer {
    /// Certificates from mesh-control's CA, then the inbound policy; fails unless
    /// the policy is STRICT with at least one authorization policy in force, so
    /// the row measures what it says.
    async fn start(addr: SocketAddr) -> Result<SecureServer, String> {
        let bootstrap = Bootstrap::from_env().map_err(|e| format!("xDS bootstrap: {e}"))?;
        let certificates = WorkloadCertificates::from_bootstrap(&bootstrap)
            .await
            .map_err(|e| format!("server certificates: {e}"))?
            .ok_or("the server's bootstrap names no certificate provider")?;
        let xds = XdsClient::start(bootstrap.clone());
        let inbound = InboundPolicy::from_xds(&xds, addr).map_err(|e| format!("inbound: {e}"))?;
        inbound
            .ready(Duration::from_secs(30))
            .await
            .map_err(|e| format!("inbound policy: {e}"))?;
        let current = inbound.current();
        if current.mode() != MtlsMode::Strict || current.policies().is_empty() {
            return Err(format!(
                "the server listener is {} with {} authorization policies; the row needs \
                 STRICT and an ALLOW policy",
                current.mode(),
                current.policies().len()
            ));
        }
        drop(current);
        Ok(SecureServer {
            bootstrap,
            certificates,
            _xds: xds,
            inbound,
        })
    }

    fn registration(&self, service: &str, protocol: Protocol) -> Result<Registration, String> {
        Registration::from_bootstrap(&self.bootstrap, service)
            .map(|r| r.protocol(protocol))
            .map_err(|e| format!("registration: {e}"))
    }

    fn security(&self) -> Security {
        Security::new(self.inbound.clone()).certificates(self.certificates.store().clone())
    }
}

/// tonic's server behind rustls: handshakes run in tasks of their own, finished
/// connections are handed to tonic.
async fn serve_grpc_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> Result<(), String> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<TlsServerConn, std::io::Error>>(64);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    let _ = tx.send(Ok(TlsServerConn(tls))).await;
                }
            });
        }
    });
    tonic::transport::Server::builder()
        .add_service(PaymentServer::new(bench_payment()))
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("tonic server: {e}"))
}

fn http_registration() -> Registration {
    Registration::new(env(ADMIN_ENV), HTTP_SERVICE)
        .namespace(NAMESPACE)
        .protocol(Protocol::Http1)
}

/// Telemetry as a production service would run it with tracing sampled off:
/// Istio's request metrics into a registry, a tracer provider whose sampler
/// records nothing, context propagation, no access log.
fn telemetry(service: &str) -> Telemetry {
    let identity = Identity::new(service, NAMESPACE);
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_resource(identity.resource())
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOff)
        .build();
    Telemetry::builder(identity)
        .tracer_provider(provider)
        // The sampler of a bare provider cannot be read back: say it, so the
        // layers skip parsing trace context nothing will record.
        .sampling(Sampling::AlwaysOff)
        .metrics(&MetricsRegistry::new())
        .access_log(false)
        .build()
}

fn server_layer(service: &str) -> ServerLayer {
    ServerLayer::new(ServerContext::new(service, NAMESPACE, "bench-server"))
}

/// hyper-util's auto (HTTP/1.1 + HTTP/2) server, set up as `proxyless::serve` sets
/// up its own, minus registration and the server stack.
async fn serve_plain(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<(), String> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(|e| format!("accept: {e}"))?;
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(answer::<Incoming>);
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------------
// Client app

/// How the client app makes its upstream call.
#[derive(Clone)]
enum Upstream {
    Plain(HyperClient<HttpConnector, Full<Bytes>>, Uri),
    Tls(HyperClient<TlsConnector, Full<Bytes>>, Uri),
    Mesh(proxyless::Client<Full<Bytes>>, Uri),
    MeshTelemetry(ClientTelemetry<proxyless::Client<Full<Bytes>>>, Uri),
    PlainGrpc(PaymentClient<tonic::transport::Channel>),
    MeshGrpc(PaymentClient<proxyless::Client<tonic::body::Body>>),
}

impl Upstream {
    async fn call(&self) -> Result<Bytes, String> {
        match self {
            Upstream::Plain(client, uri) => {
                let response = client
                    .request(get(uri))
                    .await
                    .map_err(|e| format!("upstream: {e}"))?;
                body_of(response).await
            }
            Upstream::Tls(client, uri) => {
                let response = client
                    .request(get(uri))
                    .await
                    .map_err(|e| format!("upstream: {e}"))?;
                body_of(response).await
            }
            Upstream::Mesh(client, uri) => {
                let response = client
                    .clone()
                    .oneshot(get(uri))
                    .await
                    .map_err(|e| format!("mesh upstream: {e}"))?;
                body_of(response).await
            }
            Upstream::MeshTelemetry(client, uri) => {
                let response = client
                    .clone()
                    .oneshot(get(uri))
                    .await
                    .map_err(|e| format!("mesh upstream: {e}"))?;
                body_of(response).await
            }
            Upstream::PlainGrpc(client) => {
                let reply = client
                    .clone()
                    .pay(pay_request())
                    .await
                    .map_err(|e| format!("grpc upstream: {e}"))?;
                Ok(Bytes::from(reply.into_inner().served_by))
            }
            Upstream::MeshGrpc(client) => {
                let reply = client
                    .clone()
                    .pay(pay_request())
                    .await
                    .map_err(|e| format!("mesh grpc upstream: {e}"))?;
                Ok(Bytes::from(reply.into_inner().served_by))
            }
        }
    }
}

fn get(uri: &Uri) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::default());
    *req.uri_mut() = uri.clone();
    req
}

fn pay_request() -> PayRequest {
    PayRequest {
        order_id: "bench".into(),
        cents: 100,
    }
}

async fn body_of<B>(response: Response<B>) -> Result<Bytes, String>
where
    B: hyper::body::Body,
    B::Error: std::fmt::Display,
{
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("upstream body: {e}"))?
        .to_bytes();
    if status == StatusCode::OK {
        Ok(body)
    } else {
        Err(format!("upstream answered {status}"))
    }
}

/// The client app's upstream; `certificates` receives the workload certificates
/// of a zero-trust row, which must live as long as the client (their renewal).
async fn upstream(
    kind: AppKind,
    certificates: &mut Option<WorkloadCertificates>,
) -> Result<Upstream, String> {
    let plain_uri = |scheme: &str| {
        let addr: SocketAddr = env(UPSTREAM_ENV)
            .parse()
            .map_err(|e| format!("{UPSTREAM_ENV}: {e}"))?;
        format!("{scheme}://{addr}/bench")
            .parse::<Uri>()
            .map_err(|e| format!("upstream URI: {e}"))
    };
    Ok(match kind {
        AppKind::PlainHttp => {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            let client = HyperClient::builder(TokioExecutor::new())
                .pool_max_idle_per_host(32)
                .build(connector);
            Upstream::Plain(client, plain_uri("http")?)
        }
        AppKind::PlainTls => {
            let config = TlsMaterial::from_env()?.client_config(&[b"http/1.1"])?;
            let client = HyperClient::builder(TokioExecutor::new())
                .pool_max_idle_per_host(32)
                .build(TlsConnector::new(config));
            Upstream::Tls(client, plain_uri("https")?)
        }
        AppKind::PlainGrpcTls => {
            let config = TlsMaterial::from_env()?.client_config(&[b"h2"])?;
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("http://{}", env(UPSTREAM_ENV)))
                    .map_err(|e| format!("grpc endpoint: {e}"))?;
            let channel = endpoint
                .connect_with_connector(TlsConnector::new(config))
                .await
                .map_err(|e| format!("connecting the grpc channel over TLS: {e}"))?;
            Upstream::PlainGrpc(PaymentClient::new(channel))
        }
        AppKind::MeshTls => {
            let (xds, store) = mesh_xds_tls(HTTP_SERVICE, certificates).await?;
            let uri = format!("http://{HTTP_SERVICE}/bench")
                .parse::<Uri>()
                .map_err(|e| format!("mesh URI: {e}"))?;
            Upstream::Mesh(proxyless::Client::new(xds).with_certificates(store), uri)
        }
        AppKind::MeshTlsTelemetry => {
            let (xds, store) = mesh_xds_tls(HTTP_SERVICE, certificates).await?;
            let uri = format!("http://{HTTP_SERVICE}/bench")
                .parse::<Uri>()
                .map_err(|e| format!("mesh URI: {e}"))?;
            require_default_retries(&xds, &uri).await?;
            let client = proxyless::Client::new(xds)
                .with_certificates(store)
                .with_telemetry(telemetry("bench-client"));
            Upstream::MeshTelemetry(client, uri)
        }
        AppKind::MeshGrpcTls => {
            let (xds, store) = mesh_xds_tls(GRPC_SERVICE, certificates).await?;
            let origin = format!("http://{GRPC_SERVICE}")
                .parse::<Uri>()
                .map_err(|e| format!("mesh origin: {e}"))?;
            let channel: proxyless::Client<tonic::body::Body> =
                proxyless::Client::new(xds).with_certificates(store);
            Upstream::MeshGrpc(PaymentClient::with_origin(channel, origin))
        }
        AppKind::PlainGrpc => {
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("http://{}", env(UPSTREAM_ENV)))
                    .map_err(|e| format!("grpc endpoint: {e}"))?
                    .tcp_nodelay(true);
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("connecting the grpc channel: {e}"))?;
            Upstream::PlainGrpc(PaymentClient::new(channel))
        }
        AppKind::MeshHttp => {
            let xds = mesh_xds(HTTP_SERVICE).await?;
            let uri = format!("http://{HTTP_SERVICE}/bench")
                .parse::<Uri>()
                .map_err(|e| format!("mesh URI: {e}"))?;
            Upstream::Mesh(proxyless::Client::new(xds), uri)
        }
        AppKind::MeshHttpTelemetry => {
            let xds = mesh_xds(HTTP_SERVICE).await?;
            let uri = format!("http://{HTTP_SERVICE}/bench")
                .parse::<Uri>()
                .map_err(|e| format!("mesh URI: {e}"))?;
            let client = proxyless::Client::new(xds).with_telemetry(telemetry("bench-client"));
            Upstream::MeshTelemetry(client, uri)
        }
        AppKind::MeshGrpc => {
            let xds = mesh_xds(GRPC_SERVICE).await?;
            let origin = format!("http://{GRPC_SERVICE}")
                .parse::<Uri>()
                .map_err(|e| format!("mesh origin: {e}"))?;
            let channel: proxyless::Client<tonic::body::Body> = proxyless::Client::new(xds);
            Upstream::MeshGrpc(PaymentClient::with_origin(channel, origin))
        }
    })
}

/// [`mesh_xds`] for a zero-trust row: the client's certificates from mesh-control's
/// CA first; fails unless `service`'s cluster is mTLS (ISTIO_MUTUAL), so the row
/// measures what it says.
async fn mesh_xds_tls(
    service: &str,
    certificates: &mut Option<WorkloadCertificates>,
) -> Result<(XdsClient, proxyless::CertStore), String> {
    let bootstrap = Bootstrap::from_env().map_err(|e| format!("xDS bootstrap: {e}"))?;
    let certs = WorkloadCertificates::from_bootstrap(&bootstrap)
        .await
        .map_err(|e| format!("client certificates: {e}"))?
        .ok_or("the client's bootstrap names no certificate provider")?;
    let xds = mesh_xds_from(bootstrap, service).await?;
    let snapshot = xds.snapshot();
    let mut clusters = snapshot
        .clusters
        .values()
        .filter(|c| c.name.contains(service))
        .peekable();
    let tls = clusters.peek().is_some() && clusters.all(|c| c.tls.is_some());
    if !tls {
        return Err(format!(
            "the cluster of {service} is not mTLS (Cluster.tls is unset)"
        ));
    }
    let store = certs.store().clone();
    *certificates = Some(certs);
    Ok((xds, store))
}

/// Fails unless the route the mesh client resolves for `GET uri` carries Istio's
/// default retry policy (mesh-control gives it to a route no VirtualService
/// configures), so the row measures every request through the retry engine, as
/// production runs it. Waits (up to 30 s) for the route to resolve at all.
async fn require_default_retries(xds: &XdsClient, uri: &Uri) -> Result<(), String> {
    use proxyless::mesh_core::model::RetryPolicy;
    use proxyless::mesh_core::route::RequestView;
    use proxyless::mesh_core::snapshot::ListenerLookup;
    let authority = uri.authority().map_or("", |a| a.as_str());
    let (method, headers) = (http::Method::GET, http::HeaderMap::new());
    let view = RequestView::new(&method, uri, &headers, authority);
    let expected = RetryPolicy::istio_default();
    let mut changes = xds.changes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let unresolved = {
            let snapshot = xds.snapshot();
            let resolved = match snapshot.listener_for(authority) {
                ListenerLookup::Found(listener) => snapshot
                    .resolve(listener, &view, 0)
                    .map_err(|e| format!("resolving GET {uri}: {e}")),
                _ => Err(format!(
                    "no listener for {authority:?} in the client's snapshot"
                )),
            };
            match resolved {
                Ok(r) => {
                    return match &r.route.policy.retry {
                        Some(retry) if *retry == expected => Ok(()),
                        other => Err(format!(
                            "the route {:?} for GET {uri} carries the retry policy {other:?}; \
                             the row needs Istio's default, {expected:?}",
                            r.route.name
                        )),
                    };
                }
                Err(e) => e,
            }
        };
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("the xDS client stopped".to_owned()),
            Err(_) => return Err(format!("after 30 s: {unresolved}")),
        }
    }
}

/// An xDS client (bootstrap from the environment, as a deployed app reads it) that
/// has `service`'s listener, routes, cluster and at least one endpoint.
async fn mesh_xds(service: &str) -> Result<XdsClient, String> {
    let bootstrap = Bootstrap::from_env().map_err(|e| format!("xDS bootstrap: {e}"))?;
    mesh_xds_from(bootstrap, service).await
}

async fn mesh_xds_from(bootstrap: Bootstrap, service: &str) -> Result<XdsClient, String> {
    let xds = XdsClient::start(bootstrap);
    let ready = async {
        xds.wait_for_listener(service)
            .await
            .map_err(|e| format!("waiting for {service}: {e}"))?;
        let mut changes = xds.changes();
        loop {
            let has_endpoints = xds
                .snapshot()
                .endpoints
                .values()
                .any(|cla| cla.endpoint_count() > 0);
            if has_endpoints {
                return Ok::<_, String>(());
            }
            changes
                .changed()
                .await
                .map_err(|_| "the xDS client stopped".to_owned())?;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .map_err(|_| format!("{service} has no endpoints after 30 s"))??;
    Ok(xds)
}

/// The client-app role: `MESH_BENCH_ROLE=client <kind>`.
pub(crate) fn client_main() -> ! {
    let kind = kind_arg();
    exit_when_stdin_closes();
    let rt = runtime(app_threads());
    let result: Result<(), String> = rt.block_on(async move {
        let mut certificates = None;
        let upstream = upstream(kind, &mut certificates).await?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("binding the client app: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("client app address: {e}"))?;
        announce_ready(addr);
        loop {
            let (stream, _) = listener
                .accept()
                .await
                .map_err(|e| format!("accept: {e}"))?;
            let _ = stream.set_nodelay(true);
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let upstream = upstream.clone();
                    async move {
                        let response = match upstream.call().await {
                            Ok(body) => Response::new(Full::new(body)),
                            Err(e) => {
                                let mut r = Response::new(Full::new(Bytes::from(e)));
                                *r.status_mut() = StatusCode::BAD_GATEWAY;
                                r
                            }
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => fail_role(e),
    }
}
