//! How fast a [`Serving`](mesh_tower::Serving) stops, over real sockets: at
//! once when nothing is in flight (idle keep-alive connections do not hold
//! it up), and only after the request in flight when one is.
//!
//! The admin API is a small fake recording the calls it gets, so the test
//! sees the endpoint leave the mesh before the server stops. What used to
//! hold a shutdown up, each checked here: a control server that does not
//! answer the deregistration (up to the admin client's 5 s timeout), and a
//! connection that never finished its TLS handshake (up to the 10 s
//! handshake timeout).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_core::model::MtlsMode;
use mesh_tower::serve::DEREGISTER_TIMEOUT;
use mesh_tower::tls::{CertStore, Credentials};
use mesh_tower::{ErrorKind, InboundPolicy, Registration, Security, serve, serve_with};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

/// The bound an idle server must stop within. Generous on purpose (a
/// loaded 2-core CI machine), yet well under the seconds a server that
/// waits on idle connections or sleeps through a fixed drain takes.
const QUICK: Duration = Duration::from_millis(900);

/// Waits for `f` at most 10 s.
async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(10), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A fake admin API: `POST /v1/endpoints` grants `lease-1`, and the calls
/// (`"POST"`, `"PUT lease-1"`, `"DELETE lease-1"`) are recorded in order.
/// With `hang_on_delete`, a deregistration is recorded and never answered
/// (a control server that is stuck, or shutting down itself).
async fn fake_admin(hang_on_delete: bool) -> (SocketAddr, Arc<watch::Sender<Vec<String>>>) {
    let calls = Arc::new(watch::Sender::new(Vec::<String>::new()));
    let app =
        Router::new()
            .route(
                "/v1/endpoints",
                post(
                    |State(calls): State<Arc<watch::Sender<Vec<String>>>>,
                     axum::Json(_): axum::Json<Value>| async move {
                        calls.send_modify(|c| c.push("POST".into()));
                        (
                            StatusCode::CREATED,
                            axum::Json(json!({"lease_id": "lease-1", "ttl_seconds": 10})),
                        )
                    },
                ),
            )
            .route(
                "/v1/endpoints/{id}",
                put(
                    |State(calls): State<Arc<watch::Sender<Vec<String>>>>,
                     Path(id): Path<String>| async move {
                        calls.send_modify(|c| c.push(format!("PUT {id}")));
                        StatusCode::OK
                    },
                )
                .delete(
                    move |State(calls): State<Arc<watch::Sender<Vec<String>>>>,
                          Path(id): Path<String>| async move {
                        calls.send_modify(|c| c.push(format!("DELETE {id}")));
                        if hang_on_delete {
                            std::future::pending::<()>().await;
                        }
                        StatusCode::NO_CONTENT
                    },
                ),
            )
            .with_state(calls.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, calls)
}

/// `/hello` answers at once; `/slow` answers once `release` is notified.
#[derive(Clone, Default)]
struct Slow {
    started: Arc<Notify>,
    release: Arc<Notify>,
}

