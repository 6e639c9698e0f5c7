//! `serve` against a fake mesh-control admin API, over real sockets.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Extension;
use axum::http::StatusCode;
use axum::routing::get;
use bytes::Bytes;
use common::admin::{Call, fake_admin};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mesh_testkit::wait::within;
use mesh_tower::server::SERVED_BY;
use mesh_tower::{ConnectionInfo, ErrorKind, Registration, ServerContext, ServerLayer, serve};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// `/slow` holds its response until `release` is notified.
#[derive(Clone, Default)]
struct Slow {
    started: Arc<Notify>,
    release: Arc<Notify>,
}

fn app(slow: Slow) -> Router {
    Router::new()
        .route(
            "/hello",
            get(
                |Extension(ctx): Extension<ServerContext>,
                 Extension(conn): Extension<ConnectionInfo>| async move {
                    format!(
                        "{} {} {}",
                        ctx.service(),
                        ctx.node_id(),
                        conn.peer_addr().ip()
                    )
                },
            ),
        )
        .route(
            "/slow",
            get(move || async move {
                slow.started.notify_one();
                slow.release.notified().await;
                "done"
            }),
        )
        .layer(
            ServerLayer::new(ServerContext::new("catalog", "shop", "node-7"))
                .served_by_header(true),
        )
}

async fn fetch(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    uri: String,
) -> (http::Response<()>, String) {
    let response = client
        .request(Request::get(uri).body(Full::default()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        http::Response::from_parts(parts, ()),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn registers_heartbeats_and_deregisters_before_draining() {
    let (admin_addr, admin) = fake_admin(0, None).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slow = Slow::default();
    let registration = Registration::new(admin_addr.to_string(), "catalog")
        .namespace("shop")
        .service_port(8080)
        .label("version", "v1")
        .ttl(Duration::from_secs(1));
    let serving = serve(listener, registration, app(slow.clone()))
        .await
        .unwrap();
    assert_eq!(serving.local_addr(), addr);
    assert_eq!(serving.lease_id(), "lease-1");

    let calls = admin.calls.borrow().clone();
    assert_eq!(
        calls,
        vec![Call::Register(json!({
            "service": "catalog", "namespace": "shop", "address": "127.0.0.1",
            "port": addr.port(), "service_port": 8080, "labels": {"version": "v1"},
            "ttl_seconds": 1
        }))]
    );
    admin
        .wait_for("a heartbeat", |c| {
            c.contains(&Call::Renew("lease-1".into()))
        })
        .await;

    // Served over HTTP/1.1 and h2c, through the server layer.
    let http1 = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let h2c = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for client in [&http1, &h2c] {
        let (head, body) = fetch(client, format!("http://{addr}/hello")).await;
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()[SERVED_BY], "node-7");
        assert_eq!(body, "catalog node-7 127.0.0.1");
    }

    // A request in flight when shutdown starts still completes, after the
    // endpoint has left the mesh.
    let in_flight = {
        let client = h2c.clone();
        tokio::spawn(async move { fetch(&client, format!("http://{addr}/slow")).await })
    };
    within("the slow request to start", slow.started.notified()).await;
    let shutdown = tokio::spawn(serving.shutdown_within(Duration::from_secs(10)));
    admin
        .wait_for("deregistration", |c| {
            c.contains(&Call::Deregister("lease-1".into()))
        })
        .await;
    assert!(!in_flight.is_finished());
    slow.release.notify_one();
    let (head, body) = within("the in-flight response", in_flight).await.unwrap();
    assert_eq!((head.status().as_u16(), body.as_str()), (200, "done"));
    within("shutdown", shutdown).await.unwrap().unwrap();

    // Gone: no new connections.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let calls = admin.calls.borrow().clone();
    assert_eq!(calls.last(), Some(&Call::Deregister("lease-1".into())));
}

#[tokio::test]
async fn registers_again_when_the_control_server_forgets() {
    let (admin_addr, admin) = fake_admin(1, None).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registration =
        Registration::new(format!("http://{admin_addr}"), "catalog").ttl(Duration::from_secs(1));
    let serving = serve(listener, registration, app(Slow::default()))
        .await
        .unwrap();
    admin
        .wait_for("a second registration", |c| {
            c.iter().filter(|c| matches!(c, Call::Register(_))).count() == 2
        })
        .await;
    // The new lease is the one renewed and removed.
    serving.shutdown().await.unwrap();
    let calls = admin.calls.borrow().clone();
    assert_eq!(calls.last(), Some(&Call::Deregister("lease-2".into())));
}

#[tokio::test]
async fn a_refused_registration_fails_serve_with_the_admin_message() {
    let (admin_addr, _admin) = fake_admin(
        0,
        Some((StatusCode::BAD_REQUEST, "unknown namespace \"x\"")),
    )
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let e = serve(
        listener,
        Registration::new(admin_addr.to_string(), "catalog"),
        app(Slow::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Registration);
    let text = e.to_string();
    assert!(
        text.contains("400") && text.contains("unknown namespace"),
        "{text}"
    );
    assert!(text.contains("\"catalog\""), "{text}");
    // The listener is closed again.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn an_unspecified_listener_address_needs_an_advertised_one() {
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let e = serve(
        listener,
        Registration::new("127.0.0.1:1", "catalog"),
        app(Slow::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Registration);
    assert!(e.to_string().contains("advertise_address"), "{e}");
}
