//! Resilience of the client stack against real axum backends on 127.0.0.1,
//! with small real settings (1 ms backoff, 200 ms ejection): retries and
//! budgets, body replay, circuit breakers, connection settings, outlier
//! detection, timeouts and deadlines across hops, fault injection, ring
//! hash, locality failover.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use common::{Gauge, attempt_of, closed_port, reply, serve_fn};
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use mesh_core::model::{
    AbortStatus, CircuitBreakers, Cluster, ConnectionSettings, FaultAbort, FaultDelay, FaultPolicy,
    Fraction, HashPolicy, LbPolicy, Locality, OutlierDetection, Protocol, RetryBudget, RetryOn,
    RetryPolicy, RoutePolicy,
};
use mesh_testkit::snapshot::{add_one_service, one_service};
use mesh_testkit::stats::assert_binomial;
use mesh_testkit::wait::{until, within};
use mesh_tower::local_reply::{LOCAL_REPLY_HEADER, OVERLOADED_HEADER};
use mesh_tower::server::ServerContext;
use mesh_tower::{
    Deadline, MeshClient, MeshLayer, Pool, ResponseBody, ServerLayer, StaticSource, grpc_status,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tower::ServiceExt;

type Client = MeshClient<Full<Bytes>, StaticSource>;
type ChannelBody = StreamBody<UnboundedReceiverStream<Result<Frame<Bytes>, Infallible>>>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn here() -> Locality {
    Locality::default()
}

fn retry(attempts: u32, on: RetryOn) -> RetryPolicy {
    RetryPolicy {
        num_retries: attempts,
        retry_on: on,
        backoff_base: ms(1),
        backoff_max: ms(10),
        ..RetryPolicy::istio_default()
    }
}

fn retrying(policy: RetryPolicy) -> RoutePolicy {
    RoutePolicy {
        retry: Some(policy),
        ..RoutePolicy::default()
    }
}

fn cluster(protocol: Protocol) -> Cluster {
    Cluster {
        lb_policy: LbPolicy::RoundRobin,
        ..Cluster::new("renamed", protocol)
    }
}

fn client(snapshot: mesh_core::Snapshot) -> Client {
    MeshClient::new(StaticSource::new(snapshot))
}

fn get(uri: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(uri).body(Full::default()).unwrap()
}

/// Sends `req`, reads the whole response.
async fn send<B>(
    client: &MeshClient<B, StaticSource>,
    req: http::Request<B>,
) -> (StatusCode, HeaderMap, Bytes)
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Error: Into<mesh_tower::BoxError>,
{
    let response = within("the response", client.clone().oneshot(req))
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = within("the body", body.collect()).await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

// ---------------------------------------------------------------- retries

#[tokio::test]
async fn retries_route_around_an_endpoint_that_always_fails() {
    let good1 = serve_fn(|_| async { reply(200, "good") }).await;
    let good2 = serve_fn(|_| async { reply(200, "good") }).await;
    let bad = serve_fn(|_| async { reply(503, "bad") }).await;
    let snapshot = one_service(
        "svc",
        cluster(Protocol::Http2),
        retrying(retry(3, RetryOn::FIVE_XX)),
        &[(good1, here()), (good2, here()), (bad, here())],
    );
    let client = client(snapshot);
    let statuses: Vec<StatusCode> = futures_util::stream::iter(0..2000)
        .map(|_| {
            let client = client.clone();
            async move { send(&client, get("http://svc/")).await.0 }
        })
        .buffer_unordered(20)
        .collect()
        .await;
    let ok = statuses.iter().filter(|s| s.is_success()).count();
    assert!(ok >= 1998, "{ok} of 2000 succeeded");
    // A third of first attempts land on the bad endpoint and are retried.
    assert!(client.stats().retries() >= 400, "{:?}", client.stats());
}

#[tokio::test]
async fn retries_of_a_flaky_endpoint_succeed_as_often_as_independent_tries_would() {
    let flaky = serve_fn(|_| async {
        if rand::random::<bool>() {
            reply(503, "flaky")
        } else {
            reply(200, "ok")
        }
    })
    .await;
    let snapshot = one_service(
        "svc",
        cluster(Protocol::Http1),
        retrying(retry(3, RetryOn::FIVE_XX)),
        &[(flaky, here())],
    );
    let client = client(snapshot);
    let n = 2000;
    let mut ok = 0;
    for _ in 0..n {
        if send(&client, get("http://svc/")).await.0 == 200 {
            ok += 1;
        }
    }
    // Four independent tries at 50%: 1 − 0.5⁴.
    assert_binomial("successes", ok, n, 1.0 - 0.5f64.powi(4));
}

/// Fails the first attempt; answers later ones with "<attempt>:<body>".
async fn fail_first_then_echo(hits: Arc<AtomicU32>) -> SocketAddr {
    serve_fn(move |req: Request| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let attempt = attempt_of(&req);
            let body = req.into_body().collect().await.unwrap().to_bytes();
            if attempt <= 1 {
                return reply(503, "first attempt fails");
            }
            reply(200, format!("{attempt}:{}", String::from_utf8_lossy(&body)))
        }
    })
    .await
}

