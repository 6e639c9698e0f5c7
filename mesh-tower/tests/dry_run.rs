//! Dry-run authorization policies (`istio.io/dry-run: "true"`, issue 13,
//! acceptance 7) on a real server: `serve_with` over mTLS with
//! certificates from `mesh_testkit::pki`, the app under a `ServerLayer` and
//! its telemetry. A dry-run policy is evaluated beside the enforced ones and
//! changes nothing: a dry-run DENY matching every request denies none, and
//! what it would have done shows on the span (Istio's
//! `istio.authorization.dry_run.*` tags), in `mesh_authz_dry_run_total`, in
//! the access log and in a `tracing` INFO line.

#![cfg(feature = "telemetry")]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use common::admin::fake_admin;
use common::pki::TestCaExt as _;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::model::MtlsMode;
use mesh_core::rbac::{Action, AuthorizationPolicy, Operation, Rule, Source, StringMatch};
use mesh_testkit::logs::Lines;
use mesh_testkit::otlp::{Receiver, Span, SpanKind, find};
use mesh_testkit::pki::{CATALOG, FRONTEND, Leaf, PAYMENT, TestCa, server_name, trust_any_server};
use mesh_testkit::wait::within;
use mesh_tower::telemetry::{Identity, MetricsRegistry, OtelConfig, OtlpProtocol, Telemetry};
use mesh_tower::{
    InboundPolicy, Registration, Security, ServerContext, ServerLayer, Serving, serve_with,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// The tests of this file run one at a time: the first captures `tracing`
/// output with a subscriber of its own thread, which events the other test
/// fires meanwhile on another thread can keep from seeing its own (the
/// callsite interest cache is process-wide).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a test waits for spans and log lines.
const WAIT: Duration = Duration::from_secs(10);

const DENY_NAME: &str = "istio.authorization.dry_run.deny_policy.name";
const DENY_RESULT: &str = "istio.authorization.dry_run.deny_policy.result";
const ALLOW_NAME: &str = "istio.authorization.dry_run.allow_policy.name";
const ALLOW_RESULT: &str = "istio.authorization.dry_run.allow_policy.result";

// ----- policies -----

/// A DENY policy matching every request (`rules: [{}]`), in dry-run.
fn dry_run_deny_all() -> AuthorizationPolicy {
    AuthorizationPolicy::new("shop", "deny-all", Action::Deny, vec![Rule::default()])
        .unwrap()
        .with_dry_run(true)
}

/// A DENY policy for paths under `/admin`, in dry-run.
fn dry_run_deny_admin() -> AuthorizationPolicy {
    AuthorizationPolicy::new(
        "shop",
        "deny-admin",
        Action::Deny,
        vec![Rule {
            to: vec![Operation {
                paths: vec![StringMatch::parse_path("/admin*").unwrap()].into(),
                ..Operation::default()
            }]
            .into(),
            ..Rule::default()
        }],
    )
    .unwrap()
    .with_dry_run(true)
}

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

// ----- the server and its clients -----

fn telemetry(otlp: SocketAddr, registry: &MetricsRegistry) -> Telemetry {
    Telemetry::builder(Identity::new("catalog", "shop").with_principal(CATALOG))
        .otel(
            &OtelConfig::default()
                .with_protocol(OtlpProtocol::Grpc)
                .with_endpoint(format!("http://{otlp}"))
                .unwrap(),
        )
        .unwrap()
        .metrics(registry)
        .access_log(true)
        .build()
}

/// `serve_with` under `policy`, the app (`/items`, `/admin/keys`) under a
/// `ServerLayer` with the same policy and `telemetry`, which `serve_with`
/// also reports its own refusals under.
async fn serve(ca: &TestCa, policy: InboundPolicy, telemetry: &Telemetry) -> (SocketAddr, Serving) {
    let (admin, _) = fake_admin(0, None).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/items", get(|| async { "items" }))
        .route("/admin/keys", get(|| async { "keys" }))
        .layer(
            ServerLayer::new(ServerContext::new("catalog", "shop", "catalog-1"))
                .inbound(policy.clone())
                .telemetry(telemetry.clone()),
        );
    let serving = serve_with(
        listener,
        Registration::new(admin.to_string(), "catalog").namespace("shop"),
        app,
        Security::new(policy)
            .certificates(ca.store(CATALOG))
            .telemetry(telemetry.clone()),
    )
    .await
    .unwrap();
    (addr, serving)
}

/// GET `path` over mTLS as `leaf`, HTTP/1.1 or (`h2`) HTTP/2.
async fn get_as(addr: SocketAddr, leaf: &Leaf, h2: bool, path: &str) -> StatusCode {
    within("a request", async {
        let mut config = trust_any_server(Some(leaf));
        config.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(server_name(), tcp)
            .await
            .unwrap();
        let io = TokioIo::new(tls);
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
        response.into_body().collect().await.unwrap();
        status
    })
    .await
}

/// The SERVER spans of catalog, once `n` have arrived, by `url.path`.
async fn server_spans(
    receiver: &Receiver,
    telemetry: &Telemetry,
    n: usize,
) -> HashMap<String, Vec<Span>> {
    let spans = receiver
        .wait_for(
            WAIT,
            async || telemetry.flush().await.unwrap(),
            |s| find(s, "catalog", SpanKind::Server).len() >= n,
        )
        .await;
    let mut by_path: HashMap<String, Vec<Span>> = HashMap::new();
    for span in find(&spans, "catalog", SpanKind::Server) {
        by_path
            .entry(span.attr("url.path").to_owned())
            .or_default()
            .push(span.clone());
    }
    assert_eq!(
        by_path.values().map(Vec::len).sum::<usize>(),
        n,
        "{by_path:#?}"
    );
    by_path
}

/// The value of the one metric line starting with `series`.
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// ----- tests -----

#[test]
fn a_dry_run_deny_matching_every_request_denies_nothing_and_reports_what_it_would_have_denied() {
    let _one = ONE_AT_A_TIME.blocking_lock();
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
    let policy = InboundPolicy::fixed(
        MtlsMode::Strict,
        vec![
            dry_run_deny_all(),
            // A dry-run ALLOW that matches nobody: it would have denied
            // everyone too.
            allow_principal("allow-nobody", "spiffe://cluster.local/ns/shop/sa/nobody")
                .with_dry_run(true),
        ],
    );
    assert!(policy.current().has_dry_run());
    runtime.block_on(async {
        let ca = TestCa::new("mesh root");
        let (receiver, otlp, _) = Receiver::start().await;
        let t = telemetry(otlp, &registry);
        let (addr, _serving) = serve(&ca, policy.clone(), &t).await;

        // Every request is served, from any peer, on any path.
        let requests = [
            (ca.leaf(FRONTEND), false, "/items"),
            (ca.leaf(PAYMENT), true, "/items"),
            (ca.leaf(PAYMENT), false, "/admin/keys"),
        ];
        for (leaf, h2, path) in &requests {
            assert_eq!(
                get_as(addr, leaf, *h2, path).await,
                StatusCode::OK,
                "{path}"
            );
        }
        assert_eq!(policy.denied(), 0, "a dry-run policy denied a request");

        // The spans say what the dry-run policies would have decided.
        let spans = server_spans(&receiver, &t, requests.len()).await;
        for span in spans.values().flatten() {
            assert_eq!(span.attr("http.response.status_code"), "200");
            assert_eq!(span.attr("mesh.authz.decision"), "allow");
            assert_eq!(span.attr(DENY_NAME), "shop/deny-all");
            assert_eq!(span.attr(DENY_RESULT), "denied");
            assert_eq!(span.attr(ALLOW_RESULT), "denied");
            assert!(
                !span.attributes.contains_key(ALLOW_NAME),
                "no dry-run ALLOW policy matched: {span:#?}"
            );
        }

        // The access log lines are written when the response bodies end.
        let deadline = tokio::time::Instant::now() + WAIT;
        while lines.text().matches("\"direction\":\"inbound\"").count() < requests.len() {
            assert!(tokio::time::Instant::now() < deadline, "{}", lines.text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    // The counter, in the same exposition as Istio's metrics.
    let metrics = registry.render();
    assert_eq!(
        metric(
            &metrics,
            "mesh_authz_dry_run_total{action=\"deny\",result=\"denied\",policy=\"shop/deny-all\"}"
        ),
        Some(3),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "mesh_authz_dry_run_total{action=\"allow\",result=\"denied\",policy=\"\"}"
        ),
        Some(3),
        "{metrics}"
    );
    assert!(
        !metrics.contains("result=\"allowed\""),
        "nothing would have been allowed: {metrics}"
    );
    let served: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("response_code=\"200\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(served, 3, "{metrics}");
    assert!(
        !metrics.contains("response_code=\"403\""),
        "a request was denied: {metrics}"
    );

    let text = lines.text();
    // An INFO line for each request a dry-run policy would have denied.
    let would_deny: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("would have denied") && l.contains("shop/deny-all"))
        .collect();
    assert_eq!(would_deny.len(), 3, "{text}");
    assert!(would_deny.iter().all(|l| l.contains(" INFO ")), "{text}");
    // The access log carries the dry-run results.
    let access: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.find('{').map(|i| &l[i..]))
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["direction"] == "inbound")
        .collect();
    assert_eq!(access.len(), 3, "{text}");
    for line in &access {
        assert_eq!(line["response_code"], 200, "{line}");
        assert_eq!(
            line["response_code_details"],
            serde_json::Value::Null,
            "{line}"
        );
        assert_eq!(
            line["istio_dry_run_deny_shadow_effective_policy_id"], "shop/deny-all",
            "{line}"
        );
        assert_eq!(
            line["istio_dry_run_deny_shadow_engine_result"], "denied",
            "{line}"
        );
        assert_eq!(
            line["istio_dry_run_allow_shadow_engine_result"], "denied",
            "{line}"
        );
        assert_eq!(
            line["istio_dry_run_allow_shadow_effective_policy_id"],
            serde_json::Value::Null,
            "{line}"
        );
    }
}

#[tokio::test]
async fn dry_run_results_sit_beside_the_enforced_decision_even_on_a_denial() {
    let _one = ONE_AT_A_TIME.lock().await;
    let registry = MetricsRegistry::new();
    let (receiver, otlp, _) = Receiver::start().await;
    let t = telemetry(otlp, &registry);
    let ca = TestCa::new("mesh root");
    // Enforced: only the frontend. Dry-run: deny /admin, allow payment.
    let policy = InboundPolicy::fixed(
        MtlsMode::Strict,
        vec![
            allow_principal("allow-frontend", FRONTEND),
            dry_run_deny_admin(),
            allow_principal("allow-payment", PAYMENT).with_dry_run(true),
        ],
    );
    let (addr, _serving) = serve(&ca, policy.clone(), &t).await;

    // The enforced policy alone decides: the dry-run ALLOW for payment does
    // not let payment in, the dry-run DENY on /admin does not keep the
    // frontend out.
    let frontend = ca.leaf(FRONTEND);
    let payment = ca.leaf(PAYMENT);
    assert_eq!(
        get_as(addr, &frontend, true, "/items").await,
        StatusCode::OK
    );
    assert_eq!(
        get_as(addr, &frontend, false, "/admin/keys").await,
        StatusCode::OK
    );
    assert_eq!(
        get_as(addr, &payment, true, "/items").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(policy.denied(), 1);

    let spans = server_spans(&receiver, &t, 3).await;
    let admin = &spans["/admin/keys"][0];
    assert_eq!(admin.attr(DENY_NAME), "shop/deny-admin");
    assert_eq!(admin.attr(DENY_RESULT), "denied");
    assert_eq!(admin.attr(ALLOW_RESULT), "denied");
    let items = &spans["/items"];
    let by_status = |code: &str| {
        items
            .iter()
            .find(|s| s.attr("http.response.status_code") == code)
            .unwrap_or_else(|| panic!("no {code} span: {items:#?}"))
    };
    // The frontend on /items: nothing would have been denied by the dry-run
    // DENY (no name: none matched); the dry-run ALLOW (payment only) would
    // have denied it.
    let allowed = by_status("200");
    assert_eq!(allowed.attr(DENY_RESULT), "allowed");
    assert!(!allowed.attributes.contains_key(DENY_NAME), "{allowed:#?}");
    assert_eq!(allowed.attr(ALLOW_RESULT), "denied");
    // Payment, denied by serve_with under the enforced policy: its span
    // (from serve_with's telemetry) still says the dry-run ALLOW would have
    // let it in.
    let denied = by_status("403");
    assert_eq!(denied.attr("mesh.authz.decision"), "deny");
    assert_eq!(denied.attr(ALLOW_NAME), "shop/allow-payment");
    assert_eq!(denied.attr(ALLOW_RESULT), "allowed");
    assert_eq!(denied.attr(DENY_RESULT), "allowed");

    let metrics = registry.render();
    for (series, n) in [
        (
            "mesh_authz_dry_run_total{action=\"deny\",result=\"denied\",policy=\"shop/deny-admin\"}",
            1,
        ),
        (
            "mesh_authz_dry_run_total{action=\"deny\",result=\"allowed\",policy=\"\"}",
            2,
        ),
        (
            "mesh_authz_dry_run_total{action=\"allow\",result=\"denied\",policy=\"\"}",
            2,
        ),
        (
            "mesh_authz_dry_run_total{action=\"allow\",result=\"allowed\",policy=\"shop/allow-payment\"}",
            1,
        ),
    ] {
        assert_eq!(metric(&metrics, series), Some(n), "{series}: {metrics}");
    }
}
