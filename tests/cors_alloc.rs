//! The server stack's CORS path in process (see `mesh_tower`'s `cors`
//! module): a request without `Origin` costs no allocation more than with
//! no CORS routes at all, and `InboundPolicy::set_cors` routes answer
//! preflights without the app. Allocations are counted process-wide
//! (`stats_alloc`), so this binary holds only these tests, run one at a
//! time under a lock, on a current-thread runtime.

use std::alloc::System;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use proxyless::mesh_core::cors::{CorsPolicy, CorsRoute};
use proxyless::mesh_core::model::{MtlsMode, RouteMatch, ValueMatch};
use proxyless::{InboundPolicy, ServerContext, ServerLayer};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::{Layer, Service, ServiceExt};

#[global_allocator]
static HEAP: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn routes() -> Vec<CorsRoute> {
    vec![CorsRoute {
        matcher: RouteMatch::any(),
        policy: Some(Arc::new(CorsPolicy {
            allow_origins: Arc::from([ValueMatch::Exact("https://example.com".into())]),
            allow_methods: Some(http::HeaderValue::from_static("GET,POST")),
            allow_headers: None,
            expose_headers: None,
            max_age: Some(http::HeaderValue::from_static("600")),
            allow_credentials: None,
            forward_not_matching_preflights: None,
        })),
    }]
}

type App =
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

fn app(calls: Arc<AtomicU64>) -> App {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Full<Bytes>>| {
        calls.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"app")))) }
    }))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

fn layer(policy: &InboundPolicy) -> ServerLayer {
    ServerLayer::new(ServerContext::new("ratings", "prod", "ratings-1")).inbound(policy.clone())
}

fn request(method: http::Method, headers: &[(&'static str, &'static str)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri("http://ratings/ratings/1");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

/// Allocations of one GET with `headers` through a `ServerLayer` whose
/// policy has `cors` routes, after a warm-up call (one-time caches are not
/// counted); the request is built before counting.
fn allocations(cors: Vec<CorsRoute>, headers: &[(&'static str, &'static str)]) -> usize {
    let rt = runtime();
    let policy = InboundPolicy::fixed(MtlsMode::Disable, Vec::new());
    policy.set_cors(cors);
    let mut svc = layer(&policy).layer(app(Arc::new(AtomicU64::new(0))));
    rt.block_on(async {
        svc.ready().await.expect("ready");
        let _ = svc.call(request(http::Method::GET, headers)).await;
    });
    let req = request(http::Method::GET, headers);
    rt.block_on(async {
        svc.ready().await.expect("ready");
        let region = Region::new(HEAP);
        let response = svc.call(req).await;
        let n = region.change().allocations;
        drop(response);
        n
    })
}

#[test]
fn a_request_without_origin_allocates_nothing_for_cors() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let without_routes = allocations(Vec::new(), &[]);
    let with_routes = allocations(routes(), &[]);
    assert_eq!(
        with_routes, without_routes,
        "CORS routes must cost a request without Origin nothing but a header lookup"
    );
    // Another origin: matched against the routes, still no allocation.
    let other = allocations(routes(), &[("origin", "https://evil.test")]);
    let other_without_routes = allocations(Vec::new(), &[("origin", "https://evil.test")]);
    assert_eq!(other, other_without_routes);
}

#[test]
fn set_cors_routes_answer_preflights_without_the_app() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rt = runtime();
    let policy = InboundPolicy::fixed(MtlsMode::Disable, Vec::new());
    policy.set_cors(routes());
    let calls = Arc::new(AtomicU64::new(0));
    let mut svc = layer(&policy).layer(app(Arc::clone(&calls)));
    let preflight = [
        ("origin", "https://example.com"),
        ("access-control-request-method", "POST"),
    ];
    let response = rt.block_on(async {
        svc.ready().await.expect("ready");
        svc.call(request(http::Method::OPTIONS, &preflight))
            .await
            .expect("response")
    });
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], "https://example.com");
    assert_eq!(h["access-control-allow-methods"], "GET,POST");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(calls.load(Ordering::Relaxed), 0, "the app never saw it");
    // Routes removed: the same preflight reaches the app, with no header.
    policy.set_cors(Vec::new());
    let response = rt.block_on(async {
        svc.ready().await.expect("ready");
        svc.call(request(http::Method::OPTIONS, &preflight))
            .await
            .expect("response")
    });
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    assert_eq!(calls.load(Ordering::Relaxed), 1);
}