#[tokio::test]
async fn post_bodies_are_replayed_on_retry() {
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let hits = Arc::new(AtomicU32::new(0));
        let addr = fail_first_then_echo(hits.clone()).await;
        let snapshot = one_service(
            "svc",
            cluster(protocol),
            retrying(retry(2, RetryOn::FIVE_XX)),
            &[(addr, here())],
        );
        let client = client(snapshot);
        let big = "x".repeat(10_000);
        for payload in ["hello", big.as_str()] {
            hits.store(0, Ordering::SeqCst);
            let req = http::Request::post("http://svc/orders")
                .body(Full::new(Bytes::from(payload.to_owned())))
                .unwrap();
            let (status, _, body) = send(&client, req).await;
            assert_eq!(status, 200, "{protocol:?}");
            assert_eq!(body, format!("2:{payload}"), "{protocol:?}");
            assert_eq!(hits.load(Ordering::SeqCst), 2);
        }
    }
}

#[tokio::test]
async fn a_streaming_or_oversized_body_is_sent_once_and_not_retried() {
    let hits = Arc::new(AtomicU32::new(0));
    let addr = fail_first_then_echo(hits.clone()).await;
    let snapshot = one_service(
        "svc",
        cluster(Protocol::Http2),
        retrying(retry(2, RetryOn::FIVE_XX)),
        &[(addr, here())],
    );
    // A body still being written when the request is sent.
    let streaming: MeshClient<ChannelBody, StaticSource> =
        MeshClient::new(StaticSource::new(snapshot.clone()));
    let (tx, rx) = mpsc::unbounded_channel();
    let req = http::Request::post("http://svc/upload")
        .body(StreamBody::new(UnboundedReceiverStream::new(rx)))
        .unwrap();
    let pending = tokio::spawn({
        let streaming = streaming.clone();
        async move { send(&streaming, req).await }
    });
    // The backend has the request while its body is still being written.
    until("the request at the backend", || {
        hits.load(Ordering::SeqCst) == 1
    })
    .await;
    tx.send(Ok(Frame::data(Bytes::from_static(b"chunk"))))
        .unwrap();
    drop(tx);
    let (status, _, _) = within("the streamed request", pending).await.unwrap();
    assert_eq!(status, 503, "the failure is returned, not retried");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(streaming.stats().retries(), 0);

    // A whole body over the client's retry buffer limit.
    hits.store(0, Ordering::SeqCst);
    let small_buffer: Client = MeshClient::from_parts(
        MeshLayer::new(StaticSource::new(snapshot)).retry_buffer_limit(16),
        Pool::new(),
    );
    let req = http::Request::post("http://svc/upload")
        .body(Full::new(Bytes::from(vec![b'y'; 100])))
        .unwrap();
    assert_eq!(send(&small_buffer, req).await.0, 503);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_retries_stay_within_the_retry_budget() {
    let retries_in_flight = Arc::new(Gauge::default());
    let backend = {
        let gauge = retries_in_flight.clone();
        move |req: Request| {
            let gauge = gauge.clone();
            async move {
                let _retry = (attempt_of(&req) > 1).then(|| gauge.enter());
                // Some work, so that requests overlap.
                tokio::time::sleep(ms(2)).await;
                reply(503, "down")
            }
        }
    };
    let a = serve_fn(backend.clone()).await;
    let b = serve_fn(backend).await;
    let budget = Fraction::from_percent(20.0).unwrap();
    let min_retry_concurrency = 2;
    let snapshot = one_service(
        "svc",
        Cluster {
            circuit_breakers: CircuitBreakers {
                retry_budget: Some(RetryBudget {
                    budget,
                    min_retry_concurrency,
                }),
                ..CircuitBreakers::default()
            },
            ..cluster(Protocol::Http2)
        },
        retrying(retry(3, RetryOn::FIVE_XX)),
        &[(a, here()), (b, here())],
    );
    let client = client(snapshot);
    let callers = 50;
    let statuses: Vec<StatusCode> = futures_util::stream::iter(0..1000)
        .map(|_| {
            let client = client.clone();
            async move { send(&client, get("http://svc/")).await.0 }
        })
        .buffer_unordered(callers)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 503));
    // At most `callers` requests are active, so the budget allows at most
    // max(20% × 50, 2) = 10 retries at once.
    let bound =
        ((budget.percent() / 100.0 * callers as f64) as usize).max(min_retry_concurrency as usize);
    let seen = retries_in_flight.max();
    assert!(seen <= bound, "{seen} retries at once, budget {bound}");
    assert!(seen >= 1, "some retries were sent");
    let stats = client.stats();
    assert!(stats.retries_refused() > 0, "{stats:?}");
    assert!(stats.retries() > 0, "{stats:?}");
}

