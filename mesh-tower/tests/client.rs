//! The client stack against real axum backends on 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use common::{Seen, backend, closed_port};
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use mesh_core::Snapshot;
use mesh_core::model::Protocol;
use mesh_testkit::snapshot::two_backends;
use mesh_testkit::wait::within;
use mesh_tower::{ErrorKind, MeshClient, MeshLayer, Pool, StaticSource, grpc_status};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tower::{Service, ServiceExt};

type ChannelBody = StreamBody<UnboundedReceiverStream<Result<Frame<Bytes>, Infallible>>>;
type Client<Src = Arc<ArcSwap<Snapshot>>> = MeshClient<Full<Bytes>, Src>;

fn source(s: Snapshot) -> Arc<ArcSwap<Snapshot>> {
    Arc::new(ArcSwap::from_pointee(s))
}

async fn get<S>(
    client: &mut S,
    uri: &str,
    headers: &[(&str, &str)],
) -> Result<Seen, mesh_tower::Error>
where
    S: Service<
            Request<Full<Bytes>>,
            Response = http::Response<mesh_tower::ResponseBody>,
            Error = mesh_tower::Error,
        >,
{
    let mut req = Request::get(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = client
        .ready()
        .await?
        .call(req.body(Full::default()).unwrap())
        .await?;
    assert_eq!(response.status(), 200, "status for {uri}");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Ok(serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn routes_by_path_and_header() {
    let a = backend("a").await;
    let b = backend("b").await;
    let mut client: Client = MeshClient::new(source(two_backends(a.addr, b.addr, Protocol::Http1)));

    assert_eq!(
        get(&mut client, "http://catalog/items", &[])
            .await
            .unwrap()
            .backend,
        "a"
    );
    assert_eq!(
        get(&mut client, "http://catalog/b/items", &[])
            .await
            .unwrap()
            .backend,
        "b"
    );
    let v2 = get(&mut client, "http://catalog/items", &[("x-version", "v2")])
        .await
        .unwrap();
    assert_eq!(v2.backend, "b");
    assert_eq!(v2.path, "/items");
    // The port-qualified name finds the same listener.
    assert_eq!(
        get(&mut client, "http://catalog:80/b", &[])
            .await
            .unwrap()
            .backend,
        "b"
    );
}

#[tokio::test]
async fn endpoint_sees_the_original_authority_over_http1() {
    let a = backend("a").await;
    let b = backend("b").await;
    let mut client: Client = MeshClient::new(source(two_backends(a.addr, b.addr, Protocol::Http1)));
    let seen = get(&mut client, "http://catalog/x?y=1", &[]).await.unwrap();
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.host.as_deref(), Some("catalog"));
    assert_eq!(seen.uri_authority, None, "origin-form request target");
}

#[tokio::test]
async fn endpoint_sees_the_original_authority_over_http2() {
    let a = backend("a").await;
    let b = backend("b").await;
    let mut client: Client = MeshClient::new(source(two_backends(a.addr, b.addr, Protocol::Http2)));
    let seen = get(&mut client, "http://catalog/x", &[]).await.unwrap();
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.uri_authority.as_deref(), Some("catalog"));
    // A request addressed by Host only still carries it as :authority.
    let mut client: Client = MeshClient::new(source(two_backends(a.addr, b.addr, Protocol::Http2)));
    let seen = get(&mut client, "/x", &[("host", "catalog")])
        .await
        .unwrap();
    assert_eq!(seen.uri_authority.as_deref(), Some("catalog"));
}

#[tokio::test]
async fn round_robin_spreads_across_endpoints() {
    let a = backend("a").await;
    let b = backend("b").await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let client: Client = MeshClient::new(source(two_backends(a.addr, b.addr, protocol)));
        let mut counts = BTreeMap::new();
        for _ in 0..20 {
            // Clones share the round-robin counter.
            let mut c = client.clone();
            let seen = get(&mut c, "http://catalog/both", &[]).await.unwrap();
            *counts.entry(seen.backend).or_insert(0) += 1;
        }
        assert_eq!(
            counts,
            BTreeMap::from([("a".to_owned(), 10), ("b".to_owned(), 10)]),
            "{protocol:?}"
        );
    }
}

#[tokio::test]
async fn a_service_the_mesh_lacks_is_an_error_naming_it() {
    let a = backend("a").await;
    let mut client: Client = MeshClient::new(source(two_backends(a.addr, a.addr, Protocol::Http1)));
    // Said missing by the control server.
    let e = get(&mut client, "http://nope/x", &[]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.to_string(), "no such service \"nope\" in the mesh");
    // Never heard of, from a source that has nothing more to say.
    let e = get(&mut client, "http://other:8080/x", &[])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("\"other:8080\""), "{e}");
    // No name at all.
    let e = get(&mut client, "/x", &[]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    assert!(e.to_string().contains("with_origin"), "{e}");
}