fn app(slow: Slow) -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/slow",
            get(move || async move {
                slow.started.notify_one();
                slow.release.notified().await;
                "done"
            }),
        )
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn get_text(client: &HttpClient, uri: String) -> (u16, String) {
    let response = client
        .request(Request::get(uri).body(Full::default()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A raw HTTP/1.1 keep-alive connection that has answered one request and
/// is now idle (what a pooling client holds).
async fn idle_http1(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nhost: catalog\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.ends_with(b"hello") {
        let n = within("the keep-alive answer", stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "the server closed a keep-alive connection early");
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

/// Reads until the server closes the connection; panics after 10 s.
async fn closed_by_server(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        match within(
            "the server to close an idle connection",
            stream.read(&mut buf),
        )
        .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn an_idle_server_stops_at_once_despite_idle_keep_alive_connections() {
    let (admin, calls) = fake_admin(false).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = serve(
        listener,
        Registration::new(admin.to_string(), "catalog"),
        app(Slow::default()),
    )
    .await
    .unwrap();

    // Idle connections of every kind a client may hold: HTTP/1.1 and h2c
    // kept alive in a client's pool after a request, a raw HTTP/1.1 one,
    // and one that was opened and never sent a byte.
    let http1 = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let h2c = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for client in [&http1, &h2c] {
        assert_eq!(
            get_text(client, format!("http://{addr}/hello")).await,
            (200, "hello".to_string())
        );
    }
    let mut raw = idle_http1(addr).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();

    let started = Instant::now();
    serving.shutdown().await.unwrap();
    let took = started.elapsed();
    assert!(
        took < QUICK,
        "an idle server took {took:?} to shut down (bound {QUICK:?}): idle keep-alive \
         connections or deregistration held it up"
    );
    assert_eq!(
        calls.borrow().last().map(String::as_str),
        Some("DELETE lease-1"),
        "the endpoint left the mesh on shutdown"
    );
    closed_by_server(&mut raw).await;
    closed_by_server(&mut silent).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a stopped server accepts no new connections"
    );
}

#[tokio::test]
async fn a_request_in_flight_completes_before_the_server_stops() {
    let (admin, calls) = fake_admin(false).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slow = Slow::default();
    let serving = serve(
        listener,
        Registration::new(admin.to_string(), "catalog"),
        app(slow.clone()),
    )
    .await
    .unwrap();
    let mut idle = idle_http1(addr).await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let in_flight =
        tokio::spawn(async move { get_text(&client, format!("http://{addr}/slow")).await });
    within("the slow request to reach the app", slow.started.notified()).await;

    let shutdown = tokio::spawn(serving.shutdown());
    within(
        "deregistration",
        calls
            .subscribe()
            .wait_for(|c| c.iter().any(|c| c == "DELETE lease-1")),
    )
    .await
    .unwrap();
    // While the request drains, the idle connection is closed at once.
    closed_by_server(&mut idle).await;
    assert!(
        !shutdown.is_finished(),
        "the server stopped while a request was in flight"
    );

    slow.release.notify_one();
    assert_eq!(
        within("the in-flight response", in_flight).await.unwrap(),
        (200, "done".to_string()),
        "the request in flight when shutdown began completed"
    );
    within("shutdown after the drain", shutdown)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_control_server_that_does_not_answer_holds_shutdown_up_only_briefly() {
    let (admin, calls) = fake_admin(true).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = serve(
        listener,
        Registration::new(admin.to_string(), "catalog"),
        app(Slow::default()),
    )
    .await
    .unwrap();

    let started = Instant::now();
    let error = serving
        .shutdown()
        .await
        .expect_err("an unanswered deregistration is reported");
    let took = started.elapsed();
    let bound = DEREGISTER_TIMEOUT + QUICK;
    assert!(
        took < bound,
        "shutdown took {took:?} with a control server that does not answer (bound {bound:?})"
    );
    assert_eq!(error.kind(), ErrorKind::Registration);
    assert!(
        error.to_string().contains("lease expires"),
        "the error says the endpoint still leaves the mesh: {error}"
    );
    assert!(calls.borrow().iter().any(|c| c == "DELETE lease-1"));
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the server stopped all the same"
    );
}

/// A workload certificate for `spiffe://cluster.local/ns/shop/sa/catalog`,
/// self-signed (its own trust bundle): enough to serve STRICT mTLS.
fn catalog_certificates() -> CertStore {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/shop/sa/catalog"
            .try_into()
            .unwrap(),
    )];
    let cert = params.self_signed(&key).unwrap();
    let pem = cert.pem();
    CertStore::new(
        Credentials::from_pem(
            pem.as_bytes(),
            key.serialize_pem().as_bytes(),
            pem.as_bytes(),
        )
        .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_connection_still_in_its_tls_handshake_does_not_hold_shutdown_up() {
    let (admin, _calls) = fake_admin(false).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let security = Security::new(InboundPolicy::fixed(MtlsMode::Strict, Vec::new()))
        .certificates(catalog_certificates());
    let serving = serve_with(
        listener,
        Registration::new(admin.to_string(), "catalog"),
        app(Slow::default()),
        security,
    )
    .await
    .unwrap();
    // Connected, and never sends its ClientHello (a stalled client, a TCP
    // health check): the server waits in the handshake.
    let mut silent = TcpStream::connect(addr).await.unwrap();

    let started = Instant::now();
    serving.shutdown().await.unwrap();
    let took = started.elapsed();
    assert!(
        took < QUICK,
        "shutdown took {took:?} with a connection in its TLS handshake (bound {QUICK:?}): it \
         waited for the handshake timeout"
    );
    closed_by_server(&mut silent).await;
}