#[tokio::test]
async fn per_try_timeouts_are_retried() {
    let slow_first = serve_fn(|req: Request| async move {
        if attempt_of(&req) <= 1 {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        reply(200, format!("attempt {}", attempt_of(&req)))
    })
    .await;
    let snapshot = one_service(
        "svc",
        cluster(Protocol::Http2),
        retrying(RetryPolicy {
            per_try_timeout: Some(ms(50)),
            ..retry(2, RetryOn::RESET)
        }),
        &[(slow_first, here())],
    );
    let client = client(snapshot);
    let start = Instant::now();
    let (status, _, body) = send(&client, get("http://svc/")).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"attempt 2"[..]));
    assert!(start.elapsed() < Duration::from_secs(2));
}

fn grpc_reply(status: Option<u32>, trailers: Option<u32>) -> Response {
    let mut frames = Vec::new();
    if let Some(code) = trailers {
        frames.push(Ok::<_, Infallible>(Frame::data(Bytes::from_static(
            b"\0\0\0\0\0",
        ))));
        let mut t = HeaderMap::new();
        t.insert("grpc-status", code.into());
        frames.push(Ok(Frame::trailers(t)));
    }
    let mut response =
        axum::body::Body::new(StreamBody::new(tokio_stream::iter(frames))).into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", "application/grpc".parse().unwrap());
    if let Some(code) = status {
        headers.insert("grpc-status", code.into());
    }
    response
}

fn grpc_request(uri: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap()
}

#[tokio::test]
async fn grpc_statuses_in_headers_are_retried_and_in_trailers_are_not() {
    let hits = Arc::new(AtomicU32::new(0));
    let backend = serve_fn({
        let hits = hits.clone();
        move |req: Request| {
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                match (req.uri().path(), attempt_of(&req)) {
                    // Trailers-Only UNAVAILABLE, then OK.
                    ("/headers", 1) => grpc_reply(Some(14), None),
                    ("/headers", _) => grpc_reply(None, Some(0)),
                    // A response that began, then failed in its trailers.
                    _ => grpc_reply(None, Some(14)),
                }
            }
        }
    })
    .await;
    let snapshot = one_service(
        "svc",
        cluster(Protocol::Grpc),
        retrying(retry(2, RetryOn::UNAVAILABLE)),
        &[(backend, here())],
    );
    let client = client(snapshot);
    let response = client
        .clone()
        .oneshot(grpc_request("http://svc/headers"))
        .await
        .unwrap();
    assert_eq!(grpc_status(response.headers()), None);
    let trailers = response.into_body().collect().await.unwrap();
    assert_eq!(grpc_status(trailers.trailers().unwrap()), Some(0));
    assert_eq!(hits.swap(0, Ordering::SeqCst), 2);

    let response = client
        .clone()
        .oneshot(grpc_request("http://svc/trailers"))
        .await
        .unwrap();
    let trailers = response.into_body().collect().await.unwrap();
    assert_eq!(grpc_status(trailers.trailers().unwrap()), Some(14));
    assert_eq!(hits.load(Ordering::SeqCst), 1, "not retried");
}

// ------------------------------------------------------- circuit breaking

/// A backend that holds every request until the gate opens.
fn gated(
    gauge: Arc<Gauge>,
    gate: watch::Receiver<bool>,
) -> impl Fn(Request) -> futures_util::future::BoxFuture<'static, Response> + Clone + Send + Sync + 'static
{
    move |_req: Request| {
        let gauge = gauge.clone();
        let mut gate = gate.clone();
        Box::pin(async move {
            let _in_flight = gauge.enter();
            let _ = gate.wait_for(|open| *open).await;
            reply(200, "done")
        })
    }
}

#[tokio::test]
async fn max_requests_overflow_fails_fast_naming_the_limit_and_recovers() {
    let gauge = Arc::new(Gauge::default());
    let (open, gate) = watch::channel(false);
    let backend = serve_fn(gated(gauge.clone(), gate)).await;
    let snapshot = one_service(
        "svc",
        Cluster {
            circuit_breakers: CircuitBreakers {
                max_requests: 10,
                ..CircuitBreakers::default()
            },
            ..cluster(Protocol::Http2)
        },
        RoutePolicy::default(),
        &[(backend, here())],
    );
    let client = client(snapshot);
    let (done_tx, mut done) = mpsc::unbounded_channel();
    for _ in 0..50 {
        let client = client.clone();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let _ = done_tx.send(send(&client, get("http://svc/")).await);
        });
    }
    // The 40 over the limit are answered while the 10 others are held.
    for _ in 0..40 {
        let (status, headers, body) = within("an overflow", done.recv()).await.unwrap();
        assert_eq!(status, 503);
        assert_eq!(headers[OVERLOADED_HEADER], "true");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("http2MaxRequests limit of 10"), "{text}");
    }
    until("the 10 admitted requests at the backend", || {
        gauge.now() == 10
    })
    .await;
    open.send_replace(true);
    for _ in 0..10 {
        let (status, _, _) = within("a held request", done.recv()).await.unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(gauge.max(), 10);
    assert_eq!(client.stats().overflows(), 40);
    // Recovered: the slots were given back.
    assert_eq!(send(&client, get("http://svc/")).await.0, 200);
}