#[tokio::test]
async fn a_route_that_does_not_match_is_an_error_naming_the_route_table() {
    let a = backend("a").await;
    let mut s = two_backends(a.addr, a.addr, Protocol::Http1);
    // Listener `shop` points at catalog's route table, whose domains do not
    // include `shop`: no virtual host.
    s.listeners.insert(
        "shop".into(),
        Arc::new(mesh_core::model::Listener {
            name: "shop".into(),
            route_config_name: "catalog:80".into(),
        }),
    );
    let mut client: Client = MeshClient::new(source(s));
    let e = get(&mut client, "http://shop/x", &[]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoRoute);
    let text = e.to_string();
    assert!(
        text.contains("\"shop\"") && text.contains("catalog:80"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unknown_service_is_waited_for() {
    let a = backend("a").await;
    let b = backend("b").await;
    let source = StaticSource::new(Snapshot::default());
    let mut client: MeshClient<Full<Bytes>, StaticSource> = MeshClient::new(source.clone());
    let pending = tokio::spawn(async move { get(&mut client, "http://catalog/b", &[]).await });
    within("the request to wait", async {
        while source.waiting() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    source.publish(two_backends(a.addr, b.addr, Protocol::Http1));
    let seen = within("the response", pending).await.unwrap().unwrap();
    assert_eq!(seen.backend, "b");
}

#[tokio::test]
async fn waiting_for_an_unknown_service_is_bounded() {
    let source = StaticSource::new(Snapshot::default());
    let mut client: MeshClient<Full<Bytes>, StaticSource> = MeshClient::from_parts(
        MeshLayer::new(source).listener_timeout(Duration::from_millis(50)),
        Pool::new(),
    );
    let e = within("the timeout", get(&mut client, "http://later/x", &[]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(e.is_timeout());
    assert!(e.to_string().contains("\"later\""), "{e}");
}

#[tokio::test]
async fn an_endpoint_that_refuses_is_a_connect_error_naming_it() {
    let dead = closed_port().await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut client: Client = MeshClient::new(source(two_backends(dead, dead, protocol)));
        let e = get(&mut client, "http://catalog/x", &[]).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Connect, "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&dead.to_string()) && text.contains("outbound|80|a|catalog"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn request_bodies_stream_without_buffering() {
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut a = backend("a").await;
        let b = backend("b").await;
        let mut client: MeshClient<ChannelBody, _> =
            MeshClient::new(source(two_backends(a.addr, b.addr, protocol)));
        let (tx, rx) = mpsc::unbounded_channel();
        let req = Request::post("http://catalog/stream")
            .body(StreamBody::new(UnboundedReceiverStream::new(rx)))
            .unwrap();
        let response = tokio::spawn(async move { client.ready().await?.call(req).await });
        tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
            .unwrap();
        // The backend has the first chunk while the client still holds the last.
        within("the first chunk at the backend", a.first_chunk.recv())
            .await
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"last"))))
            .unwrap();
        drop(tx);
        let response = within("the response", response).await.unwrap().unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"10 bytes", "{protocol:?}");
    }
}

#[tokio::test]
async fn response_trailers_pass_through() {
    let a = backend("a").await;
    let b = backend("b").await;
    let mut client: Client = MeshClient::new(source(two_backends(a.addr, b.addr, Protocol::Grpc)));
    let response = client
        .ready()
        .await
        .unwrap()
        .call(
            Request::post("http://catalog/trailers")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(grpc_status(response.headers()), None, "not Trailers-Only");
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(grpc_status(&trailers), Some(0));
    assert_eq!(trailers.get("grpc-message").unwrap(), "fine");
    assert_eq!(&collected.to_bytes()[..], b"payload");
}

#[tokio::test]
async fn mesh_layer_rewrites_uris_for_any_http_client() {
    use hyper_util::client::legacy::Client as HyperClient;
    use hyper_util::rt::TokioExecutor;

    let a = backend("a").await;
    let b = backend("b").await;
    // The inner client takes the mesh's body type (the caller's body, or a
    // copy kept for retries).
    let hyper = HyperClient::builder(TokioExecutor::new())
        .build_http::<mesh_tower::MeshBody<Full<Bytes>>>();
    let mut svc = tower::Layer::layer(
        &MeshLayer::new(source(two_backends(a.addr, b.addr, Protocol::Http1))),
        hyper,
    );
    let seen = get(&mut svc, "http://catalog/b/x", &[]).await.unwrap();
    assert_eq!(seen.backend, "b");
    assert_eq!(
        seen.host.as_deref(),
        Some("catalog"),
        "the original authority moves to Host"
    );
}

/// A server that, when told, sends GOAWAY on its open connections while a
/// slow request is still in flight on them; it keeps accepting new ones.
#[tokio::test]
async fn requests_keep_working_while_an_endpoint_drains_a_connection() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use tokio::sync::Notify;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let goaway = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let connections = Arc::new(AtomicUsize::new(0));
    {
        let (goaway, started, release, connections) = (
            goaway.clone(),
            started.clone(),
            release.clone(),
            connections.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let id = connections.fetch_add(1, Ordering::SeqCst) + 1;
                let (goaway, started, release) = (goaway.clone(), started.clone(), release.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (started, release) = (started.clone(), release.clone());
                            async move {
                                if req.uri().path() == "/slow" {
                                    started.notify_one();
                                    release.notified().await;
                                }
                                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                    id.to_string(),
                                ))))
                            }
                        });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = goaway.notified() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
    }
    let client: Client = MeshClient::new(source(two_backends(addr, addr, Protocol::Http2)));
    let call = |uri: &'static str| {
        let mut client = client.clone();
        async move {
            let response = client
                .ready()
                .await?
                .call(Request::get(uri).body(Full::default()).unwrap())
                .await?;
            let body = response.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, mesh_tower::Error>(String::from_utf8(body.to_vec()).unwrap())
        }
    };
    assert_eq!(call("http://catalog/fast").await.unwrap(), "1");
    let slow = tokio::spawn(call("http://catalog/slow"));
    within("the slow request", started.notified()).await;
    goaway.notify_waiters();
    for _ in 0..20 {
        call("http://catalog/fast").await.unwrap();
    }
    release.notify_one();
    assert_eq!(
        within("the slow response", slow).await.unwrap().unwrap(),
        "1"
    );
    assert_eq!(
        call("http://catalog/fast").await.unwrap(),
        "2",
        "a fresh connection"
    );
}