#[tokio::test]
async fn beyond_max_connections_requests_wait_and_pending_overflow_fails() {
    let gauge = Arc::new(Gauge::default());
    let (open, gate) = watch::channel(false);
    let backend = serve_fn(gated(gauge.clone(), gate)).await;
    let snapshot = one_service(
        "svc",
        Cluster {
            circuit_breakers: CircuitBreakers {
                max_connections: 1,
                max_pending_requests: 1,
                ..CircuitBreakers::default()
            },
            ..cluster(Protocol::Http1)
        },
        RoutePolicy::default(),
        &[(backend, here())],
    );
    let client = client(snapshot);
    let first = tokio::spawn({
        let client = client.clone();
        async move { send(&client, get("http://svc/")).await }
    });
    until("the first request at the backend", || gauge.now() == 1).await;
    // One of these waits for the connection, the other overflows.
    let (done_tx, mut done) = mpsc::unbounded_channel();
    for _ in 0..2 {
        let client = client.clone();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let _ = done_tx.send(send(&client, get("http://svc/")).await);
        });
    }
    let (status, headers, body) = within("the overflow", done.recv()).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(headers[OVERLOADED_HEADER], "true");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("http1MaxPendingRequests limit of 1"),
        "{text}"
    );
    open.send_replace(true);
    assert_eq!(within("the first", first).await.unwrap().0, 200);
    assert_eq!(within("the pending one", done.recv()).await.unwrap().0, 200);
    assert_eq!(gauge.max(), 1, "one connection, one request at a time");
    assert_eq!(client.pool().open_connections(), 1);
}

async fn peer_port_backend() -> SocketAddr {
    serve_fn(|req: Request| async move {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.port())
            .unwrap_or(0);
        reply(200, peer.to_string())
    })
    .await
}

#[tokio::test]
async fn connections_carry_at_most_max_requests_per_connection() {
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let backend = peer_port_backend().await;
        let snapshot = one_service(
            "svc",
            Cluster {
                connection: ConnectionSettings {
                    max_requests_per_connection: Some(2),
                    ..ConnectionSettings::default()
                },
                ..cluster(protocol)
            },
            RoutePolicy::default(),
            &[(backend, here())],
        );
        let client = client(snapshot);
        let mut uses: HashMap<String, u32> = HashMap::new();
        for _ in 0..6 {
            let (_, _, port) = send(&client, get("http://svc/")).await;
            *uses
                .entry(String::from_utf8_lossy(&port).into_owned())
                .or_default() += 1;
        }
        assert!(uses.len() >= 3, "{protocol:?}: {uses:?}");
        assert!(uses.values().all(|n| *n <= 2), "{protocol:?}: {uses:?}");
    }
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let backend = peer_port_backend().await;
        let snapshot = one_service(
            "svc",
            Cluster {
                connection: ConnectionSettings {
                    idle_timeout: Some(ms(100)),
                    ..ConnectionSettings::default()
                },
                ..cluster(protocol)
            },
            RoutePolicy::default(),
            &[(backend, here())],
        );
        let client = client(snapshot);
        let (_, _, first) = send(&client, get("http://svc/")).await;
        let idle_since = Instant::now();
        until("the idle connection to close", || {
            client.pool().open_connections() == 0
        })
        .await;
        let idle_for = idle_since.elapsed();
        assert!(
            idle_for >= ms(90),
            "{protocol:?}: closed after {idle_for:?}"
        );
        let (_, _, second) = send(&client, get("http://svc/")).await;
        assert_ne!(first, second, "{protocol:?}: a fresh connection");
    }
}

// ------------------------------------------------------ outlier detection

fn outlier(consecutive_5xx: u32, base: Duration, max_ejection_percent: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: Some(consecutive_5xx),
        consecutive_gateway_errors: None,
        interval: ms(50),
        base_ejection_time: base,
        max_ejection_percent,
        min_health_percent: 0,
    }
}

/// Records when each request arrived.
async fn timed_backend(status: u16, times: Arc<Mutex<Vec<Instant>>>) -> SocketAddr {
    serve_fn(move |_req: Request| {
        let times = times.clone();
        async move {
            times.lock().unwrap().push(Instant::now());
            reply(status, "")
        }
    })
    .await
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_returns_within_the_window() {
    let bad_times = Arc::new(Mutex::new(Vec::new()));
    let bad = timed_backend(503, bad_times.clone()).await;
    let mut endpoints = vec![(bad, here())];
    for _ in 0..3 {
        endpoints.push((timed_backend(200, Arc::default()).await, here()));
    }
    let base = ms(200);
    let interval = ms(50);
    let snapshot = one_service(
        "svc",
        Cluster {
            outlier_detection: Some(outlier(3, base, 100)),
            ..cluster(Protocol::Http2)
        },
        RoutePolicy::default(),
        &endpoints,
    );
    let client = client(snapshot);
    within("the ejected endpoint's return", async {
        while bad_times.lock().unwrap().len() < 4 {
            send(&client, get("http://svc/")).await;
        }
    })
    .await;
    assert_eq!(client.stats().ejections(), 1);
    let times = bad_times.lock().unwrap().clone();
    // Ejected after its third consecutive 5xx; back within
    // [base, base + interval] (plus the time for the next request to reach it).
    let out = times[3] - times[2];
    assert!(out >= base, "back after {out:?}");
    assert!(out <= base + interval + ms(100), "back after {out:?}");
}

#[tokio::test]
async fn max_ejection_percent_keeps_endpoints_in_service() {
    let bad_a = Arc::new(Mutex::new(Vec::new()));
    let bad_b = Arc::new(Mutex::new(Vec::new()));
    let endpoints = vec![
        (timed_backend(503, bad_a.clone()).await, here()),
        (timed_backend(503, bad_b.clone()).await, here()),
        (timed_backend(200, Arc::default()).await, here()),
        (timed_backend(200, Arc::default()).await, here()),
    ];
    // At most 25% of 4: one endpoint ejected at a time; for 10 s.
    let snapshot = one_service(
        "svc",
        Cluster {
            outlier_detection: Some(outlier(3, Duration::from_secs(10), 25)),
            ..cluster(Protocol::Http2)
        },
        RoutePolicy::default(),
        &endpoints,
    );
    let client = client(snapshot);
    for _ in 0..200 {
        send(&client, get("http://svc/")).await;
    }
    let (a, b) = (bad_a.lock().unwrap().len(), bad_b.lock().unwrap().len());
    assert_eq!(client.stats().ejections(), 1);
    assert_eq!(a.min(b), 3, "the ejected one got its 3 failures: {a} / {b}");
    assert!(a.max(b) > 20, "the other one stays in service: {a} / {b}");
}

// ---------------------------------------------------- timeouts, deadlines

#[tokio::test]
async fn the_route_timeout_answers_504_and_covers_the_response_body() {
    let backend = serve_fn(|req: Request| async move {
        if req.uri().path() == "/slow-head" {
            tokio::time::sleep(Duration::from_secs(5)).await;
            return reply(200, "late");
        }
        // Headers at once, then a body that never ends.
        let (tx, rx) = mpsc::unbounded_channel::<Result<Frame<Bytes>, Infallible>>();
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"partial"))));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(tx);
        });
        axum::body::Body::new(StreamBody::new(UnboundedReceiverStream::new(rx))).into_response()
    })
    .await;
    let snapshot = one_service(
        "svc",
        cluster(Protocol::Http2),
        RoutePolicy {
            timeout: Some(ms(100)),
            ..RoutePolicy::default()
        },
        &[(backend, here())],
    );
    let client = client(snapshot);
    let start = Instant::now();
    let (status, headers, body) = send(&client, get("http://svc/slow-head")).await;
    assert_eq!(status, 504);
    assert_eq!(headers[LOCAL_REPLY_HEADER], "timeout");
    assert!(String::from_utf8_lossy(&body).contains("timeout"));
    assert!(start.elapsed() < Duration::from_secs(2));

    let response = client
        .clone()
        .oneshot(get("http://svc/slow-body"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let error = within("the body timeout", response.into_body().collect())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("route timeout"), "{error}");
    assert_eq!(client.stats().timeouts(), 1);
}

/// What a hop saw: the deadline header value (ms) and, for the last hop,
/// what its own call got.
#[derive(Debug, Default)]
struct Hops {
    hop2_header_ms: Option<u64>,
    hop3_header_ms: Option<u64>,
    hop3_remaining: Option<Duration>,
    hop3_call: Option<(u16, Option<String>)>,
}

fn header_ms(req: &Request) -> Option<u64> {
    req.headers()
        .get("x-envoy-expected-rq-timeout-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[tokio::test]
async fn a_deadline_shrinks_across_hops_and_an_expired_one_is_not_sent() {
    let hops = Arc::new(Mutex::new(Hops::default()));
    let hop4_hits = Arc::new(AtomicUsize::new(0));
    // One mesh client for every hop; filled in once the addresses exist.
    let source = StaticSource::new(mesh_core::Snapshot::default());
    let client: MeshClient<axum::body::Body, StaticSource> = MeshClient::new(source.clone());

    let hop4 = serve_fn({
        let hits = hop4_hits.clone();
        move |_req: Request| {
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                reply(200, "hop 4")
            }
        }
    })
    .await;
    let layer = |name: &str| ServerLayer::new(ServerContext::new(name, "default", name));
    let hop3 = {
        let (hops, client) = (hops.clone(), client.clone());
        let app = axum::Router::new()
            .fallback(move |req: Request| {
                let (hops, client) = (hops.clone(), client.clone());
                async move {
                    let deadline = Deadline::from_request(&req).unwrap();
                    {
                        let mut hops = hops.lock().unwrap();
                        hops.hop3_header_ms = header_ms(&req);
                        hops.hop3_remaining = Some(deadline.remaining());
                    }
                    let mut call = http::Request::get("http://hop4/")
                        .body(axum::body::Body::empty())
                        .unwrap();
                    Deadline::propagate(&req, &mut call);
                    // In a task: the caller gives up (and resets the stream)
                    // when the deadline passes, which would cancel the handler.
                    let work = tokio::spawn(async move {
                        // Slow work that outlives the deadline.
                        tokio::time::sleep(deadline.remaining() + ms(10)).await;
                        let response = client.oneshot(call).await.unwrap();
                        let local = response
                            .headers()
                            .get(LOCAL_REPLY_HEADER)
                            .map(|v| v.to_str().unwrap().to_owned());
                        hops.lock().unwrap().hop3_call = Some((response.status().as_u16(), local));
                        response.status()
                    });
                    work.await.unwrap()
                }
            })
            .layer(layer("hop3"));
        serve_router(app).await
    };
    let hop2 = {
        let (hops, client) = (hops.clone(), client.clone());
        let app = axum::Router::new()
            .fallback(move |req: Request| {
                let (hops, client) = (hops.clone(), client.clone());
                async move {
                    hops.lock().unwrap().hop2_header_ms = header_ms(&req);
                    tokio::time::sleep(ms(20)).await;
                    let mut call = http::Request::get("http://hop3/")
                        .body(axum::body::Body::empty())
                        .unwrap();
                    Deadline::propagate(&req, &mut call);
                    match client.oneshot(call).await {
                        Ok(response) => response.status(),
                        Err(_) => StatusCode::BAD_GATEWAY,
                    }
                }
            })
            .layer(layer("hop2"));
        serve_router(app).await
    };
    let mut snapshot = mesh_core::Snapshot::default();
    for (name, addr) in [("hop2", hop2), ("hop3", hop3), ("hop4", hop4)] {
        add_one_service(
            &mut snapshot,
            name,
            cluster(Protocol::Http2),
            RoutePolicy::default(),
            &[(addr, here())],
        );
    }
    source.publish(snapshot);

    // Hop 1: 100 ms for the whole call.
    let mut call = http::Request::get("http://hop2/")
        .body(axum::body::Body::empty())
        .unwrap();
    call.extensions_mut().insert(Deadline::after(ms(100)));
    let start = Instant::now();
    let (status, headers, _) = send(&client, call).await;
    assert_eq!(status, 504);
    assert_eq!(headers[LOCAL_REPLY_HEADER], "timeout");
    assert!(start.elapsed() < Duration::from_secs(1));

    until("hop 3 to try hop 4", || {
        hops.lock().unwrap().hop3_call.is_some()
    })
    .await;
    let hops = hops.lock().unwrap();
    let hop2_ms = hops.hop2_header_ms.unwrap();
    let hop3_ms = hops.hop3_header_ms.unwrap();
    assert!(hop2_ms <= 100, "{hops:?}");
    assert!(hop3_ms < 100 && hop3_ms <= hop2_ms - 20 + 1, "{hops:?}");
    assert!(hops.hop3_remaining.unwrap() < ms(100), "{hops:?}");
    assert_eq!(
        hops.hop3_call,
        Some((504, Some("timeout".to_owned()))),
        "hop 3's call failed in the mesh"
    );
    assert_eq!(hop4_hits.load(Ordering::SeqCst), 0, "hop 4 never called");
}

async fn serve_router(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn grpc_deadlines_travel_as_grpc_timeout_and_expire_as_deadline_exceeded() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let backend = serve_fn({
        let seen = seen.clone();
        move |req: Request| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(
                    req.headers()
                        .get("grpc-timeout")
                        .map(|v| v.to_str().unwrap().to_owned()),
                );
                grpc_reply(None, Some(0))
            }
        }
    })
    .await;
    let snapshot = one_service(
        "svc",
        cluster(Protocol::Grpc),
        RoutePolicy {
            timeout: Some(Duration::from_secs(5)),
            ..RoutePolicy::default()
        },
        &[(backend, here())],
    );
    let client = client(snapshot);
    // The request's deadline is shorter than the route timeout: it is sent.
    let mut req = grpc_request("http://svc/pkg.Svc/Call");
    req.extensions_mut().insert(Deadline::after(ms(300)));
    let response = client.clone().oneshot(req).await.unwrap();
    response.into_body().collect().await.unwrap();
    let header = seen.lock().unwrap()[0].clone().unwrap();
    let sent = mesh_core::deadline::parse_grpc_timeout(&header).unwrap();
    assert!(sent <= ms(300) && sent > ms(200), "{header}");

    // An expired deadline: answered by the mesh, nothing sent.
    let mut req = grpc_request("http://svc/pkg.Svc/Call");
    req.extensions_mut()
        .insert(Deadline::new(tokio::time::Instant::now()));
    let response = client.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(grpc_status(response.headers()), Some(4));
    assert!(response.body().is_local());
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn the_server_layer_exposes_the_deadline_and_refuses_expired_ones() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = {
        let calls = calls.clone();
        axum::Router::new()
            .fallback(move |req: Request| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let left = Deadline::from_request(&req).map(|d| d.remaining());
                    format!("{left:?}")
                }
            })
            .layer(ServerLayer::new(ServerContext::new("svc", "default", "n1")))
    };
    let addr = serve_router(app).await;
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let call = |headers: &[(&str, &str)]| {
        let mut req = http::Request::get(format!("http://{addr}/"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        plain.request(req.body(Full::default()).unwrap())
    };
    let response = call(&[("x-envoy-expected-rq-timeout-ms", "500")])
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).starts_with("Some("),
        "{body:?}"
    );
    let response = call(&[("x-envoy-expected-rq-timeout-ms", "0")])
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let response = call(&[("grpc-timeout", "0m"), ("content-type", "application/grpc")])
        .await
        .unwrap();
    assert_eq!(grpc_status(response.headers()), Some(4));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the app ran once");
}

// ------------------------------------------------------- fault injection

#[tokio::test]
async fn fault_injection_aborts_and_delays_the_configured_shares() {
    let hits = Arc::new(AtomicUsize::new(0));
    let backend = serve_fn({
        let hits = hits.clone();
        move |_req: Request| {
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                reply(200, "ok")
            }
        }
    })
    .await;
    let snapshot = one_service(
        "svc",
        cluster(Protocol::Http2),
        RoutePolicy {
            fault: Some(FaultPolicy {
                delay: Some(FaultDelay {
                    fraction: Fraction::from_percent(10.0).unwrap(),
                    delay: ms(2),
                }),
                abort: Some(FaultAbort {
                    fraction: Fraction::from_percent(20.0).unwrap(),
                    status: AbortStatus::Http(418),
                }),
            }),
            ..RoutePolicy::default()
        },
        &[(backend, here())],
    );
    let client = client(snapshot);
    let n = 5000;
    let results: Vec<(StatusCode, Option<String>)> = futures_util::stream::iter(0..n)
        .map(|_| {
            let client = client.clone();
            async move {
                let (status, headers, _) = send(&client, get("http://svc/")).await;
                let local = headers
                    .get(LOCAL_REPLY_HEADER)
                    .map(|v| v.to_str().unwrap().to_owned());
                (status, local)
            }
        })
        .buffer_unordered(25)
        .collect()
        .await;
    let aborted = results
        .iter()
        .filter(|(s, local)| *s == 418 && local.as_deref() == Some("fault-abort"))
        .count();
    assert_binomial("aborted", aborted, n, 0.2);
    assert_eq!(hits.load(Ordering::SeqCst), n - aborted);
    let stats = client.stats();
    assert_eq!(stats.faults_aborted() as usize, aborted);
    assert_binomial("delayed", stats.faults_delayed() as usize, n, 0.1);
}

#[tokio::test]
async fn a_grpc_abort_is_a_trailers_only_status() {
    let backend = serve_fn(|_req: Request| async { grpc_reply(None, Some(0)) }).await;
    let snapshot = one_service(
        "svc",
        cluster(Protocol::Grpc),
        RoutePolicy {
            fault: Some(FaultPolicy {
                delay: None,
                abort: Some(FaultAbort {
                    fraction: Fraction::ALL,
                    status: AbortStatus::Grpc(14),
                }),
            }),
            ..RoutePolicy::default()
        },
        &[(backend, here())],
    );
    let client = client(snapshot);
    let response = client
        .clone()
        .oneshot(grpc_request("http://svc/pkg.Svc/Call"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(grpc_status(response.headers()), Some(14));
    assert_eq!(response.headers()["grpc-message"], "fault filter abort");
}

// ------------------------------------------------------------ ring hash

#[tokio::test]
async fn ring_hash_keeps_a_key_on_its_endpoint_and_moves_few_when_one_joins() {
    let mut endpoints = Vec::new();
    for i in 0..11 {
        let addr = serve_fn(move |_req: Request| async move { reply(200, i.to_string()) }).await;
        endpoints.push((addr, here()));
    }
    let ring = |n: usize| {
        one_service(
            "svc",
            Cluster {
                lb_policy: LbPolicy::RingHash {
                    minimum_ring_size: 1024,
                },
                ..cluster(Protocol::Http2)
            },
            RoutePolicy {
                hash_policy: Arc::from([HashPolicy::Header("x-user".into())]),
                ..RoutePolicy::default()
            },
            &endpoints[..n],
        )
    };
    let source = StaticSource::new(ring(10));
    let client: Client = MeshClient::new(source.clone());
    let pick = |user: String| {
        let client = client.clone();
        async move {
            let req = http::Request::get("http://svc/")
                .header("x-user", user)
                .body(Full::default())
                .unwrap();
            String::from_utf8(send(&client, req).await.2.to_vec()).unwrap()
        }
    };
    // 1,000 keys: ~15% move (Envoy ~16%); the 20% bound is 4.5 sigma away.
    let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let mut before = BTreeMap::new();
    for key in &keys {
        let first = pick(key.clone()).await;
        assert_eq!(pick(key.clone()).await, first, "{key} moved");
        before.insert(key.clone(), first);
    }
    let used: BTreeSet<&String> = before.values().collect();
    assert!(used.len() >= 8, "keys spread over {} endpoints", used.len());

    source.publish(ring(11));
    let mut moved = 0;
    for key in &keys {
        if pick(key.clone()).await != before[key] {
            moved += 1;
        }
    }
    assert!(
        moved * 5 <= keys.len(),
        "{moved} of {} keys moved",
        keys.len()
    );
    assert!(moved > 0, "the new endpoint takes some keys");
}

// ------------------------------------------------------ locality failover

fn zone(z: &str) -> Locality {
    Locality {
        region: "r".into(),
        zone: z.into(),
        sub_zone: "".into(),
    }
}

#[tokio::test]
async fn traffic_stays_in_the_local_zone_and_fails_over_when_it_is_down() {
    let local = serve_fn(|_req: Request| async { reply(200, "local") }).await;
    let remote = serve_fn(|_req: Request| async { reply(200, "remote") }).await;
    let failover = |endpoints: &[(SocketAddr, Locality)]| {
        one_service(
            "svc",
            Cluster {
                locality_failover: true,
                slow_start: None,
                tls: None,
                outlier_detection: Some(OutlierDetection {
                    consecutive_5xx: None,
                    consecutive_gateway_errors: Some(1),
                    interval: ms(50),
                    base_ejection_time: Duration::from_secs(10),
                    max_ejection_percent: 100,
                    min_health_percent: 0,
                }),
                ..cluster(Protocol::Http1)
            },
            retrying(RetryPolicy {
                retry_remote_localities: true,
                ..retry(2, RetryOn::CONNECT_FAILURE)
            }),
            endpoints,
        )
    };
    let source = StaticSource::new(failover(&[(local, zone("a")), (remote, zone("b"))]))
        .with_locality(zone("a"));
    let client: Client = MeshClient::new(source);
    for _ in 0..30 {
        assert_eq!(&send(&client, get("http://svc/")).await.2[..], b"local");
    }

    // The local endpoint is gone: the retry goes to the other zone, and the
    // dead endpoint is ejected.
    let dead = closed_port().await;
    let source = StaticSource::new(failover(&[(dead, zone("a")), (remote, zone("b"))]))
        .with_locality(zone("a"));
    let client: Client = MeshClient::new(source);
    for _ in 0..30 {
        let (status, _, body) = send(&client, get("http://svc/")).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"remote"[..]));
    }
    assert_eq!(client.stats().ejections(), 1);
    assert_eq!(client.stats().retries(), 1);
}

/// The fast path (no retry, timeout or fault) still reports to outlier
/// detection and releases breaker slots with the response body.
#[tokio::test]
async fn the_fast_path_feeds_outlier_detection_and_the_breaker() {
    let bad = serve_fn(|_req: Request| async { reply(503, "") }).await;
    let good = serve_fn(|_req: Request| async { reply(200, "ok") }).await;
    let snapshot = one_service(
        "svc",
        Cluster {
            outlier_detection: Some(outlier(2, Duration::from_secs(10), 50)),
            circuit_breakers: CircuitBreakers {
                max_requests: 1,
                ..CircuitBreakers::default()
            },
            ..cluster(Protocol::Http1)
        },
        RoutePolicy::default(),
        &[(bad, here()), (good, here())],
    );
    let client = client(snapshot);
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(send(&client, get("http://svc/")).await.0.as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(client.stats().ejections(), 1);
    // One slot, held until the body is read: a second request overflows.
    let held: http::Response<ResponseBody> =
        client.clone().oneshot(get("http://svc/")).await.unwrap();
    let (status, headers, _) = send(&client, get("http://svc/")).await;
    assert_eq!(
        (status.as_u16(), headers.get(OVERLOADED_HEADER).is_some()),
        (503, true)
    );
    held.into_body().collect().await.unwrap();
    assert_eq!(send(&client, get("http://svc/")).await.0, 200);
}
